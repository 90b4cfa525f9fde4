"""Tile kernels on torch tensors (CPU or CUDA), batched over tiles, staying on the tiles' device.

Imported only by :mod:`nmopt.backends.torch_backend` when a kernel runs, so ``import nmopt``
never imports torch. Every kernel takes tiles of shape (T, M, M) on any device and returns a
boolean tensor of the same shape on the same device; nothing is copied to the host except the
scalar "is any tile still working?" checks that end the loops early.

Exact kernels work on integer costs (``int64``, scaled per tile exactly as
:func:`nmopt._costs.integer_costs` does), so their arithmetic is exact, their masks are
deterministic and identical on every device, and their tolerance is the one stated there
(relative loss <= N*M / 2**COST_BITS per tile, <= 2e-9 up to M = 64).
"""

from __future__ import annotations

import torch

from nmopt._costs import integer_costs
from nmopt.diversity import tile_patterns

#: Distances at or above this are "unreachable" (far above any path cost, < 2**63 / 4).
_INF = 1 << 60
_HALF = _INF // 2


def greedy_tiles(tiles: torch.Tensor, n: int) -> torch.Tensor:
    """Transposable greedy: descending score, ties by lower row-major index (numpy's order)."""
    t, m, _ = tiles.shape
    dev = tiles.device
    keep = torch.zeros((t, m * m), dtype=torch.bool, device=dev)
    if t == 0:
        return keep.view(t, m, m)
    # Ascending stable sort of the negated scores is numpy's argsort(-tiles, kind="stable").
    order = torch.sort(-tiles.reshape(t, m * m), dim=1, stable=True).indices
    rows, cols = order // m, order % m
    row_count = torch.zeros((t, m), dtype=torch.int32, device=dev)
    col_count = torch.zeros((t, m), dtype=torch.int32, device=dev)
    for k in range(m * m):
        r, c = rows[:, k:k + 1], cols[:, k:k + 1]
        ok = (row_count.gather(1, r) < n) & (col_count.gather(1, c) < n)
        keep.scatter_(1, order[:, k:k + 1], ok)
        row_count.scatter_add_(1, r, ok.to(torch.int32))
        col_count.scatter_add_(1, c, ok.to(torch.int32))
    return keep.view(t, m, m)


def rowwise_tiles(tiles: torch.Tensor, n: int) -> torch.Tensor:
    """Top N of every tile row; ties by the lower column (numpy's stable order)."""
    order = torch.sort(-tiles, dim=2, stable=True).indices[:, :, :n]
    keep = torch.zeros(tiles.shape, dtype=torch.bool, device=tiles.device)
    return keep.scatter_(2, order, True)


