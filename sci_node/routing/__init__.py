"""Which series are segmented: header evidence, the rule modules, the classifiers' features, the decision.

Imports only the core and imaging/ (no torch, no DICOM I/O). ``sci_node.routing`` re-exports
:mod:`sci_node.routing.decide`, the hierarchy that decides (``route``, ``recheck_sequence`` ...).
"""
from __future__ import annotations

from sci_node.routing.decide import (
                                     STAGES,
                                     ClassifyFn,
                                     HeadDecision,
                                     Probs,
                                     RoutingDecision,
                                     contrast_check_applies,
                                     decide_by_action,
                                     decide_head,
                                     recheck_sequence,
                                     route,
                                     slice_count,
)

__all__ = ["STAGES", "ClassifyFn", "HeadDecision", "Probs", "RoutingDecision", "contrast_check_applies",
           "decide_by_action", "decide_head", "recheck_sequence", "route", "slice_count"]
