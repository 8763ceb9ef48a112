"""The export outbox in the index: one entry per (result file, destination), and each job's delivery state.

outbox: ``pending`` -> ``sent`` | ``failed`` | ``cancelled`` (superseded).
job delivery: ``none`` | ``pending`` | ``delivered`` | ``failed``.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from sci_node.store.transactions import IndexBase


@dataclass(frozen=True)
class OutboxEntry:
    """One result file to send to one destination."""

    id: int
    job_id: int
    destination: str
    path: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    sent_at: float | None



class Outbox(IndexBase):
    """The outbox part of :class:`~sci_node.store.Store`."""

    def due_outbox(self, now: float | None = None, limit: int = 200) -> list[OutboxEntry]:
        """Pending outbox entries whose next attempt is due, oldest first."""
        rows = self._query("SELECT * FROM outbox WHERE state='pending' AND next_attempt_at <= ?"
                           " ORDER BY id LIMIT ?", (time.time() if now is None else now, limit))
        return [_entry(r) for r in rows]

    def next_outbox_due(self) -> float | None:
        """Epoch time of the earliest pending outbox attempt, or None."""
        rows = self._query("SELECT MIN(next_attempt_at) FROM outbox WHERE state='pending'")
        return rows[0][0] if rows and rows[0][0] is not None else None

    def outbox_for_job(self, job_id: int) -> list[OutboxEntry]:
        """Every outbox entry of a job."""
        return [_entry(r) for r in self._query("SELECT * FROM outbox WHERE job_id=? ORDER BY id", (job_id,))]

    def mark_sent(self, entry_id: int) -> None:
        """Record a delivered entry."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET state='sent', sent_at=?, attempts=attempts+1, last_error=NULL"
                       " WHERE id=?", (time.time(), entry_id))
            _refresh_delivery(db, _job_of(db, entry_id))

    def mark_failed(self, entry_id: int, error: str) -> None:
        """Record a permanent delivery failure (no more retries)."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET state='failed', attempts=attempts+1, last_error=? WHERE id=?",
                       (error, entry_id))
            _refresh_delivery(db, _job_of(db, entry_id))

    def mark_retry(self, entry_id: int, error: str, next_attempt_at: float) -> None:
        """Record a transient failure; the entry stays pending until ``next_attempt_at``."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET attempts=attempts+1, last_error=?, next_attempt_at=? WHERE id=?",
                       (error, next_attempt_at, entry_id))


def _job_of(db: sqlite3.Connection, entry_id: int) -> int:
    return int(db.execute("SELECT job_id FROM outbox WHERE id=?", (entry_id,)).fetchone()[0])


def _refresh_delivery(db: sqlite3.Connection, job_id: int) -> None:
    """Derive a job's delivery state (and a failed state on permanent delivery failure)."""
    counts = {r[0]: r[1] for r in db.execute("SELECT state, COUNT(*) FROM outbox WHERE job_id=? GROUP BY state",
                                             (job_id,))}
    if not counts:
        delivery = "none"
    elif counts.get("pending"):
        delivery = "pending"
    elif counts.get("failed"):
        delivery = "failed"
    elif counts.get("sent"):
        delivery = "delivered"
    else:
        delivery = "none"  # every entry cancelled (superseded)
    db.execute("UPDATE jobs SET delivery=? WHERE id=?", (delivery, job_id))
    if delivery == "failed":
        err = db.execute("SELECT destination, last_error FROM outbox WHERE job_id=? AND state='failed'"
                         " ORDER BY id LIMIT 1", (job_id,)).fetchone()
        db.execute("UPDATE jobs SET state='failed', reason=? WHERE id=?",
                   (f"delivery to {err[0]} failed: {err[1]}", job_id))



def _entry(r: sqlite3.Row) -> OutboxEntry:
    return OutboxEntry(r["id"], r["job_id"], r["destination"], r["path"], r["state"], r["attempts"],
                       r["next_attempt_at"], r["last_error"], r["sent_at"])


def _hold_stale_results(db: sqlite3.Connection, series_uid: str, generation: int) -> None:
    """A series was re-opened: cancel the not yet sent results of its earlier generations.

    They were computed on a series that is no longer the one received; the new generation's
    job replaces them (as :meth:`Store.complete_series` would, only later).
    """
    jobs = [r[0] for r in db.execute("SELECT DISTINCT o.job_id FROM outbox o JOIN jobs j ON j.id = o.job_id"
                                     " WHERE j.series_uid=? AND j.generation<? AND o.state='pending'",
                                     (series_uid, generation))]
    for job_id in jobs:
        db.execute("UPDATE outbox SET state='cancelled', last_error=? WHERE job_id=? AND state='pending'",
                   (f"series re-opened (generation {generation}) before delivery", job_id))
        _refresh_delivery(db, job_id)
