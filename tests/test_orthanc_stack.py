"""The embedded stack end to end: real Orthanc (+ our plugin, DICOMweb) and the real node.

``storescu`` (the scanner) -> Orthanc -> STABLE_SERIES -> the node -> SEG + SR back into the same
study in Orthanc, exactly once, and nothing loops; Orthanc's HTTP API, the ``/sci-node/`` routes
and OHIF all sit behind authentication; SIGTERM stops Orthanc and the node.
"""
from __future__ import annotations

import time
from pathlib import Path

import httpx
import pydicom
import pytest

from conftest import make_mr_series, wait_for
from stack_support import PASSWORD, USER, ProcessedStudy, StackProc, pid_alive, shared_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> ProcessedStudy:
    return shared_stack(tmp_path_factory.mktemp("orthanc-stack"))


def test_mr_series_gets_seg_and_sr_in_same_study_exactly_once(processed: ProcessedStudy) -> None:
    stack, study = processed.stack, processed.study_uid
    assert processed.seconds_to_seg < 300
    wait_for(lambda: bool(stack.find_series(study, "SR")), 30, what="the SR in the study")
    # quiet period: Orthanc's StableAge for the SEG/SR series, plus the node's stable wait, plus margin.
    time.sleep(stack.stable_seconds + 2 + 6)
    client = stack.client()
    (seg,) = stack.find_series(study, "SEG")
    (sr,) = stack.find_series(study, "SR")
    assert len(client.get_series_id(seg)["Instances"]) == 1
    assert len(client.get_series_id(sr)["Instances"]) == 1
    (mr,) = stack.find_series(study, "MR")  # nothing came back as MR
    # the plugin forwarded the MR series once and never the SEG/SR; the node ran one job
    answer = stack.sci_node_jobs()
    assert [f["series"] for f in answer["forwards"]] == [mr], answer["forwards"]
    assert answer["forwards"][0]["reason"] == "stable-series" and answer["forwards"][0]["job_state"] == "Success"
    assert answer["node_error"] is None
    (job,) = answer["jobs"]
    assert job["state"] == "done" and job["study_uid"] == study, job
    stores = [client.get_jobs_id(j) for j in client.get_jobs()]
    assert [j["Type"] for j in stores] == ["DicomModalityStore"] and stores[0]["State"] == "Success"
    # the same answer per study and per series (Orthanc id or DICOM UID)
    per_study = stack.sci_node_jobs(f"/sci-node/studies/{study}/jobs")
    assert [j["id"] for j in per_study["jobs"]] == [job["id"]]
    per_series = stack.sci_node_jobs(f"/sci-node/series/{mr}/jobs")
    assert [j["id"] for j in per_series["jobs"]] == [job["id"]]
    # the SEG references the MR series it was computed on
    seg_tags = client.get_instances_id_tags(client.get_series_id(seg)["Instances"][0], params={"simplify": True})
    mr_uid = client.get_series_id(mr)["MainDicomTags"]["SeriesInstanceUID"]
    assert seg_tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == mr_uid
    # where it is: the SEG's description and the status page name the vertebral levels the cord covers
    summary = job["result"]["summary"]
    names = [v["level"] for v in summary["vertebral_levels"]]
    page = httpx.get(f"{stack.url}/sci-node/", auth=(USER, PASSWORD), trust_env=False, timeout=60).text
    assert "findings (vertebral levels)" in page
    if names:
        covered = names[0] if names[0] == names[-1] else f"{names[0]}-{names[-1]}"
        assert f" {covered} (" in seg_tags["SeriesDescription"], seg_tags["SeriesDescription"]
        assert f"cord {covered}; {summary['lesion_count']} lesion" in page
    else:
        assert summary["vertebral_levels_unknown_reason"] and "levels unknown (" in page


def test_authentication_is_enforced(processed: ProcessedStudy) -> None:
    stack = processed.stack
    for path in ("/system", "/sci-node/jobs", "/sci-node", "/ohif/", "/dicom-web/studies"):
        assert httpx.get(stack.url + path, trust_env=False).status_code == 401, path
        assert httpx.get(stack.url + path, auth=(USER, "wrong"), trust_env=False).status_code == 401, path
    ok = httpx.get(stack.url + "/sci-node", auth=(USER, PASSWORD), trust_env=False)
    assert ok.status_code == 200 and "sci-node" in ok.text and processed.study_uid in ok.text
    with pytest.raises(httpx.HTTPError, match="HTTP code: 401"):
        stack.client(password="wrong").get_system()


def test_series_from_node_is_not_forwarded_and_manual_reprocess_is(processed: ProcessedStudy,
                                                                     tmp_path: Path) -> None:
    stack = processed.stack
    before = len(stack.sci_node_jobs()["forwards"])
    # An MR series that arrives from the node's own AE title is never sent back to it (no loop).
    looped = make_mr_series(tmp_path / "from-node", n=4)
    stack.storescu(looped, calling="SCINODE")
    time.sleep(stack.stable_seconds + 4)
    assert len(stack.sci_node_jobs()["forwards"]) == before
    # ... but an administrator can ask for it explicitly.
    uid = str(pydicom.dcmread(looped[0], stop_before_pixels=True).SeriesInstanceUID)
    token = httpx.get(f"{stack.url}/sci-node/csrf", auth=(USER, PASSWORD), trust_env=False).json()["token"]
    post = {"auth": (USER, PASSWORD), "trust_env": False, "timeout": 30, "json": {},
            "headers": {"X-SCI-Node-CSRF": token}}  # what the status page's buttons send (test_stack_csrf.py)
    r = httpx.post(f"{stack.url}/sci-node/series/{uid}/process", **post)
    assert r.status_code == 200, r.text
    assert r.json()["reason"] == "manual" and r.json()["series_uid"] == uid
    wait_for(lambda: any(j["series_uid"] == uid for j in stack.sci_node_jobs()["jobs"]), 60,
             interval=1, what="the node's job for the manually forwarded series")
    bad = httpx.post(f"{stack.url}/sci-node/series/1.2.3.4.5/process", **post)
    assert bad.status_code == 404


def test_sigterm_stops_orthanc_and_node(tmp_path: Path) -> None:
    stack = StackProc(tmp_path / "d", toml='processor = "derived-sc"\n').start()
    pids = stack.child_pids()
    assert set(pids) == {"orthanc", "node"} and all(pid_alive(p) for p in pids.values())
    assert PASSWORD not in stack.output()  # the secret is never printed
    assert stack.stop() == 0
    assert not any(pid_alive(p) for p in pids.values())


def test_series_still_arriving_at_stop_is_forwarded_after_restart(tmp_path: Path) -> None:
    # Orthanc forgets its stability timers when it stops: the plugin recovers such series.
    stack = StackProc(tmp_path / "d", toml='processor = "derived-sc"\n', stable_seconds=60).start()
    series = make_mr_series(tmp_path / "series", n=4)
    stack.storescu(series)
    assert stack.stop() == 0  # long before the 60 s StableAge
    stack.stable_seconds = 2
    stack.start()
    try:
        wait_for(lambda: len(stack.sci_node_jobs()["forwards"]) == 1, 30, interval=1,
                 what="the recovered forward")
        (fwd,) = stack.sci_node_jobs()["forwards"]
        assert fwd["reason"] == "recovered-after-restart"
        uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID)
        assert fwd["series_uid"] == uid
        wait_for(lambda: [j["state"] for j in stack.sci_node_jobs()["jobs"]] == ["done"], 60, interval=1,
                 what="the node's job for the recovered series")
    finally:
        assert stack.stop() == 0
