"""Exact transposable masks from the C kernel: min-cost flow per tile, at greedy speed.

Each tile is a max-weight bipartite b-matching, solved by successive shortest paths from a
dual-feasible warm start (every row keeps its top N); the node potentials are the optimal
prices, so the certificate comes out of the solve. Every tile is then checked in C: the mask
is valid and its bound equals its kept score to ``nm_gap_tol()`` (1e-12) relative, else the
tile is re-solved by cycle cancelling and re-checked to ``nm_fallback_tol()`` (1e-10). 4 x 4
tiles (1:4 ... 4:4) run the same algorithm held in vector registers, about twice as fast,
with the general path as their fallback. See ``backends/csrc/nm_exact.c``.
"""

from __future__ import annotations

import warnings

import numpy as np

from nmopt.solvers import register
from nmopt.solvers._base import Solver


@register
class CExactSolver(Solver):
    """Exact for any 1 <= N <= M <= 64, at most N or exactly N; needs the cffi backend."""

    name = "exact"
    exact = True
    backends = ("cffi",)

    def unavailable_reason(self) -> str | None:
        from nmopt import backends

        return backends.status().get("cffi", "cffi: backend not registered")

    def solve(self, tiles, n, *, saturate, backend):
        if getattr(backend, "name", None) != "cffi":
            raise ValueError(f"solver 'exact' runs on the cffi backend, not {backend!r}; "
                             "pass backend='cffi' or leave backend unset")
        mask, u, v, status = backend.exact(tiles, n, saturate)
        unverified = int(np.count_nonzero(status == 2))
        if unverified:
            warnings.warn(f"solver 'exact': {unverified} of {len(status)} tiles could not be "
                          "certified optimal (their prices give a valid but loose bound); "
                          "MaskResult.gap shows by how much", RuntimeWarning, stacklevel=3)
        return mask, u, v
