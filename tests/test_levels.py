"""Vertebral levels (sci_node.imaging.levels) on real committed series: the sample sagittal cervical T2w (errsm22)
and three slices of the axial unf01 T2w; then through ``sci-node infer`` into report.json, levels.nii.gz
and the SR."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from sci_node.imaging.levels import LEVEL_NAMES, label_image
from sci_node.imaging.measure import index_to_lps, summarize
from sci_node.pipeline.series import read_series

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample" / "series"
AXIAL = REPO / "tests" / "data" / "series" / "unf01_axial_T2w"


@pytest.fixture(scope="module")
def cord_model():
    from sci_node.models.registry import ModelRegistry

    return ModelRegistry(REPO / "models").load_active("cpu").cord


def _labelled(files: list[Path], cord_model):
    vol = read_series(files)
    cord = np.asarray(cord_model.predict(vol.image), dtype=np.uint8)
    m = index_to_lps(vol.image.GetOrigin(), vol.image.GetSpacing(), vol.image.GetDirection())
    return vol, cord, m, label_image(vol.image, cord, m)


def test_sample_series_levels_in_order_with_c2_c3_csa(cord_model) -> None:
    vol, cord, m, res = _labelled(sorted(SAMPLE.glob("*.dcm")), cord_model)
    assert res.known, res.unknown_reason
    names = [d.name for d in res.discs]
    assert names[:5] == ["C2-C3", "C3-C4", "C4-C5", "C5-C6", "C6-C7"]
    s_mm = [d.lps_mm[2] for d in res.discs]  # LPS S: each disc lies below the one before it
    gaps = -np.diff(s_mm)
    assert np.all(gaps > 10) and np.all(gaps < 30), gaps
    # the C2-C3 disc in front of the cord, in the column (8-30 mm anterior of the cord's centre line)
    lmap = res.level_map
    assert set(np.unique(lmap).tolist()) <= set(range(0, 25)) and not lmap[cord == 0].any()
    values = sorted(set(np.unique(lmap).tolist()) - {0})
    assert {2, 3, 4, 5, 6, 7} <= set(values)
    # C2 lies above C3 lies above C4 (LPS S of each level's cord voxels)
    z = {v: (np.argwhere(lmap == v) @ m[:, :3].T + m[:, 3])[:, 2].mean() for v in values}
    assert z[2] > z[3] > z[4] > z[5]
    s = summarize(cord, None, m, vertebral=res)
    assert s["csa_c2_c3_mm2"] is not None and 40 < s["csa_c2_c3_mm2"] < 110
    assert [r["level"] for r in s["vertebral_levels"]][:3] == ["C1", "C2", "C3"]
    assert s["vertebral_levels_unknown_reason"] is None
    assert "csa_per_slice" in s and "csa_per_level" not in s


def test_axial_three_slices_are_unknown_with_a_reason(cord_model) -> None:
    files = sorted(AXIAL.glob("*.dcm"))
    mid = len(files) // 2
    vol, cord, m, res = _labelled(files[mid - 1:mid + 2], cord_model)
    assert vol.image.GetSize()[2] == 3
    assert not res.known and res.unknown_reason
    assert not res.level_map.any()
    s = summarize(cord, None, m, vertebral=res)
    assert s["vertebral_levels"] == [] and s["csa_c2_c3_mm2"] is None
    assert s["vertebral_levels_unknown_reason"] == res.unknown_reason


def test_infer_writes_levels_nifti_report_and_sr(tmp_path: Path) -> None:
    from sci_node.cli import main
    from tests.dicom_validate import dciodvfy_errors

    out = tmp_path / "out"
    assert main(["infer", str(SAMPLE), "--out", str(out), "--log-level", "WARNING"]) == 0
    (series,) = [p for p in out.iterdir() if p.is_dir()]
    report = json.loads((series / "report.json").read_text())
    meas = report["measurements"]
    assert meas["vertebral_levels"] and meas["csa_c2_c3_mm2"] is not None
    assert meas["vertebral_discs"][0]["disc"] == "C2-C3" and len(meas["vertebral_discs"][0]["lps_mm"]) == 3
    assert "csa_per_slice" in meas and "csa_per_level" not in meas
    assert "levels.nii.gz" in report["masks"]
    cord = sitk.ReadImage(str(series / "cord.nii.gz"))
    levels = sitk.ReadImage(str(series / "levels.nii.gz"))
    assert levels.GetSize() == cord.GetSize() and levels.GetOrigin() == cord.GetOrigin()
    la, ca = sitk.GetArrayFromImage(levels), sitk.GetArrayFromImage(cord)
    assert not la[ca == 0].any() and {2, 3} <= set(np.unique(la).tolist())
    sr = pydicom.dcmread(series / "sr.dcm")
    sites = _finding_sites_of_area(sr)
    assert ("C2 vertebra", "C3 vertebra") in sites  # the C2-C3 mean CSA
    assert ("C4 vertebra",) in sites
    assert dciodvfy_errors(series / "sr.dcm") == []
    assert LEVEL_NAMES[3] == "C3"


def _finding_sites_of_area(ds: pydicom.Dataset) -> set[tuple[str, ...]]:
    """The finding-site meanings of every Area (SCT 42798000) measurement anywhere in the SR tree."""
    out: set[tuple[str, ...]] = set()

    def walk(items) -> None:
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in it else None
            if name == "42798000" and "ContentSequence" in it:
                sites = tuple(c.ConceptCodeSequence[0].CodeMeaning for c in it.ContentSequence
                              if c.ConceptNameCodeSequence[0].CodeValue == "363698007")
                if sites:
                    out.add(sites)
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    return out
