"""The prior from the PACS (issue 39): when the node's own job history holds none, ask ``[followup] pacs``.

C-FIND the same patient's MR series in studies dated up to ``max_interval_days`` before the current
one (never the current study), newest study first and, within a study, the series whose description
matches the current one's first; C-GET each candidate (at most ``pacs_max_series``) into the job's
result folder and let the current processor route and segment it. The first candidate whose region,
view and sequence class match the current series' is the prior. An unreachable or refusing PACS
raises :class:`~sci_node.errors.DicomNetworkError`: the caller records the follow-up as pending and
asks again later (:mod:`sci_node.engine.followup`); it never blocks or fails the current result.
"""
from __future__ import annotations

import datetime as _dt
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import structlog

from sci_node.config import NodeConfig
from sci_node.dicom.query import RemoteSeries, find_mr_series, get_series

log = structlog.get_logger("sci_node.followup")

#: ``process(files, out_dir) -> (status, routing, summary)``: the current processor, as the worker runs it
Process = Callable[[Sequence[Path], Path], tuple[str, dict[str, Any], dict[str, Any]]]


@dataclass(frozen=True)
class Current:
    """What identifies the current series for the search."""

    patient_id: str
    issuer: str
    study_date: str
    study_uid: str
    description: str
    labels: tuple[Any, ...]


@dataclass(frozen=True)
class PacsPrior:
    """A prior fetched from the PACS and segmented here: its files, result folder and summary."""

    series: RemoteSeries
    files: list[Path]
    folder: Path
    summary: dict[str, Any] = field(default_factory=dict)


def date_range(study_date: str, max_days: float) -> str:
    """The DICOM date range ``YYYYMMDD-YYYYMMDD`` from ``max_days`` before ``study_date`` to it ("" if unknown)."""
    try:
        day = _dt.datetime.strptime(study_date, "%Y%m%d")
    except ValueError:
        return ""
    first = day - _dt.timedelta(days=int(max_days))
    return f"{first:%Y%m%d}-{day:%Y%m%d}"


def candidates(found: Sequence[RemoteSeries], current: Current) -> list[RemoteSeries]:
    """The series worth fetching: other studies only, newest first, same description first within a study."""
    others = [s for s in found if s.study_uid != current.study_uid
              and (not current.study_date or not s.study_date or s.study_date <= current.study_date)]
    return sorted(others, key=lambda s: (s.study_date, s.description == current.description), reverse=True)


def fetch_prior(cfg: NodeConfig, current: Current, process: Process, work: Path,
                labels_of: Callable[[dict[str, Any]], tuple[Any, ...]]) -> PacsPrior | None:
    """The newest comparable prior in the PACS, fetched into ``work`` and segmented; None when there is none.

    Raises
    ------
    DicomNetworkError
        The PACS is unreachable, refuses us, or a query/retrieve failed (retry later).
    """
    policy = cfg.followup
    if policy.pacs is None:
        return None
    found = find_mr_series(policy.pacs, cfg.ae_title, cfg.tls, current.patient_id, current.issuer,
                           date_range(current.study_date, policy.max_interval_days))
    for n, cand in enumerate(candidates(found, current)[:policy.pacs_max_series]):
        base = work / f"prior-{n}"
        files = get_series(policy.pacs, cfg.ae_title, cfg.tls, cand.study_uid, cand.series_uid, base / "dicom")
        status, routing, summary = process(files, base / "result")
        if status == "done" and labels_of(routing) == current.labels and (base / "result" / "cord.nii.gz").is_file():
            log.info("followup.prior_from_pacs", study_uid=cand.study_uid, series_uid=cand.series_uid,
                     study_date=cand.study_date, tried=n + 1)
            return PacsPrior(cand, files, base / "result", summary)
        shutil.rmtree(base, ignore_errors=True)  # not comparable: do not keep another patient file around
    log.info("followup.no_prior_in_pacs", candidates=len(found))
    return None
