"""Layer input statistics (H = XᵀX) and the linear algebra every method shares.

All of it works in float32/float64 whatever the model's dtype, on the weight's device.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nmopt._arrays import is_conv1d
from nmopt.api import find_mask


class InputStats:
    """What a layer's calibration inputs tell us: ``H = Σ xxᵀ``, ``Σ x``, the token count and,
    for adaprune only, a sample of the input rows."""

    def __init__(self, in_features: int, device, keep_rows: bool):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.xsum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.sources: list[int] = []  # serials of the products added: equal lists, equal H
        self.rows: list[torch.Tensor] | None = [] if keep_rows else None

    def sample(self) -> torch.Tensor | None:
        """The stored input rows as one float32 matrix (None unless rows were kept)."""
        if not self.rows:
            return None
        return torch.cat(self.rows, 0)


class StatsCollector:
    """Forward hooks that accumulate :class:`InputStats` for a set of linear layers.

    Layers fed the same tensor (q/k/v, gate/up) reuse one ``XᵀX`` product per call, and end up
    sharing one ``H`` object (see :meth:`finish`) so factorisations are computed once. Set
    ``token_mask`` (bool, one flag per token of the call, see ``capture.token_mask``) before a
    call to leave padding out: a layer whose input has one row per token keeps the flagged rows.
    ``input_masks`` ``[(tensor, mask)]`` overrides it for layers fed that very tensor (the
    encoder output a decoder's cross-attention reads; mask None: every row is real).
    """

    def __init__(self, layers: dict, *, keep_rows_per_token: float = 0.0, seed: int = 0):
        # each layer's statistics live on its weight's device (a model may span several)
        self.stats = {name: InputStats(_in_features(mod), mod.weight.device, keep_rows_per_token > 0)
                      for name, mod in layers.items()}
        self._fraction = keep_rows_per_token
        self._gen = torch.Generator(device="cpu").manual_seed(seed)
        self._last = None  # (input tensor, serial, xtx, xsum, rows used, sampled rows) of the latest call
        self.token_mask: torch.Tensor | None = None
        self.input_masks: list = []
        self._serial = 0
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in layers.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            x = inputs[0] if inputs else None
            if not torch.is_tensor(x):
                return
            if self._last is None or self._last[0] is not x:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                keep = next((mk for t, mk in self.input_masks if t is x), self.token_mask)
                if keep is not None and keep.numel() == x2.shape[0]:
                    x2 = x2[keep.to(x2.device)]
                xtx = (x2.T @ x2).double()
                xsum = x2.sum(0, dtype=torch.float64)
                rows = None
                if self._fraction > 0:
                    k = min(x2.shape[0], max(1, math.ceil(self._fraction * x2.shape[0])))
                    idx = torch.randperm(x2.shape[0], generator=self._gen)[:k].to(x2.device)
                    rows = x2[idx].clone()
                self._serial += 1
                self._last = (x, self._serial, xtx, xsum, x2.shape[0], rows)
            _, serial, xtx, xsum, used, rows = self._last
            st = self.stats[name]
            st.H += xtx.to(st.H.device)
            st.xsum += xsum.to(st.H.device)
            st.tokens += used
            st.sources.append(serial)
            if st.rows is not None and rows is not None:
                st.rows.append(rows)
        return hook

    def finish(self) -> dict:
        """Remove the hooks; layers with identical inputs now share one ``H`` tensor."""
        for h in self._handles:
            h.remove()
        self._handles, self._last = [], None
        seen: dict = {}
        for st in self.stats.values():
            key = tuple(st.sources)
            if key in seen:
                st.H = seen[key]
            elif key:
                seen[key] = st.H
        return self.stats


def _in_features(module) -> int:
    w = module.weight
    return w.shape[0] if is_conv1d(module) else w.shape[1]


def weight_matrix(module) -> torch.Tensor:
    """The (out, in) float32 copy of a Linear's (or Conv1D's) weight."""
    w = module.weight.detach()
    return (w.t() if is_conv1d(module) else w).float().clone()


def write_weight(module, w: torch.Tensor) -> None:
    """Write an (out, in) matrix back into the module, in its own layout and dtype. Entries the
    method left as :func:`weight_matrix` read them keep their exact original value (a float64
    weight is not rounded through float32)."""
    target = module.weight
    w = w.t() if is_conv1d(module) else w
    with torch.no_grad():
        old = target.detach()
        target.copy_(torch.where(w == old.to(w.dtype), old, w.to(target.dtype)))


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) I`` with dead inputs (zero diagonal) given a unit diagonal."""
    Hd = H.clone()
    diag = torch.diagonal(Hd)
    dead = diag == 0
    mean = diag.mean().item()
    diag.add_(damp * mean if mean > 0 else 1.0)
    diag[dead] = 1.0
    return Hd


