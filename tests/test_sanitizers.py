"""The C kernels under AddressSanitizer and UndefinedBehaviorSanitizer.

Builds the same sources (``backends/csrc``) as a separate cffi module with
``-fsanitize=address,undefined``, then runs every kernel through the real Python boundary
(``nmopt.backends.cffi_backend``) in a subprocess with the ASan runtime preloaded, on random
and edge-case inputs: all N:M up to 64, ties, zeros, extreme magnitudes, empty inputs, odd
shapes, 1-3 threads, corrupted packed indices. Any out-of-bounds access, use after free or
undefined behaviour aborts the subprocess. Skipped with the reason when gcc or the sanitizer
runtime is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "backends" / "csrc"

DRIVER = r'''
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("_kernels_san", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
from nmopt.backends import cffi_backend
cffi_backend._KERNELS = mod
import nmopt
from nmopt import backends
from nmopt._tiles import TileGrid
from nmopt.packed import PackedNM
b = backends.get("cffi")
rng = np.random.default_rng(0)

def tiles_of(kind, t, m):
    s = np.abs(rng.standard_normal((t, m, m)))
    if kind == 1: s = rng.integers(0, 3, (t, m, m)).astype(float)
    if kind == 2: s = s * (rng.random(s.shape) < 0.2)
    if kind == 3: s = s * 10.0 ** rng.uniform(-300, 300, s.shape)
    if kind == 4: s = np.full((t, m, m), 1.7976931348623157e308)
    if kind == 5: s = np.full((t, m, m), 5e-324)
    return np.ascontiguousarray(s)

checked = 0
for m in list(range(1, 17)) + [23, 31, 32, 33, 47, 63, 64]:
    for n in sorted({k for k in (1, 2, m // 2, m - 1, m) if 1 <= k <= m}):
        for kind in range(6):
            t = int(rng.integers(0, 4)) if m > 16 else int(rng.integers(0, 9))
            s = tiles_of(kind, t, m)
            b.num_threads = int(rng.integers(1, 4))
            g = b.greedy(s, n); r = b.rowwise(s, n)
            du, dv = b.descent_prices(s, n, int(rng.integers(1, 5)))
            for sat in (False, True):
                for flags in ((0, 1, 2, 4) if m <= 12 else (0,)):
                    mask, u, v, st = b.exact(s, n, sat, flags=flags)
                    assert (mask.sum(2) <= n).all() and (mask.sum(1) <= n).all()
                    checked += 1
# bad values are reported, not crashed on
for bad in (np.nan, np.inf, -1.0):
    s = tiles_of(0, 3, 8); s[1, 2, 3] = bad
    for fn in (b.greedy, b.rowwise, b.exact, b.descent_prices):
        try:
            fn(s, 2)
        except ValueError:
            pass
# packed format and matmul
for it in range(300):
    m = int(rng.integers(1, 65)); n = int(rng.integers(1, m + 1))
    rows = int(rng.integers(0, 40)); groups = int(rng.integers(0, 12))
    if it % 17 == 0:
        m, n, groups = 4, 2, int(rng.integers(40, 70))
    cols = groups * m
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    keys = rng.random((rows, groups, m))
    order = np.argsort(keys, axis=2)[:, :, :n]
    mask = np.zeros((rows, groups, m), bool)
    np.put_along_axis(mask, order, rng.random(order.shape) < 0.8, axis=2)
    mask = mask.reshape(rows, cols)
    b.num_threads = int(rng.integers(1, 4))
    for dt in (np.float16, np.float32, np.float64):
        p = b.pack(w.astype(dt), mask, n, m)
        assert np.array_equal(b.unpack(p), (w * mask).astype(dt))
    p = b.pack(w, mask, n, m)
    for batch in (1, 2, 3, 4, int(rng.integers(5, 40))):
        x = rng.standard_normal((batch, cols)).astype(np.float32)
        y = b.sparse_matmul(x, p)
        assert y.shape == (batch, rows)
    if p.indices.size:
        p.indices.flags.writeable = True  # around the read-only view, to corrupt them
        p.indices[:] = rng.integers(0, 256, p.indices.shape).astype(np.uint8)
        b.sparse_matmul(np.ones((2, cols), np.float32), p)
        b.sparse_matmul(np.ones((7, cols), np.float32), p)
        try:
            b.unpack(p)
        except ValueError:
            pass
    if rows and cols:
        over = mask.copy(); over[0, :m] = True
        if m > n:
            try:
                b.pack(w, over, n, m)
            except ValueError:
                pass
    b.apply_mask(w, mask); b.apply_mask(w.astype(np.float64), mask)
res = nmopt.find_mask(rng.standard_normal((70, 45)), "3:8", solver="exact")
assert res.optimal
# matrices read in place (every dtype, strides), their certificate, and warm starts
for m in (1, 3, 4, 8, 13, 32, 64):
    for n in sorted({1, max(1, m // 2), m}):
        w = rng.standard_normal((2 * m, 3 * m))
        for x in (w, w.astype(np.float32), w.astype(np.float16), w.T.copy().T, w[:, ::-1]):
            b.num_threads = int(rng.integers(1, 4))
            for sat in (False, True):
                gm, gu, gv = b.greedy_matrix(x, n, m, absolute=True, sweeps=int(rng.integers(1, 4)))
                mask, u, v, st = b.exact_matrix(x, n, m, absolute=True, saturate=sat)
                kept, bound, short, bad = b.certify_matrix(x, n, m, absolute=True, saturate=sat,
                                                           mask=mask, u=u, v=v)
                assert not bad.any() and (bound >= kept * (1 - 1e-9)).all()
                mask2, u2, v2, st2, *cert = b.exact_matrix(x, n, m, absolute=True, saturate=sat,
                                                           rowwise=True, certify=True,
                                                           row_prices=True)
                assert not cert[3].any()
                *_, flags = b.exact_matrix(x, n, m, absolute=True, saturate=sat,
                                           certify="groups", row_prices=True)
                assert not flags.any()
                u2 = TileGrid(*x.shape, m).matrices_to_prices(u2, v2.reshape(len(x) // m, -1))[0]
                b.certify_matrix(x, n, m, absolute=True, saturate=sat, mask=mask2, u=u2, v=v2,
                                 rowwise=True)
            x2 = x + 1e-3 * rng.standard_normal(x.shape)
            b.exact_matrix(x2, n, m, absolute=True, warm=v)
            for prev in (mask, rng.random(x.shape) < 0.5):
                b.exact_matrix(x2, n, m, absolute=True, warm=v, warm_mask=prev, certify=True)
                b.exact_matrix(x2, n, m, absolute=True, warm=v, warm_mask=prev,
                               certify="groups", row_prices=True)
        if m in (4, 8):  # tiles enough for the warm start's probe: it keeps the mask, then cold
            big = rng.standard_normal((256, 256))
            mask, u, v, st = b.exact_matrix(big, n, m, absolute=True)
            for step in (1e-3, 10.0):
                b.exact_matrix(big + step * rng.standard_normal(big.shape), n, m,
                               absolute=True, warm=v, warm_mask=mask, certify=True)
                b.exact_matrix(big + step * rng.standard_normal(big.shape), n, m, absolute=True,
                               warm=v, warm_mask=mask, certify="groups", row_prices=True)
        try:
            bad_w = w.copy(); bad_w[0, 0] = np.nan
            b.exact_matrix(bad_w, n, m, absolute=True)
        except ValueError:
            pass
print("OK", checked)
'''


def _runtime(name: str) -> str | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    out = subprocess.run([gcc, f"-print-file-name={name}"], check=False, capture_output=True,
                         text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def sanitized_module(tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("sanitizer run is set up for Linux/gcc only")
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: cannot build the sanitizer variant")
    libasan = _runtime("libasan.so")
    if libasan is None:
        pytest.skip("AddressSanitizer runtime (libasan.so) not found for gcc")
    sys.path.insert(0, str(CSRC))
    try:
        import build_kernels
    finally:
        sys.path.remove(str(CSRC))
    flags = ("-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined "
             "-fno-sanitize-recover=undefined")
    ffi = build_kernels.make_builder("_kernels_san", extra_cflags=flags,
                                     extra_ldflags=["-fsanitize=address,undefined"],
                                     absolute=True)
    tmp = tmp_path_factory.mktemp("san")
    env_cc = os.environ.pop("CC", None)  # the sanitizer flags are gcc's
    try:
        path = ffi.compile(tmpdir=str(tmp), verbose=False)
    except Exception as exc:  # noqa: BLE001 - a toolchain without sanitizer support
        pytest.skip(f"could not build with -fsanitize=address,undefined: {exc}")
    finally:
        if env_cc is not None:
            os.environ["CC"] = env_cc
    return path, libasan


def test_kernels_run_clean_under_asan_and_ubsan(sanitized_module, tmp_path):
    path, libasan = sanitized_module
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, LD_PRELOAD=libasan,
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87",
               NMOPT_BACKEND="cffi")
    proc = subprocess.run([sys.executable, str(driver), path], check=False, capture_output=True,
                          text=True, env=env, timeout=600)
    report = proc.stdout[-2000:] + proc.stderr[-6000:]
    assert "ERROR: AddressSanitizer" not in proc.stderr, report
    assert "runtime error:" not in proc.stderr, report
    assert proc.returncode == 0, report
    assert proc.stdout.startswith("OK"), report
