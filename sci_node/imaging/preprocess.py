"""The one preprocessing shared by the trainer and the inference (no train/serve skew).

Every segmentation model works on **axial slices of a canonical grid**:

1. *Canonical orientation* — the image is re-indexed (permutation/flip only, no
   interpolation) to DICOM ``LPS`` order with :class:`SimpleITK.DICOMOrientImageFilter`.
   In the ``(Z, Y, X)`` numpy array of the result, ``Z`` runs inferior→superior,
   ``Y`` anterior→posterior and ``X`` right→left, whatever the acquisition plane
   (sagittal, axial, coronal) was.
2. *Resampling to the model spacing* — in-plane (``Y``, ``X``) to the spacing of the
   model card (e.g. 0.8 mm); the slice axis ``Z`` keeps its spacing and number of
   slices unless the card asks for a ``z_spacing``. The model grid shares origin and
   direction with the canonical grid, so it is an exact refinement of it.
3. *Intensity normalisation* — robust percentile scaling of the whole volume:
   ``(v - p_lo) / (p_hi - p_lo)`` clipped to ``[0, clip_max]``.
4. *Cropping / padding* — bounding boxes around a region of interest
   (:func:`roi_bbox`, :func:`crop`, :func:`paste`) and padding to a patch size.

The inverse mapping (:func:`to_source_grid`) resamples a model-grid probability map
(or label map) straight onto the **original** image grid in physical space, so the
returned array has exactly the source's size, spacing, origin and direction.

All images are :class:`SimpleITK.Image` in patient LPS; arrays are numpy ``(Z, Y, X)``;
spacings are in mm and given ``(sz, sy, sx)`` unless said otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk

CANONICAL = "LPS"


@dataclass(frozen=True)
class PrepSpec:
    """Preprocessing parameters of one model (stored in its card under ``preprocessing``).

    Attributes
    ----------
    spacing_yx : tuple[float, float]
        In-plane model spacing (sy, sx) in mm.
    z_spacing : float | None
        Slice spacing in mm of the model grid; ``None`` keeps the source slices.
    lower, upper : float
        Percentiles used for intensity scaling.
    clip_max : float
        Upper clip of the scaled intensities (values above ``p_hi`` are kept up to this).
    patch_yx : tuple[int, int]
        Training patch / sliding-window ROI size in model-grid voxels.
    context : int
        Neighbouring slices on each side fed as channels (0 = 2-D, 1 = 2.5-D with 3 channels).
    threshold : float
        Probability threshold of the foreground.
    thickness_channel : bool
        Feed the slice spacing as one more, constant input channel (:func:`thickness_value`), so
        a 2-D network can tell thick slices (partial-volume edges) from thin ones.
    flip_x_tta : bool
        Test-time augmentation: average the logits of each slice and of its left-right mirror
        (X axis of the canonical grid). Only for networks trained with left-right flips; it
        doubles the inference cost. Up to cord 0.2.0 no card had it (``False``).
    sw_overlap : float
        Overlap of neighbouring sliding windows (fraction of the patch, MONAI
        ``sliding_window_inference``, Gaussian blending); cards without it mean 0.25.
    ensemble_cascade_below : float | None
        Only for an ensemble network (:class:`sci_node.nets.LogitMeanEnsemble`): the first
        member runs everywhere, the others only on the voxels where the first member's
        probability exceeds this value (their sliding windows); elsewhere the first member's
        logits stand (:func:`sci_node.models.predict_seg.infer_volume`). ``None``: every member runs
        everywhere (the exact logit mean).
    """

    spacing_yx: tuple[float, float] = (0.8, 0.8)
    z_spacing: float | None = None
    lower: float = 0.5
    upper: float = 99.5
    clip_max: float = 1.5
    patch_yx: tuple[int, int] = (96, 96)
    context: int = 0
    threshold: float = 0.5
    thickness_channel: bool = False
    flip_x_tta: bool = False
    sw_overlap: float = 0.25
    ensemble_cascade_below: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.sw_overlap < 1.0:  # MONAI would fail later, or loop on a zero step
            raise ValueError(f"sliding_window_overlap (sw_overlap) must lie in [0, 1), got {self.sw_overlap!r}")
        cut = self.ensemble_cascade_below
        if cut is not None and not 0.0 < cut < 1.0:
            raise ValueError(f"ensemble_cascade_below must lie in (0, 1) or be null, got {cut!r}")

    def to_card(self) -> dict[str, Any]:
        """JSON-able dict for a model card."""
        return {
            "orientation": CANONICAL, "slice_axis": "Z (inferior-superior, axial slices)",
            "spacing_yx_mm": list(self.spacing_yx), "z_spacing_mm": self.z_spacing,
            "normalisation": {"kind": "percentile", "lower": self.lower, "upper": self.upper,
                              "clip_max": self.clip_max},
            "patch_yx": list(self.patch_yx), "context_slices": self.context, "threshold": self.threshold,
            "thickness_channel": self.thickness_channel, "flip_x_tta": self.flip_x_tta,
            "sliding_window_overlap": self.sw_overlap, "ensemble_cascade_below": self.ensemble_cascade_below,
        }

    @classmethod
    def from_card(cls, pre: Mapping[str, Any]) -> "PrepSpec":
        """Inverse of :meth:`to_card` (raises ``KeyError``/``ValueError`` on a bad dict).

        A setting this node does not know (written by a newer trainer) is a ``ValueError``:
        running the model without it would not be the model that was validated.
        """
        unknown = sorted(set(pre) - set(cls().to_card()))
        if unknown:
            raise ValueError(f"unknown preprocessing setting(s) {', '.join(unknown)}: this node cannot apply them")
        norm = pre["normalisation"]
        if pre.get("orientation", CANONICAL) != CANONICAL:
            raise ValueError(f"unsupported orientation {pre.get('orientation')!r}")
        zs = pre.get("z_spacing_mm")
        return cls(spacing_yx=(float(pre["spacing_yx_mm"][0]), float(pre["spacing_yx_mm"][1])),
                   z_spacing=None if zs is None else float(zs),
                   lower=float(norm["lower"]), upper=float(norm["upper"]), clip_max=float(norm["clip_max"]),
                   patch_yx=(int(pre["patch_yx"][0]), int(pre["patch_yx"][1])),
                   context=int(pre.get("context_slices", 0)), threshold=float(pre.get("threshold", 0.5)),
                   thickness_channel=bool(pre.get("thickness_channel", False)),
                   flip_x_tta=bool(pre.get("flip_x_tta", False)),
                   sw_overlap=float(pre.get("sliding_window_overlap", 0.25)),
                   ensemble_cascade_below=None if pre.get("ensemble_cascade_below") is None
                   else float(pre["ensemble_cascade_below"]))

    @property
    def in_channels(self) -> int:
        """Input channels of the network: ``2*context+1`` slices, plus 1 with ``thickness_channel``."""
        return 2 * self.context + 1 + int(self.thickness_channel)


@dataclass(frozen=True)
class Prepared:
    """A volume on the model grid plus what is needed to map results back.

    Attributes
    ----------
    array : numpy.ndarray
        ``(Z, Y, X)`` float32 normalised intensities on the model grid.
    grid : SimpleITK.Image
        A uint8 image carrying the model-grid geometry (LPS), size ``(X, Y, Z)``.
    source : SimpleITK.Image
        The original image (its grid is the target of :func:`to_source_grid`).
    """

    array: np.ndarray
    grid: sitk.Image
    source: sitk.Image


def as_scalar_float(image: sitk.Image) -> sitk.Image:
    """Cast to float32, taking the first component of vector images and the first volume of 4-D ones."""
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = sitk.VectorIndexSelectionCast(image, 0)
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
    return sitk.Cast(image, sitk.sitkFloat32)


def canonicalise(image: sitk.Image) -> sitk.Image:
    """Re-index ``image`` to LPS order (permutation and flips only, values untouched)."""
    return sitk.DICOMOrient(image, CANONICAL)


def model_grid(canonical: sitk.Image, spec: PrepSpec) -> sitk.Image:
    """Geometry (uint8 image of zeros) of the model grid for a canonical image.

    Same origin and direction as ``canonical``; in-plane spacing ``spec.spacing_yx``;
    slice spacing kept (or ``spec.z_spacing``); the extent covers the source extent.
    """
    sx, sy, sz = canonical.GetSpacing()
    nx, ny, nz = canonical.GetSize()
    tz = sz if spec.z_spacing is None else spec.z_spacing
    new_sp = (spec.spacing_yx[1], spec.spacing_yx[0], tz)
    new_size = [max(1, int(np.ceil((n - 1) * s / t - 1e-6)) + 1) for n, s, t in
                zip((nx, ny, nz), (sx, sy, sz), new_sp)]
    if spec.z_spacing is None:
        new_size[2] = nz
    grid = sitk.Image(new_size, sitk.sitkUInt8)
    grid.SetSpacing(new_sp)
    grid.SetOrigin(canonical.GetOrigin())
    grid.SetDirection(canonical.GetDirection())
    return grid


def resample_to(image: sitk.Image, reference: sitk.Image, *, labels: bool = False) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid in physical space.

    ``labels=True`` uses nearest neighbour (for masks), otherwise linear; outside is 0.
    """
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    pixel = image.GetPixelID()
    return sitk.Resample(image, reference, sitk.Transform(), interp, 0.0, pixel)


