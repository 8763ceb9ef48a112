"""Segmentation trainer: one real epoch on a tiny BIDS subset → a real artefact; bad input → DataError."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from sci_node.errors import ConfigError, DataError
from sci_node.imaging.postprocess import dilate_mm
from sci_node.models.artifact import load_network
from sci_node.models.predict_seg import Segmenter
from trainer.lesion_families import LesionSource
from trainer.lesions import LesionSpec, inject_lesions
from trainer.segment import data as tdata
from trainer.segment.evaluate import parse_setting
from trainer.segment.train import train_segmentation

SEG = Path(__file__).parent / "data" / "seg"
CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "configs"
torch.set_num_threads(1)


def _bids(root: Path, pairs: dict[str, str]) -> Path:
    """A BIDS-like dataset from the committed crops: ``{subject_contrast: crop_name}``."""
    for sub_con, crop in pairs.items():
        sub = sub_con.split("_")[0]
        (root / sub / "anat").mkdir(parents=True, exist_ok=True)
        (root / "derivatives" / "labels" / sub / "anat").mkdir(parents=True, exist_ok=True)
        shutil.copy(SEG / f"{crop}.nii.gz", root / sub / "anat" / f"{sub_con}.nii.gz")
        shutil.copy(SEG / f"{crop}_seg-manual.nii.gz",
                    root / "derivatives" / "labels" / sub / "anat" / f"{sub_con}_seg-manual.nii.gz")
    return root


def _tiny_config(model: str, tmp: Path) -> Path:
    """The shipped config with a tiny budget, no synthetic pool (no PAM50 labels on a fresh clone)."""
    text = (CONFIGS / f"{model}.toml").read_text()
    for key, val in {"pool": "0", "steps_per_epoch": "2", "batch_size": "4", "val_trials": "1",
                     "final_epochs": "1", "aug_groups": "2"}.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {val}", text)
    path = tmp / f"{model}_tiny.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("model", ["cord", "lesion"])
def test_one_epoch_writes_a_loadable_artifact(tmp_path: Path, model: str) -> None:
    data = _bids(tmp_path / "ds", {"sub-unf01_T2w": "sub-unf01_T2w_crop",
                                   "sub-05_acq-MTon_MTS": "sub-05_acq-MTon_MTS_crop"})
    out = train_segmentation(model, _tiny_config(model, tmp_path), data, tmp_path / "art", epochs=1,
                             seed=3, device="cpu", keep_folds=tmp_path / "folds")
    net, card = load_network(out)  # verifies checksum, torch.load(weights_only=True)
    assert isinstance(net, torch.nn.Module) and not net.training
    assert card["name"] == model and card["kind"] == "segmentation"
    assert card["architecture"]["class"] == "monai.networks.nets.UNet"
    snomed = {"cord": "2748008", "lesion": "52988006"}[model]
    assert card["labels"][0]["snomed"]["code"] == snomed
    folds = card["training"]["splits"]["folds"]
    assert card["metrics"]["validation"] == "subject-grouped 2-fold"  # folds = 5, capped by the 2 persons
    assert sorted(g for f in folds for g in f["held_out_groups"]) == ["sub-05", "sub-unf01"]
    fold_of = {g: f["held_out"] for f in folds for g in f["held_out_groups"]}
    for f in folds:  # never scored on a training subject
        assert all(not k.startswith(g + "_") for g in f["held_out_groups"] for k in f["train"])
    assert set(card["metrics"]["per_case"]) == {"sub-unf01_T2w", "sub-05_acq-MTon_MTS"}
    command = card["training"]["command"].split()
    assert command[:3] == ["sci-node", "train", model]
    from sci_node.cli import build_parser  # the recorded command is one the CLI takes, with this config

    args = build_parser().parse_args(command[1:])
    assert args.train_config == _tiny_config(model, tmp_path) and args.data == data and args.seed == 3
    assert len(card["data_hash"]) == 64 and card["training"]["seed"] == 3
    cal = card["metrics"]["threshold_calibration"]  # the shipped threshold comes from the folds
    assert cal["chosen"] in cal["grid"]
    thr, vol = parse_setting(cal["chosen"])
    assert card["preprocessing"]["threshold"] == thr
    if model == "lesion":  # the lesion config also calibrates the smallest lesion kept
        assert vol is not None and card["postprocessing"]["min_volume_mm3"] == vol
    for key, row in card["metrics"]["per_case"].items():  # each group scored at the others' setting
        fold = fold_of[key.split("_")[0]]
        assert (row["threshold"], row.get("min_volume_mm3")) == parse_setting(cal["chosen_per_held_out_group"][fold])
    fold_hashes = set()
    for f in folds:  # each kept fold network describes what it trained on, never its held-out subject
        _, fcard = load_network(tmp_path / "folds" / f["held_out"])
        assert fcard["training"]["splits"]["fold"]["held_out"] == f["held_out"]
        assert sorted(c["key"] for c in fcard["training"]["cases"]) == f["train"]
        fold_hashes.add(fcard["data_hash"])
    assert len(fold_hashes) == 2 and card["data_hash"] not in fold_hashes
    seg = Segmenter.from_artifact(out)
    image = sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop.nii.gz"))
    roi = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop_seg-manual.nii.gz")))
    pred = seg.predict(image, roi=roi if model == "lesion" else None)
    assert pred.dtype == np.uint8 and pred.shape == roi.shape
    if model == "lesion":
        assert not (pred & (roi == 0)).any()  # output_roi_mm = 0: lesions only inside the cord mask
        post = json.loads((out / "card.json").read_text())["postprocessing"]
        assert post["roi_dilate_mm"] == 1.0 and post["output_roi_mm"] == 0.0


def test_missing_mask_names_the_image(tmp_path: Path) -> None:
    data = _bids(tmp_path / "ds", {"sub-unf01_T2w": "sub-unf01_T2w_crop"})
    (data / "derivatives" / "labels" / "sub-unf01" / "anat" / "sub-unf01_T2w_seg-manual.nii.gz").unlink()
    with pytest.raises(DataError, match=r"sub-unf01_T2w\.nii\.gz.*has no mask"):
        tdata.discover(data, tdata.DataSpec())
    with pytest.raises(DataError, match="sub-unf01_T2w.nii.gz"):
        train_segmentation("cord", _tiny_config("cord", tmp_path), data, tmp_path / "art", 1, 0, "cpu")


def test_mask_geometry_mismatch_names_the_mask(tmp_path: Path) -> None:
    data = _bids(tmp_path / "ds", {"sub-unf01_T2w": "sub-unf01_T2w_crop"})
    mpath = data / "derivatives" / "labels" / "sub-unf01" / "anat" / "sub-unf01_T2w_seg-manual.nii.gz"
    mask = sitk.ReadImage(str(mpath))
    mask.SetOrigin(tuple(o + 0.5 for o in mask.GetOrigin()))
    sitk.WriteImage(mask, str(mpath))
    case = tdata.discover(data, tdata.DataSpec())[0]
    with pytest.raises(DataError, match=r"sub-unf01_T2w_seg-manual\.nii\.gz.*origin"):
        tdata.load_case(case)
    sitk.WriteImage(sitk.ReadImage(str(SEG / "sub-05_acq-MTon_MTS_crop_seg-manual.nii.gz")), str(mpath))
    with pytest.raises(DataError, match=r"sub-unf01_T2w_seg-manual\.nii\.gz.*size"):
        tdata.load_case(case)


def test_empty_folder_and_unknown_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*holds no labelled image"):
        tdata.discover(tmp_path / "empty", tdata.DataSpec())
    with pytest.raises(DataError, match="does not exist"):
        tdata.discover(tmp_path / "nope", tdata.DataSpec())
    with pytest.raises(ConfigError, match="nope.toml"):
        train_segmentation("cord", tmp_path / "nope.toml", tmp_path, None, 1, 0, "cpu")


def test_dicom_folder_dataset(tmp_path: Path) -> None:
    """A DICOM series folder with its NIfTI mask is a case; the mask geometry is checked."""
    image = sitk.Cast(sitk.ReadImage(str(SEG / "sub-05_acq-MTon_MTS_crop.nii.gz")), sitk.sitkInt16)
    case_dir = tmp_path / "dcm" / "case1"
    (case_dir / "dicom").mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series_uid = "1.2.826.0.1.3680043.8.498.1"
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        for tag, val in {"0008|0060": "MR", "0020|000e": series_uid, "0020|0013": str(k + 1),
                         "0020|0037": "\\".join(f"{d:.6f}" for d in direction[:3] + direction[3:6]),
                         "0020|0032": "\\".join(f"{p:.6f}" for p in image.TransformIndexToPhysicalPoint((0, 0, k))),
                         "0018|0050": f"{image.GetSpacing()[2]:.4f}"}.items():
            sl.SetMetaData(tag, val)
        writer.SetFileName(str(case_dir / "dicom" / f"im{k:03d}.dcm"))
        writer.Execute(sl)
    shutil.copy(SEG / "sub-05_acq-MTon_MTS_crop_seg-manual.nii.gz", case_dir / "seg-manual.nii.gz")
    cases = tdata.discover(tmp_path / "dcm", tdata.DataSpec())
    assert [c.subject for c in cases] == ["case1"]
    img, mask = tdata.load_case(cases[0])
    assert img.GetSize() == mask.GetSize() and sitk.GetArrayFromImage(mask).sum() == 1784
    (case_dir / "seg-manual.nii.gz").unlink()
    with pytest.raises(DataError, match="case1.*has no mask"):
        tdata.discover(tmp_path / "dcm", tdata.DataSpec())


def test_synthetic_lesions_stay_in_the_cord() -> None:
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop.nii.gz"))).astype(np.float32)
    cord = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop_seg-manual.nii.gz")))
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(5):
        out, les = inject_lesions(rng, image, cord, (1.0, 1.0, 1.0), LesionSpec(count=(1, 2), length_mm=(4, 12)))
        assert les.dtype == np.uint8 and not (les & (cord == 0)).any()
        assert np.array_equal(out[cord == 0], image[cord == 0])  # nothing changes outside the cord
        if les.any():
            found += 1
            assert out[les > 0].mean() > image[les > 0].mean()  # hyperintense
    assert found >= 4


def test_reference_contrast_is_relative_to_the_cord_whatever_the_field_of_view() -> None:
    """``contrast_mode = "reference"``: a lesion's core is ``cord p90 x (1 + c)``, so adding bright
    tissue elsewhere in the image (CSF, fat: the image p99) does not change it; with "top" it does."""
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop.nii.gz"))).astype(np.float32)
    cord = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop_seg-manual.nii.gz")))
    bright = image.copy()
    bright[cord == 0] *= 3.0  # the same cord in a brighter surrounding
    ref = float(np.percentile(image[cord > 0], 90))

    def core(img: np.ndarray, mode: str) -> float:
        spec = LesionSpec(count=(1, 1), length_mm=(12, 12), width_mm=(5, 5), contrast=(0.5, 0.5), texture=(0, 0),
                          roughness=(0, 0), reference_percentile=90.0, contrast_mode=mode)
        out, les = inject_lesions(np.random.default_rng(3), img, cord, (1.0, 1.0, 1.0), spec)
        assert les.any()
        return float(np.percentile(out[les > 0], 90))

    assert core(image, "reference") == pytest.approx(1.5 * ref, rel=0.02)
    assert core(bright, "reference") == pytest.approx(core(image, "reference"), rel=1e-6)
    assert core(bright, "top") > 1.2 * core(image, "top")
    with pytest.raises(ValueError, match="contrast_mode 'max'"):
        LesionSpec(contrast_mode="max")


def test_test_generator_defaults_to_the_training_generator() -> None:
    from trainer.lesions import lesion_spec

    train = {"contrast": [0.1, 1.5], "contrast_mode": "reference"}
    assert lesion_spec({"lesions": {"generator": train}}, "test_generator").contrast == (0.1, 1.5)
    cfg = {"lesions": {"generator": train, "test_generator": {"contrast": [0.25, 1.0]}}}
    assert lesion_spec(cfg, "test_generator") == LesionSpec(contrast=(0.25, 1.0))
    assert lesion_spec(cfg).contrast_mode == "reference"
    with pytest.raises(ConfigError, match=r"lesions.test_generator.*contrast_mode 'x'"):
        lesion_spec({"_path": "f.toml", "lesions": {"test_generator": {"contrast_mode": "x"}}}, "test_generator")


def test_lesion_training_copies_clean_and_masked() -> None:
    """``clean_fraction`` copies stay lesion-free (empty label, image untouched); ``post.mask_input_to_roi``
    zeroes the image outside the cord dilated by ``post.roi_dilate_mm``, as the node does at inference."""
    from trainer.segment.train import Vol, with_lesions

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop.nii.gz"))).astype(np.float32)
    cord = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop_seg-manual.nii.gz"))).astype(np.uint8)
    vol = Vol("k", "g", image, cord, (1.0, 1.0, 1.0), cord=cord)
    source = LesionSource.ellipsoid(LesionSpec(count=(1, 2), length_mm=(4, 12)))
    clean = with_lesions([vol] * 4, np.random.default_rng(1), source, clean_fraction=1.0)
    assert all(not v.label.any() and np.array_equal(v.image, image) for v in clean)
    sick = with_lesions([vol] * 4, np.random.default_rng(1), source, clean_fraction=0.0)
    assert sum(v.label.any() for v in sick) >= 3
    masked = with_lesions([vol], np.random.default_rng(1), source,
                          post={"mask_input_to_roi": True, "roi_dilate_mm": 1.0})[0]
    near = dilate_mm(cord, (1.0, 1.0, 1.0), 1.0) > 0
    assert not masked.image[~near].any() and masked.image[near].any()
    # roi_normalise = "median": training divides by the ROI's median, exactly as inference does
    post = {"mask_input_to_roi": True, "roi_dilate_mm": 1.0, "roi_normalise": "median"}
    normed = with_lesions([vol], np.random.default_rng(1), source, post=post)[0]
    assert np.median(normed.image[near]) == pytest.approx(1.0)
    assert np.allclose(normed.image, np.clip(masked.image / np.median(masked.image[near]), 0, 4))


def test_roi_input_is_the_cords_own_scale() -> None:
    """The lesion model's input (``predict_seg.roi_input``) does not depend on how bright this
    cord is overall: scaling the image leaves it unchanged (below the clip)."""
    from sci_node.models.predict_seg import roi_input

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop.nii.gz"))).astype(np.float32)
    cord = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop_seg-manual.nii.gz"))).astype(np.uint8)
    roi = dilate_mm(cord, (1.0, 1.0, 1.0), 1.0)
    post = {"mask_input_to_roi": True, "roi_normalise": "median", "roi_clip_max": 100.0}
    a = roi_input(image / image.max(), roi, post)
    assert np.allclose(a, roi_input(3.7 * image / image.max(), roi, post), atol=1e-5)
    assert np.median(a[roi > 0]) == pytest.approx(1.0) and not a[roi == 0].any()
    assert np.array_equal(roi_input(image, roi, {}), image)  # no ROI settings: the input is untouched
    assert np.array_equal(roi_input(image, roi, {"mask_input_to_roi": True}), image * (roi > 0))


def test_thickness_channel_reaches_the_network_in_training_and_inference() -> None:
    """``preprocessing.thickness_channel``: one more input channel holding slice spacing / 5 mm,
    appended after augmentation in training and by ``infer_volume`` at inference; a card whose
    network does not take that many channels is refused."""
    from sci_node.errors import ModelError
    from sci_node.imaging.preprocess import PrepSpec, thickness_value
    from sci_node.models.predict_seg import infer_volume
    from trainer.segment.loop import SliceSampler, augmentation
    from trainer.segment.train import Vol

    spec = PrepSpec(patch_yx=(32, 32), thickness_channel=True)
    assert spec.in_channels == 2 and PrepSpec.from_card(spec.to_card()) == spec
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop.nii.gz"))).astype(np.float32)
    cord = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop_seg-manual.nii.gz"))).astype(np.uint8)
    vols = [Vol("thin", "g", image / image.max(), cord, (1.0, 1.0, 1.0)),
            Vol("thick", "g", image / image.max(), cord, (5.0, 1.0, 1.0))]
    cfg = {"augment": {"bias_p": 1.0, "gamma_p": 1.0, "noise_p": 1.0, "curve_p": 1.0}}  # intensity transforms on
    x, y = SliceSampler(vols, spec, np.random.default_rng(0), 0.5, 0.0).batch(8, 2, augmentation(cfg, 0))
    assert x.shape == (8, 2, 32, 32) and y.shape == (8, 1, 32, 32)
    per_sample = x[:, 1].reshape(8, -1)
    assert (per_sample.max(1).values == per_sample.min(1).values).all()  # constant, untouched by augmentation
    assert all(np.isclose(v, [thickness_value(1.0), thickness_value(5.0)]).any() for v in per_sample[:, 0].numpy())
    # inference: a 1x1 convolution that reads the second channel only returns sigmoid(thickness)
    net = torch.nn.Conv2d(2, 1, 1)
    with torch.no_grad():
        net.weight[:] = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
        net.bias.zero_()
    prob = infer_volume(net, image[:3] / image.max(), spec, z_spacing=5.0)
    assert np.allclose(prob, 1 / (1 + np.exp(-thickness_value(5.0))), atol=1e-5)
    card = {"name": "lesion", "version": "x", "preprocessing": spec.to_card(),
            "architecture": {"args": {"in_channels": 1}}}
    with pytest.raises(ModelError, match="takes 1 input channels"):
        Segmenter(net, card)


def test_flip_x_tta_averages_the_slice_and_its_left_right_mirror() -> None:
    """``preprocessing.flip_x_tta``: the shipped cord network's probabilities become exactly
    mirror-equivariant (mean of the logits of a slice and of its X mirror); without it they are
    not. The setting survives the card round trip and is honoured by a :class:`Segmenter`."""
    from sci_node.imaging.preprocess import PrepSpec
    from sci_node.models.predict_seg import infer_volume

    net, card = load_network(Path(__file__).parents[1] / "models" / "cord" / "0.2.0")
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop.nii.gz"))).astype(np.float32)
    a = np.ascontiguousarray(image[4:7, :64, :64] / np.percentile(image, 99.5))  # one 64x64 window
    plain, tta = PrepSpec(patch_yx=(64, 64)), PrepSpec(patch_yx=(64, 64), flip_x_tta=True)
    mirrored = np.ascontiguousarray(a[..., ::-1])
    p_tta = infer_volume(net, a, tta)
    assert np.allclose(infer_volume(net, mirrored, tta)[..., ::-1], p_tta, atol=1e-5)
    p_plain = infer_volume(net, a, plain)
    assert np.abs(infer_volume(net, mirrored, plain)[..., ::-1] - p_plain).max() > 1e-3
    assert (p_plain > 0.5).any() and np.abs(p_tta - p_plain).max() > 1e-3
    assert PrepSpec.from_card(tta.to_card()) == tta and PrepSpec.from_card(plain.to_card()) == plain
    card = dict(card, preprocessing=dict(card["preprocessing"], flip_x_tta=True))
    assert Segmenter(net, card).spec.flip_x_tta and not Segmenter(net, dict(card, preprocessing={
        k: v for k, v in card["preprocessing"].items() if k != "flip_x_tta"})).spec.flip_x_tta


def test_windows_without_a_kept_voxel_are_skipped_and_the_kept_voxels_are_unchanged() -> None:
    """``infer_volume(..., keep=mask)`` (the lesion model inside the dilated cord): windows that
    hold no kept voxel are not run, and every kept voxel gets exactly the probability of the
    full run (to float rounding), with and without the flip TTA. The shipped lesion network on a real crop."""
    import torch

    from sci_node.imaging.preprocess import PrepSpec
    from sci_node.models.predict_seg import infer_volume

    net, _ = load_network(Path(__file__).parents[1] / "models" / "lesion" / "0.4.2")
    seen: list[int] = []

    class Counting(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return net(x)

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop.nii.gz"))).astype(np.float32)
    a = np.ascontiguousarray(image[4:8, :96, :96] / np.percentile(image, 99.5))  # 4 slices of 4 x 4 windows
    keep = np.zeros(a.shape, np.uint8)
    keep[:, 10:22, 60:75] = 1  # a cord-sized ROI in one corner of the grid
    for spec in (PrepSpec(patch_yx=(32, 32)), PrepSpec(patch_yx=(32, 32), flip_x_tta=True)):
        seen.clear()
        full = infer_volume(Counting(), a, spec)
        n_full = sum(seen)
        seen.clear()
        part = infer_volume(Counting(), a, spec, keep=keep)
        assert np.allclose(part[keep > 0], full[keep > 0], rtol=1e-5, atol=1e-7)  # batch size: float rounding
        assert 0 < sum(seen) <= n_full // 2
        assert float(part[keep == 0].min()) < 1e-6  # skipped windows: about 0, not 0.5


def test_cord_free_canal_volumes_stay_in_every_fold_and_are_drawn_at_their_share() -> None:
    """``[synth] canal_pool``: synthetic thecal sacs below the conus with an empty cord label,
    made without the PAM50 template, so they stay in the fold that holds the template image out
    (the PAM50-derived volumes leave it); the sampler draws them at ``canal_fraction``."""
    from sci_node.imaging.preprocess import PrepSpec
    from trainer.segment.loop import SliceSampler
    from trainer.segment.synth import synth_canal_volume
    from trainer.segment.train import Vol, _fold_vols, synth_pool

    img, mask, (sz, sy, sx) = synth_canal_volume(np.random.default_rng(3))
    assert img.shape[1:] == (112, 112) and img.shape == mask.shape and not mask.any()
    assert np.isfinite(img).all() and img.std() > 0.05 and 0.8 <= sz <= 6.0 and (sy, sx) == (0.8, 0.8)
    spec = PrepSpec(patch_yx=(64, 64))
    cfg = {"synth": {"pool": 0, "canal_pool": 2, "exclude_when_validating": ["sub-PAM50small"]}}
    canal = synth_pool(cfg, spec, np.random.default_rng(0), "cord", 8)
    assert [v.group for v in canal] == ["synthetic-canal"] * 2 and all(v.synthetic and not v.label.any() for v in canal)
    assert synth_pool(cfg, spec, np.random.default_rng(0), "lesion", 8) == []
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop.nii.gz"))).astype(np.float32)
    cord = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop_seg-manual.nii.gz"))).astype(np.uint8)
    real = [Vol("a", "sub-unf01", image / image.max(), cord, (1.0, 1.0, 1.0)),
            Vol("b", "sub-PAM50small", image / image.max(), cord, (1.0, 1.0, 1.0))]
    pam = [Vol("synth-0", "synthetic", image / image.max(), cord, (1.0, 1.0, 1.0), synthetic=True)]
    held_template = _fold_vols(real, pam + canal, ["sub-PAM50small"], cfg)
    assert [v.key for v in held_template] == ["a", "canal-0", "canal-1"]
    assert [v.key for v in _fold_vols(real, pam + canal, ["sub-unf01"], cfg)] == ["b", "synth-0", "canal-0", "canal-1"]
    sampler = SliceSampler(real + pam + canal, spec, np.random.default_rng(1), 0.6, 0.5, canal_fraction=0.25)
    picks = [sampler._pick().group for _ in range(4000)]
    assert 0.22 < picks.count("synthetic-canal") / 4000 < 0.28
    assert 0.33 < picks.count("synthetic") / 4000 < 0.42  # half of the rest
    default = SliceSampler(real + canal, spec, np.random.default_rng(1), 0.6, 0.5)  # canal_fraction 0: never
    assert all(default._pick().group != "synthetic-canal" for _ in range(200))


def test_below_end_negatives_lie_in_the_canal_below_a_cord_end_in_view_only() -> None:
    """``[train] below_end_negatives_mm``: patch centres below a cord label that ends in view, near its axis;
    none for a label that reaches the grid's inferior edge (a crop), for axial slabs, or when off."""
    from trainer.segment.train import below_end_negatives

    lab = np.zeros((100, 40, 40), np.uint8)
    lab[30:, 18:22, 10:14] = 1  # 1 mm slices: the cord ends 30 mm above the bottom, centred at (19.5, 11.5)
    hn = below_end_negatives(lab, (1.0, 0.8, 0.8), 20.0, radius_mm=4.0)
    assert hn is not None and hn[:, 0].min() == 10 and hn[:, 0].max() == 29  # the 20 mm below the end
    assert np.all(np.hypot((hn[:, 1] - 19.5) * 0.8, (hn[:, 2] - 11.5) * 0.8) <= 4.0) and not lab[tuple(hn.T)].any()
    assert below_end_negatives(lab[25:], (1.0, 0.8, 0.8), 20.0) is None  # ends 5 mm above the edge: not in view
    assert below_end_negatives(lab, (5.0, 0.8, 0.8), 20.0) is None  # axial slabs
    assert below_end_negatives(lab, (1.0, 0.8, 0.8), 0.0) is None  # off


