"""Training of the routing classifiers (anatomy, region_view, sequence).

Pipeline: catalogue sources (real volumes + nibabel/pydicom test images) and synthetic
samples -> :func:`sci_node.cls_features.series_inputs` (the node's own preprocessing) ->
leave-one-subject-out (LOSO) folds over the person groups (never scoring a group a fold
trained on) -> temperature scaling per head on the out-of-fold logits -> final network
on all samples -> artefact (``weights.pt`` + ``card.json``) with the LOSO table.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import structlog

from sci_node.cls_features import FEATURE_NAMES, N_FEATURES, N_HEADER_FEATURES, PREPROCESSING_ID, THUMB_SIZE, series_inputs
from sci_node.errors import ConfigError, DataError
from sci_node.artifact import sha256_file as file_sha
from trainer import __version__ as TRAINER_VERSION
from trainer import git_commit, read_toml_config
from trainer.cls_data import ANATOMY, REGION, SEQUENCE, TASKS, VIEW, DEFAULT_SOURCES, SampleSet, Source, \
    load_source, real_samples, root_dir

log = structlog.get_logger(__name__)
REPO = Path(__file__).resolve().parent.parent
CLASSES = {"anatomy": ANATOMY, "region": REGION, "view": VIEW, "sequence": SEQUENCE}
#: Bump when the sample generators change (invalidates sample caches).
SAMPLES_VERSION = 5
MODEL_HEADS = {"anatomy": ("anatomy",), "region_view": ("region", "view"), "sequence": ("sequence",)}
#: Coded concepts of the classes (SNOMED CT where one exists, else DCM / local "99SCINODE").
CODES: dict[str, tuple[str, str, str]] = {
    "spine": ("421060004", "SCT", "Spinal cord"), "brain": ("12738006", "SCT", "Brain"),
    "abdomen": ("818981001", "SCT", "Abdomen"), "other": ("OTHER", "99SCINODE", "Other"),
    "cervical": ("122494005", "SCT", "Cervical spine"), "thoracic": ("122495006", "SCT", "Thoracic spine"),
    "lumbar": ("122496007", "SCT", "Lumbar spine"),
    "sagittal": ("30730003", "SCT", "Sagittal"), "axial": ("62824007", "SCT", "Transverse"),
    "coronal": ("81654009", "SCT", "Coronal"),
    "T1w": ("110804", "DCM", "T1 Weighted MR Signal Intensity"),
    "T2w": ("110805", "DCM", "T2 Weighted MR Signal Intensity"),
    "T2starw": ("110806", "DCM", "T2* Weighted MR Signal Intensity"),
}


# -- config ----------------------------------------------------------------------------------

def load_cls_config(model: str, path: Path | None) -> dict[str, Any]:
    """Read a classifier training config (default ``trainer/configs/MODEL.toml``) and check it."""
    path = Path(path) if path else REPO / "trainer" / "configs" / f"{model}.toml"
    cfg = read_toml_config(path)
    problems = [f"missing [{s}]" for s in ("model", "data", "network", "train") if s not in cfg]
    if not problems and cfg["model"].get("name") != model:
        problems.append(f"model.name {cfg['model'].get('name')!r} is not {model!r}")
    if problems:
        raise ConfigError(f"training config {str(path)!r}: " + "; ".join(problems))
    cfg["_path"] = str(path)
    return cfg


def sources_of(cfg: dict[str, Any]) -> list[Source]:
    """Catalogue from ``[[sources]]`` of the config, else :data:`DEFAULT_SOURCES`."""
    if "sources" not in cfg:
        return list(DEFAULT_SOURCES)
    try:
        return [Source(**s) for s in cfg["sources"]]
    except TypeError as exc:
        raise ConfigError(f"training config {cfg['_path']!r}: bad [[sources]] entry: {exc}") from None


# -- samples ----------------------------------------------------------------------------------

def build_samples(cfg: dict[str, Any], data: Path, seed: int) -> SampleSet:
    """All samples of the config (real augmentations + synthetic), cached when ``data.cache`` is set."""
    dcfg = cfg["data"]
    sources = sources_of(cfg)
    files = [root_dir(s.root, data) / s.path for s in sources]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"classifier training source {str(missing[0])!r} does not exist")
    pam_dir = data / dcfg["pam50_dir"] if dcfg.get("n_pam50", 0) else None
    hashed = files + (sorted(pam_dir.glob("PAM50_*.nii.gz")) if pam_dir else [])
    digest = hashlib.sha256()
    for f in hashed:
        digest.update(f.name.encode() + file_sha(f).encode())
    recipe = json.dumps({"data": {k: v for k, v in dcfg.items() if k != "cache"}, "seed": seed,
                         "generator": SAMPLES_VERSION,
                         "prep": PREPROCESSING_ID, "sources": [s.__dict__ for s in sources]}, sort_keys=True)
    key = hashlib.sha256(digest.hexdigest().encode() + recipe.encode()).hexdigest()[:16]
    meta = {"data_hash": "sha256:" + digest.hexdigest(), "n_sources": len(sources)}
    cache = Path(dcfg["cache"]).with_suffix(f".{key}.npz") if dcfg.get("cache") else None
    if cache is not None and cache.is_file():
        log.info("classifier samples from cache", path=str(cache))
        return SampleSet.load(cache, meta)
    samples = _generate(cfg, sources, data, pam_dir, seed)
    samples.meta = meta
    if cache is not None:
        samples.save(cache)
    return samples


def _generate(cfg: dict[str, Any], sources: Sequence[Source], data: Path, pam_dir: Path | None,
              seed: int) -> SampleSet:
    import SimpleITK as sitk
    from tqdm import tqdm

    from trainer.cls_scenes import scene_sample
    from trainer.cls_synth import load_pam50, pam50_sample, phantom_sample

    dcfg = cfg["data"]
    rng = np.random.default_rng(seed)
    levels = sitk.ReadImage(str(data / dcfg["levels"])) if dcfg.get("levels") else None
    rows: list[tuple[np.ndarray, np.ndarray, dict[str, int], str, bool, bool]] = []
    for src in tqdm(sources, desc="real sources", unit="vol", file=sys.stderr):
        for img, hdr, lab, stored in real_samples(src, data, int(dcfg.get("n_aug", 10)), rng, levels):
            t, f = series_inputs(img, hdr)
            rows.append((t, f, lab, src.group, True, stored))
    n_pam = int(dcfg.get("n_pam50", 0))
    if n_pam:
        pam = load_pam50(pam_dir)  # type: ignore[arg-type]
        for _ in tqdm(range(n_pam), desc="PAM50 synthetic", unit="img", file=sys.stderr):
            img, hdr, lab = pam50_sample(pam, rng)
            t, f = series_inputs(img, hdr)
            rows.append((t, f, lab, "PAM50", False, False))
    scenes = dict(dcfg.get("n_scenes", {}))
    for anatomy, n in scenes.items():
        if anatomy not in ANATOMY:
            raise ConfigError(f"data.n_scenes: unknown anatomy {anatomy!r}")
        for _ in tqdm(range(int(n)), desc=f"synthetic {anatomy} scenes", unit="img", file=sys.stderr):
            img, hdr, lab = scene_sample(rng, anatomy)
            t, f = series_inputs(img, hdr)
            rows.append((t, f, lab, "synth-scenes", False, False))
    for _ in range(int(dcfg.get("n_phantom", 0))):
        img, hdr, lab = phantom_sample(rng)
        t, f = series_inputs(img, hdr)
        rows.append((t, f, lab, "synth-phantom", False, False))
    if not rows:
        raise DataError("no classifier training samples (empty source catalogue)")
    return SampleSet(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                     {k: np.asarray([r[2][k] for r in rows], np.int64) for k in TASKS},
                     np.asarray([r[3] for r in rows]), np.asarray([r[4] for r in rows]),
                     np.asarray([r[5] for r in rows]))


# -- training ---------------------------------------------------------------------------------

def _net_args(cfg: dict[str, Any], heads: Sequence[str]) -> dict[str, Any]:
    args = dict(cfg["network"].get("args", {}))
    if cfg["network"].get("header_expert", False):
        args["n_header_features"] = N_HEADER_FEATURES
    args.update(in_channels=3, image_size=THUMB_SIZE, n_features=N_FEATURES,
                heads={h: len(CLASSES[h]) for h in heads})
    return args


def fit(cfg: dict[str, Any], heads: Sequence[str], train: SampleSet, epochs: int, seed: int, device: str,
        val: SampleSet | None = None, desc: str = "train") -> Any:
    """Train a fresh :class:`SeriesNet` on ``train``; per-epoch progress bar with loss and held-out accuracy."""
    import torch
    from tqdm import tqdm

    from sci_node.nets import SeriesNet

    tcfg = cfg["train"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SeriesNet(**_net_args(cfg, heads)).to(device)
    feats = torch.as_tensor(train.features)
    net.feature_mean.copy_(feats.mean(0))
    net.feature_std.copy_(feats.std(0).clamp_min(1e-3))
    thumbs = torch.as_tensor(train.thumbs)
    ys = {h: torch.as_tensor(train.labels[h]) for h in heads}
    weights = {}
    for h in heads:
        counts = np.bincount(train.labels[h][train.labels[h] >= 0], minlength=len(CLASSES[h])).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0)
        power = float(tcfg.get("class_weight_power", 0.5))  # 0.5 = sqrt of inverse class frequency
        weights[h] = torch.as_tensor(w ** power, dtype=torch.float32, device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=float(tcfg.get("lr", 3e-3)), weight_decay=float(tcfg.get("weight_decay", 1e-4)))
    batch, drop = int(tcfg.get("batch_size", 64)), float(tcfg.get("header_dropout", 0.25))
    n_pool = len(thumbs) + (max(0, int(tcfg.get("real_repeat", 1)) - 1)) * int(np.sum(train.real))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(tcfg.get("lr", 3e-3)), total_steps=max(1, epochs * (
        (n_pool + batch - 1) // batch)))
    # real acquisitions are repeated ``real_repeat`` times per epoch (they are few next to the synthetic ones)
    pool = np.concatenate([np.arange(len(thumbs))]
                          + [np.nonzero(train.real)[0]] * max(0, int(tcfg.get("real_repeat", 1)) - 1))
    bar = tqdm(range(epochs), desc=desc, unit="epoch", file=sys.stderr, leave=False)
    for _ in bar:
        net.train()
        perm = pool[rng.permutation(len(pool))]
        total = 0.0
        for i in range(0, len(perm), batch):
            idx = torch.as_tensor(perm[i:i + batch])
            x, f = thumbs[idx].to(device), feats[idx].clone()
            f[torch.as_tensor(rng.random(len(idx)) < drop), -N_HEADER_FEATURES:] = 0.0
            x = x * (1 + 0.1 * torch.randn(len(idx), 1, 1, 1)) + 0.02 * torch.randn_like(x)
            out = net(x, f.to(device))
            loss = sum(torch.nn.functional.cross_entropy(out[h], ys[h][idx].to(device), weight=weights[h],
                                                         ignore_index=-1) for h in heads
                       if bool((ys[h][idx] >= 0).any()))
            if not isinstance(loss, torch.Tensor):
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            sched.step()
        post = {"loss": f"{total / len(perm):.3f}"}
        if val is not None:
            logits = predict_logits(net, val, device)
            for h in heads:
                ok = val.labels[h] >= 0
                if ok.any():
                    post[f"val_{h}"] = f"{np.mean(logits[h][ok].argmax(1) == val.labels[h][ok]):.2f}"
        bar.set_postfix(post)
    return net.eval()


def predict_logits(net: Any, s: SampleSet, device: str) -> dict[str, np.ndarray]:
    """Raw logits head -> ``(N, K)``."""
    import torch

    net.eval()
    with torch.inference_mode():
        out = net(torch.as_tensor(s.thumbs, device=device), torch.as_tensor(s.features, device=device))
    return {h: v.cpu().numpy() for h, v in out.items()}


# -- validation and calibration ---------------------------------------------------------------

def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (grid over 0.25..20, log-spaced).

    The lower bound keeps a head that made no out-of-fold error from being sharpened without limit.
    """
    if len(labels) == 0:
        return 1.0
    best, best_nll = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.25), np.log(20.0), 201)):
        p = _softmax(logits / t)[np.arange(len(labels)), labels]
        nll = float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))
        if nll < best_nll:
            best, best_nll = float(t), nll
    return best


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error (equal-width confidence bins)."""
    if len(labels) == 0:
        return 0.0
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(float(np.mean(pred[m] == labels[m])) - float(conf[m].mean()))
    return float(total)


def loso(cfg: dict[str, Any], heads: Sequence[str], samples: SampleSet, epochs: int, seed: int,
         device: str) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Out-of-fold logits: each group is scored by a network trained without it.

    Returns the logits per head ``(N, K)``, a mask of the scored samples and the held-out groups.
    """
    wanted = set(cfg.get("validation", {}).get("skip_groups", []))
    groups = [g for g in dict.fromkeys(samples.groups.tolist())
              if g not in wanted and any((samples.labels[h][samples.groups == g] >= 0).any() for h in heads)]
    oof = {h: np.zeros((len(samples.groups), len(CLASSES[h])), np.float32) for h in heads}
    scored = np.zeros(len(samples.groups), bool)
    for k, g in enumerate(groups):
        held = samples.groups == g
        net = fit(cfg, heads, samples.subset(np.nonzero(~held)[0]), epochs, seed + k, device,
                  val=samples.subset(np.nonzero(held)[0]), desc=f"LOSO {k + 1}/{len(groups)} hold-out {g}")
        logits = predict_logits(net, samples.subset(np.nonzero(held)[0]), device)
        for h in heads:
            oof[h][held] = logits[h]
        scored |= held
        log.info("loso fold", held_out=g, **{h: round(float(np.mean(
            logits[h].argmax(1)[samples.labels[h][held] >= 0] == samples.labels[h][held][samples.labels[h][held] >= 0]))
            if (samples.labels[h][held] >= 0).any() else float("nan"), 3) for h in heads})
    return oof, scored, groups


