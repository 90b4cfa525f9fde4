"""Sparse training: sparsify_/densify_/export, numerics against masked dense, mask refresh."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest

import nmopt

torch = pytest.importorskip("torch")
from torch import nn

from nmopt.training import matmul
from nmopt.training.layers import SparseConv, SparseLinear, check_tile_mask

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none here)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def quiet_sparsify(model, config, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return nmopt.sparsify_(model, config, **kw)


def reference_grads(layer_weight, mask, bias, x, gy, decay):
    """Masked dense with straight-through weight gradient, by hand."""
    wm = layer_weight * mask
    y = x @ wm.t() + (bias if bias is not None else 0)
    gx = gy @ wm
    gw = gy.t() @ x + decay * (~mask) * layer_weight
    return y, gx, gw, gy.sum(0)


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"pattern": "4:4"}, "pattern"), ({"pattern": "5:4"}, "pattern"),
    ({"update": "adam"}, "update"), ({"decay": -1.0}, "decay"), ({"refresh_every": -2}, "refresh"),
    ({"refresh_every": 1.5}, "refresh"), ({"matmul": "triton"}, "matmul"), ({"sync": "x"}, "sync"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nmopt.SparsityConfig(**kwargs)
    with pytest.raises(TypeError, match="transposable"):
        nmopt.SparsityConfig(transposable="yes")


# -- sparsify_ / what is left dense ------------------------------------------------------------
def test_sparsify_replaces_and_reports():
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 10), nn.Conv2d(8, 16, 3),
                          nn.Conv2d(3, 8, 3))
    with pytest.warns(RuntimeWarning, match="left dense"):
        ctrl = nmopt.sparsify_(model, nmopt.SparsityConfig(pattern="4:8"))
    assert list(ctrl.layers) == ["0", "2"] and set(ctrl.skipped) == {"1", "3"}
    assert "multiple of M=8" in ctrl.skipped["1"]
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseConv)
    assert type(model[1]) is nn.Linear
    for layer in ctrl.layers.values():
        nmopt.check_mask(layer.mask.reshape(layer.mask.shape[0], -1), "4:8")
        assert 0.45 < layer.density() <= 0.5
    assert "4:8 transposable" in repr(model[0]) and "matmul=" in repr(model[0])
    with pytest.raises(ValueError, match="already sparsified"):
        nmopt.sparsify_(model)


def test_filter_fn_and_multihead_attention():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4), "head": nn.Linear(32, 32),
                           "body": nn.Linear(32, 32)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the current order does not warn
        ctrl = quiet_sparsify(model, nmopt.SparsityConfig(),
                              filter_fn=lambda module, fqn: fqn != "head")
    assert list(ctrl.layers) == ["body"]
    assert "MultiheadAttention" in ctrl.skipped["attn.out_proj"]
    with pytest.raises(TypeError, match="config"):
        nmopt.sparsify_(nn.Sequential(nn.Linear(4, 4)), {"pattern": "2:4"})


def _keep_body(module: nn.Module, fqn: str) -> bool:
    return fqn != "head" and isinstance(module, nn.Linear)


def _old_annotated(a: str, b) -> bool:
    return a != "head" and isinstance(b, nn.Linear)


def _new_annotated(name: nn.Module, b) -> bool:  # annotation wins over the name "name"
    return b != "head" and isinstance(name, nn.Linear)


@pytest.mark.parametrize("filter_fn, old", [
    (lambda module, fqn: fqn != "head", False),
    (lambda m, n: n != "head", False),
    (lambda a, b: b != "head", False),  # unknown names: the current (module, fqn) order
    (_keep_body, False),
    (_new_annotated, False),
    (lambda n, m: n != "head", True),
    (lambda name, module: name != "head", True),
    (lambda fqn, mod: fqn != "head", True),
    (lambda x, module: x != "head", True),
    (_old_annotated, True),
])
def test_filter_fn_order_and_deprecated_name_first(filter_fn, old):
    """filter_fn(module, fqn) as in torchao; the old (name, module) order, recognised by the
    parameters (see sparsify_'s docstring), still selects the same layers with a warning."""
    def make():
        return nn.ModuleDict({"head": nn.Linear(32, 32), "body": nn.Linear(32, 32)})
    if old:
        with pytest.warns(DeprecationWarning, match=r"filter_fn\(module, fqn\)"):
            ctrl = quiet_sparsify(make(), nmopt.SparsityConfig(), filter_fn=filter_fn)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            ctrl = quiet_sparsify(make(), nmopt.SparsityConfig(), filter_fn=filter_fn)
    assert list(ctrl.layers) == ["body"]


def test_deprecated_kernel_name_of_matmul():
    """SparsityConfig(kernel=...), cfg.kernel, layer.kernel and the stats' "kernel" key keep
    working for a release (DeprecationWarning); matmul is the name now."""
    import dataclasses

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = nmopt.SparsityConfig(pattern="4:8", matmul="masked")
        assert dataclasses.replace(new, refresh_every=5).matmul == "masked"
    with pytest.warns(DeprecationWarning, match="SparsityConfig.matmul"):
        cfg = nmopt.SparsityConfig(pattern="4:8", kernel="masked")
    assert cfg.matmul == "masked" and cfg == new
    with pytest.warns(DeprecationWarning, match="matmul"):
        assert cfg.kernel == "masked"
    with pytest.warns(DeprecationWarning, match="matmul"):
        cfg.kernel = "auto"
    assert cfg.matmul == "auto"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="matmul"):
        nmopt.SparsityConfig(kernel="triton")
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="pass only matmul"):
        nmopt.SparsityConfig(matmul="cffi", kernel="masked")
    model = nn.Sequential(nn.Linear(64, 32))
    nmopt.sparsify_(model, new)
    with pytest.warns(DeprecationWarning, match=r"\.matmul"):
        assert model[0].kernel == model[0].matmul
    assert model[0].matmul.startswith("masked dense (matmul='masked' requested)")
    row = nmopt.model_sparsity_stats(model)["layers"]["0"]
    assert row["kernel"] == row["matmul"] == model[0].matmul