def test_positive_patches_per_lesion_and_anywhere_in_the_window() -> None:
    """``pos_by_component``: a 1-voxel lesion is drawn as often as a 343-voxel one (not 1 in 344);
    ``pos_jitter = 0.45`` puts the lesion anywhere in the patch (0.25: only the middle half);
    a jitter beyond half the patch is refused."""
    from sci_node.imaging.preprocess import PrepSpec
    from trainer.segment.loop import SliceSampler
    from trainer.segment.train import Vol

    lab = np.zeros((12, 64, 64), np.uint8)
    lab[2:9, 20:27, 20:27] = 1  # 343 voxels
    lab[10, 50, 50] = 1  # 1 voxel
    vols = [Vol("v", "g", np.ones(lab.shape, np.float32), lab, (1.0, 1.0, 1.0))]
    spec = PrepSpec(patch_yx=(32, 32))

    def small_share(sampler: SliceSampler) -> float:
        return float(np.mean([sampler.sample()["lab"].sum() == 1 for _ in range(600)]))

    assert 0.4 < small_share(SliceSampler(vols, spec, np.random.default_rng(0), 1.0, 0.0, pos_by_component=True)) < 0.6
    assert small_share(SliceSampler(vols, spec, np.random.default_rng(0), 1.0, 0.0)) < 0.03

    def offsets(jitter: float) -> np.ndarray:
        s = SliceSampler(vols, spec, np.random.default_rng(1), 1.0, 0.0, pos_jitter=jitter, pos_by_component=True)
        out = []
        for _ in range(800):
            p = s.sample()["lab"][0]
            if p.sum() == 1:  # the 1-voxel lesion: where it sits in the patch
                out.append(np.argwhere(p)[0] - 16)
        return np.abs(np.array(out))

    assert offsets(0.25).max() <= 8
    assert offsets(0.45).max() >= 13
    with pytest.raises(ConfigError, match="pos_jitter = 0.6"):
        SliceSampler(vols, spec, np.random.default_rng(0), 1.0, 0.0, pos_jitter=0.6)


