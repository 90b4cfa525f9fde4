"""Exact by linear programming in OR-Tools (GLOP, a simplex solver).

The tile LP's constraint matrix (row and column sums of a bipartite incidence) is totally
unimodular, so a simplex vertex is integral; the row and column duals are the prices of the
certificate. Tiles are batched as one block-diagonal LP per chunk.
"""

from __future__ import annotations

import numpy as np

from nmopt.solvers._base import Solver, register

#: Variables per LP; GLOP's time grows faster than linearly with the LP size.
MAX_VARS_PER_LP = 1 << 15

#: GLOP's default tolerances (1e-8, and 1e-9 for dropping small costs in preprocessing) leave
#: wide-range tiles up to ~5e-9 relative short of the optimum; these keep it below 1e-12.
_GLOP_PARAMS = ("dual_feasibility_tolerance:1e-12 primal_feasibility_tolerance:1e-12 "
                "preprocessor_zero_tolerance:1e-15")


def _constraint_matrix(t: int, m: int):
    """CSR matrix of the row and column constraints of ``t`` tiles (2m constraints each)."""
    from scipy.sparse import csr_matrix

    var = np.arange(t * m * m)
    tile, rem = np.divmod(var, m * m)
    i, j = np.divmod(rem, m)
    rows = np.concatenate([tile * 2 * m + i, tile * 2 * m + m + j])
    cols = np.concatenate([var, var])
    return csr_matrix((np.ones(rows.size), (rows, cols)), shape=(t * 2 * m, t * m * m))


@register
class OrtoolsLpSolver(Solver):
    """Exact for any N:M; slower than min-cost flow, kept as an independent check."""

    name = "lp"
    exact = True
    requires = ("ortools", "scipy")
    extra = "ortools"

    def solve(self, tiles, n, *, saturate, backend):
        from ortools.linear_solver.python import model_builder_helper as mbh

        t, m, _ = tiles.shape
        # GLOP's tolerances are absolute: scale every tile to max 1 (the argmax is unchanged)
        # and scale its prices back, or scores spanning many orders of magnitude end ABNORMAL.
        tile_max = tiles.max(axis=(1, 2))
        scale = np.where(tile_max > 0, tile_max, 1.0)
        tiles = tiles / scale[:, None, None]
        mask = np.zeros(tiles.shape, dtype=bool)
        u = np.zeros((t, m))
        v = np.zeros((t, m))
        step = max(1, MAX_VARS_PER_LP // (m * m))
        for lo in range(0, t, step):
            hi = min(t, lo + step)
            k = hi - lo
            model = mbh.ModelBuilderHelper()
            nv, nc = k * m * m, k * 2 * m
            model.fill_model_from_sparse_data(
                np.zeros(nv), np.ones(nv), tiles[lo:hi].ravel().copy(),
                np.full(nc, float(n) if saturate else -np.inf), np.full(nc, float(n)),
                _constraint_matrix(k, m))
            model.set_maximize(True)
            solver = mbh.ModelSolverHelper("glop")
            solver.set_solver_specific_parameters(_GLOP_PARAMS)
            solver.solve(model)
            status = solver.status()
            if status != mbh.SolveStatus.OPTIMAL:
                raise RuntimeError(f"OR-Tools GLOP returned {status.name} on tiles {lo}..{hi - 1}")
            x = np.asarray(solver.variable_values()).reshape(k, m, m)
            mask[lo:hi] = x > 0.5
            duals = np.asarray(solver.dual_values()).reshape(k, 2, m)
            u[lo:hi], v[lo:hi] = duals[:, 0], duals[:, 1]
        if not saturate:
            np.maximum(u, 0.0, out=u)
            np.maximum(v, 0.0, out=v)
        return mask, u * scale[:, None], v * scale[:, None]
