"""Training of the cord and lesion segmentation models (2-D / 2.5-D MONAI U-Nets on axial slices).

``train_segmentation`` = leave-one-subject-out (LOSO) folds for validation, then a final model on
every labelled subject, written as an artefact whose card carries the LOSO metrics. Everything
the model sees goes through :mod:`sci_node.preprocess` (the same code as inference), and the
final scores are computed by :class:`sci_node.predict_seg.Segmenter` on each source grid.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from sci_node.errors import ConfigError, DataError
from sci_node.imaging import preprocess
from trainer import __version__ as TRAINER_VERSION
from trainer import git_commit, read_toml_config
from trainer.lesion_families import LesionSource, lesion_source
from trainer.lesions import inject_lookalikes
from trainer.segment import data as tdata
from trainer.segment.evaluate import apply_setting, evaluate_cord, evaluate_lesion, setting_grid
from trainer.segment.loop import CANAL_GROUP

log = structlog.get_logger(__name__)
REPO = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LABELS = {
    "cord": {"value": 1, "name": "Spinal cord",
             "snomed": {"code": "2748008", "meaning": "Spinal cord", "scheme": "SCT"},
             "category": {"code": "91723000", "meaning": "Anatomical Structure", "scheme": "SCT"}},
    "lesion": {"value": 1, "name": "Lesion",
               "snomed": {"code": "52988006", "meaning": "Lesion", "scheme": "SCT"},
               "category": {"code": "49755003", "meaning": "Morphologically Abnormal Structure", "scheme": "SCT"}},
}


@dataclass
class Vol:
    """A training/validation volume on the model grid: ``(Z, Y, X)`` arrays, spacing ``(sz, sy, sx)`` mm."""

    key: str
    group: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    cord: np.ndarray | None = None  # lesion model: the cord mask the lesions are injected in
    synthetic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def load_config(model_name: str, config: Path | None) -> dict[str, Any]:
    """Read ``trainer/configs/<model>.toml`` (or ``config``); raise ``ConfigError`` naming the file."""
    path = Path(config) if config else CONFIGS / f"{model_name}.toml"
    cfg = read_toml_config(path)
    missing = [k for k in ("model", "network", "preprocessing", "data", "train") if k not in cfg]
    if missing:
        raise ConfigError(f"training config {str(path)!r} lacks table(s) {', '.join(missing)}")
    if cfg["model"].get("task") not in ("cord", "lesion"):
        raise ConfigError(f"training config {str(path)!r}: model.task must be 'cord' or 'lesion', "
                          f"got {cfg['model'].get('task')!r}")
    cfg["_path"] = str(path)
    return cfg


def train_command(model: str, config: Path | None, data: Path | None = None, epochs: int | None = None,
                  seed: int = 0) -> str:
    """The ``sci-node train`` command a card records to reproduce its network (the output folder does not
    change the model, so ``--out`` is left out; ``--train-config``, since ``--config`` is the node's)."""
    return " ".join(["sci-node", "train", model] + (["--train-config", str(config)] if config else [])
                    + (["--data", str(data)] if data else []) + (["--epochs", str(epochs)] if epochs else [])
                    + ["--seed", str(seed)])


def prep_spec(cfg: dict[str, Any]) -> preprocess.PrepSpec:
    p = cfg["preprocessing"]
    return preprocess.PrepSpec(spacing_yx=tuple(p["spacing_yx"]), z_spacing=p.get("z_spacing"),
                               lower=p.get("lower", 0.5), upper=p.get("upper", 99.5), clip_max=p.get("clip_max", 1.5),
                               patch_yx=tuple(p["patch_yx"]), context=int(p.get("context", 0)),
                               threshold=float(p.get("threshold", 0.5)),
                               thickness_channel=bool(p.get("thickness_channel", False)),
                               flip_x_tta=bool(p.get("flip_x_tta", False)),
                               sw_overlap=float(p.get("sw_overlap", 0.25)))


def data_spec(cfg: dict[str, Any]) -> tdata.DataSpec:
    d = cfg["data"]
    return tdata.DataSpec(mask_suffix=d.get("mask_suffix", "seg-manual"), missing_mask=d.get("missing_mask", "error"),
                          unlabelled=tuple(d.get("unlabelled", ())),
                          exclude=tuple(d.get("exclude", ())), same_person=d.get("same_person", []),
                          mask_from=dict(d.get("mask_from", {})), train_only=tuple(d.get("train_only", ())))


def config_cases(cfg: dict[str, Any], root: Path | None = None) -> list[tdata.Case]:
    """The labelled cases of ``[data]`` under ``root`` (default ``[data] root``), kept to
    ``[data] contrasts`` when given (exact names or fnmatch patterns: ``"*T2starw"`` is
    gm-challenge's ``run-1_T2starw``). Raises ``DataError`` when no case is left."""
    import fnmatch

    root = Path(root) if root else _resolve(cfg["data"]["root"])
    cases = tdata.discover(root, data_spec(cfg))
    include = cfg["data"].get("contrasts")
    if include:
        cases = [c for c in cases if any(fnmatch.fnmatchcase(c.contrast, pat) for pat in include)]
        if not cases:
            raise DataError(f"data folder {str(root)!r} has no labelled image of contrast {', '.join(include)}")
    return cases


def _resolve(p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else (REPO / p).resolve()


def below_end_negatives(lab: np.ndarray, spacing: tuple[float, float, float], below_mm: float,
                        radius_mm: float = 12.0, edge_mm: float = 10.0, max_slice_mm: float = 2.5) -> np.ndarray | None:
    """Patch centres below the inferior end of a cord label whose end is in view (the thecal sac below the conus).

    ``(N, 3)`` indices of the ``(Z, Y, X)`` model grid: every voxel of the ``below_mm`` below the
    label's lowest slice within ``radius_mm`` in-plane of the label's centre on its lowest 5 mm.
    ``None`` when off (``below_mm <= 0``), when the label reaches to within ``edge_mm`` of the
    grid's inferior edge (the end is not in view: a crop), or when the grid is coarser than
    ``max_slice_mm`` along Z (axial slabs). In the data this is ``sub-PAM50small``, whose mask ends
    at the conus of an image that goes on 76 mm below it.
    """
    zs = np.nonzero(lab.reshape(lab.shape[0], -1).any(axis=1))[0]
    sz = float(spacing[0])
    if below_mm <= 0 or zs.size == 0 or sz > max_slice_mm or zs[0] * sz < edge_mm:
        return None
    low = lab[zs[0]:zs[0] + max(1, int(round(5.0 / sz)))]
    _, cy, cx = np.argwhere(low > 0).mean(axis=0)
    yy, xx = np.mgrid[:lab.shape[1], :lab.shape[2]]
    disc = np.hypot((yy - cy) * spacing[1], (xx - cx) * spacing[2]) <= radius_mm
    below = np.zeros(lab.shape, dtype=bool)
    below[max(0, zs[0] - int(round(below_mm / sz))):zs[0]] = disc
    return np.argwhere(below)


def load_volumes(cases: list[tdata.Case], spec: preprocess.PrepSpec, task: str, margin_yx: int,
                 hard_negatives: bool = False, below_end_mm: float = 0.0) -> list[Vol]:
    """Preprocess each case with the inference preprocessing (model grid, normalised).

    With ``hard_negatives`` (lesion model), a case with a grey-matter mask (:func:`trainer.data.gm_mask_path`)
    gets its grey-matter voxels inside the cord, ``(N, 3)`` indices on the cropped model grid, as
    ``extra["hard_negatives"]``: patch centres the sampler draws as hard negatives (grey matter is
    brighter than white matter on T2*w and is not a lesion). With ``below_end_mm`` (cord model), a
    case whose cord label ends in view gets the canal below that end instead (:func:`below_end_negatives`).
    """
    vols = []
    for c in cases:
        image, mask = tdata.load_case(c)
        prep = preprocess.prepare(image, spec)
        lab = preprocess.mask_to_model_grid(mask, prep.grid)
        if not lab.any():
            raise DataError(f"mask {str(c.mask)!r} is empty")
        sp = tuple(float(s) for s in prep.grid.GetSpacing()[::-1])
        arr = prep.array
        gm_path = tdata.gm_mask_path(c) if hard_negatives else None
        gm = None if gm_path is None else preprocess.mask_to_model_grid(tdata.read_image(gm_path), prep.grid)
        if task == "lesion":  # the lesion model sees a box around the cord, as at inference
            box = preprocess.roi_bbox(lab, (0, margin_yx, margin_yx))
            if box is None:
                raise DataError(f"mask {str(c.mask)!r} is empty on the model grid")
            arr, lab = preprocess.crop(arr, box), preprocess.crop(lab, box)
            gm = None if gm is None else preprocess.crop(gm, box)
        extra: dict[str, Any] = {"case": c}
        if gm is not None and (gm & lab).any():
            extra["hard_negatives"] = np.argwhere((gm > 0) & (lab > 0))
        below = below_end_negatives(lab, sp, below_end_mm) if task == "cord" else None  # type: ignore[arg-type]
        if below is not None and below.size:
            extra["hard_negatives"] = below
        vols.append(Vol(c.key, c.group, arr, lab, sp, cord=lab if task == "lesion" else None,  # type: ignore[arg-type]
                        extra=extra))
    return vols


def synth_pool(cfg: dict[str, Any], spec: preprocess.PrepSpec, rng: np.random.Generator, task: str,
               margin_yx: int) -> list[Vol]:
    """Synthetic volumes: ``[synth] pool`` PAM50-derived ones (group ``synthetic``) and, for the
    cord, ``canal_pool`` cord-free thecal sacs below the conus (group ``CANAL_GROUP``, not
    template-derived). Empty list when ``[synth]`` is absent or both counts are 0."""
    scfg = cfg.get("synth", {})
    n = int(scfg.get("pool", 0))
    yx = scfg.get("out_yx", (112, 112))
    out_yx = (int(yx[0]), int(yx[1]))
    out: list[Vol] = []
    if n > 0:
        out = pam50_pool(n, scfg, spec, rng, task, margin_yx, out_yx)
    # drawn after the PAM50 pool, so adding canal volumes leaves the PAM50 ones unchanged
    return out + (canal_pool(int(scfg.get("canal_pool", 0)), spec, rng, out_yx) if task == "cord" else [])


def pam50_pool(n: int, scfg: dict[str, Any], spec: preprocess.PrepSpec, rng: np.random.Generator, task: str,
               margin_yx: int, out_yx: tuple[int, int]) -> list[Vol]:
    """``n`` normalised PAM50-derived volumes (:func:`trainer.synth.synth_volume`), cropped to the
    cord's box for the lesion task."""
    from trainer.segment.synth import load_template, synth_volume

    tmpl = load_template(_resolve(scfg["template"]))
    out = []
    for i in range(n):
        img, lab, sp = synth_volume(rng, tmpl, spec.spacing_yx, out_yx)
        img = preprocess.normalise(img, spec)
        if task == "lesion":
            box = preprocess.roi_bbox(lab, (0, margin_yx, margin_yx))
            if box is None:  # the random length missed the cord: keep it as a negative example
                continue
            img, lab = preprocess.crop(img, box), preprocess.crop(lab, box)
        out.append(Vol(f"synth-{i}", "synthetic", img, lab, sp, cord=lab if task == "lesion" else None, synthetic=True))
    return out


def canal_pool(n: int, spec: preprocess.PrepSpec, rng: np.random.Generator, out_yx: tuple[int, int]) -> list[Vol]:
    """``n`` normalised cord-free canal volumes (:func:`trainer.synth.synth_canal_volume`), empty labels."""
    from trainer.segment.synth import synth_canal_volume

    out = []
    for i in range(n):
        img, lab, sp = synth_canal_volume(rng, spec.spacing_yx, out_yx)
        out.append(Vol(f"canal-{i}", CANAL_GROUP, preprocess.normalise(img, spec), lab, sp, synthetic=True))
    return out


def _fold_vols(vols: list[Vol], synth: list[Vol], held: list[str], cfg: dict[str, Any]) -> list[Vol]:
    """Training volumes of the fold holding out the groups ``held``. The PAM50-derived synthetic
    volumes are dropped when a held group is in ``[synth] exclude_when_validating``; the
    template-free ones (``CANAL_GROUP``) stay."""
    train = [v for v in vols if v.group not in held]
    no_synth = bool(set(held) & set(cfg.get("synth", {}).get("exclude_when_validating", [])))
    return train + [v for v in synth if not (no_synth and v.group == "synthetic")]


def with_lesions(vols: list[Vol], rng: np.random.Generator, source: LesionSource, clean_fraction: float = 0.0,
                 post: dict[str, Any] | None = None, lookalike_fraction: float = 0.0) -> list[Vol]:
    """Copies of cord volumes with freshly injected lesions (label = lesion mask), each drawn from one
    of ``source``'s lesion families (:mod:`trainer.lesion_families`). A family that swells the cord
    also gives the copy its swollen cord (the ROI the network is fed).

    ``clean_fraction`` of the copies (drawn per volume) get no lesion and an empty label:
    healthy cords the network must leave unmarked (false lesions on healthy scans).
    ``lookalike_fraction`` of the copies first get a hyperintense look-alike
    (:func:`trainer.lesions.inject_lookalikes`: central canal, CSF partial-volume rim, flow
    band) that is *not* labelled: hard negatives.

    ``post`` is the config's ``[post]`` table (the card's ``postprocessing``). With
    ``mask_input_to_roi`` the image is fed, after the injection, through
    :func:`~sci_node.predict_seg.roi_input` with the cord dilated by
    :func:`~sci_node.predict_seg.roi_dilate_mm`: what the node's
    :meth:`~sci_node.predict_seg.Segmenter.predict_prob_model_grid` feeds the network.
    """
    from sci_node.imaging.postprocess import dilate_mm
    from sci_node.models.predict_seg import roi_dilate_mm, roi_input

    post = post or {}
    out = []
    for v in vols:
        if v.cord is None:
            raise DataError(f"volume {v.key} has no cord mask to place lesions in")
        base = v.image
        if lookalike_fraction > 0 and rng.random() < lookalike_fraction:
            base = inject_lookalikes(rng, v.image, v.cord, v.spacing)
        cord = v.cord
        if clean_fraction > 0 and rng.random() < clean_fraction:
            img, les = base.copy(), np.zeros(v.image.shape, np.uint8)
        else:
            draw = source(rng, base, v.cord, v.spacing)
            img, les, cord = draw.image, draw.lesion, draw.cord
        if post.get("mask_input_to_roi"):
            img = roi_input(img, dilate_mm(cord, v.spacing, roi_dilate_mm(post)), post)
        out.append(Vol(v.key, v.group, img, les, v.spacing, cord=cord, synthetic=v.synthetic, extra=v.extra))
    return out


def cord_with_lesions(vols: list[Vol], rng: np.random.Generator, source: LesionSource,
                      fraction: float) -> list[Vol]:
    """The cord training volumes, a ``fraction`` of them (drawn anew each epoch) with synthetic
    hyperintense lesions from ``source``'s families injected inside the cord; the cord label is
    unchanged, or the family's swollen cord when it models swelling.

    A lesion is part of the cord: without this the cord model reads a bright intramedullary
    lesion as CSF, cuts it out of the cord mask, and the lesion model (whose output is cut to
    the cord) loses it.
    """
    out = []
    for v in vols:
        if v.label.any() and rng.random() < fraction:
            draw = source(rng, v.image, v.label, v.spacing)
            v = Vol(v.key, v.group, draw.image, draw.cord, v.spacing, synthetic=v.synthetic, extra=v.extra)
        out.append(v)
    return out


def run_fold(cfg: dict[str, Any], spec: preprocess.PrepSpec, train_vols: list[Vol], val_vols: list[Vol],
             seed: int, device: str, minutes: float, epochs: int, tag: str, checkpoint: Path | None = None):
    """Train one network; return ``(net, history)`` (history = per-epoch loss and val Dice)."""
    from trainer.segment.loop import train_network

    refresh = None
    if cfg["model"]["task"] == "lesion":
        source = lesion_source(cfg)
        post = cfg.get("post", {})
        val_vols = with_lesions(val_vols, np.random.default_rng(seed + 1), source, post=post)
        clean = float(cfg.get("lesions", {}).get("clean_fraction", 0.0))
        look = float(cfg.get("lesions", {}).get("lookalike_fraction", 0.0))
        refresh = lambda ep, rng: with_lesions(train_vols, rng, source, clean, post, look)  # noqa: E731
    elif float(cfg["train"].get("lesion_fraction", 0.0)) > 0:
        frac, source = float(cfg["train"]["lesion_fraction"]), lesion_source(cfg)
        refresh = lambda ep, rng: cord_with_lesions(train_vols, rng, source, frac)  # noqa: E731
    return train_network(cfg, spec, train_vols, val_vols, seed=seed, device=device, minutes=minutes,
                         epochs=epochs, tag=tag, refresh=refresh, checkpoint=checkpoint)


def jsonable_settings(per_setting: dict[Any, Any]) -> dict[str, Any]:
    """Per-setting results with string keys (as JSON stores them)."""
    return {str(k): v for k, v in per_setting.items()}


def _card(cfg: dict[str, Any], spec: preprocess.PrepSpec, metrics: dict[str, Any], cases: list[tdata.Case],
          splits: dict[str, Any], seed: int, epochs: int, history: list[dict[str, float]]) -> dict[str, Any]:
    task = cfg["model"]["task"]
    pre = spec.to_card()
    return {
        "name": cfg["model"]["name"], "version": cfg["model"]["version"], "kind": "segmentation",
        "task": task, "description": cfg["model"].get("description", ""),
        "architecture": {"class": cfg["network"]["class"], "args": cfg["network"]["args"]},
        "preprocessing": pre, "postprocessing": cfg.get("post", {}),
        "labels": [LABELS[task]], "metrics": metrics, "data_hash": tdata.data_hash(cases),
        "training": {"config": {k: v for k, v in cfg.items() if not k.startswith("_")},
                     "config_file": cfg["_path"], "command": cfg["_command"], "seed": seed, "epochs": epochs,
                     "splits": splits, "history": history,
                     "cases": [{"key": c.key, "group": c.group, "image": str(c.image), "mask": str(c.mask)}
                               for c in cases]},
        "trainer_version": TRAINER_VERSION, "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cv_folds(cfg: dict[str, Any], cases: list[tdata.Case], vols: list[Vol]) -> list[tuple[str, list[str]]]:
    """The validation folds ``[(name, held_out_groups)]``.

    ``[train] folds = K`` gives subject-grouped K-fold (:func:`trainer.data.kfold_groups`);
    without it, leave-one-group-out. Groups in ``[data] train_only`` (population templates)
    are never held out; ``[train] loso_groups`` restricts LOSO to a subset (comparisons).
    """
    tcfg = cfg["train"]
    train_only = set(cfg["data"].get("train_only", ()))
    if tcfg.get("folds"):
        return tdata.kfold_groups(cases, int(tcfg["folds"]), sorted(train_only))
    all_groups = sorted({v.group for v in vols} - train_only)
    return [(g, [g]) for g in all_groups if g in tcfg.get("loso_groups", all_groups)]


def _fold_result_path(work: Path | None, name: str) -> Path | None:
    return None if work is None else Path(work) / name / "result.json"


def _run_cv_fold(cfg: dict[str, Any], spec: preprocess.PrepSpec, vols: list[Vol], synth: list[Vol], name: str,
                 held: list[str], seed: int, device: str, n_epochs: int, grid: list[Any],
                 work: Path | None, keep_folds: Path | None) -> tuple[dict[Any, Any], dict[str, Any]]:
    """Train the fold holding out ``held`` and score its cases; ``(per_setting_results, split)``.

    With ``work``, a finished fold's result is read back instead of retrained, and an
    unfinished one resumes from its per-epoch checkpoint (``work/<name>/ckpt.pt``).
    """
    res_path = _fold_result_path(work, name)
    if res_path is not None and res_path.is_file():
        saved = json.loads(res_path.read_text())
        log.info("train.fold_reused", fold=name, held_out=held, path=str(res_path))
        return {s: r for s, r in saved["results"]}, saved["split"]
    task = cfg["model"]["task"]
    train_v = _fold_vols(vols, synth, held, cfg)
    val_v = [v for v in vols if v.group in held]
    ckpt = None if work is None else Path(work) / name / "ckpt.pt"
    net, hist = run_fold(cfg, spec, train_v, val_v, seed, device, float(cfg["train"].get("fold_minutes", 4)),
                         n_epochs, tag=f"fold-{name}", checkpoint=ckpt)
    results = (evaluate_cord if task == "cord" else evaluate_lesion)(
        net, cfg, spec, [v.extra["case"] for v in val_v], device, seed, grid)
    split = {"held_out": name, "held_out_groups": held,
             "train": sorted({v.key for v in train_v if not v.synthetic}),
             "synthetic": sum(v.synthetic for v in train_v), "val": [v.key for v in val_v], "epochs_run": len(hist)}
    for folder in [d for d in (keep_folds, work) if d is not None]:
        from sci_node.models.artifact import write_artifact

        fold_cases = [v.extra["case"] for v in train_v if not v.synthetic]  # what this fold trained on
        card = _card(cfg, spec, {"held_out": held, "per_threshold": jsonable_settings(results)}, fold_cases,
                     {"fold": split}, seed, len(hist), hist)
        card["version"] = f"{card['version']}+cv-{name}"
        write_artifact(Path(folder) / name, net.state_dict(), card)
    if res_path is not None:
        res_path.write_text(json.dumps({"results": [[s, r] for s, r in results.items()], "split": split}))
    return results, split


def _loso(cfg: dict[str, Any], spec: preprocess.PrepSpec, vols: list[Vol], synth: list[Vol], seed: int,
          device: str, n_epochs: int, keep_folds: Path | None = None, cases: list[tdata.Case] | None = None,
          work: Path | None = None, only: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cross-validation folds (:func:`cv_folds`): train without the fold's groups, score them on
    their source grids.

    ``only`` (fold names) runs those folds alone and calibrates nothing: a part of the run, for
    sharing one resumable ``work`` folder between processes (one per core); the full run reuses them.

    Each fold's held-out cases are scored on a grid of thresholds (``[train] thresholds``);
    :func:`trainer.seg_eval.calibrate` picks the shipped threshold and reports every fold at
    the threshold chosen on the other folds. ``keep_folds`` also writes each fold network as
    an artefact (``DIR/<fold>/``) for later analysis; ``work`` makes the run resumable.
    """
    from trainer.segment.evaluate import calibrate

    task = cfg["model"]["task"]
    folds = cv_folds(cfg, cases or [v.extra["case"] for v in vols], vols)
    kind = f"subject-grouped {len(folds)}-fold" if cfg["train"].get("folds") else "leave-one-subject-out"
    run_folds = cfg["train"].get("loso", True) and len(folds) > 1
    if not run_folds:  # the card must not claim a validation that did not run
        kind = "none: no folds ran ([train] loso = false, or one subject group); score with trainer.seg_recalibrate"
    metrics: dict[str, Any] = {"validation": kind, "per_case": {}}
    splits: dict[str, Any] = {"folds": []}
    grid = setting_grid(cfg, spec)
    fold_results: dict[str, Any] = {}
    if only is not None:
        unknown = sorted(set(only) - {name for name, _ in folds})
        if unknown or (only and not run_folds):
            raise ConfigError(f"--folds {','.join(only)}: no such fold {unknown or only} "
                              f"(folds: {', '.join(n for n, _ in folds) or 'none'})")
        folds = [(name, held) for name, held in folds if name in only]
    if run_folds:
        for name, held in folds:
            fold_results[name], split = _run_cv_fold(cfg, spec, vols, synth, name, held, seed, device, n_epochs,
                                                     grid, work, keep_folds)
            splits["folds"].append(split)
        if only is not None:
            return metrics, splits
        threshold, per_case, info = calibrate(fold_results, task, cfg["train"].get("max_false_lesions_per_scan"))
        metrics["per_case"] = per_case
        metrics["threshold_calibration"] = info
    return metrics, splits


def train_segmentation(model_name: str, config: Path | None, data: Path | None, out: Path | None,
                       epochs: int | None, seed: int, device: str, keep_folds: Path | None = None,
                       work_dir: Path | None = None, only_folds: list[str] | None = None) -> Path:
    """Train ``cord`` or ``lesion``: LOSO validation folds, then the final model; write the artefact.

    Parameters
    ----------
    model_name : str
        ``cord`` or ``lesion`` (selects ``trainer/configs/<name>.toml`` unless ``config`` is given).
    data : Path | None
        Dataset root (overrides ``[data] root``).
    out : Path | None
        Artefact folder (default ``models/<name>/<version>/``).
    epochs : int | None
        Overrides ``[train] epochs`` (a time budget per run in the config also applies).
    keep_folds : Path | None
        Also write each LOSO fold's network as an artefact under this folder.
    work_dir : Path | None
        Resumable run: each finished fold's scores and network go to ``work_dir/<fold>/``, and
        every network (folds and final) checkpoints each epoch to ``…/ckpt.pt``. Running the
        same command again skips finished folds and resumes the interrupted network.
    only_folds : list[str] | None
        Run these validation folds only (into ``work_dir``, which it needs) and return
        ``work_dir``: no calibration, no artefact; ``"final"`` among them also trains the final
        network's checkpoint. The run without it reuses them.

    Returns
    -------
    Path
        The artefact folder (``weights.pt`` + ``card.json``).
    """
    import torch

    if only_folds is not None and work_dir is None:
        raise ConfigError("--folds needs --work-dir: the folds it runs are kept there for the full run")
    cfg = load_config(model_name, config)
    cfg["_command"] = train_command(model_name, config, data, epochs, seed)
    tcfg = cfg["train"]
    torch.set_num_threads(int(tcfg.get("threads", 2)))
    spec = prep_spec(cfg)
    in_ch = cfg["network"]["args"].get("in_channels")
    if in_ch != spec.in_channels:
        raise ConfigError(f"training config {cfg['_path']!r}: network.args.in_channels = {in_ch}, but the "
                          f"preprocessing feeds {spec.in_channels} (2*context+1, +1 with thickness_channel)")
    task = cfg["model"]["task"]
    n_epochs = int(epochs or tcfg["epochs"])
    root = Path(data) if data else _resolve(cfg["data"]["root"])
    cases = config_cases(cfg, root)
    margin = int(cfg.get("lesions", {}).get("crop_margin_yx", 24))
    vols = load_volumes(cases, spec, task, margin, hard_negatives=bool(cfg.get("lesions", {}).get("hard_negatives")),
                        below_end_mm=float(tcfg.get("below_end_negatives_mm", 0.0)))
    log.info("train.below_end_negatives", cases=[v.key for v in vols if task == "cord" and "hard_negatives" in v.extra])
    rng = np.random.default_rng(seed)
    synth = synth_pool(cfg, spec, rng, task, margin)
    log.info("train.start", model=model_name, cases=[v.key for v in vols], synthetic=len(synth), epochs=n_epochs)
    only = None if only_folds is None else [f for f in only_folds if f != "final"]
    metrics, splits = _loso(cfg, spec, vols, synth, seed, device, n_epochs, keep_folds, cases, work_dir, only)
    final_epochs = int(epochs or tcfg.get("final_epochs", n_epochs))
    if only_folds is not None:  # a part of the run; "final" = the final network's checkpoint, which the full run resumes
        if "final" in only_folds:
            _train_final(cfg, spec, vols + synth, seed, device, final_epochs, work_dir)
        log.info("train.folds_done", folds=only_folds, work_dir=str(work_dir))
        return Path(work_dir)  # type: ignore[arg-type]
    if "threshold_calibration" in metrics:  # ship the threshold (and minimum volume) chosen on the folds
        spec, post = apply_setting(cfg, spec, metrics["threshold_calibration"]["chosen"])
        cfg = {**cfg, "post": post}
    metrics.update(summarise(metrics["per_case"], task))
    out_dir = Path(out) if out else REPO / "models" / cfg["model"]["name"] / cfg["model"]["version"]
    if not tcfg.get("final", True):  # comparison runs: LOSO metrics only, no artefact
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "loso_metrics.json").write_text(json.dumps({"metrics": metrics, "splits": splits}, indent=2))
        return out_dir
    net, hist = _train_final(cfg, spec, vols + synth, seed, device, final_epochs, work_dir)
    splits["final_train"] = sorted(v.key for v in vols)
    card = _card(cfg, spec, metrics, cases, splits, seed, len(hist), hist)
    from sci_node.models.artifact import write_artifact

    write_artifact(out_dir, net.state_dict(), card)
    log.info("train.done", model=model_name, out=str(out_dir), metrics={k: v for k, v in metrics.items() if k != "per_case"})
    return out_dir


def _train_final(cfg: dict[str, Any], spec: preprocess.PrepSpec, vols: list[Vol], seed: int, device: str,
                 epochs: int, work_dir: Path | None):
    """The final network on every volume; ``(net, history)``, checkpointed in ``work_dir/final/``. Its
    training reads no calibrated setting, so a ``--folds final`` run and the full run make the same one."""
    return run_fold(cfg, spec, vols, [], seed, device, float(cfg["train"].get("final_minutes", 6)), epochs, "final",
                    checkpoint=None if work_dir is None else Path(work_dir) / "final" / "ckpt.pt")


def summarise(per_case: dict[str, dict[str, float]], task: str) -> dict[str, Any]:
    """Mean and minimum of the per-case scores."""
    if not per_case:
        return {}
    keys = ["dice", "hd95_mm"] + (["lesion_f1"] if task == "lesion" else [])
    out: dict[str, Any] = {}
    if task == "lesion":  # every held-out real scan is healthy: its lesion-free image's false lesions
        fl = [v["false_lesions_lesion_free"] for v in per_case.values() if "false_lesions_lesion_free" in v]
        if fl:
            out["false_lesions_per_healthy_scan"] = float(np.mean(fl))
            out["healthy_scans"] = len(fl)
    for k in keys:
        vals = [v[k] for v in per_case.values() if k in v and v[k] is not None and np.isfinite(v[k])]
        if vals:
            out[f"{k}_mean"] = float(np.mean(vals))
            out[f"{k}_min" if k != "hd95_mm" else f"{k}_max"] = float(np.min(vals) if k != "hd95_mm" else np.max(vals))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.seg cord|lesion [--config F] [--out D] [--epochs N] [--seed S]`` (same as ``sci-node train``)."""
    import argparse

    from sci_node.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m trainer.seg")
    p.add_argument("model", choices=["cord", "lesion"])
    p.add_argument("--config", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep-folds", type=Path, help="also write each LOSO fold network as an artefact here")
    p.add_argument("--work-dir", type=Path, help="resumable run: fold results and per-epoch checkpoints here")
    p.add_argument("--folds", type=lambda v: [f for f in v.split(",") if f],
                   help="run these folds only (comma-separated, e.g. fold0,fold1; 'final': the final network; needs --work-dir)")
    a = p.parse_args(argv)
    configure_logging("console", "INFO")
    print(train_segmentation(a.model, a.config, a.data, a.out, a.epochs, a.seed, a.device, a.keep_folds,
                             a.work_dir, a.folds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
