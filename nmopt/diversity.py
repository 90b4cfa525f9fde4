"""Mask diversity: the exact number of distinct valid N:M masks."""

from __future__ import annotations

from collections import defaultdict
from functools import cache, lru_cache
from itertools import combinations
from math import comb, prod

import numpy as np

from nmopt.patterns import parse_pattern

#: Largest number of DP states (column-sum profiles) counted before refusing.
MAX_STATES = 300_000
#: Largest whole-matrix count returned, in bits (a 768 x 3072 4:8 matrix needs 1.3 M).
MAX_BITS = 1 << 27
#: Most DP transitions (state x row allocation, 5-10 us each with big integers) before refusing
#: (after 9-16 s on 2 shared cores):
#: the states alone do not bound the work (5:16 "at most" has few states but hours of steps).
MAX_STEPS = 1_600_000


def _allocations(counts: tuple[int, ...], k: int, start: int = 0):
    """Every way to take ``k`` items from classes with the given sizes (one count per class)."""
    if start == len(counts):
        if k == 0:
            yield ()
        return
    for a in range(min(counts[start], k) + 1):
        for rest in _allocations(counts, k - a, start + 1):
            yield (a, *rest)


@cache
def count_tile_masks(rows: int, cols: int, n: int, at_most: bool) -> int:
    """Number of rows x cols 0/1 matrices with every row and column sum = n (or <= n).

    Dynamic programming over rows; the state is how many columns currently hold 0, 1, .., n
    ones (columns are interchangeable), so the count is exact in Python integers.
    """
    if not at_most and rows == cols and 2 * n > cols:  # complements: sums n <-> cols - n
        return count_tile_masks(rows, cols, cols - n, False)
    states_bound = comb(cols + n, n)
    if states_bound > MAX_STATES:
        raise ValueError(f"mask_diversity: {n}:{cols} is too large to count exactly here "
                         f"(up to {states_bound} column profiles; the limit is {MAX_STATES})")
    start = (cols,) + (0,) * n
    states = {start: 1}
    row_sums = range(n + 1) if at_most else (n,)
    steps = 0
    for _ in range(rows):
        nxt: dict[tuple[int, ...], int] = defaultdict(int)
        for state, ways in states.items():
            open_classes = state[:n]
            for k in row_sums:
                for alloc in _allocations(open_classes, k):
                    steps += 1
                    if steps > MAX_STEPS:
                        raise ValueError(f"mask_diversity: {n}:{cols}"
                                         f"{' at most' if at_most else ''} is too large to count "
                                         f"exactly here (over {MAX_STEPS} counting steps)")
                    w = prod(comb(c, a) for c, a in zip(open_classes, alloc))
                    new = list(state)
                    for c, a in enumerate(alloc):
                        new[c] -= a
                        new[c + 1] += a
                    nxt[tuple(new)] += ways * w
        states = nxt
    if at_most:
        return sum(states.values())
    return states.get((0,) * n + (cols,), 0)


def mask_diversity(pattern, transposable: bool = True, at_most: bool = False,
                   shape: tuple[int, int] | None = None) -> int:
    """Exact number of valid N:M masks, per M x M tile or for a whole matrix.

    Parameters
    ----------
    pattern : "N:M" or (n, m)
    transposable : count transposable masks (every row and column of the tile keeps N); else
        row-wise masks (``C(M, N) ** M`` per tile).
    at_most : count masks keeping *at most* N (the hardware constraint) instead of exactly N.
    shape : (rows, cols), multiples of M, or None for one tile. For a matrix the count is the
        product over its tiles (a Python big integer).

    Notes
    -----
    Transposable counts are the number of M x M 0/1 matrices with all row and column sums N:
    90 for 2:4, 297 200 for 3:6, 116 963 796 250 for 4:8 (7 343 "at most 2" masks for 2:4).
    A published factorial formula for transposable diversity overcounts (it gives 1.76e13 for
    4:8): it treats rows as independent once column totals are fixed, which they are not.
    """
    p = parse_pattern(pattern)
    if transposable:
        per_tile = count_tile_masks(p.m, p.m, p.n, at_most)
    else:
        per_row = sum(comb(p.m, k) for k in range(p.n + 1)) if at_most else comb(p.m, p.n)
        per_tile = per_row ** p.m
    if shape is None:
        return per_tile
    tiles = matrix_tiles(shape, p.m)
    bits = tiles * max(1, per_tile.bit_length())
    if bits > MAX_BITS:
        raise ValueError(f"mask_diversity: the count for shape {tuple(shape)} has about {bits} bits "
                         f"(over {MAX_BITS}); its logarithm is tiles * log(per-tile count) = "
                         f"{tiles} * log({per_tile})")
    return per_tile ** tiles


def matrix_tiles(shape, m: int) -> int:
    """The M x M tiles of a (rows, cols) matrix; ValueError unless both are positive multiples
    of M."""
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(hasattr(s, "__index__") for s in shape)
            or any(int(s) < 1 or int(s) % m for s in shape)):
        raise ValueError(f"shape: expected (rows, cols), positive multiples of M={m}, got {shape}")
    return (int(shape[0]) // m) * (int(shape[1]) // m)


@lru_cache(maxsize=32)
def tile_patterns(n: int, m: int, saturate: bool) -> np.ndarray:
    """Candidate tile patterns as a (K, m*m) float64 0/1 matrix.

    With ``saturate`` every m x m tile with exactly n per row and column (90 for 2:4); else the
    *maximal* "at most n" tiles (no entry can be added). Scores are non-negative, so some maximal
    pattern is always optimal, and there are far fewer of them than valid "at most n" tiles.
    """
    sizes = (n,) if saturate else range(n + 1)
    rows = [np.isin(np.arange(m), c) for k in sizes for c in combinations(range(m), k)]
    out: list[np.ndarray] = []

    def extend(prefix: list[np.ndarray], col_sum: np.ndarray) -> None:
        left = m - len(prefix)
        if left == 0:
            tile = np.array(prefix)
            if saturate:
                if (col_sum == n).all():
                    out.append(tile)
                return
            full_r = tile.sum(axis=1) == n
            full_c = col_sum == n
            if (tile | full_r[:, None] | full_c[None, :]).all():
                out.append(tile)
            return
        for row in rows:
            cs = col_sum + row
            if (cs <= n).all() and (not saturate or (n - cs <= left - 1).all()):
                prefix.append(row)
                extend(prefix, cs)
                prefix.pop()

    extend([], np.zeros(m, dtype=int))
    return np.array(out, dtype=np.float64).reshape(len(out), m * m)
