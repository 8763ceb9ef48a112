"""Radiologists' corrections of the node's segmentations: recognise, measure, keep.

A radiologist edits the node's SEG in OHIF and stores the result back to Orthanc; the Orthanc
plugin hands every SEG the node did not write to ``sci-node corrections ingest FILE``, which
calls :func:`ingest_correction` with who stored it. A correction is kept only when it arrived by
an authenticated path (:mod:`sci_node.corrections.trust`: an Orthanc user by STOW-RS, an allow-listed
DICOM AE@host, or an admin's CLI) and is a Segmentation Storage object on the grid of a series the
node segmented. It is then **pending**: it reaches export, training and the statistics only once
an admin accepts it (``sci-node corrections accept ID``, or the status page); implausible ones
carry flags and are accepted only with ``--force``. The same masks of the same series sent again
are a duplicate and kept once. The node keeps, under
``DATA_DIR/corrections/<id>/`` (written to a temporary folder first and renamed into place
with its index row, so nothing is ever stored half-way)::

    seg.dcm                                the corrected SEG as received
    source/                                the source series' DICOM files (a copy: the node's
                                           own retention may purge its spool)
    image.nii.gz                           the source series as a volume (LPS)
    cord_corrected.nii.gz, lesion_corrected.nii.gz   the radiologist's masks on that grid
    cord_original.nii.gz, lesion_original.nii.gz     the node's masks of the same series
    correction.json                        sender, when, model versions, change measures, flags, patient

The index is ``DATA_DIR/corrections.sqlite`` (WAL, :mod:`sci_node.corrections.index`). A refused object
gets a row too (state ``refused`` and the reason), but no files. The node's own SEGs
(:func:`is_node_authored`) are never taken for corrections.

Arrays are ``(Z, Y, X)`` uint8 masks on the source series' volume grid (``SeriesVolume.image``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sci_node.config import NodeConfig
from sci_node.corrections.grid import decode_masks
from sci_node.corrections.index import Correction, CorrectionIndex, open_index, purge_expired
from sci_node.corrections.measures import change_measures
from sci_node.corrections.trust import Sender, authenticate, mask_hash, plausibility_flags
from sci_node.dicom.geometry import VolumeGeometry
from sci_node.errors import CorrectionRefused, SciNodeError
from sci_node.logs import get_logger
from sci_node.store.private_files import make_private_dirs, open_private, write_private

log = get_logger("sci_node.corrections")

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
NODE_MANUFACTURER = "sci-node"


def is_node_authored(ds: Any) -> bool:
    """True for a SEG the node wrote: Manufacturer ``sci-node`` and a ``sci-node^…`` ContentCreatorName.

    A viewer may copy the node's Series Description into a corrected SEG (OHIF offers the
    loaded segmentation's label as the new series' name), so the description alone never
    makes a SEG the node's; the two fields the node sets that viewers do not copy do.
    """
    manufacturer = str(ds.get("Manufacturer", "") or "").strip()
    creator = str(ds.get("ContentCreatorName", "") or "").strip()
    return manufacturer == NODE_MANUFACTURER and creator.startswith(NODE_MANUFACTURER + "^")


# -- who and when ---------------------------------------------------------------------------

def creator_of(ds: Any) -> str:
    """Who made the correction: ContentCreatorName, else OperatorsName, else ``"unknown"``."""
    for key in ("ContentCreatorName", "OperatorsName"):
        value = str(ds.get(key, "") or "").strip()
        if value:
            return value
    return "unknown"


def created_of(ds: Any) -> str | None:
    """When: ContentDate/Time, else InstanceCreation-, else Series Date/Time, as ``YYYY-MM-DDTHH:MM:SS``."""
    for d, t in (("ContentDate", "ContentTime"), ("InstanceCreationDate", "InstanceCreationTime"),
                 ("SeriesDate", "SeriesTime")):
        date = str(ds.get(d, "") or "")
        if re.fullmatch(r"\d{8}", date):
            tm = (re.sub(r"\D", "", str(ds.get(t, "") or "").split(".")[0]) + "000000")[:6]
            return f"{date[:4]}-{date[4:6]}-{date[6:]}T{tm[:2]}:{tm[2:4]}:{tm[4:]}"
    return None


# -- ingest ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class IngestOutcome:
    """What :func:`ingest_correction` did: ``state`` pending | refused | ignored | duplicate."""

    state: str
    reason: str | None
    correction: Correction | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``sci-node corrections ingest --json``; the plugin reads it)."""
        return {"state": self.state, "reason": self.reason,
                "correction": self.correction.to_dict() if self.correction else None}


