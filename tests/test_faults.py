"""Fault injection on loopback: kill -9 during ingest and during processing, disk full on a real
small tmpfs, the association limit, and 50 associations sending at once.

The rule checked everywhere: every instance the node acknowledged (C-STORE Success, read from
the peer's own output) is on disk, parses and is indexed; every complete series yields exactly
one result at a dcmtk ``storescp`` destination (``+uf``: a duplicate would be an extra file).
Related faults covered elsewhere: destination down then up, and permanent rejections without
retry storm (tests/test_export.py); kill -9 after the last ack (tests/test_node_e2e.py).
"""
from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pydicom
import pytest
import structlog
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

from sci_node.config import load_config
from sci_node.dicom.scp import start_scp
from sci_node.store import Store

from conftest import (
    DCMTK_ENV,
    NodeProc,
    StoreSCP,
    free_port,
    make_mr_series,
    mounted_tmpfs,
    port_open,
    storescu,
    wait_for,
)

PLUMBING = 'processor = "derived-sc"\n'


def acked_files(storescu_output: str) -> list[Path]:
    """Files dcmtk ``storescu -v`` (or ``-d``) says were stored: a Success response followed their request."""
    acked: list[Path] = []
    current: Path | None = None
    responded = False
    for line in storescu_output.splitlines():
        if "Sending file: " in line:
            current, responded = Path(line.split("Sending file: ", 1)[1].strip()), False
        elif "Received Store Response" in line:
            responded = True
            if "(Success)" in line and current is not None:  # -v
                acked.append(current)
                current = None
        elif responded and "DIMSE Status" in line and "0x0000" in line and current is not None:  # -d
            acked.append(current)
            current = None
    return acked


def index_rows(data_dir: Path, sql: str) -> list[tuple]:
    """Rows from a node's index, read-only (safe while the node runs: WAL)."""
    db = data_dir / "index.sqlite3"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
        return con.execute(sql).fetchall()


def spool_sops(data_dir: Path, allow_tmp: bool = False) -> dict[str, Path]:
    """SOP Instance UID -> spooled file, for every spooled file (each must parse).

    ``allow_tmp``: right after a kill -9 a write in progress may have left its temporary file
    (never acknowledged, deleted by the node at its next start); otherwise none may exist.
    """
    out = {}
    for f in (data_dir / "spool").rglob("*"):
        if f.is_file():
            if f.name.endswith(".tmp"):
                assert allow_tmp, f"half-written file left in the spool: {f}"
                continue
            out[str(pydicom.dcmread(f).SOPInstanceUID)] = f
    return out


