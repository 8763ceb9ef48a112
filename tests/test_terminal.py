"""Control characters a sender controls never reach the admin's terminal raw (issue 36, item 6).

:mod:`sci_node.terminal` on its own, then the real paths: a series whose UIDs carry ANSI and OSC
escapes, sent over DICOM by a raw pynetdicom SCU to a running node, shown by ``sci-node jobs
list|show`` and ``status``; a header shown by ``sci-node route``. The corrections path (a SEG whose
Content Creator Name carries ``ESC[31m``, stored to Orthanc) is in ``tests/test_stack_hygiene.py``.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable

import pydicom
from pydicom import config
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import MRImageStorage

from sci_node.terminal import printable

from conftest import NodeProc, make_mr_series, wait_for
from scale_out_support import sci_node_cmd

#: SGR red, an OSC window title ended by BEL, a C1 CSI, DEL and a bidi override: what a hostile value carries
HOSTILE = "\x1b[31m\x1b]0;pwned\x07\x9b2J\x7f\u202e"
ESCAPED = "\\x1b[31m\\x1b]0;pwned\\x07\\x9b2J\\x7f\\u202e"
#: the ASCII part, which fits any DICOM value (default character repertoire bytes)
HOSTILE_ASCII = "\x1b[31m\x1b]0;pwned\x07\x7f"
ESCAPED_ASCII = "\\x1b[31m\\x1b]0;pwned\\x07\\x7f"


def raw_controls(text: str) -> list[str]:
    """The control characters in ``text`` other than the newlines that end its lines."""
    return [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F or c == "\u202e"]


def test_printable_escapes_controls_and_keeps_printable_unicode() -> None:
    assert printable("Doe^Jane" + HOSTILE) == "Doe^Jane" + ESCAPED
    assert printable("line\nbreak\ttab\rcr\x00") == "line\\x0abreak\\x09tab\\x0dcr\\x00"
    assert printable("Müller^Zoë 山田 Ω ×") == "Müller^Zoë 山田 Ω ×"  # printable Unicode stays readable
    assert printable("a\u00a0b\u00adc") == "a\u00a0b\u00adc"  # no-break space, soft hyphen: harmless, kept
    assert printable(42) == "42"


def _send_hostile_series(port: int, tmp: Path) -> str:
    """Four MR slices whose Series Instance UID ends in the hostile text, sent byte for byte; the UID."""
    series_uid = generate_uid() + HOSTILE_ASCII
    files = make_mr_series(tmp / "hostile", n=4)
    modes = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
    try:  # pydicom refuses to write such a UID unless told to ignore it
        for f in files:
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = series_uid
            ds.save_as(f)
    finally:
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = modes
    ae = AE("SCANNER")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes as they are, not re-encoded by pynetdicom
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="SCINODE")
        assert assoc.is_established
        assert [assoc.send_c_store(f).Status for f in files] == [0x0000] * 4
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return series_uid


def test_jobs_and_status_escape_a_hostile_uid_sent_over_dicom(node_factory: Callable[..., NodeProc],
                                                              tmp_path: Path) -> None:
    node = node_factory('processor = "derived-sc"\n', "--stable-seconds", "1").start()
    series_uid = _send_hostile_series(node.port, tmp_path)
    wait_for(lambda: bool(node.jobs()) and node.jobs()[0]["state"] not in ("pending", "running"), 60,
             interval=0.5, what="the hostile series' job")
    (job,) = node.jobs()
    assert job["series_uid"] == series_uid  # it went through as sent: the JSON says so, escaped as JSON does
    for argv in (("jobs", "list"), ("jobs", "show", str(job["id"])), ("status",)):
        res = node.cli(*argv)
        assert res.returncode == 0, res.stderr
        assert raw_controls(res.stdout) == [], (argv, res.stdout)
        assert printable(series_uid) in res.stdout and ESCAPED_ASCII in res.stdout, (argv, res.stdout)
    for argv in (("jobs", "list", "--json"), ("jobs", "show", str(job["id"]), "--json"), ("status", "--json")):
        res = node.cli(*argv)
        assert raw_controls(res.stdout) == [] and json.loads(res.stdout), argv


def test_route_escapes_a_hostile_header(tmp_path: Path) -> None:
    (f,) = make_mr_series(tmp_path / "in", n=1)
    ds = pydicom.dcmread(f)
    del ds.PixelData  # unreadable: the reason quotes the instance's SOP Instance UID and Modality
    ds.Modality = "MR" + HOSTILE_ASCII
    ds.save_as(f)
    res = subprocess.run([*sci_node_cmd(), "route", str(tmp_path / "in"), "--log-level", "ERROR"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "has no pixel data" in res.stdout and f"(MR{ESCAPED_ASCII})" in res.stdout, res.stdout
    assert raw_controls(res.stdout) == [], res.stdout
