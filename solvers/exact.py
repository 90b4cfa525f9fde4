"""Exact transposable masks from a backend's own exact kernel: one wrapper, one class per backend.

- ``"exact"`` runs the C kernel (cffi backend): min-cost flow per tile at greedy speed. Each
  tile is a max-weight bipartite b-matching, solved by successive shortest paths from a
  dual-feasible warm start (every row keeps its top N); the node potentials are the optimal
  prices, so the certificate comes out of the solve. Every tile is then checked in C: the mask
  is valid and its bound equals its kept score to ``nm_gap_tol()`` (1e-12) relative, else the
  tile is re-solved by cycle cancelling and re-checked to ``nm_fallback_tol()`` (1e-10). 4 x 4
  tiles run the same algorithm held in vector registers. See ``backends/csrc/``.
- ``"torch-exact"`` runs the torch backend's kernels (CPU or CUDA tensors): enumeration of the
  candidate patterns in one batched matmul for M <= 4, vectorised successive shortest paths on
  per-tile integer costs otherwise (``backends/_torch_ops.py``); the prices are recomputed from
  the mask by Bellman-Ford, so the certificate does not depend on the kernel. Mostly useful on
  a GPU: on the CPU ``"exact"`` and OR-Tools are faster, and ``auto`` prefers them.

Both kernels return ``(mask, u, v, status)`` with ``status == 2`` for a tile whose prices could
not be certified optimal (never expected; the bound is still valid and the gap shows it).
"""

from __future__ import annotations

import warnings

import numpy as np

from nmopt.backends import BACKENDS
from nmopt.solvers._base import Solver, register


def warn_unverified(name: str, status) -> None:
    """Warn when a kernel could not certify some tiles optimal (status 2)."""
    unverified = int(np.count_nonzero(np.asarray(status) == 2))
    if unverified:
        warnings.warn(f"solver {name!r}: {unverified} of {len(status)} tiles could not be "
                      "certified optimal (their prices give a valid but loose bound); "
                      "MaskResult.gap shows by how much", RuntimeWarning, stacklevel=4)


class KernelExactSolver(Solver):
    """Exact for any 1 <= N <= M <= 64, at most N or exactly N, on the one backend it names."""

    exact = True

    @property
    def backend(self) -> str:
        return self.backends[0]

    def solve(self, tiles, n, *, saturate, backend):
        if getattr(backend, "name", None) != self.backend:
            raise ValueError(f"solver {self.name!r} runs on the {self.backend} backend, not "
                             f"{backend!r}; pass backend={self.backend!r} or leave backend unset")
        mask, u, v, status = backend.exact(tiles, n, saturate)
        warn_unverified(self.name, status)
        return mask, u, v


@register
class CExactSolver(KernelExactSolver):
    """The C kernel; available when the cffi extension is built."""

    name = "exact"
    backends = ("cffi",)

    def unavailable_reason(self) -> str | None:
        if "cffi" not in BACKENDS.classes:
            return "cffi: backend not registered"
        return BACKENDS.instance("cffi").unavailable_reason()


@register
class TorchExactSolver(KernelExactSolver):
    """The torch kernels, on the tensor's device."""

    name = "torch-exact"
    requires = ("torch",)
    extra = "torch"
    backends = ("torch",)
