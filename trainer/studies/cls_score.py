"""Score the active routing classifiers on a labelled folder: accuracy per level and confusion matrices.

``python -m trainer.cls_score FOLDER [--labels CSV] [--anatomy spine] [--no-header] [--json]``

Series are found as ``sci-node infer`` finds them (:func:`sci_node.pipeline.batch.find_inputs`). The
true labels of a series come from, in this order:

1. the CSV (``--labels``): columns ``path`` (file or folder relative to FOLDER, or a
   SeriesInstanceUID) and any of ``anatomy``, ``region``, ``view``, ``sequence`` (empty = unknown);
2. the BIDS suffix of a NIfTI file name: ``T1w`` -> T1w, ``T2w`` -> T2w, ``T2star``/``T2starw``
   -> T2starw, ``MTS``/``bold``/``dwi``/``FLAIR``/``PD``/``STIR``/``epi`` -> other;
3. ``--anatomy`` / ``--region`` for every series of the folder;
4. the view: the plane of the stored slices (:func:`sci_node.routing.cls_features.view_of_image`, the
   definition the classifier is trained on) when the CSV does not give it.

Every level is scored on every series (no early stop of the routing hierarchy), with the
node's abstention threshold (``[routing] min_confidence``): an abstention counts as an error
and is reported as the ``abstained`` column of the confusion matrix.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from sci_node.errors import ConfigError, SciNodeError

LEVEL_MODEL = {"anatomy": "anatomy", "region": "region_view", "view": "region_view", "sequence": "sequence"}
BIDS_SEQUENCE = {"T1w": "T1w", "T2w": "T2w", "T2star": "T2starw", "T2starw": "T2starw", "MTS": "other",
                 "bold": "other", "dwi": "other", "FLAIR": "other", "PD": "other", "PDw": "other", "STIR": "other",
                 "epi": "other"}
_SUFFIX = re.compile(r"_([A-Za-z0-9]+)\.nii(\.gz)?$")


def read_label_csv(path: Path) -> dict[str, dict[str, str]]:
    """CSV rows keyed by ``path``; empty cells dropped.

    Raises
    ------
    ConfigError
        No ``path`` column, or an unknown column.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    cols = set(rows[0]) if rows else set()
    bad = cols - {"path", *LEVEL_MODEL}
    if rows and ("path" not in cols or bad):
        raise ConfigError(f"label CSV {str(path)!r}: needs a 'path' column and only {sorted(LEVEL_MODEL)} "
                          f"(unknown: {sorted(bad)})")
    return {r["path"].strip(): {k: v.strip() for k, v in r.items() if k != "path" and v and v.strip()} for r in rows}


def bids_labels(name: str) -> dict[str, str]:
    """Labels a BIDS file name implies (its suffix -> sequence)."""
    m = _SUFFIX.search(name)
    seq = BIDS_SEQUENCE.get(m.group(1)) if m else None
    return {"sequence": seq} if seq else {}


def labels_for(item: Any, root: Path, table: Mapping[str, Mapping[str, str]], defaults: Mapping[str, str]
               ) -> dict[str, str]:
    """True labels of one :class:`sci_node.pipeline.batch.BatchItem` (see the module docstring for the order)."""
    out = dict(defaults)
    if item.kind == "nifti":
        out.update(bids_labels(Path(item.files[0]).name))
    keys = [item.key]
    for f in item.files:
        rel = Path(f).resolve().relative_to(root.resolve()) if root.resolve() in Path(f).resolve().parents else Path(f)
        keys += [str(rel), str(rel.parent)]
    for k in keys:
        if k in table:
            out.update(table[k])
            break
    return out


