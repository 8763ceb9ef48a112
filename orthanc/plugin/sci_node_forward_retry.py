"""Forward again a series whose forward job to the node failed (no ``orthanc`` import: the calls are given).

A forward is an asynchronous Orthanc job (``DicomModalityStore``). When the node is down — it
crashed and the stack is restarting it, or the node rejected the association — the job ends in
``Failure`` and Orthanc never tries again by itself. :class:`ForwardRetrier` watches the latest
forward of every series (one background thread, one ``GET /jobs/<id>`` per watched forward and
poll) and, when it failed, forwards the series again after ``first_s`` seconds, doubling up to
``max_s``, at most ``retries`` times. At Orthanc's start it picks up the latest forward of every
series from the record (``forwards.jsonl``), so a forward that failed before a restart is retried
too. A newer forward of the same series (stable again, or a manual one) replaces the watched one.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

#: Orthanc job states after which the job will not change by itself
FINAL_OK, FINAL_FAILED = "Success", "Failure"


@dataclass
class Watched:
    """The latest forward of one series."""

    job: str
    attempt: int  # 0: the first forward; n: the n-th retry
    due: float | None = None  # when the next retry is due (its job failed)


class ForwardRetrier:
    """Watches forward jobs; re-forwards failed ones with back-off and a limit.

    Parameters
    ----------
    job_state
        ``job id -> Orthanc job state`` (``"Success"``, ``"Failure"``, ``"Running"`` ...); raises
        when the job is unknown.
    forward
        ``(series id, reason, attempt) -> record``: queues a new forward and records it (it calls
        :meth:`track` itself).
    log
        ``(level, message)`` with level ``"info"``, ``"warning"`` or ``"error"``.
    """

    def __init__(self, job_state: Callable[[str], str], forward: Callable[[str, str, int], Any],
                 log: Callable[[str, str], None], retries: int = 5, first_s: float = 5.0, max_s: float = 300.0,
                 poll_s: float = 1.0) -> None:
        self._job_state, self._forward, self._log = job_state, forward, log
        self.retries, self.first_s, self.max_s, self.poll_s = retries, first_s, max_s, poll_s
        self._lock = threading.Lock()
        self._watched: dict[str, Watched] = {}

    def delay(self, attempt: int) -> float:
        """Seconds between the failure of forward ``attempt - 1`` and retry ``attempt`` (1, 2, ...)."""
        return float(min(self.max_s, self.first_s * 2 ** max(0, attempt - 1)))

    def track(self, series_id: str, job: str | None, attempt: int) -> None:
        """Watch ``job``, the newest forward of ``series_id`` (replacing an older one)."""
        if job:
            with self._lock:
                self._watched[series_id] = Watched(str(job), attempt)

    def seed(self, records: list[dict[str, Any]]) -> None:
        """Watch the latest recorded forward of every series (oldest records first)."""
        for rec in records:
            self.track(str(rec.get("series", "")), rec.get("job"), int(rec.get("attempt", 0) or 0))

    def start(self, records: list[dict[str, Any]]) -> None:
        """Seed from ``records`` and run :meth:`check` every ``poll_s`` in a daemon thread."""
        self.seed(records)
        threading.Thread(target=self._run, name="sci-node-forward-retry", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            try:
                self.check(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - a background thread must not die
                self._log("error", f"sci-node: forward retry check failed: {exc!r}")

    def check(self, now: float) -> None:
        """One look at every watched forward: drop finished ones, schedule and send retries."""
        with self._lock:
            items = list(self._watched.items())
        for series_id, w in items:
            if w.due is not None:
                if now >= w.due:
                    self._retry(series_id, w, now)
                continue
            try:
                state = self._job_state(w.job)
            except Exception:  # noqa: BLE001 - the job is gone from Orthanc's history: nothing to watch
                state = "unknown"
            if state in (FINAL_OK, "unknown"):
                self._drop(series_id, w)
            elif state == FINAL_FAILED:
                self._failed(series_id, w, now)

    def _drop(self, series_id: str, w: Watched) -> None:
        with self._lock:
            if self._watched.get(series_id) is w:
                del self._watched[series_id]

    def _failed(self, series_id: str, w: Watched, now: float) -> None:
        if w.attempt >= self.retries:
            self._log("error", f"sci-node: series {series_id}: forward job {w.job} failed; gave up after "
                               f"{self.retries} retries (POST /sci-node/series/{series_id}/process forwards it again)")
            self._drop(series_id, w)
            return
        w.due = now + self.delay(w.attempt + 1)
        self._log("warning", f"sci-node: series {series_id}: forward job {w.job} failed; retry {w.attempt + 1} of "
                             f"{self.retries} in {self.delay(w.attempt + 1):g} s")

    def _retry(self, series_id: str, w: Watched, now: float) -> None:
        with self._lock:
            if self._watched.get(series_id) is not w:
                return  # a newer forward replaced it meanwhile
        attempt = w.attempt + 1
        try:
            self._forward(series_id, f"retry {attempt} of {self.retries} after a failed forward", attempt)
        except Exception as exc:  # noqa: BLE001 - e.g. the series was deleted: try later, then give up
            w.attempt, w.due = attempt, now + self.delay(attempt + 1)
            self._log("warning", f"sci-node: series {series_id}: retry {attempt} could not be queued: {exc!r}")
            if attempt >= self.retries:
                self._drop(series_id, w)


def job_state_from(rest_get: Callable[[str], bytes]) -> Callable[[str], str]:
    """``job id -> state`` through Orthanc's ``GET /jobs/<id>`` (``rest_get`` is ``orthanc.RestApiGet``)."""
    def state(job: str) -> str:
        return str(json.loads(rest_get(f"/jobs/{job}")).get("State", ""))
    return state
