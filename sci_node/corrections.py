"""Radiologists' corrections of the node's segmentations: recognise, measure, keep.

A radiologist edits the node's SEG in OHIF and stores the result back to Orthanc; the Orthanc
plugin hands every SEG the node did not write to ``sci-node corrections ingest FILE``, which
calls :func:`ingest_correction`. A correction is recorded only when it is a Segmentation
Storage object on the grid of a series the node segmented; then the node keeps, under
``DATA_DIR/corrections/<id>/`` (written to a temporary folder first and renamed into place
with its index row, so nothing is ever stored half-way)::

    seg.dcm                                the corrected SEG as received
    source/                                the source series' DICOM files (a copy: the node's
                                           own retention may purge its spool)
    image.nii.gz                           the source series as a volume (LPS)
    cord_corrected.nii.gz, lesion_corrected.nii.gz   the radiologist's masks on that grid
    cord_original.nii.gz, lesion_original.nii.gz     the node's masks of the same series
    correction.json                        who, when, model versions, change measures, patient

The index is ``DATA_DIR/corrections.sqlite`` (WAL), private to this module. A refused object
gets a row too (state ``refused`` and the reason), but no files. The node's own SEGs
(:func:`is_node_authored`) are never taken for corrections.

Arrays are ``(Z, Y, X)`` uint8 masks on the source series' volume grid (``SeriesVolume.image``).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sci_node.config import NodeConfig
from sci_node.errors import CorrectionNotFoundError, CorrectionRefused, SciNodeError, StorageError
from sci_node.logs import get_logger
from sci_node.private_files import create_private, make_private_dirs, open_private, write_private
from sci_node.sqlite_tx import write_tx

log = get_logger("sci_node.corrections")

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
NODE_MANUFACTURER = "sci-node"
CORD_CODE, LESION_CODE = "2748008", "52988006"
_CORD_LABEL = re.compile(r"cord", re.I)
_LESION_LABEL = re.compile(r"lesion|plaque", re.I)
POSITION_TOL_MM = 0.05
DIRECTION_TOL = 1e-3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS corrections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL,
    reason TEXT,
    received_at REAL NOT NULL,
    origin TEXT,
    seg_sop_uid TEXT,
    seg_series_uid TEXT,
    study_uid TEXT,
    source_series_uid TEXT,
    job_id INTEGER,
    patient_key TEXT,
    creator TEXT,
    created TEXT,
    model_versions TEXT,
    measures TEXT,
    notes TEXT,
    path TEXT
);
CREATE INDEX IF NOT EXISTS corrections_sop ON corrections(seg_sop_uid);
"""


# -- pure functions on arrays ---------------------------------------------------------------

def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks of the same shape (any dtype, > 0 is foreground); 1.0 when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"dice: shapes {a.shape} and {b.shape} differ")
    fa, fb = a > 0, b > 0
    total = int(fa.sum()) + int(fb.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(fa, fb).sum()) / total


