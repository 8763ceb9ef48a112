"""DICOM instances of one series -> one ``SimpleITK.Image`` in patient LPS, exact geometry.

Slices are ordered by their ImagePositionPatient projected on the slice normal
(``row_cosine x column_cosine``), never by InstanceNumber. A series is refused with an
:class:`~sci_node.errors.InvalidSeriesError` naming the reason when its slices do not form
one regular grid: mixed orientations, sizes or pixel spacings, duplicate positions,
non-uniform slice spacing (a gap that is not a whole number of steps), positions not stacked
along the normal (shear / gantry tilt), or more than ``max_missing_fraction`` of the grid
missing. Each slice's geometry comes from the node's one header reader,
:func:`sci_node.dicom.geometry.slice_headers`, and is judged with its tolerances (the same
that series completion and the corrections use).

Missing slices (a gap of k steps: k - 1 slices the sender never sent or we refused) do not
stop processing: the volume is the full regular grid, a missing slice is interpolated
linearly between its present neighbours so the models see a regular volume, and its
:attr:`SeriesVolume.refs` entry is None, so no result ever references an instance that does
not exist (the SEG gets no frame there).

Single-frame MR/CT-like images and multi-frame Enhanced (or Legacy Converted Enhanced)
images are supported; for the latter every frame's position, orientation, spacing and
rescale come from the per-frame or shared functional groups. Compressed transfer syntaxes
decode through pydicom's pixel-data plugins (pylibjpeg, pyjpegls, RLE, deflate).

Each slice of the volume keeps a :class:`SourceRef` (SOP Class, SOP Instance, frame number)
so the DICOM-SEG can reference exactly the instance (and frame) it was derived from.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from sci_node.dicom.geometry import (
    GRID_TOL_MM,
    ORIENTATION_TOL,
    SAME_POSITION_MM,
    SPACING_RTOL,
    SPACING_TOL_MM,
    UNIT_TOL,
    SliceHeader,
    functional_group,
    is_multiframe,
    slice_headers,
)
from sci_node.errors import InvalidDatasetError, InvalidSeriesError

#: Default largest fraction of the regular slice grid that may be missing (see ``NodeConfig``).
MAX_MISSING_FRACTION = 0.25


@dataclass(frozen=True)
class SourceRef:
    """Where one slice of the volume came from.

    ``frame_number`` is the 1-based frame of a multi-frame instance, ``None`` for a
    single-frame instance.
    """

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None


@dataclass(frozen=True)
class _Slice:
    position: np.ndarray  # (3,) LPS mm, centre of the first transmitted pixel
    orientation: np.ndarray  # (6,) row cosine then column cosine
    shape: tuple[int, int]  # (rows, columns)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float | None
    ref: SourceRef
    dataset: Dataset
    pixels: Callable[[], np.ndarray]  # -> (rows, columns) float32, rescaled


@dataclass(frozen=True)
class SeriesVolume:
    """A series as a volume plus what is needed to write results back.

    Attributes
    ----------
    image
        float32 ``SimpleITK.Image`` in patient LPS; array order ``(Z, Y, X)`` =
        (slice, row, column); slice ``k`` is ``refs[k]``.
    refs
        One :class:`SourceRef` per slice, in volume order; None for a slice missing from the
        series (interpolated; the first and last slices are always present).
    datasets
        The distinct source datasets (file order of first use in the sorted volume),
        pixel data included; pass these to highdicom.
    """

    image: sitk.Image
    refs: tuple[SourceRef | None, ...]
    datasets: tuple[Dataset, ...]

    @property
    def missing(self) -> tuple[int, ...]:
        """Volume indices ``z`` of the slices the series lacks (interpolated), ascending."""
        return tuple(z for z, ref in enumerate(self.refs) if ref is None)

    @property
    def first(self) -> Dataset:
        """The dataset of the first slice (for header evidence and study attributes)."""
        return self.datasets[0]

    @property
    def multiframe(self) -> bool:
        """True when the slices are frames of a multi-frame instance."""
        return self.refs[0] is not None and self.refs[0].frame_number is not None


def read_series(files: Sequence[Path], max_missing_fraction: float = MAX_MISSING_FRACTION) -> SeriesVolume:
    """Read the DICOM files of one series into a :class:`SeriesVolume`.

    ``max_missing_fraction`` is the largest share of the regular slice grid that may be
    missing (0 refuses any gap).

    Raises
    ------
    InvalidDatasetError
        A file is not DICOM or its pixel data cannot be decoded.
    InvalidSeriesError
        The instances do not form one regular volume (the message says why).
    """
    if not files:
        raise InvalidSeriesError("series has no instances")
    datasets = [_read(Path(f)) for f in files]
    return volume_from_datasets(datasets, max_missing_fraction)


def volume_from_datasets(datasets: Sequence[Dataset],
                         max_missing_fraction: float = MAX_MISSING_FRACTION) -> SeriesVolume:
    """Build the volume from already-read datasets (see :func:`read_series`)."""
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) > 1:
        raise InvalidSeriesError(f"instances belong to {len(uids)} different series: {sorted(uids)}")
    slices: list[_Slice] = []
    for ds in datasets:
        slices.extend(_slices_of(ds))
    ordered, index, step = _sort_and_check(slices)
    check_missing(len(ordered), int(index[-1]) + 1, step, max_missing_fraction)
    return _assemble(ordered, index, step)


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise InvalidDatasetError(f"{str(path)!r} is not a readable DICOM file: {exc}") from None


def _required(h: SliceHeader) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Position, orientation and pixel spacing of one slice; raises naming the first absent or malformed one."""
    if h.problem is not None or h.position is None or h.orientation is None or h.spacing is None:
        raise InvalidSeriesError(h.problem or f"{h.source}: incomplete slice geometry")
    return (np.asarray(h.position, dtype=np.float64), np.asarray(h.orientation, dtype=np.float64),
            (h.spacing[0], h.spacing[1]))


