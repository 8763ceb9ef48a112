"""Files and folders under the data dir are private to the node's user: folders 0700, files 0600.

They hold patient data (spooled instances, results, corrections with their source series, the
SQLite indexes with Patient IDs and UIDs, Orthanc's storage, logs with UIDs). Everything is
*created* with those modes, never chmod'ed afterwards (a file that exists for a moment with mode
0644 can be opened by another user, and stays open):

* the CLI sets the process umask to 077 (:func:`restrict_umask`) before any command that touches
  the data dir runs, so files written by libraries (highdicom, SimpleITK, SQLite, Orthanc as a
  child process, which inherits it) are created 0600 / 0700 too;
* sci-node's own writes name the mode as well (:func:`make_private_dirs`, :func:`open_private`,
  :func:`write_private`, :func:`create_private`), so they are private whatever the umask.

SQLite creates its ``-wal`` and ``-shm`` files with the mode of the database file: a database
created 0600 here (:func:`create_private` before ``sqlite3.connect``) gets private WAL files.
"""
from __future__ import annotations

import os
from pathlib import Path

#: mode of every folder under the data dir
DIR_MODE = 0o700
#: mode of every file under the data dir
FILE_MODE = 0o600
#: the umask of a process that writes the data dir (no group or other permission bits)
PRIVATE_UMASK = 0o077


def restrict_umask() -> int:
    """Set the process umask to 077 (process-wide, for every thread and child); return the previous one."""
    return os.umask(PRIVATE_UMASK)


def make_private_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents, each with mode 0700; return the folders created, outermost first.

    ``os.makedirs(mode=...)`` gives the mode to the last folder only (parents get 0777 & ~umask).

    Raises
    ------
    OSError
        A folder cannot be created (permissions, a file in the way).
    """
    missing: list[Path] = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue
        created.append(d)
    return created


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_APPEND) -> int:
    """``os.open`` with mode 0600 for a file it creates (an existing file keeps its mode); the descriptor."""
    return os.open(path, flags | os.O_CLOEXEC, FILE_MODE)


def create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (e.g. a database before SQLite opens it)."""
    os.close(open_private(path, os.O_WRONLY | os.O_CREAT))


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new or truncated file created with mode 0600 (not atomic, not fsync'd)."""
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
