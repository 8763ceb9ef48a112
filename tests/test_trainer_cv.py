"""Trainer on the grown data: subject-grouped k-fold, BIDS func/ and shared masks, partial-volume
masks, resumable training, hard negatives, false-alarm-rate calibration, coarse-to-fine inference."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from sci_node.errors import DataError
from sci_node.imaging import preprocess
from sci_node.models.predict_seg import Segmenter, coarse_to_fine, infer_volume
from trainer.lesion_families import LesionSource
from trainer.lesions import LesionSpec, inject_lookalikes
from trainer.segment import data as tdata
from trainer.segment.evaluate import calibrate
from trainer.segment.loop import train_network
from trainer.segment.train import Vol, cord_with_lesions, load_config, prep_spec

SEG = Path(__file__).parent / "data" / "seg"
CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "configs"
torch.set_num_threads(1)


def _put(root: Path, kind: str, stem: str, crop: str, mask_stem: str | None = "same") -> None:
    sub = stem.split("_")[0]
    (root / sub / kind).mkdir(parents=True, exist_ok=True)
    shutil.copy(SEG / f"{crop}.nii.gz", root / sub / kind / f"{stem}.nii.gz")
    if mask_stem is not None:
        lab = root / "derivatives" / "labels" / sub / kind
        lab.mkdir(parents=True, exist_ok=True)
        name = stem if mask_stem == "same" else mask_stem
        shutil.copy(SEG / f"{crop}_seg-manual.nii.gz", lab / f"{name}_seg-manual.nii.gz")


def test_discover_reads_func_shared_masks_patterns_and_groups(tmp_path: Path) -> None:
    ds_a, ds_b = tmp_path / "gm-challenge", tmp_path / "fmri"
    _put(ds_a, "anat", "sub-9709Ses1_run-1_T2starw", "sub-unf01_T2w_crop")
    _put(ds_a, "anat", "sub-9709Ses1_run-2_T2starw", "sub-unf01_T2w_crop", mask_stem=None)  # unlabelled repeat
    _put(ds_a, "anat", "sub-9709Ses2_run-1_T2starw", "sub-unf01_T2w_crop")
    _put(ds_b, "func", "sub-ZS001_bold", "sub-05_acq-MTon_MTS_crop")
    _put(ds_b, "anat", "sub-ZS001_acq-MTon_MTS", "sub-05_acq-MTon_MTS_crop")
    _put(ds_b, "anat", "sub-ZS001_acq-MToff_MTS", "sub-05_acq-MTon_MTS_crop", mask_stem=None)
    spec = tdata.DataSpec(unlabelled=("*_run-2_T2starw",), same_person=[["sub-9709Ses1", "sub-9709Ses2"]],
                          mask_from={"sub-ZS001_acq-MToff_MTS": "sub-ZS001_acq-MTon_MTS"})
    cases = {c.key: c for c in tdata.discover(tmp_path, spec)}
    assert set(cases) == {"sub-9709Ses1_run-1_T2starw", "sub-9709Ses2_run-1_T2starw", "sub-ZS001_bold",
                          "sub-ZS001_acq-MTon_MTS", "sub-ZS001_acq-MToff_MTS"}
    assert cases["sub-9709Ses2_run-1_T2starw"].group == "sub-9709Ses1"  # same person, one split group
    assert cases["sub-ZS001_acq-MToff_MTS"].mask == cases["sub-ZS001_acq-MTon_MTS"].mask
    assert cases["sub-ZS001_bold"].dataset == "fmri"
    with pytest.raises(DataError, match="sub-9709Ses1_run-2_T2starw"):  # without the pattern: an error naming it
        tdata.discover(ds_a, tdata.DataSpec())


def test_partial_volume_mask_is_thresholded_at_one_half(tmp_path: Path) -> None:
    _put(tmp_path, "anat", "sub-T_T2w", "sub-unf01_T2w_crop")
    mask_path = tmp_path / "derivatives" / "labels" / "sub-T" / "anat" / "sub-T_T2w_seg-manual.nii.gz"
    mask = sitk.ReadImage(str(mask_path))
    arr = sitk.GetArrayFromImage(mask).astype(np.float32)
    pv = np.where(arr > 0, 0.875, 0.0).astype(np.float32)
    pv[0][pv[0] > 0] = 0.375  # a slice of partial-volume edge below one half
    out = sitk.GetImageFromArray(pv)
    out.CopyInformation(mask)
    sitk.WriteImage(out, str(mask_path))
    (case,) = tdata.discover(tmp_path, tdata.DataSpec())
    _, m = tdata.load_case(case)
    got = sitk.GetArrayFromImage(m)
    assert got.dtype == np.uint8 and not got[0].any() and got[1:].sum() == (arr[1:] > 0).sum()


def test_kfold_groups_never_splits_a_person_and_keeps_templates_in_training() -> None:
    mk = lambda s, g, ds: tdata.Case(s, g, "T2w", Path(s), Path(s), dataset=ds)  # noqa: E731
    cases = [mk("sub-a", "sub-a", "x"), mk("sub-a2", "sub-a", "x"), mk("sub-b", "sub-b", "x"),
             mk("sub-c", "sub-c", "y"), mk("sub-d", "sub-d", "y"), mk("sub-e", "sub-e", "z"),
             mk("sub-PAM50small", "sub-PAM50small", "t")]
    folds = tdata.kfold_groups(cases, 3, train_only=["sub-PAM50small"])
    held = [g for _, gs in folds for g in gs]
    assert sorted(held) == ["sub-a", "sub-b", "sub-c", "sub-d", "sub-e"]  # each person held out exactly once
    assert len(folds) == 3 and "sub-PAM50small" not in held
    assert tdata.kfold_groups(cases, 3, ["sub-PAM50small"]) == folds  # deterministic
    fold_of = {g: name for name, gs in folds for g in gs}
    assert fold_of["sub-a"] != fold_of["sub-b"] and fold_of["sub-c"] != fold_of["sub-d"]  # datasets spread out


def test_shipped_configs_split_the_shared_data_by_person() -> None:
    for name in ("cord", "lesion"):
        cfg = load_config(name, None)
        pairs = cfg["data"]["same_person"]
        assert ["sub-9709Ses1", "sub-9709Ses2"] in pairs and ["sub-10062Ses1", "sub-10062Ses2"] in pairs
        assert ["sub-unf01", "sub-01"] in pairs and ["sub-single", "sub-lumbar"] in pairs
        assert set(cfg["data"]["train_only"]) == {"sub-PAM50small", "sub-MNIPolyAMUds"}
        assert cfg["train"]["folds"] == 5


def test_calibration_honours_the_stated_false_alarm_rate() -> None:
    def res(dice: float, f1: float, fl: float) -> dict:
        return {"c": {"subject": "s", "contrast": "T2w", "dice": dice, "lesion_f1": f1,
                      "false_lesions_lesion_free": fl}}
    folds = {"fold0": {"0.2@2": res(0.8, 0.9, 1.0), "0.6@10": res(0.7, 0.8, 0.0)},
             "fold1": {"0.2@2": res(0.8, 0.9, 1.0), "0.6@10": res(0.7, 0.8, 0.0)}}
    assert calibrate(folds, "lesion")[0] == "0.2@2"  # best Dice + F1, false alarms ignored
    chosen, per_case, info = calibrate(folds, "lesion", max_false_per_scan=0.1)
    assert chosen == "0.6@10" and info["max_false_lesions_per_scan"] == 0.1
    assert per_case["c"]["threshold"] == 0.6


def _tube(shape=(12, 48, 48)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    img = (0.3 + 0.02 * rng.standard_normal(shape)).astype(np.float32)
    cord = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    cord[:, (yy - 24) ** 2 + (xx - 24) ** 2 <= 36] = 1
    img[cord > 0] = 0.6
    img[:, 2:6, 2:6] = 1.2  # something bright outside the cord (the image's 99th percentile)
    return img, cord


def test_lookalikes_stay_inside_the_cord_and_brighten_it() -> None:
    img, cord = _tube()
    for seed in range(9):
        out = inject_lookalikes(np.random.default_rng(seed), img, cord, (2.0, 0.7, 0.7))
        assert np.array_equal(out[cord == 0], img[cord == 0])  # nothing outside the cord changes
        assert (out >= img - 1e-6).all() and (out > img + 1e-3).any()  # hyperintense, never darker


def test_cord_training_lesions_keep_the_cord_label() -> None:
    img, cord = _tube()
    vols = [Vol("a", "a", img, cord, (2.0, 0.7, 0.7)) for _ in range(20)]
    source = LesionSource.ellipsoid(LesionSpec(reference_percentile=90.0))
    out = cord_with_lesions(vols, np.random.default_rng(1), source, 0.5)
    changed = [v for v, o in zip(vols, out) if not np.array_equal(v.image, o.image)]
    assert 3 <= len(changed) <= 17  # about half of the volumes get lesions
    assert all(np.array_equal(o.label, cord) for o in out)  # a lesion is cord: the label is unchanged


def test_resumed_training_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = load_config("cord", None)
    cfg["train"].update({"steps_per_epoch": 2, "batch_size": 4, "aug_groups": 2, "lesion_fraction": 0.0})
    spec = prep_spec(cfg)
    image = sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop.nii.gz"))
    mask = sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop_seg-manual.nii.gz"))
    prep = preprocess.prepare(image, spec)
    lab = preprocess.mask_to_model_grid(mask, prep.grid)
    vols = [Vol("v", "v", prep.array, lab, (1.0, 0.7, 0.7))]
    kw = dict(seed=5, device="cpu", minutes=60.0, tag="t", epochs=3)
    full, hist = train_network(cfg, spec, vols, [], **kw)

    def stop_at_third(ep: int, rng: np.random.Generator) -> list[Vol]:
        if ep == 2:
            raise KeyboardInterrupt  # the session ends during epoch 3
        return vols

    ckpt = tmp_path / "run" / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train_network(cfg, spec, vols, [], refresh=stop_at_third, checkpoint=ckpt, **kw)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    resumed, rhist = train_network(cfg, spec, vols, [], checkpoint=ckpt, **kw)
    assert [h["epoch"] for h in rhist] == [1, 2, 3] and len(hist) == 3
    for k, v in full.state_dict().items():  # the resumed run ends where the uninterrupted one does
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-5), k


def test_coarse_to_fine_matches_full_inference_on_a_large_field_of_view() -> None:
    seg = Segmenter.from_artifact(Path(__file__).resolve().parents[1] / "models" / "cord" / "0.2.0")
    image = sitk.ReadImage(str(SEG / "sub-PAM50small_T2w_crop.nii.gz"))
    prep = preprocess.prepare(image, seg.spec)
    small = prep.array
    truth_small = preprocess.mask_to_model_grid(
        sitk.ReadImage(str(SEG / "sub-PAM50small_T2w_crop_seg-manual.nii.gz")), prep.grid)
    # a wide field of view: the crop placed in a 5x larger empty (dark) field, off-centre
    big = np.zeros((small.shape[0], small.shape[1] * 5, small.shape[2] * 3), np.float32)
    y0, x0 = small.shape[1] * 3, small.shape[2]
    big[:, y0:y0 + small.shape[1], x0:x0 + small.shape[2]] = small
    truth = np.zeros(big.shape, np.uint8)
    truth[:, y0:y0 + small.shape[1], x0:x0 + small.shape[2]] = truth_small
    sp = tuple(float(v) for v in prep.grid.GetSpacing()[::-1])
    calls: list[tuple[int, ...]] = []

    def infer(a: np.ndarray) -> np.ndarray:
        calls.append(a.shape)
        return infer_volume(seg.net, a, seg.spec)

    full = infer_volume(seg.net, big, seg.spec) >= seg.spec.threshold
    fine = coarse_to_fine(infer, big, sp, seg.spec, 8.0, 20.0, seg.spec.threshold) >= seg.spec.threshold
    dice = lambda a: 2 * (a & (truth > 0)).sum() / (a.sum() + (truth > 0).sum())  # noqa: E731
    # tiles fall elsewhere (instance norm sees other patches), so the two differ a little; neither is worse
    assert dice(full) > 0.6 and dice(fine) > dice(full) - 0.03
    assert calls[0][0] < big.shape[0] and calls[1][1] * calls[1][2] < big.shape[1] * big.shape[2] / 3
    # a small field of view runs the plain inference, once
    calls.clear()
    coarse_to_fine(infer, small, sp, seg.spec, 8.0, 20.0, seg.spec.threshold)
    assert calls == [small.shape]


def _tiny_cord_config(tmp_path: Path) -> tuple[Path, Path]:
    """``(data, config)``: cord.toml on two persons' crops (2 folds), one epoch of 2 small steps."""
    import re

    data = tmp_path / "ds"
    _put(data, "anat", "sub-unf01_T2w", "sub-unf01_T2w_crop")
    _put(data, "anat", "sub-05_acq-MTon_MTS", "sub-05_acq-MTon_MTS_crop")
    text = (CONFIGS / "cord.toml").read_text()
    for key, val in {"pool": "0", "steps_per_epoch": "2", "batch_size": "4", "final_epochs": "1", "epochs": "1",
                     "aug_groups": "2"}.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {val}", text)
    config = tmp_path / "cord_tiny.toml"
    config.write_text(text.replace('root = "../shared/data/spine"', f'root = "{data}"'))
    return data, config


