"""Vertebral levels of the cord: intervertebral discs found beside the cord, counted from C2 (pure, no I/O).

Inputs: the image and its cord mask as ``(Z, Y, X)`` arrays on one grid, and the 3x4 matrix ``m`` from
array index ``(z, y, x, 1)`` to patient LPS mm (:func:`sci_node.measure.index_to_lps`). Output: a
``(Z, Y, X)`` uint8 level map on the same grid (0 outside the cord and where the level is unknown;
the Spinal Cord Toolbox's numbering 1 = C1 ... 7 = C7, 8 = T1 ... 19 = T12, 20 = L1 ... 24 = L5) and the
discs found, or the reason the levels are unknown.

Method (image analysis along the cord, with the PAM50 template's disc spacing as the prior):

1. **Straighten.** The cord's smoothed centre line (:func:`sci_node.measure.cord_profile`) is resampled
   every 1 mm of arc length ``s``; at each point the image is sampled along the patient-anterior
   direction orthogonal to the cord (``d`` = 0 ... 44 mm), averaged over +-1.5 mm to the sides. The
   vertebral column lies 8-30 mm in front of the cord's centre; on a sagittal T2w its discs cross it
   as thin bands (dark end plates, a bright or dark disc) between the uniform vertebral bodies.
2. **Disc evidence** ``f(s)``: the canal's front wall is found where the bright CSF in front of the cord
   ends (:func:`canal_wall`); over the band 2-14 mm in front of it (the back of the vertebral bodies and
   discs, where a disc's tilt against the cord matters least), the median of how much darker a row is
   than the rows 5 mm above and below (``(I(s-5) + I(s+5)) / 2 - I(s)``, clipped at 0: on T2w the end
   plates and the disc are darker than the marrow on either side), smoothed (2.5 mm) and scaled to its
   95th percentile. Discs are its peaks. Measured against ``|I(s) - ...|`` over a fixed band 10-30 mm in
   front of the cord on the two tuning persons: 16 of 20 discs hit within 3 mm against 10 (bench).
3. **Anchor: C2.** C2 (body and dens) is the tallest segment of the column, with no disc between the
   C2-C3 disc and the atlas, and C2-C3 is the first disc below the skull base. A peak is taken for C2-C3 only if
   the cord (and so the straightened column) runs on at least 1.35 template C2-C3-to-C3-C4 spacings above it with
   no peak half as strong: a normal vertebra would have shown its upper disc there; only if no two such bands lie
   anywhere above it (the column goes on: a lower disc under a disc missed in the image); and only if the
   strongest band 0.56-1.3 such spacings below it lies 0.7-1.3 spacings away (a cervical spacing). The upper end
   of the cord is half measured (the 5 mm second difference has no upper side there): a peak within ``_EDGE_MM``
   of it counts at a quarter of the candidate's strength; a disc within 5 mm of it is not seen at all (a view
   ending 4-5 mm above C3-C4 can still be taken wrongly; a one-sided evidence there closed that in synthetic
   columns but refused the sample series, so it is not used). If the field of view cuts the column below C2,
   nothing anchors the count and the levels are unknown (the sacrum and the last rib are not used yet).
   ``bench/vertebral_levels.py --fov-cuts`` cuts each labelled series at 35 heights from 60 mm below to 42 mm
   above its C2-C3 disc: the anchor before these checks named 13 of the 210 cuts wrongly (3 to 7 levels off),
   now none. **Weak point** (measured on the six persons of ``trainer/labels/discs.json``): four
   show a disc-like band 16-28 mm above their C2-C3 disc (in the C2 segment: the dens base / C1-C2 junction,
   where PAM50 puts its label 2), as far as the C2-C3 disc lies above a C3-C4 candidate (15-20 mm); on this
   evidence the two cannot be told apart, so sub-errsm23 (band 16 mm above, the view ending 7 mm above the band)
   is refused and sub-errsm21 (band 24 mm above its peak) passes the 1.35-spacing test (20 mm) by 4 mm only. A
   fainter band (its contrast below 0.7 times C2-C3's) does pick sub-errsm23's, but it also passes faint real
   discs (sub-errsm21's C3-C4, sub-errsm20's) in cut fields of view: 8 wrong cuts, so it is not used.
4. **Count down: one global fit** (:func:`_fit_chain`, dynamic programming over every arc position, from
   C2-C3 down). Each disc C3-C4, C4-C5, ... may sit anywhere; a disc at ``s`` earns ``6 (f'(s) - 0.3)`` and the
   gap ``g`` above it pays ``((g / E - 1) / 0.15) ** 2`` (``E`` = the PAM50 spacing of that level times the
   person's scale, ``0.55 E <= g <= 1.45 E``); the chain runs on until the next disc would lie below the cord's
   lower end. The scale is the best-scoring of 0.70 ... 1.30 (steps of 0.02); a best fit at either end is no
   cervical column and the levels are unknown. ``f'`` is step 2's evidence with a 3 mm half width and the upper
   quartile over the band: where the discs are bright (hydrated, the thoracic discs on T2w) the 5 mm measure
   peaks 5-6 mm beside them, and the end plates cover only part of the band's depth. A disc with no ``f'`` peak
   within 3 mm (or ``f' < 0.25``) is bridged; the chain stops before two bridged discs in a row and never ends
   on one. Unlike the greedy count this replaces (each next disc the best peak near its expected place), one
   weak or spurious thoracic peak cannot shift every level below it. On the two tuning persons: ``f'`` has a
   peak within 3 mm of 16 of their 20 discs and 1 peak away from every disc (``f``: 16 and 5); the fit puts
   16 of 20 within 3 mm of the reading (max 3.4 mm) where the greedy count put 13 (max 22.8 mm).
5. **Levels**: every disc is projected on the centre line (its ``s``); cord voxels between disc ``n``
   (e.g. C2-C3 = 3) and the next one below get level ``n - 1``... i.e. the vertebra above the lower
   disc; above C2-C3, C2 and then C1 get the PAM50 heights (scaled); below the last disc found, one
   vertebra's expected height; the rest of the cord stays 0.

Units: mm, LPS. The method needs the S-I axis resolved to <= 2.5 mm (a sagittal series, or axial
slices at most 2.5 mm apart) and at least 40 mm of cord.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from sci_node.imaging.measure import cord_profile, si_axis

#: SCT numbering: index = value in the level map
LEVEL_NAMES = ("", "C1", "C2", "C3", "C4", "C5", "C6", "C7", *(f"T{i}" for i in range(1, 13)),
               *(f"L{i}" for i in range(1, 6)))
#: PAM50 disc labels (PAM50_label_disc, 0.5 mm voxels along the straight template's S-I axis): label n is the
#: disc above vertebra n (3 = C2-C3, 8 = C7-T1, 20 = T12-L1, 21 = L1-L2); label 2 is the C1/C2 junction.
_PAM50_DISC_Z = {1: 985, 2: 939, 3: 908, 4: 871, 5: 834, 6: 801, 7: 770, 8: 736, 9: 693, 10: 647, 11: 601,
                 12: 552, 13: 501, 14: 450, 15: 397, 16: 343, 17: 290, 18: 232, 19: 169, 20: 106, 21: 39}
#: template distance (mm) from disc n to disc n + 1 (the height of vertebra n projected on the cord); lumbar below
#: L1-L2 (the template cord ends there) taken as 35 mm
SPACING_MM = {n: (_PAM50_DISC_Z[n] - _PAM50_DISC_Z[n + 1]) * 0.5 for n in range(1, 21)} | {21: 35.0, 22: 35.0,
                                                                                          23: 35.0, 24: 35.0}
MAX_SI_SPACING_MM = 2.5
MIN_CORD_MM = 40.0
_BAND = (2, 14)  # mm in front of the canal wall (the CSF's front): the back of the vertebral column
_DEPTH = 45
_HALF = 5  # mm: the second difference's half width
_EDGE_MM = _HALF + 2.5  # bands this close to the cord's upper end are measured by half the evidence
_GAP = 1.35  # template C2-C3 -> C3-C4 spacings of disc-free column above C2-C3
_FIT_HALF, _FIT_Q = 3, 75.0  # the fit's evidence: thin dark bands (end plates), upper quartile over the band
_FIT_W, _FIT_F0, _FIT_SIGMA = 6.0, 0.3, 0.15  # reward per disc (w * (f - f0)); relative spread of one gap
_SCALES = np.round(np.arange(0.70, 1.3001, 0.02), 2)  # person / PAM50 spacing ratios tried
_SEEN = 0.25  # fit evidence below which a disc counts as bridged
_DISC_DEPTH = 8.0  # mm from the canal wall to a disc's middle (half a cervical disc's depth)


def disc_name(n: int) -> str:
    """Name of disc label ``n`` (3 -> ``"C2-C3"``, 8 -> ``"C7-T1"``)."""
    return f"{LEVEL_NAMES[n - 1]}-{LEVEL_NAMES[n]}"


@dataclass(frozen=True)
class Disc:
    """One disc: SCT label (3 = C2-C3), arc position ``s_mm`` on the cord (0 = the cord's lowest point),
    LPS position (mm) in the column, the evidence at it (``f``, 1 = strong) and whether it was bridged."""

    label: int
    s_mm: float
    lps_mm: tuple[float, float, float]
    evidence: float
    bridged: bool = False

    @property
    def name(self) -> str:
        return disc_name(self.label)

    def as_dict(self) -> dict[str, Any]:
        return {"disc": self.name, "label": self.label, "lps_mm": [round(v, 1) for v in self.lps_mm],
                "evidence": round(self.evidence, 2), "bridged": self.bridged}


@dataclass(frozen=True)
class VertebralLabels:
    """Level map ``(Z, Y, X)`` uint8 (SCT numbering, 0 = none), the discs, or why the levels are unknown."""

    level_map: np.ndarray
    discs: tuple[Disc, ...] = ()
    unknown_reason: str | None = None
    anchor: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return self.unknown_reason is None


@dataclass(frozen=True)
class _Straight:
    s: np.ndarray  # (N,) arc, mm
    points: np.ndarray  # (N, 3) LPS on the centre line
    anterior: np.ndarray  # (N, 3) unit, orthogonal to the cord, towards patient anterior
    image: np.ndarray  # (N, _DEPTH) intensities at s, d = 0.._DEPTH-1 mm


def _straighten(image: np.ndarray, cord: np.ndarray, m: np.ndarray) -> _Straight | None:
    prof = cord_profile(cord, m)
    if prof.levels.size < 2:
        return None
    s = np.arange(0.0, float(prof.arc[-1]) + 1e-6, 1.0)
    pts = np.stack([np.interp(s, prof.arc, prof.points[:, k]) for k in range(3)], axis=1)
    if pts[-1, 2] < pts[0, 2]:  # the SI index runs downwards (e.g. DICOM rows): s = 0 at the inferior end
        pts = pts[::-1].copy()
    tan = np.gradient(ndi.gaussian_filter1d(pts, 3.0, axis=0, mode="nearest"), axis=0)
    tan /= np.maximum(np.linalg.norm(tan, axis=1, keepdims=True), 1e-9)
    front = np.array([0.0, -1.0, 0.0])  # patient anterior in LPS, minus its part along the cord
    ant = front[None, :] - (tan @ front)[:, None] * tan
    ant /= np.maximum(np.linalg.norm(ant, axis=1, keepdims=True), 1e-9)
    side = np.cross(tan, ant)
    to_index = np.linalg.inv(np.vstack([m, [0.0, 0.0, 0.0, 1.0]]))[:3]
    depth = np.arange(_DEPTH, dtype=np.float64)
    acc = np.zeros((s.size, _DEPTH), dtype=np.float64)
    for w in (-1.5, 0.0, 1.5):
        q = pts[:, None, :] + depth[None, :, None] * ant[:, None, :] + w * side[:, None, :]
        idx = np.concatenate([q, np.ones(q.shape[:2] + (1,))], axis=-1) @ to_index.T
        acc += ndi.map_coordinates(image, [idx[..., 0], idx[..., 1], idx[..., 2]], order=1, mode="constant")
    return _Straight(s, pts, ant, (acc / 3.0).astype(np.float32))


def canal_wall(straight_image: np.ndarray) -> np.ndarray:
    """Per arc position, the depth (mm in front of the cord centre) where the bright CSF in front of the cord
    ends: the first depth past the brightest one (within 20 mm) below half of it, median-smoothed over 31 mm."""
    img = ndi.gaussian_filter(straight_image.astype(np.float64), (2.0, 0.7))
    near = img[:, :20]
    peak = np.argmax(near, axis=1)
    top = near[np.arange(img.shape[0]), peak]
    below = img < 0.5 * top[:, None]
    depth = np.arange(img.shape[1])[None, :]
    past = below & (depth >= peak[:, None])
    wall = np.where(past.any(axis=1), np.argmax(past, axis=1), peak + 5)
    return ndi.median_filter(wall, 31, mode="nearest").astype(np.int64)


def disc_evidence(straight_image: np.ndarray, half: int = _HALF, q: float = 50.0) -> np.ndarray:
    """``f(s)`` of a straightened ``(N, depth)`` image (1 mm steps): see the module doc, step 2.

    Parameters
    ----------
    straight_image
        ``(N, depth)`` intensities, 1 mm apart along the cord and in depth.
    half
        Half width (mm) of the second difference ``(I(s-half) + I(s+half)) / 2 - I(s)``.
    q
        Percentile of that difference over the band's depths (50: the anchor's evidence; 75: the fit's).

    Returns
    -------
    ``(N,)`` evidence, scaled to its 95th percentile (1 = a strong disc).
    """
    img = ndi.gaussian_filter(straight_image.astype(np.float64), 1.0)
    wall = canal_wall(straight_image)
    h = half
    f = np.zeros(img.shape[0])
    if img.shape[0] <= 2 * h:
        return f
    dark = np.zeros_like(img)
    dark[h:-h] = np.clip(0.5 * (img[:-2 * h] + img[2 * h:]) - img[h:-h], 0.0, None)
    cols = np.clip(wall[:, None] + _BAND[0] + np.arange(_BAND[1] - _BAND[0])[None, :], 0, img.shape[1] - 1)
    f = np.percentile(np.take_along_axis(dark, cols, axis=1), q, axis=1)
    f = ndi.gaussian_filter1d(f, 2.5)
    ref = np.percentile(f, 95) if f.size else 0.0
    return f / ref if ref > 0 else f


def _find_anchor(f: np.ndarray, peaks: np.ndarray) -> tuple[int | None, float]:
    """The peak taken for C2-C3 (index into ``f``) and the scale; None when no peak passes the gap test."""
    top = f.size - 1
    best: tuple[float, int, float] | None = None
    for p in peaks[::-1]:  # from the top down
        if f[p] < 0.5:
            continue
        below = [q for q in peaks if p - 1.3 * SPACING_MM[3] <= q <= p - 0.7 * SPACING_MM[3] * 0.8]
        scale = (p - max(below, key=lambda q: f[q])) / SPACING_MM[3] if below else 1.0
        gap = _GAP * SPACING_MM[3] * scale
        if top - p < gap:
            continue
        # a band near the cord's upper end is seen by half the evidence (step 2 reaches _HALF mm past it)
        strong = [q for q in peaks if q > p + 6 and f[q] >= (0.25 if top - q <= _EDGE_MM else 0.5) * f[p]]
        if any(q <= p + gap for q in strong) or len(strong) >= 2:
            continue  # a disc in the column above, or two bands beyond it: the column goes on (not C2)
        cand = (float(f[p]), int(p), float(scale))
        if best is None:
            best = cand
        break  # the highest peak with a free column above it
    return (best[1], best[2]) if best is not None else (None, 1.0)


def _fit_chain(f: np.ndarray, anchor: int, scales: np.ndarray) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
    """Best disc chain ``[(label, s index)]`` from C2-C3 at ``anchor`` down, for each PAM50 spacing scale.

    Dynamic programming over every arc position, all ``scales`` (``(K,)``) at once (module doc, step 4): a disc at
    ``s`` earns ``_FIT_W * (f(s) - _FIT_F0)``; a gap ``g`` (mm) where the template expects ``E = scale * spacing``
    costs ``((g / E - 1) / _FIT_SIGMA) ** 2`` (``0.55 E <= g <= 1.45 E``); the chain ends where the next disc would
    lie below the cord's lower end (ending earlier costs as that longer gap). Returns ``(K,)`` scores and chains.
    """
    n_pos, neg = f.size, -1e9
    sc = np.asarray(scales, dtype=np.float64)[:, None]
    score = np.full((sc.shape[0], n_pos), neg)
    near = slice(max(anchor - 4, 0), anchor + 5)  # the anchor's peak on the fit's own (sharper) evidence
    score[:, near] = _FIT_W * f[near]
    reward = _FIT_W * (f - _FIT_F0)
    x = np.arange(n_pos)[None, :]
    rows = np.arange(sc.shape[0])
    backs: list[np.ndarray] = []
    best = np.full(sc.shape[0], neg)
    best_at = np.zeros((sc.shape[0], 2), dtype=np.int64)  # (label, position) where each scale's chain ends
    for n in range(3, 25):
        exp = sc * SPACING_MM[n]  # (K, 1)
        need = (x + 1) / exp  # the next disc at least this many spacings below: out of the cord's view
        total = score - np.where(need <= 1.0, 0.0, ((need - 1.0) / _FIT_SIGMA) ** 2)
        k = np.argmax(total, axis=1)
        better = total[rows, k] > best
        best[better], best_at[better] = total[rows, k][better], np.stack([np.full(k.size, n), k], 1)[better]
        if n == 24:
            break
        new, back = np.full_like(score, neg), np.zeros(score.shape, dtype=np.int64)
        for g in range(max(1, int(np.ceil(0.55 * exp.min()))), int(1.45 * exp.max()) + 1):
            ok = (g >= 0.55 * exp) & (g <= 1.45 * exp)  # (K, 1)
            cand = np.full_like(score, neg)
            cand[:, :n_pos - g] = np.where(ok, score[:, g:] - ((g / exp - 1.0) / _FIT_SIGMA) ** 2, neg)
            upd = cand > new
            new[upd], back[upd] = cand[upd], g
        score = new + reward[None, :]
        backs.append(back)
    chains = []
    for r in rows:
        label, pos = (int(v) for v in best_at[r])
        chain = [(label, pos)]
        for n in range(label, 3, -1):
            pos += int(backs[n - 4][r, pos])
            chain.append((n - 1, pos))
        chains.append(chain[::-1])
    return best, chains


def _best_chain(f: np.ndarray, anchor: int) -> tuple[float, list[tuple[int, int, bool]]]:
    """The person's scale (best :func:`_fit_chain` over ``_SCALES``) and its chain ``[(label, s index, bridged)]``.

    A disc is bridged (not seen) where ``f`` has no peak within 3 mm or is below ``_SEEN``; it is then put where the
    template puts it between its two neighbours (the spacings above and below it in proportion). The chain stops
    before two bridged discs in a row and never ends on a bridged one.
    """
    scores, chains = _fit_chain(f, anchor, _SCALES)
    k = int(np.argmax(scores))
    scale, chain = float(_SCALES[k]), chains[k]
    peaks = find_peaks(f, distance=5, prominence=0.1)
    out: list[tuple[int, int, bool]] = []
    for label, pos in chain:
        seen = bool(peaks.size) and int(np.min(np.abs(peaks - pos))) <= 3 and f[pos] >= _SEEN
        if not seen and out and out[-1][2]:
            out.pop()
            break
        out.append((label, pos, not seen))
    while out and out[-1][2]:
        out.pop()
    for i in range(1, len(out) - 1):
        label, _, bridged = out[i]
        if bridged:  # the neighbours of a bridged disc are seen (two bridged in a row end the chain)
            share = SPACING_MM[label - 1] / (SPACING_MM[label - 1] + SPACING_MM[label])
            out[i] = (label, int(round(out[i - 1][1] - share * (out[i - 1][1] - out[i + 1][1]))), True)
    return scale, out


def label_image(image: Any, cord: np.ndarray, m: np.ndarray) -> VertebralLabels:
    """:func:`label_levels` of a ``SimpleITK.Image`` (a 4-D one: its first volume, as the classifiers read it)."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    if arr.ndim == cord.ndim + 1:
        arr = arr[0]
    return label_levels(arr, cord, m)


def label_levels(image: np.ndarray, cord: np.ndarray, m: np.ndarray) -> VertebralLabels:
    """Vertebral levels of the cord voxels of a ``(Z, Y, X)`` image (see the module doc).

    Parameters
    ----------
    image
        ``(Z, Y, X)`` intensities (any real dtype; a sagittal or thin-slice axial T2w).
    cord
        ``(Z, Y, X)`` cord mask on the same grid.
    m
        3x4 index -> LPS mm matrix of that grid.
    """
    empty = np.zeros(cord.shape, dtype=np.uint8)
    if not cord.any():
        return VertebralLabels(empty, unknown_reason="no cord in this series")
    spacing = np.linalg.norm(m[:, :3], axis=0)
    si = si_axis(m)
    if spacing[si] > MAX_SI_SPACING_MM:
        return VertebralLabels(empty, unknown_reason=(
            f"the images are {spacing[si]:.1f} mm apart along the spine: intervertebral discs (about 5 mm) "
            f"are not resolved"))
    st = _straighten(np.asarray(image, dtype=np.float32), cord, m)
    if st is None or st.s[-1] < MIN_CORD_MM:
        return VertebralLabels(empty, unknown_reason=(
            f"only {0 if st is None else st.s[-1]:.0f} mm of cord in view: too short to count vertebrae"))
    f = disc_evidence(st.image)
    peaks = find_peaks(f, distance=8, prominence=0.15)
    anchor, scale = _find_anchor(f, peaks)
    if anchor is None or peaks.size < 3:
        return VertebralLabels(empty, unknown_reason=(
            "no anchor in view: no disc-like band has the disc-free column above it that C2 shows (C2 is out of "
            "view, or a band within C2 hides its lower disc), so the discs cannot be counted; sacrum and last-rib "
            "counting are not implemented"))
    if not 0.7 <= scale <= 1.3:
        return VertebralLabels(empty, unknown_reason=(
            f"no anchor in view: the band taken for the C2-C3 disc is {scale * SPACING_MM[3]:.0f} mm above the next "
            f"band, not a cervical spacing ({0.7 * SPACING_MM[3]:.0f}-{1.3 * SPACING_MM[3]:.0f} mm), so it is not "
            f"trusted as C2-C3; sacrum and last-rib counting are not implemented"))
    fit_f = disc_evidence(st.image, _FIT_HALF, _FIT_Q)
    scale, chain = _best_chain(fit_f, anchor)
    if not _SCALES[0] < scale < _SCALES[-1]:
        return VertebralLabels(empty, unknown_reason=(
            f"no anchor in view: the discs below the band taken for the C2-C3 disc fit the template's spacings "
            f"only at {scale:.2f} times their size or beyond, not a cervical column; sacrum and last-rib counting "
            f"are not implemented"))
    if len(chain) < 3:
        return VertebralLabels(empty, unknown_reason="fewer than three discs found below C2: the count is not trusted")
    wall = canal_wall(st.image)
    discs = tuple(Disc(label, float(st.s[i]), _column_point(st, i, float(wall[i]) + _DISC_DEPTH),
                       float(fit_f[i]), bridged) for label, i, bridged in chain)
    level_of_s = _level_of_arc(st.s, discs, scale)
    level_map = _paint(cord, m, st, level_of_s)
    return VertebralLabels(level_map, discs, None, "C2", {"scale": round(scale, 3)})


def _column_point(st: _Straight, i: int, depth: float) -> tuple[float, float, float]:
    """LPS point ``depth`` mm in front of the cord centre at arc index ``i`` (a disc's middle)."""
    p = st.points[i] + depth * st.anterior[i]
    return (float(p[0]), float(p[1]), float(p[2]))


def _level_of_arc(s: np.ndarray, discs: tuple[Disc, ...], scale: float) -> np.ndarray:
    """Level (SCT numbering, 0 = unknown) at each arc position ``s`` (module doc, step 5)."""
    out = np.zeros(s.size, dtype=np.uint8)
    if not discs:
        return out
    top = discs[0]
    c2_top = top.s_mm + SPACING_MM[2] * scale
    out[(s >= top.s_mm) & (s < c2_top)] = 2
    out[(s >= c2_top) & (s < c2_top + SPACING_MM[1] * scale)] = 1
    for upper, lower in zip(discs[:-1], discs[1:]):
        out[(s < upper.s_mm) & (s >= lower.s_mm)] = upper.label
    last = discs[-1]
    if last.label <= 24:
        out[(s < last.s_mm) & (s >= last.s_mm - SPACING_MM[last.label] * scale)] = last.label
    return out


def _paint(cord: np.ndarray, m: np.ndarray, st: _Straight, level_of_s: np.ndarray) -> np.ndarray:
    """Each cord voxel gets the level of the centre-line point whose normal plane it lies nearest."""
    idx = np.argwhere(cord > 0)
    lps = idx.astype(np.float64) @ m[:, :3].T + m[:, 3]
    tan = np.gradient(st.points, axis=0)
    tan /= np.maximum(np.linalg.norm(tan, axis=1, keepdims=True), 1e-9)
    out = np.zeros(cord.shape, dtype=np.uint8)
    # nearest centre-line point, then the offset along the tangent refines the arc position
    step = max(1, st.s.size // 4000)
    pts = st.points[::step]
    best = np.empty(len(lps), dtype=np.int64)
    for a in range(0, len(lps), 20000):
        d2 = ((lps[a:a + 20000, None, :] - pts[None, :, :]) ** 2).sum(axis=2)
        best[a:a + 20000] = np.argmin(d2, axis=1) * step
    along = ((lps - st.points[best]) * tan[best]).sum(axis=1)
    s_vox = np.clip(np.rint(st.s[best] + along), 0, st.s.size - 1).astype(np.int64)
    out[tuple(idx.T)] = level_of_s[s_vox]
    return out


def find_peaks(x: np.ndarray, distance: int, prominence: float) -> np.ndarray:
    """The peaks ``scipy.signal.find_peaks(x, distance=distance, prominence=prominence)[0]`` returns.

    The same three steps as SciPy's (local maxima, a flat top at its middle; the highest first,
    its neighbours closer than ``distance`` dropped; then the prominence filter), in NumPy:
    ``scipy.signal`` costs 0.6 s to import (it pulls in ``scipy.stats``), a tenth of a
    ``sci-node infer`` cold start, for a 1-D profile of a few hundred samples.

    Returns
    -------
    numpy.ndarray
        Sorted int64 indices of ``x`` (1-D).
    """
    v = np.asarray(x, dtype=np.float64)
    peaks = _local_maxima(v)
    if peaks.size > 1 and distance > 1:
        keep = np.ones(peaks.size, dtype=bool)
        for j in np.argsort(v[peaks])[::-1]:  # highest first, SciPy's ordering of ties included
            if not keep[j]:
                continue
            near = np.abs(peaks - peaks[j]) < int(np.ceil(distance))
            near[j] = False
            keep &= ~near
        peaks = peaks[keep]
    prom = np.array([_prominence(v, int(p)) for p in peaks], dtype=np.float64)
    return peaks[prom >= prominence] if peaks.size else peaks


def _local_maxima(v: np.ndarray) -> np.ndarray:
    """Indices of the local maxima of ``v``; a plateau counts once, at its middle (rounded down)."""
    out: list[int] = []
    i, last = 1, v.size - 1
    while i < last:
        if v[i - 1] < v[i]:
            ahead = i + 1
            while ahead < last and v[ahead] == v[i]:
                ahead += 1
            if v[ahead] < v[i]:
                out.append((i + ahead - 1) // 2)
                i = ahead
        i += 1
    return np.asarray(out, dtype=np.int64)


def _prominence(v: np.ndarray, p: int) -> float:
    """How far ``v[p]`` rises above the higher of the lowest points either side before higher ground."""
    left = right = v[p]
    i = p
    while i >= 0 and v[i] <= v[p]:
        left = min(left, v[i])
        i -= 1
    i = p
    while i < v.size and v[i] <= v[p]:
        right = min(right, v[i])
        i += 1
    return float(v[p] - max(left, right))
