"""The C exact solver: optimal masks and optimal prices, checked against OR-Tools min-cost flow,
brute force on small tiles, and its own certificate recomputed by ``nmopt.dual_bound``."""

from __future__ import annotations

import warnings

import nmopt_test_oracles as oracles
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nmopt
from nmopt import solvers
from nmopt._tiles import TileGrid
from nmopt.certificates import tile_bounds

PATTERNS = [(2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (1, 4), (3, 8), (5, 16)]
FAMILIES = ["gaussian", "cauchy", "ties", "zero_heavy", "wide_range"]




@pytest.fixture(scope="module")
def mcf():
    if solvers.status().get("mcf") is not None:
        pytest.skip(solvers.status()["mcf"])
    return "mcf"


def shape_for(m: int) -> tuple[int, int]:
    """Small matrices (a handful of tiles for large M), one of them not a multiple of M."""
    return {4: (64, 62), 8: (64, 64), 16: (64, 48), 32: (64, 96), 64: (128, 128)}[m]


def per_tile_kept(scores, mask, m):
    grid = TileGrid(*scores.shape, m)
    return np.where(grid.to_tiles(mask), grid.to_tiles(scores), 0.0).sum(axis=(1, 2))


def check_against_mcf(scores, n, m, saturate, mcf):
    res = nmopt.find_mask(scores, (n, m), solver="exact", saturate=saturate)
    mask = oracles.check_result(res, scores, n, m, saturate=saturate)
    assert res.solver == "exact" and res.backend == "cffi"
    assert res.optimal and res.gap <= 1e-9
    # the certificate, recomputed from the prices alone
    bound = nmopt.dual_bound(scores, (n, m), res.u, res.v, saturate=saturate)
    assert bound == pytest.approx(res.objective, rel=1e-9, abs=1e-300)
    ref = nmopt.find_mask(scores, (n, m), solver=mcf, saturate=saturate)
    # mcf optimises integer costs (<= 2.5e-9 relative per tile, see nmopt/_costs.py)
    assert res.objective == pytest.approx(ref.objective, rel=1e-8, abs=1e-300)
    ours, theirs = per_tile_kept(scores, mask, m), per_tile_kept(scores, ref.mask, m)
    assert (ours >= theirs * (1 - 1e-8)).all()
    return res


@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("n", "m"), PATTERNS)
def test_matches_mcf(cffi, mcf, n, m, family, saturate):
    rng = np.random.default_rng(hash((n, m, family)) % 2**32)
    scores = oracles.INPUTS[family](rng, shape_for(m))
    check_against_mcf(scores, n, m, saturate, mcf)


@pytest.mark.parametrize(("shape", "pattern"), [((37, 45), (3, 8)), ((5, 7), (2, 4)),
                                                ((70, 33), (16, 32)), ((1, 64), (4, 64)),
                                                ((9, 3, 2, 2), (2, 4))])
@pytest.mark.parametrize("saturate", [False, True])
def test_odd_shapes(cffi, mcf, shape, pattern, saturate):
    rng = np.random.default_rng(5)
    w = rng.standard_normal(shape)
    res = nmopt.find_mask(w, pattern, solver="exact", saturate=saturate)
    assert res.mask.shape == shape and res.optimal
    ref = nmopt.find_mask(w, pattern, solver=mcf, saturate=saturate)
    assert res.objective == pytest.approx(ref.objective, rel=1e-8)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (8, 16), (32, 64)])
def test_real_weights(cffi, mcf, real_weights, n, m):
    for _, w in sorted(real_weights.items()):
        block = np.abs(w[:128, :128].astype(np.float64))
        for saturate in (False, True):
            check_against_mcf(block, n, m, saturate, mcf)


@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_brute_force_small_tiles(cffi, m, saturate):
    rng = np.random.default_rng(m)
    for n in range(1, m + 1):
        for family in ("gaussian", "ties", "zero_heavy", "wide_range", "all_zeros"):
            scores = oracles.INPUTS[family](rng, (8 * m, 6 * m))
            res = nmopt.find_mask(scores, (n, m), solver="exact", saturate=saturate)
            oracles.check_result(res, scores, n, m, saturate=saturate)
            best = oracles.brute_force_tile_optima(scores, n, m, saturate)
            kept = oracles.tile_kept(scores, res.mask, m)
            np.testing.assert_allclose(kept, best, rtol=1e-12, atol=0)


