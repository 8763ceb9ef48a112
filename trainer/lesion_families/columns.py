"""Lesion family "columns": anatomical MS-type lesions in the cord's white-matter columns.

Each lesion is placed in one column of the axial cord cross-section, described per slice in
normalised polar coordinates: the origin is the slice's cord centre of mass, and each half-axis
(anterior, posterior, right, left) is divided by the cord's extent from that centre, so the cord's
outline sits at radius ~1 on every slice and the lesion follows the cord as it curves along Z.
Angle 0 points to the patient's left (+X), +90 deg to dorsal (+Y), -90 deg to ventral.

Placement model
    Column per lesion: dorsal 0.38, lateral 0.40 (left/right alike), ventral 0.12, central grey
    matter 0.10. MS cord lesions favour the lateral and dorsal columns, affect the anterior white
    matter less and the central grey matter least; focal lesions confined to the grey matter are
    unusual (Tartaglino et al., Radiology 1995;195:725-732; Lycklama et al., Lancet Neurol
    2003;2:555-562; Wattjes et al., MAGNIMS-CMSC-NAIMS consensus, Lancet Neurol 2021;20:653-670;
    Eden et al., Brain 2019;142:633-646, lesion frequency maps of 642 patients). Kearney,
    Miszkiel et al. (UCL, AAN meeting abstract: 16 patients, 51 lesions on axial PSIR) counted
    lateral 59 %, posterior 35 %, anterior 6 %, 67 % of lesions also in grey matter; the
    split above is my rounding of those counts towards the consensus wording, keeping some
    ventral and central lesions so that the model sees them at all (a choice).
    Direction within the column (choices, after the funiculi of a textbook cord section): dorsal
    90 +- N(0, 11 deg) clipped to +-26 deg; lateral -34..+43 deg from the left-right axis (the
    dorsolateral corticospinal tract side is wider); ventral -90 +- N(0, 17 deg) clipped to
    +-34 deg; central: centre within radius 0.15, any orientation.
    White-matter lesions are peripheral (reach the pia) with p = 0.72, since MS cord lesions are
    typically peripheral/subpial (Tartaglino 1995; Wattjes 2021); the number is my choice. A
    peripheral lesion is a wedge with its base on the surface (p = 0.55; wedge-shaped on axial
    images per Wattjes 2021) or an ovoid cut by the surface; the others are deep ovoids at radius
    0.50-0.75 (white matter, inside the outline).
Shape model
    A Z-elongated body: the axial cross-section scales with s(t) = sqrt(1 - t^2), t = (z - z0)/
    (L/2) (cigar-shaped on sagittal images, Wattjes 2021). Ovoids are ellipses (radial x
    tangential axes, aspect 0.6-1.8) scaled by s; wedges are sectors from radius
    1 - (1 - rho_in) s to the cord surface, half angle alpha sqrt(s). Length L: log-normal,
    median 11 mm, sigma 0.5, clipped to 3-30 mm: lesions are >= 3 mm and shorter than two
    vertebral segments (Wattjes 2021; Tartaglino 1995), two cervical segments being ~30-34 mm
    (a choice from adult anatomy); Kearney's abstract reports mean lengths of 18-25 mm. The minimum
    length is raised to 0.6 slice thickness on thick slices, so a lesion can reach a 0.5 fraction.
    Volume: log-normal, median 45 mm3, sigma 0.8, clipped to 5-300 mm3 (a choice; Kearney's
    mean areas of 4-11 mm2 times their lengths give ~50-190 mm3). The axial area at the centre,
    V / (2/3 L), is kept within 2.5 mm2 and 40 % of the cord area (25 % for central lesions),
    MS lesions covering less than half the cross-section (Tartaglino 1995; Wattjes 2021; Kearney's
    abstract: 6-16 % on average); the length is stretched (up to 30 mm) when the area would exceed
    that. The axial size is calibrated on the centre slice against the real cord mask. Edges
    ramp over 0.3-0.5 voxel in plane (a choice; sharply demarcated borders
    per Wattjes 2021); the
    fraction is computed at <= 0.5 mm steps through each slice and averaged, so thick slices get
    partial-volume edges. Lesions never overlap or touch (one voxel apart at least). A lesion
    whose label (fraction >= 0.5) is under 5 or over 300 mm3, shorter than 3 mm, in pieces, or
    over half a slice's cord area is redrawn (12 tries, then dropped).
Intensity model
    Target = r x m x (1 + tau n), capped at the CSF level; a voxel of fraction f becomes
    I + f max(target - I, 0) (never darker). m is the local normal-appearing cord intensity: the
    median of the cord over the lesion's slices +-5 mm. r ~ U(1.2, 2.2): no paper gives a
    distribution of lesion/cord T2 signal ratios usable here, so the range is my choice, bracketed
    by faint lesions on clinical T2 FSE (sensitivity only 51 % in the cervical cord, Alcaide-Leon
    et al., AJNR 2016;37:970-975) and the T2 prolongation of demyelinated cord measured post
    mortem (Bot et al., Radiology 2004;233:531-540). n is Gaussian noise smoothed over 1.5 voxel,
    tau 0.02-0.06, clipped at +-2 sd (mild texture, a choice). The CSF level is the 95th
    percentile of a 1-4 mm in-plane ring outside the cord over the same slab; a lesion is
    redrawn when that cap leaves less than 1.1 x m (no T2-like contrast to paint with).
Count
    1 lesion with p 0.5, 2/3/4 with p 0.25/0.15/0.10 (multifocal; a choice). No cord swelling
    (swelling is a red flag against MS, Wattjes 2021): the cord mask is returned unchanged.

Measured
    ``.venv/bin/python bench/lesion_family_stats.py --family columns --draws 200`` (the 17 real
    training volumes of ``lesion_recipe040_cv.toml``, model grid; ratio = lesion mean over the
    whole cord's median; column from the lesion centroid, central within half the radius):

    ===================  ======  ======  ======  ======  ======
    percentile           5       25      50      75      95
    ===================  ======  ======  ======  ======  ======
    volume (mm3)         11.3    23.0    42.2    76.8    146.9
    length along Z (mm)  4.0     7.5     10.0    15.0    22.5
    lesion/cord ratio    0.98    1.28    1.45    1.68    2.02
    ===================  ======  ======  ======  ======  ======

    365 lesions, 1.82 per draw; touching the cord edge 82.7 %; columns: central 10.1 %, dorsal
    36.4 %, lateral 40.0 %, ventral 13.4 %; cord changed (swelling) in 0 % of draws.
    Another 200 draws, seeded ``default_rng(i)`` on volume ``i % 17``, measured with
    :func:`describe` (ratio against the LOCAL cord median, which is what the family controls):
    394 lesions (draws with 1/2/3/4 lesions: 85/58/35/22), volume 5-300 mm3 (5th-95th 14-168),
    length 3-33 mm (5th-95th 5-20; 33 = two 16.5 mm slices), ratio 1.15/1.52/2.04 (5th/50th/
    95th), largest axial share of the cord 0.08 median, 0.40 max, edge 79 %, columns central
    8.9 / dorsal 33.8 / lateral 42.4 / ventral 15.0 %. Ratios under 1.2 come from the CSF cap
    (T2*w crops whose CSF is barely brighter than the cord) and partial-volume edge voxels; the
    bench's whole-cord median also differs from the local one along long sagittal volumes.
    About 3 % of the lesions asked for (mostly on the 5-slice, 16.5 mm MTS stack) find no free
    room in 12 tries and are dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from trainer.lesion_families.base import LesionDraw

FAMILY = "columns"

COLUMNS = ("dorsal", "lateral", "ventral", "central")
COLUMN_P = (0.38, 0.40, 0.12, 0.10)
COUNT_P = (0.50, 0.25, 0.15, 0.10)          # 1, 2, 3, 4 lesions
PERIPHERAL_P, WEDGE_P = 0.72, 0.55
VOLUME_MM3, VOLUME_MEDIAN, VOLUME_SIGMA = (5.0, 300.0), 45.0, 0.8
LENGTH_MM, LENGTH_MEDIAN, LENGTH_SIGMA = (3.0, 30.0), 11.0, 0.5
AXIAL_MM2, MAX_FRACTION, MAX_FRACTION_CENTRAL = 2.5, 0.40, 0.25
RATIO, MIN_RATIO, TEXTURE, EDGE_VOX = (1.2, 2.2), 1.1, (0.02, 0.06), (0.3, 0.5)
MIN_SLICE_MM2, RING_MM, CSF_PERCENTILE, SLAB_MM = 10.0, (1.0, 4.0), 95.0, 5.0
SUB_STEP_MM, MAX_SUB, TRIES = 0.5, 24, 12


@dataclass(frozen=True)
class _Cord:
    """Per-slice cord geometry: centre of mass and the four half-extents (voxels)."""

    mask: np.ndarray
    area: np.ndarray
    cy: np.ndarray
    cx: np.ndarray
    ant: np.ndarray
    post: np.ndarray
    right: np.ndarray
    left: np.ndarray
    ok: np.ndarray


@dataclass
class _Plan:
    """One lesion: ``rho``/``a``/``b`` are an ovoid's centre radius and semi-axes, or a wedge's
    inner radius and half angle (``b`` unused); ``z0``/``half`` in mm along Z."""

    column: str
    shape: str
    phi: float
    rho: float
    a: float
    b: float
    z0: float
    half: float


def _cord_geometry(cord: np.ndarray, spacing: tuple[float, float, float]) -> _Cord:
    m = cord > 0
    _, ny, nx = m.shape
    n = m.sum((1, 2)).astype(float)
    safe = np.maximum(n, 1.0)
    rows, cols = m.any(2), m.any(1)
    cy = (m.sum(2) @ np.arange(ny)) / safe
    cx = (m.sum(1) @ np.arange(nx)) / safe
    y0, y1 = rows.argmax(1), ny - 1 - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), nx - 1 - cols[:, ::-1].argmax(1)
    half = [np.maximum(h, 1.0) for h in (cy - y0 + 0.5, y1 + 0.5 - cy, cx - x0 + 0.5, x1 + 0.5 - cx)]
    area = n * spacing[1] * spacing[2]
    return _Cord(m, area, cy, cx, *half, ok=area >= MIN_SLICE_MM2)


def _normalised(g: _Cord, kz: slice, by: slice, bx: slice) -> tuple[np.ndarray, ...]:
    """``u`` (dorsal +), ``v`` (left +) and their per-voxel scales d/dvoxel on a box."""
    yy = np.arange(by.start, by.stop)[None, :, None] - g.cy[kz][:, None, None]
    xx = np.arange(bx.start, bx.stop)[None, None, :] - g.cx[kz][:, None, None]
    ky = 1.0 / np.where(yy > 0, g.post[kz][:, None, None], g.ant[kz][:, None, None])
    kx = 1.0 / np.where(xx > 0, g.left[kz][:, None, None], g.right[kz][:, None, None])
    shape = (yy.shape[0], yy.shape[1], xx.shape[2])
    return tuple(np.broadcast_to(a, shape) for a in (yy * ky, xx * kx, ky, kx))


def _fraction(p: _Plan, g: _Cord, kz: slice, by: slice, bx: slice, sz: float, edge: float) -> np.ndarray:
    """The lesion fraction on a box, averaged over sub-slice positions along Z, inside the cord."""
    u, v, ky, kx = _normalised(g, kz, by, bx)
    sin, cos = math.sin(p.phi), math.cos(p.phi)
    if p.shape == "ovoid":
        du, dv = u - p.rho * sin, v - p.rho * cos
        dr, dt = du * sin + dv * cos, du * cos - dv * sin
        base = np.maximum(np.sqrt((dr / p.a) ** 2 + (dt / p.b) ** 2), 1e-6)
        gy = (dr / p.a ** 2 * sin + dt / p.b ** 2 * cos) * ky / base
        gx = (dr / p.a ** 2 * cos - dt / p.b ** 2 * sin) * kx / base
        grad = np.maximum(np.hypot(gy, gx), 1e-3)
    else:
        rho = np.maximum(np.hypot(u, v), 1e-6)
        grad = np.maximum(np.hypot(u * ky, v * kx) / rho, 1e-3)
        dtheta = np.abs(np.angle(np.exp(1j * (np.arctan2(u, v) - p.phi))))
    nsub = int(min(MAX_SUB, max(1, math.ceil(sz / SUB_STEP_MM))))
    total = np.zeros(u.shape, dtype=np.float64)
    for j in range(nsub):
        zk = (np.arange(kz.start, kz.stop) + (j + 0.5) / nsub - 0.5) * sz
        t2 = ((zk - p.z0) / p.half) ** 2
        s = np.sqrt(np.clip(1.0 - t2, 0.0, None))[:, None, None]
        if p.shape == "ovoid":
            sd = (base - s) / grad
        else:
            sd = np.maximum((1.0 - (1.0 - p.rho) * s - rho) / grad, (dtheta - p.a * np.sqrt(s)) * rho / grad)
        total += np.clip(0.5 - sd / edge, 0.0, 1.0) * (s > 0)
    return (total / nsub) * g.mask[kz, by, bx]


def _axial_shape(rng: np.random.Generator, column: str, f: float) -> tuple[str, float, float, float, float]:
    """(shape, phi, rho, a, b) for a lesion covering a fraction ``f`` of the cord section."""
    if column == "central":
        e = rng.uniform(0.7, 1.4)
        return "ovoid", rng.uniform(-math.pi, math.pi), rng.uniform(0.0, 0.15), math.sqrt(f / e), math.sqrt(f * e)
    if column == "dorsal":
        phi = math.pi / 2 + float(np.clip(rng.normal(0.0, 0.2), -0.45, 0.45))
    elif column == "ventral":
        phi = -math.pi / 2 + float(np.clip(rng.normal(0.0, 0.3), -0.6, 0.6))
    else:
        tilt = rng.uniform(-0.6, 0.75)
        phi = tilt if rng.random() < 0.5 else math.pi - tilt
    if rng.random() < PERIPHERAL_P:
        if rng.random() < WEDGE_P:
            rho_in = rng.uniform(0.3, 0.7)
            return "wedge", phi, rho_in, min(math.pi * f / (1.0 - rho_in ** 2), 1.25), 0.0
        e = rng.uniform(0.8, 1.8)
        a = math.sqrt(f / e)
        return "ovoid", phi, 1.0 - a * rng.uniform(0.4, 0.9), a, a * e
    e = rng.uniform(0.6, 1.5)
    return "ovoid", phi, rng.uniform(0.5, 0.75), math.sqrt(f / e), math.sqrt(f * e)


def _plan(rng: np.random.Generator, g: _Cord, spacing: tuple[float, float, float]) -> _Plan | None:
    """Draw column, size and position; ``None`` when the lesion does not fit the cord here."""
    sz = spacing[0]
    column = COLUMNS[int(rng.choice(len(COLUMNS), p=COLUMN_P))]
    volume = float(np.clip(VOLUME_MEDIAN * math.exp(VOLUME_SIGMA * rng.standard_normal()), *VOLUME_MM3))
    length = float(np.clip(LENGTH_MEDIAN * math.exp(LENGTH_SIGMA * rng.standard_normal()), *LENGTH_MM))
    length = max(length, min(0.6 * sz, LENGTH_MM[1]))
    k0 = int(rng.choice(np.flatnonzero(g.ok)))
    cap = (MAX_FRACTION_CENTRAL if column == "central" else MAX_FRACTION) * g.area[k0]
    area = volume / (2.0 / 3.0 * length)
    if area > cap:
        area, length = cap, min(LENGTH_MM[1], volume / (2.0 / 3.0 * cap))
    area = max(area, AXIAL_MM2)
    shape, phi, rho, a, b = _axial_shape(rng, column, area / g.area[k0])
    z0, half = (k0 + rng.uniform(-0.5, 0.5)) * sz, length / 2.0
    run_lo, run_hi = k0, k0
    while run_lo > 0 and g.ok[run_lo - 1]:
        run_lo -= 1
    while run_hi + 1 < len(g.ok) and g.ok[run_hi + 1]:
        run_hi += 1
    half = min(half, z0 - (run_lo - 0.5) * sz - 1e-3, (run_hi + 0.5) * sz - z0 - 1e-3)
    lo, hi = math.floor((z0 - half) / sz + 0.5), math.ceil((z0 + half) / sz - 0.5)
    if lo < 0 or hi >= len(g.ok) or not g.ok[lo:hi + 1].all():
        return None
    plan = _Plan(column, shape, phi, rho, a, b, z0, half)
    return _calibrate(plan, g, k0, area, spacing)


def _calibrate(p: _Plan, g: _Cord, k0: int, area: float, spacing: tuple[float, float, float]) -> _Plan | None:
    """Scale the axial size so the centre slice's lesion area (inside the real cord) is ``area``."""
    by, bx = _box(g.mask[k0:k0 + 1])
    for _ in range(3):
        flat = _Plan(p.column, p.shape, p.phi, p.rho, p.a, p.b, k0 * spacing[0], 1e6)
        got = _fraction(flat, g, slice(k0, k0 + 1), by, bx, 1.0, 0.4).sum() * spacing[1] * spacing[2]
        if got <= 0:
            return None
        k = math.sqrt(area / got)
        if abs(k - 1.0) < 0.05:
            break
        if p.shape == "ovoid":
            p.a, p.b = p.a * k, p.b * k
        else:
            p.a = float(np.clip(p.a * k * k, 0.08, 1.25))
    return p


