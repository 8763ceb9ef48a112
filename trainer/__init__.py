"""sci-node offline trainer: datasets, synthetic images and lesions, training loops, artefacts."""
from __future__ import annotations

__version__ = "0.1.0"
