"""The connection gate (sci_node.dicom.gate) against real sockets on 127.0.0.1: probes that never become
associations (bare TCP connects, garbage PDUs, silent peers) hold no association slot, are closed
at the deadline, and every refusal is a JSON log line naming the peer, the reason and the slots."""
from __future__ import annotations

import json
import socket
import struct
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pydicom
import structlog

from sci_node.config import load_config
from sci_node.dicom.gate import Refusal, judge_first_pdu
from sci_node.dicom.scp import start_scp
from sci_node.store import Store

from conftest import NodeProc, StoreSCP, echoscu, free_port, make_mr_series, storescu, wait_for

PLUMBING = 'processor = "derived-sc"\n'


def _associate_rq(length: int, body: bytes) -> bytes:
    return struct.pack(">BBL", 0x01, 0, length) + body


#: what monitoring and stray clients send to a DICOM port
GARBAGE: list[bytes] = [
    b"GET /health HTTP/1.1\r\nHost: pacs\r\n\r\n",  # an HTTP health check
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello on a plain port
    bytes(np.random.default_rng(7).integers(2, 256, 200, dtype=np.uint8)),  # noise (never starts with 0x01)
    struct.pack(">BBLL", 0x05, 0, 4, 0),  # A-RELEASE-RQ before any association
    struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0),  # A-ABORT
    struct.pack(">BBL", 0x04, 0, 6) + b"\x00\x00\x00\x02\x01\x03",  # P-DATA-TF
    _associate_rq(10, bytes(10)),  # A-ASSOCIATE-RQ shorter than its fixed part
    _associate_rq(68, b"\x00\x01\x00\x00" + b"\xff" * 64),  # AE titles that are not text
    _associate_rq(300, b"\x00\x01\x00\x00" + b"SCINODE".ljust(16) + b"SCANNER".ljust(16)),  # cut short
    bytes(64),  # zeros
]


@contextmanager
def _scp(tmp_path: Path, **limits: Any) -> Iterator[tuple[Any, Any]]:
    """An in-process SCP on a free port with these ``[limits]``: ``(cfg, server)``; shut down after."""
    cfg = load_config(None, {"port": free_port(), "data_dir": str(tmp_path / "data"),
                             "limits": {"min_free_disk_mb": 1, **limits}})
    store = Store(cfg.data_dir)
    server = start_scp(cfg, store)
    try:
        yield cfg, server
    finally:
        server.shutdown()
        store.close()


def _json_events(log_path: Path) -> list[dict]:
    """Every line of the node's log, each parsed as JSON (fails on any line that is not)."""
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def test_probes_and_garbage_do_not_lock_a_scanner_out(node_factory: Callable[..., NodeProc],
                                                       storescp_factory: Callable[..., StoreSCP],
                                                       tmp_path: Path) -> None:
    """Issue #16 item 1: 50 bare connects and 10 garbage-PDU connections, all closed; a dcmtk storescu
    association 1 s later is accepted (default limit: 64 associations) and its series is processed."""
    dest = storescp_factory()
    node = node_factory(PLUMBING, "--allow-ae", "SCANNER", "--stable-seconds", "1",
                        "--destination", f"DEST@127.0.0.1:{dest.port}").start()
    bare = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(50)]
    garbage = []
    for payload in GARBAGE:
        s = socket.create_connection(("127.0.0.1", node.port))
        s.sendall(payload)
        garbage.append(s)
    time.sleep(0.3)
    ports = {s.getsockname()[1] for s in bare + garbage}
    for s in bare + garbage:
        s.close()
    time.sleep(1.0)
    series = make_mr_series(tmp_path / "series", n=4)
    res = storescu(node.port, series)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and out.count("Received Store Response (Success)") == 4, out
    assert "Local Limit Exceeded" not in out
    wait_for(lambda: bool(node.jobs()) and node.jobs()[0]["delivery"] == "delivered", 60, what="the result")
    assert node.jobs()[0]["state"] == "done" and len(dest.files()) == 1
    assert node.stop() == 0
    events = _json_events(node.log)  # pynetdicom's and pydicom's records too: the log is JSON lines only
    # (NodeProc.start's port probe is one more bare connect: only our 60 are counted here)
    refused = [e for e in events if e["event"] == "connection.refused" and e["peer_port"] in ports]
    assert sorted(e["peer_port"] for e in refused) == sorted(ports), Counter(e["reason"] for e in refused)
    assert all(e["peer"] == "127.0.0.1" and isinstance(e["peer_port"], int) and e["max_associations"] == 64
               and 0 <= e["slots_in_use"] <= 1 and e["detail"] for e in refused)
    reasons = Counter(e["reason"] for e in refused)
    assert reasons[Refusal.CLOSED] >= 50, reasons  # the bare connects (and the cut-short request)
    assert reasons[Refusal.NOT_ASSOCIATE_RQ] + reasons[Refusal.INVALID_RQ] >= 9, reasons
    assert max(e["refused_total"] for e in refused) >= 60
    accepted = [e for e in events if e["event"] == "association.accepted"]
    assert len(accepted) == 1 and accepted[0]["calling_aet"] == "SCANNER"


