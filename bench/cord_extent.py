"""Benchmark: cord Dice on the whole volume and within the reference's superior-inferior extent.

Prints numbers, never passes or fails. For each labelled case of the shared data that the cord
artefact never trained on (:func:`trainer.segment.recalibrate.unseen_cases`), the artefact's own
prediction at its card's setting (:meth:`sci_node.models.predict_seg.Segmenter.predict`) is scored against
the reference mask twice: on the whole volume, and on the slab of slices (along the array axis
closest to the patient's S-I axis) from the reference's lowest to its highest labelled slice. The
two differ where the reference stops before the field of view does and the prediction goes on (a
mask drawn on the cervical cord only, the prediction continuing into the medulla). Needs
``../shared/data/spine`` (our machines only).

    .venv/bin/python bench/cord_extent.py [--artifact models/cord/0.2.3]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def si_axis(image: sitk.Image) -> int:
    """The numpy axis (of ``GetArrayFromImage``'s ``(Z, Y, X)``) closest to the patient S-I axis."""
    d = np.asarray(image.GetDirection()).reshape(3, 3)  # columns: the image axes x, y, z in LPS
    return 2 - int(np.argmax(np.abs(d[2, :])))


def extent_scores(pred: np.ndarray, truth: np.ndarray, axis: int) -> dict[str, float | int | str]:
    """Dice of boolean ``(Z, Y, X)`` masks on the whole volume and within ``truth``'s extent along ``axis``."""
    from trainer.studies.infer_check import dice

    other = tuple(i for i in range(3) if i != axis)
    has = np.nonzero(truth.any(axis=other))[0]
    lo, hi = int(has.min()), int(has.max())
    cut = tuple(slice(lo, hi + 1) if i == axis else slice(None) for i in range(3))
    return {"dice": round(dice(pred, truth), 4), "dice_within_reference_extent": round(dice(pred[cut], truth[cut]), 4),
            "reference_slices": f"{lo}-{hi} of {truth.shape[axis]}",
            "predicted_voxels_outside_extent": int(pred.sum() - pred[cut].sum())}


def main() -> int:
    from sci_node.models.predict_seg import Segmenter, configure_threads
    from trainer.segment import data as tdata
    from trainer.segment.recalibrate import unseen_cases
    from trainer.segment.train import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=REPO / "models" / "cord" / "0.2.3")
    args = ap.parse_args()
    configure_threads(1)
    seg = Segmenter.from_artifact(args.artifact)
    whole: list[float] = []
    within: list[float] = []
    for case in unseen_cases(seg.card, load_config("cord", None)):
        image, mask = tdata.load_case(case)
        row = extent_scores(seg.predict(image).astype(bool), sitk.GetArrayFromImage(mask) > 0.5, si_axis(image))
        whole.append(float(row["dice"]))
        within.append(float(row["dice_within_reference_extent"]))
        print(json.dumps({"case": case.key, **row}), flush=True)
    print(json.dumps({"artifact": str(args.artifact), "cases": len(whole), "dice_mean": round(float(np.mean(whole)), 4),
                      "dice_min": min(whole), "within_extent_mean": round(float(np.mean(within)), 4),
                      "within_extent_min": min(within)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