@dataclass(frozen=True)
class SourceJob:
    """The node's job that segmented the referenced series: its result folder and files."""

    job_id: int
    study_uid: str
    series_uid: str
    result_dir: Path
    files: tuple[Path, ...]
    model_versions: dict[str, str]
    routing: dict[str, Any]
    outputs: tuple[str, ...]


def find_source_job(cfg: NodeConfig, series_uid: str) -> SourceJob:
    """The latest ``done`` job of ``series_uid`` in the node's index, with its spooled files.

    Raises
    ------
    CorrectionRefused
        The node never segmented that series, or its spool/results were purged (retention).
    """
    from sci_node.store import Store

    if not (cfg.data_dir / "index.sqlite3").exists():
        raise CorrectionRefused(f"references series {series_uid}, but the node has no index in "
                                f"{str(cfg.data_dir)!r}")
    store = Store(cfg.data_dir)
    try:
        jobs = [j for j in store.jobs(limit=1_000_000) if j.series_uid == series_uid]
        done = [j for j in jobs if j.state == "done" and (j.result or {}).get("outputs")]
        if not done:
            what = f"jobs {', '.join(f'{j.id} ({j.state})' for j in jobs)}" if jobs else "no job"
            raise CorrectionRefused(f"references series {series_uid}, which the node has not segmented ({what})")
        job = done[0]  # newest first
        files = tuple(store.series_files(series_uid))
    finally:
        store.close()
    result = job.result or {}
    result_dir = Path(result["outputs"][0]).parent
    if not files:
        raise CorrectionRefused(f"source series {series_uid} is no longer in the node's spool (retention)")
    if not (result_dir / "cord.nii.gz").is_file():
        raise CorrectionRefused(f"the node's masks of series {series_uid} (job {job.id}) are gone from "
                                f"{str(result_dir)!r} (retention)")
    return SourceJob(job.id, job.study_uid, series_uid, result_dir, files, dict(result.get("model_versions", {})),
                     dict(result.get("routing", {})), tuple(str(o) for o in result.get("outputs", ())))


def referenced_series(seg: Any) -> str:
    """The one source series a SEG references (ReferencedSeriesSequence); refused if none or several."""
    uids = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if len(uids) != 1:
        raise CorrectionRefused(f"SEG references {len(uids)} source series ({sorted(uids)}); a correction "
                                "must reference exactly one")
    return uids.pop()


def _read_seg(path: Path) -> Any:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on garbage
        raise CorrectionRefused(f"{path.name} is not a readable DICOM file: {exc}") from None
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class != SEG_SOP_CLASS:
        from pydicom.uid import UID

        raise CorrectionRefused(f"SOP class {sop_class or '(none)'} ({UID(sop_class).name if sop_class else '-'}, "
                                f"Modality {ds.get('Modality', '-')}) is not Segmentation Storage "
                                f"({SEG_SOP_CLASS}): not a correction")
    return ds


