"""Fault injection in sparse training: NaN/inf in kept and pruned weights and gradients, failing
and garbage mask refreshes, failing ``sparsify_``. The model and its masks must stay consistent:
masks valid, pruned weights exported as 0, a failed refresh leaves every layer's previous mask,
a failed ``sparsify_`` leaves the model exactly as it was."""

from __future__ import annotations

import warnings

import pytest

import nmopt

torch = pytest.importorskip("torch")
from torch import nn

from nmopt.training import refresh
from nmopt.training.layers import SparseConv, SparseLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

BAD = [float("inf"), float("-inf"), float("nan")]
CFG = nmopt.SparsityConfig(pattern="4:8", refresh_every=1)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 16))


def sparsify(model, config=CFG, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return nmopt.sparsify_(model, config, **kw)


def masks(ctrl):
    return {name: layer.mask.clone() for name, layer in ctrl.layers.items()}


def assert_valid(ctrl):
    for layer in ctrl.layers.values():
        mask = layer.mask.reshape(layer.mask.shape[0], -1)
        nmopt.check_mask(mask, ctrl.config.pattern_str, transposable=ctrl.config.transposable)


def pruned_index(layer, k=0):
    return tuple(int(i) for i in (~layer.mask).nonzero()[k])


def kept_index(layer, k=0):
    return tuple(int(i) for i in layer.mask.nonzero()[k])


def assert_pruned_zero(model, ctrl):
    sd = nmopt.export_pruned_state_dict(model)
    for name, layer in ctrl.layers.items():
        w = sd[f"{name}.weight"]
        assert torch.equal(w[~layer.mask], torch.zeros_like(w[~layer.mask])), name


# -- NaN / inf in pruned weights never leak ------------------------------------------------------
@pytest.mark.parametrize("value", BAD, ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("update", ["ste", "sr-ste"])
def test_bad_pruned_weight_does_not_leak(value, update):
    model = mlp()
    ctrl = sparsify(model, nmopt.SparsityConfig(pattern="4:8", update=update, decay=0.1))
    i = pruned_index(model[2])
    with torch.no_grad():
        model[2].weight[i] = value
    x = torch.randn(4, 32)
    y = model(x)
    assert torch.isfinite(y).all()
    y.pow(2).mean().backward()
    for name, p in model.named_parameters():
        grad = p.grad if name != "2.weight" else p.grad[model[2].mask]
        assert torch.isfinite(grad).all(), name  # every kept weight and bias
    assert nmopt.export_pruned_state_dict(model)["2.weight"][i] == 0
    assert_pruned_zero(model, ctrl)
    nmopt.densify_(model, apply_mask=True)
    assert model[2].weight[i] == 0 and torch.isfinite(model(x)).all()


def test_bad_pruned_weight_in_a_convolution_does_not_leak():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1))
    ctrl = sparsify(model, nmopt.SparsityConfig(pattern="4:8"))
    assert isinstance(model[0], SparseConv)
    with torch.no_grad():
        model[0].weight[~model[0].mask] = float("inf")
    assert torch.isfinite(model(torch.randn(2, 8, 6, 6))).all()
    assert_pruned_zero(model, ctrl)


