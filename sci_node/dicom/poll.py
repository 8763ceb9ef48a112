"""Adaptive DUL poll: an association's pynetdicom reactor polls fast while it stores, slowly when idle.

pynetdicom's DUL reactor (one thread per association) sleeps ``_run_loop_delay`` whenever it
found nothing to do, and every C-STORE waits on that poll (reading the request, sending the
response). A short delay speeds ingest up, but costs CPU for as long as the association is open,
idle or not (docs/node.md, "Ingest speed"). :class:`AdaptivePoll` gives each association the
``busy`` delay when it is established and on every C-STORE, and one light sweeper thread (running
only while some association is busy) puts it back to the ``idle`` delay once the association has
stored nothing for ``idle_after_s``.

The fast poll only pays while the node waits on it, i.e. while one association stores alone: with
two or more storing at once, one's poll wait overlaps the other's work (2 and 8 parallel storescu
senders: no gain), and each fast-polling reactor burns ~13 % of a core, which 16 parallel senders
paid for with 10.0 s instead of 6.8 s (docs/node.md, "Ingest speed"). So at most ``max_fast`` (1)
busy associations poll fast; while more are busy, each keeps the idle delay.

``_run_loop_delay`` is private in pynetdicom 3.0: it is only set where it exists.
"""
from __future__ import annotations

import threading
import time
from typing import Any

#: Seconds without a C-STORE after which an association's reactor goes back to the idle delay
IDLE_AFTER_S = 0.5
#: Most busy associations polling fast at once (more: all of them poll at the idle delay)
MAX_FAST = 1


def set_loop_delay(assoc: Any, seconds: float) -> bool:
    """Set ``assoc``'s DUL reactor sleep; False when pynetdicom has no such attribute (guarded)."""
    dul = getattr(assoc, "dul", None)
    if dul is None or not hasattr(dul, "_run_loop_delay"):  # private in pynetdicom 3.0
        return False
    dul._run_loop_delay = seconds
    return True


def loop_delay(assoc: Any) -> float | None:
    """``assoc``'s current DUL reactor sleep (None when unknown)."""
    return getattr(getattr(assoc, "dul", None), "_run_loop_delay", None)


class AdaptivePoll:
    """Per-association reactor sleep: ``busy_s`` while storing, ``idle_s`` after ``idle_after_s`` without.

    Parameters
    ----------
    idle_s
        The reactor sleep of an idle association (``limits.reactor_poll_seconds``).
    busy_s
        The reactor sleep of a busy one (``limits.reactor_poll_busy_seconds``); 0 turns the
        adaptation off: every association keeps ``idle_s``.
    idle_after_s
        Seconds without activity before an association counts as idle again.
    max_fast
        Most busy associations that poll fast; while more are busy, all poll at ``idle_s``.
    """

    def __init__(self, idle_s: float, busy_s: float, idle_after_s: float = IDLE_AFTER_S,
                 max_fast: int = MAX_FAST) -> None:
        self.idle_s = idle_s
        self.busy_s = busy_s
        self.idle_after_s = idle_after_s
        self.max_fast = max_fast
        self._busy: dict[int, tuple[Any, float, float]] = {}  # id(assoc) -> (assoc, last activity, its delay)
        self._lock = threading.Lock()
        self._sweeper: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """Whether busy associations get a shorter delay than idle ones."""
        return 0 < self.busy_s < self.idle_s

    def busy(self, assoc: Any) -> None:
        """``assoc`` is active now: give it the busy delay (until ``idle_after_s`` without activity)."""
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            entry = self._busy.get(id(assoc))
            n_busy = len(self._busy) + (entry is None)
            delay = self.busy_s if n_busy <= self.max_fast else self.idle_s
            if (entry is None or entry[2] != delay) and not set_loop_delay(assoc, delay):
                return
            self._busy[id(assoc)] = (assoc, now, delay)
            if self._sweeper is None:  # one sweeper, alive only while some association is busy
                self._start_sweeper(assoc)

    def _start_sweeper(self, assoc: Any) -> None:
        """Start the sweeper (lock held); without a thread to be had, ``assoc`` stays on the idle poll."""
        self._sweeper = threading.Thread(target=self._sweep, name="dul-poll-sweeper", daemon=True)
        try:
            self._sweeper.start()
        except RuntimeError:  # "can't start new thread": never let the DIMSE handler calling us raise
            self._sweeper = None
            self._busy.pop(id(assoc), None)
            set_loop_delay(assoc, self.idle_s)

    def forget(self, assoc: Any) -> None:
        """``assoc`` has ended: stop tracking it."""
        with self._lock:
            self._busy.pop(id(assoc), None)

    def _sweep(self) -> None:
        """Put associations idle for ``idle_after_s`` back to ``idle_s``; exit when none is busy."""
        while True:
            with self._lock:
                now = time.monotonic()
                for key, (assoc, last, _) in list(self._busy.items()):
                    if now - last >= self.idle_after_s:
                        set_loop_delay(assoc, self.idle_s)
                        del self._busy[key]
                if not self._busy:
                    self._sweeper = None
                    return
                wait = min(last for _, last, _ in self._busy.values()) + self.idle_after_s - now
            time.sleep(max(wait, 0.01))
