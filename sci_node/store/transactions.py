"""One SQLite write transaction (shared by the node's index and the corrections index), and the base the
parts of :class:`~sci_node.store.Store` share: its connection, lock, transactions and reads."""
from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from sci_node.errors import StorageError


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

    def tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction for an adapter that keeps its own rows here (the dispatch ledger)."""
        return self._tx()

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """A read on the index (errors as :class:`StorageError`)."""
        return self._query(sql, args)