def test_kill9_during_ingest_loses_no_acknowledged_instance(node_factory: Callable[..., NodeProc],
                                                            storescp_factory: Callable[..., StoreSCP],
                                                            tmp_path: Path) -> None:
    dest = storescp_factory()
    node = node_factory(PLUMBING, "--allow-ae", "SCANNER", "--stable-seconds", "8",
                        "--destination", f"DEST@127.0.0.1:{dest.port}").start()
    series = make_mr_series(tmp_path / "series", n=300)
    sops = {f: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series}
    out = tmp_path / "storescu.out"
    with open(out, "w") as fh:
        scu = subprocess.Popen(["storescu", "-v", "-aet", "SCANNER", "-aec", "SCINODE", "127.0.0.1",
                                str(node.port), *map(str, series)], stdout=fh, stderr=subprocess.STDOUT,
                               env=DCMTK_ENV, text=True)
    try:
        wait_for(lambda: bool(index_rows(node.data_dir, "SELECT COUNT(*) FROM instances")) and
                 index_rows(node.data_dir, "SELECT COUNT(*) FROM instances")[0][0] >= 40, 60, interval=0.005,
                 what="40 instances indexed")
        node.kill9()  # mid-association
        scu.wait(30)
    finally:
        if scu.poll() is None:
            scu.kill()
            scu.wait(10)
    acked = acked_files(out.read_text())
    # (the index may be one ahead of the acks: a row committed whose response the kill cut off)
    assert scu.returncode != 0 and 30 <= len(acked) < len(series), (scu.returncode, len(acked))
    on_disk = spool_sops(node.data_dir, allow_tmp=True)  # every spooled file parses
    lost = [f.name for f in acked if sops[f] not in on_disk]
    assert lost == [], f"acknowledged but not on disk after kill -9: {lost}"

    node.start()  # reconcile + recover; the scanner re-sends what was not acknowledged
    spool_sops(node.data_dir)  # the restart removed any temporary file
    indexed = {r[0] for r in index_rows(node.data_dir, "SELECT sop_uid FROM instances")}
    assert {sops[f] for f in acked} <= indexed
    rest = [f for f in series if f not in set(acked)]
    res = storescu(node.port, rest)
    assert res.returncode == 0 and len(acked_files(res.stdout + res.stderr)) == len(rest), res.stdout[-2000:]
    wait_for(lambda: len(dest.files()) >= 1, 60, what="the series' result")
    time.sleep(2.0)
    assert len(dest.files()) == 1
    (job,) = node.jobs()
    assert job["state"] == "done" and job["delivery"] == "delivered" and job["n_instances"] == 300
    print(f"kill -9 after {len(acked)} acknowledged instances: {len(acked)} on disk, 0 lost; "
          f"{len(rest)} re-sent; 1 result delivered")


