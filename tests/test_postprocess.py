"""Post-processing and threshold calibration: pure functions on real arrays."""
from __future__ import annotations

import numpy as np

from sci_node.imaging.postprocess import hysteresis, keep_components, near_centerline
from trainer.segment.evaluate import calibrate
from trainer.segment.loop import RandomIntensityCurve


def _tube(shape=(40, 64, 64), centre=(32, 32), radius=4, z=slice(None)) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    m = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2)
    out = np.zeros(shape, np.uint8)
    out[z] = m[z]
    return out


def test_centerline_keeps_split_cord_and_drops_off_line_blob() -> None:
    cord = _tube(z=slice(0, 18)) | _tube(z=slice(22, 40))  # split by two weak slices
    blob = np.zeros_like(cord)
    blob[10:30, 8:16, 30:36] = 1  # 20 mm anterior, longer in Y than the cord is wide
    spacing = (1.0, 1.0, 1.0)
    out = near_centerline(cord | blob, spacing, 10.0)
    assert (out == cord).all()
    # the size filter alone keeps the blob (it is a large component)
    assert keep_components(cord | blob, spacing, min_fraction_of_largest=0.05)[15, 10, 32] == 1


def test_centerline_reference_is_the_longest_component_and_filter_can_be_disabled() -> None:
    cord = _tube(radius=2)  # thin but runs through every slice
    fat = np.zeros_like(cord)
    fat[15:22, 45:60, 5:30] = 1  # bigger volume, short in Z, 20+ mm away
    assert fat.sum() > cord.sum()
    out = near_centerline(cord | fat, (2.0, 0.8, 0.8), 10.0)
    assert (out == cord).all()
    assert (near_centerline(cord | fat, (2.0, 0.8, 0.8), 0.0) == (cord | fat)).all()


def test_calibration_is_nested() -> None:
    """Each group is scored at the threshold the *other* groups prefer."""
    def row(d: float) -> dict:
        return {"dice": d, "subject": "s", "contrast": "T2w"}

    folds = {
        "a": {0.3: {"a_T2w": row(0.9)}, 0.5: {"a_T2w": row(0.5)}},
        "b": {0.3: {"b_T2w": row(0.8)}, 0.5: {"b_T2w": row(0.7)}},
        "c": {0.3: {"c_T2w": row(0.1)}, 0.5: {"c_T2w": row(0.95)}},
    }
    final, per_case, info = calibrate(folds, "cord")
    assert info["chosen_per_held_out_group"] == {"a": 0.5, "b": 0.5, "c": 0.3}
    assert per_case["a_T2w"]["dice"] == 0.5 and per_case["c_T2w"]["dice"] == 0.1
    assert final == 0.5  # mean 0.717 at 0.5 vs 0.6 at 0.3


def test_random_intensity_curve_keeps_air_dark_and_shape() -> None:
    img = np.linspace(0, 1.5, 64 * 64, dtype=np.float32).reshape(1, 64, 64)
    curve = RandomIntensityCurve(seed=1)
    outs = [curve(img) for _ in range(20)]
    assert all(o.shape == img.shape and o.dtype == np.float32 for o in outs)
    assert all(float(o[0, 0, 0]) <= 0.15 for o in outs)
    # not monotone for at least one draw: contrast can flip
    assert any((np.diff(o.ravel()) < 0).any() for o in outs)


def test_calibration_of_threshold_and_minimum_volume_is_nested() -> None:
    """With ``[train] min_volumes_mm3`` the grid holds ``threshold@volume`` pairs; each group is
    scored at the pair the other groups prefer, and the card gets both values."""
    from sci_node.imaging.preprocess import PrepSpec
    from trainer.segment.evaluate import apply_setting, parse_setting, setting_grid

    cfg = {"train": {"thresholds": [0.3, 0.5], "min_volumes_mm3": [2, 10]}, "post": {"min_volume_mm3": 2.0}}
    spec = PrepSpec(spacing_yx=(0.8, 0.8), patch_yx=(32, 32), threshold=0.5)
    grid = setting_grid(cfg, spec)
    assert grid == ["0.3@2", "0.3@10", "0.5@2", "0.5@10"]
    assert parse_setting("0.5@10") == (0.5, 10.0)
    assert parse_setting(0.4) == (0.4, None) and parse_setting("0.4") == (0.4, None)

    def row(d: float) -> dict:
        return {"dice": d, "lesion_f1": d, "subject": "s", "contrast": "T2w"}

    scores = {"a": {"0.5@10": 0.9}, "b": {"0.5@10": 0.8}, "c": {"0.3@2": 0.9, "0.5@10": 0.2}}
    folds = {g: {k: {f"{g}_T2w": row(s.get(k, 0.1))} for k in grid} for g, s in scores.items()}
    final, per_case, info = calibrate(folds, "lesion")
    assert final == "0.5@10" and info["chosen_per_held_out_group"]["c"] == "0.5@10"
    assert per_case["c_T2w"]["dice"] == 0.2  # scored at the others' choice, not its own best
    assert (per_case["a_T2w"]["threshold"], per_case["a_T2w"]["min_volume_mm3"]) == parse_setting(
        info["chosen_per_held_out_group"]["a"])
    spec2, post = apply_setting(cfg, spec, final)
    assert spec2.threshold == 0.5 and post["min_volume_mm3"] == 10.0 and cfg["post"]["min_volume_mm3"] == 2.0


