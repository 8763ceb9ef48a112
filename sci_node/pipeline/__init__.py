"""One series in, results out: DICOM series -> volume, routing, segmentation, DICOM-SEG + SR (the contract
shared by the node's engines and ``sci-node infer``/``route``).

Imports the core, dicom/ (geometry), imaging/, routing/ and models/. ``sci_node.pipeline`` re-exports
:mod:`sci_node.pipeline.run` (``Pipeline``, ``PipelineResult``, docs/architecture.md's contract).
"""
from __future__ import annotations

from sci_node.pipeline.run import (
                                   ModelSetLike,
                                   Pipeline,
                                   PipelineResult,
                                   Segmented,
                                   lesion_note,
                                   missing_notes,
                                   read_nifti,
                                   write_masks,
)

__all__ = ["ModelSetLike", "Pipeline", "PipelineResult", "Segmented", "lesion_note", "missing_notes", "read_nifti",
           "write_masks"]
