"""Two CPU processes (gloo) train under FSDP2 (``fully_shard`` after ``sparsify_``) with mask
refreshes on sharded weights, and must end every refresh with the same valid masks: rank-local
where each rank's rows are whole M-row tile bands (no weight gathered), gathered otherwise."""

from __future__ import annotations

import textwrap

import pytest

torch = pytest.importorskip("torch")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available in this build",
                allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:
    pytest.skip("this PyTorch has no FSDP2 (torch.distributed.fsdp.fully_shard)",
                allow_module_level=True)

WORKER = textwrap.dedent('''
    import sys, warnings
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    import nmopt

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    warnings.simplefilter("ignore", RuntimeWarning)

    gathered = []  # shapes of the weights gathered with full_tensor()
    _full_tensor = DTensor.full_tensor
    def counting_full_tensor(self, *a, **k):
        gathered.append(tuple(self.shape))
        return _full_tensor(self, *a, **k)
    DTensor.full_tensor = counting_full_tensor

    def rank_dependent(tiles, n, saturate):
        """A solver that disagrees between ranks: only an exchange can make masks agree."""
        noise = np.random.default_rng(1000 + rank).random(tiles.shape)
        return nmopt.backends.get("numpy").greedy(tiles + noise, n)

    def masks(ctrl):
        return {n: l.mask.clone() for n, l in ctrl.layers.items()}

    def train(rows, solver, steps=8):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, rows), nn.Tanh(), nn.Linear(rows, 16))
        ctrl = nmopt.sparsify_(net, nmopt.SparsityConfig(pattern="4:8", refresh_every=2,
                                                          solver=solver))
        for layer in ctrl.layers.values():
            fully_shard(layer)
        fully_shard(net)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        ctrl.attach(opt)
        teacher = torch.randn(32, 16, generator=torch.Generator().manual_seed(7)) / 6
        x_eval = torch.randn(64, 32, generator=torch.Generator().manual_seed(8))
        gen = torch.Generator().manual_seed(rank)  # each rank sees different data
        gathered.clear()
        after = []
        with torch.no_grad():
            loss0 = float((net(x_eval) - x_eval @ teacher).pow(2).mean())
        for step in range(steps):
            x = torch.randn(16, 32, generator=gen)
            opt.zero_grad()
            (net(x) - x @ teacher).pow(2).mean().backward()
            opt.step()
            if ctrl.steps % 2 == 0:
                after.append(masks(ctrl))  # every refresh's result
        with torch.no_grad():
            loss1 = float((net(x_eval) - x_eval @ teacher).pow(2).mean())
        sd = nmopt.export_pruned_state_dict(net)
        export_ok = True  # pruned weights 0, kept ones as trained, in this rank's rows
        for n, layer in ctrl.layers.items():
            got, w = sd[f"{n}.weight"].to_local(), layer.weight.to_local().detach()
            first = rank * -(-layer.mask.shape[0] // world)  # torch.chunk's rows per rank
            mask = layer.mask[first:first + got.shape[0]]
            export_ok &= not bool(got[~mask].any()) and torch.equal(got[mask], w[mask])
        return net, ctrl, {
            "loss": (loss0, loss1), "refreshes": ctrl.refreshes, "after": after,
            "gathered": list(gathered), "export_ok": export_ok,
            "weight_types": sorted({type(l.weight).__name__ for l in ctrl.layers.values()}),
            "notes": {n: l.solver_note for n, l in ctrl.layers.items()},
        }

    result = {}
    for rows in (48, 40):  # 24 rows per rank: whole 8-row tile bands; 20 rows: not
        for name, solver in (("auto", "auto"), ("rank_dependent", rank_dependent)):
            net, ctrl, result[(rows, name)] = train(rows, solver)

    # Row-wise masks: any rows are rank-local, uneven shards (5 + 4 rows) and empty ones too.
    torch.manual_seed(0)
    gathered.clear()
    small = nn.Sequential(nn.Linear(16, 9), nn.ReLU(), nn.Linear(9, 8), nn.Linear(8, 16),
                          nn.Linear(16, 1))
    rowwise = nmopt.sparsify_(small, nmopt.SparsityConfig(pattern="2:4", transposable=False,
                                                          refresh_every=1))
    for layer in rowwise.layers.values():
        fully_shard(layer)
    fully_shard(small)
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    rowwise.attach(opt)
    for _ in range(2):
        opt.zero_grad()
        small(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
    result["uneven"] = {"masks": masks(rowwise), "gathered": list(gathered),
                        "rows": {n: l.weight.to_local().shape[0]
                                 for n, l in rowwise.layers.items()}}

    # A solver failing on one rank mid-refresh: every rank raises, no rank changes a mask.
    def fails_on_rank1(tiles, n, saturate):
        if rank == 1:
            raise RuntimeError("injected solver failure")
        return nmopt.backends.get("numpy").greedy(tiles, n)
    for layer in ctrl.layers.values():
        layer.config.solver = fails_on_rank1
    before = masks(ctrl)
    try:
        ctrl.refresh()
        result["failure"] = "no error"
    except RuntimeError as exc:
        result["failure"] = str(exc)
    result["failure_masks_kept"] = all(torch.equal(before[n], l.mask)
                                       for n, l in ctrl.layers.items())
    try:
        nmopt.densify_(net)
    except ValueError as exc:
        result["densify"] = str(exc)

    # The reverse order is refused with the order that works.
    late = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16))
    fully_shard(late)
    try:
        nmopt.sparsify_(late, nmopt.SparsityConfig(pattern="4:8"))
        result["reverse"] = "no error"
    except ValueError as exc:
        result["reverse"] = str(exc)
    torch.save(result, out)
''')


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, spawn_ranks):
    """The two ranks' results (see WORKER)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    outs = spawn_ranks(WORKER, tmp, timeout=180)
    return [torch.load(o, weights_only=False) for o in outs]


@pytest.mark.parametrize("rows", [48, 40], ids=["whole-tiles", "gathered"])
@pytest.mark.parametrize("solver", ["auto", "rank_dependent"])
def test_fsdp2_refreshes_give_identical_valid_masks(ranks, rows, solver):
    import nmopt
    from nmopt.training.layers import check_tile_mask

    a, b = (r[(rows, solver)] for r in ranks)
    assert a["refreshes"] == b["refreshes"] == 1 + 4  # sparsify_, then steps 2, 4, 6, 8
    assert a["weight_types"] == b["weight_types"] == ["DTensor"]  # refreshed while sharded
    assert len(a["after"]) == len(b["after"]) == 4
    for ma, mb in zip(a["after"], b["after"]):
        assert ma.keys() == mb.keys() == {"0", "2"}
        for name in ma:
            assert torch.equal(ma[name], mb[name]), (rows, solver, name)
            nmopt.check_mask(ma[name], "4:8", transposable=True)
            check_tile_mask(ma[name], 4, 8, True)
    for r in (a, b):
        assert r["loss"][1] < 0.8 * r["loss"][0], r["loss"]
        assert r["export_ok"]
    if rows == 48:  # every rank holds whole tiles of both layers: no weight is gathered
        assert a["gathered"] == b["gathered"] == []
        assert all("rank-local" in note for note in a["notes"].values())
    else:  # layer 0's 20 rows per rank cut 8-row tiles: gathered at each of the 4 refreshes
        assert a["gathered"] == b["gathered"] == [(40, 32)] * 4
        assert "rank-local" not in a["notes"]["0"] and "rank-local" in a["notes"]["2"]


def test_fsdp2_rowwise_uneven_and_empty_shards(ranks):
    import nmopt

    a, b = (r["uneven"] for r in ranks)
    assert a["rows"] == {"0": 5, "3": 8, "4": 1} and b["rows"] == {"0": 4, "3": 8, "4": 0}
    assert a["gathered"] == b["gathered"] == []
    for name, mask in a["masks"].items():
        assert torch.equal(mask, b["masks"][name]), name
        nmopt.check_mask(mask, "2:4", transposable=False)


def test_fsdp2_failed_refresh_and_wrong_order(ranks):
    a, b = ranks
    assert a["failure"].startswith("mask refresh failed on rank 1")
    assert "injected solver failure" in a["failure"] and "injected solver failure" in b["failure"]
    assert a["failure_masks_kept"] and b["failure_masks_kept"]
    for r in ranks:
        assert "sparsify_(model, config) first, then fully_shard" in r["reverse"]
        assert "export_pruned_state_dict" in r["densify"]