def lesion_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a ``(Z, Y, X)`` mask: ``(labels int32, count)``."""
    from scipy import ndimage  # type: ignore[import-untyped]

    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), bool))
    return labels.astype(np.int32), int(n)


def lesion_changes(original: np.ndarray, corrected: np.ndarray) -> dict[str, int]:
    """Lesions the radiologist added and removed.

    A corrected lesion (26-connected component) that touches no original lesion is *added*;
    an original lesion that touches no corrected lesion is *removed*. Both masks are
    ``(Z, Y, X)`` on the same grid.
    """
    orig_lab, n_orig = lesion_components(original)
    corr_lab, n_corr = lesion_components(corrected)
    added = sum(1 for k in range(1, n_corr + 1) if not (original[corr_lab == k] > 0).any())
    removed = sum(1 for k in range(1, n_orig + 1) if not (corrected[orig_lab == k] > 0).any())
    return {"lesions_original": n_orig, "lesions_corrected": n_corr, "lesions_added": added,
            "lesions_removed": removed}


def change_measures(orig_cord: np.ndarray, orig_lesion: np.ndarray, cord: np.ndarray, lesion: np.ndarray,
                    spacing: tuple[float, float, float]) -> dict[str, Any]:
    """How much the radiologist changed: cord Dice, cord volumes (mm³), lesions added/removed.

    ``spacing`` is ``(sz, sy, sx)`` in mm; every mask ``(Z, Y, X)`` on one grid.
    """
    voxel = float(np.prod(spacing))
    out: dict[str, Any] = {"cord_dice": round(dice(orig_cord, cord), 4),
                           "cord_volume_original_mm3": round(float((orig_cord > 0).sum()) * voxel, 1),
                           "cord_volume_corrected_mm3": round(float((cord > 0).sum()) * voxel, 1),
                           "lesion_dice": round(dice(orig_lesion, lesion), 4)}
    out.update(lesion_changes(orig_lesion, lesion))
    return out


def is_node_authored(ds: Any) -> bool:
    """True for a SEG the node wrote: Manufacturer ``sci-node`` and a ``sci-node^…`` ContentCreatorName.

    A viewer may copy the node's Series Description into a corrected SEG (OHIF offers the
    loaded segmentation's label as the new series' name), so the description alone never
    makes a SEG the node's; the two fields the node sets that viewers do not copy do.
    """
    manufacturer = str(ds.get("Manufacturer", "") or "").strip()
    creator = str(ds.get("ContentCreatorName", "") or "").strip()
    return manufacturer == NODE_MANUFACTURER and creator.startswith(NODE_MANUFACTURER + "^")


def segment_roles(seg: Any) -> tuple[dict[int, str], list[str]]:
    """Map each segment number to ``"cord"`` or ``"lesion"`` (by SNOMED code, else by label).

    Returns the map and notes on segments that are neither (they are ignored).
    """
    roles: dict[int, str] = {}
    notes: list[str] = []
    for item in seg.get("SegmentSequence", []):
        number, label = int(item.SegmentNumber), str(item.get("SegmentLabel", ""))
        codes = {str(c.CodeValue) for c in item.get("SegmentedPropertyTypeCodeSequence", [])}
        if CORD_CODE in codes or (not codes & {LESION_CODE} and _CORD_LABEL.search(label)):
            roles[number] = "cord"
        elif LESION_CODE in codes or _LESION_LABEL.search(label):
            roles[number] = "lesion"
        else:
            notes.append(f"segment {number} {label!r} is neither cord nor lesion: ignored")
    return roles, notes


@dataclass(frozen=True)
class VolumeGeometry:
    """The source volume's grid: size ``(X, Y, Z)``, spacing ``(sx, sy, sz)`` mm, origin, direction (3x3)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray

    @classmethod
    def of(cls, image: Any) -> "VolumeGeometry":
        """The geometry of a 3-D ``SimpleITK.Image``."""
        nx, ny, nz = (int(v) for v in image.GetSize()[:3])
        sx, sy, sz = (float(v) for v in image.GetSpacing()[:3])
        return cls((nx, ny, nz), (sx, sy, sz), np.asarray(image.GetOrigin()[:3], float),
                   np.asarray(image.GetDirection(), float).reshape(3, 3))

    def slice_of(self, position: np.ndarray) -> int | None:
        """The slice index ``z`` whose first pixel is at ``position`` (LPS mm), or None."""
        rel = np.linalg.solve(self.direction * np.asarray(self.spacing), position - self.origin)
        z = int(round(rel[2]))
        if 0 <= z < self.size[2] and np.linalg.norm(
                self.origin + self.direction @ (np.array([0.0, 0.0, z]) * self.spacing) - position) <= POSITION_TOL_MM:
            return z
        return None


def _frame_item(seg: Any, index: int, name: str) -> Any:
    """Functional group ``name`` of frame ``index``: per-frame if present, else shared (or None)."""
    per = seg.PerFrameFunctionalGroupsSequence[index]
    if name in per:
        return per[name][0]
    shared = seg.get("SharedFunctionalGroupsSequence")
    return shared[0][name][0] if shared and name in shared[0] else None


