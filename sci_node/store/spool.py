"""The spool: received instances on disk, written durably, and their rows in the index.

Durability rule: an instance's bytes are durable before it is recorded in the index (one
committed transaction), and the SCP acknowledges Success only after :meth:`Spool.spool_instance`
returned, so an acknowledged instance survives ``kill -9`` and power loss. Durable means either
appended to the spool journal and ``fdatasync``'d (:mod:`sci_node.store.journal`, the node's
default: the file is written under a temporary name and renamed first, and fsync'd at the journal's
next checkpoint), or, without a journal, the file written under a temporary name, fsync'd,
renamed into place and its directory fsync'd. With write-behind (:mod:`sci_node.store.writebehind`,
the node's default), the journal append comes first and makes the instance durable; the file and the row
are written right after by the writer thread, and a start after a crash rebuilds both from the journal.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sci_node.errors import StorageError
from sci_node.store.journal import SpoolJournal
from sci_node.store.outbox import _hold_stale_results
from sci_node.store.private_files import make_private_dirs
from sci_node.store.transactions import IndexBase
from sci_node.store.writebehind import PendingInstance, SpoolWriter

#: bytes of an instance, as received or built
Buffer = bytes | bytearray | memoryview
#: the spool journal's ring file, in the data dir (:mod:`sci_node.store.journal`)
JOURNAL_NAME = "spool.journal"
_TMP_COUNTER = itertools.count()
_UID_RE = re.compile(r"^[0-9A-Za-z.\-_]{1,64}$")
#: seconds an instance too large for the journal waits for the write-behind queue to drain
DRAIN_SECONDS = 30.0


@dataclass(frozen=True)
class InstanceKey:
    """What the index needs to know about a received instance (taken from its header)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str



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


