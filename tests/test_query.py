"""C-FIND and C-GET of a prior (sci_node.dicom.query) against a real Orthanc, fed by dcmtk's storescu."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from orthanc_support import BareOrthanc

from sci_node.config import Destination, TLSConfig
from sci_node.dicom.query import find_mr_series, get_series
from sci_node.errors import DicomNetworkError

from stack_support import free_ports

REPO = Path(__file__).resolve().parent.parent
SAMPLE = sorted((REPO / "sample" / "series").glob("*.dcm"))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Destination]:
    """A bare Orthanc that lets ``SCINODE`` find and get, and holds the sample series as two studies."""
    tmp = tmp_path_factory.mktemp("orthanc-qr")
    http, dicom = free_ports(2)
    pacs = BareOrthanc(tmp / "orthanc", dicom, http).start()
    try:
        # the sample as the current study, and a copy of it one year earlier (the prior) under new UIDs
        prior = tmp / "prior"
        prior.mkdir()
        uids = {k: pydicom.uid.generate_uid() for k in ("study", "series")}
        for f in SAMPLE:
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            ds.StudyDate = "20151130"
            ds.save_as(prior / f.name)
        pacs.store(SAMPLE)
        pacs.store(sorted(prior.glob("*.dcm")))
        yield pacs.peer
    finally:
        pacs.stop()


def test_find_lists_the_patients_mr_series_newest_study_first(orthanc: Destination) -> None:
    first = pydicom.dcmread(SAMPLE[0], stop_before_pixels=True)
    found = find_mr_series(orthanc, "SCINODE", TLSConfig(), str(first.PatientID))
    assert [s.study_date for s in found] == [str(first.StudyDate), "20151130"]
    assert found[0].series_uid == str(first.SeriesInstanceUID)
    assert found[1].instances == len(SAMPLE) and found[1].modality == "MR"
    earlier = find_mr_series(orthanc, "SCINODE", TLSConfig(), str(first.PatientID), date_range="-20161231")
    assert [s.study_date for s in earlier] == ["20151130"]
    assert find_mr_series(orthanc, "SCINODE", TLSConfig(), "NO-SUCH-PATIENT") == []


def test_get_fetches_the_whole_series_without_a_move(orthanc: Destination, tmp_path: Path) -> None:
    first = pydicom.dcmread(SAMPLE[0], stop_before_pixels=True)
    prior = find_mr_series(orthanc, "SCINODE", TLSConfig(), str(first.PatientID), date_range="-20161231")[0]
    files = get_series(orthanc, "SCINODE", TLSConfig(), prior.study_uid, prior.series_uid, tmp_path / "prior")
    assert len(files) == len(SAMPLE)
    got = sorted(int(pydicom.dcmread(f).InstanceNumber) for f in files)
    assert got == sorted(int(pydicom.dcmread(f).InstanceNumber) for f in SAMPLE)
    assert pydicom.dcmread(files[0]).pixel_array.shape == pydicom.dcmread(SAMPLE[0]).pixel_array.shape
    assert (tmp_path / "prior").stat().st_mode & 0o777 == 0o700


def test_an_ae_the_pacs_does_not_know_or_a_dead_pacs_is_a_network_error(orthanc: Destination) -> None:
    with pytest.raises(DicomNetworkError, match="C-FIND|associat|reject"):
        find_mr_series(orthanc, "STRANGER", TLSConfig(), "x")
    (dead,) = free_ports(1)
    with pytest.raises(DicomNetworkError, match="cannot associate"):
        find_mr_series(Destination("ORTHANC", "127.0.0.1", dead), "SCINODE", TLSConfig(), "x", timeout=5)
