"""Post-training pruning of pretrained models to N:M (transposable) sparsity.

``nmopt.prune_model(model, calibration, nmopt.PruneConfig(pattern="8:16", method="admm"))``
prunes every Linear of a model's transformer blocks in place, block by block on calibration
data, with an exact (certified) mask step in every method; see :func:`prune_model`.
Imports torch; ``import nmopt`` loads this package only when one of its names is used.
"""

from __future__ import annotations

from nmopt.posttrain.api import METHODS, prune_model
from nmopt.posttrain.config import PruneConfig
from nmopt.posttrain.report import LayerReport, PruneReport, SkippedLayer

__all__ = ["prune_model", "PruneConfig", "PruneReport", "LayerReport", "SkippedLayer", "METHODS"]
