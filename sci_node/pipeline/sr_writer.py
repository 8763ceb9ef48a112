"""TID 1500 Measurement Report (Comprehensive 3D SR) through highdicom. Returns a dataset.

Content:

* one volumetric measurement group (TID 1411) for the spinal cord, referencing SEG segment 1:
  number of lesions, cord volume (mm3), cord length (mm), and the cord cross-sectional area
  (mm2) summary over the slice levels (mean, minimum, maximum, median);
* one group per lesion (tracking id "Lesion N", ordered by decreasing volume), referencing SEG
  segment 2 (all lesions: a segment reference cannot also name frames): volume (mm3), length
  along the cord (mm) and the lesion's confidence, "Certainty of Finding" (DCM 111012, %): the lesion
  network's peak probability inside the lesion.

The per-level CSA values themselves are in the batch ``report.json`` (and the job record).

Every finding (the cord, each lesion) also gets a planar group (TID 1410) with the same tracking
identifier and UID: its outline on its key slice (:mod:`sci_node.pipeline.key_slices`) as an "Image Region"
POLYLINE that references the source image (and frame). These come first in "Imaging Measurements",
in reading order: the lesions by id (the largest first), then the cord. OHIF 3.13 needs them: its SR view
(extension cornerstone-dicom-sr) merges the groups of one Tracking Unique Identifier into one
measurement, draws it on the image its SCOORD references with the group's numbers beside it, and
opens on the first one; a measurement without an image-referenced SCOORD leaves the viewport empty
(docs/orthanc.md, "The report in OHIF").
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from sci_node import __version__
from sci_node.pipeline.key_slices import CORD_FINDING, KeyImage
from sci_node.pipeline.seg_writer import (
    CORD_TYPE,
    LESION_TYPE,
    SR_SERIES_OFFSET,
    derived_uid,
    described,
    frame_references,
    levels_covered,
    source_key,
    versions_text,
)

_SCT = "SCT"
NUMBER_OF_LESIONS = hd.sr.CodedConcept("246206008", _SCT, "Number of lesions")
VOLUME = hd.sr.CodedConcept("118565006", _SCT, "Volume")
LENGTH = hd.sr.CodedConcept("410668003", _SCT, "Length")
AREA = hd.sr.CodedConcept("42798000", _SCT, "Area")
MM3 = hd.sr.CodedConcept("mm3", "UCUM", "cubic millimeter")
MM2 = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
MM = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
CERTAINTY = hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")
DERIVATIONS = {
    "mean": hd.sr.CodedConcept("373098007", _SCT, "Mean"),
    "min": hd.sr.CodedConcept("255605001", _SCT, "Minimum"),
    "max": hd.sr.CodedConcept("56851009", _SCT, "Maximum"),
    "median": hd.sr.CodedConcept("260528009", _SCT, "Median"),
}
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", _SCT, "Imaging procedure")


def referenced_segment(seg: Dataset, segment_number: int) -> hd.sr.ReferencedSegment:
    """Reference to one SEG segment with the source images its frames were derived from.

    Built by hand: ``ReferencedSegment.from_segmentation`` (highdicom 0.28) fails on a
    one-segment SEG, whose segment identification sits in the shared functional groups.
    """
    sop_class = {}
    for series in seg.ReferencedSeriesSequence:
        for inst in series.ReferencedInstanceSequence:
            sop_class[str(inst.ReferencedSOPInstanceUID)] = str(inst.ReferencedSOPClassUID)
    frames: dict[str, list[int]] = {}
    for seg_no, uid, frame in frame_references(seg):
        if seg_no == segment_number:
            frames.setdefault(uid, [])
            if frame is not None and frame not in frames[uid]:
                frames[uid].append(frame)
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID), segment_number=segment_number,
        source_images=[hd.sr.SourceImageForSegmentation(sop_class[uid], uid, sorted(f) or None)
                       for uid, f in frames.items()])


def _algo(versions: Mapping[str, str]) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name="sci-node", version=versions_text(versions)[:64] or __version__)


def _m(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept, versions: Mapping[str, str],
       derivation: hd.sr.CodedConcept | None = None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(round(value, 3)), unit=unit, derivation=derivation,
                             algorithm_id=_algo(versions))


def _cord_group(seg: Dataset, summary: Mapping[str, Any], versions: Mapping[str, str],
                series_uid: str) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    # no lesion count when the lesion model was not run (lesion_count None): not assessed is not zero
    ms = [_m(NUMBER_OF_LESIONS, summary["lesion_count"], NO_UNITS, versions)] \
        if summary.get("lesion_count") is not None else []
    ms += [_m(VOLUME, summary["cord_volume_mm3"], MM3, versions), _m(LENGTH, summary["cord_length_mm"], MM, versions)]
    for key, code in DERIVATIONS.items():
        if key in summary.get("csa_mm2", {}):
            ms.append(_m(AREA, summary["csa_mm2"][key], MM2, versions, derivation=code))
    ms += vertebral_measurements(summary, versions)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(series_uid, versions, "track-cord"),
                                                     identifier="Spinal cord"),
        referenced_segment=referenced_segment(seg, 1),
        finding_type=CORD_TYPE,
        algorithm_id=_algo(versions),
        finding_sites=[hd.sr.FindingSite(CORD_TYPE)],
        measurements=ms,
    )
    comment = vertebral_comment(summary)
    if comment is not None:  # the levels are unknown: say why
        group[0].ContentSequence.append(comment)
    return group


def _lesion_groups(seg: Dataset, lesions: Sequence[Mapping[str, Any]], versions: Mapping[str, str], series_uid: str,
                   ) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    out = []
    for les in lesions:
        out.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(series_uid, versions, f"track-lesion-{les['id']}"), identifier=f"Lesion {les['id']}"),
            referenced_segment=referenced_segment(seg, 2),
            finding_type=LESION_TYPE,
            algorithm_id=_algo(versions),
            finding_sites=[hd.sr.FindingSite(CORD_TYPE), *level_sites(les.get("vertebral_levels", []))],
            measurements=[_m(VOLUME, les["volume_mm3"], MM3, versions),
                          _m(LENGTH, les["length_along_cord_mm"], MM, versions)]
            + ([_m(CERTAINTY, 100.0 * les["confidence"], PERCENT, versions)] if "confidence" in les else []),
        ))
    return out


def level_sites(names: Sequence[str]) -> list[hd.sr.FindingSite]:
    """Finding sites (SNOMED CT vertebrae, pydicom's codedict: ``codes.SCT.C3Vertebra`` = 113205007 "C3
    vertebra") of vertebral level names ``["C3", "C4"]``."""
    return [hd.sr.FindingSite(getattr(codes.SCT, f"{name}Vertebra")) for name in names]


def vertebral_measurements(summary: Mapping[str, Any], versions: Mapping[str, str]) -> list[hd.sr.Measurement]:
    """The cord's vertebral-level values (:func:`sci_node.measure.vertebral_summary`) as TID 300 measurements:
    the mean CSA over C2 and C3 (finding sites C2 and C3 vertebrae), then each level's mean CSA (finding site
    its vertebra). None when the levels are unknown (the reason is then in :func:`vertebral_comment`)."""
    ms = []
    if summary.get("csa_c2_c3_mm2") is not None:
        ms.append(hd.sr.Measurement(name=AREA, value=float(round(summary["csa_c2_c3_mm2"], 3)), unit=MM2,
                                    derivation=DERIVATIONS["mean"], finding_sites=level_sites(["C2", "C3"]),
                                    algorithm_id=_algo(versions)))
    for row in summary.get("vertebral_levels") or []:
        ms.append(hd.sr.Measurement(name=AREA, value=float(round(row["csa_mm2_mean"], 3)), unit=MM2,
                                    derivation=DERIVATIONS["mean"], finding_sites=level_sites([row["level"]]),
                                    algorithm_id=_algo(versions)))
    return ms


def vertebral_comment(summary: Mapping[str, Any]) -> hd.sr.TextContentItem | None:
    """A Comment (DCM 121106) saying why the vertebral levels are unknown, or None when they are known."""
    reason = summary.get("vertebral_levels_unknown_reason")
    if not reason:
        return None
    return hd.sr.TextContentItem(name=codes.DCM.Comment, value=f"vertebral levels unknown: {reason}"[:1024],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _tracking(series_uid: str, versions: Mapping[str, str], finding: str) -> hd.sr.TrackingIdentifier:
    """The tracking identifier of a finding: ``"Spinal cord"`` / ``"Lesion N"`` and its derived UID,
    the same for the finding's volumetric and planar groups."""
    what = "track-cord" if finding == CORD_FINDING else "track-" + finding.lower().replace(" ", "-")
    return hd.sr.TrackingIdentifier(uid=derived_uid(series_uid, versions, what), identifier=finding)


def region_outline(outline_rc: np.ndarray) -> np.ndarray:
    """``(N, 2)`` (column, row) graphic data of a closed ``(row, column)`` outline, never 4 or 5 points.

    OHIF 3.13 takes a 4- or 5-point "Image Region" POLYLINE for a rectangle it can re-create as
    its own RectangleROI tool and then converts the whole report into its editable annotations,
    dropping our numbers; a small outline (one pixel, a rectangle) gets its edge midpoints added.
    """
    pts = np.asarray(outline_rc, dtype=np.float64)
    if len(pts) <= 5:
        mids = (pts[:-1] + pts[1:]) / 2.0
        pts = np.vstack([np.column_stack([pts[:-1], mids]).reshape(-1, 2), pts[-1:]])
    return pts[:, ::-1].copy()


def _planar_groups(images: Sequence[KeyImage], versions: Mapping[str, str], series_uid: str,
                   ) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 group per key image: the finding's outline on its key slice, no measurements."""
    out = []
    for im in images:
        frames = [im.source.frame_number] if im.source.frame_number is not None else None
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=region_outline(im.key.outline),
            source_image=hd.sr.SourceImageForRegion(im.source.sop_class_uid, im.source.sop_instance_uid, frames))
        out.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(series_uid, versions, im.finding),
            referenced_region=region,
            finding_type=CORD_TYPE if im.finding == CORD_FINDING else LESION_TYPE,
            algorithm_id=_algo(versions),
            finding_sites=[hd.sr.FindingSite(CORD_TYPE)],
        ))
    return out


