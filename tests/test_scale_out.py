"""Scale-out on loopback: a real redis-server, the node as gateway, real ``sci-node worker`` processes.

dcmtk ``storescu`` is the scanner and dcmtk ``storescp`` (``+uf``: every delivery is its own
file) the destination, so "exactly one SEG per series" is counted in files. The workers run the
real pipeline on copies of the bundled sample series.
"""
from __future__ import annotations

import collections
import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pydicom
import pytest

from conftest import NodeProc, StoreSCP, free_port, storescu, wait_for
from scale_out_support import RedisProc, WorkerProc, dispatches, sci_node_cmd

REPO = Path(__file__).resolve().parent.parent
SAMPLE = sorted((REPO / "sample" / "series").glob("*.dcm"))
# the default heartbeat (2 s; lost after 3 missed beats): with 0.5 s a worker busy in a GIL-holding stage on a
# loaded 2-core machine was declared lost mid-job (clean-clone CI 2026-12-03: a second dispatch, superseded)
ENGINE_TOML = "[engine]\nheartbeat_seconds = 2.0\nlease_seconds = 120.0\n"

def renamed(out: Path) -> list[Path]:
    """The sample series as a new series of a new study of another patient (new UIDs and Patient ID), as another
    scanner would send it: one copy is never the follow-up of another (no comparison SEG among the SEGs counted)."""
    from pydicom.uid import generate_uid

    out.mkdir(parents=True, exist_ok=True)
    study, series, paths = generate_uid(), generate_uid(), []
    patient = "SO" + series[-12:]
    for f in SAMPLE:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study, series, patient
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f.name, enforce_file_format=True)
        paths.append(out / f.name)
    return paths


def short(worker: str) -> str:
    """``w1@host`` -> ``w1`` (a worker named without a host gets this machine's)."""
    return worker.split("@", 1)[0]


def segs_per_series(dest: StoreSCP) -> collections.Counter[str]:
    """Source series UID -> number of DICOM-SEG files that arrived for it."""
    out: collections.Counter[str] = collections.Counter()
    for f in dest.files():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.Modality == "SEG":
            out[str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)] += 1
    return out


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProc]:
    server = RedisProc(free_port(), tmp_path / "redis.log").start()
    yield server
    server.kill9()


@pytest.fixture
def workers(tmp_path: Path, redis_server: RedisProc) -> Iterator[Callable[..., WorkerProc]]:
    made: list[WorkerProc] = []

    def factory(name: str, *args: str, wait_ready: bool = True) -> WorkerProc:
        w = WorkerProc(name, redis_server.url, tmp_path / f"{name}.log", list(args))
        made.append(w)
        return w.start(wait_ready=wait_ready)

    yield factory
    for w in made:
        w.kill9()


def gateway(node_factory: Callable[..., NodeProc], redis: RedisProc, dest: StoreSCP, toml: str = ENGINE_TOML,
            *args: str) -> NodeProc:
    """The node as gateway, started the issue's way (``--engine celery --broker URL``); the config file
    names the broker too, so ``sci-node status --config`` on it sees the engine."""
    toml += f'kind = "celery"\nbroker_url = "{redis.url}"\n'
    return node_factory(toml, "--engine", "celery", "--broker", redis.url, "--stable-seconds", "1",
                        "--destination", f"DEST@127.0.0.1:{dest.port}", *args).start(timeout=60)


def wait_delivered(node: NodeProc, n: int, timeout: float = 300) -> list[dict]:
    def done() -> bool:
        jobs = node.jobs()
        return len(jobs) == n and all(j["delivery"] == "delivered" for j in jobs)

    wait_for(done, timeout, interval=0.5, what=f"{n} jobs delivered")
    time.sleep(1.5)  # anything delivered twice would arrive by now
    return node.jobs()


