"""sci_node.routing: the hierarchy, the rules, abstention; pure (probabilities in, decision out)."""
from __future__ import annotations

from typing import Mapping

import pytest

from sci_node.config import RoutingRules
from sci_node.routing import route


def _classify(anatomy: Mapping[str, float], view: Mapping[str, float], sequence: Mapping[str, float],
              calls: list[str]):
    table = {"anatomy": {"anatomy": anatomy},
             "region_view": {"region": {"cervical": 0.7, "thoracic": 0.2, "lumbar": 0.1}, "view": view},
             "sequence": {"sequence": sequence}}

    def classify(model: str) -> Mapping[str, Mapping[str, float]]:
        calls.append(model)
        return table[model]
    return classify


SPINE = {"spine": 0.9, "brain": 0.05, "abdomen": 0.03, "other": 0.02}
SAG = {"sagittal": 0.8, "axial": 0.1, "coronal": 0.1}
T2 = {"T1w": 0.1, "T2w": 0.85, "T2starw": 0.03, "other": 0.02}


def test_spine_sagittal_t2w_segments_cord_and_lesions() -> None:
    calls: list[str] = []
    d = route(_classify(SPINE, SAG, T2, calls), RoutingRules())
    assert (d.segment_cord, d.segment_lesions, d.reason) == (True, True, None)
    assert calls == ["anatomy", "region_view", "sequence"]
    out = d.as_dict()
    assert out["sequence"]["probs"]["T2w"] == 0.85 and out["region"]["label"] == "cervical"
    assert out["rule"].startswith("segment cord+lesions")


def test_t1w_segments_cord_only() -> None:
    d = route(_classify(SPINE, SAG, {"T1w": 0.9, "T2w": 0.1}, []), RoutingRules())
    assert (d.segment_cord, d.segment_lesions) == (True, False)
    assert d.rule.startswith("segment cord:")


def test_brain_stops_at_anatomy_with_reason() -> None:
    calls: list[str] = []
    d = route(_classify({"spine": 0.02, "brain": 0.97, "abdomen": 0.01}, SAG, T2, calls), RoutingRules())
    assert d.routed_out and calls == ["anatomy"]
    assert d.reason == "anatomy is brain (p=0.97), not spine"
    assert set(d.as_dict()) >= {"anatomy", "rule", "reason"} and "sequence" not in d.as_dict()


@pytest.mark.parametrize("view,sequence,rules,reason", [
    ({"coronal": 0.9, "sagittal": 0.1}, T2, RoutingRules(), "view is coronal"),
    (SAG, {"other": 0.8, "T2w": 0.2}, RoutingRules(), "sequence is other"),
    ({"axial": 0.9, "sagittal": 0.1}, T2, RoutingRules(views=("sagittal",)), "view is axial"),
    (SAG, {"T2w": 0.4, "T1w": 0.35, "other": 0.25}, RoutingRules(sequence_by_action=False),
     "sequence classifier abstained"),
    (SAG, {"T2w": 0.3, "T1w": 0.25, "other": 0.45}, RoutingRules(min_confidence=0.6), "sequence classifier abstained"),
    (SAG, {"T2w": 0.4, "T1w": 0.35, "other": 0.25}, RoutingRules(min_confidence=0.3), None),
])
def test_rules_and_abstention(view: Mapping[str, float], sequence: Mapping[str, float], rules: RoutingRules,
                              reason: str | None) -> None:
    d = route(_classify(SPINE, view, sequence, []), rules)
    if reason is None:
        assert d.segment_cord and d.reason is None
    else:
        assert d.routed_out and reason in str(d.reason)


def test_unsure_sequence_segments_the_cord_only() -> None:
    """Top class below min_confidence, but the cord classes together above it: the cord is segmented,
    lesions are not, with the summed probability and the rule that fired on record."""
    d = route(_classify(SPINE, SAG, {"T2starw": 0.31, "T2w": 0.27, "T1w": 0.23, "other": 0.19}, []), RoutingRules())
    assert (d.segment_cord, d.segment_lesions, d.reason) == (True, False, None)
    seq = d.heads["sequence"]
    assert seq.label == "T2starw" and seq.probability == pytest.approx(0.81)
    assert seq.decided_by is not None and seq.decided_by.startswith(
        "network, cord by action: p(T1w + T2starw + T2w) = 0.81 >= min_confidence 0.5")
    assert d.rule.startswith("segment cord: ") and "cord by action" in d.rule
    assert d.as_dict()["sequence"]["decided_by"] == seq.decided_by


def test_unsure_and_mostly_other_abstains() -> None:
    """'other' 0.45 as the top class (below 0.5) and the cord classes at 0.45 too: still an abstention."""
    d = route(_classify(SPINE, SAG, {"other": 0.45, "T2w": 0.25, "T1w": 0.2, "MTw": 0.1}, []), RoutingRules())
    assert d.routed_out and "sequence classifier abstained" in str(d.reason)


def test_confident_decisions_do_not_change_by_action() -> None:
    """A head at or above min_confidence is decided as before: 'other' 0.55 routes out, T1w 0.9 is cord only."""
    out = route(_classify(SPINE, SAG, {"other": 0.55, "T2w": 0.25, "T2starw": 0.2}, []), RoutingRules())
    assert out.routed_out and "sequence is other" in str(out.reason) and out.heads["sequence"].decided_by is None
    t1 = route(_classify(SPINE, SAG, {"T1w": 0.9, "T2w": 0.1}, []), RoutingRules())
    assert (t1.segment_cord, t1.segment_lesions, t1.heads["sequence"].decided_by) == (True, False, None)
