"""Classifier preprocessing shared by the trainer and the node (no train/serve skew).

A series becomes two inputs for the routing classifiers (:class:`sci_node.nets.SeriesNet`):

* ``thumbs``: ``(3, S, S)`` float32 — the volume resampled (linear) onto an isotropic,
  LPS-aligned ``S x S x S`` grid that covers its physical bounding box, intensities scaled
  to ``[0, 1.5]`` by the 1st/99th percentiles; channel 0 = central axial slab (rows A→P,
  columns R→L), 1 = central coronal slab (rows S→I, columns R→L), 2 = central sagittal
  slab (rows S→I, columns A→P). Each slab is the mean of the 3 central grid slices.
  Feature version ``cls-thumbs-v3`` adds 3 **detail** channels (``(6, S, S)``): the same three
  slabs of a second ``S``-grid of fixed physical size (:data:`DETAIL_MM`, 2 mm steps at
  ``S = 32``) about the bounding-box centre, where the cord of a spine series usually lies; at
  the whole-box grid's 5–12 mm steps the cord/CSF contrast that tells T1w, T2w and T2*w
  apart is one or two voxels.
* ``features``: ``(N_FEATURES,)`` float32 — geometry of the grid (slice-axis direction,
  physical extents, spacing, slice count), intensity statistics, and header evidence
  (TE/TR/TI/flip with presence flags, ScanningSequence/SequenceVariant/MRAcquisitionType
  codes). Absent header values are 0 with their presence flag 0.

Free-text fields (SeriesDescription, BodyPartExamined) are never read.
"""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from sci_node.routing.evidence import HeaderEvidence

__all__ = ["FEATURE_NAMES", "N_FEATURES", "THUMB_SIZE", "series_inputs", "slice_axis", "view_of_image",
           "scalar_volume", "header_features", "PREPROCESSING_ID", "PREPROCESSING_IDS", "DETAIL_MM", "n_channels"]

#: The feature version the trainer writes into new cards. v2 stretches thin slabs for the
#: thumbnails (:func:`_thickened`); v1 did not. A card names its version and gets exactly the
#: features it was trained on, so older artefacts stay usable (rollback).
PREPROCESSING_ID = "cls-thumbs-v2"
PREPROCESSING_IDS = ("cls-thumbs-v1", "cls-thumbs-v2", "cls-thumbs-v3")
THUMB_SIZE = 32
#: Edge (mm) of the ``cls-thumbs-v3`` detail grid about the bounding-box centre (capped at the box).
DETAIL_MM = 64.0
_SCAN = ("SE", "GR", "IR", "EP", "RM")
_VARIANT = ("SK", "SS", "SP", "MP", "OSP", "MTC", "TRSS")
_HIST_BINS = 8

FEATURE_NAMES: tuple[str, ...] = (
    ("normal_lr", "normal_ap", "normal_si", "log_extent_lr", "log_extent_ap", "log_extent_si",
     "log_inplane_spacing", "log_slice_spacing", "log_n_slices", "multi_volume", "frac_below_minus500")
    + tuple(f"hist_{i}" for i in range(_HIST_BINS)) + ("foreground_frac",)
    + ("log_te", "has_te", "log_tr", "has_tr", "log_ti", "has_ti", "flip_rad", "has_flip")
    + tuple(f"scan_{c}" for c in _SCAN) + ("has_scan",)
    + tuple(f"variant_{c}" for c in _VARIANT) + ("has_variant", "acq_2d", "acq_3d")
)
N_FEATURES = len(FEATURE_NAMES)
N_HEADER_FEATURES = 8 + len(_SCAN) + 1 + len(_VARIANT) + 3


def scalar_volume(image: sitk.Image) -> tuple[sitk.Image, int]:
    """3-D float32 image of ``image`` and its number of volumes.

    2-D images become one-slice volumes, 4-D images give their first volume, vector
    images their first component.
    """
    n_vol = 1
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = sitk.VectorIndexSelectionCast(image, 0)
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        n_vol = size[3]
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    elif image.GetDimension() == 2:
        image = sitk.JoinSeries([image])
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 2-D, 3-D or 4-D image, got {image.GetDimension()}-D")
    return sitk.Cast(image, sitk.sitkFloat32), n_vol


def slice_axis(image: sitk.Image) -> int:
    """Index axis (0, 1, 2 in SimpleITK ``(x, y, z)`` order) along which the slices are stacked.

    The thickest axis when the spacing is anisotropic (> 1.3x the others); for isotropic
    voxels the axis with the fewest voxels (the slab/partition axis of 3-D scans), ties
    going to axis 2 (the DICOM stacking axis).
    """
    sp = list(image.GetSpacing())[:3]
    size = list(image.GetSize())[:3]
    thick = max(range(3), key=lambda i: (sp[i], i))
    if all(sp[thick] > 1.3 * sp[i] for i in range(3) if i != thick):
        return thick
    return min(range(3), key=lambda i: (size[i], -i))


