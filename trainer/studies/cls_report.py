"""Markdown cross-validation tables of the routing classifiers, from their model cards.

``python -m trainer.cls_report [MODELS_DIR]`` prints the tables written into ``docs/classifiers.md``
(for the versions active in ``MODELS_DIR/registry.json``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

from sci_node.models.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[2]


def _fmt(v: object) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def report(models_dir: Path, versions: dict[str, str] | None = None) -> str:
    """Summary table (one row per head) and per-group tables for the classifiers.

    ``versions`` maps model name to version; default: the registry's active versions.
    """
    reg = ModelRegistry(models_dir)
    versions = versions or reg.active()
    lines = ["| model | head | CV acc. all held-out samples (n) | real crops (n) | stored real volumes (n) | "
             "synthetic (n) | temperature | ECE raw → calibrated | coverage @ p≥0.5 | acc. when not abstaining |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: list[str] = []
    for name in ("anatomy", "region_view", "sequence"):
        card = json.loads((reg.path_of(name, versions[name]) / "card.json").read_text())
        for head in card["heads"]:
            m = card["metrics"].get(head)
            if not m:
                continue
            lines.append(f"| {name} | {head} | {_fmt(m['accuracy'])} ({m['n']}) | {_fmt(m['accuracy_real'])} "
                         f"({m['n_real']}) | {_fmt(m['accuracy_stored_volumes'])} ({m['n_stored_volumes']}) | "
                         f"{_fmt(m['accuracy_synthetic'])} ({m['n_synthetic']}) | {_fmt(m['temperature'])} | "
                         f"{_fmt(m['ece_uncalibrated'])} → {_fmt(m['ece_calibrated'])} | {_fmt(m['coverage'])} | "
                         f"{_fmt(m['accuracy_when_not_abstaining'])} |")
            groups.append(f"\n**{name} / {head}** — recall per class: "
                          + ", ".join(f"{k} {_fmt(v)}" for k, v in m["per_class_recall"].items())
                          + "; accuracy per held-out group: "
                          + ", ".join(f"{k} {_fmt(v)}" for k, v in m["per_group"].items())
                          + ("; errors on stored volumes: " + ", ".join(
                              f"{e['group']} {e['true']}→{e['pred']} (p={e['p']})" for e in m["stored_volume_errors"])
                             if m["stored_volume_errors"] else "; no error on stored volumes") + ".")
    return "\n".join(lines) + "\n" + "\n".join(groups) + "\n\n" + real_series_table(reg, versions) + "\n"


def real_series_table(reg: ModelRegistry, versions: dict[str, str]) -> str:
    """Held-out **real series** (stored volumes of subjects outside the fold's training set): with their
    DICOM/BIDS header, with the header removed, abstention on spine series, non-spine series routed in.

    Cards written before the grouped k-fold trainer (no ``real_series`` metrics) are skipped.
    """
    lines = ["| model | head | with header: acc. (n) | header removed: acc. (n) | as available: acc. (n) | "
             "network only, with header | abstention on real spine series | non-spine routed in |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("anatomy", "region_view", "sequence"):
        card = json.loads((reg.path_of(name, versions[name]) / "card.json").read_text())
        for head in card["heads"]:
            rs = (card["metrics"].get(head) or {}).get("real_series")
            if not rs:
                continue
            w, r, a = rs["with_header"], rs["header_removed"], rs["as_available"]
            absn = a.get("abstention_rate_spine")
            routed = (f"{a['non_spine_routed_in']} / {a['n_non_spine']} ({', '.join(a['routed_in_series']) or '–'})"
                      if "non_spine_routed_in" in a else "–")
            lines.append(f"| {name} {versions[name]} | {head} | {_fmt(w['accuracy'])} ({w['n']}) | "
                         f"{_fmt(r['accuracy'])} ({r['n']}) | {_fmt(a['accuracy'])} ({a['n']}) | "
                         f"{_fmt(w['accuracy_network_only'])} | "
                         f"{_fmt(absn)} ({a['n_spine']}) | {routed} |")
    return "\n".join(lines)




_Key = tuple[int, str]


def _held_out_predictions(models_dir: Path, versions: dict[str, str] | None
                          ) -> tuple[dict[_Key, dict[str, dict[str, float]]], dict[_Key, tuple[str, str]],
                                     dict[_Key, str | None]]:
    """Per (sample index, condition): head -> serving probabilities; anatomy truth and group; sequence truth."""
    reg = ModelRegistry(models_dir)
    versions = versions or reg.active()
    preds: dict[_Key, dict[str, dict[str, float]]] = {}
    truth: dict[_Key, tuple[str, str]] = {}
    seq_truth: dict[_Key, str | None] = {}
    for name, heads in (("anatomy", ("anatomy",)), ("region_view", ("region", "view")), ("sequence", ("sequence",))):
        card = json.loads((reg.path_of(name, versions[name]) / "card.json").read_text())
        for head in heads:
            rs = (card["metrics"].get(head) or {}).get("real_series") or {}
            for p in rs.get("predictions", []):
                key = (p["i"], p["condition"])
                preds.setdefault(key, {})[head] = p["probs"]
                if head == "anatomy":
                    truth[key] = (p["true"], p["group"])
                if head == "sequence":
                    seq_truth[key] = p["true"]
    return preds, truth, seq_truth


#: Per stored-sample index: (header evidence as the sample had it, slice count, person group).
_Guards = dict[int, tuple[Any, int, str]]


def stored_sources(data: Path, config: Path) -> Iterator[tuple[list[int], Any, Any, Any]]:
    """Per catalogue source of ``config``, in sample-set order: ``(indices, source, image, evidence)``.

    The sample set (:func:`trainer.classify.train._generate`) lists, per catalogue source in order,
    the stored volume with its header, the stored volume again without it (when it has one), then
    ``n_aug`` crops; synthetic samples follow. Walking the catalogue the same way gives each stored
    sample's index (``indices``: one, or two when the source has a header) without generating any
    crop, so rules (routing guards, the cord-contrast check) can be applied to the cards' out-of-fold
    predictions. ``image`` and ``evidence`` are :func:`trainer.classify.data.load_source`'s.
    """
    import tomllib

    from trainer.classify.data import has_header, load_source
    from trainer.classify.train import sources_of

    cfg = tomllib.loads(config.read_text())
    n_aug_default = int(cfg["data"].get("n_aug", 10))
    i = 0
    for src in sources_of(cfg):
        image, ev, _ = load_source(src, data)
        indices = [i, i + 1] if has_header(ev) else [i]
        yield indices, src, image, ev
        i = indices[-1] + 1 + (int(src.n_aug) if src.n_aug is not None else n_aug_default)


def stored_guard_inputs(data: Path, config: Path = REPO / "trainer" / "configs" / "anatomy.toml") -> _Guards:
    """Header evidence and slice count of every stored real sample, by its index in the sample set
    (:func:`stored_sources`): the routing guards (localiser, header anatomy veto: rules, not fitted)
    applied to the cards' out-of-fold predictions. The header-removed copy gets no evidence."""
    from sci_node.routing import slice_count

    out: _Guards = {}
    for indices, src, image, ev in stored_sources(data, config):
        n = slice_count(image.GetSize())
        out[indices[0]] = (ev, n, src.group)
        if len(indices) == 2:
            out[indices[1]] = (None, n, src.group)
    return out


def _tally_row(cond: str, members: list[_Key], preds: dict[_Key, dict[str, dict[str, float]]],
               truth: dict[_Key, tuple[str, str]], seq_truth: dict[_Key, str | None],
               guards: _Guards | None = None, rules: Any = None) -> str:
    """One table row: route every member with ``rules`` (default: the node's) and the guards when given; count
    outcomes."""
    from collections import Counter

    from sci_node.config import RoutingRules
    from sci_node.routing import route

    rules = rules or RoutingRules()
    tally: Counter[str] = Counter()
    routed_in: set[str] = set()
    for key in members:
        p = preds[key]
        table: dict[str, Mapping[str, Mapping[str, float]]] = {
            "anatomy": {"anatomy": p["anatomy"]}, "region_view": {"region": p["region"], "view": p["view"]},
            "sequence": {"sequence": p["sequence"]}}
        ev, n_slices = guards[key[0]][:2] if guards is not None else (None, None)
        d = route(table.__getitem__, rules, evidence=ev, n_slices=n_slices)
        spine, wanted = truth[key][0] == "spine", seq_truth.get(key) in rules.cord_sequences
        tally["spine" if spine else "non-spine"] += 1
        if not spine:
            if not d.routed_out:
                tally["non-spine routed in"] += 1
                routed_in.add(truth[key][1])
            continue
        tally["segmentable"] += wanted
        seq = d.heads.get("sequence")
        tally["by action"] += bool(seq is not None and "cord by action" in (seq.decided_by or ""))
        tally["lesions, other class"] += d.segment_lesions and seq_truth.get(key) not in rules.lesion_sequences
        if d.routed_out:
            tally["abstained" if d.rule.startswith("abstain") else ("wrong out" if wanted else "other out")] += 1
        else:
            tally["segmented" if wanted else "other in"] += 1
    n_sp = tally["spine"]
    return (f"| {cond.replace('_', ' ')} | {n_sp} | {tally['abstained']} ({tally['abstained'] / max(1, n_sp):.1%}) | "
            f"{tally['by action']} | {tally['segmentable']} | {tally['segmented']} | {tally['wrong out']} | "
            f"{tally['other out']} | {tally['other in']} | {tally['lesions, other class']} | {tally['non-spine']} | "
            f"{tally['non-spine routed in']} "
            f"({', '.join(sorted(routed_in)) or '–'}) |")


def hierarchy_table(models_dir: Path, versions: dict[str, str] | None = None, data: Path | None = None,
                    rules: Any = None) -> str:
    """The three cards' held-out predictions on the same real series, run through the node's routing.

    Each stored real series (with its header, and again with the header removed) gets the anatomy,
    region/view and sequence probabilities of a fold that did not train on its person (the three
    models use the same samples; their folds can differ, since a model's folds hold only groups
    with labels for its heads), and :func:`sci_node.routing.route` with the default
    :class:`sci_node.config.RoutingRules` decides. Rows: with the header, header removed, and "as
    available" (each series once, with its header when it has one). With ``data`` (the data root)
    the routing guards run too (:func:`stored_guard_inputs`): the localiser guard and the header
    anatomy veto, on the header each sample had. ``rules``: a :class:`sci_node.config.RoutingRules`
    (default: the node's defaults).
    """
    preds, truth, seq_truth = _held_out_predictions(models_dir, versions)
    keys = [k for k in preds if len(preds[k]) == 4 and k in truth]
    if not keys:
        return "(no card with per-series predictions: retrain with the grouped k-fold trainer)"
    # A header-removed copy is the sample right after its stored original (trainer.classify.data.real_samples),
    # so it is a copy exactly when (i - 1, "with_header") exists.
    with_hdr = {k[0] for k in keys if k[1] == "with_header"}
    sets = {"with_header": [k for k in keys if k[1] == "with_header"],
            "header_removed": [k for k in keys if k[1] == "header_removed"],
            "as_available": [k for k in keys if k[1] == "with_header" or k[0] - 1 not in with_hdr]}
    guards = stored_guard_inputs(data) if data is not None else None
    if guards is not None:
        bad = [k for k in keys if k[0] not in guards or guards[k[0]][2] != truth[k][1]]
        if bad:
            raise ValueError(f"sample indices {bad[:3]} do not match the catalogue walk: data or config changed")
    rows = [_tally_row(cond, members, preds, truth, seq_truth, guards, rules) for cond, members in sets.items()]
    return "\n".join(["| real series | spine series | spine: abstained (rate) | spine: cord only by action (unsure "
                      "sequence) | spine, T1w/T2w/T2\\*w (segmentable) | … segmented | … routed out by a wrong class | "
                      "spine MT/DWI/EPI: routed out | … segmented as T1w/T2w/T2\\*w (wrong) | spine: lesions run on a "
                      "class not in lesion_sequences | non-spine series | non-spine routed in |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows])

def card_summary(card_dir: Path, head: str = "anatomy", abstain: float = 0.5) -> str:
    """Cross-validation summary of one artefact folder (e.g. a candidate not in the registry).

    Parameters
    ----------
    card_dir
        Folder with the ``card.json`` the trainer wrote.
    head
        Head to summarise.
    abstain
        Confidence below which the node abstains (coverage is the fraction at or above it).

    Returns
    -------
    str
        Markdown: stored-volume accuracy, per-class recall, per-group accuracy, coverage, the held-out
        stored real series (header removed or without one) of each non-spine group with their top class
        and p, the spine series correct and their lowest p(spine), and the stored-volume errors.
    """
    card = json.loads((Path(card_dir) / "card.json").read_text())
    m = card["metrics"][head]
    rs = m["real_series"]
    lines = [f"**{card['name']} {card['version']}** ({card_dir}) — stored real volumes "
             f"{_fmt(m['accuracy_stored_volumes'])} ({m['n_stored_volumes']}); all held-out samples "
             f"{_fmt(m['accuracy'])} ({m['n']}); real crops {_fmt(m['accuracy_real'])}; coverage @ p≥{abstain} "
             f"{_fmt(m['coverage'])}, acc. when not abstaining {_fmt(m['accuracy_when_not_abstaining'])}; "
             f"temperature {_fmt(m['temperature'])}; ECE {_fmt(m['ece_uncalibrated'])} → {_fmt(m['ece_calibrated'])}",
             "recall: " + ", ".join(f"{k} {_fmt(v)}" for k, v in m["per_class_recall"].items()),
             "per group: " + ", ".join(f"{k} {_fmt(v)}" for k, v in m["per_group"].items())]
    series = [p for p in rs.get("predictions", []) if p["condition"] == "header_removed"]
    spine = [p["probs"]["spine"] for p in series if p["true"] == "spine"]
    ok_sp = sum(max(p["probs"], key=p["probs"].get) == "spine" for p in series if p["true"] == "spine")
    lines.append(f"spine stored series (header removed): {ok_sp}/{len(spine)} correct, min p(spine) "
                 f"{min(spine) if spine else float('nan'):.3f}, abstained {sum(v < abstain for v in spine)}")
    ns = [p for p in series if p["true"] != "spine"]
    ok_ns = [p for p in ns if max(p["probs"], key=p["probs"].get) == p["true"]]
    lines.append(f"non-spine stored series (header removed): {len(ok_ns)}/{len(ns)} correct; "
                 f"called spine with p≥{abstain}: {sum(p['probs']['spine'] >= abstain for p in ns)}")
    for p in ns:
        top = max(p["probs"], key=p["probs"].get)
        lines.append(f"  {p['group']:<12} {p['true']:>7} -> {top:<7} p={p['probs'][top]:.3f} "
                     f"p(true)={p['probs'][p['true']]:.3f} p(spine)={p['probs']['spine']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models_dir", nargs="?", type=Path, default=REPO / "models")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "spine",
                    help="data root: the hierarchy table applies the routing guards (localiser, header anatomy "
                         "veto) to each stored sample (default ../shared/data/spine)")
    ap.add_argument("--no-guards", dest="guards", action="store_false",
                    help="hierarchy table without the guards (the classifiers alone, as before 0.3.0's rules)")
    ap.add_argument("--min-confidence", type=float, default=None,
                    help="hierarchy table with this [routing] min_confidence (default: the node's 0.5)")
    ap.add_argument("--no-sequence-by-action", dest="by_action", action="store_false",
                    help="hierarchy table with [routing] sequence_by_action = false (an unsure sequence abstains)")
    ap.add_argument("--card", type=Path, action="append",
                    help="summarise the anatomy head of this artefact folder instead (repeatable)")
    a = ap.parse_args()
    if a.card:
        sys.stdout.write("\n\n".join(card_summary(c) for c in a.card) + "\n")
        sys.exit(0)
    from sci_node.config import RoutingRules

    _data = a.data if a.guards else None
    _rules = RoutingRules(sequence_by_action=a.by_action,
                          **({} if a.min_confidence is None else {"min_confidence": a.min_confidence}))
    sys.stdout.write(report(a.models_dir) + "\n" + hierarchy_table(a.models_dir, data=_data, rules=_rules) + "\n")
