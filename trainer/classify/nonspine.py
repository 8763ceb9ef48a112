"""Extra synthetic non-spine exams for the ``anatomy`` classifier (``[data] n_nonspine``, default off).

The body scenes of :mod:`trainer.classify.scenes` cover heads, trunks and limbs at the fields of view of
routine exams. The held-out real non-spine series that the anatomy network got wrong are of
kinds those scenes rarely produce, so these generators add them, each from first principles of
the acquisition (not from the real files):

* ``brain_epi``: whole-head echo-planar volumes (64-96 matrix, 1.9-3.9 mm pixels, 2.5-5 mm slices,
  24-45 slices) with T2*-like contrast (CSF bright, grey > white, fat suppressed), susceptibility
  dropout near the sinuses and temporal bones, a Nyquist (N/2) ghost, geometric distortion along
  the phase-encode axis, blur and low SNR;
* ``brain_crop``: small fields of view inside the brain (15-100 mm; single slices, thin stacks,
  small 3-D blocks, coarse 3-4 mm functional grids);
* ``phantom_scan``: QA phantoms (sphere, cylinder, bottle) with a uniform fill, optional inserts
  (rods, small spheres, a resolution grid), an air bubble, shading, acquired as a spin echo or
  an EPI;
* ``ct_crop``: CT crops (80-220 mm) of the upper abdomen centred on an organ, with ribs and a spleen;
* ``abdomen_slice``: whole-trunk MR single slices and short stacks (axial or coronal).

Every generator returns ``(image, header, labels)`` like :func:`trainer.classify.scenes.scene_sample`.
Arrays are ``(Z, Y, X)`` = (I→S, A→P, R→L) on the scene grid; images are LPS ``SimpleITK`` images.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from sci_node.routing.evidence import HeaderEvidence
from trainer.classify.data import ANATOMY, SEQUENCE, VIEW, sample_header
from trainer.classify.scenes import BONE, CORD, CSF, FAT, GM, LIVER, MARROW, MUSCLE, VOX, Scene, head, render, trunk

#: Bump when a generator here changes: it is part of the extra samples' cache key.
NONSPINE_VERSION = 2
_Sample = tuple[sitk.Image, HeaderEvidence | None, dict[str, int]]


def _labels(anatomy: str, image: sitk.Image, seq: str | None) -> dict[str, int]:
    """Label indices of a synthetic non-spine sample (no region; view = plane of the stored slices)."""
    from sci_node.routing.cls_features import view_of_image

    return {"anatomy": ANATOMY.index(anatomy), "region": -1, "view": VIEW.index(view_of_image(image)),
            "sequence": SEQUENCE.index(seq) if seq else -1}


def grid_resample(img: sitk.Image, rng: np.random.Generator, view: str, centre: np.ndarray,
                  size: tuple[int, int, int], spacing: tuple[float, float, float], air: float = 0.0,
                  max_tilt: float = 15.0) -> sitk.Image:
    """Resample ``img`` onto a tilted ``view`` grid of ``size`` (x, y, z) voxels and ``spacing`` mm at ``centre``.

    ``centre`` is an LPS point (mm); the third grid axis is the slice normal.
    """
    from trainer.classify.synth import _frame

    d = _frame(view, rng, max_tilt=max_tilt)
    origin = centre - d @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    return sitk.Resample(img, [int(v) for v in size], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                         [float(v) for v in spacing], d.flatten().tolist(), air, sitk.sitkFloat32)


def epi_artefacts(arr: np.ndarray, rng: np.random.Generator, snr: float) -> np.ndarray:
    """EPI look on an acquired ``(Z, Y, X)`` stack (slices along Z): distortion, N/2 ghost, blur, noise.

    The phase-encode axis is Y or X at random; distortion is a smooth displacement along it (up to
    ~4 pixels), the ghost a copy shifted by half the field of view (2-12 % amplitude). ``snr`` is
    the mean foreground signal over the noise standard deviation (Rician magnitude noise).
    Returns a non-negative float32 array of the same shape.
    """
    pe = int(rng.integers(1, 3))
    if arr.shape[pe] >= 8:
        shift = ndi.gaussian_filter(rng.standard_normal(arr.shape).astype(np.float32), (1.5, 6.0, 6.0))
        shift *= float(rng.uniform(0.0, 4.0)) / max(float(np.abs(shift).max()), 1e-6)
        coords = list(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in arr.shape], indexing="ij"))
        coords[pe] = coords[pe] + shift
        arr = ndi.map_coordinates(arr, coords, order=1, mode="constant", cval=0.0)
        arr = arr + float(rng.uniform(0.02, 0.12)) * np.roll(arr, arr.shape[pe] // 2, axis=pe)
    arr = ndi.gaussian_filter(arr, (0.0, float(rng.uniform(0.3, 0.8)), float(rng.uniform(0.3, 0.8))))
    fg = arr[arr > 0.1 * float(arr.max())] if arr.max() > 0 else arr
    sigma = float(np.mean(fg)) / snr if fg.size else 0.01
    noisy = np.hypot(arr + rng.normal(0, sigma, arr.shape), rng.normal(0, sigma, arr.shape))
    return noisy.astype(np.float32)


def _as_image(arr: np.ndarray, like: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(like)
    return out


def _epi_head(s: Scene, rng: np.random.Generator) -> sitk.Image:
    """T2*-weighted EPI intensities of a head scene (fat suppressed, susceptibility dropout), 2-2.4 mm voxels."""
    vals = np.zeros(16, np.float32)
    vals[[CSF, GM, CORD, MUSCLE, FAT, MARROW, BONE]] = [rng.uniform(0.55, 0.95), rng.uniform(0.5, 0.65),
                                                       rng.uniform(0.3, 0.45), rng.uniform(0.15, 0.3),
                                                       rng.uniform(0.03, 0.25), rng.uniform(0.02, 0.1), 0.03]
    arr = vals[s.lab]
    r = np.array([70.0, 90.0, 70.0])
    cz = 40.0
    # air-tissue interfaces: frontal sinus, ethmoid/sphenoid, mastoids / petrous bones (either side)
    for c, rad in (((cz - 0.15 * r[0], -r[1] + 20, 0), 18), ((cz - 0.4 * r[0], -0.45 * r[1], 0), 22),
                   ((cz - 0.45 * r[0], 0.1 * r[1], -r[2] + 15), 16), ((cz - 0.45 * r[0], 0.1 * r[1], r[2] - 15), 16)):
        depth = float(rng.uniform(0.4, 1.0))
        rr = rad * float(rng.uniform(0.7, 1.4))
        arr = arr * (1 - depth * np.exp(-(((s.z - c[0]) ** 2 + (s.y - c[1]) ** 2 + (s.x - c[2]) ** 2) / rr ** 2)))
    coarse = rng.standard_normal((3, 3, 3)).astype(np.float32)
    bias = np.exp(rng.uniform(0.1, 0.5) * ndi.zoom(coarse, [n / 3 for n in s.shape], order=1)[
        : s.shape[0], : s.shape[1], : s.shape[2]])
    img = sitk.GetImageFromArray((arr * bias).astype(np.float32))
    vox = VOX * float(rng.uniform(1.0, 1.2))  # head size: the scene's head is on the small side of adults
    img.SetSpacing([vox] * 3)
    img.SetOrigin([-(n - 1) / 2 * vox for n in s.shape[::-1]])
    return img


def _view(rng: np.random.Generator, p: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)) -> str:
    return ("sagittal", "axial", "coronal")[int(rng.choice(3, p=list(p)))]


def brain_epi_sample(rng: np.random.Generator) -> _Sample:
    """A whole-head EPI volume (BOLD/DWI-like): coarse matrix, thick slices, T2* contrast and EPI artefacts."""
    s = head(rng)
    img = _epi_head(s, rng)
    matrix = int(rng.choice([64, 64, 72, 80, 96]))
    fov = float(rng.uniform(180, 250))
    thick = float(rng.uniform(2.5, 5.0))
    n = int(rng.integers(24, 46)) if rng.random() < 0.9 else int(rng.integers(8, 24))
    view = _view(rng)
    # the head centre scales with the voxel size of _epi_head (40 mm above the scene centre at 2 mm)
    centre = np.array([rng.normal(0, 6), rng.normal(0, 10), 44 + rng.normal(0, 14)])
    out = grid_resample(img, rng, view, centre, (matrix, matrix, n), (fov / matrix, fov / matrix, thick),
                        max_tilt=20.0)
    out = _as_image(epi_artefacts(sitk.GetArrayFromImage(out), rng, float(rng.uniform(6, 40))), out)
    out = out * float(rng.uniform(200, 3000))
    seq = "other"
    hdr = sample_header(seq, rng) if rng.random() < 0.5 else None
    return out, hdr, _labels("brain", out, seq)


def brain_crop_sample(rng: np.random.Generator) -> _Sample:
    """A small field of view inside the brain: single slices, thin stacks, small 3-D blocks or coarse fMRI grids."""
    s = head(rng)
    seq = SEQUENCE[int(rng.integers(len(SEQUENCE)))]
    img = render(s, rng, seq, False)
    view = _view(rng)
    kind = rng.random()
    if kind < 0.35:  # single slice / localiser-like 1-3 slices, fine pixels
        fov, pix, thick, n = float(rng.uniform(15, 90)), float(rng.uniform(0.25, 1.2)), float(rng.uniform(1, 6)), \
            int(rng.integers(1, 4))
    elif kind < 0.7:  # small 3-D block (e.g. 2 mm isotropic, 60-90 mm)
        fov = float(rng.uniform(50, 110))
        pix = thick = float(rng.uniform(1.0, 2.5))
        n = int(max(8, fov * rng.uniform(0.5, 0.9) / thick))
    else:  # coarse functional grid: 3-4 mm pixels, 5-8 mm slices, few slices
        fov, pix, thick, n = float(rng.uniform(60, 120)), float(rng.uniform(3, 4.5)), float(rng.uniform(4, 8)), \
            int(rng.integers(2, 12))
    m = max(8, min(256, int(fov / pix)))
    m2 = max(8, min(256, int(fov * rng.uniform(0.7, 1.3) / pix)))
    centre = np.array([rng.normal(0, 20), rng.normal(0, 25), 40 + rng.normal(0, 20)])
    out = grid_resample(img, rng, view, centre, (m, m2, n), (fov / m, fov / m, thick), max_tilt=20.0)
    if kind >= 0.7:
        out = _as_image(epi_artefacts(sitk.GetArrayFromImage(out), rng, float(rng.uniform(10, 60))), out)
    hdr = sample_header(seq, rng) if rng.random() < 0.5 else None
    return out, hdr, _labels("brain", out, seq)


def _phantom_body(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Fill of a QA phantom on the scene grid: sphere, cylinder or bottle (float32, 0 outside), wall dark."""
    shape = int(rng.integers(3))
    axis = [s.z, s.y, s.x]
    a = int(rng.integers(3))  # cylinder/bottle axis
    r = float(rng.uniform(45, 105))
    other = [axis[i] for i in range(3) if i != a]
    radial = np.sqrt(other[0] ** 2 + other[1] ** 2)
    half = float(rng.uniform(50, 120))
    if shape == 0:
        dist = np.sqrt(s.z ** 2 + s.y ** 2 + s.x ** 2) - r
    elif shape == 1:
        dist = np.maximum(radial - r, np.abs(axis[a]) - half)
    else:  # bottle: a cylinder with a tapered neck at one end
        neck = np.clip((axis[a] - half * 0.4) / (half * 0.6), 0, 1)
        dist = np.maximum(radial - r * (1 - 0.7 * neck), np.abs(axis[a]) - half)
    fill = (dist < 0).astype(np.float32) * float(rng.uniform(0.6, 1.0))
    wall = float(rng.uniform(2, 6))
    fill[(dist >= -wall) & (dist < 0)] = float(rng.uniform(0.0, 0.15))
    return _phantom_inserts(s, rng, fill, r, a)


