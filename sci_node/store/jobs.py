"""The job queue in the index: one job per complete series generation, claimed, finished once.

jobs: ``pending`` -> ``running`` -> ``done`` | ``routed-out`` | ``failed``; ``superseded``
when a newer generation of the series replaced the job before it ran, or re-opened the series
while it ran (checked when the outcome is written, see :meth:`JobQueue.finish_job`).
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from sci_node.errors import JobNotFoundError, SciNodeError
from sci_node.store.outbox import _refresh_delivery
from sci_node.store.transactions import IndexBase

TERMINAL_JOB_STATES = ("done", "routed-out", "failed", "superseded")


@dataclass(frozen=True)
class Job:
    """One row of the job queue (``result``/``geometry`` decoded from JSON)."""

    id: int
    series_uid: str
    study_uid: str
    generation: int
    n_instances: int
    state: str
    reason: str | None
    delivery: str
    superseded_by: int | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    geometry: dict[str, Any] | None
    result: dict[str, Any] | None



class JobQueue(IndexBase):
    """The job part of :class:`~sci_node.store.Store`."""

    def recover(self, keep: Collection[int] = ()) -> int:
        """After a crash: jobs left ``running`` go back to ``pending``, except those in ``keep``. Returns how many.

        ``keep`` (the Celery engine, :func:`sci_node.engine.ledger.recover_jobs`): jobs still out at a
        remote worker stay running, their result is still collected.
        """
        kept = sorted({int(j) for j in keep})
        with self._tx() as db:
            return db.execute(f"UPDATE jobs SET state='pending', started_at=NULL WHERE state='running'"
                              f" AND id NOT IN ({','.join('?' * len(kept))})", kept).rowcount

    def release_job(self, job_id: int) -> None:
        """A claimed job that could not be handed on (broker down) goes back to ``pending``."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='pending', started_at=NULL, attempts=MAX(attempts-1, 0)"
                       " WHERE id=? AND state='running'", (job_id,))

    def claim_job(self) -> Job | None:
        """Atomically take the oldest pending job (state -> running), or None."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state='pending' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='running', started_at=?, attempts=attempts+1 WHERE id=?",
                       (now, row["id"]))
        return self.job(row["id"])

    def finish_job(self, job_id: int, state: str, reason: str | None, result: Mapping[str, Any],
                   outputs: Sequence[Path] = (), destinations: Sequence[str] = ()) -> Job:
        """Record a job's outcome and, unless its series moved on meanwhile, queue its outputs.

        One outbox entry per (output, destination), in one transaction with the state change,
        so a crash either re-runs the job or sends its results, never both. In that same
        transaction the job's generation is compared with its series': a series re-opened by a
        late instance while the job ran (or already completed again: ``superseded_by``) makes the
        job ``superseded`` and nothing of it is queued: its results were computed on a series
        that is no longer the one received.
        """
        with self._tx() as db:
            finish_in(db, job_id, state, reason, result, outputs, destinations)
        return self.job(job_id)

    def add_job_outputs(self, job_id: int, summary: Mapping[str, Any], outputs: Sequence[Path] = (),
                        destinations: Sequence[str] = ()) -> Job:
        """After a job finished: merge ``summary`` into its result's summary and queue further outputs.

        The follow-up comparison (:mod:`sci_node.engine.followup`) runs after
        :meth:`finish_job` queued the job's own results, so these entries come after them (the exporter
        sends in entry order). Outputs are queued only while the job is ``done`` and its series has not
        moved on (:meth:`finish_job`'s check); the summary is merged in any case.
        """
        with self._tx() as db:
            row = db.execute("SELECT j.state, j.result, j.superseded_by, j.generation, s.generation AS current"
                             " FROM jobs j LEFT JOIN series s ON s.series_uid = j.series_uid WHERE j.id=?",
                             (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"job {job_id} does not exist")
            result = json.loads(row["result"] or "{}")
            result["summary"] = {**(result.get("summary") or {}), **dict(summary)}
            db.execute("UPDATE jobs SET result=? WHERE id=?", (json.dumps(result, default=str), job_id))
            stale = _stale_reason(row["superseded_by"], row["generation"], row["current"])
            if row["state"] == "done" and stale is None:
                now = time.time()
                for out in outputs:
                    for dest in destinations:
                        db.execute("INSERT INTO outbox (job_id, destination, path, state, next_attempt_at,"
                                   " created_at) VALUES (?,?,?,?,?,?)", (job_id, dest, str(out), "pending", now, now))
                _refresh_delivery(db, job_id)
        return self.job(job_id)

    def job(self, job_id: int) -> Job:
        """One job by id.

        Raises
        ------
        JobNotFoundError
        """
        rows = self._query("SELECT * FROM jobs WHERE id=?", (job_id,))
        if not rows:
            raise JobNotFoundError(f"job {job_id} does not exist")
        return _job(rows[0])

    def running_jobs(self) -> list[Job]:
        """Every job in state ``running``, oldest first."""
        return [_job(r) for r in self._query("SELECT * FROM jobs WHERE state='running' ORDER BY id")]

    def jobs(self, limit: int = 20, state: str | None = None) -> list[Job]:
        """Most recent jobs first, optionally only those in ``state``."""
        if state:
            rows = self._query("SELECT * FROM jobs WHERE state=? ORDER BY id DESC LIMIT ?", (state, limit))
        else:
            rows = self._query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        return [_job(r) for r in rows]

    def retry_job(self, job_id: int) -> str:
        """Resend a job's results (failed/cancelled entries, or all) or, without results, re-run it.

        Returns ``"resend"`` or ``"rerun"``.

        Raises
        ------
        JobNotFoundError
        SciNodeError
            When the job is still pending or running.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state, result FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"job {job_id} does not exist")
            if row["state"] in ("pending", "running"):
                raise SciNodeError(f"job {job_id} is {row['state']}; nothing to retry yet")
            n_out = db.execute("SELECT COUNT(*) FROM outbox WHERE job_id=?", (job_id,)).fetchone()[0]
            if n_out:
                cur = db.execute("UPDATE outbox SET state='pending', attempts=0, next_attempt_at=?, last_error=NULL"
                                 " WHERE job_id=? AND state IN ('failed', 'cancelled')", (now, job_id))
                if cur.rowcount == 0:
                    db.execute("UPDATE outbox SET state='pending', attempts=0, next_attempt_at=? WHERE job_id=?",
                               (now, job_id))
                status = json.loads(row["result"] or "{}").get("status", "done")
                db.execute("UPDATE jobs SET state=?, reason=NULL, superseded_by=NULL WHERE id=?",
                           (status if status in ("done", "routed-out") else "done", job_id))
                _refresh_delivery(db, job_id)
                return "resend"
            db.execute("UPDATE jobs SET state='pending', reason=NULL, started_at=NULL, finished_at=NULL,"
                       " superseded_by=NULL WHERE id=?", (job_id,))
            return "rerun"


