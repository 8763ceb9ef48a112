"""The node's memory per association: how many simultaneous senders the default limit can afford.

Starts ``sci-node serve`` (derived-sc, a long stable wait so nothing is processed) and, for each
``--counts`` N, in a fresh node:

1. one warm-up association (imports, first C-STORE), then the node's resident memory (``VmRSS``);
2. N associations opened at once and held (idle);
3. each of the N sends one MR instance of ``--size`` x ``--size`` 16-bit pixels at the same
   moment (a barrier), still held: ``VmRSS`` after, and the peak (``VmHWM``) over the run;
4. all released.

Prints one JSON line per N: resident memory at each step (MiB) and per association
(``(step - warm) / N``). pynetdicom keeps one association's data set in memory while it arrives,
so the receiving cost grows with the instance size; the idle cost is its threads and buffers.

Usage (from the repo root)::

    .venv/bin/python bench/association_memory.py [--counts 16 64 128] [--size 512] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from common import emit, machine, start_node, stop
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE


def mib(pid: int, field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def instances(n: int, size: int) -> list[pydicom.Dataset]:
    """``n`` MR instances (one series) of ``size`` x ``size`` random 16-bit pixels."""
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, size=(size, size), dtype=np.uint16).tobytes()
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def _client(port: int) -> Any:
    ae = AE("SCANNER")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    return ae.associate("127.0.0.1", port, ae_title="SCINODE")


def measure(n: int, size: int, work: Path) -> dict[str, Any]:
    """One fresh node, ``n`` simultaneous associations; resident memory at each step."""
    proc, port = start_node(work / f"n{n}", stable=3600, processor="derived-sc",
                            extra_toml=f"[limits]\nmax_associations = {n + 1}\nmax_pending_connections = {n + 1}\n")
    data = instances(n + 1, size)
    try:
        warm = _client(port)
        warm.send_c_store(data[-1])
        warm.release()
        time.sleep(2)
        rec: dict[str, Any] = {"associations": n, "instance_mib": round(size * size * 2 / 2**20, 2),
                               "warm_mib": round(mib(proc.pid, "VmRSS"), 1)}
        assocs = [_client(port) for _ in range(n)]
        assert all(a.is_established for a in assocs), "an association was refused"
        time.sleep(2)
        rec["idle_mib"] = round(mib(proc.pid, "VmRSS"), 1)
        barrier = threading.Barrier(n)
        statuses: list[int] = []

        def send(i: int) -> None:
            barrier.wait()
            statuses.append(int(assocs[i].send_c_store(data[i]).Status))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [0] * n, statuses
        rec["after_store_mib"] = round(mib(proc.pid, "VmRSS"), 1)
        rec["peak_mib"] = round(mib(proc.pid, "VmHWM"), 1)
        for a in assocs:
            a.release()
        time.sleep(2)
        rec["released_mib"] = round(mib(proc.pid, "VmRSS"), 1)
        for key in ("idle", "after_store", "peak"):
            rec[f"{key}_per_association_mib"] = round((rec[f"{key}_mib"] - rec["warm_mib"]) / n, 2)
        return rec
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each instance (16-bit)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    emit({"machine": machine()}, args.json_out)
    with tempfile.TemporaryDirectory(prefix="sci-assoc-mem-") as tmp:
        for n in args.counts:
            emit(measure(n, args.size, Path(tmp)), args.json_out)


if __name__ == "__main__":
    main()
