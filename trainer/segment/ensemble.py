"""Join segmentation artefacts trained with different seeds into one seed-ensemble artefact.

The members must be one model trained on one data set: same name, kind, task, architecture,
preprocessing and ``data_hash`` (only the seed differs). The new artefact's network is
:class:`sci_node.nets.LogitMeanEnsemble` (the members' logits averaged, the same average as
the left-right mirror), its weights the members' ``state_dict`` under ``members.<i>.``, its
card the first member's with the members listed under ``training.ensemble``. Its threshold is
the first member's until it is re-calibrated (``python -m trainer.seg_recalibrate``); the card
says so (``metrics.validation``).

``python -m trainer.seg_ensemble --artifact A --artifact B [--artifact C ...] --out DIR --version V``
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

from sci_node.errors import DataError
from sci_node.models.artifact import WEIGHTS, verify_artifact, write_artifact
from trainer import git_commit

ENSEMBLE_CLASS = "sci_node.nets.LogitMeanEnsemble"
#: Card keys every member must share (the seed is what differs; ``preprocessing`` without its threshold,
#: which re-calibration sets).
SAME_KEYS = ("name", "kind", "task", "architecture", "preprocessing", "data_hash", "labels")


def _shared(card: dict[str, Any], key: str) -> Any:
    if key == "preprocessing":
        return {k: v for k, v in card.get(key, {}).items() if k != "threshold"}
    return card.get(key)


def check_members(cards: list[dict[str, Any]], paths: list[Path]) -> None:
    """Raise :class:`DataError` naming the first member that differs from the first in a :data:`SAME_KEYS` key."""
    if len(cards) < 2:
        raise DataError(f"an ensemble needs at least two artefacts, got {len(cards)}")
    for card, path in zip(cards[1:], paths[1:]):
        for key in SAME_KEYS:
            if _shared(card, key) != _shared(cards[0], key):
                raise DataError(f"{str(path)!r} differs from {str(paths[0])!r} in {key!r}: "
                                f"{_shared(card, key)!r} vs {_shared(cards[0], key)!r}")
    if cards[0]["architecture"]["class"] == ENSEMBLE_CLASS:
        raise DataError(f"{str(paths[0])!r} is already an ensemble; join its members instead")


def ensemble_card(cards: list[dict[str, Any]], paths: list[Path], version: str, command: str) -> dict[str, Any]:
    """The new card: the first member's, with the ensemble architecture, the members and ``version``."""
    arch = cards[0]["architecture"]
    card = copy.deepcopy(cards[0])
    card.pop("weights_sha256", None)
    card["version"] = version
    card["architecture"] = {"class": ENSEMBLE_CLASS, "args": {
        "member_class": arch["class"], "member_args": arch.get("args", {}), "members": len(cards)}}
    card["description"] = f"{cards[0].get('description', '')} (seed ensemble of {len(cards)}, logits averaged)"
    card["training"]["ensemble"] = {
        "command": command,
        "members": [{"from": f"{c['name']} {c['version']}", "path": str(p), "seed": c["training"].get("seed"),
                     "command": c["training"].get("command"), "weights_sha256": c["weights_sha256"],
                     "metrics": c.get("metrics", {})} for c, p in zip(cards, paths)]}
    card["metrics"] = {"validation": f"not scored: a new ensemble of {len(cards)} members (threshold of "
                                     f"{cards[0]['name']} {cards[0]['version']}); re-calibrate with "
                                     f"python -m trainer.seg_recalibrate"}
    card["git_commit"] = git_commit()
    card["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return card


def join(paths: list[Path], out: Path, version: str, command: str) -> Path:
    """Write the ensemble artefact of the member artefacts ``paths`` to ``out``; return ``out``."""
    import torch

    cards = [verify_artifact(p) for p in paths]
    check_members(cards, paths)
    state: dict[str, torch.Tensor] = {}
    for i, path in enumerate(paths):
        member = torch.load(Path(path) / WEIGHTS, map_location="cpu", weights_only=True)
        state.update({f"members.{i}.{k}": v for k, v in member.items()})
    return write_artifact(Path(out), state, ensemble_card(cards, paths, version, command))


def main(argv: list[str] | None = None) -> int:
    """CLI: write the ensemble artefact and print its folder."""
    p = argparse.ArgumentParser(prog="python -m trainer.seg_ensemble", description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, action="append", required=True,
                   help="a member artefact folder (give it two or more times)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--version", required=True)
    a = p.parse_args(argv)
    command = "python -m trainer.seg_ensemble " + " ".join(argv if argv is not None else sys.argv[1:])
    out = join(list(a.artifact), a.out, a.version, command)
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
