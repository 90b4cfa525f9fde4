"""Array-type round trip: numpy and torch in, numpy float64 inside, the caller's type out."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np


def is_torch_tensor(x: Any) -> bool:
    """True if ``x`` is a torch tensor, without importing torch when it is not loaded."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


@dataclass(frozen=True)
class ArrayKind:
    """Where an input came from, so results can be returned the same way."""

    framework: str  # "numpy" or "torch"
    device: Any = None
    shape: tuple[int, ...] = ()

    def bool_array(self, mask: np.ndarray) -> Any:
        """Return a boolean mask as the caller's array type, on the caller's device."""
        mask = np.ascontiguousarray(mask, dtype=bool).reshape(self.shape)
        if self.framework == "torch":
            import torch

            return torch.from_numpy(mask).to(self.device)
        return mask


_NUMERIC_KINDS = "fiu"


def is_conv1d(module: Any) -> bool:
    """An HF ``Conv1D``-style linear (GPT-2): weight stored (in, out), ``y = x @ W + b``."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2 and hasattr(module, "nf")


def to_float64(x: Any, name: str) -> tuple[np.ndarray, ArrayKind]:
    """Convert a numpy array or torch tensor to a float64 numpy array, checking its dtype."""
    if is_torch_tensor(x):
        import torch

        if x.device.type == "meta":
            raise ValueError(f"{name}: tensor is on the meta device (it holds no values); "
                             "materialise it first (e.g. to_empty() and load the weights)")
        if x.layout != torch.strided:
            raise TypeError(f"{name}: {x.layout} tensors are not supported; pass a dense tensor "
                            "(x.to_dense())")
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name}: dtype {x.dtype} is not a real number type; pass float16, "
                            "bfloat16, float32, float64 or an integer type")
        kind = ArrayKind("torch", x.device, tuple(x.shape))
        arr = x.detach().to("cpu", torch.float64).numpy()
        return arr, kind
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"{name}: dtype {x.dtype} is not a real number type; pass float16, "
                            "float32, float64 or an integer array")
        return np.asarray(x, dtype=np.float64), ArrayKind("numpy", None, x.shape)
    if isinstance(x, (list, tuple)):
        try:
            arr = np.asarray(x)
        except ValueError as exc:
            raise TypeError(f"{name}: could not turn the nested list into an array ({exc})") from None
        return to_float64(arr, name)
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def as_bool_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a mask (numpy or torch, bool or 0/1) to a numpy bool array."""
    if is_torch_tensor(x):
        x = x.detach().cpu()
        if x.dtype.is_floating_point:
            x = x.double()  # bfloat16 and float8 have no numpy dtype; 0/1 are exact in float64
        x = x.numpy()
    arr = np.asarray(x)
    if arr.dtype != bool:
        if arr.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"{name}: expected a boolean or 0/1 array, got dtype {arr.dtype}")
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name}: a mask must hold only 0/1 (or True/False) values")
        arr = arr.astype(bool)
    return arr
