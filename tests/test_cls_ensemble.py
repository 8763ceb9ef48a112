"""Classifier seed ensembles (trainer.classify.ensemble, sci_node.nets.ProbMeanSeriesNet): two real one-epoch
sequence artefacts, their ensemble built, loaded, served, registered, rolled back."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from sci_node.cli import main
from sci_node.errors import ModelError
from sci_node.models.predict_cls import Classifier
from sci_node.models.registry import ModelRegistry
from sci_node.routing.evidence import HeaderEvidence
from trainer.classify.ensemble import build_ensemble

from test_classifiers import FIX, T2_TSE, TINY_SEQUENCE

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("members")
    cfg = root / "tiny_seq.toml"
    cfg.write_text(TINY_SEQUENCE)
    out = []
    for seed in (1, 2):
        art = root / f"seed{seed}"
        assert main(["train", "sequence", "--train-config", str(cfg), "--data", str(FIX), "--out", str(art),
                     "--epochs", "1", "--seed", str(seed), "--log-level", "WARNING"]) == 0
        out.append(art)
    return out


def test_ensemble_serves_the_mean_of_its_members_calibrated_probabilities(members: list[Path], tmp_path: Path) -> None:
    ens_dir = build_ensemble(members, tmp_path / "ens", "9.9.7-ens")
    ens = Classifier.from_artifact(ens_dir)
    singles = [Classifier.from_artifact(m) for m in members]
    assert ens.temperature == {"sequence": 1.0}
    assert [s.temperature["sequence"] for s in singles] != [1.0, 1.0]  # each member calibrated on its own
    image = sitk.ReadImage(str(FIX / "spine_ax_T2w_cervical.nii.gz"))
    for ev in (None, HeaderEvidence(), T2_TSE):
        got = ens.predict_explained(image, ev)
        want = {c: float(np.mean([s.predict(image, ev)["sequence"][c] for s in singles]))
                for c in ens.heads["sequence"]}
        assert got[0]["sequence"] == pytest.approx(want, abs=1e-5)
        assert got[1]["sequence"] == singles[0].predict_explained(image, ev)[1]["sequence"]  # header rules as before
    # the spin-echo rule fires: the mean of the members' rule confidences
    fired = ens.predict(image, T2_TSE)["sequence"]
    assert max(fired, key=fired.get) == "T2w"
    assert fired["T2w"] == pytest.approx(np.mean([s.rules_confidence for s in singles]), abs=1e-5)


def test_ensemble_card_scores_the_mean_of_the_members_held_out_predictions(members: list[Path], tmp_path: Path) -> None:
    ens_dir = build_ensemble(members, tmp_path / "ens", "9.9.7-ens")
    card = json.loads((ens_dir / "card.json").read_text())
    cards = [json.loads((m / "card.json").read_text()) for m in members]
    rs = card["metrics"]["sequence"]["real_series"]
    first = {(p["i"], p["condition"]): p for p in cards[0]["metrics"]["sequence"]["real_series"]["predictions"]}
    second = {(p["i"], p["condition"]): p for p in cards[1]["metrics"]["sequence"]["real_series"]["predictions"]}
    assert rs["predictions"] and {(p["i"], p["condition"]) for p in rs["predictions"]} == set(first)
    for p in rs["predictions"]:
        k = (p["i"], p["condition"])
        for c, v in p["probs"].items():
            assert v == pytest.approx((first[k]["probs"][c] + second[k]["probs"][c]) / 2, abs=1e-4)
    removed = [p for p in rs["predictions"] if p["condition"] == "header_removed" and p["true"]]
    correct = sum(max(p["probs"], key=p["probs"].get) == p["true"] for p in removed)
    assert rs["header_removed"]["n"] == len(removed)
    assert rs["header_removed"]["accuracy"] == round(correct / len(removed), 4)
    assert rs["header_removed"]["n_spine"] == len(removed)  # both fixture groups are spine
    assert card["architecture"]["class"] == "sci_node.nets.ProbMeanSeriesNet"
    assert card["architecture"]["args"]["temperatures"]["sequence"] == [c["calibration"]["temperature"]["sequence"]
                                                                        for c in cards]
    assert [m["seed"] for m in card["training"]["members"]] == [1, 2] and card["data_hash"] == cards[0]["data_hash"]
    assert [m["seed"] for m in card["metrics"]["sequence"]["members"]] == [1, 2]
    assert "trainer.cls_ensemble --members" in card["training"]["command"]


def test_ensemble_registers_activates_and_rolls_back(members: list[Path], tmp_path: Path) -> None:
    models = tmp_path / "models"
    ens_dir = build_ensemble(members, tmp_path / "ens", "9.9.7-ens")
    for art in (members[0], ens_dir):
        assert main(["models", "--models-dir", str(models), "--log-level", "ERROR", "add", str(art), "--activate"]) == 0
    assert ModelRegistry(models).active() == {"sequence": "9.9.7-ens"}
    assert main(["models", "--models-dir", str(models), "--log-level", "ERROR", "rollback", "sequence"]) == 0
    assert ModelRegistry(models).active() == {"sequence": "9.9.8-test"}


def test_ensemble_refuses_members_of_different_recipes(members: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="at least two members"):
        build_ensemble(members[:1], tmp_path / "one", "1.0.0")
    other = tmp_path / "other"
    other.mkdir()
    for f in ("weights.pt", "card.json"):
        (other / f).write_bytes((members[1] / f).read_bytes())
    card = json.loads((other / "card.json").read_text())
    card["data_hash"] = "sha256:" + "0" * 64
    (other / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=r"differs from .* in 'data_hash'"):
        build_ensemble([members[0], other], tmp_path / "bad", "1.0.0")
    assert not (tmp_path / "bad").exists()
    card["data_hash"] = json.loads((members[1] / "card.json").read_text())["data_hash"]
    card["metrics"]["sequence"]["real_series"]["predictions"].pop()  # one held-out series fewer
    (other / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="cover different series"):
        build_ensemble([members[0], other], tmp_path / "bad", "1.0.0")
