"""Benchmark: vertebral labelling (:func:`sci_node.imaging.levels.label_levels`) against the discs read by eye.

Prints numbers, never passes or fails. For every series of ``trainer/labels/discs.json`` the active cord
model segments the cord (as the node does), then :func:`sci_node.imaging.levels.label_levels` labels it. Per series:

* discs: each labelled disc matched to the found disc of the same name; position error = distance
  between the two along the cord (their projections on the centre line, mm) and in 3-D (mm);
* cord voxels with the right level: the reference level map is the same cord painted from the labelled
  discs (the same projection and rules, :func:`reference_levels`), scored between the highest and the
  lowest labelled disc; a voxel left unknown counts as wrong;
* a series whose count is not anchored in the labels (``"anchored": false``) must come out unknown;
* time of ``label_levels`` alone (the cord model not included), median of 3 runs.

``--fov-cuts`` adds the safety check of a field of view that does not start at C1: every anchored series is cut
at ``S = C2-C3 + t`` mm (``t`` = -60 ... +42 in 3 mm steps; image and cord set to 0 above, as the edge of a field
of view), and each cut is scored right (every disc found has the name of the labelled disc within 8 mm of it),
wrong (one or more named wrongly: a silent wrong level), or unknown. Wrong must be 0.

``--persons`` limits the run (the method was tuned on sub-errsm11 and sub-errsm18 only; every other person
is held out). Needs ``../shared/data/spine`` (our machines only).

    .venv/bin/python bench/vertebral_levels.py [--fov-cuts] [--persons sub-errsm20 ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "spine"
LABELS = REPO / "trainer" / "labels" / "discs.json"
TUNED_ON = ("sub-errsm11", "sub-errsm18")
CUTS_MM = tuple(range(-60, 43, 3))  # field-of-view tops relative to the labelled C2-C3 disc (--fov-cuts)


def reference_levels(image: np.ndarray, cord: np.ndarray, m: np.ndarray, discs: list[dict]) -> tuple[np.ndarray, list]:
    """The cord painted from the labelled discs, with the method's own projection; ``(map, [(label, s)])``."""
    from sci_node.imaging import levels as lv

    st = lv._straighten(image, cord, m)
    ref = []
    for d in discs:
        p = np.asarray(d["lps_mm"])
        k = int(np.argmin(np.linalg.norm(st.points - p, axis=1)))
        tan = np.gradient(st.points, axis=0)[k]
        tan /= np.linalg.norm(tan)
        s = float(st.s[k] + (p - st.points[k]) @ tan)
        label = lv.LEVEL_NAMES.index(d["disc"].split("-")[1])
        ref.append(lv.Disc(label, s, tuple(p), 1.0))
    level_of_s = lv._level_of_arc(st.s, tuple(ref), 1.0)
    lo, hi = ref[-1].s_mm, ref[0].s_mm
    level_of_s[(st.s < lo) | (st.s >= hi)] = 0  # scored only between the labelled discs
    return lv._paint(cord, m, st, level_of_s), [(r.label, r.s_mm, r.lps_mm) for r in ref]


