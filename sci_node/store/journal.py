"""The spool journal: one ``fdatasync`` per received instance instead of a file fsync and a directory fsync.

Each instance file is written (temporary name, rename, no fsync), then its bytes are appended to
``spool.journal`` in the data dir (with its spool path and a CRC-32) and ``fdatasync``'d; only then is
its row committed and does the SCP answer Success. Appends of concurrent associations share one
``fdatasync`` (group commit). ``kill -9`` loses nothing: the file is in the page cache. At every
start the node replays the journal (:meth:`SpoolJournal.records`,
:meth:`~sci_node.store.spool.Spool.open_journal`): every recorded instance whose file a power loss
lost or left different is rewritten durably.

The ring is written with zeros before use (``GROW_BYTES`` at creation, then a background thread keeps
``2 * GROW_BYTES`` written ahead of the last append, up to the ring's size; an append past the written
part grows it itself), so an append overwrites allocated blocks and its ``fdatasync`` flushes data only
(no file-system journal commit for a size or extent change). When the ring is full, a *checkpoint*
fsyncs every instance file (and folder) written since the last one and starts a new epoch at the
ring's start: records of older epochs are never replayed. A background thread checkpoints once the
journal has been idle ``IDLE_CHECKPOINT_SECONDS`` (and, once half full, fsyncs the pending files while
appends go on), so a full ring rarely stalls an association. Two header slots hold the current epoch
(the newer valid one wins: a torn header write is harmless).

With the spool's write-behind (:mod:`sci_node.store.writebehind`), the record is appended *first* and the
file written afterwards by the writer thread (:meth:`SpoolJournal.append` with ``enqueue``, then
:meth:`SpoolJournal.written`): a checkpoint (a new epoch, which drops the records) then waits until every
appended record's file is written, so the ring never wraps over an instance that exists only in it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

#: header slot: magic, epoch, CRC-32 of the two
_HEAD = struct.Struct("<4sQI")
_HEAD_MAGIC = b"SCJH"
#: record: magic, epoch, path length, payload length, CRC-32 of path + payload
_REC = struct.Struct("<4sQHII")
_REC_MAGIC = b"SCJR"
SLOT_BYTES = 4096
DATA_START = 2 * SLOT_BYTES
#: the ring is pre-written in steps of this many bytes (zeros, then fsync)
GROW_BYTES = 4 * 2**20
IDLE_CHECKPOINT_SECONDS = 1.0
#: how long a checkpoint waits for the write-behind thread to write the files of appended records
CHECKPOINT_WAIT_SECONDS = 30.0


def _crc(*parts: bytes | bytearray | memoryview) -> int:
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return crc


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return  # replaced or purged since: its successor was journaled (or purge checkpointed first)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolJournal:
    """A pre-written ring file of instance records, one ``fdatasync`` per append.

    Parameters
    ----------
    path
        The ring file (created 0600 if missing).
    size_bytes
        The ring's size; a record larger than the ring minus its headers is refused by :meth:`fits`.
    """

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = Path(path)
        self.size = max(int(size_bytes), DATA_START + GROW_BYTES)
        self._lock = threading.Lock()
        self._pending: dict[Path, int] = {}  # files written since the last checkpoint -> their append number
        self._appends = 0
        self._synced = 0  # appends known to be on disk
        self._syncing = False
        self._sync_cond = threading.Condition()
        self._growing = False  # the background thread is pre-writing past _written
        self._grown = threading.Condition(self._lock)
        self._unwritten: set[int] = set()  # appends whose file the write-behind thread has not written yet
        self._all_written = threading.Condition(self._lock)
        self._last_append = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._written = os.fstat(self._fd).st_size  # pre-written bytes
        if created:
            self._grow(DATA_START)
            _fsync_path(self.path.parent, directory=True)
        self.epoch = self._read_epoch()
        self._head = DATA_START

    # -- reading ------------------------------------------------------------------------------

    def _read_epoch(self) -> int:
        best = 0
        for slot in (0, 1):
            raw = os.pread(self._fd, _HEAD.size, slot * SLOT_BYTES)
            if len(raw) < _HEAD.size:
                continue
            magic, epoch, crc = _HEAD.unpack(raw)
            if magic == _HEAD_MAGIC and crc == _crc(raw[:12]):
                best = max(best, epoch)
        return best

    def records(self) -> Iterator[tuple[str, bytes]]:
        """The current epoch's records in append order: (spool path relative to the data dir, file bytes).

        Stops at the first record that is not whole (a torn last append: never acknowledged).
        """
        off = DATA_START
        while off + _REC.size <= self._written:
            raw = os.pread(self._fd, _REC.size, off)
            magic, epoch, n_path, n_data, crc = _REC.unpack(raw)
            end = off + _REC.size + n_path + n_data
            if magic != _REC_MAGIC or epoch != self.epoch or end > self._written:
                return
            body = os.pread(self._fd, n_path + n_data, off + _REC.size)
            if len(body) != n_path + n_data or _crc(body) != crc:
                return
            yield body[:n_path].decode("utf-8"), body[n_path:]
            off = end

    # -- writing ------------------------------------------------------------------------------

    def fits(self, nbytes: int, rel_path: str) -> bool:
        """Whether a record of ``nbytes`` of data for ``rel_path`` fits in the ring at all."""
        return DATA_START + _REC.size + len(rel_path.encode("utf-8")) + nbytes <= self.size

    def append(self, rel_path: str, target: Path, chunks: Sequence[bytes | bytearray | memoryview],
               enqueue: Callable[[int], None] | None = None) -> int:
        """Append one instance record and return its append number once it is on disk.

        Without ``enqueue``, call it after ``target`` holds the bytes (written, not fsync'd): a checkpoint
        from then on fsyncs it. With ``enqueue`` (write-behind), ``target`` is written later:
        ``enqueue(number)`` is called under the journal's lock right after the record is written (so
        records and queued writes have one order), and until :meth:`written` reports the file, no
        checkpoint drops the record. Concurrent appends share one ``fdatasync`` (group commit,
        :meth:`sync_through`).

        Raises
        ------
        OSError
            On an I/O failure (nothing acknowledged may rely on the record then), or when the ring is
            full and the write-behind thread did not write the files of its records within
            ``CHECKPOINT_WAIT_SECONDS`` (a full disk).
        """
        name = rel_path.encode("utf-8")
        n_data = sum(len(c) for c in chunks)
        crc = _crc(name, *chunks)
        size = _REC.size + len(name) + n_data
        with self._lock:
            while self._head + size > self.size:
                self._checkpoint_locked(CHECKPOINT_WAIT_SECONDS)
            while self._growing and self._head + size > self._written:
                self._grown.wait()  # the background thread is writing zeros where this record goes
            if self._head + size > self._written:
                self._grow(self._head + size)
            buffers = [_REC.pack(_REC_MAGIC, self.epoch, len(name), n_data, crc), name, *chunks]
            off, total = self._head, size
            while total:
                n = os.pwritev(self._fd, buffers, off)
                off, total = off + n, total - n
                buffers = _drop(buffers, n)
            self._head = off
            self._appends += 1
            seq = self._appends
            if enqueue is None:
                self._pending[target] = seq
            else:
                self._unwritten.add(seq)
                enqueue(seq)
            self._last_append = time.monotonic()
        self.sync_through(seq)
        return seq

    def written(self, files: Sequence[tuple[Path, int]]) -> None:
        """The write-behind thread wrote these files (with their append numbers): fsync them at the next checkpoint."""
        with self._lock:
            for target, seq in files:
                self._pending[target] = seq
                self._unwritten.discard(seq)
            if not self._unwritten:
                self._all_written.notify_all()

    def sync_through(self, seq: int) -> None:
        """Return once append number ``seq`` is on disk: one ``fdatasync`` covers every append written before it."""
        with self._sync_cond:
            while self._synced < seq:
                if self._syncing:  # another thread's fdatasync is running: it may cover ours
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                target = self._appends  # every append numbered up to here is written (under _lock)
                self._sync_cond.release()
                try:
                    os.fdatasync(self._fd)
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._sync_cond.notify_all()
                self._synced = max(self._synced, target)

    def _grow(self, needed: int) -> None:
        """Pre-write zeros up to ``needed`` (rounded up to ``GROW_BYTES``, at most the ring size), fsync.

        The caller holds ``_lock`` (or is the constructor).
        """
        new_end = min(self.size, -(-max(needed, self._written + 1) // GROW_BYTES) * GROW_BYTES)
        _write_zeros(self._fd, self._written, new_end)
        self._written = new_end

    def _grow_ahead(self) -> None:
        """Pre-write the next ``GROW_BYTES`` of the ring without holding up appends (background thread).

        An append that needs the region meanwhile waits for it (``_growing``): zeros must never
        land on a record.
        """
        with self._lock:
            start = self._written
            end = min(self.size, start + GROW_BYTES)
            if end <= start:
                return
            self._growing = True
        done = False
        try:
            _write_zeros(self._fd, start, end)
            done = True
        finally:
            with self._lock:
                self._growing = False
                if done:
                    self._written = end
                self._grown.notify_all()

    def checkpoint(self, wait: float = CHECKPOINT_WAIT_SECONDS) -> None:
        """Make every file written since the last checkpoint durable, then start a new epoch at the ring's start.

        Waits up to ``wait`` seconds for the write-behind thread to write the files of appended records.

        Raises
        ------
        OSError
            On an I/O failure, or when files of appended records are still unwritten after ``wait``.
        """
        with self._lock:
            self._checkpoint_locked(wait)

    def _checkpoint_locked(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while self._unwritten:  # the ring must never drop a record whose file is not written yet
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(errno.EAGAIN, f"spool journal: {len(self._unwritten)} instance file(s) not written yet")
            self._all_written.wait(left)
        pending, self._pending = list(self._pending), {}
        _fsync_files(pending)
        self.epoch += 1
        slot = _HEAD.pack(_HEAD_MAGIC, self.epoch, 0)[:12]
        os.pwrite(self._fd, slot + struct.pack("<I", _crc(slot)), (self.epoch % 2) * SLOT_BYTES)
        os.fdatasync(self._fd)
        self._head = DATA_START

    # -- background checkpoints ----------------------------------------------------------------

    def start(self) -> None:
        """Start the thread that checkpoints when idle or half full (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spool-journal", daemon=True)
            self._thread.start()

    def flush(self) -> None:
        """fsync the files written since the last checkpoint without holding up appends meanwhile.

        A file appended again while this runs stays pending (its new bytes may not be flushed yet).
        """
        with self._lock:
            snapshot = dict(self._pending)
        _fsync_files(list(snapshot))
        with self._lock:
            for f, n in snapshot.items():
                if self._pending.get(f) == n:
                    del self._pending[f]

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            if self._written < self.size and self._written - self._head < 2 * GROW_BYTES:
                with contextlib.suppress(OSError):  # e.g. disk full: appends grow it themselves then
                    self._grow_ahead()
            with contextlib.suppress(OSError):  # retried next time; a full ring checkpoints in append()
                with self._lock:
                    idle = time.monotonic() - self._last_append >= IDLE_CHECKPOINT_SECONDS
                    busy_half = self._head - DATA_START > (self.size - DATA_START) // 2
                    work = bool(self._pending) or (idle and self._head > DATA_START)
                if work and (idle or busy_half):
                    self.flush()  # the slow part, appends go on meanwhile
                    if idle:
                        with self._lock:  # little or nothing left to fsync: a new epoch from the start
                            if not self._unwritten:  # never wait for the write-behind thread here
                                self._checkpoint_locked(0.0)

    def close(self) -> None:
        """Stop the thread, checkpoint, close the ring."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(OSError):  # records whose file is not written yet stay: replayed at the next start
            self.checkpoint(wait=0.0)
        with self._lock:
            os.close(self._fd)


def _write_zeros(fd: int, start: int, end: int) -> None:
    """Write zeros into ``fd`` from ``start`` to ``end`` and fsync (the file's size changes)."""
    zeros = bytes(min(GROW_BYTES, 2**20))
    off = start
    while off < end:
        off += os.pwrite(fd, zeros[: end - off], off)
    os.fsync(fd)


def _fsync_files(files: Sequence[Path]) -> None:
    """fsync each file, then each folder they are in (their names)."""
    for f in files:
        _fsync_path(f)
    for d in dict.fromkeys(f.parent for f in files):
        _fsync_path(d, directory=True)


def _drop(buffers: list[bytes | bytearray | memoryview], n: int) -> list[bytes | bytearray | memoryview]:
    """``buffers`` without their first ``n`` bytes (after a short ``pwritev``)."""
    out: list[bytes | bytearray | memoryview] = []
    for b in buffers:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(memoryview(b)[n:] if n else b)
        n = 0
    return out
