"""The torch backend: greedy, exact, row-wise and mask kernels on CPU or CUDA tensors.

Two entry points share one set of kernels (:mod:`nmopt.backends._torch_ops`):

- the backend contract (numpy float64 tiles in, numpy masks out), so every solver that runs on
  "any backend" and the shared conformance suite cover it through
  ``find_mask(..., backend="torch")``;
- :func:`mask_tensor`, the device-resident path used by sparse training: a weight tensor in, a
  ``torch.bool`` mask out on the weight's device, with no host round trip.

torch is imported only inside the methods, so ``import nmopt`` does not import it.
"""

from __future__ import annotations

import numpy as np

from nmopt._arrays import is_torch_tensor
from nmopt._costs import integer_costs, to_scores
from nmopt._tiles import TileGrid
from nmopt.backends._base import Backend, register
from nmopt.certificates import prices_from_mask, tile_bounds
from nmopt.patterns import parse_pattern

#: Methods :func:`mask_tensor` accepts.
METHODS = ("exact", "greedy", "rowwise")


def mask_tensor(weight, pattern, *, transposable: bool = True, method: str = "exact",
                scores=None, saturate: bool = False):
    """N:M mask of a torch weight, computed on the weight's own device.

    Parameters
    ----------
    weight : torch.Tensor, 2-D (out, in) or 4-D conv (out, in, kh, kw)
        Any floating dtype, on CPU or CUDA. A conv weight is masked through its
        (out, in*kh*kw) view.
    pattern : "N:M" or (n, m)
        Keep at most N of every M along the reduction dimension.
    transposable : bool
        Every aligned M x M tile keeps at most N per row and per column (default), so W and W^T
        are both N:M. If False, row-wise N:M (``method`` is then ignored: top-N is exact).
    method : "exact", "greedy" or "rowwise"
        "exact": the optimal "at most N" mask (enumeration for M <= 4, successive shortest
        paths on integer costs otherwise; see :mod:`nmopt.backends._torch_ops`). "greedy":
        the 2-approximation, identical to the numpy greedy. "rowwise": as ``transposable=False``.
    scores : torch.Tensor like ``weight``, optional
        Non-negative saliency to maximise; default ``|weight|``.
    saturate : bool
        Exactly N per tile row and column (exact method only).

    Returns
    -------
    torch.Tensor
        ``torch.bool`` mask of ``weight``'s shape on ``weight``'s device. Shapes that are not
        multiples of M are padded with zero score and cropped, as in :func:`nmopt.find_mask`.
    """
    return mask_tensors([weight], pattern, transposable=transposable, method=method,
                        scores=None if scores is None else [scores], saturate=saturate)[0]


def _score_matrix(weight, scores, index: int):
    """Validated (rows, cols) float scores of one weight, on its device."""
    import torch

    where = f"[{index}]" if index else ""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight{where}: expected a torch.Tensor, got {type(weight).__name__}; "
                        "use nmopt.find_mask for numpy arrays")
    if weight.dim() not in (2, 4) or weight.numel() == 0:
        raise ValueError(f"weight{where}: expected a non-empty 2-D (out, in) or 4-D conv "
                         f"weight, got shape {tuple(weight.shape)}")
    if scores is None and (weight.is_complex() or weight.dtype == torch.bool):
        raise TypeError(f"weight{where}: dtype {weight.dtype} is not a real number type")
    if scores is not None and not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores{where}: expected a torch.Tensor like the weight, got "
                        f"{type(scores).__name__}")
    s = weight.detach().abs() if scores is None else scores.detach()
    if s.shape != weight.shape:
        raise ValueError(f"scores{where}: shape {tuple(s.shape)} does not match weight "
                         f"{tuple(weight.shape)}; pass one score per weight")
    if s.is_complex() or s.dtype == torch.bool:
        raise TypeError(f"scores{where}: dtype {s.dtype} is not a real number type")
    # float64 where the device has it: scores are ranked, and float16 ties would differ from
    # the float64 reference; MPS has no float64 and keeps float32.
    s = s.reshape(weight.shape[0], -1).to(
        torch.float32 if s.device.type == "mps" else torch.float64)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"scores{where}: must be finite and >= 0 (default |weight|); clean "
                         "NaN/inf weights or pass valid scores=")
    return s


