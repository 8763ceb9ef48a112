"""Lesion family "perivenular": lesions grown around small veins, brightened by contrast-to-noise.

Written from the issue 34 brief and :mod:`trainer.lesion_families.base` only (not from the other
families' code). Arrays and units follow ``base``: ``(Z, Y, X)``, Y grows towards posterior, X towards
the patient's left, ``spacing = (sz, sy, sx)`` in mm, normalised intensities.

Shape and placement (veins)
    MS plaques form around small veins (the perivenular distribution behind the "central vein sign",
    Tallantyre et al. 2008, Sati et al. 2016). In the cord the intramedullary veins are radial veins
    running from the pial surface inward and the central (sulcal) veins in the ventral median fissure
    (Thron's angiographic anatomy of the cord's veins). A lesion is one vein, or two adjacent ones
    (confluent, p :data:`P_CONFLUENT`, a choice), modelled as a straight segment in the axial plane of
    each slice, repeated along Z over the lesion's length, and the lesion is the region whose distance
    to the segment is below a radius that tapers along Z (``r0 * sqrt(1 - u**2)``, ``u`` the relative
    Z position, a cigar; a choice) with a lumpy boundary (the radius times ``1 + a * n``, ``n`` a
    smooth unit-SD Gaussian field of ~1 mm in plane and ~3 mm along Z, ``a`` in
    :data:`LUMP_AMPLITUDE`; a choice).
    Vein angles: dorsal 40 %, lateral 38 %, ventral (antero-lateral) 10 %, central/sulcal 12 %
    (:data:`KIND_P`): Eden et al. 2019 (Brain, cervical lesion frequency maps, multi-centre) found the
    dorsal and lateral columns most often hit and the ventral less; the shares are a choice in that
    order, each radial angle spread by 20 degrees (a choice). Radial veins start at the pia
    (subpial, p :data:`P_SUBPIAL` = 0.8: Eden 2019's lesions are mostly peripheral / subpial; the
    number is a choice) and run 25-70 % of the way to the centre; else the lesion sits on a deep
    stretch of the vein (from 35-55 % inward, 20-35 % long, 0.6x the radius; a choice). Sulcal
    veins run from 35-60 % to 85-105 % of the ventral ray (the ventral median fissure towards the
    grey commissure; a choice).
    Sizes: length log-uniform in :data:`LENGTH_MM` = 3-40 mm (Kearney et al. 2015: cord MS lesions
    are usually shorter than two vertebral segments, ~35-40 mm), peak radius log-uniform in
    :data:`RADIUS_MM` = 0.7-2.2 mm (a choice that, with vein segments of 1-5 mm, gives 5-300 mm³);
    a lesion is redrawn (its radius shrunk first, by 0.8 up to 3 times) until its volume is in
    :data:`VOLUME_MM3` = 5-300 mm³, it is one connected component and it covers at most
    :data:`MAX_AREA_FRACTION` = 50 % of the cord's cross-section in every slice (Kearney 2015: MS
    lesions usually < half the cross-section). 1, 2 or 3 lesions per draw with p 0.55 / 0.30 / 0.15
    (multifocal; a choice), kept 2 voxels apart (not touching each other).
Intensity (contrast-to-noise)
    The local noise ``sigma`` is the robust SD (1.4826 MAD) of the in-plane high-pass residual
    (image minus its 3x3 mean, corrected by ``sqrt(8/9)``) over the eroded cord within 5 mm of the
    lesion, floored at 4 % of the local cord median (a choice: resampled images can look
    noise-free). The lesion's mean over its label is set to the local cord median (within 5 mm)
    plus ``CNR * sigma`` (but at least ``CNR * sigma / 2`` above the tissue it is painted on, so a
    lesion on partial-volume-bright edge voxels still shows; a choice), CNR in
    :data:`CNR` = 2-15 drawn as ``2 + 13 * Beta(1.2, 3)`` (median ~5: skewed to faint lesions; the
    Rose criterion puts a small object's detectability at a CNR of ~3-5, so the low end is faint
    but visible over a few voxels; the range is a choice). Painted voxels are capped at the local
    CSF level (90th percentile of a 2 mm ring around the cord) where CSF is brighter than the cord,
    else at 2x the local cord median (a choice, T1w), and at the normalised ceiling 1.5.
    Central-vein dot (p :data:`P_DOT`, a choice): the rise is 20-40 % lower within ~0.4 mm of the
    vein (a hypointense vein as on T2*-w).
Edges
    In plane, the voxel's fraction ramps linearly over a width of 0.3 voxel (sharp, p 0.5) or
    0.5-1.2 mm (soft); along Z the fraction is averaged over sub-slices <= 1 mm apart, so thick
    slices carry the partial volume of the lesion's ends and lumps (both choices). The label is the
    voxels of fraction >= 0.5 inside the cord; paint is applied only inside the cord (the cord mask
    is returned unchanged: no swelling, a red flag against MS).
Measured (``bench/lesion_family_stats.py --family perivenular``, 200 draws on the training volumes)
    p5-p95: 9.7-236 mm³, 3-32 mm long, lesion mean 1.02-1.97x the cord median (median 1.28);
    84.8 % touch the cord's edge; columns central 27.8 %, dorsal 29.1 %, lateral 32.1 %,
    ventral 10.9 % (the bench's "central" is the centroid within half the cord's radius, so deep
    radial and sulcal lesions count there); 1.51 lesions per draw; cord changed in 0 % of draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from trainer.lesion_families.base import LesionDraw

FAMILY = "perivenular"

LENGTH_MM = (3.0, 40.0)
VOLUME_MM3 = (5.0, 300.0)
MAX_AREA_FRACTION = 0.5
RADIUS_MM = (0.7, 2.2)
CNR = (2.0, 15.0)
CNR_BETA = (1.2, 3.0)
NOISE_FLOOR = 0.04  # x the local cord median
DARK_CSF_CAP = 2.0  # x the local cord median when CSF is not brighter than the cord
LUMP_AMPLITUDE = (0.1, 0.35)
KIND_P = {"dorsal": 0.40, "lateral": 0.38, "ventral": 0.10, "central": 0.12}
P_SUBPIAL = 0.8
P_CONFLUENT = 0.2
P_DOT = 0.3
N_LESIONS_P = (0.55, 0.30, 0.15)
MIN_CORD_AREA_MM2 = 10.0
SLAB_MM = 5.0


@dataclass(frozen=True)
class Vein:
    """One vein segment of a lesion, in the axial plane of each slice.

    Attributes
    ----------
    theta : float
        Polar angle (rad) of the ray from the cord's centroid: 0 = +X (patient's left), pi/2 = +Y (dorsal).
    start, stop : float
        Where the segment lies on the ray from the pia (0) to the centroid (1), as fractions.
    z_mm : float
        Centre of the lesion along Z, mm from the centre of slice 0.
    length_mm : float
        Length of the lesion along Z, mm.
    radius_mm : float
        Peak radius of the lesion around the segment, mm.
    """

    theta: float
    start: float
    stop: float
    z_mm: float
    length_mm: float
    radius_mm: float


@dataclass(frozen=True)
class Lesion:
    """A lesion: its veins (two when confluent), boundary lumpiness, edge width (mm), central-vein dot depth."""

    veins: tuple[Vein, ...]
    lump: float
    edge_mm: float
    dot: float


def generate(rng: np.random.Generator, image: np.ndarray, cord: np.ndarray,
             spacing: tuple[float, float, float]) -> LesionDraw:
    """One draw: 1-3 perivenular lesions painted into ``image`` (see the module docstring).

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness.
    image : numpy.ndarray
        ``(Z, Y, X)`` float32 normalised intensities.
    cord : numpy.ndarray
        ``(Z, Y, X)`` cord mask (nonzero = cord).
    spacing : tuple of float
        ``(sz, sy, sx)`` in mm.

    Returns
    -------
    LesionDraw
        The painted image (a new array), the lesion label (uint8, inside the cord), the unchanged cord (uint8).
    """
    img = np.array(image, dtype=np.float32, copy=True)
    c = cord > 0
    lesion = np.zeros(c.shape, bool)
    area = c.sum(axis=(1, 2)) * spacing[1] * spacing[2]
    usable = np.nonzero(area >= MIN_CORD_AREA_MM2)[0]
    if usable.size == 0:
        return LesionDraw(img, lesion.astype(np.uint8), c.astype(np.uint8))
    centre = _centroids(c)
    for _ in range(1 + int(rng.choice(len(N_LESIONS_P), p=N_LESIONS_P))):
        found = _place(rng, c, lesion, usable, centre, spacing)
        if found is None:
            continue
        box, frac, weight = found
        label = frac >= 0.5
        img[box] = _paint(rng, img, c, box, label, weight, spacing)
        lesion[box] |= label
    return LesionDraw(img, lesion.astype(np.uint8), c.astype(np.uint8))


def _centroids(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice cord centroid ``(cy, cx)`` in voxels, each ``(Z,)`` (NaN where the slice has no cord)."""
    n = c.sum(axis=(1, 2)).astype(float)
    ys = np.arange(c.shape[1])[None, :, None]
    xs = np.arange(c.shape[2])[None, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = (c * ys).sum(axis=(1, 2)) / n
        cx = (c * xs).sum(axis=(1, 2)) / n
    return cy, cx


def _draw_vein(rng: np.random.Generator, z_mm: float, length_mm: float, radius_mm: float,
               kind: str) -> Vein:
    """A vein of ``kind`` (``dorsal``/``lateral``/``ventral``/``central``) with angle and depth drawn."""
    spread = np.radians(20.0)
    if kind == "central":
        return Vein(-np.pi / 2, float(rng.uniform(0.35, 0.6)), float(rng.uniform(0.85, 1.05)),
                    z_mm, length_mm, radius_mm)
    if kind == "dorsal":
        theta = np.pi / 2 + rng.normal(0.0, spread)
    elif kind == "lateral":
        theta = (0.0 if rng.random() < 0.5 else np.pi) + rng.normal(0.0, spread)
    else:
        theta = -np.pi / 2 + rng.choice([-1.0, 1.0]) * rng.uniform(np.radians(20), np.radians(60))
    if rng.random() < P_SUBPIAL:
        start, stop = 0.0, float(rng.uniform(0.25, 0.7))
    else:
        start = float(rng.uniform(0.35, 0.55))
        stop = start + float(rng.uniform(0.2, 0.35))
        radius_mm *= 0.6  # a deep lesion stays off the pia (a choice)
    return Vein(float(theta), start, stop, z_mm, length_mm, radius_mm)


def _draw_lesion(rng: np.random.Generator, usable: np.ndarray, sz: float, sy: float, sx: float) -> Lesion:
    """Kind, veins (one or two adjacent), length, radius, lumps, edge width and dot of one lesion."""
    kinds = list(KIND_P)
    kind = kinds[int(rng.choice(len(kinds), p=list(KIND_P.values())))]
    z_mm = (float(rng.choice(usable)) + rng.uniform(-0.5, 0.5)) * sz
    length = float(np.exp(rng.uniform(*np.log(LENGTH_MM))))
    radius = float(np.exp(rng.uniform(*np.log(RADIUS_MM))))
    veins = [_draw_vein(rng, z_mm, length, radius, kind)]
    if rng.random() < P_CONFLUENT:
        v = veins[0]
        dtheta = rng.choice([-1.0, 1.0]) * np.radians(rng.uniform(15, 35))
        dz = rng.uniform(-0.3, 0.3) * length
        stop = float(np.clip(v.stop * rng.uniform(0.7, 1.3), 0.15, 1.0))
        veins.append(Vein(v.theta + float(dtheta), v.start, stop, z_mm + float(dz),
                          length * float(rng.uniform(0.6, 1.0)), v.radius_mm * float(rng.uniform(0.7, 1.0))))
    edge = 0.3 * min(sy, sx) if rng.random() < 0.5 else float(rng.uniform(0.5, 1.2))
    dot = float(rng.uniform(0.2, 0.4)) if rng.random() < P_DOT else 0.0
    return Lesion(tuple(veins), float(rng.uniform(*LUMP_AMPLITUDE)), edge, dot)


def _shrunk(les: Lesion, factor: float) -> Lesion:
    """``les`` with every vein's radius times ``factor``."""
    veins = tuple(Vein(v.theta, v.start, v.stop, v.z_mm, v.length_mm, v.radius_mm * factor) for v in les.veins)
    return Lesion(veins, les.lump, les.edge_mm, les.dot)


Box = tuple[slice, slice, slice]


def _place(rng: np.random.Generator, c: np.ndarray, taken: np.ndarray, usable: np.ndarray,
           centre: tuple[np.ndarray, np.ndarray], spacing: tuple[float, float, float]
           ) -> tuple[Box, np.ndarray, np.ndarray] | None:
    """Draw lesions until one meets the size, cross-section and separation limits (12 tries).

    Returns
    -------
    tuple or None
        ``(box, frac, weight)``: the lesion's bounding box in the volume, its per-voxel fraction
        (float32 in [0, 1], zero outside the cord) and paint weight (the fraction times the central-vein
        dot), both of the box's shape; None when every try failed.
    """
    vox = float(np.prod(spacing))
    near = ndimage.binary_dilation(taken, np.ones((3, 3, 3), bool), iterations=2) if taken.any() else taken
    for _ in range(12):
        les = _draw_lesion(rng, usable, *spacing)
        box = _box(les, c, spacing)
        if box is None:
            continue
        cb = c[box]
        cord_area = np.maximum(cb.sum(axis=(1, 2)), 1)
        noise = _lump_field(rng, cb.shape, spacing)
        for _shrink in range(4):
            frac, dist = _fraction(les, cb, box, centre, spacing, noise)
            label = frac >= 0.5
            vol = float(label.sum()) * vox
            area_ok = bool((label.sum(axis=(1, 2)) <= MAX_AREA_FRACTION * cord_area).all())
            if vol <= VOLUME_MM3[1] and area_ok:
                break
            les = _shrunk(les, 0.8)
        if not (VOLUME_MM3[0] <= vol <= VOLUME_MM3[1] and area_ok) or (label & near[box]).any():
            continue
        if ndimage.label(label, np.ones((3, 3, 3), bool))[1] != 1:
            continue
        weight = frac * (1.0 - les.dot * np.exp(-0.5 * (dist / 0.4) ** 2))
        return box, frac, weight.astype(np.float32)
    return None


def _box(les: Lesion, c: np.ndarray, spacing: tuple[float, float, float]) -> Box | None:
    """The slices the lesion's veins span (one slice of margin) by the cord's in-plane bounding box."""
    sz = spacing[0]
    lo = min(v.z_mm - v.length_mm / 2 for v in les.veins) / sz
    hi = max(v.z_mm + v.length_mm / 2 for v in les.veins) / sz
    z0, z1 = max(int(np.floor(lo + 0.5)) - 1, 0), min(int(np.ceil(hi - 0.5)) + 2, c.shape[0])
    if z1 <= z0 or not c[z0:z1].any():
        return None
    ys = np.nonzero(c[z0:z1].any(axis=(0, 2)))[0]
    xs = np.nonzero(c[z0:z1].any(axis=(0, 1)))[0]
    return slice(z0, z1), slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1)


