"""The follow-up comparison as a TID 1500 Measurement Report (Comprehensive 3D SR) through highdicom (issue 39).

Written on the current series' study; the evidence names both series, so the SR references both
studies: the current series' instances in the Current Requested Procedure Evidence Sequence, the
prior series' in the Pertinent Other Evidence Sequence (with the prior Study Instance UID).

Content, in "Imaging Measurements":

* one TID 1501 group "Comparison with prior": the number of new, enlarging, stable, shrinking and
  resolved lesions;
* per lesion two TID 1501 groups sharing one tracking identifier (``"Lesion N"``, the id of the
  current report, or ``"Resolved lesion k"``), each with a Time Point Context (TID 1502): ``"prior
  YYYY-MM-DD"`` (order 1) with the volume then, and ``"current YYYY-MM-DD"`` (order 2) with the volume
  now and the lesion's change as a "Qualitative Difference" (DCM 111049); finding sites the spinal
  cord and the lesion's vertebral levels;
* the cord's C2-C3 mean CSA (finding sites C2 and C3) and the mean CSA over the cord the same way,
  then and now, the current group with the change in %.

Coded concepts (:data:`STATUS_CODES`): new = SCT 129721008 "New finding" (CID 6002/6003),
enlarging = SCT 15454001 "Increase in size", stable = SCT 260388006 "No change" (CID 3235),
shrinking = SCT 19776001 "Decrease in size" (CID 6134, with "Increase in size");
resolved and the counts and CSA change have no standard code and use the private coding scheme
``99SCINODE`` (declared in the Coding Scheme Identification Sequence; docs/followup.md lists them).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from sci_node import __version__
from sci_node.pipeline.seg_writer import CORD_TYPE, LESION_TYPE, derived_uid, source_key, versions_text
from sci_node.pipeline.sr_writer import (
    AREA,
    DERIVATIONS,
    IMAGING_PROCEDURE,
    MM2,
    MM3,
    NO_UNITS,
    PERCENT,
    VOLUME,
    level_sites,
)

PRIVATE = "99SCINODE"
COMPARISON_SERIES_OFFSET = 9903
QUALITATIVE_DIFFERENCE = hd.sr.CodedConcept("111049", "DCM", "Qualitative Difference")
STATUS_CODES: dict[str, hd.sr.CodedConcept] = {
    "new": hd.sr.CodedConcept("129721008", "SCT", "New finding"),
    "enlarging": hd.sr.CodedConcept("15454001", "SCT", "Increase in size"),
    "stable": hd.sr.CodedConcept("260388006", "SCT", "No change"),
    "shrinking": hd.sr.CodedConcept("19776001", "SCT", "Decrease in size"),
    "resolved": hd.sr.CodedConcept("RESOLVED", PRIVATE, "Resolved lesion"),
}
COUNT_CODES: dict[str, hd.sr.CodedConcept] = {
    status: hd.sr.CodedConcept(f"N{status.upper()}", PRIVATE, f"Number of {status} lesions")
    for status in ("new", "enlarging", "stable", "shrinking", "resolved")}
CSA_CHANGE = hd.sr.CodedConcept("CSACHANGE", PRIVATE, "Change in cross-sectional area")


def coding_scheme() -> Dataset:
    """The Coding Scheme Identification Sequence item that declares ``99SCINODE``."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE
    item.CodingSchemeName = "sci-node private codes (docs/followup.md)"
    item.CodingSchemeResponsibleOrganization = "sci-node"
    return item


def _date(ds: Dataset) -> str:
    """``"2025-01-07"`` of a dataset's StudyDate (``"unknown date"`` when missing)."""
    d = str(ds.get("StudyDate") or "")
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else "unknown date"


def _algo(versions: Mapping[str, str]) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name="sci-node", version=versions_text(versions)[:64] or __version__)


def _m(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept, versions: Mapping[str, str],
       **kw: Any) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(round(value, 3)), unit=unit, algorithm_id=_algo(versions), **kw)


def _times(prior: Dataset, current: Dataset) -> tuple[hd.sr.TimePointContext, hd.sr.TimePointContext]:
    return (hd.sr.TimePointContext(f"prior {_date(prior)}", time_point_order=1),
            hd.sr.TimePointContext(f"current {_date(current)}", time_point_order=2))


def _group(tracking: hd.sr.TrackingIdentifier, when: hd.sr.TimePointContext, finding: hd.sr.CodedConcept,
           sites: list[hd.sr.FindingSite], measurements: list[hd.sr.Measurement], versions: Mapping[str, str],
           status: str | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    quality = [hd.sr.QualitativeEvaluation(QUALITATIVE_DIFFERENCE, STATUS_CODES[status])] if status else None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, time_point_context=when, finding_type=finding, algorithm_id=_algo(versions),
        finding_sites=sites, measurements=measurements, qualitative_evaluations=quality)


