"""Lesion family "swelling": acute / tumefactive and long lesions, optional cord swelling, satellites.

Shape model
-----------
* Main lesion (probability 0.85 per draw; otherwise only satellites): a chain of overlapping
  ellipsoidal beads (z semi-axis 1.5x the 0.6-1.0 mm bead step) along a slightly wandering
  centre path parallel to the cord. Three modes: "tumefactive" (25%): ``L`` uniform 8-12 mm,
  volume 200-280 mm3, covering 17-64% (p5-p95) of a slice's cord; "long" (12%): ``L``
  uniform 40-56 mm (two to three ~18 mm cervical vertebral segments, just short of LETM; the
  18 mm segment height is my round figure for body + disc); otherwise ``L`` log-uniform in
  8-40 mm, volume uniform 50-280 mm3 (mode weights are mine). ``L`` is at least 1.2 slice
  thicknesses (so a thick stack still gets one labelled slice) and at most 0.9x the cord's
  extent in the volume. Radius profile along the chain ``(1 - |u|^p)^(1/p)``, ``p`` in 2-4
  (spindle to capsule), times a smooth lumpiness
  (log-normal, sd 0.12, volume-neutral). Measured/target volume is 0.85-1.1 (voxelisation,
  clipping by the cord), so labelled volumes stay <= ~300 mm3; the cross-section follows from
  the target volume (an ellipse with the local cord's aspect, at most 80% of the cord's
  area), so short lesions can cover most of the cord and long ones are thin.
* Halo: the envelope is the labelled T2 lesion; the bright core is the envelope shrunk by
  0.4-1.0 mm in plane (to no less than 0.7x its radius) and 1-3 mm along Z; the shell
  between them is oedema. **The halo is labelled** (where the envelope's fraction >= 0.5):
  lesion length in the literature (and the LETM rule) is measured on the whole T2
  hyperintensity, oedema included. Choice of mine.
* Cord swelling in 50% of draws with a main lesion (brief's choice; over-represents it on
  purpose, see below): area growth ``g`` uniform 5-25% over the lesion's envelope, raised-
  cosine taper over 5-15 mm above and below (my choice). Per axial slice a radial map about
  the cord centroid, in coordinates normalised by the cord's semi-axes: input radius =
  output radius / sqrt(1 + g) inside the swollen cord, relaxing to identity outside with a
  Gaussian fall-off of 2.5 mm (monotone, so the CSF is pushed outwards and squeezed, never
  created). Image resampled with ``map_coordinates`` order 1; the cord as a blurred mask
  (sigma 1.5 voxels) resampled order 1 and thresholded per slice at the level that keeps the
  (1 + g) x area (a fixed 0.5 threshold drops growths under ~17% on 0.8 mm voxels: a binary
  edge moves only by >= half a voxel), united with the input cord (:func:`swell_cord`).
  The lesion is painted in the swollen cord.
* Satellites: 0/1/2/3 with probabilities 0.45/0.30/0.15/0.10 (at least one when there is no
  main lesion); single ellipsoids, 3-5 mm long, 5-20 mm3, >= 3 mm beyond the main lesion.
* Partial volume: fractions on sub-slices of <= 0.25 mm averaged along Z, plus a one-voxel
  linear ramp in plane; label = fraction >= 0.5 and inside the returned cord; all fractions
  are zeroed outside the cord (a lesion is part of the cord).

Intensity model
---------------
Measured on the image: cord median ``m`` (input cord); CSF level ``c`` = 90th percentile of
an in-plane ring 1-4 mm outside the (swollen) cord over the lesion's slices +-5 mm. Core
level = ``max(m + u (c - m), 1.6 m)``, ``u`` uniform 0.75-1.0, when ``c > 1.5 m`` (T2w);
otherwise ``r m`` with ``r`` uniform 1.6-2.5 (brief; the 1.6 m floor is mine, so that a CSF
just above 1.5 m does not give a dimmer core than the fallback). Halo 1.15-1.4 ``m``;
satellites 1.3-1.8 ``m`` (brief). Each painted level keeps 30% of the local tissue's
deviation from ``m`` (texture).
Blend ``(1 - f_env) I + (f_env - f_core) halo + f_core core``; the result is clipped to the
normalisation's 1.5 and then ``max``-ed with the image, so no voxel is darkened.

Placement model
---------------
Centre offset in cord-normalised units: 30% central (radius 0-0.15), else radius 0.45 to
``max(0.5, 1 - 0.6 sqrt(coverage))`` towards dorsal 40% / lateral 45% / ventral 15%
(+-25 deg), plus a sinusoidal wander of 0.03-0.12 with wavelength 15-40 mm; whatever leaves
the cord is cut off (peripheral lesions reach the pia). Satellites: uniform over the cord's
area (radius ``0.85 sqrt(U)``, any angle). Z: uniform where the cord is.

Sources
-------
* Tartaglino LM et al., Radiology 1995;195:725-732: most cord MS plaques are <= 2 vertebral
  segments, peripheral, < 50% of the cross-section; cord swelling only in relapsing-
  remitting MS.
* "Multiple sclerosis of the spinal cord: MR appearance", J Comput Assist Tomogr 1996;20(3):
  434-438 (doi:10.1097/00004728-199605000-00022): 64 plaques, length 2-60 mm (84% < 15 mm),
  cord enlarged at the lesion in 14%, posterior 41% / lateral 25%, none full-thickness, 55%
  enhancing; 68% of patients with one plaque, 32% with two or more (-> satellites).
* Asnafi S et al., "The frequency of longitudinally extensive transverse myelitis in MS: a
  population-based study" (Mult Scler Relat Disord, ~2020; NDCN Oxford publication 1072551):
  92 MS myelitis attacks, LETM 0%, median length 1.0 segment (0.5-2.5), 89% peripheral.
* Wingerchuk DM et al., Neurology 2015;85:177-189 (IPND): LETM = T2 lesion >= 3 contiguous
  vertebral segments, supportive of NMOSD; MS lesions are usually shorter.
* Chee CG et al., AJNR 2018;39:782-787: a cord expansion ratio > 1.4 goes with AQP4+ LETM,
  i.e. strong swelling is NMOSD-like; MS swelling is mild -> 5-25% area (2.5-12% diameter).
* Eden D et al., Brain 2019;142:633-646: MS cord lesions most frequent in the lateral and
  dorsal columns (placement weights are my choice guided by this and JCAT 1996).
* Contrast: Chong AL et al., AJNR 2016;37:180-184 measure the lesion-to-cord contrast ratio on
  T2 FSE / PD FSE; Hittmair K et al., AJNR 1996;17:1555-1565: contrast depends strongly on
  the sequence. I took no number from them: the core "near CSF" rule and the 1.6-2.5 /
  1.15-1.4 / 1.3-1.8 ratios are the brief's choices, not published values.
* The 50% swelling rate, the 300 mm3 volume cap and the satellite sizes are the brief's
  choices (this family models acute lesions; the all-plaque rate of swelling is 14%).

Measured
--------
``.venv/bin/python bench/lesion_family_stats.py --family swelling --draws 200`` (seed 0, the
17 training volumes of ``lesion_recipe040_cv.toml``: T2w, T2*w, MT-on, sz 1-16.5 mm; per
26-connected lesion; ratio = lesion mean / input cord median; columns as that script defines
them, central = centroid within half the cord's radius); p5 / p25 / p50 / p75 / p95:

    lesions 334 (1.67 per draw), draws with swelling 0.42
    volume mm3            5.1 / 11.5 / 51.5 / 182 / 252
    length mm along Z     2.5 / 3.0 / 7.5 / 15.0 / 40.7
    ratio to cord median  1.22 / 1.37 / 1.48 / 1.60 / 2.25
    touching cord edge    0.58
    columns               central 0.43, dorsal 0.15, lateral 0.29, ventral 0.13

Split by the same draws (one-off ``ndimage.label`` snippet, not committed): largest lesion per
draw (197 draws; 3 draws on 7.5 / 16.5 mm slices lost every lesion to partial volume)
volume 8 / 90 / 158 / 212 / 257 mm3 (max 285), length 3 / 9 / 14 / 23 / 45 mm, ratio
1.30 / 1.43 / 1.52 / 1.71 / 2.46 (T2w only: 1.31 / 1.47 / 2.08 / 2.26 / 2.84, 95th-percentile
voxel up to 4.2x; T2*w / MT-on: 1.31 / 1.42 / 1.49 / 1.55 / 1.67), largest share of one
slice's cord 0.04 / 0.08 / 0.14 / 0.29 / 0.46; other lesions (satellites, 137)
3.8 / 6.4 / 11.5 / 13.4 / 19.2 mm3, 2-6 mm long.
Time per draw (one core, machine busy training): p50 11-20 ms, max 0.2-0.5 s on 216 x 149 x
64; (60, 80, 80) max 0.08 s, (400, 60, 60) max 0.12 s.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from trainer.lesion_families.base import LesionDraw

FAMILY = "swelling"

P_MAIN, P_WIDE, P_LONG, P_SWELL = 0.85, 0.25, 0.12, 0.5
WIDE_MM, WIDE_MM3 = (8.0, 12.0), (200.0, 280.0)
LEN_MM, LONG_MM, VOL_MM3, MAX_COVER = (8.0, 40.0), (40.0, 56.0), (50.0, 280.0), 0.8
GROWTH, TAPER_MM, FALLOFF_MM = (0.05, 0.25), (5.0, 15.0), 2.5
CSF_RULE, CORE_U, CORE_RATIO = 1.5, (0.75, 1.0), (1.6, 2.5)
HALO_RATIO, HALO_MM, HALO_Z_MM = (1.15, 1.4), (0.4, 1.0), (1.0, 3.0)
SAT_P, SAT_VOL, SAT_LEN, SAT_RATIO = (0.45, 0.30, 0.15, 0.10), (5.0, 20.0), (3.0, 5.0), (1.3, 1.8)
SUB_MM, CLIP, TEXTURE, MIN_CORD_MM3 = 0.25, 1.5, 0.3, 40.0


def _geometry(cord: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """Per-slice cord centroid (voxels), semi-axes (mm, from second moments) and area (mm2)."""
    sz, sy, sx = spacing
    c = cord.astype(np.float64)
    n = c.sum((1, 2))
    ok = n >= 4
    py, px = c.sum(2), c.sum(1)
    yy, xx = np.arange(c.shape[1], dtype=np.float64), np.arange(c.shape[2], dtype=np.float64)
    safe = np.maximum(n, 1.0)
    cy, cx = py @ yy / safe, px @ xx / safe
    by = 2.0 * np.sqrt(np.maximum(py @ yy ** 2 / safe - cy ** 2, 0.25)) * sy
    bx = 2.0 * np.sqrt(np.maximum(px @ xx ** 2 / safe - cx ** 2, 0.25)) * sx
    geo = {"ok": ok, "cy": cy, "cx": cx, "by": by, "bx": bx, "area": n * sy * sx}
    if ok.any():
        zi = np.arange(len(n))
        for key in ("cy", "cx", "by", "bx"):
            geo[key] = np.interp(zi, zi[ok], geo[key][ok])
            if 2.0 / sz > 0.3:
                geo[key] = ndi.gaussian_filter1d(geo[key], 2.0 / sz, mode="nearest")
    return geo


def swell_cord(image: np.ndarray, cord: np.ndarray, spacing: tuple[float, float, float],
               z_lo: float, z_hi: float, growth: float, taper_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Swell the cord's cross-section by ``growth`` (area fraction) over ``[z_lo, z_hi]`` mm.

    Slice ``k`` is at ``k * sz`` mm; the growth tapers (raised cosine) over ``taper_mm``
    beyond the range. Returns the resampled image and cord (new arrays)."""
    sz, sy, sx = spacing
    z = np.arange(image.shape[0]) * sz
    dist = np.maximum(np.maximum(z_lo - z, z - z_hi), 0.0)
    g = growth * np.where(dist < taper_mm, 0.5 * (1.0 + np.cos(np.pi * dist / max(taper_mm, 1e-6))), 0.0)
    geo = _geometry(cord, spacing)
    idx = np.flatnonzero((g > 1e-3) & geo["ok"])
    out_img, out_cord = image.copy(), cord.copy()
    if idx.size == 0:
        return out_img, out_cord
    yy, xx = np.mgrid[0:image.shape[1], 0:image.shape[2]].astype(np.float32)
    s = np.sqrt(1.0 + g[idx])[:, None, None]
    cy, cx = geo["cy"][idx][:, None, None], geo["cx"][idx][:, None, None]
    by, bx = geo["by"][idx][:, None, None], geo["bx"][idx][:, None, None]
    dy, dx = yy[None] - cy, xx[None] - cx
    rn = np.sqrt((dy * sy / by) ** 2 + (dx * sx / bx) ** 2)
    lam = FALLOFF_MM / (0.5 * (by + bx))
    psi = np.where(rn <= s, 1.0, np.exp(-((rn - s) / lam) ** 2))
    k = 1.0 - (1.0 - 1.0 / s) * psi
    zz = np.broadcast_to(np.arange(idx.size, dtype=np.float64)[:, None, None], rn.shape)
    coords = np.stack([zz, cy + dy * k, cx + dx * k])
    out_img[idx] = ndi.map_coordinates(image[idx].astype(np.float32), coords, order=1, mode="nearest")
    # A binary mask cannot move by less than ~half a voxel when thresholded at 0.5, so the mapped,
    # blurred mask is thresholded per slice at the level that gives the swollen area (1 + g) x.
    soft = ndi.gaussian_filter(cord[idx].astype(np.float32), (0.0, 1.5, 1.5))
    moved = ndi.map_coordinates(soft, coords, order=1, mode="nearest").reshape(idx.size, -1)
    target = np.round((cord[idx] > 0).sum((1, 2)) * (1.0 + g[idx])).astype(int)
    rank = np.empty(moved.shape, dtype=np.int64)
    order = np.argsort(-moved, axis=1, kind="stable")
    np.put_along_axis(rank, order, np.arange(moved.shape[1])[None], axis=1)
    grown = (rank < target[:, None]).reshape(rn.shape)
    out_cord[idx] = (grown | (cord[idx] > 0)).astype(cord.dtype)  # swelling only adds to the cord
    return out_img, out_cord