class ErrorMeter:
    """Relative output errors ``‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖²`` of candidate weights, from ``H = XᵀX``.

    The products run in float32 (a relative error needs no more), the sums in float64; with a
    bias change ``dbias = b − b̂`` the error counts it too, through ``Σx`` and the token count.
    """

    def __init__(self, W: torch.Tensor, H: torch.Tensor, xsum=None, tokens: int = 0):
        self.W, self.H = W.float(), H.float()
        self.xsum, self.tokens = xsum, tokens
        self.den = float(((self.W @ self.H) * self.W).sum(dtype=torch.float64))

    def __call__(self, W_hat: torch.Tensor, dbias=None) -> float:
        dW = self.W - W_hat.float()
        num = ((dW @ self.H) * dW).sum(dtype=torch.float64)
        if dbias is not None:
            db = dbias.double()
            num = num + 2 * (db * (dW.double() @ self.xsum)).sum() + self.tokens * (db * db).sum()
        return float(num) / self.den if self.den > 0 else 0.0


def rel_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖²`` from ``H = XᵀX`` (see :class:`ErrorMeter`)."""
    return ErrorMeter(W, H)(W_hat)


def exact_result(scores: torch.Tensor, cfg, warm_start=None) -> tuple[torch.Tensor, Any]:
    """Exact N:M mask maximising ``scores`` through :func:`nmopt.find_mask` (started from
    ``warm_start``, a previous result, when given), on the scores' device, and the result."""
    res = find_mask(scores, cfg.pattern, transposable=cfg.transposable, solver=cfg.solver,
                    warm_start=warm_start)
    mask = res.mask if torch.is_tensor(res.mask) else torch.as_tensor(res.mask)
    return mask.to(device=scores.device, dtype=torch.bool), res


def exact_mask(scores: torch.Tensor, cfg) -> tuple[torch.Tensor, float]:
    """Exact N:M mask maximising ``scores``, and its certified gap."""
    mask, res = exact_result(scores, cfg)
    return mask, float(res.gap)


def cg_refit(Hn: torch.Tensor, G: torch.Tensor, X0: torch.Tensor, mask: torch.Tensor, iters: int,
             rtol: float = 1e-5) -> torch.Tensor:
    """Minimise ``tr((X − B) Hn (X − B)ᵀ)`` over X supported on ``mask`` (rows independent),
    where ``G = B Hn``: conjugate gradients on the masked normal equations ``(X Hn − G) ⊙ mask = 0``,
    one step length per row, started from ``X0 ⊙ mask``."""
    m = mask.to(X0.dtype)
    X = X0 * m
    R = (G - X @ Hn) * m
    P = R.clone()
    rs = (R * R).sum(1)
    stop = (rtol * G.norm(dim=1)) ** 2
    for _ in range(iters):
        if bool((rs <= stop).all()):
            break
        AP = (P @ Hn) * m
        denom = (P * AP).sum(1)
        alpha = torch.where(denom > 0, rs / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(rs))
        X += alpha[:, None] * P
        R -= alpha[:, None] * AP
        rs_new = (R * R).sum(1)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), torch.zeros_like(rs))
        P = R + beta[:, None] * P
        rs = rs_new
    return X * m