def enumerate_tiles(costs: torch.Tensor, n: int, saturate: bool) -> torch.Tensor:
    """Exact for M <= 4: score every candidate pattern in one batched matmul, keep the best.

    Candidates are :func:`nmopt.diversity.tile_patterns` (maximal "at most N" tiles,
    or the exactly-N tiles). Costs are integers below 2**41, so float64 sums of at most M*M of
    them are exact and ties go to the first pattern on every device.
    """
    t, m, _ = costs.shape
    pats = torch.from_numpy(tile_patterns(n, m, saturate)).to(costs.device)
    flat = costs.reshape(t, m * m).to(torch.float64)
    best = torch.empty(t, dtype=torch.int64, device=costs.device)
    chunk = max(1, (1 << 22) // pats.shape[0])
    for lo in range(0, t, chunk):
        best[lo:lo + chunk] = torch.argmax(flat[lo:lo + chunk] @ pats.T, dim=1)
    return pats[best].to(torch.bool).view(t, m, m)


def _shortest_paths(c, x, n):
    """Bellman-Ford from the source in the residual graph of every tile at once.

    Arcs: source -> row i while row i keeps < n (cost 0); row i -> column j where x_ij = 0
    (cost -c_ij); column j -> row i where x_ij = 1 (cost +c_ij); column j -> sink while column j
    keeps < n (cost 0). Arcs into the source and out of the sink never lie on a simple
    source-sink path and are left out. Returns the sink distance, the last column of the path
    and the predecessor arrays (``pred_row[i] = -1`` means row i is reached from the source).
    """
    t, m, _ = c.shape
    row_open = x.sum(dim=2) < n
    col_open = x.sum(dim=1) < n
    inf = torch.full((), _INF, dtype=torch.int64, device=c.device)
    # Both stored so that each relaxation reduces over the last (contiguous) dimension.
    w_rc = torch.where(x, inf, -c).transpose(1, 2).contiguous()  # [t, j, i]: row i -> column j
    w_cr = torch.where(x, c, inf)  # [t, i, j]: column j -> row i
    d_row = torch.where(row_open, torch.zeros_like(inf), inf)
    pred_row = torch.full((t, m), -1, dtype=torch.int64, device=c.device)
    d_col = inf.expand(t, m).clone()
    pred_col = torch.zeros((t, m), dtype=torch.int64, device=c.device)
    for _ in range(2 * m + 2):
        best, arg = (d_row[:, None, :] + w_rc).min(dim=2)
        better_c = (best < d_col) & (best < _HALF)
        d_col = torch.where(better_c, best, d_col)
        pred_col = torch.where(better_c, arg, pred_col)
        best, arg = (d_col[:, None, :] + w_cr).min(dim=2)
        better_r = (best < d_row) & (best < _HALF)
        d_row = torch.where(better_r, best, d_row)
        pred_row = torch.where(better_r, arg, pred_row)
        if not bool((better_c.any() | better_r.any()).item()):
            break
    d_sink, last = torch.where(col_open, d_col, inf).min(dim=1)
    return d_sink, last, pred_row, pred_col


def _augment(x, go, last, pred_row, pred_col):
    """Flip the arcs of each tile's shortest path (tiles where ``go``) in place."""
    t, m, _ = x.shape
    ar = torch.arange(t, device=x.device)
    j = last
    walking = go.clone()
    for _ in range(m + 1):
        i = pred_col.gather(1, j[:, None]).squeeze(1)
        x[ar, i, j] = x[ar, i, j] | walking
        r = pred_row.gather(1, i[:, None]).squeeze(1)
        walking = walking & (r >= 0)
        rr = r.clamp(min=0)
        x[ar, i, rr] = x[ar, i, rr] & ~walking
        j = torch.where(walking, rr, j)
        if not bool(walking.any().item()):
            break


def ssp_tiles(costs: torch.Tensor, n: int, saturate: bool) -> torch.Tensor:
    """Exact for any N:M: successive shortest paths on each tile's flow graph, all tiles at once.

    Each round finds, in every still-active tile, the best augmenting path (source -> row ->
    column -> ... -> sink) by Bellman-Ford and flips it, adding one kept entry. Successive
    shortest paths keep the flow of value k min-cost for every k, and the cost of the best
    flow is convex in k, so for "at most N" a tile stops at the first path that gains nothing;
    with ``saturate`` every tile takes exactly N*M paths. Costs are int64, so every comparison
    is exact and the result is deterministic.
    """
    t, m, _ = costs.shape
    x = torch.zeros(costs.shape, dtype=torch.bool, device=costs.device)
    active = torch.ones(t, dtype=torch.bool, device=costs.device)
    for _ in range(n * m):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        c, xs = costs[idx], x[idx]
        d_sink, last, pred_row, pred_col = _shortest_paths(c, xs, n)
        go = d_sink < _HALF if saturate else d_sink < 0
        _augment(xs, go, last, pred_row, pred_col)
        x[idx] = xs
        active[idx] = go
    return x


def exact_tiles(tiles: torch.Tensor, n: int, saturate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact transposable masks for float tiles (T, M, M); returns (mask, int64 costs)."""
    m = tiles.shape[-1]
    costs = integer_costs(tiles)[0]
    if n >= m:
        return torch.ones(tiles.shape, dtype=torch.bool, device=tiles.device), costs
    if m <= 4:
        return enumerate_tiles(costs, n, saturate), costs
    return ssp_tiles(costs, n, saturate), costs
