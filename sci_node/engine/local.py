"""The worker: claims pending jobs, runs a :class:`Processor` on the series, records the outcome.

A job's outcome and its outbox entries are written in one transaction
(:meth:`sci_node.store.Store.finish_job`), so after ``kill -9`` a job either runs again
(it was left ``running``; :meth:`~sci_node.store.Store.recover` puts it back to ``pending``)
or its results are sent — never both, never neither. A follow-up comparison
(:func:`sci_node.engine.followup.followup_job`) runs only after that, and queues its own SEG and SR
as further entries of the job.

Processors
----------
``pipeline`` (default)
    The models: :class:`sci_node.pipeline.Pipeline` built from the active models of
    :class:`sci_node.models.registry.ModelRegistry`; rebuilt between jobs whenever the registry's
    ``state_token()`` changes (an admin activated or rolled back a model).
``derived-sc``
    A built-in plumbing check: one derived Secondary Capture (the middle slice) per series.
"""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import structlog

from sci_node.config import NodeConfig
from sci_node.errors import InvalidSeriesError, ModelError, SciNodeError
from sci_node.store import Job, Store
from sci_node.store.private_files import make_private_dirs

if TYPE_CHECKING:
    from sci_node.engine.followup import PendingRetries

log = structlog.get_logger("sci_node.worker")


class ProcessResult(Protocol):
    """What a processor returns (``sci_node.pipeline.PipelineResult`` satisfies it)."""

    @property
    def status(self) -> str: ...  # "done" | "routed-out"

    @property
    def reason(self) -> str | None: ...

    @property
    def routing(self) -> Mapping[str, Any]: ...

    @property
    def outputs(self) -> tuple[Path, ...]: ...

    @property
    def model_versions(self) -> Mapping[str, str]: ...

    @property
    def timings(self) -> Mapping[str, float]: ...

    @property
    def summary(self) -> Mapping[str, Any]: ...


class Processor(Protocol):
    """Turns the files of one complete series into result files under ``out_dir``.

    ``notes`` are warnings about the series (``"incomplete transfer"``) that its results must
    carry. Raises :class:`~sci_node.errors.InvalidSeriesError` (the series cannot be processed)
    or :class:`~sci_node.errors.ModelError`.
    """

    def process(self, files: Sequence[Path], out_dir: Path, notes: Sequence[str] = ()) -> ProcessResult: ...


class ProcessorProvider(Protocol):
    """Returns the processor to use for the next job (may rebuild it between jobs)."""

    def current(self) -> Processor: ...


@dataclass(frozen=True)
class SimpleResult:
    """A :class:`ProcessResult` for processors other than the pipeline."""

    status: str
    reason: str | None = None
    routing: Mapping[str, Any] = field(default_factory=dict)
    outputs: tuple[Path, ...] = ()
    model_versions: Mapping[str, str] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    summary: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


