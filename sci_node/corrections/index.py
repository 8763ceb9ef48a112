"""The corrections index: ``DATA_DIR/corrections.sqlite`` (WAL) and the ``DATA_DIR/corrections/<id>/`` folders
it lists, their retention and the statistics ``sci-node status`` shows."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sci_node.config import NodeConfig
from sci_node.errors import CorrectionNotFoundError, CorrectionRefused, StorageError
from sci_node.logs import get_logger
from sci_node.store.private_files import create_private, make_private_dirs
from sci_node.store.transactions import write_tx

log = get_logger("sci_node.corrections")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS corrections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL,
    reason TEXT,
    received_at REAL NOT NULL,
    origin TEXT,
    seg_sop_uid TEXT,
    seg_series_uid TEXT,
    study_uid TEXT,
    source_series_uid TEXT,
    job_id INTEGER,
    patient_key TEXT,
    creator TEXT,
    created TEXT,
    model_versions TEXT,
    measures TEXT,
    notes TEXT,
    path TEXT
);
CREATE INDEX IF NOT EXISTS corrections_sop ON corrections(seg_sop_uid);
"""

#: columns added after the first schema (issue 36: corrections are a privilege); added on open
_LATER_COLUMNS = {"sender": "TEXT", "flags": "TEXT", "mask_hash": "TEXT", "verdict": "TEXT",
                  "reviewed_by": "TEXT", "reviewed_at": "REAL"}

#: states whose folder is kept (the rest have none)
KEPT_STATES = ("pending", "accepted", "rejected")


