"""Synthetic follow-ups (issue 39): new lesions the active lesion model never trained on, found as new?

Prints numbers, never passes or fails. For every labelled scan of a person the active lesion model
never trained on (``trainer/configs/lesion_families_eval.toml``'s data; needs ``../shared/data/spine``)
the scan itself is the prior; each follow-up is the same scan with lesions painted in by one lesion
family the model did not train on (:mod:`trainer.lesion_families`, on the raw intensities), moved
rigidly (1.5 degrees, ~2 mm) and given another noise draw (2 % of the cord's median). Both go
through the node's pipeline (``sci-node infer``'s path), then :func:`sci_node.imaging.followup.compare`.
Per follow-up: the painted lesions found as new or enlarging (a painted lesion counts as found when
a new-or-enlarging component touches it), and the new-or-enlarging components that touch no
painted lesion (false new).

    .venv/bin/python bench/followup_synthetic.py [--families columns field swelling [perivenular]] [--cases 8]
        [--skip 0] [--seed 0] [--paint-seed 0] [--models-dir D] [--rule KEY=VALUE] [--json-out F]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONN26 = np.ones((3, 3, 3), bool)


def moved(img: sitk.Image, masks: list[np.ndarray], rng: np.random.Generator) -> tuple[sitk.Image, list[np.ndarray]]:
    """``img`` (linear, background fill) and masks (nearest) after a small rigid motion, on the same grid."""
    t = sitk.Euler3DTransform()
    t.SetCenter(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
    t.SetRotation(*np.deg2rad(rng.uniform(-1.5, 1.5, 3)))
    t.SetTranslation([float(v) for v in rng.uniform(-2, 2, 3)])
    fill = float(np.median(sitk.GetArrayViewFromImage(img)))
    out = sitk.Resample(img, img, t, sitk.sitkLinear, fill)
    res = []
    for m in masks:
        mi = sitk.GetImageFromArray(m.astype(np.uint8))
        mi.CopyInformation(img)
        res.append(sitk.GetArrayFromImage(sitk.Resample(mi, img, t, sitk.sitkNearestNeighbor, 0)))
    return out, res


def segment(pipeline, img: sitk.Image, folder: Path):  # noqa: ANN001, ANN201 - a bench
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "image.nii.gz"
    sitk.WriteImage(img, str(path))
    return pipeline.run_nifti(path, folder).segmented




def main() -> int:
    from sci_node.config import load_config
    from sci_node.imaging import followup
    from sci_node.imaging.measure import index_to_lps, si_axis
    from sci_node.models.registry import ModelRegistry
    from sci_node.pipeline.run import Pipeline
    from trainer.lesion_families import LesionSource, family_generator
    from trainer.lesions import lesion_spec
    from trainer.segment import data as tdata
    from trainer.segment.evaluate import lesion_trials
    from trainer.segment.recalibrate import unseen_cases
    from trainer.segment.train import load_config as load_train_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the three families every recorded run used (docs/followup.md); perivenular by naming it
    ap.add_argument("--families", nargs="+", default=["columns", "field", "swelling"])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--skip", type=int, default=0, help="start at this unseen case (a fresh set of follow-ups)")
    ap.add_argument("--seed", type=int, default=0, help="the motion/noise draw (a fresh draw on the same cases)")
    ap.add_argument("--paint-seed", type=int, default=0, help="the lesions' draw (another set of painted lesions)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--models-dir", type=Path, help="another model registry (default: the repo's models/)")
    ap.add_argument("--rule", action="append", default=[], metavar="KEY=VALUE",
                    help="override a FollowupRules field (e.g. diff_min_mm3=5)")
    args = ap.parse_args()
    from common import parse_rules

    rules = parse_rules(args.rule)
    extra = {"models_dir": str(args.models_dir)} if args.models_dir else {}
    cfg = load_config(None, {"log_level": "WARNING", **extra})
    registry = ModelRegistry(cfg.models_dir)
    pipeline = Pipeline(registry.load_active("cpu"), cfg.routing, "cpu", cfg.max_missing_fraction)
    lesion_dir = cfg.models_dir / "lesion" / registry.active()["lesion"]
    card = json.loads((lesion_dir / "card.json").read_text())
    tcfg = load_train_config("lesion", REPO / "trainer" / "configs" / "lesion_families_eval.toml")
    spec = lesion_spec(tcfg, "test_generator")
    cases = unseen_cases(card, tcfg)[args.skip:args.skip + args.cases]
    print(json.dumps({"cases": [c.key for c in cases]}), flush=True)
    rows = []
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="scinode-fu-synth-") as tmp:
        for case in cases:
            image, mask = tdata.load_case(case)
            prior_seg = None
            for fam in args.families:
                source = LesionSource((fam,), (family_generator(fam, spec),))
                ((img, _cord, truth),) = lesion_trials(image, mask, source, 1, args.paint_seed)
                arr = sitk.GetArrayFromImage(img)
                med = float(np.median(arr[_cord > 0])) if _cord.any() else float(np.median(arr))
                noisy = sitk.GetImageFromArray(arr + rng.normal(0, 0.02 * med, arr.shape).astype(np.float32))
                noisy.CopyInformation(img)
                cur_img, (cur_truth,) = moved(noisy, [truth], rng)
                if prior_seg is None:
                    from sci_node.imaging.preprocess import as_scalar_float, canonicalise

                    prior_seg = segment(pipeline, canonicalise(as_scalar_float(image)), Path(tmp) / case.key / "prior")
                cur_seg = segment(pipeline, cur_img, Path(tmp) / case.key / fam)
                if prior_seg is None or cur_seg is None:
                    rows.append({"case": case.key, "family": fam, "segmented": False})
                    continue
                m = index_to_lps(cur_seg.image.GetOrigin(), cur_seg.image.GetSpacing(), cur_seg.image.GetDirection())
                t0 = time.perf_counter()
                empty = lambda s: s.lesion if s.lesion is not None else np.zeros_like(s.cord)  # noqa: E731
                res = followup.compare(prior_seg.image, prior_seg.cord, empty(prior_seg), cur_seg.image, cur_seg.cord,
                                       empty(cur_seg), si_axis(m), rules)
                seconds = time.perf_counter() - t0
                lab, n = ndi.label(cur_truth > 0, structure=CONN26)
                flagged = res.new_or_enlarging if res.new_or_enlarging is not None else np.zeros_like(lab)
                found = sum(1 for i in range(1, n + 1) if (flagged[lab == i] > 0).any())
                flab, fn = ndi.label(flagged > 0, structure=CONN26)
                false_ids = [i for i in range(1, fn + 1) if not (cur_truth[flab == i] > 0).any()]
                false_new = len(false_ids)
                model = empty(cur_seg) > 0  # a false component on the lesion model's mask, else the subtraction's
                false_by_model = sum(1 for i in false_ids if (model[flab == i]).any())
                row = {"case": case.key, "family": fam, "compared": res.check.passed, "cord_dice": res.check.cord_dice,
                       "painted": n, "found_new": found, "false_new": false_new,
                       "false_new_lesion_model": false_by_model, "false_new_subtraction": false_new - false_by_model,
                       "counts": res.counts(),
                       "seconds": round(seconds, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    done = [r for r in rows if r.get("compared")]
    for fam in [*args.families, "all"]:
        sel = [r for r in done if fam in ("all", r["family"])]
        painted = sum(r["painted"] for r in sel)
        print(json.dumps({"summary": fam, "follow_ups": len(sel), "not_compared": sum(
            1 for r in rows if fam in ("all", r["family"]) and not r.get("compared")),
            "painted_lesions": painted, "sensitivity": round(sum(r["found_new"] for r in sel) / painted, 3)
            if painted else None, "false_new_per_follow_up": round(sum(r["false_new"] for r in sel) / len(sel), 3)
            if sel else None}))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