def test_partial_run_assembles_an_artefact_that_names_its_pending_folds(tmp_path: Path) -> None:
    import json

    from sci_node.models.artifact import load_network
    from trainer.segment.assemble import assemble
    from trainer.segment.train import train_segmentation

    data, config = _tiny_cord_config(tmp_path)
    work = tmp_path / "work"
    full = train_segmentation("cord", config, data, tmp_path / "full", None, 1, "cpu", work_dir=work)
    assert json.loads((work / "fold0" / "result.json").read_text())["split"]["held_out"] == "fold0"
    (work / "fold1" / "result.json").unlink()  # the session ended before fold1 was scored
    out = assemble("cord", config, work, tmp_path / "partial", seed=1)
    net, card = load_network(out)
    assert card["metrics"]["validation"].startswith("subject-grouped 2-fold, 1 of 2 folds finished (pending: fold1)")
    assert [f["fold"] for f in card["metrics"]["folds_pending"]] == ["fold1"]
    held = card["metrics"]["folds_pending"][0]["held_out_groups"]
    assert not any(k.startswith(held[0]) for k in card["metrics"]["per_case"])  # only finished folds are scored
    _, full_card = load_network(full)  # the same final network as the complete run
    assert card["weights_sha256"] == full_card["weights_sha256"]


