"""The node side of the celery engine: dispatch complete series, collect results, watch leases.

One thread (:class:`Gateway`) replaces the local worker threads. Each tick it

1. takes the events workers pushed (``started``, ``refused``, ``result``, ``payload-missing``)
   through ``LMOVE`` into a "taken" list that is emptied only after the event was committed
   to the index, so a node killed mid-event re-reads it at the next start;
2. claims pending jobs (up to ``max_outstanding`` out at once), uploads each series as one
   payload blob with an expiry, records the dispatch, then publishes the task;
3. checks what is out: a started dispatch whose heartbeat key has been gone for three beats
   (the worker died) and one never started when the Redis server restarted (its run id
   changed: the queue may be gone) or whose lease ran out are dispatched again under a new
   token, the old token cancelled (a redelivered copy of it is skipped by the workers). A job
   left running with nothing out (a publish failed) is dispatched again as well.

The job table stays the source of truth: everything in Redis can be rebuilt from it and the spool.
A ``done`` result, once accepted, is compared with the same person's prior on the node
(:class:`sci_node.engine.followup.FollowupThread`, the local engine's follow-up code): the comparison SEG
and SR are queued after the job's own results.

Nothing from Redis is trusted: a result is accepted only when its outputs are the job's own
(:mod:`sci_node.engine.result_check`: expected SOP classes, the source study, patient and series); any
other fails the job with the reason (``job.result_rejected``) and nothing of it is sent.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import structlog

from sci_node.config import NodeConfig
from sci_node.engine import ENGINE_FILE, TASK_NAME
from sci_node.engine import redis_store as rstore
from sci_node.engine.followup import FollowupThread, mark_due, should_compare
from sci_node.engine.ledger import Dispatch, Ledger
from sci_node.engine.local import job_notes
from sci_node.engine.result_check import SourceSeries, check_outputs
from sci_node.errors import EngineError, ResultRejectedError, SciNodeError
from sci_node.store import Job, Store, write_durable

if TYPE_CHECKING:
    import redis
    from celery import Celery

log = structlog.get_logger("sci_node.engine.gateway")
CHECK_EVERY_S = 1.0
EVENTS_PER_TICK = 100


class Gateway(threading.Thread):
    """Dispatches the node's jobs to Celery workers and accepts one result per job.

    Parameters
    ----------
    cfg
        The node configuration (``cfg.engine``: broker, store, queue, lease, heartbeat).
    store
        The node's index and spool.
    wake
        Set when a job was enqueued (dispatch without waiting for the next tick).
    on_result
        Set when a result queued outbox entries (wakes the exporter).
    stop
        Set to end the thread.
    """

    def __init__(self, cfg: NodeConfig, store: Store, wake: threading.Event, on_result: threading.Event,
                 stop: threading.Event, app: "Celery", client: "redis.Redis") -> None:
        super().__init__(name="gateway", daemon=True)
        self.cfg, self.eng, self.store = cfg, cfg.engine, store
        self.wake, self.on_result, self.stop_event = wake, on_result, stop
        self.app, self.client = app, client
        self.ledger = Ledger(store)
        self.keys = rstore.Keys(cfg.engine.namespace)
        self.destinations = [str(d) for d in cfg.destinations]
        self._run_id: str | None = None
        self._missing_since: dict[str, float] = {}
        self._models_token: str | None = None
        self._models: dict[str, Any] = {}
        self._last_check = 0.0
        self._down_since: float | None = None
        #: the follow-up comparisons of accepted results, on the node (started beside this thread)
        self.followups = FollowupThread(cfg, store, on_result, stop) if cfg.followup.enabled else None

    # -- loop ------------------------------------------------------------------------------
    def run(self) -> None:
        replayed = False
        while not self.stop_event.is_set():
            try:
                if not replayed:
                    self._replay_taken()
                    replayed = True
                self._tick()
                if self._down_since is not None:
                    log.info("engine.store_reachable", down_s=round(time.time() - self._down_since, 1))
                    self._down_since = None
            except SciNodeError as exc:
                log.error("engine.tick_failed", error=str(exc))
                self.stop_event.wait(1.0)
            except Exception as exc:  # redis/kombu connection errors: the broker is down, retry
                if self._down_since is None:
                    self._down_since = time.time()
                    log.warning("engine.store_unreachable", error=f"{type(exc).__name__}: {exc}"[:300],
                                detail="jobs stay in the index; dispatch resumes when it is back")
                replayed = False
                self.stop_event.wait(1.0)

    def _tick(self) -> None:
        self._dispatch_pending()
        now = time.monotonic()
        if now - self._last_check >= CHECK_EVERY_S:
            self._check_outstanding()
            self._last_check = now
        # Redis >= 6 takes a fractional timeout; redis-py's annotation says int
        raw = self.client.blmove(self.keys.events, self.keys.events_taken, 0.5, "LEFT", "RIGHT")  # type: ignore[arg-type]
        n = 0
        while raw is not None and n < EVENTS_PER_TICK:
            self._handle_raw(raw)
            n += 1
            raw = self.client.lmove(self.keys.events, self.keys.events_taken, "LEFT", "RIGHT")
        if raw is not None:
            self._handle_raw(raw)

    def _replay_taken(self) -> None:
        """Events taken before a crash or an outage, not yet committed: handle them again."""
        for raw in self.client.lrange(self.keys.events_taken, 0, -1):
            self._handle_raw(raw)

    def _handle_raw(self, raw: Any) -> None:
        try:
            event = json.loads(raw)
            self._handle(event)
        except SciNodeError as exc:
            log.error("engine.event_failed", error=str(exc), event=raw[:300])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("engine.event_malformed", error=f"{type(exc).__name__}: {exc}", event=raw[:300])
        self.client.lrem(self.keys.events_taken, 1, raw)

    # -- dispatch ----------------------------------------------------------------------------
    def _dispatch_pending(self) -> None:
        out = len(self.ledger.outstanding())
        while out < self.eng.max_outstanding and not self.stop_event.is_set():
            job = self.store.claim_job()
            if job is None:
                return
            try:
                self._send(job)
            except SciNodeError as exc:  # no models, unreadable spool: the job fails with the reason
                self.store.finish_job(job.id, "failed", f"{type(exc).__name__}: {exc}"[:1000], {})
                log.error("job.dispatch_failed", job_id=job.id, error=str(exc))
            except Exception:
                self.store.release_job(job.id)
                raise
            out += 1

    def _send(self, job: Job, why: str | None = None) -> str:
        """Upload the series, record the dispatch, publish the task; return the token."""
        token = uuid.uuid4().hex
        files = self.store.series_files(job.series_uid)
        if not files:
            raise EngineError(f"series {job.series_uid} has no spooled instances")
        try:
            data = rstore.pack_files(files)
        except OSError as exc:
            raise EngineError(f"cannot read the spooled instances of series {job.series_uid}: {exc}") from exc
        models = self._fingerprint()
        rstore.put_blob(self.client, self.keys.payload(token), data, self.eng.payload_ttl_seconds)
        task = {"job_id": job.id, "token": token, "ns": self.eng.namespace, "series_uid": job.series_uid,
                "study_uid": job.study_uid, "processor": self.cfg.processor, "models": models,
                "notes": list(job_notes(job)), "routing": asdict(self.cfg.routing),
                "max_missing_fraction": self.cfg.max_missing_fraction,
                "heartbeat_seconds": self.eng.heartbeat_seconds, "ttl_seconds": self.eng.payload_ttl_seconds,
                "dispatched_at": time.time()}
        self.ledger.record(job.id, token, self.eng.queue, models, time.time() + self.eng.lease_seconds,
                           self._current_run_id())
        try:
            self.app.send_task(TASK_NAME, args=[task], queue=self.eng.queue, retry=True,
                               retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
        except Exception:
            self.ledger.end(token, "unsent", "publishing the task failed")
            rstore.delete_blob(self.client, self.keys.payload(token))
            raise
        log.info("job.dispatched", job_id=job.id, series_uid=job.series_uid, token=token[:12], queue=self.eng.queue,
                 payload_mb=round(len(data) / 2**20, 2), instances=len(files), models=_versions(models),
                 **({"why": why} if why else {}))
        return token

    def _fingerprint(self) -> dict[str, Any]:
        """The active models' versions and weight checksums (re-read when the registry changes)."""
        if self.cfg.processor != "pipeline":
            return {}
        from sci_node.models.registry import MODEL_NAMES, ModelRegistry

        reg = ModelRegistry(self.cfg.models_dir)
        token = reg.state_token()
        if token != self._models_token:
            fp = reg.fingerprint()
            missing = [n for n in MODEL_NAMES if n not in fp or not fp[n]["weights_sha256"]]
            if missing:
                from sci_node.errors import ModelError

                raise ModelError(f"no usable active version of {', '.join(missing)} in {str(reg.state_path)!r}")
            self._models, self._models_token = fp, token
            log.info("engine.models", models=_versions(fp), token=token)
        return self._models

    def _current_run_id(self) -> str:
        if self._run_id is None:
            self._run_id = rstore.server_run_id(self.client)
        return self._run_id

    # -- leases, heartbeats, restarts -------------------------------------------------------
    def _check_outstanding(self) -> None:
        run_id = rstore.server_run_id(self.client)
        if self._run_id is not None and run_id != self._run_id:
            log.warning("engine.broker_restarted", detail="dispatches not yet started are sent again")
        self._run_id = run_id
        now = time.time()
        beat_gone_s = 3 * self.eng.heartbeat_seconds
        for d in self.ledger.outstanding():
            if d.started_at is None and d.broker_run != run_id:
                self._redispatch(d, "expired", "the Redis server restarted before a worker took the task")
            elif d.started_at is None and now > d.lease_until:
                self._redispatch(d, "expired", f"no worker took the task within the lease ({self.eng.lease_seconds} s)")
            elif d.started_at is not None:
                if self.client.exists(self.keys.heartbeat(d.token)):
                    self._missing_since.pop(d.token, None)
                    continue
                since = self._missing_since.setdefault(d.token, now)
                if now - since >= beat_gone_s:
                    self._redispatch(d, "lost", f"worker {d.worker} lost: no heartbeat for {beat_gone_s:.0f} s")
        for job in self._orphans():
            self._send(job, why="running with nothing out (a publish failed)")

    def _orphans(self) -> list[Job]:
        out = {d.job_id for d in self.ledger.outstanding()}
        return [job for job in self.store.running_jobs() if job.id not in out]

    def _redispatch(self, d: Dispatch, state: str, why: str) -> None:
        self._missing_since.pop(d.token, None)
        self.ledger.end(d.token, state, why)
        self._cancel(d.token)
        log.warning("job.redispatch", job_id=d.job_id, token=d.token[:12], worker=d.worker, why=why)
        job = self.store.job(d.job_id)
        if job.state == "running":
            self._send(job, why=why)

    def _cancel(self, token: str) -> None:
        self.client.set(self.keys.cancelled(token), "1", ex=max(1, int(self.eng.payload_ttl_seconds)))
        rstore.delete_blob(self.client, self.keys.payload(token))

    # -- events -----------------------------------------------------------------------------
    def _handle(self, event: Mapping[str, Any]) -> None:
        kind, token = str(event["type"]), str(event["token"])
        d = self.ledger.get(token)
        if d is None:
            log.warning("engine.unknown_token", token=token[:12], type=kind, worker=event.get("worker"))
            rstore.delete_blob(self.client, self.keys.result(token))
            return
        structlog.contextvars.bind_contextvars(job_id=d.job_id)
        try:
            if kind == "started":
                self.ledger.started(token, str(event["worker"]), float(event["at"]))
                log.info("job.started", token=token[:12], worker=event["worker"],
                         waited_s=round(float(event["at"]) - d.dispatched_at, 3))
            elif kind == "refused":
                self.ledger.note(token, f"refused by {event['worker']}: {event['reason']}")
                log.warning("job.refused", token=token[:12], worker=event["worker"], reason=event["reason"],
                            detail="the task went back to the queue for a worker that has these models")
            elif kind == "payload-missing":
                if d.state == "out":
                    self._redispatch(d, "expired", f"worker {event['worker']} found no payload (expired or lost)")
            elif kind == "result":
                self._on_result(d, event)
            else:
                log.warning("engine.unknown_event", type=kind)
        finally:
            structlog.contextvars.unbind_contextvars("job_id")

    def _on_result(self, d: Dispatch, event: Mapping[str, Any]) -> None:
        job = self.store.job(d.job_id)
        if job.state != "running":
            self.ledger.accept(d.token, d.job_id, "failed", None, {}, (), ())  # marks it duplicate
            log.info("job.duplicate_result", token=d.token[:12], worker=event["worker"], job_state=job.state)
            self._drop(d.token)
            return
        data = rstore.get_blob(self.client, self.keys.result(d.token)) if event.get("files") else b""
        if data is None:
            self._redispatch(d, "lost", f"the result of worker {event['worker']} is gone from the store")
            return
        out_dir = self.store.results_dir / str(d.job_id) / f"dispatch-{d.token[:12]}"
        record = dict(event["record"])
        try:
            files = rstore.unpack_files(data, out_dir, write=write_durable) if data else []
            by_name = {p.name: p for p in files}
            outputs = [by_name[n] for n in record.get("outputs", []) if n in by_name]
            self._check_result(d, event, job, outputs)
        except EngineError as exc:  # ResultRejectedError, or an archive entry that is not a plain file name
            self._reject(d, event, out_dir, str(exc), record)
            return
        record.update(outputs=[str(p) for p in outputs], worker=event["worker"], dispatch=d.token,
                      engine="celery")
        mark_due(self.cfg, str(event["state"]), record)  # with the outcome: a comparison lost to a stop is redone
        accepted, others = self.ledger.accept(d.token, d.job_id, str(event["state"]), event.get("reason"), record,
                                              outputs, self.destinations)
        if not accepted:
            shutil.rmtree(out_dir, ignore_errors=True)
            log.info("job.duplicate_result", token=d.token[:12], worker=event["worker"])
        else:
            for token in others:
                self._cancel(token)
            done = self.store.job(d.job_id)
            log.info("job.finished", state=done.state, reason=done.reason, delivery=done.delivery,
                     worker=event["worker"], seconds=record.get("seconds"), routing=record.get("routing"),
                     model_versions=record.get("model_versions"), timings=record.get("timings"))
            if done.delivery == "pending":
                self.on_result.set()
            if self.followups is not None and should_compare(self.cfg, done, record):
                self.followups.submit(done, record, out_dir)
        self._drop(d.token)

    def _check_result(self, d: Dispatch, event: Mapping[str, Any], job: Job, outputs: list[Path]) -> None:
        """Raise :class:`ResultRejectedError` unless the result is this job's own.

        See :mod:`sci_node.engine.result_check`.
        """
        if str(event.get("job_id")) != str(d.job_id):
            raise ResultRejectedError(f"the result names job {event.get('job_id')!r}, but its token {d.token[:12]} "
                                      f"was dispatched for job {d.job_id}")
        if str(event["state"]) not in ("done", "routed-out", "failed"):
            raise ResultRejectedError(f"the result's state {event['state']!r} is not done, routed-out or failed")
        check_outputs(outputs, self._source(job), self.cfg.processor)

    def _source(self, job: Job) -> SourceSeries:
        """The job's source series as spooled: its instance UIDs and Patient ID."""
        import pydicom

        rows = self.store.query("SELECT sop_uid FROM instances WHERE series_uid=?", (job.series_uid,))
        patient = None
        files = self.store.series_files(job.series_uid)
        if files:
            try:
                head = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["PatientID"])
                patient = str(head.get("PatientID", "") or "") or None
            except (OSError, ValueError) as exc:  # purged or unreadable: the UID checks still apply
                log.warning("engine.source_unreadable", error=f"{type(exc).__name__}: {exc}"[:200])
        return SourceSeries(job.study_uid, job.series_uid, frozenset(str(r[0]) for r in rows), patient)

    def _reject(self, d: Dispatch, event: Mapping[str, Any], out_dir: Path, why: str,
                record: dict[str, Any]) -> None:
        """A result that is not the job's own: nothing of it is kept or sent; the job fails with the reason."""
        shutil.rmtree(out_dir, ignore_errors=True)
        reason = f"result of worker {event.get('worker')} rejected: {why}"
        record.update(outputs=[], worker=event.get("worker"), dispatch=d.token, engine="celery", rejected=why)
        failed, others = self.ledger.reject(d.token, d.job_id, reason, record)
        for token in others:
            self._cancel(token)
        log.error("job.result_rejected", token=d.token[:12], worker=event.get("worker"), reason=why, job_failed=failed)
        self._drop(d.token)

    def _drop(self, token: str) -> None:
        rstore.delete_blob(self.client, self.keys.result(token))
        rstore.delete_blob(self.client, self.keys.payload(token))


def _versions(models: Mapping[str, Any]) -> dict[str, str]:
    return {n: str(m.get("version")) for n, m in models.items()}


def build_gateway(cfg: NodeConfig, store: Store, wake: threading.Event, on_result: threading.Event,
                  stop: threading.Event) -> Gateway:
    """Check the broker and the store (a clear error at start, not a hang); return the gateway thread.

    Raises
    ------
    EngineError
        The broker or the Redis store does not answer, or the scale-out extra is missing.
    """
    from sci_node.engine.app import make_app

    eng = cfg.engine
    for event, fields in rstore.security_warnings(eng):
        log.warning(event, **fields)
    rstore.check_broker(str(eng.broker_url))
    client = rstore.connect(str(eng.redis_url))
    write_durable(store.data_dir / ENGINE_FILE, json.dumps(asdict(eng), indent=1).encode())
    log.info("engine.celery", broker=rstore.redact(str(eng.broker_url)), store=rstore.redact(str(eng.redis_url)),
             queue=eng.queue, lease_s=eng.lease_seconds, heartbeat_s=eng.heartbeat_seconds,
             max_outstanding=eng.max_outstanding)
    return Gateway(cfg, store, wake, on_result, stop, make_app(eng), client)
