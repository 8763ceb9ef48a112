"""Re-score kept LOSO fold networks with the current config's thresholds and post-processing.

Thresholds and post-processing do not change the weights, so they can be re-calibrated
without retraining: each fold network (written by ``sci-node train MODEL --keep-folds DIR``)
is run again on its held-out cases, :func:`trainer.segment.evaluate.calibrate` picks the threshold
(nested, as in training), each fold artefact gets the threshold chosen without its held-out
group, and the shipped artefact's card gets the new threshold,
post-processing and validation metrics. The weights are not touched; the card records the
re-scoring command. Running ``sci-node train MODEL --seed S`` with the same config gives
the same fold networks, hence the same card.

``python -m trainer.seg_rescore cord --folds /tmp/folds/cord --artifact models/cord/0.2.0 [--config F]``
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from sci_node.errors import DataError, ModelError
from sci_node.models.artifact import load_network, verify_artifact, write_card
from trainer.segment import data as tdata
from trainer.segment.evaluate import apply_setting, calibrate, evaluate_cord, evaluate_lesion, setting_grid
from trainer.segment.train import _resolve, data_spec, jsonable_settings, load_config, prep_spec, summarise

log = structlog.get_logger(__name__)


def _fold_dirs(folds: Path) -> list[Path]:
    dirs = sorted(p for p in Path(folds).iterdir() if (p / "card.json").is_file()) if Path(folds).is_dir() else []
    if not dirs:
        raise ModelError(f"no fold artefact (a folder with card.json) under {str(folds)!r}")
    return dirs


def rescore_folds(model: str, cfg: dict[str, Any], folds: Path, device: str = "cpu"
                  ) -> tuple[dict[str, Any], dict[str, dict[float, dict[str, dict[str, Any]]]]]:
    """Evaluate every kept fold on its held-out cases over ``cfg[train][thresholds]``.

    Returns
    -------
    tuple
        ``(metrics, fold_results)``: card-style metrics (nested-calibrated ``per_case``,
        summary, ``threshold_calibration``) and the raw ``{group: {threshold: {case: scores}}}``.
    """
    spec = prep_spec(cfg)
    grid = setting_grid(cfg, spec)
    cases = {c.key: c for c in tdata.discover(_resolve(cfg["data"]["root"]), data_spec(cfg))}
    evaluate = evaluate_cord if cfg["model"]["task"] == "cord" else evaluate_lesion
    seed = 0
    fold_results: dict[str, dict[float, dict[str, dict[str, Any]]]] = {}
    for d in _fold_dirs(folds):
        net, card = load_network(d, device=device)
        fold = card["training"]["splits"]["fold"]
        seed = int(card["training"].get("seed", 0))
        missing = [k for k in fold["val"] if k not in cases]
        if missing:
            raise DataError(f"fold {str(d)!r}: held-out case(s) {', '.join(missing)} not found in the data folder")
        fold_results[fold["held_out"]] = evaluate(net, cfg, spec, [cases[k] for k in fold["val"]], device, seed, grid)
        log.info("rescore.fold", model=model, held_out=fold["held_out"])
    _, per_case, info = calibrate(fold_results, cfg["model"]["task"], cfg["train"].get("max_false_lesions_per_scan"))
    metrics: dict[str, Any] = {"validation": "leave-one-subject-out", "per_case": per_case,
                               "threshold_calibration": info}
    metrics.update(summarise(per_case, cfg["model"]["task"]))
    return metrics, fold_results


def update_artifact(art_dir: Path, cfg: dict[str, Any], metrics: dict[str, Any], command: str) -> Path:
    """Rewrite ``art_dir``'s card with the calibrated threshold, the config's post-processing and ``metrics``."""
    card = verify_artifact(Path(art_dir))  # the weights stay as they are: checked, not rewritten
    if (card.get("name"), card.get("version")) != (cfg["model"]["name"], cfg["model"]["version"]):
        raise ModelError(f"artefact {str(art_dir)!r} is {card.get('name')} {card.get('version')}, but the config "
                         f"describes {cfg['model']['name']} {cfg['model']['version']}: pass its own --config")
    spec, post = apply_setting(cfg, prep_spec(cfg), metrics["threshold_calibration"]["chosen"])
    card["preprocessing"] = spec.to_card()
    card["postprocessing"] = post
    card["metrics"] = metrics
    card.setdefault("training", {})["rescored"] = {
        "command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "thresholds": metrics["threshold_calibration"]["grid"], "postprocessing": post}
    return write_card(Path(art_dir), card)


def update_folds(folds: Path, cfg: dict[str, Any], metrics: dict[str, Any],
                 fold_results: dict[str, dict[float, dict[str, dict[str, Any]]]]) -> None:
    """Give each fold artefact the threshold chosen **without** its held-out group, the config's
    post-processing and its per-threshold scores, so running a fold network through the node
    (``trainer.studies.infer_check``) is an honest held-out test."""
    chosen = metrics["threshold_calibration"]["chosen_per_held_out_group"]
    for d in _fold_dirs(folds):
        card = verify_artifact(d)
        group = card["training"]["splits"]["fold"]["held_out"]
        spec, post = apply_setting(cfg, prep_spec(cfg), chosen[group])
        card["preprocessing"], card["postprocessing"] = spec.to_card(), post
        card["metrics"] = {"held_out": group, "per_threshold": jsonable_settings(fold_results[group])}
        write_card(d, card)


def main(argv: list[str] | None = None) -> int:
    """CLI: re-score folds, print the per-threshold table, update the artefact (unless ``--dry-run``)."""
    from sci_node.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m trainer.seg_rescore", description=__doc__.splitlines()[0])
    p.add_argument("model", choices=["cord", "lesion"])
    p.add_argument("--folds", type=Path, required=True, help="folder written by --keep-folds")
    p.add_argument("--artifact", type=Path, help="shipped artefact whose card is updated")
    p.add_argument("--config", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = CPUs minus one)")
    a = p.parse_args(argv)
    configure_logging("console", "INFO")
    from sci_node.models.predict_seg import configure_threads

    configure_threads(a.threads)
    cfg = load_config(a.model, a.config)
    metrics, raw = rescore_folds(a.model, cfg, a.folds, a.device)
    for g, per_t in raw.items():
        for t, rows in sorted(per_t.items()):
            print(g, t, json.dumps({k: {m: (round(v, 3) if isinstance(v, float) else v) for m, v in r.items()
                                        if m in ("dice", "hd95_mm", "lesion_f1")} for k, r in rows.items()}))
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_case"}, indent=1))
    update_folds(a.folds, cfg, metrics, raw)
    if a.artifact:
        command = " ".join(["python -m trainer.seg_rescore", a.model, "--folds", str(a.folds), "--artifact",
                            str(a.artifact)] + (["--config", str(a.config)] if a.config else []))
        print(update_artifact(a.artifact, cfg, metrics, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
