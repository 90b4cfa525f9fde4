"""The cffi backend: registry, selection, threads, argument checks, and the selection kernels
bit for bit against the numpy reference."""

from __future__ import annotations

import sys
import threading
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nmopt
from nmopt import backends
from nmopt.backends import cffi_backend
from nmopt.backends.numpy_backend import NumpyBackend

REF = NumpyBackend()
PATTERNS = [(1, 1), (1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (3, 8), (5, 7), (8, 16), (16, 32),
            (7, 33), (32, 64), (64, 64)]




@pytest.fixture
def missing_extension(monkeypatch):
    """Pretend the compiled module is absent (as after an install without a compiler)."""
    monkeypatch.setitem(sys.modules, "nmopt.backends._kernels", None)
    monkeypatch.delattr(backends, "_kernels", raising=False)
    monkeypatch.setattr(cffi_backend, "_KERNELS", None)
    monkeypatch.setattr(cffi_backend, "_MISSING", None)
    yield
    monkeypatch.undo()
    cffi_backend._KERNELS = None
    cffi_backend._MISSING = None


def family(rng, kind: str, shape) -> np.ndarray:
    if kind == "gauss":
        return np.abs(rng.standard_normal(shape))
    if kind == "ties":
        return rng.integers(0, 3, shape).astype(np.float64)
    if kind == "zeros":
        return np.abs(rng.standard_normal(shape)) * (rng.random(shape) < 0.2)
    if kind == "signed":  # the kernels order any finite values, as numpy does
        s = rng.integers(-2, 3, shape).astype(np.float64)
        s[s == 0] = -0.0  # -0.0 ties with +0.0
        return s
    if kind == "wide":
        return np.abs(rng.standard_normal(shape)) * 10.0 ** rng.uniform(-300, 300, shape)
    raise ValueError(kind)


# -- registry and selection ------------------------------------------------------------------
def test_registered_and_preferred_for_numpy(cffi):
    assert "cffi" in backends.names() and backends.status()["cffi"] is None
    engine, fallbacks = backends.select(None, "numpy")
    assert engine.name == "cffi" and fallbacks == []
    # a solver that runs on numpy only still gets numpy, silently
    engine, fallbacks = backends.select(None, "numpy", ("numpy",))
    assert engine.name == "numpy" and fallbacks == []
    res = nmopt.find_mask(np.random.default_rng(0).standard_normal((16, 16)), "2:4")
    assert res.solver == "exact" and res.backend == "cffi" and res.optimal


def test_missing_extension_reason_and_fallbacks(missing_extension, monkeypatch):
    reason = backends.status()["cffi"]
    assert reason.startswith("cffi: extension not built: ")
    assert "cffi" not in backends.available() and "exact" not in nmopt.solvers.available()
    with pytest.raises(ImportError, match="extension not built"):
        backends.get("cffi")
    w = np.random.default_rng(1).standard_normal((8, 8))
    # default selection: numpy serves, with a warning saying why, recorded in the result
    with pytest.warns(RuntimeWarning, match="extension not built") as record:
        res = nmopt.find_mask(w, "2:4", solver="greedy")
    assert res.backend == "numpy" and res.fallbacks == [str(record[0].message)]
    # NMOPT_BACKEND=cffi: the fallback names the variable and the reason
    monkeypatch.setenv("NMOPT_BACKEND", "cffi")
    with pytest.warns(RuntimeWarning, match="NMOPT_BACKEND='cffi'.*extension not built"):
        res = nmopt.find_mask(w, "2:4", solver="greedy")
    assert res.backend == "numpy" and "extension not built" in res.fallbacks[0]
    with pytest.raises(ValueError, match="extension not built"):
        nmopt.find_mask(w, "2:4", solver="greedy", backend="cffi")


def test_environment_selects_cffi(cffi, monkeypatch):
    monkeypatch.setenv("NMOPT_BACKEND", "cffi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = nmopt.find_mask(np.ones((8, 8)), "2:4", solver="greedy")
    assert res.backend == "cffi" and res.fallbacks == []


def test_num_threads(cffi, monkeypatch):
    import os

    monkeypatch.delenv("NMOPT_NUM_THREADS", raising=False)
    assert cffi.num_threads == (os.cpu_count() or 1)
    monkeypatch.setenv("NMOPT_NUM_THREADS", "3")
    assert cffi.num_threads == 3
    monkeypatch.setenv("NMOPT_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="NMOPT_NUM_THREADS"):
        _ = cffi.num_threads
    try:
        cffi.num_threads = 1
        assert cffi.num_threads == 1
        for bad in (0, -2, 1.5, True, "2"):
            with pytest.raises(ValueError, match="num_threads"):
                cffi.num_threads = bad
    finally:
        cffi.num_threads = None


def test_results_do_not_depend_on_threads(cffi):
    tiles = family(np.random.default_rng(2), "ties", (301, 8, 8))
    out = []
    for k in (1, 2, 5):
        cffi.num_threads = k
        try:
            out.append((cffi.greedy(tiles, 3), cffi.exact(tiles, 3)[0], cffi.rowwise(tiles, 3)))
        finally:
            cffi.num_threads = None
    for other in out[1:]:
        for a, b in zip(out[0], other, strict=True):
            assert np.array_equal(a, b)


def test_concurrent_calls_from_python_threads(cffi):
    # cffi releases the GIL around the C calls; calls from several threads must not interfere
    rng = np.random.default_rng(3)
    inputs = [family(rng, "gauss", (200, 16, 16)) for _ in range(4)]
    expected = [cffi.exact(t, 8)[0] for t in inputs]
    got = [None] * 4

    def work(i):
        got[i] = cffi.exact(inputs[i], 8)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))


# -- selection kernels against the reference ------------------------------------------------
@pytest.mark.parametrize("kind", ["gauss", "ties", "zeros", "signed", "wide"])
@pytest.mark.parametrize(("n", "m"), PATTERNS)
def test_greedy_and_rowwise_bit_for_bit(cffi, n, m, kind):
    rng = np.random.default_rng(n * 100 + m)
    tiles = family(rng, kind, (max(3, 3000 // (m * m)), m, m))
    assert np.array_equal(cffi.greedy(tiles, n), REF.greedy(tiles, n))
    assert np.array_equal(cffi.rowwise(tiles, n), REF.rowwise(tiles, n))


@pytest.mark.parametrize("kind", ["gauss", "ties", "zeros", "signed", "wide"])
@pytest.mark.parametrize(("n", "m"), PATTERNS)
def test_descent_prices_match_the_reference(cffi, n, m, kind):
    """From one start the C prices are the reference's bit for bit; from several, the chosen
    start's bound is the reference's up to rounding (sums in another order may break a tie
    between starts the other way), and so is every price's validity."""
    from nmopt.certificates import descent_prices, tile_bounds

    rng = np.random.default_rng(n * 100 + m + 7)
    tiles = family(rng, kind, (max(3, 3000 // (m * m)), m, m))
    for sweeps in (1, 4):
        got, ref = cffi.descent_prices(tiles, n, sweeps, (0.5,)), descent_prices(tiles, n, sweeps, (0.5,))
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    (u, v), (ur, vr) = cffi.descent_prices(tiles, n), descent_prices(tiles, n)
    assert (u >= 0).all() and (v >= 0).all()
    b, br = tile_bounds(tiles, n, u, v), tile_bounds(tiles, n, ur, vr)
    np.testing.assert_allclose(b, br, rtol=1e-12, atol=1e-300)


def test_descent_prices_argument_checks(cffi):
    good = np.ones((2, 4, 4))
    assert cffi.descent_prices(np.zeros((0, 4, 4)), 2)[0].shape == (0, 4)
    bad = good.copy()
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match=r"tiles: .*finite.*\(1, 2, 3\)"):
        cffi.descent_prices(bad, 2)
    for sweeps in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="sweeps: expected an integer >= 1"):
            cffi.descent_prices(good, 2, sweeps)
    for starts in ((), (np.nan,), (1.0,) * 65):
        with pytest.raises(ValueError, match="starts: expected 1 to 64 finite"):
            cffi.descent_prices(good, 2, 4, starts)
    with pytest.raises(ValueError, match="n: expected an integer in 1..M=4"):
        cffi.descent_prices(good, 5)
    with pytest.raises(ValueError, match="sweeps: expected an integer >= 1"):
        type(nmopt.solvers.get("greedy"))(sweeps=0)


def test_greedy_find_mask_certifies_as_on_numpy(cffi):
    """find_mask(solver="greedy") takes its bound from the backend's descent prices."""
    w = np.random.default_rng(3).standard_normal((48, 40))
    for pattern in ("2:4", "4:8", "3:5"):
        got = nmopt.find_mask(w, pattern, solver="greedy", backend="cffi")
        ref = nmopt.find_mask(w, pattern, solver="greedy", backend="numpy")
        assert np.array_equal(got.mask, ref.mask)
        assert got.bound == pytest.approx(ref.bound, rel=1e-12)
        assert got.bound >= nmopt.find_mask(w, pattern).objective * (1 - 1e-12)


def test_greedy_all_equal_and_empty(cffi):
    tiles = np.zeros((3, 4, 4))
    assert np.array_equal(cffi.greedy(tiles, 2), REF.greedy(tiles, 2))
    empty = np.zeros((0, 4, 4))
    assert cffi.greedy(empty, 2).shape == (0, 4, 4)
    assert cffi.exact(empty, 2)[0].shape == (0, 4, 4)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 9), data=st.data())
def test_greedy_hypothesis(cffi, m, data):
    n = data.draw(st.integers(1, m))
    t = data.draw(st.integers(1, 4))
    values = st.sampled_from([0.0, -0.0, 1.0, 1.0 + 2**-52, 2.0, 5e-324, 1e300, -3.0])
    flat = data.draw(st.lists(values, min_size=t * m * m, max_size=t * m * m))
    tiles = np.array(flat, dtype=np.float64).reshape(t, m, m)
    assert np.array_equal(cffi.greedy(tiles, n), REF.greedy(tiles, n))
    assert np.array_equal(cffi.rowwise(tiles, n), REF.rowwise(tiles, n))


def test_apply_mask_bit_for_bit(cffi):
    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64, np.float16):
        w = rng.standard_normal((37, 19)).astype(dtype)
        w[0, :3] = [np.nan, np.inf, -0.0]
        mask = rng.random(w.shape) < 0.5
        with np.errstate(invalid="ignore"):  # inf * 0 in the reference
            got, ref = cffi.apply_mask(w, mask), REF.apply_mask(w, mask)
        assert got.dtype == ref.dtype and got.tobytes() == ref.tobytes()
    w = rng.standard_normal((8, 6))[:, ::2]  # non-contiguous view
    mask = np.ones(w.shape, bool)
    assert np.array_equal(cffi.apply_mask(w, mask), w)


# -- argument checks at the Python boundary --------------------------------------------------
def test_tile_argument_checks(cffi):
    good = np.zeros((2, 4, 4))
    for fn in (cffi.greedy, cffi.rowwise, cffi.exact):
        with pytest.raises(TypeError, match="tiles: expected float64"):
            fn(good.astype(np.float32), 2)
        with pytest.raises(TypeError, match="tiles: expected a numpy array"):
            fn(good.tolist(), 2)
        with pytest.raises(ValueError, match=r"tiles: expected shape \(T, M, M\)"):
            fn(np.zeros((2, 4, 5)), 2)
        with pytest.raises(ValueError, match="C-contiguous"):
            fn(np.zeros((2, 4, 8))[:, :, ::2], 2)
        with pytest.raises(ValueError, match="M must be in 1..64"):
            fn(np.zeros((1, 65, 65)), 2)
        for n in (0, 5, 2.0, True, None):
            with pytest.raises(ValueError, match="n: expected an integer in 1..M=4"):
                fn(good, n)
        bad = good.copy()
        bad[1, 2, 3] = np.nan
        with pytest.raises(ValueError, match=r"tiles: .*finite.*\(1, 2, 3\)"):
            fn(bad, 2)
    neg = good.copy()
    neg[0, 1, 1] = -1.0
    with pytest.raises(ValueError, match=r"finite and >= 0.*\(0, 1, 1\)"):
        cffi.exact(neg, 2)
    with pytest.raises(TypeError, match="saturate"):
        cffi.exact(good, 2, "yes")


def test_no_top_level_backends_module():
    assert "backends" not in sys.modules and "solvers" not in sys.modules
