"""A corrected SEG against its source series' grid: which segment is which, is every frame on a source
slice, and the masks it holds as ``(Z, Y, X)`` uint8 arrays on that grid."""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from sci_node.dicom.geometry import SPACING_TOL_MM, VolumeGeometry, functional_group, same_orientation, slice_headers
from sci_node.errors import CorrectionRefused

CORD_CODE, LESION_CODE = "2748008", "52988006"
_CORD_LABEL = re.compile(r"cord", re.I)
_LESION_LABEL = re.compile(r"lesion|plaque", re.I)


def segment_roles(seg: Any) -> tuple[dict[int, str], list[str]]:
    """Map each segment number to ``"cord"`` or ``"lesion"`` (by SNOMED code, else by label).

    Returns the map and notes on segments that are neither (they are ignored).
    """
    roles: dict[int, str] = {}
    notes: list[str] = []
    for item in seg.get("SegmentSequence", []):
        number, label = int(item.SegmentNumber), str(item.get("SegmentLabel", ""))
        codes = {str(c.CodeValue) for c in item.get("SegmentedPropertyTypeCodeSequence", [])}
        if CORD_CODE in codes or (not codes & {LESION_CODE} and _CORD_LABEL.search(label)):
            roles[number] = "cord"
        elif LESION_CODE in codes or _LESION_LABEL.search(label):
            roles[number] = "lesion"
        else:
            notes.append(f"segment {number} {label!r} is neither cord nor lesion: ignored")
    return roles, notes


def check_grid(seg: Any, geom: VolumeGeometry) -> None:
    """Raise :class:`CorrectionRefused` naming the mismatch when the SEG is not on ``geom``'s grid.

    Rows/Columns, pixel spacing and the plane orientation must equal the source's, and every
    frame must lie on a source slice, within the tolerances of :mod:`sci_node.dicom.geometry`
    (its reader reads the frames' functional groups, as it reads an Enhanced MR's).
    """
    nx, ny, _ = geom.size
    if (int(seg.Rows), int(seg.Columns)) != (ny, nx):
        raise CorrectionRefused(f"SEG grid {int(seg.Rows)} x {int(seg.Columns)} (rows x columns) does not match "
                                f"the source series' {ny} x {nx}")
    source_iop = np.concatenate([geom.direction[:, 0], geom.direction[:, 1]])
    for k, frame in enumerate(slice_headers(seg)):
        if frame.spacing is None or frame.orientation is None or frame.position is None:
            raise CorrectionRefused(f"SEG frame {k + 1} lacks its pixel measures, plane orientation or position")
        sy, sx = frame.spacing
        if abs(sy - geom.spacing[1]) > SPACING_TOL_MM or abs(sx - geom.spacing[0]) > SPACING_TOL_MM:
            raise CorrectionRefused(f"SEG pixel spacing {sy:.4f} x {sx:.4f} mm does not match the source's "
                                    f"{geom.spacing[1]:.4f} x {geom.spacing[0]:.4f} mm")
        if not same_orientation(frame.orientation, source_iop):
            raise CorrectionRefused(f"SEG frame {k + 1} orientation {np.round(frame.orientation, 4).tolist()} differs "
                                    "from the source series'")
        ipp = np.asarray(frame.position)
        if geom.slice_of(ipp) is None:
            raise CorrectionRefused(f"SEG frame {k + 1} at {np.round(ipp, 3).tolist()} mm lies on no slice of "
                                    "the source series")


def decode_masks(seg: Any, geom: VolumeGeometry) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The SEG's cord and lesion masks, ``(Z, Y, X)`` uint8 on ``geom``'s grid, plus notes.

    Frames are placed by their plane position (checked by :func:`check_grid` first). BINARY
    frames are 0/1; FRACTIONAL ones are foreground above half the Maximum Fractional Value.

    Raises
    ------
    CorrectionRefused
        Off-grid frames, no cord segment, or pixel data that does not decode.
    """
    check_grid(seg, geom)
    roles, notes = segment_roles(seg)
    if "cord" not in roles.values():
        raise CorrectionRefused("SEG has no spinal cord segment (SNOMED 2748008 or a label with 'cord')")
    try:
        frames = np.asarray(seg.pixel_array)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad pixel data
        raise CorrectionRefused(f"SEG pixel data does not decode: {exc}") from None
    n = int(seg.get("NumberOfFrames", 1))
    frames = frames.reshape(n, int(seg.Rows), int(seg.Columns))
    if str(seg.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        frames = frames > float(seg.get("MaximumFractionalValue", 255)) / 2.0
    nx, ny, nz = geom.size
    masks = {"cord": np.zeros((nz, ny, nx), np.uint8), "lesion": np.zeros((nz, ny, nx), np.uint8)}
    for k, frame in enumerate(slice_headers(seg)[:n]):
        ident = functional_group(seg, k, "SegmentIdentificationSequence")
        role = roles.get(int(ident.ReferencedSegmentNumber)) if ident is not None else None
        if role is None:
            continue
        z = geom.slice_of(np.asarray(frame.position))
        masks[role][z] |= (frames[k] > 0).astype(np.uint8)  # type: ignore[index]
    if not masks["cord"].any():
        raise CorrectionRefused("SEG's spinal cord segment is empty")
    return masks["cord"], masks["lesion"], notes
