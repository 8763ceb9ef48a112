"""Issue #15: on the lumbar test series the node marks no cord below the conus and no lesion.

``tests/data/series/lumbar_sag_T2w`` (a real sagittal T2w of the lower thoracic cord, conus
medullaris and cauda equina; no lesion) goes through the node's pipeline with the active models,
and the DICOM-SEG it writes is read back with highdicom. The conus tip lies at row 92 of the
images (read by eye, ``bench/lumbar_guard.py``; rows run inferior, 1 mm apart): with a 10 mm
margin no cord pixel may lie below row 102, the cord above the conus must be there (the guard
must not pass by finding nothing), and no lesion may be marked in the cauda equina.
"""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np

from sci_node.config import RoutingRules
from sci_node.models.registry import ModelRegistry
from sci_node.pipeline import Pipeline
from sci_node.pipeline.series import read_series

REPO = Path(__file__).resolve().parent.parent
LUMBAR = sorted((REPO / "tests" / "data" / "series" / "lumbar_sag_T2w").glob("*.dcm"))
CONUS_ROW = 92
MARGIN_ROWS = 10  # 1 mm rows


def test_lumbar_series_has_no_cord_below_the_conus_and_no_lesion(tmp_path: Path) -> None:
    import structlog
    import torch

    structlog.reset_defaults()
    torch.set_num_threads(2)
    pipeline = Pipeline(ModelRegistry(REPO / "models").load_active("cpu"), RoutingRules(), "cpu")
    result = pipeline.run_dicom(LUMBAR, tmp_path)
    assert result.status == "done" and result.summary.get("lesion_count") == 0
    vol = read_series(LUMBAR)
    seg = hd.seg.segread(next(p for p in result.outputs if p.name == "seg.dcm"))
    assert vol.image.GetSpacing()[1] == 1.0 and vol.image.GetDirection()[7] == -1.0  # rows: 1 mm along -z
    cord = seg.get_pixels_by_source_instance([r.sop_instance_uid for r in vol.refs], segment_numbers=[1],
                                             skip_overlap_checks=True)[..., 0]
    rows = np.nonzero(cord.any(axis=(0, 2)))[0]
    assert rows.max() <= CONUS_ROW + MARGIN_ROWS, f"cord down to row {rows.max()}, the conus is at row {CONUS_ROW}"
    assert np.count_nonzero(cord[:, :CONUS_ROW]) > 2000  # the thoracic cord and conus are segmented
    assert 2 not in seg.segment_numbers or not np.any(seg.get_pixels_by_source_instance(
        [r.sop_instance_uid for r in vol.refs], segment_numbers=[2], skip_overlap_checks=True))
