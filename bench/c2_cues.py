"""Measurement: cues that might tell the C2 segment (and its C1/C2 junction band) from the vertebrae below it.

Prints numbers, never passes or fails; written for issue 37 (docs/benchmarks.md section 5, "C2 cues"). Only the
persons the vertebral labelling was tuned on (sub-errsm11, sub-errsm18) and ``sub-PAM50small`` (sct-testing-data,
its manual cord mask and level map) are measured: the held-out persons are not opened here. Per person, on the
straightened column of :mod:`sci_node.imaging.levels` (1 mm steps along the cord, depth in front of its centre):

* ``disc``: per labelled disc, and per band of the anchor's evidence above the labelled C2-C3 (a band inside C2:
  the dens base / C1-C2 junction), the second-difference evidence over the back of the column (2-14 mm in front
  of the canal's front wall, the anchor's band) and over its front (14-26 mm), scaled to the back evidence's 95th
  percentile, and their ratio (a disc crosses the whole body; a line inside C2 might not);
  and beside the midline (``lateral``: the same evidence 4, 7 and 10 mm to either side, over the midline's);
* ``free_above_mm``: C2's height on the anterior column: per disc, how far the front evidence (14-26 mm) runs above
  it before a band at least half the disc's own (C2-C3: the C2 segment; below it, one vertebral body);
* ``canal``: the mean depth of the canal's front wall (mm in front of the cord centre, not median-smoothed) over
  each segment between two discs, C2 first (the canal is widest at C1-C2);
* ``junction_cue``: the cue tried and dropped (docs/benchmarks.md section 5): for the candidate C2-C3 at ``p`` and a
  band at ``q`` above it, the band's dip over the candidate's (:func:`band_dip`; the junction is fainter) and how
  much wider the dorsal CSF is over the 7 mm above ``q`` than over the vertebra below ``p`` (:func:`dorsal_csf`; it
  widens from C2 up towards the cisterna magna). ``J``: ``p`` = the labelled C2-C3 and ``q`` where PAM50 puts the
  C1/C2 junction (15.5 / 18.5 of the C2-C3 -> C3-C4 spacing above it); ``D1`` ... ``D5``: ``p`` = C3-C4 ... C7-T1
  and ``q`` the disc above it (what a field of view cut 7 mm above ``q`` shows);
* ``spacing``: the global fit's score (:func:`sci_node.imaging.levels._fit_chain`, best scale) from each of the
  first four labelled discs named as labelled, one level higher and one level lower: whether the template's
  spacing pattern alone tells which disc is C2-C3.

    .venv/bin/python bench/c2_cues.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "spine"
LABELS = REPO / "trainer" / "labels" / "discs.json"
TUNED_ON = ("sub-errsm11", "sub-errsm18")
PAM = DATA / "sct-testing-data"
DEPTH_MM = 60


def evidence(straight: np.ndarray, wall: np.ndarray, band: tuple[int, int], half: int = 5) -> np.ndarray:
    """Median over ``band`` (mm in front of ``wall``) of ``(I(s-h) + I(s+h)) / 2 - I(s)`` (clipped at 0), 2.5 mm
    smoothed; ``straight`` is ``(N, depth)`` at 1 mm steps, ``wall`` ``(N,)`` int depths."""
    img = ndi.gaussian_filter(straight.astype(np.float64), 1.0)
    dark = np.zeros_like(img)
    dark[half:-half] = np.clip(0.5 * (img[:-2 * half] + img[2 * half:]) - img[half:-half], 0.0, None)
    cols = np.clip(wall[:, None] + band[0] + np.arange(band[1] - band[0])[None, :], 0, img.shape[1] - 1)
    return ndi.gaussian_filter1d(np.median(np.take_along_axis(dark, cols, axis=1), axis=1), 2.5)


def raw_wall(straight: np.ndarray) -> np.ndarray:
    """:func:`sci_node.imaging.levels.canal_wall` without its 31 mm median filter (float depths, mm)."""
    img = ndi.gaussian_filter(straight.astype(np.float64), (2.0, 0.7))
    near = img[:, :20]
    peak = np.argmax(near, axis=1)
    past = (img < 0.5 * near[np.arange(img.shape[0]), peak][:, None]) & (np.arange(img.shape[1])[None] >= peak[:, None])
    return np.where(past.any(axis=1), np.argmax(past, axis=1), peak + 5).astype(np.float64)


def straighten(image: np.ndarray, cord: np.ndarray, m: np.ndarray, side_mm: float = 0.0,
               behind: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sci_node.imaging.levels._straighten` ``DEPTH_MM`` deep, ``side_mm`` to the cord's side (+-1 mm averaged);
    ``behind``: towards patient posterior instead of anterior.

    Returns ``((N, DEPTH_MM) image, (N, 3) LPS centre-line points)``, 1 mm steps from the cord's lower end.
    """
    from sci_node.imaging.measure import cord_profile

    prof = cord_profile(cord, m)
    s = np.arange(0.0, float(prof.arc[-1]) + 1e-6, 1.0)
    pts = np.stack([np.interp(s, prof.arc, prof.points[:, k]) for k in range(3)], axis=1)
    if pts[-1, 2] < pts[0, 2]:
        pts = pts[::-1].copy()
    tan = np.gradient(ndi.gaussian_filter1d(pts, 3.0, axis=0, mode="nearest"), axis=0)
    tan /= np.maximum(np.linalg.norm(tan, axis=1, keepdims=True), 1e-9)
    front = np.array([0.0, 1.0 if behind else -1.0, 0.0])
    ant = front[None, :] - (tan @ front)[:, None] * tan
    ant /= np.maximum(np.linalg.norm(ant, axis=1, keepdims=True), 1e-9)
    side = np.cross(tan, ant)
    to_index = np.linalg.inv(np.vstack([m, [0.0, 0.0, 0.0, 1.0]]))[:3]
    depth = np.arange(DEPTH_MM, dtype=np.float64)
    acc = np.zeros((s.size, DEPTH_MM))
    spread = (-1.5, 0.0, 1.5) if side_mm == 0 else (side_mm - 1.0, side_mm, side_mm + 1.0)
    for w in spread:
        q = pts[:, None, :] + depth[None, :, None] * ant[:, None, :] + w * side[:, None, :]
        idx = np.concatenate([q, np.ones(q.shape[:2] + (1,))], axis=-1) @ to_index.T
        acc += ndi.map_coordinates(image, [idx[..., 0], idx[..., 1], idx[..., 2]], order=1, mode="constant")
    return acc / 3.0, pts


