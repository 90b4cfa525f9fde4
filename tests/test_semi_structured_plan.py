"""The semi-structured 2:4 plan through PyTorch's real tensor subclasses, CUDA kernels faked.

The CUDA path cannot run on a machine without a GPU, but everything around its kernels can:
``SparseSemiStructuredTensorCUSPARSELT`` / ``...CUTLASS`` (construction, ``t()``, ``linear``,
``mm`` with the sparse operand on either side, the ``semi_structured::*_mm`` custom ops and
their padding) are plain PyTorch. These tests replace only the kernels with CPU stand-ins in an
easy format and check that nmopt drives that API correctly on the installed PyTorch: which
operand each GEMM reads (W for the forward, W^T for backward-data), what each mode packs per
step, that the plan is rebuilt after a mask refresh, and which mode is chosen when a kernel
refuses the device (PyTorch's CUTLASS sparse GEMM runs on compute capability 8.x only, so an
H100 must get cuSPARSELt or the full repack). The kernels themselves are checked by the ``gpu``
tests at the end, on a CUDA machine.
"""

from __future__ import annotations

import pytest

import nmopt

torch = pytest.importorskip("torch")
from torch import nn

from nmopt.training import matmul

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),  # see tests/conftest.py
              pytest.mark.filterwarnings("ignore:The PyTorch API of SparseSemiStructuredTensor")]

SPARSE = torch.sparse
KERNELS = ("_sparse_semi_structured_tile", "_sparse_semi_structured_apply",
           "_sparse_semi_structured_apply_dense", "_sparse_semi_structured_mm",
           "_cslt_sparse_mm", "_cslt_compress")
if not (hasattr(SPARSE, "SparseSemiStructuredTensorCUTLASS")
        and hasattr(SPARSE, "SparseSemiStructuredTensorCUSPARSELT")
        and all(hasattr(torch, k) for k in KERNELS)):
    pytest.skip("this PyTorch has no semi-structured sparse tensors", allow_module_level=True)

SM8X_ONLY = "sparse_semi_structured_mad_op : Supported only on GPUs with compute capability 8.x"


