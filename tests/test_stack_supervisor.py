"""The stack supervises its children (real Orthanc, real node, real pipeline; kill -9 as the fault).

The node killed in the middle of Orthanc's forward is restarted by the stack, the plugin forwards
the series again once the forward job failed, and exactly one complete SEG of the series ends up in
Orthanc, with no manual step. A forward that keeps failing is retried with back-off and then given up;
a killed Orthanc is restarted too.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from conftest import make_mr_series, wait_for
from stack_support import SAMPLE, StackProc, orthanc_log, pid_alive

pytestmark = pytest.mark.slow


def _log_events(stack: StackProc, event: str) -> list[dict[str, Any]]:
    out = []
    for line in stack.output().splitlines():
        if f'"{event}"' in line:
            out.append(json.loads(line))
    return out


def _spooled(series_dir: Path) -> int:
    try:
        return sum(1 for e in os.scandir(series_dir) if e.name.endswith(".dcm"))
    except FileNotFoundError:
        return 0


def test_node_killed_mid_forward_gives_one_complete_seg(tmp_path: Path) -> None:
    stack = StackProc(tmp_path / "d").start()  # the real pipeline and shipped models
    try:
        ds = pydicom.dcmread(SAMPLE[0], stop_before_pixels=True)
        series_dir = stack.data_dir / "spool" / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
        node_pid = stack.child_pids()["node"]
        stack.storescu(SAMPLE)
        # kill -9 the node as soon as the forward has delivered its first instance
        deadline = time.monotonic() + 60
        while _spooled(series_dir) == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(node_pid, signal.SIGKILL)
        got = _spooled(series_dir)
        assert 0 < got < len(SAMPLE), f"not killed mid-forward: {got} of {len(SAMPLE)} instances had arrived"
        # no manual step from here on: the stack restarts the node, the plugin forwards again
        segs = _wait_for_seg(stack, str(ds.StudyInstanceUID))
        time.sleep(stack.stable_seconds + 2 + 8)  # quiet period: nothing else arrives
        assert stack.find_series(str(ds.StudyInstanceUID), "SEG") == segs
        _assert_complete(stack, segs[0], {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                                          for f in SAMPLE})
        forwards = stack.sci_node_jobs()["forwards"]
        assert forwards[0]["job_state"] == "Failure" and forwards[-1]["job_state"] == "Success", forwards
        assert forwards[-1]["reason"].startswith("retry ") and forwards[-1]["attempt"] >= 1
        (exited,) = [e for e in _log_events(stack, "stack_child_exited") if e["child"] == "node"]
        assert exited["code"] == -signal.SIGKILL and exited["restart"] == 1
        assert [e["child"] for e in _log_events(stack, "stack_child_restarted")] == ["node"]
        assert stack.proc is not None and stack.proc.poll() is None  # the stack (and Orthanc) stayed up
    finally:
        assert stack.stop() == 0


def _wait_for_seg(stack: StackProc, study_uid: str, timeout: float = 600) -> list[str]:
    segs: list[str] = []
    deadline = time.monotonic() + timeout
    while not segs and time.monotonic() < deadline:
        assert stack.proc is not None and stack.proc.poll() is None, stack.output()[-3000:]
        segs = stack.find_series(study_uid, "SEG")
        time.sleep(1)
    assert segs, f"no SEG after {timeout} s; forwards {stack.sci_node_jobs()['forwards']}"
    return segs


def _assert_complete(stack: StackProc, seg_series: str, sops: set[str]) -> None:
    client = stack.client()
    (instance,) = client.get_series_id(seg_series)["Instances"]
    tags = client.get_instances_id_tags(instance, params={"simplify": True})
    refs = {r["ReferencedSOPInstanceUID"] for r in tags["ReferencedSeriesSequence"][0]["ReferencedInstanceSequence"]}
    assert refs == sops, f"the SEG references {len(refs)} of the {len(sops)} instances"
    assert "missing" not in tags["SeriesDescription"] and "incomplete" not in tags["SeriesDescription"]


def _answers(stack: StackProc) -> bool:
    try:
        return bool(stack.client().get_system())
    except httpx.HTTPError:
        return False


def _broken_series(folder: Path) -> list[Path]:
    """An MR series the node refuses instance by instance (Pixel Data shorter than the header says)."""
    files = make_mr_series(folder, n=2)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        ds.save_as(f)
    return files


def test_failing_forward_is_retried_with_backoff_then_given_up_and_orthanc_is_restarted(tmp_path: Path) -> None:
    toml = 'processor = "derived-sc"\n[stack]\nforward_retries = 2\nforward_retry_seconds = 1.0\n'
    stack = StackProc(tmp_path / "d", toml=toml).start()
    try:
        stack.storescu(_broken_series(tmp_path / "s"))  # Orthanc takes it; the node answers 0xC210
        wait_for(lambda: len(stack.sci_node_jobs()["forwards"]) == 3, 60, interval=0.5, what="two retries")
        wait_for(lambda: "gave up after 2 retries" in orthanc_log(stack), 30, what="the give-up line")
        time.sleep(5)
        forwards = stack.sci_node_jobs()["forwards"]
        assert [f["attempt"] for f in forwards] == [0, 1, 2] and {f["job_state"] for f in forwards} == {"Failure"}
        times = [time.mktime(time.strptime(f["time"][:19], "%Y-%m-%dT%H:%M:%S")) for f in forwards]
        assert times[2] - times[1] >= times[1] - times[0] >= 1  # 1 s, then 2 s after the failure
        # kill -9 Orthanc: the stack starts it again (and its DICOM port is on loopback again)
        orthanc = stack.child_pids()["orthanc"]
        os.kill(orthanc, signal.SIGKILL)
        wait_for(lambda: stack.child_pids()["orthanc"] != orthanc, 30, what="Orthanc's restart")
        assert not pid_alive(orthanc)
        wait_for(lambda: _answers(stack), 30, what="Orthanc answering again")
        stack.storescu(make_mr_series(tmp_path / "after", n=2))
        assert [e["child"] for e in _log_events(stack, "stack_child_restarted")] == ["orthanc"]
    finally:
        assert stack.stop() == 0