def ingest_correction(cfg: NodeConfig, seg_path: Path, origin: str = "cli",
                      sender: Sender | None = None) -> IngestOutcome:
    """Recognise, check, measure and keep one corrected SEG (see the module docstring).

    Parameters
    ----------
    cfg
        The node's configuration (``data_dir`` holds the node's index, spool, results and
        the corrections).
    seg_path
        A DICOM file: the corrected SEG (anything else is refused and recorded as such).
    origin
        Which program handed it over (``orthanc`` from the plugin, ``cli`` by hand), recorded.
    sender
        Who stored it, authenticated (:class:`~sci_node.corrections.trust.Sender`); None is no
        authentication, and the correction is refused.

    Returns
    -------
    IngestOutcome
        ``pending`` (with the new correction), ``duplicate`` (that SOP instance, or the same
        masks of the same series, is already kept), ``ignored`` (the node's own SEG: nothing
        stored) or ``refused`` (a row with the reason, no files).
    """
    index = open_index(cfg)
    try:
        purge_expired(cfg, index)
        return _ingest(cfg, index, Path(seg_path), origin, sender or Sender("none"))
    finally:
        index.close()


def _ingest(cfg: NodeConfig, index: CorrectionIndex, seg_path: Path, origin: str, sender: Sender) -> IngestOutcome:
    facts: dict[str, Any] = {"origin": origin, "sender": str(sender)}
    try:
        seg = _read_seg(seg_path)
        facts.update(seg_sop_uid=str(seg.SOPInstanceUID), seg_series_uid=str(seg.get("SeriesInstanceUID", "")),
                     study_uid=str(seg.get("StudyInstanceUID", "")), creator=creator_of(seg),
                     created=created_of(seg))
        if is_node_authored(seg):
            log.info("correction.ignored", seg_sop_uid=facts["seg_sop_uid"], reason="the node's own SEG")
            return IngestOutcome("ignored", "the node's own SEG (Manufacturer sci-node): not a correction", None)
        authenticate(cfg.corrections, sender)
        known = index.by_sop(facts["seg_sop_uid"])
        if known is not None and known.state not in ("refused",):
            return IngestOutcome("duplicate", f"already kept as correction {known.id} ({known.state})", known)
        facts["source_series_uid"] = referenced_series(seg)
        source = find_source_job(cfg, facts["source_series_uid"])
        if facts["seg_sop_uid"] in {_sop_of(p) for p in source.outputs}:
            return IngestOutcome("ignored", "the node's own SEG (one of its job outputs): not a correction", None)
        if facts["study_uid"] != source.study_uid:
            raise CorrectionRefused(f"SEG is in study {facts['study_uid']}, its source series in {source.study_uid}")
        facts.update(job_id=source.job_id, model_versions=source.model_versions)
        return _record(cfg, index, seg, seg_path, source, facts)
    except CorrectionRefused as exc:
        return _refuse(index, facts, str(exc))


def _sop_of(path: str) -> str | None:
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except Exception:  # noqa: BLE001 - an output file purged or unreadable: not ours to match
        return None


def _refuse(index: CorrectionIndex, facts: dict[str, Any], reason: str) -> IngestOutcome:
    with index.tx() as db:
        if facts.get("seg_sop_uid"):
            db.execute("DELETE FROM corrections WHERE seg_sop_uid=? AND state='refused'", (facts["seg_sop_uid"],))
        cid = index.insert(db, {**facts, "state": "refused", "reason": reason, "received_at": time.time()})
    log.warning("correction.refused", correction=cid, reason=reason, seg_sop_uid=facts.get("seg_sop_uid"),
                source_series_uid=facts.get("source_series_uid"))
    return IngestOutcome("refused", reason, index.get(cid))


