"""Which modules ``sparsify_`` replaces, and models behind wrappers: a layer whose replacement
would change what the model computes (a subclass's own forward or state, a parametrization,
hooks, nn.TransformerEncoderLayer's fast path) is left dense and reported; ``torch.compile``
and aliases; bad optimizers and solver settings refused before any change."""

from __future__ import annotations

import warnings

import pytest

import nmopt

torch = pytest.importorskip("torch")
from torch import nn
from torch.nn.utils import parametrize

from nmopt.training.layers import SparseLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

CFG = nmopt.SparsityConfig(pattern="2:4")


def sparsify(model, config=CFG, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return nmopt.sparsify_(model, config, **kw)


class LoRALinear(nn.Linear):
    def __init__(self, i, o):
        super().__init__(i, o)
        self.A = nn.Parameter(torch.randn(2, i))
        self.B = nn.Parameter(torch.randn(o, 2))

    def forward(self, x):
        return super().forward(x) + x @ self.A.t() @ self.B.t()


class OwnForward(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class PlainSubclass(nn.Linear):
    pass


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


def _hooked():
    lin = nn.Linear(8, 8)
    lin.register_forward_hook(lambda *a: None)
    return lin


def _parametrized():
    lin = nn.Linear(8, 8)
    parametrize.register_parametrization(lin, "weight", Double())
    return lin


def _weight_norm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        return nn.utils.weight_norm(nn.Linear(8, 8))


@pytest.mark.parametrize("make, says", [
    (lambda: LoRALinear(8, 8), "holds more than weight and bias (A, B"),
    (lambda: OwnForward(8, 8), "overrides forward"),
    (_parametrized, "parametrized"),
    (_weight_norm, "holds more than weight and bias"),
    (_hooked, "forward hooks"),
], ids=["extra-parameters", "own-forward", "parametrize", "weight-norm", "hook"])
def test_layers_a_sparse_layer_would_change_stay_dense_and_are_reported(make, says):
    torch.manual_seed(0)
    model = nn.Sequential(make(), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(3, 8)
    keys = set(model.state_dict())
    first = model[0]
    y = first(x)
    ctrl = sparsify(model)
    assert "0" in ctrl.skipped and says in ctrl.skipped["0"], ctrl.skipped
    assert list(ctrl.layers) == ["2"]
    assert model[0] is first and type(first) is not SparseLinear
    assert set(model.state_dict()) == keys | {"2.mask"}
    torch.testing.assert_close(model[0](x), y)


def test_skipped_layer_outputs_and_parameters_are_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(8, 8))
    x = torch.randn(3, 8)
    y = model(x)
    params = sorted(n for n, _ in model.named_parameters())
    wrapper = nn.Sequential(model)
    ctrl = sparsify(wrapper)
    assert not ctrl.layers and "0.0" in ctrl.skipped
    assert sorted(n for n, _ in model.named_parameters()) == params
    torch.testing.assert_close(model(x), y)


def test_a_plain_subclass_is_still_sparsified():
    model = nn.Sequential(PlainSubclass(8, 8))
    ctrl = sparsify(model)
    assert list(ctrl.layers) == ["0"] and not ctrl.skipped


@pytest.mark.parametrize("stack", [False, True])
def test_transformer_encoder_layer_fast_path_does_not_bypass_masks(stack):
    """In eval under no_grad, nn.TransformerEncoderLayer (and nn.TransformerEncoder) read
    linear1/linear2's weights directly: sparse linears there were silently dense. Their fast
    path is turned off, so the output is the sparse one either way; densify_ turns it back on."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False) if stack
                          else layer, nn.Linear(16, 16))
    ctrl = sparsify(model)
    names = ["0.layers.0.linear1", "0.layers.1.linear2"] if stack else ["0.linear1", "0.linear2"]
    assert set(names) <= set(ctrl.layers)
    model.eval()
    x = torch.randn(3, 5, 16)
    y = model(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y)
    dense = {k: v for k, v in nmopt.export_pruned_state_dict(model).items()}
    nmopt.densify_(model, apply_mask=True)
    assert all(m.activation_relu_or_gelu == 1 for m in model.modules()
               if isinstance(m, nn.TransformerEncoderLayer))
    model.load_state_dict(dense)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)  # the fast path again


def test_an_instance_forward_override_is_not_dropped():
    """accelerate's device_map/offload hooks replace forward on the instance."""
    lin = nn.Linear(8, 8)
    plain = lin.forward
    lin.forward = lambda x: 2 * plain(x)
    model = nn.Sequential(lin)
    ctrl = sparsify(model)
    assert "replaced on the instance" in ctrl.skipped["0"] and model[0] is lin


def test_lazy_and_empty_layers_are_reported():
    model = nn.Sequential(nn.LazyLinear(8), nn.Linear(8, 0))
    ctrl = sparsify(model)
    assert "lazy" in ctrl.skipped["0"] and "empty weight" in ctrl.skipped["1"]


def test_a_layer_under_two_names_is_pruned_under_both_in_the_export():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    sparsify(model)
    sd = nmopt.export_pruned_state_dict(model)
    assert sorted(sd) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    keep = model[0].mask
    for key in ("0.weight", "2.weight"):
        assert (sd[key][~keep] == 0).all() and torch.equal(sd[key][keep], lin.weight[keep])
    dense = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    dense.load_state_dict(sd, strict=True)


def test_compiled_model_exports_and_densifies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    ctrl = sparsify(model)
    compiled = torch.compile(model, backend="eager")
    sd = nmopt.export_pruned_state_dict(compiled)
    assert sorted(sd) == sorted(f"_orig_mod.{k}" for k in ("0.bias", "0.weight", "2.bias",
                                                           "2.weight"))
    for name, layer in ctrl.layers.items():
        w = sd[f"_orig_mod.{name}.weight"]
        assert (w[~layer.mask] == 0).all() and torch.equal(w[layer.mask], layer.weight[layer.mask])
    nmopt.densify_(compiled, apply_mask=True)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    sparsify(model)  # undone completely: sparsify_ works again


def test_cffi_matmul_runs_under_torch_compile():
    pytest.importorskip("cffi")
    from nmopt.backends import get as get_backend
    try:
        get_backend("cffi")
    except Exception as exc:  # the C kernels are optional
        pytest.skip(f"no cffi backend: {exc}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    sparsify(model, nmopt.SparsityConfig(pattern="2:4", matmul="cffi"))
    x = torch.randn(4, 16, requires_grad=True)
    model(x).sum().backward()
    want = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    torch.compile(model, backend="eager")(x).sum().backward()
    for got, ref in zip([p.grad for p in model.parameters()] + [x.grad], want):
        torch.testing.assert_close(got, ref)


def test_a_bad_optimizer_is_refused_before_any_change():
    model = nn.Sequential(nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    with pytest.raises(TypeError, match="optimizer: expected a torch.optim.Optimizer"):
        sparsify(model, optimizer=sched)
    assert type(model[0]) is nn.Linear
    sparsify(model, optimizer=opt)  # a retry works


@pytest.mark.parametrize("kw, says", [
    (dict(solver="greedy", transposable=False), "finds transposable masks"),
    (dict(solver="rowwise"), "finds row-wise masks"),
    (dict(solver="no-such-solver"), "unknown solver"),
    (dict(decay=float("inf")), "decay: expected a finite number"),
    (dict(decay=float("nan")), "decay: expected a finite number"),
])
def test_config_refuses_bad_solver_and_decay(kw, says):
    with pytest.raises(ValueError, match=says):
        nmopt.SparsityConfig(**kw)


def test_config_takes_numpy_integers():
    np = pytest.importorskip("numpy")
    cfg = nmopt.SparsityConfig(refresh_every=np.int64(5), decay=np.float32(0.5))
    assert cfg.refresh_every == 5 and type(cfg.refresh_every) is int
    assert cfg.decay == 0.5 and type(cfg.decay) is float


def test_sparse_conv_reads_through_the_conv_hyper_parameters():
    conv = nn.Conv2d(8, 8, 3, stride=2, padding=1, dilation=1, groups=2)
    model = nn.Sequential(conv)
    sparsify(model)
    layer = model[0]
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode"):
        assert getattr(layer, name) == getattr(conv, name), name
    layer.stride = (1, 1)  # set through: the convolution's forward uses it
    assert layer(torch.randn(1, 8, 6, 6)).shape == (1, 8, 6, 6)


def test_module_type_keeps_the_mask_boolean():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    sparsify(model)
    keep = model[0].mask.clone()
    model.type(torch.DoubleTensor)
    assert model[0].mask.dtype == torch.bool and torch.equal(model[0].mask, keep)
    x = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ (model[0].weight * keep).T + model[0].bias)


# -- the C matmul plan (matmul="cffi") against masked dense -------------------------------------

CFFI_REASON = nmopt.backends.status().get("cffi", "not registered")
needs_cffi = pytest.mark.skipif(CFFI_REASON is not None, reason=f"cffi unavailable: {CFFI_REASON}")


def _pair(seed=0, size=32):
    """Two copies of one sparse layer: masked dense and the C matmul."""
    layers = []
    for mm in ("masked", "cffi"):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(size, size))
        sparsify(model, nmopt.SparsityConfig(pattern="2:4", matmul=mm))
        layers.append(model[0])
    assert layers[1].matmul.startswith("cffi")
    return layers


@needs_cffi
def test_a_gradient_penalty_through_the_c_matmul_matches_masked_dense():
    grads = []
    for layer in _pair():
        torch.manual_seed(1)
        x = torch.randn(4, 32, requires_grad=True)
        y = x + layer(x)  # a residual path: the missing term would go unnoticed
        g, = torch.autograd.grad(torch.tanh(y).sum(), x, create_graph=True)
        gw, = torch.autograd.grad((g ** 2).sum(), layer.weight)
        grads.append(gw)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


@needs_cffi
def test_a_mask_written_around_its_version_counter_is_seen_by_the_c_matmul():
    masked_layer, layer = _pair()
    x = torch.randn(5, 32)
    layer(x)
    # another valid transposable 2:4 mask: the columns of every tile rotated
    new = masked_layer.mask.reshape(32, 8, 4).roll(1, dims=2).reshape(32, 32)
    assert not torch.equal(new, layer.mask)
    layer.mask.data.copy_(new)  # does not bump mask._version
    want = x @ torch.where(new, layer.weight, 0.0).t() + layer.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


@needs_cffi
def test_the_c_matmul_under_autocast_runs_masked_in_bfloat16_and_keeps_its_plan():
    _, layer = _pair()
    layer._plan_key = None  # the next plan is built inside autocast
    x = torch.randn(5, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "disagrees with masked dense" from the probe
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer.matmul.startswith("cffi")
    assert layer(x).dtype == torch.float32


@pytest.mark.parametrize("bad, err", [
    (lambda m: m.numpy(), "got ndarray"),
    (lambda m: m.float() * 0.3, "float32 with other values"),
    (lambda m: torch.where(m, torch.nan, 0.0), "float32 with other values"),
])
def test_set_mask_takes_bool_tensors_or_0_and_1(bad, err):
    model = nn.Sequential(nn.Linear(16, 16))
    sparsify(model)
    layer, mask = model[0], model[0].mask.clone()
    with pytest.raises(TypeError, match=err):
        layer.set_mask(bad(mask))
    layer.set_mask(mask.to(torch.int64))  # 0s and 1s
    assert layer.mask.dtype == torch.bool and torch.equal(layer.mask, mask)


@needs_cffi
def test_a_second_order_gradient_through_the_weight_gradient_reaches_the_input():
    """MAML-style: differentiate a weight gradient with respect to the input and an earlier layer."""
    grads = []
    for mm in ("masked", "cffi"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        sparsify(model, nmopt.SparsityConfig(pattern="2:4", matmul=mm))
        x = torch.randn(4, 16, requires_grad=True)
        gw, = torch.autograd.grad(model(x).pow(2).sum(), model[2].weight, create_graph=True)
        grads.append(torch.autograd.grad(gw.pow(2).sum(), [x, model[0].weight]))
    for c, m in zip(grads[1], grads[0]):
        torch.testing.assert_close(c, m, rtol=1e-4, atol=1e-4)


# -- layers sharing weights, foreign layer types, configs and schedules -------------------------

class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        return self.head(self.body(self.emb(ids)))


def test_a_head_tied_to_an_embedding_stays_dense_and_the_export_matches():
    model = _TiedLM()
    handle = sparsify(model)
    assert list(handle.layers) == ["body"] and "shared with 'emb' (Embedding)" in handle.skipped["head"]
    ids = torch.arange(16).reshape(2, 8)
    fresh = _TiedLM()
    fresh.load_state_dict(nmopt.export_pruned_state_dict(model), strict=True)
    torch.testing.assert_close(fresh(ids), model(ids))


def test_transformers_conv1d_layers_are_listed_as_left_dense():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(8, 8), nn.Linear(8, 8))
    handle = sparsify(model)
    assert list(handle.layers) == ["1"] and "transformers Conv1D" in handle.skipped["0"]


def test_config_fields_set_later_are_validated():
    cfg = nmopt.SparsityConfig(pattern="2:4")
    cfg.pattern = "4:8"
    assert (cfg.n, cfg.m) == (4, 8) and cfg.describe().startswith("4:8")
    for name, bad in (("update", "sr_ste"), ("refresh_every", -3), ("pattern", "4:4")):
        with pytest.raises(ValueError, match=name):
            setattr(cfg, name, bad)
    assert (cfg.update, cfg.refresh_every, cfg.pattern, cfg.m) == ("ste", 100, "4:8", 8)


def test_set_mask_refuses_another_shape():
    model = nn.Sequential(nn.Linear(16, 8))
    sparsify(model)
    with pytest.raises(ValueError, match=r"weight's shape \(8, 16\).*got \(16, 8\)"):
        model[0].set_mask(model[0].mask.t())


def test_export_and_apply_mask_refuse_an_invalid_loaded_mask():
    model = nn.Sequential(nn.Linear(16, 16))
    sparsify(model)
    state = model.state_dict()
    state["0.mask"] = torch.ones(16, 16, dtype=torch.bool)  # not 2:4
    model.load_state_dict(state)
    with pytest.raises(RuntimeError, match="not a valid 2:4"):
        nmopt.export_pruned_state_dict(model)
    weight = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="not a valid 2:4"):
        nmopt.densify_(model, apply_mask=True)
    assert torch.equal(model[0].weight, weight) and isinstance(model[0], SparseLinear)


def test_the_refresh_schedule_resumes_from_its_state_dict():
    def run(steps, resume=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        handle = sparsify(model, nmopt.SparsityConfig(pattern="2:4", refresh_every=4),
                          optimizer=opt)
        if resume is not None:
            model.load_state_dict(resume[0])
            opt.load_state_dict(resume[1])
            handle.load_state_dict(resume[2])
        for _ in range(steps):
            torch.manual_seed(handle.steps)
            model(torch.randn(4, 16)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        return model, opt, handle

    whole = run(10)[0]
    model, opt, handle = run(6)
    assert handle.state_dict() == {"steps": 6, "refreshes": 2}
    resumed, _, again = run(4, (model.state_dict(), opt.state_dict(), handle.state_dict()))
    assert again.steps == 10 and again.refreshes == 3
    assert torch.equal(resumed[0].mask, whole[0].mask)
    with pytest.raises(ValueError, match="'steps'"):
        again.load_state_dict({"steps": -1, "refreshes": 0})


def test_pattern_is_fixed_while_a_model_uses_the_config():
    cfg = nmopt.SparsityConfig(pattern="2:4")
    model = nn.Sequential(nn.Linear(12, 12))
    sparsify(model, cfg)
    with pytest.raises(ValueError, match="in use by a sparsified model"):
        cfg.pattern = "4:8"  # 12 is no multiple of 8: the layer would be masked across groups
    cfg.refresh_every = 7  # other fields may change
    nmopt.densify_(model)
    cfg.pattern = "4:8"
    assert cfg.m == 8


def test_a_filtered_out_conv1d_is_not_listed():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(8, 8), nn.Linear(8, 8))
    handle = sparsify(model, filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
    assert list(handle.layers) == ["1"] and not handle.skipped
    handle = sparsify(nn.Sequential(Conv1D(8, 8), nn.Linear(8, 8)),
                      filter_fn=lambda mod, fqn: mod.out_features > 0)  # fails on Conv1D: listed
    assert "transformers Conv1D" in handle.skipped["0"]