def _binary_spine(h: str, pred: np.ndarray, lab: np.ndarray, ok: np.ndarray, real: np.ndarray) -> dict[str, Any]:
    """Anatomy only: accuracy of the routing-relevant decision spine vs not spine."""
    if h != "anatomy":
        return {}
    sp = CLASSES[h].index("spine")
    hit = (pred == sp) == (lab == sp)
    return {"spine_vs_rest_accuracy": round(float(np.mean(hit[ok])), 4) if ok.any() else None,
            "spine_vs_rest_accuracy_real": round(float(np.mean(hit[ok & real])), 4) if (ok & real).any() else None}


def head_metrics(h: str, logits: np.ndarray, s: SampleSet, scored: np.ndarray, temp: float,
                 abstain: float) -> dict[str, Any]:
    """LOSO metrics of one head (accuracy overall / real / stored volumes, per class, per group, ECE)."""
    lab = s.labels[h]
    ok = scored & (lab >= 0)
    probs = _softmax(logits / temp)
    pred = probs.argmax(1)

    def acc(m: np.ndarray) -> float | None:
        return round(float(np.mean(pred[m] == lab[m])), 4) if m.any() else None

    conf = probs.max(1)
    kept = ok & (conf >= abstain)
    has_hdr = s.features[:, FEATURE_NAMES.index("has_te")] > 0
    return {
        "accuracy": acc(ok), "n": int(ok.sum()),
        "accuracy_real": acc(ok & s.real), "n_real": int((ok & s.real).sum()),
        "accuracy_stored_volumes": acc(ok & s.stored), "n_stored_volumes": int((ok & s.stored).sum()),
        "accuracy_synthetic": acc(ok & ~s.real), "n_synthetic": int((ok & ~s.real).sum()),
        "accuracy_real_with_header": acc(ok & s.real & has_hdr), "n_real_with_header": int((ok & s.real & has_hdr).sum()),
        "accuracy_real_without_header": acc(ok & s.real & ~has_hdr),
        **_binary_spine(h, pred, lab, ok, s.real),
        "per_class_recall": {c: acc(ok & (lab == i)) for i, c in enumerate(CLASSES[h]) if (ok & (lab == i)).any()},
        "per_group": {g: acc(ok & (s.groups == g)) for g in dict.fromkeys(s.groups[ok].tolist())},
        "ece_uncalibrated": round(ece(_softmax(logits[ok]), lab[ok]), 4),
        "ece_calibrated": round(ece(probs[ok], lab[ok]), 4), "temperature": round(temp, 4),
        "abstain_below": abstain, "coverage": round(float(kept.sum() / max(1, ok.sum())), 4),
        "accuracy_when_not_abstaining": acc(kept),
        "stored_volume_errors": [{"group": str(s.groups[i]), "true": CLASSES[h][lab[i]], "pred": CLASSES[h][pred[i]],
                                  "p": round(float(conf[i]), 3)} for i in np.nonzero(ok & s.stored & (pred != lab))[0]],
    }


