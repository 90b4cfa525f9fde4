"""Per-tile min-cost flow in networkx: a slow, independent reference for small inputs.

networkx's network simplex is only reliable on integer weights (float weights can give
invalid flows or hang), so costs come from :mod:`nmopt._costs`.
"""

from __future__ import annotations

import numpy as np

from nmopt._costs import integer_costs, to_scores
from nmopt.certificates import prices_from_mask
from nmopt.solvers._base import Solver, register


@register
class NetworkxFlowSolver(Solver):
    """Exact, pure Python, one graph per tile; refuses more than ``max_tiles`` tiles."""

    name = "networkx"
    exact = True
    requires = ("networkx",)
    extra = "networkx"

    def __init__(self, max_tiles: int = 4096):
        self.max_tiles = max_tiles

    def refuses(self, n, m, saturate, num_tiles):
        if num_tiles > self.max_tiles:
            return (f"{num_tiles} tiles is more than this slow reference takes (max_tiles="
                    f"{self.max_tiles}); use 'mcf' or pass NetworkxFlowSolver(max_tiles=...)")
        return super().refuses(n, m, saturate, num_tiles)

    def solve(self, tiles, n, *, saturate, backend):
        import networkx as nx

        t, m, _ = tiles.shape
        costs, tile_max = integer_costs(tiles)
        mask = np.zeros(tiles.shape, dtype=bool)
        for k in range(t):
            g = nx.DiGraph()
            g.add_node("s", demand=-n * m)
            g.add_node("t", demand=n * m)
            for i in range(m):
                g.add_edge("s", ("r", i), capacity=n, weight=0)
                g.add_edge(("c", i), "t", capacity=n, weight=0)
                for j in range(m):
                    g.add_edge(("r", i), ("c", j), capacity=1, weight=-int(costs[k, i, j]))
            if not saturate:
                # networkx needs distinct edges: route the bypass through a helper node
                g.add_edge("s", "bypass", capacity=n * m, weight=0)
                g.add_edge("bypass", "t", capacity=n * m, weight=0)
            _, flow = nx.network_simplex(g)
            for i in range(m):
                for j, f in flow[("r", i)].items():
                    mask[k, i, j[1]] = f > 0
        u, v = prices_from_mask(costs.astype(np.float64), mask, n, saturate)
        return mask, to_scores(u, tile_max), to_scores(v, tile_max)
