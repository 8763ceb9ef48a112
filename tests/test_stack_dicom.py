"""The stack's Orthanc DICOM port is closed by default (real Orthanc, real node, dcmtk as the senders).

Only the node and the configured scanners may associate, each by calling AE title *and* source
address, and only when they call Orthanc by its AE title; the port listens on loopback unless
``[stack] dicom_bind`` says otherwise; ``[stack.tls]`` puts DICOM TLS on it (and on the node's
link to it). One step (``[stack] scanners`` or ``--scanner``) adds a scanner.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from sci_node.app.stack_dicom import listening_addresses

from conftest import make_mr_series, wait_for
from stack_support import StackProc, free_ports, local_ipv4, orthanc_log

pytestmark = pytest.mark.slow
PLUMBING = 'processor = "derived-sc"\n'


def _orthanc_series(stack: StackProc) -> set[str]:
    return {stack.client().get_series_id(s)["MainDicomTags"]["SeriesInstanceUID"]
            for s in stack.client().get_series()}


def _series_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def test_orthanc_dicom_port_is_closed_by_default(tmp_path: Path) -> None:
    stack = StackProc(tmp_path / "d", toml=PLUMBING).start()  # scanners: SCANNER@127.0.0.1 only
    try:
        assert listening_addresses(stack.dicom) == {"127.0.0.1"}  # not 0.0.0.0
        outside = local_ipv4()
        sent: dict[str, list[Path]] = {name: make_mr_series(tmp_path / name, n=3)
                                       for name in ("remote", "evil", "called", "scanner")}
        remote = stack.try_storescu(sent["remote"], host=outside)  # another interface of this host
        assert remote.returncode != 0 and "Connection refused" in remote.stdout + remote.stderr, remote.stderr
        evil = stack.try_storescu(sent["evil"], calling="EVIL")  # an unknown calling AE
        assert evil.returncode != 0 and "Calling AE Title Not Recognized" in evil.stderr, evil.stderr
        called = stack.try_storescu(sent["called"], called="ANY-SCP")  # a known AE calling another AE title
        assert called.returncode != 0 and "Called AE Title Not Recognized" in called.stderr, called.stderr
        stack.storescu(sent["scanner"])  # the configured scanner, from its address
        assert _orthanc_series(stack) == {_series_uid(sent["scanner"])}
        log = orthanc_log(stack)
        assert "Rejected association for remote AET EVIL on IP 127.0.0.1" in log  # Orthanc names who it refused
        # the scanner's series goes on to the node as before (the node is a configured modality too)
        wait_for(lambda: [j["state"] for j in stack.sci_node_jobs()["jobs"]] == ["done"], 60, interval=1,
                 what="the node's job for the scanner's series")
        assert "DICOM ORTHANC port" in stack.output() and "scanners: SCANNER@127.0.0.1" in stack.output()
    finally:
        assert stack.stop() == 0


def test_one_config_line_adds_a_scanner_checked_by_ae_and_host(tmp_path: Path) -> None:
    outside = local_ipv4()
    toml = PLUMBING + f'[stack]\ndicom_bind = "0.0.0.0"\nscanners = ["MODALITY1@{outside}"]\n'
    stack = StackProc(tmp_path / "d", toml=toml, scanners=()).start()
    try:
        assert listening_addresses(stack.dicom) == {"0.0.0.0"}  # told otherwise: every interface
        ok, wrong_host, wrong_ae = (make_mr_series(tmp_path / n, n=2) for n in ("ok", "host", "ae"))
        res = stack.try_storescu(ok, calling="MODALITY1", host=outside)  # from its address: accepted
        assert res.returncode == 0, res.stderr
        res = stack.try_storescu(wrong_host, calling="MODALITY1")  # same AE title from 127.0.0.1: refused
        assert res.returncode != 0 and "Calling AE Title Not Recognized" in res.stderr, res.stderr
        res = stack.try_storescu(wrong_ae, calling="SCANNER", host=outside)  # right host, unknown AE: refused
        assert res.returncode != 0 and "Calling AE Title Not Recognized" in res.stderr, res.stderr
        assert _orthanc_series(stack) == {_series_uid(ok)}
    finally:
        assert stack.stop() == 0


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-nodes", "-days", "2", "-newkey", "rsa:2048", "-keyout", str(key),
                    "-out", str(crt), "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return key, crt


def test_dicom_tls_on_orthancs_port_and_the_node_link(tmp_path: Path) -> None:
    orthanc_key, orthanc_crt = _certificate(tmp_path, "orthanc")
    scanner_key, scanner_crt = _certificate(tmp_path, "scanner")
    toml = PLUMBING + (f'[stack.tls]\nenabled = true\ncert_file = "{orthanc_crt}"\nkey_file = "{orthanc_key}"\n'
                       f'ca_file = "{scanner_crt}"\nrequire_client_cert = true\n')
    stack = StackProc(tmp_path / "d", toml=toml).start()
    try:
        plain, anonymous, secure = (make_mr_series(tmp_path / n, n=3) for n in ("plain", "anon", "tls"))
        res = stack.try_storescu(plain)  # no TLS: the handshake fails, nothing is stored
        assert res.returncode != 0, res.stdout
        res = stack.try_storescu(anonymous, tls=["+tla", "+cf", str(orthanc_crt)])  # TLS without a client certificate
        assert res.returncode != 0, res.stdout
        res = stack.try_storescu(secure, tls=["+tls", str(scanner_key), str(scanner_crt), "+cf", str(orthanc_crt)])
        assert res.returncode == 0, res.stderr
        assert _orthanc_series(stack) == {_series_uid(secure)}
        # Orthanc forwards to the node over TLS and the node's result comes back over TLS
        wait_for(lambda: len(_orthanc_series(stack)) == 2, 90, interval=1, what="the node's result in Orthanc")
        (fwd,) = stack.sci_node_jobs()["forwards"]
        assert fwd["job_state"] == "Success"
        node_log = (stack.data_dir / "logs" / "node.log").read_text()
        assert '"tls": true' in node_log
        assert "DICOM TLS" in stack.output()
    finally:
        assert stack.stop() == 0


def test_demo_still_sends_its_sample_through_the_closed_port(tmp_path: Path) -> None:
    http, dicom, node = free_ports(3)
    res = subprocess.run([sys.executable, "-m", "sci_node.cli", "demo", "--exit-after",
                          "--data-dir", str(tmp_path / "d"),
                          "--http-port", str(http), "--dicom-port", str(dicom), "--node-port", str(node),
                          "--stable-seconds", "1", "--log-format", "json"],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "SCI_ORTHANC_USER": "u", "SCI_ORTHANC_PASSWORD": "p"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "scanners: SCIDEMO@127.0.0.1" in res.stdout and "sample instances as SCIDEMO" in res.stdout
    assert "DICOM-SEG in Orthanc" in res.stdout