def confusion(pairs: Sequence[tuple[str, str]], classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """``truth -> predicted -> count`` over ``classes`` plus ``abstained``."""
    cols = [*classes, "abstained"]
    out = {t: {p: 0 for p in cols} for t in classes}
    for t, p in pairs:
        if t in out:
            out[t][p if p in cols else "abstained"] += 1
    return out


def score_folder(folder: Path, models_dir: Path, min_confidence: float, table: Mapping[str, Mapping[str, str]],
                 defaults: Mapping[str, str], use_header: bool = True) -> dict[str, Any]:
    """Classify every series of ``folder`` and score each level against its labels."""
    from sci_node.pipeline.batch import find_inputs
    from sci_node.pipeline.route_report import load_classifiers, load_item
    from sci_node.routing.cls_features import view_of_image

    classifiers = load_classifiers(models_dir)
    pairs: dict[str, list[tuple[str, str]]] = {lv: [] for lv in LEVEL_MODEL}
    series = []
    for item in find_inputs(folder):
        truth = labels_for(item, folder, table, defaults)
        try:
            image, evidence = load_item(item)
        except SciNodeError as exc:
            series.append({"name": item.name, "error": f"{type(exc).__name__}: {exc}", "truth": truth})
            continue
        truth.setdefault("view", view_of_image(image))
        pred: dict[str, str] = {}
        for name, clf in classifiers.items():
            probs, _ = clf.predict_explained(image, evidence if use_header else None)
            for head, p in probs.items():
                d = clf.decide(p, min_confidence)
                pred[head] = d.label if d.label is not None else "abstained"
        for lv in LEVEL_MODEL:
            if truth.get(lv):
                pairs[lv].append((truth[lv], pred[lv]))
        series.append({"name": item.name, "truth": truth, "predicted": pred})
    levels = {}
    for lv, ps in pairs.items():
        classes = classifiers[LEVEL_MODEL[lv]].heads[lv]
        levels[lv] = {"n": len(ps), "accuracy": round(sum(t == p for t, p in ps) / len(ps), 4) if ps else None,
                      "abstained": sum(p == "abstained" for _, p in ps), "confusion": confusion(ps, classes)}
    return {"folder": str(folder), "header": use_header, "min_confidence": min_confidence,
            "versions": {n: c.version for n, c in classifiers.items()}, "levels": levels, "series": series}


def format_markdown(result: Mapping[str, Any]) -> str:
    """Accuracy table and one confusion matrix per level (Markdown)."""
    lines = ["| level | series | accuracy | abstained |", "|---|---|---|---|"]
    for lv, m in result["levels"].items():
        acc = "–" if m["accuracy"] is None else f"{m['accuracy']:.3f}"
        lines.append(f"| {lv} | {m['n']} | {acc} | {m['abstained']} |")
    for lv, m in result["levels"].items():
        if not m["n"]:
            continue
        cols = list(next(iter(m["confusion"].values())))
        lines += ["", f"**{lv}** (rows: truth, columns: predicted)", "",
                  "| truth \\ predicted | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for t, row in m["confusion"].items():
            if sum(row.values()):
                lines.append(f"| {t} | " + " | ".join(str(row[c]) for c in cols) + " |")
    errors = [s for s in result["series"] if "error" in s]
    if errors:
        lines += ["", "Not readable: " + "; ".join(f"{s['name']} ({s['error']})" for s in errors)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring); returns the exit code."""
    from sci_node.config import load_config
    from sci_node.logs import configure_logging

    p = argparse.ArgumentParser(prog="python -m trainer.cls_score", description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--labels", type=Path, help="CSV: path, anatomy, region, view, sequence")
    p.add_argument("--anatomy", help="anatomy of every series without a CSV label (e.g. spine)")
    p.add_argument("--region", help="region of every series without a CSV label (e.g. cervical)")
    p.add_argument("--no-header", dest="header", action="store_false", help="score without header evidence")
    p.add_argument("--models-dir", type=Path, help="model registry (default: the node config's)")
    p.add_argument("--config", type=Path, help="node config TOML ([routing] min_confidence)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, {"models_dir": args.models_dir, "log_level": "WARNING"})
        configure_logging(cfg.log_format, cfg.log_level)
        table = read_label_csv(args.labels) if args.labels else {}
        defaults = {k: v for k, v in (("anatomy", args.anatomy), ("region", args.region)) if v}
        result = score_folder(args.folder, cfg.models_dir, cfg.routing.min_confidence, table, defaults, args.header)
    except SciNodeError as exc:
        print(f"cls_score: error: {exc}", file=sys.stderr)
        return exc.exit_code
    sys.stdout.write((json.dumps(result, indent=2) if args.json else format_markdown(result)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
