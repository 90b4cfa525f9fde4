"""The numpy backend: the reference implementation every other backend is tested against."""

from __future__ import annotations

import numpy as np

from nmopt.backends import register
from nmopt.backends._base import Backend


def greedy_order(tiles: np.ndarray) -> np.ndarray:
    """Visiting order of the greedy: descending score, ties broken by the lower flat index."""
    t, m, _ = tiles.shape
    return np.argsort(-tiles.reshape(t, m * m), axis=1, kind="stable")


@register
class NumpyBackend(Backend):
    """Pure numpy, vectorised across tiles; always available."""

    name = "numpy"
    frameworks = ("numpy",)

    def greedy(self, tiles: np.ndarray, n: int) -> np.ndarray:
        t, m, _ = tiles.shape
        keep = np.zeros((t, m * m), dtype=bool)
        if t == 0:
            return keep.reshape(t, m, m)
        order = greedy_order(tiles)
        rows, cols = np.divmod(order, m)
        row_count = np.zeros((t, m), dtype=np.int32)
        col_count = np.zeros((t, m), dtype=np.int32)
        idx = np.arange(t)
        for k in range(m * m):
            r, c = rows[:, k], cols[:, k]
            ok = (row_count[idx, r] < n) & (col_count[idx, c] < n)
            keep[idx, order[:, k]] = ok
            row_count[idx, r] += ok
            col_count[idx, c] += ok
        return keep.reshape(t, m, m)

    def rowwise(self, tiles: np.ndarray, n: int) -> np.ndarray:
        t, m, _ = tiles.shape
        order = np.argsort(-tiles, axis=2, kind="stable")[:, :, :n]
        keep = np.zeros(tiles.shape, dtype=bool)
        np.put_along_axis(keep, order, True, axis=2)
        return keep

    def apply_mask(self, weights, mask):
        return weights * mask
