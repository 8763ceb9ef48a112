"""Does the cord stay whole through a lesion? (issue 34 item 4)

For a cord artefact (default: the active one), every labelled scan of a person it never trained on
(:func:`trainer.seg_recalibrate.unseen_cases`, ``trainer/configs/cord.toml``'s data) is segmented
clean, and again with lesions of each lesion family painted in (:func:`trainer.seg_eval.lesion_trials`,
``--trials`` per scan and family; the reference is the scan's cord, swollen where the family swells
it). Per family it prints:

* ``dice_drop_mean`` / ``dice_drop_max``: cord Dice of the clean scan minus that of the lesion copy
  (target: at most 0.01);
* ``csa_ratio_min`` / ``csa_ratio_p5`` and ``lesions_below_0_7``: per lesion, the smallest predicted cord
  cross-section (mm², axial slices of the canonical grid) over the lesion's slices against the median
  of the predicted cross-sections 5-15 mm above and below it (target: at least 0.7).

::

    .venv/bin/python bench/cord_through_lesions.py [--artifact models/cord/0.2.3] [--trials 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two ``(Z, Y, X)`` masks (1.0 when both are empty)."""
    a, b = a > 0, b > 0
    s = float(a.sum() + b.sum())
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / s


def csa_ratios(pred: np.ndarray, lesion: np.ndarray, spacing: tuple[float, float, float]) -> list[float]:
    """Per 26-connected lesion of ``lesion``: min predicted cord area over its Z slices / the median
    predicted area of the slices 5-15 mm beyond its ends (``(Z, Y, X)``, canonical: Z along the cord)."""
    area = (pred > 0).sum(axis=(1, 2)) * spacing[1] * spacing[2]
    comp, n = ndi.label(lesion > 0, structure=np.ones((3, 3, 3), bool))
    out = []
    for i in range(1, n + 1):
        zs = np.nonzero((comp == i).any(axis=(1, 2)))[0]
        lo, hi = int(zs.min()), int(zs.max())
        near = [z for z in range(area.size) if 5.0 <= min(abs(z - lo), abs(z - hi)) * spacing[0] <= 15.0
                and not lo <= z <= hi]
        ref = float(np.median(area[near])) if near else 0.0
        if ref > 0:
            out.append(float(area[lo:hi + 1].min()) / ref)
    return out


def score(artifact: Path | None, trials: int, families: list[str]) -> dict[str, Any]:
    """The per-family table of the module docstring."""
    import SimpleITK as sitk

    from sci_node.imaging import preprocess
    from sci_node.models.predict_seg import Segmenter
    from sci_node.models.registry import ModelRegistry
    from trainer.lesion_families import LesionSource, family_generator
    from trainer.segment import data as tdata
    from trainer.segment.evaluate import lesion_trials
    from trainer.segment.recalibrate import unseen_cases
    from trainer.segment.train import load_config

    if artifact is None:
        reg = ModelRegistry(REPO / "models")
        artifact = reg.path_of("cord", reg.active()["cord"])
    seg = Segmenter.from_artifact(artifact)
    cases = unseen_cases(seg.card, load_config("cord", None))
    rows: dict[str, dict[str, list[float]]] = {f: {"drop": [], "csa": []} for f in families}
    clean_dice = []
    for case in cases:
        image, mask = tdata.load_case(case)
        img_c = preprocess.canonicalise(preprocess.as_scalar_float(image))
        ref = sitk.GetArrayFromImage(preprocess.canonicalise(mask)) > 0
        sp = tuple(float(s) for s in img_c.GetSpacing()[::-1])
        base = dice(seg.predict(img_c), ref)
        clean_dice.append(base)
        for fam in families:
            source = LesionSource((fam,), (family_generator(fam),))
            for img, cord, les in lesion_trials(image, mask, source, trials, 0):
                if not les.any():
                    continue
                pred = seg.predict(img)
                rows[fam]["drop"].append(base - dice(pred, cord))
                rows[fam]["csa"].extend(csa_ratios(pred, les, sp))  # type: ignore[arg-type]
    out: dict[str, Any] = {"artifact": str(artifact), "scans": len(cases), "trials": trials,
                           "clean_dice_mean": round(float(np.mean(clean_dice)), 4)}
    for fam, r in rows.items():
        csa = np.asarray(r["csa"])
        out[fam] = {"copies": len(r["drop"]), "dice_drop_mean": round(float(np.mean(r["drop"])), 4),
                    "dice_drop_max": round(float(np.max(r["drop"])), 4), "lesions": int(csa.size),
                    "csa_ratio_min": round(float(csa.min()), 3) if csa.size else None,
                    "csa_ratio_p5": round(float(np.percentile(csa, 5)), 3) if csa.size else None,
                    "lesions_below_0_7": int((csa < 0.7).sum())}
    return out


def main(argv: list[str] | None = None) -> int:
    from trainer.lesion_families import FAMILIES

    p = argparse.ArgumentParser(prog="bench/cord_through_lesions.py")
    p.add_argument("--artifact", type=Path, default=None, help="default: the active cord model")
    p.add_argument("--trials", type=int, default=2, help="lesion copies per scan and family")
    p.add_argument("--family", action="append", help="only this family (repeatable; default: all)")
    a = p.parse_args(argv)
    sys.stdout.write(json.dumps(score(a.artifact, a.trials, a.family or list(FAMILIES))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
