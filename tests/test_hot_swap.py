"""Retrain → register → activate → hot swap into a *running* node, between jobs.

A cord model is really trained (one epoch, tiny subset of the committed crops), registered
and activated with the admin CLI while ``sci-node serve`` runs; the next series the node
processes records the new version, the series before it the old one, and the SEG that
reaches the destination names the model version it was made with. Rollback brings the
old version back for the series after that.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

import pydicom
import pytest
from pydicom.uid import generate_uid
from test_trainer_seg import _bids, _tiny_config

from sci_node.cli import main
from sci_node.config import REPO_ROOT
from sci_node.models.registry import ModelRegistry
from trainer.segment.train import train_segmentation

from conftest import NodeProc, StoreSCP, storescu, wait_for

SERIES = REPO_ROOT / "tests" / "data" / "series" / "unf01_axial_T2w"
NEW_VERSION = "0.2.0-hotswap"
SHIPPED = ModelRegistry(REPO_ROOT / "models").active()["cord"]  # the version active in the repo


def _copy_series(dst: Path) -> list[Path]:
    """The committed axial series under a fresh Series Instance UID (a new acquisition)."""
    dst.mkdir(parents=True)
    series_uid = generate_uid()
    out = []
    for f in sorted(SERIES.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dst / f.name, enforce_file_format=True)
        out.append(dst / f.name)
    return out


def _train_tiny_cord(tmp: Path) -> Path:
    """One real epoch on two committed crops → an artefact with version ``NEW_VERSION``."""
    data = _bids(tmp / "ds", {"sub-unf01_T2w": "sub-unf01_T2w_crop",
                              "sub-05_acq-MTon_MTS": "sub-05_acq-MTon_MTS_crop"})
    cfg = _tiny_config("cord", tmp)
    cfg.write_text(re.sub(r'(?m)^version = .*$', f'version = "{NEW_VERSION}"', cfg.read_text()))
    return train_segmentation("cord", cfg, data, tmp / "art", epochs=1, seed=1, device="cpu")


def _finished(node: NodeProc, job_id: int) -> bool:
    job = node.job_if_exists(job_id)
    return job is not None and job["state"] in ("done", "routed-out", "failed")


def _run_series(node: NodeProc, tmp: Path, name: str, job_id: int) -> dict:
    assert storescu(node.port, _copy_series(tmp / name)).returncode == 0
    wait_for(lambda: _finished(node, job_id), 240, interval=0.5, what=f"job {job_id} to finish")
    return node.job(job_id)


@pytest.mark.slow
def test_activation_is_hot_swapped_between_jobs(tmp_path: Path, node_factory: Callable[..., NodeProc],
                                                storescp_factory: Callable[..., StoreSCP]) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "models", models, ignore=shutil.ignore_patterns(".registry.lock"))
    art = _train_tiny_cord(tmp_path)
    dest = storescp_factory()
    node = node_factory(f'models_dir = "{models}"\nstable_seconds = 1\n'
                        f'destinations = ["DEST@127.0.0.1:{dest.port}"]\n').start()

    first = _run_series(node, tmp_path, "s1", 1)
    assert first["state"] == "done", first
    assert first["result"]["model_versions"]["cord"] == SHIPPED

    # register + activate with the admin CLI while the node is running
    assert main(["models", "--models-dir", str(models), "--log-level", "ERROR", "add", str(art), "--activate"]) == 0
    assert ModelRegistry(models).active()["cord"] == NEW_VERSION

    second = _run_series(node, tmp_path, "s2", 2)
    assert second["state"] in ("done", "routed-out"), second  # a 1-epoch model may find no cord
    assert second["result"]["model_versions"]["cord"] == NEW_VERSION

    assert main(["models", "--models-dir", str(models), "--log-level", "ERROR", "rollback", "cord"]) == 0
    third = _run_series(node, tmp_path, "s3", 3)
    assert third["result"]["model_versions"]["cord"] == SHIPPED

    # the SEGs that reached the destination name the cord version they were made with
    seg_versions = set()
    for f in dest.files():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.Modality == "SEG":
            algo = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
            seg_versions.add(re.search(r"cord (\S+?)(,|$)", str(algo.AlgorithmVersion)).group(1))
    expected = {SHIPPED} | ({NEW_VERSION} if second["state"] == "done" else set())
    assert seg_versions == expected
    assert node.log.read_text().count('"models.loaded"') == 3, "models not reloaded once per activation change"
