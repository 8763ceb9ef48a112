"""SynthSeg-style synthetic spine MR volumes from the PAM50 template's label maps.

Each sample draws a random length of the template (brainstem to conus), builds a tissue
map (white/grey matter from the probabilistic maps, CSF, an epidural shell around the canal,
the vertebral outline, and random smooth "soft-tissue" blobs in the background), gives every
tissue a random intensity and texture, then resamples it to a random acquisition: random
3-D rotation (oblique/tilted cords), slab thickness (slice averaging along ``Z``), in-plane
blur with anisotropic resolution (thick sagittal slices), a bias field and noise. The output
lies on a model grid with in-plane spacing ``spacing_yx`` and is returned with its cord mask.

Arrays are ``(Z, Y, X)`` in LPS order (``Z`` inferior→superior, ``Y`` anterior→posterior,
``X`` right→left); intensities float32 in about [0, 1]; masks uint8.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

TEMPLATE_SPACING = 0.5  # mm, isotropic


@dataclass(frozen=True)
class Template:
    """PAM50 label maps as ``(Z, Y, X)`` LPS arrays at 0.5 mm (float16 probabilities)."""

    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    cord: np.ndarray
    bone: np.ndarray
    canal_dist: np.ndarray  # distance (mm) from the canal (cord ∪ CSF), 0 inside
    z_range: tuple[int, int]  # slices where the cord exists


def _load_las(path: Path) -> np.ndarray:
    import nibabel as nib

    arr = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)  # type: ignore[attr-defined]
    # nibabel (i, j, k) in LAS → (Z, Y, X) with Y pointing posterior
    return np.ascontiguousarray(np.transpose(arr, (2, 1, 0))[:, ::-1, :])


def load_template(folder: Path) -> Template:
    """Read the PAM50 label maps from ``folder`` (``PAM50_{wm,gm,csf,cord,spine}.nii.gz``)."""
    from sci_node.errors import DataError

    folder = Path(folder)
    missing = [n for n in ("wm", "gm", "csf", "cord", "spine") if not (folder / f"PAM50_{n}.nii.gz").is_file()]
    if missing:
        raise DataError(f"PAM50 label folder {str(folder)!r} lacks PAM50_{missing[0]}.nii.gz")
    maps = {n: _load_las(folder / f"PAM50_{n}.nii.gz") for n in ("wm", "gm", "csf", "cord", "spine")}
    canal = (maps["cord"] > 0.5) | (maps["csf"] > 0.5)
    dist = ndi.distance_transform_edt(~canal).astype(np.float16) * TEMPLATE_SPACING
    zs = np.nonzero(maps["cord"].reshape(maps["cord"].shape[0], -1).max(1) > 0.5)[0]
    return Template(wm=maps["wm"].astype(np.float16), gm=maps["gm"].astype(np.float16),
                    csf=maps["csf"].astype(np.float16), cord=maps["cord"].astype(np.float16),
                    bone=maps["spine"].astype(np.float16), canal_dist=dist,
                    z_range=(int(zs.min()), int(zs.max())))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed noise of ``shape`` (sigma in voxels)."""
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (n - n.mean()) / (n.std() + 1e-6)


