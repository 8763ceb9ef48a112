"""DICOM-SEG of the cord (and lesions) through highdicom. Returns datasets, writes nothing.

Encoding (:func:`seg_encoding`): BINARY (1 bit per pixel) when every frame starts on a byte
boundary (Rows x Columns a multiple of 8), else FRACTIONAL with a Maximum Fractional Value of 1
(one byte per pixel, values 0/1). A bit-packed frame that does not start on a byte boundary
cannot be served by Orthanc 1.10's DICOMweb (``/frames/N`` answers 400) nor, when the packed
length is odd and padded, read whole by OHIF 3.13 (it expects the unpadded length): such a SEG
never displays (docs/node.md, "SEG encoding"). Empty frames omitted, same rows/columns as the source;
each frame references the source instance (and frame) it was derived from; slices the series lacks (interpolated for
inference, see :mod:`sci_node.pipeline.series`) get no frame. Segment 1 "Spinal cord"
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
from enum import StrEnum
from typing import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from sci_node import __version__
from sci_node.errors import InvalidSeriesError
from sci_node.pipeline.series import SeriesVolume

CORD_TYPE = hd.sr.CodedConcept("2748008", "SCT", "Spinal cord")
CORD_CATEGORY = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
LESION_TYPE = hd.sr.CodedConcept("52988006", "SCT", "Lesion")
LESION_CATEGORY = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")
SEG_SERIES_OFFSET = 9900
SR_SERIES_OFFSET = 9901


class SegEncoding(StrEnum):
    """How the SEG's frames are stored (DICOM Segmentation Type)."""

    BINARY = "BINARY"  # 1 bit per pixel, frames packed back to back
    FRACTIONAL = "FRACTIONAL"  # 1 byte per pixel; we write 0/1 with MaximumFractionalValue 1


def seg_encoding(rows: int, columns: int) -> SegEncoding:
    """BINARY when a bit-packed frame is a whole number of bytes, else FRACTIONAL (max 1).

    Measured with Orthanc 1.10.1 + OHIF 3.13.2 on a 99 x 99 series (docs/node.md, "SEG
    encoding"; tests/test_viewer.py): a BINARY SEG's ``/frames/N`` answer 400 and, when the
    packed length is odd (padded), OHIF shows "Loading SEG..." forever; the FRACTIONAL one (8x
    larger before compression) is served, passes dciodvfy and is overlaid. LABELMAP (Label Map
    Segmentation Storage) is unknown to dciodvfy and dcmtk, and OHIF drew it without colour.
    """
    return SegEncoding.BINARY if (rows * columns) % 8 == 0 else SegEncoding.FRACTIONAL


def described(prefix: str, versions: Mapping[str, str], notes: Sequence[str] = (), where: str | None = None) -> str:
    """``"sci-node SEG [1 slice missing] C2-C5 (cord 0.1.0, ...)"``, at most 64 characters (LO).

    Notes (missing slices, an incomplete transfer) and ``where`` (the vertebral levels the cord
    covers, :func:`levels_covered`) come before the model versions so that truncation to 64
    characters cuts the versions, never the warning or the levels.
    """
    flags = f" [{'; '.join(notes)}]" if notes else ""
    place = f" {where}" if where else ""
    return f"{prefix}{flags}{place} ({versions_text(versions)})"[:64]


def levels_covered(vertebral_levels: Sequence[Mapping[str, object]]) -> str | None:
    """``"C2-C5"`` (first and last vertebral level of the cord, top down), ``"C3"``; None when unknown."""
    names = [str(v.get("level")) for v in vertebral_levels if v.get("level")]
    if not names:
        return None
    return names[0] if names[0] == names[-1] else f"{names[0]}-{names[-1]}"


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

    Single-frame sources: volume order (= ``volume.datasets`` order) without the slices the
    series lacks. A multi-frame source: frame-number order of its one instance.
    """
    present = [k for k, ref in enumerate(volume.refs) if ref is not None]
    if not volume.multiframe:
        return masks[present]
    if len(volume.datasets) != 1:
        raise InvalidSeriesError(f"a SEG can reference one multi-frame instance, the series has {len(volume.datasets)}")
    out = np.zeros((int(volume.first.get("NumberOfFrames", len(present))), *masks.shape[1:]), dtype=masks.dtype)
    for k in present:
        out[int(volume.refs[k].frame_number) - 1] = masks[k]  # type: ignore[arg-type, union-attr]
    return out


def build_seg(volume: SeriesVolume, cord: np.ndarray, lesion: np.ndarray | None,
              versions: Mapping[str, str], notes: Sequence[str] = (),
              encoding: SegEncoding | None = None, where: str | None = None) -> hd.seg.Segmentation:
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
    notes
        Warnings for the reader (e.g. ``"1 slice missing"``, ``"incomplete transfer"``); they
        lead the Series and Content Description.
    encoding
        None: :func:`seg_encoding` of the source matrix (BINARY only when byte-aligned).
    where
        The vertebral levels the cord covers (``"C2-C5"``, :func:`levels_covered`), shown in the
        Series and Content Description; None when unknown.

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
    kind = encoding or seg_encoding(int(src.Rows), int(src.Columns))
    seg = hd.seg.Segmentation(
        source_images=list(volume.datasets),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues(kind.value),
        # used only by FRACTIONAL: one byte per pixel holding 0 or 1, which OHIF reads as binary
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=1,
        segment_descriptions=_segments(versions, with_lesions),
        series_instance_uid=derived_uid(series_uid, versions, "seg-series"),
        series_number=int(src.get("SeriesNumber") or 0) + SEG_SERIES_OFFSET,
        sop_instance_uid=derived_uid(series_uid, versions, "seg"),
        instance_number=1,
        manufacturer="sci-node",
        manufacturer_model_name="sci-node",
        software_versions=f"sci-node {__version__}",
        device_serial_number="sci-node",
        content_description=described("sci-node", versions, notes, where),
        content_creator_name=f"sci-node^{vtext}"[:64],
        content_label="SCINODE",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = described("sci-node SEG", versions, notes, where)
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
