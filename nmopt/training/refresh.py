"""Mask refresh: compute every sparse layer's mask with the configured solver, timed, and keep
the masks identical across ranks under ``torch.distributed``."""

from __future__ import annotations

import time

import torch

from nmopt import solvers
from nmopt.api import find_mask
from nmopt.backends.torch_backend import mask_tensors
from nmopt.training.layers import WARM_START, _SparseLayer
from nmopt.training.sharded import Shards


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
# A layer's refresh is warm-started from its previous result only when its previous refresh
# changed at most this fraction of its mask (``mask_changed``, of all entries). The C kernel
# keeps a tile's previous mask where prices fitted to it prove it optimal, else solves from the
# previous prices, or cold where a sample shows they are far off: on a 2048² matrix
# (W + eps * noise, M = 8-32, README "The C backend") that took 0.20-0.31x the cold kernel time
# at eps 1e-4-1e-3 (<= 0.2% of the entries changed), 0.41-0.65x at 1e-2-3e-2 (1-3%),
# 0.81-1.0x at 0.1 (7-8%) and 0.99-1.01x on unrelated weights.
WARM_MAX_CHANGED = 0.05


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


def compute_masks(layers: list[_SparseLayer], weights: list | None = None) -> list[tuple]:
    """New masks of ``layers`` with their configured solver: a list of ``(mask, note, gap)``.

    ``weights``: the 2-D weights to solve (default each layer's ``weight_2d()``; a sharded
    layer passes its local rows or its gathered weight). Solver routing (see
    :class:`~nmopt.training.SparsityConfig`): row-wise "auto" is the optimal
    top-N, "greedy" the greedy and transposable "auto" the exact torch kernel, all on the
    weights' device and batched over every layer's tiles in one kernel call, except that CPU
    weights use ``find_mask(solver="auto")`` when it has a provably optimal solver (compiled C
    or OR-Tools are faster there, and certify the mask); any other solver runs per layer
    through :func:`nmopt.find_mask` (on the host for CPU-only solvers), warm-started from the
    layer's previous result when its last refresh changed little (:data:`WARM_MAX_CHANGED`,
    :data:`~nmopt.training.layers.WARM_START`).
    """

    if weights is None:
        weights = [layer.weight_2d().detach() for layer in layers]
    out: list = [None] * len(layers)
    routes = [_route(layer) for layer in layers]
    for route, (method, label) in DEVICE_ROUTES.items():
        idx = [i for i, r in enumerate(routes) if r == route]
        if not idx:
            continue
        cfg = layers[idx[0]].config
        masks = mask_tensors([weights[i] for i in idx], cfg.pattern_str,
                             transposable=method != "rowwise", method=method)
        gap = None if method == "greedy" else 0.0
        for i, mask in zip(idx, masks):
            out[i] = (mask, f"{label} on {mask.device}", gap)
    for i, route in enumerate(routes):
        layer, w = layers[i], weights[i]
        if route != FIND_MASK:
            layer.__dict__.pop(WARM_START, None)
            continue
        cfg = layer.config
        key = (tuple(w.shape), cfg.pattern_str, cfg.transposable, cfg.solver)
        prev = layer.__dict__.pop(WARM_START, None)
        warm = prev is not None and prev[0] == key and layer.mask_changed <= WARM_MAX_CHANGED
        res = find_mask(w, cfg.pattern_str, transposable=cfg.transposable, solver=cfg.solver,
                        warm_start=prev[1] if warm else None)
        if res.solver == "exact" and res.backend == "cffi":
            layer.__dict__[WARM_START] = (key, res)
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


def _check_finite(name: str, weight) -> None:
    bad = int((~torch.isfinite(weight)).sum())
    if bad:
        raise RuntimeError(
            f"sparse layer {name!r}: weight has {bad} NaN/inf entr{'y' if bad == 1 else 'ies'}, "
            "so no mask can be computed from it (no mask was changed). If training diverged: "
            "lower the learning rate, clip gradients or check the loss scaling")


def _compute_timed(layers, weights: dict, which) -> dict:
    """Masks of ``layers[k]`` for k in ``which``, solving ``weights[k]``:
    {k: (mask, seconds, note, gap)}; the batch's time is shared among its layers in proportion
    to their size. ``RuntimeError`` naming the layer for a NaN or inf weight."""
    for k in which:
        _check_finite(layers[k][0], weights[k])
    empty = [k for k in which if weights[k].numel() == 0]  # a rank holding no rows of a layer
    out = {k: (torch.zeros(weights[k].shape, dtype=torch.bool, device=weights[k].device), 0.0,
               "", None) for k in empty}
    which = [k for k in which if k not in out]
    if not which:
        return out
    t0 = time.perf_counter()
    results = compute_masks([layers[k][1] for k in which], [weights[k] for k in which])
    for mask, _, _ in results:
        _sync_device(mask.device)
    seconds = time.perf_counter() - t0
    total = sum(weights[k].numel() for k in which)
    out.update({k: (torch.as_tensor(mask).to(torch.bool).reshape(weights[k].shape),
                    seconds * weights[k].numel() / total, note, gap)
                for k, (mask, note, gap) in zip(which, results)})
    return out


