"""nmopt: provably good N:M transposable sparsity masks, with certified optimality gaps.

``import nmopt`` stays light: torch, ortools and networkx are imported only by the code that
uses them.
"""

from __future__ import annotations

from nmopt import backends, solvers
from nmopt.api import find_mask
from nmopt.certificates import OPTIMALITY_TOL, dual_bound
from nmopt.diversity import mask_diversity
from nmopt.masks import check_mask, is_valid_mask
from nmopt.patterns import Pattern, parse_pattern
from nmopt.result import MaskResult

__version__ = "0.1.0"

__all__ = [
    "find_mask", "MaskResult", "dual_bound", "OPTIMALITY_TOL", "check_mask", "is_valid_mask",
    "mask_diversity", "Pattern", "parse_pattern", "solvers", "backends", "__version__",
]

# Sparse training imports torch, so its names load on first use (PEP 562), never at import.
_LAZY_TRAINING = ("sparsify_", "densify_", "SparsityConfig", "export_pruned_state_dict",
                  "model_sparsity_stats", "refresh_masks")


def __getattr__(name: str):
    if name in _LAZY_TRAINING or name == "training":
        import importlib

        training = importlib.import_module("nmopt.training")
        return training if name == "training" else getattr(training, name)
    raise AttributeError(f"module 'nmopt' has no attribute {name!r}")