@pytest.mark.slow
def test_n_series_in_n_segs_out_on_two_workers(node_factory: Callable[..., NodeProc],
                                               storescp_factory: Callable[..., StoreSCP],
                                               redis_server: RedisProc, workers: Callable[..., WorkerProc],
                                               tmp_path: Path) -> None:
    dest = storescp_factory()
    w1, w2 = workers("w1"), workers("w2")
    node = gateway(node_factory, redis_server, dest)
    sent = [renamed(tmp_path / f"s{i}") for i in range(3)]
    for files in sent:
        assert storescu(node.port, files).returncode == 0
    jobs = wait_delivered(node, 3)
    series = {str(pydicom.dcmread(f[0], stop_before_pixels=True).SeriesInstanceUID) for f in sent}
    assert segs_per_series(dest) == {s: 1 for s in series}
    assert all(j["state"] == "done" and j["result"]["engine"] == "celery" for j in jobs)
    assert {short(j["result"]["worker"]) for j in jobs} == {w1.name, w2.name}  # prefetch 1: both took work
    assert all(j["result"]["model_versions"]["cord"] for j in jobs)
    # status: the engine, both workers connected, nothing out
    status = node.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    engine = json.loads(status.stdout)["engine"]
    assert engine["kind"] == "celery" and engine["dispatches"] == {"resolved": 3}
    assert {short(w["name"]) for w in engine["workers"] if w["connected"]} == {w1.name, w2.name}
    assert all(w["host"] and w["queue"] == "cpu" and w["models"]["cord"] for w in engine["workers"])
    text = node.cli("status").stdout
    assert "engine        celery" in text and f"worker      {w1.name}@" in text and " connected, queue cpu" in text
    shown = node.cli("jobs", "show", str(jobs[0]["id"])).stdout
    assert f"worker       {jobs[0]['result']['worker']}" in shown and "resolved" in shown
    # the payload and result keys are gone once the node holds the results
    keys = subprocess.run(["redis-cli", "-p", str(redis_server.port), "--scan", "--pattern", "sci-node:*"],
                          capture_output=True, text=True, timeout=10).stdout.split()
    assert not [k for k in keys if ":payload:" in k or ":result:" in k], keys


@pytest.mark.slow
def test_kill9_of_the_worker_holding_the_job_still_one_seg(node_factory: Callable[..., NodeProc],
                                                           storescp_factory: Callable[..., StoreSCP],
                                                           redis_server: RedisProc,
                                                           workers: Callable[..., WorkerProc],
                                                           tmp_path: Path) -> None:
    dest = storescp_factory()
    by_name = {w.name: w for w in (workers("wa"), workers("wb"))}
    node = gateway(node_factory, redis_server, dest)
    files = renamed(tmp_path / "s")
    assert storescu(node.port, files).returncode == 0

    def holder() -> str | None:
        started = [d for d in dispatches(node.data_dir) if d["state"] == "out" and d["started_at"]]
        return started[0]["worker"] if started else None

    wait_for(lambda: holder() is not None, 120, interval=0.02, what="a worker running the job")
    victim = short(str(holder()))
    assert victim in by_name
    by_name[victim].kill9()  # mid-job: the task is unacknowledged, its heartbeat stops
    (job,) = wait_delivered(node, 1)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert segs_per_series(dest) == {series: 1}
    (survivor,) = set(by_name) - {victim}
    assert job["state"] == "done" and short(job["result"]["worker"]) == survivor
    states = [d["state"] for d in node.job(job["id"])["dispatches"]]
    assert states[0] == "lost" and "resolved" in states, states
    assert "no heartbeat" in node.job(job["id"])["dispatches"][0]["note"]


@pytest.mark.slow
def test_gateway_killed_while_a_job_is_out_collects_its_result_after_restart(
        node_factory: Callable[..., NodeProc], storescp_factory: Callable[..., StoreSCP], redis_server: RedisProc,
        workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    dest = storescp_factory()
    w = workers("wn")
    node = gateway(node_factory, redis_server, dest)
    files = renamed(tmp_path / "s")
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: any(d["started_at"] for d in dispatches(node.data_dir)), 120, interval=0.02,
             what="the worker running the job")
    node.kill9()  # the gateway dies with the job out at the worker
    wait_for(lambda: '"task.finished"' in w.text(), 300, interval=0.2, what="the worker to finish the task")
    assert dest.files() == []
    node.start(timeout=60)
    (job,) = wait_delivered(node, 1)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert segs_per_series(dest) == {series: 1}
    assert job["attempts"] == 1 and short(job["result"]["worker"]) == w.name  # collected, not run again
    assert [d["state"] for d in node.job(job["id"])["dispatches"]] == ["resolved"]