def band_dip(straight: np.ndarray) -> np.ndarray:
    """Per arc position, the depth of a dark band in the median ``P(s)`` over 2-14 mm in front of the canal wall
    (1 mm smoothed): ``1 - min(P[s-2:s+3]) / mean(max P 3-8 mm above, max P 3-8 mm below)``, ``(N,)``."""
    from sci_node.imaging.levels import canal_wall

    img = ndi.gaussian_filter(straight.astype(np.float64), 1.0)
    cols = np.clip(canal_wall(straight)[:, None] + 2 + np.arange(12)[None, :], 0, img.shape[1] - 1)
    prof = np.median(np.take_along_axis(img, cols, axis=1), axis=1)
    idx = np.arange(prof.size)
    up = np.max([prof[np.clip(idx + k, 0, prof.size - 1)] for k in range(3, 9)], axis=0)
    dn = np.max([prof[np.clip(idx - k, 0, prof.size - 1)] for k in range(3, 9)], axis=0)
    low = ndi.minimum_filter1d(prof, 5, mode="nearest")
    return np.clip(1.0 - low / np.maximum(0.5 * (up + dn), 1e-9), 0.0, None)


def dorsal_csf(behind: np.ndarray) -> np.ndarray:
    """Per arc position, mm of bright CSF 2-25 mm behind the cord centre (``behind``: ``(N, depth)`` from the centre
    backwards, 1 mm steps): samples above half the 99th percentile of the first 15 mm, ``(N,)``."""
    img = ndi.gaussian_filter(behind.astype(np.float64), (1.0, 0.7))
    ref = float(np.percentile(img[:, :15], 99))
    return (img[:, 2:25] > 0.5 * ref).sum(axis=1).astype(np.float64)


