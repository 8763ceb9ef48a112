"""``sci-node serve``: wire the SCP, the completion scheduler, the workers and the exporter.

Start order: store (+ crash recovery) -> workers/exporter -> completion scheduler -> SCP
(last, so nothing is accepted before the rest can take it). Stop order is the reverse;
SIGINT/SIGTERM stop cleanly. A job interrupted by the stop stays ``running`` and goes back
to ``pending`` at the next start.
"""
from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

import structlog

from sci_node import __version__
from sci_node.app.retention import RetentionSweeper
from sci_node.config import NodeConfig
from sci_node.dicom.completion import CompletionMonitor
from sci_node.dicom.export import Exporter
from sci_node.dicom.scp import start_scp
from sci_node.engine.ledger import recover_jobs
from sci_node.engine.local import ProviderFactory, Worker, default_provider
from sci_node.store import Store
from sci_node.store.private_files import restrict_umask

log = structlog.get_logger("sci_node.node")


def _log_config(cfg: NodeConfig) -> None:
    log.info("node.config", version=__version__, ae_title=cfg.ae_title, bind=cfg.bind, port=cfg.port,
             data_dir=str(cfg.data_dir), models_dir=str(cfg.models_dir), processor=cfg.processor,
             destinations=[str(d) for d in cfg.destinations],
             allowed_aes=[a.ae_title + (f"@{a.host}" if a.host else "") for a in cfg.allowed_aes],
             stable_seconds=cfg.stable_seconds, workers=cfg.workers, device=cfg.device, tls=cfg.tls.enabled,
             max_associations=cfg.limits.max_associations, min_free_disk_mb=cfg.limits.min_free_disk_mb,
             retention_days=cfg.retention_days, engine=cfg.engine.kind)
    if cfg.accepts_any_ae:
        log.warning("node.accepts_any_ae", detail="allowed_aes is empty: every calling AE title is accepted")
    if not cfg.destinations:
        log.warning("node.no_destinations", detail="results are kept in the data dir but sent nowhere")


def run_node(cfg: NodeConfig, provider_factory: ProviderFactory = default_provider,
             stop: threading.Event | None = None) -> int:
    """Run the node in the foreground until SIGINT/SIGTERM (or ``stop`` is set); return 0.

    Parameters
    ----------
    cfg
        The node configuration.
    provider_factory
        Builds the processor provider of each worker (default: ``cfg.processor``).
    stop
        Optional event to stop the node from another thread (tests, ``sci-node stack``).

    Raises
    ------
    StorageError, ConfigError
        When the data dir cannot be opened or the port cannot be bound.
    """
    _log_config(cfg)
    restrict_umask()  # everything the node writes (spool, index, WAL, results) is private to its user
    stop = stop or threading.Event()
    store = _open_store(cfg)
    job_ready, result_ready = threading.Event(), threading.Event()
    workers = _build_workers(cfg, store, provider_factory, job_ready, result_ready, stop)
    exporter = Exporter(cfg, store, result_ready, stop)
    monitor = CompletionMonitor(cfg, store, job_ready)
    sweeper = RetentionSweeper(cfg, store) \
        if cfg.retention_days is not None or cfg.corrections.retention_days is not None else None
    threads = (*workers, exporter)
    for t in threads:
        t.start()
    monitor.start()
    if sweeper is not None:
        sweeper.start()
    job_ready.set()
    result_ready.set()
    server = None
    previous = _stop_on_signals(stop)
    try:
        server = start_scp(cfg, store)
        log.info("node.ready", ae_title=cfg.ae_title, address=f"{cfg.bind}:{cfg.port}")
        while not stop.wait(0.5):
            pass
    finally:
        stop.set()
        if server is not None:
            server.shutdown()
        monitor.stop()
        if sweeper is not None:
            sweeper.stop()
        job_ready.set()
        result_ready.set()
        _join(threads, store)
        for s, h in previous.items():
            signal.signal(s, h)
        log.info("node.stopped")
    return 0


def _open_store(cfg: NodeConfig) -> Store:
    """The spool and job index, with the jobs a crash left running pending again and the spool reconciled."""
    store = Store(cfg.data_dir)
    mode = cfg.data_dir.stat().st_mode & 0o777
    if mode & 0o077:  # made by someone else before the node ran: what it holds is 0700 / 0600, but say so
        log.warning("node.data_dir_not_private", data_dir=str(cfg.data_dir), mode=f"{mode:o}",
                    detail="the data dir holds patient data: chmod 700 it")
    recovered = recover_jobs(store, celery=cfg.engine.kind == "celery")
    if cfg.limits.spool_journal_mb:
        restored = store.open_journal(cfg.limits.spool_journal_mb * 2**20, write_behind=cfg.limits.spool_write_behind)
        if restored:
            log.warning("node.spool_journal_replayed", restored=restored,
                        detail="instance files a power loss had lost were rewritten from the spool journal")
    reindexed, removed_tmp = store.reconcile()
    cut = store.cut_by_restart()
    if cut:
        log.warning("node.series_cut_by_restart", series=len(cut), grace_seconds=cfg.abort_grace_seconds,
                    detail="an association was still sending when the node stopped: each waits for a resend, "
                           "then completes flagged incomplete transfer")
    if reindexed or removed_tmp:
        log.warning("node.reconciled_spool", reindexed=reindexed, removed_temp_files=removed_tmp)
    if recovered:
        log.warning("node.recovered_jobs", jobs=recovered, detail="jobs left running are pending again")
    return store


def _build_workers(cfg: NodeConfig, store: Store, provider_factory: ProviderFactory, job_ready: threading.Event,
                   result_ready: threading.Event, stop: threading.Event) -> list[threading.Thread]:
    """The embedded engine's worker threads, or with the celery engine the one gateway thread that hands
    series to ``sci-node worker``s through the broker (and, with ``[followup] enabled``, the thread that
    compares its accepted results with their priors)."""
    if cfg.engine.kind == "celery":
        from sci_node.engine.gateway import build_gateway

        gateway = build_gateway(cfg, store, job_ready, result_ready, stop)
        return [gateway] if gateway.followups is None else [gateway, gateway.followups]
    from sci_node.engine import ENGINE_FILE

    (cfg.data_dir / ENGINE_FILE).unlink(missing_ok=True)  # a gateway ran here before: status shows local now
    if cfg.processor == "pipeline":
        from sci_node.models.predict_seg import configure_threads

        log.info("node.torch_threads", threads=configure_threads(cfg.torch_threads, cfg.workers), workers=cfg.workers)
    return [Worker(cfg, store, provider_factory(cfg), job_ready, result_ready, stop, name=f"worker-{i + 1}")
            for i in range(cfg.workers)]


def _stop_on_signals(stop: threading.Event) -> dict[int, Any]:
    """On the main thread, SIGINT and SIGTERM set ``stop``; returns the handlers they replaced (none
    elsewhere: signals can only be handled on the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("node.stopping", signal=signal.Signals(signum).name)
        stop.set()

    return {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}


def _join(threads: tuple[threading.Thread, ...], store: Store) -> None:
    """Wait up to 30 s in all for the worker and export threads; close the store only when all ended (a
    thread still busy holds a job, which resumes at the next start)."""
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    busy = [t.name for t in threads if t.is_alive()]
    if busy:
        log.warning("node.stop_timeout", threads=busy, detail="their job resumes at the next start")
    else:
        store.close()
