"""``SeriesNet``: a tiny 2-D CNN over three orthogonal thumbnails plus a feature MLP, several heads."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

__all__ = ["SeriesNet"]


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(1, c_out), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class SeriesNet(nn.Module):
    """Classify a series from its thumbnails ``(B, C, S, S)`` and feature vector ``(B, F)``.

    The features are standardised inside the network with the buffers ``feature_mean`` /
    ``feature_std`` (set by the trainer, saved in the ``state_dict``), so the artefact
    alone reproduces the preprocessing.

    Parameters
    ----------
    in_channels : int
        Thumbnail channels ``C`` (3: axial, coronal, sagittal slabs).
    image_size : int
        Thumbnail edge ``S``; must be divisible by ``2 ** len(channels)``.
    n_features : int
        Length ``F`` of the feature vector (0: image only).
    heads : Mapping[str, int]
        Head name -> number of classes (each >= 2).
    channels : Sequence[int]
        Output channels of the conv blocks (each halves the resolution).
    hidden : int
        Width of the fused hidden layer.
    dropout : float
        Dropout before the heads, in ``[0, 1)``.
    n_header_features : int
        The last ``n_header_features`` of the feature vector (DICOM header evidence) feed a
        separate small MLP whose logits are **added** to those of the image branch (a product
        of experts: header and image evidence each contribute, neither hides the other).
        0 = all features go to the image branch.
    """

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, *, in_channels: int = 3, image_size: int = 32, n_features: int = 0,
                 heads: Mapping[str, int], channels: Sequence[int] = (8, 16, 32), hidden: int = 64,
                 dropout: float = 0.2, n_header_features: int = 0) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be positive, got {list(channels)}")
        if image_size < 2 ** len(channels) or image_size % (2 ** len(channels)):
            raise ValueError(f"image_size {image_size} is not divisible by 2**{len(channels)}")
        if n_features < 0 or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"bad n_features={n_features}, hidden={hidden} or dropout={dropout}")
        if not heads or any(int(n) < 2 for n in heads.values()):
            raise ValueError(f"heads must map names to >= 2 classes, got {dict(heads)}")
        if not 0 <= n_header_features <= n_features:
            raise ValueError(f"n_header_features {n_header_features} must be in [0, n_features={n_features}]")
        self.n_header = int(n_header_features)
        chans = [in_channels, *[int(c) for c in channels]]
        self.encoder = nn.Sequential(*[_conv_block(a, b) for a, b in zip(chans[:-1], chans[1:])],
                                     nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self._fusion(chans[-1] * 4, n_features, hidden, dropout, heads)

    def _fusion(self, n_img: int, n_features: int, hidden: int, dropout: float, heads: Mapping[str, int]) -> None:
        """The feature standardisation buffers, the fusion layer of ``n_img`` image features with
        the non-header features, the heads and (with ``self.n_header``) the header expert."""
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.fuse = nn.Sequential(nn.Linear(n_img + n_features - self.n_header, hidden),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, int(n)) for name, n in heads.items()})
        if self.n_header:
            self.header = nn.Sequential(nn.Linear(self.n_header, 32), nn.ReLU(inplace=True))
            self.header_heads = nn.ModuleDict({name: nn.Linear(32, int(n)) for name, n in heads.items()})

    def forward(self, thumbs: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head, each ``(B, n_classes)``."""
        feats = (features - self.feature_mean) / self.feature_std
        split = feats.shape[1] - self.n_header
        z = self.fuse(torch.cat([self.encoder(thumbs), feats[:, :split]], dim=1))
        if not self.n_header:
            return {name: head(z) for name, head in self.heads.items()}
        zh = self.header(feats[:, split:])
        return {name: head(z) + self.header_heads[name](zh) for name, head in self.heads.items()}
