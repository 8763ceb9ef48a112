"""The whole node as a subprocess: dcmtk storescu as the scanner, dcmtk storescp as the destination.

A series goes in, its result comes out at the destination exactly once; ``kill -9`` after
the instances were acknowledged loses nothing and still delivers exactly once.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import pydicom

from conftest import NodeProc, StoreSCP, echoscu, make_mr_series, storescu, wait_for

PLUMBING = 'processor = "derived-sc"\n'


def _jobs(node: NodeProc) -> list[dict]:
    res = node.cli("jobs", "list", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _spooled(node: NodeProc) -> int:
    return sum(1 for _ in (node.data_dir / "spool").rglob("*.dcm"))


def test_series_in_result_out_exactly_once(node_factory: Callable[..., NodeProc],
                                           storescp_factory: Callable[..., StoreSCP], tmp_path: Path) -> None:
    dest = storescp_factory()
    node = node_factory(PLUMBING, "--ae-title", "SCINODE", "--allow-ae", "SCANNER", "--stable-seconds", "1.5",
                        "--destination", f"DEST@127.0.0.1:{dest.port}").start()
    series = make_mr_series(tmp_path / "series", n=10)
    res = storescu(node.port, series)
    assert res.returncode == 0, res.stdout + res.stderr
    t_acked = time.monotonic()
    wait_for(lambda: len(dest.files()) >= 1, 60, what="the result at the destination")
    latency = time.monotonic() - t_acked
    time.sleep(2.0)  # anything sent twice would arrive by now
    (result,) = dest.files()
    ds = pydicom.dcmread(result)
    assert ds.StudyInstanceUID == pydicom.dcmread(series[0]).StudyInstanceUID
    (job,) = _jobs(node)
    assert job["state"] == "done" and job["delivery"] == "delivered" and job["n_instances"] == 10
    assert latency < 1.5 + 20
    # the node's other faces: an unknown AE is rejected, status reads the index
    assert "Calling AE Title Not Recognized" in echoscu(node.port, calling="NOBODY").stdout + \
        echoscu(node.port, calling="NOBODY").stderr
    status = node.cli("status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["counts"]["outbox"] == {"sent": 1}
    assert node.stop() == 0  # SIGTERM: clean stop


def test_resent_series_reruns_and_supersedes(node_factory: Callable[..., NodeProc],
                                             storescp_factory: Callable[..., StoreSCP], tmp_path: Path) -> None:
    dest = storescp_factory()
    node = node_factory(PLUMBING, "--allow-ae", "SCANNER", "--stable-seconds", "1",
                        "--destination", f"DEST@127.0.0.1:{dest.port}").start()
    series = make_mr_series(tmp_path / "series", n=4)
    assert storescu(node.port, series).returncode == 0
    wait_for(lambda: len(dest.files()) == 1, 60, what="first result")
    assert storescu(node.port, series).returncode == 0  # the same series again: a re-run
    wait_for(lambda: len(dest.files()) == 2, 60, what="second result")
    wait_for(lambda: len(_jobs(node)) == 2 and _jobs(node)[0]["delivery"] == "delivered", 20, what="job 2")
    new, old = _jobs(node)
    assert old["superseded_by"] == new["id"] and new["generation"] == 2
    assert _spooled(node) == 4  # duplicates are idempotent in the spool


def test_kill9_after_ack_delivers_once_after_restart(node_factory: Callable[..., NodeProc],
                                                     storescp_factory: Callable[..., StoreSCP],
                                                     tmp_path: Path) -> None:
    dest = storescp_factory()
    node = node_factory(PLUMBING, "--allow-ae", "SCANNER", "--stable-seconds", "3",
                        "--destination", f"DEST@127.0.0.1:{dest.port}").start()
    series = make_mr_series(tmp_path / "series", n=12)
    res = storescu(node.port, series)
    assert res.returncode == 0, res.stdout + res.stderr
    node.kill9()  # acknowledged, not yet complete (stable_seconds not elapsed)
    assert _spooled(node) == 12 and dest.files() == []
    node.start()
    wait_for(lambda: len(dest.files()) >= 1, 60, what="the result after restart")
    time.sleep(2.0)
    assert len(dest.files()) == 1
    (job,) = _jobs(node)
    assert job["state"] == "done" and job["delivery"] == "delivered" and job["n_instances"] == 12