def _render(beads: np.ndarray, box: tuple[slice, slice, slice], spacing: tuple[float, float, float]
            ) -> np.ndarray:
    """Partial-volume fraction in ``box`` of a union of ellipsoid beads.

    ``beads`` is ``(N, 6)``: centre (z, y, x) and semi-axes (z, y, x), all in mm."""
    sz, sy, sx = spacing
    nsub = max(1, math.ceil(sz / SUB_MM))
    ks = np.arange(box[0].start, box[0].stop)
    zsub = (ks[:, None] * sz + ((np.arange(nsub) + 0.5) / nsub - 0.5) * sz).ravel()
    ymm = np.arange(box[1].start, box[1].stop) * sy
    xmm = np.arange(box[2].start, box[2].stop) * sx
    dist = np.full((zsub.size, ymm.size, xmm.size), np.inf, dtype=np.float32)
    for zc, yc, xc, rz, ry, rx in beads:
        sel = np.flatnonzero(np.abs(zsub - zc) < rz)
        if sel.size == 0 or ry <= 0 or rx <= 0:
            continue
        dz2 = ((zsub[sel] - zc) / rz) ** 2
        d = np.sqrt(dz2[:, None, None] + (((ymm - yc) / ry) ** 2)[None, :, None]
                    + (((xmm - xc) / rx) ** 2)[None, None, :])
        lo, hi = sel[0], sel[-1] + 1
        np.minimum(dist[lo:hi], ((d - 1.0) * math.sqrt(ry * rx)).astype(np.float32), out=dist[lo:hi])
    frac = np.clip(0.5 - dist / math.sqrt(sy * sx), 0.0, 1.0)
    return frac.reshape(ks.size, nsub, ymm.size, xmm.size).mean(1)


