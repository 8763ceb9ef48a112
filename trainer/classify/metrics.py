"""Cross-validation metrics, calibration and header-rule scoring of the routing classifiers.

Pure functions of out-of-fold logits and :class:`trainer.classify.data.SampleSet` arrays; no I/O.
Sample kinds (``SampleSet.stored``): random crops, real volumes as stored with their header
as available, and the same stored volumes with the header removed (see
:func:`trainer.classify.data.real_samples`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from sci_node.routing.cls_features import FEATURE_NAMES
from trainer.classify.data import ANATOMY, REGION, SEQUENCE, STORED, STORED_NO_HEADER, VIEW, SampleSet

CLASSES = {"anatomy": ANATOMY, "region": REGION, "view": VIEW, "sequence": SEQUENCE}


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, K)`` logits."""
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
        p = softmax(logits / t)[np.arange(len(labels)), labels]
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


def header_present(s: SampleSet) -> np.ndarray:
    """``(N,)`` bool: the sample's features carry acquisition parameters (TE or a sequence code)."""
    if s.header is not None:
        return s.header
    return (s.features[:, FEATURE_NAMES.index("has_te")] > 0) | (s.features[:, FEATURE_NAMES.index("has_scan")] > 0)


def real_series_masks(s: SampleSet) -> dict[str, np.ndarray]:
    """Masks of the stored real series: with their header, with the header removed, as available."""
    hdr = header_present(s)
    as_stored = s.real & (s.stored == STORED)
    return {"with_header": as_stored & hdr,
            "header_removed": s.real & ((s.stored == STORED_NO_HEADER) | ((s.stored == STORED) & ~hdr)),
            "as_available": as_stored}


def rule_confidence(s: SampleSet) -> tuple[float, int, int]:
    """Laplace-smoothed accuracy of the header rules where they fire, ``(confidence, hits, n)`` (max 0.99)."""
    lab = s.labels["sequence"]
    fired = (s.rule >= 0) & (lab >= 0)
    hits = int(np.sum(s.rule[fired] == lab[fired]))
    n = int(fired.sum())
    return min(0.99, (hits + 1) / (n + 2)), hits, n


def _acc(pred: np.ndarray, lab: np.ndarray, m: np.ndarray) -> float | None:
    return round(float(np.mean(pred[m] == lab[m])), 4) if m.any() else None


def real_series_metrics(h: str, probs: np.ndarray, s: SampleSet, scored: np.ndarray, abstain: float,
                        rules: bool) -> dict[str, Any]:
    """Accuracy on held-out **stored real series** (the done-criteria of issue 14), per header condition.

    With ``rules`` (sequence head), the header rule's class replaces the network's wherever a
    rule fired (the serving behaviour); the network-only numbers are kept next to it.
    Also: abstention rate (top calibrated probability < ``abstain``) on real spine series, and
    for ``anatomy`` the number of non-spine real series routed in (called spine with p >= ``abstain``).
    """
    lab = s.labels[h]
    pred_net = probs.argmax(1)
    pred = np.where(s.rule >= 0, s.rule, pred_net) if rules else pred_net
    conf = np.where(s.rule >= 0, 1.0, probs.max(1)) if rules else probs.max(1)
    spine = s.labels["anatomy"] == ANATOMY.index("spine")
    out: dict[str, Any] = {}
    for name, m in real_series_masks(s).items():
        m = m & scored & (lab >= 0)
        out[name] = {"accuracy": _acc(pred, lab, m), "n": int(m.sum()),
                     "accuracy_network_only": _acc(pred_net, lab, m)}
        ms = m & spine
        out[name]["abstention_rate_spine"] = round(float(np.mean(conf[ms] < abstain)), 4) if ms.any() else None
        out[name]["n_spine"] = int(ms.sum())
        if h == "anatomy":
            routed_in = m & ~spine & (pred == ANATOMY.index("spine")) & (conf >= abstain)
            out[name]["non_spine_routed_in"] = int(routed_in.sum())
            out[name]["n_non_spine"] = int((m & ~spine).sum())
            out[name]["routed_in_series"] = sorted({str(g) for g in s.groups[routed_in]})
    masks = real_series_masks(s)
    serving = np.where((s.rule >= 0)[:, None], 0.0, probs) if rules else probs
    if rules:  # the serving probabilities of a fired rule: its confidence on its class (see predict_cls.rule_probs)
        conf_rule = rule_confidence(s)[0]
        k = probs.shape[1]
        fired = np.nonzero(s.rule >= 0)[0]
        serving[fired] = (1.0 - conf_rule) / (k - 1)
        serving[fired, s.rule[fired]] = conf_rule
    listed = (masks["with_header"] | masks["header_removed"]) & scored
    out["predictions"] = [{"i": int(i), "group": str(s.groups[i]),
                           "condition": "with_header" if masks["with_header"][i] else "header_removed",
                           "true": CLASSES[h][lab[i]] if lab[i] >= 0 else None,
                           "probs": {c: round(float(v), 4) for c, v in zip(CLASSES[h], serving[i])}}
                          for i in np.nonzero(listed)[0]]
    errs = masks["as_available"] | masks["header_removed"]
    errs &= scored & (lab >= 0) & (pred != lab)
    out["errors"] = [{"group": str(s.groups[i]), "true": CLASSES[h][lab[i]], "pred": CLASSES[h][pred[i]],
                      "p": round(float(conf[i]), 3), "header": bool(header_present(s)[i])} for i in np.nonzero(errs)[0]]
    return out