@settings(max_examples=80, deadline=None)
@given(m=st.integers(1, 4), saturate=st.booleans(), data=st.data())
def test_hypothesis_tiles_vs_brute_force(cffi, m, saturate, data):
    n = data.draw(st.integers(1, m))
    values = st.sampled_from([0.0, 1.0, 1.0, 2.0, 3.0, 1e-300, 5e-324, 1e300, 0.5 + 2**-40,
                              1.7976931348623157e308])
    t = data.draw(st.integers(1, 3))
    tiles = np.array(data.draw(st.lists(values, min_size=t * m * m, max_size=t * m * m)),
                     dtype=np.float64).reshape(t, m, m)
    mask, u, v, status = cffi.exact(tiles, n, saturate)
    assert (status == 0).all()
    rows, cols = mask.sum(axis=2), mask.sum(axis=1)
    assert (rows <= n).all() and (cols <= n).all()
    if saturate:
        assert (rows == n).all() and (cols == n).all()
    else:
        assert (u >= 0).all() and (v >= 0).all()
    # compare in units of each tile's largest score: sums of scores near DBL_MAX overflow
    scale = tiles.max(axis=(1, 2), keepdims=True)
    unit = tiles / np.where(scale > 0, scale, 1.0)
    kept = np.where(mask, unit, 0.0).sum(axis=(1, 2))
    best = oracles.brute_force_tile_optima(unit.reshape(t * m, m), n, m, saturate)
    np.testing.assert_allclose(kept, best, rtol=1e-12, atol=1e-12)
    s2 = np.where(scale > 0, scale, 1.0)[:, :, 0]
    np.testing.assert_allclose(tile_bounds(unit, n, u / s2, v / s2), kept, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("saturate", [False, True])
def test_m4_register_path_matches_general_path(cffi, saturate):
    """M = 4 tiles have their own register-resident solver; flag 4 sends them through the
    general path instead, which serves as its oracle here (same optimum, both certified)."""
    rng = np.random.default_rng(11)
    for family in FAMILIES + ["all_zeros"]:
        tiles = oracles.INPUTS[family](rng, (300, 4, 4))
        for n in range(1, 5):
            kept = []
            for flags in (0, 4):
                mask, u, v, status = cffi.exact(tiles, n, saturate, flags=flags)
                assert (status == 0).all()
                rows, cols = mask.sum(axis=2), mask.sum(axis=1)
                assert (rows <= n).all() and (cols <= n).all()
                if saturate:
                    assert (rows == n).all() and (cols == n).all()
                kept.append(np.where(mask, tiles, 0.0).sum(axis=(1, 2)))
                np.testing.assert_allclose(tile_bounds(tiles, n, u, v), kept[-1], rtol=1e-10,
                                           atol=1e-300)
            np.testing.assert_allclose(kept[0], kept[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("saturate", [False, True])
def test_dual_start_keeps_tiles_on_the_fast_path(cffi, saturate):
    """The general path's dual start (column prices from rounds of coordinate descent, priced
    columns as sinks) solves every tile without the fallback, on ties, zeros and wide ranges
    too, to the optimum that cycle cancelling from a trivial mask (flag 2) reaches."""
    rng = np.random.default_rng(12)
    for n, m in ((1, 5), (3, 8), (7, 8), (5, 13), (8, 16), (11, 16), (16, 32), (9, 32)):
        for family in FAMILIES + ["all_zeros"]:
            tiles = oracles.INPUTS[family](rng, (6, m, m))
            mask, u, v, status = cffi.exact(tiles, n, saturate)
            assert (status == 0).all(), (n, m, family)
            kept = np.where(mask, tiles, 0.0).sum(axis=(1, 2))
            ref = cffi.exact(tiles, n, saturate, flags=2)[0]
            np.testing.assert_allclose(kept, np.where(ref, tiles, 0.0).sum(axis=(1, 2)),
                                       rtol=1e-12, atol=0)
            np.testing.assert_allclose(tile_bounds(tiles, n, u, v), kept, rtol=1e-10,
                                       atol=1e-300)


@pytest.mark.parametrize("m", [5, 8, 16, 32])
def test_warm_start_from_any_prices_is_exact(cffi, m):
    """A warm start only seeds the column prices: any values (another matrix's, random, huge,
    negative, NaN) give the cold optimum, certified."""
    rng = np.random.default_rng(m)
    n = m // 2
    w = rng.standard_normal((4 * m, 6 * m))
    mask, u, v, status = cffi.exact_matrix(w, n, m, absolute=True)
    kept = (np.abs(w) * mask).sum()
    t = v.shape[0]
    other = cffi.exact_matrix(rng.standard_normal(w.shape), n, m, absolute=True)[2]
    for seed in (v, other, rng.random((t, m)) * 3, np.full((t, m), 1e300),
                 np.full((t, m), -1.0), np.where(rng.random((t, m)) < 0.5, np.nan, v)):
        mask2, u2, v2, status2, k2, bound2, short2, bad2 = cffi.exact_matrix(
            w, n, m, absolute=True, warm=seed, certify=True)
        assert (status2 == 0).all() and not bad2.any()
        assert k2.sum() == pytest.approx(kept, rel=1e-12)
        assert bound2.sum() == pytest.approx(kept, rel=1e-10)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (8, 16)])
def test_warm_start_on_many_tiles_is_exact_whatever_the_probe_picks(cffi, n, m):
    """From 256 tiles on, a sample decides between the previous mask and prices, the prices
    alone, or a cold start (small, larger and complete changes, another matrix's result):
    every choice gives the cold optimum, certified."""
    rng = np.random.default_rng(m)
    w = rng.standard_normal((16 * m, 16 * m)).astype(np.float32)
    mask, u, v, _ = cffi.exact_matrix(w, n, m, absolute=True)
    other = cffi.exact_matrix(rng.standard_normal(w.shape), n, m, absolute=True)
    for noise in (1e-3, 1e-1, 1.0):
        w2 = w + noise * rng.standard_normal(w.shape).astype(np.float32)
        cold = cffi.exact_matrix(w2, n, m, absolute=True, certify=True)
        for prev_mask, prev_v in ((mask, v), (other[0], other[2])):
            res = cffi.exact_matrix(w2, n, m, absolute=True, warm=prev_v, warm_mask=prev_mask,
                                    certify=True)
            assert (res[3] == 0).all() and not res[7].any()
            np.testing.assert_allclose(res[4], cold[4], rtol=1e-12)  # per-tile optimum
            np.testing.assert_allclose(res[5], res[4], rtol=1e-10)  # bound = kept


@pytest.mark.parametrize(("n", "m", "shape"), [(2, 4, (40, 4)), (2, 4, (4, 1028)), (2, 4, (60, 36)),
                                               (4, 8, (8, 8)), (4, 8, (24, 8 * 127)),
                                               (3, 5, (35, 5))])
def test_matrix_tiles_are_placed_right_at_any_grid_width(cffi, n, m, shape):
    """The in-place kernel finds tile k's rows and columns by a multiplication (by a division
    when the grid is one tile wide): mask, prices and certificate match the same tiles solved
    as an array, with the previous result as a warm start too."""
    w = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
    grid = TileGrid(*shape, m)
    tiles = grid.to_tiles(np.abs(w.astype(np.float64)))
    mask_t, u_t, v_t, _ = cffi.exact(tiles, n)
    for warm in (None, cffi.exact_matrix(w, n, m, absolute=True)):
        kw = {} if warm is None else {"warm": warm[2], "warm_mask": warm[0]}
        res = cffi.exact_matrix(w, n, m, absolute=True, certify=True, **kw)
        np.testing.assert_array_equal(grid.to_tiles(res[0]), mask_t)
        np.testing.assert_allclose(res[4], per_tile_kept(np.abs(w.astype(np.float64)), res[0], m),
                                   rtol=1e-12)
        np.testing.assert_allclose(res[5], res[4], rtol=1e-10)
        if warm is None:
            np.testing.assert_array_equal(res[1], u_t)
            np.testing.assert_array_equal(res[2], v_t)


@pytest.mark.parametrize(("n", "m", "shape"), [(2, 4, (128, 264)), (3, 8, (24, 40)),
                                               (5, 12, (36, 24))])
def test_row_prices_are_u_by_matrix_row(cffi, n, m, shape):
    """``row_prices``: the kernel writes u in MaskResult's layout, block by block (several
    blocks and threads at M = 4), the same values as the tile prices rearranged."""
    w = np.random.default_rng(m).standard_normal(shape).astype(np.float32)
    cffi = type(cffi)()  # its own instance: the shared one keeps reading NMOPT_NUM_THREADS
    cffi.num_threads = 2
    mask, u, v, _ = cffi.exact_matrix(w, n, m, absolute=True)
    want = TileGrid(shape[0], shape[1], m).prices_to_matrices(u, v)[0]
    for certify in (False, True):
        res = cffi.exact_matrix(w, n, m, absolute=True, row_prices=True, certify=certify)
        assert res[1].shape == (shape[0], shape[1] // m)
        np.testing.assert_array_equal(res[1], want)
        np.testing.assert_array_equal(res[0], mask)


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 4), (3, 4), (1, 5), (3, 6), (4, 8), (7, 8),
                                    (5, 12), (8, 16), (16, 32)])