def junction_cue(dip: np.ndarray, csf: np.ndarray, at: list[int]) -> dict:
    """``J`` and ``D1`` ... ``D5`` of the module doc: ``[dip(q) / dip(p), dorsal CSF widening (mm)]`` each."""
    out = {}
    sp = at[0] - at[1]
    cases = [("J", at[0], at[0] + int(round(sp * 15.5 / 18.5)), sp)]
    cases += [(f"D{i}", at[i], at[i - 1], at[i] - at[i + 1]) for i in range(1, min(6, len(at) - 1))]
    for name, p, q, spacing in cases:
        top = min(q + 7, csf.size - 1)
        ratio = float(dip[max(q - 2, 0):q + 3].max()) / max(float(dip[max(p - 2, 0):p + 3].max()), 1e-9)
        widening = float(csf[q + 1:top + 1].mean() - csf[max(p - spacing, 0):p].mean()) if top > q else None
        out[name] = [round(ratio, 2), None if widening is None else round(widening, 1)]
    return out


def spacing_scores(fit_f: np.ndarray, anchor: int, label: int) -> float:
    """Best :func:`sci_node.imaging.levels._fit_chain` score with the disc at ``anchor`` named ``label`` (>= 2)."""
    from sci_node.imaging import levels as lv

    saved = dict(lv.SPACING_MM)
    shift = label - 3
    lv.SPACING_MM.update({n: saved[min(max(n + shift, 1), 24)] for n in saved})
    try:
        scores, _ = lv._fit_chain(fit_f, anchor, lv._SCALES)
    finally:
        lv.SPACING_MM.update(saved)
    return round(float(np.max(scores)), 1)


def measure(name: str, image: np.ndarray, cord: np.ndarray, m: np.ndarray, discs: list[tuple[str, float]]) -> dict:
    """The cues of one person; ``discs`` = ``[(name, LPS S mm)]`` from C2-C3 down."""
    from sci_node.imaging import levels as lv

    image = image.astype(np.float32)
    mid, pts = straighten(image, cord, m)
    wall = lv.canal_wall(mid)
    back, front = evidence(mid, wall, (2, 14)), evidence(mid, wall, (14, 26))
    ref = float(np.percentile(back, 95))
    lateral = {o: 0.5 * (evidence(straighten(image, cord, m, -o)[0], wall, (2, 14))
                         + evidence(straighten(image, cord, m, o)[0], wall, (2, 14))) for o in (4.0, 7.0, 10.0)}
    at = [(n, int(np.argmin(np.abs(pts[:, 2] - z)))) for n, z in discs]
    f = lv.disc_evidence(mid[:, :lv._DEPTH].astype(np.float32))
    c23 = at[0][1]
    bands = [(f"band {int(p) - c23:+d} mm", int(p)) for p in lv.find_peaks(f, distance=8, prominence=0.15)
             if p > c23 + 5]
    front_peaks = lv.find_peaks(front / ref, distance=5, prominence=0.05)
    rows = []
    for label, s in at + bands:
        w = slice(max(s - 3, 0), s + 4)
        b, fr = float(back[w].max()), float(front[w].max())
        above = [int(q) - s for q in front_peaks if q > s + 5 and front[q] >= 0.5 * fr]
        rows.append({"at": label, "back": round(b / ref, 2), "front": round(fr / ref, 2),
                     "front_to_back": round(fr / max(b, 1e-9), 2),
                     "lateral_4_7_10": [round(float(lateral[o][w].max()) / max(b, 1e-9), 2) for o in lateral],
                     "free_above_mm": min(above) if above else f">={mid.shape[0] - 1 - s} (view)"})
    rw = raw_wall(mid)
    segs = [(mid.shape[0] - 1, c23)] + [(a[1], b[1]) for a, b in zip(at[:-1], at[1:])]
    canal = [round(float(np.mean(rw[lo + 2:hi - 1])), 1) for hi, lo in segs[:7]]
    fit_f = lv.disc_evidence(mid[:, :lv._DEPTH].astype(np.float32), lv._FIT_HALF, lv._FIT_Q)
    spacing = {n: {f"as {lv.disc_name(k)}": spacing_scores(fit_f, s, k) for k in (i + 2, i + 3, i + 4) if k >= 3}
               for i, (n, s) in enumerate(at[:4])}
    cue = junction_cue(band_dip(mid[:, :lv._DEPTH]), dorsal_csf(straighten(image, cord, m, behind=True)[0]),
                       [s for _, s in at])
    return {"person": name, "cord_mm_above_c2_c3": int(mid.shape[0] - 1 - c23), "discs": rows,
            "canal_wall_mm_C2_C3_C4_C5_C6_C7_T1": canal, "junction_cue_dip_ratio_csf_mm": cue,
            "spacing_fit_score": spacing}


