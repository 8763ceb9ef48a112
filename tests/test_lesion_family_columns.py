"""Lesion family "columns": anatomical, column-placed MS-type lesions on the committed real crops."""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from sci_node.imaging import preprocess
from trainer.lesion_families import columns
from trainer.segment.train import load_config, prep_spec

REPO = Path(__file__).resolve().parents[1]
SEG = REPO / "tests" / "data" / "seg"
CROPS = ("sub-unf01_T2w", "sub-PAM50small_T2w", "sub-05_acq-MTon_MTS")  # 1 mm, 2 mm and 5 mm slices
SEEDS = range(24)


@lru_cache(maxsize=None)
def _volume(name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    spec = prep_spec(load_config("lesion", REPO / "trainer" / "configs" / "lesion_recipe040.toml"))
    prep = preprocess.prepare(sitk.ReadImage(str(SEG / f"{name}_crop.nii.gz")), spec)
    cord = preprocess.mask_to_model_grid(sitk.ReadImage(str(SEG / f"{name}_crop_seg-manual.nii.gz")), prep.grid)
    return prep.array, cord, tuple(float(s) for s in prep.grid.GetSpacing()[::-1])


@lru_cache(maxsize=None)
def _draws(name: str) -> list:
    image, cord, spacing = _volume(name)
    return [columns.generate(np.random.default_rng(seed), image, cord, spacing) for seed in SEEDS]


def _csf_ceiling(image: np.ndarray, cord: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """The brightest plausible CSF: the 99th percentile of a 1-4 mm ring outside the cord."""
    dist = ndi.distance_transform_edt(cord == 0, sampling=(1e6, spacing[1], spacing[2]))
    return float(np.percentile(image[(dist >= 1) & (dist <= 4)], 99))


@pytest.mark.parametrize("name", CROPS)
def test_draws_keep_the_contract(name: str) -> None:
    """Lesions lie inside the unchanged cord, never darken, never exceed CSF, and stay 1-4
    separate lesions of 5-300 mm3, 3-30 mm long, under half the cross-section."""
    image, cord, spacing = _volume(name)
    ceiling = _csf_ceiling(image, cord, spacing)
    for draw in _draws(name):
        assert draw.image.dtype == np.float32 and draw.lesion.dtype == np.uint8 and draw.image.shape == image.shape
        assert np.array_equal(draw.cord, cord)  # no swelling
        assert not (draw.lesion & (cord == 0)).any()
        assert (draw.image >= image).all()
        changed = draw.image > image
        assert (draw.image[changed] <= np.maximum(image[changed], ceiling) + 1e-6).all()
        rows = columns.describe(image, draw, spacing)
        assert 1 <= len(rows) <= 4
        assert not (changed & (cord == 0)).any()  # painted only on the cord
        for row in rows:
            assert 5.0 <= row["volume_mm3"] <= 300.0
            assert 3.0 - 1e-6 <= row["length_mm"] <= 30.0 + spacing[0]
            assert row["max_fraction"] < 0.5
            assert 1.05 <= row["ratio"] <= 2.2 * 1.13


def test_placement_follows_the_ms_columns() -> None:
    """Pooled over crops: dorsal and lateral columns dominate, the central grey matter is the
    rarest, most lesions touch the cord's outline, and about half the draws are single lesions."""
    rows, counts = [], []
    for name in CROPS:
        image, _, spacing = _volume(name)
        for draw in _draws(name):
            found = columns.describe(image, draw, spacing)
            rows += found
            counts.append(len(found))
    share = {c: sum(r["column"] == c for r in rows) / len(rows) for c in columns.COLUMNS}
    assert share["dorsal"] + share["lateral"] >= 0.6
    assert share["central"] < min(share["dorsal"], share["lateral"]) and share["ventral"] < share["lateral"]
    assert sum(r["edge"] for r in rows) / len(rows) >= 0.5
    assert 0.3 <= counts.count(1) / len(counts) <= 0.7 and max(counts) >= 3
    ratios = np.array([r["ratio"] for r in rows])
    assert np.percentile(ratios, 90) >= 1.6 and np.median(ratios) >= 1.2


def test_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    image, cord, spacing = _volume("sub-unf01_T2w")
    a = columns.generate(np.random.default_rng(7), image, cord, spacing)
    b = columns.generate(np.random.default_rng(7), image, cord, spacing)
    c = columns.generate(np.random.default_rng(8), image, cord, spacing)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.lesion, b.lesion)
    assert not np.array_equal(a.lesion, c.lesion)


def test_empty_or_tiny_cord_returns_the_input() -> None:
    image, cord, spacing = _volume("sub-unf01_T2w")
    tiny = np.zeros_like(cord)
    tiny[8, 30, 30:33] = 1  # 3 voxels, ~2 mm2: no slice is a cord cross-section
    for mask in (np.zeros_like(cord), tiny):
        draw = columns.generate(np.random.default_rng(0), image, mask, spacing)
        assert np.array_equal(draw.image, image) and not draw.lesion.any() and np.array_equal(draw.cord, mask)


def test_thick_slices_get_partial_volume() -> None:
    """A 3 mm lesion reaches full fraction on 1 mm slices but only ~3/5 of a 5 mm slice; a 6 mm
    slice of the same lesion falls under the 0.5 label threshold."""
    z, y, x = np.indices((9, 40, 40))
    cord = ((((y - 20) / 6.5) ** 2 + ((x - 20) / 8.5) ** 2) <= 1).astype(np.uint8)
    peaks = {}
    for sz in (1.0, 5.0, 6.5):
        g = columns._cord_geometry(cord, (sz, 0.8, 0.8))
        plan = columns._Plan("dorsal", "ovoid", math.pi / 2, 0.5, 0.3, 0.3, 4 * sz, 1.5)
        frac = columns._fraction(plan, g, slice(0, 9), slice(0, 40), slice(0, 40), sz, 0.4)
        peaks[sz] = float(frac.max())
        assert (frac[:3] == 0).all() and (frac[6:] == 0).all()  # nothing beyond the lesion's slices
    assert peaks[1.0] == pytest.approx(1.0)
    assert 0.5 <= peaks[5.0] <= 0.62 and peaks[6.5] < 0.5
