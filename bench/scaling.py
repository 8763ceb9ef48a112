"""Scaling: pipeline time per stage vs number of slices and vs in-plane matrix.

The sagittal lumbar series (``tests/data/series/lumbar_sag_T2w``, 38 slices of 201 x 112 px, 1 mm) is resampled
(same field of view, linear interpolation, :func:`common.resample_series`) to

* ``--slices`` (default 25, 50, 100, 200) slices at the source matrix, and
* ``--inplane`` (default 256, 512) square matrices at the source slice count,

and each input runs through :meth:`sci_node.pipeline.Pipeline.run_dicom` in a fresh process
(same child as ``bench/inference.py``), ``--repeats`` times, inputs alternated. The cord and
lesion models work on axial 2-D slices resampled to 0.8 mm in-plane with the native
inferior-superior spacing: for a sagittal series more slices only widen the L-R extent
sampling (resampled away), while more rows (in-plane matrix) mean more axial slices to segment.

Usage (from the repo root)::

    .venv/bin/python bench/scaling.py [--slices 25 50 100 200] [--inplane 256 512] [--repeats 2]
        [--json-out FILE]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import REPO, SAMPLE, emit, machine, resample_series
from inference import run_child


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, nargs="*", default=[25, 50, 100, 200])
    ap.add_argument("--inplane", type=int, nargs="*", default=[256, 512])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    emit({"bench": "machine", **machine()}, args.json_out)
    tmp = Path(tempfile.mkdtemp(prefix="scinode-scaling-"))
    try:
        inputs: list[tuple[str, int, int, int, Path]] = []
        for n in args.slices:
            files = resample_series(SAMPLE, tmp / f"slices-{n}", n_slices=n)
            inputs.append(("slices", n, 201, 112, files[0].parent))
        for m in args.inplane:
            files = resample_series(SAMPLE, tmp / f"inplane-{m}", inplane=m)
            inputs.append(("inplane", len(files), m, m, files[0].parent))
        for r in range(args.repeats):
            for axis, n, rows, cols, folder in inputs:
                mb = sum(f.stat().st_size for f in folder.glob("*.dcm")) / 1e6
                res = run_child([folder], tmp / f"out-{axis}-{n}-{rows}-{r}", args)
                emit({"bench": "scaling", "axis": axis, "slices": n, "rows": rows, "cols": cols,
                      "mb": round(mb, 1), "round": r, "threads": args.threads,
                      "total_s": round(sum(res["timings"].values()), 3), **res}, args.json_out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