def _box(cord: np.ndarray, z_lo: float, z_hi: float, sz: float) -> tuple[slice, slice, slice] | None:
    """Slices covering ``[z_lo, z_hi]`` mm and the cord's in-plane bounding box there (+2 voxels)."""
    k0 = max(0, math.floor(z_lo / sz + 0.5))
    k1 = min(cord.shape[0], math.floor(z_hi / sz + 0.5) + 1)
    if k1 <= k0:
        return None
    ys, xs = np.nonzero(cord[k0:k1].any(0))
    if ys.size == 0:
        return None
    return (slice(k0, k1), slice(max(0, ys.min() - 2), min(cord.shape[1], ys.max() + 3)),
            slice(max(0, xs.min() - 2), min(cord.shape[2], xs.max() + 3)))


def _main_plan(rng: np.random.Generator, geo: dict[str, np.ndarray], sz: float) -> dict[str, float]:
    """Draw the main lesion's length, position, volume, profile and placement."""
    ok = np.flatnonzero(geo["ok"])
    z_min, z_max = ok[0] * sz - sz / 2, ok[-1] * sz + sz / 2
    mode = rng.random()
    if mode < P_WIDE:
        length, volume = rng.uniform(*WIDE_MM), rng.uniform(*WIDE_MM3)
    elif mode < P_WIDE + P_LONG:
        length, volume = rng.uniform(*LONG_MM), rng.uniform(*VOL_MM3)
    else:
        length = math.exp(rng.uniform(math.log(LEN_MM[0]), math.log(LEN_MM[1])))
        volume = rng.uniform(*VOL_MM3)
    length = min(max(length, 1.2 * sz), 0.9 * (z_max - z_min))
    zc = rng.uniform(z_min + length / 2, z_max - length / 2)
    p = rng.uniform(2.0, 4.0)
    kappa = math.gamma(1 + 1 / p) * math.gamma(1 + 2 / p) / math.gamma(1 + 3 / p)  # mean of profile^2
    sl = ok[(ok * sz >= zc - length / 2) & (ok * sz <= zc + length / 2)]
    sl = sl if sl.size else ok[np.argmin(np.abs(ok * sz - zc))][None]
    cord_area = float(np.mean(np.pi * geo["by"][sl] * geo["bx"][sl]))
    cover = min(MAX_COVER, max(volume / (length * kappa * cord_area), 1.0 / cord_area))
    kind = rng.choice(4, p=[0.30, 0.28, 0.315, 0.105])  # central, dorsal, lateral, ventral
    if kind == 0:
        r_off, ang = rng.uniform(0.0, 0.15), rng.uniform(0, 2 * np.pi)
    else:
        r_off = rng.uniform(0.45, max(0.5, 1.0 - 0.6 * math.sqrt(cover)))
        base = {1: np.pi / 2, 2: rng.choice([0.0, np.pi]), 3: -np.pi / 2}[int(kind)]
        ang = base + np.deg2rad(rng.uniform(-25, 25))
    return {"zc": zc, "length": length, "p": p, "cover": cover, "oy": r_off * math.sin(ang),
            "ox": r_off * math.cos(ang), "z_lo": zc - length / 2, "z_hi": zc + length / 2, "volume": volume}


