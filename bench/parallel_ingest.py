"""Parallel senders: N ``storescu`` associations at once into one server; wall time of the burst.

Each sender has its own copy of the committed lumbar series (``--copies`` x 38 instances, new UIDs).
Per round every configuration gets a fresh server; configurations run interleaved, the order reversed
every other round. Prints one JSON line per burst and the medians.

Configurations: ``default`` (this tree's ``sci-node serve``), each ``--variant NAME=TOML``, ``baseline``
(``--baseline DIR``: the node from another checkout, ``git archive REV sci_node models pyproject.toml |
tar -x -C DIR``) and, with ``--peers``, dcmtk ``storescp`` (one association at a time: it does not fork)
and Orthanc. ``--inplane N`` resamples the series to N x N pixels first (64: ~10 kB, 290: ~170 kB
instances).

Usage (from the repo root)::

    .venv/bin/python bench/parallel_ingest.py [--senders 16] [--rounds 5] [--copies 2] [--inplane N]
        [--peers] [--baseline DIR] [--variant 'NAME=TOML' ...]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from common import (
    SAMPLE,
    add_variant_arg,
    emit,
    loadavg,
    parse_variants,
    replicate,
    resample_series,
    start_node,
    start_orthanc,
    start_storescp,
    stop,
    storescu,
)

Starter = Callable[[Path], tuple["subprocess.Popen[bytes]", int, str]]


def starters(variants: dict[str, str], baseline: Path | None, peers: bool) -> dict[str, Starter]:
    """Each configuration's way to start a fresh server in a folder: (process, port, called AE)."""
    def node(toml: str, code: Path | None = None) -> Starter:
        return lambda work: (*start_node(work, stable=3600, processor="derived-sc", extra_toml=toml, code=code),
                             "SCINODE")

    out: dict[str, Starter] = {name: node(toml) for name, toml in variants.items()}
    if baseline is not None:
        out["baseline"] = node("", baseline)
    if peers:
        out["storescp"] = lambda work: (*start_storescp(work / "out"), "DEST")
        out["orthanc"] = lambda work: (*start_orthanc(work)[:2], "ORTHANC")
    return out


def burst(work: Path, start: Starter, sets: list[list[Path]]) -> float:
    """Seconds from the first sender's start to the last one's end, into a fresh server."""
    proc, port, called = start(work)
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(sets)) as ex:
            list(ex.map(lambda files: storescu(port, files, called), sets))
        return time.monotonic() - t0
    finally:
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--senders", type=int, default=16)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inplane", type=int, help="resample the series to N x N pixels first")
    ap.add_argument("--peers", action="store_true", help="also dcmtk storescp and Orthanc")
    ap.add_argument("--baseline", type=Path, help="another checkout of the code, run as 'baseline'")
    add_variant_arg(ap)
    args = ap.parse_args()
    configs = starters({"default": ""} | parse_variants(args.variant), args.baseline, args.peers)
    results: dict[str, list[float]] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory(prefix="parallel_ingest_") as tmp:
        series = SAMPLE
        if args.inplane:
            resample_series(SAMPLE, Path(tmp) / "resampled", inplane=args.inplane)
            series = Path(tmp) / "resampled"
        sets = [replicate(series, args.copies, Path(tmp) / f"in{i}") for i in range(args.senders)]
        kb = sets[0][0].stat().st_size / 1e3
        for r in range(args.rounds):
            for name in list(configs)[:: 1 if r % 2 == 0 else -1]:
                seconds = burst(Path(tmp) / f"{name}_{r}", configs[name], sets)
                results[name].append(round(seconds, 3))
                emit({"round": r, "variant": name, "senders": args.senders, "kb": round(kb, 1),
                      "seconds": results[name][-1], "load": loadavg()}, None)
    n = sum(len(s) for s in sets)
    for name, secs in results.items():
        print(f"{name}: median {statistics.median(secs):.3f} s ({args.senders} senders, {n} instances of "
              f"{kb:.1f} kB; {secs})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
