"""``sci-node corrections list|show|export|ingest|purge``: presenters and the trainer export.

What they print goes through :mod:`sci_node.terminal`: a correction's creator, reason and UIDs come from
a SEG someone stored, so their control characters are escaped.

``export`` writes the BIDS-like layout :mod:`trainer.data` reads (one image per correction)::

    DIR/sub-<key>/anat/sub-<key>_acq-corr<ID>_<seq>.nii.gz        the source series (LPS)
    DIR/sub-<key>/anat/sub-<key>_acq-corr<ID>_<seq>.json          sidecar: correction, models, measures
    DIR/derivatives/labels/sub-<key>/anat/..._seg-manual.nii.gz     the corrected cord
    DIR/derivatives/labels/sub-<key>/anat/..._lesion-manual.nii.gz  the corrected lesions
    DIR/sci-node-corrections.json                                  manifest

``<key>`` is one per patient, so the trainer splits corrections by patient. With
``deidentify`` (the default) it is a keyed hash of the Patient ID (HMAC-SHA256 with a random
site key kept in ``DATA_DIR/corrections/.pseudonym-key``, mode 0600: stable across exports,
not reversible without the key) and the sidecars carry no patient, study, UID, date or
person names; NIfTI headers carry none either.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from sci_node.config import NodeConfig
from sci_node.corrections import Correction, open_index, purge_expired, summary, summary_line
from sci_node.errors import ConfigError, CorrectionRefused
from sci_node.logs import get_logger
from sci_node.private_files import make_private_dirs, open_private
from sci_node.terminal import echo, echo_json, printable

log = get_logger("sci_node.corrections")
MANIFEST = "sci-node-corrections.json"


def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _rows(cfg: NodeConfig) -> list[Correction]:
    index = open_index(cfg)
    try:
        purge_expired(cfg, index)
        return index.all()
    finally:
        index.close()


def list_corrections(cfg: NodeConfig, as_json: bool = False, limit: int | None = None) -> int:
    """Every correction (recorded, refused, expired), newest first, and the summary."""
    rows = _rows(cfg)[:limit] if limit else _rows(cfg)
    if as_json:
        echo_json({"corrections": [c.to_dict() for c in rows], "summary": summary(cfg)})
        return 0
    echo(f"corrections   {summary_line(summary(cfg))}")
    if not rows:
        echo("no corrections")
        return 0
    echo(f"  {'id':>4}  {'state':<9} {'received':<19}  {'cord Dice':>9} {'+les':>4} {'-les':>4}  "
         f"{'creator':<20} source series / reason")
    for c in rows:
        m = c.measures
        dice = f"{m['cord_dice']:.3f}" if "cord_dice" in m else "-"
        creator = printable(c.creator or "-")[:20]  # escaped before it is cut: no half escape sequence
        echo(f"  {c.id:>4}  {c.state:<9} {_ts(c.received_at):<19}  {dice:>9} "
             f"{m.get('lesions_added', '-'):>4} {m.get('lesions_removed', '-'):>4}  "
             f"{creator:<20} {c.source_series_uid or '-'}" + (f"  ({c.reason})" if c.reason else ""))
    return 0


def show_correction(cfg: NodeConfig, correction_id: int, as_json: bool = False) -> int:
    """One correction with its measures, model versions and files."""
    index = open_index(cfg)
    try:
        c = index.get(correction_id)
    finally:
        index.close()
    files = sorted(str(p.relative_to(c.path)) for p in Path(c.path).rglob("*") if p.is_file()) if c.path else []
    if as_json:
        echo_json(c.to_dict() | {"files": files})
        return 0
    echo(f"correction {c.id}: {c.state}" + (f" ({c.reason})" if c.reason else ""))
    for key in ("origin", "creator", "created", "study_uid", "source_series_uid", "seg_series_uid", "seg_sop_uid",
                "job_id", "path"):
        echo(f"  {key:<18} {getattr(c, key) or '-'}")
    echo(f"  {'received':<18} {_ts(c.received_at)}")
    for key in ("model_versions", "measures", "notes"):
        if getattr(c, key):
            echo(f"  {key:<18} {json.dumps(getattr(c, key), default=str)}")
    if files:
        echo(f"  {'files':<18} {len(files)} ({', '.join(f for f in files if '/' not in f)})")
    return 0


def ingest_files(cfg: NodeConfig, paths: Sequence[Path], origin: str = "cli", as_json: bool = False) -> int:
    """``ingest FILE...``: 0 when every file was recorded, a duplicate or ignored; 1 if one was refused."""
    from sci_node.corrections import ingest_correction

    outcomes = [ingest_correction(cfg, Path(p), origin) for p in paths]
    if as_json:
        echo_json([o.to_dict() for o in outcomes], indent=None)
    else:
        for p, o in zip(paths, outcomes):
            cid = f" as correction {o.correction.id}" if o.correction else ""
            echo(f"{p}: {o.state}{cid}" + (f" ({o.reason})" if o.reason else ""))
    return 1 if any(o.state == "refused" for o in outcomes) else 0


def purge(cfg: NodeConfig) -> int:
    """``purge``: apply ``[corrections] retention_days`` now."""
    index = open_index(cfg)
    try:
        n = purge_expired(cfg, index)
    finally:
        index.close()
    echo(f"{n} correction(s) past retention purged")
    return 0


# -- export ---------------------------------------------------------------------------------

def pseudonym_key(cfg: NodeConfig) -> bytes:
    """The site's random pseudonym key (created once, mode 0600)."""
    path = cfg.data_dir / "corrections" / ".pseudonym-key"
    make_private_dirs(path.parent)
    try:
        fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return path.read_bytes()
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


