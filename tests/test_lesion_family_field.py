"""Lesion family "field" (thresholded Gaussian random fields) on the committed real crops.

The crops go through the inference preprocessing (canonical grid, 0.8 mm in plane, normalised)
and the lesion model's cord-centred crop, as ``trainer.seg.load_volumes`` does for training.
The 5 mm MT-weighted crop is the thick-slice case; the T1w crop has dark CSF (the ratio fallback).
"""
from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from sci_node.imaging import preprocess
from trainer.lesion_families import field
from trainer.lesion_families.base import LesionDraw
from trainer.segment.train import load_config, prep_spec

SEG = Path(__file__).parent / "data" / "seg"
CONFIG = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "lesion_recipe040.toml"
CROPS = ["sub-unf01_T2w_crop", "sub-PAM50small_T2w_crop", "sub-05_acq-MTon_MTS_crop", "sub-unf01_T1w_crop"]
FULL = np.ones((3, 3, 3), bool)


@lru_cache(maxsize=None)
def _case(name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(image, cord, spacing) on the lesion model's grid, cropped 24 voxels around the cord."""
    spec = prep_spec(load_config("lesion", CONFIG))
    prep = preprocess.prepare(sitk.ReadImage(str(SEG / f"{name}.nii.gz")), spec)
    cord = preprocess.mask_to_model_grid(sitk.ReadImage(str(SEG / f"{name}_seg-manual.nii.gz")), prep.grid)
    spacing = tuple(float(s) for s in prep.grid.GetSpacing()[::-1])
    box = preprocess.roi_bbox(cord, (0, 24, 24))
    assert box is not None
    return preprocess.crop(prep.array, box), preprocess.crop(cord, box), spacing  # type: ignore[return-value]


def _local_cord_median(image: np.ndarray, cord: np.ndarray, zs: slice, sz: float) -> float:
    m = int(np.ceil(5.0 / sz))
    slab = slice(max(zs.start - m, 0), zs.stop + m)
    return float(np.median(image[slab][cord[slab] > 0]))


def _lesions(draw: LesionDraw) -> list[tuple[np.ndarray, tuple[slice, ...]]]:
    lab, _ = ndimage.label(draw.lesion, FULL)
    return [(lab == i, sl) for i, sl in enumerate(ndimage.find_objects(lab), start=1)]


@pytest.mark.parametrize("name", CROPS)
def test_draws_keep_the_contract_and_the_promised_ranges(name: str) -> None:
    image, cord, sp = _case(name)
    sz, vox = sp[0], sp[0] * sp[1] * sp[2]
    rng = np.random.default_rng(11)
    n_lesions = 0
    for _ in range(12):
        d = field.generate(rng, image, cord, sp)
        assert d.image.dtype == np.float32 and d.lesion.dtype == np.uint8 and d.cord.dtype == np.uint8
        assert d.image.shape == d.lesion.shape == image.shape
        assert np.array_equal(d.cord, (cord > 0).astype(np.uint8))  # no swelling
        assert not (d.lesion.astype(bool) & (cord == 0)).any()  # the lesion is part of the cord
        assert (d.image >= image).all()  # never darker
        assert np.array_equal(d.image[cord == 0], image[cord == 0])  # nothing painted outside the cord
        assert d.lesion.any()
        for m, sl in _lesions(d):
            n_lesions += 1
            extent = (sl[0].stop - sl[0].start) * sz
            assert field.VOLUME_MM3[0] <= m.sum() * vox <= field.VOLUME_MM3[1]
            assert extent <= field.LENGTH_MM[1] + sz  # 40 mm, plus one slice of partial volume
            assert extent >= (field.LENGTH_MM[0] if sz < field.LENGTH_MM[0] else sz)
            ratio = d.image[m].max() / _local_cord_median(image, cord, sl[0], sz)
            assert ratio >= (field.MIN_RATIO if sz <= 2.0 else 1.1)  # thick slices: partial volume
    assert n_lesions >= 12


def test_brightness_spans_barely_above_cord_to_csf_on_t2w() -> None:
    image, cord, sp = _case("sub-PAM50small_T2w_crop")
    ring = field._ring(cord > 0, sp)
    rng = np.random.default_rng(5)
    ratios, to_csf = [], []
    for _ in range(25):
        d = field.generate(rng, image, cord, sp)
        for m, sl in _lesions(d):
            cm = _local_cord_median(image, cord, sl[0], sp[0])
            slab = slice(max(sl[0].start - 3, 0), sl[0].stop + 3)
            csf = float(np.percentile(image[slab][ring[slab]], 90))
            peak = float(np.percentile(d.image[m], 90))
            ratios.append(peak / cm)
            to_csf.append((peak - cm) / (csf - cm))
    assert min(ratios) < 1.6  # some lesions are barely brighter than the cord
    assert max(to_csf) > 0.85  # some are about as bright as the CSF
    assert max(to_csf) < 1.3  # and none far brighter than the local CSF


def test_dark_csf_falls_back_to_a_ratio() -> None:
    image, cord, sp = _case("sub-unf01_T1w_crop")  # T1w: CSF darker than the cord
    rng = np.random.default_rng(2)
    for _ in range(8):
        d = field.generate(rng, image, cord, sp)
        for m, sl in _lesions(d):
            assert d.image[m].max() >= field.MIN_RATIO * _local_cord_median(image, cord, sl[0], sp[0])


def test_soft_edges_and_thick_slice_partial_volume() -> None:
    """Painted voxels reach beyond the label (the fraction fades), and on 5 mm slices more so."""
    for name, thick in (("sub-PAM50small_T2w_crop", False), ("sub-05_acq-MTon_MTS_crop", True)):
        image, cord, sp = _case(name)
        assert (sp[0] >= 4.0) == thick
        rng = np.random.default_rng(8)
        halo = 0
        for _ in range(6):
            d = field.generate(rng, image, cord, sp)
            brighter = d.image > image + 1e-4
            halo += int((brighter & (d.lesion == 0)).sum())
            assert (brighter[d.lesion > 0]).mean() > 0.9
        assert halo > 0


def test_placement_is_uniform_over_the_cord() -> None:
    """Centre, edge and every column get lesions (no column preference), and lesions vary in count."""
    image, cord, sp = _case("sub-PAM50small_T2w_crop")
    c = cord > 0
    inner = ndimage.binary_erosion(c, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool))
    rng = np.random.default_rng(1)
    cols, edge, counts = [], [], []
    for _ in range(40):
        d = field.generate(rng, image, cord, sp)
        les = _lesions(d)
        counts.append(len(les))
        for m, _ in les:
            zs, ys, xs = np.nonzero(m)
            cy, cx = np.nonzero(c[int(np.median(zs))])
            dy = (ys.mean() - cy.mean()) / max(np.ptp(cy) / 2, 1)
            dx = (xs.mean() - cx.mean()) / max(np.ptp(cx) / 2, 1)
            cols.append("central" if np.hypot(dy, dx) < 0.4 else "dorsal" if dy > abs(dx)
                        else "ventral" if -dy > abs(dx) else "lateral")
            edge.append(bool((m & ~inner).any()))
    share = {k: cols.count(k) / len(cols) for k in ("central", "dorsal", "lateral", "ventral")}
    assert all(v >= 0.05 for v in share.values()), share
    assert share["dorsal"] < 0.5 and share["ventral"] < 0.5
    assert 0.2 < np.mean(edge) < 1.0  # right at the edge, and inside too
    assert min(counts) == 1 and max(counts) >= 3


