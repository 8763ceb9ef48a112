"""sci_node.imaging.preprocess: canonical orientation, model grid, inverse mapping onto the source grid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sci_node.imaging import preprocess
from sci_node.imaging.postprocess import keep_components, lesion_f1

DATA = Path(__file__).parent / "data" / "seg"
CASES = ["sub-unf01_T2w_crop", "sub-05_acq-MTon_MTS_crop", "sub-PAM50small_T2w_crop"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _grid(img: sitk.Image) -> tuple:
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("orientation", [None, "PIL", "RAS", "ASL"])
def test_round_trip_restores_source_grid(case: str, orientation: str | None) -> None:
    image = sitk.ReadImage(str(DATA / f"{case}.nii.gz"))
    mask = sitk.ReadImage(str(DATA / f"{case}_seg-manual.nii.gz"))
    if orientation:  # same voxels, another acquisition geometry (e.g. PIL = sagittal slices)
        image, mask = sitk.DICOMOrient(image, orientation), sitk.DICOMOrient(mask, orientation)
    spec = preprocess.PrepSpec(spacing_yx=(0.8, 0.8))
    prep = preprocess.prepare(image, spec)
    # the model grid is axial LPS: Z inferior->superior
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(prep.grid.GetDirection()) == "LPS"
    assert prep.array.dtype == np.float32 and prep.array.shape == prep.grid.GetSize()[::-1]
    assert 0.0 <= prep.array.min() and prep.array.max() <= spec.clip_max
    on_model = preprocess.mask_to_model_grid(mask, prep.grid)
    back = preprocess.to_source_grid(on_model.astype(np.float32), prep)
    truth = sitk.GetArrayFromImage(mask) > 0
    assert back.shape == truth.shape and back.dtype == np.uint8
    assert _dice(back > 0, truth) >= 0.97
    # exact grid: wrapping the result with the source geometry is a no-op
    out = sitk.GetImageFromArray(back)
    out.CopyInformation(image)
    assert _grid(out) == _grid(image)


def test_identity_spacing_round_trip_is_exact() -> None:
    image = sitk.ReadImage(str(DATA / "sub-unf01_T2w_crop.nii.gz"))  # 1 mm voxels
    mask = sitk.ReadImage(str(DATA / "sub-unf01_T2w_crop_seg-manual.nii.gz"))
    prep = preprocess.prepare(image, preprocess.PrepSpec(spacing_yx=(1.0, 1.0)))
    back = preprocess.to_source_grid(preprocess.mask_to_model_grid(mask, prep.grid).astype(np.float32), prep)
    np.testing.assert_array_equal(back, sitk.GetArrayFromImage(mask))


def test_prepspec_card_round_trip_bad_orientation_unknown_setting_and_window_overlap() -> None:
    spec = preprocess.PrepSpec(spacing_yx=(0.5, 0.6), context=1, patch_yx=(64, 80), threshold=0.4)
    assert preprocess.PrepSpec.from_card(spec.to_card()) == spec
    bad = spec.to_card() | {"orientation": "RAS"}
    with pytest.raises(ValueError, match="RAS"):
        preprocess.PrepSpec.from_card(bad)
    newer = spec.to_card() | {"flip_z_tta": True}  # a setting from a newer trainer: refused, not ignored
    with pytest.raises(ValueError, match="flip_z_tta"):
        preprocess.PrepSpec.from_card(newer)
    half = preprocess.PrepSpec(sw_overlap=0.5)  # the sliding-window overlap: a card without it means 0.25
    assert preprocess.PrepSpec.from_card(half.to_card()) == half
    old = {k: v for k, v in half.to_card().items() if k != "sliding_window_overlap"}
    assert preprocess.PrepSpec.from_card(old).sw_overlap == 0.25
    with pytest.raises(ValueError, match="sliding_window_overlap.*1.0"):
        preprocess.PrepSpec.from_card(half.to_card() | {"sliding_window_overlap": 1.0})


def test_normalise_constant_and_context_and_crop_paste() -> None:
    spec = preprocess.PrepSpec()
    assert not preprocess.normalise(np.full((3, 4, 4), 7.0), spec).any()
    vol = np.arange(4 * 2 * 2, dtype=np.float32).reshape(4, 2, 2)
    ctx = preprocess.with_context(vol, 1)
    assert ctx.shape == (4, 3, 2, 2)
    np.testing.assert_array_equal(ctx[0, 0], vol[0])  # edge replicated
    np.testing.assert_array_equal(ctx[2], vol[1:4])
    roi = np.zeros((5, 10, 10), np.uint8)
    roi[2, 4:6, 3:5] = 1
    box = preprocess.roi_bbox(roi, (0, 1, 1))
    assert box == (slice(2, 3), slice(3, 7), slice(2, 6))
    assert preprocess.roi_bbox(np.zeros_like(roi), (1, 1, 1)) is None
    back = preprocess.paste(preprocess.crop(roi, box), box, roi.shape)
    np.testing.assert_array_equal(back, roi)
    padded, inner = preprocess.pad_to(np.ones((2, 5, 7), np.float32), (8, 8))
    assert padded.shape == (2, 8, 8) and padded[:, inner[0], inner[1]].all() and padded.sum() == 70


def test_postprocess_components_and_lesion_f1() -> None:
    m = np.zeros((10, 20, 20), np.uint8)
    m[2:8, 5:10, 5:10] = 1  # 150 voxels
    m[0, 0, 0] = 1  # speck
    kept = keep_components(m, (1.0, 1.0, 1.0), min_volume_mm3=5)
    assert kept.sum() == 150 and kept[0, 0, 0] == 0
    truth = np.zeros_like(m)
    truth[3, 6, 6] = truth[9, 18, 18] = 1
    f = lesion_f1(kept, truth)
    assert (f["tp"], f["fn"], f["fp"]) == (1.0, 1.0, 0.0) and f["f1"] == pytest.approx(2 / 3)
