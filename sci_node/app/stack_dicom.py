"""Who may talk DICOM to the stack's Orthanc, on which address, and over TLS (``[stack]``).

Orthanc's DICOM port is closed by default: it accepts associations only from the modalities in
its ``DicomModalities`` (the node, and the ``[stack] scanners``), each checked by calling AE title
and source address (``DicomAlwaysAllowStore`` false, ``DicomCheckModalityHost`` true), and only
when they call it by its own AE title (``DicomCheckCalledAet`` true). These are the template's
fixed values; this module supplies what varies:

* :func:`dicom_modalities` — the ``DicomModalities`` object: the node and each scanner;
* :func:`tls_values` — Orthanc's ``DicomTls*`` options from ``[stack.tls]``, with a trust bundle of
  ``ca_file`` plus Orthanc's own certificate (the node presents that certificate too, so the node
  and Orthanc trust each other without a second key pair);
* :func:`orthanc_env` — Orthanc 1.10 cannot bind its DICOM port to one address, so unless
  ``dicom_bind`` is ``0.0.0.0`` the stack preloads a small shim (``orthanc/bind_address.c``,
  compiled with the system C compiler into ``D/orthanc/``) that turns the wildcard bind of that
  port into a bind to ``dicom_bind``; :func:`check_dicom_listener` then reads ``/proc/net/tcp``
  and stops the stack if the port listens anywhere else.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from sci_node.config import REPO_ROOT, NodeConfig
from sci_node.errors import StackError

BIND_SHIM_SOURCE = REPO_ROOT / "orthanc" / "bind_address.c"
#: Orthanc needs a port for every modality; it never connects to a scanner, so this is never used
SCANNER_PLACEHOLDER_PORT = 104
_PROC_NET = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
_TCP_LISTEN = "0A"


def _modality(aet: str, host: str, port: int, tls: bool = False, query: bool = False) -> dict[str, Any]:
    return {"AET": aet, "Host": host, "Port": port, "AllowEcho": True, "AllowStore": True, "AllowFind": query,
            "AllowMove": False, "AllowGet": query, "AllowStorageCommitment": False, "UseDicomTls": tls}


def dicom_modalities(cfg: NodeConfig, node_modality: str, node_port: int) -> dict[str, dict[str, Any]]:
    """Orthanc's ``DicomModalities``: the node (on loopback) and every ``[stack] scanners`` entry.

    Each may C-ECHO and C-STORE; the node may also C-FIND and C-GET (the prior of a follow-up,
    ``[followup] pacs``), nothing else. Scanner entries are named ``scanner-<n>-<AET>``.
    """
    mods = {node_modality: _modality(cfg.ae_title, "127.0.0.1", node_port, tls=cfg.stack.tls.enabled, query=True)}
    for i, scanner in enumerate(cfg.stack.scanners, start=1):
        mods[f"scanner-{i}-{scanner.ae_title}"] = _modality(scanner.ae_title, scanner.host, SCANNER_PLACEHOLDER_PORT)
    return mods


def _private_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def trust_bundle_path(state_dir: Path) -> Path:
    """Where the DICOM TLS trust bundle (``ca_file`` + Orthanc's certificate) is written."""
    return state_dir / "dicom-tls-trusted.pem"


def tls_values(cfg: NodeConfig, state_dir: Path) -> dict[str, Any]:
    """The ``DICOM_TLS_*`` placeholder values of the Orthanc template (``[stack.tls]``)."""
    tls = cfg.stack.tls
    if not tls.enabled:
        return {"DICOM_TLS_ENABLED": False, "DICOM_TLS_CERT": "", "DICOM_TLS_KEY": "", "DICOM_TLS_TRUSTED": "",
                "DICOM_TLS_REMOTE_REQUIRED": False}
    return {"DICOM_TLS_ENABLED": True, "DICOM_TLS_CERT": str(tls.cert_file), "DICOM_TLS_KEY": str(tls.key_file),
            "DICOM_TLS_TRUSTED": str(trust_bundle_path(state_dir)),
            "DICOM_TLS_REMOTE_REQUIRED": tls.require_client_cert}


def write_trust_bundle(cfg: NodeConfig, state_dir: Path) -> Path | None:
    """Write ``ca_file`` + Orthanc's certificate as the trust bundle (mode 0600); None without TLS.

    Raises
    ------
    StackError
        When the certificate, key or CA file cannot be read.
    """
    tls = cfg.stack.tls
    if not tls.enabled:
        return None
    try:
        parts = [Path(p).read_bytes() for p in (tls.ca_file, tls.cert_file) if p is not None]
        Path(str(tls.key_file)).read_bytes()
    except OSError as exc:
        raise StackError(f"stack.tls: cannot read {exc.filename}: {exc.strerror}") from None
    bundle = trust_bundle_path(state_dir)
    _private_file(bundle, b"".join(p.rstrip(b"\n") + b"\n" for p in parts))
    return bundle


def node_tls_args(cfg: NodeConfig, state_dir: Path) -> list[str]:
    """``sci-node serve`` flags for the node in a TLS stack: Orthanc's key pair, the trust bundle."""
    tls = cfg.stack.tls
    if not tls.enabled:
        return []
    args = ["--tls-cert", str(tls.cert_file), "--tls-key", str(tls.key_file),
            "--tls-ca", str(trust_bundle_path(state_dir))]
    return args + (["--tls-require-client-cert"] if tls.require_client_cert else [])


def build_bind_shim(state_dir: Path) -> Path:
    """Compile ``orthanc/bind_address.c`` into ``state_dir`` (again only when the source is newer).

    Raises
    ------
    StackError
        No C compiler, or the compilation failed.
    """
    out = state_dir / "bind_address.so"
    if out.is_file() and out.stat().st_mtime >= BIND_SHIM_SOURCE.stat().st_mtime:
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise StackError("Orthanc 1.10 cannot bind its DICOM port to one address, and no C compiler is installed to "
                         "build the shim that does (bash scripts/install.sh installs gcc); or set [stack] "
                         'dicom_bind = "0.0.0.0" to listen on every interface')
    tmp = out.with_name(out.name + ".tmp")
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(BIND_SHIM_SOURCE), "-ldl"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise StackError(f"cannot compile {BIND_SHIM_SOURCE}: {proc.stderr.strip()[-500:]}")
    os.chmod(tmp, 0o700)
    os.replace(tmp, out)
    return out


def orthanc_env(cfg: NodeConfig, dicom_port: int, state_dir: Path, base: dict[str, str]) -> dict[str, str]:
    """Orthanc's environment: ``base`` plus, unless ``dicom_bind`` is ``0.0.0.0``, the bind shim."""
    if ipaddress.IPv4Address(cfg.stack.dicom_bind).is_unspecified:
        return dict(base)
    shim = build_bind_shim(state_dir)
    preload = " ".join(filter(None, [str(shim), base.get("LD_PRELOAD")]))
    return dict(base, LD_PRELOAD=preload, SCI_NODE_BIND_PORT=str(dicom_port),
                SCI_NODE_BIND_ADDR=cfg.stack.dicom_bind)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN state on ``port`` (from ``/proc/net/tcp{,6}``)."""
    found: set[str] = set()
    for table in _PROC_NET:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != _TCP_LISTEN:
                continue
            addr_hex, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port:
                raw = bytes.fromhex(addr_hex)
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


def check_dicom_listener(cfg: NodeConfig, dicom_port: int) -> None:
    """Raise :class:`StackError` unless Orthanc's DICOM port listens on ``dicom_bind`` only."""
    found = listening_addresses(dicom_port)
    if found != {cfg.stack.dicom_bind}:
        raise StackError(f"Orthanc's DICOM port {dicom_port} listens on {sorted(found) or 'nothing'}, not only on "
                         f"{cfg.stack.dicom_bind} ([stack] dicom_bind): stopping rather than leaving it open")
