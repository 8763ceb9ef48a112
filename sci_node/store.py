"""The spool (received instances on disk) and its SQLite index (instances, series, jobs, outbox).

Layout under ``data_dir`` (directories 0700, files 0600)::

    index.sqlite3                      SQLite in WAL mode, synchronous=FULL
    spool/<study>/<series>/<sop>.dcm   received instances, bytes exactly as sent
    results/<job id>/                  what the worker wrote for a job

Durability rule: an instance file is written under a temporary name, fsync'd, renamed
into place and its directory fsync'd; only then is it recorded in the index (one
committed transaction). The SCP acknowledges Success only after :meth:`Store.spool_instance`
returned, so an acknowledged instance survives ``kill -9`` and power loss.

Everything is thread-safe: one connection guarded by a lock (SQLite serialises writers
anyway); other processes (``sci-node status``) read concurrently thanks to WAL.

States
------
series: ``receiving`` -> ``complete`` (-> ``receiving`` again, generation + 1, when a late
or re-sent instance arrives).
jobs: ``pending`` -> ``running`` -> ``done`` | ``routed-out`` | ``failed``; ``superseded``
when a newer generation of the series replaced the job before it ran, or re-opened the series
while it ran (checked when the outcome is written, see :meth:`Store.finish_job`).
job delivery: ``none`` | ``pending`` | ``delivered`` | ``failed``.
outbox: ``pending`` -> ``sent`` | ``failed`` | ``cancelled`` (superseded).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from sci_node.errors import JobNotFoundError, SciNodeError, StorageError
from sci_node.private_files import create_private, make_private_dirs
from sci_node.sqlite_tx import write_tx

SCHEMA_VERSION = 1
_UID_RE = re.compile(r"^[0-9A-Za-z.\-_]{1,64}$")

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
    aborted_at REAL
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
CREATE TABLE IF NOT EXISTS dispatches (
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
);
CREATE INDEX IF NOT EXISTS dispatches_state ON dispatches(state, job_id);
"""

TERMINAL_JOB_STATES = ("done", "routed-out", "failed", "superseded")


