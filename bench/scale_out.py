"""Scale-out: series per minute on the celery engine with 1 and 2 workers, and its overhead per job.

Three runs on the same input (copies of the bundled ``sample/series``, each a new study/series,
sent with ``storescu`` to a node on loopback):

* ``local``     the embedded default: ``sci-node serve`` with one in-process worker;
* ``celery-1``  ``sci-node serve --engine celery`` + one ``sci-node worker``;
* ``celery-2``  the same with two workers.

A fresh ``redis-server`` (free port, no persistence) serves as broker and store. Every worker
(and the local node) runs torch on one thread, so two workers use the two cores of this machine.
Each run first sends one warm-up series per worker (models loaded, first-call costs paid), then
``--copies`` series in one association: series per minute = copies / (last job finished - first
job completed). Then ``--singles`` series one at a time, each after the previous finished (idle
workers, no queueing): the median job wall time (claimed/dispatched to result recorded), the
median processing time the worker measured itself, and their difference, the engine's overhead
per job in ms (payload upload, broker, download, result upload and collection; ~0 for ``local``).

Usage (from the repo root; needs ``bash scripts/install.sh --scale-out``)::

    .venv/bin/python bench/scale_out.py [--copies 8] [--singles 5] [--processor pipeline|derived-sc]
        [--modes local celery-1 celery-2] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    REPO,
    emit,
    free_port,
    loadavg,
    machine,
    replicate,
    sci_node_cmd,
    start_node,
    start_storescp,
    stop,
    storescu,
    wait_port,
)

SAMPLE = REPO / "sample" / "series"


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with open(work / "redis.log", "ab") as fh:
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"], stdout=fh, stderr=subprocess.STDOUT)
    wait_port(port, proc=proc)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_worker(work: Path, name: str, broker: str) -> subprocess.Popen[bytes]:
    log = work / f"{name}.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([*sci_node_cmd(), "worker", "--broker", broker, "--name", name, "--torch-threads", "1",
                                 "--log-format", "json", "--log-level", "INFO"], stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while " ready." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker {name} did not start: {log.read_text()[-1500:]}")
        time.sleep(0.2)
    return proc


def jobs_of(data_dir: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{data_dir / 'index.sqlite3'}?mode=ro", uri=True, timeout=5) as con:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM jobs ORDER BY id")]


def wait_jobs(data_dir: Path, n: int, timeout: float = 1800) -> list[dict[str, Any]]:
    """Wait until the node has ``n`` jobs and all have finished; return them."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = jobs_of(data_dir)
        if len(jobs) == n and all(j["finished_at"] for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs not finished: {[j['state'] for j in jobs]}")
        time.sleep(0.1)


def one_run(mode: str, batches: dict[str, list[list[Path]]], work: Path, broker: str | None,
            processor: str) -> dict[str, Any]:
    """Start node (+ workers); warm up; the throughput batch at once; then the singles one by one."""
    dest, dest_port = start_storescp(work / f"{mode}-out")
    toml = "torch_threads = 1\n"
    if mode != "local":
        toml += f'[engine]\nkind = "celery"\nbroker_url = "{broker}"\nnamespace = "{mode}"\n'
    workers = [start_worker(work, f"{mode}-w{i + 1}", str(broker)) for i in range(int(mode[-1]))] \
        if mode != "local" else []
    data = work / f"{mode}-data"
    node, port = start_node(data, stable=1.0, processor=processor, dest_port=dest_port, extra_toml=toml,
                            log_level="INFO")
    try:
        n = 0
        for warm in batches["warmup"]:  # one series per worker: models loaded, first-call costs paid
            storescu(port, warm, called="SCINODE")
        n += len(batches["warmup"])
        wait_jobs(data, n)
        storescu(port, [f for s in batches["throughput"] for f in s], called="SCINODE")
        n += len(batches["throughput"])
        throughput = wait_jobs(data, n)[-len(batches["throughput"]):]
        for single in batches["singles"]:
            storescu(port, single, called="SCINODE")
            n += 1
            wait_jobs(data, n)
        singles = jobs_of(data)[-len(batches["singles"]):]
    finally:
        for p in (node, *workers, dest):
            stop(p)
    span = max(j["finished_at"] for j in throughput) - min(j["created_at"] for j in throughput)
    records = [json.loads(j["result"] or "{}") for j in singles]
    wall = [j["finished_at"] - j["started_at"] for j in singles]
    proc_s = [float(r.get("seconds") or 0) for r in records]
    return {"mode": mode, "processor": processor, "copies": len(batches["throughput"]),
            "states": sorted({j["state"] for j in throughput + singles}),
            "series_per_min": round(len(throughput) / span * 60, 2), "span_s": round(span, 2),
            "singles": len(singles), "job_wall_median_s": round(statistics.median(wall), 3),
            "worker_seconds_median": round(statistics.median(proc_s), 3),
            "overhead_median_ms": round(statistics.median(w - p for w, p in zip(wall, proc_s)) * 1000, 1),
            "workers": sorted({str(json.loads(j["result"] or "{}").get("worker", "in-process"))
                               for j in throughput}), "load": loadavg()}


def batches_of(files: list[Path], copies: int, singles: int, warmup: int) -> dict[str, list[list[Path]]]:
    """Split the replicated series (``replicate`` writes ``c<copy>_<slice>.dcm``) into the three phases."""
    series: dict[str, list[Path]] = {}
    for f in files:
        series.setdefault(f.name.split("_")[0], []).append(f)
    order = [series[k] for k in sorted(series)]
    return {"warmup": order[:warmup], "throughput": order[warmup:warmup + copies],
            "singles": order[warmup + copies:warmup + copies + singles]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=8, help="series sent at once for the throughput")
    ap.add_argument("--singles", type=int, default=5, help="series sent one by one for the overhead")
    ap.add_argument("--processor", default="pipeline", choices=["pipeline", "derived-sc"])
    ap.add_argument("--modes", nargs="*", default=["local", "celery-1", "celery-2"])
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    emit({"bench": "machine", **machine()}, args.json_out)
    work = Path(tempfile.mkdtemp(prefix="scinode-scaleout-"))
    redis, broker = start_redis(work)
    try:
        files = replicate(SAMPLE, args.copies + args.singles + 2, work / "in")
        results = {}
        for mode in args.modes:
            n_workers = 1 if mode == "local" else int(mode[-1])
            batches = batches_of(files, args.copies, args.singles, warmup=n_workers)
            results[mode] = one_run(mode, batches, work, broker, args.processor)
            emit({"bench": "scale_out", **results[mode]}, args.json_out)
        if "celery-1" in results and "celery-2" in results:
            emit({"bench": "scale_out_ratio", "two_over_one": round(results["celery-2"]["series_per_min"]
                                                                    / results["celery-1"]["series_per_min"], 2)},
                 args.json_out)
    finally:
        stop(redis)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
