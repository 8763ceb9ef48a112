"""The corrections as trainer input: ``sci-node corrections export`` and ``sci-node train --corrections``.

:func:`export_corrections` writes the BIDS-like layout :mod:`trainer.segment.data` reads (one image per correction)::

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
from pathlib import Path
from typing import Any

from sci_node.config import NodeConfig
from sci_node.corrections.index import all_corrections, counted
from sci_node.errors import ConfigError, CorrectionRefused
from sci_node.logs import get_logger
from sci_node.store.private_files import make_private_dirs, open_private

log = get_logger("sci_node.corrections")
MANIFEST = "sci-node-corrections.json"


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
    """Write every accepted correction as trainer input under ``out``; return the image paths.

    Pending, rejected and refused corrections never reach training; of a series corrected and
    accepted twice only the newest is written (:func:`~sci_node.corrections.index.counted`).

    Raises
    ------
    ConfigError
        ``out`` is a non-empty folder that is not an earlier export.
    CorrectionRefused
        There is no accepted correction to export.
    """
    everything = all_corrections(cfg)
    rows = [c for c in counted(everything) if c.state == "accepted" and c.path]
    if not rows:
        pending = sum(1 for c in everything if c.state == "pending")
        raise CorrectionRefused(f"no accepted correction in {str(cfg.data_dir)!r} to export"
                                + (f" ({pending} pending: sci-node corrections accept ID)" if pending else ""))
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
