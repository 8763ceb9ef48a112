"""sci_node.pipeline.series: DICOM files -> SimpleITK volume in LPS, ordering, rejection reasons, codecs."""
from __future__ import annotations

import random
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from sci_node.errors import InvalidSeriesError
from sci_node.pipeline.series import find_dicom_files, read_series

REPO = Path(__file__).resolve().parent.parent
AXIAL = REPO / "tests" / "data" / "series" / "unf01_axial_T2w"


def _mr_small() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("MR_small.dcm"))


def _stack(tmp: Path, n: int = 6, step: float = 2.5, iop: list[float] | None = None) -> list[Path]:
    """``n`` copies of MR_small along the slice normal; slice k has pixel values + 100*k.

    Files are written in shuffled order with shuffled InstanceNumbers.
    """
    base = _mr_small()
    iop = iop or [float(v) for v in base.ImageOrientationPatient]
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([float(v) for v in base.ImagePositionPatient])
    series_uid = generate_uid()
    numbers = list(range(1, n + 1))
    random.Random(4).shuffle(numbers)
    order = list(range(n))
    random.Random(7).shuffle(order)
    paths = []
    for k in order:
        ds = _mr_small()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [float(v) for v in origin + k * step * normal]
        ds.InstanceNumber = numbers[k]
        ds.PixelData = (ds.pixel_array + 100 * k).astype(np.int16).tobytes()
        path = tmp / f"f{len(paths):02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_sorted_by_position_not_instance_number(tmp_path: Path) -> None:
    paths = _stack(tmp_path)
    vol = read_series(paths)
    arr = sitk.GetArrayFromImage(vol.image)
    base = _mr_small().pixel_array.astype(np.float32)
    assert arr.shape == (6, 64, 64)
    for k in range(6):
        np.testing.assert_array_equal(arr[k], base + 100 * k)
    assert vol.image.GetSpacing() == pytest.approx((0.3125, 0.3125, 2.5))
    assert vol.image.GetOrigin() == pytest.approx((-83.9063, -91.2, 6.6406))
    assert vol.image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    # slice k references the instance whose position is k
    for k, ref in enumerate(vol.refs):
        ds = next(d for d in vol.datasets if d.SOPInstanceUID == ref.sop_instance_uid)
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(6.6406 + 2.5 * k)
        assert ref.frame_number is None


def test_oblique_reversed_normal_geometry_matches_nifti_mask() -> None:
    """The committed oblique axial series maps its manual mask (NIfTI, RAS) voxel for voxel."""
    vol = read_series(sorted(AXIAL.glob("*.dcm")))
    mask = sitk.ReadImage(str(AXIAL / "cord_mask.nii.gz"))
    on_grid = sitk.Resample(mask, vol.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert int(sitk.GetArrayFromImage(on_grid).sum()) == int(sitk.GetArrayFromImage(mask).sum()) == 1227
    assert vol.image.GetSize() == (131, 141, 16)


@pytest.mark.parametrize("mutate,reason", [
    ("duplicate", "duplicate slice position"),
    ("orientation", "mixed orientations"),
    ("size", "mixed image sizes"),
    ("gap", "non-uniform slice spacing"),
    ("spacing", "mixed pixel spacings"),
])
def test_bad_series_rejected_with_reason(tmp_path: Path, mutate: str, reason: str) -> None:
    paths = sorted(_stack(tmp_path, n=5))
    ds = pydicom.dcmread(paths[0])
    if mutate == "duplicate":
        other = pydicom.dcmread(paths[1])
        ds.ImagePositionPatient = other.ImagePositionPatient
    elif mutate == "orientation":
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    elif mutate == "size":
        ds.PixelData = ds.pixel_array[:32].tobytes()
        ds.Rows = 32
    elif mutate == "gap":
        pos = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in paths]
        # 3.7 mm past the last slice: not a whole number of 2.5 mm steps (missing slices would be)
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], max(pos) + 3.7]
    elif mutate == "spacing":
        ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(paths[0], enforce_file_format=True)
    with pytest.raises(InvalidSeriesError, match=reason):
        read_series(paths)


