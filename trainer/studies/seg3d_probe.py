"""3-D comparison probe of the cord model: does a small 3-D MONAI DynUNet on patches beat the
2-D U-Net on the held-out subjects of one cross-validation fold?

``python -m trainer.seg3d_probe --config trainer/configs/cord_canal_cv.toml --fold fold0
--minutes 30 --seed 0 --out DIR`` trains a :class:`monai.networks.nets.DynUNet` (about 0.8 M
parameters) on ``(Z, Y, X) = PATCH`` patches of the fold's training volumes, then scores each
held-out case on its **source grid** with the metric of :func:`trainer.segment.evaluate.evaluate_cord`
(:func:`trainer.segment.evaluate.scores`: MONAI Dice and HD95 in mm). It prints one JSON line per
held-out case and a summary line, writes both to ``DIR/result.json``, and checkpoints
``DIR/ckpt.pt`` every ``--ckpt-minutes``: the same command again resumes (step, weights,
optimiser, wall time used), or only evaluates when the budget is spent.

What differs from the 2-D recipe (:mod:`trainer.segment.train`, :mod:`trainer.segment.loop`), on purpose:

* Only the **real labelled cases** of the config are used (the ``[data] train_only``
  templates always train, as in :func:`trainer.segment.train._run_cv_fold`): the ``[synth]`` pools
  (PAM50-derived volumes, cord-free canals) and the ``[train] lesion_fraction`` injected
  lesions are skipped, and there is no EMA of the weights.
* The model grid is :func:`sci_node.imaging.preprocess.prepare`'s (canonical LPS, in-plane
  ``spacing_yx``, source slices kept), so the slice spacing of the patches varies from 1 mm
  (reformatted sagittal T2w) to 16.5 mm (MT); the first level's kernel and the second level's
  stride are 1 along ``Z``.
* Inference is a plain 3-D sliding window over the whole volume (no coarse-to-fine pass);
  the probability is then finished by the node's own post-processing
  (:meth:`sci_node.models.predict_seg.Segmenter.finish`: centre-line filter, source-grid mapping
  with :func:`sci_node.imaging.preprocess.to_source_grid`, component sizes) at threshold 0.5.
  ``dice_raw`` / ``hd95_raw_mm`` are the scores of the bare ``to_source_grid`` mask.

Arrays are numpy ``(Z, Y, X)`` on the model grid (``Z`` inferior→superior); spacings in mm.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import SimpleITK as sitk
import structlog

from sci_node.errors import ConfigError
from sci_node.imaging import preprocess
from trainer.segment import data as tdata
from trainer.segment import train as seg
from trainer.segment.evaluate import scores, segmenter_for

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)
PATCH: tuple[int, int, int] = (16, 64, 64)  # (Z, Y, X) model-grid voxels: training patch = sliding-window ROI
FILTERS = (12, 24, 48, 96)
KERNELS = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]  # (Z, Y, X): level 1 in-plane only (thick slices)
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]  # Z shrinks 4x, Y and X 8x: PATCH divides evenly
POS_FRACTION = 0.6
WARMUP_STEPS = 50
THRESHOLD = 0.5


def build_net() -> "torch.nn.Module":
    """The 3-D DynUNet: 1 input channel (normalised intensity), 1 output channel (cord logits)."""
    from monai.networks.nets import DynUNet

    return DynUNet(spatial_dims=3, in_channels=1, out_channels=1, kernel_size=KERNELS, strides=STRIDES,
                   upsample_kernel_size=STRIDES[1:], filters=list(FILTERS), norm_name="instance")


def fold_split(cfg: dict[str, Any], cases: list[tdata.Case], fold: str
               ) -> tuple[list[str], list[tdata.Case], list[tdata.Case]]:
    """``(held_out_groups, train_cases, val_cases)`` of the fold named ``fold``
    (:func:`trainer.segment.train.cv_folds`).

    Train = every case whose group is not held out (the ``train_only`` templates included),
    val = the cases of the held-out groups: the real cases of :func:`trainer.segment.train._run_cv_fold`.
    """
    folds = dict(seg.cv_folds(cfg, cases, cases))  # type: ignore[arg-type]  # a Case has .group, all it reads
    if fold not in folds:
        raise ConfigError(f"training config {cfg['_path']!r} has no fold {fold!r} (folds: {', '.join(folds)})")
    held = folds[fold]
    return held, [c for c in cases if c.group not in held], [c for c in cases if c.group in held]


def crop_patch(array: np.ndarray, centre: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The ``size`` box centred on ``centre`` of a ``(Z, Y, X)`` array, zero outside it (float32)."""
    out = np.zeros(tuple(size), np.float32)
    src, dst = [], []
    for c, n, s in zip(centre, array.shape, size):
        a = int(c) - s // 2
        lo, hi = max(a, 0), min(a + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - a, hi - a))
    out[tuple(dst)] = array[tuple(src)]
    return out


