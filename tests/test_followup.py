"""Follow-up comparison (issue 39), on a committed real crop (PAM50 template, 48 x 48 x 60, 1 x 1 x 2 mm).

The prior carries two painted lesions; the "follow-up" is the same cord moved rigidly (2 degrees,
a few mm), with a fresh noise draw, one lesion enlarged and one new lesion painted in. The
comparison must register the prior back, find exactly the new and the enlarging lesion, call the
unchanged one stable, and mark nothing new on a follow-up without changes. A current cord
that is not the one in the image fails the registration check and is refused, never guessed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sci_node.imaging import followup
from sci_node.imaging.followup import FollowupRules, compare, csa_change, match_lesions, prior_labels

SEG = Path(__file__).parent / "data" / "seg"


def _crop() -> tuple[sitk.Image, np.ndarray]:
    img = sitk.ReadImage(str(SEG / "sub-PAM50small_T2w_crop.nii.gz"), sitk.sitkFloat32)
    cord = sitk.GetArrayFromImage(sitk.ReadImage(str(SEG / "sub-PAM50small_T2w_crop_seg-manual.nii.gz"))) > 0
    return img, cord.astype(np.uint8)


def _paint(arr: np.ndarray, lesion: np.ndarray, cord: np.ndarray, z0: int, size: tuple[int, int, int]) -> None:
    """A bright box of ``size`` voxels in the cord, its top slice ``z0`` (in place)."""
    ys, xs = np.nonzero(cord[z0])
    cy, cx = int(np.median(ys)), int(np.median(xs))
    box = (slice(z0, z0 + size[0]), slice(cy - size[1] // 2, cy - size[1] // 2 + size[1]),
           slice(cx - size[2] // 2, cx - size[2] // 2 + size[2]))
    lesion[box] = 1
    arr[box] = np.percentile(arr[cord > 0], 99) * 1.8


def _moved(img: sitk.Image, arrays: list[np.ndarray], angle_deg: float, shift_mm: tuple[float, float, float]
           ) -> tuple[sitk.Image, list[np.ndarray]]:
    """The image (linear) and masks (nearest) after a rigid motion about the image centre, on the same grid."""
    t = sitk.Euler3DTransform()
    t.SetCenter(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
    t.SetRotation(np.deg2rad(angle_deg), 0.0, np.deg2rad(angle_deg / 2))
    t.SetTranslation(shift_mm)
    fill = float(np.median(sitk.GetArrayViewFromImage(img)))  # what lies outside: background, not a black edge
    out = sitk.Resample(img, img, t, sitk.sitkLinear, fill)
    masks = []
    for a in arrays:
        m = sitk.GetImageFromArray(a.astype(np.uint8))
        m.CopyInformation(img)
        masks.append(sitk.GetArrayFromImage(sitk.Resample(m, img, t, sitk.sitkNearestNeighbor, 0)).astype(np.uint8))
    return out, masks


def _pair(changes: bool) -> tuple[sitk.Image, np.ndarray, np.ndarray, sitk.Image, np.ndarray, np.ndarray]:
    img, cord = _crop()
    arr = sitk.GetArrayFromImage(img)
    lesion = np.zeros_like(cord)
    _paint(arr, lesion, cord, 15, (3, 3, 3))  # A: 27 voxels, 54 mm3, stays
    _paint(arr, lesion, cord, 30, (2, 2, 2))  # B: 8 voxels, 16 mm3, grows
    prior = sitk.GetImageFromArray(arr + np.random.default_rng(1).normal(0, 2, arr.shape).astype(np.float32))
    prior.CopyInformation(img)
    now, now_lesion = arr.copy(), lesion.copy()
    if changes:
        _paint(now, now_lesion, cord, 29, (4, 3, 3))  # B enlarged: 36 voxels, 72 mm3
        _paint(now, now_lesion, cord, 45, (3, 3, 3))  # N: new
    cur = sitk.GetImageFromArray(now + np.random.default_rng(2).normal(0, 2, now.shape).astype(np.float32))
    cur.CopyInformation(img)
    cur, (cur_cord, cur_lesion) = _moved(cur, [cord, now_lesion], 2.0, (1.5, -1.0, 2.0))
    return prior, cord, lesion, cur, cur_cord, cur_lesion


def test_new_and_enlarging_lesions_are_found_after_a_rigid_motion() -> None:
    prior, cord, lesion, cur, cur_cord, cur_lesion = _pair(changes=True)
    result = compare(prior, cord, lesion, cur, cur_cord, cur_lesion, si_axis=0)
    assert result.check.passed, result.check
    assert result.check.cord_dice > 0.8 and result.check.centerline_mm is not None
    assert result.counts() == {"new": 1, "enlarging": 1, "stable": 1, "shrinking": 0, "resolved": 0}, result.lesions
    by = {c.status: c for c in result.lesions}
    assert by["enlarging"].volume_then_mm3 == 16.0 and by["enlarging"].volume_now_mm3 > 50
    assert by["new"].volume_then_mm3 == 0.0 and by["new"].prior_ids == ()
    assert by["new"].centroid_index_zyx[0] > 40  # where the new one was painted
    flagged = result.new_or_enlarging
    assert flagged is not None and flagged.sum() == sum(c.volume_now_mm3 for c in result.lesions
                                                        if c.status in ("new", "enlarging")) / 2.0


def test_a_follow_up_without_change_has_no_new_lesion() -> None:
    prior, cord, lesion, cur, cur_cord, cur_lesion = _pair(changes=False)
    result = compare(prior, cord, lesion, cur, cur_cord, cur_lesion, si_axis=0)
    assert result.check.passed
    assert result.counts()["new"] == 0 and result.counts()["enlarging"] == 0 and result.counts()["stable"] == 2


def test_a_cord_that_is_not_the_images_fails_the_check_and_is_not_compared() -> None:
    prior, cord, lesion, cur, cur_cord, cur_lesion = _pair(changes=True)
    wrong = np.roll(cur_cord, 14, axis=2)  # 14 mm to the side: beside the cord, not on it
    result = compare(prior, cord, lesion, cur, wrong, cur_lesion, si_axis=0)
    assert not result.check.passed and result.lesions == [] and result.new_or_enlarging is None
    assert "cord Dice after registration" in (result.check.reason or "")


def test_matching_rule_on_arrays() -> None:
    plab, n = prior_labels(np.pad(np.ones((2, 2, 2), np.uint8), 4))
    assert n == 1
    cur = np.zeros_like(plab, dtype=np.uint8)
    cur[4:6, 4:6, 4:7] = 1  # 12 voxels from 8: +50 % but +4 mm3 < 10: stable
    changes, flagged = match_lesions(plab, plab, cur, 1.0, (1.0, 1.0, 1.0), FollowupRules())
    assert [c.status for c in changes] == ["stable"] and not flagged.any()
    changes, _ = match_lesions(plab, plab, np.zeros_like(cur), 1.0, (1.0, 1.0, 1.0))
    assert [c.status for c in changes] == ["resolved"]
    assert csa_change(80.0, 78.0) == {"then_mm2": 80.0, "now_mm2": 78.0, "change_pct": -2.5}


def _cli_compare(tmp_path: Path, prior: sitk.Image, current: sitk.Image, name: str) -> dict:
    import json
    import subprocess
    import sys

    for side, img in (("prior", prior), ("current", current)):
        (tmp_path / name / side).mkdir(parents=True)
        sitk.WriteImage(img, str(tmp_path / name / side / "pam50_T2w.nii.gz"))
    out = tmp_path / name / "out"
    res = subprocess.run([sys.executable, "-m", "sci_node.cli", "compare", str(tmp_path / name / "prior"),
                          str(tmp_path / name / "current"), "--out", str(out), "--log-level", "WARNING"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "registration: cord Dice" in res.stdout
    for side in ("prior", "current"):
        assert (out / side / "cord.nii.gz").is_file() and (out / side / "report.json").is_file()
    assert (out / "new_or_enlarging.nii.gz").is_file()
    record = json.loads((out / "comparison.json").read_text())
    record["_reports"] = {side: json.loads((out / side / "report.json").read_text()) for side in ("prior", "current")}
    return record


def test_sci_node_compare_end_to_end_with_the_shipped_models(tmp_path: Path) -> None:
    """The CLI with the shipped models: the same scan twice compares to nothing new; the cord moved
    (2 degrees, a few mm, another noise draw) is registered back, and every current lesion the model
    marks where the prior had none is reported new, every prior one it no longer marks resolved."""
    img, cord = _crop()
    same = _cli_compare(tmp_path, img, img, "same")
    assert same["compared"] and same["registration"]["cord_dice"] > 0.95
    n_prior = same["_reports"]["prior"]["summary"].get("lesion_count") or 0
    assert same["counts"] == {"new": 0, "enlarging": 0, "stable": n_prior, "shrinking": 0, "resolved": 0}
    arr = sitk.GetArrayFromImage(img)
    noisy = sitk.GetImageFromArray(arr + np.random.default_rng(3).normal(0, 2, arr.shape).astype(np.float32))
    noisy.CopyInformation(img)
    moved, _ = _moved(noisy, [cord], 2.0, (1.5, -1.0, 2.0))
    rec = _cli_compare(tmp_path, img, moved, "moved")
    assert rec["compared"] and rec["registration"]["cord_dice"] > 0.8 and rec["registration"]["centerline_mm"] < 1.0
    n_now = rec["_reports"]["current"]["summary"].get("lesion_count") or 0
    counts = rec["counts"]
    assert counts["new"] + counts["enlarging"] + counts["stable"] + counts["shrinking"] == n_now
    assert counts["resolved"] <= n_prior and len(rec["lesions"]) == n_now + counts["resolved"]
    assert all(les["centroid_lps_mm"] is not None for les in rec["lesions"] if les["status"] != "resolved")
    stretch = same["csa_common_stretch"]  # the same scan twice: no change, well within the measurement error
    assert stretch["change_pct"] == 0.0 and stretch["beyond_error"] is False
    assert stretch["error_pct"] == FollowupRules().csa_error_pct and stretch["smallest_real_change_pct"] == 3.04


def test_a_csa_change_is_judged_against_the_scan_rescan_error() -> None:
    assert followup.with_error(csa_change(80.0, 83.2), 1.55) == {
        "then_mm2": 80.0, "now_mm2": 83.2, "change_pct": 4.0, "error_pct": 1.55, "smallest_real_change_pct": 3.04,
        "beyond_error": True}
    assert followup.with_error(csa_change(80.0, 78.0), 1.55)["beyond_error"] is False  # -2.5 %
    assert followup.with_error(csa_change(None, 78.0), 1.55)["beyond_error"] is None


def test_each_current_lesion_is_named_as_the_report_names_it() -> None:
    from sci_node.imaging.followup import Comparison, LesionChange, RegistrationCheck
    from sci_node.pipeline.compare import comparison_record

    img = sitk.Image(10, 10, 10, sitk.sitkFloat32)  # identity geometry: index (z, y, x) -> LPS (x, y, z)
    changes = [LesionChange("new", 0.0, 30.0, 1, (), (2.0, 3.0, 4.0)),
               LesionChange("resolved", 12.0, 0.0, None, (1,), (5.0, 5.0, 5.0))]
    now = {"lesions": [{"id": 2, "centroid_lps_mm": [9.0, 9.0, 9.0], "vertebral_levels": ["C5"]},
                       {"id": 1, "centroid_lps_mm": [4.5, 3.0, 2.0], "vertebral_levels": ["C3", "C4"]}]}
    rec = comparison_record(Comparison(RegistrationCheck(True, 0.97, 0.2), changes), img, {}, now)
    new, gone = rec["lesions"]
    assert (new["lesion_id"], new["vertebral_levels"], new["centroid_lps_mm"]) == (1, ["C3", "C4"], [4.0, 3.0, 2.0])
    assert (gone["lesion_id"], gone["centroid_lps_mm"]) == (None, None)
    assert rec["counts"] == {"new": 1, "enlarging": 0, "stable": 0, "shrinking": 0, "resolved": 1}


def test_subtraction_finds_a_new_hyperintensity_the_lesion_masks_miss_and_nothing_in_noise() -> None:
    """:func:`followup.new_by_difference` on a synthetic cord (0.6 mm in plane, 3 mm slices): a lesion at 1.4x the
    cord appears in the current image only -> one component on it; noise alone, or a lesion already in a
    lesion mask (``known``), -> none."""
    rng = np.random.default_rng(3)
    shape, spacing = (12, 40, 40), (3.0, 0.6, 0.6)
    zz, yy, xx = np.indices(shape)
    cord = ((yy - 20) ** 2 + (xx - 20) ** 2) <= 8 ** 2
    base = np.where(cord, 100.0, 300.0).astype(np.float32)
    prior = base + rng.normal(0, 3, shape).astype(np.float32)
    lesion = cord & ((yy - 20) ** 2 + (xx - 25) ** 2 <= 3 ** 2) & (zz >= 4) & (zz <= 6)  # touches the cord's edge
    current = base + rng.normal(0, 3, shape).astype(np.float32)
    noise_only = followup.new_by_difference(current, prior, cord, cord, np.zeros(shape, bool), spacing)
    current[lesion] *= 1.4
    found = followup.new_by_difference(current, prior, cord, cord, np.zeros(shape, bool), spacing)
    assert noise_only == []
    assert len(found) == 1 and (found[0] & lesion).sum() >= 0.8 * lesion.sum() and not (found[0] & ~cord).any()
    assert followup.new_by_difference(current, prior, cord, cord, lesion, spacing) == []


def test_the_cords_edge_seen_a_fraction_of_a_voxel_apart_is_not_a_new_lesion() -> None:
    """The cord's edge against bright CSF, 0.3 voxel (0.18 mm) apart in the two images, rises on the subtraction
    at one side of the cord (partial volume: the current cord mask takes in voxels that are half CSF). Without
    ``diff_shift_mm`` that rim is a "new lesion"; with the default it is explained by the shift, while a real lesion
    at the same edge is still found."""
    shape, spacing = (12, 40, 40), (3.0, 0.6, 0.6)
    zz, yy, xx = np.indices(shape).astype(np.float32)

    def image(cx: float) -> np.ndarray:  # cord 100, CSF 300, a smooth edge about one voxel wide
        r = np.sqrt((yy - 20) ** 2 + (xx - cx) ** 2)
        return (100.0 + 200.0 / (1.0 + np.exp(-(r - 8.0) / 0.45))).astype(np.float32)

    rng = np.random.default_rng(5)
    prior = image(20.0) + rng.normal(0, 2, shape).astype(np.float32)
    current = image(20.3) + rng.normal(0, 2, shape).astype(np.float32)
    cord = ((yy - 20) ** 2 + (xx - 20) ** 2) <= 8.6 ** 2
    none = np.zeros(shape, bool)
    rim = followup.new_by_difference(current, prior, cord, cord, none, spacing, FollowupRules(diff_shift_mm=0.0))
    assert rim and all(((xx[c] - 20) ** 2 + (yy[c] - 20) ** 2 >= 7.0 ** 2).all() for c in rim)  # on the rim only
    assert followup.new_by_difference(current, prior, cord, cord, none, spacing) == []
    lesion = cord & ((yy - 20) ** 2 + (xx - 25) ** 2 <= 3 ** 2) & (zz >= 4) & (zz <= 6)
    current[lesion] *= 1.4
    found = followup.new_by_difference(current, prior, cord, cord, none, spacing)
    assert len(found) == 1 and (found[0] & lesion).sum() >= 0.8 * lesion.sum()
