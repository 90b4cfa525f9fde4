"""FSDP2 (``fully_shard``): sparse layers whose weights are DTensors.

``fully_shard`` shards parameters, not buffers: every rank keeps the *full* bool mask (one byte
per weight), and the forward sees the unsharded weight with it. At a refresh, a layer whose
weight is sharded along dim 0 on a 1-D mesh, in whole bands of M rows on every rank (or any rows
for row-wise masks), is solved rank-locally: each rank solves its own rows and the pieces are
all-gathered, so the weights are never gathered. Any other DTensor weight is gathered
(``full_tensor()``) and solved as an unsharded one.
"""

from __future__ import annotations

import math

import torch

from nmopt.training.matmul import masked

_DTENSOR: list = []


def _dtensor_class():
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a build without torch.distributed
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (e.g. a weight sharded by FSDP2)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def is_fully_sharded(module) -> bool:
    """True if ``module`` or a submodule was wrapped by FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def local_mask(weight, mask):
    """The part of the full ``mask`` that matches this rank's shard of the DTensor ``weight``
    (a local split, no communication)."""
    from torch.distributed.tensor import distribute_tensor

    mask = mask.to(weight.to_local().device)
    return distribute_tensor(mask, weight.device_mesh, weight.placements,
                             src_data_rank=None).to_local()


def select(weight, mask):
    """``weight`` with its pruned entries exactly 0 (:func:`masked`); a DTensor weight stays a
    DTensor with the same placements (its local shard is selected)."""
    if not is_dtensor(weight):
        return masked(weight, mask)
    from torch.distributed.tensor import DTensor

    local = masked(weight.to_local(), local_mask(weight, mask))
    return DTensor.from_local(local, weight.device_mesh, weight.placements,
                              shape=weight.shape, stride=weight.stride())


def _row_sharded(weight) -> bool:
    from torch.distributed.tensor import Shard

    return weight.device_mesh.ndim == 1 and tuple(weight.placements) == (Shard(0),)


class Shards:
    """The DTensor-weighted layers of one refresh (collective: every rank builds it, in the
    same layer order).

    ``local``: k -> ``(local 2-D rows, group, rows held by each rank of the group)`` for layers
    solved rank-locally; ``full``: k -> full 2-D weight gathered with ``full_tensor()``.
    """

    def __init__(self, layers):
        import torch.distributed as dist

        self.local: dict = {}
        self.full: dict = {}
        groups: dict = {}
        for k, (_, layer) in enumerate(layers):
            w = layer.weight
            if not is_dtensor(w):
                continue
            if _row_sharded(w):
                group = w.device_mesh.get_group()
                groups.setdefault(id(group), (group, []))[1].append(k)
            else:
                self.full[k] = w.full_tensor().detach().reshape(w.shape[0], -1)
        for group, keys in groups.values():
            # Each rank's row count, per layer: shards are contiguous, in rank order.
            own = [layers[k][1].weight.to_local() for k in keys]
            meta = torch.tensor([w.shape[0] for w in own], dtype=torch.int64, device=own[0].device)
            got = [torch.empty_like(meta) for _ in range(dist.get_world_size(group))]
            dist.all_gather(got, meta, group=group)
            for j, (k, w) in enumerate(zip(keys, own)):
                rows = [int(g[j]) for g in got]
                cfg = layers[k][1].config
                starts = [sum(rows[:r]) for r in range(len(rows))]
                if not cfg.transposable or all(s % cfg.m == 0 and n % cfg.m == 0
                                               for s, n in zip(starts, rows)):
                    cols = math.prod(w.shape[1:])  # a rank may hold no rows
                    self.local[k] = (w.detach().reshape(w.shape[0], cols), group, rows)
                else:
                    self.full[k] = layers[k][1].weight.full_tensor().detach() \
                        .reshape(layers[k][1].weight.shape[0], -1)

    def gather(self, pieces: dict) -> dict:
        """Full masks of the rank-local layers from every rank's piece ``pieces[k]`` (its rows
        of the mask): one all-gather per process group, every rank gets the same masks."""
        import torch.distributed as dist

        by_group: dict = {}
        for k, (_, group, _) in self.local.items():
            by_group.setdefault(id(group), (group, []))[1].append(k)
        out = {}
        for group, keys in by_group.values():
            me = dist.get_rank(group)
            parts, sizes = [], []
            for k in keys:
                w, _, rows = self.local[k]
                buf = torch.zeros(max(rows), w.shape[1], dtype=torch.uint8, device=w.device)
                buf[:rows[me]] = pieces[k].reshape(rows[me], w.shape[1]).to(buf.device)
                parts.append(buf.reshape(-1))
                sizes.append(buf.numel())
            flat = torch.cat(parts)
            got = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
            dist.all_gather(got, flat, group=group)
            for k, chunks in zip(keys, zip(*(g.split(sizes) for g in got))):
                w, _, rows = self.local[k]
                out[k] = torch.cat([c.reshape(max(rows), w.shape[1])[:n]
                                    for c, n in zip(chunks, rows)]).bool()
        return out
