"""``find_mask``: the one entry point that picks, solves, certifies and returns a mask."""

from __future__ import annotations

import time

import numpy as np

from nmopt._arrays import ArrayKind, as_bool_numpy, is_torch_tensor, to_float64
from nmopt._tiles import TileGrid, as_matrix, check_scores, tile_counts
from nmopt.backends import get as get_backend
from nmopt.backends._matrix import BadScores, matrix_arg
from nmopt.certificates import OPTIMALITY_TOL, total_bound
from nmopt.masks import check_mask
from nmopt.patterns import parse_pattern
from nmopt.result import MaskResult
from nmopt.solvers import plan
from nmopt.solvers.exact import warn_unverified


def _prepare(weights, scores):
    """Validated float64 2-D scores and the array kind of ``weights``."""
    w, kind = to_float64(weights, "weights")
    as_matrix(w, "weights")  # rank and emptiness errors name the weights, not the scores
    if scores is None:
        s = np.abs(w)
        check_scores(s, "weights")
    else:
        s, _ = to_float64(scores, "scores")
        if s.shape != w.shape:
            raise ValueError(f"scores: shape {tuple(s.shape)} does not match weights "
                             f"{tuple(w.shape)}; pass one score per weight")
        check_scores(s, "scores")
    return as_matrix(s, "scores"), kind


def _checked_output(name, grid, tiles, mask_t, u_t, v_t, p, transposable, saturate):
    """Refuse a solver's output that is not a valid mask with finite prices: a wrong mask
    or a wrong "optimal" must never leave find_mask. Negative at-most-N prices are clipped
    to 0, which keeps the bound valid. Returns the mask, the prices and the tile counts."""
    mask_t = np.asarray(mask_t)
    if mask_t.shape != tiles.shape:
        raise RuntimeError(f"solver {name!r} returned a mask of shape {mask_t.shape}, "
                           f"expected {tiles.shape}")
    mask_t = mask_t.astype(bool)
    if grid.padded_shape != (grid.rows, grid.cols):  # kept padding is cropped: not counted
        mask_t &= grid.to_tiles(np.ones((grid.rows, grid.cols), dtype=bool), fill=False)
    rows, cols = tile_counts(mask_t)
    if (rows > p.n).any() or (transposable and (cols > p.n).any()):
        try:  # over N somewhere in the padded tiles: does it survive cropping the padding?
            check_mask(grid.from_tiles(mask_t), p, transposable)
        except ValueError as exc:
            raise RuntimeError(f"solver {name!r} returned an invalid mask: {exc}") from None
    if saturate:
        short = rows != p.n
        if transposable:
            short |= cols != p.n
        short &= grid.full_tiles()[:, None]
        if short.any():
            raise RuntimeError(f"solver {name!r} was asked for exactly N={p.n} (saturate=True) "
                               f"but tile {int(np.argwhere(short)[0, 0])} does not keep it")
    u_t = np.asarray(u_t, dtype=np.float64).reshape(tiles.shape[:2])
    v_t = np.asarray(v_t, dtype=np.float64).reshape(tiles.shape[:2])
    if not (np.isfinite(u_t).all() and np.isfinite(v_t).all()):
        raise RuntimeError(f"solver {name!r} returned prices that are not finite")
    if not saturate:
        u_t, v_t = np.maximum(u_t, 0.0), np.maximum(v_t, 0.0)
    return mask_t, u_t, v_t, (rows, cols)


def _solve(inst, grid, tiles, n, saturate, engine):
    """Run the solver; with ``saturate`` exactly N applies to full tiles, edge tiles keep at most N.

    An edge tile cut by the matrix border cannot in general keep exactly N in the part that
    exists, and padding it to exactly N would certify a bound on a different problem.
    """
    full = grid.full_tiles()
    if not saturate or full.all():
        return inst.solve(tiles, n, saturate=saturate, backend=engine)
    t, m, _ = tiles.shape
    mask, u, v = np.zeros(tiles.shape, dtype=bool), np.zeros((t, m)), np.zeros((t, m))
    for part, exactly in ((full, True), (~full, False)):
        if part.any():
            mask[part], u[part], v[part] = inst.solve(
                np.ascontiguousarray(tiles[part]), n, saturate=exactly, backend=engine)
    return mask, u, v


