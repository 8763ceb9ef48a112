"""Radiologists' corrected SEGs: recognise them, check their grid, measure the change, keep them, export them.

Imports the core, store/ (the node's jobs), dicom/ (geometry) and pipeline/ (the source series as a
volume). ``sci_node.corrections`` re-exports the API; the ``sci-node corrections`` presenters are in cli/.
"""
from __future__ import annotations

from sci_node.corrections.export import export_corrections
from sci_node.corrections.grid import CORD_CODE, LESION_CODE, check_grid, decode_masks, segment_roles
from sci_node.corrections.index import Correction, CorrectionIndex, all_corrections, open_index, purge_expired, summary
from sci_node.corrections.ingest import (
                                        NODE_MANUFACTURER,
                                        SEG_SOP_CLASS,
                                        IngestOutcome,
                                        SourceJob,
                                        created_of,
                                        creator_of,
                                        find_source_job,
                                        ingest_correction,
                                        is_node_authored,
                                        referenced_series,
)
from sci_node.corrections.measures import change_measures, dice, lesion_changes, lesion_components

__all__ = ["CORD_CODE", "LESION_CODE", "NODE_MANUFACTURER", "SEG_SOP_CLASS",
           "Correction", "CorrectionIndex", "IngestOutcome", "SourceJob", "all_corrections",
           "change_measures", "check_grid", "created_of", "creator_of", "decode_masks", "dice", "export_corrections",
           "find_source_job", "ingest_correction", "is_node_authored", "lesion_changes", "lesion_components",
           "open_index", "purge_expired", "referenced_series", "segment_roles", "summary"]
