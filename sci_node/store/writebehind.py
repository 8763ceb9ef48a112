"""Write-behind of the spool: the instance file and its index row are written after the C-STORE's Success.

With ``[limits] spool_write_behind`` (opt-in, off by default; needs the spool journal), the C-STORE's critical
path is: decode + checks, one append to the spool journal and its (shared) ``fdatasync``, Success. The
instance is durable then: its bytes are in the journal. :class:`SpoolWriter`, one thread, then writes
the file (temporary name, rename, no fsync) and commits the row, in the order the records were
appended, a run of queued instances at a time (one SQLite transaction per run). Other work that must
come after those rows (an association's end, :meth:`~sci_node.store.Store.association_ended`) goes
through the same queue.

Nothing acknowledged is lost: ``kill -9`` or a power loss with writes still queued leaves the records
in the journal; every start replays them (missing or different files rewritten) and re-indexes files
without a row (:meth:`~sci_node.store.spool.Spool.reconcile`). The journal never drops a record
before its file is written (:meth:`~sci_node.store.journal.SpoolJournal.written`).

Disk full: a write that fails (``ENOSPC`` at the file, ``SQLITE_FULL`` at the row) is retried every
``RETRY_SECONDS`` and, until the queue has drained, :meth:`SpoolWriter.check_accepting` refuses new
instances (the SCP answers ``0xA700`` as for any spool failure); the queued ones are in the journal.
Readers that must see every acknowledged instance ask :meth:`SpoolWriter.pending_in`: series
completion and retention leave a series with queued writes alone.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import structlog

from sci_node.errors import StorageError

if TYPE_CHECKING:
    from sci_node.store.journal import SpoolJournal
    from sci_node.store.spool import Buffer, InstanceKey

log = structlog.get_logger("sci_node.store.writebehind")

#: seconds between retries of a failed write (a full disk)
RETRY_SECONDS = 0.5
#: queued instances written (and their rows committed in one transaction) at a time
BATCH = 64
#: seconds the writer lets instances gather after the first is queued (fewer wake-ups and transactions)
GATHER_SECONDS = 0.05
#: seconds between two log lines about the same failing write
LOG_EVERY_SECONDS = 10.0


@dataclass(frozen=True)
class PendingInstance:
    """An acknowledged instance whose file and row are still to be written."""

    key: InstanceKey
    path: Path
    chunks: tuple[Buffer, ...]
    #: its append number in the spool journal
    seq: int
    calling_aet: str | None
    opens_association: bool
    received_at: float


#: what the queue holds: an instance, or work that must run after the instances queued before it
Pending = PendingInstance | Callable[[], None]


class SpoolWriter:
    """One thread writing queued instances (files, then rows) in journal order, retrying on failure.

    Parameters
    ----------
    journal
        The spool journal: a run is written only once its records are on disk there.
    apply
        Writes a run of instances: their files, :meth:`SpoolJournal.written`, their rows (raises on failure;
        called again with the same run).
    """

    def __init__(self, journal: SpoolJournal, apply: Callable[[Sequence[PendingInstance]], None]) -> None:
        self._journal = journal
        self._apply = apply
        self._queue: deque[Pending] = deque()
        self._series: dict[str, int] = {}  # series UID -> queued instances
        self._cond = threading.Condition()
        self._failure: str | None = None
        self._stopping = False
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    # -- the SCP's side --------------------------------------------------------------------------

    def check_accepting(self) -> None:
        """Raise while queued writes are failing: no new instance is acknowledged until they succeed.

        Raises
        ------
        StorageError
            With the failure and how many acknowledged instances wait for it.
        """
        if self._failure is not None:
            raise StorageError(f"{len(self._queue)} acknowledged instance(s) not yet written to the spool "
                               f"({self._failure}); refusing new instances until they are")

    def submit(self, item: Pending) -> None:
        """Queue an instance (the journal calls this under its lock, in append order) or an ordered action."""
        with self._cond:
            self._queue.append(item)
            if isinstance(item, PendingInstance):
                uid = item.key.series_uid
                self._series[uid] = self._series.get(uid, 0) + 1
            if len(self._queue) == 1 or len(self._queue) >= BATCH:  # else the writer is gathering anyway
                self._cond.notify_all()

    def pending_in(self, series_uid: str) -> int:
        """Queued (acknowledged, not yet indexed) instances of a series."""
        return self._series.get(series_uid, 0)

    def drain(self, timeout: float) -> None:
        """Return once everything queued so far is written.

        Raises
        ------
        StorageError
            When that takes longer than ``timeout`` seconds (the writes are failing).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StorageError(f"{len(self._queue)} queued spool write(s) not done after {timeout:.0f} s"
                                       f" ({self._failure or 'slow disk'})")
                self._cond.wait(left)

    def stop(self, timeout: float) -> int:
        """Write what is queued (for up to ``timeout`` s), then stop; return the writes left (they are journaled)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._halt.set()
            with self._cond:
                self._cond.notify_all()
            self._thread.join(5)
        return len(self._queue)

    # -- the thread ------------------------------------------------------------------------------

    def _next_run(self) -> list[Pending] | None:
        """The next run to write: up to ``BATCH`` queued instances, or one action; None to stop."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            deadline = time.monotonic() + GATHER_SECONDS
            while len(self._queue) < BATCH and not self._stopping and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            if not self._queue or self._halt.is_set():
                return None
            head = self._queue[0]
            if not isinstance(head, PendingInstance):
                return [head]
            run: list[Pending] = []
            for item in self._queue:
                if not isinstance(item, PendingInstance) or len(run) >= BATCH:
                    break
                run.append(item)
            return run

    def _write(self, run: list[Pending]) -> None:
        instances = [i for i in run if isinstance(i, PendingInstance)]
        if instances:
            self._journal.sync_through(max(i.seq for i in instances))  # durable before anything refers to it
            self._apply(instances)
        for item in run:
            if not isinstance(item, PendingInstance):
                item()

    def _run(self) -> None:
        last_log = 0.0
        while (run := self._next_run()) is not None:
            try:
                self._write(run)
            except Exception as exc:  # a full disk (OSError, StorageError), or anything: retried, never dropped
                reason = f"{type(exc).__name__}: {exc}"[:300]
                with self._cond:
                    self._failure = reason
                if time.monotonic() - last_log >= LOG_EVERY_SECONDS:
                    last_log = time.monotonic()
                    log.error("spool.write_behind_failed", reason=reason, queued=len(self._queue),
                              detail="acknowledged instances are in the spool journal; new ones are refused "
                                     "until these are written")
                if self._halt.wait(RETRY_SECONDS):
                    return
                continue
            with self._cond:
                for item in run:
                    self._queue.popleft()
                    if isinstance(item, PendingInstance):
                        self._forget(item.key.series_uid)
                if not self._queue:
                    if self._failure is not None:
                        log.warning("spool.write_behind_recovered", detail="queued instances written; accepting again")
                    self._failure = None
                self._cond.notify_all()

    def _forget(self, series_uid: str) -> None:
        """One queued instance of a series less (the caller holds the condition's lock)."""
        n = self._series.get(series_uid, 0) - 1
        if n > 0:
            self._series[series_uid] = n
        else:
            self._series.pop(series_uid, None)
