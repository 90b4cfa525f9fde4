"""The sparse-training configuration: one dataclass, validated when it is built."""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

from nmopt import solvers
from nmopt.patterns import Pattern, parse_pattern

UPDATES = ("ste", "sr-ste")
MATMULS = ("auto", "masked", "cffi", "semi-structured")
SYNCS = ("broadcast", "check", "none")


@dataclass
class SparsityConfig:
    """How :func:`nmopt.sparsify_` sparsifies and trains a model.

    Parameters
    ----------
    pattern : "N:M" or (n, m)
        Keep at most N of every M weights along the reduction dimension (NVIDIA convention:
        N counts the *kept* weights; 2:4 and 4:8 keep half).
    transposable : bool
        Every aligned M x M tile keeps at most N per row and per column, so both W (forward) and
        W^T (backward-data) are N:M and both GEMMs can run sparse. False: ordinary row-wise N:M
        (only the forward GEMM is N:M).
    solver : "auto", a registered solver name, or a callable
        What computes the masks at every refresh. "auto": the exact optimum, on the weight's
        device for CUDA weights (torch kernel, no host round trip) and through
        :func:`nmopt.find_mask` (fastest exact solver installed, else the torch kernel) for
        CPU weights. "greedy" runs
        on the device too. Any other solver runs through :func:`nmopt.find_mask` on the host.
    refresh_every : int
        Recompute the masks every K optimizer steps (0: masks stay as computed by
        ``sparsify_``). Steps are counted by an optimizer hook (``sparsify_(..., optimizer=)``)
        or by calling :func:`nmopt.training.step` after each ``optimizer.step()``.
    update : "ste" or "sr-ste"
        Weight gradient: straight-through (the dense gradient of the masked weight reaches every
        weight) or SR-STE, which adds ``decay * (~mask) * W`` so pruned weights shrink.
    decay : float
        The SR-STE coefficient lambda_W; ignored for "ste". The default 2e-4 is the SR-STE
        paper's, tuned for SGD. It is added to the gradient, so Adam-type optimizers normalise
        it away at that size: with AdamW, 0.02 to 0.3 worked best in ``nmopt bench train``
        (4:8 validation loss +5.4% from dense against +8.2% with 2e-4, d=128, 600 steps; see
        ``benchmarks/README.md``). Like the SR-STE reference code it is added on every backward
        pass: K accumulated micro-batches apply it K times, and under a ``GradScaler`` it is
        divided by the loss scale (scale ``decay`` to match).
    matmul : "auto", "masked", "cffi" or "semi-structured"
        Which GEMM implementation the sparse layers use. "auto": semi-structured sparse tensors on CUDA for transposable
        2:4 in float16/bfloat16, masked dense GEMMs otherwise (each layer's ``repr`` says which
        runs and why). "cffi": the C backend's compressed sparse matmul for float32 on CPU
        (forward and backward-data); it is opt-in because re-gathering the changing weights into
        the packed layout every step made a layer step slower than masked dense on 2 cores.
    sync : "broadcast", "check" or "none"
        Under ``torch.distributed``: "broadcast" computes each layer's mask on one rank (layers
        dealt round-robin) and broadcasts it, "check" computes everywhere and raises if ranks
        disagree, "none" trusts that every rank computes the same.
    Fields may be set after construction; each new value is validated with the others
    (``ValueError`` / ``TypeError``, the old value kept; change ``solver`` and ``transposable``
    together with ``dataclasses.replace``). ``pattern`` and ``transposable`` are fixed while a
    sparsified model uses the config.

    kernel : deprecated
        The old name of ``matmul``: ``SparsityConfig(kernel=...)`` and ``cfg.kernel`` still work
        with a ``DeprecationWarning`` and will be removed in the next release.
    """

    pattern: Any = "2:4"
    transposable: bool = True
    solver: Any = "auto"
    refresh_every: int = 100
    update: str = "ste"
    decay: float = 2e-4
    matmul: str = "auto"
    sync: str = "broadcast"
    _pattern: Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._pattern = parse_pattern(self.pattern)
        if self._pattern.dense:
            raise ValueError(f"pattern: {self._pattern} keeps every weight (N = M); nothing to "
                             "sparsify, pick N < M such as '2:4' or '4:8'")
        if not isinstance(self.transposable, bool):
            raise TypeError(f"transposable: expected True or False, got {self.transposable!r}")
        if not (isinstance(self.solver, str) or callable(self.solver)):
            raise TypeError(f"solver: expected 'auto', a solver name or a callable, got "
                            f"{self.solver!r}")
        solvers.check_kind(self.solver, self.transposable)
        if isinstance(self.refresh_every, bool) \
                or not isinstance(self.refresh_every, numbers.Integral) or self.refresh_every < 0:
            raise ValueError(f"refresh_every: expected an integer >= 0 (0 = never refresh), got "
                             f"{self.refresh_every!r}")
        self.refresh_every = int(self.refresh_every)
        if self.update not in UPDATES:
            raise ValueError(f"update: expected one of {UPDATES}, got {self.update!r}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, numbers.Real) \
                or not 0 <= self.decay < math.inf:
            raise ValueError(f"decay: expected a finite number >= 0 (SR-STE lambda_W), got "
                             f"{self.decay!r}")
        self.decay = float(self.decay)
        for name, value, options in (("matmul", self.matmul, MATMULS), ("sync", self.sync, SYNCS)):
            if value not in options:
                raise ValueError(f"{name}: expected one of {options}, got {value!r}")
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """A field set after construction is validated like one given to it (the whole config
        is checked again; a bad value is refused and the old one kept)."""
        if name.startswith("_") or name not in self.__dataclass_fields__ \
                or not self.__dict__.get("_checked"):  # kernel: a property (deprecated name)
            object.__setattr__(self, name, value)
            return
        if name in ("pattern", "transposable") and self.__dict__.get("_users"):
            raise ValueError(f"{name}: this config is in use by a sparsified model, whose masks and "
                             "layer choice follow it; nmopt.densify_ the model and sparsify_ it "
                             f"again with dataclasses.replace(config, {name}=...)")
        old = self.__dict__[name]
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_checked", False)  # __post_init__'s own assignments go through
        try:
            self.__post_init__()
        except Exception:
            object.__setattr__(self, name, old)
            self.__post_init__()
            raise

    @property
    def kernel(self) -> str:
        """Deprecated name of :attr:`matmul` (``DeprecationWarning``; removed next release)."""
        _warn_kernel(stacklevel=2)
        return self.matmul

    @kernel.setter
    def kernel(self, value: str) -> None:
        _warn_kernel(stacklevel=2)
        self.matmul = value

    @property
    def n(self) -> int:
        return self._pattern.n

    @property
    def m(self) -> int:
        return self._pattern.m

    @property
    def pattern_str(self) -> str:
        return str(self._pattern)

    @property
    def sr_decay(self) -> float:
        """The decay actually applied to pruned weights' gradients (0 for plain STE)."""
        return float(self.decay) if self.update == "sr-ste" else 0.0

    def describe(self) -> str:
        kind = "transposable" if self.transposable else "row-wise"
        upd = f"sr-ste(decay={self.decay:g})" if self.update == "sr-ste" else "ste"
        return f"{self.pattern_str} {kind}, update={upd}, refresh_every={self.refresh_every}"


def _warn_kernel(stacklevel: int) -> None:
    """Warn about the deprecated name ``kernel``; ``stacklevel`` counts from this one's caller."""
    warnings.warn("SparsityConfig.kernel is deprecated and will be removed in the next release; "
                  "use SparsityConfig.matmul (same values)", DeprecationWarning,
                  stacklevel=stacklevel + 1)


_dataclass_init = SparsityConfig.__init__


# The dataclass __init__, also accepting kernel=, the deprecated name of matmul. It is not a field,
# so repr, == and dataclasses.replace see matmul only; the signature shown is the dataclass's.
@functools.wraps(_dataclass_init)
def _init(self, *args, kernel: str | None = None, **kwargs) -> None:
    if kernel is not None:
        _warn_kernel(stacklevel=2)  # the caller of SparsityConfig(...)
        matmul = args[6] if len(args) > 6 else kwargs.get("matmul", kernel)
        if matmul != kernel:
            raise TypeError(f"matmul={matmul!r} and kernel={kernel!r}: pass only matmul (kernel "
                            "is its deprecated name)")
        if len(args) <= 6:
            kwargs["matmul"] = kernel
    _dataclass_init(self, *args, **kwargs)


SparsityConfig.__init__ = _init
