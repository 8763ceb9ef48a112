r"""Sequence weighting from the image itself: CSF against cord, measured around the segmented cord.

Without a header the sequence network reads 32 × 32 thumbnails of the whole field of view, where
the cord and the CSF around it are one or two pixels. Once the cord is segmented, the weighting
can be read where it is written: the cerebrospinal fluid right around the cord. Its relaxation
times are extreme (T1 ≈ 4000 ms, T2 ≈ 2000 ms at 1.5–3 T against the cord's ≈ 900 / 75 ms), so
its brightness relative to the cord orders the weightings:

* **T1 weighting** (spin echo TR ≲ 800 ms, MPRAGE, spoiled GRE with a large flip): CSF barely
  recovers between excitations and is *darker* than the cord.
* **Proton-density / MT GRE, GRE EPI, T2\*-weighted GRE** (TE 3–25 ms, TR short for CSF): CSF at
  most about twice the cord (the cord's T2\* decay over TE is small, CSF is partly saturated).
* **T2 weighting** (spin echo, TE ≳ 80 ms): the cord has lost most of its signal over TE, CSF
  almost none, so CSF is several times brighter than the cord.

The measure, :func:`cord_contrast`: the 90th percentile of the voxels between ``ring_mm[0]`` and
``ring_mm[1]`` outside the cord mask (the subarachnoid space: CSF with some dura and cord partial
volume; the 90th percentile reads its CSF part) over the median of the voxels inside the mask.
:func:`sequence_from_contrast` turns it into a class at two thresholds with margin on both
sides (``T1_MAX`` and ``T2_MIN``, rules ``cord-contrast-v1``), and into no class in between,
where the image network keeps the decision. The measured values on the real series of this
project (docs/classifiers.md, "Cord contrast") are T1w 0.60; MT-off GRE 0.88–0.95; T2\*w GRE
1.08–2.21; MT-on GRE, DWI and GRE-EPI 1.49–2.34; T2w spin echo 2.83–5.76.

What it cannot tell apart, and which side it errs on: a FLAIR nulls CSF and would read as T1w
(the lesion model is then not run: the safe side); STIR and a spin-echo EPI b0 keep CSF bright and
read as T2w. The routing applies the check only to a T1w/T2w/T2\*w the image network decided, so a
series the network calls "other" (MT, DWI, EPI, STIR, FLAIR, PD) is routed out before it.

Arrays are ``(Z, Y, X)`` with ``spacing_zyx`` in mm; intensities in the scanner's arbitrary,
non-negative units (the ratio does not depend on their scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["RULES_ID", "T1_MAX", "T2_MIN", "CordContrast", "ContrastRule", "cord_contrast",
           "sequence_from_contrast"]

#: Version of the rules, named in the routing decision when one fires.
RULES_ID = "cord-contrast-v1"
#: CSF/cord at or below this: T1 weighting (CSF darker than the cord).
T1_MAX = 0.7
#: CSF/cord at or above this: T2 weighting (long-TE spin echo).
T2_MIN = 2.5


@dataclass(frozen=True)
class CordContrast:
    """CSF-to-cord contrast of one series.

    Attributes
    ----------
    csf_to_cord : float
        90th percentile of the ring around the cord over the median inside it (dimensionless).
    cord_voxels, ring_voxels : int
        Voxels measured inside the cord and in the ring.
    """

    csf_to_cord: float
    cord_voxels: int
    ring_voxels: int


@dataclass(frozen=True)
class ContrastRule:
    """Outcome of :func:`sequence_from_contrast`: ``label`` None = the network keeps the decision."""

    label: str | None
    rule: str
    detail: str


def cord_contrast(image: np.ndarray, cord: np.ndarray, spacing_zyx: Sequence[float],
                  ring_mm: tuple[float, float] = (1.0, 4.0), min_cord_voxels: int = 50) -> CordContrast | None:
    """CSF-to-cord contrast around a cord mask, or None when it cannot be measured.

    Parameters
    ----------
    image : np.ndarray, shape (Z, Y, X)
        Intensities of one volume (any real dtype).
    cord : np.ndarray, shape (Z, Y, X)
        Cord mask on the same grid (non-zero = cord).
    spacing_zyx : sequence of 3 floats
        Voxel spacing in mm along Z, Y, X.
    ring_mm : (float, float)
        The ring is the voxels whose distance to the nearest cord voxel centre is in
        ``(ring_mm[0], ring_mm[1]]`` mm.
    min_cord_voxels : int
        Fewer cord voxels than this: None (nothing to measure).

    Returns
    -------
    CordContrast | None
        None also when the cord's median is not positive or the ring is empty.
    """
    from scipy import ndimage  # type: ignore[import-untyped]

    mask = np.asarray(cord) > 0
    if image.shape != mask.shape:
        raise ValueError(f"image shape {image.shape} differs from the cord mask's {mask.shape}")
    n_cord = int(mask.sum())
    if n_cord < min_cord_voxels:
        return None
    spacing = np.asarray(spacing_zyx, dtype=float)
    margin = np.ceil(ring_mm[1] / spacing).astype(int) + 1
    idx = np.nonzero(mask)
    box = tuple(slice(max(0, int(i.min()) - m), int(i.max()) + m + 1) for i, m in zip(idx, margin))
    sub, sub_mask = np.asarray(image[box], dtype=np.float64), mask[box]
    dist = ndimage.distance_transform_edt(~sub_mask, sampling=spacing)
    ring = (dist > ring_mm[0]) & (dist <= ring_mm[1])
    cord_level = float(np.median(sub[sub_mask]))
    if not ring.any() or cord_level <= 0:
        return None
    return CordContrast(float(np.percentile(sub[ring], 90)) / cord_level, n_cord, int(ring.sum()))


def sequence_from_contrast(contrast: CordContrast | None) -> ContrastRule:
    """T1w at ``csf_to_cord <= T1_MAX``, T2w at ``>= T2_MIN``, else no class (the network decides)."""
    if contrast is None:
        return ContrastRule(None, "unmeasured", "no cord (or no ring around it) to measure the contrast on")
    r = contrast.csf_to_cord
    if r <= T1_MAX:
        return ContrastRule("T1w", "csf-dark", f"CSF/cord {r:.2f} <= {T1_MAX:g}: CSF darker than the cord")
    if r >= T2_MIN:
        return ContrastRule("T2w", "csf-bright", f"CSF/cord {r:.2f} >= {T2_MIN:g}: long-TE T2 weighting")
    return ContrastRule(None, "between", f"CSF/cord {r:.2f} between {T1_MAX:g} and {T2_MIN:g}")
