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


def near_centerline(mask: np.ndarray, spacing: tuple[float, float, float], max_dist_mm: float,
                    candidates: int = 5) -> np.ndarray:
    """Keep the components that lie on the cord's line: drop blobs away from it (airway, fat, coil edges).

    Each of the ``candidates`` components longest along Z (the cord runs along Z on the
    canonical axial grid) proposes a centreline: its per-slice centroid, interpolated over the
    slices it misses. A component lies on that line when the mean in-plane distance of its
    voxels to the line is at most ``max_dist_mm``. The line whose components cover the most
    slices (then the most voxels) wins, so a cord split by thick or weak slices into pieces
    shorter than a false blob still wins, and all its pieces are kept.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(Z, Y, X)`` mask on an axial grid (Z = inferior→superior).
    spacing : tuple[float, float, float]
        ``(sz, sy, sx)`` in mm.
    max_dist_mm : float
        Largest mean in-plane distance (mm) of a kept component; ``<= 0`` disables the filter.
    candidates : int
        How many of the longest components are tried as the reference.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` uint8 mask.
    """
    lab, n = components(mask)
    if n <= 1 or max_dist_mm <= 0:
        return (mask > 0).astype(np.uint8)
    zz, yy, xx = np.nonzero(lab)
    ids = lab[zz, yy, xx]
    sizes = np.bincount(ids, minlength=n + 1)
    idx = np.arange(1, n + 1)
    extent = np.asarray(ndi.maximum(zz, ids, idx)) - np.asarray(ndi.minimum(zz, ids, idx)) + 1
    order = np.lexsort((sizes[1:], extent))[::-1][:candidates] + 1
    all_z = np.arange(mask.shape[0])
    best_score, best_keep = (-1, -1), np.zeros(0, np.int64)
    for ref in order:
        sel = ids == ref
        rz = np.unique(zz[sel])
        line_y = np.interp(all_z, rz, ndi.mean(yy[sel], zz[sel], rz))
        line_x = np.interp(all_z, rz, ndi.mean(xx[sel], zz[sel], rz))
        dist = np.hypot((yy - line_y[zz]) * spacing[1], (xx - line_x[zz]) * spacing[2])
        mean_dist = np.bincount(ids, weights=dist, minlength=n + 1)[1:] / np.maximum(sizes[1:], 1)
        keep = np.nonzero(mean_dist <= max_dist_mm)[0] + 1
        on_line = np.isin(ids, keep)
        score = (len(np.unique(zz[on_line])), int(on_line.sum()))
        if score > best_score:
            best_score, best_keep = score, keep
    return np.isin(lab, best_keep).astype(np.uint8)


def drop_detached_below(mask: np.ndarray, spacing: tuple[float, float, float], max_gap_mm: float) -> np.ndarray:
    """Drop cord pieces cut off below the main cord by more than ``max_gap_mm`` of empty slices.

    The spinal cord is one continuous structure that ends at the conus; a piece of "cord" found
    a long way below the main cord, with nothing in between, is the cauda equina or the filum
    (nerve roots in CSF look like a small cord in axial slices), not a cord split by a weak
    slice (those gaps are a slice or two). The slices that hold any voxel are split into runs
    where the empty stretch between two of them is longer than ``max_gap_mm``; the run with the
    most voxels is the main cord; every run entirely below it is dropped. Runs above it are kept
    (the medulla, a cord interrupted by an artefact above a long main segment).

    Parameters
    ----------
    mask : numpy.ndarray
        ``(Z, Y, X)`` mask on the canonical axial grid (Z = inferior→superior).
    spacing : tuple[float, float, float]
        ``(sz, sy, sx)`` in mm.
    max_gap_mm : float
        Longest empty stretch (mm) inside one run; ``<= 0`` disables the filter.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` uint8 mask.
    """
    out = (mask > 0).astype(np.uint8)
    if max_gap_mm <= 0:
        return out
    per_slice = out.reshape(out.shape[0], -1).sum(axis=1)
    zs = np.nonzero(per_slice)[0]
    if zs.size < 2:
        return out
    gaps_mm = (np.diff(zs) - 1) * float(spacing[0])
    starts = np.concatenate([[0], np.nonzero(gaps_mm > max_gap_mm)[0] + 1])
    runs = np.split(zs, starts[1:])
    if len(runs) == 1:
        return out
    main = max(runs, key=lambda r: int(per_slice[r].sum()))
    for run in runs:
        if run[-1] < main[0]:
            out[run[0]:run[-1] + 1] = 0
    return out


def _slice_area_mm2(mask: np.ndarray, spacing: tuple[float, float, float], smooth_mm: float) -> np.ndarray:
    """Cross-sectional area (mm²) of each Z slice of ``mask``, a moving mean over about ``smooth_mm``."""
    area = mask.reshape(mask.shape[0], -1).sum(axis=1).astype(float) * float(spacing[1]) * float(spacing[2])
    width = max(1, int(round(smooth_mm / float(spacing[0]))) | 1)
    return ndi.uniform_filter1d(area, size=width, mode="nearest")


