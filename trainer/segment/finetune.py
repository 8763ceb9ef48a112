"""Fine-tune the active cord/lesion model on the shared data plus a site's corrections.

``sci-node train cord|lesion --corrections [DIR]``: the corrections exported by
``sci-node corrections export`` (BIDS-like, one subject per patient) are split **by patient**:
a share ``heldout_fraction`` of the patients (at least one when there are two or more) is held
out; the network starts from the active model's weights (same architecture, preprocessing and
post-processing as its card) and trains ``epochs`` epochs on the shared cases (``[data]`` of
the training config, or ``--data``) plus the other patients' corrections, at a tenth of the
config's learning rate. The card records how many corrections went in and scores the new model
and the model it replaces on the held-out corrections (on their source grids, through
:class:`sci_node.predict_seg.Segmenter`, like the node).

The lesion model is trained as in :mod:`trainer.seg` (synthetic lesions injected in the shared
cords every epoch) plus the corrections' real lesion masks (``_lesion-manual``, an empty mask
being a healthy cord the model must leave unmarked).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import structlog

from sci_node.errors import DataError, ModelError
from sci_node.imaging import preprocess
from trainer import __version__ as TRAINER_VERSION
from trainer import git_commit
from trainer.segment import data as tdata
from trainer.segment import train as tseg

log = structlog.get_logger(__name__)
LESION_SUFFIX = "lesion-manual"
FINETUNE_LR_FACTOR = 0.1


@dataclass(frozen=True)
class CorrectionSplit:
    """Correction cases split by patient (``group``): trained on, and held out for scoring."""

    train: tuple[tdata.Case, ...]
    held_out: tuple[tdata.Case, ...]


def split_by_patient(cases: Sequence[tdata.Case], heldout_fraction: float) -> CorrectionSplit:
    """Hold out ``round(fraction * patients)`` patients (at least 1 of 2 or more; none of 1).

    Patients are ordered by a hash of their subject label (deterministic, not by id order), so
    the held-out ones are neither the oldest nor the newest corrections.
    """
    groups = sorted({c.group for c in cases}, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    n_hold = 0 if len(groups) < 2 or heldout_fraction <= 0 else max(1, round(heldout_fraction * len(groups)))
    held = set(groups[:min(n_hold, len(groups) - 1)])
    return CorrectionSplit(tuple(c for c in cases if c.group not in held), tuple(c for c in cases if c.group in held))


def lesion_mask_path(case: tdata.Case) -> Path:
    """The ``_lesion-manual`` mask next to a correction case's ``_seg-manual`` cord mask."""
    if case.mask is None:
        raise DataError(f"correction {case.key} has no cord mask")
    return case.mask.with_name(case.mask.name.replace("_seg-manual", f"_{LESION_SUFFIX}"))


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(tdata.read_image(path)).astype(np.uint8)


def real_lesion_vols(cases: Sequence[tdata.Case], spec: preprocess.PrepSpec, margin_yx: int,
                     post: dict[str, Any]) -> list[tseg.Vol]:
    """Lesion-model volumes of the corrections: the cord's box, label = the real lesion mask."""
    from sci_node.imaging.postprocess import dilate_mm
    from sci_node.models.predict_seg import roi_dilate_mm, roi_input

    out = []
    for c in cases:
        image, cord = tdata.load_case(c)
        lesion = tdata.read_image(lesion_mask_path(c))
        tdata.check_geometry(image, lesion, lesion_mask_path(c))
        prep = preprocess.prepare(image, spec)
        cord_m = preprocess.mask_to_model_grid(cord, prep.grid)
        les_m = preprocess.mask_to_model_grid(sitk.Cast(lesion > 0, sitk.sitkUInt8), prep.grid)
        box = preprocess.roi_bbox(cord_m, (0, margin_yx, margin_yx))
        if box is None:
            raise DataError(f"correction {c.key}: the corrected cord is empty on the model grid")
        sz, sy, sx = (float(v) for v in prep.grid.GetSpacing()[::-1])
        sp = (sz, sy, sx)
        arr, cord_c, les_c = (preprocess.crop(a, box) for a in (prep.array, cord_m, les_m))
        if post.get("mask_input_to_roi"):
            arr = roi_input(arr, dilate_mm(cord_c, sp, roi_dilate_mm(post)), post)
        out.append(tseg.Vol(c.key, c.group, arr, les_c, sp, cord=cord_c, extra={"case": c}))  # type: ignore[arg-type]
    return out


