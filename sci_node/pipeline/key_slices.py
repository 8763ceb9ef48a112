"""Where a reader should look: the key slice and outline of the cord and of each lesion.

Pure geometry on ``(Z, Y, X)`` uint8 masks in volume order (``Z`` = the series' slices, ``Y`` =
image rows, ``X`` = image columns, as :class:`sci_node.series.SeriesVolume` holds them), plus the
small adapter that turns a slice index into the source image it came from.

* The **key slice** of an object is the slice where it has the most voxels (the first such slice
  on a tie). Slices the series lacks (interpolated for inference) are never chosen: an object seen
  only there is drawn on the nearest acquired slice.
* Its **outline** is the boundary of the largest 4-connected piece of the object on that slice
  (holes filled), as a closed polygon through pixel corners in ``(row, column)`` image
  coordinates, ``(0, 0)`` being the top-left corner of the top-left pixel (the DICOM SCOORD
  convention, PS3.3 C.18.6.1.2).
* The findings are ordered for reading: the lesions by id (the largest first), then the cord. The
  first one is the **opening** finding (the largest lesion, else the cord): the SR lists the
  findings in this order, so OHIF's SR view opens on its slice and steps through the others.

Lesions are identified as :mod:`sci_node.measure` numbers them: 26-connected components, id 1..n
by decreasing voxel count (the order of a stable sort over the component labels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

from sci_node.imaging.measure import lesion_components
from sci_node.pipeline.series import SeriesVolume, SourceRef

CORD_FINDING = "Spinal cord"


def lesion_finding(lesion_id: int) -> str:
    """The tracking identifier of lesion ``lesion_id`` (``"Lesion 3"``), as the SR names it."""
    return f"Lesion {lesion_id}"


@dataclass(frozen=True)
class KeySlice:
    """One object's key slice and its outline there.

    Attributes
    ----------
    index : int
        Slice index ``z`` in volume order (an acquired slice).
    voxels : int
        The object's voxels on the slice its outline was taken from.
    outline : np.ndarray
        ``(N, 2)`` float64 closed polygon (first point == last), ``(row, column)`` pixel-corner
        coordinates, clockwise on screen, no collinear vertices.
    """

    index: int
    voxels: int
    outline: np.ndarray


@dataclass(frozen=True)
class KeyImage:
    """A finding's key slice tied to the source image (and frame) it shows."""

    finding: str
    source: SourceRef
    key: KeySlice

    def record(self) -> dict[str, Any]:
        """JSON-ready ``{"finding", "sop_instance_uid", "frame", "slice"}`` (no outline)."""
        return {"finding": self.finding, "sop_instance_uid": self.source.sop_instance_uid,
                "frame": self.source.frame_number, "slice": self.key.index}


def slice_counts(mask: np.ndarray) -> np.ndarray:
    """``(Z,)`` int64: the mask's voxels on every slice of a ``(Z, Y, X)`` mask."""
    return np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1).astype(np.int64)


def key_slice(mask: np.ndarray, acquired: np.ndarray) -> KeySlice | None:
    """The key slice of the object in ``mask`` and its outline, or None for an empty mask.

    Parameters
    ----------
    mask
        ``(Z, Y, X)`` mask of one object (nonzero = inside).
    acquired
        ``(Z,)`` bool, True for the slices the series holds (False: missing, interpolated).
    """
    counts = slice_counts(mask)
    if not counts.any():
        return None
    on_acquired = np.where(acquired, counts, 0)
    best = int(np.argmax(on_acquired)) if on_acquired.any() else int(np.argmax(counts))
    shown = best if acquired[best] else nearest_acquired(best, acquired)
    return KeySlice(index=shown, voxels=int(counts[best]), outline=outline(mask[best] > 0))


def nearest_acquired(z: int, acquired: np.ndarray) -> int:
    """The acquired slice index nearest to ``z`` (the lower one on a tie)."""
    have = np.flatnonzero(acquired)
    if have.size == 0:
        raise ValueError("the series has no acquired slice")
    return int(have[np.argmin(np.abs(have - z))])


def outline(mask: np.ndarray) -> np.ndarray:
    """Closed boundary polygon of the largest 4-connected piece of a 2-D mask, holes filled.

    Parameters
    ----------
    mask
        ``(Y, X)`` bool with at least one True pixel.

    Returns
    -------
    np.ndarray
        ``(N, 2)`` float64 ``(row, column)`` pixel corners, first == last, clockwise on screen
        (rows down, columns right); a single pixel gives its 4 corners (N = 5).
    """
    labels, n = ndi.label(mask)  # 2-D default structure: 4-connectivity
    if n == 0:
        raise ValueError("outline of an empty mask")
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    piece = ndi.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    loop = _walk(_boundary_edges(piece))
    return _drop_collinear(np.asarray(loop, dtype=np.float64))


