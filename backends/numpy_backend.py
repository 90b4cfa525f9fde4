"""The numpy backend: the reference implementation every other backend is tested against."""

from __future__ import annotations

import numpy as np

from nmopt._packed import PackedNM, check_matmul_args, check_pack_args, first_overfull_group
from nmopt.backends._base import Backend, register


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

    def pack(self, weights, mask, n, m):
        w, mk, p = check_pack_args(weights, mask, n, m)
        rows, cols = w.shape
        groups = mk.reshape(rows, cols // p.m, p.m)
        if (groups.sum(axis=2) > p.n).any():
            raise ValueError(first_overfull_group(mk, p))
        # kept positions first (ascending), then the lowest unused ones as padding
        order = np.argsort(~groups, axis=2, kind="stable")[:, :, : p.n]
        kept = np.take_along_axis(groups, order, axis=2)
        vals = np.take_along_axis(w.reshape(groups.shape), order, axis=2)
        vals = np.where(kept, vals, np.zeros((), w.dtype))
        width = cols // p.m * p.n
        return PackedNM(np.ascontiguousarray(vals.reshape(rows, width)),
                        order.astype(np.uint8).reshape(rows, width), p.n, p.m, (rows, cols))

    def unpack(self, packed):
        if not isinstance(packed, PackedNM):
            raise TypeError(f"packed: expected a PackedNM, got {type(packed).__name__}")
        rows, cols = packed.shape
        shape = (rows, cols // packed.m, packed.n)
        out = np.zeros((rows, cols // packed.m, packed.m), dtype=packed.dtype)
        np.put_along_axis(out, packed.indices.reshape(shape).astype(np.intp),
                          packed.values.reshape(shape), axis=2)
        return out.reshape(rows, cols)

    def sparse_matmul(self, x, packed):
        x = check_matmul_args(x, packed)
        return x @ self.unpack(packed).T
