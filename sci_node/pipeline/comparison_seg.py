"""The follow-up's DICOM-SEG: one segment "New or enlarging lesion" on the current series (issue 39).

A new series in the current study (Series Number + 9902, its description naming the prior's study
date: ``"sci-node new/enlarging vs 2025-01-07 (cord 0.2.3, ...)"``); segment 1 "New or enlarging
lesion" (Lesion, SCT 52988006, category Morphologically Abnormal Structure, anatomic region spinal
cord) in its own colour, yellow (CIE Lab 90, -5, 85), apart from the cord's green and the lesions'
red of the node's SEG, so OHIF shows what changed. The encoding, frame references and slices the
series lacks follow :mod:`sci_node.pipeline.seg_writer`. With nothing new or enlarging the SEG is
still written, every frame empty and the description saying ``"none new/enlarging"``: the reader
sees that the comparison ran and found nothing.
"""
from __future__ import annotations

from typing import Mapping

import highdicom as hd
import numpy as np
from pydicom.uid import ExplicitVRLittleEndian

from sci_node import __version__
from sci_node.errors import InvalidSeriesError
from sci_node.pipeline.seg_writer import (
    CORD_TYPE,
    LESION_CATEGORY,
    LESION_TYPE,
    algorithm_identification,
    derived_uid,
    seg_encoding,
    source_key,
    source_order,
    versions_text,
)
from sci_node.pipeline.series import SeriesVolume

NEW_SEG_SERIES_OFFSET = 9902
NEW_OR_ENLARGING_LABEL = "New or enlarging lesion"
NEW_OR_ENLARGING_COLOR = (90.0, -5.0, 85.0)  # CIE Lab: yellow


def build_new_or_enlarging_seg(volume: SeriesVolume, mask: np.ndarray, prior_study_date: str,
                               prior_series_uid: str, versions: Mapping[str, str]) -> hd.seg.Segmentation:
    """Build the "New or enlarging lesion" SEG of the current series.

    Parameters
    ----------
    volume
        The current series (its datasets are the SEG's source images).
    mask
        ``(Z, Y, X)`` uint8, the new and enlarging lesions on ``volume.image``'s grid (volume order;
        ``new_or_enlarging.nii.gz``); may be empty.
    prior_study_date
        ``"YYYYMMDD"`` of the prior study (in the descriptions).
    prior_series_uid
        The prior series (with the current series and the versions, it makes the UIDs).
    versions
        Model name -> version of the current job.

    Raises
    ------
    InvalidSeriesError
        The mask is not on the series' grid.
    """
    expected = volume.image.GetSize()[::-1]
    if mask.shape != expected:
        raise InvalidSeriesError(f"new-or-enlarging mask {mask.shape} does not match the series {expected}")
    found = bool(mask.any())
    pixels = source_order(volume, (mask > 0).astype(np.uint8)[..., np.newaxis])
    src = volume.first
    key = source_key(volume.datasets) + "|" + prior_series_uid
    d = prior_study_date
    when = f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else "prior"
    what = f"sci-node {'new/enlarging' if found else 'none new/enlarging'} vs {when}"
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=NEW_OR_ENLARGING_LABEL, segmented_property_category=LESION_CATEGORY,
        segmented_property_type=LESION_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(versions), anatomic_regions=[CORD_TYPE],
        display_color=hd.color.CIELabColor(*NEW_OR_ENLARGING_COLOR))
    seg = hd.seg.Segmentation(
        source_images=list(volume.datasets), pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues(seg_encoding(int(src.Rows), int(src.Columns)).value),
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY, max_fractional_value=1,
        segment_descriptions=[segment],
        series_instance_uid=derived_uid(key, versions, "cmp-seg-series"),
        series_number=int(src.get("SeriesNumber") or 0) + NEW_SEG_SERIES_OFFSET,
        sop_instance_uid=derived_uid(key, versions, "cmp-seg"), instance_number=1,
        manufacturer="sci-node", manufacturer_model_name="sci-node", software_versions=f"sci-node {__version__}",
        device_serial_number="sci-node", content_description=what[:64],
        content_creator_name=f"sci-node^{versions_text(versions)}"[:64], content_label="SCINODE_FU",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=found,  # nothing found: keep the empty frames, a SEG needs at least one
    )
    seg.SeriesDescription = f"{what} ({versions_text(versions)})"[:64]
    return seg