def _phantom_inserts(s: Scene, rng: np.random.Generator, fill: np.ndarray, r: float, a: int) -> np.ndarray:
    """Rods, small spheres, a slatted resolution block and an air bubble inside a phantom fill."""
    inside = fill > 0.3
    axis = [s.z, s.y, s.x]
    other = [axis[i] for i in range(3) if i != a]
    for _ in range(int(rng.integers(0, 8))):
        c = rng.uniform(-0.6, 0.6, 2) * r
        rr = float(rng.uniform(2, 12))
        fill[inside & (((other[0] - c[0]) ** 2 + (other[1] - c[1]) ** 2) < rr ** 2)] = float(rng.uniform(0, 1.5))
    for _ in range(int(rng.integers(0, 5))):
        c = rng.uniform(-0.5, 0.5, 3) * r
        rr = float(rng.uniform(4, 15))
        ball = ((s.z - c[0]) ** 2 + (s.y - c[1]) ** 2 + (s.x - c[2]) ** 2) < rr ** 2
        fill[inside & ball] = float(rng.uniform(0, 1.5))
    if rng.random() < 0.4:  # resolution block: slats of 2-6 mm period
        period = float(rng.uniform(4, 12))
        box = inside & (np.abs(other[0]) < 0.35 * r) & (np.abs(other[1]) < 0.2 * r)
        fill[box & ((other[0] % period) < period / 2)] = 0.05
    if rng.random() < 0.4:  # air bubble under the top of the container
        fill[inside & (s.y < -0.8 * r)] = 0.0
    return fill