def _check_image(ds: Dataset) -> None:
    sop = ds.get("SOPInstanceUID", "?")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InvalidSeriesError(f"instance {sop} ({ds.get('Modality', '?')}) has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InvalidSeriesError(f"instance {sop}: SamplesPerPixel {ds.SamplesPerPixel} (colour) is not supported")


def _decode(ds: Dataset) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises many types from its decoder plugins
        ts = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        raise InvalidDatasetError(
            f"instance {ds.get('SOPInstanceUID', '?')}: pixel data (transfer syntax {ts}) cannot be decoded: {exc}"
        ) from None


def _rescale(arr: np.ndarray, slope: Any, intercept: Any) -> np.ndarray:
    out = arr.astype(np.float32)
    s = float(slope) if slope not in (None, "") else 1.0
    i = float(intercept) if intercept not in (None, "") else 0.0
    if s != 1.0 or i != 0.0:
        out = out * np.float32(s) + np.float32(i)
    return out


def _slices_of(ds: Dataset) -> list[_Slice]:
    _check_image(ds)
    if is_multiframe(ds):
        return _frames_of(ds)
    (header,) = slice_headers(ds)
    position, orientation, spacing = _required(header)
    cache: dict[str, np.ndarray] = {}

    def pixels() -> np.ndarray:
        if "a" not in cache:
            arr = _decode(ds)
            if arr.ndim != 2:
                raise InvalidSeriesError(f"instance {ds.SOPInstanceUID}: expected one frame, got shape {arr.shape}")
            cache["a"] = _rescale(arr, ds.get("RescaleSlope"), ds.get("RescaleIntercept"))
        return cache["a"]

    return [_Slice(position=position, orientation=orientation, shape=(header.rows, header.cols),
                   pixel_spacing=spacing, thickness=header.thickness,
                   ref=SourceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), None), dataset=ds, pixels=pixels)]


