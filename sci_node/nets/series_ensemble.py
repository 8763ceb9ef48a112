"""``ProbMeanSeriesNet``: several calibrated :class:`SeriesNet` classifiers, their probabilities averaged.

The routing classifiers are calibrated by one temperature per head, fitted on each network's own
out-of-fold logits. Networks trained with different seeds (and their own random crops) are
calibrated separately, so their ensemble averages **calibrated probabilities**, not raw logits:
``p = mean_m softmax(logits_m / T_m)``. The output is ``log p`` per head, so a card that names this
class keeps temperature 1 and :class:`sci_node.models.predict_cls.Classifier`'s softmax returns ``p``
exactly. The members' temperatures are architecture arguments (in the card); the ``state_dict`` is
the members' own, prefixed ``members.<i>.``, and loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from sci_node.nets.series_net import SeriesNet

__all__ = ["ProbMeanSeriesNet"]


class ProbMeanSeriesNet(nn.Module):
    """Mean of the temperature-scaled probabilities of ``members`` :class:`SeriesNet` networks.

    Parameters
    ----------
    members : int
        Number of members, ``>= 1``.
    member_args : Mapping[str, Any]
        :class:`SeriesNet` keyword arguments, the same for every member.
    temperatures : Mapping[str, Sequence[float]]
        Head -> one temperature per member (each > 0), from the member's card.

    ``forward(thumbs (B, C, S, S), features (B, F))`` returns head -> ``(B, K)`` log-probabilities
    (natural log of the mean probability, floored at 1e-12).
    """

    def __init__(self, *, members: int, member_args: Mapping[str, Any],
                 temperatures: Mapping[str, Sequence[float]]) -> None:
        super().__init__()
        n = int(members)
        if n < 1:
            raise ValueError(f"an ensemble needs at least one member, got members={members!r}")
        heads = dict(member_args.get("heads", {}))
        if set(temperatures) != set(heads):
            raise ValueError(f"temperatures are given for heads {sorted(temperatures)}, "
                             f"the members have {sorted(heads)}")
        for head, temps in temperatures.items():
            if len(temps) != n or any(float(t) <= 0 for t in temps):
                raise ValueError(f"head {head!r}: need {n} positive temperatures, got {list(temps)}")
        self.temperatures = {h: [float(t) for t in ts] for h, ts in temperatures.items()}
        self.members = nn.ModuleList(SeriesNet(**dict(member_args)) for _ in range(n))

    def forward(self, thumbs: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Log of the mean calibrated probability per head, each ``(B, n_classes)``."""
        total: dict[str, torch.Tensor] = {}
        for i, member in enumerate(self.members):
            for head, logits in member(thumbs, features).items():
                p = torch.softmax(logits / self.temperatures[head][i], dim=1)
                total[head] = p if head not in total else total[head] + p
        return {h: torch.log((p / len(self.members)).clamp_min(1e-12)) for h, p in total.items()}
