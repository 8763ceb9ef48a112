"""The node's own follow-up (issue 39), end to end: ``sci-node serve`` with the shipped models, dcmtk storescu.

Patient FU1's prior study is sent and segmented; a year later the same images arrive as a new study
(new UIDs, a later StudyDate): the node finds the prior in its own job history, registers and compares,
and the second job's summary carries the follow-up (nothing new: the same images). Patient FU2's
study has no prior: no follow-up. ``sci-node jobs show`` prints the line; ``comparison.json`` and
``new_or_enlarging.nii.gz`` lie in the job's result folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import NodeProc, storescu, wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SERIES = sorted((REPO / "tests" / "data" / "series" / "pam50_sag_T2w").glob("*.dcm"))


def _study(out: Path, patient: str, date: str) -> tuple[list[Path], str]:
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for f in SERIES:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDate = study, series, date
        ds.PatientID, ds.PatientName = patient, f"Doe^{patient}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f.name, enforce_file_format=True)
        paths.append(out / f.name)
    return paths, series


def _done(node: NodeProc, series_uid: str) -> dict:
    found: list[dict] = []

    def finished() -> bool:
        found[:] = [j for j in node.jobs(50) if j["series_uid"] == series_uid and j["state"] in ("done", "failed")]
        return bool(found)

    wait_for(finished, 300, interval=0.5, what=f"the job of {series_uid}")
    assert found[0]["state"] == "done", found[0]
    return node.job(found[0]["id"])


def test_a_follow_up_study_is_compared_with_the_prior_in_the_node_history(
        node_factory: Callable[..., NodeProc], tmp_path: Path) -> None:
    node = node_factory("", "--stable-seconds", "1").start()
    prior, prior_series = _study(tmp_path / "prior", "FU1", "20250107")
    assert storescu(node.port, prior).returncode == 0
    first = _done(node, prior_series)
    assert "followup" not in first["result"]["summary"]  # nothing earlier of FU1
    later, later_series = _study(tmp_path / "later", "FU1", "20260107")
    assert storescu(node.port, later).returncode == 0
    second = _done(node, later_series)
    fu = second["result"]["summary"]["followup"]
    assert fu["compared"] and fu["prior_job"] == first["id"], fu
    assert fu["registration"]["cord_dice"] > 0.95
    n = first["result"]["summary"]["lesion_count"] or 0
    assert fu["counts"] == {"new": 0, "enlarging": 0, "stable": n, "shrinking": 0, "resolved": 0}
    folder = Path(second["result"]["outputs"][0]).parent
    assert (folder / "comparison.json").is_file() and (folder / "new_or_enlarging.nii.gz").is_file()
    shown = node.cli("jobs", "show", str(second["id"]))
    assert f"follow-up    vs job {first['id']}" in shown.stdout and "0 new" in shown.stdout, shown.stdout
    other, other_series = _study(tmp_path / "other", "FU2", "20260107")
    assert storescu(node.port, other).returncode == 0
    assert "followup" not in _done(node, other_series)["result"]["summary"]  # another person: no prior