def _errsm(series: dict, seg: Any) -> dict:
    from sci_node.imaging.measure import index_to_lps
    from sci_node.pipeline import read_nifti

    img = read_nifti(DATA / series["image"])
    cord = np.asarray(seg.predict(img), dtype=np.uint8)
    m = index_to_lps(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    discs = [(d["disc"], float(d["lps_mm"][2])) for d in series["discs"]]
    return measure(series["person"], sitk.GetArrayFromImage(img), cord, m, discs)


def pam50small_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, float]]:
    """sub-PAM50small: ``(image (Z, Y, X), manual cord uint8, index -> LPS matrix, {disc n: LPS z in mm})``.

    Disc ``n`` (below vertebra ``n - 1``) lies where its level map steps from level ``n - 1`` to ``n``: half way
    between the lowest voxel of the one and the highest of the other. Also used by ``bench/enlargement_cue.py``.
    """
    from sci_node.imaging.measure import index_to_lps

    img = sitk.ReadImage(str(PAM / "sub-PAM50small" / "anat" / "sub-PAM50small_T2w.nii.gz"))
    der = PAM / "derivatives" / "labels" / "sub-PAM50small" / "anat"
    cord = (sitk.GetArrayFromImage(sitk.ReadImage(str(der / "sub-PAM50small_T2w_seg-manual.nii.gz"))) > 0)
    lvl = sitk.GetArrayFromImage(sitk.ReadImage(str(der / "sub-PAM50small_T2w_labels-vertlevels.nii.gz")))
    m = index_to_lps(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    z_of = {v: (np.argwhere(lvl == v) @ m[:, :3].T + m[:, 3])[:, 2] for v in range(2, 12)}
    disc_z = {n: 0.5 * (float(z_of[n - 1].min()) + float(z_of[n].max())) for n in range(3, 12)}
    return sitk.GetArrayFromImage(img), cord.astype(np.uint8), m, disc_z


def _pam50small() -> dict:
    """sub-PAM50small with its manual cord mask and the discs of its level map."""
    from sci_node.imaging.levels import disc_name

    image, cord, m, disc_z = pam50small_case()
    return measure("sub-PAM50small", image, cord, m, [(disc_name(n), z) for n, z in disc_z.items()])


def main() -> int:
    from sci_node.models.predict_seg import configure_threads
    from sci_node.models.registry import ModelRegistry

    configure_threads(1)
    seg = ModelRegistry(REPO / "models").load_active("cpu").cord
    labels = json.loads(LABELS.read_text(encoding="utf-8"))
    rows = [_errsm(s, seg) for s in labels["series"] if s["person"] in TUNED_ON] + [_pam50small()]
    for row in rows:
        print(json.dumps(row), flush=True)
    discs = [d for r in rows for d in r["discs"] if not d["at"].startswith("band")]
    inside = [d for r in rows for d in r["discs"] if d["at"].startswith("band")]
    cervical = [d for d in discs if d["at"][0] == "C" and d["at"] != "C2-C3"]
    walls = [r["canal_wall_mm_C2_C3_C4_C5_C6_C7_T1"] for r in rows]
    free = [d["free_above_mm"] for d in cervical if isinstance(d["free_above_mm"], int)]
    margins = [round(sc[f"as {n}"] - max(v for k, v in sc.items() if k != f"as {n}"), 1)
               for r in rows for n, sc in r["spacing_fit_score"].items()]
    print(json.dumps({
        "summary": "C2 cues",
        "front_to_back_discs": [min(d["front_to_back"] for d in discs), max(d["front_to_back"] for d in discs)],
        "front_to_back_bands_inside_C2": [d["front_to_back"] for d in inside],
        "lateral_7mm_C3_C4_to_C7_T1": [min(d["lateral_4_7_10"][1] for d in cervical),
                                       max(d["lateral_4_7_10"][1] for d in cervical)],
        "lateral_7mm_bands_inside_C2": [d["lateral_4_7_10"][1] for d in inside],
        "free_above_mm_C3_C4_to_C7_T1": [min(free), max(free)],
        "canal_C2_minus_widest_below_mm": [round(w[0] - max(w[1:]), 1) for w in walls],
        "junction_cue_J": [r["junction_cue_dip_ratio_csf_mm"]["J"] for r in rows],
        "junction_cue_D_csf_max_mm": max(v[1] for r in rows for k, v in r["junction_cue_dip_ratio_csf_mm"].items()
                                         if k != "J" and v[1] is not None),
        "spacing_margin_true_minus_best_shifted": margins}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
