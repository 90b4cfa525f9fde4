"""Validity checks for N:M masks, tile by tile."""

from __future__ import annotations

import numpy as np

from nmopt._arrays import as_bool_numpy
from nmopt._tiles import TileGrid, as_matrix, tile_counts
from nmopt.patterns import parse_pattern


def check_mask(mask, pattern, transposable: bool = True) -> None:
    """Raise ``ValueError`` unless ``mask`` keeps at most N per group of M.

    Row-wise (``transposable=False``): every group of M consecutive entries along each row (the
    reduction dimension of an (out, in) weight) keeps at most N. Transposable: additionally every
    column of every aligned M x M tile keeps at most N, so the transpose is N:M too. Partial tiles
    at the edges are checked on the part that exists. The error names the first violating tile
    and row or column.
    """
    p = parse_pattern(pattern)
    arr = as_matrix(as_bool_numpy(mask, "mask"), "mask")
    grid = TileGrid(arr.shape[0], arr.shape[1], p.m)
    tiles = grid.to_tiles(arr, fill=False)
    row_counts, col_counts = tile_counts(tiles)
    bad_rows = np.argwhere(row_counts > p.n)
    if not transposable:
        col_counts = np.zeros_like(row_counts)
    bad_cols = np.argwhere(col_counts > p.n)
    if bad_rows.size == 0 and bad_cols.size == 0:
        return
    first_t = min(bad_rows[0, 0] if bad_rows.size else np.inf, bad_cols[0, 0] if bad_cols.size else np.inf)
    bi, bj = divmod(int(first_t), grid.tile_cols)
    where = f"tile ({bi}, {bj}) (rows {bi * p.m}..{bi * p.m + p.m - 1}, columns {bj * p.m}..{bj * p.m + p.m - 1})"
    if bad_rows.size and bad_rows[0, 0] == first_t:
        r = int(bad_rows[0, 1])
        raise ValueError(f"mask is not {p} {'transposable' if transposable else 'row-wise'}: "
                         f"{where}: row {bi * p.m + r} keeps {int(row_counts[first_t, r])} > N={p.n}")
    c = int(bad_cols[bad_cols[:, 0] == first_t][0, 1])
    raise ValueError(f"mask is not {p} transposable: {where}: column {bj * p.m + c} keeps "
                     f"{int(col_counts[first_t, c])} > N={p.n}")


def is_valid_mask(mask, pattern, transposable: bool = True) -> bool:
    """True if :func:`check_mask` would pass."""
    try:
        check_mask(mask, pattern, transposable)
    except ValueError:
        return False
    return True
