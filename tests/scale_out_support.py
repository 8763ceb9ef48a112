"""Real peers of the scale-out tests: a redis-server on a free port and ``sci-node worker`` processes."""
from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from conftest import VENV_BIN, _kill, port_open, wait_for


def sci_node_cmd() -> list[str]:
    exe = VENV_BIN / "sci-node"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "sci_node.cli"]


@dataclass
class RedisProc:
    """``redis-server`` on 127.0.0.1 without persistence: a restart loses every key and queue.

    ``password`` alone: ``requirepass``. ``user`` and ``password``: an ACL user with every right and the
    ``default`` user switched off. ``tls`` (certificate, key, CA): TLS only, on ``port``, clients not
    asked for certificates. ``host``: the address the URL names (also bound, besides loopback).
    """

    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    user: str | None = None
    password: str | None = None
    tls: tuple[Path, Path, Path] | None = None
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        cred = f"{self.user or ''}:{self.password}@" if self.password else ""
        scheme, query = ("rediss", f"?ssl_ca_certs={self.tls[2]}") if self.tls else ("redis", "")
        return f"{scheme}://{cred}{self.host}:{self.port}/0{query}"

    def argv(self) -> list[str]:
        binds = ["127.0.0.1", *([self.host] if self.host != "127.0.0.1" else [])]
        argv = ["redis-server", "--bind", *binds, "--save", "", "--appendonly", "no"]
        if self.tls:
            cert, key, ca = self.tls
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert), "--tls-key-file",
                     str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        if self.user and self.password:
            argv += ["--user", "default", "off", "--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all"]
        elif self.password:
            argv += ["--requirepass", self.password]
        elif self.host != "127.0.0.1":  # an open Redis on the network, as the issue found it
            argv += ["--protected-mode", "no"]
        return argv

    def start(self) -> "RedisProc":
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(self.argv(), stdout=fh, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.port), 15, what=f"redis-server on port {self.port}")
        return self

    def kill9(self) -> None:
        if self.proc is not None:
            _kill(self.proc)
            self.proc = None


@dataclass
class WorkerProc:
    """``sci-node worker`` as a subprocess (JSON log in ``log``)."""

    name: str
    broker: str
    log: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 120) -> "WorkerProc":
        cmd = [*sci_node_cmd(), "worker", "--broker", self.broker, "--name", self.name, "--log-format", "json",
               "--torch-threads", "1", *self.args]
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        if wait_ready:
            wait_for(lambda: self.proc is None or self.proc.poll() is not None or " ready." in self.text(), timeout,
                     interval=0.2, what=f"worker {self.name} ready")
            assert self.proc is not None and self.proc.poll() is None, f"worker exited:\n{self.text()[-3000:]}"
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill9(self) -> None:
        if self.proc is not None:
            _kill(self.proc, signal.SIGKILL)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            _kill(self.proc, signal.SIGTERM)
            self.proc = None


def dispatches(data_dir: Path) -> list[dict]:
    """The node's dispatch rows, read-only straight from its index (fast enough to catch a running task)."""
    db = data_dir / "index.sqlite3"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute("SELECT * FROM dispatches ORDER BY dispatched_at")]
        except sqlite3.OperationalError:
            return []
