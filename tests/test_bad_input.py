"""Bad input corpus against the running node: each case has one defined outcome (a C-STORE
status, a presentation context refused, a job failed with its reason, or stored as sent), and
the node keeps serving: a C-ECHO right after each case succeeds.

Everything is generated here from pydicom's ``MR_small.dcm`` (no committed files). Already
covered elsewhere: Pixel Data shorter than Rows x Columns and a missing UID (0xC210,
tests/test_scp.py), CT not negotiated (tests/test_scp.py), duplicate slice positions
(job failed, tests/test_security.py).
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import struct
import subprocess
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import MRImageStorage

from conftest import NodeProc, echoscu, free_port, make_mr_series, storescu, wait_for

CALLING = "SCANNER"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """One node for the whole corpus (plumbing processor, series complete after 1.5 s)."""
    d = tmp_path_factory.mktemp("badinput-node")
    cfg = d / "node.toml"
    cfg.write_text('processor = "derived-sc"\nallowed_aes = ["SCANNER"]\nstable_seconds = 1.5\n'
                   'abort_grace_seconds = 3\n')
    proc = NodeProc(free_port(), d / "data", cfg, d / "node.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.kill9()


def _serving(node: NodeProc) -> None:
    res = echoscu(node.port)
    assert res.returncode == 0, "the node stopped serving: " + res.stdout + res.stderr


def _send_raw(node: NodeProc, meta_source: Path, dataset_bytes: bytes, tmp: Path,
              syntax: str = ExplicitVRLittleEndian) -> int:
    """C-STORE ``dataset_bytes`` exactly as given (pynetdicom's chunked mode: no decoding on our
    side), with the SOP class/instance of ``meta_source``'s file meta in the request."""
    _, offset = split_dataset(meta_source)
    raw = tmp / f"raw-{generate_uid()}.dcm"
    raw.write_bytes(meta_source.read_bytes()[:offset] + dataset_bytes)
    ae = AE(CALLING)
    ae.add_requested_context(MRImageStorage, syntax)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="SCINODE")
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(raw)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return int(rsp.Status) if "Status" in rsp else -1


