"""The node's DICOM SCP (pynetdicom): C-ECHO and C-STORE of MR images into the spool.

One handler per DIMSE service, all registered in :func:`event_handlers`; dependencies
(config, store) are bound handler arguments. Handlers never raise and never infer:
the C-STORE handler decodes the data set strictly under the negotiated transfer syntax
(:mod:`sci_node.dicom.decoding`: a data set in the other VR mode, an element whose length field claims
more bytes than were sent, or Pixel Data that does not fit the image header gets ``0xC210``), reads the four
UIDs it needs from the header, writes the bytes as sent behind a file meta header
(:func:`~sci_node.dicom.filemeta.file_header`, the same bytes as ``event.encoded_dataset()``) durably
to the spool, records it, and returns a named :class:`~sci_node.dicom.dimse.Status`.

Before any of this, the connection gate (:mod:`sci_node.dicom.gate`) lets a TCP connection become
an association (and hold one of ``limits.max_associations`` slots) only once it has sent an
A-ASSOCIATE-RQ, within ``limits.association_request_timeout_seconds``.

Admission happens when the A-ASSOCIATE-RQ arrives (``EVT_REQUESTED``): an unknown calling
AE (or an allowed AE from the wrong host) is rejected permanently with reason "calling AE
title not recognised"; a data directory below ``limits.min_free_disk_mb`` is rejected
transiently with "local limit exceeded".
"""
from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydicom.uid import UID, EnhancedMRImageStorage, MRImageStorage
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from sci_node.config import NodeConfig, TLSConfig
from sci_node.dicom.decoding import decode_strict, pixel_data_problem, text_value
from sci_node.dicom.dimse import (
    STORAGE_TRANSFER_SYNTAXES,
    VERIFICATION_SOP_CLASS,
    RejectReason,
    RejectResult,
    RejectSource,
    Status,
)
from sci_node.dicom.filemeta import file_header
from sci_node.dicom.gate import ConnectionGate, GatedAssociationServer, gate_handlers
from sci_node.dicom.poll import AdaptivePoll, set_loop_delay
from sci_node.errors import ConfigError, InvalidDatasetError, StorageError
from sci_node.store import InstanceKey, Store

log = structlog.get_logger("sci_node.scp")

#: Study, Series and SOP Instance UID, SOP Class UID: what the index needs from a received data set
_KEY_TAGS = (0x0020000D, 0x0020000E, 0x00080018, 0x00080016)

#: Storage SOP classes accepted as SCP.
STORAGE_SOP_CLASSES: tuple[str, ...] = (MRImageStorage, EnhancedMRImageStorage)


