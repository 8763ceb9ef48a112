"""Issue 38 items 4-5: ``sci-node infer`` cold start and the cord model's time on full fields of view.

Usage::

    .venv/bin/python bench/infer_speed.py [--part infer|batch|fov|all] [--runs 5] [--threads 0] [--baseline DIR]

``--baseline DIR``: a checkout of the code to compare with (``git archive REV sci_node models |
tar -x -C DIR``), run the same way (``PYTHONPATH=DIR``) in processes alternating with this
tree's, so both see the same machine load; each line then has ``"code": "baseline"|"current"``.

``infer``: wall time of ``sci-node infer tests/data/series/pam50_sag_T2w --out TMP`` in
``--runs`` fresh processes (median, min, max) and the median of each stage the pipeline
records in its ``report.json`` ``timings`` (load, classify, segment, write); start-up (imports,
model loading, previews, exit) is the rest of the wall time.

``batch``: the four series of ``tests/data/series`` (one routed out) in one ``sci-node infer``
against one process per series (sum of the walls), ``--runs // 2`` interleaved rounds.

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


def _env(src: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


def _infer_once(src: Path | None, threads: int) -> tuple[float, dict[str, float]]:
    """Wall seconds of one ``sci-node infer`` (``python -m sci_node.cli``) process, and its stages."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "sci_node.cli", "infer", str(SERIES), "--out", tmp, "--log-level", "WARNING",
               "--torch-threads", str(threads)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=src or ROOT, env=_env(src))
        wall = time.perf_counter() - t0
        report = json.loads((Path(tmp) / "report.json").read_text())
    return wall, {k: float(v) for k, v in report["series"][0]["timings"].items()}


def bench_infer(runs: int, threads: int, baseline: Path | None) -> None:
    """Median wall of ``sci-node infer`` of one series in fresh processes, and its stages."""
    codes: dict[str, Path | None] = {"current": None, **({"baseline": baseline} if baseline else {})}
    walls: dict[str, list[float]] = {c: [] for c in codes}
    stages: dict[str, dict[str, list[float]]] = {c: {} for c in codes}
    for _ in range(runs):
        for code, src in codes.items():  # interleaved: both see the same load
            wall, timings = _infer_once(src, threads)
            walls[code].append(wall)
            for k, v in timings.items():
                stages[code].setdefault(k, []).append(v)
    for code in codes:
        med = {k: round(statistics.median(v), 3) for k, v in stages[code].items()}
        wall = statistics.median(walls[code])
        _emit({"bench": "infer_one_series", "code": code, "series": SERIES.name, "runs": runs,
               "wall_median_s": round(wall, 2), "wall_min_s": round(min(walls[code]), 2),
               "wall_max_s": round(max(walls[code]), 2), "stages_median_s": med,
               "startup_and_rest_s": round(wall - sum(med.values()), 2)})


