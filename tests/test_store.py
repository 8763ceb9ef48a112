"""Spool + index: durable writes, idempotent duplicates, re-opened series, job and outbox states."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sci_node.errors import JobNotFoundError, StorageError
from sci_node.store import InstanceKey, Store


def _key(sop: str, series: str = "1.2.3.2", study: str = "1.2.3.1") -> InstanceKey:
    return InstanceKey(study, series, sop, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")


def _complete(store: Store, series: str = "1.2.3.2") -> int:
    (row,) = [s for s in store.quiet_series(1e12) if s.series_uid == series]
    job = store.complete_series(row, {"n_slices": row.n_instances})
    assert job is not None
    return job


def test_spool_is_durable_private_and_idempotent(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    assert store.spool_instance(_key("1.2.3.3.1"), b"\0" * 128 + b"DICM first", "SCANNER") is True
    assert store.spool_instance(_key("1.2.3.3.1"), [b"\0" * 128, b"DICM again"], "SCANNER") is False
    path = store.instance_path(_key("1.2.3.3.1"))
    assert path == store.spool_dir / "1.2.3.1" / "1.2.3.2" / "1.2.3.3.1.dcm"
    assert path.read_bytes().endswith(b"DICM again")
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o700
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert store.counts()["instances"] == {"total": 1}
    assert store.series_files("1.2.3.2") == [path]


def test_reconcile_reindexes_lost_rows_and_drops_temp_files(tmp_path: Path) -> None:
    import pydicom

    from conftest import make_mr_series

    (f,) = make_mr_series(tmp_path / "s", n=1)
    ds = pydicom.dcmread(f)
    store = Store(tmp_path / "d")
    key = InstanceKey(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID,
                      ds.file_meta.TransferSyntaxUID)
    path = store.instance_path(key)  # as if the file was fsync'd but its row lost with the power
    path.parent.mkdir(parents=True)
    path.write_bytes(f.read_bytes())
    (path.parent / ".x.dcm.123.tmp").write_bytes(b"half")
    assert store.reconcile() == (1, 1)
    assert store.series_files(ds.SeriesInstanceUID) == [path]
    assert store.reconcile() == (0, 0)


def test_uid_never_escapes_the_spool(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    path = store.instance_path(_key("../../etc/passwd", series="..", study="/abs"))
    assert store.spool_dir in path.parents and ".." not in path.parts


def test_write_failure_records_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    (store.spool_dir / "1.2.3.1").write_bytes(b"a file where a directory must go")
    with pytest.raises(StorageError, match="cannot write"):
        store.spool_instance(_key("1.2.3.3.1"), b"x")
    assert store.counts()["instances"] == {"total": 0} and store.counts()["series"] == {}


def test_late_instance_reopens_and_supersedes(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    store.spool_instance(_key("1.1"), b"a")
    job1 = _complete(store)
    store.finish_job(store.claim_job().id, "done", None, {"status": "done"}, [Path("/r/seg.dcm")], ["D@h:1"])
    store.spool_instance(_key("1.2"), b"b")  # late: generation 2
    (row,) = store.quiet_series(1e12)
    assert row.generation == 2 and row.n_instances == 2
    job2 = _complete(store)
    old, new = store.job(job1), store.job(job2)
    assert old.superseded_by == job2 and old.delivery == "none"
    assert [e.state for e in store.outbox_for_job(job1)] == ["cancelled"]
    assert new.state == "pending" and new.n_instances == 2 and new.generation == 2


def test_job_whose_series_reopened_while_running_does_not_deliver(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    store.spool_instance(_key("1.1"), b"a")
    job1 = _complete(store)
    running = store.claim_job()
    store.spool_instance(_key("1.2"), b"b")  # late, while job 1 runs: generation 2, not yet complete
    done = store.finish_job(running.id, "done", None, {"status": "done"}, [Path("/r/seg.dcm")], ["D@h:1"])
    assert done.id == job1 and done.state == "superseded" and done.delivery == "none"
    assert "re-opened while the job ran (generation 1 -> 2)" in (done.reason or "")
    assert store.outbox_for_job(job1) == [] and store.due_outbox() == []
    assert done.result == {"status": "done"}  # what it computed stays on record
    job2 = _complete(store)  # the complete series' job delivers
    store.finish_job(store.claim_job().id, "done", None, {"status": "done"}, [Path("/r/seg2.dcm")], ["D@h:1"])
    assert [e.path for e in store.due_outbox()] == ["/r/seg2.dcm"] and store.job(job2).delivery == "pending"


def test_aborted_association_holds_series_until_grace_and_release_clears(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    store.spool_instance(_key("1.1"), b"a")
    store.association_ended(["1.2.3.2"], aborted=True)
    (row,) = store.quiet_series(1e12)  # no grace asked: quiet, carrying the abort time
    assert row.aborted_at is not None
    assert store.quiet_series(1e12, aborted_before=row.aborted_at - 1) == []  # grace not over
    assert [r.series_uid for r in store.quiet_series(1e12, aborted_before=row.aborted_at)] == ["1.2.3.2"]
    store.spool_instance(_key("1.2"), b"b")
    store.association_ended(["1.2.3.2"], aborted=False)  # the resend was released normally
    (row,) = store.quiet_series(1e12, aborted_before=0.0)
    assert row.aborted_at is None
    store.association_ended(["1.2.3.2"], aborted=True)
    (row,) = store.quiet_series(1e12)
    assert store.complete_series(row, {}) is not None
    store.spool_instance(_key("1.3"), b"c")  # generation 2 starts without the old abort mark
    (row,) = store.quiet_series(1e12, aborted_before=0.0)
    assert row.generation == 2 and row.aborted_at is None


def test_reopened_series_cancels_results_not_yet_sent(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    store.spool_instance(_key("1.1"), b"a")
    job1 = _complete(store)
    store.finish_job(store.claim_job().id, "done", None, {"status": "done"}, [Path("/r/seg.dcm")], ["D@h:1", "E@h:2"])
    (sent, waiting) = store.outbox_for_job(job1)
    store.mark_sent(sent.id)  # delivered to D before the late instance; E still waits
    store.spool_instance(_key("1.2"), b"b")  # late, after job 1 finished: generation 2 receiving
    assert [e.state for e in store.outbox_for_job(job1)] == ["sent", "cancelled"]
    assert store.due_outbox() == [] and store.job(job1).delivery == "delivered"


def test_pending_job_superseded_and_stale_completion_ignored(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    store.spool_instance(_key("1.1"), b"a")
    (stale,) = store.quiet_series(1e12)
    job1 = _complete(store)
    store.spool_instance(_key("1.1"), b"a")  # the whole series re-sent: a re-run
    assert store.complete_series(stale, {}) is None  # read before the new instance: ignored
    job2 = _complete(store)
    assert store.job(job1).state == "superseded" and store.job(job2).state == "pending"


def test_claim_is_atomic_and_recover_requeues(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    for i in range(6):
        store.spool_instance(_key(f"1.{i}", series=f"2.{i}"), b"x")
        _complete(store, f"2.{i}")
    claimed: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        while (job := store.claim_job()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(claimed) == list(range(1, 7))
    assert store.recover() == 6
    assert {j.state for j in store.jobs()} == {"pending"}


def test_delivery_failure_fails_job_and_retry_resends(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    store.spool_instance(_key("1.1"), b"a")
    _complete(store)
    job = store.finish_job(store.claim_job().id, "done", None, {"status": "done"},
                           [Path("/r/seg.dcm"), Path("/r/sr.dcm")], ["A@h:1"])
    assert job.delivery == "pending"
    first, second = store.outbox_for_job(job.id)
    store.mark_sent(first.id)
    store.mark_failed(second.id, "C-STORE status 0x0122 (SOP_CLASS_NOT_SUPPORTED)")
    failed = store.job(job.id)
    assert failed.state == "failed" and failed.delivery == "failed"
    assert "A@h:1" in (failed.reason or "") and "0x0122" in (failed.reason or "")
    assert store.retry_job(job.id) == "resend"
    again = store.job(job.id)
    assert again.state == "done" and again.delivery == "pending"
    assert [e.state for e in store.outbox_for_job(job.id)] == ["sent", "pending"]
    with pytest.raises(JobNotFoundError):
        store.retry_job(999)


def test_retry_of_a_failed_run_requeues_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    store.spool_instance(_key("1.1"), b"a")
    _complete(store)
    job = store.finish_job(store.claim_job().id, "failed", "ModelError: no active version of cord", {})
    assert job.state == "failed" and job.delivery == "none"
    assert store.retry_job(job.id) == "rerun"
    again = store.claim_job()
    assert again is not None and again.id == job.id and again.attempts == 2 and again.reason is None


def test_follow_up_outputs_queue_after_the_job_own_and_never_for_a_series_that_moved_on(tmp_path: Path) -> None:
    store = Store(tmp_path / "d")
    store.spool_instance(_key("1.1"), b"a")
    job1 = _complete(store)
    store.finish_job(store.claim_job().id, "done", None, {"status": "done", "summary": {"lesion_count": 2}},
                     [Path("/r/seg.dcm"), Path("/r/sr.dcm")], ["D@h:1"])
    store.mark_sent(store.due_outbox()[0].id)
    store.mark_sent(store.due_outbox()[0].id)
    assert store.job(job1).delivery == "delivered"
    fu = {"compared": True, "outputs": ["/r/new-or-enlarging-seg.dcm", "/r/comparison-sr.dcm"]}
    done = store.add_job_outputs(job1, {"followup": fu}, [Path(p) for p in fu["outputs"]], ["D@h:1"])
    assert done.state == "done" and done.delivery == "pending"  # the comparison's entries are still to send
    assert done.result == {"status": "done", "summary": {"lesion_count": 2, "followup": fu}}
    assert [e.path for e in store.outbox_for_job(job1)] == ["/r/seg.dcm", "/r/sr.dcm", *fu["outputs"]]
    assert [e.path for e in store.due_outbox()] == fu["outputs"]
    store.spool_instance(_key("1.2"), b"b")  # late instance: the series moved on, job 1's results are stale
    late = store.add_job_outputs(job1, {"followup": {"compared": False}}, [Path("/r/x.dcm")], ["D@h:1"])
    assert "/r/x.dcm" not in [e.path for e in store.outbox_for_job(job1)]
    assert (late.result or {})["summary"]["followup"] == {"compared": False}


def test_a_comparison_left_due_by_an_earlier_run_is_resumed_and_given_up_after_three_stops(tmp_path: Path) -> None:
    """``resume_interrupted``: a "comparison due" marker from before this process's start is resumed (no prior in
    the history here: the follow-up ends with none and the marker is cleared); one set since the start is left to
    the comparison still running; after three stops the follow-up is recorded as given up, nothing queued."""
    import time

    from sci_node.config import load_config
    from sci_node.engine.followup import DUE, resume_interrupted

    cfg = load_config(None, {"data_dir": str(tmp_path / "d"), "followup": {"enabled": True}})
    store = Store(tmp_path / "d")
    started = time.time()
    jobs = []
    for i, due in enumerate([{"since": started - 60, "attempts": 0}, {"since": started + 1, "attempts": 0},
                             {"since": started - 60, "attempts": 3}]):
        store.spool_instance(_key(f"1.{i}", series=f"1.2.3.{10 + i}"), b"\0" * 128 + b"DICM")
        jobs.append(_complete(store, series=f"1.2.3.{10 + i}"))
        seg = tmp_path / f"r{i}" / "seg.dcm"
        store.finish_job(store.claim_job().id, "done", None, {"status": "done", "outputs": [str(seg)],
                                                              "summary": {DUE: due}}, [seg], ["D@h:1"])
    assert resume_interrupted(cfg, store, ["D@h:1"], None, started) == 2
    resumed, running, stopped = (store.job(j).result["summary"] for j in jobs)
    assert resumed[DUE] is None and "followup" not in resumed  # compared with nothing: no prior of that person
    assert running[DUE]["since"] == started + 1  # still this process's own comparison: untouched
    assert stopped[DUE] is None and stopped["followup"] == {
        "compared": False, "reason": "gave up: the node stopped during the comparison 3 times"}
    assert [e.path for e in store.outbox_for_job(jobs[2])] == [str(tmp_path / "r2" / "seg.dcm")]
