"""sci-node: a DICOM AI node for spinal cord and spinal cord lesion segmentation on MRI."""
from __future__ import annotations

from sci_node.moved import MOVED, install_aliases

__version__ = "0.1.0"
__all__ = ["__version__"]

install_aliases(MOVED)  # old module paths (before the wings) still import: see sci_node.moved