def _binary_spine(h: str, pred: np.ndarray, lab: np.ndarray, ok: np.ndarray, real: np.ndarray) -> dict[str, Any]:
    """Anatomy only: accuracy of the routing-relevant decision spine vs not spine."""
    if h != "anatomy":
        return {}
    sp = CLASSES[h].index("spine")
    hit = (pred == sp) == (lab == sp)
    return {"spine_vs_rest_accuracy": round(float(np.mean(hit[ok])), 4) if ok.any() else None,
            "spine_vs_rest_accuracy_real": round(float(np.mean(hit[ok & real])), 4) if (ok & real).any() else None}


def head_metrics(h: str, logits: np.ndarray, s: SampleSet, scored: np.ndarray, temp: float,
                 abstain: float, rules: bool = False) -> dict[str, Any]:
    """Cross-validation metrics of one head: all samples, real crops, stored real series, per class/group, ECE."""
    lab = s.labels[h]
    ok = scored & (lab >= 0)
    probs = softmax(logits / temp)
    pred = probs.argmax(1)
    conf = probs.max(1)
    kept = ok & (conf >= abstain)
    hdr = header_present(s)
    stored = s.stored > 0
    return {
        "accuracy": _acc(pred, lab, ok), "n": int(ok.sum()),
        "accuracy_real": _acc(pred, lab, ok & s.real), "n_real": int((ok & s.real).sum()),
        "accuracy_stored_volumes": _acc(pred, lab, ok & (s.stored == STORED)),
        "n_stored_volumes": int((ok & (s.stored == STORED)).sum()),
        "accuracy_synthetic": _acc(pred, lab, ok & ~s.real), "n_synthetic": int((ok & ~s.real).sum()),
        "accuracy_real_with_header": _acc(pred, lab, ok & s.real & hdr),
        "n_real_with_header": int((ok & s.real & hdr).sum()),
        "accuracy_real_without_header": _acc(pred, lab, ok & s.real & ~hdr),
        "real_series": real_series_metrics(h, probs, s, scored, abstain, rules),
        **_binary_spine(h, pred, lab, ok, s.real),
        "per_class_recall": {c: _acc(pred, lab, ok & (lab == i)) for i, c in enumerate(CLASSES[h])
                             if (ok & (lab == i)).any()},
        "per_group": {g: _acc(pred, lab, ok & (s.groups == g)) for g in dict.fromkeys(s.groups[ok].tolist())},
        "ece_uncalibrated": round(ece(softmax(logits[ok]), lab[ok]), 4),
        "ece_calibrated": round(ece(probs[ok], lab[ok]), 4), "temperature": round(temp, 4),
        "abstain_below": abstain, "coverage": round(float(kept.sum() / max(1, ok.sum())), 4),
        "accuracy_when_not_abstaining": _acc(pred, lab, kept),
        "stored_volume_errors": [{"group": str(s.groups[i]), "true": CLASSES[h][lab[i]], "pred": CLASSES[h][pred[i]],
                                  "p": round(float(conf[i]), 3)} for i in np.nonzero(ok & stored & (pred != lab))[0]],
    }