def phantom_scan_sample(rng: np.random.Generator) -> _Sample:
    """A QA phantom acquired as a spin echo / GRE (1-2 mm pixels) or an EPI (3-4 mm, artefacts), any plane."""
    s = Scene((260.0, 260.0, 260.0))
    fill = _phantom_body(s, rng)
    grad = 1 + float(rng.uniform(0, 0.8)) * (s.z * rng.normal() + s.y * rng.normal() + s.x * rng.normal()) / 300
    img = sitk.GetImageFromArray(np.clip(fill * grad, 0, None).astype(np.float32))
    img.SetSpacing([VOX] * 3)
    img.SetOrigin([-(n - 1) / 2 * VOX for n in s.shape[::-1]])
    epi = rng.random() < 0.5
    fov = float(rng.uniform(180, 300))
    matrix = int(rng.choice([64, 80, 96, 128])) if epi else int(rng.choice([128, 192, 256]))
    thick = float(rng.uniform(3, 8)) if epi else float(rng.uniform(1, 6))
    n = int(rng.integers(1, 4)) if rng.random() < 0.2 else int(rng.integers(5, 40))
    centre = rng.normal(0, 10, 3)
    out = grid_resample(img, rng, _view(rng), centre, (matrix, matrix, n), (fov / matrix, fov / matrix, thick))
    arr = sitk.GetArrayFromImage(out)
    arr = epi_artefacts(arr, rng, float(rng.uniform(8, 60))) if epi else \
        np.abs(arr + rng.normal(0, rng.uniform(0.005, 0.05), arr.shape)).astype(np.float32)
    out = _as_image(arr * float(rng.uniform(100, 3000)), out)
    seq = "other" if epi else SEQUENCE[int(rng.integers(len(SEQUENCE)))]
    hdr = sample_header(seq, rng) if rng.random() < 0.5 else None
    return out, hdr, _labels("other", out, seq if hdr is not None else None)


