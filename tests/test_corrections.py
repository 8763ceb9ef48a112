"""Learning from the radiologist, end to end on the real stack (Orthanc + plugin + node + trainer).

The "radiologist" is this test: it cannot paint in a headless OHIF, so it writes corrected SEGs
with highdicom on the node's own masks (a lesion removed, a lesion added, the cord boundary
moved) and STOW-RSes them to Orthanc's DICOMweb endpoint, as OHIF's "Export > DICOM SEG" does.
The plugin hands them to the node with the Orthanc login that stored them; the node keeps the
corrections, pending, with their change measures, and they count only once an admin accepts them
(one on the status page, one by the CLI);
bad objects (a SEG of a series the node never saw, a SEG on the wrong grid, a non-SEG object
with Modality SEG) are refused with a reason and store nothing; the node's own SEGs are never
taken. ``export`` gives trainer input, ``train cord --corrections --epochs 1`` fine-tunes the
active model on it, and the new artefact registers, activates and is used by the next job.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid
from scipy import ndimage
from test_trainer_seg import _bids, _tiny_config

from sci_node.config import REPO_ROOT
from sci_node.corrections import dice, lesion_changes
from sci_node.models.registry import ModelRegistry

from conftest import wait_for
from stack_support import PASSWORD, SAMPLE, USER, StackProc

AXIAL = REPO_ROOT / "tests" / "data" / "series" / "unf01_axial_T2w"
SHIPPED_CORD = ModelRegistry(REPO_ROOT / "models").active()["cord"]
pytestmark = pytest.mark.slow


def test_change_measures_on_arrays() -> None:
    a = np.zeros((4, 10, 10), np.uint8)
    a[1:3, 2:6, 2:6] = 1
    b = a.copy()
    b[1:3, 2:6, 6] = 1  # the boundary moved by one column
    assert dice(a, a) == 1.0 and dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(a, b) == pytest.approx(2 * 32 / (32 + 40))
    orig, corr = np.zeros_like(a), np.zeros_like(a)
    orig[0, 0, 0] = orig[3, 9, 9] = 1  # two lesions
    corr[3, 9, 8:] = 1  # one kept (grown), one removed ...
    corr[1, 5, 5] = 1  # ... and one added
    assert lesion_changes(orig, corr) == {"lesions_original": 2, "lesions_corrected": 2, "lesions_added": 1,
                                          "lesions_removed": 1}


# -- helpers --------------------------------------------------------------------------------

def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sci_node.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def _copy(files: list[Path], out: Path, patient: str | None = None, pixels: Any = None) -> list[Path]:
    """``files`` as a new series (new study when ``patient`` is given); ``pixels(ds)`` may edit them."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for f in files:
        ds = pydicom.dcmread(f)
        if patient is not None:
            ds.StudyInstanceUID, ds.PatientID, ds.PatientName = study, patient, f"Doe^{patient}"
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if pixels is not None:
            pixels(ds)
        ds.save_as(out / f.name, enforce_file_format=True)
        paths.append(out / f.name)
    return paths


def _sorted_sources(files: list[Path]) -> list[pydicom.Dataset]:
    """The source datasets in the node's volume order (slice position along the normal)."""
    from sci_node.pipeline.series import read_series

    vol = read_series(files)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in files)}
    return [by_uid[r.sop_instance_uid] for r in vol.refs]  # type: ignore[union-attr]


