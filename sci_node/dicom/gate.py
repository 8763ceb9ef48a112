"""The SCP's connection gate: a TCP connection holds an association slot only once it is an association.

pynetdicom starts an association thread for every accepted TCP connection, and that thread
counts against ``maximum_associations`` while it waits up to the ACSE timeout for the
A-ASSOCIATE-RQ — even after the peer has closed. Hospital networks probe DICOM ports all
the time (TCP health checks, port scanners, load balancers), so a handful of bare connects
used to lock real scanners out with "local limit exceeded".

The gate runs in the per-connection request thread, *before* pynetdicom's association
thread exists:

1. at most ``limits.max_pending_connections`` connections may wait for their first PDU; one
   more is closed at once;
2. with TLS, the handshake happens here (not in the accept loop), bounded by the deadline;
3. the first PDU must arrive within ``limits.association_request_timeout_seconds`` and be
   a decodable A-ASSOCIATE-RQ. Plain TCP is inspected with ``MSG_PEEK``, so pynetdicom
   still reads every byte itself. A peer that closes, stays silent, or sends anything else
   is refused (a non-association PDU gets an A-ABORT) and never holds a slot.

After the gate, :meth:`ConnectionGate.watch` frees the slot as soon as the transport closes
before pynetdicom has read an A-ASSOCIATE-RQ (pynetdicom itself would wait for the ACSE
timeout). Every refusal is counted and logged as ``connection.refused`` with the peer, the
reason and the slots in use; pynetdicom's own "local limit exceeded" rejection is logged as
``association.rejected``.
"""
from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

import structlog
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from sci_node.config import Limits

log = structlog.get_logger("sci_node.gate")

#: PDU type of an A-ASSOCIATE-RQ (PS3.8 9.3.2)
ASSOCIATE_RQ_TYPE = 0x01
#: Fixed part of an A-ASSOCIATE-RQ after the 6-byte PDU header: version, reserved, called and
#: calling AE titles, 32 reserved bytes (PS3.8 table 9-11)
MIN_ASSOCIATE_RQ_LENGTH = 68
#: Largest A-ASSOCIATE-RQ the gate decodes itself (bigger ones are left to pynetdicom)
MAX_PEEK_BYTES = 65_536
#: Seconds between two looks of the watcher at an association still waiting for its request
WATCH_INTERVAL_S = 0.02
_RDHUP = getattr(select, "POLLRDHUP", 0)


class Refusal(StrEnum):
    """Why a TCP connection was closed without becoming an association."""

    CLOSED = "closed-before-request"
    TIMEOUT = "request-timeout"
    NOT_ASSOCIATE_RQ = "not-an-association-request"
    INVALID_RQ = "invalid-association-request"
    TLS_FAILED = "tls-handshake-failed"
    TOO_MANY_PENDING = "too-many-pending-connections"


