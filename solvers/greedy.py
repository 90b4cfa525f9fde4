"""The greedy 2-approximation of the transposable problem (the original paper's fast method).

Per tile: visit entries in descending score (ties: lower row-major index first) and keep one
while its row and its column both hold fewer than N. It can stop short of N in a row and a
column that are already paired, so it keeps at most N; it is guaranteed >= 1/2 of the optimum.
"""

from __future__ import annotations

from nmopt.certificates import DESCENT_STARTS, check_descent_args
from nmopt.solvers._base import Solver, register


@register
class GreedySolver(Solver):
    """Greedy on scores; runs on any backend that has the greedy kernel."""

    name = "greedy"
    exact = False
    backends = None
    exactly = False

    def __init__(self, sweeps: int = 4):
        self.sweeps, _ = check_descent_args(sweeps, DESCENT_STARTS)

    def solve(self, tiles, n, *, saturate, backend):
        mask = backend.greedy(tiles, n)
        u, v = backend.descent_prices(tiles, n, self.sweeps)
        return mask, u, v
