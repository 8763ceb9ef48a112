"""The node's own follow-up (issue 39), end to end: ``sci-node serve`` with the shipped models, dcmtk storescu.

Patient FU1's prior study is sent and segmented; a year later the same images arrive as a new study
(new UIDs, a later StudyDate): the node finds the prior in its own job history, registers and compares,
and the second job's summary carries the follow-up (nothing new: the same images). Patient FU2's
study has no prior: no follow-up. ``sci-node jobs show`` prints the line; ``comparison.json`` and
``new_or_enlarging.nii.gz`` lie in the job's result folder.

A dcmtk ``storescp`` destination receives, for the follow-up job, first its own SEG and SR, then the
"New or enlarging lesion" SEG and the comparison SR (its own outbox entries, queued after the
comparison): both dciodvfy-clean, the SR on the current study referencing the prior study.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pydicom
import pytest
from lesion_support import as_study

from conftest import NodeProc, StoreSCP, free_port, storescu, wait_for
from dicom_validate import dciodvfy_errors

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SERIES = sorted((REPO / "tests" / "data" / "series" / "pam50_sag_T2w").glob("*.dcm"))


def _study(out: Path, patient: str, date: str) -> tuple[list[Path], str]:
    return as_study(SERIES, out, patient, date)


def _done(node: NodeProc, series_uid: str, followup: bool) -> dict:
    """The job of ``series_uid`` once done and every result delivered (with ``followup``: also compared)."""
    found: list[dict] = []

    def finished() -> bool:
        found[:] = [j for j in node.jobs(50) if j["series_uid"] == series_uid and j["state"] in ("done", "failed")]
        if not found or found[0]["state"] == "failed":
            return bool(found)
        job = node.job(found[0]["id"])
        compared = "followup" in job["result"]["summary"]
        return job["delivery"] == "delivered" and compared == followup
    wait_for(finished, 300, interval=0.5, what=f"the job of {series_uid}")
    assert found[0]["state"] == "done", found[0]
    return node.job(found[0]["id"])


def _node_with_prior(node_factory: Callable[..., NodeProc], storescp_factory: Callable[..., StoreSCP], tmp_path: Path,
                     patient: str) -> tuple[StoreSCP, NodeProc, list[Path], dict, Path]:
    """A node sending to a storescp, with ``patient``'s prior study (2025-01-07) processed: ``(dest, node, prior
    files, its job, its result folder)``."""
    dest = storescp_factory(port=free_port())
    node = node_factory("", "--stable-seconds", "1", "--destination", f"DEST@127.0.0.1:{dest.port}").start()
    prior, prior_series = _study(tmp_path / "prior", patient, "20250107")
    assert storescu(node.port, prior).returncode == 0
    first = _done(node, prior_series, followup=False)
    return dest, node, prior, first, Path(first["result"]["outputs"][0]).parent


def _received(dest: StoreSCP) -> dict[str, tuple[int, Path]]:
    """SOP Instance UID -> (arrival time in ns, file) of what the destination holds."""
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): (f.stat().st_mtime_ns, f)
            for f in dest.files()}


def test_a_follow_up_study_is_compared_with_the_prior_in_the_node_history(
        node_factory: Callable[..., NodeProc], storescp_factory: Callable[..., StoreSCP], tmp_path: Path) -> None:
    dest = storescp_factory(port=free_port())
    node = node_factory("", "--stable-seconds", "1", "--destination", f"DEST@127.0.0.1:{dest.port}").start()
    prior, prior_series = _study(tmp_path / "prior", "FU1", "20250107")
    assert storescu(node.port, prior).returncode == 0
    first = _done(node, prior_series, followup=False)
    assert "followup" not in first["result"]["summary"]  # nothing earlier of FU1
    later, later_series = _study(tmp_path / "later", "FU1", "20260107")
    assert storescu(node.port, later).returncode == 0
    second = _done(node, later_series, followup=True)
    fu = second["result"]["summary"]["followup"]
    assert fu["compared"] and fu["prior_job"] == first["id"], fu
    assert fu["registration"]["cord_dice"] > 0.95
    n = first["result"]["summary"]["lesion_count"] or 0
    assert fu["counts"] == {"new": 0, "enlarging": 0, "stable": n, "shrinking": 0, "resolved": 0}
    folder = Path(second["result"]["outputs"][0]).parent
    assert (folder / "comparison.json").is_file() and (folder / "new_or_enlarging.nii.gz").is_file()
    assert fu["comparison_json"] == str(folder / "comparison.json") and "dicom_error" not in fu, fu
    shown = node.cli("jobs", "show", str(second["id"]))
    assert f"follow-up    vs job {first['id']}" in shown.stdout and "0 new" in shown.stdout, shown.stdout

    # the destination got the job's own SEG and SR first, then the comparison's SEG and SR
    sent = second["deliveries"]
    assert [Path(d["path"]).name for d in sent] == ["seg.dcm", "sr.dcm", "new-or-enlarging-seg.dcm",
                                                    "comparison-sr.dcm"], sent
    assert all(d["state"] == "sent" for d in sent) and [d["sent_at"] for d in sent] == sorted(
        d["sent_at"] for d in sent), sent
    uids = [str(pydicom.dcmread(d["path"], stop_before_pixels=True).SOPInstanceUID) for d in sent]
    got = _received(dest)
    arrived = [got[u][0] for u in uids]
    assert max(arrived[:2]) <= min(arrived[2:]), arrived
    new_seg, cmp_sr = (pydicom.dcmread(got[u][1]) for u in uids[2:])
    assert dciodvfy_errors(got[uids[2]][1]) == [] and dciodvfy_errors(got[uids[3]][1]) == []
    assert [s.SegmentLabel for s in new_seg.SegmentSequence] == ["New or enlarging lesion"]
    assert "vs 2025-01-07" in new_seg.SeriesDescription, new_seg.SeriesDescription
    later_study = pydicom.dcmread(later[0], stop_before_pixels=True).StudyInstanceUID
    assert new_seg.StudyInstanceUID == cmp_sr.StudyInstanceUID == later_study
    assert [str(i.StudyInstanceUID) for i in cmp_sr.PertinentOtherEvidenceSequence] == [fu["prior_study_uid"]]
    assert [str(i.StudyInstanceUID) for i in cmp_sr.CurrentRequestedProcedureEvidenceSequence] == [later_study]

    other, other_series = _study(tmp_path / "other", "FU2", "20260107")
    assert storescu(node.port, other).returncode == 0
    third = _done(node, other_series, followup=False)
    assert "followup" not in third["result"]["summary"]  # another person: no prior
    assert [Path(d["path"]).name for d in third["deliveries"]] == ["seg.dcm", "sr.dcm"]


def test_a_comparison_that_fails_leaves_the_current_result_whole(
        node_factory: Callable[..., NodeProc], storescp_factory: Callable[..., StoreSCP], tmp_path: Path) -> None:
    """The prior's cord mask is damaged on disk (not on its series' grid): the comparison fails with the reason,
    the job stays done and its own SEG and SR are delivered; no comparison DICOM is sent."""
    import numpy as np
    import SimpleITK as sitk

    dest, node, prior, first, folder = _node_with_prior(node_factory, storescp_factory, tmp_path, "FU3")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 4, 5), np.uint8)), str(folder / "cord.nii.gz"))
    later, later_series = _study(tmp_path / "later", "FU3", "20260107")
    assert storescu(node.port, later).returncode == 0
    second = _done(node, later_series, followup=True)
    fu = second["result"]["summary"]["followup"]
    assert fu["compared"] is False and "is not on its series' grid" in fu["reason"], fu
    assert second["state"] == "done" and second["delivery"] == "delivered"
    assert [Path(d["path"]).name for d in second["deliveries"]] == ["seg.dcm", "sr.dcm"]
    assert len(dest.files()) == 4  # the two jobs' own SEG and SR, nothing else


def test_a_new_lesion_in_the_follow_up_is_flagged_new_and_drawn_in_the_comparison_seg(
        node_factory: Callable[..., NodeProc], storescp_factory: Callable[..., StoreSCP], tmp_path: Path) -> None:
    """The prior is healthy; a year later the same images carry one lesion (written into a copy at twice the cord's
    median): the follow-up counts it new, and the "New or enlarging lesion" SEG at the destination marks it."""
    import highdicom as hd
    import numpy as np
    import SimpleITK as sitk
    from lesion_support import follow_up_with_lesion

    from sci_node.pipeline.series import read_series

    dest, node, prior, first, folder = _node_with_prior(node_factory, storescp_factory, tmp_path, "FU4")
    vol = read_series(prior)
    cord = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "cord.nii.gz")))
    later, truth, later_series = follow_up_with_lesion(prior, vol, cord, tmp_path / "later")
    assert storescu(node.port, later).returncode == 0
    second = _done(node, later_series, followup=True)
    fu = second["result"]["summary"]["followup"]
    assert fu["compared"] and fu["counts"]["new"] >= 1 and fu["counts"]["resolved"] == 0, fu
    names = [Path(d["path"]).name for d in second["deliveries"]]
    assert names == ["seg.dcm", "sr.dcm", "new-or-enlarging-seg.dcm", "comparison-sr.dcm"], names
    seg = hd.seg.segread(second["deliveries"][2]["path"])
    later_vol = read_series(later)
    px = seg.get_pixels_by_source_instance([r.sop_instance_uid for r in later_vol.refs], segment_numbers=[1],
                                           skip_overlap_checks=True)[..., 0]
    assert px.shape == truth.shape and (px[truth > 0] > 0).mean() > 0.5, "the new lesion is not drawn"
    assert (px[truth == 0] > 0).sum() < (truth > 0).sum(), "the SEG marks more outside the lesion than in it"
    assert dciodvfy_errors(Path(second["deliveries"][2]["path"])) == []
    assert np.count_nonzero(px) > 0


def test_a_comparison_cut_short_by_kill_9_is_done_at_the_next_start(
        node_factory: Callable[..., NodeProc], storescp_factory: Callable[..., StoreSCP], tmp_path: Path) -> None:
    """The node is frozen the moment its comparison starts (its log says ``followup.comparing``) and killed with
    ``-9``: the job's own result is recorded with the "comparison due" marker and no follow-up. Started again, the
    node compares it (``followup.resumed``) and sends the comparison SEG and SR after the job's own."""
    import os
    import signal
    import time

    dest, node, prior, first, folder = _node_with_prior(node_factory, storescp_factory, tmp_path, "FU5")
    seen = node.log.stat().st_size
    later, later_series = _study(tmp_path / "later", "FU5", "20260107")
    assert storescu(node.port, later).returncode == 0
    deadline = time.monotonic() + 300
    while b'"followup.comparing"' not in node.log.read_bytes()[seen:]:
        assert time.monotonic() < deadline and node.proc is not None and node.proc.poll() is None, "no comparison"
        time.sleep(0.01)
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGSTOP)  # frozen inside the comparison (it takes about a second)
    job = next(j for j in node.jobs(10) if j["series_uid"] == later_series)
    summary = node.job(job["id"])["result"]["summary"]
    assert job["state"] == "done" and "followup" not in summary and summary["followup_due"]["attempts"] == 0, summary
    node.kill9()

    node.start()
    second = _done(node, later_series, followup=True)
    fu = second["result"]["summary"]["followup"]
    assert fu["compared"] and fu["prior_job"] == first["id"], fu
    assert second["result"]["summary"].get("followup_due") is None
    assert b'"followup.resumed"' in node.log.read_bytes()[seen:]
    names = [Path(d["path"]).name for d in second["deliveries"]]
    assert names == ["seg.dcm", "sr.dcm", "new-or-enlarging-seg.dcm", "comparison-sr.dcm"], names
    assert all(d["state"] == "sent" for d in second["deliveries"]), second["deliveries"]
    assert len(_received(dest)) == 6  # the prior's SEG and SR, the follow-up's own two, the comparison's two