@dataclass
class ConnectionGate:
    """Admission state of the connections that are not associations yet (shared by all threads).

    Parameters
    ----------
    limits
        ``association_request_timeout_seconds``, ``max_pending_connections`` and
        ``max_associations`` are used.
    """

    limits: Limits
    pending: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def timeout_s(self) -> float:
        """Seconds a new connection has to deliver its A-ASSOCIATE-RQ (TLS handshake included)."""
        return self.limits.association_request_timeout_seconds

    def admit(self) -> bool:
        """Count one more connection waiting for its request; False when the cap is reached."""
        with self.lock:
            if self.pending >= self.limits.max_pending_connections:
                return False
            self.pending += 1
            return True

    def done(self) -> None:
        """One connection left the waiting state (refused, or handed to pynetdicom)."""
        with self.lock:
            self.pending = max(0, self.pending - 1)

    def refuse(self, server: Any, peer: Any, reason: Refusal, detail: str) -> None:
        """Count and log a connection-level refusal (the caller closes the socket)."""
        with self.lock:
            self.refused[reason.value] += 1
            total, pending, for_reason = sum(self.refused.values()), self.pending, self.refused[reason.value]
        host, port = (peer[0], peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else (str(peer), None)
        emit = log.info if reason in (Refusal.CLOSED, Refusal.TIMEOUT) else log.warning
        emit("connection.refused", peer=host, peer_port=port, reason=reason.value, detail=detail,
             slots_in_use=slots_in_use(server), max_associations=self.limits.max_associations,
             pending_connections=pending, refused_total=total, refused_for_reason=for_reason)

    def watch(self, server: Any, peer: Any, assoc: Any, deadline: float) -> None:
        """Free ``assoc``'s slot as soon as its transport is gone before an A-ASSOCIATE-RQ was read.

        pynetdicom's association thread waits for the request on a queue the DUL fills; when
        the DUL thread has ended without delivering anything, nothing can arrive any more, so
        an empty wake-up (``None``, pynetdicom's "timed out") ends the thread now.
        """
        dead_looks = 0
        while assoc.is_alive() and assoc.requestor.primitive is None:
            dul = assoc.dul
            gone = dul.ident is not None and not dul.is_alive() and dul.to_user_queue.empty()
            dead_looks = dead_looks + 1 if gone else 0
            if dead_looks >= 2:  # seen twice, WATCH_INTERVAL_S apart: not a race with a request in flight
                dul.to_user_queue.put(None)
                break
            time.sleep(WATCH_INTERVAL_S)
        if assoc.requestor.primitive is None:
            late = time.monotonic() >= deadline
            self.refuse(server, peer, Refusal.TIMEOUT if late else Refusal.CLOSED,
                        f"no A-ASSOCIATE-RQ within {self.timeout_s:g} s" if late
                        else "connection closed before an A-ASSOCIATE-RQ was read")


def slots_in_use(server: Any) -> int:
    """Association threads of ``server`` alive now (what pynetdicom counts against the limit)."""
    try:
        return len(server.active_associations)
    except Exception:  # a logging helper must not fail the caller
        return -1


# -- screening the first PDU ---------------------------------------------------------------

def judge_first_pdu(data: bytes) -> tuple[Refusal, str] | bool:
    """Judge the bytes a new connection sent so far.

    Returns
    -------
    True
        A complete, decodable A-ASSOCIATE-RQ (or one too large to check here).
    False
        Too few bytes to decide yet.
    (Refusal, detail)
        Not an association request.
    """
    if len(data) < 6:
        return False
    pdu_type, _, length = struct.unpack(">BBL", data[:6])
    if pdu_type != ASSOCIATE_RQ_TYPE:
        return Refusal.NOT_ASSOCIATE_RQ, f"first PDU type 0x{pdu_type:02X} (first bytes {data[:8].hex()})"
    if length < MIN_ASSOCIATE_RQ_LENGTH:
        return Refusal.INVALID_RQ, f"A-ASSOCIATE-RQ length {length} < {MIN_ASSOCIATE_RQ_LENGTH}"
    if length + 6 > MAX_PEEK_BYTES:
        return True
    if len(data) < length + 6:
        return False
    version, aets = struct.unpack(">H", data[6:8])[0], data[10:42]
    if not version & 1 or not all(0x20 <= b < 0x7F for b in aets):  # checked here: pynetdicom logs a traceback
        return Refusal.INVALID_RQ, f"A-ASSOCIATE-RQ with protocol version 0x{version:04X} / AE titles {aets.hex()}"
    try:
        A_ASSOCIATE_RQ().decode(bytes(data[: length + 6]))
    except Exception as exc:
        return Refusal.INVALID_RQ, f"undecodable A-ASSOCIATE-RQ: {type(exc).__name__}: {exc}"[:200]
    return True


def _peek(sock: socket.socket) -> bytes | None:
    """The bytes waiting on ``sock`` (left there for pynetdicom); b"" at EOF, None when none yet."""
    try:
        return sock.recv(MAX_PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None


def screen_plain(sock: socket.socket, deadline: float, timeout_s: float) -> tuple[Refusal, str] | None:
    """Wait (until ``deadline``, monotonic) for a complete A-ASSOCIATE-RQ on a plain TCP socket.

    Returns None when one is waiting in the socket buffer, else why the connection is refused.
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN | _RDHUP)
    got = 0
    while True:
        try:
            data = _peek(sock)
        except OSError as exc:
            return Refusal.CLOSED, f"connection error: {exc}"
        if data == b"":
            return Refusal.CLOSED, "closed without sending anything" if not got else \
                f"closed after {got} bytes of an incomplete PDU"
        if data:
            got = len(data)
            verdict = judge_first_pdu(data)
            if verdict is True:
                return None
            if verdict is not False:
                return verdict
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Refusal.TIMEOUT, f"no complete A-ASSOCIATE-RQ within {timeout_s:g} s ({got} bytes received)"
        if got:  # data waits but is incomplete: POLLIN would fire at once, so only look for the hang-up
            poller.modify(sock, _RDHUP)
            events = poller.poll(min(remaining, 0.05) * 1000)
            if _RDHUP and any(ev & (_RDHUP | select.POLLHUP | select.POLLERR) for _, ev in events):
                final = _peek(sock) or b""
                if judge_first_pdu(final) is True:
                    return None
                return Refusal.CLOSED, f"closed after {len(final)} bytes of an incomplete PDU"
        else:
            poller.poll(remaining * 1000)


def screen_tls(sock: ssl.SSLSocket, deadline: float, timeout_s: float) -> tuple[Refusal, str] | None:
    """TLS handshake, then wait for the first bytes, both by ``deadline`` (the PDU is not inspected:
    TLS sockets cannot peek; :meth:`ConnectionGate.watch` covers what follows)."""
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.do_handshake()
        if not sock.pending():
            readable, _, _ = select.select([sock], [], [], max(deadline - time.monotonic(), 0))
            if not readable:
                return Refusal.TIMEOUT, f"no A-ASSOCIATE-RQ within {timeout_s:g} s of the TLS handshake"
    except (TimeoutError, socket.timeout):
        return Refusal.TIMEOUT, f"TLS handshake not finished within {timeout_s:g} s"
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):  # a bare connect-and-close: the usual health check
        return Refusal.CLOSED, "closed during the TLS handshake"
    except ssl.SSLError as exc:
        return Refusal.TLS_FAILED, f"{exc.reason or exc}"[:200]
    except OSError as exc:
        return Refusal.CLOSED, f"closed during the TLS handshake: {exc}"[:200]
    finally:
        try:
            sock.settimeout(None)  # pynetdicom expects the blocking socket accept() gave
        except OSError:
            pass
    return None


def abort_pdu(pdu_type: int | None) -> bytes:
    """An A-ABORT PDU from the service provider (PS3.8 9.3.8): invalid PDU parameter value for a bad
    A-ASSOCIATE-RQ, unexpected PDU for another known PDU type, unrecognised PDU otherwise."""
    reason = 0x06 if pdu_type == ASSOCIATE_RQ_TYPE else 0x02 if pdu_type in range(0x02, 0x08) else 0x01
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


# -- pynetdicom integration ------------------------------------------------------------------

class GatedRequestHandler(RequestHandler):
    """pynetdicom's per-connection handler, with the gate in front of the association thread."""

    server: "GatedAssociationServer"

    def handle(self) -> None:
        """Screen the connection; start a pynetdicom association only for an A-ASSOCIATE-RQ."""
        gate, sock = self.server.gate, self.request
        deadline = time.monotonic() + gate.timeout_s
        try:
            if isinstance(sock, ssl.SSLSocket):
                refusal = screen_tls(sock, deadline, gate.timeout_s)
            else:
                refusal = screen_plain(sock, deadline, gate.timeout_s)
        except Exception as exc:  # never let a probe take the server's thread down
            refusal = Refusal.CLOSED, f"screening failed: {type(exc).__name__}: {exc}"[:200]
        finally:
            gate.done()
        if refusal is not None:
            reason, detail = refusal
            if reason in (Refusal.NOT_ASSOCIATE_RQ, Refusal.INVALID_RQ) and not isinstance(sock, ssl.SSLSocket):
                first = _peek_quietly(sock)
                _send_quietly(sock, abort_pdu(first[0] if first else None))
            gate.refuse(self.server, self.client_address, reason, detail)
            self.server.shutdown_request(sock)
            return
        assoc = self._create_association()
        # Until its A-ASSOCIATE-RQ is read, the association waits (and ARTIM runs) only until the
        # gate's deadline; restore_acse_timeout (EVT_REQUESTED) puts the ACSE timeout back.
        assoc.acse_timeout = max(deadline - time.monotonic(), 0.5)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        gate.watch(self.server, self.client_address, assoc, deadline)


def _peek_quietly(sock: socket.socket) -> bytes:
    try:
        return _peek(sock) or b""
    except OSError:
        return b""


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(1.0)
        sock.sendall(data)
    except OSError:
        pass  # the peer may be gone already: the A-ABORT is a courtesy


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with :class:`ConnectionGate` admission.

    The TLS handshake moves from the accept loop (where one silent peer stalled every other
    connection) into the per-connection thread, bounded by the gate's deadline.
    """

    daemon_threads = True
    #: listen() backlog (socketserver's default is 5: a burst of probes made real peers wait for SYN retries)
    request_queue_size = 128

    def __init__(self, ae: Any, address: tuple[str, int], ae_title: str, contexts: list[Any],
                 ssl_context: ssl.SSLContext | None = None, evt_handlers: list[Any] | None = None, *,
                 gate: ConnectionGate) -> None:
        self.gate = gate
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers,
                         request_handler=GatedRequestHandler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; TLS is wrapped without its handshake (done by the gate)."""
        client, address = cast(socket.socket, self.socket).accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An exception in a connection thread: one log line (socketserver would print a traceback)."""
        log.exception("connection.error", peer=str(client_address))

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection to the gate unless too many are waiting for their request already."""
        if self.gate.admit():
            return True
        self.gate.refuse(self, client_address, Refusal.TOO_MANY_PENDING,
                         f"{self.gate.limits.max_pending_connections} connections already wait for their "
                         "A-ASSOCIATE-RQ")
        return False


def restore_acse_timeout(event: Event) -> None:
    """EVT_REQUESTED: the request arrived; later ACSE waits use the AE's full ACSE timeout."""
    try:
        event.assoc.acse_timeout = event.assoc.ae.acse_timeout
    except Exception:  # a notification handler must never raise
        log.exception("gate.restore_timeout_failed")


def log_pynetdicom_rejection(event: Event) -> None:
    """EVT_REJECTED (pynetdicom's own rejections, e.g. the association limit): one log line."""
    try:
        server = getattr(event.assoc, "_server", None)  # set by pynetdicom's request handler
        used = slots_in_use(server) if server is not None else -1
        limit = event.assoc.ae.maximum_associations
        primitive = event.assoc.requestor.primitive  # who was refused, named on the line itself
        calling = str(primitive.calling_ae_title if primitive is not None else "").strip()
        log.warning("association.rejected", reason="local limit exceeded" if used > limit else
                    "rejected by the DICOM upper layer", result="TRANSIENT", slots_in_use=used,
                    max_associations=limit, calling_aet=calling, peer=str(event.assoc.requestor.address))
    except Exception:
        log.exception("gate.reject_log_failed")


def gate_handlers() -> list[tuple[Any, ...]]:
    """The gate's event handlers (registered with the SCP's)."""
    return [(evt.EVT_REQUESTED, restore_acse_timeout), (evt.EVT_REJECTED, log_pynetdicom_rejection)]
