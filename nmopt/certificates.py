r"""Certified upper bounds on the best kept score, from LP duality.

Per M x M tile the transposable problem (at most N per row and column) is the LP

.. math::  \max \sum_{ij} s_{ij} x_{ij} \;\text{s.t.}\; \sum_j x_{ij} \le N,\;
           \sum_i x_{ij} \le N,\; 0 \le x_{ij} \le 1 ,

whose constraint matrix is totally unimodular, so its optimum is integral. For any prices
``u_i, v_j >= 0`` weak duality gives the bound

.. math::  B(u, v) = N \sum_i u_i + N \sum_j v_j + \sum_{ij} \max(0, s_{ij} - u_i - v_j)
           \;\ge\; \text{best kept score},

with equality at optimal prices. For the exactly-N variant (``saturate=True``) the same formula
is a bound for prices of any sign. Row-wise N:M is the special case ``v = 0``.
"""

from __future__ import annotations

import numpy as np

from nmopt._arrays import to_float64
from nmopt._tiles import TileGrid, as_matrix, check_scores, tile_counts
from nmopt.patterns import parse_pattern

#: Relative gap under which a result counts as certified optimal. Exact solvers reach it because
#: their prices are optimal up to float64 rounding of sums over the tile (about 1e-13 relative)
#: plus, for solvers that work on integer costs, the per-tile cost quantisation (see
#: ``nmopt._costs``), which is below 2.5e-9 relative for every pattern up to M = 64.
OPTIMALITY_TOL = 1e-7


