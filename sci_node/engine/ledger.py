"""The node's record of what it dispatched: ``dispatches`` rows in its own SQLite index.

One row per dispatch (a job is dispatched again under a new token when its worker was lost, its
lease ran out or the broker restarted). States: ``out`` (at the broker or a worker), ``resolved``
(its result was accepted), ``superseded`` (another dispatch's result was accepted first, or it was
dispatched again), ``lost`` (its worker stopped beating), ``expired`` (lease), ``duplicate`` (a
result came after the job had finished), ``abandoned`` (the node restarted without the engine),
``rejected`` (its result failed :mod:`sci_node.engine.result_check`: the job failed, nothing was sent).

:meth:`Ledger.accept` writes the job's outcome and its outbox entries in the same transaction
that checks the job is still running: the first result of a job is accepted, any later one is
dropped, so exactly one SEG reaches each destination.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from sci_node.store import Store, finish_in
from sci_node.store.jobs import state_in

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS dispatches (
    token TEXT PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    models TEXT NOT NULL,
    dispatched_at REAL NOT NULL,
    lease_until REAL NOT NULL,
    broker_run TEXT,
    started_at REAL,
    worker TEXT,
    ended_at REAL,
    note TEXT
)""",
    "CREATE INDEX IF NOT EXISTS dispatches_state ON dispatches(state, job_id)",
)


@dataclass(frozen=True)
class Dispatch:
    """One dispatch of a job (``models``: the fingerprint the task carries)."""

    token: str
    job_id: int
    queue: str
    state: str
    models: dict[str, Any]
    dispatched_at: float
    lease_until: float
    broker_run: str | None
    started_at: float | None
    worker: str | None
    ended_at: float | None
    note: str | None


def _dispatch(r: sqlite3.Row) -> Dispatch:
    return Dispatch(r["token"], r["job_id"], r["queue"], r["state"], json.loads(r["models"] or "{}"),
                    r["dispatched_at"], r["lease_until"], r["broker_run"], r["started_at"], r["worker"],
                    r["ended_at"], r["note"])


