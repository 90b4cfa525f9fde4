"""Independent oracles for the test suite, written without using nmopt's own solver code.

- :func:`brute_force_optimum`: enumerate every 0/1 tile (M <= 4, and small rectangular edge
  tiles) with row and column sums <= N (or == N) and keep the best score.
- :func:`lp_optimum`: the tile LP in scipy's HiGHS (dual simplex), with a lower value from the
  rounded primal (re-validated here) and an upper value from the duals by the closed-form bound.
- :func:`rowwise_optimum`: row-wise N:M by sorting each group.
- :func:`violations`, :func:`deficit`, :func:`closed_form_bound`: validity, empty slots and the
  weak-duality bound, recomputed with plain loops over tiles.
- ``INPUTS``: the score families every exact solver is compared on.

Loaded by ``tests/conftest.py`` as the module ``nmopt_test_oracles`` (pytest runs with
``--import-mode=importlib``, so ``tests/`` is not on ``sys.path``).
"""

from __future__ import annotations

from functools import cache

import numpy as np


# -- tiles, independently of nmopt._tiles ----------------------------------------------------
def tile_slices(shape: tuple[int, int], m: int):
    """Yield ``(bi, bj, row slice, column slice)`` of every aligned tile, edge tiles cropped."""
    rows, cols = shape
    for bi, r0 in enumerate(range(0, rows, m)):
        for bj, c0 in enumerate(range(0, cols, m)):
            yield bi, bj, slice(r0, min(r0 + m, rows)), slice(c0, min(c0 + m, cols))


def as_2d(a: np.ndarray) -> np.ndarray:
    """The (out, in*kh*kw) view of a conv weight, or the matrix itself."""
    a = np.asarray(a)
    return a.reshape(a.shape[0], -1) if a.ndim == 4 else a


