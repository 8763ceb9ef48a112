"""Score a shipped segmentation artefact on subjects it never trained on, and re-calibrate it.

The weights are not touched. Every labelled case of the data folder (``[data]`` of the given
training config) whose split group is **not** among the artefact's training groups, and is
not a population template (``[data] train_only``), is scored through the node's own
:class:`~sci_node.models.predict_seg.Segmenter` over the config's grid of thresholds (and, for the
lesion model, smallest lesions). Each group is one "fold" of
:func:`trainer.segment.evaluate.calibrate`, so every reported number uses the setting chosen on the
*other* groups, with the config's stated false-lesion rate (``[train]
max_false_lesions_per_scan``) for the lesion model. Every held-out scan is healthy: the
lesion-free image itself is the real-scan false-alarm test, the injected copies give Dice and
lesion-wise F1.

``--out DIR --version V`` writes a new artefact (the same weights, a card with the chosen
setting, the new table and the command); without them only the table is printed::

    python -m trainer.seg_recalibrate lesion --artifact models/lesion/0.4.0 --out models/lesion/0.4.1 --version 0.4.1

``--flip-x-tta``, ``--sw-overlap F`` and ``--ensemble-cascade P`` change how the same weights are run (the left-right
test-time mirror, the sliding-window overlap, which windows the members of an ensemble after the first run);
they are scored and written to the new card like ``--post`` keys.

``--fold-artifacts WORK`` scores a cross-validated run the same way: each group by the fold network that held it
out (the run's ``--work-dir``), nested as above; ``--artifact FINAL --out DIR`` then writes the run's final network
with the setting chosen on its folds::

    python -m trainer.seg_recalibrate lesion --fold-artifacts WORK --artifact FINAL --out DIR --version V
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from sci_node.errors import DataError
from sci_node.imaging import preprocess
from sci_node.models.artifact import load_network, write_artifact
from trainer.segment import data as tdata
from trainer.segment.evaluate import apply_setting, calibrate, evaluate_cord, evaluate_lesion, setting_grid
from trainer.segment.train import config_cases, load_config, summarise

log = structlog.get_logger(__name__)


def eval_config(card: dict[str, Any], cfg: dict[str, Any], trials: int | None,
                setting: str | None = None, post: dict[str, float] | None = None,
                test_generator: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """The artefact's own training config (network, post-processing, lesion generator) with the
    given config's ``[data]`` and calibration grid (``[train]`` thresholds, smallest lesions,
    false-lesion rate); ``setting`` (``"T"`` or ``"T@V"``) replaces the grid by that one setting
    (the artefact's own, for a before/after table); ``post`` overrides post-processing keys
    (e.g. ``coarse_step_mm``), used in the scoring and written to the new card; ``test_generator``
    overrides keys of the held-out lesions' generator (``[lesions.test_generator]``, which starts
    from the artefact's own test generator, else its training generator), e.g. a smallest size."""
    own = copy.deepcopy(card["training"]["config"])
    own["data"] = cfg["data"]
    for key in ("thresholds", "min_volumes_mm3", "grow_thresholds", "max_false_lesions_per_scan"):
        if key in cfg["train"]:
            own["train"][key] = cfg["train"][key]
    own["post"] = {**card.get("postprocessing", own.get("post", {})), **(post or {})}
    if setting is not None:
        t, _, v = setting.partition("@")
        own["train"]["thresholds"] = [float(t)]
        if v:
            own["train"]["min_volumes_mm3"] = [float(v)]
        else:
            own["train"].pop("min_volumes_mm3", None)
    if trials is not None:
        own.setdefault("lesions", {})["val_trials"] = int(trials)
    if test_generator:
        les = own.setdefault("lesions", {})
        les["test_generator"] = {**les.get("test_generator", les.get("generator", {})), **test_generator}
    own["_path"] = cfg["_path"]
    return own


def unseen_cases(card: dict[str, Any], cfg: dict[str, Any]) -> list[tdata.Case]:
    """Labelled cases of ``cfg``'s data whose group the artefact did not train on (templates excluded)."""
    cases = config_cases(cfg)
    seen = {c["group"] for c in card["training"].get("cases", [])}
    seen_subjects = {c["key"].split("_")[0] for c in card["training"].get("cases", [])}
    skip = set(cfg["data"].get("train_only", ()))
    out = [c for c in cases if c.group not in seen | skip and c.subject not in seen_subjects]
    if not out:
        raise DataError(f"no labelled case in {cfg['data']['root']!r} outside the artefact's training groups")
    return out


def fold_networks(folder: Path, device: str = "cpu") -> list[tuple[Any, dict[str, Any]]]:
    """``[(net, card)]`` of the cross-validation fold artefacts in ``folder`` (a training run's
    ``--work-dir`` or ``--keep-folds``: one sub-folder per fold, its card naming the held-out groups
    in ``metrics.held_out``), ordered by name; a folder without any is a DataError naming it."""
    out: list[tuple[Any, dict[str, Any]]] = []
    for sub in sorted(p for p in Path(folder).iterdir() if (p / "card.json").is_file()):
        net, card = load_network(sub, device=device)
        if not card.get("metrics", {}).get("held_out"):
            raise DataError(f"{str(sub)!r} is not a cross-validation fold artefact (no metrics.held_out in its card)")
        if out and (card["architecture"], card["preprocessing"]) != (out[0][1]["architecture"],
                                                                     out[0][1]["preprocessing"]):
            raise DataError(f"fold artefact {str(sub)!r} differs from the others in architecture or preprocessing")
        out.append((net, card))
    if not out:
        raise DataError(f"no fold artefact (sub-folder with a card.json) in {str(folder)!r}")
    return out


def fold_cases(folds: list[tuple[Any, dict[str, Any]]], cfg: dict[str, Any]
               ) -> tuple[list[tdata.Case], dict[str, Any]]:
    """``(cases, net_of_group)``: every case of ``cfg``'s data held out by one of ``folds`` (and
    never trained on by it), with the network of the fold that held out its group."""
    cases: list[tdata.Case] = []
    net_of: dict[str, Any] = {}
    for net, card in folds:
        held = set(card["metrics"]["held_out"])
        for case in unseen_cases(card, cfg):  # fold_networks checked that held is not empty
            if case.group not in held:
                continue
            if case.group in net_of and net_of[case.group] is not net:
                raise DataError(f"group {case.group!r} is held out by two fold artefacts")
            net_of[case.group] = net
            cases.append(case)
    if not cases:
        raise DataError(f"no labelled case in {cfg['data']['root']!r} is held out by the fold artefacts")
    return cases, net_of


def recalibrate(model: str, artifact: Path | None, cfg: dict[str, Any], trials: int | None, device: str = "cpu",
                setting: str | None = None, post: dict[str, float] | None = None,
                test_generator: dict[str, list[float]] | None = None, flip_x_tta: bool | None = None,
                sw_overlap: float | None = None, injection_seed: int | None = None,
                ensemble_cascade: float | None = None, fold_artifacts: Path | None = None
                ) -> tuple[dict[str, Any], dict[str, Any], list[tdata.Case]]:
    """``(metrics, eval_cfg, cases)``: nested per-group scores of ``artifact`` on unseen subjects;
    ``flip_x_tta`` / ``sw_overlap`` / ``ensemble_cascade`` (not ``None``) replace the card's test-time
    mirror / window overlap / ensemble cascade (:class:`~sci_node.imaging.preprocess.PrepSpec`);
    ``injection_seed`` (not ``None``) seeds the held-out lesions instead of the card's training seed, so
    networks trained with different seeds can be scored on the same lesions. With ``fold_artifacts``
    (:func:`fold_networks`) each group is scored by the fold network that held it out instead (the
    cross-validation estimate of a run whose final network, ``artifact``, saw every group)."""
    folds = fold_networks(Path(fold_artifacts), device) if fold_artifacts is not None else []
    if artifact is not None:
        net, card = load_network(Path(artifact), device=device)
    elif folds:
        net, card = folds[0]
    else:
        raise DataError("give an artifact, fold artifacts, or both")
    ecfg = eval_config(card, cfg, trials, setting, post, test_generator)
    spec = card_spec(card, flip_x_tta, sw_overlap, ensemble_cascade)
    grid = setting_grid(ecfg, spec)
    if folds:
        cases, net_of = fold_cases(folds, cfg)
        about = f"subject-grouped CV: each group scored by the fold network of {card['name']} that held it out"
    else:
        cases, net_of = unseen_cases(card, cfg), {}
        about = f"subjects unseen by {card['name']} {card['version']}"
    evaluate = evaluate_cord if model == "cord" else evaluate_lesion
    seed = int(card["training"].get("seed", 0)) if injection_seed is None else int(injection_seed)
    results: dict[str, Any] = {}
    for group in sorted({c.group for c in cases}):
        results[group] = evaluate(net_of.get(group, net), ecfg, spec, [c for c in cases if c.group == group],
                                  device, seed, grid)
        log.info("recalibrate.group", model=model, group=group)
    _, per_case, info = calibrate(results, model, ecfg["train"].get("max_false_lesions_per_scan"))
    metrics: dict[str, Any] = {"validation": f"{about} (nested: each group scored at the setting chosen on the others)",
                               "per_case": per_case, "threshold_calibration": info}
    metrics.update(summarise(per_case, model))
    return metrics, ecfg, cases


def card_spec(card: dict[str, Any], flip_x_tta: bool | None = None,
              sw_overlap: float | None = None, ensemble_cascade: float | None = None) -> preprocess.PrepSpec:
    """The card's preprocessing, with ``flip_x_tta``, ``sw_overlap`` and ``ensemble_cascade``
    (``ensemble_cascade_below``) replaced where not ``None``."""
    spec = preprocess.PrepSpec.from_card(card["preprocessing"])
    if flip_x_tta is not None:
        spec = dataclasses.replace(spec, flip_x_tta=bool(flip_x_tta))
    for flag, key, value in (("--sw-overlap", "sw_overlap", sw_overlap),
                             ("--ensemble-cascade", "ensemble_cascade_below", ensemble_cascade)):
        if value is not None:
            change: dict[str, Any] = {key: float(value)}  # one field of several types: mypy cannot check a ** by key
            try:
                spec = dataclasses.replace(spec, **change)
            except ValueError as exc:  # PrepSpec checks the range
                raise DataError(f"{flag}: {exc}") from None
    if spec.ensemble_cascade_below is not None and card["architecture"]["class"] != "sci_node.nets.LogitMeanEnsemble":
        raise DataError(f"--ensemble-cascade: {card['name']} {card['version']} is not an ensemble "
                        f"({card['architecture']['class']})")
    return spec


def write_recalibrated(artifact: Path, out: Path, version: str, metrics: dict[str, Any], ecfg: dict[str, Any],
                       cases: list[tdata.Case], command: str, flip_x_tta: bool | None = None,
                       sw_overlap: float | None = None, ensemble_cascade: float | None = None) -> Path:
    """The same weights under ``out`` with the chosen setting and ``metrics`` in a new card."""
    net, card = load_network(Path(artifact))
    spec, post = apply_setting(ecfg, card_spec(card, flip_x_tta, sw_overlap, ensemble_cascade),
                               metrics["threshold_calibration"]["chosen"])
    new = copy.deepcopy(card)
    new.update({"version": version, "preprocessing": spec.to_card(), "postprocessing": post, "metrics": metrics,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    new["training"]["recalibrated"] = {
        "from": f"{card['name']} {card['version']}", "command": command, "metrics_before": card.get("metrics", {}),
        "calibration_cases": [{"key": c.key, "group": c.group} for c in cases],
        "calibration_data_hash": tdata.data_hash(cases)}
    return write_artifact(Path(out), net.state_dict(), new)


def _ranges(items: list[str]) -> dict[str, list[float]]:
    """``["length_mm=3,20"]`` -> ``{"length_mm": [3.0, 20.0]}``; a bad item is a DataError naming it."""
    out: dict[str, list[float]] = {}
    for item in items:
        key, _, val = item.partition("=")
        try:
            lo, hi = (float(x) for x in val.split(","))
        except ValueError:
            raise DataError(f"--test-generator takes KEY=LO,HI, got {item!r}") from None
        out[key.strip()] = [lo, hi]
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: print the per-case table; with ``--out`` and ``--version`` write the new artefact."""
    from sci_node.logs import configure_logging
    from sci_node.models.predict_seg import configure_threads

    p = argparse.ArgumentParser(prog="python -m trainer.seg_recalibrate", description=__doc__.splitlines()[0])
    p.add_argument("model", choices=["cord", "lesion"])
    p.add_argument("--artifact", type=Path, help="the artefact to score and re-calibrate (with --fold-artifacts: "
                   "the run's final network, written with the setting chosen on its folds)")
    p.add_argument("--fold-artifacts", dest="fold_artifacts", type=Path, metavar="DIR",
                   help="score each group with the cross-validation fold network that held it out (a run's --work-dir)")
    p.add_argument("--config", type=Path, help="training config whose [data] and grid are used (default: MODEL.toml)")
    p.add_argument("--trials", type=int, help="lesion injections per case (default: the config's val_trials)")
    p.add_argument("--setting", help="score this one setting only (T or T@V, e.g. the artefact's own 0.6@5)")
    p.add_argument("--post", action="append", default=[], metavar="KEY=VALUE",
                   help="set a post-processing key (number) for the scoring and the new card, e.g. coarse_step_mm=8")
    p.add_argument("--test-generator", dest="test_generator", action="append", default=[], metavar="KEY=LO,HI",
                   help="lesion: override a range of the held-out lesions' generator, e.g. length_mm=3,20")
    p.add_argument("--flip-x-tta", dest="flip_x_tta", action=argparse.BooleanOptionalAction, default=None,
                   help="switch the left-right test-time mirror on (or off) for the scoring and the new card "
                        "(only for networks trained with left-right flips; doubles the inference cost)")
    p.add_argument("--sw-overlap", dest="sw_overlap", type=float,
                   help="sliding-window overlap (fraction of the patch, [0, 1)) for the scoring and the new card")
    p.add_argument("--ensemble-cascade", dest="ensemble_cascade", type=float, metavar="P",
                   help="ensembles: run the members after the first only where the first's probability exceeds P "
                        "(their windows), for the scoring and the new card; the cost falls towards one member's")
    p.add_argument("--injection-seed", dest="injection_seed", type=int,
                   help="lesion: seed of the held-out injections (default: the card's training seed)")
    p.add_argument("--out", type=Path)
    p.add_argument("--version")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.artifact is None and a.fold_artifacts is None:
        p.error("give --artifact, --fold-artifacts, or both")
    if a.out and a.artifact is None:
        p.error("--out writes --artifact's weights: give the final network as --artifact")
    configure_logging("console", "INFO")
    configure_threads(a.threads)
    cfg = load_config(a.model, a.config)
    try:
        post = {k: float(v) for k, v in (item.split("=", 1) for item in a.post)}
    except ValueError:
        raise DataError(f"--post takes KEY=NUMBER, got {a.post!r}") from None
    tgen = _ranges(a.test_generator)
    metrics, ecfg, cases = recalibrate(a.model, a.artifact, cfg, a.trials, setting=a.setting, post=post,
                                       test_generator=tgen, flip_x_tta=a.flip_x_tta, sw_overlap=a.sw_overlap,
                                       injection_seed=a.injection_seed, ensemble_cascade=a.ensemble_cascade,
                                       fold_artifacts=a.fold_artifacts)
    if tgen:
        metrics["test_generator"] = ecfg["lesions"]["test_generator"]
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_case"}, indent=1))
    for key, row in sorted(metrics["per_case"].items()):
        print(key, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                               if k not in ("subject",)}))
    if a.out and a.version:
        command = "python -m trainer.seg_recalibrate " + " ".join(argv if argv is not None else sys.argv[1:])
        print(write_recalibrated(a.artifact, a.out, a.version, metrics, ecfg, cases, command, a.flip_x_tta,
                                 a.sw_overlap, a.ensemble_cascade))
    return 0


if __name__ == "__main__":
    sys.exit(main())
