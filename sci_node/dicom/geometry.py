"""Slice geometry from DICOM headers: the one reader, and the one set of tolerances.

Every 2-D slice (a single-frame instance, or one frame of a multi-frame instance: Enhanced MR,
a DICOM-SEG, its values from the per-frame functional groups or else the shared ones) has an
orientation (row then column direction cosines, patient LPS), the position of its first pixel
(mm, LPS), a matrix size and a pixel spacing (mm, between rows then between columns).
:func:`slice_headers` reads them from one dataset and never raises: a value that is absent, or
not the right count of finite numbers, is None, and :attr:`SliceHeader.problem` says which in
the words the strict reader raises with.

Three readers use it, with the same tolerances:

* series completion (:func:`read_slice_headers`, headers only: problems are reported and the
  job is created failed, :mod:`sci_node.dicom.completion`);
* series loading (:mod:`sci_node.pipeline.series`: a problem raises ``InvalidSeriesError``);
* the corrections (:mod:`sci_node.corrections.grid`: a corrected SEG's frames against the
  source volume's grid, :class:`VolumeGeometry`).

The tolerances were three sets before: completion compared cosines at 1e-3, series loading at
1e-4 and the corrections at 1e-3; pixel spacings at 1e-4 mm + 1e-4 relative (series) and 1e-3 mm
(a SEG against its source). Each notion now has one value, the strictest any of them used.
Measured on the sample series, the test series and the scanner series under tests/data: no
orientation or pixel-spacing difference within a series, at most 7e-7 mm off the regular grid;
every geometry test (completion, series, SEG/SR, corrections, bad input, the pipeline) still
passes with 1e-7 on cosines and spacings and 1e-4 mm on the grid. Going that far would refuse
real series: scanners write DS values rounded to about six decimals, so per-slice cosines
recomputed by a scanner or a viewer (OHIF writes a SEG's geometry from float32) differ by up to
~1e-6; 1e-4 leaves a hundredfold margin above that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from numpy.typing import ArrayLike

#: Direction cosines that differ by at most this (each of the six) are the same orientation.
ORIENTATION_TOL = 1e-4
#: Slices closer than this (mm, along the slice normal) are at the same position: duplicates.
SAME_POSITION_MM = 1e-3
#: How far (mm) a slice may sit off its place on the series' regular grid: the in-plane offset
#: of a stacked slice (shear, gantry tilt) and a corrected SEG frame's distance to a source slice.
GRID_TOL_MM = 0.05
#: Pixel spacings that differ by at most this (mm) are equal (the slices of a series; a SEG and
#: its source series).
SPACING_TOL_MM = 1e-4
#: A gap between slices may differ from a whole number of slice steps by this fraction of a step.
SPACING_RTOL = 0.01
#: A slice step larger than this factor times the median step is reported as a gap (completion).
GAP_FACTOR = 1.5
#: Row and column cosines are taken as orthonormal when their cross product's norm is within this of 1.
UNIT_TOL = 1e-3

PER_FRAME = "PerFrameFunctionalGroupsSequence"
SHARED = "SharedFunctionalGroupsSequence"


@dataclass(frozen=True)
class SliceHeader:
    """Geometry of one 2-D slice (a single-frame instance or one frame of a multi-frame one).

    ``orientation`` is the 6 direction cosines (row, column) in patient LPS; ``position`` the
    (x, y, z) of the first voxel in mm; ``rows``/``cols`` the matrix size; ``spacing`` the
    Pixel Spacing (between rows, between columns) in mm; ``thickness`` the Slice Thickness in
    mm; ``frame`` the 1-based frame number of a multi-frame instance (None: single-frame).
    A value is None when absent or malformed; ``problem`` then names the first such value.
    """

    source: str
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None
    rows: int
    cols: int
    spacing: tuple[float, ...] | None = None
    thickness: float | None = None
    frame: int | None = None
    problem: str | None = None


def floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``value`` (a DICOM multi-value) as ``n`` finite floats, or None."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _number(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def is_multiframe(ds: Any) -> bool:
    """True when the dataset carries functional groups (Enhanced MR, Legacy Converted, SEG)."""
    return PER_FRAME in ds or SHARED in ds


def functional_group(ds: Any, index: int, name: str) -> Any | None:
    """Item of functional group ``name`` for frame ``index`` (0-based): per-frame first, then shared."""
    for top, i in ((PER_FRAME, index), (SHARED, 0)):
        groups = ds.get(top)
        item = groups[i].get(name) if groups and len(groups) > i else None
        if item:
            return item[0]
    return None


def n_frames(ds: Any) -> int:
    """Number of frames: NumberOfFrames, else the per-frame groups, else 1."""
    return int(ds.get("NumberOfFrames") or 0) or len(ds.get(PER_FRAME) or ()) or 1


def slice_headers(ds: Any, source: str = "") -> list[SliceHeader]:
    """The geometry of every slice of ``ds`` (one per frame of a multi-frame instance); never raises.

    ``source`` names the instance in :attr:`SliceHeader.source` (frames get ``source#k``).
    """
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    sop = ds.get("SOPInstanceUID", "?")
    if not is_multiframe(ds):
        problem = next((f"instance {sop} has no {kw}" for kw in
                        ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if kw not in ds), None)
        spacing, problem = _parsed(ds.get("PixelSpacing"), 2, "PixelSpacing", sop, problem)
        position, problem = _parsed(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", sop, problem)
        orientation, problem = _parsed(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", sop, problem)
        return [SliceHeader(source, orientation, _xyz(position), rows, cols, spacing,
                            _number(ds.get("SliceThickness")), None, problem)]
    out = []
    for i in range(n_frames(ds)):
        pos, ori, meas = (functional_group(ds, i, s) for s in
                          ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"))
        problem = None
        if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
            problem = f"instance {sop} frame {i + 1}: plane position, orientation or pixel measures missing"
        spacing, problem = _parsed(meas.get("PixelSpacing") if meas is not None else None, 2, "PixelSpacing", sop,
                                   problem)
        position, problem = _parsed(pos.get("ImagePositionPatient") if pos is not None else None, 3,
                                    "ImagePositionPatient", sop, problem)
        orientation, problem = _parsed(ori.get("ImageOrientationPatient") if ori is not None else None, 6,
                                       "ImageOrientationPatient", sop, problem)
        out.append(SliceHeader(f"{source}#{i + 1}", orientation, _xyz(position), rows, cols, spacing,
                               _number(meas.get("SliceThickness")) if meas is not None else None, i + 1, problem))
    return out


def _parsed(value: Any, n: int, what: str, sop: Any, problem: str | None) -> tuple[tuple[float, ...] | None,
                                                                                  str | None]:
    """``value`` as ``n`` floats, and the first problem so far (this one if it is malformed)."""
    out = floats(value, n)
    if out is None and problem is None:
        problem = f"instance {sop}: {what} {value!r} is not {n} numbers"
    return out, problem


def _xyz(position: tuple[float, ...] | None) -> tuple[float, float, float] | None:
    return None if position is None else (position[0], position[1], position[2])


def read_slice_headers(files: Sequence[Path]) -> tuple[list[SliceHeader], list[str]]:
    """Read the geometry of every slice of ``files`` (frames of multi-frame images included), no pixels.

    Returns the slices and a list of per-file problems (unreadable files).
    """
    import pydicom

    slices: list[SliceHeader] = []
    problems: list[str] = []
    for f in files:
        try:
            slices.extend(slice_headers(pydicom.dcmread(f, stop_before_pixels=True), f.name))
        except Exception as exc:  # any unreadable spool file is reported, never raised
            problems.append(f"{f.name}: {type(exc).__name__}: {exc}"[:200])
    return slices, problems


def same_orientation(a: ArrayLike, b: ArrayLike) -> bool:
    """True when two sets of six direction cosines agree within :data:`ORIENTATION_TOL`."""
    return float(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float)))) <= ORIENTATION_TOL


@dataclass(frozen=True)
class VolumeGeometry:
    """A volume's regular grid: size ``(X, Y, Z)``, spacing ``(sx, sy, sz)`` mm, origin, direction (3x3)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray

    @classmethod
    def of(cls, image: Any) -> "VolumeGeometry":
        """The geometry of a 3-D ``SimpleITK.Image``."""
        nx, ny, nz = (int(v) for v in image.GetSize()[:3])
        sx, sy, sz = (float(v) for v in image.GetSpacing()[:3])
        return cls((nx, ny, nz), (sx, sy, sz), np.asarray(image.GetOrigin()[:3], float),
                   np.asarray(image.GetDirection(), float).reshape(3, 3))

    def slice_of(self, position: np.ndarray) -> int | None:
        """The slice index ``z`` whose first pixel is at ``position`` (LPS mm, within :data:`GRID_TOL_MM`), or None."""
        rel = np.linalg.solve(self.direction * np.asarray(self.spacing), position - self.origin)
        z = int(round(rel[2]))
        if 0 <= z < self.size[2] and np.linalg.norm(
                self.origin + self.direction @ (np.array([0.0, 0.0, z]) * self.spacing) - position) <= GRID_TOL_MM:
            return z
        return None