def _subslices(sz: float) -> int:
    """Sub-slices per slice for the partial volume along Z: ``ceil(sz / 1 mm)``."""
    return max(1, int(np.ceil(sz / 1.0 - 1e-6)))


def _lump_field(rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, float, float]) -> np.ndarray:
    """Smooth unit-SD Gaussian noise ``(Z * k, Y, X)`` on the sub-slice grid (~3 mm along Z, ~1 mm in plane)."""
    k = _subslices(spacing[0])
    n = rng.standard_normal((shape[0] * k, shape[1], shape[2]))
    sigma = (3.0 / (spacing[0] / k), 1.0 / spacing[1], 1.0 / spacing[2])
    f = ndimage.gaussian_filter(n, sigma, mode="reflect")
    sd = float(f.std())
    return f / sd if sd > 0 else f


def _fraction(les: Lesion, cb: np.ndarray, box: Box, centre: tuple[np.ndarray, np.ndarray],
              spacing: tuple[float, float, float], noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel lesion fraction and distance to the nearest vein (mm) in ``box``, each of ``cb``'s shape.

    The fraction is the in-plane edge ramp ``clip(0.5 + margin / edge_mm, 0, 1)`` averaged over the
    slice's k sub-slices, where margin = tapered lumpy radius - distance to the vein (max over veins);
    zero outside the cord.
    """
    sz, sy, sx = spacing
    k = _subslices(sz)
    z0 = box[0].start
    yy = (np.arange(box[1].start, box[1].stop) * sy)[:, None]
    xx = (np.arange(box[2].start, box[2].stop) * sx)[None, :]
    frac = np.zeros(cb.shape, np.float32)
    dist_min = np.full(cb.shape, np.inf, np.float32)
    for iz in range(cb.shape[0]):
        z = z0 + iz
        if not cb[iz].any() or not np.isfinite(centre[0][z]):
            continue
        dists = [_segment_distance(v, cb[iz], box, (centre[0][z], centre[1][z]), (sy, sx), yy, xx)
                 for v in les.veins]
        dist_min[iz] = np.min(dists, axis=0)
        acc = np.zeros(cb.shape[1:], np.float32)
        for j in range(k):
            zp = (z + (j + 0.5) / k - 0.5) * sz
            margin = np.full(cb.shape[1:], -np.inf, np.float32)
            for v, d in zip(les.veins, dists):
                u = (zp - v.z_mm) / (v.length_mm / 2)
                if abs(u) >= 1.0:
                    continue
                r = v.radius_mm * np.sqrt(1.0 - u * u) * (1.0 + les.lump * noise[iz * k + j])
                margin = np.maximum(margin, r - d)
            acc += np.clip(0.5 + margin / les.edge_mm, 0.0, 1.0)
        frac[iz] = np.where(cb[iz], acc / k, 0.0)
    return frac, dist_min


def _segment_distance(v: Vein, cs: np.ndarray, box: Box, c_yx: tuple[float, float], sp_yx: tuple[float, float],
                      yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Distance (mm) of every in-plane voxel of the box to vein ``v``'s segment in this slice ``(Y, X)``.

    The ray leaves the cord centroid ``c_yx`` (voxels) at angle ``v.theta``; the pia is where the
    ray last lies in the cord slice ``cs`` (the box's crop), found in 0.2 mm steps.
    """
    sy, sx = sp_yx
    uy, ux = np.sin(v.theta), np.cos(v.theta)
    t = np.arange(0.0, 20.0, 0.2)
    iy = np.round(c_yx[0] + t * uy / sy).astype(int) - box[1].start
    ix = np.round(c_yx[1] + t * ux / sx).astype(int) - box[2].start
    ok = (iy >= 0) & (iy < cs.shape[0]) & (ix >= 0) & (ix < cs.shape[1])
    inside = np.zeros(t.shape, bool)
    inside[ok] = cs[iy[ok], ix[ok]]
    edge = float(t[np.nonzero(inside)[0][-1]]) + 0.3 if inside.any() else 0.0
    cy_mm, cx_mm = c_yx[0] * sy, c_yx[1] * sx
    a = np.array([cy_mm + edge * (1 - v.start) * uy, cx_mm + edge * (1 - v.start) * ux])
    b = np.array([cy_mm + edge * (1 - v.stop) * uy, cx_mm + edge * (1 - v.stop) * ux])
    ab = b - a
    denom = float(ab @ ab)
    py, px = yy - a[0], xx - a[1]
    s = np.clip((py * ab[0] + px * ab[1]) / denom, 0.0, 1.0) if denom > 0 else np.zeros_like(py + px)
    return np.asarray(np.hypot(py - s * ab[0], px - s * ab[1]), np.float32)


def _paint(rng: np.random.Generator, img: np.ndarray, c: np.ndarray, box: Box, label: np.ndarray,
           weight: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The box of ``img`` with one lesion painted: its mean over the label = local cord median + CNR x
    local noise (at least half that rise above the tissue under it), capped.

    Returns
    -------
    numpy.ndarray
        The painted box, float32 of ``label``'s shape.
    """
    cord_med, sigma, cap = local_levels(img, c, box, spacing)
    cnr = CNR[0] + (CNR[1] - CNR[0]) * float(rng.beta(*CNR_BETA))
    rise = cnr * sigma
    sub = img[box]
    # lesion mean = local cord median + rise, and at least rise / 2 above the tissue under it
    gain = max(cord_med + rise - float(sub[label].mean()), 0.5 * rise)
    amp = gain / max(float(weight[label].mean()), 1e-3)
    painted = sub + amp * weight
    painted = np.minimum(painted, np.maximum(sub, cap))
    return np.clip(painted, None, np.maximum(sub, 1.5)).astype(np.float32)


def local_levels(img: np.ndarray, c: np.ndarray, box: Box, spacing: tuple[float, float, float]
                 ) -> tuple[float, float, float]:
    """``(cord median, noise SD, intensity cap)`` of the cord within 5 mm (along Z) of ``box``.

    The noise is the robust SD of the in-plane high-pass residual over the eroded cord (floored at
    :data:`NOISE_FLOOR` x the median); the cap is the local CSF level (90th percentile of a 2 mm ring
    around the cord) when that is brighter than the cord, else :data:`DARK_CSF_CAP` x the median.
    """
    m = int(np.ceil(SLAB_MM / spacing[0]))
    zs = slice(max(box[0].start - m, 0), min(box[0].stop + m, c.shape[0]))
    im, cs = img[zs], c[zs]
    med = float(np.median(im[cs]))
    inner = ndimage.binary_erosion(cs, np.ones((1, 3, 3), bool))
    pool = inner if inner.sum() >= 50 else cs
    resid = (im - ndimage.uniform_filter(im, size=(1, 3, 3)))[pool]
    sigma = 1.4826 * float(np.median(np.abs(resid - np.median(resid)))) / np.sqrt(8.0 / 9.0)
    sigma = max(sigma, NOISE_FLOOR * med, 1e-3)
    it = max(1, int(round(2.0 / min(spacing[1], spacing[2]))))
    ring = ndimage.binary_dilation(cs, np.ones((1, 3, 3), bool), iterations=it) & ~cs
    csf = float(np.percentile(im[ring], 90)) if ring.any() else med
    return med, sigma, (csf if csf > med else DARK_CSF_CAP * med)
