"""Held-out evaluation of segmentation networks on each **source grid**, through the same
:class:`sci_node.predict_seg.Segmenter` the node uses (MONAI Dice and Hausdorff-95,
lesion-wise F1 by connected components).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from sci_node.imaging import preprocess
from sci_node.imaging.postprocess import lesion_f1
from sci_node.models.predict_seg import Segmenter
from trainer.lesion_families import LesionSource, lesion_source
from trainer.segment import data as tdata


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


def setting_grid(cfg: dict[str, Any], spec: preprocess.PrepSpec) -> list[float | str]:
    """The post-processing settings calibrated on the folds.

    ``[train] thresholds`` (default: the card's threshold) and, when given,
    ``[train] min_volumes_mm3`` (the smallest component kept): every pair becomes a
    ``"threshold@volume"`` entry; with thresholds only, the entries are the float thresholds.
    With ``[train] grow_thresholds`` as well (lesion model: how far a kept lesion grows, the
    card's ``postprocessing.grow_threshold``) every triple becomes ``"threshold@volume@grow"``.
    """
    thresholds = [float(t) for t in cfg["train"].get("thresholds", [spec.threshold])]
    volumes = cfg["train"].get("min_volumes_mm3")
    if not volumes:
        return list(thresholds)
    grows = cfg["train"].get("grow_thresholds")
    if grows:
        return [f"{t:g}@{float(v):g}@{float(g):g}" for t in thresholds for v in volumes for g in grows]
    return [f"{t:g}@{float(v):g}" for t in thresholds for v in volumes]


def parse_setting(key: float | str) -> tuple[float, float | None]:
    """``(threshold, min_volume_mm3 or None)`` of a grid entry (also its JSON string form)."""
    if isinstance(key, str) and "@" in key:
        t, v = key.split("@")[:2]
        return float(t), float(v)
    return float(key), None


def parse_grow(key: float | str) -> float | None:
    """The grow threshold of a ``"threshold@volume@grow"`` grid entry, else ``None`` (the card's)."""
    parts = key.split("@") if isinstance(key, str) else []
    return float(parts[2]) if len(parts) == 3 else None


def apply_setting(cfg: dict[str, Any], spec: preprocess.PrepSpec, key: float | str
                  ) -> tuple[preprocess.PrepSpec, dict[str, Any]]:
    """``(spec, post)`` for a card: the threshold into ``spec``, the minimum volume into ``post``."""
    import dataclasses

    t, v = parse_setting(key)
    post = dict(cfg.get("post", {}))
    if v is not None:
        post["min_volume_mm3"] = v
    if parse_grow(key) is not None:
        post["grow_threshold"] = parse_grow(key)
    return dataclasses.replace(spec, threshold=t), post


def segmenter_for(net, cfg: dict[str, Any], spec: preprocess.PrepSpec, device: str) -> Segmenter:
    """An in-memory Segmenter with the card fields inference reads."""
    card = {"name": cfg["model"]["name"], "version": cfg["model"]["version"], "kind": "segmentation",
            "preprocessing": spec.to_card(), "postprocessing": cfg.get("post", {})}
    return Segmenter(net, card, device)


def _spacing(img: sitk.Image) -> tuple[float, float, float]:
    return tuple(float(s) for s in img.GetSpacing()[:3][::-1])  # type: ignore[return-value]


def evaluate_cord(net, cfg: dict[str, Any], spec: preprocess.PrepSpec, cases: Sequence[tdata.Case], device: str,
                  seed: int, thresholds: Sequence[float | str] | None = None) -> dict[Any, dict[str, dict[str, Any]]]:
    """Per setting, per held-out case: Dice and HD95 of the predicted cord vs the reference on the source grid.

    The network runs once per case; each setting of ``thresholds`` (thresholds or
    ``"threshold@volume"`` entries of :func:`setting_grid`; default: the card's threshold) is
    then applied through :meth:`Segmenter.finish`, the node's own post-processing.
    """
    seg = segmenter_for(net, cfg, spec, device)
    grid = list(thresholds) if thresholds else [spec.threshold]
    out: dict[Any, dict[str, dict[str, Any]]] = {t: {} for t in grid}
    for case in cases:
        image, mask = tdata.load_case(case)
        prepared = preprocess.prepare(image, seg.spec)
        prob = seg.predict_prob_model_grid(prepared)
        truth = sitk.GetArrayFromImage(mask)
        for t in grid:
            thr, vol = parse_setting(t)
            res = scores(seg.finish(prob, prepared, thr, min_volume_mm3=vol), truth, _spacing(image))
            out[t][case.key] = {"subject": case.subject, "contrast": case.contrast, **res}
    return out


def lesion_trials(image: sitk.Image, cord: sitk.Image, source: LesionSource, n: int, seed: int):
    """``n`` copies of a canonical-orientation image with lesions injected by ``source`` on its raw
    intensities (:meth:`~trainer.lesion_families.LesionSource.for_raw_intensities`):
    ``[(img, cord_arr, lesion_arr)]``; ``cord_arr`` is the cord the lesion model is given (the
    reference cord, swollen where the drawing family swells it)."""
    img_c = preprocess.canonicalise(preprocess.as_scalar_float(image))
    cord_c = preprocess.canonicalise(cord)
    arr, cord_arr = sitk.GetArrayFromImage(img_c), sitk.GetArrayFromImage(cord_c).astype(np.uint8)
    trials = []
    raw = source.for_raw_intensities()
    for k in range(n):
        rng = np.random.default_rng(10_000 + seed * 100 + k)
        draw = raw(rng, arr, cord_arr, _spacing(img_c))
        out = sitk.GetImageFromArray(draw.image)
        out.CopyInformation(img_c)
        trials.append((out, draw.cord, draw.lesion))
    return trials


def canonical_gm(case: tdata.Case) -> np.ndarray | None:
    """The case's grey-matter mask (:func:`trainer.data.gm_mask_path`) on its canonical source grid, or ``None``."""
    path = tdata.gm_mask_path(case)
    if path is None:
        return None
    gm = preprocess.canonicalise(tdata.read_image(path))
    return (sitk.GetArrayFromImage(gm) > 0).astype(np.uint8)


def clean_trial(image: sitk.Image, cord: sitk.Image) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """The held-out image itself, without lesions: ``(canonical image, cord, empty lesion mask)``.

    Scored with the injected trials, so false lesions on lesion-free cord count against
    precision and Dice (what a radiologist would see on a healthy scan).
    """
    img_c = preprocess.canonicalise(preprocess.as_scalar_float(image))
    cord_arr = sitk.GetArrayFromImage(preprocess.canonicalise(cord)).astype(np.uint8)
    return img_c, cord_arr, np.zeros(cord_arr.shape, np.uint8)


def _lesion_pred(seg: Segmenter, prob: np.ndarray, prepared: preprocess.Prepared, setting: float | str,
                 cord: np.ndarray, base: dict[Any, Any]) -> np.ndarray:
    """The node's lesion mask for one grid setting; ``base`` caches one resampling per threshold (and the
    grow region per grow threshold under ``("grow", g)``)."""
    thr, vol = parse_setting(setting)
    if vol is None:
        return seg.finish(prob, prepared, thr, roi=cord)
    if thr not in base:  # not grown: the size limit applies to the thresholded lesion, then it grows
        base[thr] = seg.finish(prob, prepared, thr, roi=cord, min_volume_mm3=0.0, grow=False)
    g = parse_grow(setting)
    if ("grow", g) not in base:
        base[("grow", g)] = seg.grow_region(prob, prepared, cord, low=g)
    kept = seg.keep_components(base[thr], _spacing(prepared.source), vol)
    return seg.grow(kept, prob, prepared, cord, region=base[("grow", g)])


def _accumulate(a: dict[str, Any], pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float],
                weight: float, gm: np.ndarray | None = None, hd95: bool = True) -> None:
    """Add one trial's voxel and lesion counts (times ``weight``) to the accumulator ``a``; on the
    lesion-free image, also the false lesions that overlap the grey-matter mask ``gm``; ``hd95``
    off skips the (slow) Hausdorff distance."""
    a["inter"] += weight * float((pred & truth).sum())
    a["tot"] += weight * float(pred.sum() + truth.sum())
    f = lesion_f1(pred, truth)
    for k in ("tp", "fp", "fn"):
        a[k] += weight * f[k]
    if truth.any():
        a["pred_vox"] += float(pred.sum())
        a["true_vox"] += float(truth.sum())
    else:  # the lesion-free image: every component is a false lesion
        a["clean_fp"] += f["fp"]
        if gm is not None and pred.any():
            comp, n = ndi.label(pred > 0, structure=np.ones((3, 3, 3), bool))
            a["gm_fp"] += float(np.unique(comp[(gm > 0) & (comp > 0)]).size)
    hd = scores(pred, truth, spacing)["hd95_mm"] if hd95 else None
    if hd is not None:
        a["hds"].append(hd)


def evaluate_lesion(net, cfg: dict[str, Any], spec: preprocess.PrepSpec, cases: Sequence[tdata.Case], device: str,
                    seed: int, thresholds: Sequence[float | str] | None = None,
                    hd95: bool = True) -> dict[Any, dict[str, dict[str, Any]]]:
    """Per setting (see :func:`evaluate_cord`), per held-out case: ``[lesions] val_trials`` copies
    with synthetic lesions (``[lesions.test_generator]``, default the training generator)
    injected in the source image (inside the reference cord), plus the lesion-free image itself,
    counted once per 4 injected copies (so its false lesions weigh the same whatever the number
    of trials); lesion model restricted to that cord. Dice (pooled over trials), mean HD95,
    pooled lesion-wise F1, false lesions on the lesion-free image."""
    seg = segmenter_for(net, cfg, spec, device)
    source = lesion_source(cfg, "test")
    n = int(cfg.get("lesions", {}).get("val_trials", 4))
    clean_weight = float(max(1, n // 4))
    grid = list(thresholds) if thresholds else [spec.threshold]
    out: dict[Any, dict[str, dict[str, Any]]] = {t: {} for t in grid}
    for case in cases:
        image, mask = tdata.load_case(case)
        acc: dict[Any, dict[str, Any]] = {t: {"inter": 0.0, "tot": 0.0, "tp": 0.0, "fp": 0.0, "fn": 0.0, "hds": [],
                                              "clean_fp": 0.0, "pred_vox": 0.0, "true_vox": 0.0, "gm_fp": 0.0}
                                          for t in grid}
        gm = canonical_gm(case)
        trials = [(*tr, 1.0) for tr in lesion_trials(image, mask, source, n, seed)] if n > 0 else []
        for img, cord_arr, truth, weight in [*trials, (*clean_trial(image, mask), clean_weight)]:
            prepared = preprocess.prepare(img, seg.spec)
            prob = seg.predict_prob_model_grid(prepared, roi=cord_arr)
            base: dict[Any, Any] = {}
            for t in grid:
                _accumulate(acc[t], _lesion_pred(seg, prob, prepared, t, cord_arr, base), truth, _spacing(img), weight,
                            gm=None if truth.any() else gm, hd95=hd95)
        for t, a in acc.items():
            out[t][case.key] = {"subject": case.subject, "contrast": case.contrast, **_lesion_summary(a, n),
                                **({} if gm is None else {"false_lesions_on_gm": a["gm_fp"]})}
    return out


def _lesion_summary(a: dict[str, Any], trials: int) -> dict[str, Any]:
    tp, fp, fn = a["tp"], a["fp"], a["fn"]
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"dice": 2 * a["inter"] / a["tot"] if a["tot"] else 0.0,
            "hd95_mm": float(np.mean(a["hds"])) if a["hds"] else None, "lesion_precision": prec,
            "lesion_recall": rec, "lesion_f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "true_lesions": tp + fn, "trials": trials, "false_lesions_lesion_free": a["clean_fp"],
            "pred_voxels": a["pred_vox"], "true_voxels": a["true_vox"],
            "volume_ratio": a["pred_vox"] / a["true_vox"] if a["true_vox"] else None}


def objective(per_case: dict[str, dict[str, Any]], task: str) -> float:
    """What threshold calibration maximises: mean Dice (cord) or mean of Dice and lesion F1 (lesion)."""
    if not per_case:
        return float("nan")
    vals = [(r["dice"] + r["lesion_f1"]) / 2 if task == "lesion" else r["dice"] for r in per_case.values()]
    return float(np.mean(vals))


def calibrate(fold_results: dict[str, dict[float, dict[str, dict[str, Any]]]], task: str,
              max_false_per_scan: float | None = None, volume_ratio_range: tuple[float, float] | None = None
              ) -> tuple[float, dict[str, dict[str, Any]], dict[str, Any]]:
    """Pick the threshold on the validation folds, honestly.

    With ``max_false_per_scan`` (lesion model) only the settings whose mean number of false
    lesions per lesion-free real scan is at most that rate compete; when none is, the settings
    with the fewest false lesions do. The stated false-alarm rate comes first, Dice and F1 second.
    With ``volume_ratio_range`` (lesion model) the remaining settings whose pooled predicted/true
    lesion volume lies in that range are preferred (a reader trusts the volumes), then those closest
    to it.

    Parameters
    ----------
    fold_results : dict
        ``{held_out_group: {threshold: {case_key: scores}}}`` from :func:`evaluate_cord` /
        :func:`evaluate_lesion` on each fold's held-out cases.

    Returns
    -------
    tuple
        ``(threshold, per_case, info)``: the threshold that maximises :func:`objective` over all
        folds (shipped in the final card); ``per_case`` scores where each group is scored at the
        threshold chosen on the **other** groups only (nested: the reported numbers never use a
        threshold tuned on the case they score); ``info`` the grid and its objective values.
    """
    groups = list(fold_results)
    grid = sorted(next(iter(fold_results.values()))) if groups else []

    def best(use: list[str]) -> float:
        def score(t: float) -> float:
            merged = {k: v for g in use for k, v in fold_results[g][t].items()}
            return objective(merged, task)

        def false_rate(t: float) -> float:
            vals = [v.get("false_lesions_lesion_free", 0.0) for g in use for v in fold_results[g][t].values()]
            return float(np.mean(vals)) if vals else 0.0

        def ratio_miss(t: float) -> float:  # how far the pooled volume ratio lies outside the range
            pred = sum(v.get("pred_voxels", 0.0) for g in use for v in fold_results[g][t].values())
            true = sum(v.get("true_voxels", 0.0) for g in use for v in fold_results[g][t].values())
            r = pred / true if true else 1.0
            lo, hi = volume_ratio_range  # type: ignore[misc]
            return max(lo - r, r - hi, 0.0)

        cands = list(grid)
        if max_false_per_scan is not None and cands:
            ok = [t for t in cands if false_rate(t) <= max_false_per_scan]
            low = min(false_rate(t) for t in cands)
            cands = ok or [t for t in cands if false_rate(t) == low]
        if volume_ratio_range is not None and cands:
            least = min(ratio_miss(t) for t in cands)
            cands = [t for t in cands if ratio_miss(t) <= least + 1e-9]
        return max(cands, key=lambda t: (score(t), -abs(parse_setting(t)[0] - 0.5), -(parse_setting(t)[1] or 0.0)))

    per_case: dict[str, dict[str, Any]] = {}
    chosen_for: dict[str, float] = {}
    for g in groups:
        others = [h for h in groups if h != g] or [g]
        t = best(others)
        chosen_for[g] = t
        thr, vol = parse_setting(t)
        extra = {"threshold": thr} if vol is None else {"threshold": thr, "min_volume_mm3": vol}
        if parse_grow(t) is not None:
            extra["grow_threshold"] = parse_grow(t)
        per_case.update({k: {**v, **extra} for k, v in fold_results[g][t].items()})
    final = best(groups) if groups else 0.5
    info = {"grid": grid, "chosen": final, "chosen_per_held_out_group": chosen_for,
            "max_false_lesions_per_scan": max_false_per_scan,
            "objective_all_folds": {str(t): objective({k: v for g in groups for k, v in fold_results[g][t].items()}, task)
                                    for t in grid}}
    return final, per_case, info
