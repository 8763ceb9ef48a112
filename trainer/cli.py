"""``sci-node train MODEL``: dispatch to the classifier or the segmentation trainer."""
from __future__ import annotations

from pathlib import Path

import structlog

from sci_node.errors import ConfigError

log = structlog.get_logger(__name__)
CLASSIFIERS = ("anatomy", "region_view", "sequence")
SEGMENTERS = ("cord", "lesion")


def train(model: str, config: Path | None, data: Path | None, out: Path | None, epochs: int | None,
          seed: int, device: str, keep_folds: Path | None = None, work_dir: Path | None = None) -> int:
    """Train ``model`` and write its artefact; return the exit code (0).

    Raises
    ------
    ConfigError
        Unknown model name or bad config (the CLI maps it to an exit code).
    """
    if model in CLASSIFIERS:
        from trainer.classifiers import train_classifier

        path = train_classifier(model, config, data, out, epochs, seed, device)
    elif model in SEGMENTERS:
        from trainer.seg import train_segmentation

        path = train_segmentation(model, config, data, out, epochs, seed, device, keep_folds, work_dir)
    else:
        raise ConfigError(f"unknown model {model!r} (expected one of {', '.join(CLASSIFIERS + SEGMENTERS)})")
    log.info("model trained", model=model, artefact=str(path))
    return 0
