"""Mask refresh: compute every sparse layer's mask with the configured solver, timed, and keep
the masks identical across ranks under ``torch.distributed``."""

from __future__ import annotations

import time

import torch

from nmopt import solvers
from nmopt.api import find_mask
from nmopt.backends.torch_backend import mask_tensors
from nmopt.training.layers import _SparseLayer


def _sync_device(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_has_optimal_solver(cfg) -> bool:
    """True when ``find_mask(solver="auto")`` has a provably optimal solver for the pattern: on
    CPU the compiled or OR-Tools solvers are faster than the torch kernel, and add a certificate."""

    try:
        solvers.auto(cfg.n, cfg.m, transposable=True, saturate=False, num_tiles=1)
    except RuntimeError:
        return False
    return True


# Routes that run a torch kernel on the weights' device, batched over layers: the torch backend's
# ``mask_tensors`` method for each, and the label of the masks it computes.
DEVICE_ROUTES = {
    "device-rowwise": ("rowwise", "rowwise top-N"),
    "device-greedy": ("greedy", "greedy"),
    "device-optimal": ("exact", "exact torch kernel"),
}
FIND_MASK = "find_mask"


def _route(layer: _SparseLayer) -> str:
    """How this layer's mask is computed: one of :data:`DEVICE_ROUTES` (row-wise top-N, greedy
    or the provably optimal torch kernel, on the weight's device) or "find_mask" (any solver
    through :func:`nmopt.find_mask`)."""
    cfg = layer.config
    solver = cfg.solver
    if not cfg.transposable and solver in ("auto", "rowwise"):
        return "device-rowwise"
    if cfg.transposable and solver == "greedy":
        return "device-greedy"
    if cfg.transposable and solver == "auto":
        on_cpu = layer.weight.device.type == "cpu"
        return FIND_MASK if on_cpu and _host_has_optimal_solver(cfg) else "device-optimal"
    return FIND_MASK


def compute_masks(layers: list[_SparseLayer]) -> list[tuple]:
    """New masks of ``layers`` with their configured solver: a list of ``(mask, note, gap)``.

    Solver routing (see :class:`~nmopt.training.SparsityConfig`): row-wise "auto" is the optimal
    top-N, "greedy" the greedy and transposable "auto" the exact torch kernel, all on the
    weights' device and batched over every layer's tiles in one kernel call, except that CPU
    weights use ``find_mask(solver="auto")`` when it has a provably optimal solver (compiled C
    or OR-Tools are faster there, and certify the mask); any other solver runs per layer
    through :func:`nmopt.find_mask` (on the host for CPU-only solvers).
    """

    out: list = [None] * len(layers)
    routes = [_route(layer) for layer in layers]
    for route, (method, label) in DEVICE_ROUTES.items():
        idx = [i for i, r in enumerate(routes) if r == route]
        if not idx:
            continue
        cfg = layers[idx[0]].config
        weights = [layers[i].weight_2d().detach() for i in idx]
        masks = mask_tensors(weights, cfg.pattern_str, transposable=method != "rowwise",
                             method=method)
        gap = None if method == "greedy" else 0.0
        for i, mask in zip(idx, masks):
            out[i] = (mask, f"{label} on {mask.device}", gap)
    for i, route in enumerate(routes):
        if route != FIND_MASK:
            continue
        cfg = layers[i].config
        w = layers[i].weight_2d().detach()
        res = find_mask(w, cfg.pattern_str, transposable=cfg.transposable, solver=cfg.solver)
        where = "" if w.device.type == "cpu" else ", host round trip"
        out[i] = (res.mask, f"{res.solver} on {res.backend} via find_mask{where}", res.gap)
    return out


def _dist(process_group):
    """``(rank, world, group)`` when torch.distributed is initialised with > 1 rank, else None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(process_group)
    return (dist.get_rank(process_group), world, process_group) if world > 1 else None


def _fingerprint(mask):
    """An int64 checksum of a bool mask that differs for any single flipped entry."""
    flat = mask.reshape(-1).to(torch.int64)
    pos = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64)
    return torch.stack([(flat * pos).sum(), (flat * (pos * pos % 1000003)).sum(), flat.sum()])


def _compute_timed(layers, which) -> dict:
    """Masks of ``layers[k]`` for k in ``which``: {k: (mask, seconds, note, gap)}; the batch's
    time is shared among its layers in proportion to their size."""
    which = list(which)
    if not which:
        return {}
    t0 = time.perf_counter()
    results = compute_masks([layers[k][1] for k in which])
    for mask, _, _ in results:
        _sync_device(mask.device)
    seconds = time.perf_counter() - t0
    total = sum(layers[k][1].mask.numel() for k in which)
    return {k: (mask, seconds * layers[k][1].mask.numel() / total, note, gap)
            for k, (mask, note, gap) in zip(which, results)}


def _install(layers, which) -> None:
    for k, (mask, seconds, note, gap) in _compute_timed(layers, which).items():
        layers[k][1].set_mask(mask, seconds, note, gap)


def refresh_layers(layers: list[tuple[str, _SparseLayer]], sync: str = "broadcast",
                   process_group=None) -> float:
    """Recompute the masks of ``layers`` (in this order on every rank); return the wall time.

    Under torch.distributed with ``sync="broadcast"`` layer k is computed on rank
    ``k % world`` and broadcast from there, so every rank ends with the same masks and the work
    is shared. ``sync="check"`` computes on every rank and raises ``RuntimeError`` naming the
    first layer whose masks differ between ranks.
    """
    start = time.perf_counter()
    info = _dist(process_group) if sync != "none" else None
    if info is None or sync == "check":
        _install(layers, range(len(layers)))
        if info is not None:
            _check_identical(layers, info)
        return time.perf_counter() - start
    dist = torch.distributed
    rank, world, group = info
    mine = _compute_timed(layers, [k for k in range(len(layers)) if k % world == rank])
    for k, (_name, layer) in enumerate(layers):
        owner = k % world
        src = owner if group is None else dist.get_global_rank(group, owner)
        if owner == rank:
            mask, seconds, note, gap = mine[k]
            buf = mask.reshape(layer.mask.shape).to(device=layer.mask.device, dtype=torch.uint8)
        else:
            buf = torch.empty(layer.mask.shape, dtype=torch.uint8, device=layer.mask.device)
            seconds, note, gap = 0.0, "", None
        dist.broadcast(buf, src=src, group=group)
        note = note or f"computed on rank {owner} and broadcast"
        layer.set_mask(buf.bool(), seconds, note, gap)
    return time.perf_counter() - start


def _check_identical(layers, info) -> None:
    dist = torch.distributed
    _, _, group = info
    for name, layer in layers:
        fp = _fingerprint(layer.mask)
        lo, hi = fp.clone(), fp.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"sparse layer {name!r}: ranks computed different masks "
                               "(non-deterministic solver or diverged weights); use "
                               "SparsityConfig(sync='broadcast')")
