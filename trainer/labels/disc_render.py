"""Render a mid-sagittal slice of a spine volume with a millimetre grid, for labelling discs by eye.

The volume is re-indexed to the canonical LPS grid (:func:`sci_node.preprocess.canonicalise`:
array ``(Z, Y, X)`` = inferior->superior, anterior->posterior, right->left; permutation and flips
only, no interpolation). The slice shown is canonical ``X = x`` (default: the cord's median X when
a cord mask is given, else the middle slice), with superior up and anterior left. Grid lines every
``--grid`` canonical voxels, labelled with the canonical index ``z`` (left) and ``y`` (bottom);
``--zoom`` pixels per voxel (the slice is resampled to isotropic display pixels). A position read
off the picture as canonical ``(z, y)`` on slice ``x`` is then turned into LPS mm and the source
file's own voxel index by ``trainer/labels/discs.py``.

    .venv/bin/python -m trainer.labels.disc_render IMAGE.nii.gz OUT.png [--mask CORD.nii.gz] [--x X]
        [--z0 Z --z1 Z] [--y0 Y --y1 Y] [--zoom 3] [--grid 10]

Needs the shared data (``../shared/data/spine``); writes only OUT.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sci_node.imaging.preprocess import canonicalise


def load_canonical(path: Path) -> sitk.Image:
    """The volume (first of a 4-D series) re-indexed to LPS, float32."""
    img = sitk.ReadImage(str(path))
    if img.GetDimension() == 4:
        size = list(img.GetSize())
        size[3] = 0
        img = sitk.Extract(img, size, [0, 0, 0, 0])
    return canonicalise(sitk.Cast(img, sitk.sitkFloat32))


def render(image: Path, out: Path, mask: Path | None = None, x: int | None = None,
           zr: tuple[int | None, int | None] = (None, None), yr: tuple[int | None, int | None] = (None, None),
           zoom: float = 3.0, grid: int = 10, slab: int = 0, clip: float = 97.0) -> dict[str, object]:
    """Write the PNG; return the slice and the canonical grid (for the record)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    can = load_canonical(image)
    arr = sitk.GetArrayFromImage(can)
    if x is None and mask is not None:
        m = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(mask)), can, sitk.Transform(),
                                                 sitk.sitkNearestNeighbor)) > 0.5
        x = int(np.median(np.nonzero(m)[2])) if m.any() else None
    x = arr.shape[2] // 2 if x is None else x
    z0, z1 = max(zr[0] or 0, 0), min(zr[1] or arr.shape[0], arr.shape[0])
    y0, y1 = max(yr[0] or 0, 0), min(yr[1] or arr.shape[1], arr.shape[1])
    sl = arr[z0:z1, y0:y1, max(x - slab, 0):x + slab + 1].mean(axis=2)
    sx, sy, sz = can.GetSpacing()
    lo, hi = np.percentile(sl, [1, clip])
    h_mm, w_mm = sl.shape[0] * sz, sl.shape[1] * sy
    fig = plt.figure(figsize=(w_mm * zoom / 100 + 1.0, h_mm * zoom / 100 + 0.6), dpi=100)
    ax = fig.add_axes((0.8 / (w_mm * zoom / 100 + 1.0), 0.4 / (h_mm * zoom / 100 + 0.6),
                       w_mm * zoom / 100 / (w_mm * zoom / 100 + 1.0), h_mm * zoom / 100 / (h_mm * zoom / 100 + 0.6)))
    # rows: z increasing upward (origin lower); extent in canonical index units
    ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="bilinear",
              extent=(y0 - 0.5, y1 - 0.5, z0 - 0.5, z1 - 0.5), aspect=sz / sy)
    for z in range((z0 // grid + 1) * grid, z1, grid):
        ax.axhline(z, color="yellow" if z % (5 * grid) == 0 else "cyan", lw=0.3, alpha=0.45)
    for y in range((y0 // grid + 1) * grid, y1, grid):
        ax.axvline(y, color="yellow" if y % (5 * grid) == 0 else "cyan", lw=0.3, alpha=0.45)
    ax.set_yticks(range((z0 // grid + 1) * grid, z1, grid))
    ax.set_xticks(range((y0 // grid + 1) * grid, y1, grid))
    ax.tick_params(labelsize=6)
    ax.set_title(f"{image.name}  canonical x={x}±{slab}  (z up = superior, y right = posterior)", fontsize=7)
    fig.savefig(out)
    plt.close(fig)
    return {"x": x, "shape_zyx": list(arr.shape), "spacing_xyz": [sx, sy, sz]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--mask", type=Path)
    ap.add_argument("--x", type=int)
    ap.add_argument("--z0", type=int)
    ap.add_argument("--z1", type=int)
    ap.add_argument("--y0", type=int)
    ap.add_argument("--y1", type=int)
    ap.add_argument("--zoom", type=float, default=3.0)
    ap.add_argument("--grid", type=int, default=10)
    ap.add_argument("--slab", type=int, default=0, help="mean over x-slab..x+slab")
    ap.add_argument("--clip", type=float, default=97.0, help="upper display percentile")
    a = ap.parse_args(argv)
    info = render(a.image, a.out, a.mask, a.x, (a.z0, a.z1), (a.y0, a.y1), a.zoom, a.grid, a.slab, a.clip)
    print(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
