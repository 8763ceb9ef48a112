"""Lesion families: independently written synthetic-lesion generators (issue 34).

Each family is one module exposing ``FAMILY`` and ``generate(rng, image, cord, spacing) ->``
:class:`~trainer.lesion_families.base.LesionDraw` (the contract and the array conventions are in
:mod:`trainer.lesion_families.base`). The families differ in their shape, intensity and placement
models; a lesion model is trained on some of them and scored on the one it never saw.

* ``ellipsoid`` — the original generator (:mod:`trainer.lesions`): an ellipsoid along the cord with
  a rough border, placed uniformly in the cord, brightened from a cord percentile; its ranges come
  from the config's ``[lesions.generator]`` table;
* ``columns`` — anatomical placement by white-matter column, mostly peripheral, sharp edges,
  contrast relative to the local cord (:mod:`trainer.lesion_families.columns`);
* ``field`` — a thresholded smooth random field: irregular, multifocal, confluent, soft edges,
  from barely brighter than the cord to CSF-bright (:mod:`trainer.lesion_families.field`);
* ``swelling`` — long acute lesions with a bright core and oedema halo, cord swelling, small
  satellites (:mod:`trainer.lesion_families.swelling`);
* ``perivenular`` — lesions grown around radial (mostly dorsal/lateral, subpial) or central sulcal veins,
  multifocal, sometimes confluent, brightened by a contrast-to-noise ratio of the local noise (down to
  faint, CNR 2-15), partial volume through thick slices (:mod:`trainer.lesion_families.perivenular`).

In a training config, ``[lesions] families = [...]`` names the training families (one is drawn
per volume and draw) and ``[lesions] test_families = [...]`` the held-out evaluation's; without
them both are ``["ellipsoid"]`` with ``[lesions.generator]`` / ``[lesions.test_generator]``, which
is exactly the generator of every model trained before the families existed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from sci_node.errors import ConfigError
from trainer.lesion_families.base import LesionDraw

FAMILIES = ("ellipsoid", "columns", "field", "swelling", "perivenular")
# families whose numbers hold on any intensity scale (percentiles and ratios only); the others are written
# for the normalised model-grid intensities (trainer.lesion_families.base) and are given raw scanner
# intensities through :func:`on_raw_intensities`
SCALE_FREE = ("ellipsoid",)

Generate = Callable[[np.random.Generator, np.ndarray, np.ndarray, tuple[float, float, float]], LesionDraw]


def _ellipsoid(spec: Any) -> Generate:
    from trainer.lesions import inject_lesions

    def generate(rng: np.random.Generator, image: np.ndarray, cord: np.ndarray,
                 spacing: tuple[float, float, float]) -> LesionDraw:
        img, les = inject_lesions(rng, image, cord, spacing, spec)
        return LesionDraw(img, les, cord)
    return generate


def family_generator(name: str, spec: Any = None) -> Generate:
    """The ``generate`` function of family ``name`` (``spec``: the ellipsoid's ``LesionSpec``).

    Raises
    ------
    ConfigError
        ``name`` is not one of :data:`FAMILIES`.
    """
    if name not in FAMILIES:
        raise ConfigError(f"lesion family {name!r} is not one of {', '.join(FAMILIES)}")
    if name == "ellipsoid":
        from trainer.lesions import LesionSpec
        return _ellipsoid(spec if spec is not None else LesionSpec())
    module = importlib.import_module(f"trainer.lesion_families.{name}")
    return module.generate  # type: ignore[no-any-return]


def on_raw_intensities(gen: Generate, lower: float = 0.5, upper: float = 99.5, clip_max: float = 1.5) -> Generate:
    """``gen`` for raw scanner intensities: the image is normalised as the models' preprocessing does
    (``lower``/``upper`` percentiles to 0/1, clipped to ``[0, clip_max]``), the family paints on that,
    and what it changed is mapped back: ``raw + (p_upper - p_lower) * (painted - normalised)`` (exact
    wherever the image was not clipped; a voxel above the clip keeps its raw value)."""
    def generate(rng: np.random.Generator, image: np.ndarray, cord: np.ndarray,
                 spacing: tuple[float, float, float]) -> LesionDraw:
        lo, hi = (float(v) for v in np.percentile(image, [lower, upper]))
        scale = hi - lo
        if not np.isfinite(scale) or scale <= 1e-6:
            return gen(rng, image, cord, spacing)
        norm = np.clip((image - lo) / scale, 0.0, clip_max).astype(np.float32)
        draw = gen(rng, norm, cord, spacing)
        return LesionDraw((image + scale * (draw.image - norm)).astype(np.float32), draw.lesion, draw.cord)
    return generate


@dataclass(frozen=True)
class LesionSource:
    """Draws lesions from one of several families, chosen uniformly per call.

    With one family no extra random number is drawn, so a one-family source reproduces the
    stream of that family's generator exactly (old configs train bit-identically).
    """

    names: tuple[str, ...]
    generators: tuple[Generate, ...]

    @classmethod
    def ellipsoid(cls, spec: Any) -> "LesionSource":
        """The original generator alone with the ranges ``spec`` (a ``trainer.lesions.LesionSpec``)."""
        return cls(("ellipsoid",), (family_generator("ellipsoid", spec),))

    def __call__(self, rng: np.random.Generator, image: np.ndarray, cord: np.ndarray,
                 spacing: tuple[float, float, float]) -> LesionDraw:
        """One draw: see :class:`~trainer.lesion_families.base.LesionFamily`."""
        k = 0 if len(self.generators) == 1 else int(rng.integers(len(self.generators)))
        return self.generators[k](rng, image, cord, spacing)

    def for_raw_intensities(self) -> "LesionSource":
        """The same families for raw scanner intensities (the held-out scoring paints on the source
        image before the node's preprocessing): every family not in :data:`SCALE_FREE` is wrapped by
        :func:`on_raw_intensities`; the random stream is unchanged."""
        return LesionSource(self.names, tuple(g if n in SCALE_FREE else on_raw_intensities(g)
                                              for n, g in zip(self.names, self.generators)))


def lesion_source(cfg: dict[str, Any], which: str = "train") -> LesionSource:
    """The lesion source of a training config: ``which = "train"`` (``[lesions] families``, the
    ellipsoid with ``[lesions.generator]``) or ``"test"`` (``[lesions] test_families``, the
    ellipsoid with ``[lesions.test_generator]``)."""
    from trainer.lesions import lesion_spec

    les = cfg.get("lesions", {})
    key, table = ("families", "generator") if which == "train" else ("test_families", "test_generator")
    names = les.get(key, ["ellipsoid"])
    if isinstance(names, str) or not names:
        raise ConfigError(f"training config {cfg.get('_path', '?')!r}: [lesions] {key} must be a non-empty list")
    spec = lesion_spec(cfg, table)
    return LesionSource(tuple(names), tuple(family_generator(n, spec) for n in names))
