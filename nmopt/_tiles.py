"""Input checks and the aligned M x M tile layout shared by every solver and backend.

A 2-D matrix of shape (R, C) is padded with zero score to multiples of M, then cut into
T = ceil(R/M) * ceil(C/M) tiles, ordered row-major by tile: tile ``t = bi * TC + bj`` covers rows
``bi*M .. bi*M+M-1`` and columns ``bj*M .. bj*M+M-1``. Prices live in the same layout:
``u[t, r]`` prices row ``r`` of tile ``t`` and ``v[t, c]`` prices its column ``c``.
As matrices, ``U`` has shape (R, TC) (row ``i`` inside tile column ``bj``) and ``V`` has shape
(TR, C) (column ``j`` inside tile row ``bi``).

:class:`TileGrid` cuts and reassembles numpy arrays and torch tensors alike (a tensor stays on
its device), so there is one tile layout for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nmopt._arrays import is_torch_tensor


def as_matrix(arr: np.ndarray, name: str) -> np.ndarray:
    """View a 2-D weight, or a 4-D conv weight (out, in, kh, kw) as (out, in*kh*kw)."""
    if arr.ndim not in (2, 4):
        raise ValueError(
            f"{name}: expected a 2-D weight (out, in) or a 4-D conv weight (out, in, kh, kw), "
            f"got {arr.ndim}-D with shape {tuple(arr.shape)}; reshape it first"
        )
    if arr.size == 0:  # before the reshape, which fails on (0, in, kh, kw)
        raise ValueError(f"{name}: empty array of shape {tuple(arr.shape)}; nothing to prune")
    if arr.ndim == 4:
        arr = arr.reshape(arr.shape[0], -1)
    return arr


def check_scores(scores: np.ndarray, name: str = "scores") -> None:
    """Raise ``ValueError`` unless every score is finite and non-negative."""
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))[0]
        raise ValueError(f"{name}: holds NaN or inf (first at index {tuple(int(i) for i in bad)}); "
                         "scores must be finite: clean the weights (or, in find_mask, pass finite scores=)")
    if (scores < 0).any():
        bad = np.argwhere(scores < 0)[0]
        raise ValueError(f"{name}: holds negative values (first at index "
                         f"{tuple(int(i) for i in bad)}); scores are saliencies and must be >= 0, "
                         "e.g. pass np.abs(...)")


def tile_counts(mask_tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kept entries per row and per column of every tile of a boolean (T, M, M) array, as
    uint8 arrays (T, M). Small M adds the M slices (numpy reduces tiny axes slowly)."""
    t8 = np.ascontiguousarray(mask_tiles, dtype=np.bool_).view(np.uint8)
    m = t8.shape[-1]
    if m > 8:
        return t8.sum(axis=2, dtype=np.uint8), t8.sum(axis=1, dtype=np.uint8)
    rows, cols = t8[:, :, 0].copy(), t8[:, 0, :].copy()
    for k in range(1, m):
        rows += t8[:, :, k]
        cols += t8[:, k, :]
    return rows, cols


def _contiguous(x):
    return x.contiguous() if is_torch_tensor(x) else np.ascontiguousarray(x)


@dataclass(frozen=True)
class TileGrid:
    """The tile layout of an (rows, cols) matrix for tile size m."""

    rows: int
    cols: int
    m: int

    @property
    def tile_rows(self) -> int:
        return -(-self.rows // self.m)

    @property
    def tile_cols(self) -> int:
        return -(-self.cols // self.m)

    @property
    def num_tiles(self) -> int:
        return self.tile_rows * self.tile_cols

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.tile_rows * self.m, self.tile_cols * self.m

    def pad(self, matrix, fill=0):
        """Pad a (rows, cols) array or tensor to the padded shape with ``fill``."""
        pr, pc = self.padded_shape
        if (pr, pc) == tuple(matrix.shape):
            return matrix
        if is_torch_tensor(matrix):
            out = matrix.new_full((pr, pc), fill)
        else:
            out = np.full((pr, pc), fill, dtype=matrix.dtype)
        out[: self.rows, : self.cols] = matrix
        return out

    def to_tiles(self, matrix, fill=0):
        """Cut a (rows, cols) array or tensor into a contiguous (T, m, m) one of tiles."""
        m = self.m
        padded = self.pad(matrix, fill)
        tiles = padded.reshape(self.tile_rows, m, self.tile_cols, m).swapaxes(1, 2)
        return _contiguous(tiles.reshape(-1, m, m))

    def from_tiles(self, tiles):
        """Reassemble (T, m, m) tiles into the (rows, cols) matrix, cropping the padding."""
        m = self.m
        full = tiles.reshape(self.tile_rows, self.tile_cols, m, m).swapaxes(1, 2)
        full = full.reshape(self.tile_rows * m, self.tile_cols * m)
        return _contiguous(full[: self.rows, : self.cols])

    def full_tiles(self) -> np.ndarray:
        """Boolean (T,) array: True for tiles lying entirely inside the unpadded matrix."""
        full_r = np.arange(self.tile_rows) * self.m + self.m <= self.rows
        full_c = np.arange(self.tile_cols) * self.m + self.m <= self.cols
        return (full_r[:, None] & full_c[None, :]).reshape(-1)

    def prices_to_matrices(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tile prices (T, m) -> ``U`` of shape (rows, TC) and ``V`` of shape (TR, cols)."""
        tr, tc, m = self.tile_rows, self.tile_cols, self.m
        big_u = u.reshape(tr, tc, m).transpose(0, 2, 1).reshape(tr * m, tc)[: self.rows]
        big_v = v.reshape(tr, tc * m)[:, : self.cols]
        return np.ascontiguousarray(big_u), np.ascontiguousarray(big_v)

    def matrices_to_prices(self, big_u: np.ndarray, big_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`prices_to_matrices`; padded rows and columns get price 0."""
        tr, tc, m = self.tile_rows, self.tile_cols, self.m
        pu = np.zeros((tr * m, tc))
        pu[: self.rows] = big_u
        u = pu.reshape(tr, m, tc).transpose(0, 2, 1).reshape(-1, m)
        return np.ascontiguousarray(u), self.cols_to_tile_prices(big_v)

    def cols_to_tile_prices(self, big_v: np.ndarray) -> np.ndarray:
        """The column half of :meth:`matrices_to_prices`: (tiles, M) from (tile_rows, cols)."""
        if big_v.shape == (self.tile_rows, self.tile_cols * self.m):
            return np.ascontiguousarray(big_v, dtype=np.float64).reshape(-1, self.m)
        pv = np.zeros((self.tile_rows, self.tile_cols * self.m))
        pv[:, : self.cols] = big_v
        return pv.reshape(-1, self.m)