def _upper_abdomen(rng: np.random.Generator) -> tuple[Scene, dict[str, np.ndarray]]:
    """A lumbar trunk scene with ribs and a spleen; returns it and organ centres (LPS x, y, z mm)."""
    s, _ = trunk(rng, "lumbar")
    ry, rx = (s.shape[1] * VOX - 20) / 2, (s.shape[2] * VOX - 20) / 2
    ring = np.sqrt((s.y / (0.88 * ry)) ** 2 + (s.x / (0.88 * rx)) ** 2)
    period = float(rng.uniform(22, 30))
    slope = float(rng.uniform(0.1, 0.4))
    rib = (np.abs(ring - 1) * 0.88 * min(ry, rx) < 4) & (((s.z - slope * s.y) % period) < 9) & (s.z > -20) \
        & ~((np.abs(s.x) < 25) & (s.y < 0))
    s.lab[rib] = BONE
    spleen = (float(rng.uniform(30, 90)), ry * 0.25, rx * 0.5)
    s.ellipsoid(spleen, (float(rng.uniform(35, 55)), float(rng.uniform(25, 35)), float(rng.uniform(18, 28))), LIVER)
    organs = {"spleen": np.array([spleen[2], spleen[1], spleen[0]]),
              "liver": np.array([-rx * 0.35, -10.0, 50.0]),
              "kidney": np.array([rx * 0.32 * rng.choice([-1, 1]), ry * 0.45, -10.0]),
              "random": np.array([rng.uniform(-0.6, 0.6) * rx, rng.uniform(-0.6, 0.4) * ry, rng.uniform(-100, 100)])}
    return s, organs


