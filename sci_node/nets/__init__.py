"""Small networks of our own (routing classifiers). One ``nn.Module`` per file."""
from __future__ import annotations

from sci_node.nets.series_net import SeriesNet

__all__ = ["SeriesNet"]
