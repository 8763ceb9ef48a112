"""Training of the routing classifiers (anatomy, region_view, sequence).

Pipeline: catalogue sources (real volumes + nibabel/pydicom test images) and synthetic
samples -> :func:`sci_node.routing.cls_features.series_inputs` (the node's own preprocessing) ->
subject-grouped k-fold cross-validation over the person groups (never scoring a group a fold
trained on) -> temperature scaling per head on the out-of-fold logits -> final network
on all samples -> artefact (``weights.pt`` + ``card.json``) with the validation table.
The ``sequence`` model can carry the MR-physics header rules (:mod:`sci_node.routing.header_rules`).
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

from sci_node.errors import ConfigError, DataError
from sci_node.models.artifact import sha256_file as file_sha
from sci_node.routing.cls_features import (
    FEATURE_NAMES,
    N_FEATURES,
    N_HEADER_FEATURES,
    PREPROCESSING_ID,
    PREPROCESSING_IDS,
    THUMB_SIZE,
    n_channels,
    series_inputs,
)
from trainer import __version__ as TRAINER_VERSION
from trainer import git_commit, read_toml_config
from trainer.classify.data import (
    ANATOMY,
    DEFAULT_SOURCES,
    REGION,
    SEQUENCE,
    TASKS,
    VIEW,
    SampleSet,
    Source,
    real_samples,
    root_dir,
    source_file,
)
from trainer.classify.metrics import fit_temperature, head_metrics, header_present, rule_confidence

log = structlog.get_logger(__name__)
REPO = Path(__file__).resolve().parents[2]
CLASSES = {"anatomy": ANATOMY, "region": REGION, "view": VIEW, "sequence": SEQUENCE}
#: Bump when the sample generators change (invalidates sample caches).
SAMPLES_VERSION = 7
#: ``[data]`` keys of the extra non-spine scenes (:func:`_with_nonspine`): not part of the base samples' key.
EXTRA_DATA_KEYS = ("n_nonspine", "nonspine_seed")
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


def prep_of(cfg: dict[str, Any]) -> str:
    """The classifier feature version of a config: ``[data] prep`` (default :data:`PREPROCESSING_ID`)."""
    prep = str(cfg["data"].get("prep", PREPROCESSING_ID))
    if prep not in PREPROCESSING_IDS:
        raise ConfigError(f"training config {cfg.get('_path')!r}: data.prep {prep!r} is not one of {PREPROCESSING_IDS}")
    return prep


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
    prep = prep_of(cfg)
    sources = sources_of(cfg)
    files = [source_file(s, data) if s.path.endswith(".mosaic") else root_dir(s.root, data) / s.path
             for s in sources]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"classifier training source {str(missing[0])!r} does not exist")
    pam_dir = data / dcfg["pam50_dir"] if dcfg.get("n_pam50", 0) else None
    hashed = files + (sorted(pam_dir.glob("PAM50_*.nii.gz")) if pam_dir else [])
    digest = hashlib.sha256()
    for f in hashed:
        digest.update(f.name.encode() + file_sha(f).encode())
    # the extra non-spine scenes (``n_nonspine``) are generated and cached apart: the base samples, shared
    # with the models that do not use them, keep their key and content
    recipe = json.dumps({"data": {k: v for k, v in dcfg.items() if k not in ("cache", *EXTRA_DATA_KEYS)},
                         "seed": seed,
                         "generator": SAMPLES_VERSION,
                         "prep": prep, "sources": [s.__dict__ for s in sources]}, sort_keys=True)
    key = hashlib.sha256(digest.hexdigest().encode() + recipe.encode()).hexdigest()[:16]
    meta = {"data_hash": "sha256:" + digest.hexdigest(), "n_sources": len(sources), "samples_key": key}
    cache = Path(dcfg["cache"]).with_suffix(f".{key}.npz") if dcfg.get("cache") else None
    if cache is not None and cache.is_file():
        log.info("classifier samples from cache", path=str(cache))
        samples = SampleSet.load(cache, meta)
    else:
        samples = _generate(cfg, sources, data, pam_dir, seed)
        samples.meta = meta
        if cache is not None:
            samples.save(cache)
    return _with_nonspine(samples, dcfg, seed, key, prep)


def _with_nonspine(samples: SampleSet, dcfg: dict[str, Any], seed: int, base_key: str,
                   prep: str = PREPROCESSING_ID) -> SampleSet:
    """``samples`` followed by the extra synthetic non-spine exams of ``[data] n_nonspine`` (none by default).

    Parameters
    ----------
    samples
        The base sample set (real volumes, PAM50, scenes, phantoms), unchanged.
    dcfg
        The ``[data]`` table: ``n_nonspine`` maps a kind of :data:`trainer.classify.nonspine.KINDS` to a count,
        ``nonspine_seed`` (default 1) offsets their random stream from ``seed``.
    seed, base_key
        The run's seed and the base samples' cache key.
    prep
        The feature version (:func:`prep_of`).

    Returns
    -------
    SampleSet
        The base samples when ``n_nonspine`` is empty; else base + extras (group ``synth-scenes``, never
        held out), with ``meta["samples_key"]`` covering the extras' recipe and generator version.
    """
    from trainer.classify.nonspine import NONSPINE_VERSION

    counts = {k: int(v) for k, v in dict(dcfg.get("n_nonspine", {})).items() if int(v) > 0}
    if not counts:
        return samples
    recipe = json.dumps({"n_nonspine": counts, "nonspine_seed": int(dcfg.get("nonspine_seed", 1)), "seed": seed,
                         "generator": NONSPINE_VERSION, "prep": prep}, sort_keys=True)
    key = hashlib.sha256((base_key + recipe).encode()).hexdigest()[:16]
    cache = Path(dcfg["cache"]).with_suffix(f".nonspine-{key}.npz") if dcfg.get("cache") else None
    meta = {**samples.meta, "samples_key": key, "base_samples_key": base_key}
    if cache is not None and cache.is_file():
        log.info("non-spine samples from cache", path=str(cache))
        extra = SampleSet.load(cache, meta)
    else:
        extra = _generate_nonspine(counts, np.random.default_rng([seed, int(dcfg.get("nonspine_seed", 1))]), prep)
        if cache is not None:
            extra.save(cache)
    return SampleSet.concat(samples, extra, meta)


def _generate_nonspine(counts: dict[str, int], rng: np.random.Generator, prep: str) -> SampleSet:
    """The extra non-spine exams, ``counts[kind]`` of each kind of :data:`trainer.classify.nonspine.KINDS`."""
    from tqdm import tqdm

    from trainer.classify.nonspine import KINDS

    unknown = sorted(set(counts) - set(KINDS))
    if unknown:
        raise ConfigError(f"data.n_nonspine: unknown kind(s) {unknown} (expected some of {sorted(KINDS)})")
    rows: list[tuple[np.ndarray, np.ndarray, dict[str, int], int]] = []
    for kind, n in counts.items():
        for _ in tqdm(range(n), desc=f"synthetic non-spine {kind}", unit="img", file=sys.stderr):
            img, hdr, lab = KINDS[kind](rng)
            t, f = series_inputs(img, hdr, prep_id=prep)
            rows.append((t, f, lab, _rule_index(hdr)))
    n_rows = len(rows)
    return SampleSet(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                     {k: np.asarray([r[2][k] for r in rows], np.int64) for k in TASKS},
                     np.asarray(["synth-scenes"] * n_rows), np.zeros(n_rows, bool), np.zeros(n_rows, np.int8),
                     np.asarray([r[3] for r in rows], np.int64))


def _generate(cfg: dict[str, Any], sources: Sequence[Source], data: Path, pam_dir: Path | None,
              seed: int) -> SampleSet:
    import SimpleITK as sitk
    from tqdm import tqdm

    from trainer.classify.scenes import scene_sample
    from trainer.classify.synth import load_pam50, pam50_sample, phantom_sample

    dcfg = cfg["data"]
    prep = prep_of(cfg)
    rng = np.random.default_rng(seed)
    levels = sitk.ReadImage(str(data / dcfg["levels"])) if dcfg.get("levels") else None
    rows: list[tuple[np.ndarray, np.ndarray, dict[str, int], str, bool, int, int]] = []
    for src in tqdm(sources, desc="real sources", unit="vol", file=sys.stderr):
        for img, hdr, lab, stored in real_samples(src, data, int(dcfg.get("n_aug", 10)), rng, levels):
            t, f = series_inputs(img, hdr, prep_id=prep)
            rows.append((t, f, lab, src.group, True, stored, _rule_index(hdr)))
    n_pam = int(dcfg.get("n_pam50", 0))
    if n_pam:
        pam = load_pam50(pam_dir)  # type: ignore[arg-type]
        for _ in tqdm(range(n_pam), desc="PAM50 synthetic", unit="img", file=sys.stderr):
            img, hdr, lab = pam50_sample(pam, rng)
            t, f = series_inputs(img, hdr, prep_id=prep)
            rows.append((t, f, lab, "PAM50", False, 0, _rule_index(hdr)))
    scenes = dict(dcfg.get("n_scenes", {}))
    for anatomy, n in scenes.items():
        if anatomy not in ANATOMY:
            raise ConfigError(f"data.n_scenes: unknown anatomy {anatomy!r}")
        for _ in tqdm(range(int(n)), desc=f"synthetic {anatomy} scenes", unit="img", file=sys.stderr):
            img, hdr, lab = scene_sample(rng, anatomy)
            t, f = series_inputs(img, hdr, prep_id=prep)
            rows.append((t, f, lab, "synth-scenes", False, 0, _rule_index(hdr)))
    for _ in range(int(dcfg.get("n_phantom", 0))):
        img, hdr, lab = phantom_sample(rng)
        t, f = series_inputs(img, hdr, prep_id=prep)
        rows.append((t, f, lab, "synth-phantom", False, 0, _rule_index(hdr)))
    if not rows:
        raise DataError("no classifier training samples (empty source catalogue)")
    return SampleSet(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                     {k: np.asarray([r[2][k] for r in rows], np.int64) for k in TASKS},
                     np.asarray([r[3] for r in rows]), np.asarray([r[4] for r in rows]),
                     np.asarray([r[5] for r in rows], np.int8), np.asarray([r[6] for r in rows], np.int64))


def _rule_index(hdr: Any) -> int:
    """Index in SEQUENCE of the physics rule's class for this header, -1 when no rule fires."""
    from sci_node.routing.header_rules import sequence_from_header

    label = sequence_from_header(hdr).label
    return SEQUENCE.index(label) if label else -1


