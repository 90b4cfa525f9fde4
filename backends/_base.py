"""The backend interface: the hot kernels, once per kind of hardware."""

from __future__ import annotations

import numpy as np

from nmopt._registry import Plugin, Registry
from nmopt.certificates import DESCENT_STARTS, descent_prices

#: Backends in order of decreasing preference when the call names none: the compiled C kernels,
#: then the numpy reference, then torch (preferred only for torch inputs, see ``frameworks``).
PREFERENCE = ("cffi", "numpy", "torch")


class Backend(Plugin):
    """Base class of a backend. Subclasses set the capability attributes and the kernels.

    Kernels take contiguous float64 tiles of shape (T, M, M) (tile layout of
    :class:`nmopt._tiles.TileGrid`) and return boolean tiles of the same shape.
    """

    #: Array frameworks whose inputs select this backend when none is named.
    frameworks: tuple[str, ...] = ()

    # -- kernels ---------------------------------------------------------------------------
    def greedy(self, tiles: np.ndarray, n: int) -> np.ndarray:
        """Transposable greedy: keep entries in descending score while row and column < N."""
        raise NotImplementedError(f"backend {self.name!r} has no greedy kernel")

    def rowwise(self, tiles: np.ndarray, n: int) -> np.ndarray:
        """Row-wise N:M: the top N of every row of every tile (exact)."""
        raise NotImplementedError(f"backend {self.name!r} has no row-wise kernel")

    def descent_prices(self, tiles: np.ndarray, n: int, sweeps: int = 4,
                       starts: tuple[float, ...] = DESCENT_STARTS):
        """Cheap dual prices ``(u, v)`` for an approximate mask: the numpy reference
        :func:`nmopt.certificates.descent_prices` unless the backend has its own kernel."""
        return descent_prices(tiles, n, sweeps, starts)

    def apply_mask(self, weights, mask):
        """``weights * mask`` in the weights' own type."""
        raise NotImplementedError(f"backend {self.name!r} has no apply_mask kernel")

    def exact(self, tiles: np.ndarray, n: int, saturate: bool = False):
        """Exact transposable masks with optimal prices: ``(mask, u, v, status)``."""
        raise NotImplementedError(f"backend {self.name!r} has no exact kernel")

    def pack(self, weights: np.ndarray, mask: np.ndarray, n: int, m: int):
        """Compress ``weights * mask`` (R, C) into a :class:`nmopt.packed.PackedNM`."""
        raise NotImplementedError(f"backend {self.name!r} has no pack kernel")

    def unpack(self, packed) -> np.ndarray:
        """The dense (R, C) matrix back from a :class:`nmopt.packed.PackedNM`."""
        raise NotImplementedError(f"backend {self.name!r} has no unpack kernel")

    def sparse_matmul(self, x: np.ndarray, packed) -> np.ndarray:
        """``x @ W.T`` (float32, (B, C) -> (B, R)) from W packed by :meth:`pack`."""
        raise NotImplementedError(f"backend {self.name!r} has no sparse_matmul kernel")

    def __repr__(self) -> str:
        return f"<nmopt backend {self.name!r}>"


#: The backend registry (see :mod:`nmopt.backends` for the functions that read it).
BACKENDS = Registry("backend", PREFERENCE)
register = BACKENDS.register
