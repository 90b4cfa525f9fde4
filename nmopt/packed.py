"""Compressed N:M storage: the kept values plus a small index per value, row-major.

A weight ``W`` of shape (R, C), C a multiple of M, with a mask keeping at most N of every M
consecutive entries of a row, is stored as

- ``values``  (R, C/M*N), the weight dtype: for group g of row r (columns g*M .. g*M+M-1),
  slots g*N .. g*N+N-1 hold the kept values in ascending column order, then zeros;
- ``indices`` (R, C/M*N), uint8: the position (0..M-1) of each slot within its group. Padding
  slots of a group that keeps fewer than N use the lowest unused positions, so the N
  positions of a group are distinct and :func:`unpack` is exact.

``unpack(pack(W, mask))`` equals ``W * mask``. With a *transposable* mask both W and W^T
pack: ``pack(W.T, mask.T)`` stores W^T for the backward-data GEMM ``dX = dY W``, which is
``sparse_matmul(dY, pack(W.T, mask.T))``; the forward ``Y = X W^T`` is
``sparse_matmul(X, pack(W, mask))``.

The functions here pick a backend like :func:`nmopt.find_mask` does (the C kernels when
built, else numpy) and check every argument before any kernel runs.
"""

from __future__ import annotations

import numpy as np

from nmopt._packed import PACK_DTYPES, PackedNM, check_distinct
from nmopt.backends import BACKENDS, Backend, select
from nmopt.patterns import parse_pattern

__all__ = ["PackedNM", "PACK_DTYPES", "pack", "unpack", "sparse_matmul"]


def _engine(backend):
    """The backend for a packed call: one with packed N:M kernels (the torch backend has none)."""
    supported = tuple(name for name, cls in BACKENDS.classes.items() if cls.pack is not Backend.pack)
    if isinstance(backend, str) and backend in BACKENDS.classes and backend not in supported:
        raise ValueError(f"backend: {backend!r} has no packed N:M kernels; choose one of "
                         f"{list(supported)}")
    engine, _ = select(backend, "numpy", supported)
    return engine


def pack(weights: np.ndarray, mask: np.ndarray, pattern, *, backend=None) -> PackedNM:
    """Compress ``weights * mask`` into :class:`PackedNM`.

    Parameters
    ----------
    weights : ndarray (R, C), float16/float32/float64, C a multiple of M
    mask : bool ndarray (R, C), at most N kept per group of M along each row
    pattern : "N:M" or (n, m)
    backend : optional backend name or instance (default: the C kernels when built)
    """
    p = parse_pattern(pattern)
    return _engine(backend).pack(weights, mask, p.n, p.m)


def unpack(packed: PackedNM, *, backend=None) -> np.ndarray:
    """The dense (R, C) matrix ``weights * mask`` back from its packed form."""
    _check(packed)
    return _engine(backend).unpack(packed)


def sparse_matmul(x: np.ndarray, packed: PackedNM, *, backend=None) -> np.ndarray:
    """``x @ W.T`` for ``W`` given packed: x float32 (B, C) -> float32 (B, R), any batch B.

    With NaN or inf in ``x`` at positions the weight prunes, backends differ: the numpy
    reference computes ``x @ unpack(packed).T`` (0 * NaN = NaN), the C kernel reads only the
    stored slots (a group keeping fewer than N also stores a zero padding slot). Keep ``x``
    finite, or mask it first, for identical results."""
    _check(packed)
    return _engine(backend).sparse_matmul(x, packed)


def _check(packed) -> None:
    if not isinstance(packed, PackedNM):
        raise TypeError(f"packed: expected a PackedNM (from pack), got {type(packed).__name__}")
    check_distinct(packed)