def refresh_layers(layers: list[tuple[str, _SparseLayer]], sync: str = "broadcast",
                   process_group=None) -> float:
    """Recompute the masks of ``layers`` (in this order on every rank); return the wall time.

    All or nothing: every new mask is computed and checked before any is installed, so a
    failure (NaN weights, a solver error, an invalid mask, on any rank) raises and leaves every
    layer with its previous mask, on every rank. Under torch.distributed with
    ``sync="broadcast"`` layer k is computed on rank ``k % world`` and broadcast from there, so
    every rank ends with the same masks and the work is shared. ``sync="check"`` computes on
    every rank and raises ``RuntimeError`` naming the first layer whose masks differ between
    ranks. FSDP2-sharded layers are solved rank-locally where each rank holds whole tiles, else
    gathered (see :mod:`nmopt.training.sharded`).
    """
    start = time.perf_counter()
    if not layers:
        return 0.0
    shards = Shards(layers)  # collective when weights are DTensors
    dinfo = _dist(process_group)
    info = dinfo if sync != "none" else None
    weights = {k: shards.local[k][0] if k in shards.local else
               shards.full[k] if k in shards.full else layer.weight_2d().detach()
               for k, (_, layer) in enumerate(layers)}
    shared = [k for k in range(len(layers)) if k not in shards.local]
    mine = shared
    if info is not None and sync == "broadcast":
        mine = [k for k in shared if k % info[1] == info[0]]
    error, new = None, {}
    try:
        new = _compute_timed(layers, weights, [*shards.local, *mine])
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    if dinfo is not None and (info is not None or shards.local):
        _agree(error, dinfo, layers[0][1].mask.device)
    elif error is not None:
        raise error
    if shards.local:
        full = shards.gather({k: new[k][0] for k in shards.local})
        for k, mask in full.items():
            _, seconds, note, gap = new[k]
            note = note or "computed on the other ranks"
            new[k] = (mask, seconds, f"{note}, rank-local shards all-gathered", gap)
    if info is not None and sync == "broadcast":
        _broadcast(layers, shared, new, info)
    if info is not None and sync == "check":  # before the checks, which then agree on ranks
        _check_identical([(layers[k][0], new[k][0]) for k in shared], info)
    candidates = {k: layers[k][1].check_new_mask(new[k][0], layers[k][0]) for k in new}
    for k, (_, layer) in enumerate(layers):
        _, seconds, note, gap = new[k]
        layer.set_mask(candidates[k], seconds, note, gap, checked=True)
    return time.perf_counter() - start


def _agree(error, info, device) -> None:
    """Raise on every rank if the mask computation failed on any (so none waits for a mask that
    never comes and none installs masks the others do not)."""
    dist = torch.distributed
    rank, world, group = info
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not int(flag.item()):
        return
    said = [None] * world
    dist.all_gather_object(said, None if error is None else f"{type(error).__name__}: {error}",
                           group=group)
    if error is not None:
        raise error
    first = next(r for r, s in enumerate(said) if s)
    raise RuntimeError(f"mask refresh failed on rank {first}, so no rank installed new masks "
                       f"(every layer keeps its previous mask): {said[first]}")


def _broadcast(layers, keys, new: dict, info) -> None:
    """Layer k's mask from rank ``k % world`` to every rank, into ``new``."""
    dist = torch.distributed
    rank, world, group = info
    for k in keys:
        layer = layers[k][1]
        owner = k % world
        src = owner if group is None else dist.get_global_rank(group, owner)
        if owner == rank:
            mask, seconds, note, gap = new[k]
            buf = mask.reshape(layer.mask.shape).to(device=layer.mask.device, dtype=torch.uint8)
        else:
            buf = torch.empty(layer.mask.shape, dtype=torch.uint8, device=layer.mask.device)
            seconds, note, gap = 0.0, "", None
        dist.broadcast(buf, src=src, group=group)
        new[k] = (buf.bool(), seconds, note or f"computed on rank {owner} and broadcast", gap)


def _check_identical(named_masks, info) -> None:
    dist = torch.distributed
    _, _, group = info
    for name, mask in named_masks:
        fp = _fingerprint(mask)
        lo, hi = fp.clone(), fp.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"sparse layer {name!r}: ranks computed different masks "
                               "(non-deterministic solver or diverged weights); use "
                               "SparsityConfig(sync='broadcast'). Every layer keeps its "
                               "previous mask")