def _frames_of(ds: Dataset) -> list[_Slice]:
    sop = str(ds.get("SOPInstanceUID", "?"))
    headers = slice_headers(ds)
    n = len(headers)
    cache: dict[str, np.ndarray] = {}

    def frames() -> np.ndarray:
        if "a" not in cache:
            arr = _decode(ds)
            cache["a"] = arr.reshape((n, *arr.shape[-2:]))
        return cache["a"]

    out: list[_Slice] = []
    for i, header in enumerate(headers):
        position, orientation, spacing = _required(header)
        rescale = functional_group(ds, i, "PixelValueTransformationSequence")
        slope = rescale.get("RescaleSlope") if rescale is not None else None
        intercept = rescale.get("RescaleIntercept") if rescale is not None else None
        out.append(_Slice(
            position=position, orientation=orientation, shape=(header.rows, header.cols), pixel_spacing=spacing,
            thickness=header.thickness, ref=SourceRef(str(ds.SOPClassUID), sop, i + 1), dataset=ds,
            pixels=functools.partial(_frame_pixels, frames, i, slope, intercept),
        ))
    return out


def _frame_pixels(frames: Callable[[], np.ndarray], index: int, slope: Any, intercept: Any) -> np.ndarray:
    """Frame ``index`` (0-based) of a decoded multi-frame array, rescaled, float32 (rows, columns)."""
    return _rescale(frames()[index], slope, intercept)


def slice_grid(dist: np.ndarray) -> tuple[np.ndarray, float]:
    """Place sorted slice distances on one regular grid.

    Parameters
    ----------
    dist
        ``(N,)`` positions along the slice normal (mm), ascending, no duplicates, N >= 2.

    Returns
    -------
    index, step
        ``(N,)`` int grid index of each slice (``index[0] == 0``) and the grid step (mm): the
        median of the gaps of about the smallest one; a gap of ``k`` steps leaves ``k - 1``
        grid slices missing. When fewer than half of the gaps are that smallest one (a
        series missing most of its slices, where the smallest gap may span several steps),
        that gap divided by 2, 3 or 4 is tried too.

    Raises
    ------
    InvalidSeriesError
        A gap is not a whole number of steps (within ``SPACING_RTOL`` per step).
    """
    gaps = np.diff(dist)
    at_unit = np.round(gaps / gaps.min()) == 1
    unit = float(np.median(gaps[at_unit]))
    for divisor in range(1, 5 if 2 * at_unit.sum() < gaps.size else 2):
        step = unit / divisor
        k = np.round(gaps / step).astype(int)
        bad = (k < 1) | (np.abs(gaps - k * step) > SPACING_RTOL * step * np.maximum(k, 1))
        if not bad.any():
            return np.concatenate([[0], np.cumsum(k)]), step
        if divisor == 1:
            i = int(np.argmax(bad))
            why = (f"non-uniform slice spacing: gap {gaps[i]:.3f} mm between slices {i} and {i + 1} is not a whole "
                   f"number of the {step:.3f} mm slice step (extra or displaced slices?)")
    raise InvalidSeriesError(why)


def check_missing(n_present: int, n_grid: int, step: float, max_missing_fraction: float) -> None:
    """Refuse a series whose regular grid lacks more than ``max_missing_fraction`` of its slices.

    Raises
    ------
    InvalidSeriesError
        Naming how many slices are missing and the allowed fraction.
    """
    missing = n_grid - n_present
    if missing > max_missing_fraction * n_grid:
        raise InvalidSeriesError(
            f"too many missing slices: {missing} of {n_grid} on the {step:.3f} mm grid are missing "
            f"({100 * missing / n_grid:.0f} %, more than max_missing_fraction {max_missing_fraction:g})")


