"""Issue 38 items 4-5: ``sci-node infer`` cold start and the cord model's time on full fields of view.

Usage::

    .venv/bin/python bench/infer_speed.py [--part infer|fov|all] [--runs 5] [--threads 0]

``infer``: wall time of ``sci-node infer tests/data/series/pam50_sag_T2w --out TMP`` in
``--runs`` fresh processes (median, min, max) and the median of each stage the pipeline
records in its ``report.json`` ``timings`` (load, classify, segment, write); start-up (imports,
model loading, previews, exit) is the rest of the wall time.

``fov``: ``Segmenter.predict`` of the active cord model on the full-FOV sagittal T2w of the
errsm subjects with a manual cord mask (``../shared/data/spine/sct-history``, 384 x ~220 x 52 at
1 mm): seconds (median of ``--repeat``) and Dice against the mask. Needs the shared data.
One JSON line per measurement, with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERIES = ROOT / "tests" / "data" / "series" / "pam50_sag_T2w"
SPINE = ROOT.parent / "shared" / "data" / "spine" / "sct-history"
FOV_SUBJECTS = ("errsm11", "errsm18", "errsm21", "errsm23")


def _emit(record: dict[str, object]) -> None:
    record["load"] = round(os.getloadavg()[0], 2)
    print(json.dumps(record), flush=True)


def bench_infer(runs: int, threads: int) -> None:
    """Median wall of ``sci-node infer`` of one series in fresh processes, and its stages."""
    exe = str(ROOT / ".venv" / "bin" / "sci-node")
    walls: list[float] = []
    stages: dict[str, list[float]] = {}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [exe, "infer", str(SERIES), "--out", tmp, "--log-level", "WARNING", "--torch-threads", str(threads)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
            walls.append(time.perf_counter() - t0)
            report = json.loads((Path(tmp) / "report.json").read_text())
            for k, v in report["series"][0]["timings"].items():
                stages.setdefault(k, []).append(float(v))
    med = {k: round(statistics.median(v), 3) for k, v in stages.items()}
    wall = statistics.median(walls)
    _emit({"bench": "infer_one_series", "series": SERIES.name, "runs": runs, "wall_median_s": round(wall, 2),
           "wall_min_s": round(min(walls), 2), "wall_max_s": round(max(walls), 2), "stages_median_s": med,
           "startup_and_rest_s": round(wall - sum(med.values()), 2)})


def bench_fov(repeat: int, threads: int) -> None:
    """Cord model seconds and Dice on the full-FOV sagittal T2w images with manual masks."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from sci_node.models.predict_seg import Segmenter
    from sci_node.models.registry import ModelRegistry

    torch.set_num_threads(threads or 1)
    reg = ModelRegistry(ROOT / "models")
    version = reg.active()["cord"]
    seg = Segmenter.from_artifact(ROOT / "models" / "cord" / version)
    dices, times = [], []
    for sub in FOV_SUBJECTS:
        image = sitk.ReadImage(str(SPINE / f"sub-{sub}" / "anat" / f"sub-{sub}_T2w.nii.gz"))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(
            str(SPINE / "derivatives" / "labels" / f"sub-{sub}" / "anat" / f"sub-{sub}_T2w_seg-manual.nii.gz"))) > 0
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            pred = seg.predict(image).astype(bool)
            runs.append(time.perf_counter() - t0)
        dice = 2.0 * float((pred & truth).sum()) / max(float(pred.sum() + truth.sum()), 1.0)
        dices.append(dice)
        times.append(statistics.median(runs))
        _emit({"bench": "cord_full_fov", "model": f"cord {version}", "subject": sub, "size": list(image.GetSize()),
               "seconds_median": round(times[-1], 2), "dice": round(dice, 4), "threads": torch.get_num_threads(),
               "pred_voxels": int(pred.sum()), "sha_pred": int(np.packbits(pred).sum())})
    _emit({"bench": "cord_full_fov_mean", "model": f"cord {version}", "seconds_mean": round(statistics.mean(times), 2),
           "seconds_max": round(max(times), 2), "dice_mean": round(statistics.mean(dices), 4)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["infer", "fov", "all"], default="all")
    p.add_argument("--runs", type=int, default=5, help="fresh sci-node infer processes")
    p.add_argument("--repeat", type=int, default=3, help="predictions per full-FOV image (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = the node's default)")
    args = p.parse_args()
    if args.part in ("infer", "all"):
        bench_infer(args.runs, args.threads)
    if args.part in ("fov", "all"):
        if not SPINE.is_dir():
            sys.exit(f"{SPINE} not found: the full-FOV part needs the shared data")
        bench_fov(args.repeat, args.threads)


if __name__ == "__main__":
    main()