def subject_label(patient_id: str, correction_id: int, key: bytes | None) -> str:
    """BIDS subject label of a patient: keyed hash (de-identified) or the Patient ID's letters and digits."""
    if key is not None:
        return "c" + hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:12]
    clean = re.sub(r"[^A-Za-z0-9]", "", patient_id)
    return clean or f"corr{correction_id}"


def _sidecar(meta: dict[str, Any], deidentify: bool) -> dict[str, Any]:
    side = {"SciNodeCorrection": meta["id"], "ModelVersions": meta.get("model_versions", {}),
            "ChangeMeasures": meta.get("measures", {}), "Sequence": meta.get("sequence"), "View": meta.get("view"),
            "Notes": meta.get("notes", []), "Deidentified": deidentify}
    if not deidentify:
        patient = meta.get("patient", {})
        side.update(PatientID=patient.get("PatientID"), PatientName=patient.get("PatientName"),
                    StudyInstanceUID=meta.get("study_uid"), SeriesInstanceUID=meta.get("source_series_uid"),
                    CorrectedBy=meta.get("creator"), CorrectedAt=meta.get("created"))
    return side


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ConfigError(f"export folder {str(out)!r} is not empty and holds no earlier corrections export "
                              f"({MANIFEST}): choose an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def export_corrections(cfg: NodeConfig, out: Path, deidentify: bool = True) -> list[Path]:
    """Write every recorded correction as trainer input under ``out``; return the image paths.

    Raises
    ------
    ConfigError
        ``out`` is a non-empty folder that is not an earlier export.
    CorrectionRefused
        There is no recorded correction to export.
    """
    rows = [c for c in _rows(cfg) if c.state == "recorded" and c.path]
    if not rows:
        raise CorrectionRefused(f"no recorded correction in {str(cfg.data_dir)!r} to export")
    out = Path(out)
    _prepare_out(out)
    key = pseudonym_key(cfg) if deidentify else None
    manifest, images = [], []
    for c in sorted(rows, key=lambda r: r.id):
        src = Path(c.path)  # type: ignore[arg-type]
        meta = json.loads((src / "correction.json").read_text(encoding="utf-8"))
        sub = "sub-" + subject_label(meta.get("patient", {}).get("PatientID") or c.patient_key or "", c.id, key)
        stem = f"{sub}_acq-corr{c.id}_{meta.get('sequence') or 'MR'}"
        anat, labels = out / sub / "anat", out / "derivatives" / "labels" / sub / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "image.nii.gz", anat / f"{stem}.nii.gz")
        shutil.copyfile(src / "cord_corrected.nii.gz", labels / f"{stem}_seg-manual.nii.gz")
        shutil.copyfile(src / "lesion_corrected.nii.gz", labels / f"{stem}_lesion-manual.nii.gz")
        (anat / f"{stem}.json").write_text(json.dumps(_sidecar(meta, deidentify), indent=2), encoding="utf-8")
        manifest.append({"correction": c.id, "subject": sub, "image": f"{sub}/anat/{stem}.nii.gz",
                         "measures": c.measures, "model_versions": c.model_versions})
        images.append(anat / f"{stem}.nii.gz")
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "sci-node corrections", "BIDSVersion": "1.8.0", "DatasetType": "raw",
         "GeneratedBy": [{"Name": "sci-node corrections export"}]}, indent=2), encoding="utf-8")
    (out / MANIFEST).write_text(json.dumps({"deidentified": deidentify, "corrections": manifest}, indent=2),
                                encoding="utf-8")
    log.info("corrections.exported", out=str(out), n=len(images), deidentified=deidentify)
    return images


def export_cli(cfg: NodeConfig, out: Path, deidentify: bool = True) -> int:
    """``export DIR [--no-deidentify]``."""
    images = export_corrections(cfg, out, deidentify)
    how = "de-identified" if deidentify else "WITH patient identity"
    echo(f"exported {len(images)} correction(s) to {out} ({how})")
    return 0
