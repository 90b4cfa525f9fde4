"""The compressed N:M format itself (:class:`PackedNM`) and the argument checks every backend's
pack kernels run; the public functions that pick a backend are in :mod:`nmopt.packed`."""


from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nmopt.patterns import Pattern

#: Weight dtypes the packed format stores (values are copied bit for bit).
PACK_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True, eq=False)
class PackedNM:
    """A weight matrix in compressed N:M form (see the module docstring for the layout).

    Attributes
    ----------
    values : ndarray (R, C // m * n), float16/float32/float64
    indices : ndarray (R, C // m * n), uint8, each < m; a read-only view of the array given
    n, m : int
    shape : (R, C), the dense shape
    """

    values: np.ndarray
    indices: np.ndarray
    n: int
    m: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        p = Pattern(self.n, self.m)
        if len(self.shape) != 2 or any(isinstance(s, (bool, np.bool_))
                                       or not isinstance(s, (int, np.integer)) or s < 0
                                       for s in self.shape):
            raise ValueError(f"shape: expected (rows, cols) as integers >= 0, got {self.shape!r}")
        rows, cols = (int(s) for s in self.shape)
        if cols % p.m:
            raise ValueError(f"shape: {cols} columns is not a multiple of M={p.m}")
        width = cols // p.m * p.n
        for name, arr, dtypes in (("values", self.values, PACK_DTYPES),
                                  ("indices", self.indices, (np.dtype(np.uint8),))):
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"{name}: expected a numpy array, got {type(arr).__name__}")
            if arr.dtype not in dtypes:
                raise TypeError(f"{name}: dtype {arr.dtype} not supported; expected one of "
                                f"{[str(d) for d in dtypes]}")
            if arr.shape != (rows, width):
                raise ValueError(f"{name}: expected shape {(rows, width)} for {p} and dense shape "
                                 f"{(rows, cols)}, got {arr.shape}")
            if not arr.flags.c_contiguous:
                raise ValueError(f"{name}: must be C-contiguous; pass np.ascontiguousarray(...)")
        if self.indices.size and int(self.indices.max()) >= p.m:
            raise ValueError(f"indices: positions must be < M={p.m}, found "
                             f"{int(self.indices.max())}")

        object.__setattr__(self, "shape", (rows, cols))
        _read_only_indices(self)

    def __setstate__(self, state) -> None:  # pickle, deepcopy: no __post_init__
        self.__dict__.update(state)
        _read_only_indices(self)

    @property
    def pattern(self) -> Pattern:
        return Pattern(self.n, self.m)

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed form (values plus indices)."""
        return self.values.nbytes + self.indices.nbytes

    def __repr__(self) -> str:
        return (f"PackedNM({self.n}:{self.m}, shape={self.shape}, dtype={self.dtype}, "
                f"nbytes={self.nbytes})")


def _read_only_indices(packed: PackedNM) -> None:
    """Checked once (here and by check_distinct): a read-only view, so that they stay as checked
    through this object (the array given to PackedNM can still be written by its owner)."""
    indices = packed.indices.view()
    indices.flags.writeable = False
    object.__setattr__(packed, "indices", indices)


def check_distinct(packed: PackedNM) -> None:
    """ValueError unless the N positions of every group are distinct (as :func:`pack` makes
    them): a position named twice would hold two values for one weight. Run by the public
    functions, once per PackedNM (not on every one built, e.g. each training step's)."""
    n = packed.n
    if getattr(packed, "_distinct", False) or not packed.indices.size or n == 1:
        return
    groups = packed.indices.reshape(packed.shape[0], -1, n)
    if n <= 8:  # pairwise: n(n-1)/2 strided comparisons, no sort
        dup = np.zeros(groups.shape[:2], dtype=bool)
        for a in range(n):
            for b in range(a + 1, n):
                dup |= groups[:, :, a] == groups[:, :, b]
    else:
        s = np.sort(groups, axis=2)
        dup = (s[:, :, 1:] == s[:, :, :-1]).any(axis=2)
    where = np.argwhere(dup)
    if where.size:
        r, g = (int(i) for i in where[0])
        raise ValueError(f"packed.indices: row {r}, group {g} names a position twice; the N "
                         "positions of a group must be distinct (pack makes them so)")
    object.__setattr__(packed, "_distinct", True)  # once per PackedNM


def check_pack_args(weights, mask, n: int, m: int) -> tuple[np.ndarray, np.ndarray, Pattern]:
    """Validate the arguments of ``pack``: contiguous weights and boolean mask, same 2-D shape.

    Returns the weights and mask as C-contiguous arrays (copies only when needed) and the
    pattern. Shared by every backend so that they reject the same inputs the same way.
    """
    p = Pattern(n, m)
    if not isinstance(weights, np.ndarray):
        raise TypeError(f"weights: expected a numpy array, got {type(weights).__name__}")
    if weights.dtype not in PACK_DTYPES:
        raise TypeError(f"weights: dtype {weights.dtype} not supported by the packed format; "
                        "pass float16, float32 or float64")
    if weights.ndim != 2:
        raise ValueError(f"weights: expected a 2-D (rows, cols) array, got shape {weights.shape}")
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise TypeError("mask: expected a boolean numpy array (e.g. MaskResult.mask), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != weights.shape:
        raise ValueError(f"mask: shape {mask.shape} does not match weights {weights.shape}")
    if weights.shape[1] % p.m:
        raise ValueError(f"weights: {weights.shape[1]} columns is not a multiple of M={p.m}; "
                         "pad the columns to a multiple of M (e.g. np.pad) before packing")
    return np.ascontiguousarray(weights), np.ascontiguousarray(mask), p


def first_overfull_group(mask: np.ndarray, p: Pattern) -> str:
    """Describe the first group of ``mask`` keeping more than N (for error messages)."""
    counts = mask.reshape(mask.shape[0], -1, p.m).sum(axis=2)
    r, g = (int(i) for i in np.argwhere(counts > p.n)[0])
    return (f"mask: row {r}, columns {g * p.m}..{g * p.m + p.m - 1} keep {int(counts[r, g])} > "
            f"N={p.n}; pack needs at most N per group of M along each row (to pack W^T, pass "
            "W.T and mask.T, which needs a transposable mask)")


def check_matmul_args(x, packed: PackedNM) -> np.ndarray:
    """Validate ``sparse_matmul(x, packed)``: x float32 (B, C) C-contiguous, packed float32."""
    if not isinstance(packed, PackedNM):
        raise TypeError(f"packed: expected a PackedNM (from pack), got {type(packed).__name__}")
    if packed.dtype != np.float32:
        raise TypeError(f"packed: sparse_matmul runs in float32, the packed values are "
                        f"{packed.dtype}; pack float32 weights")
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"x: expected float32, got {x.dtype}; pass x.astype(np.float32)")
    if x.ndim != 2 or x.shape[1] != packed.shape[1]:
        raise ValueError(f"x: expected shape (batch, {packed.shape[1]}) to multiply a packed "
                         f"weight of shape {packed.shape}, got {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError("x: must be C-contiguous; pass np.ascontiguousarray(x)")
    return x
