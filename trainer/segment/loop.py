"""The training loop of the 2-D / 2.5-D segmentation U-Nets: slice sampling, MONAI augmentation,
DiceCE loss, an exponential moving average of the weights, per-epoch validation.

Slices are ``(C, Y, X)`` patches of model-grid volumes (``C = 2*context+1``); labels ``(1, Y, X)``.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import structlog

from sci_node.errors import ConfigError
from sci_node.imaging import preprocess
from sci_node.models.artifact import build_network
from sci_node.models.predict_seg import roi_dilate_mm

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)


class RandomIntensityCurve:
    """A random piecewise-linear intensity curve (not monotone): new contrasts from one image.

    Maps normalised intensities ``[0, clip_max]`` through ``knots`` random levels; the darkest
    input (air) stays dark. Turns a T2w cord/CSF pattern into T1w-like or flat ones, so the
    network leans on shape as well as contrast (the idea of global intensity non-linear
    augmentation). Called by MONAI's ``RandLambdad`` on ``(C, Y, X)`` arrays.
    """

    def __init__(self, seed: int, knots: int = 7, clip_max: float = 1.5) -> None:
        self.rng = np.random.default_rng(seed)
        self.x = np.linspace(0.0, clip_max, knots)

    def __call__(self, img):
        y = self.rng.uniform(0.0, 1.2, self.x.size)
        y[0] = self.rng.uniform(0.0, 0.15)
        out = np.interp(np.asarray(img, dtype=np.float32), self.x, y).astype(np.float32)
        return type(img)(out) if not isinstance(img, np.ndarray) else out


def augmentation(cfg: dict[str, Any], seed: int = 0):
    """MONAI dictionary transforms applied to each ``{"img": (C,Y,X), "lab": (1,Y,X)}`` sample."""
    from monai import transforms as T

    a = cfg.get("augment", {})
    keys = ["img", "lab"]
    return T.Compose([
        T.RandLambdad(["img"], func=RandomIntensityCurve(seed), prob=a.get("curve_p", 0.0)),
        T.RandAffined(keys, prob=a.get("affine_p", 0.7), rotate_range=a.get("rotate", 0.35),
                      scale_range=a.get("scale", 0.15), shear_range=0.08, mode=("bilinear", "nearest"),
                      padding_mode="zeros"),
        T.Rand2DElasticd(keys, prob=a.get("elastic_p", 0.1), spacing=(24, 24), magnitude_range=(1, 2),
                         mode=("bilinear", "nearest"), padding_mode="zeros"),
        T.RandFlipd(keys, prob=0.5, spatial_axis=1),  # left-right: the cord is symmetric
        T.RandBiasFieldd(["img"], prob=a.get("bias_p", 0.3), coeff_range=(0.0, 0.3)),
        T.RandAdjustContrastd(["img"], prob=a.get("gamma_p", 0.4), gamma=(0.6, 1.6)),
        T.RandGaussianSmoothd(["img"], prob=a.get("blur_p", 0.2), sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2)),
        T.RandSimulateLowResolutiond(["img"], prob=a.get("lowres_p", 0.15), zoom_range=(0.5, 1.0),
                                     upsample_mode="bilinear"),
        T.RandGaussianNoised(["img"], prob=a.get("noise_p", 0.3), std=0.04),
    ])


#: Group of the cord-free synthetic canal volumes (``trainer.seg.canal_pool``): drawn at ``canal_fraction``.
CANAL_GROUP = "synthetic-canal"


class SliceSampler:
    """Draws patches from volumes: a ``pos_fraction`` share centred near foreground.

    A positive patch is centred on a foreground voxel moved by up to ``pos_jitter`` × the patch
    size in Y and X (0.25: the foreground stays in the middle half; 0.45: anywhere in the
    patch, as a sliding window at inference places it). With ``pos_by_component`` the voxel is
    drawn from a foreground component chosen uniformly (26-connected, per volume), so a 5 mm³
    lesion is sampled as often as a 500 mm³ one; otherwise uniformly over foreground voxels.
    A ``hard_negative_fraction`` share of the other patches is centred on a hard-negative voxel
    of the volume (``extra["hard_negatives"]``, e.g. grey matter), where it has any.
    """

    def __init__(self, vols: Sequence[Any], spec: preprocess.PrepSpec, rng: np.random.Generator,
                 pos_fraction: float, synth_fraction: float, canal_fraction: float = 0.0,
                 pos_jitter: float = 0.25, pos_by_component: bool = False,
                 hard_negative_fraction: float = 0.0) -> None:
        if not 0.0 <= pos_jitter <= 0.5:
            raise ConfigError(f"[train] pos_jitter = {pos_jitter}: must lie in [0, 0.5] (a share of the patch size)")
        self.real = [v for v in vols if not v.synthetic]
        self.canal = [v for v in vols if v.group == CANAL_GROUP]
        self.synth = [v for v in vols if v.synthetic and v.group != CANAL_GROUP]
        self.spec, self.rng = spec, rng
        self.pos_fraction, self.synth_fraction, self.canal_fraction = pos_fraction, synth_fraction, canal_fraction
        self.pos_jitter, self.pos_by_component = pos_jitter, pos_by_component
        self.hard_negative_fraction = hard_negative_fraction
        self._components: dict[int, list[np.ndarray]] = {}

    def _pick(self):
        """A volume: a cord-free canal one with probability ``canal_fraction`` (when there are
        any), else a PAM50 synthetic one with probability ``synth_fraction``, else a real one."""
        if self.canal and (self.rng.random() < self.canal_fraction or not (self.real or self.synth)):
            return self.canal[int(self.rng.integers(len(self.canal)))]
        pool = self.synth if (self.synth and (not self.real or self.rng.random() < self.synth_fraction)) else self.real
        return pool[int(self.rng.integers(len(pool)))]

    def _foreground(self, v) -> list[np.ndarray]:
        """Foreground voxel indices ``(N, 3)`` of ``v.label``: one array, or one per component."""
        key = id(v.label)
        if key not in self._components:
            if self.pos_by_component:
                from scipy import ndimage

                comp, n = ndimage.label(v.label > 0, structure=np.ones((3, 3, 3), bool))
                self._components[key] = [np.argwhere(comp == i) for i in range(1, n + 1)]
            else:
                fg = np.argwhere(v.label > 0)
                self._components[key] = [fg] if fg.size else []
        return self._components[key]

    def sample(self) -> dict[str, Any]:
        v = self._pick()
        img, lab = v.image, v.label
        ph, pw = self.spec.patch_yx
        fg = self._foreground(v)
        if fg and self.rng.random() < self.pos_fraction:
            part = fg[0] if len(fg) == 1 else fg[int(self.rng.integers(len(fg)))]  # one draw, as before
            z, y, x = part[int(self.rng.integers(len(part)))]
            jy, jx = int(self.pos_jitter * ph), int(self.pos_jitter * pw)
            y += int(self.rng.integers(-jy, jy + 1))
            x += int(self.rng.integers(-jx, jx + 1))
        elif self.hard_negative_fraction > 0 and "hard_negatives" in v.extra \
                and self.rng.random() < self.hard_negative_fraction:
            hn = v.extra["hard_negatives"]
            z, y, x = hn[int(self.rng.integers(len(hn)))]
        else:
            z = int(self.rng.integers(img.shape[0]))
            y, x = int(self.rng.integers(img.shape[1])), int(self.rng.integers(img.shape[2]))
        k = self.spec.context
        zs = np.clip(np.arange(z - k, z + k + 1), 0, img.shape[0] - 1)
        sl = img[zs]
        lb = lab[z][None]
        sl, _ = preprocess.pad_to(sl, (ph, pw))
        lb, _ = preprocess.pad_to(lb, (ph, pw))
        pad_y, pad_x = (sl.shape[1] - img.shape[1]) // 2, (sl.shape[2] - img.shape[2]) // 2
        y0 = int(np.clip(y + pad_y - ph // 2, 0, sl.shape[1] - ph))
        x0 = int(np.clip(x + pad_x - pw // 2, 0, sl.shape[2] - pw))
        return {"img": sl[:, y0:y0 + ph, x0:x0 + pw].astype(np.float32),
                "lab": lb[:, y0:y0 + ph, x0:x0 + pw].astype(np.float32), "sz": float(v.spacing[0])}

    def batch(self, size: int, groups: int, aug) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``size`` augmented samples: ``(B, C, Y, X)`` images and ``(B, 1, Y, X)`` labels.

        Samples are augmented in ``groups`` groups stacked along the channel axis (one random
        draw of the MONAI transforms per group): same variety per epoch, a fraction of the cost.
        With ``spec.thickness_channel`` each sample's slice-spacing channel is appended after the
        augmentation (intensity transforms must not touch it), as :func:`infer_volume` does.
        """
        import torch

        c = 2 * self.spec.context + 1
        xs, ys = [], []
        per = int(np.ceil(size / groups))
        for g in range(groups):
            n = min(per, size - g * per)
            if n <= 0:
                break
            samples = [self.sample() for _ in range(n)]
            out = aug({"img": np.concatenate([s["img"] for s in samples]),
                       "lab": np.concatenate([s["lab"] for s in samples])})
            x = torch.as_tensor(out["img"]).reshape(n, c, *self.spec.patch_yx)
            if self.spec.thickness_channel:
                thick = torch.tensor([preprocess.thickness_value(s["sz"]) for s in samples], dtype=x.dtype)
                x = torch.cat([x, thick.view(n, 1, 1, 1).expand(n, 1, *self.spec.patch_yx)], dim=1)
            xs.append(x)
            ys.append(torch.as_tensor(out["lab"]).reshape(n, 1, *self.spec.patch_yx))
        return torch.cat(xs).float(), torch.cat(ys).float()