def test_seed_ensemble_averages_its_members_logits_and_refuses_strangers(tmp_path: Path) -> None:
    from sci_node.errors import ModelError
    from sci_node.models.artifact import read_card, write_artifact
    from trainer.segment.ensemble import main as ensemble_main

    base = Path(__file__).resolve().parents[1] / "models" / "lesion" / "0.8.1"
    net_a, card = load_network(base)
    torch.manual_seed(0)
    other = {k: (v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v)
             for k, v in net_a.state_dict().items()}  # a second member: same architecture, other weights
    member_b = write_artifact(tmp_path / "b", other, {**card, "version": "9.0.0"})
    out = tmp_path / "ens"
    assert ensemble_main(["--artifact", str(base), "--artifact", str(member_b), "--out", str(out),
                          "--version", "9.1.0"]) == 0
    ens, ecard = load_network(out)  # checksum verified, weights_only=True
    assert ecard["architecture"]["class"] == "sci_node.nets.LogitMeanEnsemble"
    assert [m["from"] for m in ecard["training"]["ensemble"]["members"]] == ["lesion 0.8.1", "lesion 9.0.0"]
    assert ecard["data_hash"] == card["data_hash"] and ecard["training"]["seed"] == card["training"]["seed"]
    net_b, _ = load_network(member_b)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ens(x), 0.5 * (net_a(x) + net_b(x)), atol=1e-5)
    seg = Segmenter.from_artifact(out)  # the node serves it as any other artefact
    image = sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop.nii.gz"))
    roi = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop_seg-manual.nii.gz")))
    pred = seg.predict(image, roi=roi)
    assert pred.shape == roi.shape and not (pred & (roi == 0)).any()

    stranger = write_artifact(tmp_path / "c", other, {**card, "version": "9.0.1", "data_hash": "0" * 64})
    with pytest.raises(DataError, match="differs from .* in 'data_hash'"):
        ensemble_main(["--artifact", str(base), "--artifact", str(stranger), "--out", str(tmp_path / "x"),
                       "--version", "9.2.0"])
    bad = read_card(out)
    bad["architecture"]["args"]["member_class"] = "os.system"  # no arbitrary imports through a member
    (out / "card.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="member class 'os.system' is not allowed"):
        load_network(out)


def test_a_run_without_folds_does_not_claim_a_validation(tmp_path: Path) -> None:
    data = _bids(tmp_path / "ds", {"sub-unf01_T2w": "sub-unf01_T2w_crop",
                                   "sub-05_acq-MTon_MTS": "sub-05_acq-MTon_MTS_crop"})
    config = _tiny_config("lesion", tmp_path)
    config.write_text(re.sub(r"(?m)^loso = .*$", "loso = false", config.read_text()))
    out = train_segmentation("lesion", config, data, tmp_path / "art", epochs=1, seed=0, device="cpu")
    card = json.loads((out / "card.json").read_text())
    assert card["metrics"]["validation"].startswith("none: no folds ran") and card["metrics"]["per_case"] == {}
    assert card["training"]["splits"]["folds"] == []


def test_ensemble_cascade_keeps_the_exact_mean_where_the_first_member_is_unsure() -> None:
    """``ensemble_cascade_below``: the members after the first run only on the windows over voxels the
    first member gives more than the cut; there the probability is the exact ensemble mean, elsewhere
    the first member's. Real weights (lesion 0.12.0, three seeds), a real crop with a bright lesion,
    through the node's own ``Segmenter`` (the cut read from the card)."""
    import dataclasses

    from sci_node.imaging import preprocess

    seg = Segmenter.from_artifact(Path(__file__).resolve().parents[1] / "models" / "lesion" / "0.12.0")
    image = sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop.nii.gz"))
    cord = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop_seg-manual.nii.gz")))
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    zc = int(np.nonzero(cord.any(axis=(1, 2)))[0].mean())
    arr[zc - 2:zc + 3][cord[zc - 2:zc + 3] > 0] *= 2.5  # an obvious hyperintense lesion
    bright = sitk.GetImageFromArray(arr)
    bright.CopyInformation(image)
    prepared = preprocess.prepare(bright, seg.spec)
    cut = 0.02
    spec = dataclasses.replace(seg.spec, ensemble_cascade_below=cut)
    assert preprocess.PrepSpec.from_card(spec.to_card()) == spec  # round-trips through a card
    cascade = Segmenter(seg.net, {**seg.card, "preprocessing": spec.to_card()})
    first = Segmenter(seg.net.first_and_rest()[0], seg.card)
    full = seg.predict_prob_model_grid(prepared, cord)
    alone = first.predict_prob_model_grid(prepared, cord)
    casc = cascade.predict_prob_model_grid(prepared, cord)
    inside = seg._roi_box(prepared, cord)[0] > 0  # the dilated cord: the voxels the lesion model keeps
    unsure = inside & (alone > cut)
    assert unsure.any() and (inside & ~unsure).any() and (full[inside] >= 0.7).any()
    np.testing.assert_allclose(casc[unsure], full[unsure], atol=1e-5)  # the exact mean where it is run
    np.testing.assert_allclose(casc[inside & ~unsure], alone[inside & ~unsure], atol=1e-6)
    assert np.array_equal(casc[inside] >= 0.7, full[inside] >= 0.7)  # the lesion core is the ensemble's
    with pytest.raises(ValueError, match="ensemble_cascade_below must lie in"):
        dataclasses.replace(seg.spec, ensemble_cascade_below=1.5)