def test_folds_option_runs_some_folds_and_the_full_run_reuses_them(tmp_path: Path) -> None:
    """``only_folds`` (``--folds``) trains and scores those folds into the work dir and stops there (no
    calibration, no final network), so two processes can share one run; the full run then reuses them.
    An unknown fold name, or no work dir, is a ConfigError."""
    from sci_node.errors import ConfigError
    from sci_node.models.artifact import load_network
    from trainer.segment.train import train_segmentation

    data, config = _tiny_cord_config(tmp_path)
    work = tmp_path / "work"
    assert train_segmentation("cord", config, data, tmp_path / "out", None, 1, "cpu", work_dir=work,
                              only_folds=["fold1", "final"]) == work
    assert (work / "fold1" / "result.json").is_file() and (work / "fold1" / "card.json").is_file()
    assert (work / "final" / "ckpt.pt").is_file()  # the final network, for the full run to resume
    assert not (work / "fold0").exists() and not (tmp_path / "out").exists()
    fold1 = (work / "fold1" / "result.json").read_text()
    full = train_segmentation("cord", config, data, tmp_path / "out", None, 1, "cpu", work_dir=work)
    assert (work / "fold1" / "result.json").read_text() == fold1  # reused, not retrained
    _, card = load_network(full)
    assert card["metrics"]["validation"] == "subject-grouped 2-fold"
    _, fresh = load_network(train_segmentation("cord", config, data, tmp_path / "fresh", None, 1, "cpu"))
    assert card["weights_sha256"] == fresh["weights_sha256"]  # the same final network as a run in one piece
    assert {f["held_out"] for f in card["training"]["splits"]["folds"]} == {"fold0", "fold1"}
    with pytest.raises(ConfigError, match=r"--folds fold7: no such fold \['fold7'\] \(folds: fold0, fold1\)"):
        train_segmentation("cord", config, data, None, None, 1, "cpu", work_dir=work, only_folds=["fold7"])
    with pytest.raises(ConfigError, match="needs --work-dir"):
        train_segmentation("cord", config, data, None, None, 1, "cpu", only_folds=["fold0"])


