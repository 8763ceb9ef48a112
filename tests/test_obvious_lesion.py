"""Issue #15: an obviously hyperintense T2 lesion must be found and covered, and nothing else marked.

The demo series (a real sagittal T2w, errsm22, never seen by the shipped models) gets one
ellipsoid lesion, 12 mm long (S-I) and 5 mm across, written into its DICOM pixel data inside the
cord the active cord model found on the clean series, at twice the cord's median intensity (MS
lesions on T2w are about 1.5-2.5 times the cord). The lesion-carrying series then goes through
the node's pipeline with the active models, and the lesion segment of the DICOM-SEG it writes
is read back. At the top of the cervical cord (the issue's case), mid-cord and low:
exactly one lesion (26-connected, as the node counts them), the inserted one, with Dice >= 0.6.
"""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage as ndi

from sci_node.config import RoutingRules
from sci_node.models.registry import ModelRegistry
from sci_node.pipeline import Pipeline
from sci_node.pipeline.series import SeriesVolume, read_series

REPO = Path(__file__).resolve().parent.parent
DEMO = sorted((REPO / "sample" / "series").glob("*.dcm"))
GAIN = 2.0          # lesion intensity / cord median
RADII_MM = (6.0, 2.5, 2.5)  # S-I, then the two in-plane half-axes


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    import structlog
    import torch

    structlog.reset_defaults()
    torch.set_num_threads(2)
    return Pipeline(ModelRegistry(REPO / "models").load_active("cpu"), RoutingRules(), "cpu")


@pytest.fixture(scope="module")
def clean(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[SeriesVolume, np.ndarray]:
    """The demo series and the cord (Z, Y, X) the node's SEG holds for it; the clean series has no lesion."""
    out = tmp_path_factory.mktemp("clean")
    res = pipeline.run_dicom(DEMO, out)
    assert res.status == "done", res.reason
    assert res.summary["lesion_count"] == 0
    vol = read_series(DEMO)
    return vol, seg_masks(res.outputs[0], vol)[0]


def seg_masks(seg_path: Path, vol: SeriesVolume) -> tuple[np.ndarray, np.ndarray]:
    """(cord, lesion) read back from the SEG on the series grid (Z, Y, X); lesion zeros when absent."""
    seg = hd.seg.segread(seg_path)
    uids = [r.sop_instance_uid for r in vol.refs if r is not None]
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    px = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, skip_overlap_checks=True)
    cord = px[..., numbers.index(1)]
    lesion = px[..., numbers.index(2)] if 2 in numbers else np.zeros_like(cord)
    return cord, lesion


def with_lesion(vol: SeriesVolume, cord: np.ndarray, height: float, out: Path) -> tuple[list[Path], np.ndarray]:
    """Copies of the demo files (new series) with an ellipsoid lesion at ``height`` (0 = top of the cord).

    Returns the files and the lesion mask (Z, Y, X) on the series grid.
    """
    from pydicom.uid import generate_uid

    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in DEMO}
    ordered = [by_uid[r.sop_instance_uid] for r in vol.refs if r is not None]  # volume order (slice z)
    arr = np.stack([pydicom.dcmread(f).pixel_array for f in ordered]).astype(np.float32)
    spacing = np.array(vol.image.GetSpacing()[::-1])  # (z, y, x) mm
    zyx = np.argwhere(cord > 0)
    si = int(np.argmax((zyx.max(0) - zyx.min(0)) * spacing))  # the axis the cord runs along
    # the top of the cord: patient S = +z of LPS; the array axis si points up when its direction's S part > 0
    up = np.array(vol.image.GetDirection()).reshape(3, 3)[2, 2 - si] > 0
    level = np.quantile(zyx[:, si], 1 - height if up else height)
    centre = np.round(zyx[np.abs(zyx[:, si] - level) < 1.5].mean(0)).astype(int)
    radii = np.full(3, RADII_MM[1])
    radii[si] = RADII_MM[0]
    grid = np.indices(arr.shape).reshape(3, -1).T
    lesion = ((((grid - centre) * spacing / radii) ** 2).sum(1).reshape(arr.shape) <= 1) & (cord > 0)
    arr[lesion] = np.maximum(arr[lesion], GAIN * float(np.median(arr[cord > 0])))
    out.mkdir(parents=True, exist_ok=True)
    series_uid, files = generate_uid(), []
    for z, f in enumerate(ordered):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PixelData = np.clip(arr[z], 0, 4095).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(out / f.name, enforce_file_format=True)
        files.append(out / f.name)
    return files, lesion.astype(np.uint8)


@pytest.mark.parametrize("height", [0.1, 0.5, 0.7])
def test_obvious_t2_lesion_found_and_covered(pipeline: Pipeline, clean: tuple[SeriesVolume, np.ndarray],
                                             height: float, tmp_path: Path) -> None:
    vol, cord = clean
    files, truth = with_lesion(vol, cord, height, tmp_path / "in")
    assert truth.sum() >= 100  # a lesion of about 150 mm3 (1 mm voxels)
    res = pipeline.run_dicom(files, tmp_path / "out")
    assert res.status == "done", res.reason
    _, lesion = seg_masks(res.outputs[0], read_series(files))
    _, n = ndi.label(lesion, structure=np.ones((3, 3, 3)))  # 26-connected, as the node counts
    assert n == 1 and res.summary["lesion_count"] == 1, f"{n} lesions marked (1 inserted)"
    dice = 2 * float((lesion.astype(bool) & truth.astype(bool)).sum()) / float(lesion.sum() + truth.sum())
    assert dice >= 0.6, f"lesion Dice {dice:.3f} < 0.6 at height {height}"


def test_each_lesion_has_its_confidence_in_report_and_sr(pipeline: Pipeline, clean: tuple[SeriesVolume, np.ndarray],
                                                         tmp_path: Path) -> None:
    """Issue 34 item 6: each lesion carries its confidence (the network's peak probability inside it) in the
    summary that report.json and the job record hold, and as "Certainty of Finding" (DCM 111012, %) in the SR."""
    vol, cord = clean
    files, _ = with_lesion(vol, cord, 0.5, tmp_path / "in")
    res = pipeline.run_dicom(files, tmp_path / "out")
    assert res.status == "done", res.reason
    (les,) = res.summary["lesions"]
    # found at the card's threshold, so its peak probability is at least that threshold
    threshold = float(pipeline.models.lesion.spec.threshold)  # type: ignore[attr-defined]
    assert threshold <= les["confidence"] <= 1.0
    assert 0.0 < les["mean_probability"] <= les["confidence"]
    sr = pydicom.dcmread(next(p for p in res.outputs if pydicom.dcmread(p).Modality == "SR"))
    values = []

    def walk(items) -> None:  # every numeric content item named Certainty of Finding
        for it in items:
            name = it.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == "111012" and "MeasuredValueSequence" in it:
                values.append(float(it.MeasuredValueSequence[0].NumericValue))
            walk(it.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert values == [pytest.approx(100.0 * les["confidence"], abs=0.01)]
