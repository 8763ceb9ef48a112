"""``sci-node stack`` as a subprocess for the Orthanc and viewer tests (real Orthanc, real node).

One stack per test session is shared by ``test_orthanc_stack.py`` and ``test_viewer.py``
(:func:`shared_stack`): starting Orthanc + the node and running the pipeline on the sample
series once keeps the suite small. Ports are free loopback ports; Orthanc's DICOM port listens on
127.0.0.1 only and accepts the scanners given (``SCANNER@127.0.0.1`` unless a test says otherwise).
"""
from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pyorthanc import Orthanc

from sci_node.app.stack import die_with_parent

from conftest import DCMTK_ENV, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
SAMPLE = sorted((REPO / "sample" / "series").glob("*.dcm"))
USER, PASSWORD = "tester", "s3cret-test-pw"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback and on the wildcard address (Orthanc's DICOM port)."""
    import socket

    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", p))
            except OSError:
                continue
        if p not in ports:
            ports.append(p)
    return ports


@dataclass
class StackProc:
    """``sci-node stack`` in a subprocess, with its ports, data dir and an Orthanc client."""

    data_dir: Path
    toml: str = ""
    stable_seconds: float = 1.0
    #: ``--scanner`` flags: the modalities Orthanc accepts besides the node
    scanners: tuple[str, ...] = ("SCANNER@127.0.0.1",)
    extra_args: tuple[str, ...] = ()
    http: int = 0
    dicom: int = 0
    node: int = 0
    proc: subprocess.Popen[str] | None = None
    out_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.http, self.dicom, self.node = free_ports(3)
        self.out_path = self.data_dir.parent / (self.data_dir.name + "-stack.out")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def start(self, timeout: float = 180) -> "StackProc":
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)  # the stack creates its data dir (0700)
        conf = self.data_dir.parent / (self.data_dir.name + ".toml")
        conf.write_text(self.toml)
        argv = [sys.executable, "-m", "sci_node.cli", "stack", "--config", str(conf), "--data-dir", str(self.data_dir),
                "--http-port", str(self.http), "--dicom-port", str(self.dicom), "--node-port", str(self.node),
                "--stable-seconds", str(self.stable_seconds), "--log-format", "json",
                *(a for sc in self.scanners for a in ("--scanner", sc)), *self.extra_args]
        env = {**os.environ, "SCI_ORTHANC_USER": USER, "SCI_ORTHANC_PASSWORD": PASSWORD}
        out = open(self.out_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=REPO, text=True,
                                     preexec_fn=die_with_parent)  # a killed pytest takes the stack along
        out.close()
        wait_for(lambda: "Ctrl-C stops both" in self.output() or self.proc.poll() is not None, timeout,
                 interval=0.3, what="sci-node stack to come up")
        assert self.proc.poll() is None, f"sci-node stack exited early:\n{self.output()[-4000:]}"
        return self

    def output(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace") if self.out_path.exists() else ""

    def child_pids(self) -> dict[str, int]:
        """Orthanc's and the node's pids, from the stack's log lines."""
        pids = {}
        for line in self.output().splitlines():
            if '"stack_child_started"' in line:
                rec = json.loads(line)
                pids[rec["child"]] = int(rec["pid"])
        return pids

    def client(self, user: str = USER, password: str = PASSWORD) -> Orthanc:
        return Orthanc(self.url, username=user, password=password, timeout=30, trust_env=False)

    def storescu(self, files: list[Path], calling: str = "SCANNER") -> None:
        res = self.try_storescu(files, calling)
        assert res.returncode == 0, res.stdout + res.stderr

    def try_storescu(self, files: list[Path], calling: str = "SCANNER", called: str = "ORTHANC",
                     host: str = "127.0.0.1", tls: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        """dcmtk ``storescu`` into Orthanc (``tls``: storescu's TLS options); the completed process."""
        return subprocess.run(["storescu", *(tls or []), "-aet", calling, "-aec", called, host, str(self.dicom),
                               *map(str, files)], capture_output=True, text=True, timeout=120, env=DCMTK_ENV)

    def find_series(self, study_uid: str, modality: str) -> list[str]:
        query = {"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": modality}}
        try:
            return list(self.client().post_tools_find(json=query))
        except httpx.TransportError:  # an idle keep-alive connection closed under us: once more
            return list(self.client().post_tools_find(json=query))

    def sci_node_jobs(self, path: str = "/sci-node/jobs") -> dict[str, Any]:
        r = httpx.get(self.url + path, auth=(USER, PASSWORD), timeout=60, trust_env=False)
        r.raise_for_status()
        return r.json()

    def stop(self) -> int | None:
        """SIGTERM the stack (what Ctrl-C/systemd do) and return its exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


def local_ipv4() -> str:
    """An IPv4 address of this host that is not loopback (a sender "from another host" in the tests)."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            addr = socket.inet_ntoa(raw[20:24])
            if not addr.startswith("127."):
                return addr
    raise AssertionError("this host has no non-loopback IPv4 address: the DICOM exposure tests need one")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


@dataclass
class ProcessedStudy:
    """The sample series sent into the shared stack and the results that came back."""

    stack: StackProc
    study_uid: str
    seg_series: list[str]
    seconds_to_seg: float


_SHARED: dict[str, Any] = {}


def shared_stack(tmp_root: Path) -> ProcessedStudy:
    """Start the session's stack once, send the sample series, wait for its SEG (real pipeline)."""
    if "study" in _SHARED:
        return _SHARED["study"]
    assert SAMPLE, "the committed sample series (sample/series/*.dcm) is missing"
    stack = StackProc(tmp_root / "stack-data").start()
    atexit.register(stack.stop)
    study_uid = str(pydicom.dcmread(SAMPLE[0], stop_before_pixels=True).StudyInstanceUID)
    t0 = time.monotonic()
    stack.storescu(SAMPLE)
    deadline = time.monotonic() + 600
    segs: list[str] = []
    while time.monotonic() < deadline and not segs:
        assert stack.proc is not None and stack.proc.poll() is None, stack.output()[-4000:]
        segs = stack.find_series(study_uid, "SEG")
        if not segs:
            ended = [j for j in stack.sci_node_jobs()["jobs"] if j.get("state") in ("failed", "routed-out")]
            assert not ended, f"the node did not segment the sample series: {json.dumps(ended, default=str)[:3000]}"
            time.sleep(1.0)
    assert segs, (f"no SEG in study {study_uid} within 600 s; node jobs: "
                  f"{json.dumps(stack.sci_node_jobs()['jobs'], default=str)[-3000:]}")
    _SHARED["study"] = ProcessedStudy(stack, study_uid, segs, time.monotonic() - t0)
    return _SHARED["study"]


def seg_series_uid(stack: StackProc, orthanc_series_id: str) -> str:
    return str(stack.client().get_series_id(orthanc_series_id)["MainDicomTags"]["SeriesInstanceUID"])


def orthanc_log(stack: StackProc) -> str:
    path = stack.data_dir / "logs" / "orthanc.log"
    return path.read_text(errors="replace") if path.exists() else ""


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))
