"""Export: the persistent outbox, sent by C-STORE to every configured destination.

Each outbox entry (one result file for one destination) is either ``sent``, retried
with exponential backoff (``cfg.export``: ``initial * 2**attempts`` capped at ``max``,
at most ``max_attempts`` tries), or ``failed`` at once with the reason when the
destination refuses in a way retrying cannot fix: association rejected permanently
(e.g. calling AE not recognised), SOP class/transfer syntax not accepted, or a
permanent C-STORE status (0x01xx, 0x02xx, 0xA9xx, 0xCxxx). ``sci-node jobs retry ID``
puts failed entries back to pending.

An entry that was being sent when the node was killed is still ``pending`` and is sent
again after restart: the destination sees the same SOP instance again (idempotent at
any PACS), never a second, different result.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog

from sci_node.config import Destination, ExportPolicy, NodeConfig, parse_destination
from sci_node.dicom.dimse import STORED_STATUSES, Status, is_transient_failure
from sci_node.dicom.scu import AssociationRejectedError, export_contexts, open_association
from sci_node.errors import DicomNetworkError, SciNodeError
from sci_node.store import OutboxEntry, Store

log = structlog.get_logger("sci_node.export")


@dataclass(frozen=True)
class Outcome:
    """What happened to one entry: ``sent``, ``retry`` or ``failed`` (permanent), and why."""

    kind: str
    detail: str = ""


def backoff_seconds(policy: ExportPolicy, attempts: int) -> float:
    """Delay before the next try after ``attempts`` failed tries (>= 1): exponential, capped."""
    return float(min(policy.max_backoff_seconds, policy.initial_backoff_seconds * 2 ** max(0, attempts - 1)))


def classify_status(code: int | None) -> Outcome:
    """Map a C-STORE response status (None: no response) to an :class:`Outcome`."""
    if code is None:
        return Outcome("retry", "no C-STORE response (association aborted or timed out)")
    if code in STORED_STATUSES:
        return Outcome("sent", f"0x{code:04X}")
    name = Status(code).name if code in Status._value2member_map_ else "failure"
    if is_transient_failure(code):
        return Outcome("retry", f"C-STORE status 0x{code:04X} ({name})")
    return Outcome("failed", f"C-STORE status 0x{code:04X} ({name})")


def send_entries(dest: Destination, entries: list[OutboxEntry], calling_ae: str,
                 cfg: NodeConfig) -> dict[int, Outcome]:
    """Send ``entries`` to ``dest`` over one association; return an outcome per entry id."""
    datasets: dict[int, pydicom.Dataset] = {}
    outcomes: dict[int, Outcome] = {}
    for e in entries:
        try:
            datasets[e.id] = pydicom.dcmread(Path(e.path))
        except Exception as exc:
            outcomes[e.id] = Outcome("failed", f"result file unreadable: {type(exc).__name__}: {exc}"[:300])
    if not datasets:
        return outcomes
    contexts = export_contexts((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                               for ds in datasets.values())
    try:
        assoc = open_association(dest, calling_ae, cfg.tls, contexts)
    except AssociationRejectedError as exc:
        kind = "failed" if exc.permanent else "retry"
        return outcomes | {i: Outcome(kind, str(exc)) for i in datasets}
    except DicomNetworkError as exc:
        return outcomes | {i: Outcome("retry", str(exc)) for i in datasets}
    try:
        for entry_id, ds in datasets.items():
            if not assoc.is_established:
                outcomes[entry_id] = Outcome("retry", "association lost before sending")
                continue
            try:
                status = assoc.send_c_store(ds)
            except ValueError:
                outcomes[entry_id] = Outcome("failed", f"{dest} accepted no presentation context for SOP class "
                                                       f"{ds.SOPClassUID} ({ds.SOPClassUID.name})")
                continue
            outcomes[entry_id] = classify_status(int(status.Status) if "Status" in status else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


class Exporter(threading.Thread):
    """Sends due outbox entries until ``stop`` is set; ``wake`` makes it look at once."""

    def __init__(self, cfg: NodeConfig, store: Store, wake: threading.Event, stop: threading.Event) -> None:
        super().__init__(name="exporter", daemon=True)
        self.cfg, self.store, self.wake, self.stop_event = cfg, store, wake, stop

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.run_once()
                nxt = self.store.next_outbox_due()
            except SciNodeError:
                log.exception("export.pass_failed")
                nxt = None
            delay = 1.0 if nxt is None else min(1.0, max(0.0, nxt - time.time()))
            if delay > 0:
                self.wake.wait(delay)
            self.wake.clear()

    def run_once(self) -> int:
        """One pass over the due entries; return how many were attempted."""
        by_dest: dict[str, list[OutboxEntry]] = defaultdict(list)
        for e in self.store.due_outbox():
            by_dest[e.destination].append(e)
        for dest_text, entries in by_dest.items():
            if self.stop_event.is_set():
                break
            outcomes = send_entries(parse_destination(dest_text), entries, self.cfg.ae_title, self.cfg)
            for e in entries:
                self._record(e, outcomes[e.id])
        return sum(len(v) for v in by_dest.values())

    def _record(self, e: OutboxEntry, outcome: Outcome) -> None:
        fields = dict(job_id=e.job_id, destination=e.destination, file=Path(e.path).name, attempt=e.attempts + 1)
        if outcome.kind == "sent":
            self.store.mark_sent(e.id)
            log.info("audit.result_sent", status=outcome.detail, **fields)
        elif outcome.kind == "failed" or e.attempts + 1 >= self.cfg.export.max_attempts:
            reason = outcome.detail if outcome.kind == "failed" else (
                f"gave up after {e.attempts + 1} attempts: {outcome.detail}")
            self.store.mark_failed(e.id, reason)
            log.error("export.failed", reason=reason, **fields)
        else:
            delay = backoff_seconds(self.cfg.export, e.attempts + 1)
            self.store.mark_retry(e.id, outcome.detail, time.time() + delay)
            log.warning("export.retry", reason=outcome.detail, retry_in_s=delay, **fields)
