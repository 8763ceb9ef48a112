"""DICOM-SEG of the cord (and lesions) through highdicom. Returns datasets, writes nothing.

BINARY segmentation, empty frames omitted, same rows/columns as the source; each frame
references the source instance (and frame) it was derived from. Segment 1 "Spinal cord"
(SCT 2748008, category Anatomical Structure SCT 91723000); segment 2 "Lesion"
(SCT 52988006, category Morphologically Abnormal Structure SCT 49755003) only when lesions
were found. The AlgorithmIdentificationSequence names "sci-node" and every model version.
The SEG is a new series in the source study; its UIDs are derived from the source series
UID, the set of source instances and the model versions (:func:`source_key`), so
re-processing the same series with the same models gives the same instance (a PACS
overwrites it instead of piling up copies), while a series that changed (a late instance
re-opened it) or new models give new UIDs: one UID never names two different contents.
"""
from __future__ import annotations

import hashlib
import json
from typing import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from sci_node import __version__
from sci_node.errors import InvalidSeriesError
from sci_node.series import SeriesVolume

CORD_TYPE = hd.sr.CodedConcept("2748008", "SCT", "Spinal cord")
CORD_CATEGORY = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
LESION_TYPE = hd.sr.CodedConcept("52988006", "SCT", "Lesion")
LESION_CATEGORY = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")
SEG_SERIES_OFFSET = 9900
SR_SERIES_OFFSET = 9901


def versions_text(versions: Mapping[str, str]) -> str:
    """``"cord 0.1.0, lesion 0.1.0, ..."`` in a stable order."""
    return ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))


def source_key(datasets: Sequence[Dataset]) -> str:
    """``SeriesInstanceUID`` plus a digest of the sorted SOP Instance UIDs of the source instances."""
    uids = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    digest = hashlib.sha256("\\".join(uids).encode("ascii", "replace")).hexdigest()[:32]
    return f"{datasets[0].SeriesInstanceUID}:{digest}"


def derived_uid(source_series_uid: str, versions: Mapping[str, str], what: str) -> str:
    """Deterministic UID of an output object (``what`` = ``seg-series``, ``seg``, ``sr`` ...)."""
    return generate_uid(entropy_srcs=[source_series_uid, json.dumps(dict(versions), sort_keys=True), what])


def algorithm_identification(versions: Mapping[str, str]) -> hd.AlgorithmIdentificationSequence:
    """AlgorithmIdentificationSequence: name "sci-node", family AI, every model version."""
    return hd.AlgorithmIdentificationSequence(
        name="sci-node",
        family=codes.cid7162.ArtificialIntelligence,
        version=versions_text(versions)[:64] or __version__,
        source="sci-node",
        parameters={k: str(v) for k, v in sorted(versions.items())},
    )


def _segments(versions: Mapping[str, str], with_lesions: bool) -> list[hd.seg.SegmentDescription]:
    algo = algorithm_identification(versions)
    region = [CORD_TYPE]
    segs = [hd.seg.SegmentDescription(
        segment_number=1, segment_label="Spinal cord", segmented_property_category=CORD_CATEGORY,
        segmented_property_type=CORD_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo, tracking_uid=None, tracking_id=None,
        display_color=hd.color.CIELabColor(60.0, -60.0, 55.0))]
    if with_lesions:
        segs.append(hd.seg.SegmentDescription(
            segment_number=2, segment_label="Lesion", segmented_property_category=LESION_CATEGORY,
            segmented_property_type=LESION_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, anatomic_regions=region,
            display_color=hd.color.CIELabColor(55.0, 75.0, 60.0)))
    return segs


def source_order(volume: SeriesVolume, masks: np.ndarray) -> np.ndarray:
    """Reorder ``(Z, ...)`` volume-order masks into the order highdicom expects.

    Single-frame sources: volume order (= ``volume.datasets`` order). A multi-frame source:
    frame-number order of its one instance.
    """
    if not volume.multiframe:
        return masks
    if len(volume.datasets) != 1:
        raise InvalidSeriesError(f"a SEG can reference one multi-frame instance, the series has {len(volume.datasets)}")
    out = np.zeros_like(masks)
    for k, ref in enumerate(volume.refs):
        out[int(ref.frame_number) - 1] = masks[k]  # type: ignore[arg-type]
    return out


def build_seg(volume: SeriesVolume, cord: np.ndarray, lesion: np.ndarray | None,
              versions: Mapping[str, str]) -> hd.seg.Segmentation:
    """Build the DICOM-SEG of one series.

    Parameters
    ----------
    volume
        The source series (its datasets are the SEG's source images).
    cord, lesion
        ``(Z, Y, X)`` uint8 masks on ``volume.image``'s grid (volume order); ``lesion`` None or
        empty -> no lesion segment.
    versions
        Model name -> version, e.g. ``{"cord": "0.1.0", "lesion": "0.1.0"}``.

    Raises
    ------
    InvalidSeriesError
        The cord mask is empty (nothing to encode) or shapes disagree.
    """
    expected = volume.image.GetSize()[::-1]
    if cord.shape != expected or (lesion is not None and lesion.shape != expected):
        raise InvalidSeriesError(f"mask shape {cord.shape} does not match the series {expected}")
    if not cord.any():
        raise InvalidSeriesError("the cord mask is empty: no SEG to write")
    with_lesions = lesion is not None and bool(lesion.any())
    layers = [cord > 0]
    if with_lesions and lesion is not None:
        layers.append(lesion > 0)
    pixels = source_order(volume, np.stack(layers, axis=-1).astype(np.uint8))
    src = volume.first
    series_uid = source_key(volume.datasets)
    vtext = versions_text(versions)
    seg = hd.seg.Segmentation(
        source_images=list(volume.datasets),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segments(versions, with_lesions),
        series_instance_uid=derived_uid(series_uid, versions, "seg-series"),
        series_number=int(src.get("SeriesNumber") or 0) + SEG_SERIES_OFFSET,
        sop_instance_uid=derived_uid(series_uid, versions, "seg"),
        instance_number=1,
        manufacturer="sci-node",
        manufacturer_model_name="sci-node",
        software_versions=f"sci-node {__version__}",
        device_serial_number="sci-node",
        content_description=f"sci-node {vtext}"[:64],
        content_creator_name=f"sci-node^{vtext}"[:64],
        content_label="SCINODE",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = f"sci-node SEG ({vtext})"[:64]
    return seg


def frame_references(seg: Dataset) -> list[tuple[int, str, int | None]]:
    """``(segment_number, referenced SOPInstanceUID, referenced frame or None)`` per SEG frame."""
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else None
    out = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        # a one-segment SEG carries the segment identification in the shared groups
        ident = item if "SegmentIdentificationSequence" in item else shared
        seg_no = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)  # type: ignore[union-attr]
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = src.get("ReferencedFrameNumber")
        out.append((seg_no, str(src.ReferencedSOPInstanceUID), int(frame) if frame is not None else None))
    return out