def check_grid(seg: Any, geom: VolumeGeometry) -> None:
    """Raise :class:`CorrectionRefused` naming the mismatch when the SEG is not on ``geom``'s grid.

    Rows/Columns, pixel spacing and the plane orientation must equal the source's (within
    ``DIRECTION_TOL`` / 1e-3 mm), and every frame must lie on a source slice (within
    ``POSITION_TOL_MM``).
    """
    nx, ny, _ = geom.size
    if (int(seg.Rows), int(seg.Columns)) != (ny, nx):
        raise CorrectionRefused(f"SEG grid {int(seg.Rows)} x {int(seg.Columns)} (rows x columns) does not match "
                                f"the source series' {ny} x {nx}")
    for k in range(int(seg.get("NumberOfFrames", 1))):
        measures = _frame_item(seg, k, "PixelMeasuresSequence")
        orient = _frame_item(seg, k, "PlaneOrientationSequence")
        pos = _frame_item(seg, k, "PlanePositionSequence")
        if measures is None or orient is None or pos is None:
            raise CorrectionRefused(f"SEG frame {k + 1} lacks its pixel measures, plane orientation or position")
        sy, sx = (float(v) for v in measures.PixelSpacing)
        if abs(sy - geom.spacing[1]) > 1e-3 or abs(sx - geom.spacing[0]) > 1e-3:
            raise CorrectionRefused(f"SEG pixel spacing {sy:.4f} x {sx:.4f} mm does not match the source's "
                                    f"{geom.spacing[1]:.4f} x {geom.spacing[0]:.4f} mm")
        iop = np.asarray([float(v) for v in orient.ImageOrientationPatient])
        if np.max(np.abs(iop - np.concatenate([geom.direction[:, 0], geom.direction[:, 1]]))) > DIRECTION_TOL:
            raise CorrectionRefused(f"SEG frame {k + 1} orientation {np.round(iop, 4).tolist()} differs from the "
                                    "source series'")
        ipp = np.asarray([float(v) for v in pos.ImagePositionPatient])
        if geom.slice_of(ipp) is None:
            raise CorrectionRefused(f"SEG frame {k + 1} at {np.round(ipp, 3).tolist()} mm lies on no slice of "
                                    "the source series")


def decode_masks(seg: Any, geom: VolumeGeometry) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The SEG's cord and lesion masks, ``(Z, Y, X)`` uint8 on ``geom``'s grid, plus notes.

    Frames are placed by their plane position (checked by :func:`check_grid` first). BINARY
    frames are 0/1; FRACTIONAL ones are foreground above half the Maximum Fractional Value.

    Raises
    ------
    CorrectionRefused
        Off-grid frames, no cord segment, or pixel data that does not decode.
    """
    check_grid(seg, geom)
    roles, notes = segment_roles(seg)
    if "cord" not in roles.values():
        raise CorrectionRefused("SEG has no spinal cord segment (SNOMED 2748008 or a label with 'cord')")
    try:
        frames = np.asarray(seg.pixel_array)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad pixel data
        raise CorrectionRefused(f"SEG pixel data does not decode: {exc}") from None
    n = int(seg.get("NumberOfFrames", 1))
    frames = frames.reshape(n, int(seg.Rows), int(seg.Columns))
    if str(seg.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        frames = frames > float(seg.get("MaximumFractionalValue", 255)) / 2.0
    nx, ny, nz = geom.size
    masks = {"cord": np.zeros((nz, ny, nx), np.uint8), "lesion": np.zeros((nz, ny, nx), np.uint8)}
    for k in range(n):
        ident = _frame_item(seg, k, "SegmentIdentificationSequence")
        role = roles.get(int(ident.ReferencedSegmentNumber)) if ident is not None else None
        if role is None:
            continue
        z = geom.slice_of(np.asarray([float(v) for v in _frame_item(seg, k, "PlanePositionSequence")
                                     .ImagePositionPatient]))
        masks[role][z] |= (frames[k] > 0).astype(np.uint8)  # type: ignore[index]
    if not masks["cord"].any():
        raise CorrectionRefused("SEG's spinal cord segment is empty")
    return masks["cord"], masks["lesion"], notes


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


# -- the index ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Correction:
    """One row of ``corrections.sqlite`` (JSON columns decoded)."""

    id: int
    state: str  # "recorded" | "refused" | "expired"
    reason: str | None
    received_at: float
    origin: str | None
    seg_sop_uid: str | None
    seg_series_uid: str | None
    study_uid: str | None
    source_series_uid: str | None
    job_id: int | None
    patient_key: str | None
    creator: str | None
    created: str | None
    model_versions: dict[str, str]
    measures: dict[str, Any]
    notes: list[str]
    path: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``--json``)."""
        return asdict(self)


