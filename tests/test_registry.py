"""Model registry through the real CLI: add, activate, rollback, list; corrupt artefacts refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sci_node.cli import main
from sci_node.errors import ModelError
from sci_node.models.artifact import CARD, WEIGHTS, sha256_file
from sci_node.models.registry import ModelRegistry

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "anatomy" / "0.1.0"

torch.set_num_threads(1)


def _version(src: Path, dst: Path, version: str) -> Path:
    """Copy the shipped anatomy artefact under another version (a valid artefact, same weights)."""
    shutil.copytree(src, dst)
    card = json.loads((dst / CARD).read_text())
    card["version"] = version
    (dst / CARD).write_text(json.dumps(card))
    return dst


def _models(models_dir: Path, *args: str) -> int:
    return main(["models", "--models-dir", str(models_dir), "--log-level", "ERROR", *args])


def _active(models_dir: Path) -> dict[str, str]:
    return ModelRegistry(models_dir).active()


@pytest.fixture()
def two_versions(tmp_path: Path) -> tuple[Path, Path, Path]:
    return (tmp_path / "models", _version(SHIPPED, tmp_path / "a1", "1.0.0"),
            _version(SHIPPED, tmp_path / "a2", "2.0.0"))


def test_add_activate_rollback_list(two_versions: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    models, a1, a2 = two_versions
    reg = ModelRegistry(models)
    t0 = reg.state_token()
    assert _models(models, "add", str(a1), "--activate") == 0
    assert _active(models) == {"anatomy": "1.0.0"}
    t1 = reg.state_token()
    assert t1 != t0
    assert (models / "anatomy" / "1.0.0" / WEIGHTS).is_file()

    assert _models(models, "add", str(a2)) == 0
    assert _active(models) == {"anatomy": "1.0.0"}  # adding does not activate
    assert _models(models, "activate", "anatomy", "2.0.0") == 0
    assert _active(models) == {"anatomy": "2.0.0"}
    t2 = reg.state_token()
    assert t2 != t1

    capsys.readouterr()
    assert _models(models, "--json", "list") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["active"]) for r in rows] == [("1.0.0", False), ("2.0.0", True)]
    assert rows[1]["metrics"]["anatomy"]["accuracy"] > 0.5  # the card's LOSO metrics are listed

    assert _models(models, "list") == 0
    table = capsys.readouterr().out
    assert "anatomy" in table and "LOSO acc" in table

    assert _models(models, "rollback", "anatomy") == 0
    assert _active(models) == {"anatomy": "1.0.0"}
    assert reg.state_token() != t2
    state = json.loads((models / "registry.json").read_text())
    assert [h["action"] for h in state["history"]] == ["add", "activate", "add", "activate", "rollback"]
    # nothing earlier to roll back to: clear error, exit code 1, still 1.0.0
    assert _models(models, "rollback", "anatomy") == 1
    assert "cannot roll back" in capsys.readouterr().err
    assert _active(models) == {"anatomy": "1.0.0"}


def test_corrupt_weights_refused_old_stays_active(two_versions: tuple[Path, Path, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    models, a1, a2 = two_versions
    assert _models(models, "add", str(a1), "--activate") == 0
    data = bytearray((a2 / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (a2 / WEIGHTS).write_bytes(bytes(data))
    capsys.readouterr()
    assert _models(models, "add", str(a2), "--activate") == 1
    err = capsys.readouterr().err
    assert "weights.pt checksum" in err and str(a2) in err
    assert _active(models) == {"anatomy": "1.0.0"}
    assert not (models / "anatomy" / "2.0.0").exists()


def test_checksum_mismatch_in_registry_blocks_activation(two_versions: tuple[Path, Path, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    models, a1, a2 = two_versions
    assert _models(models, "add", str(a1), "--activate") == 0
    assert _models(models, "add", str(a2)) == 0
    # the registered copy is damaged on disk after registration
    card_path = models / "anatomy" / "2.0.0" / CARD
    card = json.loads(card_path.read_text())
    card["weights_sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    capsys.readouterr()
    assert _models(models, "activate", "anatomy", "2.0.0") == 1
    assert "does not match the card" in capsys.readouterr().err
    assert _active(models) == {"anatomy": "1.0.0"}


def test_incompatible_artefacts_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    reg = ModelRegistry(models)
    good = _version(SHIPPED, tmp_path / "good", "1.0.0")
    reg.add(good, activate=True)

    # weights that do not fit the architecture, with a consistent checksum: the load test refuses it
    bad = _version(SHIPPED, tmp_path / "bad", "3.0.0")
    torch.save({"nothing": torch.zeros(3)}, bad / WEIGHTS)
    card = json.loads((bad / CARD).read_text())
    card["weights_sha256"] = sha256_file(bad / WEIGHTS)
    (bad / CARD).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="do not fit"):
        reg.add(bad, activate=True)

    # a classifier card under a segmentation model's name
    wrong = _version(SHIPPED, tmp_path / "wrong", "4.0.0")
    card = json.loads((wrong / CARD).read_text())
    card["name"] = "cord"
    (wrong / CARD).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="must be kind 'segmentation'"):
        reg.add(wrong)

    # not JSON at all
    broken = _version(SHIPPED, tmp_path / "broken", "5.0.0")
    (broken / CARD).write_text("{not json")
    with pytest.raises(ModelError, match="card.json"):
        reg.add(broken)

    assert reg.active() == {"anatomy": "1.0.0"}
    assert sorted(p.name for p in (models / "anatomy").iterdir()) == ["1.0.0"]


def test_load_active_names_missing_models(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.add(_version(SHIPPED, tmp_path / "a", "1.0.0"), activate=True)
    with pytest.raises(ModelError, match="no active version of region_view, sequence, cord, lesion"):
        reg.load_active()


def test_list_orders_versions_numerically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    for version in ("0.12.0", "0.8.1", "0.2.0"):  # added out of order; as text 0.12.0 sorts before 0.2.0
        assert _models(models, "add", str(_version(SHIPPED, tmp_path / version, version))) == 0
    capsys.readouterr()
    assert _models(models, "--json", "list") == 0
    assert [r["version"] for r in json.loads(capsys.readouterr().out)] == ["0.2.0", "0.8.1", "0.12.0"]
    assert _models(models, "activate", "anatomy", "9.9.9") == 1  # the error lists the known ones in that order
    assert "known: 0.2.0, 0.8.1, 0.12.0" in capsys.readouterr().err
