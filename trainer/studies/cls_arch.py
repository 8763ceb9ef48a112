"""torchvision backbones (from scratch, no downloaded weights) in the SeriesNet interface, for comparison.

``TorchvisionSeriesNet`` takes the same inputs as :class:`sci_node.nets.SeriesNet` (thumbnails
``(B, 3, S, S)`` + feature vector ``(B, F)``, standardised by buffers) and has the same heads and
optional header expert, with a torchvision image encoder (``resnet18``, ``mobilenet_v3_small``,
``efficientnet_b0``) in place of SeriesNet's three conv blocks. Used by the trainer through
``[network] class = "trainer.studies.cls_arch.TorchvisionSeriesNet"``; it is not an allowed
architecture of the node's registry (the comparison in docs/classifiers.md decided which
architecture ships). torchvision is imported lazily and is an optional extra
(``pip install .[arch-compare]``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from sci_node.nets.series_net import SeriesNet

__all__ = ["TorchvisionSeriesNet", "BACKBONES"]

BACKBONES = ("resnet18", "mobilenet_v3_small", "efficientnet_b0")


def _encoder(name: str) -> tuple[nn.Module, int]:
    """``(module, n_out)``: a randomly initialised torchvision classifier with its last layer removed."""
    import torchvision  # type: ignore[import-untyped]

    if name not in BACKBONES:
        raise ValueError(f"backbone {name!r} is not one of {BACKBONES}")
    net = getattr(torchvision.models, name)(weights=None)
    if name == "resnet18":
        n_out = net.fc.in_features
        net.fc = nn.Identity()
    else:
        last = net.classifier[0] if name == "mobilenet_v3_small" else net.classifier[1]
        n_out = last.in_features
        net.classifier = nn.Identity()
    return net, int(n_out)


class TorchvisionSeriesNet(SeriesNet):
    """A torchvision image encoder + the SeriesNet feature fusion and heads.

    Parameters
    ----------
    backbone : str
        One of :data:`BACKBONES`, randomly initialised.
    in_channels : int
        Must be 3 (torchvision stems take RGB-like input: the three orthogonal slabs).
    image_size, n_features, heads, hidden, dropout, n_header_features
        As :class:`sci_node.nets.SeriesNet`.
    """

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, *, backbone: str = "resnet18", in_channels: int = 3, image_size: int = 32,
                 n_features: int = 0, heads: Mapping[str, int], hidden: int = 64, dropout: float = 0.2,
                 n_header_features: int = 0) -> None:
        nn.Module.__init__(self)  # SeriesNet's own encoder is not built; fusion, heads and forward are shared
        if in_channels != 3:
            raise ValueError(f"in_channels must be 3 for a torchvision backbone, got {in_channels}")
        if image_size < 32 or not heads or any(int(n) < 2 for n in heads.values()):
            raise ValueError(f"bad image_size={image_size} or heads={dict(heads)}")
        if not 0 <= n_header_features <= n_features or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"bad n_header_features={n_header_features}, hidden={hidden} or dropout={dropout}")
        self.n_header = int(n_header_features)
        self.encoder, n_img = _encoder(backbone)
        self._fusion(n_img, n_features, hidden, dropout, heads)


def compare(model: str, backbones: list[str], folds: list[int], epochs: int, seed: int,
            data: Path | None = None) -> list[dict[str, object]]:
    """Train each architecture on the same subject-grouped folds of ``model``'s config; score held-out samples.

    ``backbones``: ``"seriesnet"`` (the config's own network) and/or :data:`BACKBONES`. Returns one
    row per (architecture, fold) with accuracy on held-out real crops and stored real series,
    training seconds and the milliseconds per series of a forward pass.
    """
    import time

    import numpy as np

    from trainer.classify import train as C
    from trainer.classify.metrics import real_series_masks

    cfg = C.load_cls_config(model, None)
    heads = C.MODEL_HEADS[model]
    torch.set_num_threads(1)
    samples = C.model_samples(cfg, C.build_samples(cfg, Path(data) if data else C.REPO.parent / "shared" / "data"
                                                   / "spine", seed))
    skip = set(cfg.get("validation", {}).get("skip_groups", []))
    names = [g for g in dict.fromkeys(samples.groups.tolist()) if g not in skip]
    all_folds = C.assign_folds(names, {g: int(np.sum(samples.groups == g)) for g in names},
                               int(cfg["validation"].get("k", 5)))
    rows: list[dict[str, object]] = []
    for arch in backbones:
        acfg = dict(cfg, network=dict(cfg["network"]))
        if arch != "seriesnet":
            acfg["network"]["class"] = "trainer.studies.cls_arch.TorchvisionSeriesNet"
            acfg["network"]["args"] = {"backbone": arch, "hidden": 64, "dropout": 0.2}
        for k in folds:
            held = np.isin(samples.groups, all_folds[k])
            t0 = time.time()
            net = C.fit(acfg, heads, samples.subset(np.nonzero(~held)[0]), epochs, seed + k, "cpu",
                        desc=f"{arch} fold {k}")
            secs = time.time() - t0
            test = samples.subset(np.nonzero(held)[0])
            logits = C.predict_logits(net, test, "cpu")
            t1 = time.time()
            C.predict_logits(net, test.subset(np.arange(min(64, len(test.groups)))), "cpu")
            ms = 1000 * (time.time() - t1) / min(64, len(test.groups))
            masks = real_series_masks(test)
            for h in heads:
                lab, pred = test.labels[h], logits[h].argmax(1)
                row: dict[str, object] = {"arch": arch, "fold": k, "head": h, "train_s": round(secs, 1),
                                          "ms_per_series": round(ms, 2)}
                for name, m in (("real_crops", test.real), ("series_with_header", masks["with_header"]),
                                ("series_header_removed", masks["header_removed"])):
                    ok = m & (lab >= 0)
                    row[name] = round(float(np.mean(pred[ok] == lab[ok])), 4) if ok.any() else None
                    row[f"n_{name}"] = int(ok.sum())
                rows.append(row)
    return rows


if __name__ == "__main__":
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m trainer.cls_arch",
                                 description="compare SeriesNet with torchvision backbones on the same folds")
    ap.add_argument("--model", default="anatomy")
    ap.add_argument("--arch", nargs="+", default=["seriesnet", "mobilenet_v3_small"])
    ap.add_argument("--folds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for r in compare(a.model, a.arch, a.folds, a.epochs, a.seed):
        sys.stdout.write(json.dumps(r) + "\n")