def fill_missing(arr: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Interpolate the missing slices of a ``(Z, Y, X)`` stack linearly along Z.

    ``present`` is the ``(N,)`` ascending slice indices that hold data, ``present[0] == 0`` and
    ``present[-1] == Z - 1``; every other slice is replaced, in a copy, by the distance-weighted
    mean of its nearest present neighbours.
    """
    out = np.array(arr, dtype=np.float32, copy=True)
    for lo, hi in zip(present[:-1], present[1:]):
        for z in range(int(lo) + 1, int(hi)):
            w = np.float32((z - lo) / (hi - lo))
            out[z] = (1 - w) * out[lo] + w * out[hi]
    return out


def _sort_and_check(slices: list[_Slice]) -> tuple[list[_Slice], np.ndarray, float]:
    """Order slices along the normal, check they lie on one regular grid; return (slices, grid index, step mm)."""
    first = slices[0]
    for s in slices[1:]:
        if s.shape != first.shape:
            raise InvalidSeriesError(
                f"mixed image sizes: {first.shape[0]}x{first.shape[1]} ({first.ref.sop_instance_uid}) "
                f"and {s.shape[0]}x{s.shape[1]} ({s.ref.sop_instance_uid})")
        if np.max(np.abs(s.orientation - first.orientation)) > ORIENTATION_TOL:
            raise InvalidSeriesError(
                f"mixed orientations: ImageOrientationPatient {np.round(first.orientation, 4).tolist()} and "
                f"{np.round(s.orientation, 4).tolist()} ({s.ref.sop_instance_uid})")
        if np.max(np.abs(np.subtract(s.pixel_spacing, first.pixel_spacing))) > SPACING_TOL_MM:
            raise InvalidSeriesError(f"mixed pixel spacings: {list(first.pixel_spacing)} and {list(s.pixel_spacing)}")
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=UNIT_TOL):
        raise InvalidSeriesError(f"ImageOrientationPatient {first.orientation.tolist()} is not two orthonormal cosines")
    dist = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(dist, kind="stable")
    ordered = [slices[i] for i in order]
    dist = dist[order]
    if len(ordered) == 1:
        return ordered, np.zeros(1, dtype=int), float(first.thickness or 1.0)
    gaps = np.diff(dist)
    dup = int(np.argmin(gaps))
    if gaps[dup] < SAME_POSITION_MM:
        raise InvalidSeriesError(
            f"duplicate slice position {np.round(ordered[dup].position, 3).tolist()} "
            f"({ordered[dup].ref.sop_instance_uid} and {ordered[dup + 1].ref.sop_instance_uid})")
    index, step = slice_grid(dist)
    offsets = np.array([s.position for s in ordered]) - ordered[0].position
    shear = offsets - np.outer(dist - dist[0], normal)
    if np.max(np.linalg.norm(shear, axis=1)) > GRID_TOL_MM + 1e-3 * step * len(ordered):
        raise InvalidSeriesError(
            f"slice positions are not stacked along the slice normal (in-plane offset "
            f"{np.max(np.linalg.norm(shear, axis=1)):.3f} mm: gantry tilt or sheared stack)")
    return ordered, index, step


def _assemble(ordered: list[_Slice], index: np.ndarray, step: float) -> SeriesVolume:
    first = ordered[0]
    arr = np.zeros((int(index[-1]) + 1, *first.shape), dtype=np.float32)
    for s, z in zip(ordered, index):
        arr[z] = s.pixels()
    if len(ordered) < arr.shape[0]:
        arr = fill_missing(arr, index)
    refs: list[SourceRef | None] = [None] * arr.shape[0]
    for s, z in zip(ordered, index):
        refs[z] = s.ref
    img = sitk.GetImageFromArray(arr)  # (Z, Y, X) -> x = column, y = row, z = slice
    row_c, col_c = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_c, col_c)
    img.SetOrigin(tuple(float(v) for v in first.position))
    img.SetSpacing((first.pixel_spacing[1], first.pixel_spacing[0], step))
    img.SetDirection(tuple(float(v) for v in np.column_stack([row_c, col_c, normal]).ravel()))
    seen: dict[int, Dataset] = {}
    for s in ordered:
        seen.setdefault(id(s.dataset), s.dataset)
    return SeriesVolume(image=img, refs=tuple(refs), datasets=tuple(seen.values()))


def find_dicom_files(root: Path) -> dict[str, list[Path]]:
    """Group every DICOM file under ``root`` (any folder layout) by SeriesInstanceUID.

    Files that are not DICOM (or lack a SeriesInstanceUID) are skipped. Headers only are
    read (pixel data deferred), so this is fast.

    Returns
    -------
    dict
        SeriesInstanceUID -> sorted list of file paths.
    """
    root = Path(root)
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    groups: dict[str, list[Path]] = {}
    for p in paths:
        if p.name.endswith((".nii", ".nii.gz", ".json", ".png", ".txt", ".md")):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Modality"])
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, TypeError):
            continue
        uid = ds.get("SeriesInstanceUID")
        if uid:
            groups.setdefault(str(uid), []).append(p)
    return groups
