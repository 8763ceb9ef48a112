"""Write-behind (``[limits] spool_write_behind = true``, opt-in): Success once the instance is in the spool
journal, the file and the index row written after it by a writer thread. Against real parts: dcmtk
``storescu``, a real node process killed with SIGKILL, a real tmpfs filled up, and the writer held back by
another process holding the index's SQLite write lock (the writer waits on it exactly as on a slow disk).

The rule: every instance acknowledged with Success is, after any kill and a restart, in the spool (its
file parses) and in the index; a full disk at the deferred write refuses new instances (``0xA700``)
until the queued writes succeed, and loses nothing acknowledged.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Callable, Iterator

import pydicom
import pytest
from test_faults import _big_series, acked_files, index_rows, spool_sops

from sci_node.config import load_config
from sci_node.dicom.scp import start_scp
from sci_node.errors import StorageError
from sci_node.store import InstanceKey, Store
from sci_node.store import journal as journal_mod

from conftest import NodeProc, free_port, make_mr_series, mounted_tmpfs, storescu, wait_for

PLUMBING = 'processor = "derived-sc"\n[limits]\nspool_write_behind = true\n'


@contextlib.contextmanager
def index_write_lock(data_dir: Path) -> Iterator[None]:
    """Hold the index's SQLite write lock from this process: the node's writer thread waits on it."""
    con = sqlite3.connect(data_dir / "index.sqlite3", timeout=10, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        yield
        con.execute("ROLLBACK")
    finally:
        con.close()


def test_kill9_with_the_writer_held_back_loses_nothing_acknowledged(node_factory: Callable[..., NodeProc],
                                                                     tmp_path: Path) -> None:
    node = node_factory(PLUMBING, "--allow-ae", "SCANNER", "--stable-seconds", "30").start()
    series = make_mr_series(tmp_path / "series", n=100)
    sops = {f: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series}
    with index_write_lock(node.data_dir):
        res = storescu(node.port, series)
        acked = acked_files(res.stdout + res.stderr)
        assert res.returncode == 0 and len(acked) == 100, res.stdout[-2000:]
        # acknowledged while no row could be written: the critical path waits on the journal only
        assert index_rows(node.data_dir, "SELECT COUNT(*) FROM instances") == [(0,)]
        written = spool_sops(node.data_dir, allow_tmp=True)
        assert len(written) < 100, "the writer was not held back"
        node.kill9()
    node.start()
    log = node.log.read_text()
    assert '"node.spool_journal_replayed"' in log and '"node.reconciled_spool"' in log
    on_disk = spool_sops(node.data_dir)  # every file parses; no temporary file left
    indexed = {r[0] for r in index_rows(node.data_dir, "SELECT sop_uid FROM instances")}
    assert {sops[f] for f in acked} <= set(on_disk) and {sops[f] for f in acked} <= indexed
    assert index_rows(node.data_dir, "SELECT n_instances FROM series") == [(100,)]
    print(f"kill -9 with {100 - len(written)} of 100 acknowledged instances only in the journal and no row "
          f"written: after the restart 100 on disk and indexed")


@pytest.fixture
def tmpfs16(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB tmpfs (needs root, as in CI containers); unmounted at teardown."""
    with mounted_tmpfs(tmp_path / "tmpfs", "16m") as mnt:
        yield mnt


def _fill(mnt: Path, leave: int) -> Path:
    """A file that leaves about ``leave`` bytes free on ``mnt`` (an admin can delete it)."""
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - leave))
    return filler


def test_disk_full_at_the_deferred_write_refuses_new_instances_and_loses_none(tmpfs16: Path,
                                                                             tmp_path: Path) -> None:
    cfg = load_config(None, {"port": free_port(), "data_dir": str(tmpfs16 / "data"), "allowed_aes": ["SCANNER"],
                             "limits": {"min_free_disk_mb": 1, "spool_journal_mb": 8, "spool_write_behind": True}})
    store = Store(cfg.data_dir)
    store.open_journal(8 * 2**20, write_behind=True)
    ring = cfg.data_dir / "spool.journal"
    wait_for(lambda: ring.stat().st_size == 8 * 2**20, 10, what="the ring written ahead")
    filler = _fill(tmpfs16, 1_200_000)  # room for ~8 files of 130 kB: the journal has its own room
    server = start_scp(cfg, store)
    try:
        files = _big_series(tmp_path / "big", n=30)
        sops = {f: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        res = storescu(cfg.port, files, debug=True, extra=["-nh"])  # -nh: go on after a failed store
        out = res.stdout + res.stderr
        acked = [f for f in files if f in set(acked_files(out))]
        refused = out.lower().count("0xa700")
        assert 5 <= len(acked) < 30 and refused >= 1 and len(acked) + refused == 30, out[-3000:]
        with pytest.raises(StorageError, match="refusing new instances"):  # still refusing: the disk is full
            store.spool_instance(InstanceKey("1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.4",
                                             "1.2.840.10008.1.2.1"), b"x" * 1000)
        filler.unlink()  # an admin frees space: the queued writes succeed, nothing acknowledged was lost
        want = {sops[f] for f in acked}
        wait_for(lambda: {r[0] for r in store._query("SELECT sop_uid FROM instances")} == want, 10,
                 what="every acknowledged instance written and indexed")
        assert want <= set(spool_sops(cfg.data_dir))
        rest = [f for f in files if f not in set(acked)]
        res = storescu(cfg.port, rest)  # accepted again, no restart needed
        assert res.returncode == 0 and len(acked_files(res.stdout + res.stderr)) == len(rest), res.stdout[-2000:]
        wait_for(lambda: store.series_size(str(pydicom.dcmread(files[0]).SeriesInstanceUID)) == 30, 10,
                 what="the whole series indexed")
        print(f"disk full at the deferred write: {len(acked)} acknowledged (all written once space was freed), "
              f"{refused} refused with 0xA700; the rest accepted afterwards")
    finally:
        server.shutdown()
        store.close()


def test_the_ring_never_wraps_over_records_whose_file_is_not_written(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_mod, "CHECKPOINT_WAIT_SECONDS", 1.0)  # a full ring waits 1 s, not 30 s
    store = Store(tmp_path / "d")
    store.open_journal(8 * 2**20, write_behind=True)
    acked: dict[InstanceKey, bytes] = {}
    refused = 0
    with index_write_lock(tmp_path / "d"):  # the writer writes one run of files, then waits for the lock
        for i in range(250):  # 12.5 MB through an 8 MiB ring
            key = InstanceKey("1.2.3.1", "1.2.3.2", f"1.2.3.3.{i}", "1.2.840.10008.5.1.4.1.1.4",
                              "1.2.840.10008.1.2.1")
            data = os.urandom(50_000)
            try:
                store.spool_instance(key, data)
            except StorageError:
                refused += 1
                continue
            acked[key] = data
        assert refused and len(acked) < 170, (refused, len(acked))
        # a power loss now: the ring as it is on disk (every acknowledged append was fdatasync'd), no file
        (tmp_path / "lost").mkdir()
        (tmp_path / "lost" / "spool.journal").write_bytes((tmp_path / "d" / "spool.journal").read_bytes())
    wait_for(lambda: store.series_size("1.2.3.2") == len(acked) and store._writer is not None
             and not store._writer.pending_in("1.2.3.2"), 20, what="the writer catching up")
    store.close()
    again = Store(tmp_path / "lost")
    assert again.open_journal(8 * 2**20) == len(acked)  # every acknowledged record was still in the ring
    assert all(again.instance_path(k).read_bytes() == d for k, d in acked.items())
    again.close()
