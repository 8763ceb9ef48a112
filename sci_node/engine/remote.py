"""``sci-node worker``: a Celery worker that runs the node's pipeline on dispatched series.

A worker needs only the broker address (and, when the broker is not Redis, the Redis store):
the series' instances arrive as a payload blob, the SEG, SR and masks go back as a result blob
and a ``result`` event. No shared filesystem, no access to the node's disk.

A task names the model versions and weight checksums that were active on the node when it was
dispatched. The worker runs exactly those (loaded from its own registry, active there or not);
one that lacks them pushes a ``refused`` event and rejects the task back to the queue, for a
worker that has them. It never runs other models.

While a task runs, the worker refreshes ``{ns}:hb:{token}`` every ``heartbeat_seconds`` (expiry:
three beats): the node dispatches the job again when the key has been gone that long.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

import structlog

from sci_node.config import NodeConfig, RoutingRules
from sci_node.engine import TASK_NAME
from sci_node.engine import redis_store as rstore
from sci_node.engine.local import DerivedSCProcessor, FixedProvider, Processor, _PipelineAdapter, process_outcome
from sci_node.errors import EngineError

if TYPE_CHECKING:
    import redis

log = structlog.get_logger("sci_node.engine.remote")
T = TypeVar("T")
RETRY_STORE_S = 120.0


def default_worker_name() -> str:
    """``sci-node-<pid>@<host>``: unique per process, names the host in the job record."""
    return f"sci-node-{os.getpid()}@{socket.gethostname()}"


def _retrying(fn: Callable[[], T], what: str, limit_s: float = RETRY_STORE_S) -> T:
    """Call ``fn`` until it stops raising a connection error (the store restarting), up to ``limit_s``."""
    deadline = time.monotonic() + limit_s
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as exc:
            if time.monotonic() > deadline or not _is_connection_error(exc):
                raise
            log.warning("engine.store_retry", what=what, error=f"{type(exc).__name__}: {exc}"[:200])
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _is_connection_error(exc: BaseException) -> bool:
    import redis

    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError))


class Heartbeat(threading.Thread):
    """Keeps ``key`` alive (expiry = 3 beats) while a task runs; survives store restarts."""

    def __init__(self, client: "redis.Redis", key: str, value: str, interval_s: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.client, self.key, self.value, self.interval = client, key, value, interval_s
        self.done = threading.Event()

    def beat(self) -> None:
        self.client.set(self.key, self.value, px=int(3000 * self.interval))

    def run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # the store restarting: beat again next time
                log.warning("engine.heartbeat_failed", error=f"{type(exc).__name__}: {exc}"[:200])

    def stop(self) -> None:
        self.done.set()
        try:
            self.client.delete(self.key)
        except Exception:
            pass


class TaskRunner:
    """Runs one task: model check, payload, the shared :func:`process_outcome`, result upload.

    Parameters
    ----------
    cfg
        The worker's configuration (models dir, device, engine settings).
    client
        The Redis store.
    name
        This worker's name (``default_worker_name()``).
    """

    def __init__(self, cfg: NodeConfig, client: "redis.Redis", name: str) -> None:
        from sci_node.models.registry import ModelRegistry

        self.cfg, self.client, self.name = cfg, client, name
        self.registry = ModelRegistry(cfg.models_dir)
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def preload(self) -> dict[str, Any]:
        """Load the worker's active models now: a worker that cannot is an error at start.

        Raises
        ------
        ModelError
        """
        models = self.registry.load_active(device=self.cfg.device)  # names what is missing
        fp = self.registry.fingerprint(models.versions)
        with self._lock:
            self._models[json.dumps(fp, sort_keys=True)] = models
        return fp

    def _model_set(self, fp: Mapping[str, Mapping[str, str]]) -> Any:
        key = json.dumps(fp, sort_keys=True)
        with self._lock:
            if key not in self._models:
                self._models[key] = self.registry.load_versions({n: str(m["version"]) for n, m in fp.items()},
                                                                device=self.cfg.device)
                log.info("models.loaded", models={n: m["version"] for n, m in fp.items()})
                while len(self._models) > 2:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]

    def _processor(self, task: Mapping[str, Any]) -> Processor:
        if task.get("processor") == "derived-sc":
            return DerivedSCProcessor()
        from sci_node.pipeline import Pipeline

        names = {f.name for f in fields(RoutingRules)}
        given: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in task["routing"].items()
                                 if k in names}
        rules = RoutingRules(**given)
        return _PipelineAdapter(Pipeline(self._model_set(task["models"]), rules, self.cfg.device,
                                         float(task["max_missing_fraction"])))

    def refusal(self, task: Mapping[str, Any]) -> str | None:
        """Why this worker cannot run ``task`` with the models it names, or None."""
        if task.get("processor", "pipeline") != "pipeline":
            return None
        missing = self.registry.missing_from(task["models"])
        return f"this worker lacks {', '.join(missing)}" if missing else None

    def run(self, task: Mapping[str, Any], requeue: Callable[[str], None]) -> str:
        """Run a task; return what happened (``skipped``, ``refused``, ``payload-missing``, a job state)."""
        keys = rstore.Keys(str(task["ns"]))
        token, job_id = str(task["token"]), int(task["job_id"])
        structlog.contextvars.bind_contextvars(job_id=job_id, series_uid=task.get("series_uid"), token=token[:12])
        try:
            if _retrying(lambda: self.client.exists(keys.cancelled(token)), "cancel check"):
                log.info("task.skipped", reason="cancelled by the node (dispatched again or already resolved)")
                return "skipped"
            reason = self.refusal(task)
            if reason is not None:
                log.error("task.refused", reason=reason, wanted=task["models"])
                rstore.push_event(self.client, keys, {"type": "refused", "token": token, "job_id": job_id,
                                                      "worker": self.name, "reason": reason})
                requeue(reason)
                return "refused"
            return self._run_accepted(task, keys, token, job_id)
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "series_uid", "token")

    def _run_accepted(self, task: Mapping[str, Any], keys: rstore.Keys, token: str, job_id: int) -> str:
        ttl = float(task.get("ttl_seconds", self.cfg.engine.payload_ttl_seconds))
        beat = Heartbeat(self.client, keys.heartbeat(token), self.name, float(task["heartbeat_seconds"]))
        _retrying(beat.beat, "heartbeat")
        beat.start()
        try:
            _retrying(lambda: rstore.push_event(self.client, keys, {"type": "started", "token": token,
                                                                    "job_id": job_id, "worker": self.name,
                                                                    "at": time.time()}), "started event")
            data = _retrying(lambda: rstore.get_blob(self.client, keys.payload(token)), "payload")
            if data is None:
                log.error("task.payload_missing", key=keys.payload(token))
                _retrying(lambda: rstore.push_event(self.client, keys, {"type": "payload-missing", "token": token,
                                                                        "job_id": job_id, "worker": self.name}),
                          "payload-missing event")
                return "payload-missing"
            with tempfile.TemporaryDirectory(prefix="sci-node-task-") as tmp:
                files = rstore.unpack_files(data, Path(tmp) / "in")
                out_dir = Path(tmp) / "out"
                o = process_outcome(FixedProvider(self._processor(task)), files, out_dir, task.get("notes") or ())
                names = sorted(p.name for p in out_dir.iterdir() if p.is_file()) if out_dir.exists() else []
                record = dict(o.record)
                record["outputs"] = [Path(p).name for p in o.outputs]
                if names:
                    blob = rstore.pack_files([out_dir / n for n in names], names)
                    _retrying(lambda: rstore.put_blob(self.client, keys.result(token), blob, ttl), "result upload")
                event = {"type": "result", "token": token, "job_id": job_id, "worker": self.name, "state": o.state,
                         "reason": o.reason, "record": record, "files": names}
                _retrying(lambda: rstore.push_event(self.client, keys, event), "result event")
            log.info("task.finished", state=o.state, reason=o.reason, seconds=record.get("seconds"))
            return o.state
        finally:
            beat.stop()


def _announce(client: "redis.Redis", name: str, doc: Mapping[str, Any], stop: threading.Event, ns: str) -> None:
    """Refresh this worker's presence key (``{ns}:worker:{name}``, 15 s expiry) until ``stop``."""
    key = rstore.Keys(ns).worker(name)
    while not stop.is_set():
        try:
            client.set(key, json.dumps(dict(doc) | {"seen": time.time()}), ex=15)
        except Exception:
            pass
        stop.wait(5.0)


