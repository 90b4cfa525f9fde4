"""Warm-started re-solves where nmopt re-solves: the training mask refresh and the ADMM
projections give the same masks (and weights) as cold solves, and do pass ``warm_start``."""

from __future__ import annotations

import copy
import pickle
import types
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn

import nmopt
from nmopt import backends
from nmopt.posttrain import PruneConfig
from nmopt.posttrain import admm as admm_mod
from nmopt.posttrain import hessian as hessian_mod
from nmopt.training import refresh
from nmopt.training.layers import WARM_START

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(backends.status().get("cffi") is not None,
                                 reason="warm starts run on the C kernel (not built)")]


def spy(monkeypatch, module, drop: bool = False) -> list:
    """Wrap ``module.find_mask``; record each call's ``warm_start`` (dropped when ``drop``)."""
    real, seen = module.find_mask, []

    def wrapped(*args, warm_start=None, **kw):
        seen.append(warm_start)
        return real(*args, warm_start=None if drop else warm_start, **kw)

    monkeypatch.setattr(module, "find_mask", wrapped)
    return seen


def train_masks(monkeypatch, pattern: str, cold: bool, steps: int = 4) -> tuple:
    """Masks after every refresh of a small MLP trained ``steps`` steps (refresh every step,
    always warm-started unless ``cold``), and the warm starts its refreshes were given."""
    seen = spy(monkeypatch, refresh, drop=cold)
    monkeypatch.setattr(refresh, "WARM_MAX_CHANGED", 1.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctrl = nmopt.sparsify_(model, nmopt.SparsityConfig(pattern=pattern, refresh_every=1),
                           optimizer=opt)
    g = torch.Generator().manual_seed(1)
    history = [[layer.mask.clone() for layer in ctrl.layers.values()]]
    for _ in range(steps):
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 32, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()  # refreshes the masks (post-step hook)
        history.append([layer.mask.clone() for layer in ctrl.layers.values()])
    monkeypatch.undo()
    return history, seen, ctrl


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "8:16", "16:32"])
def test_warm_refresh_gives_the_cold_masks(monkeypatch, pattern):
    warm, seen, ctrl = train_masks(monkeypatch, pattern, cold=False)
    cold, _, _ = train_masks(monkeypatch, pattern, cold=True)
    assert all(torch.equal(a, b) for wa, ca in zip(warm, cold) for a, b in zip(wa, ca))
    assert any(not torch.equal(a, b) for a, b in zip(warm[0], warm[-1]))  # the masks moved
    assert seen[:2] == [None, None]  # sparsify_'s first masks: cold, one call per layer
    assert all(s is not None for s in seen[2:])  # every refresh after: warm
    assert all("find_mask" in layer.solver_note for layer in ctrl.layers.values())


def test_warm_start_is_a_cache_only(monkeypatch):
    _, seen, ctrl = train_masks(monkeypatch, "4:8", cold=False, steps=1)
    layer = ctrl.layers["0"]
    assert WARM_START in layer.__dict__
    assert not any("warm" in k for k in layer.state_dict())
    assert WARM_START not in copy.deepcopy(layer).__dict__
    assert WARM_START not in pickle.loads(pickle.dumps(layer)).__dict__
    # a new pattern on the same weights starts cold (no mismatch error), then warm again
    layer.config = nmopt.SparsityConfig(pattern="8:16")
    seen = spy(monkeypatch, refresh)
    monkeypatch.setattr(refresh, "WARM_MAX_CHANGED", 1.0)
    ctrl.refresh()
    ctrl.refresh()
    assert seen[0] is None and seen[2] is not None and seen[2].pattern == "8:16"
    assert seen[1] is not None and seen[1].pattern == "4:8"  # the other layer stayed warm


def test_warm_only_after_a_small_change(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    ctrl = nmopt.sparsify_(model, nmopt.SparsityConfig(pattern="4:8"))
    layer = ctrl.layers["0"]
    seen = spy(monkeypatch, refresh)
    ctrl.refresh()  # after sparsify_ half the mask changed: cold
    layer.mask_changed = refresh.WARM_MAX_CHANGED  # as after a refresh that changed little
    ctrl.refresh()
    assert seen[0] is None and seen[1] is not None


def test_warm_admm_is_gated_by_the_change(monkeypatch):
    W, stats = admm_layer()
    seen = spy(monkeypatch, hessian_mod)  # every projection: first, iterations, final
    admm_mod.admm(W, stats, PruneConfig(pattern="8:16", method="admm", admm_iters=30))
    # cold while the support moves a lot (the first iteration moved few, the second many),
    # warm once it has settled; the first and final projections are cold
    assert seen[:3] == [None, None, None] and seen[-2] is not None and seen[-1] is None


def test_no_warm_start_kept_where_the_solver_ignores_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ctrl = nmopt.sparsify_(model, nmopt.SparsityConfig(pattern="2:4", solver="mcf"))
        warm = nmopt.sparsify_(nn.Sequential(nn.Linear(16, 16)),
                               nmopt.SparsityConfig(pattern="2:4"))
    assert WARM_START not in ctrl.layers["0"].__dict__  # OR-Tools starts cold
    assert WARM_START in warm.layers["0"].__dict__  # the C kernel's exact solver: kept


def admm_layer():
    """A 64 x 96 weight and the statistics of 256 random inputs of uneven scales."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 96, generator=g)
    X = torch.randn(256, 96, generator=g) * torch.rand(96, generator=g)
    return W, types.SimpleNamespace(H=(X.T @ X).double())


def test_warm_admm_gives_the_cold_layer(monkeypatch):
    W, stats = admm_layer()
    cfg = PruneConfig(pattern="8:16", method="admm", admm_iters=30)
    seen = spy(monkeypatch, hessian_mod)
    monkeypatch.setattr(admm_mod, "_WARM_MAX_CHANGED", 1.0)  # always warm
    warm = admm_mod.admm(W.clone(), stats, cfg)
    iterations = seen[1:-1]  # between the cold first and final projections
    assert seen[0] is None and seen[-1] is None and len(iterations) >= 3
    assert iterations[0] is None and all(s is not None for s in iterations[1:])
    monkeypatch.undo()
    spy(monkeypatch, hessian_mod, drop=True)
    cold = admm_mod.admm(W.clone(), stats, cfg)
    assert torch.equal(warm.mask, cold.mask)
    assert torch.equal(warm.weight, cold.weight)
    assert warm.iterations == cold.iterations and len(warm.gaps) == len(cold.gaps)
    assert max(warm.gaps) <= nmopt.OPTIMALITY_TOL
