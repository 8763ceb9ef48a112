"""The SCP against dcmtk peers: admission, SOP classes, transfer syntaxes, named failure statuses."""
from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000, DeflatedExplicitVRLittleEndian, generate_uid

from sci_node.config import NodeConfig, load_config
from sci_node.dicom.poll import loop_delay
from sci_node.dicom.scp import start_scp
from sci_node.store import Store

from conftest import echoscu, free_port, make_mr_series, storescu, wait_for


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[NodeConfig, Store]]:
    cfg = load_config(None, {"port": free_port(), "data_dir": str(tmp_path / "data"), "allowed_aes": ["SCANNER"]})
    store = Store(cfg.data_dir)
    server = start_scp(cfg, store)
    try:
        yield cfg, store
    finally:
        server.shutdown()
        store.close()


def test_echo_and_unknown_calling_ae_rejected(scp: tuple[NodeConfig, Store]) -> None:
    cfg, _ = scp
    ok = echoscu(cfg.port)
    assert ok.returncode == 0, ok.stderr
    bad = echoscu(cfg.port, calling="INTRUDER")
    assert bad.returncode != 0
    out = bad.stdout + bad.stderr
    assert "Association Rejected" in out and "Calling AE Title Not Recognized" in out
    assert "Rejected Permanent" in out


def _variants(tmp: Path) -> dict[str, Path]:
    """One MR file per transfer syntax the SCP must accept (built with pydicom + dcmtk codecs)."""
    src = Path(get_testdata_file("MR_small.dcm"))
    tmp.mkdir(parents=True, exist_ok=True)
    ds8 = pydicom.dcmread(src)
    arr = ds8.pixel_array.astype(np.float64)
    ds8.BitsAllocated, ds8.BitsStored, ds8.HighBit, ds8.PixelRepresentation = 8, 8, 7, 0
    ds8.PixelData = (arr / arr.max() * 255).astype(np.uint8).tobytes()
    ds8.save_as(tmp / "mr8.dcm", enforce_file_format=True)
    out = {"explicit": src, "implicit": Path(get_testdata_file("MR_small_implicit.dcm")),
           "rle": Path(get_testdata_file("MR_small_RLE.dcm")),
           "jpeg-ls-lossless": Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")),
           "j2k-lossless": Path(get_testdata_file("MR_small_jp2klossless.dcm"))}
    d = pydicom.dcmread(src)
    d.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    d.save_as(tmp / "deflated.dcm")
    out["deflated"] = tmp / "deflated.dcm"
    d = pydicom.dcmread(src)
    d.compress(JPEG2000, j2k_cr=[10])
    d.save_as(tmp / "j2k.dcm")
    out["j2k-lossy"] = tmp / "j2k.dcm"
    for name, tool, flag, source in (("jpeg-baseline", "dcmcjpeg", "+eb", tmp / "mr8.dcm"),
                                     ("jpeg-extended", "dcmcjpeg", "+ee", tmp / "mr8.dcm"),
                                     ("jpeg-lossless-p14", "dcmcjpeg", "+el", src),
                                     ("jpeg-lossless-sv1", "dcmcjpeg", "+e1", src),
                                     ("jpeg-ls-near", "dcmcjpls", "+en", tmp / "mr8.dcm")):
        subprocess.run([tool, flag, str(source), str(tmp / f"{name}.dcm")], check=True, timeout=30,
                       capture_output=True)
        out[name] = tmp / f"{name}.dcm"
    # every variant is its own instance (own SOP Instance UID) of one series
    series = generate_uid()
    for p in out.values():
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp / p.name if p.parent == tmp else tmp / f"src-{p.name}")
    return {k: (tmp / p.name if p.parent == tmp else tmp / f"src-{p.name}") for k, p in out.items()}


def _propose_all(tmp: Path) -> list[str]:
    """storescu flags proposing MR Image Storage with each of the 12 syntaxes (own context each)."""
    from sci_node.dicom.dimse import STORAGE_TRANSFER_SYNTAXES

    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(STORAGE_TRANSFER_SYNTAXES):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[MRAll]"]
    lines += [f"PresentationContext{i + 1} = 1.2.840.10008.5.1.4.1.1.4\\TS{i}"
              for i in range(len(STORAGE_TRANSFER_SYNTAXES))]
    lines += ["[[Profiles]]", "[MRAll]", "PresentationContexts = MRAll"]
    cfg = tmp / "storescu.cfg"
    cfg.write_text("\n".join(lines) + "\n")
    return ["--config-file", str(cfg), "MRAll"]