def _fill_free_slots(grid, tiles, mask_t, n, counts):
    """Keep zero-score entries wherever a row and a column of a tile both still have room.

    This changes neither the objective nor the certificate (a short row or column has price 0
    in an optimal certificate), and after an exact solve only zero scores can sit in such
    slots; the mask becomes maximal (with N = M and zero weights it is dense), edge tiles
    included. A maximal mask can still keep fewer than a maximum one, so on ties of zeros the
    deficit may depend on the optimal mask a solver returned. Entries are filled in row-major
    order; positive scores and padding are never added. Returns the mask and its tile counts.
    """
    rows, cols = counts
    # only a tile with a short row and a short column can have a free slot
    cand = np.flatnonzero((rows < n).any(axis=1) & (cols < n).any(axis=1))
    if cand.size:
        sub = mask_t[cand]
        real = grid.to_tiles(np.ones((grid.rows, grid.cols), dtype=bool), fill=False)[cand]
        zero = real & (tiles[cand] == 0)
        free = ~sub & (rows[cand] < n)[:, :, None] & (cols[cand] < n)[:, None, :]
        hit = (free & zero).reshape(len(cand), -1).any(axis=1)
        cand, sub, zero = cand[hit], sub[hit], zero[hit]
    if not cand.size:
        return mask_t, counts
    # the greedy visits kept entries (2) first, then real zero scores (1), then the rest (0);
    # dropping the rest afterwards leaves exactly the greedy completion by zero scores
    priority = np.where(sub, 2.0, zero.astype(np.float64))
    mask_t, rows, cols = mask_t.copy(), rows.copy(), cols.copy()
    mask_t[cand] = get_backend("numpy").greedy(priority, n) & (sub | zero)
    rows[cand], cols[cand] = tile_counts(mask_t[cand])
    return mask_t, (rows, cols)


def _in_place(weights, scores):
    """The 2-D matrix the C kernels can read where it lies (numpy float array or CPU tensor of
    float64/32/16 or bfloat16, any strides), whether it is |weights| or the scores, and the
    array kind of ``weights``; None when the input needs the general path."""
    x = weights if scores is None else scores
    if scores is not None and (type(scores) is not type(weights)
                               or tuple(scores.shape) != tuple(weights.shape)):
        return None
    if isinstance(weights, np.ndarray):
        kind = ArrayKind("numpy", None, weights.shape)
    elif is_torch_tensor(weights):
        kind = ArrayKind("torch", weights.device, tuple(weights.shape))
    else:
        return None
    if x.ndim not in (2, 4) or 0 in tuple(x.shape):
        return None
    if x.ndim == 4:
        x = x.reshape(x.shape[0], -1)
    if matrix_arg(x) is None:
        return None
    return x, scores is None, kind


