"""Key slices and outlines of the findings (sci_node.pipeline.key_slices): pure geometry on small masks."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.path import Path as Polygon

from sci_node.imaging.measure import index_to_lps, summarize
from sci_node.pipeline.key_slices import (
    CORD_FINDING,
    key_images,
    key_slice,
    lesion_key_slices,
    nearest_acquired,
    outline,
    slice_counts,
    viewer_record,
)
from sci_node.pipeline.series import SourceRef


def _inside(poly_rc: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The pixels whose centres the ``(row, column)`` polygon encloses."""
    rows, cols = np.indices(shape)
    centres = np.column_stack([rows.ravel() + 0.5, cols.ravel() + 0.5])
    return Polygon(poly_rc).contains_points(centres).reshape(shape)


def test_outline_of_one_pixel_is_its_four_corners_clockwise() -> None:
    mask = np.zeros((3, 4), dtype=bool)
    mask[1, 2] = True
    np.testing.assert_array_equal(outline(mask), [[1, 2], [1, 3], [2, 3], [2, 2], [1, 2]])


def test_outline_follows_an_l_shape_without_collinear_corners() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:5, 1:3] = True
    mask[3:5, 3:5] = True
    poly = outline(mask)
    np.testing.assert_array_equal(poly[0], poly[-1])
    assert len(poly) == 7  # 6 corners of an L, closed
    np.testing.assert_array_equal(_inside(poly, mask.shape), mask)


def test_outline_takes_the_largest_piece_and_fills_its_holes() -> None:
    mask = np.zeros((9, 9), dtype=bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # a hole
    mask[7, 7] = True   # a stray pixel
    mask[6, 6] = True   # touches the square only at a corner: another 4-connected piece
    poly = outline(mask)
    filled = np.zeros_like(mask)
    filled[1:6, 1:6] = True
    np.testing.assert_array_equal(_inside(poly, mask.shape), filled)
    with pytest.raises(ValueError):
        outline(np.zeros((2, 2), dtype=bool))


def test_key_slice_is_the_acquired_slice_with_most_voxels() -> None:
    mask = np.zeros((5, 8, 8), dtype=np.uint8)
    mask[1, 2:4, 2:4] = 1      # 4 voxels
    mask[2, 2:5, 2:5] = 1      # 9 voxels: the key slice
    mask[3, 1:7, 1:7] = 1      # 36 voxels, but slice 3 is missing (interpolated)
    acquired = np.array([True, True, True, False, True])
    assert slice_counts(mask).tolist() == [0, 4, 9, 36, 0]
    key = key_slice(mask, acquired)
    assert key is not None and (key.index, key.voxels) == (2, 9)
    np.testing.assert_array_equal(_inside(key.outline, (8, 8)), mask[2] > 0)
    assert key_slice(np.zeros_like(mask), acquired) is None


def test_object_only_on_a_missing_slice_is_drawn_on_the_nearest_acquired_one() -> None:
    mask = np.zeros((5, 6, 6), dtype=np.uint8)
    mask[3, 2:4, 2:4] = 1
    acquired = np.array([True, True, True, False, True])
    key = key_slice(mask, acquired)
    assert key is not None and key.index == 2 and key.voxels == 4  # 2 and 4 are both 1 away: the lower one
    np.testing.assert_array_equal(_inside(key.outline, (6, 6)), mask[3] > 0)
    assert nearest_acquired(3, np.array([False, False, False, False, True])) == 4


def _axial_volume(n: int = 12, size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An axial cord (a square column) with a large lesion low and a small one high, 1 mm voxels."""
    cord = np.zeros((n, size, size), dtype=np.uint8)
    cord[:, 5:11, 5:11] = 1
    lesion = np.zeros_like(cord)
    lesion[8:11, 6:9, 6:9] = 1     # 27 voxels, largest on its middle slices
    lesion[8, 6:10, 6:10] = 1      # ... and on slice 8 (16 voxels there)
    lesion[2:4, 8:10, 8:10] = 1    # 8 voxels
    m = index_to_lps((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return cord, lesion, m


def test_lesion_key_slices_follow_the_measured_lesion_ids() -> None:
    cord, lesion, m = _axial_volume()
    rows = summarize(cord, lesion, m)["lesions"]
    assert [(r["id"], r["voxels"]) for r in rows] == [(1, 34), (2, 8)]
    keys = lesion_key_slices(lesion, rows, np.ones(len(cord), dtype=bool))
    assert (keys[1].index, keys[1].voxels) == (8, 16)
    assert (keys[2].index, keys[2].voxels) == (2, 4)
    # a row that is not a component of this mask is left out, not drawn somewhere else
    assert lesion_key_slices(lesion, [{"id": 1, "voxels": 99}], np.ones(len(cord), dtype=bool)) == {}


class _Volume:
    """What key_images reads of a SeriesVolume: one SourceRef per slice (None = missing)."""

    def __init__(self, n: int, missing: tuple[int, ...] = ()) -> None:
        self.refs = tuple(None if z in missing else SourceRef("1.2.840.10008.5.1.4.1.1.4", f"1.2.3.{z}")
                          for z in range(n))


def test_key_images_list_lesions_by_id_then_the_cord_and_record_the_opening() -> None:
    cord, lesion, m = _axial_volume()
    rows = summarize(cord, lesion, m)["lesions"]
    images = key_images(_Volume(len(cord)), cord, lesion, rows)  # type: ignore[arg-type]
    assert [im.finding for im in images] == ["Lesion 1", "Lesion 2", CORD_FINDING]
    assert [im.source.sop_instance_uid for im in images] == ["1.2.3.8", "1.2.3.2", "1.2.3.0"]
    record = viewer_record(images, "9.9")
    assert record["sr_series_uid"] == "9.9"
    assert record["opening"] == {"finding": "Lesion 1", "sop_instance_uid": "1.2.3.8", "frame": None, "slice": 8}
    assert [r["finding"] for r in record["images"]] == ["Lesion 1", "Lesion 2", "Spinal cord"]
    # without lesions (or not assessed) the cord opens; slice 0 missing: the first acquired slice with most cord
    only_cord = key_images(_Volume(len(cord), missing=(0,)), cord, None, [])  # type: ignore[arg-type]
    assert [(im.finding, im.key.index) for im in only_cord] == [(CORD_FINDING, 1)]
    assert key_images(_Volume(len(cord)), np.zeros_like(cord), None, []) == []  # type: ignore[arg-type]
