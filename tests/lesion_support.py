"""Test helper: a copy of a real sagittal series with ellipsoid T2 lesions written into its cord.

The same construction as ``test_obvious_lesion.with_lesion`` (issue #15), for several lesions at
once: each is an ellipsoid around the cord's centre at a given height along the cord, clipped to
the cord, at ``GAIN`` times the cord's median intensity. The copy is a new series (new Series and
SOP Instance UIDs) in a study of its own (new Study Instance UID).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from sci_node.pipeline.series import SeriesVolume

GAIN = 2.0  # lesion intensity / cord median (MS lesions on T2w: about 1.5-2.5)


@dataclass(frozen=True)
class Lesion:
    """One inserted lesion: ``height`` along the cord (0 = top, 1 = bottom), half-axes in mm."""

    height: float
    si_radius_mm: float = 6.0
    radius_mm: float = 2.5


def cord_from_seg(seg_path: Path, vol: SeriesVolume) -> np.ndarray:
    """The cord segment (1) of a node SEG on the series grid, ``(Z, Y, X)`` uint8."""
    seg = hd.seg.segread(seg_path)
    uids = [r.sop_instance_uid for r in vol.refs if r is not None]
    px = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], skip_overlap_checks=True)
    return np.asarray(px[..., 0], dtype=np.uint8)


def with_lesions(files: Sequence[Path], vol: SeriesVolume, cord: np.ndarray, lesions: Sequence[Lesion],
                 out: Path) -> tuple[list[Path], np.ndarray]:
    """Copies of ``files`` (the series ``vol`` was read from) with ``lesions`` written in.

    Returns the new files (volume order) and the label map ``(Z, Y, X)`` uint8: lesion ``k`` of
    ``lesions`` has value ``k + 1``.
    """
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    ordered = [by_uid[r.sop_instance_uid] for r in vol.refs if r is not None]
    arr = np.stack([pydicom.dcmread(f).pixel_array for f in ordered]).astype(np.float32)
    spacing = np.array(vol.image.GetSpacing()[::-1])  # (z, y, x) mm
    zyx = np.argwhere(cord > 0)
    si = int(np.argmax((zyx.max(0) - zyx.min(0)) * spacing))  # the axis the cord runs along
    up = np.array(vol.image.GetDirection()).reshape(3, 3)[2, 2 - si] > 0
    grid = np.indices(arr.shape).reshape(3, -1).T
    labels = np.zeros(arr.shape, dtype=np.uint8)
    median = float(np.median(arr[cord > 0]))
    for k, les in enumerate(lesions):
        level = np.quantile(zyx[:, si], 1 - les.height if up else les.height)
        centre = np.round(zyx[np.abs(zyx[:, si] - level) < 1.5].mean(0)).astype(int)
        radii = np.full(3, les.radius_mm)
        radii[si] = les.si_radius_mm
        inside = ((((grid - centre) * spacing / radii) ** 2).sum(1).reshape(arr.shape) <= 1) & (cord > 0)
        labels[inside] = k + 1
        arr[inside] = np.maximum(arr[inside], GAIN * median)
    out.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, written = generate_uid(), generate_uid(), []
    for z, f in enumerate(ordered):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SeriesDescription = f"{ds.get('SeriesDescription', '')} + {len(lesions)} lesions"[:64]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PixelData = np.clip(arr[z], 0, 4095).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(out / f.name, enforce_file_format=True)
        written.append(out / f.name)
    return written, labels


def as_study(files: Sequence[Path], out: Path, patient: str, date: str) -> tuple[list[Path], str]:
    """``files`` (one series) written to ``out`` as ``patient``'s study of ``date`` with new study, series and
    instance UIDs: ``(paths, series_uid)``."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDate = study, series, date
        ds.PatientID, ds.PatientName = patient, f"Doe^{patient}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / Path(f).name, enforce_file_format=True)
        paths.append(out / Path(f).name)
    return paths, series


def follow_up_with_lesion(prior: Sequence[Path], vol: SeriesVolume, cord: np.ndarray, out: Path,
                          date: str = "20260107") -> tuple[list[Path], np.ndarray, str]:
    """The prior series a year later with one lesion written into its cord (:func:`with_lesions`, a 0.5
    contrast, 5 mm long, 2.5 mm wide), dated ``date``: ``(paths, truth, series_uid)``."""
    later, truth = with_lesions(prior, vol, cord, [Lesion(0.5, 5.0, 2.5)], out)
    for f in later:
        ds = pydicom.dcmread(f)
        ds.StudyDate = date
        ds.save_as(f, enforce_file_format=True)
    return later, truth, str(pydicom.dcmread(later[0], stop_before_pixels=True).SeriesInstanceUID)