def _check_warm(warm, p, shape, transposable, saturate):
    """The previous result to start from, or None (none given, or a row-wise or exactly-N
    problem, which start cold); refuse one of another pattern, shape or problem."""
    if warm is None:
        return None
    if not isinstance(warm, MaskResult):
        raise TypeError(f"warm_start: expected the MaskResult of a previous find_mask, got "
                        f"{type(warm).__name__}")
    if warm.pattern != str(p):
        raise ValueError(f"warm_start: the previous result is {warm.pattern}, this call {p}; "
                         "warm-start only the same pattern")
    if tuple(warm.mask.shape) != tuple(shape):
        raise ValueError(f"warm_start: the previous mask has shape {tuple(warm.mask.shape)}, "
                         f"the weights {tuple(shape)}; warm-start only the same weights")
    if warm.transposable != transposable or warm.saturate != saturate:
        raise ValueError("warm_start: the previous result has transposable="
                         f"{warm.transposable}, saturate={warm.saturate}; pass the same")
    if warm.v is None or saturate or not transposable:
        return None  # row-wise and exactly-N problems start cold
    cols = int(np.prod(shape[1:], dtype=np.int64))  # a 4-D conv weight as (out, in*kh*kw)
    want = (-(-int(shape[0]) // p.m), cols)  # MaskResult.v: (tile rows, cols)
    if not hasattr(warm.v, "shape") or tuple(warm.v.shape) != want:
        raise ValueError(f"warm_start: its column prices v must be an array of shape {want}, got "
                         f"{tuple(getattr(warm.v, 'shape', ())) or type(warm.v).__name__}; pass "
                         "the MaskResult find_mask returned, unchanged")
    return warm


def _solve_in_place(src, p, grid, saturate, warm, engine, inst, start, fallbacks):
    """The whole call on the C kernels, reading the weights where they lie: solve, and
    certify by a separate C routine (``nm_certify``), for the exact solvers on each block of
    tiles right after it is solved. None when a value is not finite (the general path then
    raises the error that names it)."""
    x, absolute, kind = src
    name = inst.name
    warm_v = warm_mask = None
    if warm is not None and name == "exact":
        warm_v = grid.cols_to_tile_prices(warm.v)
        warm_mask = as_bool_numpy(warm.mask, "warm_start.mask").reshape(tuple(x.shape))
    try:  # the certificate by groups of tiles: sums, and flags (1 broken, 2 a price not finite)
        if name == "greedy":  # no status: nothing to verify but the certificate
            mask, u_t, v_t = engine.greedy_matrix(x, p.n, p.m, absolute=absolute, sweeps=inst.sweeps)
            kept, group_bound, short, bad = engine.certify_matrix(
                x, p.n, p.m, absolute=absolute, saturate=False, mask=mask, u=u_t, v=v_t)
            flags = bad.astype(np.int8) | (2 * (np.isfinite(kept) & ~np.isfinite(group_bound)))
            u_rows, _ = grid.prices_to_matrices(u_t, v_t)
        else:
            mask, u_rows, v_t, status, kept, group_bound, short, flags = engine.exact_matrix(
                x, p.n, p.m, absolute=absolute, saturate=saturate, warm=warm_v, warm_mask=warm_mask,
                certify="groups", rowwise=name == "rowwise", row_prices=True)
            warn_unverified(name, status)
    except BadScores:
        return None
    if (flags & 2).any():
        raise RuntimeError(f"solver {name!r} returned prices that are not finite")
    if (flags & 1).any():
        size = 1 if name == "greedy" else engine.cert_group(p.m)  # tiles per certificate entry
        first = int(np.flatnonzero(flags & 1)[0]) * size
        last = min(first + size, grid.num_tiles) - 1
        raise RuntimeError(f"solver {name!r} returned an invalid mask: one of tiles "
                           f"{first}-{last} breaks {p}")
    with np.errstate(over="ignore"):
        objective, bound = float(kept.sum()), float(group_bound.sum())
    bound = _checked_bound(name, bound, objective, "weights" if absolute else "scores")
    big_u, big_v = u_rows, v_t.reshape(grid.tile_rows, grid.cols)  # full tiles: no cropping
    gap = (bound - objective) / bound if bound > 0 else 0.0
    return MaskResult(
        mask=kind.bool_array(mask), objective=objective, bound=bound, gap=gap,
        optimal=gap <= OPTIMALITY_TOL, deficit=int(short.sum()), solver=name,
        backend=engine.name, seconds=time.perf_counter() - start, u=big_u, v=big_v,
        pattern=str(p), transposable=name != "rowwise", saturate=bool(saturate),
        fallbacks=fallbacks)


def _checked_bound(name, bound, objective, what):
    """The bound, refused when the sums overflow float64 or when it is below the objective."""
    if not (np.isfinite(objective) and np.isfinite(bound)):
        raise ValueError(f"{what}: the kept score or its bound overflows float64 (scores near "
                         "1e305 and above); scale the weights down, e.g. W / abs(W).max()")
    if not bound >= objective * (1 - 1e-9):  # impossible for a valid mask and valid prices
        raise RuntimeError(f"solver {name!r} returned prices whose bound {bound!r} is below "
                           f"its objective {objective!r}; this is a bug in the solver")
    return max(bound, objective)  # rounding of two different float64 sums


def find_mask(weights, pattern, *, transposable: bool = True, saturate: bool = False,
              solver="auto", backend=None, scores=None, warm_start=None) -> MaskResult:
    """Find an N:M mask for ``weights`` that maximises the kept score, with a certified bound.

    Parameters
    ----------
    weights : numpy array or torch tensor, 2-D (out, in) or 4-D conv (out, in, kh, kw)
        Any real dtype (float16, bfloat16, float32, float64, integers). A conv weight is solved
        as its (out, in*kh*kw) view.
    pattern : "N:M" or (n, m)
        Keep at most N of every M along the reduction dimension (NVIDIA convention).
    transposable : bool
        If True (default) every M x M tile keeps at most N per row *and* column, so both W and
        W^T are N:M (forward and backward-data GEMMs sparse). If False, row-wise N:M (exact).
    saturate : bool
        Require exactly N per tile row and column (the original paper's formulation, and what
        cuSPARSELt's tile pruner computes). The default, at most N, is the true hardware optimum
        and can be strictly better.
    solver : "auto", a registered name, a Solver instance or a callable
        "auto" picks the first available exact solver that takes the pattern (see
        ``nmopt.solvers.names()``).
    backend : str or Backend, optional
        Hardware for the kernels; default: ``NMOPT_BACKEND``, then the input's array type.
    scores : array like ``weights``, optional
        Non-negative saliency to maximise (default ``|weights|``), e.g. ``|W| * ||x||``.
    warm_start : MaskResult, optional
        The result of a previous call on the same shape and pattern (e.g. the weights before
        a training step). The exact C kernel fits its column prices to its mask on the new
        weights: a tile whose previous mask is still optimal keeps it, proven by the fitted
        prices, without a solve; the others start from those prices instead of estimating
        them. On calls of 256 tiles or more a sample of tiles first checks that this pays;
        after a large change the call uses the prices only, or starts cold. The result is the
        same certified optimum as a cold solve, whatever the previous result holds. Other
        solvers, row-wise and exactly-N problems ignore it.

    Returns
    -------
    MaskResult
        The boolean mask in the caller's array type, shape and device, with objective, certified
        bound, gap, deficit and the prices ``u``, ``v`` that prove the bound.

    Notes
    -----
    Shapes that are not multiples of M are padded with zero score, solved and cropped; a partial
    tile keeps at most N per row and column of the part that exists (also with ``saturate``,
    which applies to full tiles). Free slots (a row and a column of a tile both below N) are
    filled with zero-score entries, so the mask is maximal; this changes neither the objective
    nor the bound.
    """
    start = time.perf_counter()
    p = parse_pattern(pattern)
    if not isinstance(transposable, (bool, np.bool_)):
        raise TypeError(f"transposable: expected True or False, got {transposable!r}")
    if not isinstance(saturate, (bool, np.bool_)):
        raise TypeError(f"saturate: expected True or False, got {saturate!r}")
    src = _in_place(weights, scores)
    if src is not None:
        x, _, kind = src
        grid = TileGrid(x.shape[0], x.shape[1], p.m)
        warm = _check_warm(warm_start, p, kind.shape, bool(transposable), bool(saturate))
        edge_tiles = bool(x.shape[0] % p.m or x.shape[1] % p.m)
        framework = "numpy" if kind.framework == "numpy" or kind.device.type == "cpu" else "torch"
        inst, engine, fallbacks = plan(solver, backend, p.n, p.m, transposable=bool(transposable),
                                       saturate=bool(saturate), num_tiles=grid.num_tiles,
                                       edge_tiles=edge_tiles, framework=framework)
        if inst.name in ("exact", "rowwise", "greedy") and engine.name == "cffi" and not edge_tiles:
            res = _solve_in_place(src, p, grid, bool(saturate), warm, engine, inst, start,
                                  fallbacks)
            if res is not None:
                return res
    s, kind = _prepare(weights, scores)
    if src is None:
        grid = TileGrid(s.shape[0], s.shape[1], p.m)
        _check_warm(warm_start, p, kind.shape, bool(transposable), bool(saturate))
        edge_tiles = not grid.full_tiles().all()
        inst, engine, fallbacks = plan(solver, backend, p.n, p.m, transposable=bool(transposable),
                                       saturate=bool(saturate), num_tiles=grid.num_tiles,
                                       edge_tiles=edge_tiles, framework=kind.framework)

    tiles = grid.to_tiles(s)
    with np.errstate(over="ignore"):
        if not np.isfinite(tiles.sum(axis=(1, 2))).all():  # a tile's scores overflow float64
            _checked_bound(inst.name, np.inf, 0.0, "weights" if scores is None else "scores")
    mask_t, u_t, v_t = _solve(inst, grid, tiles, p.n, bool(saturate), engine)
    mask_t, u_t, v_t, counts = _checked_output(inst.name, grid, tiles, mask_t, u_t, v_t, p,
                                               transposable, saturate)
    if transposable:
        mask_t, counts = _fill_free_slots(grid, tiles, mask_t, p.n, counts)
    # The bound is computed from the prices exactly as returned (padded rows and columns
    # dropped), so dual_bound(scores, pattern, res.u, res.v) reproduces it.
    big_u, big_v = grid.prices_to_matrices(u_t, v_t)
    u_t, v_t = grid.matrices_to_prices(big_u, big_v)

    with np.errstate(over="ignore", invalid="ignore"):
        objective = float(tiles.ravel() @ mask_t.ravel().astype(np.float64))
        bound = total_bound(tiles, p.n, u_t, v_t)
    bound = _checked_bound(inst.name, bound, objective, "weights" if scores is None else "scores")
    gap = (bound - objective) / bound if bound > 0 else 0.0
    full = grid.full_tiles()
    short = (counts[0] < p.n).sum(axis=1)
    if transposable:
        short = short + (counts[1] < p.n).sum(axis=1)
    mask = kind.bool_array(grid.from_tiles(mask_t))
    return MaskResult(
        mask=mask, objective=objective, bound=bound, gap=gap, optimal=gap <= OPTIMALITY_TOL,
        deficit=int(short[full].sum()), solver=inst.name, backend=engine.name,
        seconds=time.perf_counter() - start, u=big_u, v=big_v, pattern=str(p),
        transposable=bool(transposable), saturate=bool(saturate), fallbacks=fallbacks)