def blocks(a, m: int, fill=0) -> np.ndarray:
    """Pad a 2-D array to multiples of ``m`` and view it as (tile row, r, tile col, c)."""
    a = as_2d(np.asarray(a))
    rows, cols = a.shape
    tr, tc = -(-rows // m), -(-cols // m)
    padded = np.full((tr * m, tc * m), fill, dtype=a.dtype)
    padded[:rows, :cols] = a
    return padded.reshape(tr, m, tc, m)


def violations(mask, n: int, m: int, transposable: bool = True) -> list[tuple]:
    """Every (tile row, tile col, 'row'|'column', index, count) keeping more than ``n``, in
    row-major tile order, rows of a tile before its columns."""
    b = blocks(np.asarray(mask, dtype=bool), m, False)
    row_counts = b.sum(axis=3)  # (tile row, r, tile col)
    col_counts = b.sum(axis=1)  # (tile row, tile col, c)
    bad = [(bi, bj, "row", bi * m + r, int(row_counts[bi, r, bj]))
           for bi, r, bj in np.argwhere(row_counts > n)]
    if transposable:
        bad += [(bi, bj, "column", bj * m + c, int(col_counts[bi, bj, c]))
                for bi, bj, c in np.argwhere(col_counts > n)]
    bad = [(int(a), int(b_), k, int(i), cnt) for a, b_, k, i, cnt in bad]
    return sorted(bad, key=lambda x: (x[0], x[1], x[2] == "column", x[3]))


def deficit(mask, n: int, m: int, transposable: bool = True) -> int:
    """Rows (plus columns if transposable) of full M x M tiles that keep fewer than ``n``."""
    mask = as_2d(np.asarray(mask, dtype=bool))
    rows, cols = mask.shape
    b = blocks(mask[: rows - rows % m, : cols - cols % m], m, False)  # full tiles only
    count = int((b.sum(axis=3) < n).sum())
    if transposable:
        count += int((b.sum(axis=1) < n).sum())
    return count


def closed_form_bound(scores, n: int, m: int, u, v=None) -> float:
    """``sum over tiles of N*sum(u) + N*sum(v) + sum(max(0, s_ij - u_i - v_j))``.

    ``u`` is (R, ceil(C/M)) and ``v`` is (ceil(R/M), C), the layout of ``MaskResult``. Edge
    tiles are padded to M x M with score 0 and price 0 (with saturate=True prices may be
    negative, and then the padded cells count).
    """
    s = blocks(np.asarray(scores, dtype=np.float64), m, 0.0)
    tr, _, tc, _ = s.shape
    u = np.asarray(u, dtype=np.float64)
    v = np.zeros((tr, as_2d(scores).shape[1])) if v is None else np.asarray(v, np.float64)
    pu = np.zeros((tr * m, tc))
    pu[: u.shape[0]] = u
    pv = np.zeros((tr, tc * m))
    pv[:, : v.shape[1]] = v
    pu = pu.reshape(tr, m, tc)[:, :, :, None]  # price of row r of tile (bi, bj)
    pv = pv.reshape(tr, tc, m)[:, None, :, :]  # price of column c of tile (bi, bj)
    slack = np.maximum(s - pu - pv, 0.0)
    return float(n * pu.sum() + n * pv.sum() + slack.sum())


def tile_kept(scores, mask, m: int) -> np.ndarray:
    """Kept score of every tile (row-major tile order)."""
    s = blocks(np.asarray(scores, dtype=np.float64), m, 0.0)
    k = blocks(np.asarray(mask, dtype=bool), m, False)
    return np.where(k, s, 0.0).sum(axis=(1, 3)).ravel()


# -- brute force over all 0/1 tiles ----------------------------------------------------------
@cache
def all_patterns(rows: int, cols: int, n: int, exactly: bool) -> np.ndarray:
    """Every rows x cols 0/1 matrix with row and column sums <= n (== n if ``exactly``).

    Returned as a (K, rows*cols) float64 matrix. Enumerates all 2**(rows*cols) matrices, so
    only for rows*cols <= 16.
    """
    k = rows * cols
    if k > 16:
        raise ValueError("brute force is limited to 16 cells")
    bits = ((np.arange(2**k)[:, None] >> np.arange(k)) & 1).astype(np.int64)
    tiles = bits.reshape(-1, rows, cols)
    rs, cs = tiles.sum(axis=2), tiles.sum(axis=1)
    if exactly:
        ok = (rs == n).all(axis=1) & (cs == n).all(axis=1)
    else:
        ok = (rs <= n).all(axis=1) & (cs <= n).all(axis=1)
    return bits[ok].astype(np.float64)


def brute_force_tile_optima(scores, n: int, m: int, saturate: bool = False) -> np.ndarray:
    """Best kept score of every tile (row-major tile order), by full enumeration.

    An edge tile is enumerated on its real rows x cols. Exactly N (``saturate``) applies to full
    tiles only; edge tiles cut by the border keep at most N, as nmopt defines it.
    """
    s = as_2d(np.asarray(scores, dtype=np.float64))
    best = []
    for _, _, rs, cs in tile_slices(s.shape, m):
        tile = s[rs, cs]
        exactly = saturate and tile.shape == (m, m)
        pats = all_patterns(tile.shape[0], tile.shape[1], n, exactly)
        best.append(float((pats @ tile.ravel()).max()))
    return np.array(best)


def brute_force_optimum(scores, n: int, m: int, saturate: bool = False) -> float:
    """Best kept score of any valid transposable mask, by full enumeration (M <= 4)."""
    return float(brute_force_tile_optima(scores, n, m, saturate).sum())


# -- row-wise ----------------------------------------------------------------------------------
def rowwise_optimum(scores, n: int, m: int) -> float:
    """Best kept score of a row-wise N:M mask: the top n of every group of m in every row."""
    s = as_2d(np.asarray(scores, dtype=np.float64))
    total = 0.0
    for c0 in range(0, s.shape[1], m):
        group = np.sort(s[:, c0:c0 + m], axis=1)[:, ::-1]
        total += group[:, :n].sum()
    return float(total)


# -- LP oracle (scipy HiGHS), polished by negative-cycle cancelling ---------------------------
def _residual(tile: np.ndarray, x: np.ndarray, n: int, saturate: bool) -> np.ndarray:
    """Dense residual-arc cost matrix (inf: no arc) of the flow that ``x`` describes.

    Nodes: rows 0..m-1, columns m..2m-1, and (at most N only) source 2m and sink 2m+1 with the
    circulation arc sink -> source. Optimal iff the residual graph has no negative cycle.
    """
    m = tile.shape[0]
    size = 2 * m if saturate else 2 * m + 2
    c = np.full((size, size), np.inf)
    c[:m, m:2 * m] = np.where(x, np.inf, -tile)  # add an entry
    c[m:2 * m, :m] = np.where(x, tile, np.inf).T  # drop an entry
    if not saturate:
        src, snk = 2 * m, 2 * m + 1
        r, k = x.sum(axis=1), x.sum(axis=0)
        c[src, :m] = np.where(r < n, 0.0, np.inf)
        c[:m, src] = np.where(r > 0, 0.0, np.inf)
        c[m:2 * m, snk] = np.where(k < n, 0.0, np.inf)
        c[snk, m:2 * m] = np.where(k > 0, 0.0, np.inf)
        c[snk, src] = 0.0
        c[src, snk] = 0.0 if x.any() else np.inf
    return c


def _bellman_ford(c: np.ndarray, eps: float):
    """Distances from a virtual source joined to every node at cost 0, and one negative cycle
    (a list of nodes) if some cycle costs less than about -eps, else None."""
    size = c.shape[0]
    d = np.zeros(size)
    pred = np.full(size, -1)
    changed = np.zeros(size, dtype=bool)
    for _ in range(size + 1):
        cand = d[:, None] + c
        best = cand.min(axis=0)
        changed = best < d - eps
        if not changed.any():
            return d, None
        pred[changed] = cand.argmin(axis=0)[changed]
        d = np.where(changed, best, d)
    node = int(np.flatnonzero(changed)[0])
    for _ in range(size):  # walk back into the cycle
        node = int(pred[node])
    cycle, cur = [node], int(pred[node])
    while cur != node:
        cycle.append(cur)
        cur = int(pred[cur])
    return d, cycle[::-1]


def polish(tile: np.ndarray, x: np.ndarray, n: int, saturate: bool):
    """Cancel negative cycles until none is left: then ``x`` is optimal (min-cost-flow
    optimality conditions). Returns the optimal ``x`` and prices ``u, v`` from the distances."""
    m = tile.shape[0]
    x = x.copy()
    eps = 1e-13 * max(float(tile.max()), 1e-300)
    for _ in range(4 * m * m):
        d, cycle = _bellman_ford(_residual(tile, x, n, saturate), eps)
        if cycle is None:
            break
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            if a < m <= b < 2 * m:
                x[a, b - m] = True
            elif b < m <= a < 2 * m:
                x[b, a - m] = False
    else:
        raise AssertionError("cycle cancelling did not finish")
    if saturate:
        return x, d[:m], -d[m:2 * m]
    return x, np.maximum(d[:m] - d[2 * m], 0.0), np.maximum(d[2 * m + 1] - d[m:2 * m], 0.0)


def _bound(tile, n, u, v) -> float:
    return float(n * u.sum() + n * v.sum() + np.maximum(tile - u[:, None] - v[None, :], 0).sum())


def lp_tile_optima(scores, n: int, m: int, saturate: bool = False):
    """Per-tile (lower, upper) values of the transposable optimum.

    Each tile is padded to M x M with zero score (exactly N on full tiles only) and solved by
    HiGHS dual simplex (scaled to max 1). The rounded vertex is re-validated, then polished by negative-cycle cancelling
    (exact whatever HiGHS's tolerances did). ``lower`` is the true score of that mask,
    ``upper`` the lower of the closed-form bounds at HiGHS's duals and at the cycle-free
    distances; the optimum lies in between.
    """
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    s = as_2d(np.asarray(scores, dtype=np.float64))
    ii, jj = np.divmod(np.arange(m * m), m)
    a = csr_matrix((np.ones(2 * m * m), (np.concatenate([ii, m + jj]),
                                         np.tile(np.arange(m * m), 2))), shape=(2 * m, m * m))
    lows, ups = [], []
    everywhere = saturate
    for _, _, rs, cs in tile_slices(s.shape, m):
        tile = np.zeros((m, m))
        tile[: rs.stop - rs.start, : cs.stop - cs.start] = s[rs, cs]
        # exactly N applies to full tiles only; edge tiles keep at most N
        saturate = everywhere and (rs.stop - rs.start, cs.stop - cs.start) == (m, m)
        scale = tile.max()
        if scale == 0:  # every valid pattern scores 0
            lows.append(0.0)
            ups.append(0.0)
            continue
        c = -(tile / scale).ravel()
        rhs = np.full(2 * m, float(n))
        opts = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}
        if saturate:
            res = linprog(c, A_eq=a, b_eq=rhs, bounds=(0, 1), method="highs-ds", options=opts)
            duals = -res.eqlin.marginals
        else:
            res = linprog(c, A_ub=a, b_ub=rhs, bounds=(0, 1), method="highs-ds", options=opts)
            duals = np.maximum(-res.ineqlin.marginals, 0.0)
        assert res.status == 0, res.message
        x = res.x.reshape(m, m) > 0.5
        rsum, csum = x.sum(axis=1), x.sum(axis=0)
        if saturate:
            assert (rsum == n).all() and (csum == n).all(), "HiGHS vertex is not exactly N"
        else:
            assert (rsum <= n).all() and (csum <= n).all(), "HiGHS vertex is not valid"
        x, u, v = polish(tile, x, n, saturate)
        rsum, csum = x.sum(axis=1), x.sum(axis=0)
        assert (rsum == n).all() and (csum == n).all() if saturate else \
            (rsum <= n).all() and (csum <= n).all()
        lows.append(float(tile[x].sum()))
        ups.append(min(_bound(tile, n, duals[:m] * scale, duals[m:] * scale),
                       _bound(tile, n, u, v)))
    return np.array(lows), np.array(ups)


