"""Example PNGs for docs/img/: ``python -m trainer.examples`` (synthetic images and lesions),
``python -m trainer.examples models/cord/0.1.0`` (cord predictions on unlabelled real scans),
``python -m trainer.examples --below-conus /tmp/folds/cord/sub-PAM50small`` (the PAM50small
reference's lower end against a held-out fold network, and synthetic canal volumes)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sci_node.imaging import preprocess  # noqa: E402
from trainer.lesions import inject_lesions, lesion_spec  # noqa: E402
from trainer.segment.synth import load_template, synth_volume  # noqa: E402

D = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "spine"
spec = preprocess.PrepSpec()


def example_pngs() -> None:
    """Synthetic images and synthetic lesions → docs/img/{synth,lesion}_examples.png."""
    rows = []
    for img_p, m_p in [("ivadomed-data-testing/sub-unf01/anat/sub-unf01_T2w.nii.gz",
                        "ivadomed-data-testing/derivatives/labels/sub-unf01/anat/sub-unf01_T2w_seg-manual.nii.gz"),
                       ("ivadomed-data-testing/sub-unf01/anat/sub-unf01_T2star.nii.gz",
                        "ivadomed-data-testing/derivatives/labels/sub-unf01/anat/sub-unf01_T2star_seg-manual.nii.gz"),
                       ("sct-testing-data/sub-PAM50small/anat/sub-PAM50small_T2w.nii.gz",
                        "sct-testing-data/derivatives/labels/sub-PAM50small/anat/sub-PAM50small_T2w_seg-manual.nii.gz")]:
        p = preprocess.prepare(sitk.ReadImage(str(D / img_p)), spec)
        cord = preprocess.mask_to_model_grid(sitk.ReadImage(str(D / m_p)), p.grid)
        rows.append((img_p.split("/")[-1].replace(".nii.gz", ""), p.array, cord, tuple(p.grid.GetSpacing()[::-1])))
    tmpl = load_template(D / "pam50-template-labels")
    rng = np.random.default_rng(3)
    im, m, sp = synth_volume(rng, tmpl, (0.8, 0.8))
    rows.append(("synthetic (PAM50 labels)", preprocess.normalise(im, spec), m, sp))
    from trainer.segment.train import load_config

    lspec = dataclasses.replace(lesion_spec(load_config("lesion", None)), count=(2, 3))  # the shipped generator
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3 * len(rows)))
    for r, (name, arr, cord, sp) in enumerate(rows):
        rng = np.random.default_rng(10 + r)
        les_img, les = inject_lesions(rng, arr, cord, sp, lspec)
        z = int(np.argmax(les.sum((1, 2)))) if les.any() else arr.shape[0] // 2
        box = preprocess.roi_bbox(cord[z][None], (0, 20, 20))
        ys, xs = box[1], box[2]
        axes[r, 0].imshow(arr[z, ys, xs], cmap="gray", vmin=0, vmax=1.2)
        axes[r, 0].set_title(f"{name}\naxial z={z}, before")
        axes[r, 1].imshow(les_img[z, ys, xs], cmap="gray", vmin=0, vmax=1.2)
        axes[r, 1].set_title("with synthetic lesion")
        axes[r, 2].imshow(les_img[z, ys, xs], cmap="gray", vmin=0, vmax=1.2)
        axes[r, 2].contour(cord[z, ys, xs], [0.5], colors="y", linewidths=0.8)
        if les[z].any():
            axes[r, 2].contour(les[z, ys, xs], [0.5], colors="r", linewidths=0.8)
        axes[r, 2].set_title("cord (yellow), lesion mask (red)")
        x = int(np.argmax(les.sum((0, 1)))) if les.any() else arr.shape[2] // 2
        axes[r, 3].imshow(les_img[:, :, x], cmap="gray", vmin=0, vmax=1.2, aspect=sp[0] / sp[1], origin="lower")
        if les[:, :, x].any():
            axes[r, 3].contour(les[:, :, x], [0.5], colors="r", linewidths=0.8)
        axes[r, 3].set_title(f"sagittal reformat x={x} (Z spacing {sp[0]:.1f} mm)")
        for a in axes[r]:
            a.axis("off")
    plt.tight_layout()
    plt.savefig("docs/img/lesion_examples.png", dpi=80)
    fig, axes = plt.subplots(2, 5, figsize=(15, 6))
    rng = np.random.default_rng(7)
    for i in range(5):
        im, m, sp = synth_volume(rng, tmpl, (0.8, 0.8))
        im = preprocess.normalise(im, spec)
        z = im.shape[0] // 2
        axes[0, i].imshow(im[z], cmap="gray")
        axes[0, i].contour(m[z], [0.5], colors="r", linewidths=0.8)
        axes[0, i].set_title(f"axial, slab {sp[0]:.1f} mm")
        axes[1, i].imshow(im[:, :, im.shape[2] // 2], cmap="gray", aspect=sp[0] / sp[1], origin="lower")
        axes[1, i].set_title("sagittal reformat")
        for a in axes[:, i]:
            a.axis("off")
    plt.tight_layout()
    plt.savefig("docs/img/synth_examples.png", dpi=80)


def predictions_png(cord_dir: Path, out: Path = Path("docs/img/cord_predictions.png")) -> Path:
    """Overlay the shipped cord model on unlabelled real scans (sagittal lumbar, axial MS, MT)."""
    from sci_node.models.predict_seg import Segmenter

    seg = Segmenter.from_artifact(cord_dir)
    items = [("sub-lumbar T2w (sagittal, no mask)", "sct-tutorial-data/sub-lumbar/anat/sub-lumbar_T2w.nii.gz"),
             ("sub-ms T2w (axial 7.5 mm, no mask)", "sct-tutorial-data/sub-ms/anat/sub-ms_T2w.nii.gz"),
             ("sub-single MT-off (no mask)", "sct-tutorial-data/sub-single/anat/sub-single_acq-MToff_MTS.nii.gz"),
             ("PAM50small T2w, sagittal re-index", "sct-testing-data/sub-PAM50small/anat/sub-PAM50small_T2w.nii.gz")]
    fig, axes = plt.subplots(1, len(items), figsize=(4.5 * len(items), 5))
    for ax, (title, rel) in zip(axes, items):
        img = sitk.ReadImage(str(D / rel))
        if "re-index" in title:
            img = sitk.DICOMOrient(img, "PIL")
        mask = seg.predict(img)
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        k = int(np.argmax(mask.sum((1, 2)))) if mask.any() else arr.shape[0] // 2
        sp = img.GetSpacing()
        ax.imshow(arr[k], cmap="gray", aspect=sp[1] / sp[0])
        if mask[k].any():
            ax.contour(mask[k], [0.5], colors="r", linewidths=0.8)
        ax.set_title(f"{title}\narray slice {k} (first numpy axis)", fontsize=9)
        ax.axis("off")
    plt.tight_layout()
    plt.savefig(out, dpi=80)
    plt.close(fig)
    return out


def below_conus_png(fold_dir: Path, out: Path = Path("docs/img/pam50_below_conus.png")) -> Path:
    """Axial PAM50small slices around the lower end of its reference cord (green) with the
    prediction of ``fold_dir`` (a network that never saw the template, threshold 0.4, red),
    and a row of :func:`trainer.segment.synth.synth_canal_volume` examples."""
    from sci_node.models.predict_seg import Segmenter
    from trainer.segment.synth import synth_canal_volume

    rel = "sct-testing-data/{}/anat/sub-PAM50small_T2w{}.nii.gz"
    img = sitk.ReadImage(str(D / rel.format("sub-PAM50small", "")))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(D / rel.format("derivatives/labels/sub-PAM50small",
                                                                     "_seg-manual"))))
    seg = Segmenter.from_artifact(fold_dir)
    prepared = preprocess.prepare(img, seg.spec)
    pred = seg.finish(seg.predict_prob_model_grid(prepared), prepared, 0.4)
    arr, end = sitk.GetArrayFromImage(img), int(np.nonzero((ref > 0.5).any((1, 2)))[0][0])
    zs, crop = [12, 26, 32, 36, 40, 120], (slice(15, 55), slice(15, 55))
    fig, ax = plt.subplots(2, len(zs), figsize=(2.2 * len(zs), 5.2))
    rng = np.random.default_rng(1)
    for i, z in enumerate(zs):
        ax[0, i].imshow(arr[z][crop], cmap="gray")
        for m, colour in ((ref[z][crop] > 0.5, "lime"), (pred[z][crop], "red")):
            if m.any():
                ax[0, i].contour(m, [0.5], colors=colour, linewidths=1)
        ax[0, i].set_title(f"slice {z} ({(z - end) * 2:+d} mm)", fontsize=8)
        syn, _, sp = synth_canal_volume(rng)
        ax[1, i].imshow(syn[syn.shape[0] // 2], cmap="gray")
        ax[1, i].set_title(f"synthetic canal, {sp[0]:.1f} mm", fontsize=8)
    for a in ax.ravel():
        a.axis("off")
    fig.suptitle(f"PAM50small: reference cord (green) ends at slice {end}; held-out fold network (red)", fontsize=9)
    plt.tight_layout()
    plt.savefig(out, dpi=70)
    plt.close(fig)
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "--below-conus":
        below_conus_png(Path(sys.argv[2]))
    elif len(sys.argv) > 1:  # python -m trainer.examples models/cord/0.1.0
        predictions_png(Path(sys.argv[1]))
    else:
        example_pngs()
