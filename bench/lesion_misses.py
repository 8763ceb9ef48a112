"""Benchmark: which synthetic lesions a lesion artefact misses, by size and contrast.

Prints numbers, never passes or fails. On the labelled cases of the data whose persons the artefact
never trained on (:func:`trainer.seg_recalibrate.unseen_cases`), the same injected lesions the
re-calibration scores (:func:`trainer.seg_eval.lesion_trials`, seeded by the card's training seed;
clinical size by default: at least 3 mm long and 2 mm wide) go through the artefact's own
prediction at its card's threshold and smallest lesion, with growth. Each true lesion (26-connected
component of the injected mask) is listed as found (any overlap) or missed, with its volume (mm³)
and its contrast (its mean intensity over the cord's median, on the injected image), then counted
in volume bins, and with each lesion's highest probability the recall no setting of this network can
exceed (``recall_ceiling``). Needs ``../shared/data/spine`` (our machines only).

    .venv/bin/python bench/lesion_misses.py [--artifact models/lesion/0.8.1] [--trials 4]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
#: volume bins (mm³) of the summary
BINS = (0.0, 10.0, 20.0, 50.0, 100.0, float("inf"))


def lesion_rows(seg, image: sitk.Image, cord: np.ndarray, truth: np.ndarray) -> list[dict[str, float]]:
    """One row per true lesion of ``truth`` (``(Z, Y, X)`` uint8 on ``image``'s canonical grid)."""
    from sci_node.imaging import preprocess
    from sci_node.imaging.postprocess import components

    prepared = preprocess.prepare(image, seg.spec)
    prob = seg.predict_prob_model_grid(prepared, roi=cord)
    pred = seg.finish(prob, prepared, roi=cord)  # the node's lesion mask: the card's threshold, smallest lesion, growth
    p_src = preprocess.to_source_grid(prob, prepared, threshold=None) * (cord > 0)  # what any setting could keep
    arr = sitk.GetArrayFromImage(image)
    voxel = float(np.prod(image.GetSpacing()))
    median = float(np.median(arr[cord > 0]))
    labels, n = components(truth)
    rows = []
    for i in range(1, n + 1):
        part = labels == i
        rows.append({"volume_mm3": float(part.sum()) * voxel, "contrast": float(arr[part].mean() / median),
                     "found": bool((pred[part] > 0).any()), "p_max": float(p_src[part].max())})
    return rows


def _mean(values: list[float]) -> float | None:
    """Mean to 2 decimals; ``None`` (JSON null) for an empty bin."""
    return round(float(np.mean(values)), 2) if values else None


def summary(rows: list[dict[str, float]]) -> list[dict[str, object]]:
    """Found / total per volume bin."""
    out = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        inbin = [r for r in rows if lo <= r["volume_mm3"] < hi]
        out.append({"volume_mm3": f"{lo:g}-{hi:g}", "lesions": len(inbin),
                    "found": sum(r["found"] for r in inbin),
                    "contrast_found": _mean([r["contrast"] for r in inbin if r["found"]]),
                    "contrast_missed": _mean([r["contrast"] for r in inbin if not r["found"]])})
    return out


def recall_ceiling(rows: list[dict[str, float]], levels: tuple[float, ...] = (0.1, 0.3, 0.5)) -> list[dict[str, object]]:
    """What no threshold or smallest-lesion setting can exceed: per probability level, the lesions the
    network reaches at all (some voxel at or above it) and the mean per-case F1 if every one of them
    were kept and nothing false were (precision 1): the headroom of any post-processing of this network."""
    out = []
    for level in levels:
        f1s = []
        for case in sorted({str(r["case"]) for r in rows}):
            mine = [r for r in rows if r["case"] == case]
            rec = sum(r["p_max"] >= level for r in mine) / len(mine)
            f1s.append(2 * rec / (1 + rec))
        out.append({"p_at_least": level, "reachable": sum(r["p_max"] >= level for r in rows),
                    "f1_mean_if_all_kept_and_no_false": round(float(np.mean(f1s)), 3)})
    return out


def main(argv: list[str] | None = None) -> int:
    from sci_node.models.artifact import load_network
    from sci_node.models.predict_seg import Segmenter
    from sci_node.models.registry import ModelRegistry
    from trainer.lesion_families import lesion_source
    from trainer.segment import data as tdata
    from trainer.segment.evaluate import lesion_trials
    from trainer.segment.recalibrate import eval_config, unseen_cases
    from trainer.segment.train import load_config

    p = argparse.ArgumentParser(prog="bench/lesion_misses.py")
    p.add_argument("--artifact", type=Path, default=None, help="default: the active lesion model")
    p.add_argument("--config", type=Path, default=REPO / "trainer" / "configs" / "lesion_recal.toml")
    p.add_argument("--trials", type=int, default=None, help="default: the card's val_trials")
    a = p.parse_args(argv)
    if a.artifact is None:
        registry = ModelRegistry(REPO / "models")
        a.artifact = registry.path_of("lesion", registry.active()["lesion"])
    net, card = load_network(a.artifact)
    seg = Segmenter(net, card, "cpu")
    cfg = load_config("lesion", a.config)
    ecfg = eval_config(card, cfg, a.trials, test_generator={"length_mm": [3.0, 20.0], "width_mm": [2.0, 6.0]})
    source = lesion_source(ecfg, "test")
    n = int(ecfg.get("lesions", {}).get("val_trials", 4))
    rows: list[dict[str, float]] = []
    for case in unseen_cases(card, cfg):
        image, mask = tdata.load_case(case)
        for img, cord, truth in lesion_trials(image, mask, source, n, int(card["training"].get("seed", 0))):
            for r in lesion_rows(seg, img, cord, truth):
                rows.append({"case": case.key, **r})
    found = sum(r["found"] for r in rows)
    sys.stdout.write(json.dumps({"artifact": str(a.artifact), "lesions": len(rows), "found": found,
                                 "by_volume": summary(rows), "recall_ceiling": recall_ceiling(rows)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
