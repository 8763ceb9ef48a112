"""The cord-contrast check: CSF/cord contrast around the cord (sci_node.routing.contrast_rules), the routing
correction it makes (sci_node.routing.recheck_sequence), and the pipeline on a real T1w crop."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sci_node.config import RoutingRules
from sci_node.models.registry import ModelRegistry
from sci_node.pipeline import Pipeline
from sci_node.routing import contrast_rules as cr
from sci_node.routing import recheck_sequence, route

REPO = Path(__file__).resolve().parent.parent
SEG = REPO / "tests" / "data" / "seg"


def _cylinder(csf: float, cord: float = 100.0, spacing: tuple[float, float, float] = (1.0, 0.5, 0.5)
              ) -> tuple[np.ndarray, np.ndarray]:
    """A (20, 60, 60) cord of radius 4 mm in a CSF tube of radius 8 mm, tissue (50) outside; (image, mask)."""
    _, y, x = np.mgrid[0:20, 0:60, 0:60].astype(float)
    r = np.hypot((y - 30) * spacing[1], (x - 30) * spacing[2])
    image = np.where(r <= 4, cord, np.where(r <= 8, csf, 50.0))
    return image, (r <= 4).astype(np.uint8)


@pytest.mark.parametrize("csf, label", [(300.0, "T2w"), (40.0, "T1w"), (150.0, None)])
def test_contrast_orders_the_weightings(csf: float, label: str | None) -> None:
    image, mask = _cylinder(csf)
    c = cr.cord_contrast(image, mask, (1.0, 0.5, 0.5))
    assert c is not None and c.csf_to_cord == pytest.approx(csf / 100.0)
    assert c.cord_voxels == int(mask.sum()) and c.ring_voxels > 0
    assert cr.sequence_from_contrast(c).label == label


def test_ring_is_measured_in_mm_not_voxels() -> None:
    # 1 mm pixels: a 4 mm ring reaches 4 voxels out, past the 3 mm CSF sleeve into dark tissue,
    # yet the 90th percentile still reads the CSF
    _, y, x = np.mgrid[0:10, 0:40, 0:40].astype(float)
    r = np.hypot(y - 20, x - 20)
    image = np.where(r <= 3, 100.0, np.where(r <= 6, 320.0, 10.0))
    c = cr.cord_contrast(image, (r <= 3).astype(np.uint8), (3.0, 1.0, 1.0))
    assert c is not None and c.csf_to_cord == pytest.approx(3.2)


def test_nothing_to_measure_gives_no_class() -> None:
    image, mask = _cylinder(300.0)
    assert cr.cord_contrast(image, np.zeros_like(mask), (1.0, 0.5, 0.5)) is None
    assert cr.cord_contrast(np.zeros_like(image), mask, (1.0, 0.5, 0.5)) is None  # cord median 0
    rule = cr.sequence_from_contrast(None)
    assert rule.label is None and rule.rule == "unmeasured"
    with pytest.raises(ValueError, match=r"\(20, 60, 60\) differs"):
        cr.cord_contrast(image, mask[:, :30], (1.0, 0.5, 0.5))


@pytest.mark.parametrize("name, label", [("sub-unf01_T1w_crop", "T1w"), ("sub-unf01_T2w_crop", "T2w"),
                                         ("sub-PAM50small_T2w_crop", "T2w"), ("sub-05_acq-MTon_MTS_crop", None)])
def test_real_crops_with_their_reference_masks(name: str, label: str | None) -> None:
    image = sitk.ReadImage(str(SEG / f"{name}.nii.gz"))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / f"{name}_seg-manual.nii.gz")))
    c = cr.cord_contrast(sitk.GetArrayFromImage(image), mask, image.GetSpacing()[::-1])
    assert c is not None
    assert cr.sequence_from_contrast(c).label == label, c


SPINE = {"spine": 0.9, "brain": 0.05, "abdomen": 0.03, "other": 0.02}
SAG = {"sagittal": 0.8, "axial": 0.1, "coronal": 0.1}


def _decision(sequence: dict[str, float], rules: RoutingRules = RoutingRules()):
    table = {"anatomy": {"anatomy": SPINE},
             "region_view": {"region": {"cervical": 0.9, "thoracic": 0.05, "lumbar": 0.05}, "view": SAG},
             "sequence": {"sequence": sequence}}
    return route(table.__getitem__, rules)


T1_RULE = cr.sequence_from_contrast(cr.CordContrast(0.5, 500, 900))
T2_RULE = cr.sequence_from_contrast(cr.CordContrast(3.5, 500, 900))
NO_RULE = cr.sequence_from_contrast(cr.CordContrast(1.6, 500, 900))


def test_recheck_makes_a_network_t2starw_with_dark_csf_t1w_without_lesions() -> None:
    d = _decision({"T1w": 0.3, "T2w": 0.08, "T2starw": 0.59, "other": 0.03})
    assert d.segment_lesions
    out = recheck_sequence(d, T1_RULE, RoutingRules(), header_decided=False)
    seq = out.heads["sequence"]
    assert out.segment_cord and not out.segment_lesions and out.reason is None
    assert seq.label == "T1w" and seq.probability == pytest.approx(0.3) and seq.probs == d.heads["sequence"].probs
    assert "cord-contrast-v1 csf-dark" in seq.decided_by and "the network said T2starw p=0.59" in seq.decided_by
    assert out.rule.startswith("segment cord: ") and "sequence=T1w" in out.rule
    assert out.heads["anatomy"] == d.heads["anatomy"]


def test_recheck_relabels_t2w_and_never_adds_lesions() -> None:
    t2s = _decision({"T1w": 0.05, "T2w": 0.3, "T2starw": 0.6, "other": 0.05})
    out = recheck_sequence(t2s, T2_RULE, RoutingRules(), header_decided=False)
    assert out.heads["sequence"].label == "T2w" and out.segment_lesions
    # an unsure head decided for the cord alone (no lesions) stays without lesions
    unsure = _decision({"T1w": 0.25, "T2w": 0.2, "T2starw": 0.31, "other": 0.24})
    assert unsure.segment_cord and not unsure.segment_lesions
    out = recheck_sequence(unsure, T2_RULE, RoutingRules(), header_decided=False)
    assert out.heads["sequence"].label == "T2w" and not out.segment_lesions
    assert "the network said T2starw (network, cord by action" in out.heads["sequence"].decided_by


@pytest.mark.parametrize("case", ["header", "off", "agrees", "between", "routed-out"])
def test_recheck_leaves_the_decision_alone(case: str) -> None:
    t2s = {"T1w": 0.3, "T2w": 0.08, "T2starw": 0.59, "other": 0.03}
    d = _decision({"T1w": 0.95, "T2w": 0.02, "T2starw": 0.02, "other": 0.01} if case == "agrees" else t2s)
    rule, rules, header = T1_RULE, RoutingRules(), False
    if case == "header":
        header = True
    elif case == "off":
        rules = RoutingRules(sequence_contrast_check=False)
    elif case == "between":
        rule = NO_RULE
    elif case == "routed-out":
        d = _decision({"T1w": 0.02, "T2w": 0.02, "T2starw": 0.02, "other": 0.94})
    assert recheck_sequence(d, rule, rules, header_decided=header) is d


@pytest.fixture(scope="module")
def models():
    import structlog
    import torch

    structlog.reset_defaults()
    torch.set_num_threads(2)
    return ModelRegistry(REPO / "models").load_active("cpu")


@pytest.fixture(scope="module")
def models_seq030():
    """The active models with sequence 0.3.0 (registered; active until 2026-12-06), a single network that
    calls the T1w crop below T2*w at p 0.59, confident enough to run the lesion model."""
    reg = ModelRegistry(REPO / "models")
    return reg.load_versions({**reg.active(), "sequence": "0.3.0"}, "cpu")


def test_pipeline_keeps_the_lesion_model_off_a_t1w_the_network_calls_t2starw(models_seq030, tmp_path: Path) -> None:
    # a real T1w crop (sub-unf01, no sidecar)
    t1w = SEG / "sub-unf01_T1w_crop.nii.gz"
    off = Pipeline(models_seq030, RoutingRules(sequence_contrast_check=False), "cpu").run_nifti(t1w, tmp_path / "off")
    assert off.status == "done" and off.routing["sequence"]["label"] == "T2starw" and off.routing["segment_lesions"]
    assert "csf_to_cord" not in off.summary
    on = Pipeline(models_seq030, RoutingRules(), "cpu").run_nifti(t1w, tmp_path / "on")
    assert on.status == "done" and on.routing["sequence"]["label"] == "T1w"
    assert not on.routing["segment_lesions"] and on.summary["lesion_count"] is None  # not assessed
    assert on.notes == ("lesions not assessed: T1w",)
    assert on.summary["csf_to_cord"] <= cr.T1_MAX
    assert "cord-contrast-v1" in on.routing["sequence"]["decided_by"] and "sequence=T1w" in on.routing["rule"]
    assert not (tmp_path / "on" / "lesion.nii.gz").exists()
    # the same cord either way: the check changes what runs after the cord, not the cord
    cord_on = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "on" / "cord.nii.gz")))
    cord_off = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "off" / "cord.nii.gz")))
    assert cord_on.any() and np.array_equal(cord_on, cord_off)


def test_pipeline_with_the_active_models_calls_the_t1w_crop_t1w(models, tmp_path: Path) -> None:
    result = Pipeline(models, RoutingRules(), "cpu").run_nifti(SEG / "sub-unf01_T1w_crop.nii.gz", tmp_path)
    assert result.status == "done" and result.routing["sequence"]["label"] == "T1w"
    assert not result.routing["segment_lesions"] and result.summary["lesion_count"] is None


def test_pipeline_header_rule_is_not_overruled(models, tmp_path: Path) -> None:
    # the committed axial T2w DICOM series: its header (SE, TE 120, TR 1500) decides T2w by rule
    series = sorted((REPO / "tests" / "data" / "series" / "unf01_axial_T2w").glob("*.dcm"))
    result = Pipeline(models, RoutingRules(), "cpu").run_dicom(series, tmp_path)
    assert result.status == "done" and result.routing["sequence"]["label"] == "T2w"
    assert "cord-contrast" not in (result.routing["sequence"].get("decided_by") or "")
    assert "csf_to_cord" not in result.summary  # not measured: a header rule decided


def test_route_command_says_the_check_may_still_correct_a_network_sequence(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from sci_node.cli import main

    (tmp_path / "t1w.nii.gz").write_bytes((SEG / "sub-unf01_T1w_crop.nii.gz").read_bytes())
    assert main(["route", str(tmp_path), "--json", "--log-level", "ERROR"]) == 0
    rep = json.loads(capsys.readouterr().out)["series"][0]
    assert rep["status"] == "routed-in" and "cord-contrast check may still correct it" in rep["note"]
    series = sorted((REPO / "tests" / "data" / "series" / "unf01_axial_T2w").glob("*.dcm"))
    assert main(["route", str(series[0].parent), "--log-level", "ERROR"]) == 0
    text = capsys.readouterr().out
    assert "by header rule" in text and "note:" not in text  # a header rule decided: nothing left to correct
