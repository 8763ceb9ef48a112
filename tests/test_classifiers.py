"""Routing classifiers: header evidence, the shipped models on real crops, one-epoch training into the registry."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from sci_node.cli import main
from sci_node.cls_features import N_FEATURES, series_inputs, view_of_image
from sci_node.errors import InvalidDatasetError
from sci_node.evidence import HeaderEvidence
from sci_node.predict_cls import Classifier
from sci_node.registry import ModelRegistry

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "data" / "cls"
torch.set_num_threads(1)


def _pydicom_file(name: str) -> Path:
    from pydicom.data import DATA_ROOT

    return Path(DATA_ROOT) / "test_files" / name  # bundled with pydicom, never downloaded


def _nibabel_file(name: str) -> Path:
    import nibabel.testing

    return Path(nibabel.testing.data_path) / name


@pytest.fixture(scope="module")
def shipped() -> dict[str, Classifier]:
    reg = ModelRegistry(REPO / "models")
    return {n: Classifier.from_artifact(reg.path_of(n, reg.active()[n])) for n in ("anatomy", "region_view", "sequence")}


@pytest.fixture(scope="module")
def cases() -> dict[str, sitk.Image]:
    return {"sag": sitk.ReadImage(str(FIX / "spine_sag_T2w_lumbar.nii.gz")),
            "ax": sitk.ReadImage(str(FIX / "spine_ax_T2w_cervical.nii.gz")),
            "brain": sitk.ReadImage(str(_nibabel_file("anatomical.nii")))}


T2_TSE = HeaderEvidence(echo_time_ms=105.0, repetition_time_ms=3500.0, flip_angle_deg=150.0,
                        scanning_sequence=("SE",), sequence_variant=("SK", "SP", "OSP"), mr_acquisition_type="2D",
                        series_description="x", body_part_examined=None)


# -- evidence --------------------------------------------------------------------------------

def test_evidence_from_dicom_and_sidecar() -> None:
    ds = pydicom.dcmread(_pydicom_file("MR_small.dcm"))
    ev = HeaderEvidence.from_dicom(ds)
    assert ev.echo_time_ms == pytest.approx(float(ds.EchoTime))
    assert ev.repetition_time_ms == pytest.approx(float(ds.RepetitionTime))
    assert ev.scanning_sequence == ("SE",)
    assert ev.view == "axial" and ev.slice_normal == pytest.approx((0.0, 0.0, 1.0))

    side = {"EchoTime": 0.12, "RepetitionTime": 1.5, "FlipAngle": 120, "ScanningSequence": "SE",
            "SequenceVariant": "SK_SP_OSP", "MRAcquisitionType": "3D",
            "ImageOrientationPatientDICOM": [0, 1, 0, 0, 0, -1]}
    ev = HeaderEvidence.from_bids_sidecar(side)
    assert ev.echo_time_ms == pytest.approx(120.0) and ev.repetition_time_ms == pytest.approx(1500.0)
    assert ev.sequence_variant == ("SK", "SP", "OSP") and ev.view == "sagittal"
    assert ev.body_part_examined is None

    from pydicom.dataelem import RawDataElement

    ds[0x00180081] = RawDataElement(pydicom.tag.Tag(0x00180081), "DS", 4, b"abc ", 0, False, True)
    with pytest.raises(InvalidDatasetError, match="EchoTime"):
        HeaderEvidence.from_dicom(ds)
    with pytest.raises(InvalidDatasetError, match="ImageOrientationPatient"):
        HeaderEvidence.from_bids_sidecar({"ImageOrientationPatientDICOM": [1, 0, 0, 1, 0]})


def test_features_ignore_free_text_and_read_geometry(cases: dict[str, sitk.Image]) -> None:
    t1, f1 = series_inputs(cases["sag"], T2_TSE)
    t2, f2 = series_inputs(cases["sag"], HeaderEvidence(**{**T2_TSE.__dict__, "series_description": "BRAIN T1",
                                                           "body_part_examined": "HEAD"}))
    assert t1.shape == (3, 32, 32) and f1.shape == (N_FEATURES,)
    np.testing.assert_array_equal(f1, f2)
    assert view_of_image(cases["sag"]) == "sagittal" and view_of_image(cases["ax"]) == "axial"


# -- shipped models on real crops --------------------------------------------------------------

def _top(probs: dict[str, float]) -> str:
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-4)
    return max(probs, key=probs.__getitem__)


@pytest.mark.parametrize("case,anatomy,view", [("sag", "spine", "sagittal"), ("ax", "spine", "axial"),
                                               ("brain", "brain", "axial")])
def test_shipped_anatomy_and_view(shipped: dict[str, Classifier], cases: dict[str, sitk.Image], case: str,
                                  anatomy: str, view: str) -> None:
    for ev in (HeaderEvidence(), T2_TSE):  # without and with header evidence
        assert _top(shipped["anatomy"].predict(cases[case], ev)["anatomy"]) == anatomy
        assert _top(shipped["region_view"].predict(cases[case], ev)["view"]) == view


def test_shipped_region_and_sequence(shipped: dict[str, Classifier], cases: dict[str, sitk.Image]) -> None:
    rv = shipped["region_view"]
    assert _top(rv.predict(cases["ax"], T2_TSE)["region"]) == "cervical"
    seq = shipped["sequence"]
    for case in ("sag", "ax"):
        out = seq.predict(cases[case], T2_TSE)["sequence"]
        assert _top(out) == "T2w"
        assert seq.decide(out).label == "T2w"


def test_shipped_on_pydicom_brain_and_abstain(shipped: dict[str, Classifier]) -> None:
    path = _pydicom_file("MR_small.dcm")
    image = sitk.ReadImage(str(path))
    ev = HeaderEvidence.from_dicom(pydicom.dcmread(path))
    probs = shipped["anatomy"].predict(image, ev)["anatomy"]
    assert probs["spine"] < 0.5  # routed out either way
    d = shipped["anatomy"].decide(probs, min_confidence=1.01)
    assert d.label is None and d.probability == pytest.approx(max(probs.values()))


# -- one epoch of real training into a real artefact, registered and activated ----------------------

def test_train_one_epoch_register_activate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("""
[model]
name = "anatomy"
version = "9.9.9-test"
[data]
n_aug = 2
n_pam50 = 0
n_phantom = 2
n_scenes = { spine = 3, brain = 3, abdomen = 2, other = 2 }
[network]
args = { channels = [4, 8, 8], hidden = 16, dropout = 0.1 }
[train]
epochs = 1
batch_size = 16
threads = 1
[validation]
loso = true
skip_groups = ["synth-scenes", "synth-phantom"]
[[sources]]
root = "data"
path = "spine_sag_T2w_lumbar.nii.gz"
group = "fx-lumbar"
anatomy = "spine"
sequence = "T2w"
region = "lumbar"
[[sources]]
root = "data"
path = "spine_ax_T2w_cervical.nii.gz"
group = "fx-ms"
anatomy = "spine"
sequence = "T2w"
region = "cervical"
[[sources]]
root = "nibabel"
path = "anatomical.nii"
group = "nib-spm"
anatomy = "brain"
sequence = "T1w"
""")
    art = tmp_path / "art"
    rc = main(["train", "anatomy", "--train-config", str(cfg), "--data", str(FIX), "--out", str(art),
               "--epochs", "1", "--seed", "3", "--log-level", "WARNING"])
    assert rc == 0
    card = json.loads((art / "card.json").read_text())
    assert card["version"] == "9.9.9-test" and card["training"]["epochs"] == 1
    assert set(card["training"]["splits"]["held_out_groups"]) == {"fx-lumbar", "fx-ms", "nib-spm"}
    assert card["metrics"]["anatomy"]["n_real"] == 9
    assert card["calibration"]["temperature"]["anatomy"] > 0

    models = tmp_path / "models"
    assert main(["models", "--models-dir", str(models), "--log-level", "ERROR", "add", str(art), "--activate"]) == 0
    assert ModelRegistry(models).active() == {"anatomy": "9.9.9-test"}
    clf = Classifier.from_artifact(models / "anatomy" / "9.9.9-test")
    probs = clf.predict(sitk.ReadImage(str(FIX / "spine_ax_T2w_cervical.nii.gz")), HeaderEvidence())
    assert set(probs["anatomy"]) == {"spine", "brain", "abdomen", "other"}


def test_train_missing_source_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("""
[model]
name = "sequence"
version = "0.0.1"
[data]
n_aug = 1
[network]
args = {}
[train]
epochs = 1
[[sources]]
root = "data"
path = "sub-x/anat/sub-x_T2w.nii.gz"
group = "x"
anatomy = "spine"
sequence = "T2w"
""")
    rc = main(["train", "sequence", "--train-config", str(cfg), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "sub-x_T2w.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    bad = tmp_path / "wrongname.toml"
    bad.write_text(cfg.read_text().replace('name = "sequence"', 'name = "anatomy"'))
    assert main(["train", "sequence", "--train-config", str(bad), "--data", str(tmp_path)]) == 2
    assert "model.name 'anatomy' is not 'sequence'" in capsys.readouterr().err


def test_non_finite_voxels_give_finite_probabilities(shipped: dict[str, Classifier]) -> None:
    arr = np.full((6, 40, 40), np.nan, np.float32)
    arr[:, 10:30, 10:30] = 100.0
    probs = shipped["anatomy"].predict(sitk.GetImageFromArray(arr), None)["anatomy"]
    assert all(math.isfinite(p) for p in probs.values())
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-4)


def test_header_slice_normal_beats_the_spacing_heuristic(shipped: dict[str, Classifier],
                                                         cases: dict[str, sitk.Image]) -> None:
    """Sagittal slices of 1 mm with 3.2 x 1.6 mm pixels: the thickest-axis heuristic alone would
    take the 3.2 mm in-plane axis for the slice axis; ImageOrientationPatient says sagittal."""
    sag = cases["sag"]
    spacing = (sag.GetSpacing()[0], 3.2, sag.GetSpacing()[2])
    size = [sag.GetSize()[0], int(sag.GetSize()[1] * sag.GetSpacing()[1] / 3.2), sag.GetSize()[2]]
    coarse = sitk.Resample(sag, size, sitk.Transform(), sitk.sitkLinear, sag.GetOrigin(), spacing,
                           sag.GetDirection(), 0.0, sitk.sitkFloat32)
    assert view_of_image(coarse) != "sagittal"  # the case the header must fix
    normal = tuple(float(v) for v in np.asarray(sag.GetDirection()).reshape(3, 3)[:, 0])
    probs = shipped["region_view"].predict(coarse, HeaderEvidence(slice_normal=normal))
    assert _top(probs["view"]) == "sagittal"


def test_single_thin_slice_of_a_large_field_of_view_keeps_its_image() -> None:
    """pydicom's abdominal MR is one 1 mm slice of a 350 mm field of view: the thumbnail grid
    steps by 11 mm, so without thickening no grid point fell inside the slice and the classifier
    saw a blank image (and a zero intensity histogram)."""
    image = sitk.ReadImage(str(_pydicom_file("examples_overlay.dcm")))
    assert image.GetSize()[2] == 1 and image.GetSpacing()[2] == pytest.approx(1.0)
    thumbs, feats = series_inputs(image, None)
    axial = thumbs[0]
    assert axial.max() > 0.5 and (axial > 0.1).mean() > 0.2
    thick = sitk.Image(image)
    thick.SetSpacing((*image.GetSpacing()[:2], 20.0))  # the same pixels as a 20 mm slab
    thick.SetOrigin(thick.TransformContinuousIndexToPhysicalPoint((0, 0, -0.5 + 0.5 / 20.0)))
    np.testing.assert_allclose(series_inputs(thick, None)[0][0], axial, atol=0.05)
    # a card trained on feature version 1 still gets exactly the features it was trained on
    assert not series_inputs(image, None, prep_id="cls-thumbs-v1")[0][0].any()
    with pytest.raises(ValueError, match="cls-thumbs-v9"):
        series_inputs(image, None, prep_id="cls-thumbs-v9")
    old = Classifier.from_artifact(REPO / "models" / "anatomy" / "0.1.0")  # rollback target, v1 features
    assert old.prep_id == "cls-thumbs-v1"
    assert math.isclose(sum(old.predict(image, None)["anatomy"].values()), 1.0, abs_tol=1e-4)


def test_a_sidecar_normal_that_contradicts_the_stored_slices_is_dropped(cases: dict[str, sitk.Image]) -> None:
    """ivadomed's sub-unf01 T1w/T2w sidecars describe a sagittal acquisition of NIfTI volumes
    stored axially: the trainer keeps the sidecar's TE/TR but not its slice normal."""
    from trainer.cls_data import stored_grid_evidence

    sagittal = HeaderEvidence.from_bids_sidecar({"EchoTime": 0.12, "RepetitionTime": 1.5,
                                                 "ImageOrientationPatientDICOM": [0, 1, 0, 0, 0, -1]})
    assert sagittal.view == "sagittal" and view_of_image(cases["ax"]) == "axial"
    fixed = stored_grid_evidence(sagittal, cases["ax"])
    assert fixed is not None and fixed.slice_normal is None and fixed.echo_time_ms == pytest.approx(120.0)
    assert stored_grid_evidence(sagittal, cases["sag"]) is sagittal
    assert stored_grid_evidence(None, cases["ax"]) is None