def cut_below_conus(mask: np.ndarray, spacing: tuple[float, float, float], *, window_mm: float,
                    taper_ratio: float = 0.7, regrow_ratio: float = 1.4, reference_mm: float = 20.0,
                    min_length_mm: float = 80.0, max_slice_mm: float = 2.5, edge_mm: float = 5.0
                    ) -> np.ndarray:
    """Drop what lies below the conus when the cord's inferior end tapers and then swells again.

    The spinal cord ends in the conus medullaris: its cross-section narrows to a tip and never
    widens again below it. Below the conus, the nerve roots of the cauda equina gather in the
    thecal sac and, in axial slices, look like a small cord joined to the tip; a network marks
    them as cord in one piece with it, so :func:`drop_detached_below` cannot tell them apart.
    This filter looks for the signature of that mistake in the area profile along Z: within the
    lowest ``window_mm`` of the mask, a slice whose (3 mm smoothed) area is at most
    ``taper_ratio`` × the largest area in the ``reference_mm`` above it (the taper) while the
    mask below it grows back to at least ``regrow_ratio`` × that area (the roots). The narrowest
    such slice is the conus; every slice below it is cleared. A mask that tapers without
    regrowing (a real conus, a cord fading at the edge of the field of view), a short mask
    (under ``min_length_mm``), a mask sampled coarser than ``max_slice_mm`` along Z (axial
    slices 3–16 mm apart: their areas swing by a third from slice to slice, and a conus search
    needs the cord seen lengthwise — sagittal, coronal, 3-D or thin axial), a mask that reaches
    to within ``edge_mm`` of the grid's inferior edge (the cord's end is then not in view; a
    narrowing there is coil fall-off or partial volume — seen on a full-FOV cervical sagittal
    whose mask narrows 8 mm above the bottom edge) or a mask whose narrowing is not low down is
    returned unchanged.

    Parameters
    ----------
    mask, spacing
        ``(Z, Y, X)`` mask on the canonical axial grid and its ``(sz, sy, sx)`` in mm, as in
        :func:`drop_detached_below`.
    window_mm : float
        How far above the mask's lowest slice the taper is searched (mm); ``<= 0`` disables.
    taper_ratio, regrow_ratio : float
        The narrowing (fraction of the area above) and the regrowth (multiple of the narrowest
        area) that together mark roots below a conus.
    reference_mm, min_length_mm, max_slice_mm, edge_mm : float
        Length of cord above a candidate slice it is compared with; shortest mask searched;
        coarsest Z spacing searched; least distance of the mask's end from the grid's inferior
        edge (mm).

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` uint8 mask.
    """
    out = (mask > 0).astype(np.uint8)
    zs = np.nonzero(out.reshape(out.shape[0], -1).any(axis=1))[0]
    sz = float(spacing[0])
    if (window_mm <= 0 or sz > max_slice_mm or zs.size < 3 or zs[0] * sz < edge_mm
            or (zs[-1] - zs[0] + 1) * sz < min_length_mm):
        return out
    area = _slice_area_mm2(out, spacing, smooth_mm=3.0)
    ref_n = max(1, int(round(reference_mm / sz)))
    best: tuple[float, int] | None = None
    for z in range(zs[0] + 1, min(zs[-1] - ref_n, zs[0] + int(round(window_mm / sz))) + 1):
        below, above = area[zs[0]:z].max(), area[z + 1:z + 1 + ref_n].max()
        if area[z] <= taper_ratio * above and below >= regrow_ratio * area[z]:
            if best is None or area[z] < best[0]:
                best = (float(area[z]), z)
    if best is not None:
        out[:best[1]] = 0
    return out


def dilate_mm(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Dilate a ``(Z, Y, X)`` mask by an ellipsoid of ``radius_mm`` (at least the 6-neighbourhood in-plane)."""
    if radius_mm <= 0:
        return (mask > 0).astype(np.uint8)
    r = [max(0, int(np.floor(radius_mm / s))) for s in spacing]
    if max(r) > 3 and (mask > 0).any():  # a large ball: the distance transform is the same set, and far faster
        return (ndi.distance_transform_edt(mask == 0, sampling=spacing) <= radius_mm).astype(np.uint8)
    grids = np.meshgrid(*[np.arange(-k, k + 1) for k in r], indexing="ij")
    ball = sum(((g * s) / radius_mm) ** 2 for g, s in zip(grids, spacing)) <= 1.0
    return ndi.binary_dilation(mask > 0, structure=ball).astype(np.uint8)


def hysteresis(seeds: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Grow ``seeds`` into ``region``: every connected component of ``region | seeds`` that holds a seed voxel.

    Both are ``(Z, Y, X)`` masks on one grid (26-connectivity, as :func:`components`). No
    component without a seed is added, so the number of components never grows (two seeds
    joined by the region become one). Returns uint8.
    """
    seeds = seeds > 0
    if not seeds.any():
        return seeds.astype(np.uint8)
    labels, _ = components((region > 0) | seeds)
    hit = np.unique(labels[seeds])
    return np.isin(labels, hit[hit > 0]).astype(np.uint8)


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