@dataclass
class ScpDeps:
    """What the handlers need, bound to them as an argument (no globals)."""

    cfg: NodeConfig
    store: Store
    #: instances stored per live association (keyed by ``id(assoc)``), for the audit line and caps
    stored: dict[int, int] = field(default_factory=dict)
    #: series each live association stored instances of: how it ends (release or abort) is
    #: recorded on them (:meth:`Store.association_ended`, the abort grace period)
    series: dict[int, set[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: each association's DUL reactor sleep: ``reactor_poll_busy_seconds`` while it stores,
    #: ``reactor_poll_seconds`` when idle (built from ``cfg``)
    poll: AdaptivePoll = field(init=False)

    def __post_init__(self) -> None:
        self.poll = AdaptivePoll(self.cfg.limits.reactor_poll_seconds, self.cfg.limits.reactor_poll_busy_seconds)


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle's algorithm: DIMSE is request/response, small PDUs must not wait."""
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # e.g. a socket already closed by the peer


def _assoc_socket(event: Event) -> socket.socket | None:
    dul_sock = getattr(event.assoc.dul, "socket", None)
    return getattr(dul_sock, "socket", None)


# -- handlers ---------------------------------------------------------------------------------

#: Seconds pynetdicom's DUL loop sleeps during association negotiation (its default 0.001 s); once
#: established, :func:`handle_established` hands the association to the adaptive poll
#: (:mod:`sci_node.dicom.poll`, ``[limits] reactor_poll_seconds`` / ``reactor_poll_busy_seconds``).
DUL_LOOP_DELAY_S = 0.0005


def handle_conn_open(event: Event) -> None:
    """EVT_CONN_OPEN: TCP_NODELAY on the accepted socket; a shorter DUL poll delay until established."""
    set_nodelay(_assoc_socket(event))
    set_loop_delay(event.assoc, DUL_LOOP_DELAY_S)


def admission_refusal(deps: ScpDeps, calling_aet: str, host: str) -> tuple[RejectResult, RejectSource,
                                                                                RejectReason, str] | None:
    """Why an association request must be refused, or None to accept it (pure policy + disk check)."""
    cfg = deps.cfg
    if cfg.allowed_aes and not any(a.matches(calling_aet, host) for a in cfg.allowed_aes):
        return (RejectResult.PERMANENT, RejectSource.SERVICE_USER, RejectReason.CALLING_AE_NOT_RECOGNISED,
                "calling AE title not recognised")
    try:
        free = deps.store.free_disk_mb()
    except OSError as exc:
        return (RejectResult.TRANSIENT, RejectSource.PROVIDER_PRESENTATION, RejectReason.LOCAL_LIMIT_EXCEEDED,
                f"data directory unavailable: {exc}")
    if free < cfg.limits.min_free_disk_mb:
        return (RejectResult.TRANSIENT, RejectSource.PROVIDER_PRESENTATION, RejectReason.LOCAL_LIMIT_EXCEEDED,
                f"free disk {free:.0f} MiB below the {cfg.limits.min_free_disk_mb} MiB watermark")
    return None


def handle_requested(event: Event, deps: ScpDeps) -> None:
    """EVT_REQUESTED: bind the association's log context; reject what admission refuses."""
    try:
        primitive = event.assoc.requestor.primitive
        calling = str(primitive.calling_ae_title if primitive is not None else "").strip()
        host = str(event.assoc.requestor.address)
        structlog.contextvars.bind_contextvars(calling_aet=calling, peer=host)
        refusal = admission_refusal(deps, calling, host)
        if refusal is None:
            return
        result, source, reason, why = refusal
        log.warning("association.rejected", reason=why, result=result.name, diagnostic=reason.name)
        event.assoc.acse.send_reject(int(result), int(source), int(reason))
        # As pynetdicom's own rejection path: wait until the DUL has sent the A-ASSOCIATE-RJ
        # and the peer closed (or ARTIM expired), so the socket is not shut before the PDU leaves.
        event.assoc.kill()
    except Exception:  # a notification handler must never raise
        log.exception("association.admission_error")


def handle_established(event: Event, deps: ScpDeps) -> None:
    """EVT_ESTABLISHED: start counting this association's instances; its reactor polls fast (adaptive)."""
    with deps.lock:
        deps.stored[id(event.assoc)] = 0
    set_loop_delay(event.assoc, deps.cfg.limits.reactor_poll_seconds)  # pynetdicom's reactor sleep (private)
    deps.poll.busy(event.assoc)  # senders store right after association: poll fast from here
    log.info("association.accepted", contexts=len(event.assoc.accepted_contexts),
             refused_sop_classes=refused_sop_classes(event.assoc.rejected_contexts))


def refused_sop_classes(contexts: Any, limit: int = 24) -> list[str]:
    """The SOP classes of the presentation contexts negotiation refused, as ``"name (UID): why"``.

    One entry per SOP class and reason, at most ``limit`` (dcmtk's storescu proposes ~120
    storage classes by default), then ``"... N more"``.
    """
    seen: dict[str, None] = {}
    for cx in contexts:
        uid = UID(str(cx.abstract_syntax or ""))
        seen[f"{uid.name if uid.name != str(uid) else 'unknown'} ({uid}): {str(cx.status).lower()}"] = None
    out = list(seen)
    return out if len(out) <= limit else [*out[:limit], f"... {len(out) - limit} more"]


def handle_closed(event: Event, deps: ScpDeps) -> None:
    """EVT_RELEASED / EVT_ABORTED: one audit line per association; how it ended, on its series.

    An abort (ours or the peer's, a dropped link included) makes the series it sent wait
    ``abort_grace_seconds`` for a resend; a release clears that (:meth:`Store.association_ended`).
    """
    with deps.lock:
        n = deps.stored.pop(id(event.assoc), 0)
        series = sorted(deps.series.pop(id(event.assoc), ()))
    deps.poll.forget(event.assoc)
    aborted = event.event is evt.EVT_ABORTED
    try:
        deps.store.association_ended(series, aborted=aborted)
    except Exception as exc:  # a notification handler must never raise
        log.error("association.end_not_recorded", reason=str(exc)[:200], series=len(series))
    log.info("association.closed", how=event.event.name, instances_stored=n,
             **({"series_awaiting_resend": len(series)} if aborted and series else {}))
    structlog.contextvars.clear_contextvars()


def handle_echo(event: Event) -> int:
    """C-ECHO: always Success."""
    return int(Status.SUCCESS)


def _received_bytes(event: Event) -> bytes:
    """The C-STORE's data set as the peer sent it (pynetdicom keeps it in a ``BytesIO``)."""
    stream = getattr(event.request, "DataSet", None)
    return stream.getvalue() if stream is not None else b""


def _instance_key(event: Event, raw: bytes) -> InstanceKey | tuple[Status, str]:
    """The UIDs of the received data set ``raw``, or the status + reason to refuse it with."""
    try:  # strictly under the negotiated syntax: pydicom's silent VR-mode fallback would spool corrupt bytes
        ds = decode_strict(raw, str(event.context.transfer_syntax))
        uids = [text_value(ds, tag) for tag in _KEY_TAGS]
    except InvalidDatasetError as exc:  # mis-encoded, truncated, undecodable
        return Status.CANNOT_UNDERSTAND, str(exc)[:300]
    except Exception as exc:  # corrupt / undecodable data set
        return Status.CANNOT_UNDERSTAND, f"cannot decode data set: {type(exc).__name__}: {exc}"[:300]
    study, series, sop, sop_class = uids
    missing = [kw for kw, v in zip(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), (study, series, sop))
               if not v]
    if missing:
        return Status.CANNOT_UNDERSTAND, f"missing {', '.join(missing)}"
    if sop_class != event.context.abstract_syntax:
        return Status.DATASET_SOP_CLASS_MISMATCH, (
            f"SOP Class UID {sop_class} does not match the presentation context {event.context.abstract_syntax}")
    if sop != str(getattr(event.request, "AffectedSOPInstanceUID", "")):
        return Status.CANNOT_UNDERSTAND, "SOP Instance UID differs from the request's Affected SOP Instance UID"
    problem = pixel_data_problem(ds, str(event.context.transfer_syntax))
    if problem:
        return Status.CANNOT_UNDERSTAND, problem
    return InstanceKey(study, series, sop, sop_class, str(event.context.transfer_syntax))


def handle_store(event: Event, deps: ScpDeps) -> int:
    """C-STORE: spool (journal append + fdatasync; file and row now or write-behind), then Success; else a named
    failure status."""
    try:
        deps.poll.busy(event.assoc)  # the response and the next request: on the fast poll
        aid = id(event.assoc)
        with deps.lock:
            n = deps.stored.get(aid, 0)
        if n >= deps.cfg.limits.max_instances_per_association:
            log.warning("store.refused", reason="per-association instance cap reached", cap=n)
            return int(Status.OUT_OF_RESOURCES)
        raw = _received_bytes(event)
        key = _instance_key(event, raw)
        if isinstance(key, tuple):
            status, why = key
            log.warning("store.refused", status=f"0x{status:04X}", reason=why)
            return int(status)
        calling = str(event.assoc.requestor.ae_title).strip()
        if deps.store.series_size(key.series_uid) >= deps.cfg.limits.max_instances_per_series:
            log.warning("store.refused", reason="per-series instance cap reached", series_uid=key.series_uid,
                        cap=deps.cfg.limits.max_instances_per_series)
            return int(Status.OUT_OF_RESOURCES)
        with deps.lock:
            opens = key.series_uid not in deps.series.get(aid, ())
        try:
            header = file_header(str(event.request.AffectedSOPClassUID), key.sop_uid, key.transfer_syntax)
            is_new = deps.store.spool_instance(key, (header, raw), calling_aet=calling, opens_association=opens)
        except StorageError as exc:
            log.error("store.failed", status="0xA700", reason=str(exc), sop_uid=key.sop_uid)
            return int(Status.OUT_OF_RESOURCES)
        with deps.lock:
            deps.stored[aid] = deps.stored.get(aid, 0) + 1
            deps.series.setdefault(aid, set()).add(key.series_uid)
        log.debug("store.ok", sop_uid=key.sop_uid, series_uid=key.series_uid,
                  duplicate=None if is_new is None else not is_new)  # None: indexed by the write-behind thread
        return int(Status.SUCCESS)
    except Exception as exc:  # never raise out of a DIMSE handler
        log.exception("store.error", reason=str(exc)[:200])
        return int(Status.OUT_OF_RESOURCES)


def event_handlers(deps: ScpDeps) -> list[tuple[Any, ...]]:
    """Every handler of the SCP, with its bound dependencies."""
    return [
        (evt.EVT_CONN_OPEN, handle_conn_open),
        (evt.EVT_REQUESTED, handle_requested, [deps]),
        (evt.EVT_ESTABLISHED, handle_established, [deps]),
        (evt.EVT_RELEASED, handle_closed, [deps]),
        (evt.EVT_ABORTED, handle_closed, [deps]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [deps]),
        *gate_handlers(),
    ]


# -- the AE -----------------------------------------------------------------------------------

def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The SCP's TLS context from the config (None when TLS is off).

    Raises
    ------
    ConfigError
        When a certificate/key/CA file cannot be loaded (the message names it).
    """
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        if tls.ca_file is not None:
            ctx.load_verify_locations(str(tls.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load {tls.cert_file} / {tls.key_file} / {tls.ca_file}: {exc}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


def build_ae(cfg: NodeConfig) -> AE:
    """The SCP's application entity: contexts, limits and timeouts from ``cfg``."""
    ae = AE(ae_title=cfg.ae_title)
    ae.add_supported_context(VERIFICATION_SOP_CLASS)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))
    ae.maximum_associations = cfg.limits.max_associations
    ae.maximum_pdu_size = cfg.limits.max_pdu_bytes
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    return ae


def start_scp(cfg: NodeConfig, store: Store) -> ThreadedAssociationServer:
    """Start listening on ``cfg.bind:cfg.port`` in background threads; return the server.

    Raises
    ------
    ConfigError
        When the port cannot be bound (in use, permission) or the TLS files are unusable.
    """
    ae = build_ae(cfg)
    deps = ScpDeps(cfg, store)
    try:  # AE.start_server(block=False), with the connection gate (sci_node.dicom.gate) in front
        server = ae.make_server((cfg.bind, cfg.port), evt_handlers=event_handlers(deps),
                                ssl_context=server_ssl_context(cfg.tls), server_class=GatedAssociationServer,
                                gate=ConnectionGate(cfg.limits))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {cfg.bind}:{cfg.port}: {exc}") from exc
    threading.Thread(target=make_target(server.serve_forever), name=f"AcceptorServer@{cfg.port}",
                     daemon=True).start()
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it from there
    set_nodelay(server.socket)  # accepted sockets inherit it on Linux; handle_conn_open makes sure
    return server