def _slice_normal(image: sitk.Image) -> np.ndarray:
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    return d[:, slice_axis(image)]


def view_of_image(image: sitk.Image) -> str:
    """``sagittal``/``coronal``/``axial`` plane of the stored slices (see :func:`slice_axis`)."""
    vol, _ = scalar_volume(image)
    n = np.abs(_slice_normal(vol))
    return ("sagittal", "coronal", "axial")[int(np.argmax(n))]


def _bbox(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Physical (LPS, mm) min and max corners of the voxel-edge bounding box."""
    size = image.GetSize()
    corners = []
    for cx in (-0.5, size[0] - 0.5):
        for cy in (-0.5, size[1] - 0.5):
            for cz in (-0.5, size[2] - 0.5):
                corners.append(image.TransformContinuousIndexToPhysicalPoint((cx, cy, cz)))
    arr = np.asarray(corners)
    return arr.min(axis=0), arr.max(axis=0)


def _robust_scale(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    sample = finite[:: max(1, finite.size // 200_000)]
    lo, hi = np.percentile(sample, [1.0, 99.0])
    if hi - lo < 1e-6:
        hi = lo + 1.0
    return float(lo), float(hi)


def _thickened(vol: sitk.Image, min_extent: float) -> sitk.Image:
    """``vol`` with each axis thinner than ``min_extent`` (mm) stretched to it about its centre.

    Only the voxel spacing (and the origin, so the centre stays put) changes; the voxel values
    do not. A single slice of a 350 mm field of view is 1–5 mm thick while the thumbnail grid
    steps by 11 mm: without this, no grid point falls inside the slice and the image is lost.
    """
    size = np.asarray(vol.GetSize(), np.float64)
    sp = np.asarray(vol.GetSpacing(), np.float64)
    new_sp = np.maximum(sp, min_extent / size)
    if np.allclose(new_sp, sp):
        return vol
    centre = np.asarray(vol.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    direction = np.asarray(vol.GetDirection(), np.float64).reshape(3, 3)
    out = sitk.Image(vol)
    out.SetSpacing(new_sp.tolist())
    out.SetOrigin((centre - direction @ (new_sp * (size - 1) / 2)).tolist())
    return out


def n_channels(prep_id: str) -> int:
    """Thumbnail channels of a feature version: 6 for ``cls-thumbs-v3`` (whole box + detail), else 3."""
    return 6 if prep_id == "cls-thumbs-v3" else 3


def _thumbs(vol: sitk.Image, lo: float, size: int, thicken: bool = True,
            extent_mm: float | None = None) -> np.ndarray:
    """``(S, S, S)`` raw-valued grid ``(Z=I→S, Y=A→P, X=R→L)`` covering the bounding box.

    With ``thicken`` (features v2), axes thinner than 3 grid steps (single slices, thin slabs)
    are stretched to 3 steps (:func:`_thickened`), so the central thumbnails always cut
    through the image. ``extent_mm`` (v3 detail grid) narrows the grid's edge to that many mm
    about the box centre (never wider than the box).
    """
    pmin, pmax = _bbox(vol)
    extent = float(max(pmax - pmin))
    if extent_mm is not None:
        extent = min(extent, float(extent_mm))
    spacing = extent / size
    center = (pmin + pmax) / 2.0
    origin = center - spacing * (size - 1) / 2.0
    if thicken:
        vol = _thickened(vol, 3.0 * spacing)
    return sitk.GetArrayFromImage(sitk.Resample(
        vol, [size] * 3, sitk.Transform(), sitk.sitkLinear, origin.tolist(), [spacing] * 3,
        [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0], lo, sitk.sitkFloat32)).astype(np.float32)


def _scaled(grid: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``grid`` scaled by its volume's 1st/99th percentiles ``lo``/``hi`` to ``[0, 1.5]``; NaN/inf voxels
    (some NIfTI) count as background (``lo``)."""
    grid = np.where(np.isfinite(grid), grid, lo)
    return np.clip((grid - lo) / (hi - lo), 0.0, 1.5)


def _slabs(scaled: np.ndarray) -> np.ndarray:
    """``(3, S, S)`` float32 central axial, coronal and sagittal slabs (3 grid slices each) of a ``(S, S, S)`` grid."""
    c = scaled.shape[0] // 2
    return np.stack([
        scaled[c - 1:c + 2].mean(axis=0),
        scaled[:, c - 1:c + 2, :].mean(axis=1)[::-1],
        scaled[:, :, c - 1:c + 2].mean(axis=2)[::-1],
    ]).astype(np.float32)


def header_features(ev: HeaderEvidence | None) -> np.ndarray:
    """``(N_HEADER_FEATURES,)`` float32 header part of the feature vector (see module doc)."""
    ev = ev or HeaderEvidence()
    out: list[float] = []
    for val in (ev.echo_time_ms, ev.repetition_time_ms, ev.inversion_time_ms):
        ok = val is not None and val > 0
        out += [math.log1p(val) if ok else 0.0, 1.0 if ok else 0.0]  # type: ignore[arg-type]
    ok = ev.flip_angle_deg is not None
    out += [math.radians(ev.flip_angle_deg) if ok else 0.0, 1.0 if ok else 0.0]  # type: ignore[arg-type]
    scan = set(ev.scanning_sequence or ())
    out += [1.0 if c in scan else 0.0 for c in _SCAN] + [1.0 if scan else 0.0]
    var = set(ev.sequence_variant or ())
    out += [1.0 if c in var else 0.0 for c in _VARIANT] + [1.0 if var else 0.0]
    acq = (ev.mr_acquisition_type or "").upper()
    out += [1.0 if acq == "2D" else 0.0, 1.0 if acq == "3D" else 0.0]
    return np.asarray(out, dtype=np.float32)


def series_inputs(image: sitk.Image, evidence: HeaderEvidence | None,
                  size: int = THUMB_SIZE, prep_id: str = PREPROCESSING_ID) -> tuple[np.ndarray, np.ndarray]:
    """Classifier inputs of one series.

    Parameters
    ----------
    image : SimpleITK.Image
        The series in patient LPS (2-D, 3-D or 4-D; see :func:`scalar_volume`).
    evidence : HeaderEvidence | None
        Header evidence; ``None`` = nothing known.
    size : int
        Thumbnail edge ``S`` in grid voxels.
    prep_id : str
        Feature version, one of :data:`PREPROCESSING_IDS` (a card's ``preprocessing.id``).

    Returns
    -------
    thumbs : numpy.ndarray
        ``(C, S, S)`` float32 in ``[0, 1.5]``; ``C`` = :func:`n_channels` of ``prep_id``.
    features : numpy.ndarray
        ``(N_FEATURES,)`` float32, ordered as :data:`FEATURE_NAMES`.
    """
    vol, n_vol = scalar_volume(image)
    raw = sitk.GetArrayViewFromImage(vol)
    lo, hi = _robust_scale(np.asarray(raw))
    if prep_id not in PREPROCESSING_IDS:
        raise ValueError(f"unknown classifier feature version {prep_id!r}")
    scaled = _scaled(_thumbs(vol, lo, size, thicken=prep_id != "cls-thumbs-v1"), lo, hi)
    thumbs = _slabs(scaled)
    if n_channels(prep_id) == 6:
        detail = _thumbs(vol, lo, size, thicken=True, extent_mm=DETAIL_MM)
        thumbs = np.concatenate([thumbs, _slabs(_scaled(detail, lo, hi))])
    pmin, pmax = _bbox(vol)
    sp = vol.GetSpacing()
    ax = slice_axis(vol)
    inplane = [sp[i] for i in range(3) if i != ax]
    fg = scaled > 0.1
    hist, _ = np.histogram(scaled[fg], bins=_HIST_BINS, range=(0.0, 1.5))
    hist = hist / max(1, int(fg.sum()))
    # share of voxels below -500 (CT air/lung); non-finite voxels count as not below (as 0 did before, no copy)
    arr = np.asarray(raw)
    below = float(np.count_nonzero((arr < -500.0) & (arr > -np.inf))) / max(1, int(arr.size))
    # The header's slice normal (ImageOrientationPatient) is exact; the spacing heuristic of
    # slice_axis() only stands in for it when there is no header (e.g. NIfTI without sidecar).
    normal = (np.asarray(evidence.slice_normal, np.float64) if evidence is not None
              and evidence.slice_normal is not None else _slice_normal(vol))
    geo = [*np.abs(normal).tolist(), *np.log1p(pmax - pmin).tolist(),
           math.log(float(np.mean(inplane))), math.log(sp[ax]), math.log(vol.GetSize()[ax]),
           1.0 if n_vol > 1 else 0.0, below]
    feats = np.concatenate([np.asarray(geo, np.float32), hist.astype(np.float32),
                            np.asarray([fg.mean()], np.float32), header_features(evidence)])
    return np.ascontiguousarray(thumbs), feats.astype(np.float32)