def score_held_out(segmenter: Any, cases: Sequence[tdata.Case], task: str) -> dict[str, dict[str, float]]:
    """Per held-out correction: Dice of the model's mask against the corrected one (source grid).

    The lesion model is given the corrected cord as its ROI (as the node gives it the cord model's).
    """
    from sci_node.corrections import dice, lesion_changes

    out: dict[str, dict[str, float]] = {}
    for c in cases:
        image, cord = tdata.load_case(c)
        cord_a = sitk.GetArrayFromImage(cord).astype(np.uint8)
        if task == "cord":
            out[c.key] = {"dice": round(dice(segmenter.predict(image), cord_a), 4)}
            continue
        truth = _read(lesion_mask_path(c))
        pred = segmenter.predict(image, roi=cord_a)
        ch = lesion_changes(truth, pred)
        out[c.key] = {"dice": round(dice(pred, truth), 4), "false_lesions": ch["lesions_added"],
                      "missed_lesions": ch["lesions_removed"]}
    return out


def _mean(scores: dict[str, dict[str, float]]) -> float | None:
    return round(float(np.mean([s["dice"] for s in scores.values()])), 4) if scores else None


def _train(cfg: dict[str, Any], spec: preprocess.PrepSpec, shared: list[tdata.Case], split: CorrectionSplit,
           init: Any, seed: int, device: str, epochs: int, margin: int) -> tuple[Any, list[dict[str, float]]]:
    from trainer.lesion_families import lesion_source
    from trainer.segment.loop import train_network

    task = cfg["model"]["task"]
    rng = np.random.default_rng(seed)
    synth = tseg.synth_pool(cfg, spec, rng, task, margin)
    post = cfg.get("post", {})
    if task == "cord":
        vols = tseg.load_volumes(shared + list(split.train), spec, "cord", margin) + synth
        refresh = None
        if float(cfg["train"].get("lesion_fraction", 0.0)) > 0:
            frac, source = float(cfg["train"]["lesion_fraction"]), lesion_source(cfg)
            refresh = lambda ep, r: tseg.cord_with_lesions(vols, r, source, frac)  # noqa: E731
    else:
        base = tseg.load_volumes(shared, spec, "lesion", margin) + synth
        real = real_lesion_vols(split.train, spec, margin, post)
        source, lcfg = lesion_source(cfg), cfg.get("lesions", {})
        clean, look = float(lcfg.get("clean_fraction", 0.0)), float(lcfg.get("lookalike_fraction", 0.0))
        refresh = lambda ep, r: tseg.with_lesions(base, r, source, clean, post, look) + real  # noqa: E731
        vols = base + real
    minutes = float(cfg["train"].get("final_minutes", 6))
    return train_network(cfg, spec, vols, [], seed=seed, device=device, minutes=minutes, epochs=epochs,
                         tag="finetune", refresh=refresh, init_state=init)