@dataclass(frozen=True)
class InstanceKey:
    """What the index needs to know about a received instance (taken from its header)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str


@dataclass(frozen=True)
class SeriesRow:
    """A series waiting for completion."""

    series_uid: str
    study_uid: str
    generation: int
    n_instances: int
    last_received_at: float
    calling_aet: str | None
    #: when the last association that sent instances of this series ended in A-ABORT (None:
    #: released normally, or a later association released)
    aborted_at: float | None = None


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


def _safe_name(uid: str) -> str:
    """A UID as a file name; anything that is not UID-like is hashed (never a path)."""
    if _UID_RE.match(uid) and uid not in (".", ".."):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """Create ``path`` (each missing level mode 0700) and fsync each parent whose entries changed."""
    for d in make_private_dirs(path):
        _fsync_dir(d.parent)


def write_durable(path: Path, data: bytes | Sequence[bytes]) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, dir fsync).

    Raises
    ------
    OSError
        On any I/O failure; the temporary file is removed and ``path`` is untouched.
    """
    _makedirs_durable(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class Store:
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
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the data directory {str(self.data_dir)!r}: {exc}") from exc

    def close(self) -> None:
        """Close the index connection."""
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self, sync_commit: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), errors as :class:`StorageError`.

        ``sync_commit=False`` commits without fsyncing the WAL (synchronous=NORMAL): the
        commit survives a process crash but not a power loss. Only for rows that
        :meth:`reconcile` can rebuild from fsync'd spool files.
        """
        where = f"index {self.data_dir / 'index.sqlite3'}"
        with self._lock:
            if not sync_commit:
                try:
                    self._db.execute("PRAGMA synchronous=NORMAL")
                except sqlite3.Error as exc:
                    raise StorageError(f"{where}: {exc}") from exc
            try:
                with write_tx(self._db, where) as db:
                    yield db
            finally:
                if not sync_commit:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("PRAGMA synchronous=FULL")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"index {self.data_dir / 'index.sqlite3'}: {exc}") from exc

    # -- ingest -------------------------------------------------------------------------

    def instance_path(self, key: InstanceKey) -> Path:
        """Where the spool keeps an instance: ``spool/<study>/<series>/<sop>.dcm``."""
        return (self.spool_dir / _safe_name(key.study_uid) / _safe_name(key.series_uid)
                / f"{_safe_name(key.sop_uid)}.dcm")

    def spool_instance(self, key: InstanceKey, data: bytes | Sequence[bytes],
                       calling_aet: str | None = None) -> bool:
        """Write an instance durably, then record it; return False for a duplicate SOP instance.

        A duplicate replaces the file atomically and counts once. An instance of a series
        that was already complete re-opens it (generation + 1) and cancels the earlier
        generations' unsent results: the completion check will then enqueue a job that
        supersedes the earlier one.

        Raises
        ------
        StorageError
            When the file or the index cannot be written (nothing was recorded).
        """
        path = self.instance_path(key)
        try:
            write_durable(path, data)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc}") from exc
        return self._record_instance(key, path, calling_aet)

    def _record_instance(self, key: InstanceKey, path: Path, calling_aet: str | None) -> bool:
        now = time.time()
        # The file is already fsync'd: it is the durable copy. The row is rebuilt from it by
        # reconcile() if a power loss drops this (not fsync'd) commit.
        with self._tx(sync_commit=False) as db:
            try:  # under the lock: a retention purge may have moved the series away meanwhile
                size = path.stat().st_size
            except OSError as exc:
                raise StorageError(f"cannot record {path}: {exc}") from exc
            row = db.execute("SELECT state, generation FROM series WHERE series_uid=?",
                             (key.series_uid,)).fetchone()
            if row is None:
                generation = 1
                db.execute("INSERT INTO series (series_uid, study_uid, state, generation, calling_aet,"
                           " first_received_at, last_received_at) VALUES (?,?,?,?,?,?,?)",
                           (key.series_uid, key.study_uid, "receiving", 1, calling_aet, now, now))
            elif row["state"] != "receiving":
                generation = row["generation"] + 1
                db.execute("UPDATE series SET state='receiving', generation=?, last_received_at=?,"
                           " calling_aet=? WHERE series_uid=?", (generation, now, calling_aet, key.series_uid))
                _hold_stale_results(db, key.series_uid, generation)
            else:
                generation = row["generation"]
                db.execute("UPDATE series SET last_received_at=? WHERE series_uid=?", (now, key.series_uid))
            cur = db.execute(
                "INSERT OR IGNORE INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, transfer_syntax,"
                " path, size, calling_aet, received_at, generation) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (key.sop_uid, key.series_uid, key.study_uid, key.sop_class_uid, key.transfer_syntax,
                 str(path.relative_to(self.data_dir)), size, calling_aet, now, generation))
            is_new = cur.rowcount == 1
            if is_new:
                db.execute("UPDATE series SET n_instances = n_instances + 1 WHERE series_uid=?",
                           (key.series_uid,))
            else:
                db.execute("UPDATE instances SET receptions = receptions + 1, received_at=?, generation=?,"
                           " size=?, transfer_syntax=? WHERE sop_uid=?",
                           (now, generation, size, key.transfer_syntax, key.sop_uid))
        return is_new

    def reconcile(self) -> tuple[int, int]:
        """At start-up: index spooled files the index lost (power loss), delete stale temp files.

        Returns
        -------
        (recorded, removed)
            Instances re-recorded; half-written temporary files removed (never acknowledged).
        """
        import pydicom

        known = {r["path"] for r in self._query("SELECT path FROM instances")}
        recorded = removed = 0
        for f in sorted(self.spool_dir.rglob("*")):
            if not f.is_file():
                continue
            if f.name.endswith(".tmp"):
                f.unlink(missing_ok=True)
                removed += 1
                continue
            if str(f.relative_to(self.data_dir)) in known:
                continue
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                key = InstanceKey(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                                  str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
            except Exception:
                continue  # not ours to judge; left in place for an admin
            if self.instance_path(key) == f:
                self._record_instance(key, f, None)
                recorded += 1
        return recorded, removed

    def series_size(self, series_uid: str) -> int:
        """Instances recorded for a series (0 if unknown)."""
        rows = self._query("SELECT n_instances FROM series WHERE series_uid=?", (series_uid,))
        return int(rows[0][0]) if rows else 0

    def free_disk_mb(self) -> float:
        """Free space of the data directory's file system, in MiB."""
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize / 2**20

    # -- completion ----------------------------------------------------------------------

    def quiet_series(self, received_before: float, aborted_before: float | None = None) -> list[SeriesRow]:
        """Series still receiving whose last instance arrived before ``received_before`` (epoch s).

        With ``aborted_before``, a series whose last association was aborted is only quiet once
        that abort happened before ``aborted_before`` (the grace period for a resend is over).
        """
        rows = self._query("SELECT * FROM series WHERE state='receiving' AND last_received_at <= ?"
                           " AND (aborted_at IS NULL OR aborted_at <= ?) ORDER BY last_received_at",
                           (received_before, float("inf") if aborted_before is None else aborted_before))
        return [SeriesRow(r["series_uid"], r["study_uid"], r["generation"], r["n_instances"],
                          r["last_received_at"], r["calling_aet"], r["aborted_at"]) for r in rows]

    def association_ended(self, series_uids: Sequence[str], aborted: bool) -> None:
        """Record how the association that sent instances of ``series_uids`` ended.

        An A-ABORT (ours or the peer's) marks those still receiving as aborted now (their
        completion waits for a resend, see :meth:`quiet_series`); a normal release clears the
        mark: the last association delivered what it meant to.
        """
        if not series_uids:
            return
        marks = ",".join("?" * len(series_uids))
        with self._tx() as db:
            db.execute(f"UPDATE series SET aborted_at=? WHERE state='receiving' AND series_uid IN ({marks})",
                       (time.time() if aborted else None, *series_uids))

    def series_files(self, series_uid: str) -> list[Path]:
        """Absolute paths of every spooled instance of a series (sorted by SOP instance UID)."""
        rows = self._query("SELECT path FROM instances WHERE series_uid=? ORDER BY sop_uid", (series_uid,))
        return [self.data_dir / r["path"] for r in rows]

    def complete_series(self, series: SeriesRow, geometry: Mapping[str, Any],
                        invalid_reason: str | None = None) -> int | None:
        """Mark a series complete and enqueue its job, superseding earlier jobs of the series.

        Does nothing (returns None) when an instance arrived since ``series`` was read: the
        series is still receiving. A job with ``invalid_reason`` is created already failed.

        Returns
        -------
        int | None
            The new job id.
        """
        now = time.time()
        with self._tx() as db:
            cur = db.execute("UPDATE series SET state='complete', completed_at=?, aborted_at=NULL WHERE series_uid=?"
                             " AND state='receiving' AND generation=? AND last_received_at=?",
                             (now, series.series_uid, series.generation, series.last_received_at))
            if cur.rowcount != 1:
                return None
            n = db.execute("SELECT n_instances FROM series WHERE series_uid=?", (series.series_uid,)).fetchone()[0]
            state = "failed" if invalid_reason else "pending"
            cur = db.execute(
                "INSERT INTO jobs (series_uid, study_uid, generation, n_instances, state, reason, created_at,"
                " finished_at, geometry) VALUES (?,?,?,?,?,?,?,?,?)",
                (series.series_uid, series.study_uid, series.generation, n, state, invalid_reason, now,
                 now if invalid_reason else None, json.dumps(dict(geometry))))
            job_id = int(cur.lastrowid or 0)
            self._supersede(db, series.series_uid, job_id)
        return job_id

    @staticmethod
    def _supersede(db: sqlite3.Connection, series_uid: str, new_job: int) -> None:
        old = db.execute("SELECT id FROM jobs WHERE series_uid=? AND id<? AND superseded_by IS NULL",
                         (series_uid, new_job)).fetchall()
        for (job_id,) in old:
            db.execute("UPDATE jobs SET superseded_by=? WHERE id=?", (new_job, job_id))
            db.execute("UPDATE jobs SET state='superseded', reason=? WHERE id=? AND state='pending'",
                       (f"superseded by job {new_job}", job_id))
            db.execute("UPDATE outbox SET state='cancelled', last_error=? WHERE job_id=? AND state='pending'",
                       (f"superseded by job {new_job}", job_id))
            _refresh_delivery(db, job_id)

    # -- jobs ------------------------------------------------------------------------------

    def recover(self, keep_dispatched: bool = False) -> int:
        """After a crash: jobs left ``running`` go back to ``pending``. Returns how many.

        ``keep_dispatched`` (the Celery engine): a job out at a remote worker stays running, its
        result is still collected; without it (the local engine) its dispatch is abandoned too.
        """
        with self._tx() as db:
            if keep_dispatched:
                return db.execute("UPDATE jobs SET state='pending', started_at=NULL WHERE state='running' AND id NOT"
                                  " IN (SELECT job_id FROM dispatches WHERE state='out')").rowcount
            db.execute("UPDATE dispatches SET state='abandoned', ended_at=?, note='the node restarted without the"
                       " celery engine' WHERE state='out'", (time.time(),))
            return db.execute("UPDATE jobs SET state='pending', started_at=NULL WHERE state='running'").rowcount

    def release_job(self, job_id: int) -> None:
        """A claimed job that could not be handed on (broker down) goes back to ``pending``."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='pending', started_at=NULL, attempts=MAX(attempts-1, 0)"
                       " WHERE id=? AND state='running'", (job_id,))

    def tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction for an adapter that keeps its own rows here (the dispatch ledger)."""
        return self._tx()

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """A read on the index (errors as :class:`StorageError`)."""
        return self._query(sql, args)

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

    # -- outbox ---------------------------------------------------------------------------

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

    # -- retention ------------------------------------------------------------------------

    def expired_series(self, cutoff: float) -> list[tuple[str, int]]:
        """Complete series whose latest job is finished and delivered (or routed out with nothing
        to deliver) since before ``cutoff`` (epoch s): ``(series_uid, generation)`` pairs.

        Series whose latest job failed, is pending/running or still has results to send are kept.
        """
        rows = self._query(
            "SELECT s.series_uid, s.generation FROM series s JOIN jobs j ON j.id ="
            " (SELECT MAX(id) FROM jobs WHERE series_uid = s.series_uid)"
            " WHERE s.state='complete' AND j.generation = s.generation AND j.finished_at IS NOT NULL"
            " AND (j.delivery='delivered' OR (j.state='routed-out' AND j.delivery='none'))"
            " AND COALESCE((SELECT MAX(sent_at) FROM outbox WHERE job_id=j.id), j.finished_at) <= ?",
            (cutoff,))
        return [(r[0], int(r[1])) for r in rows]

    def purge_series(self, series_uid: str, generation: int) -> bool:
        """Delete a complete series' spooled instances and its jobs' result folders (retention).

        The series folder is moved aside and its rows deleted in one locked transaction, only
        if the series is still complete at ``generation``: an instance arriving meanwhile either
        re-opened the series first (nothing is purged) or finds its file gone and is refused
        (:meth:`_record_instance`), never acknowledged and lost. Job and outbox rows stay (audit).

        Returns
        -------
        bool
            False when the series changed meanwhile and was kept.
        """
        trash = self.data_dir / f".purge-{uuid.uuid4().hex}"
        with self._tx() as db:
            row = db.execute("SELECT study_uid FROM series WHERE series_uid=? AND state='complete'"
                             " AND generation=?", (series_uid, generation)).fetchone()
            if row is None:
                return False
            series_dir = self.spool_dir / _safe_name(row["study_uid"]) / _safe_name(series_uid)
            job_ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE series_uid=?", (series_uid,))]
            os.mkdir(trash, 0o700)
            if series_dir.exists():
                os.replace(series_dir, trash / "spool")
            try:
                db.execute("DELETE FROM instances WHERE series_uid=?", (series_uid,))
                db.execute("DELETE FROM series WHERE series_uid=?", (series_uid,))
            except BaseException:
                if (trash / "spool").exists():
                    os.replace(trash / "spool", series_dir)
                raise
        for job_id in job_ids:
            if (self.results_dir / str(job_id)).exists():
                os.replace(self.results_dir / str(job_id), trash / f"result-{job_id}")
        shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(OSError):
            series_dir.parent.rmdir()  # the study folder, if that was its last series
        return True

    # -- status ---------------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Row counts by state: ``{"jobs": {...}, "series": {...}, "outbox": {...}}`` plus instances."""
        out: dict[str, dict[str, int]] = {}
        for table in ("jobs", "series", "outbox"):
            rows = self._query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            out[table] = {r["state"]: r["n"] for r in rows}
        out["instances"] = {"total": self._query("SELECT COUNT(*) FROM instances")[0][0]}
        return out


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


def _stale_reason(superseded_by: int | None, generation: int, current: int | None) -> str | None:
    """Why a finishing job must not deliver (its series moved on), or None."""
    if superseded_by is not None:
        return f"superseded by job {superseded_by}"
    if current is not None and current != generation:
        return (f"series re-opened while the job ran (generation {generation} -> {current}): "
                "results not delivered, the new generation's job replaces them")
    return None


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


def _job(r: sqlite3.Row) -> Job:
    return Job(r["id"], r["series_uid"], r["study_uid"], r["generation"], r["n_instances"], r["state"],
               r["reason"], r["delivery"], r["superseded_by"], r["attempts"], r["created_at"],
               r["started_at"], r["finished_at"],
               json.loads(r["geometry"]) if r["geometry"] else None,
               json.loads(r["result"]) if r["result"] else None)


def _entry(r: sqlite3.Row) -> OutboxEntry:
    return OutboxEntry(r["id"], r["job_id"], r["destination"], r["path"], r["state"], r["attempts"],
                       r["next_attempt_at"], r["last_error"], r["sent_at"])