def sample_patch(vol: seg.Vol, fg: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One ``{"img", "lab"}`` pair of ``(1, *PATCH)`` float32 arrays from a volume.

    With probability ``POS_FRACTION`` centred on a random cord voxel (``fg``: ``(N, 3)`` indices)
    jittered by up to a quarter patch per axis, otherwise on a uniformly random voxel; parts
    outside the volume (e.g. volumes with fewer than ``PATCH[0]`` slices) are zero.
    """
    if len(fg) and rng.random() < POS_FRACTION:
        jitter = [int(rng.integers(-s // 4, s // 4 + 1)) for s in PATCH]
        centre = fg[int(rng.integers(len(fg)))] + np.asarray(jitter)
    else:
        centre = np.asarray([int(rng.integers(n)) for n in vol.image.shape])
    return {"img": crop_patch(vol.image, centre, PATCH)[None], "lab": crop_patch(vol.label, centre, PATCH)[None]}


def augmentation():
    """Modest MONAI 3-D dictionary transforms on ``{"img", "lab"}`` ``(1, Z, Y, X)`` samples.

    The first rotation angle turns the ``(Y, X)`` plane (axial in-plane, 0.7 mm isotropic); the
    tilts are small because they act in voxel units and ``Z`` voxels are up to 16.5 mm thick.
    """
    from monai import transforms as T

    keys = ["img", "lab"]
    return T.Compose([
        T.RandAffined(keys, prob=0.5, rotate_range=(0.25, 0.03, 0.03), scale_range=(0.05, 0.1, 0.1),
                      mode=("bilinear", "nearest"), padding_mode="zeros"),
        T.RandFlipd(keys, prob=0.5, spatial_axis=2),  # X = left-right: the cord is symmetric
        T.RandBiasFieldd(["img"], prob=0.3, coeff_range=(0.0, 0.3)),
        T.RandAdjustContrastd(["img"], prob=0.3, gamma=(0.7, 1.5)),
        T.RandGaussianNoised(["img"], prob=0.3, std=0.04),
    ])


def make_batch(vols: Sequence[seg.Vol], fgs: Sequence[np.ndarray], rng: np.random.Generator, aug, size: int
               ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``size`` augmented samples from uniformly drawn volumes: ``(B, 1, *PATCH)`` images and binary labels."""
    import torch

    xs, ys = [], []
    for _ in range(size):
        i = int(rng.integers(len(vols)))
        out = aug(sample_patch(vols[i], fgs[i], rng))
        xs.append(torch.as_tensor(out["img"]).float())
        ys.append((torch.as_tensor(out["lab"]) > 0.5).float())
    return torch.stack(xs), torch.stack(ys)


def lr_factor(step: int, frac: float) -> float:
    """Learning-rate multiplier: linear warm-up over ``WARMUP_STEPS``, then cosine to 2 % over ``frac`` in [0, 1]."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    return float(warm * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * min(1.0, frac)))))


def save_checkpoint(path: Path, state: dict[str, Any], net, opt) -> None:
    """Atomically write ``state`` (plain numbers and strings) with the weights and the optimiser."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({**state, "net": net.state_dict(), "opt": opt.state_dict()}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, net, opt, expect: dict[str, Any]) -> dict[str, Any]:
    """Restore :func:`save_checkpoint`; raise ``ConfigError`` when it belongs to another run (``expect`` keys)."""
    import torch

    ck = torch.load(path, map_location="cpu", weights_only=True)
    other = {k: ck.get(k) for k in expect if ck.get(k) != expect[k]}
    if other:
        raise ConfigError(f"checkpoint {str(path)!r} is of another run ({other}, this run {expect}): use another --out")
    net.load_state_dict(ck.pop("net"))
    opt.load_state_dict(ck.pop("opt"))
    return ck


def train(net, opt, vols: Sequence[seg.Vol], state: dict[str, Any], args, ckpt: Path) -> dict[str, Any]:
    """Train until ``args.minutes`` of (cumulative) training wall time or ``args.steps`` steps.

    Each step re-seeds the sampler and the augmentation from ``(seed, step)``, so the data a
    resumed run sees is the one an uninterrupted run would have seen (the cosine follows
    whichever budget runs out first, so with a time budget the schedule depends on the speed).
    ``state`` (``step``, ``seconds``, ``loss_log``) is updated and returned; checkpoints go to
    ``ckpt`` every ``args.ckpt_minutes`` and at the end.
    """
    from monai.data import set_track_meta
    from monai.losses import DiceCELoss

    set_track_meta(False)  # plain tensors out of the transforms
    loss_fn, aug = DiceCELoss(sigmoid=True), augmentation()
    fgs = [np.argwhere(v.label > 0) for v in vols]
    budget, t0, t_ckpt, losses = args.minutes * 60.0, time.monotonic() - state["seconds"], time.monotonic(), []
    net.train()
    while state["step"] < args.steps and state["seconds"] < budget:
        step = state["step"]
        rng = np.random.default_rng([args.seed, step])
        aug.set_random_state(seed=(args.seed * 100_003 + step) % (2**32))
        frac = max(step / args.steps, state["seconds"] / budget)
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, frac)
        x, y = make_batch(vols, fgs, rng, aug, args.batch)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x.to(args.device)), y.to(args.device))
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        state["step"], state["seconds"] = step + 1, time.monotonic() - t0
        if state["step"] % 50 == 0:
            state["loss_log"].append([state["step"], float(np.mean(losses[-50:]))])
            log.info("seg3d.step", step=state["step"], loss=round(state["loss_log"][-1][1], 4),
                     lr=round(opt.param_groups[0]["lr"], 5), minutes=round(state["seconds"] / 60, 2),
                     s_per_step=round(state["seconds"] / state["step"], 3))
        if time.monotonic() - t_ckpt > args.ckpt_minutes * 60:
            save_checkpoint(ckpt, state, net, opt)
            t_ckpt = time.monotonic()
    save_checkpoint(ckpt, state, net, opt)
    return state


