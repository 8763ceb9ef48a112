"""sci-node: a DICOM AI node for spinal cord and spinal cord lesion segmentation on MRI."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