def build_sr(seg: Dataset, sources: Sequence[Dataset], summary: Mapping[str, Any],
             versions: Mapping[str, str], notes: Sequence[str] = (), *,
             key_images: Sequence[KeyImage]) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 measurement report of one series.

    Parameters
    ----------
    seg
        The SEG the report refers to (evidence).
    sources
        The source series' datasets (evidence with the SEG; the first gives study attributes).
    summary
        :func:`sci_node.imaging.measure.summarize` output.
    versions
        Model name -> version.
    notes
        Warnings (missing slices, incomplete transfer) that lead the Series Description.
    key_images
        :func:`sci_node.pipeline.key_slices.key_images` of the same masks, in reading order: one planar
        group each. A finding without one has no region in the report and OHIF 3.13 then
        shows none of it.
    """
    source = sources[0]
    series_uid = source_key(sources)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("sci-node-device", {}, "device"), name="sci-node", manufacturer_name="sci-node",
            model_name=f"sci-node {__version__}"))
    with_lesions = bool(summary.get("lesions")) and len(seg.SegmentSequence) >= 2
    shown = [im for im in key_images if with_lesions or im.finding == CORD_FINDING]
    groups: list[Any] = [*_planar_groups(shown, versions, series_uid), _cord_group(seg, summary, versions, series_uid)]
    if with_lesions:
        groups += _lesion_groups(seg, summary["lesions"], versions, series_uid)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources],
        content=report[0],
        series_instance_uid=derived_uid(series_uid, versions, "sr-series"),
        series_number=int(source.get("SeriesNumber") or 0) + SR_SERIES_OFFSET,
        sop_instance_uid=derived_uid(series_uid, versions, "sr"),
        instance_number=1,
        manufacturer="sci-node",
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = described("sci-node measurements", versions, notes,
                                     levels_covered(summary.get("vertebral_levels") or []))
    return sr


def read_measurements(sr: Dataset) -> list[dict[str, Any]]:
    """Flatten the report's numeric measurements: ``{"group", "name", "value", "unit", "derivation"}``."""
    out = []
    doc = sr if isinstance(sr, hd.sr.Comprehensive3DSR) else hd.sr.Comprehensive3DSR.from_dataset(sr)
    content: Any = doc.content  # a MeasurementReport once read back
    for grp in content.get_volumetric_roi_measurement_groups():
        gid = grp.tracking_identifier
        for m in grp.get_measurements():
            der = m.derivation
            out.append({"group": gid, "name": m.name.meaning, "value": float(m.value), "unit": m.unit.value,
                        "derivation": der.meaning if der is not None else None})
    return out