def _record(cfg: NodeConfig, index: CorrectionIndex, seg: Any, seg_path: Path, source: SourceJob,
            facts: dict[str, Any]) -> IngestOutcome:
    import SimpleITK as sitk

    from sci_node.pipeline.series import read_series

    try:
        volume = read_series(list(source.files), cfg.max_missing_fraction)
    except SciNodeError as exc:
        raise CorrectionRefused(f"source series {source.series_uid} does not read as a volume: {exc}") from None
    geom = VolumeGeometry.of(volume.image)
    cord, lesion, notes = decode_masks(seg, geom)
    orig_cord = sitk.GetArrayFromImage(sitk.ReadImage(str(source.result_dir / "cord.nii.gz"))).astype(np.uint8)
    les_path = source.result_dir / "lesion.nii.gz"
    orig_lesion = (sitk.GetArrayFromImage(sitk.ReadImage(str(les_path))).astype(np.uint8) if les_path.is_file()
                   else np.zeros_like(orig_cord))
    if orig_cord.shape != cord.shape:
        raise CorrectionRefused(f"the node's masks {orig_cord.shape} are not on the source grid {cord.shape}")
    spacing = tuple(float(v) for v in geom.spacing[::-1])
    measures = change_measures(orig_cord, orig_lesion, cord, lesion, spacing)  # type: ignore[arg-type]
    digest = mask_hash(source.series_uid, cord, lesion)
    same = index.by_hash(digest)
    if same is not None:
        log.info("correction.duplicate", correction=same.id, seg_sop_uid=facts["seg_sop_uid"])
        return IngestOutcome("duplicate", f"the same masks of series {source.series_uid} are already kept as "
                                          f"correction {same.id} ({same.state})", same)
    flags = plausibility_flags(cfg.corrections, orig_cord, cord, lesion, spacing,  # type: ignore[arg-type]
                               measures.get("cord_dice"))
    first = volume.first
    facts.update(patient_key=str(first.get("PatientID", "") or "") or f"study-{source.study_uid}",
                 measures=measures, notes=notes, flags=flags, mask_hash=digest)
    tmp = index.root / f".tmp-{uuid.uuid4().hex}"
    with index.writer_lock():  # no other process sweeps the folder away before its row is committed
        try:
            _write_folder(tmp, seg_path, source, volume.image, {"cord_corrected": cord, "lesion_corrected": lesion,
                                                                 "cord_original": orig_cord,
                                                                 "lesion_original": orig_lesion})
            with index.tx() as db:
                cid = index.insert(db, {**facts, "state": "pending", "received_at": time.time()})
                final = index.root / str(cid)
                meta = {**facts, "id": cid, "sequence": _label(source.routing, "sequence"),
                        "view": _label(source.routing, "view"), "patient": _patient(first),
                        "spacing_zyx_mm": list(geom.spacing[::-1])}
                write_private(tmp / "correction.json", json.dumps(meta, indent=2, default=str).encode("utf-8"))
                db.execute("UPDATE corrections SET path=? WHERE id=?", (str(final), cid))
                os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    record = index.get(cid)
    log.info("correction.pending", correction=cid, source_series_uid=source.series_uid, job=source.job_id,
             sender=record.sender, flags=flags,
             **{k: measures[k] for k in ("cord_dice", "lesions_added", "lesions_removed")})
    return IngestOutcome("pending", None, record)


def _label(routing: dict[str, Any], level: str) -> str | None:
    value = routing.get(level)
    return str(value.get("label")) if isinstance(value, dict) and value.get("label") else None


def _patient(ds: Any) -> dict[str, str]:
    return {k: str(ds.get(k, "") or "") for k in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                                                    "AccessionNumber", "StudyDate")}


def _write_folder(tmp: Path, seg_path: Path, source: SourceJob, image: Any, masks: dict[str, np.ndarray]) -> None:
    """Everything a correction keeps, into ``tmp`` (fsync'd files), before it is renamed into place.

    ``tmp`` and ``tmp/source`` are created 0700 and our copies 0600; SimpleITK's NIfTI files get
    0600 from the umask the CLI sets (:mod:`sci_node.store.private_files`), inside the 0700 folder anyway.
    """
    import SimpleITK as sitk

    make_private_dirs(tmp / "source")
    _copy_private(seg_path, tmp / "seg.dcm")
    for f in source.files:
        _copy_private(f, tmp / "source" / f.name)
    sitk.WriteImage(image, str(tmp / "image.nii.gz"), True)
    for name, arr in masks.items():
        img = sitk.GetImageFromArray(arr.astype(np.uint8))
        img.CopyInformation(image)
        sitk.WriteImage(img, str(tmp / f"{name}.nii.gz"), True)
    for f in tmp.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _copy_private(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new file ``dst`` created with mode 0600."""
    with open(src, "rb") as fin, os.fdopen(open_private(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