def _slack(tiles: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``max(0, s_ij - u_i - v_j)`` for tiles (T, M, M) and prices (T, M)."""
    slack = np.subtract(tiles, u[:, :, None])
    slack -= v[:, None, :]
    return np.maximum(slack, 0.0, out=slack)


def tile_bounds(tiles: np.ndarray, n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-tile dual bound ``B(u, v)`` for tiles (T, M, M) and prices (T, M)."""
    slack = _slack(tiles, u, v)
    # summing the flattened tile is several times faster than axis=(1, 2) on tiny axes
    return n * (u.sum(axis=1) + v.sum(axis=1)) + slack.reshape(len(slack), -1).sum(axis=1)


def total_bound(tiles: np.ndarray, n: int, u: np.ndarray, v: np.ndarray) -> float:
    """``tile_bounds(...).sum()`` without the per-tile sums (faster on small tiles)."""
    return float(n * (u.sum() + v.sum()) + _slack(tiles, u, v).sum())


def dual_bound(scores, pattern, u, v=None, *, saturate: bool = False) -> float:
    """Weak-duality upper bound on the best kept score of any valid transposable mask.

    Parameters
    ----------
    scores : array (R, C) or conv (out, in, kh, kw)
        Non-negative scores, e.g. ``|W|``.
    pattern : "N:M" or (n, m)
    u : array (R, ceil(C/M))
        Price of row ``i`` inside tile column ``j // M`` (``MaskResult.u``).
    v : array (ceil(R/M), C), optional
        Price of column ``j`` inside tile row ``i // M`` (``MaskResult.v``); None means 0
        (the row-wise bound).
    saturate : bool
        If True the bound is for the exactly-N problem and prices of full tiles may be negative
        (edge tiles cut by the border keep at most N, so their prices must stay >= 0).

    Returns
    -------
    float
        ``N*sum(u) + N*sum(v) + sum(max(0, s_ij - u_i - v_j))``, summed over tiles. Valid for
        any prices ``u, v >= 0`` whatever produced them.
    """
    p = parse_pattern(pattern)
    s, _ = to_float64(scores, "scores")
    s = as_matrix(s, "scores")
    check_scores(s)
    grid = TileGrid(s.shape[0], s.shape[1], p.m)
    big_u = to_float64(u, "u")[0]
    big_v = np.zeros((grid.tile_rows, grid.cols)) if v is None else to_float64(v, "v")[0]
    for name, arr, shape in (("u", big_u, (grid.rows, grid.tile_cols)),
                             ("v", big_v, (grid.tile_rows, grid.cols))):
        if arr.shape != shape:
            raise ValueError(f"{name}: expected shape {shape} for scores of shape {s.shape} and "
                             f"M={p.m}, got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: prices must be finite")
        if not saturate and (arr < 0).any():
            raise ValueError(f"{name}: prices must be >= 0 for the at-most-N bound "
                             "(negative prices are only valid with saturate=True)")
    tu, tv = grid.matrices_to_prices(big_u, big_v)
    edge = ~grid.full_tiles()
    if saturate and ((tu[edge] < 0).any() or (tv[edge] < 0).any()):
        raise ValueError("u, v: prices of edge tiles (cut by the matrix border) must be >= 0: "
                         "exactly N applies to full tiles only, edge tiles keep at most N")
    return total_bound(grid.to_tiles(s), p.n, tu, tv)


def prices_from_mask(tiles: np.ndarray, mask: np.ndarray, n: int,
                     saturate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Dual prices that prove an optimal mask optimal (complementary slackness).

    Solves the difference constraints ``u_i + v_j >= s_ij`` where the mask drops (i, j),
    ``u_i + v_j <= s_ij`` where it keeps (i, j), ``u, v >= 0`` and ``u_i = 0`` (``v_j = 0``)
    on rows (columns) holding fewer than N, by Bellman-Ford shortest paths in the residual
    graph, vectorised over tiles. For an optimal mask there is no negative cycle and the prices
    give ``B(u, v)`` equal to the kept score; for a non-optimal mask the rounds are capped and
    the prices, though still valid for :func:`tile_bounds`, certify nothing tight.
    """
    t, m, _ = tiles.shape
    u = np.zeros((t, m))
    v = np.zeros((t, m))
    if t == 0:
        return u, v
    w_keep = np.where(mask, tiles, np.inf)  # col j -> row i, kept entries
    w_drop = np.where(mask, np.inf, -tiles)  # row i -> col j, dropped entries
    rows, cols = tile_counts(mask)
    row_short, col_short = rows < n, cols < n
    d_row = np.zeros((t, m))
    d_col = np.zeros((t, m))
    d_z = np.zeros(t)
    active = np.arange(t)
    for _ in range(2 * m + 3):
        if active.size == 0:
            break
        wk, wd = w_keep[active], w_drop[active]
        dr, dc, dz = d_row[active], d_col[active], d_z[active]
        nc = np.minimum(dc, (dr[:, :, None] + wd).min(axis=1))
        nr = np.minimum(dr, (nc[:, None, :] + wk).min(axis=2))
        nz = dz
        if not saturate:
            nc = np.minimum(nc, dz[:, None])
            nz = np.minimum(dz, nr.min(axis=1))
            nz = np.minimum(nz, np.where(col_short[active], nc, np.inf).min(axis=1))
            nr = np.where(row_short[active], np.minimum(nr, nz[:, None]), nr)
        changed = (nr != dr).any(axis=1) | (nc != dc).any(axis=1) | (nz != dz)
        d_row[active], d_col[active], d_z[active] = nr, nc, nz
        active = active[changed]
    if saturate:
        return d_row, -d_col
    u = np.maximum(d_row - d_z[:, None], 0.0)
    v = np.maximum(d_z[:, None] - d_col, 0.0)
    return u, v


def _kth_largest(a: np.ndarray, k: int, axis: int) -> np.ndarray:
    size = a.shape[axis]
    return np.take(np.partition(a, size - k, axis=axis), size - k, axis=axis)


#: Start factors of :func:`descent_prices` (column prices as fractions of the columns' (N+1)-th
#: largest score).
DESCENT_STARTS = (0.35, 0.5, 0.65)


def check_descent_args(sweeps, starts) -> tuple[int, tuple[float, ...]]:
    """``(sweeps, starts)`` of :func:`descent_prices` checked: sweeps >= 1, starts finite."""
    if isinstance(sweeps, bool) or not isinstance(sweeps, (int, np.integer)) or sweeps < 1:
        raise ValueError(f"sweeps: expected an integer >= 1, got {sweeps!r}")
    starts = tuple(float(b) for b in starts)
    if not 1 <= len(starts) <= 64 or not np.isfinite(starts).all():
        raise ValueError(f"starts: expected 1 to 64 finite factors, got {starts!r}")
    return int(sweeps), starts


def descent_prices(tiles: np.ndarray, n: int, sweeps: int = 4,
                   starts: tuple[float, ...] = DESCENT_STARTS) -> tuple[np.ndarray, np.ndarray]:
    """Cheap prices for approximate solvers: block coordinate descent on ``B(u, v)``.

    Given ``v``, the best ``u_i`` is the (N+1)-th largest of ``s_ij - v_j`` clipped at 0 (and
    symmetrically for ``v``), so each half-sweep minimises the bound exactly over one block and
    the bound never increases. The bound is not smooth, so descent stalls short of the optimum
    depending on where it starts: it starts from ``v_j = beta * (N+1)-th largest of column j``
    for each ``beta`` in ``starts`` and keeps, per tile, the prices with the lowest bound (tiles
    are independent, so the per-tile minimum is still a valid certificate). The benchmark reports
    how tight it gets (about 0.3% above the optimum at 2:4 on Gaussian weights, less at larger M).
    This is the reference; backends run it through ``Backend.descent_prices`` (C on cffi).
    """
    sweeps, starts = check_descent_args(sweeps, starts)
    t, m, _ = tiles.shape
    best_u = np.zeros((t, m))
    best_v = np.zeros((t, m))
    if n >= m or t == 0:
        return best_u, best_v
    best = np.full(t, np.inf)
    col_price = np.maximum(_kth_largest(tiles, n + 1, axis=1), 0.0)
    for beta in starts:
        v = beta * col_price
        for _ in range(sweeps):
            u = np.maximum(_kth_largest(tiles - v[:, None, :], n + 1, axis=2), 0.0)
            v = np.maximum(_kth_largest(tiles - u[:, :, None], n + 1, axis=1), 0.0)
        bound = tile_bounds(tiles, n, u, v)
        better = bound < best
        best[better] = bound[better]
        best_u[better] = u[better]
        best_v[better] = v[better]
    return best_u, best_v