def finetune_segmentation(model: str, config: Path | None, data: Path | None, corrections: Path, out: Path,
                          epochs: int | None, seed: int, device: str, models_dir: Path,
                          heldout_fraction: float = 0.2, command: str = "") -> Path:
    """Fine-tune the active ``model`` on shared data + corrections; write the artefact to ``out``.

    Parameters
    ----------
    model
        ``cord`` or ``lesion``.
    config, data
        Training config (default ``trainer/configs/<model>.toml``; its ``[data]``, ``[train]``
        budget, ``[synth]``/``[lesions]`` are used, its network and preprocessing are replaced
        by the active model's) and the shared data root (default ``[data] root``).
    corrections
        A ``sci-node corrections export`` folder.
    out
        Artefact folder (``weights.pt`` + ``card.json``).
    models_dir
        The registry whose active ``model`` is fine-tuned and scored against.

    Raises
    ------
    DataError
        No correction, or bad shared data / masks.
    ModelError
        No active ``model`` in the registry.
    """
    import torch

    from sci_node.models.artifact import load_network, write_artifact
    from sci_node.models.predict_seg import Segmenter
    from sci_node.models.registry import ModelRegistry

    cfg = tseg.load_config(model, config)
    torch.set_num_threads(int(cfg["train"].get("threads", 2)))
    reg = ModelRegistry(models_dir)
    base_version = reg.active().get(model)
    if base_version is None:
        raise ModelError(f"no active {model} model in {str(models_dir)!r} to fine-tune")
    base_net, base_card = load_network(reg.path_of(model, base_version), device=device)
    arch = base_card["architecture"]
    cfg["network"] = {"class": arch["class"], "args": dict(arch.get("args", {}))}
    cfg["post"] = dict(base_card.get("postprocessing", {}))
    cfg["train"] = {**cfg["train"], "lr": float(cfg["train"].get("lr", 2e-3)) * FINETUNE_LR_FACTOR}
    spec = preprocess.PrepSpec.from_card(base_card["preprocessing"])
    corr = tdata.discover(Path(corrections), tdata.DataSpec(mask_suffix="seg-manual"))
    split = split_by_patient(corr, heldout_fraction)
    shared = tseg.config_cases(cfg, data)
    margin = int(cfg.get("lesions", {}).get("crop_margin_yx", 24))
    n_epochs = int(epochs or cfg["train"].get("finetune_epochs", 10))
    log.info("finetune.start", model=model, base=base_version, shared=len(shared), corrections=len(corr),
             train_corrections=len(split.train), held_out=len(split.held_out), epochs=n_epochs)
    net, hist = _train(cfg, spec, shared, split, base_net.state_dict(), seed, device, n_epochs, margin)
    digest = tdata.data_hash(shared + list(corr))
    card = {k: v for k, v in base_card.items() if k not in ("weights_sha256",)}
    card.update(version=f"{base_version}-site.{digest[:8]}", data_hash=digest, trainer_version=TRAINER_VERSION,
                git_commit=git_commit(), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                description=f"{model} {base_version} fine-tuned on the site's corrections")
    new_scores = score_held_out(Segmenter(net, card, device), split.held_out, model)
    old_scores = score_held_out(Segmenter(base_net, base_card, device), split.held_out, model)
    card["metrics"] = {
        "validation": "fine-tuned; scored on held-out corrections (patients it did not train on)",
        "corrections": {"total": len(corr), "trained_on": len(split.train), "held_out": len(split.held_out),
                        "patients": len({c.group for c in corr}),
                        "held_out_dice_mean": _mean(new_scores),
                        "replaced": {"version": base_version, "held_out_dice_mean": _mean(old_scores)},
                        "per_case": {k: {"new": new_scores[k], "replaced": old_scores[k]} for k in new_scores}},
        "base": {k: v for k, v in base_card.get("metrics", {}).items() if k != "per_case"},
    }
    card["training"] = {"fine_tuned_from": {"name": model, "version": base_version,
                                            "weights_sha256": base_card.get("weights_sha256")},
                        "command": command, "seed": seed, "epochs": len(hist), "history": hist,
                        "lr": cfg["train"]["lr"], "corrections_dir": str(corrections),
                        "corrections": {"train": [c.key for c in split.train],
                                        "held_out": [c.key for c in split.held_out]},
                        "shared_cases": [c.key for c in shared]}
    write_artifact(Path(out), net.state_dict(), card)
    log.info("finetune.done", model=model, version=card["version"], out=str(out),
             held_out_dice_mean=_mean(new_scores), replaced_dice_mean=_mean(old_scores))
    return Path(out)
