"""The pipeline with the real shipped models on committed MR DICOM series."""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from sci_node.config import RoutingRules
from sci_node.models.registry import ModelRegistry
from sci_node.pipeline import Pipeline, PipelineResult
from sci_node.pipeline.series import read_series

from dicom_validate import dciodvfy_errors

REPO = Path(__file__).resolve().parent.parent
SERIES = REPO / "tests" / "data" / "series"


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    import structlog
    import torch

    structlog.reset_defaults()  # a CLI test may have bound logging to a closed capture stream
    torch.set_num_threads(2)
    models = ModelRegistry(REPO / "models").load_active("cpu")
    return Pipeline(models, RoutingRules(), "cpu")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _cord_from_seg(seg_path: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(cord mask read back from the SEG itself, manual mask) on the series grid, (Z, Y, X)."""
    vol = read_series(sorted(folder.glob("*.dcm")))
    seg = hd.seg.segread(seg_path)
    uids = [r.sop_instance_uid for r in vol.refs]
    back = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], skip_overlap_checks=True)[..., 0]
    manual = sitk.Resample(sitk.ReadImage(str(folder / "cord_mask.nii.gz")), vol.image, sitk.Transform(),
                           sitk.sitkNearestNeighbor, 0)
    return back, sitk.GetArrayFromImage(manual)


def _check_done(res: PipelineResult, view: str) -> None:
    assert res.status == "done", res.reason
    assert res.routing["anatomy"]["label"] == "spine" and res.routing["view"]["label"] == view
    assert res.routing["sequence"]["label"] == "T2w" and "rule" in res.routing
    assert [p.name for p in res.outputs] == ["seg.dcm", "sr.dcm"]
    for p in res.outputs:
        assert dciodvfy_errors(p) == []
    assert set(res.timings) == {"load", "classify", "segment", "write"}
    assert set(res.model_versions) == {"anatomy", "region_view", "sequence", "cord", "lesion"}
    assert res.summary["cord_volume_mm3"] > 0 and res.summary["csa_mm2"]["mean"] > 0


def test_axial_t2w_cord_dice_from_seg(pipeline: Pipeline, tmp_path: Path) -> None:
    """Dice regression read back from the SEG itself. sub-unf01 is in the shipped cord model's
    final training set (the only labelled T2w subjects are unf01 and PAM50): this guards the
    DICOM chain (geometry, SEG encoding) and model regressions, not generalisation."""
    folder = SERIES / "unf01_axial_T2w"
    res = pipeline.run_dicom(sorted(folder.glob("*.dcm")), tmp_path)
    _check_done(res, "axial")
    back, manual = _cord_from_seg(res.outputs[0], folder)
    dice = _dice(back, manual)
    assert dice >= 0.90, f"cord Dice {dice:.3f} < 0.90"


def test_sagittal_t2w_segmented(pipeline: Pipeline, tmp_path: Path) -> None:
    folder = SERIES / "pam50_sag_T2w"
    res = pipeline.run_dicom(sorted(folder.glob("*.dcm")), tmp_path)
    _check_done(res, "sagittal")
    back, manual = _cord_from_seg(res.outputs[0], folder)
    assert _dice(back, manual) >= 0.70


def test_brain_routed_out_with_reason(pipeline: Pipeline, tmp_path: Path) -> None:
    res = pipeline.run_dicom(sorted((SERIES / "brain_axial_T1w").glob("*.dcm")), tmp_path)
    assert res.status == "routed-out"
    assert res.outputs == () and not (tmp_path / "seg.dcm").exists()
    assert res.routing["anatomy"]["label"] != "spine" or res.routing["anatomy"]["label"] is None
    assert "spine" in res.reason or "abstained" in res.reason
    assert res.routing["rule"].startswith(("route-out", "abstain"))
    assert "sequence" not in res.routing  # the hierarchy stopped at anatomy