def _main_beads(rng: np.random.Generator, plan: dict[str, float], geo: dict[str, np.ndarray],
                spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Envelope and core beads ``(N, 6)`` of the main lesion along its wandering path."""
    sz, sy, sx = spacing
    step = rng.uniform(0.6, 1.0)
    rz = 1.5 * step
    half = plan["length"] / 2
    n = max(2, round(max(plan["length"] - 2 * rz, 0.0) / step) + 1)
    if half > rz:
        zb = np.linspace(plan["zc"] - half + rz, plan["zc"] + half - rz, n)
    else:
        zb = np.full(n, plan["zc"])
    rz = min(rz, half)
    u = np.clip(np.abs(zb - plan["zc"]) / half, 0.0, 1.0)
    prof = (1.0 - u ** plan["p"]) ** (1.0 / plan["p"])
    lump = ndi.gaussian_filter1d(rng.normal(0.0, 1.0, n), 2.0, mode="nearest") if n > 1 else np.zeros(1)
    lump = np.exp(0.12 * lump / max(float(lump.std()), 1e-6))
    lump /= math.sqrt(float(np.mean(lump ** 2)))  # lumps reshape, they do not change the volume
    k = np.clip(np.round(zb / sz).astype(int), 0, len(geo["cy"]) - 1)
    wander = []
    for _ in range(2):  # sinusoidal drift of the centre path, amplitude and wavelength drawn
        amp, wavelength, phase = rng.uniform(0.03, 0.12), rng.uniform(15, 40), rng.uniform(0, 2 * np.pi)
        wander.append(amp * np.sin(2 * np.pi * zb / wavelength + phase))
    by, bx = geo["by"][k], geo["bx"][k]
    yc = geo["cy"][k] * sy + (plan["oy"] + wander[0]) * by
    xc = geo["cx"][k] * sx + (plan["ox"] + wander[1]) * bx
    aspect = rng.uniform(0.8, 1.25)
    ry = math.sqrt(plan["cover"]) * by * aspect * prof * lump
    rx = math.sqrt(plan["cover"]) * bx / aspect * prof * lump
    env = np.stack([zb, yc, xc, np.full(n, rz), ry, rx], 1)
    t, tz = rng.uniform(*HALO_MM), rng.uniform(*HALO_Z_MM)
    core = env.copy()
    core[:, 4:] = np.maximum(env[:, 4:] - t, 0.7 * env[:, 4:])  # the halo never eats the core
    core = core[np.abs(zb - plan["zc"]) <= max(half - tz, 0.0)]
    return env, core


def _csf_level(image: np.ndarray, cord: np.ndarray, spacing: tuple[float, float, float],
               z_lo: float, z_hi: float) -> float | None:
    """90th percentile of an in-plane ring 1-4 mm outside the cord over ``[z_lo, z_hi]`` mm."""
    sz, sy, sx = spacing
    k0, k1 = max(0, int(z_lo // sz)), min(cord.shape[0], int(z_hi // sz) + 2)
    sub = cord[k0:k1] > 0
    if not sub.any():
        return None
    d = ndi.distance_transform_edt(~sub, sampling=(1e4, sy, sx))
    ring = (d >= 1.0) & (d <= 4.0)
    return float(np.percentile(image[k0:k1][ring], 90)) if ring.any() else None


def _paint(image: np.ndarray, box: tuple[slice, slice, slice], f_env: np.ndarray, f_core: np.ndarray | None,
           halo: float, core: float, m: float) -> None:
    """Blend halo and core levels into ``image[box]`` in place; never darkens, clips at 1.5."""
    img = image[box]
    tex = TEXTURE * (img - m)
    fc = np.zeros_like(f_env) if f_core is None else np.minimum(f_core, f_env)
    new = (1.0 - f_env) * img + (f_env - fc) * (halo + tex) + fc * (core + tex)
    image[box] = np.maximum(img, np.minimum(new, CLIP))


def _satellites(rng: np.random.Generator, n: int, geo: dict[str, np.ndarray],
                spacing: tuple[float, float, float], avoid: tuple[float, float] | None) -> list[np.ndarray]:
    """``n`` satellite beads ``(1, 6)`` (mm) in cord slices at least 3 mm beyond ``avoid``."""
    sz, sy, sx = spacing
    ok = np.flatnonzero(geo["ok"])
    if avoid is not None:
        zk = ok * sz
        ok = ok[(zk + sz / 2 < avoid[0] - 3.0) | (zk - sz / 2 > avoid[1] + 3.0)]
    out = []
    for _ in range(n if ok.size else 0):
        k = int(rng.choice(ok))
        length = rng.uniform(*SAT_LEN)
        ab = 3.0 * rng.uniform(*SAT_VOL) / (4.0 * np.pi * length / 2)
        q = rng.uniform(0.75, 1.33)
        r, ang = 0.85 * math.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)  # uniform over the area
        yc = geo["cy"][k] * sy + geo["by"][k] * r * math.sin(ang)
        xc = geo["cx"][k] * sx + geo["bx"][k] * r * math.cos(ang)
        zc = k * sz + rng.uniform(-0.5, 0.5) * max(sz - length, 0.0)
        out.append(np.array([[zc, yc, xc, length / 2, math.sqrt(ab * q), math.sqrt(ab / q)]]))
    return out


def _draw_main(rng: np.random.Generator, out: np.ndarray, f_all: np.ndarray, plan: dict[str, float],
               geo: dict[str, np.ndarray], cord: np.ndarray, spacing: tuple[float, float, float],
               m: float) -> None:
    """Render and paint the main lesion into ``out``; record its envelope fraction in ``f_all``."""
    env, core = _main_beads(rng, plan, geo, spacing)
    csf = _csf_level(out, cord, spacing, plan["z_lo"] - 5.0, plan["z_hi"] + 5.0)
    if csf is not None and csf > CSF_RULE * m:
        core_level = max(m + rng.uniform(*CORE_U) * (csf - m), CORE_RATIO[0] * m)
    else:
        core_level = rng.uniform(*CORE_RATIO) * m
    halo_level = rng.uniform(*HALO_RATIO) * m
    box = _box(cord, plan["z_lo"], plan["z_hi"], spacing[0])
    if box is None:
        return
    inside = cord[box] > 0
    f_env = (_render(env, box, spacing) * inside).astype(np.float32)
    f_core = (_render(core, box, spacing) * inside).astype(np.float32) if len(core) else None
    _paint(out, box, f_env, f_core, halo_level, core_level, m)
    f_all[box] = np.maximum(f_all[box], f_env)


def generate_with_base(rng: np.random.Generator, image: np.ndarray, cord: np.ndarray,
                       spacing: tuple[float, float, float]) -> tuple[LesionDraw, np.ndarray]:
    """One draw and the image it was painted on (the input image, or its swollen resampling)."""
    sz, sy, sx = (float(s) for s in spacing)
    spacing = (sz, sy, sx)
    img = np.asarray(image, dtype=np.float32)
    cord_in = (np.asarray(cord) > 0).astype(np.uint8)
    geo = _geometry(cord_in, spacing)
    if cord_in.sum() * sz * sy * sx < MIN_CORD_MM3 or not geo["ok"].any():
        return LesionDraw(img.copy(), np.zeros(img.shape, np.uint8), cord_in), img.copy()
    m = max(float(np.median(img[cord_in > 0])), 0.05)
    plan = _main_plan(rng, geo, sz) if rng.random() < P_MAIN else None
    base, cord_out = img.copy(), cord_in
    if plan is not None and rng.random() < P_SWELL:
        growth = rng.uniform(*GROWTH)
        base, cord_out = swell_cord(img, cord_in, spacing, plan["z_lo"], plan["z_hi"],
                                    growth, rng.uniform(*TAPER_MM))
        geo = _geometry(cord_out, spacing)
        plan["cover"] /= 1.0 + growth  # same volume budget in the swollen cord
    out, f_all = base.copy(), np.zeros(img.shape, np.float32)
    if plan is not None:
        _draw_main(rng, out, f_all, plan, geo, cord_out, spacing, m)
    n_sat = int(rng.choice(4, p=SAT_P))
    avoid = None if plan is None else (plan["z_lo"], plan["z_hi"])
    for bead in _satellites(rng, max(n_sat, 1 if plan is None else 0), geo, spacing, avoid):
        box = _box(cord_out, bead[0, 0] - bead[0, 3], bead[0, 0] + bead[0, 3], sz)
        if box is None:
            continue
        f = (_render(bead, box, spacing) * (cord_out[box] > 0)).astype(np.float32)
        level = rng.uniform(*SAT_RATIO) * m
        _paint(out, box, f, f, level, level, m)
        f_all[box] = np.maximum(f_all[box], f)
    lesion = ((f_all >= 0.5) & (cord_out > 0)).astype(np.uint8)
    return LesionDraw(out, lesion, cord_out), base


def generate(rng: np.random.Generator, image: np.ndarray, cord: np.ndarray,
             spacing: tuple[float, float, float]) -> LesionDraw:
    """Draw one main (possibly swollen) lesion and 0-3 satellites; see the module docstring."""
    return generate_with_base(rng, image, cord, spacing)[0]