def _radiologist_seg(sources: list[pydicom.Dataset], cord: np.ndarray, lesion: np.ndarray | None,
                     description: str, creator: str = "Doe^Jane") -> pydicom.Dataset:
    """A corrected SEG as a viewer would write it (not the node's Manufacturer / creator)."""
    segs = [hd.seg.SegmentDescription(
        segment_number=1, segment_label="Spinal cord",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("2748008", "SCT", "Spinal cord"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)]
    layers = [cord]
    if lesion is not None and lesion.any():
        segs.append(hd.seg.SegmentDescription(
            segment_number=2, segment_label="Lesion",
            segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure"),
            segmented_property_type=hd.sr.CodedConcept("52988006", "SCT", "Lesion"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL))
        layers.append(lesion)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.stack(layers, -1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segs,
        series_instance_uid=generate_uid(), series_number=300, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="Unspecified", manufacturer_model_name="OHIF", software_versions="3.13.2",
        device_serial_number="1", content_creator_name=creator, omit_empty_frames=True)
    seg.SeriesDescription = description  # OHIF offers the loaded SEG's label: the node's description
    return seg


def _stow(stack: StackProc, ds: pydicom.Dataset) -> None:
    """STOW-RS one instance to Orthanc's DICOMweb endpoint (what OHIF's store does)."""
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buf.getvalue()
            + f"\r\n--{boundary}--\r\n".encode())
    r = httpx.post(f"{stack.url}/dicom-web/studies", content=body, auth=(USER, PASSWORD), trust_env=False, timeout=60,
                   headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                            "Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text


def _node_job(stack: StackProc, series_uid: str, timeout: float = 600) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def finished() -> bool:
        jobs = [j for j in stack.sci_node_jobs()["jobs"] if j.get("series_uid") == series_uid
                and j.get("state") in ("done", "routed-out", "failed")]
        found[:] = jobs
        return bool(jobs)

    wait_for(finished, timeout, interval=1, what=f"the node's job of series {series_uid}")
    assert found[0]["state"] == "done", found[0]
    return found[0]


def _job_masks(stack: StackProc, job: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(job["result"]["outputs"][0]).parent
    cord = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "cord.nii.gz"))).astype(np.uint8)
    les = folder / "lesion.nii.gz"
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(les))).astype(np.uint8) if les.exists() else 0 * cord
    return cord, lesion


def _corrections(stack: StackProc) -> dict[str, Any]:
    res = _cli("corrections", "--json", "--data-dir", str(stack.data_dir), "list")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _inplane(mask: np.ndarray, grow: bool) -> np.ndarray:
    """Move the cord boundary by one voxel in each slice (dilate or erode in Y/X)."""
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndimage.generate_binary_structure(2, 1)
    op = ndimage.binary_dilation if grow else ndimage.binary_erosion
    return op(mask > 0, structure=st).astype(np.uint8)


# -- the loop -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("corrections")
    models = tmp / "models"
    shutil.copytree(REPO_ROOT / "models", models, ignore=shutil.ignore_patterns(".registry.lock"))
    stack = StackProc(tmp / "d", toml=f'models_dir = "{models}"\n').start()
    try:
        yield {"tmp": tmp, "models": models, "stack": stack}
    finally:
        stack.stop()


