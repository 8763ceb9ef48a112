"""Plots for docs/benchmarks.md from the JSON lines the benchmarks wrote with ``--json-out``.

Usage (from the repo root)::

    .venv/bin/python bench/plots.py RESULTS_DIR [--out docs/img]

reads ``ingest.jsonl``, ``latency.jsonl``, ``inference.jsonl``, ``scaling.jsonl`` (whichever
exist) in ``RESULTS_DIR`` and writes ``bench_ingest.png``, ``bench_latency.png``,
``bench_stages.png``, ``bench_scaling.png``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGES = ("load", "classify", "segment", "write")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_ingest(rows: list[dict], out: Path) -> None:
    summ = [r for r in rows if r["bench"] == "ingest-summary"]
    if not summ:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    names = [r["server"] for r in summ]
    rates = [r["inst_per_s"] for r in summ]
    bars = ax.barh(names, rates, color=["#888", "#1f77b4", "#ff7f0e"][:len(names)])
    for b, r in zip(bars, summ):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2,
                f" {r['inst_per_s']:.0f}/s ({r['ratio_to_storescp']:.0%})",
                va="center", fontsize=8)
    ax.set_xlabel(f"instances/s (median; {summ[0]['instances']} MR instances, storescu client)")
    ax.set_xlim(0, max(rates) * 1.35)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "bench_ingest.png", dpi=120)
    plt.close(fig)


def plot_latency(rows: list[dict], out: Path) -> None:
    lat = [r for r in rows if r["bench"] == "latency" and r["round"] != "warm-up"]
    if not lat:
        return
    groups: dict[str, list[float]] = defaultdict(list)
    waits: dict[str, float] = {}
    for r in lat:
        key = f"{r['path']}\n{r['series']}"
        groups[key].append(r["beyond_stable_s"])
        waits[key] = r["stable_s"]
    keys = list(groups)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    med = [statistics.median(groups[k]) for k in keys]
    ax.bar(keys, [waits[k] for k in keys], color="#ccc", label="stable wait(s)")
    ax.bar(keys, med, bottom=[waits[k] for k in keys], color="#1f77b4", label="beyond the stable wait (median)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("last C-STORE -> SEG received (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_latency.png", dpi=120)
    plt.close(fig)


def _stack(ax: plt.Axes, labels: list[str], timings: list[dict[str, float]]) -> None:
    bottom = [0.0] * len(labels)
    for stage in STAGES:
        vals = [t.get(stage, 0.0) for t in timings]
        ax.bar(labels, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals)]


def _median_timings(rows: list[dict]) -> dict[str, float]:
    return {s: statistics.median(r["timings"].get(s, 0.0) for r in rows) for s in STAGES}


def plot_stages(rows: list[dict], out: Path) -> None:
    inf = [r for r in rows if r["bench"] == "inference"]
    if not inf:
        return
    by: dict[str, list[dict]] = defaultdict(list)
    for r in inf:
        by[f"{r['series']} ({r['slices']} sl.)"].append(r)
    labels = list(by)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    _stack(ax, labels, [_median_timings(by[k]) for k in labels])
    ax.set_ylabel("seconds (median)")
    ax.set_title("wall time per stage", fontsize=9)
    ax.legend(fontsize=7)
    for k in labels:
        peaks = [statistics.median(r["peak_rss_mb"][s] for r in by[k]) for s in STAGES]
        ax2.plot(STAGES, peaks, marker="o", label=k)
    ax2.axhline(2048, color="r", ls="--", lw=0.8, label="target 2 GB")
    ax2.set_ylim(0, 2300)
    ax2.set_ylabel("peak RSS so far (MiB)")
    ax2.set_title("process high-water mark", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bench_stages.png", dpi=120)
    plt.close(fig)


def plot_scaling(rows: list[dict], out: Path) -> None:
    sc = [r for r in rows if r["bench"] == "scaling"]
    if not sc:
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, axis, title in ((axes[0], "slices", "vs number of sagittal slices (201x112)"),
                            (axes[1], "inplane", "vs in-plane matrix (38 slices)")):
        by: dict[tuple[int, int], list[dict]] = defaultdict(list)
        for r in sc:
            if r["axis"] == axis:
                by[(r["slices"], r["rows"])].append(r)
        keys = sorted(by)
        labels = [str(k[0]) if axis == "slices" else f"{k[1]}²" for k in keys]
        _stack(ax, labels, [_median_timings(by[k]) for k in keys])
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("seconds (median)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bench_scaling.png", dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "img")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    plot_ingest(_read(args.results / "ingest.jsonl"), args.out)
    plot_latency(_read(args.results / "latency.jsonl"), args.out)
    plot_stages(_read(args.results / "inference.jsonl"), args.out)
    plot_scaling(_read(args.results / "scaling.jsonl"), args.out)
    print(f"plots written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