def score(series: dict, seg) -> dict:
    from sci_node.imaging import levels as lv
    from sci_node.imaging.measure import index_to_lps
    from sci_node.pipeline import read_nifti

    img = read_nifti(DATA / series["image"])
    arr = sitk.GetArrayFromImage(img)
    cord = np.asarray(seg.predict(img), dtype=np.uint8)
    m = index_to_lps(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    times = []
    for _ in range(3):
        t = time.perf_counter()
        res = lv.label_levels(arr, cord, m)
        times.append(time.perf_counter() - t)
    row = {"person": series["person"], "image": Path(series["image"]).name, "tuned_on": series["person"] in TUNED_ON,
           "seconds": round(float(np.median(times)), 3), "known": res.known, "reason": res.unknown_reason}
    if not series["anchored"]:
        row["expected"] = "unknown"
        row["ok"] = not res.known
        return row
    ref_map, ref = reference_levels(arr, cord, m, series["discs"])
    st = lv._straighten(arr, cord, m)
    found = {d.label: d for d in res.discs}
    errs, errs3 = [], []
    for label, s, p in ref:
        if label in found:
            errs.append(abs(found[label].s_mm - s))
            errs3.append(float(np.linalg.norm(np.asarray(found[label].lps_mm) - np.asarray(p))))
    scored = ref_map > 0
    right = int(np.count_nonzero(res.level_map[scored] == ref_map[scored]))
    row.update(discs_labelled=len(ref), discs_matched=len(errs),
               disc_err_along_cord_mm=[round(e, 1) for e in errs], disc_err_3d_mm=[round(e, 1) for e in errs3],
               cord_voxels_scored=int(scored.sum()), cord_voxels_right=right,
               right_pct=round(100.0 * right / max(int(scored.sum()), 1), 1),
               found=[d.name for d in res.discs])
    del st
    return row


def fov_cuts(series: dict, seg) -> dict:
    """The series cut above ``S = C2-C3 + t`` for ``t`` in ``CUTS_MM``: ``{t: "right" | "wrong" | "unknown"}``."""
    from sci_node.imaging import levels as lv
    from sci_node.imaging.measure import index_to_lps
    from sci_node.pipeline import read_nifti

    img = read_nifti(DATA / series["image"])
    arr = sitk.GetArrayFromImage(img)
    cord = np.asarray(seg.predict(img), dtype=np.uint8)
    m = index_to_lps(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    axis = int(np.argmax(np.abs(m[2, :3])))  # the array axis along S
    s_of_index = np.arange(arr.shape[axis]) * m[2, axis] + m[2, 3]
    z23 = series["discs"][0]["lps_mm"][2]
    out = {}
    for t in CUTS_MM:
        gone = [slice(None)] * 3
        gone[axis] = s_of_index > z23 + t
        a2, c2 = arr.copy(), cord.copy()
        a2[tuple(gone)], c2[tuple(gone)] = 0, 0
        res = lv.label_levels(a2, c2, m)
        if not res.known:
            out[t] = "unknown"
            continue
        wrong = 0
        for d in res.discs:
            near = min(series["discs"], key=lambda x: abs(x["lps_mm"][2] - d.lps_mm[2]))
            wrong += int(near["disc"] != d.name and abs(near["lps_mm"][2] - d.lps_mm[2]) < 8.0)
        out[t] = "wrong" if wrong else "right"
    return out


def main(argv: list[str] | None = None) -> int:
    from sci_node.models.predict_seg import configure_threads
    from sci_node.models.registry import ModelRegistry

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--persons", nargs="*")
    ap.add_argument("--fov-cuts", action="store_true", help="also cut every anchored series above C2-C3 + t mm")
    a = ap.parse_args(argv)
    configure_threads(1)
    seg = ModelRegistry(REPO / "models").load_active("cpu").cord
    labels = json.loads(LABELS.read_text(encoding="utf-8"))
    rows = []
    for series in labels["series"]:
        if a.persons and series["person"] not in a.persons:
            continue
        row = score(series, seg)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for group, keep in (("held out", lambda r: not r["tuned_on"]), ("tuned on", lambda r: r["tuned_on"])):
        sel = [r for r in rows if keep(r) and "right_pct" in r]
        if not sel:
            continue
        errs = [e for r in sel for e in r["disc_err_along_cord_mm"]]
        errs3 = [e for r in sel for e in r["disc_err_3d_mm"]]
        vox = sum(r["cord_voxels_right"] for r in sel) / max(sum(r["cord_voxels_scored"] for r in sel), 1)
        print(json.dumps({"summary": group, "series": len(sel), "right_pct_all_voxels": round(100 * vox, 1),
                          "right_pct_min_series": min(r["right_pct"] for r in sel),
                          "discs_matched": f"{len(errs)}/{sum(r['discs_labelled'] for r in sel)}",
                          "disc_err_along_cord_median_mm": round(float(np.median(errs)), 1) if errs else None,
                          "disc_err_along_cord_max_mm": round(float(np.max(errs)), 1) if errs else None,
                          "disc_err_3d_median_mm": round(float(np.median(errs3)), 1) if errs3 else None,
                          "disc_err_3d_max_mm": round(float(np.max(errs3)), 1) if errs3 else None,
                          "seconds_max": max(r["seconds"] for r in sel)}))
    if a.fov_cuts:
        counts = {"right": 0, "wrong": 0, "unknown": 0}
        for series in labels["series"]:
            if series["anchored"] and (not a.persons or series["person"] in a.persons):
                cuts = fov_cuts(series, seg)
                print(json.dumps({"person": series["person"], "fov_cuts": " ".join(
                    f"{t:+d}:{v[0].upper()}" for t, v in cuts.items())}), flush=True)
                for v in cuts.values():
                    counts[v] += 1
        print(json.dumps({"summary": "fov cuts (R right, W wrong, U unknown)", **counts}))
    unk = [r for r in rows if r.get("expected") == "unknown"]
    if unk:
        print(json.dumps({"summary": "no anchor in view", "series": len(unk),
                          "reported_unknown": sum(r["ok"] for r in unk)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