def test_corrections_loop_end_to_end(loop: dict[str, Any]) -> None:
    stack, tmp, models = loop["stack"], loop["tmp"], loop["models"]
    # 1. the node segments the sample series (patient 1)
    p1 = _copy(SAMPLE, tmp / "p1", patient="CORRP1")
    stack.storescu(p1)
    s1 = str(pydicom.dcmread(p1[0]).SeriesInstanceUID)
    job1 = _node_job(stack, s1)
    cord1, les1 = _job_masks(stack, job1)
    # 2. patient 2: the same images with a bright blob in the cord, which the lesion model marks
    z0 = int(np.argmax(cord1.reshape(len(cord1), -1).sum(1)))
    ys, xs = np.nonzero(cord1[z0])
    blob = np.zeros_like(cord1)
    yc, xc = int(np.median(ys)), int(np.median(xs))
    blob[max(z0 - 1, 0):z0 + 2, yc - 2:yc + 3, xc - 1:xc + 2] = 1
    blob &= cord1
    order = [str(ds.SOPInstanceUID) for ds in _sorted_sources(p1)]

    def lesioned(ds: pydicom.Dataset) -> None:
        k = order.index(_orig_uid[str(ds.InstanceNumber)])
        arr = ds.pixel_array.astype(np.float32)
        if blob[k].any() and cord1[k].any():
            arr[blob[k] > 0] = np.percentile(arr[cord1[k] > 0], 99) * 1.6
        ds.PixelData = np.clip(arr, 0, np.iinfo(ds.pixel_array.dtype).max).astype(ds.pixel_array.dtype).tobytes()

    _orig_uid = {str(pydicom.dcmread(f).InstanceNumber): str(pydicom.dcmread(f).SOPInstanceUID) for f in p1}
    p2 = _copy(p1, tmp / "p2", patient="CORRP2", pixels=lesioned)
    stack.storescu(p2)
    s2 = str(pydicom.dcmread(p2[0]).SeriesInstanceUID)
    job2 = _node_job(stack, s2)
    cord2, les2 = _job_masks(stack, job2)
    assert lesion_changes(les2, les2)["lesions_original"] >= 1, "the lesion model did not mark the bright blob"

    # 3. the radiologist: patient 1 cord boundary moved out + a missed lesion added;
    #    patient 2 cord boundary moved in + the false lesion removed
    corr1_cord, corr1_les = _inplane(cord1, grow=True), (blob & cord1).astype(np.uint8)
    corr2_cord = _inplane(cord2, grow=False)
    node_seg2 = pydicom.dcmread(Path(job2["result"]["outputs"][0]), stop_before_pixels=True)
    src1, src2 = _sorted_sources(p1), _sorted_sources(p2)
    _stow(stack, _radiologist_seg(src1, corr1_cord, corr1_les, str(node_seg2.SeriesDescription)))
    _stow(stack, _radiologist_seg(src2, corr2_cord, None, "corrected by Dr Doe", creator="Roe^Richard"))
    # bad input: a SEG of a series the node never saw; a SEG on a coarser grid (same UIDs);
    # an MR image whose Modality says SEG
    axial = sorted(AXIAL.glob("*.dcm"))
    unknown = _sorted_sources(_copy(axial, tmp / "unknown", patient="CORRP1"))
    unknown_cord = np.zeros((len(unknown), int(unknown[0].Rows), int(unknown[0].Columns)), np.uint8)
    unknown_cord[:, 10:20, 10:20] = 1
    bad_unknown = _radiologist_seg(unknown, unknown_cord, None, "unknown series")
    coarse = []
    for ds in src1:
        c = copy.deepcopy(ds)
        arr = ds.pixel_array[::2, ::2].copy()
        c.PixelData, (c.Rows, c.Columns) = arr.tobytes(), arr.shape
        c.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]
        coarse.append(c)
    bad_grid = _radiologist_seg(coarse, corr1_cord[:, ::2, ::2], None, "wrong grid")
    not_seg = pydicom.dcmread(p1[0])
    not_seg.Modality, not_seg.SeriesInstanceUID = "SEG", generate_uid()
    not_seg.SOPInstanceUID = not_seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for ds in (bad_unknown, bad_grid, not_seg):
        _stow(stack, ds)

    # 4. the node records two corrections and refuses three
    doc: dict[str, Any] = {}

    def settled() -> bool:
        doc.update(_corrections(stack))
        return len(doc["corrections"]) >= 5

    wait_for(settled, 240, interval=2, what="the plugin to hand the five SEGs to the node")
    rows = {c["source_series_uid"]: c for c in doc["corrections"] if c["state"] == "pending"}
    refused = [c for c in doc["corrections"] if c["state"] == "refused"]
    assert set(rows) == {s1, s2} and len(refused) == 3, json.dumps(doc, indent=1)[:4000]
    m1, m2 = rows[s1]["measures"], rows[s2]["measures"]
    assert m1["cord_dice"] == pytest.approx(dice(cord1, corr1_cord), abs=1e-4) and m1["cord_dice"] < 0.99
    assert (m1["lesions_added"], m1["lesions_removed"]) == (1, 0)
    assert m2["cord_dice"] == pytest.approx(dice(cord2, corr2_cord), abs=1e-4)
    assert (m2["lesions_added"], m2["lesions_removed"]) == (0, lesion_changes(les2, les2)["lesions_original"])
    assert rows[s1]["creator"] == "Doe^Jane" and rows[s2]["creator"] == "Roe^Richard"  # what the SEGs claim
    assert rows[s1]["sender"] == rows[s2]["sender"] == f"orthanc-user:{USER}"  # who stored them (STOW-RS login)
    assert rows[s1]["flags"] == [] and rows[s2]["flags"] == [], rows
    assert rows[s1]["job_id"] == job1["id"] and rows[s1]["model_versions"]["cord"] == SHIPPED_CORD
    reasons = sorted(c["reason"] for c in refused)
    assert any("has not segmented" in r for r in reasons), reasons
    assert any("does not match the source series" in r for r in reasons), reasons
    assert any("is not Segmentation Storage" in r for r in reasons), reasons
    assert all(c["path"] is None for c in refused)
    kept = sorted(p.name for p in (stack.data_dir / "corrections").iterdir() if p.is_dir())
    assert kept == sorted(str(c["id"]) for c in rows.values()), kept  # nothing stored half-way
    files = {p.name for p in Path(rows[s1]["path"]).iterdir()}
    assert {"seg.dcm", "source", "image.nii.gz", "cord_corrected.nii.gz", "cord_original.nii.gz",
            "lesion_corrected.nii.gz", "lesion_original.nii.gz", "correction.json"} <= files
    # the node's own SEGs (with RemoteAET the node's) were never handed over nor recorded
    node_segs = {str(pydicom.dcmread(Path(j["result"]["outputs"][0]), stop_before_pixels=True).SeriesInstanceUID)
                 for j in (job1, job2)}
    assert not node_segs & {c["seg_series_uid"] for c in doc["corrections"]}
    own = _cli("corrections", "--data-dir", str(stack.data_dir), "ingest", job1["result"]["outputs"][0])
    assert own.returncode == 0 and "ignored" in own.stdout, own.stdout + own.stderr
    listed = _cli("corrections", "--data-dir", str(stack.data_dir), "list")
    assert "has not segmented" in listed.stdout and "refused" in listed.stdout

    # 5. nothing counts before an admin accepts it; then accept one on the status page, one by the CLI
    status = json.loads(_cli("status", "--json", "--data-dir", str(stack.data_dir)).stdout)["corrections"]
    assert (status["to_review"], status["counted"], status["mean_cord_dice_last_n"]) == (2, 0, None), status
    early = _cli("corrections", "--data-dir", str(stack.data_dir), "export", str(tmp / "early"))
    assert early.returncode != 0 and "no accepted correction" in early.stderr and "2 pending" in early.stderr
    page = httpx.get(f"{stack.url}/sci-node/", auth=(USER, PASSWORD), trust_env=False, timeout=60).text
    assert f'data-sci-node-post="/sci-node/corrections/{rows[s1]["id"]}/accept"' in page
    token = httpx.get(f"{stack.url}/sci-node/csrf", auth=(USER, PASSWORD), trust_env=False, timeout=30).json()
    r = httpx.post(f"{stack.url}/sci-node/corrections/{rows[s1]['id']}/accept", content=b"{}",
                   auth=(USER, PASSWORD), trust_env=False, timeout=120,
                   headers={"Content-Type": "application/json", token["header"]: token["token"]})
    assert r.status_code == 200 and r.json()["state"] == "accepted", r.text
    res = _cli("corrections", "--data-dir", str(stack.data_dir), "accept", str(rows[s2]["id"]), "--by", "cli:admin")
    assert res.returncode == 0 and "accepted" in res.stdout, res.stdout + res.stderr
    again = _cli("corrections", "--data-dir", str(stack.data_dir), "reject", str(rows[s2]["id"]))
    assert again.returncode == 1 and "not pending" in again.stdout
    reviewed = {c["id"]: c for c in _corrections(stack)["corrections"]}
    assert reviewed[rows[s1]["id"]]["reviewed_by"] == f"orthanc-user:{USER}"
    assert reviewed[rows[s2]["id"]]["reviewed_by"] == "cli:admin"

    # 6. watch it: status and the /sci-node/ page
    status = json.loads(_cli("status", "--json", "--data-dir", str(stack.data_dir)).stdout)["corrections"]
    assert status["accepted"] == 2 and status["counted"] == 2 and status["refused"] == 3
    assert status["mean_cord_dice_last_n"] == pytest.approx((m1["cord_dice"] + m2["cord_dice"]) / 2, abs=1e-3)
    assert status["by_cord_model"][SHIPPED_CORD]["n"] == 2
    page = httpx.get(f"{stack.url}/sci-node/", auth=(USER, PASSWORD), trust_env=False, timeout=60).text
    assert "Radiologists' corrections" in page and f"{status['mean_cord_dice_last_n']:.3f}" in page

    # 7. use it: export (de-identified) -> fine-tune -> register + activate -> the next job uses it
    out = tmp / "export"
    res = _cli("corrections", "--data-dir", str(stack.data_dir), "export", str(out))
    assert res.returncode == 0, res.stderr
    images = sorted(out.glob("sub-*/anat/*.nii.gz"))
    assert len(images) == 2 and len({p.parts[-3] for p in images}) == 2  # one subject per patient
    for img in images:
        stem = img.name[:-7]
        labels = out / "derivatives" / "labels" / img.parts[-3] / "anat"
        assert (labels / f"{stem}_seg-manual.nii.gz").is_file() and (labels / f"{stem}_lesion-manual.nii.gz").is_file()
    for f in out.rglob("*"):
        if f.is_file():
            text = f.read_bytes()
            assert b"CORRP" not in text and b"Doe^" not in text and s1.encode() not in text, f
    data = _bids(tmp / "shared", {"sub-unf01_T2w": "sub-unf01_T2w_crop"})
    cfg = _tiny_config("cord", tmp)
    art = tmp / "art"
    res = _cli("train", "cord", "--corrections", str(out), "--epochs", "1", "--train-config", str(cfg),
               "--data", str(data), "--out", str(art), "--models-dir", str(models),
               "--data-dir", str(stack.data_dir), "--log-level", "WARNING", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    card = json.loads((art / "card.json").read_text())
    corr = card["metrics"]["corrections"]
    assert (corr["total"], corr["trained_on"], corr["held_out"], corr["patients"]) == (2, 1, 1, 2)
    assert corr["replaced"]["version"] == SHIPPED_CORD and corr["held_out_dice_mean"] is not None
    assert corr["replaced"]["held_out_dice_mean"] is not None
    assert card["training"]["fine_tuned_from"]["version"] == SHIPPED_CORD
    held, trained = card["training"]["corrections"]["held_out"], card["training"]["corrections"]["train"]
    assert {k.split("_")[0] for k in held}.isdisjoint({k.split("_")[0] for k in trained})
    res = _cli("models", "--models-dir", str(models), "add", str(art), "--activate")
    assert res.returncode == 0, res.stderr
    assert ModelRegistry(models).active()["cord"] == card["version"]
    p3 = _copy(SAMPLE, tmp / "p3")
    stack.storescu(p3)
    s3 = str(pydicom.dcmread(p3[0]).SeriesInstanceUID)
    found: list[dict[str, Any]] = []

    def third() -> bool:
        found[:] = [j for j in stack.sci_node_jobs()["jobs"] if j.get("series_uid") == s3
                    and j.get("state") in ("done", "routed-out", "failed")]
        return bool(found)

    wait_for(third, 600, interval=1, what="the job after the activation")
    assert found[0]["state"] in ("done", "routed-out"), found[0]  # a 1-epoch model may find no cord
    assert found[0]["result"]["model_versions"]["cord"] == card["version"]
    assert re.fullmatch(r".+-site\.[0-9a-f]{8}", card["version"])


def test_lesion_finetune_on_exported_layout(tmp_path: Path) -> None:
    """``--corrections`` for the lesion model: real lesion masks next to the synthetic ones, split by patient."""
    import torch

    from trainer.segment.finetune import finetune_segmentation

    torch.set_num_threads(1)
    models = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "models", models, ignore=shutil.ignore_patterns(".registry.lock"))
    shared = _bids(tmp_path / "shared", {"sub-unf01_T2w": "sub-unf01_T2w_crop"})
    corr = _bids(tmp_path / "corr", {"sub-ca_acq-corr1_T2w": "sub-PAM50small_T2w_crop",
                                     "sub-cb_acq-corr2_T2w": "sub-05_acq-MTon_MTS_crop"})
    for sub, with_lesion in (("sub-ca", True), ("sub-cb", False)):
        labels = corr / "derivatives" / "labels" / sub / "anat"
        cord_path = next(labels.glob("*_seg-manual.nii.gz"))
        cord = sitk.ReadImage(str(cord_path))
        arr = sitk.GetArrayFromImage(cord).astype(np.uint8)
        les = np.zeros_like(arr)
        if with_lesion:
            z, y, x = (int(np.median(v)) for v in np.nonzero(arr))
            les[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2] = arr[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2]
        img = sitk.GetImageFromArray(les)
        img.CopyInformation(cord)
        sitk.WriteImage(img, str(cord_path).replace("_seg-manual", "_lesion-manual"))
    out = finetune_segmentation("lesion", _tiny_config("lesion", tmp_path), shared, corr, tmp_path / "art",
                                epochs=1, seed=0, device="cpu", models_dir=models, heldout_fraction=0.5)
    card = json.loads((out / "card.json").read_text())
    base = ModelRegistry(models).active()["lesion"]
    assert card["name"] == "lesion" and card["version"].startswith(base + "-site.")
    c = card["metrics"]["corrections"]
    assert (c["total"], c["trained_on"], c["held_out"]) == (2, 1, 1) and c["replaced"]["version"] == base
    (held,) = c["per_case"].values()
    assert {"dice", "false_lesions", "missed_lesions"} <= set(held["new"]) and "dice" in held["replaced"]
    assert ModelRegistry(models).add(out, activate=True).version == card["version"]