def normalise(array: np.ndarray, spec: PrepSpec) -> np.ndarray:
    """Percentile scaling of a volume.

    Parameters
    ----------
    array : numpy.ndarray
        Any-shape intensities (raw scanner values).

    Returns
    -------
    numpy.ndarray
        float32, ``(v - p_lo) / (p_hi - p_lo)`` clipped to ``[0, spec.clip_max]``;
        zeros when the volume is constant.
    """
    a = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(a, [spec.lower, spec.upper])
    if not np.isfinite(hi - lo) or hi - lo <= 1e-6:
        return np.zeros_like(a, dtype=np.float32)
    return np.clip((a - lo) / (hi - lo), 0.0, spec.clip_max).astype(np.float32)


def prepare(image: sitk.Image, spec: PrepSpec) -> Prepared:
    """Canonical orientation → model grid → normalisation of one image.

    Parameters
    ----------
    image : SimpleITK.Image
        3-D image in patient LPS, any orientation, any pixel type (4-D: first volume).

    Returns
    -------
    Prepared
        ``array`` is ``(Z, Y, X)`` float32 on the model grid (``Z`` = inferior→superior).
    """
    src = as_scalar_float(image)
    canon = canonicalise(src)
    grid = model_grid(canon, spec)
    resampled = resample_to(canon, grid)
    arr = normalise(sitk.GetArrayFromImage(resampled), spec)
    return Prepared(array=arr, grid=grid, source=image)


