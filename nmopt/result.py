"""The one result type every solver returns through :func:`nmopt.find_mask`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MaskResult:
    """A mask with its kept score and a certificate of how far it can be from optimal.

    Attributes
    ----------
    mask : bool array, same kind, shape and device as the weights
    objective : float
        Kept score, ``sum(scores[mask])``.
    bound : float
        Certified upper bound on the best kept score of any valid mask (LP weak duality, see
        :func:`nmopt.dual_bound`); recompute it from ``u`` and ``v``. With ``saturate=True``
        exactly N applies to full tiles; edge tiles (shape not a multiple of M) keep at most N.
    gap : float
        ``(bound - objective) / bound`` (0 when bound is 0).
    optimal : bool
        ``gap <= nmopt.certificates.OPTIMALITY_TOL``: the certificate proves optimality.
    deficit : int
        Rows plus columns (rows only for row-wise masks) of full tiles that keep fewer than N.
    solver, backend : str
        What actually ran.
    seconds : float
        Wall time of the whole call.
    u, v : numpy float64 arrays
        Dual prices proving ``bound``: ``u`` is (R, ceil(C/M)), ``v`` is (ceil(R/M), C), for the
        2-D view (out, in*kh*kw) of the weights.
    pattern : str
    transposable, saturate : bool
    fallbacks : list of str
        Every fallback taken on the way, also issued as a warning.
    """

    mask: Any
    objective: float
    bound: float
    gap: float
    optimal: bool
    deficit: int
    solver: str
    backend: str
    seconds: float
    u: np.ndarray
    v: np.ndarray
    pattern: str = ""
    transposable: bool = True
    saturate: bool = False
    fallbacks: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        shape = tuple(getattr(self.mask, "shape", ()))
        kind = "transposable" if self.transposable else "row-wise"
        return (f"MaskResult({self.pattern} {kind}, shape={shape}, objective={self.objective:.6g}, "
                f"bound={self.bound:.6g}, gap={self.gap:.3e}, optimal={self.optimal}, "
                f"deficit={self.deficit}, solver={self.solver!r}, backend={self.backend!r}, "
                f"seconds={self.seconds:.3f})")
