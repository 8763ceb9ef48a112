"""Inference cost per series: wall time and peak RSS per stage, and series per hour at saturation.

1. Per stage: :meth:`sci_node.pipeline.Pipeline.run_dicom` with the registry's active models on
   the sagittal lumbar series (``tests/data/series/lumbar_sag_T2w``) and the axial test series
   (``tests/data/series/unf01_axial_T2w``), each run in a fresh process so the peak RSS is
   that series' own (process high-water mark after each stage: load, classify, segment,
   write). Model loading is timed apart (``model_load_s``).
2. Saturation: one warm process (models loaded once, like the node's single worker) runs a
   queue of ``--queue`` series back to back (alternating sagittal and axial copies);
   series/hour = queue / total wall time.

The device is CPU unless ``--device cuda`` (and CUDA is present). Usage (from the repo root)::

    .venv/bin/python bench/inference.py [--threads 2] [--repeats 3] [--queue 20] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import AXIAL, REPO, SAMPLE, emit, machine, replicate

CHILD = r"""
import json, sys, time, resource
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[4]))
t0 = time.perf_counter()
from sci_node.config import RoutingRules
from sci_node.pipeline import Pipeline
from sci_node.models.registry import ModelRegistry
device = sys.argv[5]
models = ModelRegistry(Path(sys.argv[3])).load_active(device)
pipe = Pipeline(models, RoutingRules(), device)
load_s = time.perf_counter() - t0
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
series = json.loads(sys.argv[1])
t1 = time.perf_counter()
for i, folder in enumerate(series):
    res = pipe.run_dicom(sorted(Path(folder).glob("*.dcm")), Path(sys.argv[2]) / str(i))
    if len(series) == 1:
        print(json.dumps({"status": res.status, "reason": res.reason, "timings": res.timings,
                          "peak_rss_mb": res.summary.get("peak_rss_mb"), "rss_after_models_mb": round(rss0, 1),
                          "model_load_s": round(load_s, 3)}))
total = time.perf_counter() - t1
if len(series) > 1:
    print(json.dumps({"series": len(series), "total_s": round(total, 3), "model_load_s": round(load_s, 3),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def run_child(series: list[Path], out: Path, args: argparse.Namespace) -> dict:
    """Run the pipeline on ``series`` in a fresh interpreter; its JSON line."""
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([str(s) for s in series]), str(out),
                           str(args.models_dir), str(args.threads), args.device],
                          capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--queue", type=int, default=20, help="series in the saturation queue (0: skip)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    emit({"bench": "machine", **machine()}, args.json_out)
    inputs = {"sagittal": SAMPLE, "axial": AXIAL}
    tmp = Path(tempfile.mkdtemp(prefix="scinode-infer-"))
    try:
        for r in range(args.repeats):
            for name, folder in inputs.items():  # alternate the two series
                res = run_child([folder], tmp / f"out-{name}-{r}", args)
                emit({"bench": "inference", "series": name, "slices": len(list(folder.glob("*.dcm"))),
                      "round": r, "threads": args.threads, "device": args.device, **res}, args.json_out)
        if args.queue:
            queue = []
            for i in range(args.queue):
                name = "sagittal" if i % 2 == 0 else "axial"
                replicate(inputs[name], 1, tmp / f"q{i:02d}")
                queue.append(tmp / f"q{i:02d}")
            res = run_child(queue, tmp / "out-queue", args)
            emit({"bench": "saturation", "threads": args.threads, "device": args.device, **res,
                  "seconds_per_series": round(res["total_s"] / res["series"], 3),
                  "series_per_hour": round(3600 * res["series"] / res["total_s"])}, args.json_out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
