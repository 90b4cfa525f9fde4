"""The post-training pruning configuration: one dataclass, validated when it is built."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from nmopt import solvers
from nmopt.patterns import Pattern, parse_pattern

METHODS = ("magnitude", "wanda", "sparsegpt", "admm", "adaprune")


@dataclass
class PruneConfig:
    """How :func:`nmopt.prune_model` prunes a pretrained model.

    Parameters
    ----------
    pattern : "N:M" or (n, m)
        Keep at most N of every M weights along the reduction dimension (NVIDIA convention).
    transposable : bool
        True (default): every aligned M x M tile keeps at most N per row *and* per column, so W
        and W^T are both N:M. False: ordinary row-wise N:M.
    method : str
        ``"magnitude"`` (exact mask on \\|W\\|, no calibration needed for the mask, no update),
        ``"wanda"`` (exact mask on \\|W_ij\\|·‖X_j‖₂, no update), ``"sparsegpt"`` (OBS column sweep,
        each group of M columns masked exactly for all rows at once), ``"admm"`` (ALPS-style
        splitting with the exact projection, then a conjugate-gradient refit; the default and the
        most accurate) or ``"adaprune"`` (magnitude mask, mean absorption, Adam on the layer's
        output error; Hubara et al. 2021).
    damp : float
        Relative dampening of the Hessian ``H = XᵀX``: ``damp * mean(diag H)`` is added to its
        diagonal for every solve (sparsegpt, admm, the refit). 0.01 as in SparseGPT and ALPS.
    blocksize : int
        sparsegpt: columns per lazy batch update (128 as in SparseGPT); rounded down to a
        multiple of M so that every group of M columns lies inside one batch.
    admm_iters : int
        admm: most ADMM iterations per layer (each is one exact projection). ALPS allows 300; the
        stopping rule (support settled, ``B ≈ Z``) ends most SmolLM2-135M layers after about 11
        iterations with the default ρ schedule, so 60 is a safety cap.
    rho0 : float
        admm: initial penalty ρ on the normalised Hessian (unit diagonal), 0.1 as in ALPS.
    rho_growth : float
        admm: ρ is multiplied by this when more than 10% of the kept weights changed in an
        iteration, by 1 + 2/3 and 1 + 1/3 of the excess for smaller changes (ALPS: 1.3, 1.2, 1.1,
        checked every 3 iterations; here checked every iteration, which settles the support in
        fewer projections).
    cg_iters : int
        admm: conjugate-gradient iterations of the final refit of the kept weights (0: none;
        10 as in ALPS: the ADMM iterate is already close to the refit optimum).
    adaprune_steps, adaprune_lr, adaprune_bias_lr, adaprune_batch : int, float, float, int
        adaprune: Adam steps per layer, learning rates of the weights and the bias, tokens per
        step. The learning rates (1e-3, 1e-2) are those of the original AdaPrune code
        (Hubara et al., ``adaprune``: ``lr_w = 1e-3``, ``lr_b = 1e-2``, 1000 iterations of
        batches of 50 images); for a language model a batch is tokens, not images, so the
        default is 128 steps of 256 tokens (see :mod:`nmopt.posttrain.adaprune` for the cost).
    adaprune_tokens : int
        adaprune: most input rows (tokens) stored per layer for its Adam steps, sampled evenly
        from every calibration batch.
    include, exclude : str or sequence of str, optional
        Regular expressions (``re.search`` on the full module name, so a plain name works) that
        select which Linear layers inside the blocks are pruned: a layer is pruned when it matches
        one of ``include`` (default: every layer) and none of ``exclude``.
    include_lm_head : bool
        Also prune the model's output projection (``get_output_embeddings()``), fed by one more
        pass of the pruned model. Refused when it shares its weight with the input embedding.
    solver : str or callable
        The mask solver passed to :func:`nmopt.find_mask` (``"auto"``: the fastest exact one).
    seed : int
        Seeds the adaprune batches and the token sampling, for reproducible runs.

    Notes
    -----
    Measured with the defaults on SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32; 210
    layers), calibration 32 x 256 tokens from the start of CPython's ``pydoc_data/topics.py``,
    perplexity on 32 x 256 tokens from its last 40 % (dense 13.5), transposable 4:8, one CPU
    thread on a shared 2-core machine: wanda 421 (143 s), adaprune 32.1 (566 s), sparsegpt 26.3
    (256 s), admm 19.8 (454 s).
    """

    pattern: str = "4:8"
    transposable: bool = True
    method: str = "admm"
    damp: float = 0.01
    blocksize: int = 128
    admm_iters: int = 60
    rho0: float = 0.1
    rho_growth: float = 1.3
    cg_iters: int = 10
    adaprune_steps: int = 128
    adaprune_lr: float = 1e-3
    adaprune_bias_lr: float = 1e-2
    adaprune_batch: int = 256
    adaprune_tokens: int = 4096
    include: Any = None
    exclude: Any = None
    include_lm_head: bool = False
    solver: Any = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        self._pattern = _check_pattern(self.pattern)
        if isinstance(self.pattern, (tuple, list, Pattern)):
            self.pattern = str(self._pattern)
        for name in ("transposable", "include_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        _nonneg_float(self, "damp", allow_zero=True)
        for name in ("rho0", "adaprune_lr", "adaprune_bias_lr"):
            _nonneg_float(self, name, allow_zero=False)
        _nonneg_float(self, "rho_growth", allow_zero=False)
        if self.rho_growth < 1:
            raise ValueError(f"rho_growth: must be >= 1 (rho grows), got {self.rho_growth!r}")
        for name, low in (("blocksize", 1), ("admm_iters", 1), ("cg_iters", 0), ("adaprune_steps", 0),
                          ("adaprune_batch", 1), ("adaprune_tokens", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.seed >= 2**63:
            raise ValueError(f"seed: expected an integer below 2**63, got {self.seed!r}")
        if self.damp > 1e3:
            raise ValueError(f"damp: {self.damp!r} is too large; it is a fraction of the Hessian's "
                             "mean diagonal (typically 0.01), at most 1000")
        self.include = _check_regexes("include", self.include)
        self.exclude = _check_regexes("exclude", self.exclude)
        if not (isinstance(self.solver, str) or callable(self.solver)):
            raise TypeError(f"solver: expected a solver name such as 'auto', got {self.solver!r}")
        solvers.check_kind(self.solver, self.transposable)

    @property
    def parsed_pattern(self) -> Pattern:
        """The validated :class:`nmopt.Pattern`."""
        return self._pattern

    def selects(self, name: str) -> bool:
        """True if the layer called ``name`` passes ``include`` and ``exclude``."""
        if self.include is not None and not any(re.search(p, name) for p in self.include):
            return False
        return not (self.exclude is not None and any(re.search(p, name) for p in self.exclude))

    def to_dict(self) -> dict:
        """The settings as plain JSON-ready values (a callable solver becomes its name)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if not isinstance(out["solver"], str):
            out["solver"] = getattr(out["solver"], "__name__", repr(out["solver"]))
        for name in ("include", "exclude"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out


def _check_pattern(pattern) -> Pattern:
    try:
        return parse_pattern(pattern)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        raise type(exc)(msg if msg.startswith("pattern") else f"pattern: {msg}") from None


def _nonneg_float(cfg, name: str, *, allow_zero: bool) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        raise ValueError(f"{name}: expected a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    setattr(cfg, name, float(value))


def _check_regexes(name: str, value) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(p, str) for p in items):
        raise TypeError(f"{name}: expected a regular expression or a list of them, got {value!r}")
    for p in items:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"{name}: {p!r} is not a valid regular expression ({exc})") from None
    return tuple(items)
