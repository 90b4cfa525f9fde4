"""``find_mask`` on the C kernels reading the weights where they lie, its independent
certificate (``nm_certify``), and warm starts: the same optimum as the tiled path, any dtype
and strides, torch CPU tensors without copies."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nmopt
from nmopt.backends import BACKENDS

pytestmark = pytest.mark.skipif(BACKENDS.instance("cffi").unavailable_reason() is not None,
                                reason="C kernels not built")
torch = pytest.importorskip("torch")

PATTERNS = ["1:1", "1:2", "2:4", "3:4", "3:8", "4:8", "8:16", "5:13", "16:32"]


def _reference(w64, pattern, saturate=False):
    """The tiled path on float64 (mcf: OR-Tools, another exact solver)."""
    return nmopt.find_mask(w64, pattern, solver="mcf", saturate=saturate, backend="numpy")


def _check(res, scores, pattern, ref):
    nmopt.check_mask(res.mask, pattern, True)
    assert res.solver == "exact" and res.backend == "cffi"
    assert res.optimal and res.gap <= 1e-9
    assert res.objective == pytest.approx(ref.objective, rel=1e-9, abs=1e-300)
    kept = float(np.asarray(scores, dtype=np.float64)[np.asarray(res.mask)].sum())
    assert res.objective == pytest.approx(kept, rel=1e-12, abs=1e-300)
    bound = nmopt.dual_bound(scores, pattern, res.u, res.v, saturate=res.saturate)
    assert bound == pytest.approx(res.bound, rel=1e-9, abs=1e-300)
    assert bound >= res.objective * (1 - 1e-9)


@settings(max_examples=40, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), tr=st.integers(1, 4), tc=st.integers(1, 4),
       dtype=st.sampled_from(["float64", "float32", "float16"]),
       layout=st.sampled_from(["c", "f", "reversed", "sliced"]), saturate=st.booleans(),
       seed=st.integers(0, 2**16))
def test_in_place_matches_an_independent_exact_solver(pattern, tr, tc, dtype, layout, saturate,
                                                      seed):
    m = int(pattern.split(":")[1])
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((tr * m, 2 * tc * m)).astype(dtype)
    w = {"c": base[:, : tc * m], "f": np.asfortranarray(base[:, : tc * m]),
         "reversed": base[:, ::-1][:, : tc * m], "sliced": base[:, ::2]}[layout]
    w64 = np.abs(w.astype(np.float64))
    res = nmopt.find_mask(w, pattern, saturate=saturate)
    _check(res, w64, pattern, _reference(w64, pattern, saturate))
    assert isinstance(res.mask, np.ndarray) and res.mask.dtype == bool


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_torch_cpu_tensors_are_read_in_place(dtype):
    rng = np.random.default_rng(1)
    t = torch.from_numpy(rng.standard_normal((32, 48)).astype(np.float32)).to(getattr(torch, dtype))
    res = nmopt.find_mask(t, "4:8")
    w64 = t.abs().double().numpy()
    _check(res, w64, "4:8", _reference(w64, "4:8"))
    assert isinstance(res.mask, torch.Tensor) and res.mask.dtype == torch.bool
    # the mask is the kernel's output buffer, not a copy of it
    assert res.mask.is_contiguous() and res.mask.shape == t.shape
    # a transposed view and a conv weight as well
    _check(nmopt.find_mask(t.T, "4:8"), w64.T, "4:8", _reference(np.ascontiguousarray(w64.T), "4:8"))
    conv = t.reshape(32, 3, 4, 4)
    assert nmopt.find_mask(conv, "4:8").objective == pytest.approx(res.objective, rel=1e-12)


@pytest.mark.parametrize("pattern", ["1:1", "2:4", "3:8", "8:16", "5:13"])
@pytest.mark.parametrize("saturate", [False, True])
def test_row_wise_runs_in_place_on_the_c_kernels(pattern, saturate):
    m = int(pattern.split(":")[1])
    w = np.random.default_rng(7).standard_normal((3 * m, 4 * m)).astype(np.float32)
    w[0, :m] = 0.0  # a zero group: ties and a price of 0
    t = torch.from_numpy(w)
    res = nmopt.find_mask(t, pattern, transposable=False, saturate=saturate)
    assert res.backend == "cffi" and res.solver == "rowwise" and not res.transposable
    assert isinstance(res.mask, torch.Tensor) and res.optimal
    nmopt.check_mask(res.mask, pattern, False)
    tiled = nmopt.find_mask(np.abs(w[:-1]), pattern, transposable=False, saturate=saturate)
    ref = nmopt.find_mask(np.abs(w), pattern, transposable=False, saturate=saturate,
                          backend="numpy")  # the tiled path on the numpy backend
    assert res.objective == pytest.approx(ref.objective, rel=1e-12)
    assert np.array_equal(res.mask.numpy(), ref.mask) and res.deficit == ref.deficit
    np.testing.assert_allclose(res.u, ref.u)
    assert tiled.optimal  # an edge tile: the tiled path


def test_scores_are_read_in_place_and_checked():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    s = (np.abs(w) * rng.random((1, 16))).astype(np.float32)
    res = nmopt.find_mask(w, "2:4", scores=s)
    _check(res, s.astype(np.float64), "2:4", _reference(s.astype(np.float64), "2:4"))
    bad = s.copy()
    bad[3, 4] = -1.0
    with pytest.raises(ValueError, match=r"scores: holds negative values \(first at index \(3, 4\)"):
        nmopt.find_mask(w, "2:4", scores=bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("solver", ["auto", "greedy"])
def test_bad_weights_get_the_same_error_as_before(value, solver):
    w = np.ones((8, 8), dtype=np.float32)
    w[2, 5] = value
    with pytest.raises(ValueError, match=r"weights: holds NaN or inf \(first at index \(2, 5\)"):
        nmopt.find_mask(w, "2:4", solver=solver)


@pytest.mark.parametrize("pattern", ["1:1", "2:4", "3:8", "4:8", "5:13", "16:32"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_greedy_runs_in_place_as_on_tiles(pattern, dtype, monkeypatch):
    """solver="greedy" reads the weights where they lie: the tiled path's mask, the C descent
    prices of the same tiles bit for bit, and nm_certify's bound."""
    from nmopt._tiles import TileGrid

    n, m = (int(k) for k in pattern.split(":"))
    rng = np.random.default_rng(m)
    t = torch.from_numpy(rng.standard_normal((4 * m, 3 * m)).astype(np.float32)).to(getattr(torch, dtype)).T
    with monkeypatch.context() as mp:  # no float64 copy: the tiled path's first step fails
        mp.setattr(nmopt.api, "_prepare", lambda *a: pytest.fail("took the tiled path"))
        res = nmopt.find_mask(t, pattern, solver="greedy")
    assert res.backend == "cffi" and res.solver == "greedy" and isinstance(res.mask, torch.Tensor)
    w64 = t.abs().double().numpy()
    ref = nmopt.find_mask(w64, pattern, solver="greedy", backend="numpy")  # tiled, numpy prices
    assert np.array_equal(res.mask.numpy(), ref.mask) and res.deficit == ref.deficit
    assert res.objective == pytest.approx(ref.objective, rel=1e-12)
    assert res.bound == pytest.approx(ref.bound, rel=1e-12)
    grid = TileGrid(*w64.shape, m)
    big_u, big_v = grid.prices_to_matrices(*BACKENDS.instance("cffi").descent_prices(grid.to_tiles(w64), n))
    assert np.array_equal(res.u, big_u) and np.array_equal(res.v, big_v)
    assert res.bound == pytest.approx(nmopt.dual_bound(w64, pattern, res.u, res.v), rel=1e-12)
    assert res.bound >= nmopt.find_mask(w64, pattern).objective * (1 - 1e-12)


