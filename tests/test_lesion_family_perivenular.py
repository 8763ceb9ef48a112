"""Lesion family "perivenular" (issue 34): lesions around radial / sulcal veins, contrast-to-noise intensity.

Real behaviour on the committed real crops (through the inference preprocessing and the lesion model's
cord-centred crop, as ``trainer.seg.load_volumes`` does; the 5 mm MT-weighted crop is the thick-slice
case, the T1w crop has CSF darker than the cord) and on synthetic cords on a thick-slice grid, a
sagittal-like grid (thin, long Z) and a 0.3 mm in-plane grid.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from sci_node.imaging import preprocess
from trainer.lesion_families import FAMILIES, family_generator
from trainer.lesion_families import perivenular as pv
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


def _synthetic(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """A gently curving 9 x 12 mm elliptic cord (0.35) in a CSF ring (0.9), noise SD 0.02."""
    sz, sy, sx = spacing
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    cy = shape[1] / 2 + (3.0 / sy) * np.sin(z * sz / 40.0)
    ey, ex = (y - cy) * sy, (x - shape[2] / 2) * sx
    cord = ((ey / 4.5) ** 2 + (ex / 6.0) ** 2 <= 1).astype(np.uint8)
    ring = ((ey / 7.5) ** 2 + (ex / 9.0) ** 2 <= 1) & (cord == 0)
    image = np.full(shape, 0.1, np.float32)
    image[ring], image[cord > 0] = 0.9, 0.35
    image += (0.02 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)
    return np.clip(image, 0.0, 1.5).astype(np.float32), cord


def _lesions(draw: LesionDraw) -> list[tuple[np.ndarray, tuple[slice, ...]]]:
    lab, _ = ndimage.label(draw.lesion, FULL)
    return [(lab == i, sl) for i, sl in enumerate(ndimage.find_objects(lab), start=1)]


def _check_contract(d: LesionDraw, image: np.ndarray, cord: np.ndarray, sp: tuple[float, float, float]) -> int:
    """The base contract and the promised ranges of one draw; returns its number of lesions."""
    sz, vox = sp[0], sp[0] * sp[1] * sp[2]
    assert d.image.dtype == np.float32 and d.lesion.dtype == np.uint8 and d.cord.dtype == np.uint8
    assert d.image.shape == d.lesion.shape == image.shape
    assert np.array_equal(d.cord, (cord > 0).astype(np.uint8))  # no swelling
    assert not (d.lesion.astype(bool) & (cord == 0)).any()
    assert (d.image >= image).all() and d.image.max() <= max(1.5, float(image.max()))
    assert np.array_equal(d.image[cord == 0], image[cord == 0])  # nothing painted outside the cord
    area = np.maximum((cord > 0).sum(axis=(1, 2)), 1)
    les = _lesions(d)
    for m, sl in les:
        extent = (sl[0].stop - sl[0].start) * sz
        assert pv.VOLUME_MM3[0] <= m.sum() * vox <= pv.VOLUME_MM3[1] * 1.001
        assert min(sz, pv.LENGTH_MM[0] - 1.0) <= extent <= pv.LENGTH_MM[1] + 2 * sz
        assert (m.sum(axis=(1, 2)) <= pv.MAX_AREA_FRACTION * area).all()
    return len(les)


@pytest.mark.parametrize("name", CROPS)
def test_real_crops_keep_the_contract_and_the_ranges(name: str) -> None:
    image, cord, sp = _case(name)
    rng = np.random.default_rng(11)
    counts = [_check_contract(pv.generate(rng, image, cord, sp), image, cord, sp) for _ in range(15)]
    assert min(counts) >= 1 and max(counts) >= 2  # multifocal sometimes


@pytest.mark.parametrize("shape, spacing", [((20, 60, 60), (5.0, 0.8, 0.8)),      # thick axial slices
                                            ((12, 60, 60), (7.5, 0.8, 0.8)),      # thickest in the data
                                            ((300, 50, 50), (0.5, 0.8, 0.8)),     # sagittal-like: thin, long Z
                                            ((40, 150, 150), (1.0, 0.3, 0.3))])   # 0.3 mm in plane
def test_synthetic_grids(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    image, cord = _synthetic(shape, spacing)
    rng = np.random.default_rng(3)
    assert sum(_check_contract(pv.generate(rng, image, cord, spacing), image, cord, spacing)
               for _ in range(10)) >= 10


def test_contrast_is_cnr_times_the_local_noise_down_to_faint() -> None:
    """The lesion's mean sits CNR x sigma above the local cord median, CNR 2-15, many faint ones."""
    image, cord, sp = _case("sub-PAM50small_T2w_crop")
    rng = np.random.default_rng(5)
    cnrs = []
    for _ in range(30):
        d = pv.generate(rng, image, cord, sp)
        for m, sl in _lesions(d):
            med, sigma, cap = pv.local_levels(image, cord > 0, sl, sp)  # type: ignore[arg-type]
            cnr = (float(d.image[m].mean()) - med) / sigma
            assert cnr > 0.9  # above the local cord (partial volume and the CSF cap can take a little)
            assert cnr <= pv.CNR[1] * 1.05
            assert d.image[m].max() <= max(cap, float(image[m].max())) + 1e-5
            cnrs.append(cnr)
    assert np.median(cnrs) < 7.0 and min(cnrs) < 3.5  # skewed to faint lesions
    assert max(cnrs) > 7.0


