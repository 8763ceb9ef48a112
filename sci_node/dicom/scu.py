"""A small DICOM SCU: C-ECHO and C-STORE of files, for admins (``sci-node echo|send``) and export.

Associations disable Nagle (TCP_NODELAY) and use DICOM TLS when ``tls.enabled``.
Failures raise :class:`~sci_node.errors.DicomNetworkError` (or the
:class:`AssociationRejectedError` subclass, which says whether retrying can help).
"""
from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import pydicom
import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from sci_node.config import Destination, TLSConfig
from sci_node.dicom.dimse import STORED_STATUSES, VERIFICATION_SOP_CLASS, Status
from sci_node.errors import ConfigError, DataError, DicomNetworkError

log = structlog.get_logger("sci_node.scu")


class AssociationRejectedError(DicomNetworkError):
    """The peer answered A-ASSOCIATE-RJ; ``permanent`` tells whether a retry may succeed."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def _nodelay(event: Event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        from sci_node.dicom.scp import set_nodelay

        set_nodelay(sock)


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The SCU's TLS context (server verified against ``ca_file``; our cert sent if configured)."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.check_hostname = False  # DICOM peers are addressed by IP; the CA pins trust
    try:
        if tls.cert_file and tls.key_file:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load {tls.cert_file} / {tls.key_file}: {exc}") from exc
    return ctx


def open_association(dest: Destination, calling_ae: str, tls: TLSConfig,
                     contexts: Iterable[tuple[str, Sequence[str]]], timeout: float = 30.0,
                     ext_neg: Sequence[Any] = (), handlers: Sequence[tuple[Any, Any]] = ()) -> Association:
    """Associate with ``dest`` proposing ``contexts`` (abstract syntax, transfer syntaxes).

    ``ext_neg`` (e.g. SCP/SCU role selection for C-GET) and ``handlers`` (extra pynetdicom event
    handlers, e.g. ``EVT_C_STORE`` for C-GET's sub-operations) are passed to the association.

    Raises
    ------
    AssociationRejectedError
        The peer rejected the association (``permanent`` from the A-ASSOCIATE-RJ result).
    DicomNetworkError
        Connection refused, timeout, abort.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    ctx = client_ssl_context(tls)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         tls_args=(ctx, dest.host) if ctx else None,
                         ext_neg=list(ext_neg) or None,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), *handlers])
    if assoc.is_established:
        return assoc
    rsp = assoc.acceptor.primitive
    if assoc.is_rejected and rsp is not None and getattr(rsp, "result", None) in (0x01, 0x02):
        raise AssociationRejectedError(
            f"{dest} rejected the association ({rsp.result_str}, {rsp.source_str}: {rsp.reason_str})",
            permanent=rsp.result == 0x01)
    if rsp is not None and getattr(rsp, "result", None) == 0x00:
        proposed = sorted({str(getattr(cx.abstract_syntax, "name", cx.abstract_syntax))
                           for cx in assoc.requestor.requested_contexts})
        raise AssociationRejectedError(
            f"{dest} accepted none of the proposed presentation contexts (no presentation context for "
            f"{', '.join(proposed)}: SOP class or transfer syntax not supported)", permanent=True)
    raise DicomNetworkError(f"cannot associate with {dest}: connection refused, aborted or timed out")


def echo(dest: Destination, calling_ae: str = "SCINODE", tls: TLSConfig | None = None) -> int:
    """C-ECHO ``dest``; return 0 on Success.

    Raises
    ------
    DicomNetworkError
        When the association fails or the status is not Success (message names the peer).
    """
    t0 = time.perf_counter()
    assoc = open_association(dest, calling_ae, tls or TLSConfig(),
                             [(VERIFICATION_SOP_CLASS, [ImplicitVRLittleEndian])])
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if "Status" in status else None
    if code != Status.SUCCESS:
        raise DicomNetworkError(f"C-ECHO {dest}: no success (status {code if code is None else hex(code)})")
    log.info("echo.ok", destination=str(dest), seconds=round(time.perf_counter() - t0, 4))
    return 0


def _dicom_files(path: Path) -> list[tuple[Path, str, str]]:
    """(file, SOP class UID, transfer syntax UID) for every DICOM file at/under ``path``."""
    candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    found = []
    for f in candidates:
        try:
            meta = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
            found.append((f, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except Exception:
            continue  # not a DICOM file (README, DICOMDIR fragments ...)
    return found


def store_contexts(files: Sequence[tuple[Path, str, str]]) -> list[tuple[str, list[str]]]:
    """One presentation context per (SOP class, transfer syntax) of ``files``.

    Raises
    ------
    DicomNetworkError
        When more than 128 contexts would be needed (DICOM's limit per association).
    """
    pairs = sorted({(sop, ts) for _, sop, ts in files})
    if len(pairs) > 128:
        raise DicomNetworkError(f"{len(pairs)} SOP class/transfer syntax pairs exceed 128 contexts")
    return [(sop, [ts]) for sop, ts in pairs]


def send_path(path: Path, dest: Destination, calling_ae: str = "SCINODE", tls: TLSConfig | None = None) -> int:
    """C-STORE every DICOM file at/under ``path`` in its own transfer syntax; return 0 if all were stored.

    Raises
    ------
    DataError
        No DICOM file found.
    DicomNetworkError
        The association failed.
    """
    files = _dicom_files(Path(path))
    if not files:
        raise DataError(f"no DICOM files at {str(path)!r}")
    t0 = time.perf_counter()
    assoc = open_association(dest, calling_ae, tls or TLSConfig(), store_contexts(files))
    failed = 0
    try:
        for i, (f, _sop, _ts) in enumerate(files):
            try:
                status = assoc.send_c_store(f)
            except ValueError as exc:  # the peer accepted no context for this SOP class/syntax
                failed += 1
                log.warning("send.failed", file=str(f), reason=str(exc))
                continue
            code = int(status.Status) if "Status" in status else None
            if code is None or code not in STORED_STATUSES:
                failed += 1
                log.warning("send.failed", file=str(f), status=code if code is None else f"0x{code:04X}")
            if not assoc.is_established:
                failed += len(files) - i - 1
                break
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("send.done", destination=str(dest), files=len(files), failed=failed,
             seconds=round(time.perf_counter() - t0, 3))
    return 0 if failed == 0 else 1


def export_contexts(sop_ts: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Contexts for export: each SOP class with its file's syntax, plus explicit/implicit LE."""
    out: dict[str, list[str]] = {}
    for sop, ts in sop_ts:
        syntaxes = out.setdefault(sop, [])
        for t in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if t not in syntaxes:
                syntaxes.append(t)
    return list(out.items())
