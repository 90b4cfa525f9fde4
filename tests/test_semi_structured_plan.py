"""The semi-structured 2:4 plan through PyTorch's real tensor subclass, with its CUDA kernels faked.

The CUDA path cannot run on a machine without a GPU, but everything around its four kernels can:
``SparseSemiStructuredTensorCUTLASS`` (construction, ``t()``, ``linear``, ``mm`` with the sparse
operand on either side, the ``semi_structured::cutlass_mm`` custom op and its padding) is plain
PyTorch. These tests replace only the kernels (``torch._sparse_semi_structured_tile``,
``_apply``, ``_apply_dense`` and ``_mm``) with CPU stand-ins in an easy format, so they check that
nmopt drives that API correctly on the installed PyTorch: which operand each GEMM reads (W for
the forward, the stored W^T for backward-data), that per-step packing repacks values only, that
the plan is rebuilt after a mask refresh, and that an unusable pattern falls back. The kernels
themselves are checked by the ``gpu`` tests on a CUDA machine.
"""

from __future__ import annotations

import warnings

import pytest

import nmopt

torch = pytest.importorskip("torch")
from torch import nn

from nmopt.training import kernels

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

CUTLASS = getattr(torch.sparse, "SparseSemiStructuredTensorCUTLASS", None)
KERNELS = ("_sparse_semi_structured_tile", "_sparse_semi_structured_apply",
           "_sparse_semi_structured_apply_dense", "_sparse_semi_structured_mm")
if CUTLASS is None or not all(hasattr(torch, k) for k in KERNELS):
    pytest.skip("this PyTorch has no CUTLASS semi-structured tensors", allow_module_level=True)


class FakeKernels:
    """CPU stand-ins for the CUDA kernels. Fake format: ``packed`` is the pruned matrix itself,
    ``meta`` and the bitmask are its bool pattern. The tile kernel prunes greedily per 4x4 tile
    (largest first, at most 2 per row and column), like the CUDA one; ``drop`` makes it lose
    one kept entry, to test the plan's own check."""

    def __init__(self, monkeypatch, drop: bool = False):
        self.drop = drop
        self.tiles = 0
        self.applies = 0
        self.mm_shapes: list[tuple[int, int]] = []
        for name in KERNELS:
            short = name.removeprefix("_sparse_semi_structured_")
            monkeypatch.setattr(torch, name, getattr(self, short))

    def tile(self, dense, algorithm="", use_cutlass=False):
        assert use_cutlass and dense.dim() == 2 and algorithm == ""
        self.tiles += 1
        r, c = dense.shape
        blocks = dense.abs().float().reshape(r // 4, 4, c // 4, 4).permute(0, 2, 1, 3)
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
        keep = keep.permute(0, 2, 1, 3).reshape(r, c)
        if self.drop:
            keep[0, int(keep[0].nonzero()[0])] = False
        packed, packed_t = self._pack(dense, keep)
        return packed, keep.clone(), packed_t, keep.t().contiguous(), keep

    @staticmethod
    def _pack(dense, keep):
        pruned = dense * keep
        return pruned.contiguous(), pruned.t().contiguous()

    def apply(self, dense, bitmask):
        self.applies += 1
        return self._pack(dense, bitmask)

    def apply_dense(self, dense, bitmask):
        return dense * bitmask

    def mm(self, packed, meta, dense):
        assert packed.shape == meta.shape and packed.shape[1] == dense.shape[0], \
            (packed.shape, meta.shape, dense.shape)
        assert not bool((packed[~meta] != 0).any()), "values outside the sparse pattern"
        self.mm_shapes.append(tuple(packed.shape))
        return packed @ dense


def transposable_mask(weight):
    return nmopt.backends.torch_backend.mask_tensor(weight.detach().float(), "2:4")


def masked_dense(weight, mask, bias, x, gy):
    wm = weight.float() * mask
    return x.float() @ wm.t() + bias.float(), gy.float() @ wm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_reads_w_and_backward_data_reads_stored_w_transposed(monkeypatch, dtype):
    fake = FakeKernels(monkeypatch)
    out_f, in_f = 64, 128
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f).to(dtype).requires_grad_()
    b = torch.randn(out_f).to(dtype).requires_grad_()
    mask = transposable_mask(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyTorch's "prototype" notice
        plan = kernels.SemiStructuredPlan(mask, dtype)
        assert plan.mode == "CUTLASS, values-only repack per step"
        assert isinstance(plan.pattern, CUTLASS) and fake.tiles == 1
        for _step in range(2):  # the second step sees new values through the same pattern
            fake.mm_shapes.clear()
            x = torch.randn(3, 5, in_f).to(dtype).requires_grad_()  # 15 rows: padded by PyTorch
            y = kernels.SparseLinearFn.apply(x, w, b, mask, 0.0, plan)
            gy = torch.randn_like(y)
            y.backward(gy)
            assert fake.mm_shapes == [(out_f, in_f), (in_f, out_f)]  # W, then W^T
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
        assert fake.tiles == 1 and fake.applies == 2  # values repacked, pattern never recomputed
        assert kernels._probe(plan, w.detach(), mask) is None


def test_a_pattern_that_loses_a_kept_weight_is_not_used(monkeypatch):
    FakeKernels(monkeypatch, drop=True)
    w = torch.randn(64, 64, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan = kernels.SemiStructuredPlan(transposable_mask(w), torch.float16)
    assert plan.pattern is None and plan.mode.startswith("full repack")


def test_masks_with_short_rows_keep_the_values_only_path(monkeypatch):
    """nmopt's "at most N" masks may keep fewer than 2 in a tile row; the CUTLASS pattern then
    holds extra zero slots, and the plan must still reproduce the mask exactly."""
    FakeKernels(monkeypatch)
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    mask = transposable_mask(w)
    mask[0:4, 0:4] = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]],
                                  dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan = kernels.SemiStructuredPlan(mask, torch.bfloat16)
        assert plan.pattern is not None
        assert kernels._probe(plan, w, mask) is None