def _with_flags(monkeypatch, flags):
    """Make find_mask's kernel call break its own output (C testing hooks) before the certificate."""
    cffi = BACKENDS.instance("cffi")
    real = cffi.exact_matrix
    monkeypatch.setattr(cffi, "exact_matrix", lambda *a, **k: real(*a, **k, flags=flags))


def test_an_invalid_mask_from_the_kernel_is_refused(monkeypatch):
    _with_flags(monkeypatch, 8)  # NM_FLAG_BREAK_MASK: row 0 of a tile keeps all M
    with pytest.raises(RuntimeError, match="invalid mask: one of tiles 0-3 breaks 2:4"):
        nmopt.find_mask(np.random.default_rng(0).standard_normal((8, 8)), "2:4")
    with pytest.raises(RuntimeError, match="invalid mask: one of tiles 0-1023 breaks 2:4"):
        nmopt.find_mask(np.random.default_rng(0).standard_normal((256, 256)), "2:4")


def test_prices_that_are_not_finite_are_refused(monkeypatch):
    cffi = BACKENDS.instance("cffi")
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    flags = cffi.exact_matrix(w, 2, 4, absolute=True, certify="groups", flags=128)[-1]
    assert flags.tolist() == [2, 2, 2, 2]  # NM_FLAG_INF_PRICES: one per block, so per group
    _with_flags(monkeypatch, 128)
    with pytest.raises(RuntimeError, match="solver 'exact' returned prices that are not finite"):
        nmopt.find_mask(w, "2:4")


