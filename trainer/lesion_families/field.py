"""Lesion family "field": thresholded anisotropic Gaussian random fields inside the cord.

Shape model
    A draw has 1-3 *field components*. Each is a smooth 3-D Gaussian random field (white
    noise smoothed with sigma ``s_xy`` ~ U(0.6, 1.4) mm in plane and ``s_z = s_xy * U(2.5, 6)``
    mm along Z: correlations run longer along the cord; in mm, so independent of the voxel
    grid) plus a bump ``beta * (1 - rho**2)`` (beta ~ U(0.5, 2.5)) over a random ellipsoidal
    sub-region of the cord (``rho`` its normalised radius; length ~ log-U(5, 75) mm, in-plane
    semi-axes U(1.2, 3.5) mm x ``min(1, sqrt(25 mm / length))``, centred on a cord voxel and
    following the cord's centreline along Z), cut to the cord mask. It is thresholded at the
    quantile that keeps U(0.3, 0.7) of the sub-region (at most 300 mm3): lobulated lesions,
    sometimes split into several foci; two components that meet merge (confluent lesions).
    The field lives on a sub-slice grid (``ceil(sz / 1 mm)`` sub-slices per slice); the hard
    mask is blurred (sigma U(0.5, 1.2) mm, rescaled so the core reaches 1) into a lesion
    *fraction*, averaged over each slice's sub-slices (partial volume: thick slices get faint
    edges), and the label is fraction >= 0.5. A component is redrawn (up to 12 times, then
    dropped) unless it is 3-40 mm long on the sub-slice grid and every connected lesion of the
    label is 5-300 mm3 with a Z extent of >= 3 mm (>= 1 slice on >= 3 mm slices) and <= 40 mm
    plus one slice (partial volume).
Intensity model
    Per component, measured in its slab of slices +-5 mm (local: coil shading makes a long
    sagittal stack's levels drift along Z): cord level ``c`` = median in the cord, CSF level
    ``k`` = 90th percentile of an in-plane ring 1-4 mm outside the cord. The lesion level is
    ``c + f * (k - c)``, f ~ U(0.15, 1.0), floored at ``c * (1.2 + 0.3 * (f - 0.15) / 0.85)``
    when the CSF is not bright (T2*w, T1-ish), so it is always >= 1.2 c. A multiplicative
    texture ``1 + a * n`` (``n`` smooth unit noise, sigma 0.8 mm, clipped to +-1.5;
    a ~ U(0.03, 0.10); the floor holds at the texture's minimum) modulates it; a voxel becomes
    ``img + frac * (level * texture - img)``, never below ``img``, capped at 1.5 (the
    normalisation's clip) unless it already was brighter.
Placement model
    Each component's centre is a cord voxel drawn uniformly: every column, the central grey
    matter and the cord edge alike, no anatomical preference. The sub-region is cut by the
    cord mask, so lesions run right up to the cord edge. No swelling: the cord is returned
    unchanged.

Where the numbers come from
    * Length 3-40 mm: MS cord lesions are >= 3 mm in their long axis and shorter than two
      vertebral segments; longer is a red flag for other diseases (Rovira A. et al., MAGNIMS
      guidelines, Nat Rev Neurol 11:471-482, 2015; Lycklama a Nijeholt G. et al., "Spinal-cord
      MRI in multiple sclerosis", Lancet Neurol 2:555-562, 2003). 40 mm = two cervical segments
      of ~15-20 mm: my estimate, not from these papers. Kearney H. et al. (AAN 2014 abstract,
      axial PSIR, 51 lesions) measured mean lengths of 17.6 (lateral), 18.3 (anterior) and
      24.8 mm (posterior columns). The sub-region length draw is my choice, tuned so lesions
      span 3-40 mm; the measured median (10 mm) is shorter than Kearney's means.
    * Volume 5-300 mm3: Kearney et al. report mean axial lesion areas of 4.3-11.3 mm2 (6-16 %
      of the cord area), which also set the in-plane semi-axes; area x length gives ~75-280 mm3
      for a prism, less for a tapering lesion, so 300 mm3 bounds a large MS lesion. 5 mm3 is
      the lesion model's own ``min_volume_mm3`` (smaller detections are dropped): a project
      choice, not literature.
    * Contrast from barely above the cord (f = 0.15) to the CSF (f = 1.0): on T2 FSE many cord
      lesions are faint (cervical sensitivity 50.9 % against 89.6 % on STIR, Alcaide-Leon P. et
      al., AJNR 37:970-975, 2016); long-TE T2 FSE gives poor lesion contrast next to a bright,
      "myelographic" CSF (Hittmair K. et al., AJNR 17:1555-1565, 1996); Chong A.L. et al. (AJNR
      37:180-184, 2016) measured lesion-to-cord contrast ratios on PD and T2 FSE. Acute,
      oedematous lesions have a long, fluid-like T2, which is where the CSF upper end comes
      from (qualitative; no number found for it). The U(0.15, 1.0) draw, the 1.2x floor and the
      1.2-1.5x fallback are my choices, not sourced numbers.
    * Count 1-3 per draw (weights 0.5 / 0.3 / 0.2, my choice): 1.16-1.92 cervical cord lesions
      per patient on FSE / MT-GE / fast STIR (Rocca M.A. et al., AJNR 20:1710-1716, 1999).
    * Uniform placement is deliberate: MS cord lesions favour the dorsal and lateral columns
      (Eden D. et al., Brain 142:633-646, 2019; Kearney et al.) but occur everywhere including
      the central grey matter; this family does not encode the preference.
    * Field sigmas, beta, fill, blur, texture, the ring, its percentile, the slab: my choices.

Measured
    ``.venv/bin/python bench/lesion_family_stats.py --family field --draws 200`` (seed 0, the 17
    real lesion-training volumes of ``lesion_recipe040_cv.toml``, slices 1-16.5 mm; per
    26-connected lesion; ratio = mean lesion intensity / whole-cord median before the draw;
    central = within half the cord radius)::

        draws / lesions / per draw      200 / 329 / 1.65; cord changed in 0 draws
        percentiles                     p5 / p25 / p50 / p75 / p95
        volume mm3                      12.8 / 28.8 / 52.5 / 78.7 / 163.6
        length mm (label Z extent)      4 / 6 / 10 / 16 / 30
        ratio to cord median            1.12 / 1.25 / 1.34 / 1.72 / 2.73
        touching the cord edge          0.821
        central / dorsal / lateral / ventral   0.271 / 0.167 / 0.401 / 0.161

    The same 200 draws measured by hand (scipy.ndimage.label per lesion): volume 5.8-252.8 mm3;
    on the 1 mm volumes length 3-40 mm (p50 10, p95 26); against the cord median of the
    lesion's own slices +-5 mm (what the family uses), mean ratio p5 1.18 and peak ratio p5 1.27,
    p95 3.47; lesions per draw 1 / 2 / 3 / 4+ in 0.52 / 0.34 / 0.13 / 0.01 of draws.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from trainer.lesion_families.base import LesionDraw

FAMILY = "field"

LENGTH_MM = (3.0, 40.0)  # Rovira 2015 / Lycklama 2003: >= 3 mm, < 2 vertebral segments
VOLUME_MM3 = (5.0, 300.0)  # Kearney 2014 areas x lengths; 5 mm3 = the lesion model's min volume
F_RANGE = (0.15, 1.0)  # fraction of the way from the cord level to the CSF level (choice)
MIN_RATIO = 1.2  # lesion level >= 1.2 x cord median (choice)
FALLBACK_RATIO = (1.2, 1.5)  # ratio floor when the CSF is not bright, grows with f (choice)
REGION_LENGTH_MM = (5.0, 75.0)  # sub-region length; lesions come out shorter (choice)
BUMP = (0.5, 2.5)  # weight of the sub-region bump against the unit field (choice)
Z_STRETCH = (2.5, 6.0)  # along-Z field sigma / in-plane sigma (choice)
RADIUS_MM = (1.2, 3.5)  # in-plane semi-axes of the sub-region (choice, cf. Kearney 2014 areas)
FILL = (0.3, 0.7)  # share of the sub-region (cut to the cord) above the threshold (choice)
FIELD_SIGMA_XY_MM = (0.6, 1.4)  # in-plane correlation of the field (choice)
BLUR_MM = (0.5, 1.2)  # soft edge (choice)
TEXTURE = (0.03, 0.10)  # multiplicative texture amplitude (choice)
COUNT_P = (0.5, 0.3, 0.2)  # 1, 2, 3 components (choice; Rocca 1999: 1.2-1.9 lesions/patient)
TRIES = 12
CLIP = 1.5  # the normalisation's upper clip


def generate(rng: np.random.Generator, image: np.ndarray, cord: np.ndarray,
             spacing: tuple[float, float, float]) -> LesionDraw:
    """Paint 1-3 thresholded Gaussian-random-field lesions into ``image`` inside ``cord``.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness.
    image : numpy.ndarray
        ``(Z, Y, X)`` float32 normalised image.
    cord : numpy.ndarray
        ``(Z, Y, X)`` cord mask (non-zero = cord).
    spacing : tuple of float
        ``(sz, sy, sx)`` in mm.

    Returns
    -------
    LesionDraw
        New image, uint8 lesion label inside the cord, the input cord (uint8, unchanged).
    """
    img = np.asarray(image, dtype=np.float32)
    cmask = np.asarray(cord) > 0
    sp = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    empty = LesionDraw(img.copy(), np.zeros(img.shape, np.uint8), cmask.astype(np.uint8))
    if img.ndim != 3 or cmask.shape != img.shape or min(sp) <= 0:
        return empty
    if cmask.sum() * sp[0] * sp[1] * sp[2] < 4 * VOLUME_MM3[0] or cmask.sum() < 8:
        return empty
    comps, total = _place(rng, cmask, sp)
    if not comps:
        return empty
    ring = _ring(cmask, sp)
    out = img.copy()
    for box, frac in comps:
        cord_level, csf_level = _local_levels(img, cmask, ring, box[0], sp[0])
        level = _level(rng, cord_level, csf_level)
        tex_amp = rng.uniform(*TEXTURE)
        level = max(level, MIN_RATIO * cord_level / (1.0 - 1.5 * tex_amp))  # floor holds at tex min
        tex = 1.0 + tex_amp * _smooth_noise(rng, frac.shape, sp, 0.8)
        src = img[box]
        painted = src + frac * (level * tex - src)
        painted = np.minimum(painted, np.maximum(src, CLIP))
        out[box] = np.maximum(out[box], painted.astype(np.float32))
    lesion = ((total >= 0.5) & cmask).astype(np.uint8)
    return LesionDraw(out, lesion, cmask.astype(np.uint8))


def _place(rng: np.random.Generator, cmask: np.ndarray, sp: tuple[float, float, float]
           ) -> tuple[list[tuple[tuple[slice, ...], np.ndarray]], np.ndarray]:
    """Draw 1-3 components, redrawing one whose label breaks the size/length ranges."""
    n_comp = int(rng.choice(len(COUNT_P), p=COUNT_P)) + 1
    comps: list[tuple[tuple[slice, ...], np.ndarray]] = []
    total = np.zeros(cmask.shape, np.float32)
    coords, line = np.nonzero(cmask), _centreline(cmask)
    for _ in range(n_comp):
        for _ in range(TRIES):
            comp = _component(rng, cmask, coords, line, sp)
            if comp is None:
                continue
            box, frac = comp
            trial = total.copy()
            trial[box] = np.maximum(trial[box], frac)
            if _label_ok(trial >= 0.5, sp):
                total = trial
                comps.append(comp)
                break
    return comps, total


def _ring(cmask: np.ndarray, sp: tuple[float, float, float]) -> np.ndarray:
    """The in-plane ring 1-4 mm outside the cord (where the CSF is)."""
    ring = np.zeros(cmask.shape, bool)
    zs, ys, xs = np.nonzero(cmask)
    my, mx = int(math.ceil(5.0 / sp[1])), int(math.ceil(5.0 / sp[2]))
    box = (slice(zs.min(), zs.max() + 1), slice(max(ys.min() - my, 0), ys.max() + my + 1),
           slice(max(xs.min() - mx, 0), xs.max() + mx + 1))
    # in-plane distance: a huge Z sampling keeps other slices out of reach
    dist = ndimage.distance_transform_edt(~cmask[box], sampling=(1e6, sp[1], sp[2]))
    ring[box] = (dist > 1.0) & (dist <= 4.0)
    return ring


def _local_levels(img: np.ndarray, cmask: np.ndarray, ring: np.ndarray, zs: slice,
                  sz: float) -> tuple[float, float]:
    """Cord median and CSF level (90th percentile of the ring) in the component's slab +-5 mm.

    Local, not whole-volume: coil shading makes a long sagittal stack's cord and CSF levels
    drift along Z, and a whole-volume CSF level would paint lesions brighter than the local CSF.
    """
    m = int(math.ceil(5.0 / sz))
    slab = slice(max(zs.start - m, 0), zs.stop + m)
    cord_vals = img[slab][cmask[slab]]
    cord_level = float(np.median(cord_vals)) if cord_vals.size else float(np.median(img[cmask]))
    ring_vals = img[slab][ring[slab]]
    csf_level = float(np.percentile(ring_vals, 90)) if ring_vals.size else cord_level
    return cord_level, csf_level


def _level(rng: np.random.Generator, cord_level: float, csf_level: float) -> float:
    """The lesion level: ``f`` of the way to the CSF, floored by a ratio that grows with ``f``."""
    f = rng.uniform(*F_RANGE)
    by_csf = cord_level + f * max(csf_level - cord_level, 0.0)
    t = (f - F_RANGE[0]) / (F_RANGE[1] - F_RANGE[0])
    by_ratio = cord_level * (FALLBACK_RATIO[0] + t * (FALLBACK_RATIO[1] - FALLBACK_RATIO[0]))
    return max(by_csf, by_ratio)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sp: tuple[float, ...],
                  sigma_mm: float) -> np.ndarray:
    """Unit-variance smooth Gaussian noise (sigma in mm), clipped to +-1.5."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                [sigma_mm / s for s in sp], mode="reflect")
    sd = float(n.std())
    return np.clip(n / sd, -1.5, 1.5) if sd > 0 else np.zeros(shape, np.float32)