def test_missing_slices_interpolated_and_referenced_as_missing(tmp_path: Path) -> None:
    paths = _stack(tmp_path, n=8)
    by_z = sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    kept = [p for i, p in enumerate(by_z) if i not in (3, 5)]  # two interior slices never arrived
    vol = read_series(kept)
    arr = sitk.GetArrayFromImage(vol.image)
    base = _mr_small().pixel_array.astype(np.float32)
    assert arr.shape == (8, 64, 64) and vol.image.GetSpacing()[2] == pytest.approx(2.5)
    assert vol.missing == (3, 5) and [r is None for r in vol.refs].count(True) == 2
    for k in (0, 1, 2, 4, 6, 7):  # present slices are the data; missing ones the mean of their neighbours
        np.testing.assert_array_equal(arr[k], base + 100 * k)
        assert vol.refs[k] is not None
        assert float(next(d for d in vol.datasets if d.SOPInstanceUID == vol.refs[k].sop_instance_uid)
                     .ImagePositionPatient[2]) == pytest.approx(6.6406 + 2.5 * k)
    np.testing.assert_allclose(arr[3], base + 300, rtol=1e-6)
    np.testing.assert_allclose(arr[5], base + 500, rtol=1e-6)
    assert len(vol.datasets) == 6
    with pytest.raises(InvalidSeriesError, match="missing"):
        read_series(kept, max_missing_fraction=0.0)


def test_series_missing_most_slices_refused(tmp_path: Path) -> None:
    paths = _stack(tmp_path, n=10)
    by_z = sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    with pytest.raises(InvalidSeriesError,
                       match=r"too many missing slices: 6 of 10 .* \(60 %, more than max_missing_fraction 0.25\)"):
        read_series([by_z[0], by_z[4], by_z[6], by_z[9]])


def test_mixed_series_rejected(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    a = _stack(tmp_path / "a", n=2)
    (tmp_path / "b").mkdir()
    b = _stack(tmp_path / "b", n=2)
    with pytest.raises(InvalidSeriesError, match="different series"):
        read_series(a + b)
    groups = find_dicom_files(tmp_path)
    assert sorted(len(v) for v in groups.values()) == [2, 2]


def _deflated(tmp: Path) -> Path:
    ds = _mr_small()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp / "deflate.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _dcmcjpeg(tmp: Path, flag: str) -> Path:
    out = tmp / f"jpeg{flag}.dcm"
    subprocess.run(["dcmcjpeg", flag, get_testdata_file("MR_small.dcm"), str(out)], check=True, timeout=60)
    return out


@pytest.mark.parametrize("variant", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
                                     "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "deflate",
                                     "--encode-lossless-sv1", "--encode-extended"])
def test_compressed_transfer_syntaxes_decode(tmp_path: Path, variant: str) -> None:
    if variant == "deflate":
        path = _deflated(tmp_path)
    elif variant.startswith("--"):
        path = _dcmcjpeg(tmp_path, variant)  # real dcmtk encoder: JPEG lossless SV1 / JPEG extended (lossy)
    else:
        path = Path(get_testdata_file(variant))
    ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    vol = read_series([path])
    arr = sitk.GetArrayFromImage(vol.image)[0]
    ref = _mr_small().pixel_array.astype(np.float32)
    assert arr.shape == (64, 64)
    if ts.is_compressed and variant == "--encode-extended":  # lossy
        assert np.corrcoef(arr.ravel(), ref.ravel())[0, 1] > 0.99
    else:
        np.testing.assert_array_equal(arr, ref)


def test_rescale_slope_intercept_applied(tmp_path: Path) -> None:
    paths = _stack(tmp_path, n=2)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -10
        ds.save_as(p, enforce_file_format=True)
    vol = read_series(paths)
    arr = sitk.GetArrayFromImage(vol.image)
    np.testing.assert_allclose(arr[0], _mr_small().pixel_array * 0.5 - 10)


def test_enhanced_multiframe_matches_single_frames(tmp_path: Path) -> None:
    files = sorted(AXIAL.glob("*.dcm"))
    single = read_series(files)
    legacy = [pydicom.dcmread(f) for f in files]
    random.Random(1).shuffle(legacy)
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy, series_instance_uid=generate_uid(), series_number=90, sop_instance_uid=generate_uid(),
        instance_number=1)
    path = tmp_path / "enhanced.dcm"
    mf.save_as(path, enforce_file_format=True)
    vol = read_series([path])
    assert vol.multiframe and len(vol.datasets) == 1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(vol.image), sitk.GetArrayFromImage(single.image))
    assert vol.image.GetOrigin() == pytest.approx(single.image.GetOrigin(), abs=1e-4)
    assert vol.image.GetSpacing() == pytest.approx(single.image.GetSpacing(), abs=1e-4)
    assert vol.image.GetDirection() == pytest.approx(single.image.GetDirection(), abs=1e-6)
    assert sorted(r.frame_number for r in vol.refs) == list(range(1, 17))
