"""Leave-one-family-out lesion scores (issue 34): each lesion family scored on persons the model never saw.

For a lesion artefact, every lesion family of :mod:`trainer.lesion_families` is injected ``--trials``
times into every labelled scan of a person the artefact never trained on
(:func:`trainer.seg_recalibrate.unseen_cases`, the data of ``trainer/configs/lesion_families_eval.toml``)
and segmented through the node's own :class:`~sci_node.predict_seg.Segmenter` over the config's
threshold x smallest-lesion grid (:func:`trainer.seg_eval.evaluate_lesion`; the lesion-free scan
itself is the false-alarm test). The setting that scores person ``p`` is chosen **without** ``p``
and **without** the scored family when the artefact never trained on it: on the other persons and
on the families the artefact trained on only (:func:`trainer.seg_eval.calibrate`, at the stated
false-lesion rate). One JSON line per family::

    {"family": ..., "trained_on": false, "dice": ..., "lesion_f1": ..., "volume_ratio": ...,
     "false_lesions_per_healthy_scan": ..., "false_lesions_on_gm": ..., ...}

``trained_on: false`` rows are the headline: a family the model never saw, on persons it never saw.
A ``trained_on: true`` row is labelled as such and only ever shown beside the left-out one.
Run once per leave-one-family-out artefact (``lesion_families_lofo_<family>.toml``) and once for the
shipped one; ``--summary FILE...`` merges their JSON outputs into the per-family table and its worst row::

    .venv/bin/python bench/lesion_families.py --artifact DIR --out rows.json   # ~10-20 min on one core
    .venv/bin/python bench/lesion_families.py --summary A.json B.json C.json D.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# the ellipsoid family at clinical size (>= 3 mm long), as bench/lesion_misses.py and 0.8.1's card score it;
# the other families draw 3-40 mm lesions of their own
CLINICAL_ELLIPSOID = {"length_mm": [3.0, 20.0], "width_mm": [2.0, 6.0]}


def family_results(net: Any, ecfg: dict[str, Any], spec: Any, cases: list[Any], family: str,
                   seed: int, grid: list[Any]) -> dict[str, dict[Any, dict[str, dict[str, Any]]]]:
    """``{group: {setting: {case: scores}}}`` of one family's injections (see the module docstring)."""
    from trainer.segment.evaluate import evaluate_lesion

    cfg = copy.deepcopy(ecfg)
    cfg.setdefault("lesions", {})["test_families"] = [family]
    return {g: evaluate_lesion(net, cfg, spec, [c for c in cases if c.group == g], "cpu", seed, grid, hd95=False)
            for g in sorted({c.group for c in cases})}


def merged_for_calibration(per_family: dict[str, dict[str, Any]], families: list[str]) -> dict[str, Any]:
    """``{group: {setting: {family/case: scores}}}`` over ``families``: one calibration pool per person."""
    out: dict[str, Any] = {}
    for fam in families:
        for g, by_setting in per_family[fam].items():
            for t, by_case in by_setting.items():
                out.setdefault(g, {}).setdefault(t, {}).update({f"{fam}/{k}": v for k, v in by_case.items()})
    return out


VOLUME_RATIO_RANGE = (0.7, 1.4)  # issue 34's target for predicted / true lesion volume


def nested_row(per_family: dict[str, dict[str, Any]], family: str, trained: list[str], task_max_fp: float | None
               ) -> dict[str, Any]:
    """Score ``family`` per person at the setting chosen on the other persons and the ``trained`` families:
    at most ``task_max_fp`` false lesions per healthy scan, then a pooled volume ratio within
    :data:`VOLUME_RATIO_RANGE` where any setting has one, then the best mean of Dice and F1."""
    from trainer.segment.evaluate import calibrate

    pool = merged_for_calibration(per_family, trained)
    rows: dict[str, dict[str, Any]] = {}
    chosen: dict[str, Any] = {}
    for g in per_family[family]:
        others = {h: r for h, r in pool.items() if h != g}
        setting, _, _ = calibrate(others, "lesion", task_max_fp, VOLUME_RATIO_RANGE)
        chosen[g] = setting
        rows.update(per_family[family][g][setting])
    return summary_row(family, family in trained, rows, chosen)


