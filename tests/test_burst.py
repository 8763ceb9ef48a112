"""Bursts of senders at the node with its default limits (real node, dcmtk storescu/echoscu as scanners).

Twenty scanners mid-transfer and twenty more storescu senders at the same moment are all accepted
(the default association limit was 16; it is 64 since bench/association_memory.py measured what an
association costs). At the limit, one more is refused transiently, and the log line names the AE.
"""
from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Callable

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import MRImageStorage, Verification

from sci_node.config import Limits

from conftest import DCMTK_ENV, NodeProc, echoscu, make_mr_series, wait_for

PLUMBING = 'processor = "derived-sc"\n'


def _hold(port: int, n: int) -> list[Association]:
    """``n`` associations opened at once (threads at a barrier) and held open."""
    held: list[Association] = []
    lock, barrier = threading.Lock(), threading.Barrier(n, timeout=60)

    def one() -> None:
        ae = AE("SCANNER")
        ae.add_requested_context(MRImageStorage)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        barrier.wait()
        assoc = ae.associate("127.0.0.1", port, ae_title="SCINODE")
        with lock:
            held.append(assoc)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return held


def test_burst_is_accepted_and_the_refused_ae_is_named(node_factory: Callable[..., NodeProc], tmp_path: Path) -> None:
    node = node_factory(PLUMBING, "--stable-seconds", "60").start()  # default [limits]
    held = _hold(node.port, 20)  # twenty scanners in the middle of their transfers
    try:
        assert sum(a.is_established for a in held) == 20
        series = [make_mr_series(tmp_path / f"s{i}", n=2) for i in range(20)]
        procs = [subprocess.Popen(["storescu", "-aet", f"SCANNER{i}", "-aec", "SCINODE", "127.0.0.1", str(node.port),
                                   *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=DCMTK_ENV) for i, files in enumerate(series)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * 20, [o for o in outs if "Rejected" in o][:2]
        # fill the limit, then one more: refused transiently, and the log says which AE it was
        held += _hold(node.port, Limits().max_associations - 20)
        assert sum(a.is_established for a in held) == Limits().max_associations
        late = echoscu(node.port, calling="LATECOMER")
        assert late.returncode != 0 and "Local Limit Exceeded" in late.stdout + late.stderr
        wait_for(lambda: "LATECOMER" in node.log.read_text(), 10, what="the refusal's log line")
        (line,) = [json.loads(x) for x in node.log.read_text().splitlines()
                   if '"association.rejected"' in x and "LATECOMER" in x]
        assert line["calling_aet"] == "LATECOMER" and line["peer"] == "127.0.0.1"
        assert line["reason"] == "local limit exceeded" and line["max_associations"] == Limits().max_associations
    finally:
        for a in held:
            if a.is_established:
                a.release()
