"""Two processes train under DistributedDataParallel with mask refreshes and must end with
identical masks and parameters: on the CPU with gloo (127.0.0.1), and with NCCL on two GPUs
where a machine has them (marked ``gpu``)."""

from __future__ import annotations

import textwrap

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

WORKER = textwrap.dedent('''
    import os, sys, warnings
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn
    import nmopt

    rank, world, port, out, backend = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    warnings.simplefilter("ignore", RuntimeWarning)

    def rank_dependent(tiles, n, saturate):
        """A solver that disagrees between ranks: only a broadcast can make masks agree."""
        noise = np.random.default_rng(1000 + rank).random(tiles.shape)
        return nmopt.backends.get("numpy").greedy(tiles + noise, n)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                             nn.Linear(32, 16))

    def train(solver, sync, steps=5):
        net = model().to(device)
        cfg = nmopt.SparsityConfig(pattern="4:8", refresh_every=2, solver=solver, sync=sync,
                                   update="sr-ste")
        ctrl = nmopt.sparsify_(net, cfg)
        ddp = nn.parallel.DistributedDataParallel(
            net, device_ids=[rank] if device.type == "cuda" else None)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
        ctrl.attach(opt)
        gen = torch.Generator().manual_seed(rank)  # each rank sees different data
        for _ in range(steps):
            x = torch.randn(8, 32, generator=gen).to(device)
            opt.zero_grad()
            ddp(x).pow(2).mean().backward()
            opt.step()
        return net, ctrl

    result = {}
    for solver in (rank_dependent, "auto"):
        net, ctrl = train(solver, "broadcast")
        key = "auto" if solver == "auto" else "rank_dependent"
        result[key] = {
            "masks": {n: l.mask.cpu() for n, l in ctrl.layers.items()},
            "params": {n: p.detach().cpu() for n, p in net.named_parameters()},
            "devices": sorted({str(l.mask.device) for l in ctrl.layers.values()}),
            "refreshes": ctrl.refreshes,
        }
    try:
        train(rank_dependent, "check", steps=2)
        result["check"] = "no error"
    except RuntimeError as exc:
        result["check"] = str(exc)
    torch.save(result, out)
''')


TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2 \
    and torch.distributed.is_nccl_available()


@pytest.mark.parametrize("backend", [
    "gloo",
    pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not TWO_GPUS, reason="NCCL with two ranks needs two CUDA devices (none here)")]),
])
def test_two_rank_ddp_masks_identical(tmp_path, backend, spawn_ranks):
    import nmopt

    outs = spawn_ranks(WORKER, tmp_path, backend)
    r0, r1 = (torch.load(o) for o in outs)
    for key in ("rank_dependent", "auto"):
        a, b = r0[key], r1[key]
        assert a["refreshes"] == b["refreshes"] == 1 + 2  # sparsify_ + steps 2 and 4
        devices = ("cpu", "cpu") if backend == "gloo" else ("cuda:0", "cuda:1")
        assert (a["devices"], b["devices"]) == ([devices[0]], [devices[1]])  # masks stay there
        assert a["masks"].keys() == b["masks"].keys() and len(a["masks"]) == 3
        for name in a["masks"]:
            assert torch.equal(a["masks"][name], b["masks"][name]), (key, name)
            nmopt.check_mask(a["masks"][name], "4:8")
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), (key, name)
    # The rank-dependent solver would disagree; sync="check" must say so on every rank.
    assert "ranks computed different masks" in r0["check"]
    assert "ranks computed different masks" in r1["check"]
