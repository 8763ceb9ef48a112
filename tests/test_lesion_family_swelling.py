"""Lesion family "swelling" (issue 34): long/acute lesions with cord swelling and satellite dots.

Real crops from ``tests/data/seg`` on the lesion model's canonical grid: 1 mm T2w, a 2 mm
T2w template and a thick (5 mm) MT-on stack.
"""
from __future__ import annotations

import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from sci_node.imaging.preprocess import mask_to_model_grid, prepare
from trainer.lesion_families.base import LesionDraw
from trainer.lesion_families.swelling import (
    FAMILY,
    generate,
    generate_with_base,
    swell_cord,
)
from trainer.segment.train import load_config, prep_spec

ROOT = Path(__file__).resolve().parents[1]
SEG = ROOT / "tests" / "data" / "seg"
THIN, TEMPLATE, THICK = "sub-unf01_T2w", "sub-PAM50small_T2w", "sub-05_acq-MTon_MTS"
SEEDS = range(24)


@cache
def _case(name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    spec = prep_spec(load_config("lesion", ROOT / "trainer" / "configs" / "lesion_recipe040.toml"))
    prep = prepare(sitk.ReadImage(str(SEG / f"{name}_crop.nii.gz")), spec)
    cord = mask_to_model_grid(sitk.ReadImage(str(SEG / f"{name}_crop_seg-manual.nii.gz")), prep.grid)
    spacing = tuple(float(s) for s in prep.grid.GetSpacing()[::-1])
    return prep.array.astype(np.float32), cord.astype(np.uint8), spacing


@cache
def _draws(name: str) -> list[tuple[LesionDraw, np.ndarray]]:
    image, cord, spacing = _case(name)
    return [generate_with_base(np.random.default_rng(s), image, cord, spacing) for s in SEEDS]


def _components(lesion: np.ndarray, spacing: tuple[float, float, float]) -> list[tuple[np.ndarray, float, float]]:
    """(mask, volume mm3, length mm along Z) per 26-connected lesion, largest first."""
    lab, n = ndi.label(lesion, np.ones((3, 3, 3)))
    out = []
    for j in range(1, n + 1):
        c = lab == j
        zs = np.flatnonzero(c.any((1, 2)))
        out.append((c, float(c.sum() * np.prod(spacing)), float((zs[-1] - zs[0] + 1) * spacing[0])))
    return sorted(out, key=lambda r: -r[1])


@pytest.mark.parametrize("name", [THIN, TEMPLATE, THICK])
def test_contract_on_real_crops(name: str) -> None:
    image, cord, _ = _case(name)
    assert FAMILY == "swelling"
    for d, base in _draws(name):
        assert d.image.shape == d.lesion.shape == d.cord.shape == image.shape
        assert d.image.dtype == np.float32 and d.lesion.dtype == np.uint8 and d.cord.dtype == np.uint8
        assert not (d.lesion.astype(bool) & (d.cord == 0)).any()           # a lesion is part of the cord
        assert (d.image >= base - 1e-6).all()                                # never darkened
        assert (d.image <= np.maximum(base, 1.5) + 1e-6).all()               # stays in the normalised range
        assert np.array_equal(d.image[d.cord == 0], base[d.cord == 0])       # painted only inside the cord
        if np.array_equal(d.cord, cord):
            assert np.array_equal(base, image)                               # no swelling: painted on the input
    assert sum(d.lesion.any() for d, _ in _draws(name)) >= 0.8 * len(SEEDS)


@pytest.mark.parametrize("name", [THIN, TEMPLATE])
def test_sizes_lengths_and_satellites(name: str) -> None:
    _, _, spacing = _case(name)
    largest, longest, satellites = [], [], []
    for d, _ in _draws(name):
        comps = _components(d.lesion, spacing)
        if not comps:
            continue
        largest.append(comps[0][1])
        longest.append(comps[0][2])
        satellites += [c[1] for c in comps[1:]]
        assert all(c[2] <= 60.0 for c in comps)
    assert max(largest) <= 330.0 and np.median(largest) >= 50.0              # main lesion up to ~300 mm3
    assert np.median(longest) >= 8.0                                         # elongated along the cord
    if name == TEMPLATE:                                                     # 120 mm of cord: long lesions fit
        assert max(longest) >= 25.0
    assert satellites and max(satellites) <= 25.0                            # small dots of 5-20 mm3


def test_bright_core_near_csf_and_partly_covering_the_cord() -> None:
    image, cord, spacing = _case(THIN)
    m = float(np.median(image[cord > 0]))
    ring = ndi.distance_transform_edt(cord == 0, sampling=(1e4,) + spacing[1:])
    csf = float(np.percentile(image[(ring >= 1) & (ring <= 4)], 90))
    assert csf > 1.5 * m                                                     # T2w: the CSF rule applies
    peaks, covers = [], []
    for d, _ in _draws(THIN):
        comps = _components(d.lesion, spacing)
        if comps and comps[0][1] >= 40.0:
            c = comps[0][0]
            peaks.append(float(d.image[c].max()) / m)
            covers.append(max(c[z].sum() / d.cord[z].sum() for z in np.flatnonzero(c.any((1, 2)))))
            assert float(d.image[c].mean()) / m >= 1.3
            assert (d.image[c] < m + 0.5 * (peaks[-1] - 1) * m).any()        # a fainter, labelled rim (halo)
    assert np.median(peaks) >= 1 + 0.7 * (csf / m - 1)                       # core close to the CSF level
    assert max(covers) >= 0.4                                                # can cover much of the cord


def test_thick_slices_get_faint_unlabelled_edges() -> None:
    image, cord, spacing = _case(THICK)
    assert spacing[0] >= 4.0
    faint = 0
    for d, base in _draws(THICK):
        brighter = d.image > base + 0.02
        faint += bool((brighter & (d.lesion == 0)).any())
        if d.lesion.any():                                                   # a labelled thick slice stays bright
            assert float(np.median(d.image[d.lesion > 0])) > float(np.median(image[cord > 0]))
    assert faint >= 0.8 * len(SEEDS)


@pytest.mark.parametrize("name", [THIN, THICK])
def test_swelling_grows_the_cord_over_the_lesion(name: str) -> None:
    image, cord, spacing = _case(name)
    swollen = 0
    for d, base in _draws(name):
        if np.array_equal(d.cord, cord):
            continue
        swollen += 1
        assert (d.cord >= cord).all()                                        # the cord only grows
        assert not (d.lesion.astype(bool) & (d.cord == 0)).any()             # and keeps covering the lesion
        main = _components(d.lesion, spacing)[0][0]
        zs = np.flatnonzero(main.any((1, 2)))
        ratio = d.cord[zs].sum() / cord[zs].sum()
        assert 1.03 <= ratio <= 1.3, ratio                                   # 5-25% area over the lesion
        assert (d.cord[zs].sum((1, 2)) > cord[zs].sum((1, 2))).all()
        assert base.max() <= image.max() + 1e-6 and base.min() >= image.min() - 1e-6  # CSF moved, not created
    assert 0.2 * len(SEEDS) <= swollen <= 0.7 * len(SEEDS)                  # about half of the main lesions


def test_swell_cord_matches_the_requested_growth_and_pushes_csf_out() -> None:
    image, cord, spacing = _case(THIN)
    z_mid = np.arange(image.shape[0]) * spacing[0]
    inner = (z_mid >= 5.0) & (z_mid <= 10.0)
    for growth in (0.05, 0.15, 0.25):
        img2, cord2 = swell_cord(image, cord, spacing, 5.0, 10.0, growth, 4.0)
        ratio = cord2[inner].sum((1, 2)) / cord[inner].sum((1, 2))
        assert np.allclose(ratio, 1 + growth, atol=0.02)
        added = (cord2 > 0) & (cord == 0)
        assert img2[added].mean() < image[added].mean()                      # bright CSF replaced by cord
        far = np.abs(z_mid - 7.5) > 2.5 + 4.0 + 0.5
        assert np.array_equal(img2[far], image[far]) and np.array_equal(cord2[far], cord[far])


def test_deterministic_for_a_seed() -> None:
    image, cord, spacing = _case(THIN)
    a = generate(np.random.default_rng(7), image, cord, spacing)
    b = generate(np.random.default_rng(7), image, cord, spacing)
    c = generate(np.random.default_rng(8), image, cord, spacing)
    assert all(np.array_equal(x, y) for x, y in ((a.image, b.image), (a.lesion, b.lesion), (a.cord, b.cord)))
    assert not np.array_equal(a.image, c.image)


def test_empty_or_tiny_cord_returns_the_input() -> None:
    image, cord, spacing = _case(THIN)
    tiny = np.zeros_like(cord)
    tiny[8, 40, 40:43] = 1
    for mask in (np.zeros_like(cord), tiny):
        d = generate(np.random.default_rng(0), image, mask, spacing)
        assert np.array_equal(d.image, image) and not d.lesion.any() and np.array_equal(d.cord, mask)


def test_fast_enough() -> None:
    image, cord, _ = _case(THIN)
    big_img = np.concatenate([image, image[::-1]] * 2)[:60]                  # (60, 80, 80)
    big_cord = np.concatenate([cord, cord[::-1]] * 2)[:60]
    times = []
    for s in range(5):
        t = time.perf_counter()
        generate(np.random.default_rng(s), big_img, big_cord, (1.0, 0.8, 0.8))
        times.append(time.perf_counter() - t)
    assert np.median(times) < 0.3