def test_drop_detached_below_removes_a_cauda_piece_far_below_the_cord_and_keeps_split_cords() -> None:
    from sci_node.imaging.postprocess import drop_detached_below

    m = np.zeros((120, 20, 20), np.uint8)
    m[60:110, 8:12, 8:12] = 1      # the main cord, z 60-109 (Z runs inferior -> superior)
    m[70, :, :] = 0                # a weak slice splits it: a 1-slice gap is kept
    m[10:30, 9:11, 9:11] = 1       # 30 slices of nothing, then a "cord" in the cauda equina
    m[114:118, 8:12, 8:12] = 1     # a piece above the main cord (medulla side) is kept
    out = drop_detached_below(m, (1.0, 0.5, 0.5), max_gap_mm=15.0)
    assert out[10:30].sum() == 0 and out[60:110].sum() == m[60:110].sum() and out[114:118].sum() == m[114:118].sum()
    # thick axial slabs: one missing 16.5 mm slab is a 16.5 mm gap, below 20 mm: nothing dropped
    slabs = np.zeros((6, 20, 20), np.uint8)
    slabs[[0, 2, 3, 4, 5], 8:12, 8:12] = 1
    assert np.array_equal(drop_detached_below(slabs, (16.5, 0.5, 0.5), max_gap_mm=20.0), slabs)
    assert np.array_equal(drop_detached_below(m, (1.0, 0.5, 0.5), max_gap_mm=0.0), m)  # off


def _tapered_cord(areas_px: list[int], size: int = 24) -> np.ndarray:
    """A ``(Z, size, size)`` cord whose slice z holds a centred square of about ``areas_px[z]`` pixels."""
    m = np.zeros((len(areas_px), size, size), np.uint8)
    for z, a in enumerate(areas_px):
        side = int(round(np.sqrt(a)))
        lo = (size - side) // 2
        m[z, lo:lo + side, lo:lo + side] = 1 if a else 0
    return m


def test_cut_below_conus_drops_roots_that_swell_below_a_tapering_cord_end() -> None:
    """Cauda equina roots marked in one piece with the conus tip are cut off at the taper; real ends are kept."""
    from sci_node.imaging.postprocess import cut_below_conus

    sp = (1.0, 0.5, 0.5)  # 1 mm along Z, areas in mm² = pixels / 4
    # Z runs inferior -> superior: 12 mm of roots (swelling back to 64 px), the conus taper to 36 px, 100 mm of cord
    roots = [16, 36, 49, 64, 64, 64, 49, 49, 49, 36, 36, 36]
    cord = [36, 36, 49, 64, 81, 100, 100, 100] + [81] * 92
    m = _tapered_cord([0] * 10 + roots + cord)  # the mask ends 10 mm above the grid's inferior edge
    out = cut_below_conus(m, sp, window_mm=40)
    assert out[:19].sum() == 0 and np.array_equal(out[22:], m[22:])  # cut in the narrowest stretch
    # the same profile reaching the grid's inferior edge: the cord's end is not in view, nothing cut
    edge = m[10:]
    assert np.array_equal(cut_below_conus(edge, sp, window_mm=40), edge)
    # a cord that tapers to its tip without swelling again is a real conus: nothing cut
    tip = _tapered_cord([0] * 10 + [4, 9, 16, 25, 36, 49, 64] + [81] * 100)
    assert np.array_equal(cut_below_conus(tip, sp, window_mm=40), tip)
    # thick axial slices (5 mm) swing in area from slice to slice: never searched
    slabs = m[::5]
    assert np.array_equal(cut_below_conus(slabs, (5.0, 0.5, 0.5), window_mm=40), slabs)
    # a short mask (an axial slab stack of 30 mm) and window 0 (off) are left alone
    assert np.array_equal(cut_below_conus(m[:30], sp, window_mm=40), m[:30])
    assert np.array_equal(cut_below_conus(m, sp, window_mm=0), m)


def test_hysteresis_grows_kept_seeds_only() -> None:
    """A kept lesion core extends into its connected low-probability rim; a rim without a core is not added."""
    region = np.zeros((5, 20, 20), np.uint8)
    region[1:4, 2:9, 2:9] = 1        # the rim of lesion 1 (probability >= the grow threshold)
    region[1:4, 12:18, 12:18] = 1    # a low-probability blob with no core: not a lesion
    seeds = np.zeros_like(region)
    seeds[2, 4:7, 4:7] = 1           # lesion 1's core (above the threshold, kept by the size limit)
    seeds[0, 0, 19] = 1              # a core outside any region stays as it is
    out = hysteresis(seeds, region)
    assert out.dtype == np.uint8
    assert out[1:4, 2:9, 2:9].all() and not out[1:4, 12:18, 12:18].any() and out[0, 0, 19] == 1
    assert int(out.sum()) == 3 * 7 * 7 + 1
    assert not hysteresis(np.zeros_like(seeds), region).any()
