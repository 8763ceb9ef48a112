"""One SQLite write transaction, shared by the job index and the corrections index."""
from __future__ import annotations

import contextlib
import sqlite3
from typing import Iterator

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