class DerivedSCProcessor:
    """Plumbing check: writes one Secondary Capture of the middle slice (uint8, MONOCHROME2)."""

    def process(self, files: Sequence[Path], out_dir: Path, notes: Sequence[str] = ()) -> ProcessResult:
        import highdicom as hd
        import numpy as np
        import pydicom
        from pydicom.uid import generate_uid

        t0 = time.perf_counter()
        try:
            datasets = sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.get("InstanceNumber") or 0))
            ref = datasets[len(datasets) // 2]
            arr = ref.pixel_array.astype(np.float32)
        except Exception as exc:
            raise InvalidSeriesError(f"cannot decode the series' pixels: {type(exc).__name__}: {exc}") from exc
        if arr.ndim == 3:  # multi-frame: middle frame
            arr = arr[arr.shape[0] // 2]
        lo, hi = float(arr.min()), float(arr.max())
        img = ((arr - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref, pixel_array=img, photometric_interpretation="MONOCHROME2", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=generate_uid(), series_number=9901,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="sci-node",
            patient_orientation=("A", "F"), transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian)
        source = pydicom.Dataset()  # what it was derived from: the gateway checks results reference their series
        source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = ref.SOPClassUID, ref.SOPInstanceUID
        sc.SourceImageSequence = [source]
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / "derived-sc.dcm"
        sc.save_as(out, enforce_file_format=True)
        return SimpleResult(status="done", outputs=(out,), model_versions={"derived-sc": "1"},
                            timings={"total": time.perf_counter() - t0}, summary={"slices": len(datasets)},
                            notes=tuple(notes))


class FixedProvider:
    """Always the same processor."""

    def __init__(self, processor: Processor) -> None:
        self._processor = processor

    def current(self) -> Processor:
        return self._processor


class _PipelineAdapter:
    """``Pipeline.run_dicom`` seen as a :class:`Processor`."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def process(self, files: Sequence[Path], out_dir: Path, notes: Sequence[str] = ()) -> ProcessResult:
        result: ProcessResult = self.pipeline.run_dicom(list(files), out_dir, notes)
        return result


class RegistryPipelineProvider:
    """The real pipeline on the registry's active models, rebuilt when activations change."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self._token: Any = object()
        self._processor: Processor | None = None

    def current(self) -> Processor:
        """Return the processor, reloading models if the registry changed since the last job.

        Raises
        ------
        ModelError
            When the registry/pipeline modules are unavailable or no models are active.
        """
        try:
            from sci_node.models.registry import ModelRegistry
            from sci_node.pipeline import Pipeline
        except ImportError as exc:
            raise ModelError(f"the inference pipeline is not available ({exc}); "
                             "set processor = \"derived-sc\" to check the plumbing only") from exc
        registry = ModelRegistry(self.cfg.models_dir)
        token = registry.state_token()
        if self._processor is None or token != self._token:
            models = registry.load_active(self.cfg.device)
            self._processor = _PipelineAdapter(Pipeline(models, self.cfg.routing, self.cfg.device,
                                                        self.cfg.max_missing_fraction))
            self._token = token
            log.info("models.loaded", models_dir=str(self.cfg.models_dir), token=str(token))
        return self._processor


def default_provider(cfg: NodeConfig) -> ProcessorProvider:
    """The provider selected by ``cfg.processor``."""
    if cfg.processor == "derived-sc":
        return FixedProvider(DerivedSCProcessor())
    return RegistryPipelineProvider(cfg)


def job_notes(job: Job) -> tuple[str, ...]:
    """Warnings the completion check recorded for the job's series (``"incomplete transfer"``)."""
    geometry = job.geometry or {}
    return ("incomplete transfer",) if geometry.get("incomplete_transfer") else ()


@dataclass(frozen=True)
class Outcome:
    """What a job's processing produced: the job's next state, its reason, the result record, the outputs."""

    state: str
    reason: str | None
    record: dict[str, Any]
    outputs: tuple[Path, ...] = ()


def process_outcome(provider: ProcessorProvider, files: Sequence[Path], out_dir: Path,
                    notes: Sequence[str] = ()) -> Outcome:
    """Run the current processor on one series; never raises for a bad series or model.

    The local worker and a remote ``sci-node worker`` (:mod:`sci_node.engine.remote`) both use
    this, so a job's record reads the same whichever engine ran it. The processor's notes
    (missing slices, incomplete transfer) lead the reason; a failed job's reason starts with
    ``notes`` too.
    """
    t0 = time.perf_counter()
    try:
        result = provider.current().process(files, out_dir, notes)
        outputs = tuple(Path(p) for p in result.outputs)
        result_notes = [str(n) for n in getattr(result, "notes", ())]
        record = {"status": result.status, "routing": dict(result.routing), "outputs": [str(p) for p in outputs],
                  "model_versions": dict(result.model_versions), "timings": dict(result.timings),
                  "summary": dict(result.summary), "notes": result_notes,
                  "seconds": round(time.perf_counter() - t0, 3)}
        state = result.status if result.status in ("done", "routed-out") else "failed"
        reason = result.reason if state != "failed" else f"processor returned status {result.status!r}"
        if result_notes:
            reason = "; ".join([*result_notes, *([reason] if reason else [])])
        return Outcome(state, reason, record, outputs)
    except SciNodeError as exc:  # InvalidSeriesError, ModelError, InvalidDatasetError ...
        reason = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a bug in a processor must fail the job, not the worker
        log.error("job.crashed", error=traceback.format_exc(limit=8))
        reason = f"internal error: {type(exc).__name__}: {exc}"
    reason = "; ".join([*notes, reason])  # e.g. "incomplete transfer; InvalidSeriesError: ..."
    return Outcome("failed", reason[:1000], {"seconds": round(time.perf_counter() - t0, 3)})


def run_job(job: Job, store: Store, provider: ProcessorProvider, destinations: Sequence[str],
            cfg: NodeConfig | None = None, on_finished: Callable[[Job], None] | None = None) -> Job:
    """Process one claimed job and record its outcome (never raises for a bad series/model).

    With ``cfg`` and ``[followup] enabled``, a segmented series is then compared with the same person's
    prior (:func:`sci_node.engine.followup.followup_job`): only after the job's own outcome and outbox
    entries were written and ``on_finished`` was called with the finished job (the worker wakes the
    exporter there), so the comparison never delays the current result. Its summary gains ``followup``
    and the comparison's SEG and SR are queued after the job's own results.
    """
    out_dir = store.results_dir / str(job.id) / f"attempt-{job.attempts}"
    make_private_dirs(out_dir)  # 0700 from the start: the results are patient data
    o = process_outcome(provider, store.series_files(job.series_uid), out_dir, job_notes(job))
    if cfg is not None and cfg.followup.enabled:
        from sci_node.engine.followup import mark_due

        mark_due(cfg, o.state, o.record)  # with the outcome: a comparison lost to a stop is redone at the next start
    done = store.finish_job(job.id, o.state, o.reason, o.record, o.outputs, destinations)
    if on_finished is not None:
        on_finished(done)
    if cfg is not None and cfg.followup.enabled:
        from sci_node.engine.followup import followup_job, should_compare

        if should_compare(cfg, done, o.record):
            done = followup_job(cfg, store, done, o.record, out_dir, destinations, prior_processor(provider))
    return done


def prior_processor(provider: ProcessorProvider) -> Callable[[Sequence[Path], Path], tuple[str, dict[str, Any],
                                                                                       dict[str, Any]]]:
    """How a prior fetched from the PACS is routed and segmented: the current processor, into ``out`` (0700)."""
    def process(files: Sequence[Path], out: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
        make_private_dirs(out)
        result = provider.current().process(list(files), out, ())
        return str(result.status), dict(result.routing), dict(result.summary)
    return process


class Worker(threading.Thread):
    """A thread that runs jobs until ``stop`` is set.

    Parameters
    ----------
    wake
        Set by the completion monitor when a job was enqueued.
    on_result
        Set after a job produced outbox entries (wakes the exporter).
    """

    def __init__(self, cfg: NodeConfig, store: Store, provider: ProcessorProvider, wake: threading.Event,
                 on_result: threading.Event, stop: threading.Event, name: str = "worker-1") -> None:
        super().__init__(name=name, daemon=True)
        self.cfg, self.store, self.provider = cfg, store, provider
        self.wake, self.on_result, self.stop_event = wake, on_result, stop
        self.destinations = [str(d) for d in cfg.destinations]
        self._retries: PendingRetries | None = None  # made on the first idle moment
        self._started_at = time.time()  # comparisons marked due before this were left by an earlier run

    def run(self) -> None:
        try:  # load the models now, not on the first series (and say so if they are missing)
            self.provider.current()
        except SciNodeError as exc:
            log.warning("worker.processor_unavailable", reason=str(exc),
                        detail="jobs will fail with this reason until it is fixed (then `sci-node jobs retry`)")
        except Exception:
            log.exception("worker.processor_error")
        while not self.stop_event.is_set():
            try:
                job = self.store.claim_job()
            except SciNodeError:
                log.exception("worker.claim_failed")
                job = None
            if job is None:
                self._retry_followups()
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            self._run_one(job)

    def _retry_followups(self) -> None:
        """The first worker asks the PACS again for pending follow-ups, every 5 s at most (never raises)."""
        if self.name != "worker-1":
            return
        if self._retries is None:
            from sci_node.engine.followup import PendingRetries

            self._retries = PendingRetries(self.cfg, self.store, self.destinations, prior_processor(self.provider),
                                           self._started_at)
        if self._retries.maybe_run():
            self.on_result.set()

    def _run_one(self, job: Job) -> None:
        structlog.contextvars.bind_contextvars(job_id=job.id, series_uid=job.series_uid, study_uid=job.study_uid)
        try:
            log.info("job.started", generation=job.generation, instances=job.n_instances,
                     waited_s=round((job.started_at or 0) - job.created_at, 3))
            done = run_job(job, self.store, self.provider, self.destinations, self.cfg, on_finished=self._finished)
            if done.delivery == "pending":  # the follow-up's SEG and SR, queued after the job's own
                self.on_result.set()
        except Exception:
            log.exception("worker.job_error")  # the job stays running -> pending at next start
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "series_uid", "study_uid")

    def _finished(self, done: Job) -> None:
        """The job's outcome is recorded: log it and wake the exporter for its results."""
        result = done.result or {}
        log.info("job.finished", state=done.state, reason=done.reason, delivery=done.delivery,
                 seconds=result.get("seconds"), routing=result.get("routing"),
                 model_versions=result.get("model_versions"), timings=result.get("timings"))
        if done.delivery == "pending":
            self.on_result.set()


ProviderFactory = Callable[[NodeConfig], ProcessorProvider]
