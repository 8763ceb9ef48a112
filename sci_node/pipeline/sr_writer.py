"""TID 1500 Measurement Report (Comprehensive 3D SR) through highdicom. Returns a dataset.

Content:

* one volumetric measurement group (TID 1411) for the spinal cord, referencing SEG segment 1:
  number of lesions, cord volume (mm3), cord length (mm), and the cord cross-sectional area
  (mm2) summary over the slice levels (mean, minimum, maximum, median);
* one group per lesion (tracking id "Lesion N", ordered by decreasing volume), referencing SEG
  segment 2 (all lesions: a segment reference cannot also name frames): volume (mm3) and length
  along the cord (mm).

The per-level CSA values themselves are in the batch ``report.json`` (and the job record).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from sci_node import __version__
from sci_node.pipeline.seg_writer import (
    CORD_TYPE,
    LESION_TYPE,
    SR_SERIES_OFFSET,
    derived_uid,
    described,
    frame_references,
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
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(series_uid, versions, "track-cord"),
                                                     identifier="Spinal cord"),
        referenced_segment=referenced_segment(seg, 1),
        finding_type=CORD_TYPE,
        algorithm_id=_algo(versions),
        finding_sites=[hd.sr.FindingSite(CORD_TYPE)],
        measurements=ms,
    )


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
            finding_sites=[hd.sr.FindingSite(CORD_TYPE)],
            measurements=[_m(VOLUME, les["volume_mm3"], MM3, versions),
                          _m(LENGTH, les["length_along_cord_mm"], MM, versions)],
        ))
    return out


def build_sr(seg: Dataset, sources: Sequence[Dataset], summary: Mapping[str, Any],
             versions: Mapping[str, str], notes: Sequence[str] = ()) -> hd.sr.Comprehensive3DSR:
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
    """
    source = sources[0]
    series_uid = source_key(sources)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("sci-node-device", {}, "device"), name="sci-node", manufacturer_name="sci-node",
            model_name=f"sci-node {__version__}"))
    groups = [_cord_group(seg, summary, versions, series_uid)]
    if summary.get("lesions") and len(seg.SegmentSequence) >= 2:
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
    sr.SeriesDescription = described("sci-node measurements", versions, notes)
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
