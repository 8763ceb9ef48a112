"""Assemble a segmentation artefact from a resumable run that has not finished every fold.

``sci-node train MODEL --work-dir DIR`` writes each finished fold's scores
(``DIR/<fold>/result.json``) and the final network's checkpoint (``DIR/final/ckpt.pt``). A
3-hour session may end with the final network trained but some folds still to run. This
command writes the artefact from what is there: the final network (its checkpoint must have
run all its epochs), the threshold calibrated on the **finished** folds only, and a card that
names the finished and the pending folds. Re-running the training command later with the
same ``--work-dir`` finishes the pending folds, reuses the others and the final network, and
writes the complete card.

``python -m trainer.seg_assemble cord --work-dir DIR [--config F] [--out DIR] [--seed S]``
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import structlog

from sci_node.errors import DataError
from sci_node.models.artifact import build_network, write_artifact
from trainer.segment import data as tdata
from trainer.segment.evaluate import apply_setting, calibrate
from trainer.segment.train import REPO, _card, config_cases, cv_folds, load_config, prep_spec, summarise, train_command

log = structlog.get_logger(__name__)


def finished_folds(cfg: dict[str, Any], cases: list[tdata.Case], work: Path
                   ) -> tuple[dict[str, Any], list[dict[str, Any]], list[tuple[str, list[str]]]]:
    """``(results, splits, pending)`` of the run in ``work``: scores and splits of the finished
    folds, and the ``(name, held_out_groups)`` of the pending ones."""
    results: dict[str, Any] = {}
    splits: list[dict[str, Any]] = []
    pending = []
    for name, held in cv_folds(cfg, cases, []):
        path = Path(work) / name / "result.json"
        if not path.is_file():
            pending.append((name, held))
            continue
        saved = json.loads(path.read_text())
        results[name] = {s: r for s, r in saved["results"]}
        splits.append(saved["split"])
    return results, splits, pending


def final_network(cfg: dict[str, Any], work: Path, epochs: int):
    """The EMA network of ``work/final/ckpt.pt`` and its history; it must have run ``epochs`` epochs."""
    import torch

    path = Path(work) / "final" / "ckpt.pt"
    if not path.is_file():
        raise DataError(f"no final-network checkpoint {str(path)!r}: the final model has not started")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if int(state["epoch"]) < epochs:
        raise DataError(f"final network in {str(path)!r} has run {state['epoch']} of {epochs} epochs")
    net = build_network({"architecture": {"class": cfg["network"]["class"], "args": cfg["network"]["args"]}})
    net.load_state_dict(state["ema"])
    return net.eval(), list(state["history"])


def assemble(model: str, config: Path | None, work: Path, out: Path | None, seed: int) -> Path:
    """Write the artefact of the partial run in ``work`` (see the module docstring)."""
    cfg = load_config(model, config)
    cfg["_command"] = train_command(model, config, seed=seed)
    task = cfg["model"]["task"]
    cases = config_cases(cfg)
    results, splits, pending = finished_folds(cfg, cases, work)
    if not results:
        raise DataError(f"no finished fold under {str(work)!r}")
    _, per_case, info = calibrate(results, task, cfg["train"].get("max_false_lesions_per_scan"))
    n = len(results) + len(pending)
    metrics: dict[str, Any] = {
        "validation": f"subject-grouped {n}-fold, {len(results)} of {n} folds finished "
                      f"(pending: {', '.join(name for name, _ in pending) or 'none'})",
        "folds_pending": [{"fold": name, "held_out_groups": held} for name, held in pending],
        "per_case": per_case, "threshold_calibration": info}
    metrics.update(summarise(per_case, task))
    spec, post = apply_setting(cfg, prep_spec(cfg), info["chosen"])
    cfg = {**cfg, "post": post}
    net, hist = final_network(cfg, work, int(cfg["train"].get("final_epochs", cfg["train"]["epochs"])))
    card = _card(cfg, spec, metrics, cases, {"folds": splits, "final_train": sorted(c.key for c in cases)},
                 seed, len(hist), hist)
    card["training"]["assembled_from"] = {"work_dir": str(work), "command": "python -m trainer.seg_assemble "
                                          + " ".join(sys.argv[1:])}
    out_dir = Path(out) if out else REPO / "models" / cfg["model"]["name"] / cfg["model"]["version"]
    write_artifact(out_dir, net.state_dict(), card)
    log.info("assemble.done", model=model, out=str(out_dir), folds_finished=len(results), folds_pending=len(pending))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from sci_node.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m trainer.seg_assemble", description=__doc__.splitlines()[0])
    p.add_argument("model", choices=["cord", "lesion"])
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--config", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    configure_logging("console", "INFO")
    sys.stdout.write(f"{assemble(a.model, a.config, a.work_dir, a.out, a.seed)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