def test_the_certificate_does_not_trust_the_kernel(monkeypatch):
    _with_flags(monkeypatch, 16)  # NM_FLAG_ZERO_PRICES: valid prices, not optimal ones
    w = np.random.default_rng(0).standard_normal((8, 8))
    res = nmopt.find_mask(w, "2:4")
    assert not res.optimal and res.gap > 0.1
    assert res.bound == pytest.approx(np.abs(w).sum())  # B(0, 0) = every score


def test_the_standalone_certificate_flags_broken_masks_and_prices():
    cffi = BACKENDS.instance("cffi")
    w = np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)
    mask, u, v, _ = cffi.exact_matrix(w, 2, 4, absolute=True)
    kept, bound, short, bad = cffi.certify_matrix(w, 2, 4, absolute=True, saturate=False,
                                                  mask=mask, u=u, v=v)
    assert not bad.any() and np.allclose(kept, bound, rtol=1e-12)
    broken = mask.copy()
    broken[5, 4:8] = True  # tile (1, 1): a row keeps 4
    assert cffi.certify_matrix(w, 2, 4, absolute=True, saturate=False, mask=broken, u=u,
                               v=v)[3].nonzero()[0].tolist() == [5]
    neg = v.copy()
    neg[2, 0] = -1.0  # at most N: a negative price is refused, not used
    assert cffi.certify_matrix(w, 2, 4, absolute=True, saturate=False, mask=mask, u=u,
                               v=neg)[3].nonzero()[0].tolist() == [2]
    assert not cffi.certify_matrix(w, 2, 4, absolute=True, saturate=True, mask=mask, u=u,
                                   v=neg)[3][2]  # exactly N: any sign


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "8:16", "16:32", "3:8"])
def test_warm_start_gives_the_cold_optimum(pattern):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((128, 256)).astype(np.float32)
    prev = nmopt.find_mask(w, pattern)
    for step in (1e-3, 1e-1, 10.0):  # a small change, a larger one, unrelated weights
        w2 = w + step * rng.standard_normal(w.shape).astype(np.float32)
        warm = nmopt.find_mask(w2, pattern, warm_start=prev)
        cold = nmopt.find_mask(w2, pattern)
        nmopt.check_mask(warm.mask, pattern, True)
        assert warm.optimal and warm.objective == pytest.approx(cold.objective, rel=1e-12)
        assert nmopt.dual_bound(np.abs(w2), pattern, warm.u, warm.v) == pytest.approx(warm.bound)
        prev = warm


def test_warm_start_from_a_torch_result_and_a_broken_one():
    t = torch.randn(64, 64)
    prev = nmopt.find_mask(t, "4:8")
    t2 = t + 1e-3 * torch.randn(64, 64)
    assert nmopt.find_mask(t2, "4:8", warm_start=prev).objective == pytest.approx(
        nmopt.find_mask(t2, "4:8").objective, rel=1e-12)
    prev.mask[:8, :8] = True  # a broken mask and any prices: still the cold optimum
    prev.u[:] = np.nan
    prev.v[:2] = np.nan
    prev.v[2:4] = -1.0
    prev.v[4:6] = 1e300
    prev.v[6:8] = np.inf
    res = nmopt.find_mask(t2, "4:8", warm_start=prev)
    assert res.optimal and res.objective == pytest.approx(nmopt.find_mask(t2, "4:8").objective)