# -- training ---------------------------------------------------------------------------------

DEFAULT_NET = "sci_node.nets.SeriesNet"
#: Network classes the trainer builds: the node's own nets, and the torchvision comparison nets.
NET_PREFIXES = ("sci_node.nets.", "trainer.studies.cls_arch.")


def _net_class(cfg: dict[str, Any]) -> Any:
    """The ``[network] class`` (default :data:`DEFAULT_NET`), imported."""
    import importlib

    path = str(cfg["network"].get("class", DEFAULT_NET))
    if not path.startswith(NET_PREFIXES) or "." not in path:
        raise ConfigError(f"network.class {path!r} must start with one of {NET_PREFIXES}")
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"network.class {path!r} cannot be imported: {exc}") from None


def _net_args(cfg: dict[str, Any], heads: Sequence[str]) -> dict[str, Any]:
    args = dict(cfg["network"].get("args", {}))
    if cfg["network"].get("header_expert", False):
        args["n_header_features"] = N_HEADER_FEATURES
    args.update(in_channels=n_channels(prep_of(cfg)), image_size=THUMB_SIZE, n_features=N_FEATURES,
                heads={h: len(CLASSES[h]) for h in heads})
    return args


def fit(cfg: dict[str, Any], heads: Sequence[str], train: SampleSet, epochs: int, seed: int, device: str,
        val: SampleSet | None = None, desc: str = "train") -> Any:
    """Train a fresh network (``[network] class``, default SeriesNet) on ``train``; progress bar with loss and
    held-out accuracy."""
    import torch
    from tqdm import tqdm

    tcfg = cfg["train"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = _net_class(cfg)(**_net_args(cfg, heads)).to(device)
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
    opt = torch.optim.AdamW(net.parameters(), lr=float(tcfg.get("lr", 3e-3)),
                            weight_decay=float(tcfg.get("weight_decay", 1e-4)))
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


# -- validation (subject-grouped k-fold) ------------------------------------------------------

def assign_folds(groups: Sequence[str], sizes: dict[str, int], k: int) -> list[list[str]]:
    """Split person groups into ``k`` folds of similar sample counts (largest group first, greedy).

    Deterministic: ties go to the lower fold index, groups of equal size in name order.
    """
    folds: list[list[str]] = [[] for _ in range(max(1, min(k, len(groups))))]
    load = [0] * len(folds)
    for g in sorted(groups, key=lambda g: (-sizes[g], g)):
        i = min(range(len(folds)), key=lambda j: (load[j], j))
        folds[i].append(g)
        load[i] += sizes[g]
    return folds


def group_kfold(cfg: dict[str, Any], heads: Sequence[str], samples: SampleSet, epochs: int, seed: int,
                device: str, work: Path | None) -> tuple[dict[str, np.ndarray], np.ndarray, list[list[str]]]:
    """Out-of-fold logits: each fold of person groups is scored by a network trained without it.

    ``[validation] k`` folds over the groups (``skip_groups``: never held out, e.g. templates and
    synthetic samples). With ``work``, each finished fold's logits are saved there and reused when
    the same run is started again (resumable).

    Returns the logits per head ``(N, K)``, a mask of the scored samples and the folds' groups.
    """
    vcfg = cfg.get("validation", {})
    skip = set(vcfg.get("skip_groups", []))
    names = [g for g in dict.fromkeys(samples.groups.tolist())
             if g not in skip and any((samples.labels[h][samples.groups == g] >= 0).any() for h in heads)]
    sizes = {g: int(np.sum(samples.groups == g)) for g in names}
    folds = assign_folds(names, sizes, int(vcfg.get("k", 5)))
    oof = {h: np.zeros((len(samples.groups), len(CLASSES[h])), np.float32) for h in heads}
    scored = np.zeros(len(samples.groups), bool)
    for k, fold in enumerate(folds):
        held = np.isin(samples.groups, fold)
        done = work / f"fold-{k}.npz" if work is not None else None
        if done is not None and done.is_file():
            z = np.load(done)
            logits = {h: z[h] for h in heads}
            log.info("cv fold reused", fold=k, path=str(done))
        else:
            net = fit(cfg, heads, samples.subset(np.nonzero(~held)[0]), epochs, seed + k, device,
                      val=samples.subset(np.nonzero(held)[0]), desc=f"fold {k + 1}/{len(folds)}")
            logits = predict_logits(net, samples.subset(np.nonzero(held)[0]), device)
            if done is not None:
                done.parent.mkdir(parents=True, exist_ok=True)
                np.savez(done, **logits)  # type: ignore[arg-type]
        for h in heads:
            oof[h][held] = logits[h]
        scored |= held
        log.info("cv fold", fold=k, held_out=fold, **{h: round(float(np.mean(
            logits[h].argmax(1)[samples.labels[h][held] >= 0] == samples.labels[h][held][samples.labels[h][held] >= 0]))
            if (samples.labels[h][held] >= 0).any() else float("nan"), 3) for h in heads})
    return oof, scored, folds


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
    """Train ``anatomy``, ``region_view`` or ``sequence``: grouped k-fold validation, calibration, final model,
    artefact.

    Returns the artefact folder (default ``models/MODEL/VERSION``).
    """
    import torch

    from sci_node.models.artifact import write_artifact

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
    samples = model_samples(cfg, build_samples(cfg, data, seed))
    log.info("classifier samples", model=model, n=len(samples.groups), groups=sorted(set(samples.groups.tolist())))
    abstain = float(cfg.get("calibration", {}).get("abstain_below", 0.5))
    vcfg = cfg.get("validation", {})
    metrics: dict[str, Any] = {"validation": f"subject-grouped {int(vcfg.get('k', 5))}-fold cross-validation "
                                             "(groups = persons; templates and synthetic samples never held out)"}
    temps = {h: 1.0 for h in heads}
    folds: list[list[str]] = []
    rules = _rules_of(cfg, samples)
    if vcfg.get("cv", vcfg.get("loso", True)):
        oof, scored, folds = group_kfold(cfg, heads, samples, epochs, seed, device, _work_dir(cfg, model, samples,
                                                                                                seed, epochs))
        for h in heads:
            ok = scored & (samples.labels[h] >= 0)
            temps[h] = fit_temperature(oof[h][ok], samples.labels[h][ok])
            metrics[h] = head_metrics(h, oof[h], samples, scored, temps[h], abstain, rules=h in rules)
    if rules:
        metrics["header_rules"] = rules
    net = fit(cfg, heads, samples, epochs, seed, device, desc=f"final {model}")
    out = Path(out) if out else REPO / "models" / model / cfg["model"]["version"]
    card = _card(cfg, model, heads, metrics, temps, abstain, samples, folds, seed, epochs, device,
                 config is not None)
    if rules:
        card["calibration"]["header_rules"] = rules["sequence"]
    card["training"]["wall_seconds"] = round(time.time() - t0, 1)
    write_artifact(out, net.state_dict(), card)
    log.info("classifier artefact written", model=model, path=str(out), seconds=round(time.time() - t0, 1))
    return out


def model_samples(cfg: dict[str, Any], samples: SampleSet) -> SampleSet:
    """``samples`` as the model of ``cfg`` sees them: without the header features when ``header_features = false``.

    Image + geometry only: the header's TE/TR/codes say nothing about anatomy or region (in this data they only
    correlate through a few protocols: EPI = the spine fMRI/DWI); the slice normal (geometry) stays.
    """
    if cfg["network"].get("header_features", True):
        return samples
    samples.header = header_present(samples)
    samples.features = samples.features.copy()
    samples.features[:, N_FEATURES - N_HEADER_FEATURES:] = 0.0
    return samples


def _rules_of(cfg: dict[str, Any], samples: SampleSet) -> dict[str, dict[str, Any]]:
    """``{"sequence": {...}}`` when the config turns the header rules on (``[network] header_rules``), else ``{}``."""
    from sci_node.routing.header_rules import RULES_ID

    if not cfg["network"].get("header_rules", False) or cfg["model"]["name"] != "sequence":
        return {}
    conf, hits, n = rule_confidence(samples)
    return {"sequence": {"id": RULES_ID, "head": "sequence", "confidence": round(conf, 4),
                         "fallback": "network with the header features" if cfg["network"].get(
                             "header_features", True) else "network on the image alone",
                         "measured_on": f"{hits}/{n} training samples whose header fired a rule agree with "
                                        "their label"}}


def _work_dir(cfg: dict[str, Any], model: str, samples: SampleSet, seed: int, epochs: int) -> Path | None:
    """Folder of this run's finished folds (resumable), next to the sample cache; ``None`` without a cache."""
    cache = cfg["data"].get("cache")
    if not cache:
        return None
    recipe = json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=True, default=str)
    # the sample key covers the data, the [data] recipe, the seed and the generator version
    key = hashlib.sha256((recipe + samples.meta["samples_key"] + f"{seed}/{epochs}").encode()).hexdigest()[:12]
    return Path(cache).parent / "cls-cv" / f"{model}-{key}"


