"""Measurement: where the cervical enlargement lies relative to the labelled discs (a count anchor?).

Prints numbers, never passes or fails; written for issue 37 (docs/benchmarks.md section 5, "cervical
enlargement"). The question: when the disc evidence leaves two hypotheses one level apart, can the peak of the
cord's cross-sectional area (CSA) or left-right width choose between them? Only if, across persons, the peak's
position relative to the C5-C6 disc spreads well under half a level.

Measured only on the persons the vertebral labelling was tuned on (sub-errsm11, sub-errsm18: discs from
``trainer/labels/discs.json``, the cord from the active cord model as ``bench/vertebral_levels.py`` has it, and
their manual cord masks), ``sub-PAM50small`` (sct-testing-data: its cord mask and level map) and the PAM50
template itself (``pam50-template-labels``: ``PAM50_cord`` and ``PAM50_label_disc``, 0.5 mm). The held-out persons
are not opened. The ivadomed test subjects' disc labels are dummies and ``sub-MNIPolyAMUds`` has no levels, so
there is nothing else to measure on.

Per cord, along its centre line (:func:`sci_node.imaging.measure.cord_profile`, resampled to 1 mm of arc):
CSA (angle-corrected, mm2) and left-right width (mm), each Gaussian-smoothed (sigma 3 mm); searched between the
labelled C3-C4 and T1-T2 discs:

* ``peak``: the arc position of the maximum, in mm above (+) / below (-) C5-C6 and in units of the person's own
  local disc spacing (mean of C4-C5 -> C5-C6 and C5-C6 -> C6-C7);
* ``plateau_mm``: how long a stretch around the peak stays >= 95 % of it (a long plateau = an ill-defined peak);
* ``rise``: where the profile, going up from its minimum between C2-C3 and the peak, first reaches half way to the
  peak (the narrowing towards C2-C3), relative to C5-C6 likewise;
* ``centroid``: the centre of mass of the profile above its minimum between T1-T2 and C2-C3 (less sensitive to
  a flat top than the peak), relative to C5-C6 likewise;
* ``hypotheses``: ``peak`` and ``centroid`` again with the discs named one level higher / lower (window, C5-C6 and
  spacing all taken from the renamed discs): what a rule comparing two hypotheses would see; the summary's
  ``decision_margin`` per cord = distance of the nearer wrong hypothesis from the reference minus that of the right
  one, in levels, the reference being the middle of the right hypotheses' range (positive = chosen right);
* ``contrast``: peak over the minimum between C2-C3 and the peak;
* ``match``: the whole profile from C2-C3 to T1-T2 against PAM50's, both placed by their discs (piecewise linear
  between discs), as labelled and shifted one level up / down: Pearson correlation for each (``-1, 0, +1``; +1 =
  the person's discs named one number higher). The labelled alignment should win by a clear margin.

    .venv/bin/python bench/enlargement_cue.py
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

from c2_cues import DATA, LABELS, TUNED_ON, pam50small_case  # noqa: E402 - the same persons and paths

PAM50 = DATA / "pam50-template-labels"
SIGMA_MM = 3.0


def profiles(cord: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSA and left-right width of a ``(Z, Y, X)`` cord mask along its centre line, 1 mm of arc apart.

    Returns ``(s, points, csa, width)``: arc mm from the lower end up, ``(N, 3)`` LPS centre line, mm2, mm.
    """
    from sci_node.imaging.measure import cord_profile, si_axis

    prof = cord_profile(cord, m)
    ax = si_axis(m)
    idx = np.argwhere(cord > 0)
    x_lps = (idx @ m[:, :3].T + m[:, 3])[:, 0]
    lev = idx[:, ax]
    lo = np.full(cord.shape[ax], np.inf)
    hi = np.full(cord.shape[ax], -np.inf)
    np.minimum.at(lo, lev, x_lps)
    np.maximum.at(hi, lev, x_lps)
    step_x = float(np.abs(m[0, :3]).max())
    width = (hi - lo + step_x)[prof.levels]
    arc, pts, csa = prof.arc, prof.points, prof.csa
    if pts[-1, 2] < pts[0, 2]:  # arc from the lower end up
        arc, pts, csa, width = arc[-1] - arc[::-1], pts[::-1], csa[::-1], width[::-1]
    s = np.arange(0.0, float(arc[-1]) + 1e-6, 1.0)
    pts_s = np.stack([np.interp(s, arc, pts[:, k]) for k in range(3)], axis=1)
    return (s, pts_s, ndi.gaussian_filter1d(np.interp(s, arc, csa), SIGMA_MM, mode="nearest"),
            ndi.gaussian_filter1d(np.interp(s, arc, width), SIGMA_MM, mode="nearest"))