def test_sparsified_model_trains_on_the_plan_and_rebuilds_it_after_refresh(monkeypatch):
    """What a CUDA user gets, with the device check and the kernels stubbed: the layer reports
    the values-only CUTLASS path, its outputs match masked dense at every step, and each mask
    refresh builds a new pattern from the new mask."""
    fake = FakeKernels(monkeypatch)
    monkeypatch.setattr(kernels, "semi_structured_unsupported", lambda config, weight: None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64)).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ctrl = nmopt.sparsify_(model, nmopt.SparsityConfig(pattern="2:4", refresh_every=2),
                               optimizer=opt)
        first, second = model[0], model[2]
        for layer in (first, second):
            assert layer.kernel == "semi-structured 2:4 (CUTLASS, values-only repack per step)"
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
        assert fake.tiles == 2 * 2  # plans are built lazily: the refresh after step 4 not yet
        model(x)
    assert ctrl.refreshes == 1 + 2
    nmopt.check_mask(first.mask.numpy(), "2:4")
    assert not torch.equal(masks[0], masks[-1])  # the refreshes changed the mask
    # One pattern per layer for the initial masks and one per layer per refresh; steps between
    # refreshes (and the plan's probe) only repack values.
    assert fake.tiles == 2 * ctrl.refreshes
    assert first.kernel.startswith(kernels.SEMI)


# -- the real kernels (CUDA; skipped here) ----------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_pattern_reproduces_exact_masks(dtype):
    """On the real kernels the pattern built from an exact transposable mask (full and with
    short rows) keeps exactly the mask, so training repacks values only, and both GEMMs agree
    with masked dense."""
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=dtype)
    mask = transposable_mask(w)
    short = mask.clone()
    short[0, short[0].nonzero()[0]] = False  # a tile row that keeps one
    for m in (mask, short):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            plan = kernels.SemiStructuredPlan(m, dtype)
            assert plan.mode == "CUTLASS, values-only repack per step"
            assert kernels._probe(plan, w, m) is None
