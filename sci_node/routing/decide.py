"""Hierarchical routing: guards, then anatomy -> region & view -> sequence, with configurable rules.

Two guards run first, before any classifier (both only route out): a series with fewer than
``rules.min_slices`` slices along its thinnest axis is a localiser or a single slice, not a
volume to segment; and with ``rules.header_anatomy_veto`` a header that names a non-spine body
part and never the spine (:func:`sci_node.routing.anatomy_rules.anatomy_from_header`) routes the series
out with the header value as the reason. The header never routes a series in.
After the region/view classifier, a BodyPartExamined that is one spine region's defined term
(:func:`sci_node.routing.anatomy_rules.region_from_header`) decides the region head; the region gates nothing.

The classifiers run in that order and stop at the first decision that routes the series
out (a brain series never reaches the sequence classifier). A head whose top probability is
below ``rules.min_confidence`` abstains, which routes the series out. Every decision keeps
the head's probabilities and the rule that fired, for the job record and the log.

The sequence head decides two actions: the cord (any class of ``cord_sequences``; the cord
model is contrast-agnostic) and the lesions (a class of ``lesion_sequences``). With
``rules.sequence_by_action`` an unsure sequence head (top class below ``min_confidence``) does
not abstain when the cord classes together reach ``min_confidence`` (:func:`decide_by_action`):
an axial GRE at T2*w 0.31 / T2w 0.27 / T1w 0.23 / other 0.19 has its cord segmented, and no
lesions, since which sequence it is stays unsure.

After the cord is segmented, :func:`recheck_sequence` (``rules.sequence_contrast_check``) lets
the CSF/cord contrast around the cord (:mod:`sci_node.routing.contrast_rules`) correct a sequence the
image network decided: CSF darker than the cord is T1w, CSF several times brighter is T2w. It
never overrules a header rule, and it can take lesions away (a T1w) but never adds them.

Gating heads: ``anatomy``, ``view`` and ``sequence``. ``region`` (cervical / thoracic /
lumbar) is recorded but gates nothing (no rule uses it), so a low region confidence does not
route a series out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from sci_node.config import RoutingRules
from sci_node.routing.anatomy_rules import RULES_ID as ANATOMY_RULES_ID
from sci_node.routing.anatomy_rules import AnatomyRule, anatomy_from_header, region_from_header
from sci_node.routing.contrast_rules import RULES_ID as CONTRAST_RULES_ID
from sci_node.routing.contrast_rules import ContrastRule
from sci_node.routing.evidence import HeaderEvidence

#: Head -> classifier (model name) that predicts it, in the order they are asked.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("anatomy", ("anatomy",)),
    ("region_view", ("region", "view")),
    ("sequence", ("sequence",)),
)

Probs = Mapping[str, float]
#: Runs one classifier (model name) and returns head -> class -> probability.
ClassifyFn = Callable[[str], Mapping[str, Probs]]


@dataclass(frozen=True)
class HeadDecision:
    """The winning class of one head; ``label`` is None when the head abstained.

    ``decided_by`` is set when routing itself knows what decided the head (a header rule, or the
    network with the header rule's verdict noted); None leaves it to the caller (the classifier).
    """

    label: str | None
    probability: float
    probs: dict[str, float]
    decided_by: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form: label, probability, probs (rounded to 4 decimals), decided_by when set."""
        out: dict[str, Any] = {"label": self.label, "probability": round(self.probability, 4),
                               "probs": {k: round(v, 4) for k, v in self.probs.items()}}
        if self.decided_by is not None:
            out["decided_by"] = self.decided_by
        return out


@dataclass(frozen=True)
class RoutingDecision:
    """What to do with a series and why.

    Attributes
    ----------
    segment_cord, segment_lesions
        What the segmentation stage runs (both False when routed out).
    rule
        Human-readable rule that fired (also for routed-out series).
    reason
        Why the series was routed out; None when it is segmented.
    heads
        Head name -> :class:`HeadDecision`, for every head that was evaluated.
    """

    segment_cord: bool
    segment_lesions: bool
    rule: str
    reason: str | None
    heads: dict[str, HeadDecision] = field(default_factory=dict)

    @property
    def routed_out(self) -> bool:
        """True when nothing is segmented."""
        return not self.segment_cord

    def as_dict(self) -> dict[str, Any]:
        """``{"anatomy": {...}, "region": {...}, "view": {...}, "sequence": {...}, "rule": ..., ...}``."""
        out: dict[str, Any] = {h: d.as_dict() for h, d in self.heads.items()}
        out.update(rule=self.rule, reason=self.reason, segment_cord=self.segment_cord,
                   segment_lesions=self.segment_lesions)
        return out


def decide_head(probs: Probs, min_confidence: float) -> HeadDecision:
    """Most probable class, or an abstention (``label=None``) below ``min_confidence``."""
    if not probs:
        return HeadDecision(None, 0.0, {})
    label, p = max(probs.items(), key=lambda kv: kv[1])
    return HeadDecision(label if p >= min_confidence else None, float(p), {k: float(v) for k, v in probs.items()})


def decide_by_action(d: HeadDecision, rules: RoutingRules) -> HeadDecision | None:
    """An abstained sequence head decided for the cord alone, or None (it abstains).

    The cord model reads every class of ``rules.cord_sequences`` (it is trained on all of
    them), the lesion model only some. So when the top class is below ``rules.min_confidence``
    but the cord classes together reach it, the series is segmented for the cord and **not**
    for lesions: which sequence it is stays unsure, and the lesion model is not run on a series
    that may be a T1w. The label is the most probable cord class; ``probability`` the summed
    probability; ``decided_by`` names the classes and the sum.
    """
    if d.label is not None or not d.probs:
        return None
    members = {k: v for k, v in d.probs.items() if k in rules.cord_sequences}
    total = float(sum(members.values()))
    if not members or total < rules.min_confidence:
        return None
    label = max(members.items(), key=lambda kv: kv[1])[0]
    why = (f"network, cord by action: p({' + '.join(sorted(members))}) = {total:.2f} >= min_confidence "
           f"{rules.min_confidence:g}; top {label!r} p={d.probs[label]:.2f} < it, so no lesions")
    return HeadDecision(label, total, d.probs, why)


def _out(heads: dict[str, HeadDecision], rule: str, reason: str) -> RoutingDecision:
    return RoutingDecision(False, False, rule, reason, heads)


def _abstained(head: str, d: HeadDecision, rules: RoutingRules) -> RoutingDecision | None:
    if d.label is not None:
        return None
    top = max(d.probs.items(), key=lambda kv: kv[1])[0] if d.probs else "?"
    return RoutingDecision(False, False, f"abstain: {head} confidence < min_confidence {rules.min_confidence:g}",
                           f"{head} classifier abstained (top {top!r} p={d.probability:.2f} "
                           f"< min_confidence {rules.min_confidence:g})")


def slice_count(size: Sequence[int]) -> int:
    """Slices of a series: its voxel count along the thinnest of the first three axes (1 for 2-D)."""
    spatial = [int(n) for n in tuple(size)[:3]]
    return min(spatial) if len(spatial) == 3 else 1


def route(classify: ClassifyFn, rules: RoutingRules, evidence: HeaderEvidence | None = None,
          n_slices: int | None = None) -> RoutingDecision:
    """Run the guards and the classifier hierarchy through ``classify`` and apply ``rules``.

    Parameters
    ----------
    classify
        ``classify(model_name)`` -> head -> class -> probability; called for ``anatomy``,
        then ``region_view``, then ``sequence``, stopping at the first routing-out decision.
    rules
        Which views and sequences are segmented, lesion sequences, ``min_confidence``,
        ``min_slices``, ``header_anatomy_veto``.
    evidence
        The series' header evidence for the anatomy veto; None = no header (no veto).
    n_slices
        :func:`slice_count` of the image for the localiser guard; None = not known (no guard).
    """
    header = anatomy_from_header(evidence) if evidence is not None and rules.header_anatomy_veto else None
    guarded = _guards(rules, header, n_slices)
    if guarded is not None:
        return guarded
    heads: dict[str, HeadDecision] = {}
    lesions_ok = True
    for model, head_names in STAGES:
        out = classify(model)
        for h in head_names:
            heads[h] = decide_head(out.get(h, {}), rules.min_confidence)
        if model == "sequence" and rules.sequence_by_action:
            by_action = decide_by_action(heads["sequence"], rules)
            if by_action is not None:
                heads["sequence"], lesions_ok = by_action, False
        if model == "anatomy" and header is not None:
            a = heads["anatomy"]
            heads["anatomy"] = HeadDecision(a.label, a.probability, a.probs,
                                            f"network (header rule {header.rule}: {header.detail})")
        if model == "region_view" and evidence is not None:
            region = region_from_header(evidence)
            if region is not None:  # a defined term, not an estimate: the region network is overruled
                heads["region"] = HeadDecision(region[0], 1.0, {region[0]: 1.0}, f"header rule body-part-region: "
                                                                                 f"{region[1]}")
        verdict = _check_stage(model, heads, rules)
        if verdict is not None:
            return RoutingDecision(verdict.segment_cord, verdict.segment_lesions, verdict.rule,
                                   verdict.reason, dict(heads))
    seq = heads["sequence"].label
    lesions = lesions_ok and seq in rules.lesion_sequences
    what = "cord+lesions" if lesions else "cord"
    rule = (f"segment {what}: anatomy=spine, view={heads['view'].label} in {list(rules.views)}, "
            f"sequence={seq} in {list(rules.lesion_sequences if lesions else rules.cord_sequences)}")
    if not lesions_ok:  # the sequence was decided by action: the rule says so
        rule += f" ({heads['sequence'].decided_by})"
    return RoutingDecision(True, lesions, rule, None, dict(heads))


def contrast_check_applies(decision: RoutingDecision, rules: RoutingRules, header_decided: bool) -> bool:
    """Whether the cord-contrast check may correct ``decision``'s sequence: the check is on, the series is
    segmented, it has a sequence head, and no header rule decided it (``header_decided``)."""
    return (rules.sequence_contrast_check and not header_decided and not decision.routed_out
            and "sequence" in decision.heads)


def recheck_sequence(decision: RoutingDecision, contrast: ContrastRule, rules: RoutingRules,
                     header_decided: bool) -> RoutingDecision:
    """``decision`` with its sequence corrected by the cord's contrast, when that applies.

    Parameters
    ----------
    decision
        The routing decision of a series whose cord has been segmented.
    contrast
        :func:`sci_node.routing.contrast_rules.sequence_from_contrast` of the series and its cord mask.
    rules
        ``rules.sequence_contrast_check`` off: ``decision`` unchanged.
    header_decided
        True when a header rule decided the sequence: the header's physics is not overruled.

    Returns
    -------
    RoutingDecision
        Unchanged unless the series is segmented, its sequence was decided by the image network,
        and the contrast names another cord sequence. Then the sequence head takes that class
        (the network's probabilities are kept, ``decided_by`` names the rule and what the network
        said), lesions stay on only if they were on and the new class is a lesion sequence, and
        the rule says what changed.
    """
    if not contrast_check_applies(decision, rules, header_decided):
        return decision
    seq = decision.heads["sequence"]
    if contrast.label is None or contrast.label == seq.label or contrast.label not in rules.cord_sequences:
        return decision
    said = f"({seq.decided_by})" if seq.decided_by else f"p={seq.probability:.2f}"  # by action: say so
    why = f"image rule {CONTRAST_RULES_ID} {contrast.rule}: {contrast.detail}; the network said {seq.label} {said}"
    heads = {**decision.heads, "sequence": HeadDecision(contrast.label, float(seq.probs.get(contrast.label, 0.0)),
                                                         dict(seq.probs), why)}
    lesions = decision.segment_lesions and contrast.label in rules.lesion_sequences
    what = "cord+lesions" if lesions else "cord"
    rule = (f"segment {what}: anatomy=spine, view={heads['view'].label} in {list(rules.views)}, "
            f"sequence={contrast.label} in {list(rules.lesion_sequences if lesions else rules.cord_sequences)} ({why})")
    return RoutingDecision(decision.segment_cord, lesions, rule, None, heads)


def _guards(rules: RoutingRules, header: AnatomyRule | None, n_slices: int | None) -> RoutingDecision | None:
    """The routing-out decision of the localiser guard or the header anatomy veto (``header``: the
    anatomy rule's outcome, None when there is no header or the veto is off), or None to classify."""
    if n_slices is not None and n_slices < rules.min_slices:
        what = ("a localiser or a single-slice series" if n_slices == 1
                else f"a localiser or a stack thinner than min_slices {rules.min_slices}")
        return _out({}, f"route-out: {n_slices} slice{'s' if n_slices != 1 else ''} < min_slices {rules.min_slices}",
                    f"{n_slices} slice{'s' if n_slices != 1 else ''}: {what}, not a volume to segment")
    if header is None or header.label is None:
        return None
    # a rule, not a probability estimate: its class gets 1 (the anatomy network is not asked)
    head = HeadDecision(header.label, 1.0, {header.label: 1.0}, f"header rule {header.rule}: {header.detail}")
    return _out({"anatomy": head}, f"route-out: header anatomy ({ANATOMY_RULES_ID} {header.rule}) != spine",
                header.detail)


def _check_stage(model: str, heads: dict[str, HeadDecision], rules: RoutingRules) -> RoutingDecision | None:
    """Routing-out decision after ``model``'s heads are known, or None to continue."""
    gating = {"anatomy": ("anatomy",), "region_view": ("view",), "sequence": ("sequence",)}[model]
    for h in gating:
        d = heads[h]
        abst = _abstained(h, d, rules)
        if abst is not None:
            return abst
        if h == "anatomy" and d.label != "spine":
            return _out(heads, "route-out: anatomy != spine",
                        f"anatomy is {d.label} (p={d.probability:.2f}), not spine")
        if h == "view" and d.label not in rules.views:
            return _out(heads, f"route-out: view not in {list(rules.views)}",
                        f"view is {d.label} (p={d.probability:.2f}); segmented views are {list(rules.views)}")
        if h == "sequence" and d.label not in rules.cord_sequences:
            return _out(heads, f"route-out: sequence not in {list(rules.cord_sequences)}",
                        f"sequence is {d.label} (p={d.probability:.2f}); segmented sequences are "
                        f"{list(rules.cord_sequences)}")
    return None