def test_the_node_retention_sweep_expires_corrections_and_keeps_their_measures(tmp_path: Path) -> None:
    """``[corrections] retention_days`` is applied by the node's own retention sweeper too."""
    from sci_node.app.retention import RetentionSweeper
    from sci_node.config import load_config
    from sci_node.corrections import open_index
    from sci_node.store import Store

    (tmp_path / "c.toml").write_text("[corrections]\nretention_days = 0.00001\n")  # < 1 s
    cfg = load_config(tmp_path / "c.toml", {"data_dir": tmp_path / "d"})
    store, index = Store(cfg.data_dir), open_index(cfg)
    folder = index.root / "1"
    folder.mkdir()
    (folder / "seg.dcm").write_bytes(b"x")
    with index.tx() as db:
        index.insert(db, {"state": "accepted", "verdict": "accepted", "received_at": time.time() - 5,
                          "path": str(folder), "patient_key": "k", "measures": {"cord_dice": 0.9}})
    assert RetentionSweeper(cfg, store).sweep() == 1
    (row,) = index.all()
    assert row.state == "expired" and row.verdict == "accepted" and row.path is None and row.patient_key is None
    assert row.measures == {"cord_dice": 0.9} and not folder.exists()
    index.close()
    store.close()


def test_an_ingest_in_progress_is_not_swept_by_another_process(tmp_path: Path) -> None:
    """Every process opening the corrections index sweeps orphan folders; while an ingest holds the
    writer lock (its temporary folder written, its renamed folder not yet committed), a second
    process (``sci-node corrections list``, the CLI the plugin and the test poll) must leave both.
    Found in CI: the poll deleted the ingest's folder and the correction failed."""
    from sci_node.corrections import CorrectionIndex

    index = CorrectionIndex(tmp_path)
    tmp_dir, renamed = index.root / ".tmp-inflight", index.root / "7"
    sweep = [sys.executable, "-c", "import sys; from pathlib import Path; from sci_node.corrections import "
             "CorrectionIndex; CorrectionIndex(Path(sys.argv[1])).close()", str(tmp_path)]
    with index.writer_lock() as held:
        assert held
        tmp_dir.mkdir()
        renamed.mkdir()
        proc = subprocess.run(sweep, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert tmp_dir.is_dir() and renamed.is_dir()
    proc = subprocess.run(sweep, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not tmp_dir.exists() and not renamed.exists()  # orphans of a crashed ingest still go
    index.close()