def run_worker(cfg: NodeConfig, name: str | None = None) -> int:
    """Run ``sci-node worker`` in the foreground until SIGTERM/SIGINT; return its exit code.

    Raises
    ------
    EngineError
        The broker or the store does not answer (checked before anything else starts).
    ModelError
        The worker cannot load its models.
    """
    from celery.exceptions import Reject

    from sci_node.engine.app import make_app

    eng = cfg.engine
    if not eng.broker_url:
        raise EngineError("sci-node worker needs --broker redis://HOST:PORT/DB (or [engine] broker_url)")
    for event, detail in rstore.security_warnings(eng):
        log.warning(event, **detail)
    rstore.check_broker(eng.broker_url)
    client = rstore.connect(str(eng.redis_url))
    name = name or default_worker_name()
    if "@" not in name:  # Celery's node names are NAME@HOST: the job record names the host
        name = f"{name}@{socket.gethostname()}"
    runner = TaskRunner(cfg, client, name)
    from sci_node.models.predict_seg import configure_threads

    log.info("worker.torch_threads", threads=configure_threads(cfg.torch_threads, eng.concurrency))
    models = runner.preload()
    app = make_app(eng)

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def process_series(self: Any, task: dict[str, Any]) -> str:
        def requeue(reason: str) -> None:
            time.sleep(min(5.0, float(task.get("heartbeat_seconds", 2.0))))  # no hot loop on a lone worker
            raise Reject(reason, requeue=True)

        return runner.run(task, requeue)

    stop = threading.Event()
    doc = {"name": name, "host": socket.gethostname(), "pid": os.getpid(), "queue": eng.queue,
           "device": cfg.device, "concurrency": eng.concurrency, "models": {n: m["version"] for n, m in models.items()},
           "started": time.time()}
    threading.Thread(target=_announce, args=(client, name, doc, stop, eng.namespace), daemon=True).start()
    log.info("worker.ready", name=name, broker=rstore.redact(eng.broker_url), queue=eng.queue, device=cfg.device,
             concurrency=eng.concurrency, models=doc["models"])
    worker = app.Worker(hostname=name, queues=[eng.queue], concurrency=eng.concurrency,
                        pool="solo" if eng.concurrency == 1 else "threads", loglevel="INFO",
                        without_gossip=True, without_mingle=True, optimization="fair", quiet=True)
    try:
        worker.start()
    finally:
        stop.set()
    return int(getattr(worker, "exitcode", 0) or 0)