def finish_in(db: sqlite3.Connection, job_id: int, state: str, reason: str | None, result: Mapping[str, Any],
              outputs: Sequence[Path] = (), destinations: Sequence[str] = ()) -> None:
    """The body of :meth:`Store.finish_job` inside a caller's transaction ``db``."""
    if state not in ("done", "routed-out", "failed"):
        raise ValueError(f"finish_job: state {state!r} is not done, routed-out or failed")
    now = time.time()
    row = db.execute("SELECT j.superseded_by, j.generation, s.generation AS current FROM jobs j"
                     " LEFT JOIN series s ON s.series_uid = j.series_uid WHERE j.id=?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFoundError(f"job {job_id} does not exist")
    stale = _stale_reason(row["superseded_by"], row["generation"], row["current"])
    if stale is not None:
        state, reason = "superseded", stale
    db.execute("UPDATE jobs SET state=?, reason=?, finished_at=?, result=? WHERE id=?",
               (state, reason, now, json.dumps(dict(result), default=str), job_id))
    if stale is None:
        for out in outputs:
            for dest in destinations:
                db.execute("INSERT INTO outbox (job_id, destination, path, state, next_attempt_at,"
                           " created_at) VALUES (?,?,?,?,?,?)", (job_id, dest, str(out), "pending", now, now))
    _refresh_delivery(db, job_id)



def state_in(db: sqlite3.Connection, job_id: int) -> str | None:
    """A job's state inside a caller's transaction ``db`` (None: no such job)."""
    row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
    return None if row is None else str(row[0])


def _stale_reason(superseded_by: int | None, generation: int, current: int | None) -> str | None:
    """Why a finishing job must not deliver (its series moved on), or None."""
    if superseded_by is not None:
        return f"superseded by job {superseded_by}"
    if current is not None and current != generation:
        return (f"series re-opened while the job ran (generation {generation} -> {current}): "
                "results not delivered, the new generation's job replaces them")
    return None



def _job(r: sqlite3.Row) -> Job:
    return Job(r["id"], r["series_uid"], r["study_uid"], r["generation"], r["n_instances"], r["state"],
               r["reason"], r["delivery"], r["superseded_by"], r["attempts"], r["created_at"],
               r["started_at"], r["finished_at"],
               json.loads(r["geometry"]) if r["geometry"] else None,
               json.loads(r["result"]) if r["result"] else None)