def _unseen_persons_config(tmp_path: Path, model: str, thresholds: str) -> dict:
    """``MODEL.toml`` on a data folder (``tmp_path/ds``) that adds two persons no shipped model trained
    on (sub-newA, sub-newB: copies of the unf01 and PAM50 crops), with a small threshold grid."""
    import re

    data = tmp_path / "ds"
    _put(data, "anat", "sub-newA_T2w", "sub-unf01_T2w_crop")
    _put(data, "anat", "sub-newB_T2w", "sub-PAM50small_T2w_crop")
    text = (CONFIGS / f"{model}.toml").read_text().replace('root = "../shared/data/spine"', f'root = "{data}"')
    config = tmp_path / f"{model}.toml"
    config.write_text(re.sub(r"(?m)^thresholds = .*$", f"thresholds = {thresholds}", text))
    return load_config(model, config)


def test_recalibration_scores_only_unseen_persons_and_keeps_the_weights(tmp_path: Path) -> None:
    """Only persons the artefact never trained on are scored; the new card keeps the weights and
    carries the chosen threshold, a post-processing override and a switched-on flip TTA."""
    from sci_node.models.artifact import load_network
    from trainer.segment.recalibrate import recalibrate, write_recalibrated

    _put(tmp_path / "ds", "anat", "sub-unf01_T2w", "sub-unf01_T2w_crop")  # 0.2.0 trained on sub-unf01: not scored
    cfg = _unseen_persons_config(tmp_path, "cord", "[0.3, 0.5]")
    art = Path(__file__).resolve().parents[1] / "models" / "cord" / "0.2.0"
    metrics, ecfg, cases = recalibrate("cord", art, cfg, None, post={"coarse_step_mm": 8.0}, flip_x_tta=True)
    assert sorted(c.subject for c in cases) == ["sub-newA", "sub-newB"]
    assert set(metrics["per_case"]) == {"sub-newA_T2w", "sub-newB_T2w"}
    assert set(metrics["threshold_calibration"]["chosen_per_held_out_group"]) == {"sub-newA", "sub-newB"}
    out = write_recalibrated(art, tmp_path / "out", "0.2.9", metrics, ecfg, cases, "test", flip_x_tta=True)
    _, card = load_network(out)
    _, old = load_network(art)
    assert card["version"] == "0.2.9" and card["weights_sha256"] == old["weights_sha256"]
    assert card["postprocessing"]["coarse_step_mm"] == 8.0
    assert card["preprocessing"]["flip_x_tta"] is True and not old["preprocessing"].get("flip_x_tta", False)
    assert card["preprocessing"]["threshold"] == metrics["threshold_calibration"]["chosen"]
    assert card["training"]["recalibrated"]["from"] == "cord 0.2.0"


