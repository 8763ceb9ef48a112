"""``sci-node infer`` end to end through ``sci_node.cli.main`` with the real shipped models."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import pytest
import SimpleITK as sitk

from sci_node.cli import main
from sci_node.pipeline.series import read_series

from dicom_validate import dciodvfy_errors

REPO = Path(__file__).resolve().parent.parent
SERIES = REPO / "tests" / "data" / "series"


def test_infer_folder_of_mixed_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    torch.set_num_threads(2)
    inp = tmp_path / "in"
    # any folder layout: one series split over two nested folders, another flat, one NIfTI volume
    files = sorted((SERIES / "unf01_axial_T2w").glob("*.dcm"))
    for i, f in enumerate(files):
        dest = inp / "patient" / ("a" if i % 2 else "b" / Path("deep")) / f"IM{i:04d}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    shutil.copytree(SERIES / "brain_axial_T1w", inp / "brain")
    shutil.copy(SERIES / "unf01_axial_T2w" / "cord_mask.nii.gz", inp / "cord_mask.nii.gz")  # label: skipped
    nifti = inp / "nifti" / "sub-unf01_T2w.nii.gz"
    nifti.parent.mkdir()
    vol = read_series(files)
    sitk.WriteImage(vol.image, str(nifti))
    nifti.with_name("sub-unf01_T2w.json").write_text(json.dumps({  # BIDS sidecar: header evidence
        "EchoTime": 0.12, "RepetitionTime": 1.5, "FlipAngle": 120, "ScanningSequence": "SE",
        "SequenceVariant": "SK_SP_OSP", "MRAcquisitionType": "3D", "BodyPartExamined": "SPINE",
        "ImageOrientationPatientDICOM": [float(v) for v in vol.first.ImageOrientationPatient]}))
    out = tmp_path / "out"

    rc = main(["infer", str(inp), "--out", str(out), "--log-format", "json", "--log-level", "WARNING"])

    table = capsys.readouterr().out
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    by_kind = {(r["kind"], r["status"]): r for r in report["series"]}
    assert len(report["series"]) == 3
    spine = by_kind[("dicom", "done")]
    brain = by_kind[("dicom", "routed-out")]
    nii = next(r for r in report["series"] if r["kind"] == "nifti")
    assert spine["files"] == 16
    d = out / spine["name"]
    assert {"seg.dcm", "sr.dcm", "cord.nii.gz", "report.json"} <= {p.name for p in d.iterdir()}
    assert spine["previews"] and all((d / p).stat().st_size > 1000 for p in spine["previews"])
    for name in ("seg.dcm", "sr.dcm"):
        assert dciodvfy_errors(d / name) == []
    assert hd.seg.segread(d / "seg.dcm").SegmentSequence[0].SegmentLabel == "Spinal cord"
    per_series = json.loads((d / "report.json").read_text())
    assert per_series["routing"]["anatomy"]["probs"] and per_series["routing"]["rule"]
    assert set(per_series["timings"]) == {"load", "classify", "segment", "write"}
    assert per_series["model_versions"]["cord"] and isinstance(per_series["lesions"], list)
    assert per_series["measurements"]["csa_mm2"]["mean"] > 0
    # routed-out series listed with the reason, no SEG
    assert brain["reason"] and brain["reason"] in table and "routed-out" in table
    assert not (out / brain["name"] / "seg.dcm").exists()
    # NIfTI input: masks, no DICOM outputs
    assert nii["status"] == "done", nii.get("reason")
    assert nii["outputs"] == [] and "cord.nii.gz" in nii["masks"]
    assert "3 series: 2 segmented, 1 routed out, 0 failed" in table


def test_infer_missing_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["infer", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert rc == 1
    assert "does not exist" in capsys.readouterr().err


def test_infer_process_quick_exit_flushes_everything(tmp_path: Path) -> None:
    """The console command ends without the interpreter's teardown (cli.main.QUICK_EXIT_COMMANDS):
    its exit code, stdout table, stderr and report still arrive whole."""
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "sci_node.cli", "infer", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "o1")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 1 and "does not exist" in bad.stderr
    series = tmp_path / "in"
    shutil.copytree(SERIES / "pam50_sag_T2w", series)
    ok = subprocess.run([sys.executable, "-m", "sci_node.cli", "infer", str(series), "--out", str(tmp_path / "o2"),
                         "--log-level", "WARNING"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.rstrip().endswith("1 series: 1 segmented, 0 routed out, 0 failed")
    report = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert report["series"][0]["status"] == "done"
