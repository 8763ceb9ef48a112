"""``sci-node train MODEL``: dispatch to the classifier or the segmentation trainer."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import structlog

from sci_node.errors import ConfigError

log = structlog.get_logger(__name__)
CLASSIFIERS = ("anatomy", "region_view", "sequence")
SEGMENTERS = ("cord", "lesion")


def train(model: str, config: Path | None, data: Path | None, out: Path | None, epochs: int | None,
          seed: int, device: str, keep_folds: Path | None = None, work_dir: Path | None = None,
          folds: list[str] | None = None) -> int:
    """Train ``model`` and write its artefact; return the exit code (0). ``folds`` (segmentation
    models, with ``work_dir``): run those cross-validation folds only (:func:`trainer.seg.train_segmentation`).

    Raises
    ------
    ConfigError
        Unknown model name or bad config (the CLI maps it to an exit code).
    """
    if folds is not None and model not in SEGMENTERS:
        raise ConfigError(f"--folds is for the segmentation models ({', '.join(SEGMENTERS)}), not {model!r}")
    if model in CLASSIFIERS:
        from trainer.classifiers import train_classifier

        path = train_classifier(model, config, data, out, epochs, seed, device)
    elif model in SEGMENTERS:
        from trainer.seg import train_segmentation

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

    from trainer.finetune import finetune_segmentation

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
