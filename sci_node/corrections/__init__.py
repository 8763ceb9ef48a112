"""Radiologists' corrected SEGs: recognise them, check their grid, measure the change, keep them.

Imports the core, store/ (the node's jobs), dicom/ (geometry) and pipeline/ (the source series
as a volume). ``sci_node.corrections`` re-exports the API.
"""
from __future__ import annotations

from sci_node.corrections.ingest import (CORD_CODE, DIRECTION_TOL, LESION_CODE, NODE_MANUFACTURER, POSITION_TOL_MM,
                                         SEG_SOP_CLASS, Correction, CorrectionIndex, IngestOutcome, SourceJob,
                                         VolumeGeometry, change_measures, check_grid, created_of, creator_of,
                                         decode_masks, dice, find_source_job, ingest_correction, is_node_authored,
                                         lesion_changes, lesion_components, open_index, purge_expired,
                                         referenced_series, segment_roles, summary, summary_line)

__all__ = ["CORD_CODE", "DIRECTION_TOL", "LESION_CODE", "NODE_MANUFACTURER", "POSITION_TOL_MM", "SEG_SOP_CLASS",
           "Correction", "CorrectionIndex", "IngestOutcome", "SourceJob", "VolumeGeometry", "change_measures",
           "check_grid", "created_of", "creator_of", "decode_masks", "dice", "find_source_job", "ingest_correction",
           "is_node_authored", "lesion_changes", "lesion_components", "open_index", "purge_expired",
           "referenced_series", "segment_roles", "summary", "summary_line"]