def ct_crop_sample(rng: np.random.Generator) -> _Sample:
    """A CT crop (80-220 mm) of the upper abdomen centred on an organ (Hounsfield units, air -1000)."""
    s, organs = _upper_abdomen(rng)
    img = render(s, rng, "T1w", True)
    centre = organs[("spleen", "liver", "kidney", "random")[int(rng.integers(4))]] + rng.normal(0, 15, 3)
    fov = float(rng.uniform(80, 220))
    pix = float(rng.uniform(0.6, 1.0))
    m = min(320, int(fov / pix))
    thick = float(rng.uniform(1.0, 5.0))
    n = max(3, min(80, int(fov * rng.uniform(0.5, 1.2) / thick)))
    out = grid_resample(img, rng, _view(rng, (0.1, 0.75, 0.15)), centre, (m, m, n), (fov / m, fov / m, thick),
                        air=-1000.0, max_tilt=5.0)
    return out, None, _labels("abdomen", out, None)


def abdomen_slice_sample(rng: np.random.Generator) -> _Sample:
    """A whole-trunk MR (15 % CT) single slice or short stack of the abdomen, axial or coronal."""
    if rng.random() < 0.6:
        s, _ = _upper_abdomen(rng)
    else:
        s, _ = trunk(rng, "lumbar")
    ct = rng.random() < 0.15
    seq = SEQUENCE[int(rng.integers(len(SEQUENCE)))]
    img = render(s, rng, seq, ct)
    wx, wy = s.shape[2] * VOX + float(rng.uniform(0, 80)), s.shape[1] * VOX + float(rng.uniform(0, 60))
    view = "axial" if rng.random() < 0.8 else "coronal"
    pix = float(rng.uniform(0.7, 1.6))
    n = 1 if rng.random() < 0.6 else int(rng.integers(2, 6))
    rows = wy if view == "axial" else float(rng.uniform(250, 400))
    size = (min(512, int(wx / pix)), min(512, int(rows / pix)), n)
    centre = np.array([rng.normal(0, 10), rng.normal(0, 10) if view == "axial" else 0.0, rng.uniform(-80, 100)])
    out = grid_resample(img, rng, view, centre, size, (wx / size[0], rows / size[1], float(rng.uniform(4, 8))),
                        air=-1000.0 if ct else 0.0, max_tilt=8.0)
    hdr = None if ct or rng.random() < 0.5 else sample_header(seq, rng)
    return out, hdr, _labels("abdomen", out, None if ct else seq)


#: ``[data] n_nonspine`` keys -> generator.
KINDS: dict[str, Callable[[np.random.Generator], _Sample]] = {
    "brain_epi": brain_epi_sample, "brain_crop": brain_crop_sample, "phantom_scan": phantom_scan_sample,
    "ct_crop": ct_crop_sample, "abdomen_slice": abdomen_slice_sample}

__all__ = ["KINDS", "NONSPINE_VERSION", "abdomen_slice_sample", "brain_crop_sample", "brain_epi_sample",
           "ct_crop_sample", "epi_artefacts", "grid_resample", "phantom_scan_sample"]