def mask_tensors(weights, pattern, *, transposable: bool = True, method: str = "exact",
                 scores=None, saturate: bool = False) -> list:
    """:func:`mask_tensor` for several weights at once: the tiles of all weights on the same
    device go through one kernel call, so per-call overhead is paid once (a model refresh)."""
    import torch

    from nmopt.backends import _torch_ops as k  # imports torch

    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    p = parse_pattern(pattern)
    weights = list(weights)
    scores = [None] * len(weights) if scores is None else list(scores)
    mats = [_score_matrix(w, s, i) for i, (w, s) in enumerate(zip(weights, scores))]
    grids = [TileGrid(s.shape[0], s.shape[1], p.m) for s in mats]
    out: list = [None] * len(weights)
    for dev in {s.device for s in mats}:
        idx = [i for i, s in enumerate(mats) if s.device == dev]
        tiles = torch.cat([grids[i].to_tiles(mats[i]) for i in idx])
        if p.dense:
            mask_t = torch.ones(tiles.shape, dtype=torch.bool, device=dev)
        elif not transposable or method == "rowwise":
            mask_t = k.rowwise_tiles(tiles, p.n)
        elif method == "greedy":
            mask_t = k.greedy_tiles(tiles, p.n)
        elif saturate:  # exactly N in full tiles; edge tiles (cut by the border) at most N
            full = torch.from_numpy(np.concatenate([grids[i].full_tiles() for i in idx])).to(dev)
            mask_t = torch.zeros(tiles.shape, dtype=torch.bool, device=dev)
            for part, exactly in ((full, True), (~full, False)):
                if bool(part.any()):
                    mask_t[part] = k.exact_tiles(tiles[part].contiguous(), p.n, exactly)[0]
        else:
            mask_t = k.exact_tiles(tiles, p.n, False)[0]
        parts = mask_t.split([grids[i].num_tiles for i in idx])
        for i, part in zip(idx, parts):
            out[i] = grids[i].from_tiles(part).reshape(weights[i].shape)
    return out


@register
class TorchBackend(Backend):
    """PyTorch kernels on the tensor's device (CPU or CUDA), batched over tiles.

    The numpy-tile kernels below run on CPU tensors (the contract's tiles are numpy); set
    :attr:`device` to run them on a GPU and copy the result back.
    """

    name = "torch"
    requires = ("torch",)
    extra = "torch"
    frameworks = ("torch",)

    def __init__(self, device: str | None = None):
        self.device = device

    def _tiles(self, tiles: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float64)).to(
            self.device or "cpu")

    def greedy(self, tiles: np.ndarray, n: int) -> np.ndarray:
        from nmopt.backends._torch_ops import greedy_tiles  # imports torch

        return greedy_tiles(self._tiles(tiles), n).cpu().numpy()

    def rowwise(self, tiles: np.ndarray, n: int) -> np.ndarray:
        from nmopt.backends._torch_ops import rowwise_tiles  # imports torch

        return rowwise_tiles(self._tiles(tiles), n).cpu().numpy()

    def exact(self, tiles: np.ndarray, n: int, saturate: bool = False):
        """Exact transposable masks with optimal prices: ``(mask, u, v, status)``.

        The mask is optimal for the per-tile integer costs of :mod:`nmopt._costs`; the
        prices are recomputed from it on those costs (Bellman-Ford, as the OR-Tools flow solver
        does) and scaled back (``to_scores``), so the certificate is independent of the kernel.
        ``status`` per tile: 0 when the integer bound equals the integer kept score (verified
        optimal), 2 otherwise (never expected; the prices still give a valid bound).
        """
        from nmopt.backends._torch_ops import exact_tiles  # imports torch

        t, m, _ = tiles.shape
        if t == 0:
            return (np.zeros(tiles.shape, dtype=bool), np.zeros((t, m)), np.zeros((t, m)),
                    np.zeros(t, dtype=np.int8))
        mask = exact_tiles(self._tiles(tiles), n, bool(saturate))[0].cpu().numpy()
        costs, tile_max = integer_costs(np.asarray(tiles, dtype=np.float64))
        costs = costs.astype(np.float64)
        u, v = prices_from_mask(costs, mask, n, bool(saturate))
        kept = np.where(mask, costs, 0.0).sum(axis=(1, 2))
        verified = tile_bounds(costs, n, u, v) <= kept * (1 + 1e-12) + 0.5
        status = np.where(verified, 0, 2).astype(np.int8)
        return mask, to_scores(u, tile_max), to_scores(v, tile_max), status

    def apply_mask(self, weights, mask):
        """``weights * mask`` for tensors (on the weights' device) or numpy arrays."""

        if is_torch_tensor(weights):
            import torch

            m = mask if is_torch_tensor(mask) else torch.from_numpy(np.asarray(mask, dtype=bool))
            return weights * m.to(device=weights.device, dtype=torch.bool)
        return np.asarray(weights) * np.asarray(mask, dtype=bool)

    def mask_tensor(self, weight, pattern, **kwargs):
        """See :func:`mask_tensor` (the device-resident path used by sparse training)."""
        return mask_tensor(weight, pattern, **kwargs)
