"""Ingest throughput: the same MR instances C-STOREd into sci-node, dcmtk storescp and Orthanc.

The committed lumbar series (``tests/data/series/lumbar_sag_T2w``, 38 sagittal slices) is copied ``--copies``
times with new UIDs (default 10 -> 380 instances, ~18 MB). One client, dcmtk ``storescu``
with ``TCP_NODELAY=1``, sends all of them on one association to each server in turn:

* ``storescp``: dcmtk ``storescp -od OUT +xa +uf`` (writes files, no fsync, no index);
* ``sci-node``: ``sci-node serve`` with a long ``stable_seconds`` (no processing during the
  bench; every instance fsync'd and indexed in SQLite before Success);
* ``orthanc``: ``/usr/sbin/Orthanc`` with a minimal config (no plugins, SQLite index).

Each round starts fresh servers (empty storage) and sends to the three in a rotating order,
so machine load affects them alike. Prints one JSON line per send and a summary: median
instances/s and the ratio to storescp's median rate.

Usage (from the repo root)::

    .venv/bin/python bench/ingest.py [--copies 10] [--rounds 3] [--json-out FILE]
        [--inplane N] [--baseline DIR] [--variant NAME=TOML ...]

``--inplane N``: the series resampled to N x N pixels first (56: ~8 kB instances, 290: ~170 kB).
``--baseline DIR``: one more server, ``baseline``, the node from another checkout of the code
(``git archive REV sci_node models pyproject.toml | tar -x -C DIR``), in the same rotation.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from common import (
    SAMPLE,
    emit,
    machine,
    parse_variants,
    replicate,
    resample_series,
    start_node,
    start_orthanc,
    start_storescp,
    stop,
    storescu,
)

SERVERS = ("storescp", "sci-node", "orthanc")


def send_to(server: str, files: list[Path], work: Path, variants: dict[str, str] | None = None,
            baseline: Path | None = None) -> float:
    """Start ``server`` fresh in ``work``, send ``files``, stop it; the send's wall time (s).

    ``variants``: extra sci-node servers by name, each with the TOML lines it adds to the node's config.
    ``baseline``: the checkout the server named ``baseline`` runs.
    """
    if server == "baseline":
        proc, port = start_node(work / "node", stable=3600, processor="derived-sc", code=baseline)
        called = "SCINODE"
    elif server in (variants or {}):
        proc, port = start_node(work / "node", stable=3600, processor="derived-sc", extra_toml=(variants or {})[server])
        called = "SCINODE"
    elif server == "storescp":
        proc, port = start_storescp(work / "out")
        called = "DEST"
    elif server == "sci-node":
        proc, port = start_node(work / "node", stable=3600, processor="derived-sc")
        called = "SCINODE"
    else:
        proc, port, _ = start_orthanc(work / "orthanc")
        called = "ORTHANC"
    try:
        return storescu(port, files, called)
    finally:
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, default=SAMPLE)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--inplane", type=int, help="resample the series to N x N pixels first")
    ap.add_argument("--baseline", type=Path, help="another checkout of the code, run as the server 'baseline'")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=TOML",
                    help="another sci-node server, its config lines added (e.g. "
                         "'poll=[limits]\\nreactor_poll_seconds = 0.0001'; \\n is a line break)")
    args = ap.parse_args()
    variants = parse_variants(args.variant)
    servers = SERVERS + tuple(variants) + (("baseline",) if args.baseline else ())
    emit({"bench": "machine", **machine()}, args.json_out)
    tmp = Path(tempfile.mkdtemp(prefix="scinode-ingest-"))
    try:
        series = args.series
        if args.inplane:
            resample_series(args.series, tmp / "resampled", inplane=args.inplane)
            series = tmp / "resampled"
        files = replicate(series, args.copies, tmp / "files")
        mb = sum(f.stat().st_size for f in files) / 1e6
        times: dict[str, list[float]] = {s: [] for s in servers}
        for r in range(args.rounds):
            k = r % len(servers)
            order = servers[k:] + servers[:k]
            for server in order:
                work = tmp / f"{server}-{r}"
                dt = send_to(server, files, work, variants, args.baseline)
                times[server].append(dt)
                emit({"bench": "ingest", "server": server, "round": r, "instances": len(files),
                      "mb": round(mb, 1), "seconds": round(dt, 3), "inst_per_s": round(len(files) / dt, 1)},
                     args.json_out)
                shutil.rmtree(work, ignore_errors=True)
        ref = len(files) / statistics.median(times["storescp"])
        for server in servers:
            med = statistics.median(times[server])
            rate = len(files) / med
            emit({"bench": "ingest-summary", "server": server, "instances": len(files), "mb": round(mb, 1),
                  "median_s": round(med, 3), "inst_per_s": round(rate, 1), "mb_per_s": round(mb / med, 2),
                  "ratio_to_storescp": round(rate / ref, 3), "rounds": [round(t, 3) for t in times[server]]},
                 args.json_out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