@pytest.mark.slow
def test_redis_restart_mid_flight_loses_nothing(node_factory: Callable[..., NodeProc],
                                                storescp_factory: Callable[..., StoreSCP],
                                                redis_server: RedisProc, workers: Callable[..., WorkerProc],
                                                tmp_path: Path) -> None:
    dest = storescp_factory()
    workers("wr")
    node = gateway(node_factory, redis_server, dest)
    sent = [renamed(tmp_path / f"s{i}") for i in range(2)]
    for files in sent:
        assert storescu(node.port, files).returncode == 0
    wait_for(lambda: len([d for d in dispatches(node.data_dir) if d["state"] == "out"]) == 2, 60, interval=0.05,
             what="both jobs dispatched")
    redis_server.kill9()  # the queue, the payloads and the heartbeats are gone (no persistence)
    time.sleep(1.0)
    redis_server.start()
    wait_delivered(node, 2)
    series = {str(pydicom.dcmread(f[0], stop_before_pixels=True).SeriesInstanceUID) for f in sent}
    assert segs_per_series(dest) == {s: 1 for s in series}
    log = node.log.read_text()
    assert "engine.store_unreachable" in log or "engine.broker_restarted" in log


@pytest.mark.slow
def test_model_mismatch_is_refused_and_requeued_and_hot_swap_reaches_the_workers(
        node_factory: Callable[..., NodeProc], storescp_factory: Callable[..., StoreSCP], redis_server: RedisProc,
        workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    node_models, old_models = tmp_path / "node-models", tmp_path / "old-models"
    for d in (node_models, old_models):
        shutil.copytree(REPO / "models", d, ignore=shutil.ignore_patterns(".registry.lock"))
    sci = sci_node_cmd()
    assert subprocess.run([*sci, "models", "--models-dir", str(old_models), "activate", "cord", "0.2.0"],
                          capture_output=True, timeout=120).returncode == 0
    active_cord = json.loads((node_models / "registry.json").read_text())["active"]["cord"]
    assert active_cord != "0.2.0"
    shutil.rmtree(old_models / "cord" / active_cord)  # this worker lacks the node's active cord model
    old = workers("old", "--models-dir", str(old_models))
    dest = storescp_factory()
    node = gateway(node_factory, redis_server, dest, ENGINE_TOML, "--models-dir", str(node_models))
    assert storescu(node.port, renamed(tmp_path / "s1")).returncode == 0

    def noted() -> str:
        return " ".join(d["note"] or "" for d in dispatches(node.data_dir))

    wait_for(lambda: "refused by old" in noted(), 120, interval=0.2, what="the refusal")
    assert f"cord {active_cord} (not registered)" in noted()
    assert node.jobs()[0]["state"] == "running"  # back in the queue, not failed, not run on other models
    new = workers("new")  # has every model (the repo's registry)
    (job,) = wait_delivered(node, 1)
    assert short(job["result"]["worker"]) == new.name and job["result"]["model_versions"]["cord"] == active_cord
    # hot swap on the node: the next job carries the new versions to the workers
    assert subprocess.run([*sci, "models", "--models-dir", str(node_models), "activate", "cord", "0.2.0"],
                          capture_output=True, timeout=120).returncode == 0
    assert storescu(node.port, renamed(tmp_path / "s2")).returncode == 0
    jobs = wait_delivered(node, 2)
    assert jobs[0]["result"]["model_versions"]["cord"] == "0.2.0"
    assert sum(segs_per_series(dest).values()) == 2
    assert old.proc is not None and old.proc.poll() is None  # refusing is not dying


def test_wrong_broker_url_and_unloadable_models_are_clear_errors_at_start(tmp_path: Path) -> None:
    closed = free_port()
    url = f"redis://127.0.0.1:{closed}/0"
    sci = sci_node_cmd()
    t0 = time.monotonic()
    serve = subprocess.run([*sci, "serve", "--engine", "celery", "--broker", url, "--port", str(free_port()),
                            "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    worker = subprocess.run([*sci, "worker", "--broker", url], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 40  # an error, not a hang
    for res in (serve, worker):
        assert res.returncode != 0 and f"cannot reach the Redis store 'redis://127.0.0.1:{closed}/0'" in res.stderr, \
            res.stderr[-2000:]
    bad = subprocess.run([*sci, "serve", "--engine", "celery"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "engine kind celery needs a broker URL" in bad.stderr
    bad = subprocess.run([*sci, "serve", "--engine", "celery", "--broker", "http://x"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "engine.broker_url: 'http://x' is not a" in bad.stderr


def test_worker_that_cannot_load_its_models_fails_at_start(redis_server: RedisProc, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = subprocess.run([*sci_node_cmd(), "worker", "--broker", redis_server.url, "--models-dir",
                          str(tmp_path / "empty")], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "no active version of" in res.stderr, res.stderr[-2000:]


def test_blobs_are_chunked_expire_and_round_trip(redis_server: RedisProc, tmp_path: Path) -> None:
    from sci_node.engine import redis_store as rstore

    client = rstore.connect(redis_server.url)
    data = bytes(range(256)) * 1000
    rstore.put_blob(client, "t:blob", data, ttl_s=60, chunk_bytes=10_000)
    assert rstore.get_blob(client, "t:blob") == data
    assert client.exists(*[f"t:blob:{i}" for i in range(26)]) == 26 and 0 < client.ttl("t:blob:3") <= 60
    client.delete("t:blob:7")  # a lost chunk: the blob is missing, never half there
    assert rstore.get_blob(client, "t:blob") is None
    rstore.delete_blob(client, "t:blob")
    assert not client.keys("t:blob*")
    files = rstore.unpack_files(rstore.pack_files(SAMPLE[:3]), tmp_path / "x")
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in SAMPLE[:3]]


@pytest.mark.slow
def test_stack_on_the_celery_engine_seg_in_orthanc_and_workers_on_the_plugin_page(
        redis_server: RedisProc, workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    import httpx

    from stack_support import PASSWORD, USER, StackProc

    w = workers("ws")
    stack = StackProc(tmp_path / "stack", toml=ENGINE_TOML + f'kind = "celery"\nbroker_url = "{redis_server.url}"\n')
    stack.start()
    try:
        files = renamed(tmp_path / "s")
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        stack.storescu(files)
        wait_for(lambda: bool(stack.find_series(study, "SEG")), 300, interval=1.0, what="the SEG back in Orthanc")
        page = httpx.get(stack.url + "/sci-node/", auth=(USER, PASSWORD), timeout=60, trust_env=False).text
        assert f"celery: broker redis://127.0.0.1:{redis_server.port}/0" in page, page[-3000:]
        assert f"<td>{w.name}@" in page and "<td>connected</td>" in page
        (job,) = stack.sci_node_jobs()["jobs"]
        assert short(job["result"]["worker"]) == w.name
    finally:
        assert stack.proc is not None
        stack.proc.terminate()
        stack.proc.wait(60)


# -- issue 36: Redis with authentication and TLS; results checked before they go to PACS --------------------

PLUMBING_ENGINE = 'processor = "derived-sc"\n' + ENGINE_TOML


def lan_address() -> str:
    """A non-loopback IPv4 address of this host: a broker there is "on another host" for the gateway."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.123", 9))  # UDP connect sends nothing: it only picks the outgoing address
        address = str(s.getsockname()[0])
    assert not address.startswith("127."), "this host has no non-loopback IPv4 address"
    return address


def _log_events(node: NodeProc) -> list[dict]:
    return [json.loads(x) for x in node.log.read_text().splitlines() if x.startswith("{")]


def test_a_broker_on_another_host_without_a_password_is_refused_unless_allowed(
        node_factory: Callable[..., NodeProc], tmp_path: Path) -> None:
    lan, sci = lan_address(), sci_node_cmd()
    url = f"redis://{lan}:{free_port()}/0"
    for argv in (["serve", "--engine", "celery", "--broker", url, "--port", str(free_port()), "--data-dir",
                  str(tmp_path / "d")], ["worker", "--broker", url]):
        res = subprocess.run([*sci, *argv], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stderr[-2000:]
        assert f"engine.broker_url: '{url}' is on another host and has no password" in res.stderr
        assert "allow_unauthenticated_broker = true" in res.stderr
    # explicitly allowed: the gateway starts on that (real) broker and says twice what is wrong with it
    open_redis = RedisProc(free_port(), tmp_path / "open.log", host=lan).start()
    try:
        node = node_factory(PLUMBING_ENGINE + f'kind = "celery"\nbroker_url = "{open_redis.url}"\n'
                            "allow_unauthenticated_broker = true\n", name="open").start(timeout=60)
        wait_for(lambda: any(e["event"] == "node.ready" for e in _log_events(node)), 60, what="the gateway ready")
        warned = {e["event"]: e for e in _log_events(node) if e["event"].startswith("engine.broker_")}
        assert set(warned) == {"engine.broker_unauthenticated", "engine.broker_plaintext"}, warned
        assert warned["engine.broker_plaintext"]["url"] == open_redis.url
        node.stop()
    finally:
        open_redis.kill9()
    # a password on loopback: no warning about authentication, and the password is in no log line
    secret = "pw-" + uuid.uuid4().hex
    locked = RedisProc(free_port(), tmp_path / "locked.log", password=secret).start()
    try:
        node = node_factory(PLUMBING_ENGINE + f'kind = "celery"\nbroker_url = "{locked.url}"\n',
                            name="locked").start(timeout=60)
        wait_for(lambda: any(e["event"] == "node.ready" for e in _log_events(node)), 60, what="the gateway ready")
        assert not [e for e in _log_events(node) if e["event"].startswith("engine.broker_")]
        status = node.cli("status")
        assert status.returncode == 0 and f"redis://:***@127.0.0.1:{locked.port}/0" in status.stdout
        node.stop()
        assert secret not in node.log.read_text() + status.stdout + status.stderr
    finally:
        locked.kill9()


@pytest.mark.slow
def test_rediss_with_an_acl_user_end_to_end_and_tls_verified(node_factory: Callable[..., NodeProc],
                                                            storescp_factory: Callable[..., StoreSCP],
                                                            tmp_path: Path) -> None:
    """``rediss://USER:PASSWORD@HOST`` for redis-py and Celery alike, on a redis-server that speaks only TLS
    and whose ``default`` user is off; Celery's connection verifies the server's certificate too."""
    from test_security import make_pki

    from sci_node.config import EngineConfig
    from sci_node.engine.app import make_app

    pki = make_pki(tmp_path / "pki")
    secret = "pw-" + uuid.uuid4().hex
    redis = RedisProc(free_port(), tmp_path / "redis.log", user="scinode", password=secret,
                      tls=(pki["node_crt"], pki["node_key"], pki["ca_crt"])).start()
    try:
        worker = WorkerProc("wt", redis.url, tmp_path / "wt.log").start()
        dest = storescp_factory()
        node = node_factory(PLUMBING_ENGINE + f'kind = "celery"\nbroker_url = "{redis.url}"\n', "--stable-seconds",
                            "1", "--destination", f"DEST@127.0.0.1:{dest.port}").start(timeout=60)
        files = renamed(tmp_path / "s")
        assert storescu(node.port, files).returncode == 0
        (job,) = wait_delivered(node, 1, timeout=180)
        assert job["state"] == "done" and short(job["result"]["worker"]) == "wt"
        (sc,) = [pydicom.dcmread(f) for f in dest.files()]
        assert sc.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID  # checked, accepted, sent
        shown = node.cli("status").stdout
        assert f"rediss://scinode:***@127.0.0.1:{redis.port}/0" in shown
        assert not [e for e in _log_events(node) if e["event"] == "engine.broker_unauthenticated"]
        worker.stop()
        node.stop()
        assert secret not in node.log.read_text() + worker.text() + shown
        # a wrong password, and a CA that does not sign the server's certificate: clear errors at start
        wrong = redis.url.replace(secret, "not-it")
        untrusted = redis.url.replace(str(pki["ca_crt"]), str(pki["rogue_crt"]))
        for url, why in ((wrong, "invalid username-password pair"), (untrusted, "CERTIFICATE_VERIFY_FAILED")):
            res = subprocess.run([*sci_node_cmd(), "worker", "--broker", url], capture_output=True, text=True,
                                 timeout=120)
            assert res.returncode != 0 and why in res.stderr, res.stderr[-2000:]
            assert "not-it" not in res.stderr
        # Celery's own connection (the task queue) verifies the server as redis-py does, also when the URL names
        # no CA (the system's CAs do not know this one): it used to accept any certificate then
        for url in (untrusted, redis.url.split("?", 1)[0]):
            app = make_app(EngineConfig(kind="celery", broker_url=url))
            with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
                with app.connection_for_write() as conn:
                    conn.ensure_connection(max_retries=1, timeout=5)
                    conn.default_channel.client.ping()
    finally:
        redis.kill9()


def _forged(keys: Any, client: Any, token: str, job_id: int, path: Path) -> None:
    """What anyone who can write to the Redis does: a result blob and a ``result`` event for a live token."""
    from sci_node.engine import store as rstore

    rstore.put_blob(client, keys.result(token), rstore.pack_files([path], [path.name]), 600)
    rstore.push_event(client, keys, {"type": "result", "token": token, "job_id": job_id, "worker": "evil@nowhere",
                                     "state": "done", "reason": None, "files": [path.name],
                                     "record": {"status": "done", "outputs": [path.name]}})


def test_forged_results_are_refused_and_nothing_reaches_pacs(node_factory: Callable[..., NodeProc],
                                                            storescp_factory: Callable[..., StoreSCP],
                                                            tmp_path: Path) -> None:
    """No worker runs; the test writes to Redis instead: an object of another study, the source MR image
    itself, and a well-formed result whose event names another job. Each is refused and logged, its job
    fails with the reason, and the destination receives nothing."""
    from sci_node.engine import store as rstore
    from sci_node.engine.local import DerivedSCProcessor

    secret = "pw-" + uuid.uuid4().hex
    redis = RedisProc(free_port(), tmp_path / "redis.log", password=secret).start()
    try:
        dest = storescp_factory()
        node = node_factory(PLUMBING_ENGINE + f'kind = "celery"\nbroker_url = "{redis.url}"\n', "--stable-seconds",
                            "1", "--destination", f"DEST@127.0.0.1:{dest.port}").start(timeout=60)
        sent = [renamed(tmp_path / f"s{i}") for i in range(3)]
        for files in sent:
            assert storescu(node.port, files).returncode == 0
        wait_for(lambda: len([d for d in dispatches(node.data_dir) if d["state"] == "out"]) == 3, 60,
                 interval=0.2, what="three jobs dispatched")
        series_of = {str(pydicom.dcmread(f[0], stop_before_pixels=True).SeriesInstanceUID): f for f in sent}
        job_series = {j["id"]: j["series_uid"] for j in node.jobs()}
        out = {d["job_id"]: d["token"] for d in dispatches(node.data_dir)}
        (j1, j2, j3) = sorted(out)
        other_study = DerivedSCProcessor().process(renamed(tmp_path / "elsewhere"), tmp_path / "o1").outputs[0]
        honest_3 = DerivedSCProcessor().process(series_of[job_series[j3]], tmp_path / "o3").outputs[0]
        client, keys = rstore.connect(redis.url), rstore.Keys("sci-node")
        _forged(keys, client, out[j1], j1, other_study)
        _forged(keys, client, out[j2], j2, series_of[job_series[j2]][0])
        _forged(keys, client, out[j3], j1, honest_3)
        wait_for(lambda: all(j["state"] not in ("pending", "running") for j in node.jobs()), 60, interval=0.5,
                 what="the three jobs to end")
        time.sleep(3)  # anything queued for the destination would arrive by now
        assert dest.files() == [] and {j["state"] for j in node.jobs()} == {"failed"}
        reasons = {j["id"]: j["reason"] for j in node.jobs()}
        assert "result of worker evil@nowhere rejected" in reasons[j1]
        assert "Study Instance UID" in reasons[j1] and "is not the source study" in reasons[j1]
        assert "SOP Class UID '1.2.840.10008.5.1.4.1.1.4' is not one this job's processor writes" in reasons[j2]
        assert f"the result names job {j1}, but its token" in reasons[j3] and f"for job {j3}" in reasons[j3]
        assert {d["state"] for d in dispatches(node.data_dir)} == {"rejected"}
        rejected = [e for e in _log_events(node) if e["event"] == "job.result_rejected"]
        assert len(rejected) == 3 and all(e["level"] == "error" and e["job_failed"] for e in rejected)
        assert not list((node.data_dir / "results").rglob("*.dcm"))  # nothing of them is kept either
        assert not client.keys("sci-node:result:*")
    finally:
        redis.kill9()


# -- issue 39: the follow-up comparison on the celery engine ---------------------------------------------------

@pytest.mark.slow
def test_a_follow_up_on_the_celery_engine_is_compared_on_the_node_and_its_seg_and_sr_delivered(
        node_factory: Callable[..., NodeProc], storescp_factory: Callable[..., StoreSCP], redis_server: RedisProc,
        workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    """A prior study (PAM50 sagittal T2w) and, a year later, the same images with one lesion written into the cord
    go through the gateway to a ``sci-node worker``. The node (which holds the job history) finds the prior job,
    compares, and the destination receives the follow-up's own SEG and SR, then the "New or enlarging lesion" SEG
    (marking the written lesion) and the comparison SR referencing the prior study."""
    import highdicom as hd
    import SimpleITK as sitk
    from lesion_support import follow_up_with_lesion
    from test_followup_node import _done, _study

    from sci_node.pipeline.series import read_series

    from dicom_validate import dciodvfy_errors

    dest = storescp_factory()
    w = workers("wf")
    node = gateway(node_factory, redis_server, dest)
    prior, prior_series = _study(tmp_path / "prior", "FUCEL", "20250107")
    assert storescu(node.port, prior).returncode == 0
    first = _done(node, prior_series, followup=False)
    assert first["result"]["engine"] == "celery" and "followup" not in first["result"]["summary"]
    folder = Path(first["result"]["outputs"][0]).parent  # the worker's masks came back with its SEG and SR
    cord = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "cord.nii.gz")))
    later, truth, later_series = follow_up_with_lesion(prior, read_series(prior), cord, tmp_path / "later")
    assert storescu(node.port, later).returncode == 0
    second = _done(node, later_series, followup=True)
    assert second["result"]["engine"] == "celery" and short(second["result"]["worker"]) == w.name
    fu = second["result"]["summary"]["followup"]
    assert fu["compared"] and fu["prior_job"] == first["id"] and fu["prior_source"] == "job history", fu
    assert fu["counts"]["new"] >= 1 and fu["counts"]["resolved"] == 0, fu
    sent = second["deliveries"]
    assert [Path(d["path"]).name for d in sent] == ["seg.dcm", "sr.dcm", "new-or-enlarging-seg.dcm",
                                                    "comparison-sr.dcm"], sent
    assert all(d["state"] == "sent" for d in sent), sent
    got = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in dest.files()}
    new_seg, cmp_sr = (got[str(pydicom.dcmread(d["path"], stop_before_pixels=True).SOPInstanceUID)] for d in sent[2:])
    assert dciodvfy_errors(new_seg) == [] and dciodvfy_errors(cmp_sr) == []
    seg = hd.seg.segread(new_seg)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["New or enlarging lesion"]
    px = seg.get_pixels_by_source_instance([r.sop_instance_uid for r in read_series(later).refs],
                                           segment_numbers=[1], skip_overlap_checks=True)[..., 0]
    assert (px[truth > 0] > 0).mean() > 0.5, "the written lesion is not in the delivered comparison SEG"
    sr = pydicom.dcmread(cmp_sr)
    assert [str(i.StudyInstanceUID) for i in sr.PertinentOtherEvidenceSequence] == [first["study_uid"]]
    shown = node.cli("jobs", "show", str(second["id"])).stdout
    assert f"follow-up    vs job {first['id']}" in shown, shown
