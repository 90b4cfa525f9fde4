"""The contenders of ``nmopt bench gap``: registered solvers and the baselines a user would pick.

Every registered *transposable* solver is a contender (a new one is picked up without any
change here); row-wise solvers are covered by the ``row-wise`` baseline. The baselines:

- ``signed-greedy``: greedy on the *signed* weights, PyTorch's default tile algorithm, passed
  to ``find_mask`` as a callable solver so that its kept score is measured in ``|W|``;
- ``torch-tile``: PyTorch's own CPU reference ``_sparse_semi_structured_tile(dense)`` (also
  signed; 2:4 only; a Python loop over tiles, so only up to 1024 x 1024);
- ``exactly-N``: the exact optimum with ``saturate=True`` (the original paper's formulation);
- ``row-wise``: the exact row-wise N:M optimum (not transposable: the price of
  transposability).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from nmopt import backends, solvers
from nmopt._tiles import TileGrid
from nmopt.api import find_mask
from nmopt.patterns import Pattern

BASELINES = ("signed-greedy", "torch-tile", "exactly-N", "row-wise")
#: PyTorch's reference is a Python loop over 4x4 tiles: run it only up to this many weights.
TORCH_TILE_MAX_WEIGHTS = 1024 * 1024
TORCH_TILE = "torch.sparse._semi_structured_conversions._sparse_semi_structured_tile"


@dataclass
class Contender:
    """A solver or baseline: how to run it and when it refuses a problem.

    ``problem`` is the problem its mask solves: ``"transposable"`` (at most N, the one the gap
    is measured on), ``"exactly-N"`` or ``"row-wise"``.
    """

    name: str
    kind: str
    problem: str
    run: Callable[[np.ndarray, Pattern], Any]
    refuses: Callable[[np.ndarray, Pattern], str | None]


def num_tiles(w: np.ndarray, m: int) -> int:
    """Number of M x M tiles (with padding) of a 2-D matrix."""
    return TileGrid(w.shape[0], w.shape[1], m).num_tiles


def _registered(name: str, reason: str | None) -> Contender | None:
    if reason is not None:
        return Contender(name, "unavailable", "transposable", None, lambda w, p: reason)
    inst = solvers.get(name)
    if not inst.transposable:
        return None  # row-wise solvers are the "row-wise" baseline

    def refuses(w, p):
        return inst.refuses(p.n, p.m, False, num_tiles(w, p.m))

    return Contender(name, "exact" if inst.exact else "approximate", "transposable",
                     lambda w, p: find_mask(w, p, solver=name), refuses)


def _signed_tiles(w: np.ndarray, m: int) -> np.ndarray:
    """Signed weights in tile layout; padding is -inf so a signed greedy visits it last."""

    return TileGrid(w.shape[0], w.shape[1], m).to_tiles(w.astype(np.float64), fill=-np.inf)


def _run_signed_greedy(w: np.ndarray, p: Pattern):
    signed = _signed_tiles(w, p.m)
    kernel = backends.get("numpy")

    def signed_greedy(tiles, n, saturate):
        return kernel.greedy(signed, n)  # the scores passed in are |W|: sort the signed values

    return find_mask(w, p, solver=signed_greedy)


def _torch_tile_fn():
    import torch
    from torch.sparse import _semi_structured_conversions as conv

    fn = getattr(conv, "_sparse_semi_structured_tile", None)
    if fn is None:
        raise AttributeError(f"torch {torch.__version__} has no {TORCH_TILE}")
    return fn


def _refuse_torch_tile(w: np.ndarray, p: Pattern) -> str | None:
    import importlib.util

    if (p.n, p.m) != (2, 4):
        return "PyTorch's tile reference handles 2:4 only"
    if w.size > TORCH_TILE_MAX_WEIGHTS:
        return (f"a Python loop over tiles: run only up to {TORCH_TILE_MAX_WEIGHTS} weights "
                f"(1024x1024), this matrix has {w.size}")
    if importlib.util.find_spec("torch") is None:
        return "torch: not installed (pip install 'nmopt[torch]')"
    try:
        _torch_tile_fn()
    except (ImportError, AttributeError) as exc:
        return str(exc)
    return None


def _run_torch_tile(w: np.ndarray, p: Pattern):
    import torch


    fn = _torch_tile_fn()
    grid = TileGrid(w.shape[0], w.shape[1], 4)
    padded = grid.pad(w.astype(np.float64), fill=-np.inf)

    def torch_tile(tiles, n, saturate):
        # PyTorch zeroes the pruned entries in place; a kept exact zero reads as pruned, which
        # changes neither validity nor the kept score.
        kept = (fn(torch.from_numpy(padded.copy())) != 0).numpy()
        return TileGrid(*padded.shape, 4).to_tiles(kept)

    return find_mask(w, p, solver=torch_tile)


def _refuse_exactly(w: np.ndarray, p: Pattern) -> str | None:
    try:
        solvers.auto(p.n, p.m, transposable=True, saturate=True, num_tiles=num_tiles(w, p.m))
    except RuntimeError as exc:
        return str(exc)
    return None


def _baselines() -> dict[str, Contender]:
    def never(w, p):
        return None
    return {
        "signed-greedy": Contender("signed-greedy", "baseline", "transposable",
                                   _run_signed_greedy, never),
        "torch-tile": Contender("torch-tile", "baseline", "transposable", _run_torch_tile,
                                _refuse_torch_tile),
        "exactly-N": Contender("exactly-N", "baseline", "exactly-N",
                               lambda w, p: find_mask(w, p, saturate=True), _refuse_exactly),
        "row-wise": Contender("row-wise", "baseline", "row-wise",
                              lambda w, p: find_mask(w, p, transposable=False), never),
    }


def _rowwise_solver(name: str) -> bool:
    try:
        return not solvers.get(name).transposable
    except ImportError:  # not installed: listed, and reported as unavailable
        return False


def contender_names() -> list[str]:
    """Valid ``--solvers`` names: registered transposable solvers, then the baselines."""

    return [n for n in solvers.names() if not _rowwise_solver(n)] + list(BASELINES)


def contenders(names: list[str] | None = None) -> list[Contender]:
    """The contenders to run, registered solvers first (in registry order), then baselines."""

    valid = contender_names()
    unknown = [n for n in names or () if n not in valid]
    if unknown:
        raise ValueError(f"solvers: unknown {unknown}; choose from {valid}")
    out = []
    for name, reason in solvers.status().items():
        if name in valid and (names is None or name in names):
            c = _registered(name, reason)
            if c is not None:
                out.append(c)
    base = _baselines()
    out += [base[n] for n in BASELINES if names is None or n in names]
    return out
