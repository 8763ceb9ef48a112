"""Routing classifier wrapper: artefact + shared preprocessing -> calibrated probabilities.

>>> clf = Classifier.from_artifact(Path("models/anatomy/0.1.0"))
>>> clf.predict(image, HeaderEvidence())          # doctest: +SKIP
{'anatomy': {'spine': 0.97, 'brain': 0.02, 'abdomen': 0.005, 'other': 0.005}}

The card of a classifier artefact carries, besides the common keys of
:mod:`sci_node.models.artifact`: ``heads`` (head -> ordered class names, the order of the
network's logits), ``calibration`` (``temperature`` per head, fitted on the
cross-validation predictions; ``abstain_below``: the probability under which the
classifier abstains; optionally ``header_rules``: the MR-physics rules of
:mod:`sci_node.routing.header_rules` for one head, with the ``confidence`` given to their class) and
``preprocessing.id`` (one of :data:`sci_node.routing.cls_features.PREPROCESSING_IDS`: the card gets
the feature version it was trained on).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from sci_node.errors import ModelError
from sci_node.models.artifact import load_network
from sci_node.routing.cls_features import N_FEATURES, N_HEADER_FEATURES, PREPROCESSING_IDS, series_inputs
from sci_node.routing.evidence import HeaderEvidence
from sci_node.routing.header_rules import RULES_ID, HeaderRule, sequence_from_header

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch

__all__ = ["Classifier", "Decision", "check_classifier_card", "decided_by_header_rule", "explaining"]


@dataclass(frozen=True)
class Decision:
    """The winning class of one head, or ``None`` when the classifier abstains."""

    label: str | None
    probability: float
    probs: dict[str, float]


def check_classifier_card(card: Mapping[str, Any], where: str) -> None:
    """Raise :class:`ModelError` when a card is not a usable routing-classifier card."""
    if card.get("kind") != "classifier":
        raise ModelError(f"{where}: kind {card.get('kind')!r} is not 'classifier'")
    prep = card.get("preprocessing") or {}
    if prep.get("id") not in PREPROCESSING_IDS:
        raise ModelError(f"{where}: preprocessing id {prep.get('id')!r} is not one of {PREPROCESSING_IDS!r} "
                         "(trained for another version of sci_node.routing.cls_features)")
    if int(prep.get("n_features", -1)) != N_FEATURES:
        raise ModelError(f"{where}: n_features {prep.get('n_features')!r} != {N_FEATURES}")
    heads = card.get("heads")
    if not isinstance(heads, dict) or not heads or not all(isinstance(v, list) and len(v) >= 2
                                                           for v in heads.values()):
        raise ModelError(f"{where}: heads {heads!r} must map head names to >= 2 class names")
    args = card["architecture"].get("args", {})
    # an ensemble (sci_node.nets.ProbMeanSeriesNet) names its heads in its members' arguments
    args_heads = args.get("heads", (args.get("member_args") or {}).get("heads", {}))
    if {k: len(v) for k, v in heads.items()} != dict(args_heads):
        raise ModelError(f"{where}: heads {heads!r} do not match the network heads {args_heads!r}")
    rules = (card.get("calibration") or {}).get("header_rules")
    if rules is not None:
        if not isinstance(rules, dict) or rules.get("id") != RULES_ID or rules.get("head") not in heads:
            raise ModelError(f"{where}: header_rules {rules!r} must name the rules {RULES_ID!r} and one of the heads")
        if not 0.0 < float(rules.get("confidence", 0)) < 1.0:
            raise ModelError(f"{where}: header_rules confidence {rules.get('confidence')!r} must be in (0, 1)")


class Classifier:
    """A loaded routing classifier (``anatomy``, ``region_view`` or ``sequence``).

    Attributes
    ----------
    name, version : str
    card : dict
    heads : dict[str, list[str]]
        Head name -> class names in logit order.
    temperature : dict[str, float]
    abstain_below : float
    """

    def __init__(self, net: "torch.nn.Module", card: dict[str, Any], device: str = "cpu") -> None:
        self.net = net
        self.card = card
        self.device = device
        self.name: str = str(card["name"])
        self.version: str = str(card["version"])
        self.heads: dict[str, list[str]] = {k: list(v) for k, v in card["heads"].items()}
        calib = card.get("calibration") or {}
        self.temperature: dict[str, float] = {h: float(calib.get("temperature", {}).get(h, 1.0)) for h in self.heads}
        self.abstain_below: float = float(calib.get("abstain_below", 0.5))
        rules = calib.get("header_rules")
        self.rules_head: str | None = str(rules["head"]) if rules else None
        self.rules_confidence: float = float(rules["confidence"]) if rules else 0.0
        self.thumb_size: int = int(card["preprocessing"].get("thumb_size", 32))
        self.prep_id: str = str(card["preprocessing"]["id"])
        # false: the network was trained without the header part of the feature vector (anatomy, region)
        self.header_features: bool = bool(card["preprocessing"].get("header_features", True))

    @classmethod
    def from_artifact(cls, art_dir: Path, device: str = "cpu") -> "Classifier":
        """Verify and load an artefact folder (checksum, card, ``weights_only`` weights)."""
        from sci_node.models.artifact import read_card

        check_classifier_card(read_card(Path(art_dir)), str(art_dir))
        net, card = load_network(Path(art_dir), device=device)
        return cls(net, card, device=device)

    def predict_arrays(self, thumbs: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
        """Calibrated probabilities for a batch: ``thumbs (B, C, S, S)``, ``features (B, F)`` -> head -> ``(B, K)``."""
        import torch

        if not self.header_features:
            features = np.array(features, dtype=np.float32, copy=True)
            features[:, N_FEATURES - N_HEADER_FEATURES:] = 0.0
        with torch.inference_mode():
            logits = self.net(torch.as_tensor(thumbs, dtype=torch.float32, device=self.device),
                              torch.as_tensor(features, dtype=torch.float32, device=self.device))
            return {h: torch.softmax(logits[h] / self.temperature[h], dim=1).cpu().numpy() for h in self.heads}

    def predict(self, image: "sitk.Image", evidence: HeaderEvidence | None = None) -> dict[str, dict[str, float]]:
        """Head -> class -> calibrated probability for one series.

        Parameters
        ----------
        image : SimpleITK.Image
            The series in patient LPS (any orientation; 2-D/3-D/4-D).
        evidence : HeaderEvidence | None
            Header evidence; free-text fields are ignored.
        """
        return self.predict_explained(image, evidence)[0]

    def predict_explained(self, image: "sitk.Image", evidence: HeaderEvidence | None = None
                          ) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
        """:meth:`predict` plus, per head, which evidence decided it.

        A head with header rules (``calibration.header_rules`` in the card) takes the rule's class
        when a rule fires (:func:`sci_node.routing.header_rules.sequence_from_header`): that class gets the
        card's rule ``confidence`` and the others share the rest. Otherwise the network decides.

        Returns
        -------
        probs : dict
            Head -> class -> probability (as :meth:`predict`).
        how : dict
            Head -> ``"header rule <name>: <detail>"`` or ``"network (header rule <name>: <detail>)"``
            or ``"network"``.
        """
        thumbs, feats = series_inputs(image, evidence, size=self.thumb_size, prep_id=self.prep_id)
        probs = self.predict_arrays(thumbs[None], feats[None])
        out = {h: {c: float(p) for c, p in zip(self.heads[h], probs[h][0])} for h in self.heads}
        how = {h: "network" for h in self.heads}
        if self.rules_head is not None:
            rule = sequence_from_header(evidence)
            h = self.rules_head
            if rule.label is not None and rule.label in out[h]:
                out[h] = rule_probs(rule, self.heads[h], self.rules_confidence)
                how[h] = f"header rule {rule.rule}: {rule.detail}"
            else:
                how[h] = f"network (header rule {rule.rule}: {rule.detail})"
        return out, how

    def decide(self, probs: Mapping[str, float], min_confidence: float | None = None) -> Decision:
        """Most probable class of one head's probabilities, ``label=None`` (abstain) below the threshold."""
        thr = self.abstain_below if min_confidence is None else float(min_confidence)
        label, p = max(probs.items(), key=lambda kv: kv[1])
        return Decision(label if p >= thr else None, float(p), dict(probs))


def explaining(get: Callable[[str], Classifier], image: "sitk.Image", evidence: HeaderEvidence | None,
               how: dict[str, str]) -> Callable[[str], dict[str, dict[str, float]]]:
    """A ``classify(model_name)`` for :func:`sci_node.routing.route` that runs ``get(model_name)``'s
    :meth:`Classifier.predict_explained` and records, per head, what decided it in ``how``."""
    def classify(name: str) -> dict[str, dict[str, float]]:
        probs, decided = get(name).predict_explained(image, evidence)
        how.update(decided)
        return probs
    return classify


def decided_by_header_rule(how: str) -> bool:
    """True when ``how`` (a :meth:`Classifier.predict_explained` entry) says a header rule decided the head."""
    return how.startswith("header rule ")


def rule_probs(rule: HeaderRule, classes: list[str], confidence: float) -> dict[str, float]:
    """Probabilities of a fired header rule: ``confidence`` on its class, the rest shared equally."""
    rest = (1.0 - confidence) / max(1, len(classes) - 1)
    return {c: (confidence if c == rule.label else rest) for c in classes}
