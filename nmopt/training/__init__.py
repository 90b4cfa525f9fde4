"""Sparse training with (transposable) N:M masks in PyTorch.

``nmopt.sparsify_(model, nmopt.SparsityConfig(...))`` turns Linear and convolution layers into
sparse layers whose forward and backward-data GEMMs use ``W * mask`` (on sparse kernels where
they exist), with a dense straight-through weight gradient (STE or SR-STE) and masks refreshed
every K optimizer steps. This package imports torch; ``import nmopt`` does not import it.
"""

from nmopt.training.api import (
    SparseTraining,
    densify_,
    export_pruned_state_dict,
    model_sparsity_stats,
    refresh_masks,
    sparsify_,
    step,
)
from nmopt.training.config import SparsityConfig
from nmopt.training.layers import SparseConv, SparseLinear, check_tile_mask

__all__ = [
    "SparseConv",
    "SparseLinear",
    "SparseTraining",
    "SparsityConfig",
    "check_tile_mask",
    "densify_",
    "export_pruned_state_dict",
    "model_sparsity_stats",
    "refresh_masks",
    "sparsify_",
    "step",
]