def test_warm_start_mismatches_are_refused():
    w = np.random.default_rng(4).standard_normal((16, 16))
    prev = nmopt.find_mask(w, "4:8")
    with pytest.raises(ValueError, match="warm_start: the previous result is 4:8, this call 2:4"):
        nmopt.find_mask(w, "2:4", warm_start=prev)
    with pytest.raises(ValueError, match=r"warm_start: the previous mask has shape \(16, 16\)"):
        nmopt.find_mask(w[:8], "4:8", warm_start=prev)
    with pytest.raises(ValueError, match="transposable=True, saturate=False; pass the same"):
        nmopt.find_mask(w, "4:8", saturate=True, warm_start=prev)
    with pytest.raises(TypeError, match="warm_start: expected the MaskResult"):
        nmopt.find_mask(w, "4:8", warm_start=prev.mask)
    # edge tiles and other solvers take the tiled path: the warm start is accepted, unused
    odd = np.random.default_rng(5).standard_normal((10, 12))
    res = nmopt.find_mask(odd, "4:8", warm_start=nmopt.find_mask(odd, "4:8"))
    assert res.optimal
    assert nmopt.find_mask(w, "4:8", solver="mcf", warm_start=prev).optimal


def test_unaligned_broadcast_and_read_only_inputs():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    ref = nmopt.find_mask(w.astype(np.float64), "4:8", solver="mcf")
    raw = np.frombuffer(b"\0" + w.tobytes(), dtype=np.uint8, offset=1)
    unaligned = raw.view(np.float32).reshape(16, 16) if raw.ctypes.data % 4 == 0 else \
        np.ndarray((16, 16), np.float32, buffer=raw.data)
    assert not unaligned.flags.writeable
    res = nmopt.find_mask(unaligned, "4:8")  # the tiled path when unaligned, else in place
    assert res.objective == pytest.approx(ref.objective, rel=1e-9) and res.optimal
    row = np.broadcast_to(w[:1], (16, 16))  # stride 0 along the rows
    _check(nmopt.find_mask(row, "4:8"), np.abs(row.astype(np.float64)), "4:8",
           _reference(np.abs(np.ascontiguousarray(row, dtype=np.float64)), "4:8"))


@pytest.mark.parametrize("shape,pattern", [((72, 1000), "2:4"), ((96, 800), "4:8"),
                                           ((64, 320), "16:32"), ((24, 40), "5:8")])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["cold", "warm", "rowwise", "broken"])
def test_certificate_by_groups_is_the_per_tile_one_summed(shape, pattern, threads, mode):
    """``certify="groups"`` (find_mask's): each entry is its group's per-tile certificate summed
    in tile order, bit for bit, on any number of threads; flag 1 where a tile breaks."""
    cffi = type(BACKENDS.instance("cffi"))()  # its own: setting the shared one's threads
    cffi.num_threads = threads  # would stop it following NMOPT_NUM_THREADS for later tests
    n, m = map(int, pattern.split(":"))
    rng = np.random.default_rng(threads)
    w = rng.standard_normal(shape).astype(np.float32)
    kw = {"absolute": True, "rowwise": mode == "rowwise", "flags": 8 if mode == "broken" else 0}
    if mode == "warm":
        mask, _, v, _ = cffi.exact_matrix(w, n, m, absolute=True)
        w = w + np.float32(1e-3) * rng.standard_normal(shape).astype(np.float32)
        kw.update(warm=v, warm_mask=mask)
    tiles = cffi.exact_matrix(w, n, m, certify=True, **kw)
    groups = cffi.exact_matrix(w, n, m, certify="groups", **kw)
    np.testing.assert_array_equal(groups[0], tiles[0])
    kept, bound, short, bad = tiles[4:]
    g = cffi.cert_group(m)
    starts = range(0, kept.size, g)
    assert groups[4].shape == (len(starts),)
    for i, a in enumerate(starts):  # np.cumsum adds in order, as the C loop does
        assert groups[4][i] == np.cumsum(kept[a:a + g])[-1]
        assert groups[5][i] == np.cumsum(bound[a:a + g])[-1]
        assert groups[6][i] == short[a:a + g].sum()
        assert groups[7][i] == int(bad[a:a + g].any())
    assert bad.any() == (mode == "broken")
