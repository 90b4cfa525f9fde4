"""The cffi backend: the C kernels of ``backends/csrc`` on the CPU.

The compiled module ``nmopt.backends._kernels`` is built by ``pip install`` (cffi API mode);
calls release the GIL and split tiles (or rows) across ``num_threads`` threads. Every argument
is checked here, before any C code runs: dtype, shape, contiguity, N and M. The C side checks
sizes again and reports bad values (NaN, inf) by return code, never by crashing.

Thread count: ``nmopt.backends.get("cffi").num_threads = k``, else the ``NMOPT_NUM_THREADS``
environment variable, else ``os.cpu_count()``.
"""

from __future__ import annotations

import importlib
import os

import numpy as np

from nmopt._packed import PackedNM, check_matmul_args, check_pack_args, first_overfull_group
from nmopt.backends._base import Backend, register
from nmopt.backends._matrix import BadScores, matrix_arg
from nmopt.backends.numpy_backend import NumpyBackend
from nmopt.certificates import DESCENT_STARTS, check_descent_args
from nmopt.patterns import MAX_M

ENV_THREADS = "NMOPT_NUM_THREADS"
#: The most threads a call may ask for (the C kernels use at most NM_MAX_THREADS = 256 of them).
MAX_THREADS = 4096

_KERNELS = None  # the loaded module
_MISSING: str | None = None  # or why it could not be loaded


def _load():
    """The compiled module, or raise ImportError with the reason it is unavailable."""
    global _KERNELS, _MISSING
    if _KERNELS is None and _MISSING is None:
        try:
            # the compiled module, by name: it is not a Python source of the package
            _kernels = importlib.import_module("nmopt.backends._kernels")
        except ImportError as exc:
            _MISSING = (f"cffi: extension not built: {exc} (reinstall nmopt where a C compiler "
                        "works; `pip install -v .` shows why the build failed)")
        else:
            _KERNELS = _kernels
    if _KERNELS is None:
        raise ImportError(_MISSING)
    return _KERNELS


_MESSAGES = {-1: "invalid size, N, M or thread count", -3: "out of memory",
             -5: "an index is >= M"}


def _check(rc: int, what: str) -> None:
    if rc != 0:
        msg = _MESSAGES.get(rc, f"error code {rc}")
        if rc == -3:
            raise MemoryError(f"{what}: {msg}")
        raise ValueError(f"{what}: {msg}")


def _check_tiles(tiles, n) -> tuple[int, int]:
    if not isinstance(tiles, np.ndarray):
        raise TypeError(f"tiles: expected a numpy array, got {type(tiles).__name__}")
    if tiles.dtype != np.float64:
        raise TypeError(f"tiles: expected float64, got {tiles.dtype}; pass "
                        "np.ascontiguousarray(tiles, dtype=np.float64)")
    if tiles.ndim != 3 or tiles.shape[1] != tiles.shape[2]:
        raise ValueError(f"tiles: expected shape (T, M, M), got {tiles.shape}")
    if not tiles.flags.c_contiguous:
        raise ValueError("tiles: must be C-contiguous; pass np.ascontiguousarray(tiles)")
    m = tiles.shape[1]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"tiles: M must be in 1..{MAX_M}, got M={m}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= m:
        raise ValueError(f"n: expected an integer in 1..M={m}, got {n!r}")
    return int(n), m


def _bad_scores(tiles: np.ndarray, negative_ok: bool) -> ValueError:
    """The error for tiles the C code rejected (found again in numpy, only on failure)."""
    bad = ~np.isfinite(tiles) if negative_ok else ~(np.isfinite(tiles) & (tiles >= 0))
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    need = "finite" if negative_ok else "finite and >= 0"
    return ValueError(f"tiles: scores must be {need}; first bad value {tiles[where]!r} at tile "
                      f"index {where}")


_ROWWISE = 32  # NM_FLAG_ROWWISE
_CERT_GROUPS = 64  # NM_FLAG_CERT_GROUPS


