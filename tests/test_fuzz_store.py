"""Fuzz of the C-STORE path: mutated data sets sent by a pynetdicom client to a real in-process
SCP (``sci_node.dicom.scp.start_scp`` with a ``Store`` on a temporary dir).

Properties, for every example: the association is served (the handler never takes the server
down, a C-ECHO afterwards succeeds), the response is one of the named statuses, a Success means
the instance is on disk, indexed and parses with pydicom, and the handler never hit its
unexpected-exception path (no ``store.error`` log event). Two strategies: byte flips and
truncations of a real encoded MR data set (sent undecoded), and element-level mutations of
the data set (sent encoded by pynetdicom). Bounded by ``max_examples`` (~1 min in total).
"""
from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import MRImageStorage, Verification

from sci_node.config import NodeConfig, load_config
from sci_node.dicom.scp import start_scp
from sci_node.store import Store

from conftest import free_port, make_mr_series

DEFINED = {0x0000, 0xA700, 0xA900, 0xC210, 0x0117}
#: pydicom warns about every invalid value the fuzzer makes: expected here, not news
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FUZZ_SETTINGS = settings(max_examples=300, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Harness:
    """The SCP under test, a seed instance and the checks run after every example."""

    def __init__(self, root: Path) -> None:
        self.cfg: NodeConfig = load_config(None, {"port": free_port(), "data_dir": str(root / "data"),
                                                  "limits": {"min_free_disk_mb": 1}})
        self.store = Store(self.cfg.data_dir)
        self.server = start_scp(self.cfg, self.store)
        (self.seed,) = make_mr_series(root / "seed", n=1)
        _, offset = split_dataset(self.seed)
        self.meta, self.body = self.seed.read_bytes()[:offset], self.seed.read_bytes()[offset:]
        self.raw = root / "raw.dcm"
        self.statuses: dict[int, int] = {}

    def close(self) -> None:
        self.server.shutdown()
        self.store.close()

    def associate(self, ae: AE) -> Any:
        assoc = ae.associate("127.0.0.1", self.cfg.port, ae_title="SCINODE")
        assert assoc.is_established, "the SCP did not accept an association"
        return assoc

    def send_bytes(self, body: bytes) -> int:
        self.raw.write_bytes(self.meta + body)
        ae = AE("FUZZER")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            assoc = self.associate(ae)
            try:
                rsp = assoc.send_c_store(self.raw)
            finally:
                assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
        return int(rsp.Status) if "Status" in rsp else -1

    def send_dataset(self, ds: pydicom.Dataset) -> int | None:
        """Send ``ds`` encoded by pynetdicom; None when the client itself cannot encode/send it."""
        ae = AE("FUZZER")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = self.associate(ae)
        try:
            rsp = assoc.send_c_store(ds)
        except (ValueError, AttributeError, TypeError, OverflowError, KeyError):
            return None  # e.g. no SOP Class/Instance UID left, or an unencodable value
        finally:
            if assoc.is_established:
                assoc.release()
        return int(rsp.Status) if "Status" in rsp else -1

    def check(self, status: int | None, sop_uid: str, events: list[dict]) -> None:
        errors = [e for e in events if e.get("event") == "store.error" or e.get("log_level") == "critical"]
        assert not errors, f"the C-STORE handler hit an unexpected exception: {errors}"
        if status is None:
            return
        self.statuses[status] = self.statuses.get(status, 0) + 1
        assert status in DEFINED, f"undefined status 0x{status:04X}"
        if status != 0x0000:  # every refusal is logged with its reason (and the log capture works)
            assert any(e.get("event") in ("store.refused", "store.failed") for e in events), events
        if status == 0x0000:
            with contextlib.closing(sqlite3.connect(self.cfg.data_dir / "index.sqlite3")) as con:
                row = con.execute("SELECT path FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone()
            assert row is not None, f"acknowledged {sop_uid} is not indexed"
            stored = pydicom.dcmread(self.cfg.data_dir / row[0])
            assert str(stored.SOPInstanceUID) == sop_uid
        echo_ae = AE("FUZZER")
        echo_ae.add_requested_context(Verification)
        assoc = self.associate(echo_ae)
        try:
            assert assoc.send_c_echo().Status == 0
        finally:
            assoc.release()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("fuzz"))
    try:
        yield h
    finally:
        h.close()


byte_edits = st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(0, 255)),
                      min_size=1, max_size=8)


@FUZZ_SETTINGS
@given(edits=byte_edits, cut=st.one_of(st.none(), st.integers(min_value=0, max_value=10_000)))
def test_byte_flips_and_truncations(harness: Harness, edits: list[tuple[int, int]], cut: int | None) -> None:
    body = bytearray(harness.body)
    for pos, value in edits:
        body[pos % len(body)] = value
    if cut is not None:
        body = body[: cut % (len(body) + 1)]
    sop_uid = str(pydicom.dcmread(harness.seed, stop_before_pixels=True).SOPInstanceUID)
    with structlog.testing.capture_logs() as events:
        status = harness.send_bytes(bytes(body))
    harness.check(status, sop_uid, events)


KEYWORDS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
            "NumberOfFrames", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "StudyInstanceUID",
            "SeriesInstanceUID", "PixelData", "PatientName", "SpecificCharacterSet", "PhotometricInterpretation",
            "SliceThickness", "InstanceNumber"]

values = st.one_of(st.integers(min_value=-(2**31), max_value=2**31 - 1), st.text(max_size=80),
                   st.binary(max_size=20_000), st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=7),
                   st.none())
element_ops = st.lists(st.tuples(st.sampled_from(["delete", "set", "uid"]), st.sampled_from(KEYWORDS), values),
                       min_size=1, max_size=5)


def _mutate(ds: pydicom.Dataset, op: str, keyword: str, value: Any) -> None:
    if op == "delete":
        if keyword in ds:
            delattr(ds, keyword)
    elif op == "uid":
        if keyword.endswith("UID"):
            setattr(ds, keyword, str(value)[:64] if value is not None else "")
    else:
        try:
            setattr(ds, keyword, value)
        except Exception:
            pass  # pydicom refuses the value for this VR: nothing to send for this op


@FUZZ_SETTINGS
@given(ops=element_ops)
def test_element_mutations(harness: Harness, ops: list[tuple[str, str, Any]]) -> None:
    ds = pydicom.dcmread(harness.seed)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    for op, keyword, value in ops:
        _mutate(ds, op, keyword, value)
    with structlog.testing.capture_logs() as events:
        status = harness.send_dataset(ds)
    harness.check(status, str(ds.SOPInstanceUID), events)


def test_fuzz_leaves_only_parseable_files(harness: Harness) -> None:
    """Runs after the fuzzers (file order): the spool holds only whole, parseable files."""
    files = [p for p in (harness.cfg.data_dir / "spool").rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]
    for p in files:
        pydicom.dcmread(p)
    print(f"statuses seen: { {f'0x{k:04X}': v for k, v in sorted(harness.statuses.items())} }, "
          f"{len(files)} files spooled")
    assert harness.statuses.get(0x0000, 0) >= 1 and harness.statuses.get(0xC210, 0) >= 1
