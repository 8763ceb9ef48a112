"""``LogitMeanEnsemble``: several networks of one architecture, their logits averaged.

Networks trained with different seeds make different mistakes (a false lesion of one is a
low-confidence blur in another); the mean of their logits is the same operation as the
left-right mirror average of :func:`sci_node.models.predict_seg.infer_volume`, so a card's threshold
means the same thing whether one network or several answer. The ``state_dict`` is the members'
own, prefixed ``members.<i>.``, and loads with ``torch.load(weights_only=True)`` as any other.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["LogitMeanEnsemble", "MEMBER_PREFIXES"]

#: Member classes an ensemble card may name (the same allow-list idea as the artefact's).
MEMBER_PREFIXES = ("monai.networks.nets.",)


def _member_class(path: str) -> type[nn.Module]:
    if not path.startswith(MEMBER_PREFIXES):
        raise ValueError(f"ensemble member class {path!r} is not allowed (allowed: {', '.join(MEMBER_PREFIXES)})")
    module_name, _, cls_name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), cls_name)


class LogitMeanEnsemble(nn.Module):
    """Mean of the outputs (logits) of ``members`` networks of class ``member_class``.

    Parameters
    ----------
    member_class : str
        Dotted name of the members' class, e.g. ``"monai.networks.nets.UNet"`` (allow-listed).
    member_args : Mapping[str, Any]
        Keyword arguments of every member (one architecture).
    members : int
        Number of members, ``>= 1``.

    The input and output shapes are the members' (``(B, C, Y, X)`` for a 2-D U-Net); the output
    is the element-wise mean of the members' outputs, same dtype.
    """

    def __init__(self, member_class: str, member_args: Mapping[str, Any], members: int) -> None:
        super().__init__()
        if int(members) < 1:
            raise ValueError(f"an ensemble needs at least one member, got members={members!r}")
        cls = _member_class(str(member_class))
        self.members = nn.ModuleList(cls(**dict(member_args)) for _ in range(int(members)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of ``member(x)`` over the members."""
        return _mean_of(self.members, x)

    def first_and_rest(self) -> tuple[nn.Module, nn.Module]:
        """``(first member, the mean of the other members)``, for a cascade that runs the others
        only where the first is unsure (:func:`sci_node.models.predict_seg.infer_volume`). The full mean
        is ``(first(x) + (n - 1) * rest(x)) / n`` with ``n = len(self.members) >= 2``."""
        if len(self.members) < 2:
            raise ValueError(f"a cascade needs at least two members, this ensemble has {len(self.members)}")
        return self.members[0], _MemberMean(list(self.members[1:]))


class _MemberMean(nn.Module):
    """Mean of the outputs of ``members`` (shared modules, not copies)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mean_of(self.members, x)


def _mean_of(members: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    out = members[0](x)
    for member in members[1:]:
        out = out + member(x)
    return out / len(members)
