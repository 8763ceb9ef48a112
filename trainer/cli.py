"""``sci-node train MODEL``: dispatch to the classifier or the segmentation trainer.

The node's command line does not import the trainer: :func:`register` adds ``train`` to it through
the ``sci_node.commands`` entry point (setup.cfg), so the dependency runs one way, trainer -> node.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import structlog

from sci_node.errors import ConfigError

log = structlog.get_logger(__name__)
CLASSIFIERS = ("anatomy", "region_view", "sequence")
SEGMENTERS = ("cord", "lesion")


def train(model: str, config: Path | None, data: Path | None, out: Path | None, epochs: int | None,
          seed: int, device: str, keep_folds: Path | None = None, work_dir: Path | None = None,
          folds: list[str] | None = None) -> int:
    """Train ``model`` and write its artefact; return the exit code (0). ``folds`` (segmentation
    models, with ``work_dir``): run those cross-validation folds only
    (:func:`trainer.segment.train.train_segmentation`).

    Raises
    ------
    ConfigError
        Unknown model name or bad config (the CLI maps it to an exit code).
    """
    if folds is not None and model not in SEGMENTERS:
        raise ConfigError(f"--folds is for the segmentation models ({', '.join(SEGMENTERS)}), not {model!r}")
    if model in CLASSIFIERS:
        from trainer.classify.train import train_classifier

        path = train_classifier(model, config, data, out, epochs, seed, device)
    elif model in SEGMENTERS:
        from trainer.segment.train import train_segmentation

        path = train_segmentation(model, config, data, out, epochs, seed, device, keep_folds, work_dir, folds)
    else:
        raise ConfigError(f"unknown model {model!r} (expected one of {', '.join(CLASSIFIERS + SEGMENTERS)})")
    log.info("model trained", model=model, artefact=str(path))
    return 0


def train_with_corrections(model: str, node_cfg: Any, corrections: str, config: Path | None, data: Path | None,
                           out: Path | None, epochs: int | None, seed: int, device: str,
                           work_dir: Path | None = None) -> int:
    """``sci-node train cord|lesion --corrections [DIR]``: fine-tune on shared data + the site's corrections.

    ``corrections`` is an exported folder, or ``"data-dir"``: export (de-identified) from the
    node's data dir first, into ``work_dir`` or ``DATA_DIR/finetune/``. The artefact goes to
    ``out`` (default ``DATA_DIR/finetune/<model>-<time>/``); register it with
    ``sci-node models add DIR --activate``.

    Raises
    ------
    ConfigError
        Not a segmentation model.
    """
    import time

    from trainer.segment.finetune import finetune_segmentation

    if model not in SEGMENTERS:
        raise ConfigError(f"--corrections fine-tunes a segmentation model (cord or lesion), not {model!r}")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    base = Path(work_dir) if work_dir else node_cfg.data_dir / "finetune"
    if corrections == "data-dir":
        from sci_node.corrections.export import export_corrections

        corr_dir = base / f"corrections-{stamp}"
        export_corrections(node_cfg, corr_dir, deidentify=True)
    else:
        corr_dir = Path(corrections)
    command = " ".join(["sci-node", "train", model, "--corrections", str(corrections)]
                       + (["--train-config", str(config)] if config else []) + (["--data", str(data)] if data else [])
                       + (["--epochs", str(epochs)] if epochs else []) + ["--seed", str(seed)])
    path = finetune_segmentation(model, config, data, corr_dir, Path(out) if out else base / f"{model}-{stamp}",
                                 epochs, seed, device, node_cfg.models_dir,
                                 node_cfg.corrections.heldout_fraction, command)
    log.info("model fine-tuned on corrections", model=model, artefact=str(path))
    sys.stdout.write(f"{path}\n")
    return 0


def register(sub: Any, add_config_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``sci-node train`` to the node's subparsers ``sub`` (the ``sci_node.commands`` entry point).

    ``add_config_flags`` adds the node's ``--config``/``--data-dir``/... flags to a parser.
    """
    p = sub.add_parser("train", help="train one of the five models (offline trainer)")
    add_config_flags(p)
    p.add_argument("model", choices=["anatomy", "region_view", "sequence", "cord", "lesion"])
    p.add_argument("--train-config", dest="train_config", type=Path,
                   help="training config TOML (default: trainer/configs/MODEL.toml)")
    p.add_argument("--data", type=Path, help="data root (default: ../shared/data/spine)")
    p.add_argument("--out", type=Path, help="artefact output folder (default: models/MODEL/VERSION)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--keep-folds", dest="keep_folds", type=Path,
                   help="segmentation models: also write each cross-validation fold network here")
    p.add_argument("--work-dir", dest="work_dir", type=Path,
                   help="segmentation models: resumable run (fold results and per-epoch checkpoints); "
                        "re-run the same command to resume")
    p.add_argument("--folds", type=lambda v: [f for f in v.split(",") if f], metavar="FOLD[,FOLD]",
                   help="segmentation models, with --work-dir: run these cross-validation folds only (e.g. "
                        "fold0,fold1; 'final' = the final network; one process per core), then the same command "
                        "without it to finish")
    p.add_argument("--corrections", nargs="?", const="data-dir", default=None, metavar="DIR",
                   help="cord/lesion: fine-tune the active model on the shared data plus the site's corrections "
                        "(an exported DIR, or without DIR: exported, de-identified, from --data-dir)")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace, cfg: Any) -> int:
    """The ``train`` handler: ``cfg`` is the node's ``NodeConfig`` (data dir, models dir for --corrections)."""
    if args.corrections is not None:
        return train_with_corrections(args.model, cfg, args.corrections, config=args.train_config, data=args.data,
                                      out=args.out, epochs=args.epochs, seed=args.seed, device=args.device or "cpu",
                                      work_dir=args.work_dir)
    return train(args.model, config=args.train_config, data=args.data, out=args.out,
                 epochs=args.epochs, seed=args.seed, device=args.device or "cpu", keep_folds=args.keep_folds,
                 work_dir=args.work_dir, folds=args.folds)
