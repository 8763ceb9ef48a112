"""Markdown LOSO validation tables of the routing classifiers, from their model cards.

``python -m trainer.cls_report [MODELS_DIR]`` prints the tables written into ``docs/classifiers.md``
(for the versions active in ``MODELS_DIR/registry.json``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sci_node.registry import ModelRegistry

REPO = Path(__file__).resolve().parent.parent


def _fmt(v: object) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def report(models_dir: Path, versions: dict[str, str] | None = None) -> str:
    """Summary table (one row per head) and per-group tables for the classifiers.

    ``versions`` maps model name to version; default: the registry's active versions.
    """
    reg = ModelRegistry(models_dir)
    versions = versions or reg.active()
    lines = ["| model | head | LOSO acc. all held-out samples (n) | real crops (n) | stored real volumes (n) | "
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
    return "\n".join(lines) + "\n" + "\n".join(groups) + "\n"


if __name__ == "__main__":
    sys.stdout.write(report(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "models"))
