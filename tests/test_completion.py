"""Series completion: the pure geometry check and the header adapter on real files."""
from __future__ import annotations

from pathlib import Path

import pydicom

from sci_node.dicom.completion import check_geometry, check_series
from sci_node.dicom.geometry import SliceHeader

from conftest import make_mr_series


def test_geometry_check() -> None:
    ax = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    sl = [SliceHeader(f"s{i}", ax, (0.0, 0.0, z), 64, 64) for i, z in enumerate((0, 1, 2, 3, 6, 7))]
    report, reason = check_geometry(sl)
    assert reason is None and report["slice_step_mm"] == 1.0
    assert report["gaps"] == [{"after_mm": 3.0, "step_mm": 3.0}]
    _, reason = check_geometry(sl + [SliceHeader("dup", ax, (0.0, 0.0, 2.0), 64, 64)])
    assert reason and "duplicate slice positions" in reason
    _, reason = check_geometry(sl + [SliceHeader("sag", (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (0, 0, 9.0), 64, 64)])
    assert reason and "mixed orientations" in reason
    _, reason = check_geometry(sl + [SliceHeader("big", ax, (0.0, 0.0, 9.0), 128, 128)])
    assert reason and "inconsistent matrix sizes" in reason
    _, reason = check_geometry([SliceHeader("nogeo", None, None, 64, 64)])
    assert reason and "missing ImageOrientationPatient" in reason




def test_check_series_on_files(tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "s", n=5, step_mm=2.0)
    report, reason = check_series(files)
    assert reason is None and report["n_slices"] == 5 and report["slice_step_mm"] == 2.0
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    ds.save_as(files[2])
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    report, reason = check_series([*files, tmp_path / "junk.dcm"])
    assert reason and "duplicate slice positions" in reason and len(report["unreadable"]) == 1
