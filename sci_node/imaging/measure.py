"""Measurements of the cord and its lesions (pure functions, no I/O).

Inputs are uint8 masks in ``(Z, Y, X)`` array order and a 3x4 matrix ``index_to_lps``
mapping an array index ``(z, y, x, 1)`` to patient LPS millimetres (see
:func:`index_to_lps`). The superior-inferior ("SI") array axis is the one whose direction is
closest to patient S; a "slice" here is one index along it (an axial slice for axial series, an
image row for sagittal ones). The word "level" means only a vertebral level (C1 ... L5, from
:mod:`sci_node.imaging.levels`).

* cord centre line: centroid of the cord at every level, lightly smoothed;
* cross-sectional area (CSA, mm2) per slice: cord voxels of the slice times the voxel face
  area, corrected for the cord's angle to the SI axis (cos of the angle between the centre
  line tangent and the axis), as the Spinal Cord Toolbox does;
* lesions: 26-connected components; volume (mm3) and length along the cord (mm): the arc
  length of the centre line between the first and last slice the lesion touches, plus one
  slice's thickness;
* vertebral levels (when a :class:`sci_node.imaging.levels.VertebralLabels` is given): per level the mean
  CSA and the cord length in it, the mean CSA over C2 and C3, each lesion's levels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

_CONN26 = np.ones((3, 3, 3), dtype=bool)


def index_to_lps(origin: tuple[float, ...], spacing_xyz: tuple[float, ...], direction: tuple[float, ...]) -> np.ndarray:
    """3x4 matrix from ``(z, y, x, 1)`` array indices to LPS mm (SimpleITK geometry).

    Parameters
    ----------
    origin, spacing_xyz, direction
        ``image.GetOrigin()``, ``image.GetSpacing()`` (x, y, z order) and the row-major 3x3
        ``image.GetDirection()``.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing_xyz, dtype=np.float64)
    m = np.zeros((3, 4))
    m[:, :3] = d[:, ::-1]  # columns for z, y, x
    m[:, 3] = origin
    return m


def si_axis(m: np.ndarray) -> int:
    """Array axis (0=Z, 1=Y, 2=X) whose direction is closest to patient superior-inferior."""
    unit = m[:, :3] / np.linalg.norm(m[:, :3], axis=0)
    return int(np.argmax(np.abs(unit[2])))


@dataclass(frozen=True)
class CordProfile:
    """Per-level cord geometry along the SI axis.

    Attributes
    ----------
    levels : (N,) int indices along the SI axis that contain cord, ascending
    points : (N, 3) smoothed centre line, LPS mm
    arc : (N,) cumulative arc length along the centre line, mm (0 at the first level): each
        level step counts one thickness divided by the cosine of the cord's angle to the axis
    csa : (N,) angle-corrected cross-sectional area, mm2
    thickness : float, spacing along the SI axis, mm
    """

    levels: np.ndarray
    points: np.ndarray
    arc: np.ndarray
    csa: np.ndarray
    thickness: float


def cord_profile(cord: np.ndarray, m: np.ndarray) -> CordProfile:
    """Centre line, arc length and CSA of a ``(Z, Y, X)`` cord mask (see module doc)."""
    ax = si_axis(m)
    spacing = np.linalg.norm(m[:, :3], axis=0)
    face = float(np.prod(np.delete(spacing, ax)))
    moved = np.moveaxis(cord > 0, ax, 0)
    counts = moved.reshape(moved.shape[0], -1).sum(axis=1)
    levels = np.nonzero(counts)[0]
    if levels.size == 0:
        e = np.zeros(0)
        return CordProfile(levels, np.zeros((0, 3)), e, e, float(spacing[ax]))
    idx = np.argwhere(cord > 0).astype(np.float64)
    lev = idx[:, ax].astype(int)
    sums = np.zeros((moved.shape[0], 3))
    np.add.at(sums, lev, idx)
    centroid_idx = sums[levels] / counts[levels, None]
    sigma = 2.0 if levels.size >= 5 else 0.0
    smooth = ndi.gaussian_filter1d(centroid_idx, sigma, axis=0, mode="nearest") if sigma else centroid_idx
    points = smooth @ m[:, :3].T + m[:, 3]
    axis_dir = m[:, ax] / spacing[ax]
    if levels.size >= 2:
        tangent = np.gradient(points, axis=0)
        norms = np.linalg.norm(tangent, axis=1)
        cos = np.abs(tangent @ axis_dir) / np.where(norms > 0, norms, 1.0)
        cos = np.where(norms > 0, np.clip(cos, 0.2, 1.0), 1.0)
    else:
        cos = np.ones(levels.size)
    # arc length: each level step is one slab thickness along the axis, lengthened by 1/cos
    step = np.diff(levels) * spacing[ax] / (0.5 * (cos[1:] + cos[:-1])) if levels.size >= 2 else np.zeros(0)
    arc = np.concatenate([[0.0], np.cumsum(step)])
    csa = counts[levels] * face * cos
    return CordProfile(levels, points, arc, csa, float(spacing[ax]))


