"""Follow-up comparison on real scan-rescan pairs (issue 39): false new lesions and CSA reproducibility.

Prints numbers, never passes or fails. For each pair of the same person (gm-challenge axial T2*w:
sub-9709 and sub-10062, session 1 against session 2, and run 1 against run 2 of each session)
``sci-node compare`` (the shipped models) segments both, registers the prior on the cord and
classifies the lesions; a healthy person's rescan should show no new lesion. Per pair: the
registration check, the counts, the mean-CSA difference in % (the C2-C3 mean when both scans have
vertebral levels) and the seconds the comparison added beyond segmenting the two.

    .venv/bin/python bench/followup.py [--data ../shared/data/spine] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sci_node.config import load_config  # noqa: E402
from sci_node.pipeline.compare import run_compare  # noqa: E402

GM = "gm-challenge"
PAIRS = [(f"sub-{p}Ses{a}/anat/sub-{p}Ses{a}_run-{r}_T2starw.nii.gz",
          f"sub-{p}Ses{b}/anat/sub-{p}Ses{b}_run-{s}_T2starw.nii.gz")
         for p in ("9709", "10062") for (a, r, b, s) in ((1, 1, 2, 1), (1, 1, 1, 2), (2, 1, 2, 2))]


def manual_common_stretch(data: Path, prior: str, current: str) -> dict | None:
    """The same comparison's common-stretch CSA change measured on the raters' ``_seg-manual`` cords (the
    reference: how much the manual masks of the two scans differ), or None without both masks."""
    import numpy as np
    import SimpleITK as sitk

    from sci_node.imaging import followup
    from sci_node.imaging.measure import index_to_lps, si_axis
    from sci_node.imaging.preprocess import as_scalar_float, canonicalise

    def side(rel: str) -> tuple[sitk.Image, np.ndarray] | None:
        mask = data / GM / "derivatives" / "labels" / rel.replace(".nii.gz", "_seg-manual.nii.gz")
        if not mask.is_file():
            return None
        img = canonicalise(as_scalar_float(sitk.ReadImage(str(data / GM / rel))))
        return img, (sitk.GetArrayFromImage(canonicalise(sitk.ReadImage(str(mask)))) > 0).astype(np.uint8)

    a, b = side(prior), side(current)
    if a is None or b is None:
        return None
    m = index_to_lps(b[0].GetOrigin(), b[0].GetSpacing(), b[0].GetDirection())
    res = followup.compare(a[0], a[1], np.zeros_like(a[1]), b[0], b[1], np.zeros_like(b[1]), si_axis(m))
    return res.csa_common if res.check.passed else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "spine")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--rule", action="append", default=[], metavar="KEY=VALUE",
                    help="override a FollowupRules field (e.g. diff_min_mm3=5)")
    args = ap.parse_args()
    from common import parse_rules

    rules = parse_rules(args.rule)
    cfg = load_config(None, {"log_level": "WARNING"})
    rows = []
    with tempfile.TemporaryDirectory(prefix="scinode-followup-") as tmp:
        for prior, current in PAIRS:
            a, b = args.data / GM / prior, args.data / GM / current
            if not (a.is_file() and b.is_file()):
                continue
            out = Path(tmp) / f"{a.name}-{b.name}"
            t0 = time.perf_counter()
            with open("/dev/null", "w") as quiet:
                rc = run_compare(a, b, out, cfg, stream=quiet, rules=rules)
            seconds = time.perf_counter() - t0
            rec = json.loads((out / "comparison.json").read_text())
            row = {"prior": a.name, "current": b.name, "rc": rc, "compared": rec["compared"],
                   "reason": rec["reason"], "cord_dice": rec["registration"]["cord_dice"],
                   "centerline_mm": rec["registration"]["centerline_mm"], "counts": rec["counts"],
                   "csa_mean": rec["csa_mean"], "csa_common_stretch": rec.get("csa_common_stretch"),
                   "csa_c2_c3": rec["csa_c2_c3"], "seconds_total": round(seconds, 2),
                   "seconds_compare": rec["compare_seconds"],
                   "manual_csa_common_stretch": manual_common_stretch(args.data, prior, current)}
            rows.append(row)
            print(json.dumps(row))
    diffs = [abs(r["csa_mean"]["change_pct"]) for r in rows if r["csa_mean"]["change_pct"] is not None]
    common = [abs(r["csa_common_stretch"]["change_pct"]) for r in rows
              if (r.get("csa_common_stretch") or {}).get("change_pct") is not None]
    news = [r["counts"]["new"] + r["counts"]["enlarging"] for r in rows if r["counts"]]
    summary = {"summary": "scan-rescan", "pairs": len(rows), "compared": sum(r["compared"] for r in rows),
               "false_new_or_enlarging_total": sum(news), "pairs_with_false_new": sum(1 for n in news if n),
               "csa_mean_abs_diff_pct_median": round(statistics.median(diffs), 2) if diffs else None,
               "csa_mean_abs_diff_pct_max": round(max(diffs), 2) if diffs else None,
               "csa_common_stretch_abs_diff_pct_median": round(statistics.median(common), 2) if common else None,
               "csa_common_stretch_abs_diff_pct_max": round(max(common), 2) if common else None,
               "csa_common_stretch_abs_diff_pct_mean": round(statistics.fmean(common), 2) if common else None,
               "manual_masks_common_stretch_abs_diff_pct": [abs(r["manual_csa_common_stretch"]["change_pct"])
                                                            for r in rows if r["manual_csa_common_stretch"]],
               "seconds_compare_max": max((r["seconds_compare"] for r in rows), default=None)}
    print(json.dumps(summary))
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
