"""Synthetic intramedullary lesions injected inside a cord mask (3-D).

A lesion is an ellipsoid elongated along the local cord direction (length 1–20 mm, width
up to the cord's), with an irregular border (the ellipsoid distance is perturbed by smooth
noise), a texture, a per-lesion contrast (hyperintense, as on T2w / T2*w) and partial-volume
edges: the lesion fraction of each voxel is averaged over sub-samples along the slice axis,
so thick slices get faint lesion edges. The lesion is confined to the cord.

Arrays are ``(Z, Y, X)`` with spacing ``(sz, sy, sx)`` in mm; images float32 (normalised
intensities), masks uint8. Pure functions: randomness comes from the ``Generator`` passed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from sci_node.errors import ConfigError


@dataclass(frozen=True)
class LesionSpec:
    """Ranges of the lesion generator (the ``[lesions]`` table of ``lesion.toml``)."""

    count: tuple[int, int] = (1, 3)
    length_mm: tuple[float, float] = (1.0, 20.0)
    width_mm: tuple[float, float] = (1.0, 6.0)
    contrast: tuple[float, float] = (0.25, 1.0)  # relative brightening of the cord intensity
    roughness: tuple[float, float] = (0.0, 0.35)
    texture: tuple[float, float] = (0.0, 0.25)
    min_fraction: float = 0.5  # voxel lesion fraction counted as lesion in the mask
    # the cord intensity percentile the contrast starts from: 50 = the median cord voxel; 90 =
    # above the bright cord tissue (T2*w grey matter), so that every lesion is hyperintense
    reference_percentile: float = 50.0
    # "top": lesion = ref + c * (image p99 - ref), so the brightening depends on what else is in
    # the field of view (CSF, fat); "reference": lesion = ref * (1 + c), a brightening relative
    # to the cord itself, the same on every image
    contrast_mode: str = "top"

    def __post_init__(self) -> None:
        if self.contrast_mode not in ("top", "reference"):
            raise ValueError(f"lesion contrast_mode {self.contrast_mode!r} is not 'top' or 'reference'")

    @classmethod
    def from_config(cls, gen: dict[str, Any]) -> "LesionSpec":
        """From the ``[lesions.generator]`` table (lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in gen.items()})  # type: ignore[arg-type]


def cord_direction(cord: np.ndarray, z: int, spacing: tuple[float, float, float], half: int = 3) -> np.ndarray:
    """Unit vector (mm space, ``(z, y, x)``) of the cord centreline around slice ``z``."""
    zs = [k for k in range(max(0, z - half), min(cord.shape[0], z + half + 1)) if cord[k].any()]
    if len(zs) < 2:
        return np.array([1.0, 0.0, 0.0])
    cents = np.array([[k * spacing[0], *(np.array(ndi.center_of_mass(cord[k])) * spacing[1:])] for k in zs])
    d = cents[-1] - cents[0]
    return d / (np.linalg.norm(d) + 1e-9) if d[0] > 0 else np.array([1.0, 0.0, 0.0])


def _frame(axis: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Orthonormal 3×3 frame whose first row is ``axis`` (random twist)."""
    a = axis / np.linalg.norm(axis)
    tmp = rng.standard_normal(3)
    b = tmp - tmp.dot(a) * a
    b /= np.linalg.norm(b) + 1e-9
    return np.stack([a, b, np.cross(a, b)])


def _one_lesion(rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray,
                centre: np.ndarray, axis: np.ndarray, spec: LesionSpec) -> tuple[tuple[slice, ...], np.ndarray]:
    """Lesion fraction (0..1) in a bounding box around ``centre`` (voxel index)."""
    length = rng.uniform(*spec.length_mm)
    width = min(rng.uniform(*spec.width_mm), max(1.0, length))
    semi = np.array([length, width, width * rng.uniform(0.6, 1.0)]) / 2.0
    reach = np.ceil((semi.max() * 1.5 + spacing) / spacing).astype(int)
    box = tuple(slice(max(0, int(c) - r), min(n, int(c) + r + 1)) for c, r, n in zip(centre, reach, shape))
    frame = _frame(axis, rng)
    sub = 3 if spacing[0] > 1.5 else 1  # partial volume through thick slices
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    bshape = tuple(s.stop - s.start for s in box)
    rough = rng.uniform(*spec.roughness)
    noise = ndi.gaussian_filter(rng.standard_normal(bshape), 1.0)
    noise = noise / (noise.std() + 1e-6) * rough
    grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    frac = np.zeros(bshape, np.float32)
    edge = 0.5 * spacing[1:].mean() / max(semi[1], 0.5)  # soft edge ~ half an in-plane voxel
    for off in offsets:
        rel = np.stack([(g - c + (off if i == 0 else 0.0)) * s
                        for i, (g, c, s) in enumerate(zip(grids, centre, spacing))], -1)
        local = rel @ frame.T / semi
        dist = np.sqrt((local ** 2).sum(-1)) + noise
        frac += np.clip((1.0 - dist) / edge + 0.5, 0, 1) / sub
    return box, frac


def inject_lesions(rng: np.random.Generator, image: np.ndarray, cord: np.ndarray,
                   spacing: tuple[float, float, float], spec: LesionSpec = LesionSpec()
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Add synthetic hyperintense lesions inside ``cord``.

    A lesion's intensity is ``ref + c * (top - ref)`` (``spec.contrast_mode = "top"``) or
    ``ref * (1 + c)`` (``"reference"``), times its texture and never darker than the voxel it
    replaces: ``ref`` the ``spec.reference_percentile`` of the cord's intensities, ``top`` the
    image's 99th percentile, ``c`` drawn from ``spec.contrast``.

    Parameters
    ----------
    image : numpy.ndarray
        ``(Z, Y, X)`` float32 normalised intensities.
    cord : numpy.ndarray
        ``(Z, Y, X)`` uint8 cord mask on the same grid.
    spacing : tuple[float, float, float]
        ``(sz, sy, sx)`` in mm.

    Returns
    -------
    image : numpy.ndarray
        New ``(Z, Y, X)`` float32 image with the lesions.
    lesion : numpy.ndarray
        ``(Z, Y, X)`` uint8 lesion mask (voxels with lesion fraction ≥ ``spec.min_fraction``).
    """
    out = image.astype(np.float32, copy=True)
    lesion = np.zeros(image.shape, np.float32)
    idx = np.argwhere(cord > 0)
    if idx.size == 0:
        return out, lesion.astype(np.uint8)
    sp = np.asarray(spacing, dtype=float)
    cord_vals = image[cord > 0]
    cord_level = float(np.percentile(cord_vals, spec.reference_percentile))
    top = float(np.percentile(image, 99.0))
    for _ in range(int(rng.integers(spec.count[0], spec.count[1] + 1))):
        centre = idx[rng.integers(len(idx))].astype(float)
        axis = cord_direction(cord, int(centre[0]), tuple(sp))
        box, frac = _one_lesion(rng, image.shape, sp, centre, axis, spec)
        frac = frac * (cord[box] > 0)
        c = rng.uniform(*spec.contrast)
        if spec.contrast_mode == "reference":
            target = cord_level * (1.0 + c) if cord_level > 0 else cord_level + c
        else:
            target = cord_level + c * max(top - cord_level, 0.3 * max(cord_level, 0.2))
        tex = 1.0 + rng.uniform(*spec.texture) * ndi.gaussian_filter(rng.standard_normal(frac.shape), 0.7) * 2
        region = out[box]
        out[box] = region * (1 - frac) + frac * np.maximum(region, target * tex.astype(np.float32))
        lesion[box] = np.maximum(lesion[box], frac)
    return out, (lesion >= spec.min_fraction).astype(np.uint8)


def lesion_spec(cfg: dict[str, Any], table: str = "generator") -> LesionSpec:
    """The lesion generator of ``[lesions.<table>]``.

    ``"generator"`` makes the training lesions; ``"test_generator"`` the lesions of the
    held-out evaluation, and defaults to the training generator when the config has none.
    """
    les = cfg.get("lesions", {})
    gen = les.get(table) if table in les else les.get("generator", {})
    try:
        return LesionSpec.from_config(gen)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"training config {cfg.get('_path', '?')!r}: bad [lesions.{table}]: {exc}") from None