def lesion_components(lesion: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a ``(Z, Y, X)`` lesion mask: ``(labels int32, count)``."""
    lab, n = ndi.label(lesion > 0, structure=_CONN26)
    return lab.astype(np.int32), int(n)


def lesion_table(lesion: np.ndarray, profile: CordProfile, m: np.ndarray,
                 prob: np.ndarray | None = None, level_map: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One row per lesion: ``id`` (1..n, by decreasing volume), ``volume_mm3``,
    ``length_along_cord_mm``, ``centroid_lps_mm``, ``voxels``, ``slices`` [first, last] (indices along
    the SI axis), and with
    ``prob`` (the lesion network's probability, ``(Z, Y, X)`` float in [0, 1] on the same grid)
    ``confidence``: the lesion's peak probability (rounded to 0.001), and ``mean_probability``; with
    ``level_map`` (:attr:`sci_node.imaging.levels.VertebralLabels.level_map`) ``vertebral_levels``: the names of the
    levels its voxels lie in, from the top down (``[]`` where none is known)."""
    lab, n = lesion_components(lesion)
    if n == 0:
        return []
    ax = si_axis(m)
    voxel = float(abs(np.linalg.det(m[:, :3])))
    rows: list[dict[str, Any]] = []
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        comp = lab[sl] == i
        idx = np.argwhere(comp) + np.array([s.start for s in sl])
        lv = idx[:, ax]
        lo, hi = int(lv.min()), int(lv.max())
        length = _arc_between(profile, lo, hi)
        rows.append({
            "voxels": int(comp.sum()),
            "volume_mm3": float(comp.sum() * voxel),
            "length_along_cord_mm": float(length),
            "centroid_lps_mm": [float(v) for v in (idx.mean(axis=0) @ m[:, :3].T + m[:, 3])],
            "slices": [lo, hi],
            **({} if prob is None else _confidence(prob[sl][comp])),
            **({} if level_map is None else {"vertebral_levels": _level_names(level_map[sl][comp])}),
        })
    rows.sort(key=lambda r: -r["volume_mm3"])
    for k, r in enumerate(rows, start=1):
        r["id"] = k
    return rows


def _level_names(values: np.ndarray) -> list[str]:
    from sci_node.imaging.levels import LEVEL_NAMES

    return [LEVEL_NAMES[v] for v in sorted(set(np.unique(values).tolist()) - {0})]


def _confidence(p: np.ndarray) -> dict[str, float]:
    """``confidence`` (peak) and ``mean_probability`` of one lesion's voxel probabilities ``p``."""
    return {"confidence": round(float(np.clip(p.max(), 0.0, 1.0)), 3),
            "mean_probability": round(float(np.clip(p.mean(), 0.0, 1.0)), 3)}


def _arc_between(profile: CordProfile, lo: int, hi: int) -> float:
    """Centre-line arc length from level ``lo`` to ``hi`` plus one level's thickness (mm)."""
    if profile.levels.size >= 2:
        a = np.interp([lo, hi], profile.levels, profile.arc)
        step = float(np.median(np.diff(profile.arc) / np.diff(profile.levels)))
        return float(abs(a[1] - a[0]) + step)
    return float((hi - lo + 1) * profile.thickness)


def summarize(cord: np.ndarray, lesion: np.ndarray | None, m: np.ndarray,
              lesion_prob: np.ndarray | None = None, vertebral: Any = None) -> dict[str, Any]:
    """Every number the report needs, JSON-ready (``lesion_prob``: the lesion network's probability on
    the same grid, which gives each lesion its ``confidence``).

    Returns
    -------
    dict
        ``cord_volume_mm3``, ``cord_length_mm``, ``csa_mm2`` {``mean``, ``min``, ``max``,
        ``median``}, ``csa_per_slice`` [{``slice``, ``arc_mm``, ``csa_mm2``}],
        ``lesion_count``, ``lesion_volume_mm3``, ``lesions`` (see :func:`lesion_table`),
        ``si_axis`` (0=Z, 1=Y, 2=X). With ``lesion`` None (the lesion model was not run, e.g. on a
        T1w) ``lesion_count`` and ``lesion_volume_mm3`` are None, not 0: not assessed is not "none found".
        With ``vertebral`` (a :class:`sci_node.imaging.levels.VertebralLabels` of the same cord) also
        :func:`vertebral_summary`'s keys, and each lesion its ``vertebral_levels``.
    """
    voxel = float(abs(np.linalg.det(m[:, :3])))
    prof = cord_profile(cord, m)
    lmap = vertebral.level_map if vertebral is not None else None
    lesions = lesion_table(lesion, prof, m, lesion_prob, lmap) if lesion is not None else []
    csa = prof.csa
    stats = ({"mean": float(csa.mean()), "min": float(csa.min()), "max": float(csa.max()),
              "median": float(np.median(csa))} if csa.size else {})
    return {
        "cord_volume_mm3": float((cord > 0).sum() * voxel),
        "cord_length_mm": float(prof.arc[-1] + prof.thickness) if prof.levels.size else 0.0,
        "csa_mm2": stats,
        "csa_per_slice": [{"slice": int(lv), "arc_mm": round(float(a), 2), "csa_mm2": round(float(c), 2)}
                          for lv, a, c in zip(prof.levels, prof.arc, csa)],
        "lesion_count": len(lesions) if lesion is not None else None,
        "lesion_volume_mm3": float(sum(r["volume_mm3"] for r in lesions)) if lesion is not None else None,
        "lesions": lesions,
        "si_axis": si_axis(m),
        **(vertebral_summary(vertebral, prof, m) if vertebral is not None else {}),
    }


def vertebral_summary(vertebral: Any, prof: CordProfile, m: np.ndarray) -> dict[str, Any]:
    """The vertebral keys of :func:`summarize` for a :class:`sci_node.imaging.levels.VertebralLabels` of the cord.

    Returns ``vertebral_levels`` [{``level`` "C3", ``csa_mm2_mean``, ``length_mm``}] from the top down (a
    slice belongs to the level most of its cord voxels have; its length is its arc step), ``csa_c2_c3_mm2``
    (mean CSA over the slices of C2 and C3; None unless both are in view), ``vertebral_discs``
    [{``disc`` "C2-C3", ``label``, ``lps_mm``, ``evidence``, ``bridged``}] and
    ``vertebral_levels_unknown_reason`` (None when known; when unknown the lists are empty).
    """
    from sci_node.imaging.levels import LEVEL_NAMES

    if not vertebral.known:
        return {"vertebral_levels": [], "csa_c2_c3_mm2": None, "vertebral_discs": [],
                "vertebral_levels_unknown_reason": vertebral.unknown_reason}
    lmap = vertebral.level_map
    ax = si_axis(m)
    moved = np.moveaxis(lmap, ax, 0).reshape(lmap.shape[ax], -1)
    slice_level = np.array([np.bincount(moved[i][moved[i] > 0], minlength=25).argmax() if (moved[i] > 0).any()
                            else 0 for i in prof.levels], dtype=np.int64)
    step = np.gradient(prof.arc) if prof.arc.size >= 2 else np.full(prof.arc.size, prof.thickness)
    rows = []
    for lv in sorted(set(slice_level.tolist()) - {0}):
        sel = slice_level == lv
        rows.append({"level": LEVEL_NAMES[lv], "csa_mm2_mean": round(float(prof.csa[sel].mean()), 2),
                     "length_mm": round(float(step[sel].sum()), 1)})
    c23 = np.isin(slice_level, (2, 3))
    both = {2, 3} <= set(slice_level.tolist())
    return {"vertebral_levels": rows,
            "csa_c2_c3_mm2": round(float(prof.csa[c23].mean()), 2) if both else None,
            "vertebral_discs": [d.as_dict() for d in vertebral.discs],
            "vertebral_levels_unknown_reason": None}