def disc_arc(points: np.ndarray, lps: np.ndarray) -> float:
    """Arc position (mm, 1 mm grid of :func:`profiles`) of the centre-line point nearest ``lps`` in S."""
    return float(np.argmin(np.abs(points[:, 2] - lps[2])))


def peak_stats(v: np.ndarray, at: dict[str, float]) -> dict[str, Any]:
    """The module doc's ``peak``, ``plateau_mm``, ``rise`` and ``contrast`` of one smoothed profile ``v``."""
    c56, spacing = at["C5-C6"], 0.5 * (at["C4-C5"] - at["C6-C7"])
    lo, hi = int(np.ceil(at["T1-T2"])), int(at["C3-C4"])
    p = lo + int(np.argmax(v[lo:hi + 1]))
    top = v[p]
    above = np.arange(p, min(int(at["C2-C3"]), v.size - 1) + 1)
    q = int(above[np.argmin(v[above])])
    half = 0.5 * (top + v[q])
    rise = next(k for k in range(q, p - 1, -1) if v[k] >= half) if q > p else p
    k0, k1 = p, p
    while k0 > 0 and v[k0 - 1] >= 0.95 * top:
        k0 -= 1
    while k1 < v.size - 1 and v[k1 + 1] >= 0.95 * top:
        k1 += 1
    win = np.arange(lo, min(int(at["C2-C3"]), v.size - 1) + 1)
    w = v[win] - v[win].min()
    centre = float((w * win).sum() / max(float(w.sum()), 1e-9))
    return {"peak_mm": round(p - c56, 1), "peak_levels": round((p - c56) / spacing, 2),
            "centroid_levels": round((centre - c56) / spacing, 2),
            "plateau_mm": k1 - k0 + 1, "rise_mm": round(rise - c56, 1),
            "rise_levels": round((rise - c56) / spacing, 2), "contrast": round(float(top / max(v[q], 1e-9)), 2),
            "spacing_mm": round(spacing, 1)}


