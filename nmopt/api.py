"""``find_mask``: the one entry point that picks, solves, certifies and returns a mask."""

from __future__ import annotations

import time
import warnings

import numpy as np

from nmopt import backends as _backends
from nmopt import solvers as _solvers
from nmopt._arrays import to_float64
from nmopt._tiles import TileGrid, as_matrix, check_scores
from nmopt.certificates import OPTIMALITY_TOL, tile_bounds
from nmopt.patterns import parse_pattern
from nmopt.result import MaskResult


def _prepare(weights, scores):
    """Validated float64 2-D scores and the array kind of ``weights``."""
    w, kind = to_float64(weights, "weights")
    if w.ndim not in (2, 4):
        as_matrix(w, "weights")  # raises the shape error
    if w.size == 0:
        as_matrix(w, "weights")
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


def _resolve_solver(solver, n, m, transposable, saturate, num_tiles):
    if isinstance(solver, str) and solver == "auto":
        return _solvers.auto(n, m, transposable=transposable, saturate=saturate, num_tiles=num_tiles)
    inst = _solvers.get(solver)
    if inst.transposable != transposable:
        kind = "transposable" if inst.transposable else "row-wise"
        raise ValueError(f"solver {inst.name!r} finds {kind} masks but transposable={transposable}; "
                         "use solver='auto'")
    why = inst.refuses(n, m, saturate, num_tiles)
    if why is not None:
        raise ValueError(f"solver={inst.name!r} cannot solve {n}:{m} here: {why}")
    return inst


def find_mask(weights, pattern, *, transposable: bool = True, saturate: bool = False,
              solver="auto", backend=None, scores=None) -> MaskResult:
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

    Returns
    -------
    MaskResult
        The boolean mask in the caller's array type, shape and device, with objective, certified
        bound, gap, deficit and the prices ``u``, ``v`` that prove the bound.

    Notes
    -----
    Shapes that are not multiples of M are padded with zero score, solved and cropped; a partial
    tile keeps at most N per row and column of the part that exists.
    """
    start = time.perf_counter()
    p = parse_pattern(pattern)
    if not isinstance(transposable, (bool, np.bool_)):
        raise TypeError(f"transposable: expected True or False, got {transposable!r}")
    if not isinstance(saturate, (bool, np.bool_)):
        raise TypeError(f"saturate: expected True or False, got {saturate!r}")
    s, kind = _prepare(weights, scores)
    grid = TileGrid(s.shape[0], s.shape[1], p.m)
    inst = _resolve_solver(solver, p.n, p.m, transposable, saturate, grid.num_tiles)
    engine, fallbacks = _backends.select(backend, kind.framework, inst.backends)

    tiles = grid.to_tiles(s)
    mask_t, u_t, v_t = inst.solve(tiles, p.n, saturate=bool(saturate), backend=engine)
    mask_t = np.asarray(mask_t, dtype=bool)

    kept = np.where(mask_t, tiles, 0.0)
    objective = float(kept.sum())
    bound = float(tile_bounds(tiles, p.n, u_t, v_t).sum())
    if bound < objective * (1 - 1e-12):  # impossible for valid prices beyond float64 rounding
        msg = (f"solver {inst.name!r} returned prices whose bound {bound!r} is below its "
               f"objective {objective!r}; the bound was raised to the objective")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        fallbacks.append(msg)
    bound = max(bound, objective)  # rounding of two different float64 sums
    gap = (bound - objective) / bound if bound > 0 else 0.0
    full = grid.full_tiles()
    short = (mask_t.sum(axis=2) < p.n).sum(axis=1)
    if transposable:
        short = short + (mask_t.sum(axis=1) < p.n).sum(axis=1)
    big_u, big_v = grid.prices_to_matrices(u_t, v_t)
    mask = kind.bool_array(grid.from_tiles(mask_t))
    return MaskResult(
        mask=mask, objective=objective, bound=bound, gap=gap, optimal=gap <= OPTIMALITY_TOL,
        deficit=int(short[full].sum()), solver=inst.name, backend=engine.name,
        seconds=time.perf_counter() - start, u=big_u, v=big_v, pattern=str(p),
        transposable=bool(transposable), saturate=bool(saturate), fallbacks=fallbacks)
