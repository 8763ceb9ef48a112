"""The node's follow-up: after a job segmented a series, compare it with the same person's prior (issue 39).

The prior is searched in the node's own job history (the last ``[followup] search_jobs`` done
jobs, newest first): a job of another study, the same Patient ID (and issuer), a study date not
after the current one and at most ``max_interval_days`` before it, the same region, view and
sequence class, whose spooled files and masks are still there (retention purges them). Not
found is normal: the job simply has no follow-up. Found, the two are compared
(:func:`sci_node.pipeline.compare.compare_results`) after the job's own results were recorded and
queued (:func:`followup_job`): the job's summary gains ``followup``, its result folder
``comparison.json``, ``new_or_enlarging.nii.gz``, the "New or enlarging lesion" SEG and the comparison SR
(:func:`sci_node.pipeline.compare.write_comparison_dicom`), and these two are queued after the job's own
SEG and SR. A comparison that fails (the registration check, an unreadable prior) is recorded with its
reason; it never fails or delays the job's own result.

With no prior in the history and ``[followup] pacs`` set, the PACS is asked
(:mod:`sci_node.engine.prior_pacs`: C-FIND, C-GET, the prior routed and segmented here). A PACS that
cannot be asked leaves the follow-up ``pending``; the first worker asks again when it is due
(:func:`retry_pending`: ``retry_seconds`` doubling up to ``retry_max_seconds``, given up after
``give_up_hours``). The job's own result has gone out meanwhile.

Both engines run it the same way: the local engine's worker thread calls :func:`followup_job` right
after a job's outcome was recorded (:func:`sci_node.engine.local.run_job`) and, when idle, asks
:class:`PendingRetries` to retry; with the celery engine the gateway hands each accepted ``done`` result
to a :class:`FollowupThread` on the node, which holds the job history, the spool and the outbox (a
``sci-node worker`` has none of them), and which retries too. A prior fetched from the PACS is then routed
and segmented on the node with its own active models (:func:`node_prior_processor`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import structlog

from sci_node.config import FollowupPolicy, NodeConfig
from sci_node.engine.prior_pacs import Current, Process, fetch_prior
from sci_node.errors import DicomNetworkError, SciNodeError
from sci_node.store import Job, Store

log = structlog.get_logger("sci_node.followup")

_HEADS = ("region", "view", "sequence")


def _identity(files: list[Path]) -> tuple[str, str, str] | None:
    """``(PatientID, IssuerOfPatientID, StudyDate)`` of a series' first file, or None when it has no Patient ID."""
    me = _current(files, {})
    return None if me is None else (me.patient_id, me.issuer, me.study_date)


