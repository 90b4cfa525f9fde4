"""Row-wise N:M (not transposable): exact by keeping the top N of every group of M."""

from __future__ import annotations

import numpy as np

from nmopt.certificates import _kth_largest
from nmopt.solvers._base import Solver, register


@register
class RowwiseSolver(Solver):
    """Top-N per group along the reduction dimension; the (N+1)-th largest is the row price."""

    name = "rowwise"
    exact = True
    transposable = False
    backends = None

    def solve(self, tiles, n, *, saturate, backend):
        t, m, _ = tiles.shape
        mask = backend.rowwise(tiles, n)
        u = np.zeros((t, m)) if n >= m else np.maximum(_kth_largest(tiles, n + 1, axis=2), 0.0)
        return mask, u, np.zeros((t, m))