def _card(cfg: dict[str, Any], model: str, heads: Sequence[str], metrics: dict[str, Any], temps: dict[str, float],
          abstain: float, samples: SampleSet, folds: list[list[str]], seed: int, epochs: int, device: str,
          custom_config: bool) -> dict[str, Any]:
    """The model card of a trained classifier (see :mod:`sci_node.models.artifact` and
    :mod:`sci_node.models.predict_cls`)."""
    return {
        "name": model, "version": cfg["model"]["version"], "kind": "classifier",
        "description": cfg["model"].get("description", ""),
        "architecture": {"class": cfg["network"].get("class", DEFAULT_NET), "args": _net_args(cfg, heads)},
        "preprocessing": {"id": prep_of(cfg), "module": "sci_node.routing.cls_features", "thumb_size": THUMB_SIZE,
                          "header_features": bool(cfg["network"].get("header_features", True)),
                          "n_features": N_FEATURES, "feature_names": list(FEATURE_NAMES),
                          "orientation": "LPS-aligned isotropic grid over the bounding box",
                          "normalisation": "percentile 1-99 -> [0, 1.5]"},
        "heads": {h: list(CLASSES[h]) for h in heads}, "labels": _labels(heads),
        "calibration": {"method": "temperature scaling on cross-validation out-of-fold logits", "temperature": temps,
                        "abstain_below": abstain},
        "metrics": metrics, "data_hash": samples.meta["data_hash"],
        "training": {"config": {k: v for k, v in cfg.items() if not k.startswith("_")}, "config_file": cfg["_path"],
                     "command": f"sci-node train {model} --seed {seed} --epochs {epochs}"
                                + (f" --train-config {cfg['_path']}" if custom_config else ""),
                     "seed": seed, "epochs": epochs, "device": device, "n_samples": int(len(samples.groups)),
                     "splits": {"scheme": "subject-grouped k-fold", "folds": folds,
                                "held_out_groups": [g for f in folds for g in f],
                                "group_sizes": {g: int(np.sum(samples.groups == g))
                                                for g in dict.fromkeys(samples.groups.tolist())}}},
        "trainer_version": TRAINER_VERSION, "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