def test_noise_estimate_follows_the_noise() -> None:
    sp = (1.0, 0.8, 0.8)
    box = (slice(20, 30), slice(0, 60), slice(0, 60))
    for sd in (0.01, 0.03, 0.06):
        image, cord = _synthetic((50, 60, 60), sp)
        image = (0.35 + sd * np.random.default_rng(1).standard_normal(image.shape)).astype(np.float32)
        _, sigma, _ = pv.local_levels(image, cord > 0, box, sp)
        assert sigma == pytest.approx(max(sd, pv.NOISE_FLOOR * 0.35), rel=0.15)


def test_dark_csf_caps_at_twice_the_cord() -> None:
    image, cord, sp = _case("sub-unf01_T1w_crop")  # T1w: CSF darker than the cord
    rng = np.random.default_rng(2)
    for _ in range(8):
        d = pv.generate(rng, image, cord, sp)
        for m, sl in _lesions(d):
            med, _, cap = pv.local_levels(image, cord > 0, sl, sp)  # type: ignore[arg-type]
            assert cap == pytest.approx(pv.DARK_CSF_CAP * med)
            assert d.image[m].mean() > med


def test_placement_is_perivenular_dorsal_lateral_and_mostly_subpial() -> None:
    image, cord = _synthetic((80, 60, 60), (1.0, 0.8, 0.8))
    sp = (1.0, 0.8, 0.8)
    c = cord > 0
    inner = ndimage.binary_erosion(c, structure=np.ones((1, 3, 3), bool))
    rng = np.random.default_rng(1)
    cols: list[str] = []
    edge: list[bool] = []
    for _ in range(40):
        for m, _ in _lesions(pv.generate(rng, image, cord, sp)):
            zs, ys, xs = np.nonzero(m)
            cy, cx = np.nonzero(c[int(np.median(zs))])
            dy = (ys.mean() - cy.mean()) / max(np.ptp(cy) / 2, 1)
            dx = (xs.mean() - cx.mean()) / max(np.ptp(cx) / 2, 1)
            cols.append("central" if np.hypot(dy, dx) < 0.5 else "dorsal" if dy > abs(dx)
                        else "ventral" if -dy > abs(dx) else "lateral")
            edge.append(bool((m & ~inner).any()))
    share = {k: cols.count(k) / len(cols) for k in ("central", "dorsal", "lateral", "ventral")}
    assert share["dorsal"] + share["lateral"] > 0.6, share
    assert share["ventral"] < share["dorsal"] and share["ventral"] < share["lateral"], share
    assert share["central"] > 0.03, share
    assert 0.65 < np.mean(edge) < 1.0  # most subpial, some deep


def test_thick_slices_carry_partial_volume() -> None:
    """On 5 mm slices painted voxels fade beyond the label (the lesion's fraction per voxel)."""
    sp = (5.0, 0.8, 0.8)
    image, cord = _synthetic((20, 60, 60), sp)
    rng = np.random.default_rng(8)
    halo = 0
    for _ in range(8):
        d = pv.generate(rng, image, cord, sp)
        brighter = d.image > image + 1e-4
        halo += int((brighter & (d.lesion == 0)).sum())
        assert brighter[d.lesion > 0].mean() > 0.9
    assert halo > 0


def test_determinism_for_a_seed() -> None:
    image, cord, sp = _case("sub-unf01_T2w_crop")
    a = pv.generate(np.random.default_rng(42), image, cord, sp)
    b = pv.generate(np.random.default_rng(42), image, cord, sp)
    c = pv.generate(np.random.default_rng(43), image, cord, sp)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.lesion, b.lesion)
    assert not np.array_equal(a.lesion, c.lesion)


def test_empty_or_tiny_cord_returns_the_input() -> None:
    image, cord, sp = _case("sub-unf01_T2w_crop")
    d = pv.generate(np.random.default_rng(0), image, np.zeros_like(cord), sp)
    assert np.array_equal(d.image, image) and d.image is not image
    assert not d.lesion.any() and not d.cord.any()
    tiny = np.zeros_like(cord)
    tiny[5, 30, 30:32] = 1
    d = pv.generate(np.random.default_rng(0), image, tiny, sp)
    assert np.array_equal(d.image, image) and not d.lesion.any() and np.array_equal(d.cord, tiny)


def test_registered() -> None:
    assert "perivenular" in FAMILIES and pv.FAMILY == "perivenular"
    assert family_generator("perivenular") is pv.generate