def predict_prob(net, array: np.ndarray, device: str = "cpu") -> np.ndarray:
    """``(Z, Y, X)`` float32 cord probability of a model-grid volume by 3-D sliding windows of ``PATCH``
    (zero-padded where the volume is smaller, Gaussian-weighted 25 % overlap)."""
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)
    net.eval()
    with torch.inference_mode():
        logits = sliding_window_inference(x, roi_size=PATCH, sw_batch_size=4, predictor=net, overlap=0.25,
                                          mode="gaussian", padding_mode="constant", cval=0.0)
    return torch.sigmoid(torch.as_tensor(logits))[0, 0].cpu().numpy().astype(np.float32)


def evaluate(net, cfg: dict[str, Any], spec: preprocess.PrepSpec, cases: Sequence[tdata.Case],
             device: str = "cpu") -> list[dict[str, Any]]:
    """Per held-out case: Dice and HD95 (mm) on the source grid, as
    :func:`trainer.segment.evaluate.evaluate_cord` scores.

    ``dice`` / ``hd95_mm``: after :meth:`~sci_node.models.predict_seg.Segmenter.finish` (the node's
    post-processing, threshold ``THRESHOLD``); ``dice_raw`` / ``hd95_raw_mm``: the bare
    :func:`~sci_node.imaging.preprocess.to_source_grid` mask. ``infer_s`` = sliding-window seconds.
    """
    finisher = segmenter_for(net, cfg, spec, device)  # only its post-processing is used
    rows = []
    for case in cases:
        image, mask = tdata.load_case(case)
        prepared = preprocess.prepare(image, spec)
        t0 = time.monotonic()
        prob = predict_prob(net, prepared.array, device)
        infer_s = time.monotonic() - t0
        truth = sitk.GetArrayFromImage(mask)
        spacing = tuple(float(s) for s in image.GetSpacing()[:3][::-1])
        post = scores(finisher.finish(prob, prepared, THRESHOLD), truth, spacing)  # type: ignore[arg-type]
        raw = scores(preprocess.to_source_grid(prob, prepared, THRESHOLD), truth, spacing)  # type: ignore[arg-type]
        rows.append({"key": case.key, "dice": post["dice"], "hd95_mm": post["hd95_mm"], "dice_raw": raw["dice"],
                     "hd95_raw_mm": raw["hd95_mm"], "infer_s": round(infer_s, 2),
                     "model_grid_zyx": list(prepared.array.shape),
                     "z_spacing_mm": round(float(prepared.grid.GetSpacing()[2]), 3)})
    return rows


