"""Build a routing-classifier ensemble artefact from trained members (e.g. one recipe, several seeds).

    python -m trainer.cls_ensemble --members DIR DIR [DIR ...] --out DIR --version V

Each member is a classifier artefact written by ``sci-node train MODEL`` (same model, heads,
preprocessing, architecture and data hash; different seeds). The ensemble
(:class:`sci_node.nets.ProbMeanSeriesNet`) averages the members' temperature-scaled probabilities,
so its card keeps temperature 1. Its cross-validation metrics are computed from the members' own
held-out predictions on the stored real series (every member scored each series with a fold network
that never trained on its person, and the stored series have the same sample index in every
member): the mean of their serving probabilities is exactly what the ensemble serves for that fold
assignment. Crops and synthetic samples differ between seeds, so the all-sample figures of the
members are kept per member (``metrics.<head>.members``), not averaged.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Sequence

from sci_node.errors import ModelError

ENSEMBLE_CLASS = "sci_node.nets.ProbMeanSeriesNet"
_SAME = ("name", "kind", "heads", "preprocessing", "data_hash")


def load_members(members: Sequence[Path]) -> list[dict[str, Any]]:
    """The members' cards, checked to be one recipe's (same name, heads, preprocessing, architecture, data)."""
    from sci_node.models.artifact import verify_artifact

    cards = [verify_artifact(Path(m)) for m in members]
    if len(cards) < 2:
        raise ModelError(f"an ensemble needs at least two members, got {len(cards)}")
    first = cards[0]
    if first["architecture"]["class"] != "sci_node.nets.SeriesNet":
        raise ModelError(f"member {str(members[0])!r} is {first['architecture']['class']!r}, not a SeriesNet")
    for path, card in zip(members[1:], cards[1:]):
        for key in (*_SAME, "architecture"):
            if card.get(key) != first.get(key):
                raise ModelError(f"member {str(path)!r} differs from {str(members[0])!r} in {key!r}")
    return cards


def mean_predictions(cards: Sequence[dict[str, Any]], head: str) -> list[dict[str, Any]]:
    """Held-out stored-series predictions of ``head``, probabilities averaged per (sample index, condition)."""
    by_key: dict[tuple[int, str], dict[str, Any]] = {}
    counts: dict[tuple[int, str], int] = {}
    for n, card in enumerate(cards):
        preds = ((card["metrics"].get(head) or {}).get("real_series") or {}).get("predictions")
        if preds is None:
            raise ModelError(f"member {n} ({card['name']} {card['version']}) has no held-out predictions for {head!r}")
        for p in preds:
            key = (p["i"], p["condition"])
            row = by_key.setdefault(key, {**p, "probs": {k: 0.0 for k in p["probs"]}})
            counts[key] = counts.get(key, 0) + 1
            if row["group"] != p["group"] or row["true"] != p["true"]:
                raise ModelError(f"member {n}: sample {p['i']} is {p['group']}/{p['true']}, "
                                 f"the first member has {row['group']}/{row['true']}")
            for k, v in p["probs"].items():
                row["probs"][k] += v / len(cards)
    partial = sorted(k for k, c in counts.items() if c != len(cards))
    if partial:
        raise ModelError(f"the members' held-out predictions of {head!r} cover different series, "
                         f"e.g. sample {partial[0][0]} ({partial[0][1]})")
    return [{**row, "probs": {k: round(v, 4) for k, v in row["probs"].items()}} for row in by_key.values()]


def _top(row: dict[str, Any]) -> str:
    return str(max(row["probs"], key=row["probs"].get))


def _accuracy(rows: list[dict[str, Any]]) -> float | None:
    return round(sum(_top(r) == r["true"] for r in rows) / len(rows), 4) if rows else None


def _conditions(preds: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Labelled predictions per condition; "as available" = each series once, with its header when it has one
    (a header-removed copy is the sample right after its stored original)."""
    rows = [p for p in preds if p["true"] is not None]
    with_hdr = {p["i"] for p in rows if p["condition"] == "with_header"}
    return {"with_header": [p for p in rows if p["condition"] == "with_header"],
            "header_removed": [p for p in rows if p["condition"] == "header_removed"],
            "as_available": [p for p in rows if p["condition"] == "with_header" or p["i"] - 1 not in with_hdr]}


def series_metrics(preds: list[dict[str, Any]], conds: dict[str, list[dict[str, Any]]], abstain: float,
                   spine_groups: set[str]) -> dict[str, Any]:
    """The ``real_series`` block of a head, as :func:`trainer.classify.metrics.real_series_metrics` writes it
    (``conds``: :func:`_conditions` of ``preds``).

    ``accuracy_network_only`` is the accuracy itself where no header rule can fire (header removed) and
    None with the header (the members' serving probabilities already carry the rules' verdicts).
    """
    out: dict[str, Any] = {}
    for name, rows in conds.items():
        sp = [r for r in rows if r["group"] in spine_groups]
        out[name] = {"accuracy": _accuracy(rows), "n": len(rows),
                     "accuracy_network_only": _accuracy(rows) if name == "header_removed" else None,
                     "abstention_rate_spine": round(sum(r["probs"][_top(r)] < abstain for r in sp) / len(sp), 4)
                     if sp else None, "n_spine": len(sp)}
    out["predictions"] = preds
    out["errors"] = [{"group": r["group"], "true": r["true"], "pred": _top(r), "p": round(r["probs"][_top(r)], 3),
                      "header": r["condition"] == "with_header"}
                     for r in conds["as_available"] + conds["header_removed"] if _top(r) != r["true"]]
    return out


