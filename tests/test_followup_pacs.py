"""The prior from the PACS (issue 39), end to end: ``sci-node serve`` with ``--followup-pacs``, a real Orthanc as
the PACS, dcmtk's storescu and storescp.

Patient FU3's prior study lies only in the PACS, never sent to the node (stored whole, then the PACS stops, so
the node cannot fetch a half-stored series). The PACS is down when the later study arrives: the job's own SEG
and SR go out at once, the follow-up is recorded as pending with the reason. Once the PACS answers again (on
the configured port, the prior in it), the node asks again by itself: C-FIND finds the prior, C-GET fetches
it, the node routes and segments it, compares, and queues the "New or enlarging lesion" SEG and the comparison
SR after the job's own results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pydicom
import pytest
from orthanc_support import BareOrthanc
from test_followup_node import _study

from conftest import NodeProc, StoreSCP, free_port, storescu, wait_for
from dicom_validate import dciodvfy_errors
from stack_support import free_ports

pytestmark = pytest.mark.slow


def test_a_prior_only_in_the_pacs_is_fetched_and_compared_once_the_pacs_answers(
        node_factory: Callable[..., NodeProc], storescp_factory: Callable[..., StoreSCP], tmp_path: Path) -> None:
    dest = storescp_factory(port=free_port())
    pacs_http, pacs_dicom = free_ports(2)
    toml = "[followup]\nretry_seconds = 1.0\nretry_max_seconds = 2.0\n"
    node = node_factory(toml, "--stable-seconds", "1", "--destination", f"DEST@127.0.0.1:{dest.port}",
                        "--followup-pacs", f"ORTHANC@127.0.0.1:{pacs_dicom}").start()
    prior, prior_series = _study(tmp_path / "prior", "FU3", "20250107")
    later, later_series = _study(tmp_path / "later", "FU3", "20260107")
    pacs = BareOrthanc(tmp_path / "pacs", pacs_dicom, pacs_http).start()
    try:  # the PACS has held the prior for a year (stored whole before the node can ask), then goes down
        pacs.store(prior)
    finally:
        pacs.stop()
    assert storescu(node.port, later).returncode == 0

    # the PACS is down: the current result is delivered, the follow-up waits
    def pending() -> dict | None:
        jobs = [j for j in node.jobs(20) if j["series_uid"] == later_series and j["state"] == "done"]
        job = node.job(jobs[0]["id"]) if jobs else None
        fu = (job or {}).get("result", {}).get("summary", {}).get("followup") or {}
        return job if fu.get("pending") and job and job["delivery"] == "delivered" else None
    wait_for(lambda: pending() is not None, 300, interval=0.5, what="the job delivered, its follow-up pending")
    job = pending()
    assert job is not None
    fu = job["result"]["summary"]["followup"]
    assert "unreachable" in fu["reason"] and fu["attempts"] >= 1 and not fu["compared"], fu
    assert [Path(d["path"]).name for d in job["deliveries"]] == ["seg.dcm", "sr.dcm"]
    shown = node.cli("jobs", "show", str(job["id"]))
    assert "follow-up" in shown.stdout and "pending" in shown.stdout, shown.stdout

    # the PACS comes back up, holding the prior: the node asks again by itself
    pacs.start()
    try:
        def compared() -> dict | None:
            j = node.job(job["id"])
            f = j["result"]["summary"].get("followup") or {}
            return j if f.get("compared") and j["delivery"] == "delivered" else None
        wait_for(lambda: compared() is not None, 300, interval=1, what="the follow-up against the PACS prior")
        done = compared()
        assert done is not None
    finally:
        pacs.stop()
    fu = done["result"]["summary"]["followup"]
    assert fu["prior_source"] == f"PACS ORTHANC@127.0.0.1:{pacs_dicom}" and fu["prior_job"] is None, fu
    assert fu["prior_series_uid"] == prior_series and fu["registration"]["cord_dice"] > 0.95, fu
    assert fu["counts"]["new"] == 0 and fu["counts"]["enlarging"] == 0, fu
    assert [Path(d["path"]).name for d in done["deliveries"]] == ["seg.dcm", "sr.dcm", "new-or-enlarging-seg.dcm",
                                                                  "comparison-sr.dcm"], done["deliveries"]
    cmp_sr = Path(done["deliveries"][3]["path"])
    assert dciodvfy_errors(cmp_sr) == []
    prior_study = str(pydicom.dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID)
    assert [str(i.StudyInstanceUID) for i in pydicom.dcmread(cmp_sr).PertinentOtherEvidenceSequence] == [prior_study]
    # the prior was fetched into the job's own (0700) folder, never into the node's spool as a job of its own
    assert not [j for j in node.jobs(50) if j["series_uid"] == prior_series]
    folder = Path(done["result"]["outputs"][0]).parent
    assert len(list((folder / "prior").glob("prior-0/dicom/*.dcm"))) == len(prior)
    assert (folder / "prior").stat().st_mode & 0o077 == 0