def _coarse_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth noise drawn on a grid 8× coarser than ``shape`` and zoomed (linear) up to it."""
    field = smooth_noise(rng, tuple(max(4, s // 8) for s in shape), 1.0)
    return ndi.zoom(field, [s / f for s, f in zip(shape, field.shape)], order=1)[: shape[0], : shape[1], : shape[2]]


def _tissue_image(rng: np.random.Generator, t: Template, z0: int, z1: int) -> np.ndarray:
    """Random-intensity image of template slices ``z0:z1`` at 0.5 mm, ``(Z, Y, X)`` float32."""
    wm, gm = t.wm[z0:z1].astype(np.float32), t.gm[z0:z1].astype(np.float32)
    cord = t.cord[z0:z1].astype(np.float32)
    csf = np.clip(t.csf[z0:z1].astype(np.float32) - cord, 0, 1)
    dist = t.canal_dist[z0:z1].astype(np.float32)
    shell_w = rng.uniform(1.0, 4.0)
    shell = np.clip(1.0 - dist / shell_w, 0, 1) * (dist > 0)
    bone = ndi.grey_dilation(t.bone[z0:z1].astype(np.float32), size=(1, 3, 3)) * (dist > 0)
    shape = wm.shape
    # background: K soft-tissue classes from thresholded smooth noise (fat, muscle, disc, ...)
    k = int(rng.integers(2, 6))
    field = _coarse_field(rng, shape)
    cuts = np.sort(rng.uniform(-1.2, 1.2, k - 1))
    bg = rng.uniform(0.0, 1.0, k)[np.digitize(field, cuts)]
    means = rng.uniform(0.0, 1.0, 5)  # wm, gm, csf, shell, bone
    if abs(means[2] - means[0]) < 0.15:  # keep the cord/CSF boundary visible in most samples
        means[2] = np.clip(means[0] + np.sign(rng.standard_normal()) * rng.uniform(0.15, 0.6), 0, 1)
    gm_contrast = rng.uniform(0.0, 1.0)
    means[1] = means[0] + gm_contrast * (means[1] - means[0])
    tex = smooth_noise(rng, shape, rng.uniform(0.5, 2.0)) * rng.uniform(0.0, 0.08)
    fg = wm * means[0] + gm * means[1]
    cord_w = np.clip(wm + gm, 0, 1)
    fg = np.where(cord_w > 0, fg / np.maximum(cord_w, 1e-3), 0) * cord_w
    img = fg + csf * means[2]
    rest = np.clip(1.0 - cord_w - csf, 0, 1)
    shell_part = np.minimum(shell, rest)
    bone_part = np.minimum(bone, rest - shell_part)
    bg_part = np.clip(rest - shell_part - bone_part, 0, 1)
    img = img + shell_part * means[3] + bone_part * means[4] + bg_part * bg
    return (img + tex).astype(np.float32)


def _rotation(rng: np.random.Generator, max_tilt_deg: float) -> np.ndarray:
    """3×3 rotation: tilt about the X and Y axes (±max_tilt), any twist about Z (±20°)."""
    ax, ay = np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg, 2))
    az = np.deg2rad(rng.uniform(-20, 20))
    rx = np.array([[np.cos(ax), -np.sin(ax), 0], [np.sin(ax), np.cos(ax), 0], [0, 0, 1]])  # (z, y) plane
    ry = np.array([[np.cos(ay), 0, -np.sin(ay)], [0, 1, 0], [np.sin(ay), 0, np.cos(ay)]])  # (z, x) plane
    rz = np.array([[1, 0, 0], [0, np.cos(az), -np.sin(az)], [0, np.sin(az), np.cos(az)]])  # (y, x) plane
    return rx @ ry @ rz


def synth_volume(rng: np.random.Generator, t: Template, spacing_yx: tuple[float, float] = (0.8, 0.8),
                 out_yx: tuple[int, int] = (112, 112), max_tilt_deg: float = 25.0
                 ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One synthetic volume and its cord mask on a model-like grid.

    Returns
    -------
    image : numpy.ndarray
        ``(Z, Y, X)`` float32, roughly in [0, 1], not yet normalised (the trainer applies
        :func:`sci_node.imaging.preprocess.normalise`, as for real images).
    mask : numpy.ndarray
        ``(Z, Y, X)`` uint8 cord mask.
    spacing : tuple[float, float, float]
        ``(sz, sy, sx)`` in mm of the output grid (``sz`` random 0.8–6 mm).
    """
    length_mm = rng.uniform(30, 90)
    n = int(length_mm / TEMPLATE_SPACING)
    lo, hi = t.z_range
    z0 = int(rng.integers(lo, max(lo + 1, hi - n)))
    z1 = min(t.cord.shape[0], z0 + n)
    img = _tissue_image(rng, t, z0, z1)
    cord = t.cord[z0:z1].astype(np.float32)
    return _acquire(rng, img, cord, length_mm, spacing_yx, out_yx, max_tilt_deg)