def _centreline(cmask: np.ndarray) -> np.ndarray:
    """``(Z, 2)`` in-plane cord centroid per slice (interpolated over slices without cord)."""
    n = cmask.sum(axis=(1, 2)).astype(np.float64)
    cy = (cmask.sum(axis=2) * np.arange(cmask.shape[1])).sum(axis=1) / np.maximum(n, 1)
    cx = (cmask.sum(axis=1) * np.arange(cmask.shape[2])).sum(axis=1) / np.maximum(n, 1)
    ok, z = np.flatnonzero(n > 0), np.arange(cmask.shape[0])
    return np.stack([np.interp(z, ok, cy[ok]), np.interp(z, ok, cx[ok])], axis=1)


def _component(rng: np.random.Generator, cmask: np.ndarray, coords: tuple[np.ndarray, ...], line: np.ndarray,
               sp: tuple[float, float, float]) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """One field component: its box on the image grid and its lesion fraction there (or None).

    The sub-region is an ellipsoid around a uniformly drawn cord voxel that follows the cord's
    centreline along Z (a straight one would leave a curved cord), on ``k`` sub-slices per slice.
    """
    sz, sy, sx = sp
    k = max(1, int(math.ceil(sz / 1.0 - 1e-6)))  # sub-slices per slice, <= 1 mm each
    dz = sz / k
    i = int(rng.integers(len(coords[0])))
    zc, yc, xc = (int(c[i]) for c in coords)
    hz = math.exp(rng.uniform(*np.log(REGION_LENGTH_MM))) / 2.0
    thin = min(1.0, math.sqrt(12.5 / hz))  # sqrt(25 mm / length): long sub-regions are slimmer
    ry, rx = rng.uniform(*RADIUS_MM) * thin, rng.uniform(*RADIUS_MM) * thin
    blur = rng.uniform(*BLUR_MM)
    pad = 3.0 * blur
    zf = (zc + rng.uniform()) * sz  # centre in mm along Z, anywhere inside the slice
    z0 = max(int(math.floor((zf - hz - pad) / sz)), 0)
    z1 = min(int(math.ceil((zf + hz + pad) / sz)), cmask.shape[0])
    path = line[z0:z1] - line[zc] + (yc, xc)  # the sub-region's in-plane centre per slice
    hy, hx = (ry + pad) / sy, (rx + pad) / sx
    y0, y1 = max(int(path[:, 0].min() - hy), 0), min(int(math.ceil(path[:, 0].max() + hy)) + 1, cmask.shape[1])
    x0, x1 = max(int(path[:, 1].min() - hx), 0), min(int(math.ceil(path[:, 1].max() + hx)) + 1, cmask.shape[2])
    box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    cord_f = np.repeat(cmask[box], k, axis=0)
    path_f = np.repeat(path, k, axis=0)
    zz = ((np.arange(z0 * k, z1 * k) + 0.5) * dz - zf)[:, None, None]
    yy = (np.arange(y0, y1)[None, :] - path_f[:, :1]) * sy
    xx = (np.arange(x0, x1)[None, :] - path_f[:, 1:]) * sx
    rho2 = (zz / hz) ** 2 + (yy / ry)[:, :, None] ** 2 + (xx / rx)[:, None, :] ** 2
    hard = _threshold(rng, rho2, cord_f, (dz, sy, sx))
    if hard is None:
        return None
    frac = ndimage.gaussian_filter(hard.astype(np.float32), [blur / dz, blur / sy, blur / sx]) * cord_f
    peak = float(frac.max())
    if peak <= 0:
        return None
    frac = np.minimum(frac / peak, 1.0)  # the core reaches the lesion level
    zl = np.nonzero((frac >= 0.5).any(axis=(1, 2)))[0]
    if zl.size == 0 or not LENGTH_MM[0] <= (zl[-1] - zl[0] + 1) * dz <= LENGTH_MM[1]:
        return None
    return box, frac.reshape(z1 - z0, k, y1 - y0, x1 - x0).mean(axis=1)


