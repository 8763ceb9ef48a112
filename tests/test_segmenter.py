"""The shipped cord (and lesion) models on committed small real crops (tests/data/seg, see its README)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from sci_node.errors import InvalidSeriesError, ModelError
from sci_node.models.predict_seg import Segmenter
from sci_node.models.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[1]
SEG = Path(__file__).parent / "data" / "seg"
ACTIVE = ModelRegistry(REPO / "models").active()  # the versions the node ships and runs
CORD = REPO / "models" / "cord" / ACTIVE["cord"]
LESION = REPO / "models" / "lesion" / ACTIVE["lesion"]
torch.set_num_threads(2)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def cord() -> Segmenter:
    return Segmenter.from_artifact(CORD)


def _load(name: str) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(SEG / f"{name}.nii.gz"))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / f"{name}_seg-manual.nii.gz")))
    return image, mask


def test_card_describes_the_model(cord: Segmenter) -> None:
    assert (cord.name, cord.version) == ("cord", ACTIVE["cord"])
    assert cord.card["labels"][0]["snomed"]["code"] == "2748008"
    assert cord.card["labels"][0]["category"]["code"] == "91723000"
    metrics = cord.card["metrics"]  # the card carries its held-out table and says how it was made
    assert metrics["validation"] and metrics["per_case"] and 0.0 < metrics["dice_mean"] <= 1.0
    assert all(0.0 <= row["dice"] <= 1.0 for row in metrics["per_case"].values())
    assert (CORD / "weights.pt").stat().st_size < 5_000_000


def test_cord_dice_on_real_axial_crop(cord: Segmenter) -> None:
    image, mask = _load("sub-unf01_T2w_crop")
    pred = cord.predict(image)
    assert pred.dtype == np.uint8 and pred.shape == mask.shape
    assert _dice(pred, mask) >= 0.90


@pytest.mark.parametrize("orientation", ["PIL", "ASL"])  # sagittal slices, both index orders
def test_cord_dice_on_sagittal_geometry(cord: Segmenter, orientation: str) -> None:
    """Same real voxels stored as a sagittal acquisition: the mask comes back on that grid."""
    image, _ = _load("sub-unf01_T2w_crop")
    mask_img = sitk.ReadImage(str(SEG / "sub-unf01_T2w_crop_seg-manual.nii.gz"))
    sag, sag_mask = sitk.DICOMOrient(image, orientation), sitk.DICOMOrient(mask_img, orientation)
    pred = cord.predict(sag)
    truth = sitk.GetArrayFromImage(sag_mask)
    assert pred.shape == truth.shape
    assert _dice(pred, truth) >= 0.90


def test_cord_on_other_crops_is_reported(cord: Segmenter) -> None:
    """MT-on GRE (5 mm slices) and the PAM50 T2w crop: the model finds the cord."""
    for name in ("sub-05_acq-MTon_MTS_crop", "sub-PAM50small_T2w_crop"):
        image, mask = _load(name)
        assert _dice(cord.predict(image), mask) >= 0.80, name


def test_lesion_model_stays_in_roi_and_finds_a_bright_blob() -> None:
    lesion = Segmenter.from_artifact(LESION)
    assert lesion.card["labels"][0]["snomed"]["code"] == "52988006"
    image, cord_mask = _load("sub-unf01_T2w_crop")
    empty = lesion.predict(image, roi=np.zeros_like(cord_mask))
    assert not empty.any()
    from trainer.lesions import LesionSpec, inject_lesions

    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    les_arr, truth = inject_lesions(np.random.default_rng(5), arr, cord_mask, (1.0, 1.0, 1.0),
                                    LesionSpec(count=(1, 1), length_mm=(8, 12), width_mm=(4, 5), contrast=(0.8, 1.0)))
    les_img = sitk.GetImageFromArray(les_arr)
    les_img.CopyInformation(image)
    pred = lesion.predict(les_img, roi=cord_mask)
    assert truth.any() and (pred & truth).any()


def test_bad_inputs(cord: Segmenter, tmp_path: Path) -> None:
    with pytest.raises(InvalidSeriesError, match="2-D"):
        cord.predict(sitk.Image(8, 8, sitk.sitkFloat32))
    image, mask = _load("sub-unf01_T2w_crop")
    with pytest.raises(ModelError, match="roi shape"):
        cord.predict(image, roi=mask[:-1])
    with pytest.raises(ModelError, match="has no card.json"):
        Segmenter.from_artifact(tmp_path)


def test_lesion_input_masked_to_roi_ignores_everything_outside_it() -> None:
    """``post.mask_input_to_roi``: the network sees only the dilated cord, so changing the image
    outside it (CSF, fat, other bright tissue) cannot change the lesion mask."""
    shipped = Segmenter.from_artifact(LESION)
    card = {**shipped.card, "postprocessing": {**shipped.card["postprocessing"], "mask_input_to_roi": True}}
    lesion = Segmenter(shipped.net, card)
    image, cord_mask = _load("sub-unf01_T2w_crop")
    from sci_node.imaging.postprocess import dilate_mm
    from trainer.lesions import LesionSpec, inject_lesions

    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    les_arr, truth = inject_lesions(np.random.default_rng(5), arr, cord_mask, (1.0, 1.0, 1.0),
                                    LesionSpec(count=(1, 1), length_mm=(8, 12), width_mm=(4, 5), contrast=(0.8, 1.0)))
    outside = dilate_mm(cord_mask, (1.0, 1.0, 1.0), 4.0) == 0
    noisy = les_arr.copy()
    # bright blobs outside the cord, within the image's range (the percentile scaling stays similar)
    rng = np.random.default_rng(0)
    noisy[outside] = np.where(rng.random(int(outside.sum())) < 0.3, float(np.percentile(les_arr, 99)),
                              les_arr[outside])
    preds = []
    for a in (les_arr, noisy):
        img = sitk.GetImageFromArray(a)
        img.CopyInformation(image)
        preds.append(lesion.predict(img, roi=cord_mask))
    assert truth.any()
    # normalisation uses whole-volume percentiles, so allow a few boundary voxels to differ
    assert int((preds[0] != preds[1]).sum()) <= max(3, int(0.1 * preds[0].sum()))


def test_lesion_output_cut_to_the_cord_itself() -> None:
    """``post.output_roi_mm = 0``: lesions are intramedullary, so a bright rim just outside the
    cord mask (CSF partial volume, which the 1 mm input ROI lets the network see) is never
    reported as a lesion; without the cut, the network marks some of it."""
    shipped = Segmenter.from_artifact(LESION)
    assert shipped.post.get("output_roi_mm") == 0.0  # the shipped lesion card cuts to the cord
    image, cord_mask = _load("sub-unf01_T2w_crop")
    from sci_node.imaging.postprocess import dilate_mm
    from trainer.lesions import LesionSpec, inject_lesions

    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    les_arr, truth = inject_lesions(np.random.default_rng(5), arr, cord_mask, (1.0, 1.0, 1.0),
                                    LesionSpec(count=(1, 1), length_mm=(8, 12), width_mm=(4, 5), contrast=(0.8, 1.0)))
    rim = (dilate_mm(cord_mask, (1.0, 1.0, 1.0), 1.0) > 0) & (cord_mask == 0)
    # a bright, lesion-like rim next to the lesion: what CSF partial volume at the mask's edge looks like
    near = dilate_mm(truth, (1.0, 1.0, 1.0), 3.0) > 0
    les_arr[rim & near] = float(les_arr[truth > 0].max())
    img = sitk.GetImageFromArray(les_arr)
    img.CopyInformation(image)
    preds = {}
    for keep in (0.0, None):
        post = {k: v for k, v in shipped.post.items() if k != "output_roi_mm"}
        if keep is not None:
            post["output_roi_mm"] = keep
        preds[keep] = Segmenter(shipped.net, {**shipped.card, "postprocessing": post}).predict(img, roi=cord_mask)
    assert (preds[0.0] & truth).any(), "the lesion itself is still found"
    assert not (preds[0.0] & (cord_mask == 0)).any(), "nothing outside the cord mask"
    assert (preds[None] & rim).any(), "without the cut the network marks the bright rim (the case this guards)"
