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
from sci_node.errors import InvalidDatasetError
from sci_node.models.predict_cls import Classifier
from sci_node.models.registry import ModelRegistry
from sci_node.routing.cls_features import N_FEATURES, series_inputs, view_of_image
from sci_node.routing.evidence import HeaderEvidence

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
    return {n: Classifier.from_artifact(reg.path_of(n, reg.active()[n]))
            for n in ("anatomy", "region_view", "sequence")}


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

#: The tiny training configs' [train], [validation] and the two spine fixtures as sources.
TINY_TRAIN_AND_SPINE_SOURCES = """[train]
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
"""


#: A tiny sequence training config (header expert and physics rules, as the shipped recipe).
TINY_SEQUENCE = """
[model]
name = "sequence"
version = "9.9.8-test"
[data]
n_aug = 1
n_pam50 = 0
n_phantom = 2
n_scenes = { spine = 3, brain = 1 }
[network]
args = { channels = [4, 8, 8], hidden = 16, dropout = 0.1 }
header_expert = true
header_rules = true
""" + TINY_TRAIN_AND_SPINE_SOURCES

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
""" + TINY_TRAIN_AND_SPINE_SOURCES + """[[sources]]
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
    from trainer.classify.data import stored_grid_evidence

    sagittal = HeaderEvidence.from_bids_sidecar({"EchoTime": 0.12, "RepetitionTime": 1.5,
                                                 "ImageOrientationPatientDICOM": [0, 1, 0, 0, 0, -1]})
    assert sagittal.view == "sagittal" and view_of_image(cases["ax"]) == "axial"
    fixed = stored_grid_evidence(sagittal, cases["ax"])
    assert fixed is not None and fixed.slice_normal is None and fixed.echo_time_ms == pytest.approx(120.0)
    assert stored_grid_evidence(sagittal, cases["sag"]) is sagittal
    assert stored_grid_evidence(None, cases["ax"]) is None


# -- header rules in the shipped sequence model, `sci-node route`, the scoring command, k-fold --------------

T1_SE = HeaderEvidence(echo_time_ms=10.0, repetition_time_ms=600.0, flip_angle_deg=90.0, scanning_sequence=("SE",),
                       sequence_variant=("SK", "SP"), mr_acquisition_type="2D")


def test_shipped_sequence_takes_a_complete_header_from_the_physics_rules(shipped: dict[str, Classifier],
                                                                        cases: dict[str, sitk.Image]) -> None:
    """Issue 14: a sagittal T1w spin echo (TR 600, TE 10) was called T2w (p=0.84) by the image network."""
    seq = shipped["sequence"]
    assert seq.rules_head == "sequence" and 0.9 < seq.rules_confidence < 1.0
    probs, how = seq.predict_explained(cases["sag"], T1_SE)
    assert _top(probs["sequence"]) == "T1w" and probs["sequence"]["T1w"] == pytest.approx(seq.rules_confidence)
    assert how["sequence"].startswith("header rule spin-echo")
    probs, how = seq.predict_explained(cases["sag"], None)  # no header: the image network decides
    assert how["sequence"].startswith("network") and _top(probs["sequence"]) == "T2w"
    assert seq.predict(cases["sag"], T1_SE) == seq.predict_explained(cases["sag"], T1_SE)[0]