def mask_to_model_grid(mask: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """A mask on the source grid → ``(Z, Y, X)`` uint8 on the model grid.

    Uses linear interpolation of the binary mask thresholded at 0.5 (smoother than
    nearest neighbour when the in-plane spacing changes).
    """
    m = sitk.Cast(sitk.DICOMOrient(mask, CANONICAL) > 0, sitk.sitkFloat32)
    out = sitk.GetArrayFromImage(resample_to(m, grid))
    return (out >= 0.5).astype(np.uint8)


def array_on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """Wrap a ``(Z, Y, X)`` array as an image with ``grid``'s geometry."""
    if tuple(array.shape[::-1]) != tuple(grid.GetSize()):
        raise ValueError(f"array shape {array.shape} does not match grid size {grid.GetSize()[::-1]} (Z,Y,X)")
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(grid)
    return img


def source_reference(image: sitk.Image) -> sitk.Image:
    """A uint8 3-D image of zeros with ``image``'s grid (first three axes of a 4-D image)."""
    ref = sitk.Image(image.GetSize()[:3], sitk.sitkUInt8)
    ref.SetSpacing(image.GetSpacing()[:3])
    ref.SetOrigin(image.GetOrigin()[:3])
    d = np.asarray(image.GetDirection())
    ref.SetDirection(tuple(d.reshape(image.GetDimension(), -1)[:3, :3].ravel()))
    return ref


def to_source_grid(prob: np.ndarray, prepared: Prepared, threshold: float | None = 0.5) -> np.ndarray:
    """Map a model-grid probability (or mask) back onto the exact source grid.

    Parameters
    ----------
    prob : numpy.ndarray
        ``(Z, Y, X)`` float probabilities in [0, 1] (or a binary mask) on ``prepared.grid``.
    prepared : Prepared
        The result of :func:`prepare` that produced the model-grid array.
    threshold : float | None
        Returns a uint8 mask ``prob_src >= threshold``; ``None`` returns float32 probabilities.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` array with the shape of ``sitk.GetArrayFromImage(prepared.source)``.
    """
    img = array_on_grid(np.asarray(prob, dtype=np.float32), prepared.grid)
    out = sitk.GetArrayFromImage(resample_to(img, source_reference(prepared.source)))
    if threshold is None:
        return out.astype(np.float32)
    return (out >= threshold).astype(np.uint8)


def thickness_value(z_spacing_mm: float) -> float:
    """The thickness channel's constant: slice spacing / 5 mm, clipped to [0, 2]."""
    return float(np.clip(z_spacing_mm / 5.0, 0.0, 2.0))


def with_context(volume: np.ndarray, context: int) -> np.ndarray:
    """Stack neighbouring slices as channels (2.5-D input).

    Parameters
    ----------
    volume : numpy.ndarray
        ``(Z, Y, X)``.
    context : int
        Slices on each side; edges are replicated.

    Returns
    -------
    numpy.ndarray
        ``(Z, 2*context+1, Y, X)``, same dtype.
    """
    if context == 0:
        return volume[:, None]
    z = volume.shape[0]
    idx = np.clip(np.arange(z)[:, None] + np.arange(-context, context + 1)[None, :], 0, z - 1)
    return volume[idx]


def roi_bbox(roi: np.ndarray, margin: tuple[int, int, int], shape: tuple[int, int, int] | None = None
             ) -> tuple[slice, slice, slice] | None:
    """Bounding box of the nonzero voxels of a ``(Z, Y, X)`` mask grown by ``margin`` voxels.

    Returns ``None`` for an empty mask. ``shape`` (default ``roi.shape``) clips the box.
    """
    nz = np.nonzero(roi)
    if nz[0].size == 0:
        return None
    shape = roi.shape if shape is None else shape
    return tuple(slice(max(0, int(i.min()) - m), min(n, int(i.max()) + m + 1))
                 for i, m, n in zip(nz, margin, shape))  # type: ignore[return-value]


def crop(array: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """``array[box]`` over the last ``len(box)`` axes (a copy)."""
    lead = (slice(None),) * (array.ndim - len(box))
    return np.array(array[lead + tuple(box)])


def paste(patch: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Inverse of :func:`crop`: put ``patch`` at ``box`` in a new array of ``shape`` filled with ``fill``."""
    out = np.full(shape, fill, dtype=patch.dtype)
    lead = (slice(None),) * (len(shape) - len(box))
    out[lead + tuple(box)] = patch
    return out


def pad_to(array: np.ndarray, min_yx: tuple[int, int]) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Zero-pad the last two axes to at least ``min_yx``; returns the array and the slices of the original."""
    h, w = array.shape[-2:]
    ph, pw = max(0, min_yx[0] - h), max(0, min_yx[1] - w)
    pads = [(0, 0)] * (array.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]
    out = np.pad(array, pads)
    return out, (slice(ph // 2, ph // 2 + h), slice(pw // 2, pw // 2 + w))
