"""The sparse layers' matmuls: GEMM plans (masked dense, the C backend's N:M matmul,
semi-structured 2:4) chosen by ``SparsityConfig.matmul``, and the autograd functions that run them.

A *plan* says how a layer's forward GEMM ``Y = X (W*mask)^T`` and backward-data GEMM
``dX = dY (W*mask)`` run for the layer's current device, dtype and mask. The weight gradient
``dW = dY^T X`` is always dense (straight-through). Every plan is checked once against the
masked dense product on a small probe when it is built (at each mask refresh and each device or
dtype change); a plan that disagrees is dropped for masked dense with a warning, never used.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from nmopt import backends
from nmopt.packed import PackedNM
from nmopt.training.config import SparsityConfig

MASKED = "masked dense"
CFFI = "cffi N:M sparse matmul"
SEMI = "semi-structured 2:4"
_PROBE_ROWS = 64


def masked(weight, mask):
    """``W * mask`` as a select: pruned entries are exactly 0, even where W is NaN or inf
    (a product would give NaN * 0 = NaN)."""
    return torch.where(mask, weight, weight.new_zeros(()))


def sr_ste_term(weight, mask, decay: float):
    """SR-STE's ``decay * (~mask) * W``, as a select: kept entries get exactly 0."""
    return torch.where(mask, weight.new_zeros(()), weight * decay)


class MaskedWeight(torch.autograd.Function):
    """``W * mask`` forward (:func:`masked`); backward passes the dense gradient to every weight
    (STE), plus ``decay * (~mask) * W`` for SR-STE."""

    @staticmethod
    def forward(ctx, weight, mask, decay):
        ctx.decay = decay
        ctx.save_for_backward(weight, mask)
        return masked(weight, mask)

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        if ctx.decay:
            grad = grad + sr_ste_term(weight, mask, ctx.decay)
        return grad, None, None


