"""The stack's data at rest and what its CLI prints, after a real run (issue 36, items 4 and 6).

One ``sci-node stack`` (Orthanc + plugin + node, the real pipeline) started from a shell whose umask
is the usual 022: the sample series is segmented, and a "radiologist" SEG whose Content Creator
Name carries ``ESC[31m`` (and an OSC title ended by BEL) is STOW-RSed to Orthanc, the way OHIF
stores one; the plugin hands it to ``sci-node corrections ingest``, which records it. Then

* ``sci-node corrections list|show``, ``jobs list|show`` and ``status`` print no raw control
  character, the creator escaped (``\\x1b[31m``);
* every folder and file under the stack's data dir (the node's spool, index, WAL and results, the
  corrections with ``correction.json`` and ``corrections.sqlite``, ``logs/``, ``orthanc/`` with
  Orthanc's own storage and index) has no group or other permission bit.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom
import pytest
from test_corrections import _copy, _job_masks, _node_job, _radiologist_seg, _sorted_sources, _stow
from test_terminal import raw_controls

from conftest import wait_for
from stack_support import SAMPLE, StackProc

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
CREATOR = "Evil\x1b[31m^Radiologist\x1b]0;pwned\x07"
CREATOR_SHOWN = "Evil\\x1b[31m^Radiologist\\x1b]0;pwned\\x07"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sci_node.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The stack after a segmented series and a recorded hostile correction; stopped before the yield."""
    tmp = tmp_path_factory.mktemp("hygiene")
    previous = os.umask(0o022)  # what the stack inherits from an ordinary shell
    try:
        stack = StackProc(tmp / "d")
        stack.start()
    finally:
        os.umask(previous)
    try:
        files = _copy(SAMPLE, tmp / "series", patient="HYGIENE1")
        stack.storescu(files)
        job = _node_job(stack, str(pydicom.dcmread(files[0]).SeriesInstanceUID))
        cord, _ = _job_masks(stack, job)
        _stow(stack, _radiologist_seg(_sorted_sources(files), (cord > 0).astype(np.uint8), None,
                                      "corrected", creator=CREATOR))
        found: list[dict[str, Any]] = []

        def recorded() -> bool:
            res = _cli("corrections", "--json", "--data-dir", str(stack.data_dir), "list")
            found[:] = json.loads(res.stdout)["corrections"] if res.returncode == 0 else []
            return bool(found)

        wait_for(recorded, 240, interval=2, what="the plugin to hand the correction to the node")
        outputs = {" ".join(argv): _cli(*argv, "--data-dir", str(stack.data_dir)) for argv in (
            ("corrections", "list"), ("corrections", "show", str(found[0]["id"])), ("jobs", "list"),
            ("jobs", "show", str(job["id"])), ("status",))}
    finally:
        code = stack.stop()
    yield {"stack": stack, "correction": found[0], "outputs": outputs, "stop_code": code}


def test_cli_escapes_the_control_characters_of_a_correction_creator(run: dict[str, Any]) -> None:
    assert run["correction"]["creator"] == CREATOR  # recorded as sent (the JSON escapes it)
    for argv, res in run["outputs"].items():
        assert res.returncode == 0, (argv, res.stderr[-2000:])
        assert raw_controls(res.stdout) == [], (argv, res.stdout)
    assert "orthanc-user:" in run["outputs"]["corrections list"].stdout  # the list names who stored it
    assert f"creator            {CREATOR_SHOWN}" in run["outputs"][f"corrections show {run['correction']['id']}"].stdout


def test_every_file_under_the_stack_data_dir_is_private(run: dict[str, Any]) -> None:
    data = run["stack"].data_dir
    entries = [data, *data.rglob("*")]
    names = {p.name for p in entries}
    assert {"logs", "orthanc", "storage", "spool", "results", "index.sqlite3", "corrections.sqlite",
            "correction.json", "orthanc.json"} <= names, sorted(names)[:50]
    assert any("storage" in p.parts and p.is_file() for p in entries)  # Orthanc's own files are walked too
    loose = [(str(p.relative_to(data)), oct(p.lstat().st_mode & 0o777)) for p in entries
             if not stat.S_ISLNK(p.lstat().st_mode) and p.lstat().st_mode & 0o077]
    assert loose == [], loose
