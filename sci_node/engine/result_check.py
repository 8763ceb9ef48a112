"""A remote worker's result is checked before any of it goes to PACS (the celery engine's gateway).

With ``[engine] kind = "celery"`` the gateway takes the result files of a job from Redis and queues
them for C-STORE to every destination. Whoever can write to that Redis could hand it anything: an
object of another patient, an image of another study, a file that is not DICOM at all. Each output
named by a result must therefore be, for the job whose dispatch token it came under:

* a DICOM file (Part 10, readable) of an expected SOP class: Segmentation Storage and a
  Comprehensive 3D, Comprehensive or Enhanced SR for the ``pipeline`` processor; Secondary
  Capture for ``derived-sc``;
* in the source study (Study Instance UID equal) and of the source patient (Patient ID equal, when
  the source has one), in a series of its own with instance UIDs of its own (never one of the
  source's);
* derived from the source series: a SEG's Referenced Series Sequence names only that series and
  only its instances; an SR's evidence (Current Requested Procedure / Pertinent Other Evidence)
  lists that series with only its instances, besides the result's own other objects; a Secondary
  Capture's Source Image Sequence names only its instances.

Anything else raises :class:`~sci_node.errors.ResultRejectedError` naming the file and the value;
the gateway then fails the job with that reason, logs ``job.result_rejected`` and sends nothing.
Reads headers only (no pixel data); no logging here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from sci_node.errors import ResultRejectedError

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASSES = frozenset({COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR, ENHANCED_SR})
#: the SOP classes each processor's results may have
EXPECTED_SOP_CLASSES: dict[str, frozenset[str]] = {
    "pipeline": frozenset({SEGMENTATION, *SR_CLASSES}),
    "derived-sc": frozenset({SECONDARY_CAPTURE}),
}


@dataclass(frozen=True)
class SourceSeries:
    """What a job's results must match: the source series as the node received it."""

    study_uid: str
    series_uid: str
    sop_uids: frozenset[str]
    patient_id: str | None


def check_outputs(paths: Sequence[Path], source: SourceSeries, processor: str) -> None:
    """Check every output of one result against its job's source series.

    Raises
    ------
    ResultRejectedError
        Naming the first output that is not a result of this job, and why.
    """
    import pydicom

    expected = EXPECTED_SOP_CLASSES.get(processor, frozenset())
    headers = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for a file that is not DICOM
            raise ResultRejectedError(f"{path.name}: not a readable DICOM file ({type(exc).__name__}: {exc})"[:300]) \
                from None
        headers.append((path.name, ds))
    own_series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    for name, ds in headers:
        _check_identity(name, ds, source, expected)
        _check_references(name, ds, source, own_series)


def _check_identity(name: str, ds: Any, source: SourceSeries, expected: frozenset[str]) -> None:
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in expected:
        raise ResultRejectedError(f"{name}: SOP Class UID {sop_class!r} is not one this job's processor writes "
                                  f"({', '.join(sorted(expected))})")
    study = str(ds.get("StudyInstanceUID", ""))
    if study != source.study_uid:
        raise ResultRejectedError(f"{name}: Study Instance UID {study!r} is not the source study {source.study_uid!r}")
    patient = str(ds.get("PatientID", "") or "")
    if source.patient_id and patient != source.patient_id:
        raise ResultRejectedError(f"{name}: Patient ID {patient!r} is not the source series' patient")
    if str(ds.get("SeriesInstanceUID", "")) == source.series_uid:
        raise ResultRejectedError(f"{name}: it claims the source series' own Series Instance UID")
    if str(ds.get("SOPInstanceUID", "")) in source.sop_uids:
        raise ResultRejectedError(f"{name}: its SOP Instance UID is one of the source series' instances")


def _check_references(name: str, ds: Any, source: SourceSeries, own_series: set[str]) -> None:
    sop_class = str(ds.SOPClassUID)
    if sop_class == SEGMENTATION:
        series = list(ds.get("ReferencedSeriesSequence") or [])
        _require_source(name, "Referenced Series Sequence", [(str(s.get("SeriesInstanceUID", "")),
                        _uids(s.get("ReferencedInstanceSequence"))) for s in series], source, set())
    elif sop_class in SR_CLASSES:
        items = [*(ds.get("CurrentRequestedProcedureEvidenceSequence") or []),
                 *(ds.get("PertinentOtherEvidenceSequence") or [])]
        studies = {str(i.get("StudyInstanceUID", "")) for i in items}
        if studies - {source.study_uid}:
            others = sorted(studies - {source.study_uid})
            raise ResultRejectedError(f"{name}: its evidence names other studies {others}")
        series = [(str(s.get("SeriesInstanceUID", "")), _uids(s.get("ReferencedSOPSequence")))
                  for i in items for s in (i.get("ReferencedSeriesSequence") or [])]
        _require_source(name, "evidence", series, source, own_series)
    else:  # Secondary Capture (derived-sc): derived from instances of the source series
        refs = _uids(ds.get("SourceImageSequence"))
        if not refs or not refs <= source.sop_uids:
            raise ResultRejectedError(f"{name}: its Source Image Sequence ({len(refs)} instance(s)) does not name "
                                      f"instances of the source series {source.series_uid}")


def _uids(items: Iterable[Any] | None) -> set[str]:
    return {str(i.get("ReferencedSOPInstanceUID", "")) for i in (items or [])}


def _require_source(name: str, where: str, series: list[tuple[str, set[str]]], source: SourceSeries,
                    own_series: set[str]) -> None:
    """``series`` ((series UID, instance UIDs) pairs) must name the source series with only its instances,
    and nothing else but the result's ``own_series``."""
    named = {uid for uid, _ in series}
    if source.series_uid not in named:
        raise ResultRejectedError(f"{name}: its {where} does not reference the source series {source.series_uid}")
    others = named - {source.series_uid} - own_series
    if others:
        raise ResultRejectedError(f"{name}: its {where} references other series {sorted(others)[:3]}")
    stray = set().union(*(uids for uid, uids in series if uid == source.series_uid)) - source.sop_uids
    if stray:
        raise ResultRejectedError(f"{name}: its {where} references {len(stray)} instance(s) that are not in the "
                                  f"source series")
