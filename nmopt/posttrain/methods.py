"""The one-pass methods: magnitude, Wanda and SparseGPT, each with an exact mask step.

Every method takes the (out, in) float32 weight ``W``, the layer's :class:`InputStats` and the
:class:`PruneConfig`, and returns a :class:`MethodResult`; ``W`` is never modified in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nmopt.posttrain.hessian import damped, exact_mask


@dataclass
class MethodResult:
    """A pruned layer: new weights (zero off ``mask``), the mask, each mask step's gap."""

    weight: torch.Tensor
    mask: torch.Tensor
    gaps: list = field(default_factory=list)
    iterations: int = 0
    bias: torch.Tensor | None = None  # a new bias, for methods that change it (adaprune)


def magnitude(W: torch.Tensor, stats, cfg, cache=None) -> MethodResult:
    """The exact mask of largest kept ``|W|`` (what ``find_mask`` does by default); no update."""
    mask, gap = exact_mask(W.abs(), cfg)
    return MethodResult(W * mask, mask, [gap])


def wanda_scores(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Wanda's saliency ``|W_ij| · ‖X_j‖₂`` with ``‖X_j‖₂² = H_jj`` (Sun et al. 2023)."""
    norms = torch.diagonal(H).clamp_min(0).sqrt().to(W.dtype)
    return W.abs() * norms[None, :]


def wanda(W: torch.Tensor, stats, cfg, cache=None) -> MethodResult:
    """The exact mask of largest kept Wanda score; kept weights unchanged."""
    mask, gap = exact_mask(wanda_scores(W, stats.H), cfg)
    return MethodResult(W * mask, mask, [gap])


def inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` (float64), as SparseGPT uses it.

    Raises ``ValueError`` if the damped Hessian is not positive definite (``damp`` too small).
    """
    Hd = damped(H, damp)
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        raise ValueError(f"damp: the Hessian plus damp={damp} * mean(diag) is not positive definite; "
                         "raise damp (0.01 is SparseGPT's)")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def sparsegpt(W: torch.Tensor, stats, cfg, cache=None) -> MethodResult:
    """SparseGPT (Frantar & Alistarh 2023) with an exact mask for every group of M columns.

    The optimal-brain-surgeon sweep goes through the columns left to right; each pruned weight's
    error is spread over the columns not yet visited through the upper Cholesky factor ``U`` of
    the damped ``H⁻¹`` (lazily, one ``blocksize`` batch of columns at a time). When the sweep
    reaches a group of M columns it chooses the mask of the whole (rows x M) slab at once from
    the scores ``w² / U_jj²`` (the OBS saliency of removing ``w``): for transposable patterns the
    slab's M x M tiles are aligned tiles of W, so one :func:`nmopt.find_mask` call on the slab
    gives the exact transposable mask of those tiles; row-wise, each row keeps its top N.
    """
    p = cfg.parsed_pattern
    n, m = p.n, p.m
    W = W.clone()
    H = stats.H
    dead = torch.diagonal(H) == 0
    W[:, dead] = 0  # an input that is always 0 carries no information: its weights go (as SparseGPT)
    U = inverse_cholesky(H, cfg.damp).to(W.dtype)
    rows, cols = W.shape
    bs = max(m, (cfg.blocksize // m) * m)  # a batch holds whole groups of M columns
    keep = torch.zeros_like(W, dtype=torch.bool)
    gaps = []
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        for i in range(i2 - i1):
            if i % m == 0:
                j = min(i + m, i2 - i1)
                scores = W1[:, i:j] ** 2 / d1[i:j][None, :] ** 2
                if cfg.transposable:
                    slab, gap = exact_mask(scores, cfg)
                else:  # per-row top N of M is the exact row-wise mask: nothing to certify
                    slab = torch.zeros_like(scores, dtype=torch.bool)
                    slab.scatter_(1, scores.topk(min(n, j - i), dim=1).indices, True)
                    gap = 0.0
                keep[:, i1 + i:i1 + j] = slab
                gaps.append(gap)
            w = W1[:, i]
            q = w * keep[:, i1 + i]
            Q1[:, i] = q
            err = (w - q) / d1[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return MethodResult(W * keep, keep, gaps)
