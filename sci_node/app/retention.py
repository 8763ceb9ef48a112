"""Retention: delete spooled instances and results ``retention_days`` after delivery.

A periodic apscheduler job (:class:`RetentionSweeper`) asks the store for complete series
whose latest job is finished and delivered (or routed out with nothing to deliver) since
before the cutoff, and purges each one (:meth:`sci_node.store.Store.purge_series`): the
spooled instances and the jobs' result folders are deleted, the job and outbox rows stay
as the audit trail. Series whose job failed, or whose results are not delivered yet, are
kept until an admin acts (``sci-node jobs retry``). Without ``retention_days`` nothing is
ever deleted.
"""
from __future__ import annotations

import shutil
import time

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from sci_node.config import NodeConfig
from sci_node.store import Store

log = structlog.get_logger("sci_node.retention")


def sweep_interval_seconds(retention_days: float) -> float:
    """How often to look for expired series: a quarter of the retention, between 1 s and 1 h."""
    return max(1.0, min(3600.0, retention_days * 86400.0 / 4))


def purge_expired(store: Store, retention_days: float, now: float | None = None) -> int:
    """Purge every series delivered more than ``retention_days`` (may be fractional) ago.

    Returns
    -------
    int
        Series purged.
    """
    cutoff = (time.time() if now is None else now) - retention_days * 86400.0
    for stale in store.data_dir.glob(".purge-*"):  # left by a crash in the middle of a purge
        shutil.rmtree(stale, ignore_errors=True)
    purged = 0
    for series_uid, generation in store.expired_series(cutoff):
        if store.purge_series(series_uid, generation):
            purged += 1
            log.info("retention.purged", series_uid=series_uid, generation=generation,
                     retention_days=retention_days)
    return purged


class RetentionSweeper:
    """Runs :func:`purge_expired` periodically in a background scheduler thread.

    Parameters
    ----------
    cfg
        Uses ``retention_days`` (the spool) and ``corrections.retention_days`` (the corrections);
        at least one must be set.
    store
        The node's store.
    """

    def __init__(self, cfg: NodeConfig, store: Store) -> None:
        days = [d for d in (cfg.retention_days, cfg.corrections.retention_days) if d is not None]
        if not days:
            raise ValueError("RetentionSweeper needs cfg.retention_days or cfg.corrections.retention_days")
        self.cfg = cfg
        self.retention_days = None if cfg.retention_days is None else float(cfg.retention_days)
        self.store = store
        self._sched = BackgroundScheduler(daemon=True)
        self._sched.add_job(self.sweep, "interval", seconds=sweep_interval_seconds(min(days)),
                            max_instances=1, coalesce=True, id="retention", misfire_grace_time=None)

    def start(self) -> None:
        """Start sweeping in the background."""
        self._sched.start()

    def stop(self) -> None:
        """Stop sweeping (waits for a running sweep to finish)."""
        self._sched.shutdown(wait=True)

    def sweep(self) -> int:
        """One pass over the spool and the radiologists' corrections; never raises (the next pass retries)."""
        purged = 0
        try:
            if self.retention_days is not None:
                purged += purge_expired(self.store, self.retention_days)
        except Exception:
            log.exception("retention.sweep_failed")
        try:
            if self.cfg.corrections.retention_days is not None:
                from sci_node.corrections.index import open_index
                from sci_node.corrections.index import purge_expired as purge_corrections

                index = open_index(self.cfg)
                try:
                    purged += purge_corrections(self.cfg, index)
                finally:
                    index.close()
        except Exception:
            log.exception("retention.corrections_sweep_failed")
        return purged
