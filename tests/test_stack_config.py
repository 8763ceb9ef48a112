"""The stack's Orthanc configuration and credentials (files only; the live stack is in test_orthanc_stack)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sci_node.app.stack import (
    CONFIG_TEMPLATE,
    PLUGIN_SCRIPT,
    OrthancCredentials,
    StackPorts,
    ohif_study_url,
    render_orthanc_config,
    resolve_credentials,
    write_orthanc_config,
)
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
