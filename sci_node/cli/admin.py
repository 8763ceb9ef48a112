"""CLI presenters over the node's index: ``status`` and ``jobs list|show|retry``.

They read the SQLite index (safe while the node runs: WAL) and print to stdout through
:mod:`sci_node.terminal` (UIDs, reasons, worker names and destinations may carry a sender's control
characters: they are escaped); ``--json`` prints one machine-readable JSON document instead of the table.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from sci_node.config import NodeConfig
from sci_node.engine.ledger import Ledger
from sci_node.errors import StorageError
from sci_node.store import Job, OutboxEntry, Store
from sci_node.terminal import echo, echo_json


def _open(cfg: NodeConfig) -> Store:
    if not (cfg.data_dir / "index.sqlite3").exists():
        raise StorageError(f"no node index in data dir {str(cfg.data_dir)!r} (has `sci-node serve` run there?)")
    return Store(cfg.data_dir)


def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _active_models(cfg: NodeConfig) -> dict[str, Any]:
    """Active model versions from the registry, or why they are unknown."""
    try:
        from sci_node.models.registry import ModelRegistry

        reg = ModelRegistry(cfg.models_dir)
        for name in ("active_versions", "active"):
            fn = getattr(reg, name, None)
            if callable(fn):
                return dict(fn())
        return {"state": str(reg.state_token())}
    except Exception as exc:  # the registry is optional for status
        return {"unavailable": f"{type(exc).__name__}: {exc}"[:200]}


def _job_dict(job: Job) -> dict[str, Any]:
    d = asdict(job)
    d["seconds"] = round(job.finished_at - job.started_at, 3) if job.finished_at and job.started_at else None
    return d


def print_status(cfg: NodeConfig, as_json: bool = False) -> int:
    """Queue depth, series/outbox counts, the last jobs and the active models."""
    from sci_node.engine.status import engine_status, format_engine

    store = _open(cfg)
    try:
        counts = store.counts()
        last = store.jobs(limit=5)
        engine = engine_status(cfg, store)
    finally:
        store.close()
    models = _active_models(cfg)
    from sci_node.cli.corrections import summary_line
    from sci_node.corrections.index import summary as corrections_summary

    corrections = corrections_summary(cfg)
    if as_json:
        echo_json({"data_dir": str(cfg.data_dir), "counts": counts, "models": models, "engine": engine,
                   "corrections": corrections, "last_jobs": [_job_dict(j) for j in last]})
        return 0
    jobs = counts["jobs"]
    echo(f"data dir      {cfg.data_dir}")
    echo(f"queue         {jobs.get('pending', 0)} pending, {jobs.get('running', 0)} running")
    echo("jobs          " + (", ".join(f"{k} {v}" for k, v in sorted(jobs.items())) or "none"))
    echo("series        " + (", ".join(f"{k} {v}" for k, v in sorted(counts["series"].items())) or "none")
          + f"; {counts['instances']['total']} instances spooled")
    echo("outbox        " + (", ".join(f"{k} {v}" for k, v in sorted(counts["outbox"].items())) or "empty"))
    echo("models        " + (", ".join(f"{k}={v}" for k, v in models.items()) or "none active"))
    echo("corrections   " + summary_line(corrections))
    for line in format_engine(engine):
        echo(line)
    if last:
        echo("last jobs")
        _print_table(last)
    return 0


def _print_table(jobs: list[Job]) -> None:
    echo(f"  {'id':>5}  {'state':<11} {'delivery':<10} {'created':<19}  {'secs':>7}  series / reason")
    for j in jobs:
        d = _job_dict(j)
        secs = f"{d['seconds']:.1f}" if d["seconds"] is not None else "-"
        echo(f"  {j.id:>5}  {j.state:<11} {j.delivery:<10} {_ts(j.created_at):<19}  {secs:>7}  "
              f"{j.series_uid}" + (f"  ({j.reason})" if j.reason else ""))


def list_jobs(cfg: NodeConfig, limit: int = 20, state: str | None = None, as_json: bool = False) -> int:
    """Most recent jobs first."""
    store = _open(cfg)
    try:
        jobs = store.jobs(limit=limit, state=state)
    finally:
        store.close()
    if as_json:
        echo_json([_job_dict(j) for j in jobs])
    elif jobs:
        _print_table(jobs)
    else:
        echo("no jobs" + (f" in state {state!r}" if state else ""))
    return 0


def show_job(cfg: NodeConfig, job_id: int, as_json: bool = False) -> int:
    """One job: state, reason, geometry report, routing, timings, model versions, deliveries."""
    store = _open(cfg)
    try:
        job = store.job(job_id)
        outbox = store.outbox_for_job(job_id)
        dispatches = Ledger(store).of_job(job_id)
    finally:
        store.close()
    pending = [e.next_attempt_at for e in outbox if e.state == "pending"]
    doc = _job_dict(job) | {"deliveries": [asdict(e) | {"next_attempt": _iso(e.next_attempt_at)
                                                         if e.state == "pending" else None} for e in outbox],
                            "next_attempt": _iso(min(pending)) if pending else None,
                            "worker": (job.result or {}).get("worker"),
                            "dispatches": [asdict(d) for d in dispatches]}
    if as_json:
        echo_json(doc)
        return 0
    result = job.result or {}
    echo(f"job {job.id}: {job.state}" + (f" ({job.reason})" if job.reason else ""))
    echo(f"  study        {job.study_uid}")
    echo(f"  series       {job.series_uid} (generation {job.generation}, {job.n_instances} instances)")
    echo(f"  created      {_ts(job.created_at)}; started {_ts(job.started_at)}; finished {_ts(job.finished_at)}; "
          f"attempts {job.attempts}")
    if job.superseded_by:
        echo(f"  superseded   by job {job.superseded_by}")
    if result.get("worker"):
        echo(f"  worker       {result['worker']}")
    for d in dispatches:
        echo(f"  dispatch     {d.token[:12]} {d.state:<10} queue {d.queue}, worker {d.worker or '-'}"
              + (f"  ({d.note})" if d.note else ""))
    fu = (result.get("summary") or {}).get("followup")
    if fu:
        echo(f"  follow-up    {followup_text(fu)}")
    for key in ("routing", "model_versions", "timings", "summary", "outputs"):
        if result.get(key):
            echo(f"  {key:<12} {json.dumps(result[key], default=str)}")
    if job.geometry:
        echo(f"  geometry     {json.dumps(job.geometry)}")
    echo(f"  delivery     {job.delivery}" + (f" (next attempt {_ts(min(pending))})" if pending else ""))
    for e in outbox:
        echo(f"    -> {e.destination:<28} {e.state:<9} attempts {e.attempts}"
              + (f"  sent {_ts(e.sent_at)}" if e.sent_at else "") + _next_attempt(e)
              + (f"  ({e.last_error})" if e.last_error else ""))
    return 0


def _iso(t: float) -> str:
    """An epoch time as ISO 8601 in UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _next_attempt(e: OutboxEntry, now: float | None = None) -> str:
    """``"  next attempt <local time> (in N s)"`` for a pending delivery ("retry" once one failed)."""
    if e.state != "pending":
        return ""
    wait = e.next_attempt_at - (time.time() if now is None else now)
    when = "due now" if wait <= 0 else f"in {wait:.0f} s"
    return f"  next {'retry' if e.attempts else 'attempt'} {_ts(e.next_attempt_at)} ({when})"


