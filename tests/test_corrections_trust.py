"""Corrections are a privilege (issue 36 item 1), on the real stack: Orthanc + plugin + node, dcmtk.

One ``sci-node stack`` whose Orthanc accepts C-STOREs from ``EVIL@127.0.0.1`` and ``WS1@127.0.0.1``
(``[stack] scanners``), of which only ``WS1`` may send corrections (``[corrections] dicom_senders``).
After the node segments the sample series:

* a forged SEG (a box, Content Creator "Trusted^Radiologist") C-STOREd from ``EVIL`` is refused:
  no folder, nothing pending, nothing in the statistics;
* a plausible SEG from ``WS1`` is kept **pending**, its sender ``dicom:WS1@127.0.0.1``;
* a box far from the cord STOW-RSed by the Orthanc user is pending with flags; the status page
  offers no "accept" for it, its POST is refused (409), only ``accept --force`` takes it;
* the WS1 masks sent again under a new SOP Instance UID are a duplicate: kept once;
* a cross-site POST cannot accept anything; the page's own (token) POST rejects the WS1 one;
* only the accepted one reaches the statistics and ``export``.

And, on files: the index of an earlier release ("recorded" rows) opens with them pending; the
sender rules and plausibility flags on arrays.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from test_corrections import _cli, _copy, _job_masks, _node_job, _radiologist_seg, _sorted_sources, _stow

from sci_node.config import CorrectionsPolicy, Scanner, load_config
from sci_node.corrections.index import CorrectionIndex
from sci_node.corrections.trust import Sender, authenticate, parse_sender, plausibility_flags
from sci_node.errors import CorrectionRefused

from conftest import wait_for
from stack_support import PASSWORD, SAMPLE, USER, StackProc

pytestmark = pytest.mark.slow


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _send(stack: StackProc, path: Path, calling: str) -> None:
    """C-STORE one SEG from ``calling`` (``-R``: storescu proposes only the files' SOP classes; its
    default list has no Segmentation Storage)."""
    res = stack.try_storescu([path], calling, tls=["-R"])
    assert res.returncode == 0 and "Failed" not in res.stderr, res.stdout + res.stderr


def _box(shape: tuple[int, ...]) -> np.ndarray:
    box = np.zeros(shape, np.uint8)
    box[:, 2:10, 2:10] = 1  # a corner of every slice: nowhere near the cord
    return box


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("trust")
    stack = StackProc(tmp / "d", toml='[corrections]\ndicom_senders = ["WS1@127.0.0.1"]\n',
                      scanners=("SCANNER@127.0.0.1", "EVIL@127.0.0.1", "WS1@127.0.0.1")).start()
    try:
        files = _copy(SAMPLE, tmp / "series", patient="TRUST1")
        stack.storescu(files)
        series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        job = _node_job(stack, series_uid)
        cord, _ = _job_masks(stack, job)
        src = _sorted_sources(files)
        forged = _radiologist_seg(src, _box(cord.shape), None, "forged", creator="Trusted^Radiologist")
        _send(stack, _save(forged, tmp / "forged.dcm"), "EVIL")
        ws1 = _radiologist_seg(src, (cord > 0).astype(np.uint8), None, "from WS1", creator="Doe^Jane")
        _send(stack, _save(ws1, tmp / "ws1.dcm"), "WS1")
        _stow(stack, _radiologist_seg(src, _box(cord.shape), None, "a box", creator="Box^Drawer"))
        again = _radiologist_seg(src, (cord > 0).astype(np.uint8), None, "from WS1, again", creator="Doe^Jane")
        again.SOPInstanceUID = generate_uid()
        _send(stack, _save(again, tmp / "again.dcm"), "WS1")
        handed: list[dict[str, Any]] = []

        def all_handed() -> bool:
            logs = list(stack.data_dir.rglob("corrections.jsonl"))
            handed[:] = [json.loads(line) for p in logs for line in p.read_text().splitlines() if line.strip()]
            return len(handed) >= 4

        wait_for(all_handed, 300, interval=2, what="the plugin to hand the four SEGs to the node")
        yield {"stack": stack, "tmp": tmp, "handed": handed, "series_uid": series_uid}
    finally:
        stack.stop()


def _rows(stack: StackProc) -> dict[str, dict[str, Any]]:
    res = _cli("corrections", "--json", "--data-dir", str(stack.data_dir), "list")
    assert res.returncode == 0, res.stderr
    return {c["sender"]: c for c in json.loads(res.stdout)["corrections"]}


def _post(stack: StackProc, path: str, **kw: Any) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", auth=(USER, PASSWORD), trust_env=False, timeout=120, **kw)


def _token_headers(stack: StackProc) -> dict[str, str]:
    token = httpx.get(f"{stack.url}/sci-node/csrf", auth=(USER, PASSWORD), trust_env=False, timeout=30).json()
    return {"Content-Type": "application/json", token["header"]: token["token"]}


def test_only_authenticated_senders_teach_and_only_accepted_corrections_count(trust: dict[str, Any]) -> None:
    stack, tmp = trust["stack"], trust["tmp"]
    states = sorted(h["state"] for h in trust["handed"])
    assert states == ["duplicate", "pending", "pending", "refused"], trust["handed"]
    rows = _rows(stack)
    evil, ws1, box = rows["dicom:EVIL@127.0.0.1"], rows["dicom:WS1@127.0.0.1"], rows[f"orthanc-user:{USER}"]
    assert len(rows) == 3  # the duplicate is kept once
    assert evil["state"] == "refused" and "dicom_senders" in evil["reason"] and evil["path"] is None
    assert evil["creator"] == "Trusted^Radiologist"  # what it claimed, not who it is
    assert ws1["state"] == "pending" and ws1["flags"] == [] and ws1["measures"]["cord_dice"] == 1.0
    assert box["state"] == "pending" and len(box["flags"]) >= 2, box
    assert any("cord Dice" in f for f in box["flags"]) and any("from the node's cord" in f for f in box["flags"])
    dup = next(h for h in trust["handed"] if h["state"] == "duplicate")
    assert f"correction {ws1['id']}" in dup["reason"]

    # nothing is accepted yet: no statistics, no "heavily corrected" from a box of Dice 0
    status = json.loads(_cli("status", "--json", "--data-dir", str(stack.data_dir)).stdout)["corrections"]
    assert (status["to_review"], status["flagged"], status["counted"]) == (2, 1, 0), status
    assert status["mean_cord_dice_last_n"] is None and status["heavily_corrected"] == []

    # the page: accept + reject for the plausible one, only reject for the flagged one
    page = httpx.get(f"{stack.url}/sci-node/", auth=(USER, PASSWORD), trust_env=False, timeout=60).text
    assert f'/sci-node/corrections/{ws1["id"]}/accept"' in page
    assert f'/sci-node/corrections/{box["id"]}/reject"' in page and f'/sci-node/corrections/{box["id"]}/accept"' \
        not in page
    # a forged cross-site form cannot accept (no JSON, foreign Origin, no token)
    forged = _post(stack, f"/sci-node/corrections/{ws1['id']}/accept", content=b"x=1",
                   headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert forged.status_code in (403, 415)
    # the flagged one is not accepted by a click, only by the CLI's --force
    click = _post(stack, f"/sci-node/corrections/{box['id']}/accept", content=b"{}", headers=_token_headers(stack))
    assert click.status_code == 409 and "flagged" in click.text
    assert _rows(stack)[f"orthanc-user:{USER}"]["state"] == "pending"
    res = _cli("corrections", "--data-dir", str(stack.data_dir), "accept", str(box["id"]), "--force")
    assert res.returncode == 0 and "accepted" in res.stdout, res.stdout + res.stderr
    rej = _post(stack, f"/sci-node/corrections/{ws1['id']}/reject", content=b"{}", headers=_token_headers(stack))
    assert rej.status_code == 200 and rej.json()["state"] == "rejected", rej.text
    after = _rows(stack)
    assert after["dicom:WS1@127.0.0.1"]["reviewed_by"] == f"orthanc-user:{USER}"
    assert after[f"orthanc-user:{USER}"]["verdict"] == "accepted"

    status = json.loads(_cli("status", "--json", "--data-dir", str(stack.data_dir)).stdout)["corrections"]
    assert (status["counted"], status["rejected"], status["refused"], status["to_review"]) == (1, 1, 1, 0)
    res = _cli("corrections", "--data-dir", str(stack.data_dir), "export", str(tmp / "export"))
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp / "export" / "sci-node-corrections.json").read_text())
    assert [c["correction"] for c in manifest["corrections"]] == [box["id"]]


def test_an_index_of_an_earlier_release_opens_with_its_corrections_pending(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "corrections.sqlite")
    db.executescript("CREATE TABLE corrections (id INTEGER PRIMARY KEY AUTOINCREMENT, state TEXT NOT NULL, "
                     "reason TEXT, received_at REAL NOT NULL, origin TEXT, seg_sop_uid TEXT, seg_series_uid TEXT, "
                     "study_uid TEXT, source_series_uid TEXT, job_id INTEGER, patient_key TEXT, creator TEXT, "
                     "created TEXT, model_versions TEXT, measures TEXT, notes TEXT, path TEXT);"
                     "INSERT INTO corrections (state, received_at, creator) VALUES ('recorded', 1.0, 'Old^Row');")
    db.commit()
    db.close()
    index = CorrectionIndex(tmp_path)
    try:
        (row,) = index.all()
        assert (row.state, row.verdict, row.sender, row.flags, row.creator) == ("pending", None, None, [], "Old^Row")
        assert index.review(row.id, "accepted", "cli:admin").state == "accepted"
        with pytest.raises(CorrectionRefused, match="not pending"):
            index.review(row.id, "rejected", "cli:admin")
    finally:
        index.close()


def test_sender_rules() -> None:
    policy = CorrectionsPolicy(users=("alice",), dicom_senders=(Scanner("WS1", "10.0.0.5"),))
    assert authenticate(policy, parse_sender("orthanc-user:alice")) == "orthanc-user:alice"
    assert authenticate(policy, parse_sender("dicom:WS1@10.0.0.5")) == "dicom:WS1@10.0.0.5"
    assert authenticate(policy, parse_sender("cli:root")) == "cli:root"
    for text, why in (("orthanc-user:mallory", "not in \\[corrections\\] users"),
                      ("dicom:WS1@10.0.0.6", "not in \\[corrections\\] dicom_senders"),
                      ("dicom:EVIL@10.0.0.5", "dicom_senders"), (None, "without authentication")):
        with pytest.raises(CorrectionRefused, match=why):
            authenticate(policy, parse_sender(text))
    assert authenticate(CorrectionsPolicy(), Sender("orthanc-user", "anyone")) == "orthanc-user:anyone"
    with pytest.raises(CorrectionRefused, match="must be"):
        parse_sender("root:x")
    cfg = load_config(None, {"corrections": {"dicom_senders": ["WS1@10.0.0.5"], "users": ["alice"]}})
    assert cfg.corrections.dicom_senders == (Scanner("WS1", "10.0.0.5"),)


def test_plausibility_flags_on_arrays() -> None:
    node = np.zeros((20, 40, 40), np.uint8)
    node[:, 18:23, 18:23] = 1
    policy, spacing = CorrectionsPolicy(), (1.0, 1.0, 1.0)
    grown = node.copy()
    grown[:, 17, 18:23] = 1
    assert plausibility_flags(policy, node, grown, np.zeros_like(node), spacing, 0.9) == []
    far = np.zeros_like(node)
    far[:, 0:5, 0:5] = 1
    flags = plausibility_flags(policy, node, far, np.zeros_like(node), spacing, 0.0)
    assert len(flags) == 2 and "below 0.5" in flags[0] and "100.0 % of the drawn voxels" in flags[1]
    stray = np.zeros_like(node)
    stray[5, 30:33, 30:33] = 1  # a "lesion" 8 mm outside the cord
    assert any("outside the corrected cord" in f for f in plausibility_flags(policy, node, node, stray, spacing, 1.0))
    assert plausibility_flags(policy, node, np.zeros_like(node), np.zeros_like(node), spacing, 0.0)[0] == \
        "the corrected cord is empty"
