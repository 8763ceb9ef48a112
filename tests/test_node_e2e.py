"""The whole node as a subprocess: dcmtk storescu as the scanner, dcmtk storescp as the destination.

A series goes in, its result comes out at the destination exactly once; ``kill -9`` after
the instances were acknowledged loses nothing and still delivers exactly once.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Callable

import pydicom
import pytest

from conftest import NodeProc, StoreSCP, echoscu, make_mr_series, storescu, wait_for

PLUMBING = 'processor = "derived-sc"\n'


def _spooled(node: NodeProc) -> int:
    return sum(1 for _ in (node.data_dir / "spool").rglob("*.dcm"))


def test_series_in_result_out_exactly_once(node_factory: Callable[..., NodeProc],
                                           storescp_factory: Callable[..., StoreSCP], tmp_path: Path) -> None:
    dest = storescp_factory()
    node = node_factory(PLUMBING, "--ae-title", "SCINODE", "--allow-ae", "SCANNER", "--stable-seconds", "1.5",
                        "--destination", f"DEST@127.0.0.1:{dest.port}").start()
    (corrupt,) = make_mr_series(tmp_path / "corrupt", n=1)
    ds = pydicom.dcmread(corrupt)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(corrupt)
    res = storescu(node.port, [corrupt], debug=True)
    assert "0xc210" in (res.stdout + res.stderr).lower()  # and the node keeps serving:
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
    (job,) = node.jobs()
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
    node = node_factory(PLUMBING, "--stable-seconds", "1",  # no --allow-ae: any calling AE, with a warning
                        "--destination", f"DEST@127.0.0.1:{dest.port}").start()
    series = make_mr_series(tmp_path / "series", n=4)
    assert storescu(node.port, series).returncode == 0
    wait_for(lambda: len(dest.files()) == 1, 60, what="first result")
    assert storescu(node.port, series).returncode == 0  # the same series again: a re-run
    wait_for(lambda: len(dest.files()) == 2, 60, what="second result")
    wait_for(lambda: len(node.jobs()) == 2 and node.jobs()[0]["delivery"] == "delivered", 20, what="job 2")
    new, old = node.jobs()
    assert old["superseded_by"] == new["id"] and new["generation"] == 2
    assert _spooled(node) == 4  # duplicates are idempotent in the spool
    events = [json.loads(line) for line in node.log.read_text().splitlines() if line.startswith("{")]
    (warning,) = [e for e in events if e["event"] == "node.accepts_any_ae"]
    assert warning["level"] == "warning"
    assert any(e["event"] == "node.config" and e["allowed_aes"] == [] for e in events)


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
    private = [p for p in node.data_dir.rglob("*") if p.stat().st_mode & 0o077]
    assert private == [], f"group/other-accessible: {private}"
    node.start()
    wait_for(lambda: len(dest.files()) >= 1, 60, what="the result after restart")
    time.sleep(2.0)
    assert len(dest.files()) == 1
    (job,) = node.jobs()
    assert job["state"] == "done" and job["delivery"] == "delivered" and job["n_instances"] == 12


SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "series"


@pytest.mark.slow
def test_readme_sequence_with_the_default_processor(node_factory: Callable[..., NodeProc],
                                                     storescp_factory: Callable[..., StoreSCP]) -> None:
    """The issue's exact sequence (free ports instead of 11112/11113): a DICOM-SEG lands at DEST."""
    dest = storescp_factory()
    node = node_factory("", "--ae-title", "SCINODE", "--destination", "DEST@127.0.0.1", str(dest.port),
                        "--stable-seconds", "2", "--allow-ae", "SCANNER").start(timeout=120)
    files = sorted(SAMPLE.glob("*.dcm"))
    res = storescu(node.port, files)
    assert res.returncode == 0, res.stdout + res.stderr
    t_acked = time.monotonic()

    def seg_arrived() -> bool:
        return any(pydicom.dcmread(f, stop_before_pixels=True).Modality == "SEG" for f in dest.files())

    wait_for(seg_arrived, 300, interval=0.2, what="the DICOM-SEG at the destination")
    latency = time.monotonic() - t_acked
    wait_for(lambda: node.jobs()[0]["delivery"] == "delivered", 60, what="all results delivered")
    time.sleep(1.0)
    modalities = sorted(pydicom.dcmread(f, stop_before_pixels=True).Modality for f in dest.files())
    (job,) = node.jobs()
    assert job["state"] == "done", job
    assert modalities.count("SEG") == 1 and len(modalities) == len(job["result"]["outputs"]), modalities
    seg = next(ds for ds in map(pydicom.dcmread, dest.files()) if ds.Modality == "SEG")
    assert seg.StudyInstanceUID == pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    print(f"last C-STORE -> SEG at destination: {latency:.2f} s (stable_seconds 2)")


def _states(node: NodeProc) -> list[str]:
    """Job states read straight from the index (read-only, fast enough to catch 'running')."""
    db = node.data_dir / "index.sqlite3"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
        return [r[0] for r in con.execute("SELECT state FROM jobs ORDER BY id")]


@pytest.mark.slow
def test_kill9_during_processing_delivers_once(node_factory: Callable[..., NodeProc],
                                               storescp_factory: Callable[..., StoreSCP]) -> None:
    dest = storescp_factory()
    node = node_factory("", "--allow-ae", "SCANNER", "--stable-seconds", "1",
                        "--destination", f"DEST@127.0.0.1:{dest.port}").start(timeout=120)
    assert storescu(node.port, sorted(SAMPLE.glob("*.dcm"))).returncode == 0
    wait_for(lambda: _states(node) == ["running"], 60, interval=0.02, what="the job running")
    node.kill9()
    assert dest.files() == []
    node.start(timeout=120)
    wait_for(lambda: node.jobs() and node.jobs()[0]["delivery"] == "delivered", 300, interval=0.5,
             what="delivery after restart")
    time.sleep(1.0)
    (job,) = node.jobs()
    assert job["state"] == "done" and job["attempts"] == 2
    modalities = sorted(pydicom.dcmread(f, stop_before_pixels=True).Modality for f in dest.files())
    assert modalities.count("SEG") == 1 and len(modalities) == len(job["result"]["outputs"])


def test_missing_models_fail_the_job_with_the_reason(node_factory: Callable[..., NodeProc],
                                                    tmp_path: Path) -> None:
    (tmp_path / "no-models").mkdir()
    node = node_factory("", "--models-dir", str(tmp_path / "no-models"), "--stable-seconds", "1").start()
    assert storescu(node.port, make_mr_series(tmp_path / "s", n=3)).returncode == 0
    wait_for(lambda: len(node.jobs()) == 1 and node.jobs()[0]["state"] == "failed", 30, what="failed job")
    (job,) = node.jobs()
    assert job["reason"].startswith("ModelError:") and job["delivery"] == "none"
    assert echoscu(node.port).returncode == 0  # the node itself keeps running