def retry_job(cfg: NodeConfig, job_id: int) -> int:
    """Resend a job's results, or re-run it when it produced none; the running node picks it up."""
    store = _open(cfg)
    try:
        how = store.retry_job(job_id)
    finally:
        store.close()
    echo(f"job {job_id}: " + ("results queued for sending again" if how == "resend" else "queued to run again"))
    return 0


def _error_note(csa: dict[str, Any]) -> str:
    """`` (within the 3.04 % scan-rescan error)`` when the record carries the measurement error, else empty."""
    if csa.get("beyond_error") is None:
        return ""
    judged = "beyond" if csa["beyond_error"] else "within"
    return f" ({judged} the {csa['smallest_real_change_pct']} % scan-rescan error)"


def followup_text(fu: dict[str, Any]) -> str:
    """``vs job 3 (study 1.2...): 1 new, 0 enlarging, 2 stable, 0 shrinking, 0 resolved; C2-C3 CSA -1.2 %``."""
    if fu.get("pending"):
        return f"pending (attempt {fu.get('attempts')}, asked again in a moment): {fu.get('reason')}"
    who = f"job {fu.get('prior_job')}" if fu.get("prior_job") is not None else str(fu.get("prior_source") or "?")
    head = f"vs {who} (study {fu.get('prior_study_uid')})"
    if not fu.get("compared"):
        return f"{head}: not compared ({fu.get('reason')})"
    counts = ", ".join(f"{n} {k}" for k, n in (fu.get("counts") or {}).items())
    csa = [f"{name} CSA {v['change_pct']:+.1f} %" + _error_note(v) for name, v in (("C2-C3", fu.get("csa_c2_c3") or {}),
                                                                  ("common-stretch", fu.get("csa_common_stretch")
                                                                   or {}),
                                                                  ("mean", fu.get("csa_mean") or {}))
           if v.get("change_pct") is not None]
    named = [f"lesion {c['lesion_id']} {c['status']}" + (f" ({', '.join(c['vertebral_levels'])})"
                                                         if c.get("vertebral_levels") else "")
             for c in fu.get("changed") or [] if c.get("lesion_id")]
    return f"{head}: {counts}" + (f"; {csa[0]}" if csa else "") + (f"; {'; '.join(named)}" if named else "")