class SparseLinearFn(torch.autograd.Function):
    """Linear layer whose forward and backward-data GEMMs run on a sparse plan. A backward that
    builds a graph (``create_graph=True``: gradient penalties, double backward) computes its
    backward-data GEMM masked dense instead, so that it can be differentiated again."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, decay, plan):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        packs = plan.pack(weight, mask)
        y = plan.forward(x2, packs)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, weight, mask)  # x itself: a second backward reaches it
        ctx.plan, ctx.packs, ctx.decay, ctx.x_shape = plan, packs, decay, shape
        ctx.has_bias = bias is not None
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, weight, mask = ctx.saved_tensors
        x2, gy2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # create_graph: differentiable, straight-through in W
                gx = gy2.mm(MaskedWeight.apply(weight, mask, 0.0).to(gy2.dtype))
            else:
                gx = ctx.plan.backward_data(gy2, ctx.packs, weight, mask)
            gx = gx.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = gy2.t().mm(x2.to(gy2.dtype))
            if ctx.decay:
                gw = gw + sr_ste_term(weight, mask, ctx.decay)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(dim=0)
        return gx, gw, gb, None, None, None


class CffiPlan:
    """The C backend's compressed N:M matmul (float32, CPU): forward from pack(W, mask),
    backward-data from pack(W^T, mask^T), which is N:M only for transposable masks.

    A plan lives as long as its mask. It packs the mask once (indices of every kept slot, for
    W and for W^T); each step then only gathers the current values into those slots, so the
    values are repacked and the indices never are (no transposed copy of W either).
    """

    name = CFFI

    def __init__(self, backend, config: SparsityConfig, mask):
        self.backend, self.n, self.m = backend, config.n, config.m
        self.transposable = config.transposable
        self.layout = self._layout(mask, False)
        self.layout_t = self._layout(mask.t(), True) if self.transposable else None

    def _layout(self, mask, transposed: bool):
        """Where each packed slot of ``mask`` (R, C) reads W: (gather index, float 0/1 of kept
        slots (padding slots read 0), packed indices, shape). For W^T (``transposed``) the
        gather index runs along W's rows: slot (c, s) of W^T reads W[col[c, s], c]."""
        mk = mask.contiguous().numpy()
        packed = self.backend.pack(mk.astype(np.float32), mk, self.n, self.m)
        width = packed.indices.shape[1]
        col = (np.arange(width) // self.n * self.m)[None, :] + packed.indices.astype(np.int64)
        col = torch.from_numpy(col)
        kept = torch.from_numpy((packed.values != 0).astype(np.float32))
        return (col.t().contiguous() if transposed else col), kept, packed.indices, mk.shape

    def _values(self, weight, layout, transposed: bool):
        """The packed form of the current ``weight`` (or its transpose) in the fixed slots."""

        index, kept, indices, shape = layout
        w = weight.detach()
        # No transposed copy of W: W^T's values are gathered along W's rows.
        vals = torch.gather(w, 0, index).t() if transposed else torch.gather(w, 1, index)
        vals = torch.where(kept != 0, vals, vals.new_zeros(()))  # padding slots: 0, never NaN
        return PackedNM(vals.contiguous().numpy(), indices, self.n, self.m, shape)

    @torch.compiler.disable  # numpy and cffi calls: run eagerly under torch.compile
    def pack(self, weight, mask):
        return {"w": self._values(weight, self.layout, False), "weight": weight.detach(),
                "wt": None}

    @torch.compiler.disable  # numpy and cffi calls: run eagerly under torch.compile
    def forward(self, x2, packs):
        x = np.ascontiguousarray(x2.detach().numpy(), dtype=np.float32)
        return torch.from_numpy(np.asarray(self.backend.sparse_matmul(x, packs["w"])))

    @torch.compiler.disable  # numpy and cffi calls: run eagerly under torch.compile
    def backward_data(self, gy2, packs, weight, mask):
        if not self.transposable:
            return gy2.mm(masked(weight, mask))
        if packs["wt"] is None:
            packs["wt"] = self._values(packs["weight"], self.layout_t, True)
        g = np.ascontiguousarray(gy2.detach().numpy(), dtype=np.float32)
        return torch.from_numpy(np.asarray(self.backend.sparse_matmul(g, packs["wt"])))


class SemiStructuredPlan:
    """PyTorch semi-structured 2:4 tensors on CUDA (float16/bfloat16): W*mask for the forward
    GEMM and (W*mask)^T for backward-data, both valid 2:4 because the mask is transposable.

    Three ways to pack them each step (``MODES``; :func:`semi_structured_plan` takes the first
    that builds and passes its probe on the device at hand):

    - ``cusparselt-tile``: one ``torch._sparse_semi_structured_tile`` call on W*mask with the
      largest-|value| greedy packs W and W^T for cuSPARSELt. Exact for a transposable 2:4 mask:
      a 4x4 tile of W*mask has at most 2 non-zeros per row and column, and the greedy keeps
      every one of them before any zero.
    - ``cutlass-values``: the CUTLASS pattern (metadata of W and W^T) is built once per mask
      from the 0/1 mask and kept only if it reproduces the mask; each step repacks the values
      (``torch._sparse_semi_structured_apply``). PyTorch's CUTLASS sparse GEMM runs on compute
      capability 8.x only.
    - ``full``: ``to_sparse_semi_structured`` of W*mask and of its transpose every step
      (PyTorch's default backend).
    """

    name = SEMI
    MODES = {
        "cusparselt-tile": "cuSPARSELt, W and W^T packed by one tile kernel per step",
        "cutlass-values": "CUTLASS, values-only repack per step",
        "full": "full repack (to_sparse_semi_structured of W*mask and its transpose)",
    }

    def __init__(self, mask, dtype, mode: str):
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {tuple(self.MODES)}, got {mode!r}")
        self.key, self.mode, self.pattern = mode, self.MODES[mode], None
        self.not_used: list[str] = []  # why the modes before this one failed on this layer
        if mode == "cusparselt-tile" and not torch.backends.cusparselt.is_available():
            raise RuntimeError("this PyTorch has no cuSPARSELt")
        if mode == "cutlass-values":
            cls = torch.sparse.SparseSemiStructuredTensorCUTLASS
            ones = mask.to(dtype).contiguous()
            pattern = cls.prune_dense_static_sort(ones)
            kept = torch._sparse_semi_structured_apply_dense(
                ones, pattern.compressed_swizzled_bitmask)
            if not torch.equal(kept != 0, mask):
                raise RuntimeError("the CUTLASS pattern built from the mask does not keep "
                                   "exactly the mask")
            self.pattern = pattern

    @property
    def detail(self) -> str:
        """The mode, and why earlier modes were not used (for reprs and benchmark notes)."""
        return self.mode + (f"; not used: {'; '.join(self.not_used)}" if self.not_used else "")

    def pack(self, weight, mask):
        """``(sparse W carrying W^T, None)`` or ``(sparse W, sparse W^T)`` for this step."""
        wm = masked(weight.detach(), mask).contiguous()
        if self.key == "cusparselt-tile":
            cls = torch.sparse.SparseSemiStructuredTensorCUSPARSELT
            return cls.prune_dense_static_sort(wm, algorithm="largest_abs_values_greedy"), None
        if self.key == "cutlass-values":
            p = self.pattern
            packed, packed_t = torch._sparse_semi_structured_apply(
                wm, p.compressed_swizzled_bitmask)
            sp = p.__class__(wm.shape, packed, p.meta, packed_t, p.meta_t,
                             p.compressed_swizzled_bitmask)
            return sp, None
        to_sparse = torch.sparse.to_sparse_semi_structured
        return to_sparse(wm), to_sparse(wm.t().contiguous())

    def forward(self, x2, packs):
        return torch.nn.functional.linear(x2.contiguous(), packs[0])

    def backward_data(self, gy2, packs, weight, mask):
        if packs[1] is None:  # the tensor carries W^T too: dY @ W runs on it
            return torch.mm(gy2.contiguous(), packs[0])
        return torch.nn.functional.linear(gy2.contiguous(), packs[1])


def semi_structured_plan(weight, mask):
    """The first :class:`SemiStructuredPlan` mode that builds and agrees with masked dense on a
    probe: ``(plan, reasons the modes before it failed)``, or ``(None, every reason)``."""
    failed = []
    for mode in SemiStructuredPlan.MODES:
        try:
            plan = SemiStructuredPlan(mask, weight.dtype, mode)
        except (RuntimeError, ValueError, AttributeError, NotImplementedError, TypeError) as exc:
            failed.append(f"{mode}: {type(exc).__name__}: {_first_line(exc)}")
            continue
        why = _probe(plan, weight, mask)
        if why is None:
            plan.not_used = failed
            return plan, failed
        failed.append(f"{mode}: {why}")
    return None, failed


def _first_line(exc, limit: int = 160) -> str:
    text = next(iter(str(exc).strip().splitlines()), "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def semi_structured_unsupported(config: SparsityConfig, weight) -> str | None:
    """None if the semi-structured plan can serve this weight, else why not."""
    if config.pattern_str != "2:4" or not config.transposable:
        return f"semi-structured kernels need transposable 2:4, not {config.describe()}"
    if weight.device.type != "cuda":
        return f"semi-structured kernels need a CUDA weight, this one is on {weight.device}"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"semi-structured training needs float16/bfloat16 weights, got {weight.dtype}"
    if not hasattr(torch.sparse, "SparseSemiStructuredTensor"):
        return "this PyTorch has no semi-structured sparse tensors"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "semi-structured kernels need compute capability >= 8.0 (Ampere or newer)"
    out_f, in_f = weight.shape
    if out_f % 64 or in_f % 64:
        return f"W {tuple(weight.shape)} and W^T must both be multiples of 64 for the kernels"
    return None


def cffi_unsupported(config: SparsityConfig, weight) -> str | None:
    """None if the C backend's sparse matmul can serve this weight, else why not."""

    if weight.device.type != "cpu":
        return f"the C sparse matmul runs on the CPU, this weight is on {weight.device}"
    if weight.dtype != torch.float32:
        return f"the C sparse matmul is float32, this weight is {weight.dtype}"
    reason = backends.status().get("cffi", "not registered")
    if reason is not None:
        return f"cffi backend unavailable: {reason}"
    b = backends.get("cffi")
    if not (hasattr(b, "pack") and hasattr(b, "sparse_matmul")):
        return "the cffi backend has no pack/sparse_matmul kernels"
    return None


def _probe(plan, weight, mask) -> str | None:
    """Compare the plan's forward and backward-data with masked dense on a small input (in the
    weight's dtype, outside any autocast region the plan happens to be built in)."""
    with torch.autocast(weight.device.type, enabled=False):
        return _probe_once(plan, weight, mask)


def _probe_once(plan, weight, mask) -> str | None:
    gen = torch.Generator(device=weight.device).manual_seed(0)
    out_f, in_f = weight.shape
    x = torch.randn(_PROBE_ROWS, in_f, generator=gen, device=weight.device).to(weight.dtype)
    gy = torch.randn(_PROBE_ROWS, out_f, generator=gen, device=weight.device).to(weight.dtype)
    wm = masked(weight.detach(), mask)
    try:
        packs = plan.pack(weight, mask)
        got = (plan.forward(x, packs).float(), plan.backward_data(gy, packs, weight, mask).float())
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
        return f"{plan.name} failed its self-check: {type(exc).__name__}: {_first_line(exc)}"
    want = ((x @ wm.t()).float(), (gy @ wm).float())
    tol = 1e-4 if weight.dtype == torch.float32 else 2e-2
    for label, g, w in zip(("forward", "backward-data"), got, want):
        scale = w.abs().max().clamp_min(1e-12)
        if g.shape != w.shape or not bool(((g - w).abs().max() / scale) <= tol):
            return f"{plan.name} {label} disagrees with masked dense on a probe input"
    return None


def _checked_plan(name: str, config: SparsityConfig, weight, mask):
    """``(plan, detail for the description)`` if the GEMM plan ``name`` passes its probe on this
    layer, else ``(None, why not)``."""
    if name == SEMI:
        plan, failed = semi_structured_plan(weight, mask)
        if plan is None:
            return None, f"{SEMI}: no mode passed its self-check ({'; '.join(failed)})"
        return plan, f" ({plan.detail})"

    plan = CffiPlan(backends.get("cffi"), config, mask)
    why = _probe(plan, weight, mask)
    return (plan, "") if why is None else (None, why)


def build_plan(config: SparsityConfig, weight, mask, is_conv: bool):
    """Choose and self-check the GEMM plan for a layer; return ``(plan or None, description)``.

    ``None`` means masked dense (autograd through :class:`MaskedWeight`).
    """
    if is_conv:
        return None, f"{MASKED} (convolutions run as masked dense)"
    if config.matmul == "masked":
        return None, f"{MASKED} (matmul='masked' requested)"
    reasons: dict[str, str] = {}
    candidates = []
    if config.matmul in ("auto", "semi-structured"):
        candidates.append((SEMI, semi_structured_unsupported))
    if config.matmul == "cffi":
        # Not part of "auto": in bench speed the C kernel's layer step (values re-gathered into
        # the packed layout every step) was slower than masked dense at every measured shape.
        candidates.append((CFFI, cffi_unsupported))
    for name, unsupported in candidates:
        why = unsupported(config, weight)
        if why is None:
            plan, detail = _checked_plan(name, config, weight, mask)
            if plan is not None:
                bwd = "" if config.transposable else ", backward-data masked dense"
                return plan, f"{name}{detail}{bwd}"
            why = detail
            warnings.warn(f"nmopt: {why}; this layer falls back to masked dense GEMMs",
                          RuntimeWarning, stacklevel=3)
        reasons[name] = why
    if config.matmul != "auto":
        warnings.warn(f"nmopt: matmul={config.matmul!r} cannot serve this layer "
                      f"({'; '.join(reasons.values())}); using masked dense GEMMs",
                      RuntimeWarning, stacklevel=3)
    # Name the reason of the sparse GEMM that belongs to this device.
    if weight.device.type == "cuda" or config.matmul != "auto":
        shown = reasons.get(SEMI if weight.device.type == "cuda" else CFFI)
    else:
        shown = ("CPU: faster than the C sparse matmul for a training step, see "
                 "benchmarks/results/speed.md; matmul='cffi' selects it")
    shown = shown or next(iter(reasons.values()), "no sparse kernel")
    return None, f"{MASKED} ({shown})"