def _box(mask: np.ndarray) -> tuple[slice, slice]:
    """In-plane bounding box of a (Z, Y, X) mask, padded by one voxel."""
    ys, xs = np.flatnonzero(mask.any((0, 2))), np.flatnonzero(mask.any((0, 1)))
    return (slice(max(ys[0] - 1, 0), min(ys[-1] + 2, mask.shape[1])),
            slice(max(xs[0] - 1, 0), min(xs[-1] + 2, mask.shape[2])))


def _levels(image: np.ndarray, g: _Cord, kz: slice, spacing: tuple[float, float, float]) -> tuple[float, float]:
    """(local cord median, CSF level) over the lesion's slices +- ``SLAB_MM``."""
    m = math.ceil(SLAB_MM / spacing[0])
    slab = slice(max(kz.start - m, 0), min(kz.stop + m, image.shape[0]))
    cord = g.mask[slab]
    median = float(np.median(image[slab][cord]))
    pad = math.ceil(RING_MM[1] / min(spacing[1:])) + 1
    by, bx = _box(cord)
    by = slice(max(by.start - pad, 0), min(by.stop + pad, image.shape[1]))
    bx = slice(max(bx.start - pad, 0), min(bx.stop + pad, image.shape[2]))
    dist = ndi.distance_transform_edt(~cord[:, by, bx], sampling=(1e6, spacing[1], spacing[2]))
    ring = (dist >= RING_MM[0]) & (dist <= RING_MM[1])
    csf = float(np.percentile(image[slab, by, bx][ring], CSF_PERCENTILE)) if ring.sum() >= 20 else 1.0
    return median, csf