class Ledger:
    """Dispatch rows of one node's index (thin: every method is one query or one transaction).

    The ledger owns its table: it is created in the node's index the first time a ledger opens it.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        if not store.query("SELECT 1 FROM sqlite_master WHERE type='table' AND name='dispatches'"):
            with store.tx() as db:
                for statement in _SCHEMA:
                    db.execute(statement)

    def record(self, job_id: int, token: str, queue: str, models: Mapping[str, Any], lease_until: float,
               broker_run: str | None) -> None:
        """A task for ``job_id`` was published under ``token``."""
        with self.store.tx() as db:
            db.execute("INSERT INTO dispatches (token, job_id, queue, state, models, dispatched_at, lease_until,"
                       " broker_run) VALUES (?,?,?,?,?,?,?,?)",
                       (token, job_id, queue, "out", json.dumps(dict(models)), time.time(), lease_until, broker_run))

    def outstanding(self) -> list[Dispatch]:
        """Dispatches still out, oldest first."""
        return [_dispatch(r) for r in self.store.query("SELECT * FROM dispatches WHERE state='out' ORDER BY"
                                                       " dispatched_at")]

    def of_job(self, job_id: int) -> list[Dispatch]:
        """Every dispatch of one job, oldest first."""
        return [_dispatch(r) for r in self.store.query("SELECT * FROM dispatches WHERE job_id=? ORDER BY"
                                                       " dispatched_at", (job_id,))]

    def get(self, token: str) -> Dispatch | None:
        rows = self.store.query("SELECT * FROM dispatches WHERE token=?", (token,))
        return _dispatch(rows[0]) if rows else None

    def started(self, token: str, worker: str, at: float) -> None:
        """A worker began running ``token``."""
        with self.store.tx() as db:
            db.execute("UPDATE dispatches SET started_at=?, worker=? WHERE token=? AND state='out'",
                       (at, worker, token))

    def note(self, token: str, text: str) -> None:
        """Record why a worker refused the task (it stays out: it went back to the queue)."""
        with self.store.tx() as db:
            db.execute("UPDATE dispatches SET note=? WHERE token=?", (text[:1000], token))

    def end(self, token: str, state: str, note: str | None = None) -> None:
        """An outstanding dispatch ends (``lost``, ``expired``, ``superseded``) without a result."""
        with self.store.tx() as db:
            db.execute("UPDATE dispatches SET state=?, ended_at=?, note=COALESCE(?, note) WHERE token=?"
                       " AND state='out'", (state, time.time(), note, token))

    def accept(self, token: str, job_id: int, state: str, reason: str | None, record: Mapping[str, Any],
               outputs: Sequence[Path], destinations: Sequence[str]) -> tuple[bool, list[str]]:
        """Accept a result when the job is still running; return (accepted, other tokens still out).

        In one transaction: the job's outcome and outbox (:func:`sci_node.store.finish_in`), this
        dispatch ``resolved`` and the job's other outstanding dispatches ``superseded``. A job that
        is no longer running keeps its outcome; this dispatch becomes ``duplicate``.
        """
        now = time.time()
        with self.store.tx() as db:
            known = db.execute("SELECT 1 FROM dispatches WHERE token=? AND job_id=?", (token, job_id)).fetchone()
            if state_in(db, job_id) != "running" or known is None:
                db.execute("UPDATE dispatches SET state='duplicate', ended_at=? WHERE token=?", (now, token))
                return False, []
            finish_in(db, job_id, state, reason, record, outputs, destinations)
            db.execute("UPDATE dispatches SET state='resolved', ended_at=? WHERE token=?", (now, token))
            others = [r[0] for r in db.execute("SELECT token FROM dispatches WHERE job_id=? AND state='out'",
                                               (job_id,))]
            db.execute("UPDATE dispatches SET state='superseded', ended_at=?, note=? WHERE job_id=? AND state='out'",
                       (now, f"result of {token[:8]} accepted first", job_id))
        return True, others

    def abandon_outstanding(self, note: str) -> int:
        """Every dispatch still out ends ``abandoned`` (the node restarted without the engine); returns how many."""
        with self.store.tx() as db:
            return db.execute("UPDATE dispatches SET state='abandoned', ended_at=?, note=? WHERE state='out'",
                              (time.time(), note)).rowcount

    def reject(self, token: str, job_id: int, reason: str, record: Mapping[str, Any]) -> tuple[bool, list[str]]:
        """A result failed its check: fail the job (no outbox) if it still runs; return (failed it, tokens out).

        In one transaction, like :meth:`accept`: the job ``failed`` with ``reason``, this dispatch
        ``rejected``, the job's other outstanding dispatches ``superseded``.
        """
        now = time.time()
        with self.store.tx() as db:
            db.execute("UPDATE dispatches SET state='rejected', ended_at=?, note=? WHERE token=?",
                       (now, reason[:1000], token))
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["state"] != "running":
                return False, []
            finish_in(db, job_id, "failed", reason[:1000], record)
            others = [r[0] for r in db.execute("SELECT token FROM dispatches WHERE job_id=? AND state='out'",
                                               (job_id,))]
            db.execute("UPDATE dispatches SET state='superseded', ended_at=?, note=? WHERE job_id=? AND state='out'",
                       (now, f"result of {token[:8]} rejected", job_id))
        return True, others

    def counts(self) -> dict[str, Any]:
        """For status: dispatches by state, and jobs out per worker (``queued`` = not started yet)."""
        by_state = {r[0]: r[1] for r in self.store.query("SELECT state, COUNT(*) FROM dispatches GROUP BY state")}
        per_worker: dict[str, int] = {}
        for r in self.store.query("SELECT COALESCE(worker, '(queued)') AS w, COUNT(*) AS n FROM dispatches"
                                  " WHERE state='out' GROUP BY w"):
            per_worker[r["w"]] = r["n"]
        return {"dispatches": by_state, "out_per_worker": per_worker}


def recover_jobs(store: Store, celery: bool) -> int:
    """At start-up, after a crash: jobs left ``running`` go back to ``pending``; returns how many.

    With the celery engine a job still out at a remote worker stays running (its result is still
    collected); with the local engine its dispatches are abandoned and the job runs here again.
    """
    ledger = Ledger(store)
    if celery:
        return store.recover(keep=[d.job_id for d in ledger.outstanding()])
    ledger.abandon_outstanding("the node restarted without the celery engine")
    return store.recover()
