"""The spool (received instances on disk) and its SQLite index (instances, series, jobs, outbox).

Layout under ``data_dir`` (directories 0700, files 0600)::

    index.sqlite3                      SQLite in WAL mode, synchronous=FULL
    spool/<study>/<series>/<sop>.dcm   received instances, bytes exactly as sent
    results/<job id>/                  what the worker wrote for a job

The :class:`Store` is one object made of four parts, one module each, whose docstrings give
the rules and states: :mod:`~sci_node.store.spool` (durable writes, then the row),
:mod:`~sci_node.store.series_state`, :mod:`~sci_node.store.jobs` and :mod:`~sci_node.store.outbox`;
:mod:`~sci_node.store.transactions` holds the connection and the one write transaction they share.
The scale-out engine keeps its own ``dispatches`` table in the same file (:mod:`sci_node.engine.ledger`).

Everything is thread-safe: one connection guarded by a lock (SQLite serialises writers
anyway); other processes (``sci-node status``) read concurrently thanks to WAL.
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from sci_node.errors import StorageError
from sci_node.store.jobs import JobQueue
from sci_node.store.outbox import Outbox
from sci_node.store.private_files import create_private
from sci_node.store.series_state import SeriesState
from sci_node.store.spool import Spool, _makedirs_durable

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    calling_aet TEXT,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    completed_at REAL,
    aborted_at REAL,
    open_associations INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_state ON series(state, last_received_at);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_aet TEXT,
    received_at REAL NOT NULL,
    generation INTEGER NOT NULL,
    receptions INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    n_instances INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    delivery TEXT NOT NULL DEFAULT 'none',
    superseded_by INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    geometry TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_uid);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox(job_id);
"""


class Store(Spool, SeriesState, JobQueue, Outbox):
    """Spool + SQLite index of one node's ``data_dir``.

    Parameters
    ----------
    data_dir
        Created (0700) if missing. Several processes may open the same directory; only
        one node should write to it.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.spool_dir = self.data_dir / "spool"
        self.results_dir = self.data_dir / "results"
        self._lock = threading.RLock()
        try:
            for d in (self.data_dir, self.spool_dir, self.results_dir):
                _makedirs_durable(d)
            create_private(self.data_dir / "index.sqlite3")  # 0600 before SQLite opens it: its -wal/-shm copy that
            self._db = sqlite3.connect(self.data_dir / "index.sqlite3", timeout=30.0,
                                       isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(series)")}
            if "aborted_at" not in columns:  # an index written before the abort grace existed
                self._db.execute("ALTER TABLE series ADD COLUMN aborted_at REAL")
            if "open_associations" not in columns:  # ... before crash-cut series were recognised
                self._db.execute("ALTER TABLE series ADD COLUMN open_associations INTEGER NOT NULL DEFAULT 0")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the data directory {str(self.data_dir)!r}: {exc}") from exc

    # -- status ---------------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Row counts by state: ``{"jobs": {...}, "series": {...}, "outbox": {...}}`` plus instances."""
        out: dict[str, dict[str, int]] = {}
        for table in ("jobs", "series", "outbox"):
            rows = self._query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            out[table] = {r["state"]: r["n"] for r in rows}
        out["instances"] = {"total": self._query("SELECT COUNT(*) FROM instances")[0][0]}
        return out