def inject_lookalikes(rng: np.random.Generator, image: np.ndarray, cord: np.ndarray,
                      spacing: tuple[float, float, float]) -> np.ndarray:
    """Hard negatives: hyperintense look-alikes of a lesion inside the cord mask, **not** lesions.

    One of, drawn at random:

    * ``"canal"``: the central canal, a thin bright line (Gaussian profile, sigma 0.3-0.6 mm)
      running along the cord's centre through every slice, brightness between the cord level
      and the CSF level;
    * ``"rim"``: CSF partial volume, the cord's outer voxel layer pulled a random fraction
      (0.2-0.7) of the way towards the CSF level (the image's 99th percentile on T2w, at least
      1.3 times the cord's 90th percentile);
    * ``"flow"``: a flow artefact, a faint bright band (1-2 voxels) repeated across the cord
      in a few consecutive slices.

    Parameters
    ----------
    image : numpy.ndarray
        ``(Z, Y, X)`` float32 normalised intensities.
    cord : numpy.ndarray
        ``(Z, Y, X)`` uint8 cord mask on the same grid.
    spacing : tuple[float, float, float]
        ``(sz, sy, sx)`` in mm.

    Returns
    -------
    numpy.ndarray
        New ``(Z, Y, X)`` float32 image; the lesion label of the volume is unchanged.
    """
    out = image.astype(np.float32, copy=True)
    inside = cord > 0
    if not inside.any():
        return out
    level = float(np.percentile(image[inside], 90.0))
    top = max(float(np.percentile(image, 99.0)), 1.3 * level)  # CSF level; at least 30 % above the cord
    kind = ("canal", "rim", "flow")[int(rng.integers(3))]
    if kind == "rim":
        rim = inside & ~ndi.binary_erosion(inside, structure=np.ones((1, 3, 3), bool))
        f = rng.uniform(0.2, 0.7)
        out[rim] = out[rim] * (1 - f) + f * np.maximum(out[rim], top)
        return out
    zs = np.unique(np.nonzero(inside)[0])
    if kind == "flow":
        z0 = int(rng.integers(len(zs)))
        zs = zs[z0:z0 + int(rng.integers(1, 4))]
    yy, xx = np.mgrid[0:image.shape[1], 0:image.shape[2]]
    sigma = rng.uniform(0.3, 0.6)
    amp = level + rng.uniform(0.1, 0.8) * (top - level)
    for z in zs:
        cy, cx = ndi.center_of_mass(inside[z])
        if kind == "canal":
            d2 = ((yy - cy) * spacing[1]) ** 2 + ((xx - cx) * spacing[2]) ** 2
            w = np.exp(-d2 / (2 * sigma ** 2))
        else:  # a band across the cord along x
            w = np.exp(-(((yy - cy - rng.uniform(-2, 2)) * spacing[1]) ** 2) / (2 * (2 * sigma) ** 2))
        w = (w * inside[z]).astype(np.float32)
        out[z] = out[z] * (1 - w) + w * np.maximum(out[z], amp)
    return out