def _labels(routing: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple((routing.get(h) or {}).get("label") if isinstance(routing.get(h), dict) else None for h in _HEADS)


def _days_between(earlier: str, later: str) -> float | None:
    try:
        a = _dt.datetime.strptime(earlier, "%Y%m%d")
        b = _dt.datetime.strptime(later, "%Y%m%d")
    except ValueError:
        return None
    return (b - a).days


def find_prior(store: Store, job: Job, routing: Mapping[str, Any], files: list[Path],
               policy: FollowupPolicy) -> tuple[Job, list[Path], str] | None:
    """The newest comparable prior job of the same person: ``(job, its files, its result folder)``, or None."""
    me = _identity(files)
    if me is None:
        return None
    want = _labels(routing)
    for cand in store.jobs(limit=policy.search_jobs, state="done"):
        result = cand.result or {}
        if cand.id == job.id or cand.study_uid == job.study_uid or cand.created_at >= job.created_at:
            continue
        if _labels(result.get("routing") or {}) != want or not result.get("outputs"):
            continue
        folder = Path(result["outputs"][0]).parent
        cand_files = store.series_files(cand.series_uid)
        if not cand_files or not (folder / "cord.nii.gz").is_file():
            continue
        them = _identity(cand_files)
        if them is None or them[:2] != me[:2]:
            continue
        days = _days_between(them[2], me[2])
        if days is not None and not 0 <= days <= policy.max_interval_days:
            continue
        return cand, cand_files, str(folder)
    return None


def _current(files: list[Path], routing: Mapping[str, Any]) -> Current | None:
    """What a prior search needs of a series, from its first file's header (None: unreadable or no Patient ID)."""
    import pydicom

    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=[
            "PatientID", "IssuerOfPatientID", "StudyDate", "StudyInstanceUID", "SeriesDescription"])
    except Exception:  # noqa: BLE001 - an unreadable file: no follow-up, not a failure
        return None
    pid = str(ds.get("PatientID", "") or "").strip()
    if not pid:
        return None
    return Current(pid, str(ds.get("IssuerOfPatientID", "") or ""), str(ds.get("StudyDate", "") or ""),
                   str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesDescription", "") or ""), _labels(routing))


def _prior(cfg: NodeConfig, store: Store, job: Job, record: dict[str, Any], files: list[Path], out_dir: Path,
           process: Process | None) -> tuple[dict[str, Any], list[Path], Path, dict[str, Any]] | None:
    """``(who, files, result folder, summary)`` of the prior: the job history first, then ``[followup] pacs``.

    Raises
    ------
    DicomNetworkError
        The PACS could not be asked (the follow-up stays pending).
    """
    found = find_prior(store, job, record.get("routing") or {}, files, cfg.followup)
    if found is not None:
        pjob, pfiles, pfolder = found
        who = {"prior_job": pjob.id, "prior_study_uid": pjob.study_uid, "prior_series_uid": pjob.series_uid,
               "prior_source": "job history"}
        return who, pfiles, Path(pfolder), dict((pjob.result or {}).get("summary") or {})
    current = _current(files, record.get("routing") or {}) if cfg.followup.pacs and process else None
    if current is None or process is None:
        return None
    got = fetch_prior(cfg, current, process, out_dir / "prior", _labels)
    if got is None:
        return None
    who = {"prior_job": None, "prior_study_uid": got.series.study_uid, "prior_series_uid": got.series.series_uid,
           "prior_source": f"PACS {cfg.followup.pacs}"}
    return who, got.files, got.folder, got.summary


def _pending(cfg: NodeConfig, exc: Exception, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The follow-up of an unreachable PACS: pending, asked again later, given up after ``give_up_hours``."""
    policy, now = cfg.followup, time.time()
    since = float((previous or {}).get("pending_since") or now)
    attempts = int((previous or {}).get("attempts") or 0) + 1
    reason = f"PACS {policy.pacs} unreachable: {exc}"[:400]
    if now - since >= policy.give_up_hours * 3600:
        log.warning("followup.gave_up", attempts=attempts, reason=reason)
        return {"compared": False, "reason": f"gave up after {attempts} attempts in {policy.give_up_hours:g} h: "
                                              f"{reason}"}
    delay = min(policy.retry_seconds * 2 ** (attempts - 1), policy.retry_max_seconds)
    log.warning("followup.pending", attempts=attempts, retry_in_s=delay, reason=reason)
    return {"compared": False, "pending": True, "reason": reason, "attempts": attempts, "pending_since": since,
            "next_attempt_at": now + delay}


def followup_of(cfg: NodeConfig, store: Store, job: Job, record: dict[str, Any], out_dir: Path,
                process: Process | None = None, previous: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The job's follow-up summary (None: no prior found); never raises.

    A compared follow-up also gets its DICOM written (:func:`_dicom`): ``outputs`` lists the SEG and
    SR paths; a failure there is recorded as ``dicom_error`` and leaves the comparison itself standing.
    ``process`` routes and segments a prior fetched from ``[followup] pacs`` (None: the job history
    only); a PACS that cannot be asked gives a ``pending`` follow-up (``previous``: the last one).
    """
    from sci_node.pipeline.compare import compare_results

    try:
        files = store.series_files(job.series_uid)
        prior = _prior(cfg, store, job, record, files, out_dir, process)
        if prior is None:
            return None
        who, pfiles, pfolder, psummary = prior
        log.info("followup.comparing", prior=who)
        rec = compare_results(pfiles, pfolder, files, out_dir, psummary, dict(record.get("summary") or {}),
                              cfg.max_missing_fraction)
    except DicomNetworkError as exc:
        return _pending(cfg, exc, previous)
    except SciNodeError as exc:
        log.warning("followup.failed", reason=str(exc)[:300])
        return {"compared": False, "reason": f"{type(exc).__name__}: {exc}"[:500]}
    except Exception as exc:  # noqa: BLE001 - a bug here must not fail the job
        log.exception("followup.crashed")
        return {"compared": False, "reason": f"internal error: {type(exc).__name__}: {exc}"[:500]}
    out = {"compared": rec["compared"], "reason": rec["reason"], **who, "counts": rec["counts"],
           "csa_c2_c3": rec["csa_c2_c3"], "csa_mean": rec["csa_mean"],
           "csa_common_stretch": rec.get("csa_common_stretch"), "registration": {
               k: rec["registration"][k] for k in ("cord_dice", "centerline_mm")},
           "seconds": rec["compare_seconds"], "comparison_json": str(out_dir / "comparison.json"),
           # what changed, each current lesion named as report.json and the SR name it
           "changed": [{k: les.get(k) for k in ("status", "lesion_id", "vertebral_levels", "volume_then_mm3",
                                                 "volume_now_mm3", "found_by")}
                       for les in rec["lesions"] if les["status"] != "stable"]}
    if rec["compared"]:
        out.update(_dicom(rec, pfiles, files, out_dir, dict(record.get("model_versions") or {}),
                          cfg.max_missing_fraction))
    log.info("followup.compared", prior=who, compared=rec["compared"], counts=rec["counts"],
             seconds=rec["compare_seconds"], outputs=len(out.get("outputs") or []))
    return out


def _dicom(rec: dict[str, Any], prior_files: list[Path], files: list[Path], out_dir: Path,
           versions: dict[str, str], max_missing_fraction: float) -> dict[str, Any]:
    """``{"outputs": [SEG, SR]}`` of a compared follow-up, or ``{"dicom_error": reason}``; never raises."""
    from sci_node.pipeline.compare import write_comparison_dicom

    try:
        paths = write_comparison_dicom(rec, prior_files, files, out_dir, versions, max_missing_fraction)
    except Exception as exc:  # noqa: BLE001 - the comparison's DICOM failing must not fail the job
        log.exception("followup.dicom_failed")
        return {"dicom_error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"outputs": [str(p) for p in paths]}


def followup_job(cfg: NodeConfig, store: Store, job: Job, record: dict[str, Any], out_dir: Path,
                 destinations: Sequence[str], process: Process | None = None,
                 previous: Mapping[str, Any] | None = None) -> Job:
    """After ``job`` was finished (its own results queued): compare, then record and queue the follow-up.

    The job's summary gains ``followup`` (:func:`followup_of`) and its comparison SEG and SR are queued
    as further outbox entries of the job (:meth:`sci_node.store.Store.add_job_outputs`), after its own.
    No prior: the job is returned unchanged. Never fails the job: a failed comparison is recorded.
    """
    fu = followup_of(cfg, store, job, record, out_dir, process, previous)
    if fu is None:
        return store.add_job_outputs(job.id, {DUE: None} if previous is None else {"followup": None, DUE: None})
    outputs = tuple(Path(p) for p in fu.get("outputs") or [])
    return store.add_job_outputs(job.id, {"followup": fu, DUE: None}, outputs, destinations)


def _recent_done(cfg: NodeConfig, store: Store) -> Iterator[tuple[Job, dict[str, Any], dict[str, Any], Path]]:
    """The last ``search_jobs`` done jobs that have results: ``(job, result, its summary, its result folder)``."""
    for job in store.jobs(limit=cfg.followup.search_jobs, state="done"):
        result = job.result or {}
        if result.get("outputs"):
            yield job, result, result.get("summary") or {}, Path(result["outputs"][0]).parent


def _job_log(job: Job) -> contextlib.AbstractContextManager[None]:
    """The job's ids bound to every log line inside the ``with`` block."""
    return structlog.contextvars.bound_contextvars(job_id=job.id, series_uid=job.series_uid,
                                                   study_uid=job.study_uid)


def retry_pending(cfg: NodeConfig, store: Store, destinations: Sequence[str], process: Process) -> int:
    """Ask the PACS again for every done job whose follow-up is pending and due; return how many were tried."""
    now, tried = time.time(), 0
    for job, result, summary, out_dir in _recent_done(cfg, store):
        fu = summary.get("followup") or {}
        if not fu.get("pending") or float(fu.get("next_attempt_at") or 0) > now:
            continue
        tried += 1
        with _job_log(job):
            followup_job(cfg, store, job, result, out_dir, destinations, process, previous=fu)
    return tried


#: the job summary key that says a comparison is due (set with the job's own outcome, cleared by :func:`followup_job`)
DUE = "followup_due"
#: a comparison the node was stopped in this often is given up (it may be what stops the node)
RESUME_ATTEMPTS = 3


def _compares(cfg: NodeConfig, state: str, record: Mapping[str, Any]) -> bool:
    """A job ending in ``state`` with ``record`` is compared: ``[followup] enabled``, the series segmented."""
    return cfg.followup.enabled and state == "done" and isinstance(record.get("summary"), dict)


def mark_due(cfg: NodeConfig, state: str, record: dict[str, Any]) -> None:
    """Put the "comparison due" marker into a finishing job's ``record`` (in place) when it will be compared.

    Written in the same transaction as the job's own outcome, it lets a node that was stopped (``kill -9``,
    power) between the outcome and the end of its comparison run the comparison at its next start
    (:func:`resume_interrupted`).
    """
    if _compares(cfg, state, record):
        record["summary"] = {**record["summary"], DUE: {"since": time.time(), "attempts": 0}}


def resume_interrupted(cfg: NodeConfig, store: Store, destinations: Sequence[str], process: Process | None,
                       started_at: float) -> int:
    """Compare every done job whose comparison a previous run of the node left unfinished; return how many.

    A job is resumed when its summary still holds the :data:`DUE` marker from before ``started_at`` (this
    process's start: a comparison still running in this process is never resumed). Each resume counts an
    attempt; after :data:`RESUME_ATTEMPTS` the follow-up is recorded as given up.
    """
    resumed = 0
    for job, result, summary, out_dir in _recent_done(cfg, store):
        due = summary.get(DUE)
        if not isinstance(due, dict) or float(due.get("since") or 0) >= started_at:
            continue
        resumed += 1
        attempts = int(due.get("attempts") or 0) + 1
        with _job_log(job):
            if attempts > RESUME_ATTEMPTS:
                log.warning("followup.gave_up", attempts=attempts - 1, reason="the node stopped during the comparison")
                store.add_job_outputs(job.id, {DUE: None, "followup": {
                    "compared": False, "reason": f"gave up: the node stopped during the comparison {attempts - 1} "
                                                 "times"}})
                continue
            log.info("followup.resumed", attempts=attempts)
            store.add_job_outputs(job.id, {DUE: {"since": time.time(), "attempts": attempts}})
            followup_job(cfg, store, job, result, out_dir, destinations, process)
    return resumed


def should_compare(cfg: NodeConfig, job: Job, record: Mapping[str, Any]) -> bool:
    """Whether a just-finished job gets a follow-up: ``[followup] enabled`` and the series was segmented."""
    return _compares(cfg, job.state, record)


class PendingRetries:
    """Asks the PACS again for the pending follow-ups (:func:`retry_pending`) at most every ``every_s``.

    Parameters
    ----------
    cfg, store, destinations
        The node's configuration, index and export destinations.
    process
        How a fetched prior is routed and segmented (:data:`~sci_node.engine.prior_pacs.Process`).
    started_at
        ``time.time()`` when this node process started: comparisons marked due before it are resumed.
    every_s
        The shortest time between two looks.
    """

    def __init__(self, cfg: NodeConfig, store: Store, destinations: Sequence[str], process: Process,
                 started_at: float, every_s: float = 5.0) -> None:
        self.cfg, self.store, self.destinations, self.process = cfg, store, list(destinations), process
        self.started_at, self.every_s = started_at, every_s
        self._next = 0.0  # time.monotonic() of the next look
        self._resumed = False

    def maybe_run(self) -> bool:
        """Retry the due follow-ups when it is time; True when one was tried (wake the exporter). Never raises.

        The first call also resumes the comparisons an earlier run of the node left unfinished
        (:func:`resume_interrupted`, jobs marked before ``started_at``), with or without ``[followup] pacs``.
        """
        fu, now = self.cfg.followup, time.monotonic()
        if fu.enabled and not self._resumed:
            self._resumed = True
            try:
                if resume_interrupted(self.cfg, self.store, self.destinations, self.process, self.started_at):
                    return True
            except Exception:  # noqa: BLE001 - never stop the thread that retries
                log.exception("followup.resume_error")
        if not (fu.enabled and fu.pacs) or now < self._next:
            return False
        self._next = now + self.every_s
        try:
            return retry_pending(self.cfg, self.store, self.destinations, self.process) > 0
        except Exception:  # noqa: BLE001 - a follow-up must never stop the thread that retries it
            log.exception("followup.retry_error")
            return False


def node_prior_processor(cfg: NodeConfig) -> Process:
    """The node's own processor for a prior fetched from the PACS, built (models loaded) on first use.

    With the celery engine the gateway runs no inference otherwise: its active models (which it already
    fingerprints for every dispatch) are loaded only when a PACS prior has to be segmented, with
    ``torch_threads`` for one worker.
    """
    built: list[Process] = []

    def process(files: Sequence[Path], out: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
        if not built:
            from sci_node.engine.local import default_provider, prior_processor

            if cfg.processor == "pipeline":
                from sci_node.models.predict_seg import configure_threads

                configure_threads(cfg.torch_threads, 1)
            built.append(prior_processor(default_provider(cfg)))
        return built[0](files, out)
    return process


class FollowupThread(threading.Thread):
    """The celery engine's follow-ups, on the node: each accepted ``done`` job compared after its result.

    The gateway thread :meth:`submit`s a job once its outcome and its own outbox entries were written;
    this thread runs :func:`followup_job` (so dispatch and result collection never wait for a
    comparison) and, when idle, :class:`PendingRetries`. ``on_result`` is set when a follow-up queued
    outputs. A job submitted but not yet compared when the node stops is compared at the node's next start
    (:func:`resume_interrupted`, through :class:`PendingRetries`), as with the local engine.
    """

    def __init__(self, cfg: NodeConfig, store: Store, on_result: threading.Event, stop: threading.Event,
                 process: Process | None = None) -> None:
        super().__init__(name="followup", daemon=True)
        self.cfg, self.store, self.on_result, self.stop_event = cfg, store, on_result, stop
        self.destinations = [str(d) for d in cfg.destinations]
        self.process = process or node_prior_processor(cfg)
        self.retries = PendingRetries(cfg, store, self.destinations, self.process, time.time())
        self._queue: queue.Queue[tuple[int, dict[str, Any], Path]] = queue.Queue()

    def submit(self, job: Job, record: Mapping[str, Any], out_dir: Path) -> None:
        """Compare ``job`` (finished, its own results queued) with its prior, in this thread."""
        self._queue.put((job.id, dict(record), out_dir))

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                job_id, record, out_dir = self._queue.get(timeout=1.0)
            except queue.Empty:
                if self.retries.maybe_run():
                    self.on_result.set()
                continue
            self._compare(job_id, record, out_dir)

    def _compare(self, job_id: int, record: dict[str, Any], out_dir: Path) -> None:
        job = self.store.job(job_id)
        with _job_log(job):
            try:
                done = followup_job(self.cfg, self.store, job, record, out_dir, self.destinations, self.process)
                if done.delivery == "pending":  # the comparison's SEG and SR, queued after the job's own
                    self.on_result.set()
            except Exception:  # noqa: BLE001 - never stop the thread: the job's own result is already out
                log.exception("followup.thread_error")