def measure(name: str, cord: np.ndarray, m: np.ndarray, discs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Both profiles of one cord; ``discs`` = ``{name: LPS mm}`` with C2-C3 ... T1-T2."""
    s, pts, csa, width = profiles(cord, m)
    at = {n: disc_arc(pts, p) for n, p in discs.items()}
    hyp = {f"{h:+d}" if h else "0": shifted(at, h) for h in (-1, 0, 1)}
    return {"cord": name, "csa": peak_stats(csa, at), "width": peak_stats(width, at),
            "hypotheses": {k: {kind: {key: peak_stats(v, a)[key] for key in ("peak_levels", "centroid_levels")}
                               for kind, v in (("csa", csa), ("width", width))} for k, a in hyp.items()},
            "_profiles": {"csa": csa, "width": width, "at": at}}


def shifted(at: dict[str, float], h: int) -> dict[str, float]:
    """The discs as a hypothesis one level off would name them: disc n named n + h (``h`` = -1, 0, +1).

    ``at``: ``{name: arc mm}`` with C2-C3 ... T2-T3; for ``h = +1`` the disc above C2-C3 (the C1/C2 junction) is put
    one C2-C3 -> C3-C4 spacing above C2-C3.
    """
    from sci_node.imaging.levels import LEVEL_NAMES, disc_name

    num = {LEVEL_NAMES.index(n.split("-")[1]): s for n, s in at.items()}
    num[2] = num[3] + (num[3] - num[4])
    return {disc_name(n + h): s for n, s in num.items() if 3 <= n + h <= 10}


def _level_coord(at: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """``(arc, level)`` of the discs C2-C3 ... T1-T2 (level = SCT disc number: 3 = C2-C3), level ascending."""
    from sci_node.imaging.levels import disc_name

    names = [disc_name(n) for n in range(3, 10)]
    return np.array([at[n] for n in names]), np.arange(3.0, 10.0)


def match(person: dict[str, Any], template: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The module doc's ``match``: ``{kind: {"-1" | "0" | "+1": Pearson r}}``."""
    a, lv = _level_coord(person["at"])
    ta, tl = _level_coord(template["at"])
    arcs = np.arange(int(np.ceil(a[-1])), int(a[0]) + 1)
    out: dict[str, dict[str, float]] = {}
    for kind in ("csa", "width"):
        x, tv = person[kind][arcs], template[kind]
        out[kind] = {}
        for h in (-1, 0, 1):
            t_arc = np.interp(np.interp(arcs, a[::-1], lv[::-1]) + h, tl, ta)
            y = np.interp(t_arc, np.arange(tv.size), tv)
            out[kind][f"{h:+d}" if h else "0"] = round(float(np.corrcoef(x, y)[0, 1]), 3)
    return out


def _errsm(series: dict, seg: Any) -> list[dict[str, Any]]:
    from sci_node.imaging.measure import index_to_lps
    from sci_node.pipeline import read_nifti

    img = read_nifti(DATA / series["image"])
    m = index_to_lps(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    discs = {d["disc"]: np.asarray(d["lps_mm"], dtype=np.float64) for d in series["discs"]}
    rows = [measure(f"{series['person']} model", np.asarray(seg.predict(img), dtype=np.uint8), m, discs)]
    stem = Path(series["image"]).name.replace(".nii.gz", "")
    manual = (DATA / "sct-history" / "derivatives" / "labels" / series["person"] / "anat"
              / f"{stem}_seg-manual.nii.gz")
    if manual.exists():
        ref = read_nifti(manual)
        rows.append(measure(f"{series['person']} manual", (sitk.GetArrayFromImage(ref) > 0.5).astype(np.uint8),
                            m, discs))
    return rows


def _template(name: str, cord: np.ndarray, m: np.ndarray, disc_z: dict[int, float]) -> dict[str, Any]:
    from sci_node.imaging.levels import disc_name

    discs = {disc_name(n): np.array([0.0, 0.0, z]) for n, z in disc_z.items()}
    return measure(name, cord, m, discs)


def _pam50small() -> dict[str, Any]:
    """sub-PAM50small with its cord mask and the discs of its level map (:func:`c2_cues.pam50small_case`)."""
    _, cord, m, disc_z = pam50small_case()
    return _template("sub-PAM50small", cord, m, disc_z)


def _pam50() -> dict[str, Any]:
    """The PAM50 template (0.5 mm): its cord mask and its disc point labels (value n = disc above vertebra n)."""
    from sci_node.imaging.measure import index_to_lps

    img = sitk.ReadImage(str(PAM50 / "PAM50_cord.nii.gz"))
    cord = sitk.GetArrayFromImage(img)
    disc = sitk.GetArrayFromImage(sitk.ReadImage(str(PAM50 / "PAM50_label_disc.nii.gz")))
    m = index_to_lps(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    disc_z = {n: float((np.argwhere(disc == n)[0] @ m[:, :3].T + m[:, 3])[2]) for n in range(3, 12)}
    return _template("PAM50", cord, m, disc_z)


def main() -> int:
    from sci_node.models.predict_seg import configure_threads
    from sci_node.models.registry import ModelRegistry

    configure_threads(1)
    seg = ModelRegistry(REPO / "models").load_active("cpu").cord
    labels = json.loads(LABELS.read_text(encoding="utf-8"))
    rows = [r for s in labels["series"] if s["person"] in TUNED_ON for r in _errsm(s, seg)]
    rows += [_pam50small(), _pam50()]
    for row in rows:
        row["match"] = match(row["_profiles"], rows[-1]["_profiles"])
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "_profiles"}), flush=True)
    out: dict[str, Any] = {"summary": "cervical enlargement vs C5-C6 (tuned persons, PAM50)"}
    for kind in ("csa", "width"):
        for key in ("peak_levels", "centroid_levels", "rise_levels", "peak_mm"):
            vals = [r[kind][key] for r in rows]
            out[f"{kind}_{key}"] = [min(vals), max(vals)]
        out[f"{kind}_plateau_mm"] = [min(r[kind]["plateau_mm"] for r in rows), max(r[kind]["plateau_mm"] for r in rows)]
        out[f"{kind}_match_margin_true_minus_best_shift"] = [
            round(r["match"][kind]["0"] - max(r["match"][kind]["-1"], r["match"][kind]["+1"]), 3)
            for r in rows if r["cord"] != "PAM50"]
    for kind in ("csa", "width"):
        for key in ("peak_levels", "centroid_levels"):
            true = [r["hypotheses"]["0"][kind][key] for r in rows]
            mu = 0.5 * (min(true) + max(true))  # the reference a rule would use, tuned on these very cords
            out[f"{kind}_{key}_decision_margin"] = [
                round(min(abs(r["hypotheses"][h][kind][key] - mu) for h in ("-1", "+1"))
                      - abs(r["hypotheses"]["0"][kind][key] - mu), 2) for r in rows]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
