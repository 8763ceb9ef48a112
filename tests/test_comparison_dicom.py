"""The follow-up's DICOM (issue 39) on a synthetic comparison record and the committed PAM50 series.

The current series is ``tests/data/series/pam50_sag_T2w``; the prior is the same images re-issued
as an earlier study (new UIDs, StudyDate 2025-01-07). The record has one new lesion, one enlarging,
one resolved and the CSA then and now. The SR (highdicom, read back) must carry the counts, each
lesion's volumes then and now with its change coded and its levels, the CSA change in %, reference
the prior study, and pass dciodvfy; the SEG must hold the painted voxels in one segment "New or
enlarging lesion" and pass dciodvfy.
"""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid

from sci_node.pipeline.compare import write_comparison_dicom
from sci_node.pipeline.comparison_sr import COUNT_CODES, CSA_CHANGE, QUALITATIVE_DIFFERENCE, STATUS_CODES
from sci_node.pipeline.series import read_series

from dicom_validate import dciodvfy_errors

SERIES = sorted((Path(__file__).parent / "data" / "series" / "pam50_sag_T2w").glob("*.dcm"))
VERSIONS = {"cord": "0.2.3", "lesion": "0.8.1"}


def _prior(out: Path) -> tuple[list[Path], str]:
    out.mkdir()
    study, series = generate_uid(), generate_uid()
    paths = []
    for f in SERIES:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDate = study, series, "20250107"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f.name, enforce_file_format=True)
        paths.append(out / f.name)
    return paths, study


def _record() -> dict:
    les = [{"status": "new", "volume_then_mm3": 0.0, "volume_now_mm3": 31.5, "lesion_id": 1,
            "vertebral_levels": ["C3"]},
           {"status": "enlarging", "volume_then_mm3": 16.0, "volume_now_mm3": 72.0, "lesion_id": 2,
            "vertebral_levels": ["C4", "C5"]},
           {"status": "resolved", "volume_then_mm3": 20.0, "volume_now_mm3": 0.0, "lesion_id": None,
            "vertebral_levels": []}]
    return {"compared": True, "counts": {"new": 1, "enlarging": 1, "stable": 0, "shrinking": 0, "resolved": 1},
            "lesions": les, "csa_c2_c3": {"then_mm2": 80.0, "now_mm2": 76.0, "change_pct": -5.0, "beyond_error": True},
            "csa_common_stretch": {"then_mm2": 81.0, "now_mm2": 80.0, "change_pct": -1.23, "beyond_error": False},
            "csa_mean": {"then_mm2": 70.0, "now_mm2": None, "change_pct": None}}


def _groups(sr: hd.sr.Comprehensive3DSR) -> list[dict]:
    """Each measurement group: tracking id, time point, qualitative difference codes, values, finding sites."""
    out = []
    for g in sr.content.get_image_measurement_groups():  # type: ignore[attr-defined]
        items = list(g[0].ContentSequence)

        def coded(name: str, items: list = items) -> list[str]:
            return [str(i.ConceptCodeSequence[0].CodeValue) for i in items
                    if i.ConceptNameCodeSequence[0].CodeValue == name and "ConceptCodeSequence" in i]
        when = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "C2348792"]  # Time Point
        out.append({"id": g.tracking_identifier, "when": when[0] if when else None,
                    "quality": coded(QUALITATIVE_DIFFERENCE.value), "sites": coded("363698007"),
                    "values": {(m.name.value, m.unit.value): float(m.value) for m in g.get_measurements()
                               if m.name.value != "126073"}})  # not the Time Point Order (a NUM too)
    return out


def test_comparison_sr_and_new_or_enlarging_seg_are_valid_and_say_what_changed(tmp_path: Path) -> None:
    prior, prior_study = _prior(tmp_path / "prior")
    out = tmp_path / "out"
    out.mkdir()
    volume = read_series(SERIES)
    mask = np.zeros(volume.image.GetSize()[::-1], np.uint8)
    mask[8, 100:104, 30:34] = 1
    img = sitk.GetImageFromArray(mask)
    img.CopyInformation(volume.image)
    sitk.WriteImage(img, str(out / "new_or_enlarging.nii.gz"))
    seg_path, sr_path = write_comparison_dicom(_record(), prior, SERIES, out, VERSIONS, 0.2)

    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []
    seg = hd.seg.segread(seg_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["New or enlarging lesion"]
    assert "vs 2025-01-07" in seg.SeriesDescription and seg.StudyInstanceUID == volume.first.StudyInstanceUID
    assert int(np.asarray(seg.pixel_array).sum()) == 16

    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
    assert sr.StudyInstanceUID == volume.first.StudyInstanceUID
    assert [str(i.StudyInstanceUID) for i in sr.PertinentOtherEvidenceSequence] == [prior_study]
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99SCINODE"
    groups = _groups(sr)
    counts = {k: groups[0]["values"][(c.value, "1")] for k, c in COUNT_CODES.items()}
    assert counts == {"new": 1, "enlarging": 1, "stable": 0, "shrinking": 0, "resolved": 1}
    enlarging = [g for g in groups if g["id"] == "Lesion 2"]
    assert [g["when"] for g in enlarging] == ["prior 2025-01-07", f"current {volume.first.StudyDate[:4]}-"
                                              f"{volume.first.StudyDate[4:6]}-{volume.first.StudyDate[6:]}"]
    assert [g["values"][("118565006", "mm3")] for g in enlarging] == [16.0, 72.0]
    assert enlarging[1]["quality"] == [STATUS_CODES["enlarging"].value]
    assert enlarging[1]["sites"] == ["2748008", "5329002", "36978003"]  # spinal cord, C4 and C5 vertebrae
    resolved = [g for g in groups if g["id"] == "Resolved lesion 3"]
    assert resolved[1]["quality"] == ["RESOLVED"] and resolved[0]["values"][("118565006", "mm3")] == 20.0
    csa = [g for g in groups if g["id"] == "Spinal cord C2-C3"]
    assert csa[0]["values"] == {("42798000", "mm2"): 80.0}
    assert csa[1]["values"] == {("42798000", "mm2"): 76.0, (CSA_CHANGE.value, "%"): -5.0}
    assert csa[1]["quality"] == [STATUS_CODES["shrinking"].value]  # -5 % is beyond the scan-rescan error
    stretch = [g for g in groups if g["id"] == "Spinal cord, stretch both scans cover"]
    assert stretch[1]["values"][(CSA_CHANGE.value, "%")] == -1.23
    assert stretch[1]["quality"] == [STATUS_CODES["stable"].value] and stretch[0]["quality"] == []
    assert not [g for g in groups if g["id"] == "Spinal cord"]  # the mean over the cord has no value now


def test_nothing_new_still_gives_a_valid_seg_that_says_so(tmp_path: Path) -> None:
    prior, _ = _prior(tmp_path / "prior")
    out = tmp_path / "out"
    out.mkdir()
    record = {**_record(), "lesions": [], "counts": dict.fromkeys(COUNT_CODES, 0)}
    seg_path, sr_path = write_comparison_dicom(record, prior, SERIES, out, VERSIONS, 0.2)
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []
    seg = pydicom.dcmread(seg_path)
    assert "none new/enlarging vs 2025-01-07" in seg.SeriesDescription
    assert int(seg.NumberOfFrames) >= 1
