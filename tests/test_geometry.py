"""The one DICOM geometry reader (sci_node.dicom.geometry) and its one set of tolerances.

Completion (headers only), series loading (pixels) and the corrections (a SEG against its source
grid) read slice geometry through it; a series now passes or fails all three alike.
"""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from sci_node.dicom import geometry
from sci_node.dicom.completion import check_series
from sci_node.errors import InvalidSeriesError
from sci_node.pipeline.series import read_series

from conftest import make_mr_series

AXIAL = Path(__file__).parent / "data" / "series" / "unf01_axial_T2w"


def test_single_frame_headers_and_problems(tmp_path: Path) -> None:
    ds = pydicom.dcmread(make_mr_series(tmp_path, n=1)[0])
    (h,) = geometry.slice_headers(ds, "a.dcm")
    assert h.problem is None and h.frame is None and h.source == "a.dcm"
    assert h.orientation == pytest.approx(tuple(float(v) for v in ds.ImageOrientationPatient))
    assert h.spacing == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))
    assert (h.rows, h.cols) == (int(ds.Rows), int(ds.Columns))
    del ds.ImageOrientationPatient
    (h,) = geometry.slice_headers(ds)
    assert h.orientation is None and h.problem == f"instance {ds.SOPInstanceUID} has no ImageOrientationPatient"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1]
    (h,) = geometry.slice_headers(ds)
    assert h.orientation is None and "ImageOrientationPatient" in h.problem and "is not 6 numbers" in h.problem


def test_multiframe_headers_read_the_functional_groups(tmp_path: Path) -> None:
    files = sorted(AXIAL.glob("*.dcm"))
    singles = [h for f in files for h in geometry.slice_headers(pydicom.dcmread(f))]
    mf = hd.legacy.LegacyConvertedEnhancedMRImage([pydicom.dcmread(f) for f in files],
                                                  series_instance_uid=generate_uid(), series_number=90,
                                                  sop_instance_uid=generate_uid(), instance_number=1)
    frames = geometry.slice_headers(mf, "mf.dcm")
    assert [h.frame for h in frames] == list(range(1, len(files) + 1))
    assert frames[0].source == "mf.dcm#1" and all(h.problem is None for h in frames)
    by_z = sorted(singles, key=lambda h: h.position[2])
    for a, b in zip(sorted(frames, key=lambda h: h.position[2]), by_z):
        assert a.position == pytest.approx(b.position, abs=1e-4)
        assert geometry.same_orientation(a.orientation, b.orientation)
        assert a.spacing == pytest.approx(b.spacing)


def test_completion_and_loading_share_the_orientation_tolerance(tmp_path: Path) -> None:
    """Cosines 5e-4 apart: completion used to accept them (1e-3) and loading refuse them (1e-4)."""
    files = make_mr_series(tmp_path / "s", n=4)
    ds = pydicom.dcmread(files[2])
    iop = [float(v) for v in ds.ImageOrientationPatient]
    iop[1] += 5e-4
    ds.ImageOrientationPatient = iop
    ds.save_as(files[2], enforce_file_format=True)
    _, reason = check_series(files)
    assert reason and "mixed orientations" in reason
    with pytest.raises(InvalidSeriesError, match="mixed orientations"):
        read_series(files)
    iop[1] -= 5e-4 - 5e-5  # within the one tolerance: both accept
    ds.ImageOrientationPatient = iop
    ds.save_as(files[2], enforce_file_format=True)
    assert check_series(files)[1] is None
    assert read_series(files).image.GetSize()[2] == 4


def test_volume_geometry_places_positions_on_slices() -> None:
    vol = read_series(sorted(AXIAL.glob("*.dcm")))
    geom = geometry.VolumeGeometry.of(vol.image)
    origin, step = np.asarray(vol.image.GetOrigin()), vol.image.GetSpacing()[2]
    normal = geom.direction[:, 2]
    assert geom.slice_of(origin) == 0
    assert geom.slice_of(origin + 3 * step * normal + 0.5 * geometry.GRID_TOL_MM * normal) == 3
    assert geom.slice_of(origin + 3 * step * normal + 2 * geometry.GRID_TOL_MM * normal) is None
    assert geom.slice_of(origin - step * normal) is None
