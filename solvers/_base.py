"""The solver interface: what a solver declares and the one method it implements."""

from __future__ import annotations

import numpy as np

from nmopt._registry import Plugin, Registry
from nmopt.certificates import prices_from_mask, tile_bounds

#: Solvers in order of decreasing preference for ``solver="auto"`` (the first available exact
#: solver that takes the problem): the C kernel, exact row-wise top-N, enumeration (2:4 and
#: other tiny tiles), OR-Tools min-cost flow and LP, networkx, greedy, the torch kernel.
PREFERENCE = ("exact", "rowwise", "enumerate", "mcf", "lp", "networkx", "greedy", "torch-exact")


class Solver(Plugin):
    """Base class of a mask solver. Subclasses set the capabilities and implement :meth:`solve`.

    Capabilities (class attributes)
    -------------------------------
    name : registry name (``solver="name"``)
    exact : the mask is optimal and the prices prove it (gap within ``OPTIMALITY_TOL``)
    transposable : solves transposable masks (False: row-wise N:M)
    requires : Python modules it needs, checked with ``find_spec`` without importing
    extra : pip extra that installs them
    backends : backends whose kernels it can run on (None: any backend)
    at_most, exactly : supports ``saturate=False`` / ``saturate=True``
    """

    exact: bool = False
    transposable: bool = True
    backends: tuple[str, ...] | None = ("numpy",)
    at_most: bool = True
    exactly: bool = True

    def refuses(self, n: int, m: int, saturate: bool, num_tiles: int) -> str | None:
        """None if this solver takes the problem, else the reason it does not."""
        if saturate and not self.exactly:
            return f"solver {self.name!r} does not support saturate=True (exactly N)"
        if not saturate and not self.at_most:
            return f"solver {self.name!r} supports only saturate=True (exactly N)"
        return None

    def solve(self, tiles: np.ndarray, n: int, *, saturate: bool, backend) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Solve all tiles.

        Parameters
        ----------
        tiles : float64 array (T, M, M), finite and >= 0
        n : keep at most (``saturate``: exactly) n per tile row and column
        backend : the :class:`nmopt.backends.Backend` chosen for this call

        Returns
        -------
        mask : bool (T, M, M)
        u, v : float64 (T, M) row and column prices (>= 0 unless ``saturate``) for the bound.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<nmopt solver {self.name!r}>"


class CallableSolver(Solver):
    """Wraps a plain callable ``f(tiles, n, saturate) -> bool tiles`` as an approximate solver.

    Its bound is the better of the certificate that would prove the mask optimal (if it is) and
    the cheap descent prices.
    """

    exact = False
    backends = None

    def __init__(self, fn):
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def solve(self, tiles, n, *, saturate, backend):
        mask = np.asarray(self.fn(tiles.copy(), n, saturate), dtype=bool)  # its own copy to change
        if mask.shape != tiles.shape:
            raise ValueError(f"solver callable returned shape {mask.shape}, expected {tiles.shape}")
        u1, v1 = prices_from_mask(tiles, mask, n, saturate)
        u2, v2 = backend.descent_prices(tiles, n)
        better = tile_bounds(tiles, n, u1, v1) <= tile_bounds(tiles, n, u2, v2)
        if saturate:
            better[:] = True
        return mask, np.where(better[:, None], u1, u2), np.where(better[:, None], v1, v2)


#: The solver registry (see :mod:`nmopt.solvers` for the functions that read it).
SOLVERS = Registry("solver", PREFERENCE, reserved=("auto",))
register = SOLVERS.register