def _texture(rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, float, float]) -> np.ndarray:
    tau = rng.uniform(*TEXTURE)
    sigma = (max(0.3, 1.5 * spacing[1] / spacing[0]), 1.5, 1.5)
    noise = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="nearest")
    return 1.0 + tau * np.clip(noise / (noise.std() + 1e-6), -2.0, 2.0)


def _place(rng: np.random.Generator, image: np.ndarray, out: np.ndarray, lesion: np.ndarray,
           taken: np.ndarray, g: _Cord, spacing: tuple[float, float, float]) -> bool:
    """Draw one lesion and paint it into ``out``/``lesion``/``taken``; False when rejected."""
    p = _plan(rng, g, spacing)
    if p is None:
        return False
    sz = spacing[0]
    kz = slice(max(math.floor((p.z0 - p.half) / sz + 0.5), 0),
               min(math.ceil((p.z0 + p.half) / sz - 0.5) + 1, g.mask.shape[0]))
    if kz.stop <= kz.start or not g.mask[kz].any():
        return False  # the lesion's slices hold no cord (a gap in the mask, the volume's end): redraw
    by, bx = _box(g.mask[kz])
    frac = _fraction(p, g, kz, by, bx, sz, rng.uniform(*EDGE_VOX))
    label = frac >= 0.5
    volume = label.sum() * spacing[0] * spacing[1] * spacing[2]
    slices = int(label.any((1, 2)).sum())
    if not VOLUME_MM3[0] <= volume <= VOLUME_MM3[1] or slices * spacing[0] < LENGTH_MM[0] - 1e-6:
        return False
    if ndi.label(label, np.ones((3, 3, 3)))[1] != 1:
        return False  # too small/large once thresholded, or broken into pieces: redraw
    if (label.sum((1, 2)) > 0.5 * g.mask[kz, by, bx].sum((1, 2))).any():
        return False
    zz = slice(max(kz.start - 1, 0), min(kz.stop + 1, image.shape[0]))
    grown = np.zeros((zz.stop - zz.start,) + frac.shape[1:], dtype=bool)
    grown[kz.start - zz.start:kz.stop - zz.start] = frac > 0.01
    grown = ndi.binary_dilation(grown, np.ones((3, 3, 3), dtype=bool))
    if (grown & taken[zz, by, bx]).any():
        return False
    median, csf = _levels(image, g, kz, spacing)
    if csf < MIN_RATIO * median:
        return False
    target = np.minimum(rng.uniform(*RATIO) * median * _texture(rng, frac.shape, spacing), csf)
    old = out[kz, by, bx]
    out[kz, by, bx] = (old + frac * np.maximum(target - old, 0.0)).astype(np.float32)
    lesion[kz, by, bx] |= label.astype(np.uint8)
    taken[zz, by, bx] |= grown
    return True


