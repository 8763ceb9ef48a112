"""Small networks of our own (routing classifiers, seed ensembles). One ``nn.Module`` per file."""
from __future__ import annotations

from sci_node.nets.ensemble import LogitMeanEnsemble
from sci_node.nets.series_ensemble import ProbMeanSeriesNet
from sci_node.nets.series_net import SeriesNet

__all__ = ["LogitMeanEnsemble", "ProbMeanSeriesNet", "SeriesNet"]
