"""Query/retrieve against a PACS: C-FIND a patient's earlier MR series and C-GET one (issue 39's prior).

A thin adapter, no image math. The node asks the configured peer (``[followup] pacs``; in the stack,
its own Orthanc) with Study Root C-FIND at STUDY then SERIES level, and fetches a series with
C-GET on the same association, so the prior never enters the node's spool as a new series (a
C-MOVE to the node's own AE would). Failures raise :class:`~sci_node.errors.DicomNetworkError`
(unreachable, rejected, a failed query); the caller retries later.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import build_role, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EnhancedMRImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from sci_node.config import Destination, TLSConfig
from sci_node.dicom.dimse import Status
from sci_node.dicom.scu import open_association
from sci_node.errors import DicomNetworkError

log = structlog.get_logger("sci_node.query")

#: what a prior can be stored as (the node reads both)
GET_SOP_CLASSES = (MRImageStorage, EnhancedMRImageStorage)
GET_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEG2000Lossless,
                JPEGLosslessSV1, RLELossless)
_PENDING = (0xFF00, 0xFF01)


@dataclass(frozen=True)
class RemoteSeries:
    """One series the PACS holds: what C-FIND at SERIES level answered."""

    study_uid: str
    series_uid: str
    study_date: str
    modality: str
    description: str
    instances: int | None


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def _find(assoc: Any, query: Dataset, what: str) -> list[Dataset]:
    """Every identifier a C-FIND returned; raises when it did not end in Success."""
    out: list[Dataset] = []
    last = None
    for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        last = int(status.Status) if status is not None and "Status" in status else None
        if last in _PENDING and ident is not None:
            out.append(ident)
    if last != Status.SUCCESS:
        raise DicomNetworkError(f"C-FIND {what}: no success (status {last if last is None else hex(last)})")
    return out


def find_mr_series(peer: Destination, calling_ae: str, tls: TLSConfig, patient_id: str, issuer: str = "",
                   date_range: str = "", timeout: float = 30.0) -> list[RemoteSeries]:
    """The MR series of ``patient_id`` (and ``issuer`` when given) in studies dated within ``date_range``.

    Parameters
    ----------
    date_range : str
        A DICOM date range (``"20160101-20261206"``), empty for any date.

    Returns
    -------
    list of RemoteSeries
        Newest study first; series in the order the PACS answered.
    """
    assoc = open_association(peer, calling_ae, tls, [(StudyRootQueryRetrieveInformationModelFind,
                                                      [ExplicitVRLittleEndian, ImplicitVRLittleEndian])], timeout)
    try:
        keys = {"PatientID": patient_id, "StudyInstanceUID": "", "StudyDate": date_range, "ModalitiesInStudy": ""}
        if issuer:
            keys["IssuerOfPatientID"] = issuer
        studies = _find(assoc, _identifier("STUDY", **keys), f"studies of a patient at {peer}")
        found: list[RemoteSeries] = []
        for st in sorted(studies, key=lambda d: str(d.get("StudyDate", "")), reverse=True):
            if issuer and str(st.get("IssuerOfPatientID", issuer) or issuer) != issuer:
                continue
            study_uid, date = str(st.get("StudyInstanceUID", "")), str(st.get("StudyDate", ""))
            series = _find(assoc, _identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="",
                                              Modality="", SeriesDescription="", NumberOfSeriesRelatedInstances=""),
                           f"series of study {study_uid} at {peer}")
            for se in series:
                if str(se.get("Modality", "")) != "MR":
                    continue
                n = se.get("NumberOfSeriesRelatedInstances")
                found.append(RemoteSeries(study_uid, str(se.SeriesInstanceUID), date, "MR",
                                          str(se.get("SeriesDescription", "") or ""), int(n) if n not in (None, "")
                                          else None))
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("query.found", peer=str(peer), series=len(found))
    return found


def _store_handler(dest: Path, kept: list[Path]) -> Any:
    def handle(event: Event) -> int:
        """Write one C-GET sub-operation's instance to ``dest``; a storage failure answers 0xA700."""
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            path = dest / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            kept.append(path)
            return int(Status.SUCCESS)
        except Exception as exc:  # noqa: BLE001 - never raise into pynetdicom
            log.warning("query.get_store_failed", reason=str(exc)[:200])
            return 0xA700
    return handle


def get_series(peer: Destination, calling_ae: str, tls: TLSConfig, study_uid: str, series_uid: str, dest: Path,
               timeout: float = 60.0) -> list[Path]:
    """C-GET one series into ``dest`` (created, 0700); return the files written.

    Raises
    ------
    DicomNetworkError
        The association failed, or the C-GET ended with failed sub-operations or without success.
    """
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(dest, 0o700)
    contexts = [(StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    contexts += [(sop, list(GET_SYNTAXES)) for sop in GET_SOP_CLASSES]
    kept: list[Path] = []
    roles = [build_role(sop, scp_role=True) for sop in GET_SOP_CLASSES]
    assoc = open_association(peer, calling_ae, tls, contexts, timeout, ext_neg=roles,
                             handlers=[(evt.EVT_C_STORE, _store_handler(dest, kept))])
    last, failed = None, 0
    try:
        query = _identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        for status, _ident in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status is not None and "Status" in status:
                last = int(status.Status)
                failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
    finally:
        if assoc.is_established:
            assoc.release()
    if last not in (Status.SUCCESS, 0xB000) or failed or not kept:
        raise DicomNetworkError(f"C-GET series {series_uid} from {peer}: status "
                                f"{last if last is None else hex(last)}, {failed} failed, {len(kept)} received")
    log.info("query.got", peer=str(peer), series_uid=series_uid, files=len(kept))
    return kept
