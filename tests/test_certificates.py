"""The certificate: dual_bound is a valid upper bound for any prices, and tight at optimal ones."""

from __future__ import annotations

import nmopt_test_oracles as oracles
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nmopt
from nmopt._tiles import tile_counts
from nmopt.certificates import descent_prices, prices_from_mask, tile_bounds, total_bound


@st.composite
def scored(draw, max_m=4):
    m = draw(st.integers(1, max_m))
    n = draw(st.integers(1, m))
    rows, cols = draw(st.integers(1, 2 * m + 1)), draw(st.integers(1, 2 * m + 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    family = draw(st.sampled_from(sorted(oracles.INPUTS)))
    return n, m, oracles.INPUTS[family](rng, (rows, cols)), rng


@settings(max_examples=60, deadline=None)
@given(scored())
def test_any_nonnegative_prices_bound_the_optimum(problem):
    """Weak duality: N*sum(u) + N*sum(v) + sum(max(0, s - u - v)) >= best kept score."""
    n, m, s, rng = problem
    best = oracles.brute_force_optimum(s, n, m)
    tr, tc = -(-s.shape[0] // m), -(-s.shape[1] // m)
    for _ in range(3):
        u = rng.random((s.shape[0], tc)) * rng.choice([0.0, 0.5, 3.0])
        v = rng.random((tr, s.shape[1])) * rng.choice([0.0, 0.5, 3.0])
        b = nmopt.dual_bound(s, (n, m), u, v)
        assert b >= best * (1 - 1e-12)
        assert b == pytest.approx(oracles.closed_form_bound(s, n, m, u, v), rel=1e-12)
    assert nmopt.dual_bound(s, (n, m), np.zeros((s.shape[0], tc))) == pytest.approx(s.sum())


@settings(max_examples=40, deadline=None)
@given(scored())
def test_any_prices_bound_the_exactly_n_optimum(problem):
    """saturate=True: prices of any sign on full tiles (>= 0 on edge tiles, which keep at most
    N) bound the exactly-N optimum."""
    n, m, s, rng = problem
    best = oracles.brute_force_optimum(s, n, m, saturate=True)
    tr, tc = -(-s.shape[0] // m), -(-s.shape[1] // m)
    u = rng.standard_normal((s.shape[0], tc))
    v = rng.standard_normal((tr, s.shape[1]))
    full_r, full_c = s.shape[0] // m, s.shape[1] // m  # tile rows / columns that are full
    u[full_r * m:] = np.abs(u[full_r * m:])
    u[:, full_c:] = np.abs(u[:, full_c:])
    v[full_r:] = np.abs(v[full_r:])
    v[:, full_c * m:] = np.abs(v[:, full_c * m:])
    b = nmopt.dual_bound(s, (n, m), u, v, saturate=True)
    assert b >= best - 1e-9 * max(1.0, abs(best))
    assert b == pytest.approx(oracles.closed_form_bound(s, n, m, u, v), rel=1e-12, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(scored())
def test_prices_from_an_optimal_mask_are_tight(problem):
    """Complementary slackness: prices from an optimal mask prove it optimal."""
    n, m, s, _ = problem
    grid = nmopt._tiles.TileGrid(s.shape[0], s.shape[1], m)
    tiles = grid.to_tiles(s)
    pats = oracles.all_patterns(m, m, n, False)
    best = np.argmax(tiles.reshape(len(tiles), m * m) @ pats.T, axis=1)
    mask = pats[best].reshape(tiles.shape).astype(bool)
    u, v = prices_from_mask(tiles, mask, n)
    assert (u >= 0).all() and (v >= 0).all()
    bounds = tile_bounds(tiles, n, u, v)
    kept = np.where(mask, tiles, 0).sum(axis=(1, 2))
    np.testing.assert_allclose(bounds, kept, rtol=1e-9, atol=1e-300)


@settings(max_examples=40, deadline=None)
@given(scored())
def test_prices_from_any_mask_and_descent_prices_are_valid(problem):
    """Prices for a poor mask, and the greedy's descent prices, still bound the optimum."""
    n, m, s, rng = problem
    grid = nmopt._tiles.TileGrid(s.shape[0], s.shape[1], m)
    tiles = grid.to_tiles(s)
    best = oracles.brute_force_tile_optima(s, n, m)
    pats = oracles.all_patterns(m, m, n, False)
    mask = pats[rng.integers(0, len(pats), len(tiles))].reshape(tiles.shape).astype(bool)
    descents = [descent_prices(tiles, n)]
    if nmopt.backends.status().get("cffi") is None:  # the C kernel too, where it is built
        descents.append(nmopt.backends.get("cffi").descent_prices(tiles, n))
    for u, v in [prices_from_mask(tiles, mask, n)] + descents:
        assert (u >= 0).all() and (v >= 0).all()
        assert (tile_bounds(tiles, n, u, v) >= best * (1 - 1e-12)).all()
    for u, v in descents:
        assert (tile_bounds(tiles, n, u, v) <= tiles.sum(axis=(1, 2)) * (1 + 1e-12)).all()


def test_bound_from_a_result_is_tight_and_reproducible():
    s = np.abs(np.random.default_rng(0).standard_normal((24, 40)))
    res = nmopt.find_mask(s, "4:8")
    assert nmopt.dual_bound(s, "4:8", res.u, res.v) == pytest.approx(res.bound, rel=1e-12)
    assert res.bound == pytest.approx(res.objective, rel=1e-9)
    # raising any price keeps the bound valid, lowering one to 0 too
    u = res.u.copy()
    u[3, 1] += 1.0
    assert nmopt.dual_bound(s, "4:8", u, res.v) >= res.objective
    u[3, 1] = 0.0
    assert nmopt.dual_bound(s, "4:8", u, res.v) >= res.objective * (1 - 1e-12)


def test_rowwise_bound_is_v_none():
    """v=None is the row-wise certificate: the (N+1)-th largest per group is tight."""
    s = np.abs(np.random.default_rng(1).standard_normal((8, 16)))
    res = nmopt.find_mask(s, "2:4", transposable=False)
    assert nmopt.dual_bound(s, "2:4", res.u) == pytest.approx(oracles.rowwise_optimum(s, 2, 4))
    assert res.bound == pytest.approx(oracles.rowwise_optimum(s, 2, 4))


def test_conv_and_torch_inputs():
    torch = pytest.importorskip("torch")
    w = torch.randn(8, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    res = nmopt.find_mask(w, "2:4")
    s = w.abs()
    assert res.u.shape == (8, 2) and res.v.shape == (2, 8)
    assert nmopt.dual_bound(s, "2:4", res.u, res.v) == pytest.approx(res.bound, rel=1e-9)
    assert nmopt.dual_bound(s.numpy(), (2, 4), torch.from_numpy(res.u).numpy(),
                            res.v) == pytest.approx(res.bound, rel=1e-9)


@pytest.mark.parametrize("kwargs,exc,word", [
    ({"u": np.zeros((8, 3))}, ValueError, "u"),
    ({"v": np.zeros((3, 8))}, ValueError, "v"),
    ({"u": -np.ones((8, 2))}, ValueError, "u"),
    ({"v": -np.ones((2, 8))}, ValueError, "v"),
    ({"u": np.full((8, 2), np.nan)}, ValueError, "u"),
    ({"v": np.full((2, 8), np.inf)}, ValueError, "v"),
    ({"scores": -np.ones((8, 8))}, ValueError, "scores"),
    ({"scores": np.ones(64)}, ValueError, "scores"),
    ({"scores": np.ones((8, 8), dtype=complex)}, TypeError, "scores"),
    ({"pattern": "2-4"}, ValueError, "pattern"),
])
def test_dual_bound_errors(kwargs, exc, word):
    args = {"scores": np.ones((8, 8)), "pattern": "2:4", "u": np.zeros((8, 2)),
            "v": np.zeros((2, 8))}
    args.update(kwargs)
    with pytest.raises(exc) as info:
        nmopt.dual_bound(args.pop("scores"), args.pop("pattern"), args.pop("u"), args.pop("v"))
    assert str(info.value).startswith(word)


def test_negative_prices_are_allowed_for_saturate():
    s = np.ones((4, 4))
    u, v = -np.ones((4, 1)), np.full((1, 4), 2.0)
    assert nmopt.dual_bound(s, "2:4", u, v, saturate=True) >= 8


def test_tolerance_is_stated():
    from nmopt import certificates

    assert nmopt.OPTIMALITY_TOL == 1e-7
    assert "weak duality" in certificates.__doc__


@pytest.mark.parametrize("m", [1, 2, 4, 8, 9, 16, 64])
def test_tile_counts_and_total_bound_match_the_plain_sums(m):
    """The fast paths find_mask uses (slice sums for small M, one total for the bound) agree
    with the per-tile numpy reductions they replace."""
    rng = np.random.default_rng(m)
    tiles = rng.random((37, m, m)) * (rng.random((37, m, m)) < 0.7)
    mask = rng.random((37, m, m)) < 0.5
    rows, cols = tile_counts(mask)
    assert np.array_equal(rows, mask.sum(axis=2)) and np.array_equal(cols, mask.sum(axis=1))
    u, v = rng.random((37, m)), rng.random((37, m))
    n = max(1, m // 2)
    assert total_bound(tiles, n, u, v) == pytest.approx(tile_bounds(tiles, n, u, v).sum(),
                                                        rel=1e-12)
