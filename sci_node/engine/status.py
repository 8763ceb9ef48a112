"""What ``sci-node status`` (and the Orthanc plugin's ``/sci-node/`` page) shows of the engine.

The workers come from Celery's remote control (``inspect().ping()`` / ``active()``, one second
to answer) and from their presence keys in the store (host, queue, device, models); what is out
per worker comes from the node's own dispatch ledger.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from sci_node.config import EngineConfig, NodeConfig
from sci_node.engine import ENGINE_FILE
from sci_node.engine import redis_store as rstore
from sci_node.engine.ledger import Ledger
from sci_node.errors import EngineError
from sci_node.store import Store


def engine_status(cfg: NodeConfig, store: Store, timeout_s: float = 1.0) -> dict[str, Any]:
    """The engine as a JSON-able dict: kind, broker, workers, dispatches, jobs out per worker."""
    eng = running_engine(cfg, store)
    cfg = dataclasses.replace(cfg, engine=eng)
    doc: dict[str, Any] = {"kind": eng.kind}
    ledger = Ledger(store).counts()
    if eng.kind != "celery":
        if ledger["dispatches"]:
            doc["dispatches"] = ledger["dispatches"]
        return doc
    doc.update(broker=rstore.redact(str(eng.broker_url)), store=rstore.redact(str(eng.redis_url)), queue=eng.queue,
               lease_seconds=eng.lease_seconds, **ledger)
    try:
        doc["workers"] = _workers(cfg, timeout_s)
    except EngineError as exc:
        doc["workers"], doc["workers_error"] = [], str(exc)
    return doc


def running_engine(cfg: NodeConfig, store: Store) -> EngineConfig:
    """``cfg.engine``, or the one the gateway on this data dir wrote at its start when ``cfg`` is local."""
    if cfg.engine.kind == "celery":
        return cfg.engine
    try:
        raw = json.loads((store.data_dir / ENGINE_FILE).read_text(encoding="utf-8"))
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        eng = EngineConfig(**{k: v for k, v in raw.items() if k in names})
    except (OSError, ValueError, TypeError):
        return cfg.engine
    return eng if eng.kind == "celery" and eng.broker_url else cfg.engine


def _workers(cfg: NodeConfig, timeout_s: float) -> list[dict[str, Any]]:
    eng = cfg.engine
    rstore.check_broker(str(eng.broker_url), timeout_s=max(timeout_s, 2.0))
    client = rstore.connect(str(eng.redis_url), timeout_s=max(timeout_s, 2.0))
    keys = rstore.Keys(eng.namespace)
    presence = {}
    for key in client.scan_iter(match=keys.worker("*"), count=200):
        raw = client.get(key)
        if raw:
            doc = json.loads(raw)
            presence[str(doc.get("name"))] = doc
    from sci_node.engine.app import make_app

    app = make_app(eng)
    try:
        insp = app.control.inspect(timeout=timeout_s)
        ping = insp.ping() or {}
        active = insp.active() or {}
    except Exception as exc:  # kombu/redis errors while asking the workers
        raise EngineError(f"cannot ask the workers through {rstore.redact(str(eng.broker_url))!r}: {exc}") from exc
    finally:
        app.close()
    out = []
    for name in sorted(set(ping) | set(presence)):
        jobs = [int(t["args"][0]["job_id"]) for t in active.get(name, []) if t.get("args")]
        info = presence.get(name, {})
        out.append({"name": name, "connected": name in ping, "host": info.get("host"), "queue": info.get("queue"),
                    "device": info.get("device"), "models": info.get("models"), "running_jobs": jobs})
    return out


def format_engine(doc: dict[str, Any]) -> list[str]:
    """The engine lines of the ``sci-node status`` table."""
    if doc.get("kind") != "celery":
        return ["engine        local (models run in this node)"]
    lines = [f"engine        celery: broker {doc['broker']}, queue {doc['queue']}, lease {doc['lease_seconds']:.0f} s",
             "dispatches    " + (", ".join(f"{k} {v}" for k, v in sorted(doc["dispatches"].items())) or "none")]
    out = doc.get("out_per_worker") or {}
    lines.append("out           " + (", ".join(f"{w}: {n}" for w, n in sorted(out.items())) or "nothing out"))
    if doc.get("workers_error"):
        lines.append(f"workers       unknown ({doc['workers_error']})")
    for w in doc.get("workers", []):
        state = "connected" if w["connected"] else "not answering"
        models = ", ".join(f"{k}={v}" for k, v in (w.get("models") or {}).items())
        lines.append(f"  worker      {w['name']} {state}, queue {w.get('queue')}, {w.get('device')}, running jobs "
                     f"{w['running_jobs'] or '-'}" + (f"; models {models}" if models else ""))
    if not doc.get("workers") and not doc.get("workers_error"):
        lines.append("workers       none connected")
    return lines
