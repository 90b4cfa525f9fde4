"""Compressed N:M storage and the sparse matmul: C against the numpy reference, round trips,
W and W^T of a transposable mask, float32 products against a float64 dense reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nmopt
from nmopt import backends
from nmopt.backends.numpy_backend import NumpyBackend
from nmopt.packed import PackedNM, pack, sparse_matmul, unpack

REF = NumpyBackend()
PATTERNS = [(2, 4), (4, 8), (8, 16), (16, 32), (1, 4), (3, 8), (1, 1), (5, 6), (32, 64)]




@pytest.fixture(params=["numpy", "cffi"])
def engine(request):
    reason = backends.status().get(request.param)
    if reason is not None:
        pytest.skip(reason)
    return backends.get(request.param)


def random_mask(rng, rows, cols, n, m, fill=1.0):
    """At most n per group of m along rows; ``fill`` < 1 leaves groups short (padding)."""
    keys = rng.random((rows, cols // m, m))
    order = np.argsort(keys, axis=2)[:, :, :n]
    mask = np.zeros((rows, cols // m, m), bool)
    np.put_along_axis(mask, order, rng.random(order.shape) < fill, axis=2)
    return mask.reshape(rows, cols)


def transposable_mask(w, n, m):
    return nmopt.find_mask(w, (n, m), solver="greedy").mask


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(("n", "m"), PATTERNS)
def test_pack_round_trip_and_reference(cffi, n, m, dtype):
    rng = np.random.default_rng(n * 64 + m)
    rows, cols = 13, m * 7
    w = rng.standard_normal((rows, cols)).astype(dtype)
    w[0, 0] = -0.0
    for fill in (1.0, 0.6):
        mask = random_mask(rng, rows, cols, n, m, fill)
        got, ref = cffi.pack(w, mask, n, m), REF.pack(w, mask, n, m)
        assert isinstance(got, PackedNM) and got.shape == (rows, cols)
        assert got.values.dtype == np.dtype(dtype) and got.indices.dtype == np.uint8
        assert got.values.tobytes() == ref.values.tobytes()
        assert np.array_equal(got.indices, ref.indices)
        # the n positions of a group are distinct: kept ones ascending, then padding
        groups = got.indices.reshape(rows, -1, n).astype(int)
        assert all(len(set(g)) == n for g in groups.reshape(-1, n).tolist())
        dense = (w * mask).astype(dtype)
        for eng in (cffi, REF):
            assert eng.unpack(got).tobytes() == np.where(mask, w, 0).astype(dtype).tobytes()
        np.testing.assert_array_equal(cffi.unpack(got), dense)


def test_transposable_mask_packs_w_and_wt(cffi):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    mask = transposable_mask(w, 4, 8)
    wt = cffi.pack(np.ascontiguousarray(w.T), np.ascontiguousarray(mask.T), 4, 8)
    assert np.array_equal(cffi.unpack(wt), (w * mask).T)
    # and the mask must be transposable for that: a row-wise mask is rejected on W^T
    rowwise = nmopt.find_mask(w, "4:8", transposable=False).mask
    if (rowwise.reshape(8, 8, 96).sum(axis=1) > 4).any():
        with pytest.raises(ValueError, match="transposable"):
            cffi.pack(np.ascontiguousarray(w.T), np.ascontiguousarray(rowwise.T), 4, 8)


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 7, 16, 17, 33, 100])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (16, 32), (1, 4), (3, 8), (5, 6)])
def test_sparse_matmul_matches_dense(engine, n, m, batch):
    rng = np.random.default_rng(batch * 7 + m)
    rows, cols = 45, m * 9  # not a multiple of 32: vector bodies and scalar tails both run
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    mask = random_mask(rng, rows, cols, n, m, fill=0.9)
    packed = engine.pack(w, mask, n, m)
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    y = engine.sparse_matmul(x, packed)
    assert y.shape == (batch, rows) and y.dtype == np.float32
    ref = x.astype(np.float64) @ (w * mask).astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(w * mask).astype(np.float64).T
    assert (np.abs(y - ref) <= 1e-5 * scale + 1e-30).all()


def test_forward_and_backward_data(cffi):
    """Y = X W^T from pack(W), dX = dY W from pack(W^T): both GEMMs of a linear layer."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((128, 256)).astype(np.float32)
    mask = transposable_mask(w, 2, 4)
    pw = pack(w, mask, "2:4")
    pwt = pack(np.ascontiguousarray(w.T), np.ascontiguousarray(mask.T), "2:4")
    for batch in (1, 16, 65):
        x = rng.standard_normal((batch, 256)).astype(np.float32)
        dy = rng.standard_normal((batch, 128)).astype(np.float32)
        wm = (w * mask).astype(np.float64)
        np.testing.assert_allclose(sparse_matmul(x, pw), x @ wm.T, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(sparse_matmul(dy, pwt), dy @ wm, rtol=1e-4, atol=1e-4)
    assert np.array_equal(unpack(pw), w * mask)


def test_large_rows_and_threads(cffi):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 512)).astype(np.float32)
    mask = random_mask(rng, 300, 512, 8, 16)
    packed = cffi.pack(w, mask, 8, 16)
    x = rng.standard_normal((20, 512)).astype(np.float32)
    out = []
    for k in (1, 2, 3):
        cffi.num_threads = k
        try:
            out.append((cffi.sparse_matmul(x, packed), cffi.sparse_matmul(x[:1], packed)))
        finally:
            cffi.num_threads = None
    for full, single in out[1:]:  # each row's sum runs in a fixed order: identical results
        assert np.array_equal(full, out[0][0]) and np.array_equal(single, out[0][1])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), extra=st.integers(0, 4), rows=st.integers(0, 9),
       groups=st.integers(0, 6), batch=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_hypothesis_pack_and_matmul(cffi, n, extra, rows, groups, batch, seed):
    m = n + extra
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, groups * m)).astype(np.float32)
    mask = random_mask(rng, rows, groups * m, n, m, fill=rng.random())
    packed = cffi.pack(w, mask, n, m)
    ref = REF.pack(w, mask, n, m)
    assert np.array_equal(packed.indices, ref.indices)
    assert packed.values.tobytes() == ref.values.tobytes()
    assert np.array_equal(cffi.unpack(packed), w * mask)
    x = rng.standard_normal((batch, groups * m)).astype(np.float32)
    y = cffi.sparse_matmul(x, packed)
    np.testing.assert_allclose(y, x.astype(np.float64) @ (w * mask).T, rtol=1e-4, atol=1e-5)