def assignment_optimum(scores, m: int) -> float:
    """1:M optimum by scipy's linear_sum_assignment per tile (an at-most-1 matching)."""
    from scipy.optimize import linear_sum_assignment

    s = as_2d(np.asarray(scores, dtype=np.float64))
    total = 0.0
    for _, _, rs, cs in tile_slices(s.shape, m):
        tile = s[rs, cs]
        r, c = linear_sum_assignment(tile, maximize=True)
        total += tile[r, c].sum()
    return float(total)


def tile_optima(scores, n: int, m: int, saturate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile (lower, upper) of the optimum: brute force where it is cheap, else HiGHS."""
    if m <= 4:
        best = brute_force_tile_optima(scores, n, m, saturate)
        return best, best
    return lp_tile_optima(scores, n, m, saturate)


# -- score families ----------------------------------------------------------------------------
def gaussian(rng, shape):
    return np.abs(rng.standard_normal(shape))


def student_t(rng, shape):
    return np.abs(rng.standard_t(1.5, shape))


def cauchy(rng, shape):
    return np.abs(rng.standard_cauchy(shape))


def ties(rng, shape):
    return rng.integers(0, 4, shape).astype(np.float64)


def zero_heavy(rng, shape):
    return np.abs(rng.standard_normal(shape)) * (rng.random(shape) < 0.1)


def all_zeros(rng, shape):
    return np.zeros(shape)


def wide_range(rng, shape):
    return np.abs(rng.standard_normal(shape)) * 10.0 ** rng.uniform(-12, 12, shape)


INPUTS = {f.__name__: f for f in (gaussian, student_t, cauchy, ties, zero_heavy, all_zeros,
                                  wide_range)}


# -- the checks every result must pass -------------------------------------------------------
def check_result(res, scores, n: int, m: int, *, transposable: bool = True,
                 saturate: bool = False) -> np.ndarray:
    """Assert everything a ``MaskResult`` promises; return its mask as a numpy bool array.

    ``res.mask`` must already be numpy (the round trip is tested separately). Checks: bool
    dtype and shape, validity (nmopt's own check and :func:`violations`), objective, bound >=
    objective, gap and optimal flag, price shapes and signs, the bound recomputed from the
    prices by ``nmopt.dual_bound`` and by :func:`closed_form_bound`, the deficit, and for
    ``saturate=True`` exactly N in every row and column of full tiles.
    """
    import nmopt

    s = np.asarray(scores, dtype=np.float64)
    mask = res.mask
    assert isinstance(mask, np.ndarray) and mask.dtype == np.bool_, type(mask)
    assert mask.shape == s.shape
    pattern = f"{n}:{m}"
    nmopt.check_mask(mask, pattern, transposable=transposable)
    assert violations(mask, n, m, transposable) == []
    s2 = as_2d(s)
    rows, cols = s2.shape
    kept = float(s2[as_2d(mask)].sum())
    assert res.objective == _approx(kept, 1e-12)
    assert res.bound >= res.objective
    gap = (res.bound - res.objective) / res.bound if res.bound > 0 else 0.0
    assert res.gap == _approx(gap, 1e-9, 1e-15)
    assert res.optimal == (res.gap <= nmopt.OPTIMALITY_TOL)
    assert res.u.shape == (rows, -(-cols // m))
    assert res.v.shape == (-(-rows // m), cols)
    assert np.isfinite(res.u).all() and np.isfinite(res.v).all()
    if not saturate:
        assert (res.u >= 0).all() and (res.v >= 0).all()
    if not transposable:
        assert not res.v.any(), "row-wise prices have no column part"
    again = nmopt.dual_bound(s, pattern, res.u, res.v, saturate=saturate)
    assert again == _approx(res.bound, 1e-9)
    assert closed_form_bound(s, n, m, res.u, res.v) == _approx(res.bound, 1e-9)
    assert res.deficit == deficit(mask, n, m, transposable)
    assert res.pattern == pattern and res.transposable == transposable
    assert res.saturate == saturate
    if saturate:
        for _, _, rs, cs in tile_slices((rows, cols), m):
            tile = as_2d(mask)[rs, cs]
            if tile.shape == (m, m):
                assert (tile.sum(axis=1) == n).all()
                if transposable:
                    assert (tile.sum(axis=0) == n).all()
        assert res.deficit == 0
    return mask


def _approx(x: float, rel: float, abs_: float = 0.0):
    import pytest

    return pytest.approx(x, rel=rel, abs=abs_)


def greedy_reference(scores, n: int, m: int) -> np.ndarray:
    """The paper's greedy, tile by tile in plain Python: visit entries by descending score, ties
    by lower row-major index inside the tile, keep one while its row and column hold < n."""
    s = as_2d(np.asarray(scores, dtype=np.float64))
    mask = np.zeros(s.shape, dtype=bool)
    for _, _, rs, cs in tile_slices(s.shape, m):
        tile = np.zeros((m, m))
        tile[: rs.stop - rs.start, : cs.stop - cs.start] = s[rs, cs]
        order = sorted(range(m * m), key=lambda k: (-tile.flat[k], k))
        rc, cc = [0] * m, [0] * m
        for k in order:
            i, j = divmod(k, m)
            if rc[i] < n and cc[j] < n:
                rc[i] += 1
                cc[j] += 1
                if rs.start + i < rs.stop and cs.start + j < cs.stop:
                    mask[rs.start + i, cs.start + j] = True
    return mask


def refused(inst, n: int, m: int, saturate: bool, shape) -> str | None:
    """Why solver ``inst`` does not take n:m on a matrix of ``shape`` (None: it does).

    With ``saturate`` and edge tiles the solver must also take at most N (edge tiles)."""
    import nmopt

    tiles = -(-shape[0] // m) * -(-shape[1] // m)
    edge = shape[0] % m != 0 or shape[1] % m != 0
    return nmopt.solvers.refusal(inst, n, m, saturate, tiles, edge)