def _boundary_edges(piece: np.ndarray) -> dict[tuple[int, int], tuple[int, int]]:
    """Directed pixel-side edges between ``piece`` and the outside, keyed by their start corner.

    Each side of a pixel that borders the outside becomes one edge, oriented clockwise on
    screen (top side left to right, right side downwards ...). A filled 4-connected piece
    has one outgoing edge per boundary corner, so the edges form one loop.
    """
    pad = np.pad(piece, 1)
    inner = pad[1:-1, 1:-1]
    edges: dict[tuple[int, int], tuple[int, int]] = {}
    sides = ((pad[:-2, 1:-1], (0, 0), (0, 1)),   # top: the pixel above is outside
             (pad[1:-1, 2:], (0, 1), (1, 1)),    # right
             (pad[2:, 1:-1], (1, 1), (1, 0)),    # bottom
             (pad[1:-1, :-2], (1, 0), (0, 0)))   # left
    for neighbour, start, end in sides:
        for r, c in np.argwhere(inner & ~neighbour):
            edges[(int(r) + start[0], int(c) + start[1])] = (int(r) + end[0], int(c) + end[1])
    return edges


def _walk(edges: Mapping[tuple[int, int], tuple[int, int]]) -> list[tuple[int, int]]:
    """Follow the edges from the smallest corner back to it: the closed loop of corners."""
    start = min(edges)
    loop, here = [start], edges[start]
    while here != start and len(loop) <= len(edges):
        loop.append(here)
        here = edges[here]
    loop.append(start)
    return loop


def _drop_collinear(loop: np.ndarray) -> np.ndarray:
    """The closed loop without the corners where it runs straight on."""
    pts = loop[:-1]
    before = pts - np.roll(pts, 1, axis=0)
    after = np.roll(pts, -1, axis=0) - pts
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] != 0
    kept = pts[turn]
    return np.vstack([kept, kept[:1]])


def lesion_key_slices(lesion: np.ndarray, rows: Sequence[Mapping[str, Any]],
                      acquired: np.ndarray) -> dict[int, KeySlice]:
    """The key slice of every lesion of :func:`sci_node.measure.lesion_table`, by lesion id.

    Parameters
    ----------
    lesion
        ``(Z, Y, X)`` lesion mask the rows were measured on.
    rows
        The lesion rows (``id``, ``voxels``); a row whose component cannot be matched (a
        different mask) is left out.
    acquired
        ``(Z,)`` bool, see :func:`key_slice`.
    """
    labels, n = lesion_components(lesion)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    by_id = sorted(range(n), key=lambda i: -int(sizes[i]))  # measure's order: stable, by volume
    out: dict[int, KeySlice] = {}
    for row in rows:
        k = int(row["id"]) - 1
        if 0 <= k < n and int(sizes[by_id[k]]) == int(row.get("voxels", sizes[by_id[k]])):
            found = key_slice(labels == by_id[k] + 1, acquired)
            if found is not None:
                out[int(row["id"])] = found
    return out


def key_images(volume: SeriesVolume, cord: np.ndarray, lesion: np.ndarray | None,
               lesion_rows: Sequence[Mapping[str, Any]]) -> list[KeyImage]:
    """The key image of every finding in reading order, the opening one first (see the module doc).

    Parameters
    ----------
    volume
        The source series (its ``refs`` name the image of every slice).
    cord, lesion
        ``(Z, Y, X)`` uint8 masks on the series grid (``lesion`` None: not assessed).
    lesion_rows
        ``summary["lesions"]`` of :func:`sci_node.measure.summarize` for these masks.

    Returns
    -------
    list of KeyImage
        The lesions by id, then the cord; the cord alone without lesions; empty when the cord
        mask is empty.
    """
    acquired = np.array([ref is not None for ref in volume.refs])
    cord_key = key_slice(cord, acquired)
    if cord_key is None:
        return []
    lesions = lesion_key_slices(lesion, lesion_rows, acquired) if lesion is not None else {}
    found = [KeyImage(lesion_finding(i), _source(volume, k), k) for i, k in sorted(lesions.items())]
    cord_image = KeyImage(CORD_FINDING, _source(volume, cord_key), cord_key)
    return [*found, cord_image]


def _source(volume: SeriesVolume, key: KeySlice) -> SourceRef:
    ref = volume.refs[key.index]
    if ref is None:  # key_slice only returns acquired slices
        raise ValueError(f"slice {key.index} is missing from the series")
    return ref


def viewer_record(images: Sequence[KeyImage], sr_series_uid: str) -> dict[str, Any]:
    """What the job record and report.json keep of the key images (for the viewer links).

    ``{"sr_series_uid", "opening": {finding, sop_instance_uid, frame, slice}, "images": [...]}``;
    ``opening`` None without key images.
    """
    records = [im.record() for im in images]
    return {"sr_series_uid": sr_series_uid, "opening": records[0] if records else None, "images": records}
