"""The contract every lesion family implements (one module per family in this package).

A *lesion family* is an independently written generator of synthetic intramedullary lesions.
The families differ in their shape model, their intensity model and where in the cord they put
lesions, so that a lesion model can be trained on some families and scored on the family it
never saw (leave-one-family-out, issue 34).

Arrays are ``(Z, Y, X)`` on the canonical LPS grid the segmentation models use: Z runs along
the body's superior-inferior axis (so the cord runs roughly along Z), Y is anterior-posterior
(index grows towards posterior), X is left-right (index grows towards the patient's left).
``spacing`` is ``(sz, sy, sx)`` in mm; sz may be thick (3-5 mm on axial stacks, 0.5-1 mm on
sagittal ones resampled in plane). Images are float32 normalised intensities (percentile
scaling, 0.5th → 0, 99.5th → 1, clipped to [0, 1.5]); masks uint8 {0, 1}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class LesionDraw:
    """One draw of a lesion family.

    Attributes
    ----------
    image : numpy.ndarray
        ``(Z, Y, X)`` float32, the input image with the lesions painted in (a new array).
    lesion : numpy.ndarray
        ``(Z, Y, X)`` uint8, the lesion label (1 = lesion); always inside ``cord``.
    cord : numpy.ndarray
        ``(Z, Y, X)`` uint8, the cord label after the draw: the input cord, or a swollen one
        when the family models cord swelling (the lesion stays part of the cord).
    """

    image: np.ndarray
    lesion: np.ndarray
    cord: np.ndarray


class LesionFamily(Protocol):
    """``generate(rng, image, cord, spacing) -> LesionDraw``; pure, randomness only from ``rng``."""

    def __call__(self, rng: np.random.Generator, image: np.ndarray, cord: np.ndarray,
                 spacing: tuple[float, float, float]) -> LesionDraw: ...