class FakeKernels:
    """CPU stand-ins for the CUDA kernels. Fake formats: a packed tensor is the pruned matrix
    itself, CUTLASS metadata and the bitmask are its bool pattern. The tile kernel prunes each
    4x4 tile greedily, largest first with at most 2 per row and column, ranking by signed value
    for the default algorithm and by |value| for "largest_abs_values_greedy", like the CUDA one.

    ``cusparselt``: whether ``torch.backends.cusparselt`` says it is available; ``hopper``: the
    CUTLASS GEMM refuses the device as on compute capability 9.0; ``drop``: the tile kernel
    loses one kept entry.
    """

    def __init__(self, monkeypatch, cusparselt=True, hopper=False, drop=False):
        self.hopper, self.drop = hopper, drop
        self.tiles: list[tuple[bool, str]] = []  # (use_cutlass, algorithm) of every call
        self.applies = self.compresses = 0
        self.gemms: list[tuple[int, int]] = []  # shape of the sparse operand of every GEMM
        for name in KERNELS:
            monkeypatch.setattr(torch, name, getattr(self, name.lstrip("_")))
        monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)
        monkeypatch.setattr(SPARSE.SparseSemiStructuredTensor, "_validate_device_dim_dtype_shape",
                            classmethod(lambda cls, t: None))  # it refuses CPU tensors

    def sparse_semi_structured_tile(self, dense, algorithm="", use_cutlass=True):
        assert dense.dim() == 2 and dense.is_contiguous()
        self.tiles.append((use_cutlass, algorithm))
        rank = {"": lambda v: v, "largest_values_greedy": lambda v: v,
                "largest_abs_values_greedy": torch.abs}
        if algorithm not in rank:
            raise RuntimeError(f'Unknown algorithm "{algorithm}"')
        r, c = dense.shape
        blocks = rank[algorithm](dense.float()).reshape(r // 4, 4, c // 4, 4).transpose(1, 2)
        keep = torch.zeros(blocks.shape, dtype=torch.bool)
        for bi in range(r // 4):
            for bj in range(c // 4):
                rows, cols = [0] * 4, [0] * 4
                order = blocks[bi, bj].flatten().sort(descending=True, stable=True).indices
                for k in order.tolist():
                    i, j = divmod(k, 4)
                    if rows[i] < 2 and cols[j] < 2:
                        keep[bi, bj, i, j] = True
                        rows[i] += 1
                        cols[j] += 1
        keep = keep.transpose(1, 2).reshape(r, c)
        if self.drop:
            keep[0, int(keep[0].nonzero()[0])] = False
        packed, packed_t = self._pruned(dense, keep)
        if not use_cutlass:  # cuSPARSELt keeps values and metadata in one flat buffer
            packed, packed_t = packed.flatten(), packed_t.flatten()
        return packed, keep.clone(), packed_t, keep.t().contiguous(), keep

    @staticmethod
    def _pruned(dense, keep):
        pruned = dense * keep
        return pruned.contiguous(), pruned.t().contiguous()

    def sparse_semi_structured_apply(self, dense, bitmask):
        self.applies += 1
        return self._pruned(dense, bitmask)

    def sparse_semi_structured_apply_dense(self, dense, bitmask):
        return dense * bitmask

    def sparse_semi_structured_mm(self, packed, meta, dense):
        if self.hopper:
            raise RuntimeError(SM8X_ONLY)
        assert packed.shape == meta.shape and packed.shape[1] == dense.shape[0]
        assert not bool((packed[~meta] != 0).any()), "values outside the sparse pattern"
        self.gemms.append(tuple(packed.shape))
        return packed @ dense

    def cslt_compress(self, dense):
        self.compresses += 1
        return dense.clone()

    def cslt_sparse_mm(self, packed, dense, bias=None, transpose_result=False, alg_id=0,
                       **kwargs):
        assert packed.dim() == 2 and packed.shape[1] == dense.shape[0], (packed.shape, dense.shape)
        self.gemms.append(tuple(packed.shape))
        out = packed @ dense + (0 if bias is None else bias[:, None])
        return out.t().contiguous() if transpose_result else out


def transposable_mask(weight):
    return nmopt.backends.torch_backend.mask_tensor(weight.detach().float(), "2:4")


def masked_dense(weight, mask, bias, x, gy):
    wm = weight.float() * mask
    return x.float() @ wm.t() + bias.float(), gy.float() @ wm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(matmul.SemiStructuredPlan.MODES))
def test_forward_reads_w_and_backward_data_reads_w_transposed(monkeypatch, mode, dtype):
    fake = FakeKernels(monkeypatch)
    out_f, in_f = 64, 128
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f).to(dtype).requires_grad_()
    b = torch.randn(out_f).to(dtype).requires_grad_()
    mask = transposable_mask(w)
    plan = matmul.SemiStructuredPlan(mask, dtype, mode)
    assert plan.mode == matmul.SemiStructuredPlan.MODES[mode]
    built = list(fake.tiles)
    steps = 2
    for _step in range(steps):  # the second step sees new values under the same mask
        fake.gemms.clear()
        x = torch.randn(3, 5, in_f).to(dtype).requires_grad_()  # 15 rows: padded by PyTorch
        y = matmul.SparseLinearFn.apply(x, w, b, mask, 0.0, plan)
        gy = torch.randn_like(y)
        y.backward(gy)
        assert fake.gemms == [(out_f, in_f), (in_f, out_f)]  # W, then W^T
        want_y, want_gx = masked_dense(w.detach(), mask, b.detach(),
                                       x.detach().reshape(-1, in_f), gy.reshape(-1, out_f))
        torch.testing.assert_close(y.float().reshape(-1, out_f), want_y, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(x.grad.float().reshape(-1, in_f), want_gx, rtol=2e-2,
                                   atol=2e-2)
        want_gw = gy.float().reshape(-1, out_f).t() @ x.detach().float().reshape(-1, in_f)
        torch.testing.assert_close(w.grad.float(), want_gw, rtol=2e-2, atol=5e-2)
        with torch.no_grad():
            w.sub_(0.1 * w.grad)
        w.grad = b.grad = None
    per_step = fake.tiles[len(built):]
    if mode == "cusparselt-tile":  # one tile kernel per step, ranking by |value|
        assert built == [] and per_step == [(False, "largest_abs_values_greedy")] * steps
    elif mode == "cutlass-values":  # pattern once, values every step
        assert built == [(True, "")] and per_step == [] and fake.applies == steps
    else:
        assert fake.tiles == [] and fake.compresses == 2 * steps
    assert matmul._probe(plan, w.detach(), mask) is None


@pytest.mark.parametrize("mode", ["cusparselt-tile", "cutlass-values"])
def test_masks_with_short_rows_are_packed_exactly(monkeypatch, mode):
    """nmopt's "at most N" masks may keep fewer than 2 in a tile row; the packed operands then
    hold extra zero slots and must still multiply exactly like W*mask."""
    FakeKernels(monkeypatch)
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    mask = transposable_mask(w)
    mask[0:4, 0:4] = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]],
                                  dtype=torch.bool)
    assert matmul._probe(matmul.SemiStructuredPlan(mask, torch.bfloat16, mode), w, mask) is None