def test_warm_start_with_the_previous_mask_is_exact(cffi, n, m):
    """With the previous mask, a tile keeps it only when prices fitted to the new scores prove
    it optimal: from any previous mask (still optimal, changed, another matrix's, the greedy's,
    broken) and prices the result is the cold optimum, certified, on every input family."""
    rng = np.random.default_rng(20 + m)
    for family in FAMILIES + ["all_zeros"]:
        w = oracles.INPUTS[family](rng, (3 * m, 4 * m))
        w2 = w * (1 + 1e-3 * rng.standard_normal(w.shape))  # same zeros and ties' order
        cold = cffi.exact_matrix(w2, n, m, absolute=True, certify=True)
        mask, u, v = cffi.exact_matrix(w, n, m, absolute=True)[:3]
        grid = TileGrid(*w.shape, m)
        greedy = grid.from_tiles(cffi.greedy(grid.to_tiles(w2), n))
        broken = mask.copy()
        broken[0, :] = True  # the first row of tiles keeps more than n
        other = cffi.exact_matrix(rng.random(w.shape), n, m, absolute=True)
        for prev_mask, prev_v in ((mask, v), (cold[0], cold[2]), (cold[0], v), (greedy, v),
                                  (broken, v), (other[0], other[2]), (mask, v * 0.0)):
            res = cffi.exact_matrix(w2, n, m, absolute=True, warm=prev_v, warm_mask=prev_mask,
                                    certify=True)
            status, kept, bound, bad = res[3], res[4], res[5], res[7]
            assert (status == 0).all() and not bad.any(), family
            np.testing.assert_allclose(kept, cold[4], rtol=1e-12, atol=1e-300)
            np.testing.assert_allclose(bound, kept, rtol=1e-10, atol=1e-300)
            assert res[1].min() >= 0 and res[2].min() >= 0  # at most n: prices >= 0
    with pytest.raises(ValueError, match="warm_mask: expected the previous"):
        cffi.exact_matrix(w2, n, m, absolute=True, warm=v, warm_mask=mask[:m])


