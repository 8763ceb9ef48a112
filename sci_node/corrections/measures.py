"""How much a radiologist changed the node's masks: pure functions on ``(Z, Y, X)`` masks on one grid."""
from __future__ import annotations

from typing import Any

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks of the same shape (any dtype, > 0 is foreground); 1.0 when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"dice: shapes {a.shape} and {b.shape} differ")
    fa, fb = a > 0, b > 0
    total = int(fa.sum()) + int(fb.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(fa, fb).sum()) / total


def lesion_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a ``(Z, Y, X)`` mask: ``(labels int32, count)``."""
    from scipy import ndimage  # type: ignore[import-untyped]

    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), bool))
    return labels.astype(np.int32), int(n)


def lesion_changes(original: np.ndarray, corrected: np.ndarray) -> dict[str, int]:
    """Lesions the radiologist added and removed.

    A corrected lesion (26-connected component) that touches no original lesion is *added*;
    an original lesion that touches no corrected lesion is *removed*. Both masks are
    ``(Z, Y, X)`` on the same grid.
    """
    orig_lab, n_orig = lesion_components(original)
    corr_lab, n_corr = lesion_components(corrected)
    added = sum(1 for k in range(1, n_corr + 1) if not (original[corr_lab == k] > 0).any())
    removed = sum(1 for k in range(1, n_orig + 1) if not (corrected[orig_lab == k] > 0).any())
    return {"lesions_original": n_orig, "lesions_corrected": n_corr, "lesions_added": added,
            "lesions_removed": removed}


def change_measures(orig_cord: np.ndarray, orig_lesion: np.ndarray, cord: np.ndarray, lesion: np.ndarray,
                    spacing: tuple[float, float, float]) -> dict[str, Any]:
    """How much the radiologist changed: cord Dice, cord volumes (mm³), lesions added/removed.

    ``spacing`` is ``(sz, sy, sx)`` in mm; every mask ``(Z, Y, X)`` on one grid.
    """
    voxel = float(np.prod(spacing))
    out: dict[str, Any] = {"cord_dice": round(dice(orig_cord, cord), 4),
                           "cord_volume_original_mm3": round(float((orig_cord > 0).sum()) * voxel, 1),
                           "cord_volume_corrected_mm3": round(float((cord > 0).sum()) * voxel, 1),
                           "lesion_dice": round(dice(orig_lesion, lesion), 4)}
    out.update(lesion_changes(orig_lesion, lesion))
    return out