def test_route_command_reports_every_level_without_segmenting(capsys: pytest.CaptureFixture[str]) -> None:
    series = REPO / "tests" / "data" / "series"
    rc = main(["route", str(series), "--json", "--log-level", "ERROR"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    by_name = {s["name"].split("_", 1)[1].rsplit("_", 1)[0]: s for s in out["series"]}
    assert set(by_name) >= {"T1_MPRAGE_AX_brain", "T2_TSE_SAG_cervical", "T2_TSE_AX_cervical"}
    assert len(out["series"]) == len(list(series.glob("*/0001.dcm")))  # every DICOM series of the folder
    for s in out["series"]:
        assert s["status"] in ("routed-in", "routed-out") and s["rule"] and s["versions"]["anatomy"]
        for d in s["levels"].values():
            assert math.isclose(sum(d["probs"].values()), 1.0, abs_tol=1e-3) and d["decided_by"]
    brain = by_name["T1_MPRAGE_AX_brain"]
    # BodyPartExamined HEAD and SeriesDescription "T1 MPRAGE AX brain": the header veto decides, no network
    assert brain["status"] == "routed-out" and brain["rule"] == "route-out: header anatomy (body-part-v1 " \
        "head-body-part) != spine"
    assert brain["levels"]["anatomy"]["decided_by"].startswith("header rule head-body-part: BodyPartExamined 'HEAD'")
    assert "sequence" not in brain["levels"]  # the hierarchy stops at the first routing-out decision
    for name in ("T2_TSE_SAG_cervical", "T2_TSE_AX_cervical"):
        s = by_name[name]
        assert s["status"] == "routed-in" and s["rule"].startswith("segment cord+lesions")
        assert s["levels"]["sequence"]["label"] == "T2w"
        assert s["levels"]["sequence"]["decided_by"].startswith("header rule spin-echo")
    assert not list(series.rglob("seg.dcm"))
    # text form, and a file that is not a readable series: failed with the reason infer gives
    assert main(["route", str(FIX / "spine_sag_T2w_lumbar.nii.gz"), "--log-level", "ERROR"]) == 0
    text = capsys.readouterr().out
    assert "anatomy" in text and "rule: " in text and "by network" in text


def test_route_command_names_the_reason_of_an_unreadable_series(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    ds = pydicom.dcmread(_pydicom_file("MR_small.dcm"))
    del ds.PixelData  # an MR instance without pixels (e.g. a modality/object we do not read)
    ds.save_as(tmp_path / "nopixels.dcm")
    rc = main(["route", str(tmp_path), "--json", "--log-level", "ERROR"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert out["series"][0]["status"] == "failed" and "no pixel data" in out["series"][0]["reason"]


def test_score_command_accuracy_and_confusion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.studies.cls_score import bids_labels
    from trainer.studies.cls_score import main as score_main

    assert bids_labels("sub-1_acq-MTon_MTS.nii.gz") == {"sequence": "other"}
    assert bids_labels("sub-1_T2star.nii.gz") == {"sequence": "T2starw"} and bids_labels("x.nii") == {}
    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("spine_sag_T2w_lumbar.nii.gz", "spine_ax_T2w_cervical.nii.gz"):
        (folder / name.replace("T2w_", "").replace(".nii.gz", "_T2w.nii.gz")).write_bytes((FIX / name).read_bytes())
    labels = tmp_path / "labels.csv"
    labels.write_text("path,anatomy,region\nspine_sag_lumbar_T2w.nii.gz,spine,lumbar\n"
                      "spine_ax_cervical_T2w.nii.gz,spine,cervical\n")
    assert score_main([str(folder), "--labels", str(labels), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    lv = res["levels"]
    assert lv["anatomy"]["n"] == 2 and lv["sequence"]["n"] == 2 and lv["view"]["n"] == 2 and lv["region"]["n"] == 2
    assert lv["view"]["accuracy"] == 1.0 and lv["view"]["confusion"]["axial"]["axial"] == 1
    assert sum(lv["sequence"]["confusion"]["T2w"].values()) == 2
    assert score_main([str(folder), "--labels", str(labels), "--no-header"]) == 0
    md = capsys.readouterr().out
    assert "| level | series | accuracy | abstained |" in md and "**view** (rows: truth" in md
    bad = tmp_path / "bad.csv"
    bad.write_text("file,anatomy\nx,spine\n")
    assert score_main([str(folder), "--labels", str(bad)]) == 2
    assert "needs a 'path' column" in capsys.readouterr().err


def test_group_folds_keep_persons_together_and_balance() -> None:
    from trainer.classify.train import assign_folds

    sizes = {"a": 50, "b": 40, "c": 30, "d": 20, "e": 10, "f": 10}
    folds = assign_folds(list(sizes), sizes, 3)
    assert sorted(g for f in folds for g in f) == sorted(sizes)  # every group in exactly one fold
    loads = [sum(sizes[g] for g in f) for f in folds]
    assert max(loads) - min(loads) <= 20
    assert folds == assign_folds(list(reversed(sizes)), sizes, 3)  # deterministic
    assert len(assign_folds(["x", "y"], {"x": 1, "y": 1}, 5)) == 2


def test_shipped_anatomy_and_region_read_the_image_not_the_protocol(shipped: dict[str, Classifier],
                                                                   cases: dict[str, sitk.Image]) -> None:
    """0.3.0: TE/TR/sequence codes say nothing about anatomy or region; only the slice normal of the header is used."""
    for name in ("anatomy", "region_view"):
        clf = shipped[name]
        assert clf.header_features is False and clf.rules_head is None
        for case in ("sag", "ax"):
            bare, _ = clf.predict_explained(cases[case], HeaderEvidence())
            epi = HeaderEvidence(echo_time_ms=30.0, repetition_time_ms=3000.0, scanning_sequence=("EP",))
            assert clf.predict(cases[case], epi) == bare
            assert clf.predict(cases[case], T2_TSE) == bare


def test_report_tables_from_the_shipped_cards() -> None:
    """The validation tables of docs/classifiers.md come from the active cards (per-series held-out predictions)."""
    from trainer.studies.cls_report import hierarchy_table, report

    text = report(REPO / "models")
    assert "| anatomy | anatomy |" in text and "| with header: acc. (n) |" in text
    table = hierarchy_table(REPO / "models")
    rows = [r for r in table.splitlines() if r.startswith(("| with header", "| header removed"))]
    assert len(rows) == 2 and all(int(r.split("|")[2]) > 10 for r in rows)  # spine series counted in both


def test_ct_air_feature_counts_non_finite_voxels_as_not_below() -> None:
    from sci_node.routing.cls_features import FEATURE_NAMES

    arr = np.zeros((4, 5, 5), np.float32)
    arr[0, 0, :4] = [np.nan, np.inf, -np.inf, -900.0]
    arr[1] = -1000.0
    _, feats = series_inputs(sitk.GetImageFromArray(arr), None)
    assert feats[FEATURE_NAMES.index("frac_below_minus500")] == pytest.approx(26 / 100)


def test_detail_channels_see_a_small_structure_at_the_box_centre() -> None:
    """Feature version 3 adds a 64 mm detail grid about the box centre: a 10 mm bright disc in a
    200 mm field of view (a cord in an axial slab) is a few voxels of the whole-box thumbnail and a
    clear disc of the detail one; the whole-box channels stay exactly those of version 2."""
    from sci_node.routing.cls_features import n_channels

    _, yy, xx = np.mgrid[0:20, 0:200, 0:200].astype(np.float32)
    arr = np.full((20, 200, 200), 100.0, np.float32)
    arr[(yy - 99.5) ** 2 + (xx - 99.5) ** 2 <= 25.0] = 1000.0  # 1 mm pixels: radius 5 mm
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((1.0, 1.0, 5.0))
    v2, f2 = series_inputs(image, None, prep_id="cls-thumbs-v2")
    v3, f3 = series_inputs(image, None, prep_id="cls-thumbs-v3")
    assert v2.shape == (3, 32, 32) and v3.shape == (6, 32, 32) and n_channels("cls-thumbs-v3") == 6
    np.testing.assert_array_equal(v3[:3], v2)
    np.testing.assert_array_equal(f3, f2)
    bright_whole = int((v2[0] > 0.5).sum())
    bright_detail = int((v3[3] > 0.5).sum())  # 2 mm steps: a 5 mm radius is ~20 grid pixels
    assert bright_whole <= 4 and 12 <= bright_detail <= 32, (bright_whole, bright_detail)


def test_train_sequence_on_detail_features_and_predict(tmp_path: Path) -> None:
    """``[data] prep = "cls-thumbs-v3"`` trains a 6-channel network, the card names the feature
    version, and the node's Classifier computes those features when it loads the artefact."""
    cfg = tmp_path / "tiny_seq.toml"
    cfg.write_text(TINY_SEQUENCE.replace("[network]", 'prep = "cls-thumbs-v3"\n[network]', 1))
    art = tmp_path / "art"
    assert main(["train", "sequence", "--train-config", str(cfg), "--data", str(FIX), "--out", str(art),
                 "--epochs", "1", "--seed", "1", "--log-level", "WARNING"]) == 0
    card = json.loads((art / "card.json").read_text())
    assert card["preprocessing"]["id"] == "cls-thumbs-v3" and card["architecture"]["args"]["in_channels"] == 6
    clf = Classifier.from_artifact(art)
    probs = clf.predict(sitk.ReadImage(str(FIX / "spine_ax_T2w_cervical.nii.gz")), None)
    assert math.isclose(sum(probs["sequence"].values()), 1.0, abs_tol=1e-4)
    bad = tmp_path / "bad_prep.toml"
    bad.write_text(cfg.read_text().replace('prep = "cls-thumbs-v3"', 'prep = "cls-thumbs-v7"'))
    assert main(["train", "sequence", "--train-config", str(bad), "--data", str(FIX), "--out", str(tmp_path / "b"),
                 "--epochs", "1", "--log-level", "ERROR"]) != 0