def summary_row(family: str, trained_on: bool, rows: dict[str, dict[str, Any]], chosen: dict[str, Any]
                ) -> dict[str, Any]:
    """Means over scans (Dice, F1), pooled volume ratio, false lesions per healthy scan and on grey matter."""
    pred = sum(r["pred_voxels"] for r in rows.values())
    true = sum(r["true_voxels"] for r in rows.values())
    gm = [r["false_lesions_on_gm"] for r in rows.values() if "false_lesions_on_gm" in r]
    per_scan_ratio = [r["volume_ratio"] for r in rows.values() if r.get("volume_ratio") is not None]
    return {"family": family, "trained_on": trained_on, "scans": len(rows),
            "dice": round(float(np.mean([r["dice"] for r in rows.values()])), 3),
            "dice_min": round(float(np.min([r["dice"] for r in rows.values()])), 3),
            "lesion_f1": round(float(np.mean([r["lesion_f1"] for r in rows.values()])), 3),
            "lesion_recall": round(float(np.mean([r["lesion_recall"] for r in rows.values()])), 3),
            "lesion_precision": round(float(np.mean([r["lesion_precision"] for r in rows.values()])), 3),
            "true_lesions": round(float(sum(r["true_lesions"] for r in rows.values())), 1),
            "volume_ratio": round(pred / true, 3) if true else None,
            "volume_ratio_per_scan": [round(float(x), 2) for x in np.percentile(per_scan_ratio, (0, 50, 100))]
            if per_scan_ratio else None,
            "false_lesions_per_healthy_scan": round(float(np.mean([r["false_lesions_lesion_free"]
                                                                   for r in rows.values()])), 3),
            "false_lesions_on_gm": float(sum(gm)), "gm_scans": len(gm),
            "setting_per_person": {g: str(s) for g, s in chosen.items()}}


def score_artifact(artifact: Path, config: Path, trials: int | None, families: list[str] | None,
                   raw_out: Path | None = None) -> list[dict[str, Any]]:
    """One row per family (all of them by default) for ``artifact``; ``raw_out`` keeps every setting's scores."""
    from sci_node.models.artifact import load_network
    from trainer.lesion_families import FAMILIES
    from trainer.segment.evaluate import setting_grid
    from trainer.segment.recalibrate import card_spec, eval_config, unseen_cases
    from trainer.segment.train import load_config

    net, card = load_network(artifact)
    cfg = load_config("lesion", config)
    ecfg = eval_config(card, cfg, trials, test_generator=CLINICAL_ELLIPSOID)
    spec = card_spec(card)
    grid = setting_grid(ecfg, spec)
    trained = list(card["training"]["config"].get("lesions", {}).get("families", ["ellipsoid"]))
    cases = unseen_cases(card, cfg)
    seed = int(card["training"].get("seed", 0))
    scored = sorted(set(families or FAMILIES) | set(trained), key=list(FAMILIES).index)
    per_family = {f: family_results(net, ecfg, spec, cases, f, seed, grid) for f in scored}
    if raw_out is not None:  # every setting's per-scan scores, for re-calibration without re-running the network
        raw_out.write_text(json.dumps({f: {g: {str(t): r for t, r in by.items()} for g, by in res.items()}
                                       for f, res in per_family.items()}))
    max_fp = ecfg["train"].get("max_false_lesions_per_scan")
    return [{"artifact": str(artifact), "version": card["version"], "trained_families": trained,
             **nested_row(per_family, f, trained, max_fp)} for f in (families or list(FAMILIES))]


def summarise_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-family table: each family's left-out row (a model that never trained on it, the one trained on the
    most other families when several did not), the worst of those rows."""
    # per family, the row of the model that trained on the most other families (the leave-exactly-one-out one;
    # a model trained before a family existed also never saw it, but says less about it)
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r["trained_on"] and (r["family"] not in best
                                    or len(r["trained_families"]) > len(best[r["family"]]["trained_families"])):
            best[r["family"]] = r
    left_out = list(best.values())
    worst = min(left_out, key=lambda r: (r["dice"], r["lesion_f1"])) if left_out else None
    keys = ("version", "trained_families", "dice", "lesion_f1", "volume_ratio", "false_lesions_per_healthy_scan",
            "false_lesions_on_gm")
    return {"left_out": {r["family"]: {k: r[k] for k in keys}
                         for r in left_out},
            "worst_left_out": None if worst is None else {"family": worst["family"], "dice": worst["dice"],
                                                          "lesion_f1": worst["lesion_f1"]},
            "trained_on_rows": {f"{r['version']}/{r['family']}": {"dice": r["dice"], "lesion_f1": r["lesion_f1"],
                                                                  "volume_ratio": r["volume_ratio"]}
                                for r in rows if r["trained_on"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/lesion_families.py")
    p.add_argument("--artifact", type=Path)
    p.add_argument("--family", action="append", help="score only this family (repeatable; default: all)")
    p.add_argument("--config", type=Path, default=REPO / "trainer" / "configs" / "lesion_families_eval.toml")
    p.add_argument("--trials", type=int, default=None, help="injections per scan and family (default: the card's)")
    p.add_argument("--out", type=Path, help="also write the rows to this JSON file")
    p.add_argument("--raw-out", type=Path, help="also write every setting's per-scan scores to this JSON file")
    p.add_argument("--summary", type=Path, nargs="+", help="merge rows files into the per-family table")
    a = p.parse_args(argv)
    if a.summary:
        rows = [r for f in a.summary for r in json.loads(f.read_text())]
        sys.stdout.write(json.dumps(summarise_rows(rows), indent=1) + "\n")
        return 0
    if a.artifact is None:
        p.error("give --artifact or --summary")
    rows = score_artifact(a.artifact, a.config, a.trials, a.family, a.raw_out)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    for r in rows:
        sys.stdout.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
