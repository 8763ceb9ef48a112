"""The stack's Orthanc configuration and credentials (files only; the live stack is in test_orthanc_stack)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sci_node.app.stack import (
    CONFIG_TEMPLATE,
    DEMO_AET,
    PLUGIN_SCRIPT,
    OrthancCredentials,
    StackPorts,
    ohif_study_url,
    render_orthanc_config,
    resolve_credentials,
    with_demo_sender,
    write_orthanc_config,
)
from sci_node.app.stack_dicom import listening_addresses, node_tls_args, orthanc_env
from sci_node.app.stack_supervisor import RestartPolicy
from sci_node.config import load_config
from sci_node.errors import ConfigError, StackError


def test_generated_credentials_are_stored_0600_and_reused(tmp_path: Path) -> None:
    first = resolve_credentials(tmp_path / "orthanc", None, None)
    assert first.generated and first.file is not None and len(first.password) >= 20
    assert stat.S_IMODE(first.file.stat().st_mode) == 0o600
    assert first.password not in repr(first)
    again = resolve_credentials(tmp_path / "orthanc", None, None)
    assert (again.user, again.password, again.generated) == (first.user, first.password, False)
    os.chmod(first.file, 0o644)
    with pytest.raises(ConfigError, match="mode 644"):
        resolve_credentials(tmp_path / "orthanc", None, None)


def test_given_credentials_win_and_must_come_in_pairs(tmp_path: Path) -> None:
    creds = resolve_credentials(tmp_path, "u", "p")
    assert (creds.user, creds.password, creds.file) == ("u", "p", None)
    assert not (tmp_path / "credentials.json").exists()
    with pytest.raises(ConfigError, match="both user and password"):
        resolve_credentials(tmp_path, "u", None)
    with pytest.raises(ConfigError, match="'a:b'"):
        resolve_credentials(tmp_path, "a:b", "p")


def test_orthanc_config_has_every_plugin_key(tmp_path: Path) -> None:
    cfg = load_config(None, {"data_dir": str(tmp_path / "D"), "stable_seconds": 2.5, "ae_title": "SCIN"})
    path = write_orthanc_config(cfg, StackPorts(18042, 14242, 11112), OrthancCredentials("u", "p"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the password
    conf = json.loads(path.read_text())
    assert conf["HttpPort"] == 18042 and conf["DicomPort"] == 14242 and conf["DicomAet"] == "ORTHANC"
    assert conf["AuthenticationEnabled"] is True and conf["RegisteredUsers"] == {"u": "p"}
    assert conf["RemoteAccessAllowed"] is False and conf["StableAge"] == 3
    assert conf["DicomModalities"]["sci-node"]["AET"] == "SCIN" and conf["DicomModalities"]["sci-node"]["Port"] == 11112
    assert conf["DicomWeb"]["Root"] == "/dicom-web/" and conf["DicomWeb"]["Enable"] is True
    assert conf["PythonScript"] == str(PLUGIN_SCRIPT)
    assert conf["StorageDirectory"] == str(tmp_path / "D" / "orthanc" / "storage")
    assert conf["SciNode"]["DataDir"] == str(tmp_path / "D") and conf["SciNode"]["ForwardModalities"] == ["MR"]
    assert all(Path(p).is_file() for p in conf["Plugins"])


def test_template_placeholders_and_ports_are_checked() -> None:
    with pytest.raises(StackError, match="HTTP_PORT"):
        render_orthanc_config(CONFIG_TEMPLATE.read_text(), {})
    with pytest.raises(ConfigError, match="ports must differ"):
        StackPorts(8042, 8042, 11112).validate()
    with pytest.raises(ConfigError, match="70000"):
        StackPorts(70000, 4242, 11112).validate()
    assert ohif_study_url("http://h:1", "1.2", "3.4") == "http://h:1/ohif/viewer?StudyInstanceUIDs=1.2&initialSeriesInstanceUID=3.4"


def test_orthanc_dicom_port_is_closed_by_default_in_the_config(tmp_path: Path) -> None:
    cfg = load_config(None, {"data_dir": str(tmp_path / "D"), "ae_title": "SCIN",
                             "stack": {"scanners": ["MR1@10.1.2.3", "CT@10.1.2.4"]}})
    conf = json.loads(write_orthanc_config(cfg, StackPorts(18042, 14242, 11112),
                                           OrthancCredentials("u", "p")).read_text())
    assert (conf["DicomAlwaysAllowStore"], conf["DicomAlwaysAllowEcho"]) == (False, False)
    assert (conf["DicomCheckModalityHost"], conf["DicomCheckCalledAet"], conf["DicomTlsEnabled"]) == (True, True, False)
    mods = conf["DicomModalities"]
    assert {(m["AET"], m["Host"]) for m in mods.values()} == {("SCIN", "127.0.0.1"), ("MR1", "10.1.2.3"),
                                                              ("CT", "10.1.2.4")}
    assert all(m["AllowStore"] and not m["AllowMove"] for m in mods.values())
    # scanners only store; the node on loopback may also find and get (the prior of a follow-up)
    assert {m["AET"]: (m["AllowFind"], m["AllowGet"]) for m in mods.values()} == {
        "SCIN": (True, True), "MR1": (False, False), "CT": (False, False)}
    assert conf["SciNode"]["ForwardRetries"] == 5 and conf["SciNode"]["ForwardRetrySeconds"] == 5.0
    assert cfg.stack.dicom_bind == "127.0.0.1" and cfg.limits.max_associations == 64
    env = orthanc_env(cfg, 14242, tmp_path, {"PATH": "/usr/bin"})  # compiles the bind shim
    assert env["SCI_NODE_BIND_ADDR"] == "127.0.0.1" and env["LD_PRELOAD"].endswith("bind_address.so")
    assert "LD_PRELOAD" not in orthanc_env(load_config(None, {"stack": {"dicom_bind": "0.0.0.0"}}), 1, tmp_path, {})
    demo = with_demo_sender(cfg)
    assert [str(s) for s in demo.stack.scanners] == ["MR1@10.1.2.3", "CT@10.1.2.4", f"{DEMO_AET}@127.0.0.1"]
    assert isinstance(listening_addresses(1), set)


def test_stack_tls_goes_to_orthanc_and_the_node(tmp_path: Path) -> None:
    for name in ("c.crt", "c.key", "ca.crt"):
        (tmp_path / name).write_text(f"-----{name}-----\n")
    cfg = load_config(None, {"data_dir": str(tmp_path / "D"), "stack": {"tls": {
        "enabled": True, "cert_file": str(tmp_path / "c.crt"), "key_file": str(tmp_path / "c.key"),
        "ca_file": str(tmp_path / "ca.crt"), "require_client_cert": True}}})
    conf = json.loads(write_orthanc_config(cfg, StackPorts(18042, 14242, 11112),
                                           OrthancCredentials("u", "p")).read_text())
    assert conf["DicomTlsEnabled"] is True and conf["DicomTlsRemoteCertificateRequired"] is True
    assert conf["DicomTlsCertificate"] == str(tmp_path / "c.crt")
    assert conf["DicomTlsPrivateKey"] == str(tmp_path / "c.key")
    bundle = Path(conf["DicomTlsTrustedCertificates"])
    assert bundle.read_text() == "-----ca.crt-----\n-----c.crt-----\n" and stat.S_IMODE(bundle.stat().st_mode) == 0o600
    assert conf["DicomModalities"]["sci-node"]["UseDicomTls"] is True
    assert node_tls_args(cfg, bundle.parent) == ["--tls-cert", str(tmp_path / "c.crt"), "--tls-key",
                                                str(tmp_path / "c.key"), "--tls-ca", str(bundle),
                                                "--tls-require-client-cert"]


def test_stack_config_errors_are_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {"stack": {"scanners": ["MR1@mr1.hospital", "NOHOST", "A\\B@10.0.0.1"],
                                     "tls": {"enabled": True, "bogus": 1}}})
    text = str(err.value)
    assert "'MR1@mr1.hospital'" in text and "IPv4" in text and "'NOHOST'" in text and "stack.tls.bogus" in text
    assert "A\\\\B" in text
    with pytest.raises(ConfigError) as err:
        load_config(None, {"stack": {"scanners": ["SCINODE@10.0.0.1", "X@10.0.0.2", "X@10.0.0.2"],
                                     "dicom_bind": "any", "tls": {"enabled": True}, "max_restarts": 0}})
    text = str(err.value)
    for part in ("node's own AE title", "duplicate", "dicom_bind", "stack.tls: enabled needs", "max_restarts"):
        assert part in text, part


def test_restart_backoff_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(initial_s=1.0, max_s=10.0, reset_s=60.0, max_restarts=5)
    assert [policy.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