def test_determinism_for_a_seed() -> None:
    image, cord, sp = _case("sub-unf01_T2w_crop")
    a = field.generate(np.random.default_rng(42), image, cord, sp)
    b = field.generate(np.random.default_rng(42), image, cord, sp)
    c = field.generate(np.random.default_rng(43), image, cord, sp)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.lesion, b.lesion)
    assert not np.array_equal(a.lesion, c.lesion)


def test_empty_or_tiny_cord_returns_the_input() -> None:
    image, cord, sp = _case("sub-unf01_T2w_crop")
    d = field.generate(np.random.default_rng(0), image, np.zeros_like(cord), sp)
    assert np.array_equal(d.image, image) and d.image is not image
    assert not d.lesion.any() and not d.cord.any()
    tiny = np.zeros_like(cord)
    tiny[5, 30, 30:32] = 1
    d = field.generate(np.random.default_rng(0), image, tiny, sp)
    assert np.array_equal(d.image, image) and not d.lesion.any() and np.array_equal(d.cord, tiny)


@pytest.mark.parametrize("shape, sz, limit", [((60, 80, 80), 1.0, 0.3), ((60, 80, 80), 5.0, 0.3),
                                              ((400, 60, 60), 1.0, 1.5)])
def test_fast_enough(shape: tuple[int, int, int], sz: float, limit: float) -> None:
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    cy = shape[1] / 2 + 4 * np.sin(z / 40.0)  # a gently curving cord, 7 x 10 mm
    cord = (((y - cy) / 4.5) ** 2 + ((x - shape[2] / 2) / 6.5) ** 2 <= 1).astype(np.uint8)
    image = (0.1 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    ring = (((y - cy) / 8.0) ** 2 + ((x - shape[2] / 2) / 10.0) ** 2 <= 1) & (cord == 0)
    image[ring], image[cord > 0] = 0.9, 0.35
    best = np.inf
    for seed in range(3):
        t = time.perf_counter()
        d = field.generate(np.random.default_rng(seed), image, cord, (sz, 0.8, 0.8))
        best = min(best, time.perf_counter() - t)
        assert d.lesion.any()
    assert best <= limit
