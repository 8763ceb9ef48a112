"""Mask post-processing: connected components, size thresholds, ROI restriction.

Pure functions on ``(Z, Y, X)`` uint8 masks with spacing ``(sz, sy, sx)`` in mm.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

_CONN26 = np.ones((3, 3, 3), dtype=bool)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a ``(Z, Y, X)`` mask: ``(labels int32, count)``."""
    lab, n = ndi.label(mask > 0, structure=_CONN26)
    return lab.astype(np.int32), int(n)


def keep_components(mask: np.ndarray, spacing: tuple[float, float, float], *, min_volume_mm3: float = 0.0,
                    min_fraction_of_largest: float = 0.0) -> np.ndarray:
    """Drop components smaller than ``min_volume_mm3`` or than a fraction of the largest one.

    Safer than "largest component only", which breaks cords split by thick or weak slices.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` uint8 mask.
    """
    lab, n = components(mask)
    if n == 0:
        return np.zeros(mask.shape, np.uint8)
    voxel = float(np.prod(spacing))
    sizes = np.bincount(lab.ravel())[1:] * voxel
    keep = (sizes >= min_volume_mm3) & (sizes >= min_fraction_of_largest * sizes.max())
    return np.isin(lab, np.nonzero(keep)[0] + 1).astype(np.uint8)


def dilate_mm(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Dilate a ``(Z, Y, X)`` mask by an ellipsoid of ``radius_mm`` (at least the 6-neighbourhood in-plane)."""
    if radius_mm <= 0:
        return (mask > 0).astype(np.uint8)
    r = [max(0, int(np.floor(radius_mm / s))) for s in spacing]
    grids = np.meshgrid(*[np.arange(-k, k + 1) for k in r], indexing="ij")
    ball = sum(((g * s) / radius_mm) ** 2 for g, s in zip(grids, spacing)) <= 1.0
    return ndi.binary_dilation(mask > 0, structure=ball).astype(np.uint8)


def lesion_f1(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Lesion-wise detection scores by connected components (any overlap = a match).

    Returns
    -------
    dict
        ``tp`` (detected true lesions), ``fn``, ``fp`` (predicted components touching no true
        lesion), ``precision``, ``recall``, ``f1`` (1.0 when both are empty).
    """
    tl, nt = components(truth)
    pl, npred = components(pred)
    tp = len(np.unique(tl[(tl > 0) & (pred > 0)]))
    matched_pred = len(np.unique(pl[(pl > 0) & (truth > 0)]))
    fp = npred - matched_pred
    fn = nt - tp
    precision = matched_pred / npred if npred else (1.0 if nt == 0 else 0.0)
    recall = tp / nt if nt else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"tp": float(tp), "fn": float(fn), "fp": float(fp), "precision": precision, "recall": recall, "f1": f1}
