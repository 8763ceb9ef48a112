"""Routing cost per series: the three active classifiers (anatomy, region_view, sequence) on CPU.

What the node's ``classify`` stage does for one series, without loading the segmenters: header
evidence, the shared preprocessing (:func:`sci_node.routing.cls_features.series_inputs`, run once per
classifier as in the node) and the three networks, through :func:`sci_node.pipeline.route_report.route_series`
with the default routing rules (so a series routed out at anatomy costs one classifier, a routed-in
series three). Inputs: the committed demo series (``sample/series``, sagittal cervical T2w) and
``tests/data/series/*`` (sagittal lumbar T2w, axial cervical T2w, sagittal PAM50 T2w, axial brain T1w).
One torch thread. Each series is loaded once, then timed ``--repeats`` times after one warm-up call.

    .venv/bin/python bench/classify.py [--repeats 10] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import REPO, emit, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    import torch

    from sci_node.config import RoutingRules
    from sci_node.pipeline.route_report import load_classifiers, route_series
    from sci_node.pipeline.series import find_dicom_files, read_series
    from sci_node.routing.evidence import HeaderEvidence

    torch.set_num_threads(1)
    classifiers = load_classifiers(REPO / "models")
    emit({"bench": "classify", "machine": machine(), "versions": {n: c.version for n, c in classifiers.items()}},
         args.json_out)
    tests = REPO / "tests" / "data" / "series"
    folders = [REPO / "sample" / "series", *sorted(p for p in tests.iterdir() if p.is_dir())]
    for folder in folders:
        for files in find_dicom_files(folder).values():
            vol = read_series(files)
            ev = HeaderEvidence.from_dicom(vol.first)
            route_series(classifiers, vol.image, ev, RoutingRules())  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                rep = route_series(classifiers, vol.image, ev, RoutingRules())
                times.append(time.perf_counter() - t0)
            emit({"series": folder.name, "size": list(vol.image.GetSize()), "classifiers_run": len(
                {lv for lv in rep["levels"]} & {"anatomy", "view", "sequence"}), "anatomy_by": (
                rep["levels"].get("anatomy", {}).get("decided_by") or "localiser guard").split(":")[0],
                  "routed_in": rep["segment_cord"],
                  "median_s": round(statistics.median(times), 4), "max_s": round(max(times), 4)}, args.json_out)


if __name__ == "__main__":
    main()
