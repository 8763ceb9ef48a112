"""Synthetic classifier samples: PAM50 spines in any view/region/contrast, and non-anatomical phantoms.

Spines (SynthSeg idea): the PAM50 label maps (cord WM/GM, CSF, spinal canal region) at
1 mm get random per-tissue intensities drawn around the contrast of the sampled sequence
(T1w: CSF dark; T2w: CSF bright; T2*w: GM brighter than WM, CSF bright; other: flat),
a smooth textured background, a bias field, then are resampled onto a random acquisition
grid (sagittal/axial/coronal, tilt up to 12 degrees, realistic spacing and slice counts).
The region label is the vertebral level (``PAM50_levels``) at the centre of the field of view.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from sci_node.errors import DataError
from sci_node.routing.evidence import HeaderEvidence
from trainer.classify.data import REGION, SEQUENCE, VIEW, level_to_region, sample_header

# mean intensity of (wm, gm, csf, canal, background) per sequence class
_CONTRAST = {"T1w": (0.75, 0.65, 0.15, 0.5, 0.45), "T2w": (0.35, 0.45, 0.95, 0.4, 0.35),
             "T2starw": (0.3, 0.6, 0.85, 0.35, 0.3), "other": (0.5, 0.55, 0.55, 0.45, 0.4)}


@dataclass(frozen=True)
class Pam50:
    """PAM50 label maps at 1 mm as SimpleITK images (LAS geometry of the template) + numpy views."""

    image: sitk.Image  # geometry carrier (float32 zeros)
    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    canal: np.ndarray
    levels: np.ndarray
    cord_z: np.ndarray  # z indices (array axis 0) where the level map is non-zero


def load_pam50(folder: Path) -> Pam50:
    """Read ``PAM50_{wm,gm,csf,spine,levels}.nii.gz`` from ``folder``, resampled to 1 mm."""
    names = ("wm", "gm", "csf", "spine", "levels")
    missing = [n for n in names if not (folder / f"PAM50_{n}.nii.gz").is_file()]
    if missing:
        raise DataError(f"PAM50 label folder {str(folder)!r} lacks PAM50_{missing[0]}.nii.gz")
    ref = sitk.ReadImage(str(folder / "PAM50_cord.nii.gz"))
    size = [int(round(s * sp)) for s, sp in zip(ref.GetSize(), ref.GetSpacing())]
    out = {}
    for n in names:
        img = sitk.Cast(sitk.ReadImage(str(folder / f"PAM50_{n}.nii.gz")), sitk.sitkFloat32)
        interp = sitk.sitkNearestNeighbor if n == "levels" else sitk.sitkLinear
        res = sitk.Resample(img, size, sitk.Transform(), interp, ref.GetOrigin(), [1.0, 1.0, 1.0],
                            ref.GetDirection(), 0.0, sitk.sitkFloat32)
        out[n] = sitk.GetArrayFromImage(res)
    geom = sitk.Image(size, sitk.sitkFloat32)
    geom.SetOrigin(ref.GetOrigin())
    geom.SetDirection(ref.GetDirection())
    cz = np.nonzero(out["levels"].reshape(out["levels"].shape[0], -1).max(1) > 0)[0]
    return Pam50(geom, out["wm"], out["gm"], out["csf"], out["spine"], out["levels"].astype(np.int16), cz)


def _tissue(p: Pam50, seq: str, rng: np.random.Generator, z0: int, z1: int) -> np.ndarray:
    wmv, gmv, csfv, canv, bgv = (v + rng.normal(0, 0.08) for v in _CONTRAST[seq])
    sl = slice(z0, z1)
    shape = p.wm[sl].shape
    coarse = rng.standard_normal((max(2, shape[0] // 20), 4, 4)).astype(np.float32)
    bg = bgv + 0.12 * ndi.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1)[: shape[0]]
    v = bg * (1 - p.canal[sl]) + canv * p.canal[sl]
    csf = np.clip(p.csf[sl], 0, 1)
    v = v * (1 - csf) + csfv * csf
    cord = np.clip(p.wm[sl] + p.gm[sl], 0, 1)
    v = v * (1 - cord) + wmv * p.wm[sl] + gmv * p.gm[sl]
    v = v + rng.normal(0, rng.uniform(0.01, 0.05), shape)
    return np.clip(v, 0, None).astype(np.float32)


def _frame(view: str, rng: np.random.Generator, max_tilt: float = 12.0) -> np.ndarray:
    """3x3 LPS direction (columns: row dir, column dir, slice normal) of a tilted ``view``."""
    base = {"sagittal": [[0, 1, 0], [0, 0, -1], [-1, 0, 0]], "coronal": [[1, 0, 0], [0, 0, -1], [0, 1, 0]],
            "axial": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}[view]
    d = np.asarray(base, dtype=np.float64).T
    ax = rng.standard_normal(3)
    ax /= np.linalg.norm(ax)
    ang = np.radians(rng.uniform(0, max_tilt))
    k = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    rot = np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * k @ k
    return rot @ d


def _grid(view: str, rng: np.random.Generator) -> tuple[list[int], list[float]]:
    """Size (x, y, z) and spacing (mm) of a random acquisition in ``view``."""
    inplane = float(rng.uniform(0.3, 1.0))
    if view == "axial":  # 2.5-8 mm stacks, or 5-16 mm thick slabs (half each)
        thick = float(rng.uniform(2.5, 8.0)) if rng.random() < 0.5 else float(rng.uniform(5.0, 16.0))
        n = int(rng.integers(4, 30))
        fov = float(rng.uniform(40, 70))
        return [int(fov / inplane)] * 2 + [n], [inplane, inplane, thick]
    thick = float(rng.uniform(max(1.5, 2 * inplane), 4.0))
    n = int(rng.integers(5, max(6, int(55 / thick))))
    si = float(rng.uniform(50, 220))
    other = float(rng.uniform(45, 70))
    return [int(other / inplane), int(si / inplane), n], [inplane, inplane, thick]


def pam50_sample(p: Pam50, rng: np.random.Generator) -> tuple[sitk.Image, HeaderEvidence | None, dict[str, int]]:
    """One synthetic spine series, its header (or ``None``) and its labels."""
    seq = SEQUENCE[int(rng.integers(len(SEQUENCE)))]
    view = VIEW[int(rng.choice(3, p=[0.45, 0.4, 0.15]))]
    zc = int(rng.choice(p.cord_z))
    z0, z1 = max(0, zc - 130), min(p.wm.shape[0], zc + 130)
    sub = sitk.GetImageFromArray(_tissue(p, seq, rng, z0, z1))
    sub.SetSpacing([1.0, 1.0, 1.0])
    sub.SetDirection(p.image.GetDirection())
    sub.SetOrigin(p.image.TransformIndexToPhysicalPoint([0, 0, z0]))
    lev = p.levels[zc][p.levels[zc] > 0]
    ys, xs = np.nonzero(p.levels[zc] > 0)
    centre = np.asarray(p.image.TransformContinuousIndexToPhysicalPoint(
        [float(xs.mean()), float(ys.mean()), float(zc)]))
    centre += rng.normal(0, 4.0, 3)
    size, spacing = _grid(view, rng)
    d = _frame(view, rng)
    origin = centre - d @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    out = sitk.Resample(sub, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), spacing,
                        d.flatten().tolist(), 0.0, sitk.sitkFloat32)
    sig = [0.3 * s for s in spacing]
    out = sitk.SmoothingRecursiveGaussian(out, sig) if rng.random() < 0.5 else out
    hdr = sample_header(seq, rng) if rng.random() < 0.6 else None
    labels = {"anatomy": 0, "region": level_to_region(int(np.median(lev))), "view": VIEW.index(view),
              "sequence": SEQUENCE.index(seq)}
    return out, hdr, labels


def phantom_sample(rng: np.random.Generator) -> tuple[sitk.Image, HeaderEvidence | None, dict[str, int]]:
    """A non-anatomical 'other' series: random ellipsoids/cylinders in noise, random geometry."""
    view = VIEW[int(rng.integers(3))]
    size, spacing = _grid(view, rng)
    size = [min(s, 160) for s in size]
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in size[::-1]], indexing="ij")
    arr = np.zeros(size[::-1], np.float32)
    for _ in range(int(rng.integers(1, 6))):
        c = rng.uniform(-0.5, 0.5, 3)
        r = rng.uniform(0.15, 0.8, 3)
        arr += rng.uniform(0.2, 1.0) * ((((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2
                                         + ((xx - c[2]) / r[2]) ** 2) < 1)
    arr += rng.normal(0, 0.05, arr.shape).astype(np.float32)
    out = sitk.GetImageFromArray(np.abs(arr) * float(rng.uniform(50, 3000)))
    out.SetSpacing(spacing)
    out.SetDirection(_frame(view, rng).flatten().tolist())
    seq = SEQUENCE[int(rng.integers(len(SEQUENCE)))]
    hdr = sample_header(seq, rng) if rng.random() < 0.5 else None
    return out, hdr, {"anatomy": 3, "region": -1, "view": VIEW.index(view),
                      "sequence": SEQUENCE.index(seq) if hdr is not None else -1}


__all__ = ["Pam50", "load_pam50", "pam50_sample", "phantom_sample", "REGION"]
