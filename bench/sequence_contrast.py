"""Benchmark: image-only sequence accuracy with and without the cord-contrast check.

Prints numbers, never passes or fails. The active ``sequence`` card holds, for every stored real
series, the probabilities of a fold network that never trained on its person, with the header and
again with the header removed (``metrics.sequence.real_series.predictions``). This script adds
what the node does after the cord is segmented (:mod:`sci_node.routing.contrast_rules`,
:func:`sci_node.routing.recheck_sequence`): for every spine series the active cord model segments
the stored image, the CSF/cord contrast is measured around that mask, and a fired rule replaces a
network-decided T1w/T2w/T2*w (with the header, the header rules decided every series here, so the
check never runs there). Non-spine series have no cord and keep the network's class. One JSON
line per spine series, then the totals. ``--mask erode|dilate`` moves the cord mask's outline by
one voxel first (how much the measure depends on the segmentation). ``--cards DIR ...`` scores the mean
of several sequence cards' out-of-fold probabilities instead (e.g. the same recipe trained with other
seeds: the stored series have the same sample indices in every card). Needs ``../shared/data/spine``.

    .venv/bin/python bench/sequence_contrast.py [--mask as-is|erode|dilate] [--cards DIR [DIR ...]]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CORD_CLASSES = ("T1w", "T2w", "T2starw")


def spine_contrasts(data: Path, segmenter: Any, mask_op: str) -> tuple[dict[int, Any], dict[int, Any]]:
    """``(source by sample index, CordContrast by sample index)`` of every stored real sample; the
    contrast (:mod:`sci_node.routing.contrast_rules`) around the cord model's mask, for spine sources only."""
    from scipy import ndimage  # type: ignore[import-untyped]

    from sci_node.routing import contrast_rules
    from trainer.studies.cls_report import stored_sources

    sources: dict[int, Any] = {}
    contrasts: dict[int, Any] = {}
    for indices, src, image, _ in stored_sources(data, REPO / "trainer" / "configs" / "sequence.toml"):
        sources.update({i: src for i in indices})
        if src.anatomy != "spine":
            continue
        if image.GetDimension() == 4:
            image = image[:, :, :, 0]
        mask = np.asarray(segmenter.predict(image), dtype=bool)
        if mask_op == "erode":
            mask = ndimage.binary_erosion(mask)
        elif mask_op == "dilate":
            mask = ndimage.binary_dilation(mask)
        c = contrast_rules.cord_contrast(sitk.GetArrayFromImage(image), mask, image.GetSpacing()[::-1])
        contrasts.update({i: c for i in indices})
    return sources, contrasts


def main() -> int:
    from sci_node.models.predict_seg import Segmenter, configure_threads
    from sci_node.models.registry import ModelRegistry
    from sci_node.routing import contrast_rules
    from trainer.classify.ensemble import mean_predictions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "spine")
    ap.add_argument("--mask", choices=("as-is", "erode", "dilate"), default="as-is")
    ap.add_argument("--cards", type=Path, nargs="+",
                    help="sequence artefact folders to average (default: the active one)")
    args = ap.parse_args()
    configure_threads(2)
    reg = ModelRegistry(REPO / "models")
    active = reg.active()
    cards = args.cards or [reg.path_of("sequence", active["sequence"])]
    preds = mean_predictions([json.loads((Path(c) / "card.json").read_text()) for c in cards], "sequence")
    sources, measured = spine_contrasts(args.data, Segmenter.from_artifact(reg.path_of("cord", active["cord"])),
                                        args.mask)
    totals = {c: {"n": 0, "network": 0, "with_check": 0, "spine_n": 0, "spine_network": 0, "spine_with_check": 0}
              for c in ("header_removed", "with_header")}
    for p in preds:
        src = sources[p["i"]]
        if src.group != p["group"] or p["true"] is None:
            continue
        spine = src.anatomy == "spine"
        c = measured.get(p["i"])
        rule = contrast_rules.sequence_from_contrast(c)
        net = max(p["probs"], key=p["probs"].get)
        final = rule.label if (rule.label and net in CORD_CLASSES and p["condition"] == "header_removed") else net
        t = totals[p["condition"]]
        for key, ok in (("n", 1), ("network", net == p["true"]), ("with_check", final == p["true"])):
            t[key] += int(ok)
            t["spine_" + key] += int(ok) if spine else 0
        if spine and p["condition"] == "header_removed":
            print(json.dumps({"series": Path(src.path).name, "group": src.group, "true": p["true"], "network": net,
                              "p": round(p["probs"][net], 3),
                              "csf_to_cord": None if c is None else round(c.csf_to_cord, 3),
                              "rule": rule.rule, "after_check": final}))
    for cond, t in totals.items():
        print(json.dumps({"condition": cond, "mask": args.mask,
                          "sequence_cards": [str(c) for c in args.cards] if args.cards else active["sequence"],
                          "cord": active["cord"], **t,
                          "accuracy_network": round(t["network"] / max(1, t["n"]), 3),
                          "accuracy_with_check": round(t["with_check"] / max(1, t["n"]), 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