def summary(rows: list[dict[str, Any]], state: dict[str, Any], params: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The summary line: mean / min Dice, mean / max HD95 (finite ones), training and inference cost."""
    def vals(k: str) -> list[float]:
        return [float(r[k]) for r in rows if r[k] is not None and np.isfinite(r[k])]

    d, h, dr = vals("dice"), vals("hd95_mm"), vals("dice_raw")
    return {"summary": True, **extra, "cases": len(rows),
            "dice_mean": float(np.mean(d)) if d else None, "dice_min": float(np.min(d)) if d else None,
            "hd95_mm_mean": float(np.mean(h)) if h else None, "hd95_mm_max": float(np.max(h)) if h else None,
            "hd95_undefined": len(rows) - len(h),  # empty prediction: no HD95, left out of its mean
            "dice_raw_mean": float(np.mean(dr)) if dr else None,
            "minutes_trained": round(state["seconds"] / 60, 3), "steps": state["step"],
            "seconds_per_step": round(state["seconds"] / state["step"], 3) if state["step"] else None,
            "params": params, "infer_seconds_per_case": float(np.mean([r["infer_s"] for r in rows])) if rows else None}


def run(args) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load the fold, train (or resume / skip when the budget is spent), evaluate; ``(rows, summary)``."""
    import torch

    torch.set_num_threads(args.threads)
    cfg = seg.load_config("cord", args.config)
    spec = seg.prep_spec(cfg)
    held, train_cases, val_cases = fold_split(cfg, seg.config_cases(cfg, args.data), args.fold)
    torch.manual_seed(args.seed)
    net = build_net().to(args.device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    expect = {"config": str(Path(args.config).resolve()), "fold": args.fold, "seed": args.seed,
              "filters": list(FILTERS), "patch": list(PATCH)}
    ckpt = Path(args.out) / "ckpt.pt"
    state: dict[str, Any] = {**expect, "step": 0, "seconds": 0.0, "loss_log": []}
    if ckpt.is_file():
        state = load_checkpoint(ckpt, net, opt, expect)
        log.info("seg3d.resumed", checkpoint=str(ckpt), step=state["step"], minutes=round(state["seconds"] / 60, 2))
    if state["step"] < args.steps and state["seconds"] < args.minutes * 60:
        vols = seg.load_volumes(train_cases, spec, "cord", 0)
        log.info("seg3d.train", fold=args.fold, held_out=held, train=[v.key for v in vols],
                 val=[c.key for c in val_cases])
        state = train(net, opt, vols, state, args, ckpt)
    else:
        log.info("seg3d.budget_spent", step=state["step"], minutes=round(state["seconds"] / 60, 2))
    rows = evaluate(net, cfg, spec, val_cases, args.device)
    extra = {"fold": args.fold, "held_out_groups": held, "train_cases": len(train_cases), "seed": args.seed,
             "patch_zyx": list(PATCH), "filters": list(FILTERS), "threshold": THRESHOLD,
             "final_loss": state["loss_log"][-1][1] if state["loss_log"] else None}
    return rows, summary(rows, state, sum(p.numel() for p in net.parameters()), extra)


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.seg3d_probe --config F --fold fold0 --minutes M --seed S --out DIR``."""
    import argparse

    from sci_node.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m trainer.seg3d_probe", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--fold", required=True, help="fold name of trainer.segment.train.cv_folds, e.g. fold0")
    p.add_argument("--minutes", type=float, default=30.0, help="training wall-time budget (cumulative over resumes)")
    p.add_argument("--steps", type=int, default=10**9, help="step budget (whichever budget ends first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="ckpt.pt and result.json go here")
    p.add_argument("--data", type=Path, help="dataset root (default: the config's [data] root)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ckpt-minutes", type=float, default=2.0, help="checkpoint interval")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    configure_logging("console", "INFO")
    rows, summ = run(a)
    for r in rows:
        print(json.dumps(r), flush=True)
    print(json.dumps(summ), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "result.json").write_text(json.dumps({"cases": rows, "summary": summ}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
