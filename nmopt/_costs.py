"""Float scores to integer costs for integer min-cost-flow solvers: one place, one tolerance.

Each tile is scaled on its own so that its largest score becomes ``2**COST_BITS`` and every
score is rounded to the nearest integer. Rounding moves each score by at most
``0.5 * tile_max / 2**COST_BITS``; a mask that is optimal for the integer costs therefore loses
at most ``N*M * tile_max / 2**COST_BITS`` against the true optimum, and the optimum is at least
``tile_max``, so the relative loss per tile is at most ``N*M / 2**COST_BITS`` (<= 2e-9 for 32:64).
Prices found on the integer costs are scaled back (:func:`to_scores`); their bound on the true scores
exceeds the integer bound by at most ``M*M/2`` rounding steps, another <= 2e-9 relative.
Both are far inside ``OPTIMALITY_TOL`` (1e-7).

``COST_BITS = 40`` also keeps OR-Tools' internal arithmetic in int64: it multiplies costs by the
node count (< 2**19 per chunk, see ``MAX_ARCS_PER_GRAPH``) and sums at most 2**18 units of flow.
"""

from __future__ import annotations

import numpy as np

from nmopt._arrays import is_torch_tensor

COST_BITS = 40
MAX_ARCS_PER_GRAPH = 1 << 18


def integer_costs(tiles):
    """Per-tile integer costs (int64, same shape) and the per-tile maximum (T,) they were scaled
    by (1 for an all-zero tile); :func:`to_scores` turns prices on the costs back into prices
    on ``tiles``.

    ``tiles`` is a float (T, M, M) numpy array or torch tensor; the result is of the same kind
    (on the tensor's device), computed identically: both round half to even.
    """
    if is_torch_tensor(tiles):
        import torch

        s = tiles.to(torch.float64)
        tile_max = s.amax(dim=(1, 2))
        safe = torch.where(tile_max > 0, tile_max, torch.ones_like(tile_max))
        costs = torch.round(s / safe[:, None, None] * float(2**COST_BITS)).to(torch.int64)
        return costs, safe
    tile_max = tiles.max(axis=(1, 2))
    safe = np.where(tile_max > 0, tile_max, 1.0)
    # normalise first: 2**COST_BITS / tile_max overflows for tiles below ~6e-297
    costs = np.rint(tiles / safe[:, None, None] * float(2**COST_BITS)).astype(np.int64)
    return costs, safe


def to_scores(prices, tile_max):
    """Prices (T, M) found on :func:`integer_costs` back in the units of the scores. Divided by
    2**COST_BITS first (exact), then multiplied by the tile maximum: no overflow or underflow
    at any scale of the scores (1e-300 as well as 1e300)."""
    return prices * (1.0 / 2**COST_BITS) * tile_max[:, None]


def tiles_per_graph(m: int) -> int:
    """How many tiles one batched flow graph may hold."""
    return max(1, MAX_ARCS_PER_GRAPH // (m * m + 2 * m + 1))