@dataclass(frozen=True)
class Correction:
    """One row of ``corrections.sqlite`` (JSON columns decoded)."""

    id: int
    #: "pending" (waits for an admin) | "accepted" | "rejected" | "refused" (never kept) | "expired" (retention)
    state: str
    reason: str | None
    received_at: float
    origin: str | None
    seg_sop_uid: str | None
    seg_series_uid: str | None
    study_uid: str | None
    source_series_uid: str | None
    job_id: int | None
    patient_key: str | None
    creator: str | None
    created: str | None
    model_versions: dict[str, str]
    measures: dict[str, Any]
    notes: list[str]
    path: str | None
    #: who handed it in, authenticated: ``orthanc-user:NAME``, ``dicom:AET@IP`` or ``cli:LOGIN``
    #: (``creator`` is only what the SEG claims)
    sender: str | None = None
    #: why a reviewer should look twice (implausible masks); never accepted without ``--force``
    flags: list[str] = field(default_factory=list)
    mask_hash: str | None = None
    #: the admin's decision, kept when the row expires: "accepted" | "rejected" | None
    verdict: str | None = None
    reviewed_by: str | None = None
    reviewed_at: float | None = None

    @property
    def counts(self) -> bool:
        """Whether it reaches export, training and the statistics: accepted (and not since expired, for
        export; :func:`summary` also counts expired accepted ones)."""
        return self.verdict == "accepted"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``--json``)."""
        return asdict(self)


class CorrectionIndex:
    """``DATA_DIR/corrections.sqlite`` plus the ``DATA_DIR/corrections/`` folders."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "corrections"
        try:
            make_private_dirs(self.root)  # the data dir too, when an ingest comes before the node ever ran
            create_private(self.data_dir / "corrections.sqlite")  # 0600 before SQLite opens it (and its WAL)
            self._db = sqlite3.connect(self.data_dir / "corrections.sqlite", timeout=30.0, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"corrections index in {str(self.data_dir)!r}: {exc}") from None
        self._sweep_orphans()

    def _migrate(self) -> None:
        """Add the later columns; rows of the first schema's "recorded" state become "pending" (never reviewed)."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(corrections)")}
        with write_tx(self._db, "corrections index") as db:
            for name, kind in _LATER_COLUMNS.items():
                if name not in have:
                    db.execute(f"ALTER TABLE corrections ADD COLUMN {name} {kind}")
            db.execute("UPDATE corrections SET state='pending' WHERE state='recorded'")

    def close(self) -> None:
        """Close the SQLite connection."""
        self._db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); errors as :class:`StorageError`."""
        with write_tx(self._db, "corrections index") as db:
            yield db

    @contextlib.contextmanager
    def writer_lock(self, blocking: bool = True) -> Iterator[bool]:
        """Advisory lock (``flock`` on ``corrections/.lock``) held while a correction's folder is written
        and committed; yields False when ``blocking`` is off and another process holds it.

        Every process opening the index sweeps orphan folders (:meth:`_sweep_orphans`); without
        this lock a ``sci-node corrections list`` run during an ingest deleted the ingest's
        temporary folder, or its renamed folder before the row was committed.
        """
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"corrections lock in {str(self.root)!r}: {exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def _sweep_orphans(self) -> None:
        """Delete temporary folders and folders without a recorded row (a crash mid-ingest).

        Skipped while another process writes a correction (:meth:`writer_lock`).
        """
        with self.writer_lock(blocking=False) as free:
            if not free:
                return
            keep = {Path(r[0]).name for r in self._db.execute(
                f"SELECT path FROM corrections WHERE state IN {KEPT_STATES} AND path IS NOT NULL")}
            for entry in self.root.iterdir():
                if entry.is_dir() and entry.name not in keep and (entry.name.startswith(".tmp-")
                                                                  or entry.name.isdigit()):
                    shutil.rmtree(entry, ignore_errors=True)

    def all(self, limit: int | None = None) -> list[Correction]:
        """Every correction, newest first."""
        sql = "SELECT * FROM corrections ORDER BY id DESC" + (" LIMIT ?" if limit else "")
        return [_row(r) for r in self._db.execute(sql, (limit,) if limit else ())]

    def get(self, correction_id: int) -> Correction:
        """One correction; :class:`CorrectionNotFoundError` if there is none with that id."""
        row = self._db.execute("SELECT * FROM corrections WHERE id=?", (correction_id,)).fetchone()
        if row is None:
            raise CorrectionNotFoundError(f"correction {correction_id} does not exist")
        return _row(row)

    def by_sop(self, sop_uid: str) -> Correction | None:
        """The latest row for a SEG SOP Instance UID, or None."""
        row = self._db.execute("SELECT * FROM corrections WHERE seg_sop_uid=? ORDER BY id DESC LIMIT 1",
                               (sop_uid,)).fetchone()
        return None if row is None else _row(row)

    def by_hash(self, mask_hash: str) -> Correction | None:
        """The latest kept (pending, accepted, or expired after acceptance) correction with these masks, or None."""
        row = self._db.execute("SELECT * FROM corrections WHERE mask_hash=? AND (state IN ('pending', 'accepted') "
                               "OR (state='expired' AND verdict='accepted')) ORDER BY id DESC LIMIT 1",
                               (mask_hash,)).fetchone()
        return None if row is None else _row(row)

    def review(self, correction_id: int, verdict: str, by: str, force: bool = False) -> Correction:
        """Accept or reject a pending correction (``verdict`` "accepted" | "rejected"); the changed row.

        Raises
        ------
        CorrectionNotFoundError
            No correction with that id.
        CorrectionRefused
            It is not pending, or it is flagged and ``force`` is off (accepting only).
        """
        with self.tx() as db:
            row = db.execute("SELECT * FROM corrections WHERE id=?", (correction_id,)).fetchone()
            if row is None:
                raise CorrectionNotFoundError(f"correction {correction_id} does not exist")
            c = _row(row)
            if c.state != "pending":
                raise CorrectionRefused(f"correction {correction_id} is {c.state}, not pending: nothing to "
                                        f"{'accept' if verdict == 'accepted' else 'reject'}")
            if verdict == "accepted" and c.flags and not force:
                raise CorrectionRefused(f"correction {correction_id} is flagged for review ({'; '.join(c.flags)}): "
                                        "look at it, then accept with --force")
            db.execute("UPDATE corrections SET state=?, verdict=?, reviewed_by=?, reviewed_at=? WHERE id=?",
                       (verdict, verdict, by, time.time(), correction_id))
        log.info("correction.reviewed", correction=correction_id, verdict=verdict, by=by, flags=c.flags)
        return self.get(correction_id)

    def insert(self, db: sqlite3.Connection, fields: dict[str, Any]) -> int:
        """Insert a row inside transaction ``db``; JSON-encodes dict/list values; returns its id."""
        cols = {k: (json.dumps(v, default=str) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
        cur = db.execute(f"INSERT INTO corrections ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                         tuple(cols.values()))
        return int(cur.lastrowid or 0)


def _row(r: sqlite3.Row) -> Correction:
    d = dict(r)
    for key, empty in (("model_versions", {}), ("measures", {}), ("notes", []), ("flags", [])):
        d[key] = json.loads(d[key]) if d[key] else empty
    return Correction(**d)


def open_index(cfg: NodeConfig) -> CorrectionIndex:
    """The corrections index of ``cfg.data_dir`` (created if missing)."""
    return CorrectionIndex(cfg.data_dir)


def purge_expired(cfg: NodeConfig, index: CorrectionIndex, now: float | None = None) -> int:
    """Delete the folders of corrections older than ``[corrections] retention_days``; mark them ``expired``.

    The row keeps its change measures and model versions (for the statistics); the patient
    key is cleared. Returns how many were purged.
    """
    days = cfg.corrections.retention_days
    if days is None:
        return 0
    cutoff = (time.time() if now is None else now) - days * 86400.0
    old = [c for c in index.all() if c.state in KEPT_STATES and c.received_at <= cutoff]
    for c in old:
        with index.tx() as db:
            db.execute("UPDATE corrections SET state='expired', path=NULL, patient_key=NULL WHERE id=?", (c.id,))
        if c.path:
            shutil.rmtree(c.path, ignore_errors=True)
        log.info("correction.expired", correction=c.id, retention_days=days)
    return len(old)


def all_corrections(cfg: NodeConfig) -> list[Correction]:
    """Every correction of ``cfg.data_dir``, newest first, after purging those past retention."""
    index = open_index(cfg)
    try:
        purge_expired(cfg, index)
        return index.all()
    finally:
        index.close()


def counted(rows: list[Correction]) -> list[Correction]:
    """The corrections that count, newest first: accepted ones (expired after acceptance too), one per
    source series (the newest accepted: a series corrected twice counts once)."""
    seen: set[str] = set()
    out = []
    for c in rows:
        key = c.source_series_uid or f"#{c.id}"
        if c.counts and key not in seen:
            seen.add(key)
            out.append(c)
    return out


def summary(cfg: NodeConfig) -> dict[str, Any]:
    """Counts by state and the mean original-vs-corrected cord Dice over the last ``status_window``.

    Only accepted corrections count for the mean (one per source series); per cord model version
    too, with ``heavily_corrected`` naming the versions whose mean is below ``heavy_dice_below``.
    ``to_review`` counts the pending ones, ``flagged`` those of them with flags. Reads only; an
    absent index gives zeros.
    """
    pol = cfg.corrections
    out: dict[str, Any] = {"received": 0, "pending": 0, "accepted": 0, "rejected": 0, "refused": 0, "expired": 0,
                           "to_review": 0, "flagged": 0, "counted": 0, "window": pol.status_window,
                           "mean_cord_dice_last_n": None, "by_cord_model": {}, "heavily_corrected": []}
    if not (cfg.data_dir / "corrections.sqlite").exists():
        return out
    index = CorrectionIndex(cfg.data_dir)
    try:
        rows = index.all()
    finally:
        index.close()
    for c in rows:
        out[c.state] = out.get(c.state, 0) + 1
    out["received"] = len(rows)
    out["to_review"] = out["pending"]
    out["flagged"] = sum(1 for c in rows if c.state == "pending" and c.flags)
    kept = [c for c in counted(rows) if "cord_dice" in c.measures]
    out["counted"] = len(kept)
    last = kept[:pol.status_window]
    if last:
        out["mean_cord_dice_last_n"] = round(float(np.mean([c.measures["cord_dice"] for c in last])), 4)
    by: dict[str, list[float]] = {}
    for c in last:
        by.setdefault(c.model_versions.get("cord", "?"), []).append(float(c.measures["cord_dice"]))
    out["by_cord_model"] = {v: {"n": len(d), "mean_cord_dice": round(float(np.mean(d)), 4)} for v, d in by.items()}
    out["heavily_corrected"] = sorted(v for v, d in by.items() if float(np.mean(d)) < pol.heavy_dice_below)
    return out