def _infer_wall(inp: Path, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "sci_node.cli", "infer", str(inp), "--out", tmp, "--log-level", "WARNING",
               "--torch-threads", str(threads)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        return time.perf_counter() - t0


def bench_batch(runs: int, threads: int) -> None:
    """The series of ``tests/data/series`` in one ``sci-node infer`` against one process per series."""
    folder = SERIES.parent
    series = sorted(p for p in folder.iterdir() if p.is_dir())
    one, each = [], []
    for _ in range(runs):  # interleaved
        one.append(_infer_wall(folder, threads))
        each.append(sum(_infer_wall(p, threads) for p in series))
    _emit({"bench": "infer_many_series", "series": len(series), "one_process_wall_median_s":
           round(statistics.median(one), 2), "process_per_series_wall_median_s": round(statistics.median(each), 2),
           "runs": runs})


def bench_fov_compare(repeat: int, threads: int, baseline: Path) -> None:
    """:func:`bench_fov` of both trees in alternating child processes, ``repeat`` rounds; per-subject medians."""
    rows: dict[tuple[str, str], list[dict[str, object]]] = {}
    for _ in range(repeat):
        for code, src in (("current", None), ("baseline", baseline)):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "fov", "--repeat", "1",
                   "--threads", str(threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=_env(src)).stdout
            for line in out.splitlines():
                rec = json.loads(line)
                if rec["bench"] == "cord_full_fov":
                    rows.setdefault((code, str(rec["subject"])), []).append(rec)
    for code in ("baseline", "current"):
        secs, nets, dices = [], [], []
        for sub in FOV_SUBJECTS:
            recs = rows[(code, sub)]
            sec = statistics.median(float(r["seconds_median"]) for r in recs)  # type: ignore[arg-type]
            net = statistics.median(float(r["network_seconds_median"]) for r in recs)  # type: ignore[arg-type]
            secs.append(sec)
            nets.append(net)
            dices.append(float(recs[0]["dice"]))  # type: ignore[arg-type]
            _emit({"bench": "cord_full_fov", "code": code, "subject": sub, "seconds_median": round(sec, 2),
                   "network_seconds_median": round(net, 2), "dice": dices[-1], "rounds": repeat})
        _emit({"bench": "cord_full_fov_mean", "code": code, "seconds_mean": round(statistics.mean(secs), 2),
               "seconds_max": round(max(secs), 2), "network_seconds_mean": round(statistics.mean(nets), 2),
               "network_seconds_max": round(max(nets), 2), "dice_mean": round(statistics.mean(dices), 4)})


def bench_fov(repeat: int, threads: int) -> None:
    """Cord model seconds and Dice on the full-FOV sagittal T2w images with manual masks."""
    import SimpleITK as sitk
    import torch

    from sci_node.imaging import preprocess
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
        runs: list[tuple[float, float, float]] = []
        for _ in range(repeat):  # Segmenter.predict in its three steps
            t0 = time.perf_counter()
            prepared = preprocess.prepare(image, seg.spec)
            t1 = time.perf_counter()
            prob = seg.predict_prob_model_grid(prepared)
            t2 = time.perf_counter()
            pred = seg.finish(prob, prepared).astype(bool)
            runs.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        dice = 2.0 * float((pred & truth).sum()) / max(float(pred.sum() + truth.sum()), 1.0)
        dices.append(dice)
        times.append(statistics.median(sum(r) for r in runs))
        _emit({"bench": "cord_full_fov", "model": f"cord {version}", "subject": sub, "size": list(image.GetSize()),
               "seconds_median": round(times[-1], 2), "network_seconds_median": round(statistics.median(
                   r[1] for r in runs), 2), "prepare_s": round(statistics.median(r[0] for r in runs), 2),
               "finish_s": round(statistics.median(r[2] for r in runs), 2), "dice": round(dice, 4),
               "threads": torch.get_num_threads(), "pred_voxels": int(pred.sum())})
    _emit({"bench": "cord_full_fov_mean", "model": f"cord {version}", "seconds_mean": round(statistics.mean(times), 2),
           "seconds_max": round(max(times), 2), "dice_mean": round(statistics.mean(dices), 4)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["infer", "fov", "batch", "all"], default="all")
    p.add_argument("--runs", type=int, default=5, help="fresh sci-node infer processes")
    p.add_argument("--repeat", type=int, default=3, help="predictions per full-FOV image (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = the node's default)")
    p.add_argument("--baseline", type=Path, help="checkout of the code to compare with, run alternately")
    args = p.parse_args()
    if args.part in ("infer", "all"):
        bench_infer(args.runs, args.threads, args.baseline)
    if args.part in ("batch", "all"):
        bench_batch(max(1, args.runs // 2), args.threads)
    if args.part in ("fov", "all"):
        if not SPINE.is_dir():
            sys.exit(f"{SPINE} not found: the full-FOV part needs the shared data")
        if args.baseline:
            bench_fov_compare(args.repeat, args.threads, args.baseline)
        else:
            bench_fov(args.repeat, args.threads)


if __name__ == "__main__":
    main()