@pytest.mark.parametrize(("n", "m"), [(2, 4), (3, 4), (4, 8), (8, 16)])
def test_warm_start_keeps_a_previous_mask_that_is_still_optimal(cffi, n, m):
    """The fit proves a still-optimal previous mask and keeps it (on the M = 4 path too): here
    one of the many optima of a constant matrix, not the one a cold solve picks."""
    w = np.ones((2 * m, 3 * m), dtype=np.float32)
    cold = cffi.exact_matrix(w, n, m, absolute=True)[0]
    other = np.roll(cold.reshape(2, m, 3, m), 1, axis=3).reshape(w.shape)  # columns rotated
    assert not np.array_equal(other, cold)
    res = cffi.exact_matrix(w, n, m, absolute=True, warm=np.zeros((6, m)), warm_mask=other,
                            certify=True)
    np.testing.assert_array_equal(res[0], other)
    assert (res[3] == 0).all() and not res[7].any()
    np.testing.assert_allclose(res[5], res[4], rtol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
def test_warm_start_at_m4_groups_with_few_and_special_tiles(cffi, threads):
    """At M = 4 the fit runs on four tiles at once: a last group of fewer, an all-zero and a
    subnormal tile among them (these go through the general path) give the cold optimum."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 4 * 7))
    w[:4, 8:12] = 0.0
    w[4:, 4:8] *= 1e-310
    cffi = type(cffi)()  # its own instance: the shared one keeps reading NMOPT_NUM_THREADS
    cffi.num_threads = threads
    mask, u, v, _ = cffi.exact_matrix(w, 2, 4, absolute=True)
    w2 = w * (1 + 1e-6 * rng.standard_normal(w.shape))
    cold = cffi.exact_matrix(w2, 2, 4, absolute=True, certify=True)
    res = cffi.exact_matrix(w2, 2, 4, absolute=True, warm=v, warm_mask=mask, certify=True)
    assert (res[3] == 0).all() and not res[7].any()
    np.testing.assert_allclose(res[4], cold[4], rtol=1e-12, atol=0)
    np.testing.assert_allclose(res[5], res[4], rtol=1e-10, atol=0)
    np.testing.assert_array_equal(res[0], mask)  # so small a change keeps every mask


@settings(max_examples=80, deadline=None)
@given(m=st.sampled_from([4, 8]), data=st.data())
def test_hypothesis_warm_start_from_any_previous_result(cffi, m, data):
    """Tie-heavy and extreme-scale weights, warm-started from the optimum of other weights, of
    the same ones, or from any mask and prices: the cold optimum, certified (at M = 4 the fit
    runs on four tiles at once, here on groups of 1 to 4)."""
    n = data.draw(st.integers(1, m - 1))
    shape = (m * data.draw(st.integers(1, 2)), m * data.draw(st.integers(1, 5)))
    t, size = shape[0] * shape[1] // (m * m), shape[0] * shape[1]
    values = st.sampled_from([0.0, 1.0, 1.0, 2.0, 3.0, 1e-300, 5e-324, 0.5 + 2**-40, 1e300])

    def matrix():
        return np.array(data.draw(st.lists(values, min_size=size, max_size=size))).reshape(shape)

    w = matrix()
    cold = cffi.exact_matrix(w, n, m, absolute=True, certify=True)
    source = data.draw(st.sampled_from(["other", "same", "any"]))
    if source == "any":
        prev_mask = np.array(data.draw(st.lists(st.booleans(), min_size=size, max_size=size)))
        prices = st.sampled_from([0.0, 0.5, 1.0, 3.0, 1e300, -1.0, np.inf, np.nan])
        prev_v = np.array(data.draw(st.lists(prices, min_size=t * m, max_size=t * m)))
        prev_mask, prev_v = prev_mask.reshape(shape), prev_v.reshape(t, m)
    else:
        prev_mask, _, prev_v = cffi.exact_matrix(w if source == "same" else matrix(), n, m,
                                                 absolute=True)[:3]
    res = cffi.exact_matrix(w, n, m, absolute=True, warm=prev_v, warm_mask=prev_mask,
                            certify=True)
    assert (res[3] == 0).all() and not res[7].any()
    np.testing.assert_allclose(res[4], cold[4], rtol=1e-12, atol=0)
    np.testing.assert_allclose(res[5], res[4], rtol=1e-10, atol=0)


@pytest.mark.parametrize("flags", [1, 2])
@pytest.mark.parametrize("saturate", [False, True])
def test_fallback_path_agrees(cffi, flags, saturate):
    """The cycle-cancelling fallback (forced here) reaches the same optimum, certified."""
    rng = np.random.default_rng(7)
    for n, m in ((2, 4), (3, 8), (5, 12)):
        for family in ("gaussian", "ties", "wide_range"):
            tiles = oracles.INPUTS[family](rng, (20, m, m))
            base = cffi.exact(tiles, n, saturate)
            mask, u, v, status = cffi.exact(tiles, n, saturate, flags=flags)
            assert (status == 1).all()
            kept = np.where(mask, tiles, 0.0).sum(axis=(1, 2))
            ref = np.where(base[0], tiles, 0.0).sum(axis=(1, 2))
            np.testing.assert_allclose(kept, ref, rtol=1e-12)
            np.testing.assert_allclose(tile_bounds(tiles, n, u, v), kept, rtol=1e-10)


def test_against_greedy_and_saturate(cffi):
    rng = np.random.default_rng(8)
    scores = np.abs(rng.standard_normal((128, 128)))
    for pattern in ("2:4", "4:8", "16:32"):
        exact = nmopt.find_mask(scores, pattern, solver="exact")
        greedy = nmopt.find_mask(scores, pattern, solver="greedy")
        sat = nmopt.find_mask(scores, pattern, solver="exact", saturate=True)
        assert exact.objective / 2 <= greedy.objective <= exact.objective
        assert sat.objective <= exact.objective * (1 + 1e-12)
        assert greedy.bound >= exact.objective * (1 - 1e-12)  # any valid bound


def test_results_are_deterministic(cffi):
    scores = oracles.INPUTS["ties"](np.random.default_rng(9), (96, 96))
    a = nmopt.find_mask(scores, "8:16", solver="exact")
    b = nmopt.find_mask(scores, "8:16", solver="exact")
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.u, b.u)


def test_solver_registration(cffi):
    inst = solvers.get("exact")
    assert inst.exact and inst.backends == ("cffi",) and inst.transposable
    assert solvers.names()[0] == "exact"
    for sat in (False, True):
        assert solvers.auto(4, 8, transposable=True, saturate=sat, num_tiles=1).name == "exact"
    with pytest.raises(ValueError, match="runs only on \\['cffi'\\]"):
        nmopt.find_mask(np.ones((8, 8)), "2:4", solver="exact", backend="numpy")


@pytest.mark.parametrize("shape", [(8, 8), (7, 8)])  # read in place; tiled (an edge tile)
def test_unverified_tiles_warn(cffi, monkeypatch, shape):
    for kernel in ("exact", "exact_matrix"):
        real = getattr(cffi, kernel)

        def flaky(*args, _real=real, **kw):
            out = _real(*args, **kw)  # (mask, u, v, status[, certificate...])
            out[3][0] = 2
            return out

        monkeypatch.setattr(cffi, kernel, flaky)
    with pytest.warns(RuntimeWarning, match="1 of 4 tiles could not be certified"):
        nmopt.find_mask(np.ones(shape), "2:4", solver="exact")


def test_bad_scores_rejected_before_c(cffi):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for bad in (np.nan, np.inf, -1.0):
            w = np.ones((8, 8))
            w[3, 5] = bad
            with pytest.raises(ValueError):
                nmopt.find_mask(w, "2:4", solver="exact", scores=w)


@pytest.mark.parametrize("size", [8, 16])
def test_selection_networks_sort_every_01_input(size):
    """The C price rounds and dual start sort with Batcher's odd-even merge networks written out
    as comparator lists (nm_network.h): by the 0-1 principle, a network that sorts all
    2**size inputs of 0s and 1s sorts every input."""
    import re
    from pathlib import Path

    src = (Path(__file__).resolve().parents[1] / "backends" / "csrc" / "nm_network.h").read_text()
    body = re.search(rf"#define NM_OEM{size}\(F, a, up\)(.*?)\n(?!    )", src, re.S)
    assert body, f"NM_OEM{size} not found"
    pairs = [(int(i), int(j)) for i, j in re.findall(r"F\(a \+ (\d+), a \+ (\d+), up\)", body[1])]
    assert len(pairs) == {8: 19, 16: 63}[size]
    assert all(0 <= i < j < size for i, j in pairs)
    v = (np.arange(2**size)[:, None] >> np.arange(size)) & 1  # every 0-1 input, one per row
    for i, j in pairs:
        lo, hi = np.minimum(v[:, i], v[:, j]), np.maximum(v[:, i], v[:, j])
        v[:, i], v[:, j] = lo, hi
    assert (np.diff(v, axis=1) >= 0).all()