def test_shared_module_is_replaced_everywhere():
    shared = nn.Linear(16, 16)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    ctrl = quiet_sparsify(model, nmopt.SparsityConfig(pattern="2:4"))
    assert list(ctrl.layers) == ["a"] and model["b"][0] is model["a"]
    nmopt.densify_(model)
    assert model["a"] is shared and model["b"][0] is shared


# -- numerics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("update", ["ste", "sr-ste"])
@pytest.mark.parametrize("pattern, transposable", [("2:4", True), ("4:8", True), ("2:4", False)])
def test_linear_matches_masked_dense(update, pattern, transposable):
    model = nn.Sequential(nn.Linear(48, 32))
    cfg = nmopt.SparsityConfig(pattern=pattern, transposable=transposable, update=update,
                               decay=0.1, matmul="masked")
    nmopt.sparsify_(model, cfg)
    layer = model[0]
    w0 = layer.weight.detach().clone()
    x = torch.randn(3, 5, 48, requires_grad=True)
    y = model(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    decay = 0.1 if update == "sr-ste" else 0.0
    want_y, want_gx, want_gw, want_gb = reference_grads(
        w0, layer.mask, layer.bias.detach(), x.detach().reshape(-1, 48), gy.reshape(-1, 32), decay)
    torch.testing.assert_close(y.reshape(-1, 32), want_y)
    torch.testing.assert_close(x.grad.reshape(-1, 48), want_gx)
    torch.testing.assert_close(layer.weight.grad, want_gw)
    torch.testing.assert_close(layer.bias.grad, want_gb)
    assert "masked dense (matmul='masked' requested)" in layer.matmul


def test_conv_matches_masked_dense():
    model = nn.Sequential(nn.Conv2d(4, 8, 2, padding=1))
    nmopt.sparsify_(model, nmopt.SparsityConfig(pattern="2:4", update="sr-ste", decay=0.5))
    conv = model[0]
    w0 = conv.weight.detach().clone()
    mask = conv.mask
    nmopt.check_mask(mask, "2:4")  # 4-D mask checked through its (out, in*kh*kw) view
    x = torch.randn(2, 4, 5, 5)
    y = model(x)
    y.sum().backward()
    w_eff = (w0 * mask).requires_grad_(True)  # straight-through: dL/d(W*mask) reaches all of W
    y_ref = nn.functional.conv2d(x, w_eff, conv.bias.detach(), padding=1)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(conv.weight.grad, w_eff.grad + 0.5 * (~mask) * w0)


class FakeCffi:
    """The numpy backend's pack/sparse_matmul (the C contract), recording every pack."""

    def __init__(self):
        self.packed = []
        self.numpy = nmopt.backends.get("numpy")

    def pack(self, w, mask, n, m):
        assert w.dtype == np.float32 and w.flags.c_contiguous and mask.dtype == bool
        self.packed.append(w.shape)
        return self.numpy.pack(w, mask, n, m)

    def sparse_matmul(self, x, p):
        assert x.dtype == np.float32 and x.flags.c_contiguous
        return self.numpy.sparse_matmul(x, p)


@pytest.mark.parametrize("transposable", [True, False])
def test_sparse_linear_function_on_a_packed_plan(transposable):
    """SparseLinearFn with a packed plan: forward and backward-data from the compressed form
    (values gathered each step into slots packed once per mask), dense weight gradient."""
    cfg = nmopt.SparsityConfig(pattern="2:4", transposable=transposable, update="sr-ste",
                               decay=0.01)
    fake = FakeCffi()
    w = torch.randn(16, 24, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    mask = nmopt.backends.torch_backend.mask_tensor(w, "2:4", transposable=transposable)
    plan = matmul.CffiPlan(fake, cfg, mask)
    assert fake.packed == ([(16, 24), (24, 16)] if transposable else [(16, 24)])
    for _step in range(2):  # the second step sees new values through the same slots
        x = torch.randn(2, 3, 24, requires_grad=True)
        y = matmul.SparseLinearFn.apply(x, w, b, mask, cfg.sr_decay, plan)
        gy = torch.randn_like(y)
        y.backward(gy)
        want = reference_grads(w.detach(), mask, b.detach(), x.detach().reshape(-1, 24),
                               gy.reshape(-1, 16), 0.01)
        torch.testing.assert_close(y.reshape(-1, 16), want[0])
        torch.testing.assert_close(x.grad.reshape(-1, 24), want[1])
        torch.testing.assert_close(w.grad, want[2])
        torch.testing.assert_close(b.grad, want[3])
        with torch.no_grad():
            w.sub_(0.5 * w.grad)
            w.grad = b.grad = None
    assert len(fake.packed) == (2 if transposable else 1)  # indices never repacked
    assert matmul._probe(plan, w.detach(), mask) is None


def test_a_wrong_plan_is_never_used():
    class Broken(matmul.CffiPlan):
        def forward(self, x2, packs):
            return super().forward(x2, packs) + 1.0

    cfg = nmopt.SparsityConfig(pattern="2:4")
    w = torch.randn(16, 16)
    mask = nmopt.backends.torch_backend.mask_tensor(w, "2:4")
    why = matmul._probe(Broken(FakeCffi(), cfg, mask), w, mask)
    assert why is not None and "forward disagrees" in why


CFFI_REASON = nmopt.backends.status().get("cffi", "not registered")


def test_auto_matmul_on_cpu_is_masked_dense_and_says_why():
    model = nn.Sequential(nn.Linear(64, 32))
    nmopt.sparsify_(model, nmopt.SparsityConfig(pattern="4:8"))
    assert model[0].matmul.startswith(matmul.MASKED) and "matmul='cffi'" in model[0].matmul


@pytest.mark.skipif(CFFI_REASON is not None, reason=f"cffi backend unavailable: {CFFI_REASON}")
@pytest.mark.parametrize("transposable", [True, False])
def test_cffi_matmul_matches_masked_dense(transposable):
    model = nn.Sequential(nn.Linear(64, 32))
    cfg = nmopt.SparsityConfig(pattern="4:8", transposable=transposable, update="sr-ste",
                               matmul="cffi")
    nmopt.sparsify_(model, cfg)
    layer = model[0]
    assert layer.matmul.startswith(matmul.CFFI), layer.matmul
    w0 = layer.weight.detach().clone()
    x = torch.randn(7, 64, requires_grad=True)
    y = model(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    want = reference_grads(w0, layer.mask, layer.bias.detach(), x.detach(), gy, cfg.decay)
    torch.testing.assert_close(y, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, want[2], rtol=1e-5, atol=1e-5)


# -- refresh -----------------------------------------------------------------------------------
def _train(model, opt, steps, call_step=False):
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if call_step:
            nmopt.training.step(model)


def test_refresh_every_k_optimizer_steps():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ctrl = quiet_sparsify(model, nmopt.SparsityConfig(pattern="4:8", refresh_every=3),
                          optimizer=opt)
    seen = []
    for layer in ctrl.layers.values():  # re-validate every mask installed by a refresh
        orig = layer.set_mask

        def spy(mask, *a, _orig=orig, **k):
            nmopt.check_mask(mask.cpu(), "4:8")
            seen.append(mask.shape)
            return _orig(mask, *a, **k)
        layer.set_mask = spy
    _train(model, opt, 7)
    assert ctrl.steps == 7 and ctrl.refreshes == 1 + 2
    assert len(seen) == 2 * len(ctrl.layers)
    stats = nmopt.model_sparsity_stats(model)
    assert stats["refreshes"] == 3 and stats["total_refresh_seconds"] > 0
    for row in stats["layers"].values():
        assert row["refresh_count"] == 3 and row["refresh_seconds"] >= 0
        assert 0 <= row["mask_changed"] <= 1 and row["gap"] <= nmopt.OPTIMALITY_TOL
    ctrl.detach()
    _train(model, opt, 3)
    assert ctrl.steps == 7


def test_manual_step_counting_and_refresh():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ctrl = quiet_sparsify(model, nmopt.SparsityConfig(pattern="2:4", refresh_every=2))
    _train(model, opt, 4, call_step=True)
    assert ctrl.refreshes == 3
    assert nmopt.refresh_masks(model) >= 0 and ctrl.refreshes == 4
    with pytest.raises(ValueError, match="not sparsified"):
        nmopt.refresh_masks(nn.Linear(4, 4))


@pytest.mark.parametrize("solver", ["greedy", "mcf", "enumerate"])
def test_solver_routing(solver):
    if nmopt.solvers.status().get(solver) is not None:
        pytest.skip(f"solver {solver!r} unavailable")
    model = nn.Sequential(nn.Linear(16, 16))
    nmopt.sparsify_(model, nmopt.SparsityConfig(pattern="2:4", solver=solver))
    layer = model[0]
    ref = nmopt.find_mask(layer.weight.detach(), "2:4", solver=solver, backend="numpy")
    assert torch.equal(layer.mask, ref.mask) or solver != "greedy"
    got = float(layer.weight.detach().abs()[layer.mask].double().sum())
    assert got == pytest.approx(ref.objective, rel=1e-9)
    assert solver in layer.solver_note


def test_torch_kernel_route_batches_layers(monkeypatch):
    """Without a provably optimal CPU solver, "auto" runs the torch kernel once over every layer's tiles."""
    from nmopt.backends import _torch_ops
    from nmopt.training import refresh

    monkeypatch.setattr(refresh, "_host_has_optimal_solver", lambda cfg: False)
    calls = []
    original = _torch_ops.exact_tiles
    monkeypatch.setattr(_torch_ops, "exact_tiles",
                        lambda tiles, *a: calls.append(tiles.shape[0]) or original(tiles, *a))
    model = mlp()
    ctrl = quiet_sparsify(model, nmopt.SparsityConfig(pattern="4:8"))
    assert calls == [(64 // 8) * (32 // 8) * 2]  # both layers' tiles in one call
    for name, layer in ctrl.layers.items():
        assert layer.solver_note == "exact torch kernel on cpu"
        ref = nmopt.find_mask(layer.weight.detach().numpy(), "4:8")
        got = float(layer.weight.detach().abs()[layer.mask].double().sum())
        assert got == pytest.approx(ref.objective, rel=1e-9), name


# -- state dict, export, densify ---------------------------------------------------------------
def test_state_dict_round_trip():
    model = mlp()
    cfg = nmopt.SparsityConfig(pattern="4:8")
    quiet_sparsify(model, cfg)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert {k for k in model.state_dict() if k.endswith("mask")} == {"0.mask", "2.mask"}
    other = mlp(seed=1)
    quiet_sparsify(other, cfg)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    x = torch.randn(4, 32)
    torch.testing.assert_close(other(x), model(x))
    for a, b in zip(model.modules(), other.modules()):
        if isinstance(a, SparseLinear):
            assert torch.equal(a.mask, b.mask)


def test_export_and_densify():
    model = mlp()
    dense = copy.deepcopy(model)
    quiet_sparsify(model, nmopt.SparsityConfig(pattern="2:4", refresh_every=1))
    x = torch.randn(4, 32)
    y = model(x)
    sd = nmopt.export_pruned_state_dict(model)
    assert not any(k.endswith("mask") for k in sd)
    dense.load_state_dict(sd, strict=True)
    torch.testing.assert_close(dense(x), y)
    weight = model[0].weight
    nmopt.densify_(model)
    assert type(model[0]) is nn.Linear and model[0].weight is weight
    assert not torch.allclose(model(x), y)  # dense straight-through weights are back
    with pytest.raises(ValueError, match="not sparsified"):
        nmopt.densify_(model)
    quiet_sparsify(model, nmopt.SparsityConfig(pattern="2:4"))
    y2 = model(x)
    nmopt.densify_(model, apply_mask=True)
    torch.testing.assert_close(model(x), y2)


def test_deepcopy_and_invalid_loaded_mask():
    model = mlp()
    ctrl = quiet_sparsify(model, nmopt.SparsityConfig(pattern="2:4"))
    twin = copy.deepcopy(model)
    x = torch.randn(3, 32)
    torch.testing.assert_close(twin(x), model(x))
    sd = model.state_dict()
    sd["0.mask"] = torch.ones_like(sd["0.mask"])
    model.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="not a valid 2:4"):
        model(x)
    assert ctrl.layers["0"] is model[0]


def test_check_tile_mask():
    good = nmopt.backends.torch_backend.mask_tensor(torch.randn(8, 8), "2:4")
    check_tile_mask(good, 2, 4, True)
    bad = good.clone()
    bad[0, :4] = True
    with pytest.raises(RuntimeError, match="row 0 keeps"):
        check_tile_mask(bad, 2, 4, True)


# -- CUDA (skipped here) -----------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_semi_structured_training_step(dtype):
    """Transposable 2:4 in half precision runs forward and backward-data on semi-structured
    tensors and matches masked dense within dtype tolerance."""
    dt = getattr(torch, dtype)
    model = nn.Sequential(nn.Linear(256, 512)).cuda().to(dt)
    nmopt.sparsify_(model, nmopt.SparsityConfig(pattern="2:4"))
    layer = model[0]
    assert layer.matmul.startswith(matmul.SEMI), layer.matmul
    assert "exact torch kernel on cuda" in layer.solver_note
    x = torch.randn(128, 256, device="cuda", dtype=dt, requires_grad=True)
    y = model(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    want = reference_grads(layer.weight.detach().float(), layer.mask, layer.bias.detach().float(),
                           x.detach().float(), gy.float(), 0.0)
    torch.testing.assert_close(y.float(), want[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.float(), want[1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.weight.grad.float(), want[2], rtol=2e-2, atol=5e-2)


def test_lazy_exports():
    import subprocess
    import sys

    code = ("import sys, nmopt\n"
            "assert 'torch' not in sys.modules\n"
            "from nmopt import sparsify_, SparsityConfig, training\n"
            "assert nmopt.training is training and 'torch' in sys.modules\n"
            "assert nmopt.export_pruned_state_dict is training.export_pruned_state_dict\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute"):
        nmopt.not_a_name  # noqa: B018