def generate(rng: np.random.Generator, image: np.ndarray, cord: np.ndarray,
             spacing: tuple[float, float, float]) -> LesionDraw:
    """Paint 1-4 separate column lesions into a copy of ``image``; see the module docstring."""
    out = np.array(image, dtype=np.float32, copy=True)
    cord_u8 = (np.asarray(cord) > 0).astype(np.uint8)
    lesion = np.zeros(cord_u8.shape, dtype=np.uint8)
    if out.ndim != 3 or out.shape != cord_u8.shape or min(out.shape) == 0:
        return LesionDraw(out, lesion, cord_u8)
    spacing = tuple(float(s) for s in spacing)
    g = _cord_geometry(cord_u8, spacing)
    if not g.ok.any():
        return LesionDraw(out, lesion, cord_u8)
    image = out.copy()
    taken = np.zeros(out.shape, dtype=bool)
    for _ in range(1 + int(rng.choice(len(COUNT_P), p=COUNT_P))):
        for _ in range(TRIES):
            if _place(rng, image, out, lesion, taken, g, spacing):
                break
    return LesionDraw(out, lesion & cord_u8, cord_u8)


def describe(before: np.ndarray, draw: LesionDraw, spacing: tuple[float, float, float]) -> list[dict]:
    """Per-lesion measurements of a draw (for tests and the Measured table): volume_mm3,
    length_mm, ratio (lesion median / local cord median before), edge (touches the cord's
    in-plane outline), column (from the lesion's mean normalised position), max_fraction."""
    g = _cord_geometry(draw.cord, spacing)
    cross = np.zeros((3, 3, 3), dtype=bool)
    cross[1] = ndi.generate_binary_structure(2, 1)
    outline = g.mask & ~ndi.binary_erosion(g.mask, cross)
    comps, n = ndi.label(draw.lesion, np.ones((3, 3, 3), dtype=bool))
    rows = []
    for i, sl in enumerate(ndi.find_objects(comps), start=1):
        comp = comps == i
        kz = sl[0]
        m = math.ceil(SLAB_MM / spacing[0])
        slab = slice(max(kz.start - m, 0), min(kz.stop + m, comps.shape[0]))
        normal = g.mask[slab] & (draw.lesion[slab] == 0)
        z, y, x = np.nonzero(comp)
        u = (y - g.cy[z]) / np.where(y > g.cy[z], g.post[z], g.ant[z])
        v = (x - g.cx[z]) / np.where(x > g.cx[z], g.left[z], g.right[z])
        mu, mv = float(u.mean()), float(v.mean())
        theta = math.degrees(math.atan2(mu, mv))
        column = ("central" if math.hypot(mu, mv) < 0.35 else "dorsal" if 50 < theta < 130
                  else "ventral" if -130 < theta < -50 else "lateral")
        per_slice = comp[kz].sum((1, 2)) / np.maximum(g.mask[kz].sum((1, 2)), 1)
        rows.append({"volume_mm3": float(comp.sum() * np.prod(spacing)),
                     "length_mm": float((kz.stop - kz.start) * spacing[0]),
                     "ratio": float(np.median(draw.image[comp]) / np.median(before[slab][normal])),
                     "edge": bool((comp & outline).any()), "column": column,
                     "max_fraction": float(per_slice.max())})
    return rows
