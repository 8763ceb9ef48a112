"""Shared test helpers: free ports, small MR series, real peers (the node, dcmtk) as subprocesses.

Every subprocess is started through a fixture whose finalizer kills it; every wait has a
timeout. dcmtk runs with ``TCP_NODELAY=1`` in its environment (dcmtk reads it to disable
Nagle), our node sets TCP_NODELAY itself.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

VENV_BIN = Path(sys.executable).parent
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """In-process code logs to this test's streams: a CLI test run before may have configured
    structlog with a capture stream pytest has closed since."""
    import structlog

    structlog.reset_defaults()
    yield


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    """Poll ``pred`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def make_mr_series(out_dir: Path, n: int = 8, *, source: str = "MR_small.dcm", study_uid: str | None = None,
                   series_uid: str | None = None, step_mm: float | None = None) -> list[Path]:
    """Write ``n`` slices of a synthetic MR series built from pydicom's ``source`` test file.

    Each slice gets its own SOP Instance UID and an Image Position Patient moved along the
    slice normal by ``step_mm`` (default: the slice thickness), so the series is one volume.
    The transfer syntax (and compression) of ``source`` is kept.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(get_testdata_file(source))
    study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
    iop = np.asarray([float(v) for v in src.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    step = float(step_mm if step_mm is not None else src.SliceThickness)
    paths = []
    for i in range(n):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in np.asarray(src.ImagePositionPatient, float)
                                   + normal * step * i]
        path = out_dir / f"slice{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, files: Sequence[Path], calling: str = "SCANNER", called: str = "SCINODE",
             timeout: float = 60, extra: Sequence[str] = (), debug: bool = False) -> subprocess.CompletedProcess[str]:
    """Run dcmtk ``storescu`` (verbose; ``debug`` prints the DIMSE status codes in hex)."""
    cmd = ["storescu", "-d" if debug else "-v", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


def echoscu(port: int, calling: str = "SCANNER", called: str = "SCINODE",
            timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run dcmtk ``echoscu`` and return the result."""
    return subprocess.run(["echoscu", "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


def _kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class StoreSCP:
    """A dcmtk ``storescp`` destination writing into ``out_dir``.

    ``+uf`` (unique file names): a result delivered twice would show up as two files, so
    "exactly once" is checked by counting files.
    """

    port: int
    out_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "StoreSCP":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(self.out_dir), "+xa", "+uf",
                                          str(self.port)], stdout=fh, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        wait_for(lambda: port_open(self.port), 10, what=f"storescp on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _kill(self.proc, signal.SIGTERM)
            self.proc = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file()) if self.out_dir.exists() else []


@dataclass
class NodeProc:
    """``sci-node serve`` as a subprocess on a free port with its own data dir."""

    port: int
    data_dir: Path
    config: Path
    log: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> "NodeProc":
        exe = VENV_BIN / "sci-node"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sci_node.cli"]
        cmd += ["serve", "--config", str(self.config), "--port", str(self.port), "--data-dir", str(self.data_dir),
                "--log-format", "json", *self.args]
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc is not None and (self.proc.poll() is not None or port_open(self.port)),
                 timeout, what=f"sci-node on port {self.port}")
        assert self.proc.poll() is None, f"sci-node exited early:\n{self.log.read_text()[-3000:]}"
        return self

    def kill9(self) -> None:
        if self.proc is not None:
            _kill(self.proc, signal.SIGKILL)
            self.proc = None

    def stop(self) -> int | None:
        """SIGTERM, wait; return the exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        _kill(proc, signal.SIGTERM)
        return proc.returncode

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run another ``sci-node`` command on the same config/data dir."""
        exe = VENV_BIN / "sci-node"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sci_node.cli"]
        return subprocess.run([*cmd, *argv, "--config", str(self.config), "--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, timeout=60)

    def jobs(self, limit: int = 20) -> list[dict]:
        """``sci-node jobs list --json``: the most recent jobs first."""
        res = self.cli("jobs", "list", "--json", "--limit", str(limit))
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def job_if_exists(self, job_id: int) -> dict | None:
        """``sci-node jobs show ID --json``, or None while the job does not exist yet."""
        res = self.cli("jobs", "show", str(job_id), "--json")
        if res.returncode != 0:
            assert "does not exist" in res.stderr, res.stderr
            return None
        return json.loads(res.stdout)

    def job(self, job_id: int) -> dict:
        """``sci-node jobs show ID --json`` of a job that must exist."""
        job = self.job_if_exists(job_id)
        assert job is not None, f"job {job_id} does not exist"
        return job


@pytest.fixture
def storescp_factory(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Start dcmtk storescp destinations; all are killed at teardown."""
    started: list[StoreSCP] = []

    def factory(port: int | None = None, name: str = "dest") -> StoreSCP:
        scp = StoreSCP(port or free_port(), tmp_path / name / "out", tmp_path / f"{name}.log")
        started.append(scp)
        return scp.start()

    yield factory
    for scp in started:
        scp.stop()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProc]]:
    """Build (not start) ``sci-node serve`` subprocesses; all are killed at teardown.

    ``factory(toml_text, *args)`` writes ``toml_text`` as the config; ``args`` are extra CLI flags.
    """
    made: list[NodeProc] = []

    def factory(toml_text: str = "", *args: str, name: str = "node") -> NodeProc:
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(toml_text)
        node = NodeProc(free_port(), tmp_path / f"{name}-data", cfg, tmp_path / f"{name}.log", list(args))
        made.append(node)
        return node

    yield factory
    for node in made:
        node.kill9()


def dcmtk_available() -> bool:
    return all(shutil.which(t) for t in ("storescu", "storescp", "echoscu"))


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (``"4m"``) mounted at ``mnt`` (needs root, as in CI containers); unmounted after."""
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)], check=True,
                   timeout=20, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], timeout=20, capture_output=True)
