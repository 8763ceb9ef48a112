"""Held-out evaluation of segmentation networks on each **source grid**, through the same
:class:`sci_node.predict_seg.Segmenter` the node uses (MONAI Dice and Hausdorff-95,
lesion-wise F1 by connected components).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from sci_node import preprocess
from sci_node.postprocess import lesion_f1
from sci_node.predict_seg import Segmenter
from trainer import data as tdata
from trainer.lesions import LesionSpec, inject_lesions


def scores(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float | None]:
    """MONAI Dice and HD95 (mm) of two ``(Z, Y, X)`` masks; HD95 is ``None`` if either is empty."""
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    p = torch.from_numpy((pred > 0)[None, None].astype(np.float32))
    t = torch.from_numpy((truth > 0)[None, None].astype(np.float32))
    dice = float(compute_dice(p, t, include_background=True, ignore_empty=False).item())
    hd = None
    if pred.any() and truth.any():
        hd = float(compute_hausdorff_distance(p, t, include_background=True, percentile=95,
                                              spacing=list(spacing)).item())
    return {"dice": dice, "hd95_mm": hd}


def segmenter_for(net, cfg: dict[str, Any], spec: preprocess.PrepSpec, device: str) -> Segmenter:
    """An in-memory Segmenter with the card fields inference reads."""
    card = {"name": cfg["model"]["name"], "version": cfg["model"]["version"], "kind": "segmentation",
            "preprocessing": spec.to_card(), "postprocessing": cfg.get("post", {})}
    return Segmenter(net, card, device)


def _spacing(img: sitk.Image) -> tuple[float, float, float]:
    return tuple(float(s) for s in img.GetSpacing()[:3][::-1])  # type: ignore[return-value]


def evaluate_cord(net, cfg: dict[str, Any], spec: preprocess.PrepSpec, vols: Sequence[Any], device: str,
                  seed: int) -> dict[str, dict[str, Any]]:
    """Per held-out case: Dice and HD95 of the predicted cord vs the reference mask on the source grid."""
    seg = segmenter_for(net, cfg, spec, device)
    out: dict[str, dict[str, Any]] = {}
    for v in vols:
        case: tdata.Case = v.extra["case"]
        image, mask = tdata.load_case(case)
        pred = seg.predict(image)
        res = scores(pred, sitk.GetArrayFromImage(mask), _spacing(image))
        out[case.key] = {"subject": case.subject, "contrast": case.contrast, **res}
    return out


def lesion_trials(image: sitk.Image, cord: sitk.Image, spec: LesionSpec, n: int, seed: int):
    """``n`` copies of a canonical-orientation image with injected lesions: ``[(img, cord_arr, lesion_arr)]``."""
    img_c = preprocess.canonicalise(preprocess.as_scalar_float(image))
    cord_c = preprocess.canonicalise(cord)
    arr, cord_arr = sitk.GetArrayFromImage(img_c), sitk.GetArrayFromImage(cord_c).astype(np.uint8)
    trials = []
    for k in range(n):
        rng = np.random.default_rng(10_000 + seed * 100 + k)
        les_img, les = inject_lesions(rng, arr, cord_arr, _spacing(img_c), spec)
        out = sitk.GetImageFromArray(les_img)
        out.CopyInformation(img_c)
        trials.append((out, cord_arr, les))
    return trials


def evaluate_lesion(net, cfg: dict[str, Any], spec: preprocess.PrepSpec, vols: Sequence[Any], device: str,
                    seed: int) -> dict[str, dict[str, Any]]:
    """Per held-out case: synthetic lesions injected in the source image (inside the reference cord),
    lesion model restricted to that cord; Dice (pooled over trials), mean HD95, pooled lesion-wise F1."""
    seg = segmenter_for(net, cfg, spec, device)
    lspec = LesionSpec.from_config(cfg.get("lesions", {}).get("generator", {}))
    n = int(cfg.get("lesions", {}).get("val_trials", 4))
    out: dict[str, dict[str, Any]] = {}
    for v in vols:
        case: tdata.Case = v.extra["case"]
        image, mask = tdata.load_case(case)
        inter = tot = 0.0
        tp = fp = fn = 0.0
        hds = []
        for img, cord_arr, truth in lesion_trials(image, mask, lspec, n, seed):
            pred = seg.predict(img, roi=cord_arr)
            inter += float((pred & truth).sum())
            tot += float(pred.sum() + truth.sum())
            f = lesion_f1(pred, truth)
            tp, fp, fn = tp + f["tp"], fp + f["fp"], fn + f["fn"]
            hd = scores(pred, truth, _spacing(img))["hd95_mm"]
            if hd is not None:
                hds.append(hd)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        out[case.key] = {"subject": case.subject, "contrast": case.contrast, "dice": 2 * inter / tot if tot else 0.0,
                         "hd95_mm": float(np.mean(hds)) if hds else None, "lesion_precision": prec,
                         "lesion_recall": rec, "lesion_f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
                         "true_lesions": tp + fn, "trials": n}
    return out