def _acquire(rng: np.random.Generator, img: np.ndarray, cord: np.ndarray, length_mm: float,
             spacing_yx: tuple[float, float], out_yx: tuple[int, int], max_tilt_deg: float
             ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A random acquisition of a 0.5 mm tissue image ``img`` and its cord map ``cord`` (both
    ``(Z, Y, X)`` float32): slab averaging and anisotropic blur, a random 3-D rotation onto the
    model-like output grid, bias field and noise. Returns ``(image, mask, (sz, sy, sx))``."""
    sz = float(rng.choice([rng.uniform(0.8, 1.5), rng.uniform(2.0, 6.0)]))
    # acquisition resolution: slab averaging along Z, anisotropic in-plane blur (thick sagittal slices)
    res = np.array([sz, rng.uniform(0.5, 1.2), rng.uniform(0.5, 1.2)])
    if rng.random() < 0.4:
        res[2 if rng.random() < 0.7 else 1] = rng.uniform(2.0, 4.5)
    img = ndi.gaussian_filter(img, res / TEMPLATE_SPACING / 2.355)
    rot = _rotation(rng, max_tilt_deg)
    nz = max(3, int(length_mm * 0.8 / sz))
    out_shape = (nz, out_yx[0], out_yx[1])
    out_sp = np.array([sz, spacing_yx[0], spacing_yx[1]])
    centre_in = (np.array(img.shape) - 1) / 2.0 + np.array([0, rng.uniform(-8, 8), rng.uniform(-8, 8)])
    centre_out = (np.array(out_shape) - 1) / 2.0
    matrix = rot * (out_sp / TEMPLATE_SPACING)[None, :]
    offset = centre_in - matrix @ centre_out
    image = ndi.affine_transform(img, matrix, offset, out_shape, order=1, mode="reflect")
    mask = ndi.affine_transform(cord, matrix, offset, out_shape, order=1, mode="constant") >= 0.5
    bias = np.exp(smooth_noise(rng, tuple(max(2, s // 16) for s in out_shape), 1.0) * rng.uniform(0, 0.3))
    bias = ndi.zoom(bias, [s / b for s, b in zip(out_shape, bias.shape)], order=1)
    bias = bias[: out_shape[0], : out_shape[1], : out_shape[2]]
    image = image * bias + rng.standard_normal(out_shape).astype(np.float32) * rng.uniform(0.0, 0.05)
    return image.astype(np.float32), mask.astype(np.uint8), (sz, spacing_yx[0], spacing_yx[1])


def _drift(rng: np.random.Generator, n: int, max_mm: float) -> np.ndarray:
    """``(n,)`` smooth random offsets (0.5 mm voxels) of at most about ``max_mm`` along Z."""
    d = ndi.gaussian_filter1d(rng.standard_normal(n), sigma=max(2.0, n / 4))
    return d / (np.abs(d).max() + 1e-6) * rng.uniform(0, max_mm) / TEMPLATE_SPACING


def _canal_tissue(rng: np.random.Generator, n: int, size: int = 141) -> np.ndarray:
    """Random-intensity image of a spinal canal **below the conus**, ``(n, size, size)`` at 0.5 mm.

    A CSF-filled thecal sac (elliptic, 10–18 × 14–24 mm, irregular border, drifting along Z)
    holding 6–30 nerve roots (the cauda equina, 0.8–2.4 mm thick, mostly dorsal), an epidural
    shell, a vertebral column in front with bodies and discs alternating along Z, and smooth
    random background tissues. There is no cord anywhere: the label is empty.
    """
    shape = (n, size, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    cy, cx = c + _drift(rng, n, 6.0), c + _drift(rng, n, 6.0)
    ry, rx = rng.uniform(5, 9) / TEMPLATE_SPACING, rng.uniform(7, 12) / TEMPLATE_SPACING
    dy, dx = (yy[None] - cy[:, None, None]) / ry, (xx[None] - cx[:, None, None]) / rx
    rr = np.sqrt(dy ** 2 + dx ** 2) * (1 + 0.08 * smooth_noise(rng, shape, 3.0))
    sac = rr < 1.0
    roots = np.zeros(shape, bool)
    for _ in range(int(rng.integers(6, 31))):
        a = rng.uniform(0, 2 * np.pi) if rng.random() < 0.3 else rng.uniform(0.15 * np.pi, 0.85 * np.pi)  # dorsal
        f = np.sqrt(rng.uniform(0.0, 0.7))
        py = cy + f * ry * np.sin(a) + np.linspace(0, rng.uniform(-4, 4), n)
        px = cx + f * rx * np.cos(a) + np.linspace(0, rng.uniform(-6, 6), n)
        r = rng.uniform(0.4, 1.2) / TEMPLATE_SPACING
        roots |= (yy[None] - py[:, None, None]) ** 2 + (xx[None] - px[:, None, None]) ** 2 < r ** 2
    roots &= sac
    shell = (rr >= 1.0) & (rr < 1.0 + rng.uniform(0.1, 0.4))
    period = rng.uniform(28, 40) / TEMPLATE_SPACING  # vertebral body + disc
    disc = (np.mod(np.arange(n) + rng.uniform(0, period), period) < period * rng.uniform(0.2, 0.35))[:, None, None]
    body_r = rng.uniform(13, 20) / TEMPLATE_SPACING
    body_cy = cy - ry - rng.uniform(2, 5) / TEMPLATE_SPACING - body_r
    body = (((yy[None] - body_cy[:, None, None]) / body_r) ** 2
            + ((xx[None] - cx[:, None, None]) / (1.2 * body_r)) ** 2 < 1)
    field = _coarse_field(rng, shape)
    k = int(rng.integers(2, 6))
    # as in _tissue_image, but the class intensities are drawn before the cuts
    bg = rng.uniform(0.0, 1.0, k)[np.digitize(field, np.sort(rng.uniform(-1.2, 1.2, k - 1)))]
    m_csf, m_root, m_shell, m_body, m_disc = rng.uniform(0.0, 1.0, 5)
    if abs(m_csf - m_root) < 0.15:  # keep the roots visible in the CSF in most samples
        m_root = float(np.clip(m_csf + np.sign(rng.standard_normal()) * rng.uniform(0.15, 0.6), 0, 1))
    img = np.where(body, np.where(disc, m_disc, m_body), bg)
    img = np.where(shell, m_shell, img)
    img = np.where(sac, np.where(roots, m_root, m_csf), img).astype(np.float32)
    return img + smooth_noise(rng, shape, rng.uniform(0.5, 2.0)) * rng.uniform(0.0, 0.08)


def synth_canal_volume(rng: np.random.Generator, spacing_yx: tuple[float, float] = (0.8, 0.8),
                       out_yx: tuple[int, int] = (112, 112), max_tilt_deg: float = 25.0
                       ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One synthetic volume of the thecal sac below the conus (cauda equina, no cord) and its
    empty cord mask, acquired like :func:`synth_volume`. Not derived from the PAM50 template,
    so it may be used when the template image is the held-out case.

    Returns
    -------
    image, mask, spacing
        As :func:`synth_volume`; ``mask`` is all zero.
    """
    length_mm = rng.uniform(30, 90)
    img = _canal_tissue(rng, int(length_mm / TEMPLATE_SPACING))
    return _acquire(rng, img, np.zeros_like(img), length_mm, spacing_yx, out_yx, max_tilt_deg)
