"""ALPS-style ADMM (Meng et al. 2024) with nmopt's exact transposable projection.

Problem, in the coordinates normalised by ``D = diag(H_d)^{-1/2}`` (``H_d`` the damped Hessian):
``min_B tr((B − B₀) Hn (B − B₀)ᵀ)`` s.t. ``B`` is supported on an N:M (transposable) mask, with
``Hn = D H_d D`` (unit diagonal) and ``B₀ = W D⁻¹``. Splitting ``B = Z`` with ``Z`` on the mask set:

* B-update: ``B = (B₀Hn − V + ρZ)(Hn + ρI)⁻¹``, through one eigendecomposition ``Hn = QΛQᵀ``
  reused for every ρ (``(Hn + ρI)⁻¹ = Q (Λ + ρ)⁻¹ Qᵀ``), shared by layers with the same input;
* Z-update: the Frobenius projection of ``B + V/ρ`` onto the mask set. For a fixed support the
  nearest point keeps the values, so the best support maximises the kept ``(B + V/ρ)²``: one
  exact call of :func:`nmopt.find_mask`, whose certified gap is recorded every time (warm-started
  from the previous one once the support has nearly settled: see ``_WARM_MAX_CHANGED``);
* dual update ``V += ρ(B − Z)``; ρ grows while the support still changes (the ALPS rule, checked
  every iteration) and the loop stops once the support has stopped changing and ``B ≈ Z``.

The final support is the exact projection of the last ``B``; the kept weights are then refitted
on it by conjugate gradients on the damped objective (the ALPS "backsolve").
"""

from __future__ import annotations

import torch

from nmopt.posttrain.hessian import cg_refit, damped, exact_mask, exact_result
from nmopt.posttrain.methods import MethodResult

# The support counts as settled when at most this fraction of the kept weights moved in an
# iteration (ALPS stops below 3e-4 after 30 iterations) and ||B - Z|| <= _PRIMAL_TOL ||Z||.
_SETTLED = 3e-4
_PRIMAL_TOL = 1e-2
# A projection is warm-started from the previous one only when each of the last two iterations
# moved at most this fraction of the kept weights (the first iteration moves few, the next ones
# many, while rho grows). The C kernel keeps a tile's previous mask where prices fitted to it
# prove it optimal, else solves from the previous prices (or cold, where a sample shows they
# are far off): on a 2048² matrix (M = 8-32) that took 0.20-0.65x the cold time when up to 3%
# of the entries changed, 0.81-1.0x at 7-8%, and 0.99-1.01x on unrelated weights.
_WARM_MAX_CHANGED = 0.1


def _factor(H: torch.Tensor, damp: float, dtype) -> tuple:
    """Normalised damped Hessian, its eigendecomposition and the scaling, in ``dtype``."""
    Hd = damped(H, damp)
    d = torch.diagonal(Hd).sqrt()
    Hn = Hd / d[:, None] / d[None, :]
    evals, evecs = torch.linalg.eigh(Hn)
    evals = evals.clamp_min(0)  # round-off can leave tiny negatives on a PSD matrix
    return Hn.to(dtype), evals.to(dtype), evecs.to(dtype), d.to(dtype)


def admm(W: torch.Tensor, stats, cfg, cache: dict | None = None) -> MethodResult:
    """Prune one layer by ADMM with exact projections, then refit the kept weights.

    ``cache`` maps ``id(H)`` to its factorisation so layers sharing an input (q/k/v, gate/up)
    decompose it once. Returns the new weights, the final mask, the gap of every projection and
    the number of ADMM iterations run.
    """
    H = stats.H
    key = id(H)
    if cache is not None and key in cache:
        Hn, evals, evecs, d = cache[key]
    else:
        Hn, evals, evecs, d = _factor(H, cfg.damp, W.dtype)
        if cache is not None:
            cache[key] = (Hn, evals, evecs, d)
    dead = torch.diagonal(H) == 0
    B0 = W * d[None, :]
    B0[:, dead] = 0  # weights of an always-zero input do not matter: drop them, as SparseGPT does
    G = B0 @ Hn
    gaps = []
    mask, gap = exact_mask(B0 * B0, cfg)
    gaps.append(gap)
    Z = B0 * mask
    V = torch.zeros_like(B0)
    rho = cfg.rho0
    kept = max(1, int(mask.sum()))
    growth = cfg.rho_growth
    iterations, res, changed, before = 0, None, 1.0, 1.0
    for _ in range(cfg.admm_iters):
        iterations += 1
        R = G - V + rho * Z
        B = ((R @ evecs) / (evals + rho)[None, :]) @ evecs.T
        T = B + V / rho
        calm = max(changed, before) <= _WARM_MAX_CHANGED
        new_mask, res = exact_result(T * T, cfg, res if calm else None)
        gaps.append(res.gap)
        Z = T * new_mask
        V += rho * (B - Z)
        before, changed = changed, int((new_mask != mask).sum()) / kept
        mask = new_mask
        if changed > 0.1:
            rho *= growth
        elif changed > 0.005:
            rho *= 1 + (growth - 1) * 2 / 3
        elif changed > 0:
            rho *= 1 + (growth - 1) / 3
        if changed <= _SETTLED and float((B - Z).norm()) <= _PRIMAL_TOL * float(Z.norm()):
            break
    # cold: B² is an easier problem than T² (cold 40-50 ms on 2048²), warm measured 1.1-1.4x
    final, gap = exact_mask(B * B, cfg)  # admm_iters >= 1, so B exists
    gaps.append(gap)
    Bk = B * final
    if cfg.cg_iters > 0:
        Bk = cg_refit(Hn, G, Bk, final, cfg.cg_iters)
    W_hat = Bk / d[None, :]
    return MethodResult(W_hat * final, final, gaps, iterations=iterations)
