"""DICOM-SEG and TID 1500 SR from a real cord mask: dciodvfy-clean, read back, right references."""
from __future__ import annotations

import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from sci_node.errors import InvalidSeriesError
from sci_node.imaging.measure import index_to_lps, summarize
from sci_node.pipeline.key_slices import key_images, slice_counts
from sci_node.pipeline.seg_writer import SegEncoding, build_seg, frame_references, seg_encoding
from sci_node.pipeline.series import SeriesVolume, read_series
from sci_node.pipeline.sr_writer import build_sr, read_measurements, region_outline

from dicom_validate import dciodvfy_errors

REPO = Path(__file__).resolve().parent.parent
AXIAL = REPO / "tests" / "data" / "series" / "unf01_axial_T2w"
VERSIONS = {"anatomy": "0.1.0", "region_view": "0.1.0", "sequence": "0.1.0", "cord": "0.1.0", "lesion": "0.1.0"}


def _series_and_masks(vol: SeriesVolume | None = None) -> tuple[SeriesVolume, np.ndarray, np.ndarray]:
    """The committed axial T2w series, its manual cord mask on the series grid, a lesion inside it."""
    vol = vol or read_series(sorted(AXIAL.glob("*.dcm")))
    mask = sitk.ReadImage(str(AXIAL / "cord_mask.nii.gz"))
    cord = sitk.GetArrayFromImage(sitk.Resample(mask, vol.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    cord = cord.astype(np.uint8)
    lesion = np.zeros_like(cord)
    z, y, x = np.argwhere(cord)[np.argwhere(cord).shape[0] // 2]
    lesion[z - 2:z + 2, y - 1:y + 2, x - 1:x + 2] = 1
    return vol, cord, lesion * cord


def _sr(seg: pydicom.Dataset, vol: SeriesVolume, cord: np.ndarray, lesion: np.ndarray | None,
        summary: dict, notes: tuple[str, ...] = ()) -> hd.sr.Comprehensive3DSR:
    """The node's SR of these masks, with the key images the pipeline gives it."""
    return build_sr(seg, list(vol.datasets), summary, VERSIONS, notes,
                    key_images=key_images(vol, cord, lesion, summary.get("lesions", [])))


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_seg_valid_and_frames_reference_their_source(tmp_path: Path) -> None:
    vol, cord, lesion = _series_and_masks()
    path = _write(build_seg(vol, cord, lesion, VERSIONS), tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    src = vol.first
    # 141 x 131 pixels: a bit-packed frame would not start on a byte boundary
    assert seg.SegmentationType == "FRACTIONAL" and seg.MaximumFractionalValue == 1 and seg.BitsAllocated == 8
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    d1, d2 = seg.get_segment_description(1), seg.get_segment_description(2)
    assert (d1.segment_label, d1.segmented_property_type.value, d1.segmented_property_category.value) == \
        ("Spinal cord", "2748008", "91723000")
    assert (d2.segment_label, d2.segmented_property_type.value, d2.segmented_property_category.value) == \
        ("Lesion", "52988006", "49755003")
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "sci-node" and "cord 0.1.0" in algo.AlgorithmVersion
    assert "cord 0.1.0" in seg.SeriesDescription and "lesion 0.1.0" in str(seg.ContentCreatorName)
    # empty frames omitted: one frame per non-empty (slice, segment)
    refs = frame_references(seg)
    assert len(refs) == int((cord.reshape(16, -1).any(1)).sum() + (lesion.reshape(16, -1).any(1)).sum())
    z_of = {r.sop_instance_uid: z for z, r in enumerate(vol.refs)}
    frames = seg.pixel_array
    for i, (seg_no, sop_uid, frame_no) in enumerate(refs):
        assert frame_no is None
        truth = cord if seg_no == 1 else lesion
        np.testing.assert_array_equal(frames[i], truth[z_of[sop_uid]])
    # highdicom's own indexing gives the same masks back by source instance
    uids = [r.sop_instance_uid for r in vol.refs]
    back = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], skip_overlap_checks=True)
    np.testing.assert_array_equal(back[..., 0], cord)
    np.testing.assert_array_equal(back[..., 1], lesion)


def test_seg_and_sr_without_lesions(tmp_path: Path) -> None:
    vol, cord, _ = _series_and_masks()
    seg = build_seg(vol, cord, np.zeros_like(cord), VERSIONS)
    path = _write(seg, tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    assert len(pydicom.dcmread(path).SegmentSequence) == 1
    assert {s for s, _, _ in frame_references(seg)} == {1}
    m = index_to_lps(vol.image.GetOrigin(), vol.image.GetSpacing(), vol.image.GetDirection())
    summary = summarize(cord, np.zeros_like(cord), m)  # the lesion model ran and found none
    sr_path = _write(_sr(seg, vol, cord, np.zeros_like(cord), summary), tmp_path / "sr.dcm")
    assert dciodvfy_errors(sr_path) == []
    ms = read_measurements(pydicom.dcmread(sr_path))
    assert {m["group"] for m in ms} == {"Spinal cord"}
    assert next(m["value"] for m in ms if m["name"] == "Number of lesions") == 0
    # the lesion model not run (a T1w): no lesion count at all, and the descriptions say why
    notes = ("lesions not assessed: T1w",)
    seg_t1 = build_seg(vol, cord, None, VERSIONS, notes)
    sr_t1 = _write(_sr(seg_t1, vol, cord, None, summarize(cord, None, m), notes), tmp_path / "sr_t1.dcm")
    assert dciodvfy_errors(sr_t1) == []
    assert "Number of lesions" not in {m["name"] for m in read_measurements(pydicom.dcmread(sr_t1))}
    assert {m["name"] for m in read_measurements(pydicom.dcmread(sr_t1))} >= {"Volume", "Length"}
    assert "[lesions not assessed: T1w]" in seg_t1.SeriesDescription
    assert "[lesions not assessed: T1w]" in pydicom.dcmread(sr_t1).SeriesDescription


def test_empty_cord_is_refused() -> None:
    vol, cord, _ = _series_and_masks()
    with pytest.raises(InvalidSeriesError, match="cord mask is empty"):
        build_seg(vol, np.zeros_like(cord), None, VERSIONS)


def test_sr_valid_and_references_seg(tmp_path: Path) -> None:
    vol, cord, lesion = _series_and_masks()
    seg = build_seg(vol, cord, lesion, VERSIONS)
    _write(seg, tmp_path / "seg.dcm")
    prob = np.where(lesion > 0, 0.93, 0.05).astype(np.float32)  # the lesion network's probability
    summary = summarize(cord, lesion, index_to_lps(vol.image.GetOrigin(), vol.image.GetSpacing(),
                                                   vol.image.GetDirection()), prob)
    assert summary["lesions"][0]["confidence"] == pytest.approx(0.93)
    path = _write(_sr(seg, vol, cord, lesion, summary), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    assert sr.StudyInstanceUID == vol.first.StudyInstanceUID
    evidence = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Spinal cord", "Lesion 1"]
    for g, number in zip(groups, (1, 2)):
        ref = g.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert list(ref.referenced_segment_numbers) == [number]
    ms = {(m["group"], m["name"], m["derivation"]): m for m in read_measurements(sr)}
    assert ms[("Spinal cord", "Number of lesions", None)]["value"] == 1
    assert ms[("Spinal cord", "Volume", None)]["value"] == pytest.approx(1227.0, rel=1e-3)
    assert ms[("Spinal cord", "Area", "Mean")]["unit"] == "mm2"
    assert 50 < ms[("Spinal cord", "Area", "Mean")]["value"] < 100  # adult cervical cord CSA
    assert ms[("Lesion 1", "Volume", None)]["value"] == pytest.approx(float(lesion.sum()), rel=1e-3)
    assert ms[("Lesion 1", "Length", None)]["value"] == pytest.approx(4.0, abs=0.5)  # 4 slices of 1 mm
    assert ms[("Lesion 1", "Certainty of Finding", None)]["value"] == pytest.approx(93.0)
    assert ms[("Lesion 1", "Certainty of Finding", None)]["unit"] == "%"


def test_sr_outlines_every_finding_on_its_key_slice_for_ohif(tmp_path: Path) -> None:
    """Issue 37 item 5: each finding also has a planar group (TID 1410) with the same tracking
    identifier and UID as its volumetric group, outlining it on the slice where it is largest; the
    planar groups come first, lesions by id then the cord (OHIF's SR view opens on the first)."""
    vol, cord, lesion = _series_and_masks()
    seg = build_seg(vol, cord, lesion, VERSIONS)
    summary = summarize(cord, lesion, index_to_lps(vol.image.GetOrigin(), vol.image.GetSpacing(),
                                                   vol.image.GetDirection()))
    path = _write(_sr(seg, vol, cord, lesion, summary), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    planar = sr.content.get_planar_roi_measurement_groups()
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in planar] == ["Lesion 1", "Spinal cord"]
    assert {g.tracking_identifier: g.tracking_uid for g in planar} == \
        {g.tracking_identifier: g.tracking_uid for g in volumetric}
    groups = sr.ContentSequence[-1].ContentSequence  # "Imaging Measurements": the planar groups first
    assert [any(i.ValueType == "SCOORD" for i in g.ContentSequence) for g in groups] == [True, True, False, False]
    uid_of = {z: r.sop_instance_uid for z, r in enumerate(vol.refs)}
    for group, mask in zip(planar, (lesion, cord)):
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        xy = region.value  # (column, row) pixel corners, closed, never a 4- or 5-point "rectangle"
        assert len(xy) > 5 and np.array_equal(xy[0], xy[-1])
        counts = slice_counts(mask)
        z = next(z for z, uid in uid_of.items()
                 if uid == region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        assert counts[z] == counts.max()  # the slice where the finding is largest
        rows, cols = np.nonzero(mask[z])
        assert xy[:, 0].min() <= cols.min() and xy[:, 0].max() >= cols.max() + 1
        assert xy[:, 1].min() <= rows.min() and xy[:, 1].max() >= rows.max() + 1


def test_region_outline_is_column_row_and_splits_small_rectangles() -> None:
    square = np.array([[1.0, 2.0], [1.0, 3.0], [2.0, 3.0], [2.0, 2.0], [1.0, 2.0]])  # (row, column)
    xy = region_outline(square)
    assert len(xy) == 9 and np.array_equal(xy[0], [2.0, 1.0]) and np.array_equal(xy[1], [2.5, 1.0])
    ell = np.array([[0, 0], [0, 2], [1, 2], [1, 1], [2, 1], [2, 0], [0, 0]], dtype=float)
    np.testing.assert_array_equal(region_outline(ell), ell[:, ::-1])


def test_seg_and_sr_from_enhanced_multiframe_source(tmp_path: Path) -> None:
    legacy = [pydicom.dcmread(f) for f in sorted(AXIAL.glob("*.dcm"))]
    random.Random(3).shuffle(legacy)
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy, series_instance_uid=generate_uid(), series_number=90, sop_instance_uid=generate_uid(),
        instance_number=1)
    mf_path = _write(mf, tmp_path / "enhanced.dcm")
    vol, cord, lesion = _series_and_masks(read_series([mf_path]))
    seg = build_seg(vol, cord, lesion, VERSIONS)
    path = _write(seg, tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    frame_of = {z: r.frame_number for z, r in enumerate(vol.refs)}
    pixels = pydicom.dcmread(path).pixel_array
    for i, (seg_no, uid, frame_no) in enumerate(frame_references(seg)):
        assert uid == mf.SOPInstanceUID and frame_no is not None
        z = next(z for z, f in frame_of.items() if f == frame_no)
        np.testing.assert_array_equal(pixels[i], (cord if seg_no == 1 else lesion)[z])
    summary = summarize(cord, lesion, index_to_lps(vol.image.GetOrigin(), vol.image.GetSpacing(),
                                                   vol.image.GetDirection()))
    sr_path = _write(_sr(seg, vol, cord, lesion, summary), tmp_path / "sr.dcm")
    assert dciodvfy_errors(sr_path) == []
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
    keys = {im.finding: im.source.frame_number for im in key_images(vol, cord, lesion, summary["lesions"])}
    for group in sr.content.get_planar_roi_measurement_groups():  # the frame of the one instance it is drawn on
        ref = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == mf.SOPInstanceUID
        assert int(ref.ReferencedFrameNumber) == keys[group.tracking_identifier]


def test_output_uids_are_stable_per_content_and_change_with_the_series() -> None:
    """Same instances + same models → same SEG/SR UIDs (a PACS overwrites); a series that gained
    or lost an instance, or other model versions → new UIDs (one UID never names two contents)."""
    files = sorted(AXIAL.glob("*.dcm"))
    vol, cord, lesion = _series_and_masks()
    seg = build_seg(vol, cord, lesion, VERSIONS)
    again = build_seg(*_series_and_masks(), VERSIONS)
    assert (seg.SOPInstanceUID, seg.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    sr = _sr(seg, vol, cord, None, {"lesion_count": 0, "cord_volume_mm3": 1.0, "cord_length_mm": 1.0,
                                    "csa_mm2": {}, "lesions": []})
    fewer = read_series(files[1:])  # the same series UID without its first slice
    small, cord2, lesion2 = _series_and_masks(fewer)
    seg2 = build_seg(small, cord2, lesion2, VERSIONS)
    assert seg2.SOPInstanceUID != seg.SOPInstanceUID and seg2.SeriesInstanceUID != seg.SeriesInstanceUID
    sr2 = _sr(seg2, small, cord2, None, {"lesion_count": 0, "cord_volume_mm3": 1.0, "cord_length_mm": 1.0,
                                         "csa_mm2": {}, "lesions": []})
    assert sr2.SOPInstanceUID != sr.SOPInstanceUID
    newer = build_seg(vol, cord, lesion, {**VERSIONS, "cord": "0.2.0"})
    assert newer.SOPInstanceUID != seg.SOPInstanceUID


def test_encoding_binary_only_when_frames_are_byte_aligned(tmp_path: Path) -> None:
    assert [seg_encoding(r, c) for r, c in ((99, 99), (270, 270), (330, 330), (141, 131))] == \
        [SegEncoding.FRACTIONAL] * 4
    assert [seg_encoding(r, c) for r, c in ((201, 112), (64, 64), (256, 256))] == [SegEncoding.BINARY] * 3
    # a 128 x 128 crop of the axial series: byte-aligned frames, so BINARY (1 bit per pixel)
    files = []
    for f in sorted(AXIAL.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.PixelData, ds.Rows, ds.Columns = ds.pixel_array[:128, :128].copy().tobytes(), 128, 128
        ds.save_as(tmp_path / f.name, enforce_file_format=True)
        files.append(tmp_path / f.name)
    vol = read_series(files)
    cord = np.zeros(vol.image.GetSize()[::-1], dtype=np.uint8)
    cord[3:9, 60:70, 50:60] = 1
    path = _write(build_seg(vol, cord, None, VERSIONS), tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    seg = pydicom.dcmread(path)
    assert seg.SegmentationType == "BINARY" and seg.BitsAllocated == 1
    assert len(seg.PixelData) == 128 * 128 * 6 // 8
    np.testing.assert_array_equal(seg.pixel_array, cord[3:9])


def test_seg_and_sr_of_series_with_a_missing_slice(tmp_path: Path) -> None:
    files = sorted(AXIAL.glob("*.dcm"))
    full = read_series(files)
    gone = full.refs[7].sop_instance_uid  # an interior slice the node never received
    vol, cord, lesion = _series_and_masks(read_series([f for f in files if pydicom.dcmread(
        f, stop_before_pixels=True).SOPInstanceUID != gone]))
    assert vol.missing == (7,) and vol.image.GetSize() == full.image.GetSize()
    assert cord[7].any()  # the cord runs through the missing slice: the mask has it, the SEG must not
    seg = build_seg(vol, cord, lesion, VERSIONS, notes=["1 slice missing"])
    path = _write(seg, tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    received = {r.sop_instance_uid for r in vol.refs if r is not None}
    refs = frame_references(seg)
    assert {uid for _, uid, _ in refs} <= received and gone not in {uid for _, uid, _ in refs}
    listed = {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
              for i in s.ReferencedInstanceSequence}
    assert listed == received and len(received) == 15
    z_of = {r.sop_instance_uid: z for z, r in enumerate(vol.refs) if r is not None}
    frames = pydicom.dcmread(path).pixel_array
    for i, (seg_no, uid, _) in enumerate(refs):
        np.testing.assert_array_equal(frames[i], (cord if seg_no == 1 else lesion)[z_of[uid]])
    assert seg.SeriesDescription.startswith("sci-node SEG [1 slice missing] (")
    assert seg.ContentDescription.startswith("sci-node [1 slice missing]")
    summary = summarize(cord, lesion, index_to_lps(vol.image.GetOrigin(), vol.image.GetSpacing(),
                                                   vol.image.GetDirection()))
    sr = _sr(seg, vol, cord, lesion, summary, notes=("1 slice missing",))
    sr_path = _write(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(sr_path) == []
    assert sr.SeriesDescription.startswith("sci-node measurements [1 slice missing] (")
    drawn = {g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
             for g in hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_planar_roi_measurement_groups()}
    assert drawn and drawn <= received  # outlines only on slices the series holds


def test_descriptions_name_the_vertebral_levels_covered_and_keep_warnings_first() -> None:
    from sci_node.pipeline.seg_writer import described, levels_covered

    assert levels_covered([{"level": "C2"}, {"level": "C3"}, {"level": "C5"}]) == "C2-C5"
    assert levels_covered([{"level": "T4"}]) == "T4" and levels_covered([]) is None
    versions = {"cord": "0.2.3", "lesion": "0.8.1", "anatomy": "0.4.0", "region_view": "0.3.0", "sequence": "0.4.0"}
    text = described("sci-node SEG", versions, ["incomplete transfer"], "C2-C5")
    assert text.startswith("sci-node SEG [incomplete transfer] C2-C5 (") and len(text) == 64
    assert described("sci-node SEG", {"cord": "0.2.3"}) == "sci-node SEG (cord 0.2.3)"
