#!/usr/bin/env python
"""Per-series wall time and peak memory of the inference pipeline, per stage.

Makes a sagittal T2w MR DICOM series of 50 slices from the PAM50 template (needs
``../shared/data/spine``; falls back to the committed 38-slice ``sample/series``), runs
:meth:`sci_node.pipeline.Pipeline.run_dicom` with the active models, each run in a fresh
process so peak RSS is per series, and prints per-stage seconds and peak RSS (MiB, process
high-water mark after each stage)::

    .venv/bin/python bench/bench_pipeline.py [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_series(tmp: Path) -> Path:
    """50-slice sagittal T2w (70 x 549 px, 1 mm iso) from PAM50small (x 10:60); the sample if data is absent."""
    data = REPO.parent / "shared" / "data" / "spine"
    src = data / "sct-testing-data/sub-PAM50small/anat/sub-PAM50small_T2w.nii.gz"
    if not src.is_file():
        return REPO / "sample" / "series"
    spec_mod = importlib.util.spec_from_file_location("mss", REPO / "scripts" / "make_sample_series.py")
    mss = importlib.util.module_from_spec(spec_mod)
    sys.modules["mss"] = mss  # dataclasses need the module registered
    spec_mod.loader.exec_module(mss)  # type: ignore[union-attr]
    spec = mss.SeriesSpec("bench-pam50-sag50", src, tmp / "sag50", "T2w", "sagittal", "SPINE",
                          "T2 SAG whole spine", crop=(slice(10, 60), slice(0, 70), slice(0, 275)),
                          upsample_axis=2)
    mss.write_series(spec, mss._uid("bench", "study"), "bench")
    return tmp / "sag50"


CHILD = r"""
import json, sys, time, resource
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[3]))
t0 = time.perf_counter()
from sci_node.config import RoutingRules
from sci_node.pipeline import Pipeline
from sci_node.registry import ModelRegistry
models = ModelRegistry(Path(sys.argv[4])).load_active("cpu")
t_models = time.perf_counter() - t0
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
res = Pipeline(models, RoutingRules(), "cpu").run_dicom(sorted(Path(sys.argv[1]).glob("*.dcm")), Path(sys.argv[2]))
print(json.dumps({"status": res.status, "reason": res.reason, "timings": res.timings,
                  "peak_rss_mb": res.summary.get("peak_rss_mb"), "rss_after_model_load_mb": round(rss0, 1),
                  "model_load_s": round(t_models, 2), "lesions": res.summary.get("lesion_count"),
                  "routing": {k: v.get("label") for k, v in res.routing.items() if isinstance(v, dict)}}))
"""


def main() -> int:
    """Run the benchmark; print one JSON line per repeat and a summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        series = make_series(Path(tmp))
        n = len(list(series.glob("*.dcm")))
        print(f"series: {series} ({n} slices), torch threads {args.threads}")
        for i in range(args.repeats):
            out = Path(tmp) / f"out{i}"
            proc = subprocess.run([sys.executable, "-c", CHILD, str(series), str(out), str(args.threads),
                                   str(args.models_dir)], capture_output=True, text=True, check=True)
            print(proc.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
