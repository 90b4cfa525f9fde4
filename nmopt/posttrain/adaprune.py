"""AdaPrune (Hubara et al. 2021), with exact masks.

Reproduced from "Accelerated Sparse Neural Training: A Provable and Efficient Method to Find N:M
Transposable Masks" (NeurIPS 2021), whose post-training experiments use AdaPrune from
"Accurate Post Training Quantization With Small Calibration Sets" (ICML 2021), and from the
authors' code (``adaprune`` / ``absorb_mean_to_nz``):

1. the mask is fixed once from magnitudes (here the exact transposable or row-wise N:M mask of
   ``|W|`` from :func:`nmopt.find_mask`, where the paper used its own 2-approximation for
   transposable masks);
2. mean absorption: in every group of M consecutive weights of a row, the sum of the pruned
   weights is spread evenly over the kept ones, so the group's output is unchanged for an input
   constant over the group;
3. Adam on the layer's output mean squared error ``‖X Wᵀ + b − (X Ŵᵀ + b̂)‖²`` against the dense
   layer's output on the same inputs, minibatches of input rows, the mask re-applied after every
   step. Learning rates 1e-3 for the weights and 1e-2 for the bias are the authors' (their
   ``lr_w``, ``lr_b``); they ran 1000 iterations of 50 images per layer of a CNN. A language
   model's layer sees tokens, so a batch here is ``adaprune_batch`` tokens (256) for
   ``adaprune_steps`` steps (128). Measured on block 10 of SmolLM2-135M (transposable 4:8, 7
   layers, one CPU thread): summed relative error 0.886 after mean absorption, 0.225 after
   128 x 256 (15 s), 0.176 after 256 x 512 (52 s), 0.152 after 1000 x 512 (199 s); the default
   keeps the whole model within minutes.

The inputs are the rows stored by the block pass (``adaprune_tokens`` per layer, sampled evenly
from every calibration batch); gradients are computed locally, the rest of the run stays under
``torch.no_grad``.
"""

from __future__ import annotations

import torch

from nmopt.posttrain.hessian import exact_mask
from nmopt.posttrain.methods import MethodResult


def absorb_mean(W: torch.Tensor, mask: torch.Tensor, m: int) -> torch.Tensor:
    """Spread each row-group of M's pruned sum over its kept weights (``absorb_mean_to_nz``).

    A group that keeps nothing keeps nothing (its sum is lost, as it would be in the paper's code
    where the division is by zero; here it is simply not absorbed).
    """
    rows, cols = W.shape
    pad = (-cols) % m
    Wp = torch.nn.functional.pad(W, (0, pad)).reshape(rows, -1, m)
    Mp = torch.nn.functional.pad(mask.to(W.dtype), (0, pad)).reshape(rows, -1, m)
    pruned_sum = (Wp * (1 - Mp)).sum(2, keepdim=True)
    count = Mp.sum(2, keepdim=True)
    shift = torch.where(count > 0, pruned_sum / count.clamp_min(1), torch.zeros_like(pruned_sum))
    out = (Wp + shift) * Mp
    return out.reshape(rows, -1)[:, :cols]


def adaprune(W: torch.Tensor, stats, cfg, cache=None, bias: torch.Tensor | None = None) -> MethodResult:
    """Magnitude mask, mean absorption, then Adam on the output error with the mask kept fixed."""
    m = cfg.parsed_pattern.m
    mask, gap = exact_mask(W.abs(), cfg)
    W_hat = absorb_mean(W, mask, m)
    X = stats.sample()
    if X is None or cfg.adaprune_steps == 0:
        return MethodResult(W_hat, mask, [gap])
    X = X.to(W.device, W.dtype)
    maskf = mask.to(W.dtype)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    with torch.enable_grad():
        w = W_hat.clone().requires_grad_(True)
        groups = [{"params": [w], "lr": cfg.adaprune_lr}]
        b = None
        if bias is not None:
            b = bias.detach().float().clone().requires_grad_(True)
            groups.append({"params": [b], "lr": cfg.adaprune_bias_lr})
        opt = torch.optim.Adam(groups)
        batch = min(cfg.adaprune_batch, X.shape[0])
        for _ in range(cfg.adaprune_steps):
            idx = torch.randperm(X.shape[0], generator=gen)[:batch].to(X.device)
            xb = X[idx]
            with torch.no_grad():
                target = xb @ W.T  # the dense layer's output (its bias cancels against b's start)
            out = xb @ w.T
            if b is not None:
                out = out + (b - bias.detach().float())
            loss = torch.nn.functional.mse_loss(out, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                w.mul_(maskf)
    new_bias = None if b is None else b.detach()
    return MethodResult(w.detach() * maskf, mask, [gap], iterations=cfg.adaprune_steps, bias=new_bias)