def test_silent_connections_hold_no_slot_and_are_closed_at_the_deadline(tmp_path: Path) -> None:
    held: list[socket.socket] = []
    with _scp(tmp_path, max_associations=2, association_request_timeout_seconds=2.0) as (cfg, server):
        try:
            with structlog.testing.capture_logs() as events:
                t0 = time.monotonic()
                held = [socket.create_connection(("127.0.0.1", cfg.port)) for _ in range(10)]
                res = echoscu(cfg.port)  # 10 silent peers, 2 slots: the real association still gets one
                assert res.returncode == 0, res.stdout + res.stderr
                assert len(server.active_associations) <= 1
                for s in held:  # the node hangs up on each silent peer at the deadline
                    s.settimeout(10)
                    assert s.recv(1) == b""
                elapsed = time.monotonic() - t0
                wait_for(lambda: sum(e["event"] == "connection.refused" for e in events) >= 10, 5, what="the log")
            assert 1.5 <= elapsed < 5, elapsed
            refused = [e for e in events if e["event"] == "connection.refused"]
            assert [e["reason"] for e in refused] == [Refusal.TIMEOUT] * 10
            assert all("within 2 s" in e["detail"] and e["max_associations"] == 2 for e in refused)
        finally:
            for s in held:
                s.close()


def test_pending_connection_cap_closes_the_excess_at_once(tmp_path: Path) -> None:
    with _scp(tmp_path, max_pending_connections=3, association_request_timeout_seconds=5.0) as (cfg, server):
        with structlog.testing.capture_logs() as events:
            held = [socket.create_connection(("127.0.0.1", cfg.port)) for _ in range(3)]
            wait_for(lambda: server.gate.pending == 3, 5, what="3 pending connections")
            extra = socket.create_connection(("127.0.0.1", cfg.port))
            extra.settimeout(2)
            assert extra.recv(1) == b""  # closed at once, long before the 5 s deadline
            extra.close()
            for s in held:
                s.close()
            wait_for(lambda: server.gate.pending == 0, 5, what="the held connections to be refused")
            assert echoscu(cfg.port).returncode == 0  # the cap was per moment, not sticky
        refused = Counter(e["reason"] for e in events if e["event"] == "connection.refused")
        assert refused == {Refusal.TOO_MANY_PENDING: 1, Refusal.CLOSED: 3}, refused


def test_refused_sop_classes_named_in_the_association_line(tmp_path: Path) -> None:
    with _scp(tmp_path) as (cfg, _):
        ct = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
        (mr,) = make_mr_series(tmp_path / "mr", n=1)
        ct.save_as(tmp_path / "ct.dcm")
        with structlog.testing.capture_logs() as events:
            res = storescu(cfg.port, [mr, tmp_path / "ct.dcm"], extra=["-R"])  # only the files' SOP classes
            assert "Received Store Response (Success)" in res.stdout + res.stderr
            everything = storescu(cfg.port, [mr])  # storescu's default: ~120 storage SOP classes
            assert everything.returncode == 0
            wait_for(lambda: sum(e["event"] == "association.closed" for e in events) == 2, 10, what="the releases")
        first, second = [e for e in events if e["event"] == "association.accepted"]
        assert first["refused_sop_classes"] == [
            "CT Image Storage (1.2.840.10008.5.1.4.1.1.2): abstract syntax not supported"], first
        assert len(second["refused_sop_classes"]) == 25 and second["refused_sop_classes"][-1].endswith(" more")
        assert all("MR Image Storage" not in x for x in second["refused_sop_classes"])


def test_judge_first_pdu() -> None:
    """The pure part of the gate: what counts as a (complete, decodable) A-ASSOCIATE-RQ."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title, prim.called_ae_title = "SCANNER", "SCINODE"
    prim.presentation_context_definition_list = [build_context("1.2.840.10008.1.1")]
    prim.presentation_context_definition_list[0].context_id = 1
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    prim.user_information = [ml]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(prim)
    good = rq.encode()
    assert judge_first_pdu(good) is True
    assert judge_first_pdu(good[:5]) is False and judge_first_pdu(good[:-1]) is False  # wait for more
    for payload, reason in ((GARBAGE[0], Refusal.NOT_ASSOCIATE_RQ), (GARBAGE[6], Refusal.INVALID_RQ),
                            (GARBAGE[7], Refusal.INVALID_RQ)):
        verdict = judge_first_pdu(payload)
        assert isinstance(verdict, tuple) and verdict[0] is reason, verdict