def test_every_pruned_weight_inf_on_the_cffi_plan(cffi):
    """The C plan's padding slots read some weight; they must read 0, never inf * 0."""
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctrl = sparsify(model, nmopt.SparsityConfig(pattern="4:8", matmul="cffi"))
    for layer in ctrl.layers.values():
        assert "cffi" in layer.matmul
        with torch.no_grad():
            layer.weight[~layer.mask] = float("inf")
    x = torch.randn(5, 32, requires_grad=True)
    y = model(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


# -- NaN / inf in kept weights and in gradients --------------------------------------------------
@pytest.mark.parametrize("value", BAD, ids=["inf", "-inf", "nan"])
def test_bad_kept_weight_refresh_names_the_layer_and_keeps_every_mask(value):
    model = mlp()
    ctrl = sparsify(model)
    with torch.no_grad():  # change weights so that a refresh would change the masks
        for layer in ctrl.layers.values():
            layer.weight.mul_(torch.rand_like(layer.weight))
    before = masks(ctrl)
    i = kept_index(model[2])
    with torch.no_grad():
        model[2].weight[i] = value
    with pytest.raises(RuntimeError, match=r"sparse layer '2': weight has 1 NaN/inf entry"):
        nmopt.refresh_masks(model)
    assert all(torch.equal(before[n], layer.mask) for n, layer in ctrl.layers.items())
    assert ctrl.refreshes == 1 and all(layer.refresh_count == 1 for layer in ctrl.layers.values())
    assert_valid(ctrl)
    assert_pruned_zero(model, ctrl)  # the kept NaN/inf is exported as it is, pruned ones as 0


def test_bad_gradients_reach_pruned_weights_only_through_the_optimizer():
    """NaN/inf gradients written into pruned weights: the forward and export stay clean, and the
    refresh in ``optimizer.step()`` refuses, naming the layer, with every mask kept."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl = sparsify(model, optimizer=opt)
    before = masks(ctrl)
    i, j = pruned_index(model[0]), pruned_index(model[0], 1)

    def poison(grad):
        grad = grad.clone()
        grad[i], grad[j] = float("nan"), float("inf")
        return grad
    handle = model[0].weight.register_hook(poison)
    x = torch.randn(8, 32)
    model(x).pow(2).mean().backward()
    handle.remove()
    with pytest.raises(RuntimeError, match=r"sparse layer '0': weight has 2 NaN/inf entries"):
        opt.step()  # the step is taken, then the refresh in its hook refuses
    assert not torch.isfinite(model[0].weight[i]) and not torch.isfinite(model[0].weight[j])
    assert all(torch.equal(before[n], layer.mask) for n, layer in ctrl.layers.items())
    assert torch.isfinite(model(x)).all()
    assert_pruned_zero(model, ctrl)
    with torch.no_grad():  # repaired, training and refreshes go on
        model[0].weight.nan_to_num_(0.0, 0.0, 0.0)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    assert ctrl.refreshes == 2
    assert_valid(ctrl)


# -- faults inside a refresh ---------------------------------------------------------------------
def _perturbed(seed=0):
    model = mlp(seed)
    ctrl = sparsify(model)
    with torch.no_grad():
        for layer in ctrl.layers.values():
            layer.weight.mul_(torch.rand_like(layer.weight))
    return model, ctrl


def test_garbage_from_the_solver_leaves_every_previous_mask(monkeypatch):
    """The second layer's new mask is invalid (all ones): no layer gets a new mask."""
    model, ctrl = _perturbed()
    before = masks(ctrl)
    real = refresh.compute_masks

    def garbage(*args):
        out = real(*args)
        if len(out) > 1:
            mask, note, gap = out[1]
            out[1] = (torch.ones_like(mask), note, gap)
        return out
    monkeypatch.setattr(refresh, "compute_masks", garbage)
    with pytest.raises(RuntimeError) as info:
        nmopt.refresh_masks(model)
    assert all(torch.equal(before[n], layer.mask) for n, layer in ctrl.layers.items())
    assert "sparse layer '2': new mask: not a valid 4:8" in str(info.value)
    assert all(layer.refresh_count == 1 for layer in ctrl.layers.values())
    monkeypatch.setattr(refresh, "compute_masks", real)
    nmopt.refresh_masks(model)
    assert any(not torch.equal(before[n], layer.mask) for n, layer in ctrl.layers.items())
    assert_valid(ctrl)


@pytest.mark.parametrize("bad", ["raise", "wrong shape"])
def test_solver_failing_mid_refresh_leaves_every_previous_mask(monkeypatch, bad):
    """The second layer's solve raises, or returns a mask of the wrong shape."""
    model, ctrl = _perturbed()
    before = masks(ctrl)
    real, calls = refresh.find_mask, []

    def flaky(w, *a, **k):
        calls.append(tuple(w.shape))
        if len(calls) == 2:
            if bad == "raise":
                raise RuntimeError("injected solver failure")
            res = real(w, *a, **k)
            res.mask = res.mask[:-1]
            return res
        return real(w, *a, **k)
    monkeypatch.setattr(refresh, "find_mask", flaky)
    with pytest.raises(RuntimeError):
        nmopt.refresh_masks(model)
    assert len(calls) >= 2
    assert all(torch.equal(before[n], layer.mask) for n, layer in ctrl.layers.items())
    assert ctrl.refreshes == 1
    assert_valid(ctrl)


# -- sparsify_ is all or nothing -----------------------------------------------------------------
def _snapshot(model):
    return ([id(m) for m in model.modules()], [(n, id(p)) for n, p in model.named_parameters()],
            {n: p.detach().clone() for n, p in model.named_parameters()},
            list(model.state_dict()))


def _assert_unchanged(model, snap):
    ids, params, values, keys = snap
    assert [id(m) for m in model.modules()] == ids
    assert [(n, id(p)) for n, p in model.named_parameters()] == params
    for n, p in model.named_parameters():
        if not p.is_meta:
            torch.testing.assert_close(p.detach(), values[n], equal_nan=True)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, (SparseLinear, SparseConv)) for m in model.modules())
    assert getattr(model, "_nmopt_sparse", None) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_sparsify_with_a_bad_weight_leaves_the_model_as_it_was(value):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        model[2].weight[3, 5] = value
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match=r"sparsify_ failed, the model is unchanged: "
                                           r"sparse layer '2': weight has 1 NaN/inf"):
        sparsify(model, optimizer=opt)
    _assert_unchanged(model, snap)
    assert not opt._optimizer_step_post_hooks  # no refresh hook left behind
    with torch.no_grad():
        model[2].weight[3, 5] = 0.0
    ctrl = sparsify(model)  # a retry is not refused as "already sparsified"
    assert set(ctrl.layers) == {"0", "2", "4"}
    assert_valid(ctrl)


def test_sparsify_with_a_failing_solver_leaves_the_model_as_it_was(monkeypatch):
    model = mlp()
    snap = _snapshot(model)

    def fails(*args, **kwargs):
        raise RuntimeError("injected")
    monkeypatch.setattr(refresh, "compute_masks", fails)
    with pytest.raises(RuntimeError, match="sparsify_ failed, the model is unchanged: injected"):
        sparsify(model)
    _assert_unchanged(model, snap)


def test_sparsify_on_the_meta_device_names_the_layer():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer '0': weight is on the meta device; "
                                         r"materialise the model \(to_empty \+ load\)"):
        sparsify(model)
    _assert_unchanged(model, snap)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    assert_valid(sparsify(model))
