"""The admin SCU through the CLI (``sci-node echo`` / ``sci-node send``) against dcmtk storescp."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pydicom
import pytest

from sci_node.cli import main

from conftest import StoreSCP, free_port, make_mr_series


def test_echo_and_send(storescp_factory: Callable[..., StoreSCP], tmp_path: Path) -> None:
    dest = storescp_factory()
    assert main(["echo", f"DEST@127.0.0.1:{dest.port}"]) == 0
    series = make_mr_series(tmp_path / "series" / "nested", n=3)
    (tmp_path / "series" / "README.txt").write_text("not DICOM: skipped")
    assert main(["send", str(tmp_path / "series"), "DEST@127.0.0.1", str(dest.port), "--calling-ae", "ADMIN"]) == 0
    got = {pydicom.dcmread(f).SOPInstanceUID for f in dest.files()}
    assert got == {pydicom.dcmread(f).SOPInstanceUID for f in series}


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nobody listens
    assert main(["echo", f"DEST@127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sci-node: error:") and f"DEST@127.0.0.1:{port}" in err[-1]
    (tmp_path / "empty").mkdir()
    assert main(["send", str(tmp_path / "empty"), f"DEST@127.0.0.1:{port}"]) == 1
    assert "no DICOM files" in capsys.readouterr().err
