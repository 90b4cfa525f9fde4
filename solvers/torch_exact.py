"""Exact transposable masks from the torch backend's kernels (CPU or CUDA tensors).

Enumeration of the candidate patterns in one batched matmul for M <= 4, successive shortest
paths on per-tile integer costs, vectorised over tiles, for larger M (see
``backends/_torch_kernels.py``). The prices are recomputed from the mask by Bellman-Ford, so the
certificate does not depend on the kernel. Mostly useful on a GPU: on the CPU the C ``exact``
solver and OR-Tools are faster, and ``auto`` prefers them.
"""

from __future__ import annotations

import warnings

import numpy as np

from nmopt.solvers import register
from nmopt.solvers._base import Solver


@register
class TorchExactSolver(Solver):
    """Exact for any 1 <= N <= M <= 64, at most N or exactly N; runs on the torch backend."""

    name = "torch-exact"
    exact = True
    requires = ("torch",)
    extra = "torch"
    backends = ("torch",)

    def solve(self, tiles, n, *, saturate, backend):
        mask, u, v, status = backend.exact(tiles, n, saturate)
        unverified = int(np.count_nonzero(status == 2))
        if unverified:
            warnings.warn(f"solver 'torch-exact': {unverified} of {len(status)} tiles could not "
                          "be certified optimal; MaskResult.gap shows by how much",
                          RuntimeWarning, stacklevel=3)
        return mask, u, v
