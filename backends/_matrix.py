"""Matrices the C kernels read where they lie (numpy float arrays and CPU tensors of float64,
float32, float16 or bfloat16, any strides): their description for ``nm_exact_matrix``,
``nm_greedy_matrix`` and ``nm_certify``, and the error those report for bad values."""

from __future__ import annotations

import sys

import numpy as np


class BadScores(ValueError):
    """A matrix read in place holds a NaN, infinite or (for scores) negative value."""


#: Element types the C kernels read in place (nmopt_kernels.h: NM_F64, NM_F32, NM_F16, NM_BF16).
_DTYPE_CODES = {"float64": 0, "float32": 1, "float16": 2, "bfloat16": 3}


def matrix_arg(x):
    """``(pointer, dtype code, row stride, col stride, owner)`` of a 2-D numpy float array or
    CPU tensor, read in place (strides in elements), or None when the C kernels cannot read it."""
    if isinstance(x, np.ndarray):
        code = _DTYPE_CODES.get(x.dtype.name) if x.dtype.isnative else None  # C reads native order
        if code is None or x.ndim != 2 or not x.flags.aligned \
                or any(st % x.itemsize for st in x.strides):
            return None
        return x.ctypes.data, code, x.strides[0] // x.itemsize, x.strides[1] // x.itemsize, x
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor) or x.ndim != 2:
        return None
    code = _DTYPE_CODES.get(str(x.dtype).removeprefix("torch."))
    if code is None or x.device.type != "cpu" or x.layout != torch.strided:
        return None
    x = x.detach().resolve_neg().resolve_conj()
    return x.data_ptr(), code, x.stride(0), x.stride(1), x
