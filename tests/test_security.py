"""Security (conformance statement §3.3 and §6): DICOM TLS on both sides, the AET@HOST
allow-list, no PHI in the log at INFO, private file modes, and retention after delivery.

Certificates are a throwaway CA made with ``openssl`` in each test; the peers are dcmtk
``echoscu``/``storescu``/``storescp`` with their TLS options.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Callable

import pydicom
import pytest

from conftest import DCMTK_ENV, NodeProc, StoreSCP, echoscu, free_port, make_mr_series, port_open, storescu, wait_for

PLUMBING = 'processor = "derived-sc"\n'


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, and CA-signed certificates for the node, a client and a destination, plus a
    self-signed 'rogue' client certificate the CA never signed. RSA 2048, PEM, 1 day."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=sci-node test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    (d / "leaf.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                                "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("node", "client", "dest"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", "-extfile", "leaf.ext", cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.crt",
             "-days", "1", "-subj", "/CN=rogue", cwd=d)
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


def _tls_toml(pki: dict[str, Path], require_client_cert: bool) -> str:
    return (PLUMBING + "[tls]\nenabled = true\n"
            f'cert_file = "{pki["node_crt"]}"\nkey_file = "{pki["node_key"]}"\nca_file = "{pki["ca_crt"]}"\n'
            f"require_client_cert = {'true' if require_client_cert else 'false'}\n")


def _echo_tls(port: int, tls_flags: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["echoscu", "-v", "-aet", "SCANNER", "-aec", "SCINODE", *tls_flags, "127.0.0.1",
                           str(port)], capture_output=True, text=True, timeout=30, env=DCMTK_ENV)


def test_tls_scp_with_client_certs_and_tls_export(node_factory: Callable[..., NodeProc], tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    # the destination: dcmtk storescp over TLS, requiring (and verifying) the node's client certificate
    dest_port = free_port()
    dest_out = tmp_path / "dest-out"
    dest_out.mkdir()
    with open(tmp_path / "dest.log", "ab") as fh:
        dest = subprocess.Popen(["storescp", "-v", "-aet", "DEST", "-od", str(dest_out), "+uf", "+xa",
                                 "+tls", str(pki["dest_key"]), str(pki["dest_crt"]), "+cf", str(pki["ca_crt"]),
                                 "-rc", str(dest_port)], stdout=fh, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    try:
        wait_for(lambda: port_open(dest_port), 10, what="TLS storescp")
        node = node_factory(_tls_toml(pki, require_client_cert=True), "--allow-ae", "SCANNER",
                            "--stable-seconds", "1", "--destination", f"DEST@127.0.0.1:{dest_port}").start()
        ca = ["+cf", str(pki["ca_crt"])]
        ok = _echo_tls(node.port, ["+tls", str(pki["client_key"]), str(pki["client_crt"]), *ca])
        assert ok.returncode == 0, ok.stdout + ok.stderr
        plain = echoscu(node.port)  # no TLS at all: the TLS handshake never happens
        assert plain.returncode != 0
        anonymous = _echo_tls(node.port, ["+tla", *ca])  # TLS but no client certificate
        assert anonymous.returncode != 0, anonymous.stdout
        rogue = _echo_tls(node.port, ["+tls", str(pki["rogue_key"]), str(pki["rogue_crt"]), *ca])
        assert rogue.returncode != 0, rogue.stdout
        # the node's certificate is verified by the client too: a client trusting another CA refuses it
        wrong_ca = _echo_tls(node.port, ["+tls", str(pki["client_key"]), str(pki["client_crt"]),
                                         "+cf", str(pki["rogue_crt"])])
        assert wrong_ca.returncode != 0
        series = make_mr_series(tmp_path / "series", n=4)
        res = storescu(node.port, series, extra=["+tls", str(pki["client_key"]), str(pki["client_crt"]), *ca])
        assert res.returncode == 0 and res.stdout.count("Received Store Response (Success)") + \
            res.stderr.count("Received Store Response (Success)") == 4, res.stdout + res.stderr
        # export over TLS: the result reaches the TLS destination exactly once
        wait_for(lambda: len(list(dest_out.iterdir())) >= 1, 60, what="the result at the TLS destination")
        time.sleep(1.5)
        (result,) = list(dest_out.iterdir())
        assert pydicom.dcmread(result).StudyInstanceUID == pydicom.dcmread(series[0]).StudyInstanceUID
        jobs = node.jobs()
        assert [(j["state"], j["delivery"]) for j in jobs] == [("done", "delivered")]
        # failed handshakes did not hurt the node
        assert _echo_tls(node.port, ["+tls", str(pki["client_key"]), str(pki["client_crt"]), *ca]).returncode == 0
    finally:
        dest.kill()
        dest.wait(10)


def test_tls_without_client_cert_requirement_accepts_anonymous_clients(node_factory: Callable[..., NodeProc],
                                                                       tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    node = node_factory(_tls_toml(pki, require_client_cert=False), "--allow-ae", "SCANNER").start()
    # a peer that connects and never starts the TLS handshake (a TCP health check) stalls nobody: the
    # handshake runs in the connection's own thread, and the node hangs up at the request deadline (5 s)
    silent = socket.create_connection(("127.0.0.1", node.port))
    t0 = time.monotonic()
    res = _echo_tls(node.port, ["+tla", "+cf", str(pki["ca_crt"])])
    assert res.returncode == 0, res.stdout + res.stderr
    silent.settimeout(15)
    assert silent.recv(1) == b"" and time.monotonic() - t0 < 10
    silent.close()
    socket.create_connection(("127.0.0.1", node.port)).close()  # connect-and-close, the usual health check
    assert echoscu(node.port).returncode != 0  # plain DICOM on the TLS port: the handshake fails
    time.sleep(0.5)
    assert node.stop() == 0
    events = [json.loads(x) for x in node.log.read_text().splitlines() if x.strip()]
    reasons = [e["reason"] for e in events if e["event"] == "connection.refused"]
    assert {"request-timeout", "closed-before-request", "tls-handshake-failed"} <= set(reasons), reasons


def test_allow_list_pins_host_and_logs_rejection(node_factory: Callable[..., NodeProc], tmp_path: Path) -> None:
    node = node_factory('allowed_aes = ["SCANNER@127.0.0.1", "REMOTE@10.99.99.99"]\n' + PLUMBING).start()
    assert echoscu(node.port, calling="SCANNER").returncode == 0
    for calling in ("REMOTE", "INTRUDER"):  # REMOTE is allowed, but only from 10.99.99.99
        res = echoscu(node.port, calling=calling)
        assert res.returncode != 0
        assert "Calling AE Title Not Recognized" in res.stdout + res.stderr
    node.stop()
    events = [json.loads(x) for x in node.log.read_text().splitlines() if x.startswith("{")]
    rejected = [e for e in events if e["event"] == "association.rejected"]
    assert {e["calling_aet"] for e in rejected} == {"REMOTE", "INTRUDER"}
    assert all(e["peer"] == "127.0.0.1" and e["reason"] == "calling AE title not recognised" for e in rejected)


PHI = {"PatientName": "Zqxwertyplonk^Vimbelgrunde", "PatientID": "PID-7730019-QZX",
       "PatientBirthDate": "19030217", "PatientAddress": "17 Glimmerquack Lane",
       "InstitutionName": "Saint Snorkelwood Infirmary", "ReferringPhysicianName": "Droopfennel^Hortense"}


def test_no_phi_in_info_log_and_private_modes(node_factory: Callable[..., NodeProc],
                                              storescp_factory: Callable[..., StoreSCP], tmp_path: Path) -> None:
    dest = storescp_factory()
    node = node_factory(PLUMBING + 'log_level = "INFO"\n', "--allow-ae", "SCANNER", "--stable-seconds", "1",
                        "--destination", f"DEST@127.0.0.1:{dest.port}").start()
    series = make_mr_series(tmp_path / "series", n=5)
    for i, f in enumerate(series):
        ds = pydicom.dcmread(f)
        for kw, value in PHI.items():
            setattr(ds, kw, value)
        if i == 4:  # one refused instance too: its log line must not leak either
            ds.Rows = 0
        ds.save_as(f)
    res = storescu(node.port, series)
    assert res.stdout.count("Received Store Response (Success)") + \
        res.stderr.count("Received Store Response (Success)") == 4, res.stdout + res.stderr
    wait_for(lambda: len(dest.files()) == 1, 60, what="the result")
    assert str(pydicom.dcmread(dest.files()[0]).PatientID) == PHI["PatientID"]  # PHI did flow through the node
    wait_for(lambda: node.jobs()[0]["delivery"] == "delivered", 20,
             what="delivered")
    # every file and folder the node created is private to its user (umask 077, mode 0600/0700)
    entries = [node.data_dir, *node.data_dir.rglob("*")]
    assert any(p.name.endswith(".dcm") and "results" in p.parts for p in entries)
    assert any(p.name == "index.sqlite3-wal" for p in entries)
    wrong = [(str(p), oct(p.stat().st_mode & 0o777)) for p in entries
             if (p.stat().st_mode & 0o777) != (0o700 if p.is_dir() else 0o600)]
    assert wrong == [], wrong
    assert node.stop() == 0
    log_text = node.log.read_text(errors="replace")
    assert '"store.refused"' in log_text and '"audit.series_received"' in log_text and '"job.finished"' in log_text
    values = [*PHI.values(), "Zqxwertyplonk", "Vimbelgrunde", "7730019", "Glimmerquack", "Snorkelwood",
              "Droopfennel", "1903-02-17"]
    leaked = [v for v in values if v.lower() in log_text.lower()]
    assert leaked == [], f"PHI in the node's INFO log: {leaked}"


def loose_modes(root: Path) -> list[tuple[str, str]]:
    """``root`` and everything under it with a group or other permission bit: (path, mode)."""
    out = []
    for p in [root, *root.rglob("*")]:
        mode = p.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & 0o077:
            out.append((str(p), oct(mode & 0o777)))
    return out


def test_data_dir_is_private_whichever_command_creates_it(node_factory: Callable[..., NodeProc],
                                                          storescp_factory: Callable[..., StoreSCP],
                                                          tmp_path: Path) -> None:
    """Issue 36: a ``corrections`` command run before the node ever ran created the data dir 0755 and
    ``corrections.sqlite`` (raw Patient IDs) 0644. Under an admin's umask 022, every command that touches
    the data dir now creates it 0700 / 0600 (the node run, its results and WAL files included)."""
    dest = storescp_factory()
    previous = os.umask(0o022)  # an ordinary shell's umask: the node must not depend on a careful admin
    try:
        node = node_factory(PLUMBING, "--stable-seconds", "1", "--destination", f"DEST@127.0.0.1:{dest.port}")
        listed = node.cli("corrections", "list")  # the first command ever on this data dir
        assert listed.returncode == 0 and "no corrections" in listed.stdout, listed.stderr
        assert (node.data_dir / "corrections.sqlite").exists()
        node.start()
        series = make_mr_series(tmp_path / "series", n=3)
        assert storescu(node.port, series).returncode == 0
        wait_for(lambda: bool(node.jobs()) and node.jobs()[0]["delivery"] == "delivered", 60, what="delivered")
        not_a_seg = node.cli("corrections", "ingest", str(series[0]))  # refused: a row, no folder
        assert not_a_seg.returncode == 1 and "refused" in not_a_seg.stdout
        assert node.cli("status").returncode == 0
    finally:
        os.umask(previous)
    names = {p.name for p in node.data_dir.rglob("*")}
    assert {"corrections.sqlite", "index.sqlite3-wal", "spool", "results", "corrections"} <= names, names
    assert node.stop() == 0
    assert loose_modes(node.data_dir) == []


def test_retention_purges_delivered_series_only(node_factory: Callable[..., NodeProc],
                                                storescp_factory: Callable[..., StoreSCP], tmp_path: Path) -> None:
    dest = storescp_factory()
    retention_days = 3 / 86400  # three seconds
    node = node_factory(PLUMBING + f"retention_days = {retention_days}\n", "--allow-ae", "SCANNER",
                        "--stable-seconds", "1", "--destination", f"DEST@127.0.0.1:{dest.port}").start()
    good = make_mr_series(tmp_path / "good", n=4)
    bad = make_mr_series(tmp_path / "bad", n=4, step_mm=0.0)  # every slice at one position: job fails
    assert storescu(node.port, good + bad).returncode == 0
    good_series = pydicom.dcmread(good[0]).SeriesInstanceUID
    bad_series = pydicom.dcmread(bad[0]).SeriesInstanceUID

    def jobs() -> dict[str, dict]:
        return {j["series_uid"]: j for j in node.jobs()}

    wait_for(lambda: len(jobs()) == 2 and jobs()[good_series]["delivery"] == "delivered", 60, what="delivery")
    t_delivered = time.time()
    delivered = jobs()[good_series]
    assert jobs()[bad_series]["state"] == "failed" and "duplicate slice positions" in jobs()[bad_series]["reason"]
    spool_good = [p for p in (node.data_dir / "spool").rglob("*.dcm") if good_series in p.parts]
    assert len(spool_good) == 4 and (node.data_dir / "results" / str(delivered["id"])).exists()
    wait_for(lambda: not (node.data_dir / "results" / str(delivered["id"])).exists(), 20, what="the purge")
    assert time.time() - t_delivered >= retention_days * 86400 - 1.5  # not before the retention ran out
    assert not any(p.exists() for p in spool_good)
    # the failed series is kept for the admin; job rows stay as the audit trail
    spool_bad = [p for p in (node.data_dir / "spool").rglob("*.dcm") if bad_series in p.parts]
    assert len(spool_bad) == 4
    after = jobs()
    assert after[good_series]["delivery"] == "delivered" and after[bad_series]["state"] == "failed"
    status = json.loads(node.cli("status", "--json").stdout)["counts"]
    assert status["instances"]["total"] == 4 and status["series"] == {"complete": 1}
    assert len(dest.files()) == 1
    # the purged series may come again: it is a new series for the node, processed and delivered again
    assert storescu(node.port, good).returncode == 0
    wait_for(lambda: len(dest.files()) == 2, 60, what="the re-sent series' result")
    assert node.stop() == 0
    assert '"retention.purged"' in node.log.read_text()


def test_retention_purge_never_loses_an_instance_arriving_meanwhile(tmp_path: Path) -> None:
    """The purge/ingest race, step by step on the real store: an instance whose file was written just
    before the purge moved its series away is refused (StorageError -> 0xA700), not acknowledged."""
    from sci_node.app.retention import purge_expired
    from sci_node.config import load_config
    from sci_node.errors import ConfigError, StorageError
    from sci_node.store import InstanceKey, Store, write_durable

    store = Store(tmp_path / "d")
    key = InstanceKey("1.2.3.1", "1.2.3.2", "1.2.3.3.1", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")
    store.spool_instance(key, b"\0" * 128 + b"DICM")
    (row,) = store.quiet_series(1e12)
    store.complete_series(row, {})
    job = store.finish_job(store.claim_job().id, "done", None, {"status": "done"}, [tmp_path / "r.dcm"], ["D@h:1"])
    (store.results_dir / str(job.id)).mkdir()
    assert purge_expired(store, 1.0) == 0  # delivered? not yet: kept
    (entry,) = store.outbox_for_job(job.id)
    store.mark_sent(entry.id)
    assert purge_expired(store, 1.0) == 0  # delivered, but not a day ago
    late = InstanceKey(key.study_uid, key.series_uid, "1.2.3.3.2", key.sop_class_uid, key.transfer_syntax)
    write_durable(store.instance_path(late), b"late")  # the SCP wrote the file, has not recorded it yet
    assert purge_expired(store, 1.0, now=time.time() + 86400 + 1) == 1
    assert not store.instance_path(key).exists() and not (store.results_dir / str(job.id)).exists()
    with pytest.raises(StorageError, match="cannot record"):
        store._record_instance(late, store.instance_path(late), "SCANNER")  # -> 0xA700, the peer re-sends
    assert store.spool_instance(late, b"late again") is True  # a re-send is a new series for the node
    assert store.series_size(key.series_uid) == 1 and store.job(job.id).delivery == "delivered"
    with pytest.raises(ConfigError, match="retention_days"):
        load_config(None, {"retention_days": 0})
