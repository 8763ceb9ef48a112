"""Parallel senders: N ``storescu`` associations at once into one ``sci-node serve``; wall time of the burst.

Each sender has its own copy of the committed lumbar series (``--copies`` x 38 instances, new UIDs).
Per round every configuration gets a fresh node; configurations run interleaved, the order reversed
every other round. Prints one JSON line per burst and the medians.

Usage (from the repo root)::

    .venv/bin/python bench/parallel_ingest.py [--senders 16] [--rounds 5] [--variant 'NAME=TOML' ...]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import SAMPLE, add_variant_arg, emit, loadavg, parse_variants, replicate, start_node, stop, storescu


def burst(work: Path, toml: str, sets: list[list[Path]]) -> float:
    """Seconds from the first sender's start to the last one's end, into a fresh node."""
    proc, port = start_node(work, stable=3600, processor="derived-sc", extra_toml=toml)
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(sets)) as ex:
            list(ex.map(lambda files: storescu(port, files, "SCINODE"), sets))
        return time.monotonic() - t0
    finally:
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--senders", type=int, default=16)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    add_variant_arg(ap)
    args = ap.parse_args()
    variants = {"default": ""} | parse_variants(args.variant)
    results: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory(prefix="parallel_ingest_") as tmp:
        sets = [replicate(SAMPLE, args.copies, Path(tmp) / f"in{i}") for i in range(args.senders)]
        for r in range(args.rounds):
            for name in list(variants)[:: 1 if r % 2 == 0 else -1]:
                seconds = burst(Path(tmp) / f"{name}_{r}", variants[name], sets)
                results[name].append(round(seconds, 3))
                emit({"round": r, "variant": name, "senders": args.senders, "seconds": results[name][-1],
                      "load": loadavg()}, None)
    n = sum(len(s) for s in sets)
    for name, secs in results.items():
        print(f"{name}: median {statistics.median(secs):.3f} s ({args.senders} senders, {n} instances; {secs})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
