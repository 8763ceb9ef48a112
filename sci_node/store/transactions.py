"""One SQLite write transaction (shared by the node's index and the corrections index), and the base the
parts of :class:`~sci_node.store.Store` share: its connection, lock, transactions and reads."""
from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from sci_node.errors import StorageError

if TYPE_CHECKING:
    from sci_node.store.journal import SpoolJournal
    from sci_node.store.writebehind import SpoolWriter

#: series whose instance count the index keeps in memory (:meth:`IndexBase._remember_count`)
MAX_CACHED_COUNTS = 10_000


@contextlib.contextmanager
def write_tx(db: sqlite3.Connection, where: str) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on ``db``; rolled back on any exception.

    SQLite errors (also of ``BEGIN`` and ``COMMIT``) are raised as :class:`StorageError`
    prefixed with ``where`` (the index's name or path); other exceptions pass unchanged
    after the rollback. The caller holds whatever lock guards ``db``.
    """
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise StorageError(f"{where}: {exc}") from exc
    try:
        yield db
        db.execute("COMMIT")
    except BaseException as exc:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"{where}: {exc}") from exc
        raise


class IndexBase:
    """What the parts of :class:`~sci_node.store.Store` share: the data dir, one connection and its lock.

    :class:`~sci_node.store.Store` opens them; the parts (spool, series state, jobs, outbox) read
    through :meth:`_query` and write through :meth:`_tx` only.
    """

    data_dir: Path
    spool_dir: Path
    results_dir: Path
    _db: sqlite3.Connection
    _lock: threading.RLock
    #: the spool journal, once the node opened it (:meth:`~sci_node.store.spool.Spool.open_journal`)
    journal: SpoolJournal | None = None
    #: the write-behind thread (:mod:`sci_node.store.writebehind`), with ``open_journal(..., write_behind=True)``
    _writer: SpoolWriter | None = None
    #: series instance counts kept in memory (:meth:`_remember_count`), created on first use
    _counts: dict[str, int]

    def close(self) -> None:
        """Write what the write-behind thread holds (up to 30 s), close the spool journal (checkpointed first)
        and the index connection. Writes still queued then stay in the journal (replayed at the next start)."""
        if self._writer is not None:
            self._writer.stop(30.0)
            self._writer = None
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self, sync_commit: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), errors as :class:`StorageError`.

        ``sync_commit=False`` commits without fsyncing the WAL (synchronous=NORMAL): the
        commit survives a process crash but not a power loss. Only for rows that
        :meth:`reconcile` can rebuild from fsync'd spool files. A failed transaction forgets the
        in-memory series counts (:meth:`_remember_count`): the index answers again.
        """
        where = f"index {self.data_dir / 'index.sqlite3'}"
        mode = "FULL" if sync_commit else "NORMAL"
        with self._lock:
            if getattr(self, "_synchronous", "FULL") != mode:  # set only on a change: instance rows come in runs
                try:
                    self._synchronous = "unknown"
                    self._db.execute(f"PRAGMA synchronous={mode}")
                    self._synchronous = mode
                except sqlite3.Error as exc:
                    raise StorageError(f"{where}: {exc}") from exc
            try:
                with write_tx(self._db, where) as db:
                    yield db
            except BaseException:
                self._series_counts().clear()  # a count remembered inside the rolled-back transaction
                raise

    def _series_counts(self) -> dict[str, int]:
        """The in-memory series counts (created on first use; the caller holds ``_lock``)."""
        counts: dict[str, int] | None = getattr(self, "_counts", None)
        if counts is None:
            counts = {}
            self._counts = counts
        return counts

    def _remember_count(self, series_uid: str, count: int | None) -> None:
        """Keep (``None``: forget) a series' instance count; at most ``MAX_CACHED_COUNTS`` series are kept."""
        counts = self._series_counts()
        if count is None:
            counts.pop(series_uid, None)
            return
        if len(counts) >= MAX_CACHED_COUNTS and series_uid not in counts:
            counts.clear()  # rare: the index answers until the series are seen again
        counts[series_uid] = count

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"index {self.data_dir / 'index.sqlite3'}: {exc}") from exc

    def tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction for an adapter that keeps its own rows here (the dispatch ledger)."""
        return self._tx()

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """A read on the index (errors as :class:`StorageError`)."""
        return self._query(sql, args)
