"""Series completion: "no new instance for ``stable_seconds``" plus a geometry check.

A series whose last association ended in A-ABORT (ours or the peer's: a dropped link, a
crashed sender) is not quiet before ``abort_grace_seconds`` after the abort either: the sender
gets that long to resend. Processed after it, the job's geometry says ``incomplete_transfer``
and its results say "incomplete transfer".

An apscheduler ``BackgroundScheduler`` polls the index. A quiet series is checked
(consistent orientation and matrix size, no duplicate slice positions, gaps reported),
marked complete and its job enqueued in one transaction; a late instance re-opens the
series as a new generation whose job supersedes the earlier one (see
:meth:`sci_node.store.Store.complete_series`).

:func:`check_geometry` is pure (header values in, report out); the headers come from the
node's one geometry reader, :func:`sci_node.dicom.geometry.read_slice_headers`, and its
tolerances (the same as series loading and the corrections use).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from sci_node.config import NodeConfig
from sci_node.dicom.geometry import GAP_FACTOR, ORIENTATION_TOL, SAME_POSITION_MM, SliceHeader, read_slice_headers
from sci_node.store import SeriesRow, Store

log = structlog.get_logger("sci_node.completion")


def check_geometry(slices: Sequence[SliceHeader]) -> tuple[dict[str, Any], str | None]:
    """Check that slices form one volume.

    Returns
    -------
    report, invalid_reason
        ``report`` holds ``n_slices``, ``rows``, ``cols``, ``orientation``, ``slice_step_mm``
        (median, mm), ``gaps`` (list of ``{"after_mm", "step_mm"}``) and ``duplicates``
        (positions along the normal, mm, that occur more than once). ``invalid_reason``
        is None when the series can be processed.
    """
    report: dict[str, Any] = {"n_slices": len(slices), "gaps": [], "duplicates": []}
    if not slices:
        return report, "no image slices"
    sizes = {(s.rows, s.cols) for s in slices}
    report["rows"], report["cols"] = slices[0].rows, slices[0].cols
    if len(sizes) > 1:
        return report, f"inconsistent matrix sizes {sorted(sizes)}"
    if any(s.rows <= 0 or s.cols <= 0 for s in slices):
        return report, f"invalid matrix size {slices[0].rows}x{slices[0].cols}"
    bad_spacing = [s.spacing for s in slices if s.spacing is not None and not min(s.spacing) > 0]
    if bad_spacing:
        return report, f"invalid PixelSpacing {list(bad_spacing[0])} in {len(bad_spacing)} slice(s): must be > 0 mm"
    missing = [s.source for s in slices if s.orientation is None or s.position is None]
    if missing:
        return report, f"missing ImageOrientationPatient/ImagePositionPatient in {len(missing)} slice(s)"
    iops = np.array([s.orientation for s in slices], dtype=float)
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOL:
        n_distinct = len({tuple(np.round(o, 3)) for o in iops})
        return report, f"mixed orientations ({n_distinct} distinct ImageOrientationPatient values)"
    report["orientation"] = [round(float(v), 6) for v in iops[0]]
    normal = np.cross(iops[0, :3], iops[0, 3:])
    along = np.sort(np.array([s.position for s in slices], dtype=float) @ normal)
    steps = np.diff(along)
    dup = steps < SAME_POSITION_MM
    if dup.any():
        report["duplicates"] = sorted({round(float(v), 3) for v in along[1:][dup]})
        return report, f"duplicate slice positions ({int(dup.sum())} slice(s) share a position)"
    if steps.size:
        median = float(np.median(steps))
        report["slice_step_mm"] = round(median, 4)
        report["gaps"] = [{"after_mm": round(float(along[i]), 3), "step_mm": round(float(steps[i]), 3)}
                          for i in np.nonzero(steps > GAP_FACTOR * median)[0]]
    return report, None


def check_series(files: Sequence[Path]) -> tuple[dict[str, Any], str | None]:
    """Geometry report and invalid reason for the spooled files of one series."""
    slices, problems = read_slice_headers(files)
    report, reason = check_geometry(slices)
    report["n_instances"] = len(files)
    if problems:
        report["unreadable"] = problems
        reason = reason or f"{len(problems)} unreadable instance(s): {problems[0]}"
    return report, reason


class CompletionMonitor:
    """Polls the store for quiet series and turns each into a job.

    Parameters
    ----------
    cfg
        Uses ``stable_seconds`` and ``abort_grace_seconds``.
    store
        The node's store.
    on_job
        Set whenever a job is enqueued (wakes the workers).
    """

    def __init__(self, cfg: NodeConfig, store: Store, on_job: threading.Event) -> None:
        self.cfg = cfg
        self.store = store
        self.on_job = on_job
        self._sched = BackgroundScheduler(daemon=True)
        interval = max(0.2, min(1.0, cfg.stable_seconds / 4))
        self._sched.add_job(self.poll, "interval", seconds=interval, max_instances=1, coalesce=True,
                            id="completion", misfire_grace_time=None)

    def start(self) -> None:
        """Start polling in the scheduler's background thread."""
        self._sched.start()

    def stop(self) -> None:
        """Stop polling (waits for a running poll to finish)."""
        self._sched.shutdown(wait=True)

    def poll(self) -> list[int]:
        """One pass: complete every series quiet for ``stable_seconds``; return the new job ids."""
        jobs: list[int] = []
        try:
            now = time.time()
            for series in self.store.quiet_series(now - self.cfg.stable_seconds, now - self.cfg.abort_grace_seconds):
                job_id = self._complete(series)
                if job_id is not None:
                    jobs.append(job_id)
        except Exception:  # the scheduler thread must survive anything; next poll retries
            log.exception("completion.poll_failed")
        if jobs:
            self.on_job.set()
        return jobs

    def _complete(self, series: SeriesRow) -> int | None:
        files = self.store.series_files(series.series_uid)
        report, reason = check_series(files)
        if series.aborted_at is not None:  # no resend came within the grace period
            report["incomplete_transfer"] = {"aborted_at": series.aborted_at,
                                             "grace_seconds": self.cfg.abort_grace_seconds}
        job_id = self.store.complete_series(series, report, reason)
        if job_id is None:
            return None  # an instance arrived meanwhile; check again later
        fields = dict(job_id=job_id, study_uid=series.study_uid, series_uid=series.series_uid,
                      generation=series.generation, instances=series.n_instances,
                      calling_aet=series.calling_aet, gaps=len(report.get("gaps", [])),
                      incomplete_transfer=series.aborted_at is not None)
        if reason:
            log.warning("audit.series_received", invalid_reason=reason, **fields)
        else:
            log.info("audit.series_received", **fields)
        return job_id