def _cert_arrays(t: int):
    """Per-tile certificate outputs: kept score, bound, short rows + columns, broken."""
    return np.empty(t), np.empty(t), np.empty(t, dtype=np.int32), np.empty(t, dtype=np.int8)


def _cert_args(k, cert):
    if cert is None:
        return (k.ffi.NULL,) * 4
    kept, bound, nshort, bad = cert
    return (k.ffi.from_buffer("double[]", kept), k.ffi.from_buffer("double[]", bound),
            k.ffi.from_buffer("int32_t[]", nshort), k.ffi.from_buffer("int8_t[]", bad))


def _descent_args(k, sweeps, starts):
    """``sweeps, starts, nstarts`` of the C descent prices, checked (the cdata keeps the array)."""
    sweeps, starts = check_descent_args(sweeps, starts)
    return sweeps, k.ffi.from_buffer("double[]", np.asarray(starts, dtype=np.float64)), len(starts)


def _doubles(k, *arrays):
    return tuple(k.ffi.from_buffer("double[]", a) for a in arrays)


@register
class CffiBackend(Backend):
    """C kernels on the CPU, threads across tiles; preferred for numpy inputs when built."""

    name = "cffi"
    frameworks = ("numpy",)

    def __init__(self) -> None:
        self._threads: int | None = None

    # -- availability and settings ----------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        try:
            _load()
        except ImportError as exc:
            return str(exc)
        return None

    @property
    def num_threads(self) -> int:
        """Threads per call: the value set here, else ``NMOPT_NUM_THREADS``, else the cores."""
        if self._threads is not None:
            return self._threads
        env = os.environ.get(ENV_THREADS, "").strip()
        if env:
            try:
                value = int(env)
            except ValueError:
                value = 0
            if not 1 <= value <= MAX_THREADS:
                raise ValueError(f"{ENV_THREADS}={env!r}: expected an integer from 1 to "
                                 f"{MAX_THREADS}; unset it to use every core")
            return value
        return os.cpu_count() or 1

    @num_threads.setter
    def num_threads(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= MAX_THREADS):
            raise ValueError(f"num_threads: expected an integer from 1 to {MAX_THREADS} or None, "
                             f"got {value!r}")
        self._threads = value

    # -- tile kernels -----------------------------------------------------------------------
    def _select(self, kernel: str, tiles, n):
        """Run a mask-only C kernel (greedy or row-wise selection) over all tiles."""
        n, m = _check_tiles(tiles, n)
        k = _load()
        mask = np.empty(tiles.shape, dtype=np.uint8)
        rc = getattr(k.lib, f"nm_{kernel}")(k.ffi.from_buffer("double[]", tiles), tiles.shape[0],
                                            m, n, k.ffi.from_buffer("uint8_t[]", mask),
                                            self.num_threads)
        if rc == -2:
            raise _bad_scores(tiles, negative_ok=True)
        _check(rc, kernel)
        return mask.view(np.bool_)

    def greedy(self, tiles, n):
        return self._select("greedy", tiles, n)

    def rowwise(self, tiles, n):
        return self._select("rowwise", tiles, n)

    def descent_prices(self, tiles, n, sweeps=4, starts=DESCENT_STARTS):
        n, m = _check_tiles(tiles, n)
        k = _load()
        u, v = np.empty((len(tiles), m)), np.empty((len(tiles), m))
        rc = k.lib.nm_descent_prices(k.ffi.from_buffer("double[]", tiles), len(tiles), m, n,
                                     *_descent_args(k, sweeps, starts), *_doubles(k, u, v),
                                     self.num_threads)
        if rc == -2:
            raise _bad_scores(tiles, negative_ok=True)
        _check(rc, "descent_prices")
        return u, v

    def exact(self, tiles, n, saturate=False, *, flags: int = 0):
        """Exact transposable masks (at most N, or exactly N with ``saturate``).

        Returns ``(mask, u, v, status)``: the optimal mask, dual prices whose bound equals the
        kept score (``nmopt.certificates.tile_bounds``), and per tile 0 (verified), 1 (verified
        after a fallback: cycle cancelling, or the general path for an M = 4 tile) or 2
        (the fallback could not certify: see the C source). ``flags`` are testing hooks (1:
        force the fallback, 2: force it from a trivial mask, 4: solve M = 4 tiles on the
        general path instead of their register path).
        """
        n, m = _check_tiles(tiles, n)
        if not isinstance(saturate, (bool, np.bool_)):
            raise TypeError(f"saturate: expected True or False, got {saturate!r}")
        k = _load()
        t = tiles.shape[0]
        mask = np.empty(tiles.shape, dtype=np.uint8)
        u = np.empty((t, m))
        v = np.empty((t, m))
        status = np.empty(t, dtype=np.int8)
        rc = k.lib.nm_exact(k.ffi.from_buffer("double[]", tiles), t, m, n, int(bool(saturate)),
                            int(flags), k.ffi.from_buffer("uint8_t[]", mask),
                            k.ffi.from_buffer("double[]", u), k.ffi.from_buffer("double[]", v),
                            k.ffi.from_buffer("int8_t[]", status), self.num_threads)
        if rc == -2:
            raise _bad_scores(tiles, negative_ok=False)
        _check(rc, "exact")
        return mask.view(np.bool_), u, v, status

    def exact_matrix(self, x, n, m, *, absolute, saturate=False, warm=None, warm_mask=None,
                     certify=False, rowwise=False, row_prices=False, flags: int = 0):
        """:meth:`exact` on a 2-D matrix read in place (``matrix_arg``; rows and columns
        multiples of ``m``): scores ``|x|`` when ``absolute``, else ``x``. ``warm``: the tile
        column prices v (T, M) of a previous solve to start from (at most N only; M = 4 uses
        them only with ``warm_mask``); ``warm_mask``: that solve's mask (rows, cols), so that
        tiles whose mask is still optimal keep it. Returns ``(mask (rows, cols) bool, u, v,
        status)``, and with ``certify`` also :meth:`certify_matrix`'s four arrays, computed
        by its C routine on each block of tiles right after the solve; ``certify="groups"``:
        one entry per group of :meth:`cert_group` tiles instead (sums of the kept scores,
        bounds and short counts, and int8 flags: 1 a tile breaks the pattern, 2 a tile's
        bound is not finite while its kept score is). ``rowwise``: row-wise N:M instead (the
        top N of every row of every tile; v = 0). ``row_prices``: ``u`` as a (rows, cols / m)
        matrix instead (row r of tile column q at ``[r, q]``, the layout of ``MaskResult.u``),
        written by the kernel while in cache. Raises :class:`BadScores` on a NaN, infinite
        (or, for scores, negative) value."""
        ptr, code, rs, cs, owner = matrix_arg(x)  # owner keeps the memory alive
        rows, cols = owner.shape
        k = _load()
        t = (rows // m) * (cols // m)
        mask = np.empty((rows, cols), dtype=np.uint8)
        u_rows = np.empty((rows, cols // m)) if row_prices else None
        u = None if row_prices else np.empty((t, m))  # with row_prices: per-thread buffers
        v = np.empty((t, m))
        status = np.empty(t, dtype=np.int8)
        wv = k.ffi.NULL
        if warm is not None:
            warm = np.ascontiguousarray(warm, dtype=np.float64)
            if warm.shape != (t, m):
                raise ValueError(f"warm: expected the previous column prices as ({t}, {m}) tile "
                                 f"prices, got shape {warm.shape}")
            wv = k.ffi.from_buffer("double[]", warm)
        wx, wx_rs = k.ffi.NULL, 0
        if warm is not None and warm_mask is not None:
            warm_mask = np.ascontiguousarray(warm_mask).view(np.uint8)
            if warm_mask.shape != (rows, cols):
                raise ValueError(f"warm_mask: expected the previous ({rows}, {cols}) mask, got "
                                 f"shape {warm_mask.shape}")
            wx, wx_rs = k.ffi.from_buffer("uint8_t[]", warm_mask), cols
        if certify not in (False, True, "groups"):
            raise ValueError(f"certify: expected False, True or 'groups', got {certify!r}")
        groups = certify == "groups"
        flags = int(flags) | (_CERT_GROUPS if groups else 0) | (_ROWWISE if rowwise else 0)
        entries = -(-t // self.cert_group(m)) if groups else t
        cert = _cert_arrays(entries) if certify else None
        rc = k.lib.nm_exact_matrix(k.ffi.cast("void *", ptr), code, int(bool(absolute)), rows,
                                   cols, rs, cs, m, n, int(bool(saturate)),
                                   flags, wv, wx, wx_rs,
                                   k.ffi.from_buffer("uint8_t[]", mask), cols,
                                   k.ffi.NULL if u is None else k.ffi.from_buffer("double[]", u),
                                   k.ffi.from_buffer("double[]", v),
                                   k.ffi.NULL if u_rows is None
                                   else k.ffi.from_buffer("double[]", u_rows),
                                   k.ffi.from_buffer("int8_t[]", status),
                                   *_cert_args(k, cert), self.num_threads)
        if rc == -2:
            raise BadScores("scores: a value is NaN, infinite or negative")
        _check(rc, "exact")
        out = (mask.view(np.bool_), u if u_rows is None else u_rows, v, status)
        if not certify:
            return out
        return out + (*cert[:3], cert[3] if groups else cert[3].view(np.bool_))

    def greedy_matrix(self, x, n, m, *, absolute, sweeps=4, starts=DESCENT_STARTS):
        """:meth:`greedy` and :meth:`descent_prices` on a matrix read as :meth:`exact_matrix`
        reads it: ``(mask (rows, cols) bool, u, v)``, prices per tile (T, M); :class:`BadScores`
        on a NaN, infinite (or, for scores, negative) value."""
        ptr, code, rs, cs, owner = matrix_arg(x)  # owner keeps the memory alive
        rows, cols = owner.shape
        k = _load()
        t = (rows // m) * (cols // m)
        mask, u, v = np.empty((rows, cols), dtype=np.uint8), np.empty((t, m)), np.empty((t, m))
        rc = k.lib.nm_greedy_matrix(k.ffi.cast("void *", ptr), code, int(bool(absolute)), rows,
                                    cols, rs, cs, m, n, *_descent_args(k, sweeps, starts),
                                    k.ffi.from_buffer("uint8_t[]", mask), cols,
                                    *_doubles(k, u, v), self.num_threads)
        if rc == -2:
            raise BadScores("scores: a value is NaN, infinite or negative")
        _check(rc, "greedy")
        return mask.view(np.bool_), u, v

    @staticmethod
    def cert_group(m):
        """Tiles per entry of :meth:`exact_matrix`'s ``certify="groups"`` outputs (tile k in
        entry ``k // cert_group(m)``)."""
        return int(_load().lib.nm_cert_group(int(m)))

    def certify_matrix(self, x, n, m, *, absolute, saturate, mask, u, v, rowwise=False):
        """The certificate of ``mask`` (rows, cols) and prices ``u``, ``v`` (T, M) on ``x``,
        computed apart from the solver (``backends/csrc/nm_certify.c``): per tile the kept
        score, the dual bound, the rows plus columns below N, and 1 where a row or column
        breaks the pattern (``rowwise``: rows only)."""
        ptr, code, rs, cs, owner = matrix_arg(x)  # owner keeps the memory alive
        rows, cols = owner.shape
        k = _load()
        t = (rows // m) * (cols // m)
        mask = np.ascontiguousarray(mask).view(np.uint8)
        u = np.ascontiguousarray(u, dtype=np.float64)
        v = np.ascontiguousarray(v, dtype=np.float64)
        if mask.shape != (rows, cols) or u.shape != (t, m) or v.shape != (t, m):
            raise ValueError("certify: mask, u or v does not match the matrix")
        kept, bound, nshort, bad = cert = _cert_arrays(t)
        rc = k.lib.nm_certify(k.ffi.cast("void *", ptr), code, int(bool(absolute)), rows, cols,
                              rs, cs, m, n, int(bool(saturate)), _ROWWISE if rowwise else 0,
                              k.ffi.from_buffer("uint8_t[]", mask), cols,
                              k.ffi.from_buffer("double[]", u), k.ffi.from_buffer("double[]", v),
                              *_cert_args(k, cert), self.num_threads)
        if rc == -2:
            raise BadScores("scores: a value is NaN, infinite or negative")
        _check(rc, "certify")
        return kept, bound, nshort, bad.view(np.bool_)

    # -- weights ----------------------------------------------------------------------------
    def apply_mask(self, weights, mask):
        """``weights * mask``; float32/float64 numpy arrays run in C, others in numpy."""
        if (not isinstance(weights, np.ndarray) or not isinstance(mask, np.ndarray)
                or weights.dtype not in (np.float32, np.float64) or mask.dtype != np.bool_
                or mask.shape != weights.shape):
            return NumpyBackend().apply_mask(weights, mask)
        k = _load()
        w = np.ascontiguousarray(weights)
        mk = np.ascontiguousarray(mask)
        out = np.empty_like(w)
        fn, ctype = ((k.lib.nm_apply_mask_f32, "float[]") if w.dtype == np.float32
                     else (k.lib.nm_apply_mask_f64, "double[]"))
        rc = fn(k.ffi.from_buffer(ctype, w), k.ffi.from_buffer("uint8_t[]", mk.view(np.uint8)),
                w.size, k.ffi.from_buffer(ctype, out), self.num_threads)
        _check(rc, "apply_mask")
        return out

    def pack(self, weights, mask, n, m):
        w, mk, p = check_pack_args(weights, mask, n, m)
        k = _load()
        rows, cols = w.shape
        width = cols // p.m * p.n
        values = np.empty((rows, width), dtype=w.dtype)
        indices = np.empty((rows, width), dtype=np.uint8)
        rc = k.lib.nm_pack(k.ffi.from_buffer("char[]", w),
                           k.ffi.from_buffer("uint8_t[]", mk.view(np.uint8)), rows, cols,
                           w.itemsize, p.n, p.m, k.ffi.from_buffer("char[]", values),
                           k.ffi.from_buffer("uint8_t[]", indices), self.num_threads)
        if rc == -4:
            raise ValueError(first_overfull_group(mk, p))
        _check(rc, "pack")
        return PackedNM(values, indices, p.n, p.m, (rows, cols))

    def unpack(self, packed):
        if not isinstance(packed, PackedNM):
            raise TypeError(f"packed: expected a PackedNM, got {type(packed).__name__}")
        k = _load()
        rows, cols = packed.shape
        out = np.empty((rows, cols), dtype=packed.dtype)
        rc = k.lib.nm_unpack(k.ffi.from_buffer("char[]", packed.values),
                             k.ffi.from_buffer("uint8_t[]", packed.indices), rows, cols,
                             packed.dtype.itemsize, packed.n, packed.m,
                             k.ffi.from_buffer("char[]", out), self.num_threads)
        _check(rc, "unpack")
        return out

    def sparse_matmul(self, x, packed):
        x = check_matmul_args(x, packed)
        k = _load()
        rows, cols = packed.shape
        y = np.empty((x.shape[0], rows), dtype=np.float32)
        rc = k.lib.nm_sparse_matmul_f32(
            k.ffi.from_buffer("float[]", x), x.shape[0], cols,
            k.ffi.from_buffer("float[]", packed.values),
            k.ffi.from_buffer("uint8_t[]", packed.indices), rows, packed.n, packed.m,
            k.ffi.from_buffer("float[]", y), self.num_threads)
        _check(rc, "sparse_matmul")
        return y