def test_argument_checks(engine):
    w = np.ones((4, 8), np.float32)
    mask = np.zeros((4, 8), bool)
    with pytest.raises(ValueError, match="not a multiple of M=3"):
        engine.pack(w, mask, 1, 3)
    with pytest.raises(TypeError, match="weights: dtype int64"):
        engine.pack(w.astype(np.int64), mask, 2, 4)
    with pytest.raises(TypeError, match="mask: expected a boolean"):
        engine.pack(w, mask.astype(np.uint8), 2, 4)
    with pytest.raises(ValueError, match="does not match"):
        engine.pack(w, mask[:, :4], 2, 4)
    with pytest.raises(ValueError, match="2-D"):
        engine.pack(w.ravel(), mask.ravel(), 2, 4)
    with pytest.raises(ValueError, match="N must be <= M"):
        engine.pack(w, mask, 5, 4)
    full = mask.copy()
    full[2, 4:7] = True
    with pytest.raises(ValueError, match=r"row 2, columns 4..7 keep 3 > N=2"):
        engine.pack(w, full, 2, 4)
    packed = engine.pack(w, mask, 2, 4)
    x = np.ones((3, 8), np.float32)
    with pytest.raises(TypeError, match="x: expected float32"):
        engine.sparse_matmul(x.astype(np.float64), packed)
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 8\)"):
        engine.sparse_matmul(x[:, :4], packed)
    with pytest.raises(ValueError, match="C-contiguous"):
        engine.sparse_matmul(np.ones((8, 3), np.float32).T, packed)
    with pytest.raises(TypeError, match="packed: sparse_matmul runs in float32"):
        engine.sparse_matmul(x, engine.pack(w.astype(np.float64), mask, 2, 4))
    with pytest.raises(TypeError, match="packed: expected a PackedNM"):
        engine.sparse_matmul(x, (packed.values, packed.indices))
    # a non-contiguous weight is copied, not rejected
    wide = np.ones((4, 16), np.float32)[:, ::2]
    assert np.array_equal(engine.unpack(engine.pack(wide, mask, 2, 4)), np.zeros((4, 8)))


def test_packed_validation():
    vals = np.zeros((2, 4), np.float32)
    idx = np.zeros((2, 4), np.uint8)
    PackedNM(vals, idx, 2, 4, (2, 8))
    with pytest.raises(ValueError, match="indices: positions must be < M=4"):
        PackedNM(vals, idx + 4, 2, 4, (2, 8))
    with pytest.raises(ValueError, match=r"values: expected shape \(2, 4\)"):
        PackedNM(vals[:, :2], idx, 2, 4, (2, 8))
    with pytest.raises(TypeError, match="indices: dtype int64"):
        PackedNM(vals, idx.astype(np.int64), 2, 4, (2, 8))
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        PackedNM(vals, idx, 2, 4, (2, 9))


def test_corrupted_indices_never_read_out_of_bounds(cffi):
    """Bypass the validation: the C matmul clamps bad positions instead of reading past x."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 32)).astype(np.float32)
    packed = cffi.pack(w, random_mask(rng, 8, 32, 2, 4), 2, 4)
    with pytest.raises(ValueError, match="read-only"):  # the checked positions stay as checked
        packed.indices[0, 0] = 3
    packed.indices.flags.writeable = True  # deliberately around it
    packed.indices[:] = 255
    for batch in (1, 5):
        y = cffi.sparse_matmul(np.ones((batch, 32), np.float32), packed)
        assert y.shape == (batch, 8) and np.isfinite(y).all()
    with pytest.raises(ValueError, match="index is >= M"):
        cffi.unpack(packed)
