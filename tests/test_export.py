"""Export outbox: backoff while the destination is down, permanent rejections, ``jobs retry``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import MRImageStorage, Verification

from sci_node.config import ExportPolicy
from sci_node.dicom.dimse import Status
from sci_node.dicom.export import backoff_seconds, classify_status

from conftest import NodeProc, StoreSCP, free_port, make_mr_series, storescu, wait_for

FAST_EXPORT = 'processor = "derived-sc"\n[export]\ninitial_backoff_seconds = 0.5\nmax_backoff_seconds = 2\n'


def test_backoff_and_classification() -> None:
    policy = ExportPolicy(initial_backoff_seconds=2, max_backoff_seconds=30, max_attempts=5)
    assert [backoff_seconds(policy, n) for n in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]
    assert classify_status(0x0000).kind == "sent" and classify_status(0xB000).kind == "sent"
    assert classify_status(0xA700).kind == "retry" and classify_status(None).kind == "retry"
    for permanent in (0x0122, 0x0124, 0xA900, 0xC210):
        assert classify_status(permanent).kind == "failed"
    assert "SOP_CLASS_NOT_SUPPORTED" in classify_status(Status.SOP_CLASS_NOT_SUPPORTED).detail


def test_destination_down_then_up_delivered_after_backoff(node_factory: Callable[..., NodeProc],
                                                          storescp_factory: Callable[..., StoreSCP],
                                                          tmp_path: Path) -> None:
    dest_port = free_port()
    node = node_factory(FAST_EXPORT, "--allow-ae", "SCANNER", "--stable-seconds", "1",
                        "--destination", f"DEST@127.0.0.1:{dest_port}").start()
    assert storescu(node.port, make_mr_series(tmp_path / "s", n=4)).returncode == 0
    wait_for(lambda: (node.job_if_exists(1) or {}).get("state") == "done", 30, what="job done")
    wait_for(lambda: node.job(1)["deliveries"][0]["attempts"] >= 2, 30, what="two failed attempts")
    entry = node.job(1)["deliveries"][0]
    assert entry["state"] == "pending" and "cannot associate" in entry["last_error"]
    dest = storescp_factory(port=dest_port)
    wait_for(lambda: len(dest.files()) == 1, 30, what="delivery after the destination came back")
    wait_for(lambda: node.job(1)["delivery"] == "delivered", 10, what="delivered state")
    time.sleep(1.5)
    assert len(dest.files()) == 1


class PynetdicomDest:
    """A real pynetdicom storage SCP whose policy the test changes while it runs."""

    def __init__(self, require_calling: list[str], sop_classes: list[str]) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self.ae = AE("DEST")
        self.ae.require_calling_aet = require_calling
        self.ae.add_supported_context(Verification)
        for sop in sop_classes:
            self.ae.add_supported_context(sop, ExplicitVRLittleEndian)
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def accept_everything(self) -> None:
        self.ae.require_calling_aet = []
        for sop in (Verification, MRImageStorage, SecondaryCaptureImageStorage):
            self.ae.add_supported_context(sop, ExplicitVRLittleEndian)
        self.server.contexts = self.ae.supported_contexts


@pytest.fixture
def pyn_dests() -> Iterator[list[PynetdicomDest]]:
    made: list[PynetdicomDest] = []
    yield made
    for d in made:
        d.server.shutdown()


def test_permanent_rejections_fail_without_retry_storm_then_retry_resends(
        node_factory: Callable[..., NodeProc], pyn_dests: list[PynetdicomDest], tmp_path: Path) -> None:
    rejecting = PynetdicomDest(require_calling=["SOMEONE_ELSE"], sop_classes=[SecondaryCaptureImageStorage])
    no_sc = PynetdicomDest(require_calling=[], sop_classes=[MRImageStorage])  # SC not supported
    pyn_dests += [rejecting, no_sc]
    node = node_factory(FAST_EXPORT, "--allow-ae", "SCANNER", "--stable-seconds", "1",
                        "--destination", f"DEST@127.0.0.1:{rejecting.port}",
                        "--destination", f"DEST@127.0.0.1:{no_sc.port}").start()
    assert storescu(node.port, make_mr_series(tmp_path / "s", n=3)).returncode == 0
    wait_for(lambda: (node.job_if_exists(1) or {}).get("state") == "failed", 40, what="job failed on delivery")
    time.sleep(3.0)  # several backoff periods: a retry storm would show up as attempts > 1
    job = node.job(1)
    assert job["state"] == "failed" and job["delivery"] == "failed"
    by_port = {int(d["destination"].rsplit(":", 1)[1]): d for d in job["deliveries"]}
    assert all(d["state"] == "failed" and d["attempts"] == 1 for d in by_port.values())
    assert "Calling AE Title Not Recognised" in by_port[rejecting.port]["last_error"].title() or \
        "calling ae title not recognised" in by_port[rejecting.port]["last_error"].lower()
    assert "no presentation context" in by_port[no_sc.port]["last_error"]
    assert rejecting.received == [] and no_sc.received == []
    assert "delivery to" in job["reason"]

    for d in (rejecting, no_sc):
        d.accept_everything()
    res = node.cli("jobs", "retry", "1")
    assert res.returncode == 0 and "queued for sending again" in res.stdout
    wait_for(lambda: len(rejecting.received) == 1 and len(no_sc.received) == 1, 30, what="resend after retry")
    wait_for(lambda: node.job(1)["delivery"] == "delivered", 10, what="delivered")
    assert node.job(1)["state"] == "done"
    assert node.cli("jobs", "retry", "999").returncode != 0