# -- the command --------------------------------------------------------------------------------



def _labels(heads: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for h in heads:
        for i, c in enumerate(CLASSES[h]):
            code, scheme, meaning = CODES[c]
            out.append({"head": h, "value": i, "name": c, "code": {"code": code, "scheme": scheme, "meaning": meaning}})
    return out


def train_classifier(model: str, config: Path | None, data: Path | None, out: Path | None, epochs: int | None,
                     seed: int, device: str) -> Path:
    """Train ``anatomy``, ``region_view`` or ``sequence``: LOSO validation, calibration, final model, artefact.

    Returns the artefact folder (default ``models/MODEL/VERSION``).
    """
    import torch

    from sci_node.artifact import write_artifact

    if model not in MODEL_HEADS:
        raise ConfigError(f"unknown classifier {model!r} (expected one of {', '.join(MODEL_HEADS)})")
    cfg = load_cls_config(model, config)
    heads = MODEL_HEADS[model]
    data = Path(data) if data else (REPO.parent / "shared" / "data" / "spine")
    if not data.is_dir():
        raise DataError(f"data folder {str(data)!r} does not exist")
    epochs = int(epochs if epochs is not None else cfg["train"].get("epochs", 30))
    torch.set_num_threads(int(cfg["train"].get("threads", 2)))
    t0 = time.time()
    samples = build_samples(cfg, data, seed)
    log.info("classifier samples", model=model, n=len(samples.groups), groups=sorted(set(samples.groups.tolist())))
    abstain = float(cfg.get("calibration", {}).get("abstain_below", 0.5))
    metrics: dict[str, Any] = {"validation": "leave-one-subject-out (groups = persons; PAM50 real+synthetic = one group)"}
    temps = {h: 1.0 for h in heads}
    groups: list[str] = []
    if cfg.get("validation", {}).get("loso", True):
        oof, scored, groups = loso(cfg, heads, samples, epochs, seed, device)
        for h in heads:
            ok = scored & (samples.labels[h] >= 0)
            temps[h] = fit_temperature(oof[h][ok], samples.labels[h][ok])
            metrics[h] = head_metrics(h, oof[h], samples, scored, temps[h], abstain)
    net = fit(cfg, heads, samples, epochs, seed, device, desc=f"final {model}")
    out = Path(out) if out else REPO / "models" / model / cfg["model"]["version"]
    card = _card(cfg, model, heads, metrics, temps, abstain, samples, groups, seed, epochs, device,
                 config is not None)
    card["training"]["wall_seconds"] = round(time.time() - t0, 1)
    write_artifact(out, net.state_dict(), card)
    log.info("classifier artefact written", model=model, path=str(out), seconds=round(time.time() - t0, 1))
    return out


def _card(cfg: dict[str, Any], model: str, heads: Sequence[str], metrics: dict[str, Any], temps: dict[str, float],
          abstain: float, samples: SampleSet, groups: list[str], seed: int, epochs: int, device: str,
          custom_config: bool) -> dict[str, Any]:
    """The model card of a trained classifier (see :mod:`sci_node.artifact` and :mod:`sci_node.predict_cls`)."""
    return {
        "name": model, "version": cfg["model"]["version"], "kind": "classifier",
        "description": cfg["model"].get("description", ""),
        "architecture": {"class": "sci_node.nets.SeriesNet", "args": _net_args(cfg, heads)},
        "preprocessing": {"id": PREPROCESSING_ID, "module": "sci_node.cls_features", "thumb_size": THUMB_SIZE,
                          "n_features": N_FEATURES, "feature_names": list(FEATURE_NAMES),
                          "orientation": "LPS-aligned isotropic grid over the bounding box",
                          "normalisation": "percentile 1-99 -> [0, 1.5]"},
        "heads": {h: list(CLASSES[h]) for h in heads}, "labels": _labels(heads),
        "calibration": {"method": "temperature scaling on LOSO out-of-fold logits", "temperature": temps,
                        "abstain_below": abstain},
        "metrics": metrics, "data_hash": samples.meta["data_hash"],
        "training": {"config": {k: v for k, v in cfg.items() if not k.startswith("_")}, "config_file": cfg["_path"],
                     "command": f"sci-node train {model} --seed {seed} --epochs {epochs}"
                                + (f" --train-config {cfg['_path']}" if custom_config else ""),
                     "seed": seed, "epochs": epochs, "device": device, "n_samples": int(len(samples.groups)),
                     "splits": {"scheme": "LOSO", "held_out_groups": groups,
                                "group_sizes": {g: int(np.sum(samples.groups == g))
                                                for g in dict.fromkeys(samples.groups.tolist())}}},
        "trainer_version": TRAINER_VERSION, "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