def test_a_cutlass_pattern_that_loses_a_kept_weight_is_refused(monkeypatch):
    FakeKernels(monkeypatch, drop=True)
    w = torch.randn(64, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="does not keep exactly the mask"):
        matmul.SemiStructuredPlan(transposable_mask(w), torch.float16, "cutlass-values")


@pytest.mark.parametrize("cusparselt, hopper, chosen", [
    (True, False, "cusparselt-tile"),   # PyTorch's default backend where it is present
    (False, False, "cutlass-values"),   # Ampere without cuSPARSELt
    (False, True, "full"),              # Hopper without cuSPARSELt: CUTLASS GEMM refuses sm90
    (True, True, "cusparselt-tile"),    # Hopper with cuSPARSELt
])
def test_mode_choice_follows_what_the_device_runs(monkeypatch, cusparselt, hopper, chosen):
    FakeKernels(monkeypatch, cusparselt=cusparselt, hopper=hopper)
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    plan, failed = matmul.semi_structured_plan(w, transposable_mask(w))
    assert plan is not None and plan.key == chosen
    modes = list(matmul.SemiStructuredPlan.MODES)
    assert [f.split(":")[0] for f in failed] == modes[:modes.index(chosen)]
    if chosen == "full":
        assert "no cuSPARSELt" in failed[0] and "compute capability 8.x" in failed[1]