def head_metrics(preds: list[dict[str, Any]], abstain: float, spine_groups: set[str],
                 members: Sequence[dict[str, Any]], head: str) -> dict[str, Any]:
    """A head's metrics block with the keys :mod:`trainer.studies.cls_report` reads, on the stored real series.

    Scored as served (header rules included). The all-sample, crop and synthetic figures are the
    members' own (``members``); for the ensemble they are None / 0 (its members saw different crops).
    """
    conds = _conditions(preds)
    stored = conds["as_available"]
    listed = conds["as_available"] + conds["header_removed"]
    kept = [r for r in listed if r["probs"][_top(r)] >= abstain]
    classes = list(dict.fromkeys(c for r in listed for c in r["probs"]))
    groups = list(dict.fromkeys(r["group"] for r in listed))
    keep = ("accuracy", "n", "accuracy_real", "n_real", "accuracy_stored_volumes", "n_stored_volumes", "temperature")
    return {
        "scored_on": "held-out stored real series (as available and header removed), as served",
        "accuracy": None, "n": 0, "accuracy_real": None, "n_real": 0, "accuracy_synthetic": None, "n_synthetic": 0,
        "accuracy_stored_volumes": _accuracy(stored), "n_stored_volumes": len(stored),
        "real_series": series_metrics(preds, conds, abstain, spine_groups),
        "per_class_recall": {c: _accuracy([r for r in listed if r["true"] == c]) for c in classes
                             if any(r["true"] == c for r in listed)},
        "per_group": {g: _accuracy([r for r in listed if r["group"] == g]) for g in groups},
        "ece_uncalibrated": None, "ece_calibrated": None, "temperature": 1.0, "abstain_below": abstain,
        "coverage": round(len(kept) / len(listed), 4) if listed else None,
        "accuracy_when_not_abstaining": _accuracy(kept),
        "stored_volume_errors": [{"group": r["group"], "true": r["true"], "pred": _top(r),
                                  "p": round(r["probs"][_top(r)], 3)} for r in stored if _top(r) != r["true"]],
        "members": [{"version": m["version"], "seed": m["training"].get("seed"),
                     **{k: (m["metrics"].get(head) or {}).get(k) for k in keep}} for m in members],
    }


def build_ensemble(members: Sequence[Path], out: Path, version: str) -> Path:
    """Write the ensemble artefact of ``members`` to ``out`` (card ``version``); returns ``out``."""
    import torch

    from sci_node.models.artifact import write_artifact
    from trainer.classify.train import sources_of

    cards = load_members(members)
    first = cards[0]
    abstain = float(first["calibration"].get("abstain_below", 0.5))
    # the catalogue the members trained on ([[sources]] of their config, else the default one)
    config = {**first["training"]["config"], "_path": first["training"].get("config_file", "")}
    spine_groups = {s.group for s in sources_of(config) if s.anatomy == "spine"}
    state: dict[str, Any] = {}
    for i, m in enumerate(members):
        weights = torch.load(Path(m) / "weights.pt", map_location="cpu", weights_only=True)
        state.update({f"members.{i}.{k}": v for k, v in weights.items()})
    card = copy.deepcopy(first)
    card["version"] = str(version)
    card["description"] = (f"{first.get('description', '')} — mean of {len(cards)} seeds' calibrated "
                           f"probabilities").strip(" —")
    card["architecture"] = {"class": ENSEMBLE_CLASS, "args": {
        "members": len(cards), "member_args": first["architecture"]["args"],
        "temperatures": {h: [float(c["calibration"]["temperature"][h]) for c in cards] for h in first["heads"]}}}
    card["calibration"] = {**first["calibration"], "temperature": {h: 1.0 for h in first["heads"]},
                           "method": "mean of the members' temperature-scaled probabilities (each member's "
                                     "temperature from its own out-of-fold logits; architecture.args.temperatures)"}
    rules = first["calibration"].get("header_rules")
    if rules is not None:  # a fired rule serves the mean of the members' rule probabilities
        confs = [float(c["calibration"]["header_rules"]["confidence"]) for c in cards]
        card["calibration"]["header_rules"] = {**rules, "confidence": round(sum(confs) / len(confs), 6),
                                               "members_confidence": confs}
    card["metrics"] = {"validation": f"{first['metrics'].get('validation', '')}; ensemble scored as the mean of "
                                     f"the members' held-out serving probabilities on the stored real series",
                       **({"header_rules": first["metrics"]["header_rules"]}
                          if "header_rules" in first["metrics"] else {})}
    for h in first["heads"]:
        card["metrics"][h] = head_metrics(mean_predictions(cards, h), abstain, spine_groups, cards, h)
    card["training"] = {"command": "python -m trainer.cls_ensemble --members " + " ".join(str(m) for m in members)
                                   + f" --out {out} --version {version}",
                        "members": [{"path": str(m), "version": c["version"], "seed": c["training"].get("seed"),
                                     "command": c["training"].get("command"), "weights_sha256": c.get("weights_sha256")}
                                    for m, c in zip(members, cards)],
                        "splits": first["training"].get("splits")}
    card.pop("weights_sha256", None)
    return write_artifact(Path(out), state, card)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m trainer.cls_ensemble --members DIR DIR [DIR ...] --out DIR --version V``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=Path, nargs="+", required=True, help="member artefact folders (>= 2)")
    ap.add_argument("--out", type=Path, required=True, help="ensemble artefact folder to write")
    ap.add_argument("--version", required=True, help="the ensemble's model version")
    a = ap.parse_args(argv)
    try:
        out = build_ensemble(a.members, a.out, a.version)
    except ModelError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