def _threshold(rng: np.random.Generator, rho2: np.ndarray, cord_f: np.ndarray,
               fsp: tuple[float, float, float]) -> np.ndarray | None:
    """Field + bump thresholded to a target volume inside the sub-region; crumbs < 2 mm3 dropped."""
    region = (rho2 < 1.0) & cord_f
    n_region = int(region.sum())
    if n_region == 0:
        return None
    s_xy = rng.uniform(*FIELD_SIGMA_XY_MM)
    s_z = s_xy * rng.uniform(*Z_STRETCH)
    field = ndimage.gaussian_filter(rng.standard_normal(rho2.shape).astype(np.float32),
                                    [s_z / fsp[0], s_xy / fsp[1], s_xy / fsp[2]], mode="reflect")
    sd = float(field.std())
    if sd <= 0:
        return None
    score = field / sd + rng.uniform(*BUMP) * (1.0 - rho2)
    vox = fsp[0] * fsp[1] * fsp[2]
    volume = float(np.clip(rng.uniform(*FILL) * n_region * vox, *VOLUME_MM3))
    n = int(np.clip(round(volume / vox), 1, n_region))
    vals = score[region]
    thr = np.partition(vals, vals.size - n)[vals.size - n]
    hard = region & (score >= thr)
    lab, nlab = ndimage.label(hard, structure=np.ones((3, 3, 3), bool))
    if nlab > 1:
        sizes = np.bincount(lab.ravel())[1:] * vox
        hard = np.isin(lab, 1 + np.flatnonzero(sizes >= 2.0))
    return hard if hard.any() else None


def _label_ok(label: np.ndarray, sp: tuple[float, float, float]) -> bool:
    """Every connected lesion is 5-300 mm3 with a Z extent >= 3 mm (>= 1 slice on >= 3 mm
    slices) and <= 40 mm + 1 slice."""
    lab, n = ndimage.label(label, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return False
    vox = sp[0] * sp[1] * sp[2]
    for obj, sl in enumerate(ndimage.find_objects(lab), start=1):
        vol = float((lab[sl] == obj).sum()) * vox
        ext = (sl[0].stop - sl[0].start) * sp[0]
        if not VOLUME_MM3[0] <= vol <= VOLUME_MM3[1] or ext > LENGTH_MM[1] + sp[0]:
            return False
        if ext < (LENGTH_MM[0] if sp[0] < LENGTH_MM[0] else sp[0]) - 1e-6:
            return False
    return True