def write_durable(path: Path, data: bytes | Sequence[Buffer]) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, dir fsync).

    Raises
    ------
    OSError
        On any I/O failure; the temporary file is removed and ``path`` is untouched.
    """
    write_atomic(path, data, durable=True)


def write_atomic(path: Path, data: bytes | Sequence[Buffer], durable: bool) -> None:
    """Write ``data`` under a temporary name and rename it to ``path``; ``durable``: fsync file and folder.

    Without ``durable`` the file survives a crash of the process (page cache) but not a power
    loss: the caller has made the bytes durable elsewhere (the spool journal).

    Raises
    ------
    OSError
        On any I/O failure; the temporary file is removed and ``path`` is untouched.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_COUNTER)}.tmp")  # O_EXCL: never reused
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    try:  # the series folder usually exists: create (and fsync) the missing levels only when it does not
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        _makedirs_durable(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def _write_journaled(journal: SpoolJournal, rel: str, path: Path, chunks: Sequence[Buffer]) -> None:
    """Write the file (no fsync), then append its record (durable once this returns).

    The file comes first: a checkpoint after the append fsyncs it. When the append fails, a file
    that did not exist before is removed again (never acknowledged); a duplicate's stays.

    Raises
    ------
    OSError
        The file or the record could not be written.
    """
    existed = path.exists()
    write_atomic(path, chunks, durable=False)
    try:
        journal.append(rel, path, chunks)  # one (shared) fdatasync
    except OSError:
        if not existed:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


class Spool(IndexBase):
    """The spool part of :class:`~sci_node.store.Store`: files under ``spool/`` and their ``instances`` rows."""

    def instance_path(self, key: InstanceKey) -> Path:
        """Where the spool keeps an instance: ``spool/<study>/<series>/<sop>.dcm``."""
        return (self.spool_dir / _safe_name(key.study_uid) / _safe_name(key.series_uid)
                / f"{_safe_name(key.sop_uid)}.dcm")

    def spool_instance(self, key: InstanceKey, data: bytes | Sequence[Buffer],
                       calling_aet: str | None = None, opens_association: bool = False) -> bool | None:
        """Write an instance durably, then record it; return False for a duplicate SOP instance.

        With write-behind (:meth:`open_journal`), return once the instance is durable in the journal,
        with None: its file and row are written by the writer thread right after.

        A duplicate replaces the file atomically and counts once. An instance of a series
        that was already complete re-opens it (generation + 1) and cancels the earlier
        generations' unsent results: the completion check will then enqueue a job that
        supersedes the earlier one. ``opens_association``: the first instance of this series in
        its association, which counts the association as open on the series until
        :meth:`~sci_node.store.Store.association_ended` (a crash leaves it open:
        :meth:`~sci_node.store.Store.cut_by_restart`).

        Raises
        ------
        StorageError
            When the file or the index cannot be written (nothing was recorded), or while queued
            write-behind writes are failing (a full disk).
        """
        path = self.instance_path(key)
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        journaled = None
        try:
            journal, rel = self.journal, str(path.relative_to(self.data_dir))
            if journal is not None and journal.fits(sum(len(c) for c in chunks), rel):
                if self._writer is not None:
                    self._spool_behind(journal, self._writer, key, rel, chunks, calling_aet, opens_association)
                    return None
                _write_journaled(journal, rel, path, chunks)
                journaled = journal
            else:
                if self._writer is not None:  # a queued earlier version of this path must not land after this one
                    self._writer.drain(DRAIN_SECONDS)
                write_durable(path, chunks)
                if journal is not None:  # an earlier version journaled for this path must not replay over it
                    journal.checkpoint()
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc}") from exc
        try:
            return self._record_instance(key, path, calling_aet, opens_association)
        except StorageError:
            if journaled is not None and not path.exists():  # a retention purge took the folder: refused
                with contextlib.suppress(OSError):  # and its journal record must not bring it back
                    journaled.append(rel, path, ())  # an empty record: "no file" (replay skips the path)
            raise

    def _spool_behind(self, journal: SpoolJournal, writer: SpoolWriter, key: InstanceKey, rel: str,
                      chunks: Sequence[Buffer], calling_aet: str | None, opens_association: bool) -> None:
        """Append the instance to the journal (durable on return) and queue its file and row for the writer.

        Raises
        ------
        StorageError
            While queued writes are failing. OSError: the append failed (nothing acknowledged).
        """
        writer.check_accepting()
        path, now, frozen = self.instance_path(key), time.time(), tuple(chunks)

        def enqueue(seq: int) -> None:  # under the journal's lock: the queue keeps the records' order
            writer.submit(PendingInstance(key, path, frozen, seq, calling_aet, opens_association, now))

        journal.append(rel, path, chunks, enqueue=enqueue)

    def _write_behind(self, items: Sequence[PendingInstance]) -> None:
        """The writer thread's work for a run of queued instances: files, then one transaction for their rows.

        Raises
        ------
        OSError, StorageError
            On any failure (the writer retries the same run).
        """
        journal = self.journal
        for item in items:
            write_atomic(item.path, item.chunks, durable=False)
        if journal is not None:
            journal.written([(item.path, item.seq) for item in items])
        with self._lock, self._tx(sync_commit=False) as db:
            for item in items:
                self._record_row(db, item.key, item.path, item.calling_aet, item.opens_association, item.received_at)

    def _record_instance(self, key: InstanceKey, path: Path, calling_aet: str | None,
                         opens_association: bool = False) -> bool:
        # The bytes are durable already (the file fsync'd, or its spool journal record): the row is
        # rebuilt from the file by reconcile() (after the journal's replay) if a power loss drops this
        # (not fsync'd) commit.
        with self._lock, self._tx(sync_commit=False) as db:  # the lock: count cached in commit order
            return self._record_row(db, key, path, calling_aet, opens_association, time.time())

    def _record_row(self, db: Any, key: InstanceKey, path: Path, calling_aet: str | None,
                    opens_association: bool, now: float) -> bool:
        """Insert or update an instance's row and its series' (inside the caller's transaction); True if new."""
        try:  # under the lock: a retention purge may have moved the series away meanwhile
            size = path.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot record {path}: {exc}") from exc
        row = db.execute("SELECT state, generation, n_instances FROM series WHERE series_uid=?",
                         (key.series_uid,)).fetchone()
        count = 0 if row is None else int(row["n_instances"])
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
        cur = db.execute(
            "INSERT OR IGNORE INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, transfer_syntax,"
            " path, size, calling_aet, received_at, generation) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (key.sop_uid, key.series_uid, key.study_uid, key.sop_class_uid, key.transfer_syntax,
             str(path.relative_to(self.data_dir)), size, calling_aet, now, generation))
        is_new = cur.rowcount == 1
        count += is_new
        db.execute("UPDATE series SET last_received_at=?, n_instances = n_instances + ?,"
                   " open_associations = open_associations + ? WHERE series_uid=?",
                   (now, int(is_new), int(opens_association), key.series_uid))
        if not is_new:
            db.execute("UPDATE instances SET receptions = receptions + 1, received_at=?, generation=?,"
                       " size=?, transfer_syntax=? WHERE sop_uid=?",
                       (now, generation, size, key.transfer_syntax, key.sop_uid))
        self._remember_count(key.series_uid, count)  # forgotten again if the commit fails (_tx)
        return is_new

    def open_journal(self, size_bytes: int, write_behind: bool = False) -> int:
        """Replay the spool journal (after a crash), then journal every instance from now on.

        ``write_behind``: from now on :meth:`spool_instance` returns once the journal holds the instance
        and a writer thread writes its file and row (:mod:`sci_node.store.writebehind`).

        Every instance the journal holds whose file is missing or differs is written again
        durably (:func:`write_durable`); then a checkpoint starts a new epoch. Call before
        :meth:`reconcile`, which indexes the rewritten files if their rows were lost too.

        Returns
        -------
        int
            Instance files rewritten from the journal.
        """
        journal = SpoolJournal(self.data_dir / JOURNAL_NAME, size_bytes)
        latest: dict[str, bytes] = {}
        for rel, data in journal.records():
            latest.pop(rel, None)
            latest[rel] = data  # a duplicate's later bytes win
        restored = 0
        spool = self.spool_dir.resolve()
        for rel, data in latest.items():
            if not data:
                continue  # refused after its append (a purge took its folder): the file must stay gone
            path = (self.data_dir / rel).resolve()
            if spool not in path.parents:
                continue  # not a spool path: never ours
            with contextlib.suppress(OSError):
                if path.stat().st_size == len(data) and path.read_bytes() == data:
                    continue
            write_durable(path, data)
            restored += 1
        journal.checkpoint()
        journal.start()
        self.journal = journal
        if write_behind:
            self._writer = SpoolWriter(journal, self._write_behind)
        return restored

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
            if self.instance_path(key) == f:  # its association may have been cut by the stop: treat it so
                self._record_instance(key, f, None, opens_association=True)
                recorded += 1
        return recorded, removed

    def series_size(self, series_uid: str) -> int:
        """Instances recorded for a series (0 if unknown).

        Served from memory for a series this process recorded an instance of (the count its
        last committed row had), read from the index otherwise (and, with write-behind, kept from
        then on); a purge forgets it. Instances queued for write-behind count too (a queued duplicate
        counts until its row is written).
        """
        queued = self._writer.pending_in(series_uid) if self._writer is not None else 0
        counts: dict[str, int] | None = getattr(self, "_counts", None)
        cached = counts.get(series_uid) if counts is not None else None  # one dict read: no lock needed
        if cached is not None:
            return cached + queued
        with self._lock:
            counts = self._series_counts()
            if series_uid in counts:
                return counts[series_uid] + queued
            rows = self._query("SELECT n_instances FROM series WHERE series_uid=?", (series_uid,))
            count = int(rows[0][0]) if rows else 0
            if self._writer is not None:  # kept from now on: the next call must not wait for the writer's lock
                self._remember_count(series_uid, count)
            return count + queued

    def free_disk_mb(self) -> float:
        """Free space of the data directory's file system, in MiB."""
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize / 2**20