def _lesion_groups(record: Mapping[str, Any], key: str, versions: Mapping[str, str],
                   times: tuple[hd.sr.TimePointContext, hd.sr.TimePointContext],
                   ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """Two groups (then, now) per lesion of ``record["lesions"]``
    (:func:`sci_node.pipeline.compare.comparison_record`)."""
    out = []
    for k, les in enumerate(record.get("lesions") or [], start=1):
        name = f"Lesion {les['lesion_id']}" if les.get("lesion_id") else (
            f"Resolved lesion {k}" if les["status"] == "resolved" else
            f"New hyperintensity {k} (subtraction)" if les.get("found_by") == "subtraction" else
            f"Current lesion {les.get('current_id') or k}")
        tracking = hd.sr.TrackingIdentifier(uid=derived_uid(key, versions, f"cmp-lesion-{k}"), identifier=name)
        sites = [hd.sr.FindingSite(CORD_TYPE), *level_sites(les.get("vertebral_levels") or [])]
        out.append(_group(tracking, times[0], LESION_TYPE, sites,
                          [_m(VOLUME, les["volume_then_mm3"], MM3, versions)], versions))
        out.append(_group(tracking, times[1], LESION_TYPE, sites,
                          [_m(VOLUME, les["volume_now_mm3"], MM3, versions)], versions, les["status"]))
    return out


def _csa_groups(record: Mapping[str, Any], key: str, versions: Mapping[str, str],
                times: tuple[hd.sr.TimePointContext, hd.sr.TimePointContext],
                ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """Then and now groups of the C2-C3 mean CSA, of the mean over the stretch both scans cover and of the mean
    over each cord, where both are known; the current group judges the change against the scan-rescan error
    (``beyond_error``: a Qualitative Difference "No change", or "Increase"/"Decrease in size")."""
    out = []
    for what, name, sites in (("csa_c2_c3", "Spinal cord C2-C3", level_sites(["C2", "C3"])),
                              ("csa_common_stretch", "Spinal cord, stretch both scans cover", []),
                              ("csa_mean", "Spinal cord", [])):
        csa = record.get(what) or {}
        if csa.get("then_mm2") is None or csa.get("now_mm2") is None:
            continue
        tracking = hd.sr.TrackingIdentifier(uid=derived_uid(key, versions, f"cmp-{what}"), identifier=name)
        mean = DERIVATIONS["mean"]
        now = [_m(AREA, csa["now_mm2"], MM2, versions, derivation=mean)]
        if csa.get("change_pct") is not None:
            now.append(_m(CSA_CHANGE, csa["change_pct"], PERCENT, versions))
        out.append(_group(tracking, times[0], CORD_TYPE, [hd.sr.FindingSite(CORD_TYPE), *sites],
                          [_m(AREA, csa["then_mm2"], MM2, versions, derivation=mean)], versions))
        judged = None if csa.get("beyond_error") is None else "stable" if not csa["beyond_error"] else (
            "enlarging" if csa["change_pct"] > 0 else "shrinking")
        out.append(_group(tracking, times[1], CORD_TYPE, [hd.sr.FindingSite(CORD_TYPE), *sites], now, versions,
                          judged))
    return out


def build_comparison_sr(record: Mapping[str, Any], current: Sequence[Dataset], prior: Sequence[Dataset],
                        versions: Mapping[str, str]) -> hd.sr.Comprehensive3DSR:
    """Build the comparison SR of one follow-up.

    Parameters
    ----------
    record
        A compared ``comparison.json`` record (:func:`sci_node.pipeline.compare.comparison_record`):
        ``counts``, ``lesions`` (status, volumes then/now in mm3, lesion id, vertebral levels),
        ``csa_c2_c3`` and ``csa_mean`` (then/now in mm2, change in %).
    current, prior
        The datasets (headers suffice) of the current and the prior series; the SR is written on the
        current study and references both.
    versions
        Model name -> version of the current job.

    Raises
    ------
    ValueError
        The record was not compared (no counts).
    """
    if not record.get("compared") or record.get("counts") is None:
        raise ValueError("the comparison was refused: no comparison SR")
    key = source_key(current) + "|" + source_key(prior)
    times = _times(prior[0], current[0])
    summary = _group(hd.sr.TrackingIdentifier(uid=derived_uid(key, versions, "cmp-summary"),
                                              identifier="Comparison with prior"),
                     times[1], LESION_TYPE, [hd.sr.FindingSite(CORD_TYPE)],
                     [_m(COUNT_CODES[s], n, NO_UNITS, versions) for s, n in record["counts"].items()], versions)
    groups: list[Any] = [summary, *_lesion_groups(record, key, versions, times), *_csa_groups(record, key, versions,
                                                                                             times)]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("sci-node-device", {}, "device"), name="sci-node", manufacturer_name="sci-node",
            model_name=f"sci-node {__version__}"))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=IMAGING_PROCEDURE, imaging_measurements=groups)
    first = current[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*current, *prior], content=report[0],
        series_instance_uid=derived_uid(key, versions, "cmp-sr-series"),
        series_number=int(first.get("SeriesNumber") or 0) + COMPARISON_SERIES_OFFSET,
        sop_instance_uid=derived_uid(key, versions, "cmp-sr"), instance_number=1, manufacturer="sci-node",
        is_complete=True, is_final=False, is_verified=False)
    sr.CodingSchemeIdentificationSequence = [coding_scheme()]
    sr.SeriesDescription = f"sci-node comparison vs {_date(prior[0])} ({versions_text(versions)})"[:64]
    return sr
