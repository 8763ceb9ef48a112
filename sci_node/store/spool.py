"""The spool: received instances on disk, written durably, and their rows in the index.

Durability rule: an instance file is written under a temporary name, fsync'd, renamed
into place and its directory fsync'd; only then is it recorded in the index (one
committed transaction). The SCP acknowledges Success only after :meth:`Spool.spool_instance`
returned, so an acknowledged instance survives ``kill -9`` and power loss.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sci_node.errors import StorageError
from sci_node.store.outbox import _hold_stale_results
from sci_node.store.private_files import make_private_dirs
from sci_node.store.transactions import IndexBase

_UID_RE = re.compile(r"^[0-9A-Za-z.\-_]{1,64}$")


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



class Spool(IndexBase):
    """The spool part of :class:`~sci_node.store.Store`: files under ``spool/`` and their ``instances`` rows."""

    def instance_path(self, key: InstanceKey) -> Path:
        """Where the spool keeps an instance: ``spool/<study>/<series>/<sop>.dcm``."""
        return (self.spool_dir / _safe_name(key.study_uid) / _safe_name(key.series_uid)
                / f"{_safe_name(key.sop_uid)}.dcm")

    def spool_instance(self, key: InstanceKey, data: bytes | Sequence[bytes],
                       calling_aet: str | None = None, opens_association: bool = False) -> bool:
        """Write an instance durably, then record it; return False for a duplicate SOP instance.

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
            When the file or the index cannot be written (nothing was recorded).
        """
        path = self.instance_path(key)
        try:
            write_durable(path, data)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc}") from exc
        return self._record_instance(key, path, calling_aet, opens_association)

    def _record_instance(self, key: InstanceKey, path: Path, calling_aet: str | None,
                         opens_association: bool = False) -> bool:
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
            if opens_association:
                db.execute("UPDATE series SET open_associations = open_associations + 1 WHERE series_uid=?",
                           (key.series_uid,))
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