def test_kill9_during_processing_delivers_exactly_once(node_factory: Callable[..., NodeProc],
                                                       storescp_factory: Callable[..., StoreSCP],
                                                       tmp_path: Path) -> None:
    dest = storescp_factory()
    node = node_factory(PLUMBING, "--allow-ae", "SCANNER", "--stable-seconds", "1",
                        "--destination", f"DEST@127.0.0.1:{dest.port}").start()
    series = make_mr_series(tmp_path / "series", n=200)
    res = storescu(node.port, series)
    assert len(acked_files(res.stdout + res.stderr)) == 200, res.stdout[-2000:]
    wait_for(lambda: [r[0] for r in index_rows(node.data_dir, "SELECT state FROM jobs")] == ["running"], 60,
             interval=0.005, what="the job running")
    node.kill9()
    assert dest.files() == []
    assert len(spool_sops(node.data_dir)) == 200
    node.start()
    wait_for(lambda: bool(node.jobs()) and node.jobs()[0]["delivery"] == "delivered", 60, what="delivery")
    time.sleep(2.0)
    (job,) = node.jobs()
    assert job["state"] == "done" and job["attempts"] == 2 and job["n_instances"] == 200
    assert len(dest.files()) == 1
    assert '"node.recovered_jobs"' in node.log.read_text()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs (needs root, as in CI containers); unmounted at teardown."""
    with mounted_tmpfs(tmp_path / "tmpfs", "4m") as mnt:
        yield mnt


def _big_series(out: Path, n: int) -> list[Path]:
    """``n`` 256x256 16-bit slices (128 KiB of pixels each)."""
    files = make_mr_series(out, n=n)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = 256
        ds.PixelData = np.random.default_rng(0).integers(0, 4000, (256, 256), dtype=np.uint16).tobytes()
        ds.save_as(f)
    return files


def test_disk_full_refuses_cleanly_and_leaves_no_partial_files(tmpfs: Path, tmp_path: Path) -> None:
    filler = tmpfs / "filler"  # space an admin can free later
    filler.write_bytes(b"\0" * 1024 * 1024)
    cfg = load_config(None, {"port": free_port(), "data_dir": str(tmpfs / "data"), "allowed_aes": ["SCANNER"],
                             "limits": {"min_free_disk_mb": 1}})
    store = Store(cfg.data_dir)
    server = start_scp(cfg, store)
    try:
        files = _big_series(tmp_path / "big", n=30)  # ~3.9 MiB: more than the file system holds
        sops = {f: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        res = storescu(cfg.port, files, debug=True, extra=["-nh"])  # -nh: go on after a failed store
        out = res.stdout + res.stderr
        acked = [f for f in files if f in set(acked_files(out))]
        refused = out.lower().count("0xa700")
        assert 5 <= len(acked) < 30 and refused >= 1 and len(acked) + refused == 30, out[-3000:]
        # the next association is refused at once, with the reason, while free space < the watermark
        again = storescu(cfg.port, files[:1])
        assert again.returncode != 0
        assert "Association Rejected" in again.stdout + again.stderr
        assert "Local Limit Exceeded" in again.stdout + again.stderr
        # nothing partial: every spooled file parses; every acknowledged one is there and indexed
        on_disk = spool_sops(cfg.data_dir)
        assert {sops[f] for f in acked} <= set(on_disk)
        indexed = {r[0] for r in store._query("SELECT sop_uid FROM instances")}
        assert indexed == {sops[f] for f in acked}
        # an admin frees space: the node accepts again, no restart needed
        filler.unlink()
        wait_for(lambda: store.free_disk_mb() >= 1, 5, what="free space")
        res = storescu(cfg.port, [f for f in files if f not in set(acked)][:2])
        assert res.returncode == 0 and len(acked_files(res.stdout + res.stderr)) == 2, res.stdout[-2000:]
        print(f"disk full: {len(acked)} stored, {refused} refused with 0xA700, next association rejected "
              f"(local limit exceeded), 0 partial files")
    finally:
        server.shutdown()
        store.close()


def test_association_limit_refuses_one_more_with_reason_and_pdu_limit(tmp_path: Path) -> None:
    cfg = load_config(None, {"port": free_port(), "data_dir": str(tmp_path / "data"),
                             "limits": {"max_associations": 2, "max_pdu_bytes": 16384}})
    store = Store(cfg.data_dir)
    server = start_scp(cfg, store)
    ae = AE("SCANNER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    held = []
    try:
        held = [ae.associate("127.0.0.1", cfg.port, ae_title="SCINODE") for _ in range(2)]
        assert all(a.is_established for a in held)
        assert held[0].acceptor.maximum_length == 16384  # the SCP's max PDU, as advertised in the A-ASSOCIATE-AC
        with structlog.testing.capture_logs() as events:  # the refusal is logged with the slots in use
            extra = ae.associate("127.0.0.1", cfg.port, ae_title="SCINODE")
            wait_for(lambda: any(e["event"] == "association.rejected" for e in events), 5, what="the log line")
        (line,) = [e for e in events if e["event"] == "association.rejected"]
        assert line["reason"] == "local limit exceeded" and line["max_associations"] == 2
        assert line["calling_aet"] == "SCANNER" and line["peer"] == "127.0.0.1", line  # who was refused
        assert line["slots_in_use"] == 3, line  # the two held and the one refused
        assert extra.is_rejected
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02), rj  # transient, local limit exceeded
        assert rj.reason_str == "Local limit exceeded"
        # a data set much larger than the PDU is still received whole (fragmented into PDUs)
        (big,) = _big_series(tmp_path / "big", n=1)
        assert held[0].send_c_store(big).Status == 0x0000
        held.pop().release()
        wait_for(lambda: len(server.active_associations) < 2, 10, what="the release")
        again = ae.associate("127.0.0.1", cfg.port, ae_title="SCINODE")
        assert again.is_established and again.send_c_echo().Status == 0
        again.release()
        assert store.counts()["instances"]["total"] == 1
    finally:
        for a in held:
            a.release()
        server.shutdown()
        store.close()


def test_fifty_concurrent_associations_all_stored(node_factory: Callable[..., NodeProc], tmp_path: Path) -> None:
    n_assoc, per_assoc = 50, 2
    node = node_factory(PLUMBING + "[limits]\nmax_associations = 60\n", "--allow-ae", "SCANNER",
                        "--stable-seconds", "30").start()
    batches = [make_mr_series(tmp_path / f"s{i}", n=per_assoc) for i in range(n_assoc)]
    barrier = threading.Barrier(n_assoc, timeout=60)
    statuses: list[list[int]] = [[] for _ in range(n_assoc)]
    concurrent = {"max": 0, "now": 0}
    lock = threading.Lock()

    def client(i: int) -> None:
        ae = AE("SCANNER")
        ae.add_requested_context(MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        assoc = ae.associate("127.0.0.1", node.port, ae_title="SCINODE")
        if not assoc.is_established:
            barrier.abort()
            return
        with lock:
            concurrent["now"] += 1
            concurrent["max"] = max(concurrent["max"], concurrent["now"])
        try:
            barrier.wait()  # all 50 associations are open at this moment; then all send at once
            for f in batches[i]:
                rsp = assoc.send_c_store(f)
                statuses[i].append(int(rsp.Status) if "Status" in rsp else -1)
        finally:
            assoc.release()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_assoc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert concurrent["max"] == n_assoc
    assert statuses == [[0] * per_assoc] * n_assoc
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for b in batches for f in b}
    assert set(spool_sops(node.data_dir)) == expected
    assert {r[0] for r in index_rows(node.data_dir, "SELECT sop_uid FROM instances")} == expected


def test_destination_refusing_the_sop_class_fails_once_no_retry_storm(node_factory: Callable[..., NodeProc],
                                                                      tmp_path: Path) -> None:
    """A dcmtk storescp that accepts MR only (not the Secondary Capture result): the job fails with
    the reason after one association; the destination's own log counts the attempts."""
    cfg = tmp_path / "mr-only.cfg"
    cfg.write_text("[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = 1.2.840.10008.1.2.1\n"
                   "TransferSyntax2 = 1.2.840.10008.1.2\n[[PresentationContexts]]\n[MROnly]\n"
                   "PresentationContext1 = 1.2.840.10008.5.1.4.1.1.4\\Uncompressed\n"
                   "PresentationContext2 = 1.2.840.10008.1.1\\Uncompressed\n"
                   "[[Profiles]]\n[mronly]\nPresentationContexts = MROnly\n")
    port, out, log = free_port(), tmp_path / "dest-out", tmp_path / "dest.log"
    out.mkdir()
    with open(log, "ab") as fh:
        dest = subprocess.Popen(["storescp", "-v", "-aet", "DEST", "-od", str(out), "+uf", "-xf", str(cfg), "mronly",
                                 str(port)], stdout=fh, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    try:
        wait_for(lambda: port_open(port), 10, what="storescp")
        node = node_factory(PLUMBING + "[export]\ninitial_backoff_seconds = 0.2\nmax_backoff_seconds = 1\n",
                            "--allow-ae", "SCANNER", "--stable-seconds", "1",
                            "--destination", f"DEST@127.0.0.1:{port}").start()
        assert storescu(node.port, make_mr_series(tmp_path / "s", n=3)).returncode == 0
        wait_for(lambda: bool(node.jobs()) and node.jobs()[0]["state"] == "failed", 40, what="job failed")
        time.sleep(4.0)  # many backoff periods (0.2 s doubling to 1 s): a retry storm would show here
        (job,) = node.jobs()
        assert job["delivery"] == "failed" and "no presentation context" in job["reason"], job
        # (the readiness probe, a bare TCP connect, shows as one "Association Received" without context)
        attempts = log.read_text(errors="replace").count("Association Acknowledged")
        assert attempts == 1, f"{attempts} associations at the destination"
        assert list(out.iterdir()) == []
        shown = node.job(job["id"])
        assert [d["attempts"] for d in shown["deliveries"]] == [1]
    finally:
        dest.kill()
        dest.wait(10)
