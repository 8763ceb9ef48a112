"""CPU latency of segmentation inference (``Segmenter.predict``) on real volumes of the shared data.

Usage::

    .venv/bin/python bench/seg_latency.py --artifact models/cord/0.1.0 [--threads 2] [--repeat 3]
    .venv/bin/python bench/seg_latency.py --config trainer/configs/cord_2p5d.toml   # random weights:
                                                      # latency does not depend on the weight values

Prints one line per volume: shape, seconds (median of ``--repeat``), and for labelled volumes
the Dice against the reference mask (meaningless with ``--config``: untrained weights).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import SimpleITK as sitk
import torch

from sci_node.models.predict_seg import Segmenter

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spine"
VOLUMES = [
    ("sub-unf01 T2w axial 1 mm", "ivadomed-data-testing/sub-unf01/anat/sub-unf01_T2w.nii.gz",
     "ivadomed-data-testing/derivatives/labels/sub-unf01/anat/sub-unf01_T2w_seg-manual.nii.gz"),
    ("sub-05 MT-on axial 5 mm", "sct-tutorial-data/sub-05/anat/sub-05_acq-MTon_MTS.nii.gz",
     "sct-tutorial-data/derivatives/labels/sub-05/anat/sub-05_acq-MTon_MTS_seg-manual.nii.gz"),
    ("PAM50small T2w 1x1x2 mm", "sct-testing-data/sub-PAM50small/anat/sub-PAM50small_T2w.nii.gz",
     "sct-testing-data/derivatives/labels/sub-PAM50small/anat/sub-PAM50small_T2w_seg-manual.nii.gz"),
    ("sub-lumbar T2w sagittal", "sct-tutorial-data/sub-lumbar/anat/sub-lumbar_T2w.nii.gz", None),
    ("sub-ms T2w axial 7.5 mm", "sct-tutorial-data/sub-ms/anat/sub-ms_T2w.nii.gz", None),
]


def _segmenter(args: argparse.Namespace) -> Segmenter:
    if args.artifact:
        return Segmenter.from_artifact(args.artifact)
    from sci_node.models.artifact import build_network
    from trainer.segment.train import load_config, prep_spec

    cfg = load_config("cord", args.config)
    card = {"name": cfg["model"]["name"], "version": "bench", "kind": "segmentation",
            "architecture": {"class": cfg["network"]["class"], "args": cfg["network"]["args"]},
            "preprocessing": prep_spec(cfg).to_card(), "postprocessing": cfg.get("post", {})}
    return Segmenter(build_network(card).eval(), card)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--artifact", type=Path)
    p.add_argument("--config", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seg = _segmenter(args)
    n_par = sum(x.numel() for x in seg.net.parameters())
    print(f"model {seg.name} {seg.version} context={seg.spec.context} params={n_par} threads={args.threads}")
    for name, img_p, mask_p in VOLUMES:
        image = sitk.ReadImage(str(DATA / img_p))
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            pred = seg.predict(image)
            times.append(time.perf_counter() - t0)
        line = f"{name:28s} size={image.GetSize()} {statistics.median(times):6.2f} s"
        if mask_p:
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / mask_p))) > 0
            dice = 2 * float((pred.astype(bool) & truth).sum()) / float(pred.sum() + truth.sum())
            line += f"  dice={dice:.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