def test_config_with_a_base_changes_only_what_it_names(tmp_path: Path) -> None:
    """``base = "..."``: the base's tables merged under the file's, key by key; lists replaced whole;
    a chain of two bases; a cycle or a non-string base is a ConfigError naming the file."""
    from sci_node.errors import ConfigError
    from trainer import read_toml_config
    from trainer.segment.train import CONFIGS

    shipped = load_config("lesion", None)
    long_ = load_config("lesion", CONFIGS / "lesion_long.toml")
    wide = load_config("lesion", CONFIGS / "lesion_long_wide.toml")
    assert long_["data"] == shipped["data"] and long_["network"] == shipped["network"]
    assert long_["train"]["epochs"] == 120 and long_["train"]["lr"] == shipped["train"]["lr"]
    assert long_["post"] == {**shipped["post"], "grow_threshold": 0.1}
    assert long_["lesions"]["generator"] == shipped["lesions"]["generator"]
    assert long_["lesions"]["test_generator"]["length_mm"] == [3.0, 20.0] and "base" not in long_
    assert wide["network"]["args"]["channels"] == [24, 48, 96, 192]
    assert wide["network"]["args"]["strides"] == shipped["network"]["args"]["strides"]
    assert wide["train"]["epochs"] == 120 and wide["model"]["version"] == "0.7.1"
    assert [Path(b).name for b in wide["_bases"]] == ["lesion_long.toml", "lesion.toml"]
    (tmp_path / "a.toml").write_text('base = "b.toml"\n[x]\nk = 1\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n[x]\nk = 2\n')
    with pytest.raises(ConfigError, match=r"b\.toml.*base 'a\.toml' forms a cycle"):
        read_toml_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('base = 3\n')
    with pytest.raises(ConfigError, match=r"c\.toml.*base must be a file name, got 3"):
        read_toml_config(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text('base = "missing.toml"\n')
    with pytest.raises(ConfigError, match=r"missing\.toml.*does not exist"):
        read_toml_config(tmp_path / "d.toml")


def test_lesion_recalibration_scores_networks_of_other_seeds_on_the_same_injections(tmp_path: Path) -> None:
    """``injection_seed``: the held-out lesions are seeded by the card's training seed unless told
    otherwise, so two networks trained with different seeds can be scored on the same lesions."""
    from trainer.segment.recalibrate import recalibrate

    cfg = _unseen_persons_config(tmp_path, "lesion", "[0.5]")
    art = Path(__file__).resolve().parents[1] / "models" / "lesion" / "0.8.1"  # trained with seed 0

    def truths(seed: int | None) -> dict[str, float]:
        metrics, _, _ = recalibrate("lesion", art, cfg, 1, setting="0.8@5", injection_seed=seed)
        return {k: (r["true_lesions"], round(r["dice"], 6)) for k, r in metrics["per_case"].items()}

    own = truths(None)
    assert set(own) == {"sub-newA_T2w", "sub-newB_T2w"}
    assert truths(0) == own  # the card's own seed
    assert truths(7) != own  # other lesions


def test_fold_artifacts_score_each_person_with_the_fold_that_held_it_out(tmp_path: Path) -> None:
    """``fold_artifacts``: a cross-validated run is scored group by group with the fold network whose
    card holds that group out; the numbers equal scoring that network alone on the group. A folder
    without fold cards, or folds of different preprocessing, is a DataError naming the folder."""
    import copy

    import torch

    from sci_node.errors import DataError
    from sci_node.models.artifact import load_network, write_artifact
    from trainer.segment.recalibrate import recalibrate

    cfg = _unseen_persons_config(tmp_path, "cord", "[0.5]")
    net, card = load_network(Path(__file__).resolve().parents[1] / "models" / "cord" / "0.2.0")
    other = {k: (v * 0.9 if v.is_floating_point() else v) for k, v in net.state_dict().items()}  # another network
    work = tmp_path / "work"
    for name, held, state in (("fold0", ["sub-newA"], net.state_dict()), ("fold1", ["sub-newB"], other)):
        c = copy.deepcopy(card)
        c["metrics"] = {"held_out": held}
        write_artifact(work / name, {k: v.clone() for k, v in state.items()}, c)
    plain = write_artifact(tmp_path / "other", {k: v.clone() for k, v in other.items()}, copy.deepcopy(card))

    cv, _, cases = recalibrate("cord", None, cfg, None, setting="0.5", fold_artifacts=work)
    assert sorted(c.subject for c in cases) == ["sub-newA", "sub-newB"]
    assert "held it out" in cv["validation"]
    alone_a, _, _ = recalibrate("cord", work / "fold0", cfg, None, setting="0.5")
    alone_b, _, _ = recalibrate("cord", plain, cfg, None, setting="0.5")
    assert cv["per_case"]["sub-newA_T2w"]["dice"] == alone_a["per_case"]["sub-newA_T2w"]["dice"]
    assert cv["per_case"]["sub-newB_T2w"]["dice"] == alone_b["per_case"]["sub-newB_T2w"]["dice"]
    assert alone_a["per_case"]["sub-newB_T2w"]["dice"] != alone_b["per_case"]["sub-newB_T2w"]["dice"]

    with pytest.raises(DataError, match="no metrics.held_out"):
        recalibrate("cord", None, cfg, None, fold_artifacts=tmp_path / "other" / "..")
    c = copy.deepcopy(card)
    c["metrics"] = {"held_out": ["sub-newB"]}
    c["preprocessing"] = {**c["preprocessing"], "patch_yx": [32, 32]}
    write_artifact(work / "fold1", {k: torch.clone(v) for k, v in other.items()}, c)
    with pytest.raises(DataError, match=r"fold1.*differs from the others"):
        recalibrate("cord", None, cfg, None, fold_artifacts=work)
