"""The stack's children (Orthanc, the node), started, watched and restarted with back-off.

A child that exits while the stack runs is started again after ``restart_initial_backoff_seconds``,
doubling with every further exit up to ``restart_max_backoff_seconds``; a child that then stays up
``restart_reset_seconds`` starts over at the initial delay. After ``max_restarts`` exits in a row
without such a stable run the stack gives up (:class:`~sci_node.errors.StackError`). Every exit and
restart is one structlog line (``stack_child_exited``, ``stack_child_restarted``, and
``stack_child_started`` with the new pid).

While the stack is starting, a child that exits is an error at once (a port in use, a bad
configuration): :meth:`Supervisor.poll` with ``restart=False``.
"""
from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from sci_node.config import StackConfig
from sci_node.errors import StackError
from sci_node.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """Back-off of the restarts of one child (seconds)."""

    initial_s: float = 1.0
    max_s: float = 60.0
    reset_s: float = 60.0
    max_restarts: int = 10

    @classmethod
    def from_config(cls, st: StackConfig) -> RestartPolicy:
        """The policy of ``[stack]``."""
        return cls(st.restart_initial_backoff_seconds, st.restart_max_backoff_seconds, st.restart_reset_seconds,
                   st.max_restarts)

    def delay(self, failures: int) -> float:
        """Seconds before restart number ``failures`` (1, 2, ...) of a child."""
        return float(min(self.max_s, self.initial_s * 2 ** max(0, failures - 1)))


@dataclass
class Child:
    """One supervised process and its restart state."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0  # exits in a row without a run of reset_s
    due: float | None = None  # monotonic time of the pending restart


@dataclass
class Supervisor:
    """Starts named children with their output in ``log_dir/<name>.log``; restarts those that die."""

    log_dir: Path
    policy: RestartPolicy
    cwd: Path
    preexec: Callable[[], None] | None = None
    children: dict[str, Child] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> None:
        """Start (or replace) child ``name``."""
        self.children[name] = Child(name, list(argv), dict(env))
        self._spawn(self.children[name])

    def _spawn(self, child: Child) -> None:
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / f"{child.name}.log", "ab") as logf:
                child.proc = subprocess.Popen(
                    child.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=child.env,
                    cwd=str(self.cwd), start_new_session=True, preexec_fn=self.preexec)
        except OSError as exc:
            raise StackError(f"cannot start {child.name} ({child.argv[0]}): {exc}") from exc
        child.started, child.due = time.monotonic(), None
        log.info("stack_child_started", child=child.name, pid=child.proc.pid)

    def pid(self, name: str) -> int | None:
        """The pid of child ``name`` while it runs."""
        child = self.children.get(name)
        return child.proc.pid if child and child.proc and child.proc.poll() is None else None

    def poll(self, restart: bool = True) -> None:
        """Look at every child once: schedule and perform restarts (or raise when ``restart`` is False).

        Raises
        ------
        StackError
            A child exited and ``restart`` is False, or it exited ``max_restarts`` times in a row.
        """
        now = time.monotonic()
        for child in self.children.values():
            if child.due is not None:
                if now >= child.due:
                    self._spawn(child)
                    log.warning("stack_child_restarted", child=child.name, pid=child.proc.pid if child.proc else None,
                                restart=child.failures)
                continue
            code = child.proc.poll() if child.proc is not None else None
            if code is None:
                continue
            if not restart:
                raise StackError(f"{child.name} exited with code {code}; last log lines:\n{self.log_tail(child.name)}")
            self._schedule(child, code, now)

    def _schedule(self, child: Child, code: int, now: float) -> None:
        ran_s = now - child.started
        child.failures = 1 if ran_s >= self.policy.reset_s else child.failures + 1
        if child.failures > self.policy.max_restarts:
            log.error("stack_child_gave_up", child=child.name, code=code, exits_in_a_row=child.failures)
            raise StackError(f"{child.name} exited {child.failures} times in a row (last code {code}, each within "
                             f"{self.policy.reset_s:g} s of its start); last log lines:\n{self.log_tail(child.name)}")
        delay = self.policy.delay(child.failures)
        child.due = now + delay
        log.warning("stack_child_exited", child=child.name, code=code, ran_s=round(ran_s, 1), restart=child.failures,
                    restart_in_s=delay)

    def log_tail(self, name: str, lines: int = 15) -> str:
        """The last lines of a child's log file."""
        try:
            text = (self.log_dir / f"{name}.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, order: Sequence[str], timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM the children in ``order``; SIGKILL what has not exited after ``timeout``."""
        codes: dict[str, int | None] = {}
        for name in order:
            child = self.children.get(name)
            proc = child.proc if child else None
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("stack_child_killed", child=name, after_s=timeout)
                    proc.kill()
                    proc.wait()
            codes[name] = proc.returncode
        self.children.clear()
        return codes