class CorrectionIndex:
    """``DATA_DIR/corrections.sqlite`` plus the ``DATA_DIR/corrections/`` folders."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "corrections"
        try:
            make_private_dirs(self.root)  # the data dir too, when an ingest comes before the node ever ran
            create_private(self.data_dir / "corrections.sqlite")  # 0600 before SQLite opens it (and its WAL)
            self._db = sqlite3.connect(self.data_dir / "corrections.sqlite", timeout=30.0, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"corrections index in {str(self.data_dir)!r}: {exc}") from None
        self._sweep_orphans()

    def close(self) -> None:
        """Close the SQLite connection."""
        self._db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); errors as :class:`StorageError`."""
        with write_tx(self._db, "corrections index") as db:
            yield db

    @contextlib.contextmanager
    def writer_lock(self, blocking: bool = True) -> Iterator[bool]:
        """Advisory lock (``flock`` on ``corrections/.lock``) held while a correction's folder is written
        and committed; yields False when ``blocking`` is off and another process holds it.

        Every process opening the index sweeps orphan folders (:meth:`_sweep_orphans`); without
        this lock a ``sci-node corrections list`` run during an ingest deleted the ingest's
        temporary folder, or its renamed folder before the row was committed.
        """
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"corrections lock in {str(self.root)!r}: {exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def _sweep_orphans(self) -> None:
        """Delete temporary folders and folders without a recorded row (a crash mid-ingest).

        Skipped while another process writes a correction (:meth:`writer_lock`).
        """
        with self.writer_lock(blocking=False) as free:
            if not free:
                return
            keep = {Path(r[0]).name for r in self._db.execute(
                "SELECT path FROM corrections WHERE state='recorded' AND path IS NOT NULL")}
            for entry in self.root.iterdir():
                if entry.is_dir() and entry.name not in keep and (entry.name.startswith(".tmp-")
                                                                  or entry.name.isdigit()):
                    shutil.rmtree(entry, ignore_errors=True)

    def all(self, limit: int | None = None) -> list[Correction]:
        """Every correction, newest first."""
        sql = "SELECT * FROM corrections ORDER BY id DESC" + (" LIMIT ?" if limit else "")
        return [_row(r) for r in self._db.execute(sql, (limit,) if limit else ())]

    def get(self, correction_id: int) -> Correction:
        """One correction; :class:`CorrectionNotFoundError` if there is none with that id."""
        row = self._db.execute("SELECT * FROM corrections WHERE id=?", (correction_id,)).fetchone()
        if row is None:
            raise CorrectionNotFoundError(f"correction {correction_id} does not exist")
        return _row(row)

    def by_sop(self, sop_uid: str) -> Correction | None:
        """The latest row for a SEG SOP Instance UID, or None."""
        row = self._db.execute("SELECT * FROM corrections WHERE seg_sop_uid=? ORDER BY id DESC LIMIT 1",
                               (sop_uid,)).fetchone()
        return None if row is None else _row(row)

    def insert(self, db: sqlite3.Connection, fields: dict[str, Any]) -> int:
        """Insert a row inside transaction ``db``; JSON-encodes dict/list values; returns its id."""
        cols = {k: (json.dumps(v, default=str) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
        cur = db.execute(f"INSERT INTO corrections ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                         tuple(cols.values()))
        return int(cur.lastrowid or 0)


def _row(r: sqlite3.Row) -> Correction:
    d = dict(r)
    for key, empty in (("model_versions", {}), ("measures", {}), ("notes", [])):
        d[key] = json.loads(d[key]) if d[key] else empty
    return Correction(**d)


def open_index(cfg: NodeConfig) -> CorrectionIndex:
    """The corrections index of ``cfg.data_dir`` (created if missing)."""
    return CorrectionIndex(cfg.data_dir)


# -- ingest ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class IngestOutcome:
    """What :func:`ingest_correction` did: ``state`` recorded | refused | ignored | duplicate."""

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


def ingest_correction(cfg: NodeConfig, seg_path: Path, origin: str = "cli") -> IngestOutcome:
    """Recognise, check, measure and keep one corrected SEG (see the module docstring).

    Parameters
    ----------
    cfg
        The node's configuration (``data_dir`` holds the node's index, spool, results and
        the corrections).
    seg_path
        A DICOM file: the corrected SEG (anything else is refused and recorded as such).
    origin
        Who handed it over (``orthanc`` from the plugin, ``cli`` by hand), recorded.

    Returns
    -------
    IngestOutcome
        ``recorded`` (with the new correction), ``duplicate`` (that SOP instance is already
        recorded), ``ignored`` (the node's own SEG: nothing stored) or ``refused`` (a row with
        the reason, no files).
    """
    index = open_index(cfg)
    try:
        purge_expired(cfg, index)
        return _ingest(cfg, index, Path(seg_path), origin)
    finally:
        index.close()


def _ingest(cfg: NodeConfig, index: CorrectionIndex, seg_path: Path, origin: str) -> IngestOutcome:
    facts: dict[str, Any] = {"origin": origin}
    try:
        seg = _read_seg(seg_path)
        facts.update(seg_sop_uid=str(seg.SOPInstanceUID), seg_series_uid=str(seg.get("SeriesInstanceUID", "")),
                     study_uid=str(seg.get("StudyInstanceUID", "")), creator=creator_of(seg),
                     created=created_of(seg))
        if is_node_authored(seg):
            log.info("correction.ignored", seg_sop_uid=facts["seg_sop_uid"], reason="the node's own SEG")
            return IngestOutcome("ignored", "the node's own SEG (Manufacturer sci-node): not a correction", None)
        known = index.by_sop(facts["seg_sop_uid"])
        if known is not None and known.state in ("recorded", "expired"):
            return IngestOutcome("duplicate", f"already recorded as correction {known.id}", known)
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

    from sci_node.series import read_series

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
    measures = change_measures(orig_cord, orig_lesion, cord, lesion, tuple(geom.spacing[::-1]))  # type: ignore[arg-type]
    first = volume.first
    facts.update(patient_key=str(first.get("PatientID", "") or "") or f"study-{source.study_uid}",
                 measures=measures, notes=notes)
    tmp = index.root / f".tmp-{uuid.uuid4().hex}"
    with index.writer_lock():  # no other process sweeps the folder away before its row is committed
        try:
            _write_folder(tmp, seg_path, source, volume.image, {"cord_corrected": cord, "lesion_corrected": lesion,
                                                                 "cord_original": orig_cord,
                                                                 "lesion_original": orig_lesion})
            with index.tx() as db:
                cid = index.insert(db, {**facts, "state": "recorded", "received_at": time.time()})
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
    log.info("correction.recorded", correction=cid, source_series_uid=source.series_uid, job=source.job_id,
             creator=record.creator, **{k: measures[k] for k in ("cord_dice", "lesions_added", "lesions_removed")})
    return IngestOutcome("recorded", None, record)


def _label(routing: dict[str, Any], level: str) -> str | None:
    value = routing.get(level)
    return str(value.get("label")) if isinstance(value, dict) and value.get("label") else None


def _patient(ds: Any) -> dict[str, str]:
    return {k: str(ds.get(k, "") or "") for k in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                                                    "AccessionNumber", "StudyDate")}


def _write_folder(tmp: Path, seg_path: Path, source: SourceJob, image: Any, masks: dict[str, np.ndarray]) -> None:
    """Everything a correction keeps, into ``tmp`` (fsync'd files), before it is renamed into place.

    ``tmp`` and ``tmp/source`` are created 0700 and our copies 0600; SimpleITK's NIfTI files get
    0600 from the umask the CLI sets (:mod:`sci_node.private_files`), inside the 0700 folder anyway.
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


# -- retention and statistics ---------------------------------------------------------------

def purge_expired(cfg: NodeConfig, index: CorrectionIndex, now: float | None = None) -> int:
    """Delete the folders of corrections older than ``[corrections] retention_days``; mark them ``expired``.

    The row keeps its change measures and model versions (for the statistics); the patient
    key is cleared. Returns how many were purged.
    """
    days = cfg.corrections.retention_days
    if days is None:
        return 0
    cutoff = (time.time() if now is None else now) - days * 86400.0
    old = [c for c in index.all() if c.state == "recorded" and c.received_at <= cutoff]
    for c in old:
        with index.tx() as db:
            db.execute("UPDATE corrections SET state='expired', path=NULL, patient_key=NULL WHERE id=?", (c.id,))
        if c.path:
            shutil.rmtree(c.path, ignore_errors=True)
        log.info("correction.expired", correction=c.id, retention_days=days)
    return len(old)


def summary(cfg: NodeConfig) -> dict[str, Any]:
    """Counts by state and the mean original-vs-corrected cord Dice over the last ``status_window``.

    Per cord model version too, with ``heavily_corrected`` naming the versions whose mean is
    below ``heavy_dice_below``. Reads only; an absent index gives zeros.
    """
    pol = cfg.corrections
    out: dict[str, Any] = {"received": 0, "recorded": 0, "refused": 0, "expired": 0, "window": pol.status_window,
                           "mean_cord_dice_last_n": None, "by_cord_model": {}, "heavily_corrected": []}
    if not (cfg.data_dir / "corrections.sqlite").exists():
        return out
    index = CorrectionIndex(cfg.data_dir)
    try:
        rows = index.all()
    finally:
        index.close()
    for c in rows:
        out[c.state] = out.get(c.state, 0) + 1
    out["received"] = len(rows)
    kept = [c for c in rows if c.state in ("recorded", "expired") and "cord_dice" in c.measures]
    last = kept[:pol.status_window]
    if last:
        out["mean_cord_dice_last_n"] = round(float(np.mean([c.measures["cord_dice"] for c in last])), 4)
    by: dict[str, list[float]] = {}
    for c in last:
        by.setdefault(c.model_versions.get("cord", "?"), []).append(float(c.measures["cord_dice"]))
    out["by_cord_model"] = {v: {"n": len(d), "mean_cord_dice": round(float(np.mean(d)), 4)} for v, d in by.items()}
    out["heavily_corrected"] = sorted(v for v, d in by.items() if float(np.mean(d)) < pol.heavy_dice_below)
    return out


def summary_line(s: dict[str, Any]) -> str:
    """One line for ``sci-node status``."""
    mean = s.get("mean_cord_dice_last_n")
    text = (f"{s['recorded'] + s['expired']} recorded, {s['refused']} refused"
            + (f"; mean cord Dice original vs corrected (last {s['window']}) {mean:.3f}" if mean is not None else ""))
    if s.get("heavily_corrected"):
        text += f"; HEAVILY CORRECTED cord {', '.join(s['heavily_corrected'])}"
    return text

