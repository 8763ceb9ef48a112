"""sci_node.imaging.measure on synthetic cords with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from sci_node.imaging.measure import cord_profile, index_to_lps, lesion_table, si_axis, summarize

AXIAL = index_to_lps((0.0, 0.0, 0.0), (0.5, 0.5, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))  # z = S
SAGITTAL = index_to_lps((0.0, 0.0, 0.0), (0.5, 1.0, 0.5), (0, 0, -1, 1, 0, 0, 0, -1, 0))  # rows = I


def _cylinder(shape: tuple[int, int, int], radius_vox: float, axis: int, tilt: float = 0.0) -> np.ndarray:
    zz, yy, xx = np.indices(shape, dtype=float)
    grids = [zz, yy, xx]
    along = grids[axis]
    a, b = [g for i, g in enumerate(grids) if i != axis]
    ca, cb = (shape[i] / 2 for i in range(3) if i != axis)
    return (((a - ca - tilt * (along - shape[axis] / 2)) ** 2 + (b - cb) ** 2) <= radius_vox ** 2).astype(np.uint8)


def test_axial_cylinder_csa_length_and_lesions() -> None:
    cord = _cylinder((40, 40, 40), 6, axis=0)  # radius 3 mm at 0.5 mm
    lesion = np.zeros_like(cord)
    lesion[10:15, 18:22, 18:22] = 1  # 5 slices, 80 voxels of 0.25 mm3
    lesion[30:31, 20:21, 20:21] = 1
    s = summarize(cord, lesion, AXIAL)
    assert s["si_axis"] == 0
    assert s["csa_mm2"]["mean"] == pytest.approx(np.pi * 9, rel=0.1)
    assert s["cord_length_mm"] == pytest.approx(40.0, abs=0.5)
    assert s["lesion_count"] == 2
    big, small = s["lesions"]
    assert (big["id"], big["volume_mm3"], big["length_along_cord_mm"]) == (1, pytest.approx(20.0), pytest.approx(5.0))
    assert small["volume_mm3"] == pytest.approx(0.25) and small["length_along_cord_mm"] == pytest.approx(1.0)


def test_tilted_cord_csa_is_angle_corrected() -> None:
    straight = cord_profile(_cylinder((60, 60, 60), 8, axis=0), AXIAL).csa.mean()
    tilted = cord_profile(_cylinder((60, 60, 60), 8, axis=0, tilt=np.tan(np.radians(30)) * 2), AXIAL)
    # a sheared stack of equal axial discs, tilted 30 degrees: its axial slab area is A, so the
    # area perpendicular to its centre line is A * cos(30 degrees)
    assert tilted.csa[5:-5].mean() == pytest.approx(straight * np.cos(np.radians(30)), rel=0.05)


def test_sagittal_si_axis_is_rows() -> None:
    assert si_axis(SAGITTAL) == 1
    cord = _cylinder((20, 80, 20), 4, axis=1)
    s = summarize(cord, None, SAGITTAL)
    assert s["csa_mm2"]["mean"] == pytest.approx(np.pi * 4, rel=0.15)
    assert s["cord_length_mm"] == pytest.approx(80.0, abs=0.5)
    assert s["lesion_count"] is None and s["lesion_volume_mm3"] is None  # lesion model not run: not assessed
    assert summarize(cord, np.zeros_like(cord), SAGITTAL)["lesion_count"] == 0  # run, none found
    assert lesion_table(np.zeros_like(cord), cord_profile(cord, SAGITTAL), SAGITTAL) == []