def _ema_update(ema, net, decay: float) -> None:
    import torch

    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
        for be, b in zip(ema.buffers(), net.buffers()):
            be.copy_(b)


def validate(net, val_vols: Sequence[Any], spec: preprocess.PrepSpec, device: str, roi_mm: float = 2.0) -> float:
    """Mean Dice (MONAI ``DiceMetric``) on the model grid of each validation volume."""
    import torch
    from monai.metrics import DiceMetric

    from sci_node.imaging.postprocess import dilate_mm
    from sci_node.models.predict_seg import infer_volume

    metric = DiceMetric(include_background=True, reduction="mean")
    for v in val_vols:
        prob = infer_volume(net, v.image, spec, device, z_spacing=float(v.spacing[0]))
        if v.cord is not None:  # lesion model: kept inside the cord, as at inference
            prob = prob * dilate_mm(v.cord, v.spacing, roi_mm)
        pred = torch.from_numpy((prob >= spec.threshold)[None, None].astype(np.float32))
        metric(pred, torch.from_numpy(v.label[None, None].astype(np.float32)))
    return float(metric.aggregate().item()) if val_vols else float("nan")  # type: ignore[union-attr]


def _save_checkpoint(path: Path, epoch: int, step: int, history: list[dict[str, float]], net, ema, opt) -> None:
    """Atomically write the training state after ``epoch`` epochs (tmp file + rename)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    plain = [{k: float(v) for k, v in h.items()} for h in history]  # no numpy scalars: weights_only loads it
    torch.save({"epoch": epoch, "step": step, "history": plain, "net": net.state_dict(),
                "ema": ema.state_dict(), "opt": opt.state_dict()}, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, net, ema, opt) -> tuple[int, int, list[dict[str, float]], float]:
    """Restore a :func:`_save_checkpoint` state; ``(epochs_done, step, history, minutes_used)``."""
    import torch

    # numpy float scalars (a learning rate): checkpoints written before they were made plain floats
    allowed = [np._core.multiarray.scalar, np.dtype, type(np.dtype(np.float64))]  # type: ignore[attr-defined]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state["net"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    hist = list(state["history"])
    return int(state["epoch"]), int(state["step"]), hist, float(hist[-1]["minutes"]) if hist else 0.0


def train_network(cfg: dict[str, Any], spec: preprocess.PrepSpec, train_vols: Sequence[Any],
                  val_vols: Sequence[Any], *, seed: int, device: str, minutes: float, epochs: int,
                  tag: str, refresh=None, checkpoint: Path | None = None, init_state=None):
    """Train a fresh network from ``cfg["network"]``; return ``(ema_net, history)``.

    ``init_state`` (a state dict of the same architecture) starts from those weights instead
    (fine-tuning: :mod:`trainer.finetune`).

    Stops after ``epochs`` epochs or when ``minutes`` of wall time are used (whichever first).
    ``refresh(epoch, rng)`` (optional) returns new training volumes at the start of each epoch
    (the lesion model re-injects lesions).

    With ``[train] epoch_seeding = true`` every epoch re-seeds numpy, torch and the MONAI
    augmentation from ``(seed, epoch)``, so a run resumed from ``checkpoint`` (written after
    every epoch: weights, EMA, optimiser, step, history, wall time used) gives the same
    weights as an uninterrupted one. Without it, the legacy single-seed stream is used (the
    shipped 0.x models reproduce) and a resumed run differs from an uninterrupted one.
    """
    import torch
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism
    from tqdm import tqdm

    set_determinism(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_network({"architecture": {"class": cfg["network"]["class"], "args": cfg["network"]["args"]}}).to(device)
    if init_state is not None:
        net.load_state_dict(init_state)
    ema = copy.deepcopy(net).eval()
    t = cfg["train"]
    steps, bs = int(t.get("steps_per_epoch", 50)), int(t.get("batch_size", 16))
    opt = torch.optim.AdamW(net.parameters(), lr=float(t.get("lr", 2e-3)), weight_decay=1e-4)
    base_lr, total = float(t.get("lr", 2e-3)), steps * epochs
    # dice_batch = false: Dice per patch, so a small lesion weighs as much as a large one (default: over the batch)
    loss_fn = DiceCELoss(sigmoid=True, batch=bool(t.get("dice_batch", True)))
    aug = augmentation(cfg, seed)
    aug.set_random_state(seed=seed)
    groups = int(t.get("aug_groups", 4))
    history: list[dict[str, float]] = []
    t0 = time.monotonic()
    step, first = 0, 0
    per_epoch = bool(t.get("epoch_seeding", False))
    if checkpoint is not None and Path(checkpoint).is_file():
        first, step, history, used = _load_checkpoint(Path(checkpoint), net, ema, opt)
        t0 -= used * 60
        log.info("train.resumed", run=tag, from_epoch=first, checkpoint=str(checkpoint))
    vols = list(train_vols)
    for ep in range(first, epochs):
        if per_epoch:
            rng = np.random.default_rng([seed, ep])
            torch.manual_seed(seed * 100_003 + ep)
            aug.set_random_state(seed=(seed * 100_003 + ep) % (2**32))
        if refresh is not None:
            vols = refresh(ep, rng)
        sampler = SliceSampler(vols, spec, rng, float(t.get("pos_fraction", 0.67)), float(t.get("synth_fraction", 0.5)),
                               float(t.get("canal_fraction", 0.0)), float(t.get("pos_jitter", 0.25)),
                               bool(t.get("pos_by_component", False)), float(t.get("hard_negative_fraction", 0.0)))
        net.train()
        losses = []
        bar = tqdm(range(steps), desc=f"{tag} epoch {ep + 1}/{epochs}", leave=False, mininterval=5)
        for _ in bar:
            x, y = sampler.batch(bs, groups, aug)
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), (y > 0.5).float())
            loss.backward()
            opt.step()
            step += 1
            # cosine decay over whichever budget (steps or wall time) runs out first
            frac = min(1.0, max(step / total, (time.monotonic() - t0) / (minutes * 60)))
            for g in opt.param_groups:
                g["lr"] = float(base_lr * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * frac))))
            _ema_update(ema, net, float(t.get("ema", 0.98)))
            losses.append(float(loss.item()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
        ema.eval()
        every = max(1, int(t.get("val_every", 1)))  # per-epoch validation of large held-out volumes is costly
        val = (validate(ema, val_vols, spec, device, roi_dilate_mm(cfg.get("post", {})))
               if val_vols and ((ep + 1) % every == 0 or ep + 1 == epochs) else float("nan"))
        history.append({"epoch": ep + 1, "loss": float(np.mean(losses)), "val_dice": val,
                        "minutes": (time.monotonic() - t0) / 60})
        log.info("train.epoch", run=tag, epoch=ep + 1, loss=round(float(np.mean(losses)), 4),
                 val_dice=None if np.isnan(val) else round(val, 4), minutes=round(history[-1]["minutes"], 2))
        if checkpoint is not None:
            _save_checkpoint(Path(checkpoint), ep + 1, step, history, net, ema, opt)
        if time.monotonic() - t0 > minutes * 60:
            log.info("train.time_budget_reached", run=tag, epochs_run=ep + 1, minutes=minutes)
            break
    return ema.eval(), history