def test_every_transfer_syntax_stored_as_sent(scp: tuple[NodeConfig, Store], tmp_path: Path) -> None:
    cfg, store = scp
    variants = _variants(tmp_path / "variants")
    assert len({str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in variants.values()}) == 12
    res = storescu(cfg.port, list(variants.values()), extra=_propose_all(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    for name, path in variants.items():
        sent = pydicom.dcmread(path)
        from sci_node.store import InstanceKey

        key = InstanceKey(sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID, sent.SOPClassUID,
                          sent.file_meta.TransferSyntaxUID)
        stored_path = store.instance_path(key)
        assert stored_path.exists(), name
        stored = pydicom.dcmread(stored_path)
        assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID, name
        assert stored.PixelData == sent.PixelData, f"{name}: pixel data re-encoded"
        assert np.array_equal(stored.pixel_array, sent.pixel_array), name  # decodable (pylibjpeg)
        assert stored_path.stat().st_mode & 0o777 == 0o600
    assert store.counts()["instances"]["total"] == 12


def test_unsupported_sop_class_not_negotiated(scp: tuple[NodeConfig, Store]) -> None:
    cfg, store = scp
    res = storescu(cfg.port, [Path(get_testdata_file("CT_small.dcm"))])
    assert res.returncode != 0
    assert "No presentation context" in res.stdout + res.stderr or "no acceptable" in (res.stdout + res.stderr).lower()
    assert store.counts()["instances"]["total"] == 0


def _status_lines(res: subprocess.CompletedProcess[str]) -> str:
    return (res.stdout + res.stderr).lower()


def test_corrupt_dataset_gets_c210_and_node_keeps_serving(scp: tuple[NodeConfig, Store], tmp_path: Path) -> None:
    cfg, store = scp
    good, short, nouid = make_mr_series(tmp_path / "s", n=3)
    ds = pydicom.dcmread(short)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # shorter than Rows x Columns x 2 bytes
    ds.save_as(short)
    ds = pydicom.dcmread(nouid)
    del ds.SeriesInstanceUID
    ds.save_as(nouid)
    for bad in (short, nouid):
        res = storescu(cfg.port, [bad], debug=True)
        assert "0xc210" in _status_lines(res), res.stdout + res.stderr
    res = storescu(cfg.port, [good])
    assert res.returncode == 0 and "0xc210" not in _status_lines(res)
    assert store.counts()["instances"]["total"] == 1


def test_disk_error_gets_a700(scp: tuple[NodeConfig, Store], tmp_path: Path) -> None:
    cfg, store = scp
    (f,) = make_mr_series(tmp_path / "s", n=1)
    ds = pydicom.dcmread(f)
    # a regular file where the study directory must go: a real ENOTDIR from the file system
    blocker = store.spool_dir / ds.StudyInstanceUID
    blocker.write_bytes(b"not a directory")
    res = storescu(cfg.port, [f], debug=True)
    assert "0xa700" in _status_lines(res), res.stdout + res.stderr
    assert store.counts()["instances"]["total"] == 0
    blocker.unlink()
    res = storescu(cfg.port, [f])
    assert res.returncode == 0 and store.counts()["instances"]["total"] == 1



def test_undecodable_bytes_get_c210(scp: tuple[NodeConfig, Store], tmp_path: Path) -> None:
    """A data set pydicom cannot parse, sent byte for byte (dcmtk refuses to send such files)."""
    from pydicom.filebase import DicomBytesIO
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset
    from pynetdicom.sop_class import MRImageStorage

    cfg, store = scp
    (good,) = make_mr_series(tmp_path / "s", n=1)
    ds = pydicom.dcmread(good)
    _, offset = split_dataset(good)
    head = pydicom.Dataset()
    head.SOPClassUID, head.SOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(fp, head)
    noise = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    corrupt = tmp_path / "corrupt.dcm"  # valid UIDs, then an element with a bogus VR and noise
    corrupt.write_bytes(good.read_bytes()[:offset] + fp.getvalue() + b"\x10\x00\x10\x00Q\x01\xff\xff" + noise)
    ae = AE("SCANNER")
    ae.add_requested_context(MRImageStorage, ds.file_meta.TransferSyntaxUID)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes without decoding them
    try:
        assoc = ae.associate("127.0.0.1", cfg.port, ae_title=cfg.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(corrupt)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    assert status.Status == 0xC210
    assert store.counts()["instances"]["total"] == 0
    assert echoscu(cfg.port).returncode == 0


def test_per_series_and_per_association_caps(tmp_path: Path) -> None:
    cfg = load_config(None, {"port": free_port(), "data_dir": str(tmp_path / "data"),
                             "limits": {"max_instances_per_series": 2, "max_instances_per_association": 3}})
    store = Store(cfg.data_dir)
    server = start_scp(cfg, store)
    try:
        res = storescu(cfg.port, make_mr_series(tmp_path / "a", n=3), debug=True)
        assert _status_lines(res).count("0xa700") == 1 and store.series_size(
            pydicom.dcmread(tmp_path / "a" / "slice000.dcm").SeriesInstanceUID) == 2
        four = [p for name in "bcde" for p in make_mr_series(tmp_path / name, n=1)]
        res = storescu(cfg.port, four, debug=True)  # 3 per association: the fourth is refused
        assert _status_lines(res).count("0xa700") == 1 and store.counts()["instances"]["total"] == 5
    finally:
        server.shutdown()
        store.close()


def _send_as(port: int, path: Path, ae_title: str = "SCINODE") -> int:
    """C-STORE ``path``'s data set bytes exactly as they are in the file (pynetdicom, undecoded),
    on a presentation context with the transfer syntax its file meta names."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import MRImageStorage

    meta = pydicom.filereader.read_file_meta_info(path)  # the data set itself may not be readable
    ae = AE("SCANNER")
    ae.add_requested_context(MRImageStorage, meta.TransferSyntaxUID)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(path).Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def _file_claiming(path: Path, ds: pydicom.Dataset, claimed_ts: str, implicit_body: bool) -> Path:
    """A file whose meta claims ``claimed_ts`` but whose data set is encoded in the other (or same) VR mode."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import encode

    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = claimed_ts
    fp = DicomBytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    body = encode(ds, implicit_body, True)
    assert body is not None
    path.write_bytes(fp.getvalue() + body)
    return path


def test_mis_encoded_data_sets_refused_with_c210_both_directions(scp: tuple[NodeConfig, Store],
                                                                  tmp_path: Path) -> None:
    """Issue #16 item 3: Implicit VR bytes on an Explicit VR context and the reverse are refused with
    0xC210 (conformance statement §3.2.4), never acknowledged and spooled under the wrong syntax;
    the same data sets correctly encoded are stored, and dcmtk reads what was stored."""
    import structlog
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    cfg, store = scp
    sources = make_mr_series(tmp_path / "s", n=4)
    cases = []  # (file, context syntax, body implicit?, expected status)
    for i, (ts, implicit_body) in enumerate(((ExplicitVRLittleEndian, True), (ImplicitVRLittleEndian, False),
                                             (ExplicitVRLittleEndian, False), (ImplicitVRLittleEndian, True))):
        ds = pydicom.dcmread(sources[i])
        wrong = implicit_body != (ts == ImplicitVRLittleEndian)
        cases.append((_file_claiming(tmp_path / f"case{i}.dcm", ds, ts, implicit_body), wrong))
    with structlog.testing.capture_logs() as events:
        statuses = [_send_as(cfg.port, f) for f, _ in cases]
    assert statuses == [0xC210, 0xC210, 0x0000, 0x0000], [hex(s) for s in statuses]
    reasons = [e["reason"] for e in events if e["event"] == "store.refused"]
    assert reasons == [
        "data set is encoded in Implicit VR, but the presentation context negotiated Explicit VR Little Endian "
        "(1.2.840.10008.1.2.1), which is Explicit VR",
        "data set is encoded in Explicit VR, but the presentation context negotiated Implicit VR Little Endian "
        "(1.2.840.10008.1.2), which is Implicit VR"], reasons
    assert store.counts()["instances"]["total"] == 2
    spooled = sorted(store.spool_dir.rglob("*.dcm"))
    assert len(spooled) == 2
    for f in spooled:  # dcmtk reads the stored files strictly (no autodetection of the encoding)
        res = subprocess.run(["dcmdump", "-q", "+E", str(f)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and "error" not in (res.stdout + res.stderr).lower(), res.stderr
    stored_uids = {str(pydicom.dcmread(f).SOPInstanceUID) for f in spooled}
    assert stored_uids == {str(pydicom.dcmread(sources[i]).SOPInstanceUID) for i in (2, 3)}
    assert echoscu(cfg.port).returncode == 0


def _node_side_delays(server: Any) -> list[float | None]:
    """The DUL reactor sleep of each association the SCP holds open."""
    return [loop_delay(a) for a in server.active_associations]


def _poll_setup(tmp_path: Path, limits: dict[str, Any], n: int) -> tuple[Any, Store, Any, list[Path], Any]:
    """A running SCP with ``[limits]`` overrides, ``n`` MR files and a pynetdicom client AE ``SCANNER``."""
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    cfg = load_config(None, {"port": free_port(), "data_dir": str(tmp_path / "data"), "allowed_aes": ["SCANNER"],
                             "limits": limits})
    store = Store(cfg.data_dir)
    server = start_scp(cfg, store)
    ae = AE("SCANNER")
    ae.add_requested_context(MRImageStorage)
    return cfg, store, server, make_mr_series(tmp_path / "s", n=n), ae


@pytest.mark.parametrize("busy_s", [0.0001, 0.0])
def test_adaptive_poll_fast_while_storing_idle_after(tmp_path: Path, busy_s: float) -> None:
    """An association polls at ``reactor_poll_busy_seconds`` from its establishment and each C-STORE,
    at ``reactor_poll_seconds`` once idle for 0.5 s; ``reactor_poll_busy_seconds = 0`` keeps it idle."""
    cfg, store, server, files, ae = _poll_setup(tmp_path, {"reactor_poll_busy_seconds": busy_s}, 2)
    idle, fast = cfg.limits.reactor_poll_seconds, busy_s or cfg.limits.reactor_poll_seconds
    assoc = ae.associate("127.0.0.1", cfg.port, ae_title="SCINODE")
    try:
        assert assoc.is_established
        wait_for(lambda: len(server.active_associations) == 1, 5, 0.01, "the association on the node's side")
        assert _node_side_delays(server) == [fast]  # established: senders store right away
        assert int(assoc.send_c_store(files[0]).Status) == 0
        assert _node_side_delays(server) == [fast]
        wait_for(lambda: _node_side_delays(server) == [idle], 3, 0.05, "the idle poll after 0.5 s")
        assert int(assoc.send_c_store(files[1]).Status) == 0
        assert _node_side_delays(server) == [fast]  # storing again: fast again
        wait_for(lambda: _node_side_delays(server) == [idle], 3, 0.05, "the idle poll again")
        wait_for(lambda: not any(t.name == "dul-poll-sweeper" for t in threading.enumerate()), 2, 0.05,
                 "the sweeper thread to end once no association is busy")
    finally:
        assoc.release()
        server.shutdown()
        store.close()


def test_adaptive_poll_only_one_association_fast(tmp_path: Path) -> None:
    """With two associations busy at once neither polls fast (one's wait overlaps the other's work)."""
    cfg, store, server, files, ae = _poll_setup(tmp_path, {}, 3)
    idle, fast = cfg.limits.reactor_poll_seconds, cfg.limits.reactor_poll_busy_seconds
    first = ae.associate("127.0.0.1", cfg.port, ae_title="SCINODE")
    try:
        wait_for(lambda: _node_side_delays(server) == [fast], 5, 0.01, "the first association polling fast")
        second = ae.associate("127.0.0.1", cfg.port, ae_title="SCINODE")
        wait_for(lambda: len(server.active_associations) == 2, 5, 0.01, "the second association")
        assert int(first.send_c_store(files[0]).Status) == 0 and int(second.send_c_store(files[1]).Status) == 0
        assert _node_side_delays(server) == [idle, idle]
        second.release()
        wait_for(lambda: len(server.active_associations) == 1, 5, 0.01, "the second association to end")
        assert int(first.send_c_store(files[2]).Status) == 0
        assert _node_side_delays(server) == [fast]  # alone again: fast again
    finally:
        first.release()
        server.shutdown()
        store.close()