def _send(node: NodeProc, datasets: list[pydicom.Dataset], abort_after: int | None = None,
          syntax: str = ExplicitVRLittleEndian) -> list[int]:
    ae = AE(CALLING)
    ae.add_requested_context(MRImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SCINODE")
    assert assoc.is_established
    out = []
    for i, ds in enumerate(datasets):
        if abort_after is not None and i == abort_after:
            assoc.abort()
            return out
        rsp = assoc.send_c_store(ds)
        out.append(int(rsp.Status) if "Status" in rsp else -1)
    assoc.release()
    return out


def _indexed(node: NodeProc, sop_uid: str) -> bool:
    with contextlib.closing(sqlite3.connect(f"file:{node.data_dir / 'index.sqlite3'}?mode=ro", uri=True)) as con:
        return con.execute("SELECT COUNT(*) FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone()[0] == 1


def _job_of(node: NodeProc, series_uid: str) -> dict | None:
    res = node.cli("jobs", "list", "--json", "--limit", "500")
    jobs = [j for j in json.loads(res.stdout) if j["series_uid"] == series_uid] if res.returncode == 0 else []
    return jobs[0] if jobs and jobs[0]["state"] not in ("pending", "running") else None


def _series(tmp: Path, n: int = 4) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in make_mr_series(tmp / generate_uid(), n=n)]


def test_truncated_data_sets_get_c210(node: NodeProc, tmp_path: Path) -> None:
    (f,) = make_mr_series(tmp_path / "s", n=1)
    _, offset = split_dataset(f)
    body = f.read_bytes()[offset:]
    pixels_end = body.rindex(b"\xfc\xff\xfc\xff")  # MR_small ends with Data Set Trailing Padding
    for cut in (7, 200, len(body) // 2, pixels_end - 1000, pixels_end - 1):
        assert _send_raw(node, f, body[:cut], tmp_path) == 0xC210, f"cut at {cut} of {len(body)}"
        _serving(node)
    # only the trailing padding cut short: the image is whole, but its last element's length field claims
    # one byte more than follows, and dcmtk refuses to read such a file ("premature end of stream")
    assert _send_raw(node, f, body[:-1], tmp_path) == 0xC210
    assert not _indexed(node, str(pydicom.dcmread(f).SOPInstanceUID))
    assert _send_raw(node, f, body, tmp_path) == 0x0000  # the whole data set is stored as sent
    (stored,) = [p for p in (node.data_dir / "spool").rglob(f"{pydicom.dcmread(f).SOPInstanceUID}.dcm")]
    assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(f).PixelData


def _with_length(body: bytes, tag: bytes, length: int) -> bytes:
    """``body`` with the 4-byte explicit-VR length field of the (first) element ``tag`` set to ``length``."""
    at = body.index(tag)
    assert body[at + 4:at + 6] in (b"OW", b"OB") and body[at + 6:at + 8] == b"\0\0"
    return body[:at + 8] + struct.pack("<L", length) + body[at + 12:]


def _spooled(node: NodeProc, sop_uid: str) -> list[Path]:
    spool = node.data_dir / "spool"
    return [p for p in spool.rglob("*") if p.is_file() and (sop_uid in p.name or p.name.endswith(".tmp"))]


def test_lying_pixel_data_length_is_refused_and_nothing_is_spooled(node: NodeProc, tmp_path: Path) -> None:
    """Issue 36: Pixel Data whose length field claims 4 GB with 54 kB following, sent byte for byte by a raw
    pynetdicom SCU (dcmtk's storescu cannot even read such a file), gets C210, a logged reason, no spool file."""
    (ds,) = _series(tmp_path, n=1)
    ds.Rows = ds.Columns = 164  # 164 x 164 x 16 bits: 53 792 bytes of pixels
    ds.PixelData = bytes(164 * 164 * 2)
    whole = tmp_path / "whole.dcm"
    ds.save_as(whole, enforce_file_format=True)
    _, offset = split_dataset(whole)
    body = whole.read_bytes()[offset:]
    lying = _with_length(body, b"\xe0\x7f\x10\x00", 0xFFFFFFF0)
    crafted = tmp_path / "lying.dcm"
    crafted.write_bytes(whole.read_bytes()[:offset] + lying)
    assert subprocess.run(["dcmdump", str(crafted)], capture_output=True, check=False).returncode != 0  # unreadable
    assert _send_raw(node, whole, lying, tmp_path) == 0xC210
    assert not _indexed(node, str(ds.SOPInstanceUID)) and _spooled(node, str(ds.SOPInstanceUID)) == []
    refused = [json.loads(x) for x in node.log.read_text().splitlines() if '"store.refused"' in x]
    assert any("(7FE0,0010) PixelData declares a value length of 4294967280 bytes but only" in e["reason"]
               and e["status"] == "0xC210" for e in refused), refused[-3:]
    _serving(node)
    # the same header with the length field telling the truth is stored
    assert _send_raw(node, whole, body, tmp_path) == 0x0000 and _indexed(node, str(ds.SOPInstanceUID))


def test_pixel_data_that_does_not_fit_the_header_is_refused(node: NodeProc, tmp_path: Path) -> None:
    """Native: longer than Rows x Columns x samples x bits x frames (an honest length field); encapsulated:
    a fragment whose item length runs past the Pixel Data, and a Basic Offset Table for fewer frames."""
    (ds,) = _series(tmp_path, n=1)
    ds.PixelData = ds.PixelData + bytes(4096)  # 64 x 64 x 2 bytes needed, 4 kB more sent
    assert _send(node, [ds]) == [0xC210] and _spooled(node, str(ds.SOPInstanceUID)) == []
    rle = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    rle.SOPInstanceUID = rle.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    src = tmp_path / "rle.dcm"
    rle.save_as(src)
    _, offset = split_dataset(src)
    body = src.read_bytes()[offset:]
    first = body.index(b"\xfe\xff\x00\xe0", body.index(b"\xe0\x7f\x10\x00") + 12 + 8)  # the first fragment
    long_item = body[:first + 4] + struct.pack("<L", 0x00100000) + body[first + 8:]
    assert _send_raw(node, src, long_item, tmp_path, RLELossless) == 0xC210
    multi = pydicom.dcmread(src)
    multi.NumberOfFrames = 3  # one offset (and one fragment) for 3 frames
    assert _send(node, [multi], syntax=RLELossless) == [0xC210]
    assert _spooled(node, str(rle.SOPInstanceUID)) == []
    reasons = " | ".join(json.loads(x)["reason"] for x in node.log.read_text().splitlines()
                         if '"store.refused"' in x)
    assert "Pixel Data has 12288 bytes" in reasons and "needs 8192" in reasons
    assert "encapsulated Pixel Data: item 1 declares 1048576 bytes" in reasons
    assert "encapsulated Pixel Data: Basic Offset Table of 4 bytes for 3 frame(s)" in reasons
    _serving(node)


def test_wrong_preamble(node: NodeProc, tmp_path: Path) -> None:
    (f,) = make_mr_series(tmp_path / "s", n=1)
    # a peer sending the whole file (128-byte preamble, 'DICM', file meta) as if it were the data set
    assert _send_raw(node, f, f.read_bytes(), tmp_path) == 0xC210
    _serving(node)
    # a file whose preamble is garbage instead of zeros: legal (PS3.10 leaves the preamble to the
    # application), so the data set is stored as sent
    garbage = tmp_path / "garbage-preamble.dcm"
    garbage.write_bytes(b"MZ\x90\x00" + bytes(range(124)) + f.read_bytes()[128:])
    res = storescu(node.port, [garbage])
    assert res.returncode == 0 and "Received Store Response (Success)" in res.stdout + res.stderr
    assert _indexed(node, str(pydicom.dcmread(garbage).SOPInstanceUID))
    _serving(node)


def test_absurd_header_values_get_c210(node: NodeProc, tmp_path: Path) -> None:
    mutations = {
        "Rows=0": lambda d: setattr(d, "Rows", 0),
        "Columns=0": lambda d: setattr(d, "Columns", 0),
        "Rows=65535 (pixels far too short)": lambda d: setattr(d, "Rows", 65535),
        "BitsAllocated=12": lambda d: setattr(d, "BitsAllocated", 12),
        "NumberOfFrames=-3": lambda d: setattr(d, "NumberOfFrames", -3),
        "no PixelData": lambda d: delattr(d, "PixelData"),
    }
    for name, mutate in mutations.items():
        (ds,) = _series(tmp_path, n=1)
        mutate(ds)
        assert _send(node, [ds]) == [0xC210], name
        assert not _indexed(node, str(ds.SOPInstanceUID)), name
        _serving(node)


def test_non_image_sop_classes(node: NodeProc, tmp_path: Path) -> None:
    sr = Path(get_testdata_file("test-SR.dcm"))
    res = storescu(node.port, [sr])  # SR Storage is not offered: refused in negotiation
    assert res.returncode != 0 and "No presentation context" in res.stdout + res.stderr, res.stdout + res.stderr
    _serving(node)
    # a non-image data set labelled as an SR but sent on the MR context: data set / SOP class mismatch
    (ds,) = _series(tmp_path, n=1)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR; the file meta (the request) says MR
    del ds.PixelData
    mislabelled = tmp_path / "mislabelled.dcm"
    ds.save_as(mislabelled)
    _, offset = split_dataset(mislabelled)
    assert _send_raw(node, mislabelled, mislabelled.read_bytes()[offset:], tmp_path) == 0xA900
    assert not _indexed(node, str(ds.SOPInstanceUID))
    _serving(node)


def test_mixed_orientations_and_negative_spacing_fail_the_job_with_reason(node: NodeProc, tmp_path: Path) -> None:
    mixed = _series(tmp_path, n=6)
    for ds in mixed[3:]:  # second half sagittal, same SeriesInstanceUID
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    negative = _series(tmp_path, n=4)
    for ds in negative:
        ds.PixelSpacing = [-0.5, -0.5]
    assert _send(node, mixed) == [0] * 6 and _send(node, negative) == [0] * 4
    _serving(node)
    wait_for(lambda: _job_of(node, mixed[0].SeriesInstanceUID) is not None and
             _job_of(node, negative[0].SeriesInstanceUID) is not None, 30, what="both jobs finished")
    job = _job_of(node, mixed[0].SeriesInstanceUID)
    assert job["state"] == "failed" and "mixed orientations (2 distinct" in job["reason"], job
    job = _job_of(node, negative[0].SeriesInstanceUID)
    assert job["state"] == "failed" and "invalid PixelSpacing [-0.5, -0.5]" in job["reason"], job


def test_duplicate_sop_instances_are_stored_once(node: NodeProc, tmp_path: Path) -> None:
    series = _series(tmp_path, n=4)
    assert _send(node, series + series[:2]) == [0] * 6  # duplicates inside one association
    assert _send(node, series) == [0] * 4  # and the whole series again on another one
    _serving(node)
    wait_for(lambda: _job_of(node, series[0].SeriesInstanceUID) is not None, 30, what="the job")
    job = _job_of(node, series[0].SeriesInstanceUID)
    assert job["state"] == "done" and job["n_instances"] == 4
    spooled = [p for p in (node.data_dir / "spool").rglob("*.dcm") if series[0].SeriesInstanceUID in p.parts]
    assert len(spooled) == 4


def test_association_aborted_mid_series(node: NodeProc, tmp_path: Path) -> None:
    series = _series(tmp_path, n=6)
    assert _send(node, series, abort_after=3) == [0, 0, 0]
    _serving(node)
    for ds in series[:3]:  # what was acknowledged is kept; the series completes with what arrived
        assert _indexed(node, str(ds.SOPInstanceUID))
    wait_for(lambda: _job_of(node, series[0].SeriesInstanceUID) is not None, 30, what="the job")
    job = _job_of(node, series[0].SeriesInstanceUID)
    assert job["state"] == "done" and job["n_instances"] == 3
    assert "incomplete transfer" in json.dumps(job)  # no resend within the grace period: marked as such
    log = [json.loads(x) for x in node.log.read_text().splitlines() if x.startswith("{")]
    assert any(e["event"] == "association.closed" and e["how"] == "EVT_ABORTED" and e["instances_stored"] == 3
               for e in log)
