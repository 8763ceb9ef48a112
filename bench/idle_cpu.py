"""Idle cost of open associations: CPU of ``sci-node serve`` while N associations stay open doing nothing.

Per round and configuration: a fresh ``sci-node serve``; ``--associations`` pynetdicom associations
each C-STORE one instance of the committed lumbar series, then stay open; after ``--settle``
seconds (longer than the adaptive poll's 0.5 s) the node's CPU time (``/proc/PID/stat``, user +
system) is read over ``--seconds``. Configurations run interleaved, in a rotating order; prints one
JSON line per measurement and the medians (CPU as % of one core).

Usage (from the repo root)::

    .venv/bin/python bench/idle_cpu.py [--rounds 5] [--variant 'NAME=TOML' ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import SAMPLE, add_variant_arg, dicom_files, emit, loadavg, parse_variants, start_node, stop
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association

from sci_node.dicom.dimse import STORAGE_TRANSFER_SYNTAXES


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (s)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_associations(port: int, n: int, instance: Path) -> list[Association]:
    """``n`` associations to the node, each having stored ``instance`` once (Success checked)."""
    ds = dcmread(instance)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(ds.SOPClassUID, list(STORAGE_TRANSFER_SYNTAXES))
    out = []
    for _ in range(n):
        assoc = ae.associate("127.0.0.1", port, ae_title="SCINODE")
        if not assoc.is_established:
            raise RuntimeError("association refused")
        status = assoc.send_c_store(ds)
        if getattr(status, "Status", None) != 0:
            raise RuntimeError(f"C-STORE failed: {status}")
        out.append(assoc)
    return out


def measure(work: Path, toml: str, n: int, settle: float, seconds: float) -> float:
    """% of one core the node used over ``seconds`` with ``n`` idle open associations."""
    proc, port = start_node(work, stable=3600, processor="derived-sc", extra_toml=toml)
    assocs: list[Association] = []
    try:
        assocs = open_associations(port, n, dicom_files(SAMPLE)[0])
        time.sleep(settle)
        t0, c0 = time.monotonic(), cpu_seconds(proc.pid)
        time.sleep(seconds)
        return 100 * (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
    finally:
        for assoc in assocs:
            assoc.release()
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--settle", type=float, default=1.5)
    ap.add_argument("--seconds", type=float, default=5.0)
    add_variant_arg(ap)
    args = ap.parse_args()
    variants = {"default": ""} | parse_variants(args.variant)
    names = list(variants)
    results: dict[str, list[float]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory(prefix="idle_cpu_") as tmp:
        for r in range(args.rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                pct = measure(Path(tmp) / f"{name}_{r}", variants[name], args.associations, args.settle, args.seconds)
                results[name].append(pct)
                emit({"round": r, "variant": name, "cpu_pct": round(pct, 1), "load": loadavg()}, None)
    for name in names:
        print(f"{name}: median {statistics.median(results[name]):.1f} % of a core "
              f"({args.associations} idle associations; {[round(x, 1) for x in results[name]]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