def test_sparsified_model_trains_on_the_plan_and_rebuilds_it_after_refresh(monkeypatch):
    """What a CUDA user gets, with the device check and the kernels stubbed: the layer reports
    its semi-structured mode, its outputs match masked dense at every step, and each mask
    refresh builds a new plan (and a new CUTLASS pattern) for the new mask."""
    fake = FakeKernels(monkeypatch, cusparselt=False)
    monkeypatch.setattr(matmul, "semi_structured_unsupported", lambda config, weight: None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64)).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ctrl = nmopt.sparsify_(model, nmopt.SparsityConfig(pattern="2:4", refresh_every=2),
                           optimizer=opt)
    first, second = model[0], model[2]
    for layer in (first, second):
        assert layer.matmul == ("semi-structured 2:4 (CUTLASS, values-only repack per step; "
                                "not used: cusparselt-tile: RuntimeError: this PyTorch has no "
                                "cuSPARSELt)")
        assert "values-only" in repr(layer)
    x = torch.randn(32, 128, dtype=torch.bfloat16)
    masks = []
    for _step in range(4):
        opt.zero_grad()
        h = torch.relu(first(x))
        want = masked_dense(first.weight.detach(), first.mask, first.bias.detach(), x,
                            torch.zeros(32, 64))[0]
        torch.testing.assert_close(h.float(), want.relu(), rtol=2e-2, atol=2e-2)
        second(h).float().pow(2).mean().backward()
        opt.step()
        masks.append(first.mask.clone())
    assert len(fake.tiles) == 2 * 2  # plans are built lazily: the refresh after step 4 not yet
    model(x)
    assert ctrl.refreshes == 1 + 2
    nmopt.check_mask(first.mask.numpy(), "2:4")
    assert not torch.equal(masks[0], masks[-1])  # the refreshes changed the mask
    # One pattern per layer for the initial masks and one per layer per refresh; steps between
    # refreshes (and the plan's probe) only repack values.
    assert len(fake.tiles) == 2 * ctrl.refreshes


def test_a_layer_on_a_hopper_like_device_says_why_cutlass_was_not_used(monkeypatch):
    FakeKernels(monkeypatch, cusparselt=False, hopper=True)
    monkeypatch.setattr(matmul, "semi_structured_unsupported", lambda config, weight: None)
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.float16)
    nmopt.sparsify_(model, nmopt.SparsityConfig(pattern="2:4"))
    note = model[0].matmul
    assert note.startswith("semi-structured 2:4 (full repack"), note
    assert "cutlass-values: semi-structured 2:4 failed its self-check: RuntimeError: " \
           + SM8X_ONLY in note


@pytest.mark.parametrize("hopper", [False, True])
def test_bench_speed_times_the_mode_a_layer_would_use(monkeypatch, hopper):
    """``nmopt bench speed``'s CUDA cases on the stand-ins: the forward and backward-data
    closures compute the layer's products, and the note names the mode they ran in."""
    from nmopt.bench import speed

    FakeKernels(monkeypatch, cusparselt=False, hopper=hopper)
    monkeypatch.setattr(matmul, "semi_structured_unsupported", lambda config, weight: None)
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    mask = transposable_mask(w)
    x, gy = torch.randn(48, 128, dtype=torch.bfloat16), torch.randn(48, 64, dtype=torch.bfloat16)
    notes = []
    cases = {op: fn for op, _, fn in speed._semi_structured_cases(w, mask, x, gy, "2:4", notes)}
    assert sorted(cases) == ["backward-data", "forward", "repack W and W^T"]
    want_y, want_gx = masked_dense(w, mask, torch.zeros(64), x, gy)
    torch.testing.assert_close(cases["forward"]().float(), want_y, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(cases["backward-data"]().float(), want_gx, rtol=2e-2, atol=2e-2)
    mode = "full repack" if hopper else "CUTLASS, values-only"
    assert len(notes) == 1 and notes[0].startswith(f"semi-structured 2:4 at 48x128x64: {mode}")


# -- the real kernels (CUDA; skipped here) ----------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_plan_packs_exact_masks_without_a_full_repack(dtype):
    """On the real kernels a per-step tile pack (cuSPARSELt) or values-only repack (CUTLASS,
    compute capability 8.x) works for an exact transposable mask, full and with a short row,
    and both GEMMs agree with masked dense. If this fails, layers still train correctly on the
    full repack, but every step compresses W and W^T from scratch."""
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=dtype)
    mask = transposable_mask(w)
    short = mask.clone()
    short[0, short[0].nonzero()[0]] = False  # a tile row that keeps one
    for m in (mask, short):
        plan, failed = matmul.semi_structured_plan(w, m)
        assert plan is not None and plan.key != "full", failed
        assert matmul._probe(plan, w, m) is None
