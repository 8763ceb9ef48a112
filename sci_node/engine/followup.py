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
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Mapping, Sequence

import structlog

from sci_node.config import FollowupPolicy
from sci_node.errors import SciNodeError
from sci_node.store import Job, Store

log = structlog.get_logger("sci_node.followup")

_HEADS = ("region", "view", "sequence")


def _identity(files: list[Path]) -> tuple[str, str, str] | None:
    """``(PatientID, IssuerOfPatientID, StudyDate)`` of a series' first file, or None when it has no Patient ID."""
    import pydicom

    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True,
                             specific_tags=["PatientID", "IssuerOfPatientID", "StudyDate"])
    except Exception:  # noqa: BLE001 - an unreadable file: no follow-up, not a failure
        return None
    pid = str(ds.get("PatientID", "") or "").strip()
    if not pid:
        return None
    return pid, str(ds.get("IssuerOfPatientID", "") or ""), str(ds.get("StudyDate", "") or "")


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


def followup_of(policy: FollowupPolicy, store: Store, job: Job, record: dict[str, Any], out_dir: Path,
                max_missing_fraction: float) -> dict[str, Any] | None:
    """The job's follow-up summary (None: no prior found); never raises.

    A compared follow-up also gets its DICOM written (:func:`_dicom`): ``outputs`` lists the SEG and
    SR paths; a failure there is recorded as ``dicom_error`` and leaves the comparison itself standing.
    """
    from sci_node.pipeline.compare import compare_results

    try:
        files = store.series_files(job.series_uid)
        prior = find_prior(store, job, record.get("routing") or {}, files, policy)
        if prior is None:
            return None
        pjob, pfiles, pfolder = prior
        psummary = dict((pjob.result or {}).get("summary") or {})
        rec = compare_results(pfiles, Path(pfolder), files, out_dir, psummary, dict(record.get("summary") or {}),
                              max_missing_fraction)
    except SciNodeError as exc:
        log.warning("followup.failed", reason=str(exc)[:300])
        return {"compared": False, "reason": f"{type(exc).__name__}: {exc}"[:500]}
    except Exception as exc:  # noqa: BLE001 - a bug here must not fail the job
        log.exception("followup.crashed")
        return {"compared": False, "reason": f"internal error: {type(exc).__name__}: {exc}"[:500]}
    out = {"compared": rec["compared"], "reason": rec["reason"], "prior_job": pjob.id,
           "prior_study_uid": pjob.study_uid, "prior_series_uid": pjob.series_uid, "counts": rec["counts"],
           "csa_c2_c3": rec["csa_c2_c3"], "csa_mean": rec["csa_mean"], "registration": {
               k: rec["registration"][k] for k in ("cord_dice", "centerline_mm")},
           "seconds": rec["compare_seconds"], "comparison_json": str(out_dir / "comparison.json"),
           # what changed, each current lesion named as report.json and the SR name it
           "changed": [{k: les[k] for k in ("status", "lesion_id", "vertebral_levels", "volume_then_mm3",
                                             "volume_now_mm3")} for les in rec["lesions"] if les["status"] != "stable"]}
    if rec["compared"]:
        out.update(_dicom(rec, pfiles, files, out_dir, dict(record.get("model_versions") or {}), max_missing_fraction))
    log.info("followup.compared", prior_job=pjob.id, compared=rec["compared"], counts=rec["counts"],
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


def followup_job(policy: FollowupPolicy, store: Store, job: Job, record: dict[str, Any], out_dir: Path,
                 max_missing_fraction: float, destinations: Sequence[str]) -> Job:
    """After ``job`` was finished (its own results queued): compare, then record and queue the follow-up.

    The job's summary gains ``followup`` (:func:`followup_of`) and its comparison SEG and SR are queued
    as further outbox entries of the job (:meth:`sci_node.store.Store.add_job_outputs`), after its own.
    No prior: the job is returned unchanged. Never fails the job: a failed comparison is recorded.
    """
    fu = followup_of(policy, store, job, record, out_dir, max_missing_fraction)
    if fu is None:
        return store.job(job.id)
    outputs = tuple(Path(p) for p in fu.get("outputs") or [])
    return store.add_job_outputs(job.id, {"followup": fu}, outputs, destinations)
