"""Markdown table of the LOSO validation metrics in segmentation model cards.

``python -m trainer.seg_report models/cord/0.1.0 models/lesion/0.1.0 [/tmp/cord_2p5d ...]``
(a folder with ``card.json`` or a comparison run's ``loso_metrics.json``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _metrics(folder: Path) -> tuple[str, dict[str, Any]]:
    if (folder / "card.json").is_file():
        card = json.loads((folder / "card.json").read_text())
        return f"{card['name']} {card['version']}", card["metrics"]
    return folder.name, json.loads((folder / "loso_metrics.json").read_text())["metrics"]


def _fmt(v: Any) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def table(folders: list[Path]) -> str:
    """One row per held-out case: model, subject, contrast, Dice, HD95 (mm), lesion-wise P/R/F1,
    false lesions on the lesion-free image, and the setting it was scored at (the threshold and,
    for the lesion model, the smallest lesion kept — chosen on the other folds)."""
    rows = ["| model | held-out subject | contrast | Dice | HD95 (mm) | lesion P | lesion R | lesion F1 "
            "| false lesions, lesion-free image | threshold / min. volume (mm³) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for f in folders:
        name, m = _metrics(f)
        for key, r in sorted(m.get("per_case", {}).items()):
            setting = _fmt(r.get("threshold")) + ("" if r.get("min_volume_mm3") is None
                                                  else f" / {r['min_volume_mm3']:g}")
            rows.append(f"| {name} | {r['subject']} | {r['contrast']} | {_fmt(r['dice'])} | {_fmt(r.get('hd95_mm'))} "
                        f"| {_fmt(r.get('lesion_precision'))} | {_fmt(r.get('lesion_recall'))} "
                        f"| {_fmt(r.get('lesion_f1'))} | {_fmt(r.get('false_lesions_lesion_free'))} | {setting} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table([Path(a) for a in sys.argv[1:]]))
