"""nmopt: provably good N:M transposable sparsity masks, with certified optimality gaps.

``import nmopt`` stays light: torch, ortools and networkx are imported only by the code that
uses them.
"""

from __future__ import annotations

import importlib
import importlib.util

try:
    from nmopt import backends, solvers
except ImportError as exc:
    # solvers/ and backends/ sit at the repository root and become nmopt.solvers and
    # nmopt.backends only when the package is installed (setuptools package-dir mapping).
    if importlib.util.find_spec("nmopt.backends") is None or importlib.util.find_spec("nmopt.solvers") is None:
        raise ImportError(
            "nmopt is not installed: this looks like a source checkout, where nmopt.backends and "
            "nmopt.solvers (the top-level backends/ and solvers/ folders) exist only after "
            "installation. Install it with `make install` (creates .venv) or `pip install -e .`, "
            "then run Python outside the repository root or with PYTHONSAFEPATH=1.") from exc
    raise
from nmopt import backends, solvers
from nmopt._version import __version__
from nmopt.api import find_mask
from nmopt.certificates import OPTIMALITY_TOL, dual_bound
from nmopt.diversity import mask_diversity
from nmopt.masks import check_mask, is_valid_mask
from nmopt.patterns import Pattern, parse_pattern
from nmopt.result import MaskResult

__all__ = [
    "find_mask", "MaskResult", "dual_bound", "OPTIMALITY_TOL", "check_mask", "is_valid_mask",
    "mask_diversity", "Pattern", "parse_pattern", "solvers", "backends", "__version__",
]

# Sparse training imports torch, so its names load on first use (PEP 562), never at import.
_LAZY_TRAINING = ("sparsify_", "densify_", "SparsityConfig", "export_pruned_state_dict",
                  "model_sparsity_stats", "refresh_masks")


# Post-training pruning of pretrained models (torch as well).
_LAZY_POSTTRAIN = ("prune_model", "PruneConfig", "PruneReport")


# Reading pruned checkpoints (nm-packed ones restored): an application-layer module.
_LAZY_PRUNE = ("load_pruned",)


def __getattr__(name: str):
    if name in _LAZY_PRUNE:
        return getattr(importlib.import_module("nmopt.nm_format"), name)
    if name in _LAZY_TRAINING or name == "training":
        training = importlib.import_module("nmopt.training")
        return training if name == "training" else getattr(training, name)
    if name in _LAZY_POSTTRAIN or name == "posttrain":
        posttrain = importlib.import_module("nmopt.posttrain")
        return posttrain if name == "posttrain" else getattr(posttrain, name)
    raise AttributeError(f"module 'nmopt' has no attribute {name!r}")
