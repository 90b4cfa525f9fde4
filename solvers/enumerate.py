"""Exact by enumeration: score every candidate tile pattern in one matrix product.

With ``saturate=True`` the candidates are all tiles with exactly N per row and column (90 for
2:4). Without it they are the *maximal* "at most N" tiles (no entry can be added): since scores
are non-negative, some maximal pattern is always optimal, and there are far fewer of them than
the 7 343 valid "at most 2" patterns of 2:4. Refuses patterns with too many candidates.
"""

from __future__ import annotations

import numpy as np

from nmopt.certificates import prices_from_mask
from nmopt.diversity import count_tile_masks, tile_patterns
from nmopt.solvers._base import Solver, register

#: Most valid tile patterns this solver enumerates (before keeping the maximal ones).
MAX_PATTERNS = 60_000


def _pattern_count(n: int, m: int, saturate: bool) -> int | None:
    if m > 8 or (not saturate and 2 ** (n * m) > MAX_PATTERNS):
        # at most N: every subset of one exactly-N tile is valid, so there are >= 2**(n*m)
        # patterns; deciding that here avoids seconds of exact counting (7:8, 8:8)
        return None
    try:
        return count_tile_masks(m, m, n, not saturate)
    except ValueError:
        return None


@register
class EnumerationSolver(Solver):
    """Exact for small patterns (2:4, 1:4, 3:4, ...)."""

    name = "enumerate"
    exact = True

    def refuses(self, n, m, saturate, num_tiles):
        count = _pattern_count(n, m, saturate)
        if count is None or count > MAX_PATTERNS:
            shown = "too many to count" if count is None else f"{count}"
            return (f"{n}:{m} has {shown} valid tile patterns (limit {MAX_PATTERNS}); use 'mcf' "
                    "or another exact solver")
        return super().refuses(n, m, saturate, num_tiles)

    def solve(self, tiles, n, *, saturate, backend):
        t, m, _ = tiles.shape
        pats = tile_patterns(n, m, saturate)
        flat = tiles.reshape(t, m * m)
        best = np.empty(t, dtype=np.int64)
        chunk = max(1, (1 << 22) // len(pats))
        for lo in range(0, t, chunk):
            best[lo:lo + chunk] = np.argmax(flat[lo:lo + chunk] @ pats.T, axis=1)
        mask = pats[best].astype(bool).reshape(t, m, m)
        u, v = prices_from_mask(tiles, mask, n, saturate)
        return mask, u, v
