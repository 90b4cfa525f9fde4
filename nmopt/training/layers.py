"""Sparse layers: a Linear or convolution whose weight is used through an N:M mask.

A sparse layer holds the *same* ``weight`` and ``bias`` Parameter objects as the module it
replaces (so optimizers built before or after :func:`nmopt.sparsify_` keep working and
``state_dict`` keys do not change) plus a ``mask`` buffer (bool, saved in ``state_dict``). The
forward uses ``W * mask`` (a select: pruned weights count as 0 even if NaN or inf); the
backward-data GEMM uses the same mask (transposed); the weight gradient is dense
(straight-through), plus ``decay * (~mask) * W`` for SR-STE.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from nmopt.masks import check_mask
from nmopt.training.config import SparsityConfig
from nmopt.training.matmul import MASKED, MaskedWeight, SparseLinearFn, build_plan
from nmopt.training.sharded import is_dtensor


def check_tile_mask(mask2d, n: int, m: int, transposable: bool, name: str = "mask") -> None:
    """Raise ``RuntimeError`` unless every aligned M x M tile keeps <= N per row (and column).

    The check is :func:`nmopt.masks.check_mask` (the package's one tile-mask check, on the host);
    this wrapper names the layer and raises ``RuntimeError``, as a bad mask in a layer is a
    runtime failure rather than a bad argument.
    """
    try:
        check_mask(mask2d, (n, m), transposable)
    except ValueError as exc:
        kind = "transposable" if transposable else "row-wise"
        raise RuntimeError(f"{name}: not a valid {n}:{m} {kind} mask: {exc}") from None


# A sparse layer's attribute holding ``(key, MaskResult)`` of its last ``find_mask`` refresh,
# passed as ``warm_start`` to the next one with the same key (weights' shape, pattern,
# transposable, solver): the exact C kernel then re-solves from the previous mask and prices, to
# the same optimum (see ``refresh.compute_masks``). A cache: not in the state dict nor in pickles,
# dropped on any other route or key, kept only where the C kernel's exact solver ran.
WARM_START = "_nmopt_warm_start"


class _SparseLayer(nn.Module):
    """Shared state of sparse layers: mask buffer, config, refresh statistics, GEMM plan."""

    _is_conv = False

    def _setup(self, original: nn.Module, config: SparsityConfig, mask) -> None:
        # Kept unregistered: densify_ puts it back; registering it would duplicate state_dict keys.
        self.__dict__["_original"] = original
        self.weight = original.weight
        self.bias = original.bias
        self.config = config
        self.register_buffer("mask", mask.to(device=self.weight.device, dtype=torch.bool))
        self.refresh_count = 0
        self.refresh_seconds = 0.0
        self.refresh_total = 0.0
        self.mask_changed = 0.0
        self.solver_note = ""
        self.gap = None
        self._plan_key = None
        self._plan = None
        self._plan_mask = None  # the mask the plan was built for (CPU: compared each forward)
        self._plan_note = ""

    def __getstate__(self):
        """Pickled (``torch.save(model)``, ``copy.deepcopy``) without the refresh's warm-start
        result: a cache, rebuilt by the next refresh."""
        state = super().__getstate__()
        state.pop(WARM_START, None)
        return state

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self.mask.dtype != torch.bool:  # Module.type() converts every buffer, bool ones too
            self.mask = self.mask.ne(0)
        return out

    def weight_2d(self):
        """The (out, in*k...) view of the weight the mask is defined on."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def check_new_mask(self, mask, name: str = ""):
        """``mask`` as this layer's bool mask (its shape and device); ``RuntimeError`` naming the
        layer unless it is a valid mask of the configured pattern; ``TypeError`` unless it is a
        tensor of bools (or of 0s and 1s)."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise TypeError(f"mask: expected a bool tensor (or 0s and 1s), got {mask.dtype} "
                                "with other values")
            mask = mask != 0
        view = (self.mask.shape[0], self.mask[0].numel())
        if tuple(mask.shape) not in (tuple(self.mask.shape), view):
            raise ValueError(f"mask: expected the weight's shape {tuple(self.mask.shape)} or its "
                             f"(out, in*k) view {view}, got {tuple(mask.shape)}")
        mask = mask.to(device=self.mask.device).reshape(self.mask.shape)
        cfg = self.config
        label = f"sparse layer {name!r}: new mask" if name else \
            f"mask of {type(self).__name__}{tuple(self.weight.shape)}"
        check_tile_mask(mask.reshape(self.mask.shape[0], -1), cfg.n, cfg.m, cfg.transposable,
                        name=label)
        return mask

    def set_mask(self, mask, seconds: float = 0.0, note: str = "", gap=None, *,
                 checked: bool = False) -> None:
        """Install a new mask (same shape, checked valid unless ``checked``) and record the
        refresh statistics."""
        if checked:
            mask = mask.to(device=self.mask.device, dtype=torch.bool).reshape(self.mask.shape)
        else:
            mask = self.check_new_mask(mask)
        self.mask_changed = float((mask != self.mask).float().mean())
        with torch.no_grad():
            self.mask.copy_(mask)
        self.refresh_count += 1
        self.refresh_seconds = float(seconds)
        self.refresh_total += float(seconds)
        self.solver_note = note or self.solver_note
        self.gap = gap

    def check_mask(self) -> None:
        """``RuntimeError`` naming the layer unless its current mask is a valid mask of the
        configured pattern (a mask loaded from a state dict is checked here). Once per version
        of the mask: a forward and an export check it once between changes."""
        key = (id(self.mask), self.mask._version)
        if key == self.__dict__.get("_mask_checked"):
            return
        cfg = self.config
        check_tile_mask(self.mask.reshape(self.mask.shape[0], -1), cfg.n, cfg.m, cfg.transposable,
                        name=f"mask of {type(self).__name__}{tuple(self.weight.shape)}")
        self.__dict__["_mask_checked"] = key

    def _get_plan(self):
        w = self.weight_2d()
        key = (w.device, w.dtype, self.mask._version, id(self.mask))
        # a mask written around its version counter (.data, numpy) needs a new plan too
        stale = key == self._plan_key and self._plan is not None \
            and self.mask.device.type == "cpu" and not torch.equal(self._plan_mask, self.mask)
        if key != self._plan_key or stale:
            if stale:
                self.__dict__.pop("_mask_checked", None)  # the version did not change
            self.check_mask()
            mask2d = self.mask.reshape(w.shape)
            self._plan, self._plan_note = build_plan(self.config, w.detach(), mask2d, self._is_conv)
            self._plan_key = key
            cpu = self._plan is not None and self.mask.device.type == "cpu"
            self._plan_mask = self.mask.clone() if cpu else None
        return self._plan

    @property
    def matmul(self) -> str:
        """Which GEMMs run, for the weight's current device and dtype (and why)."""
        if is_dtensor(self.weight):  # sharded (FSDP2): the plan is built on the unsharded weight
            return self._plan_note or f"{MASKED} until the first forward (sharded weight)"
        self._get_plan()
        return self._plan_note

    @property
    def kernel(self) -> str:
        """Deprecated name of :attr:`matmul` (``DeprecationWarning``; removed next release)."""
        warnings.warn("the sparse layer's .kernel is deprecated and will be removed in the next "
                      "release; use .matmul", DeprecationWarning, stacklevel=2)
        return self.matmul

    def density(self) -> float:
        return float(self.mask.float().mean())

    def _masked_weight(self):
        return MaskedWeight.apply(self.weight, self.mask, self.config.sr_decay)

    def extra_repr(self) -> str:
        solver = self.solver_note or "not computed"
        return (f"{self._shape_repr()}, {self.config.describe()}, matmul={self.matmul}, "
                f"mask solver={solver}, density={self.density():.3f}")


def _autocast_dtype(x):
    """The dtype autocast casts ``x``'s device's GEMMs to, None outside autocast."""
    dev = x.device.type
    try:
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    except RuntimeError:  # a device type autocast does not know (meta)
        return None


class SparseLinear(_SparseLayer):
    """``nn.Linear`` with an N:M mask; see the module docstring."""

    def __init__(self, linear: nn.Linear, config: SparsityConfig, mask):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(linear, config, mask)

    def forward(self, x):
        plan = self._get_plan()
        # A sparse plan is built for the weight's dtype; other inputs and autocast to another
        # dtype run masked (F.linear casts as autocast says).
        if plan is None or x.dtype != self.weight.dtype or _autocast_dtype(x) not in (None, x.dtype):
            return nn.functional.linear(x, self._masked_weight(), self.bias)
        return SparseLinearFn.apply(x, self.weight, self.bias, self.mask,
                                    self.config.sr_decay, plan)

    def _shape_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class SparseConv(_SparseLayer):
    """A convolution (Conv1d/2d/3d) masked through its (out, in*k...) view, masked dense GEMMs."""

    _is_conv = True

    def __init__(self, conv: nn.modules.conv._ConvNd, config: SparsityConfig, mask):
        super().__init__()
        self._setup(conv, config, mask)

    def forward(self, x):
        self._get_plan()
        return self._original._conv_forward(x, self._masked_weight(), self.bias)

    def _shape_repr(self) -> str:
        o = self._original
        return (f"{type(o).__name__}({o.in_channels}, {o.out_channels}, "
                f"kernel_size={o.kernel_size}, stride={o.stride})")


def _read_through(name: str) -> property:
    """``layer.<name>`` is the replaced convolution's (read and set: its forward uses it)."""
    return property(lambda self: getattr(self._original, name),
                    lambda self, value: setattr(self._original, name, value))


#: The convolution's hyper-parameters, as on the conv (``layer.in_channels``, ``layer.stride``).
CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "padding_mode", "transposed", "output_padding")
for _name in CONV_ATTRS:
    setattr(SparseConv, _name, _read_through(_name))
