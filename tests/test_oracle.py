"""Every exact solver against independent oracles, on every family of hard inputs.

The oracles (``tests/oracles.py``) share no code with the solvers: brute force over all 0/1
tiles for M <= 4, scipy's HiGHS LP (with its own dual bound) for larger M, and scipy's
``linear_sum_assignment`` for 1:M. Each tile of each mask is compared, so a wrong tile cannot
hide inside a large total.
"""

from __future__ import annotations

import zlib
from functools import cache

import nmopt_test_oracles as oracles
import numpy as np
import pytest

import nmopt


def _exact_solvers() -> list[str]:
    """Registered exact transposable solvers (unavailable ones too: they skip with the reason)."""
    out = []
    for name in nmopt.solvers.names():
        try:
            inst = nmopt.solvers.get(name)
        except ImportError:
            out.append(name)
            continue
        if inst.exact and inst.transposable:
            out.append(name)
    return out


SOLVERS = _exact_solvers()
FAMILIES = list(oracles.INPUTS)

#: (pattern, shape): odd shapes, 1:M, N = M, M up to 64.
CASES = [
    ("2:4", (13, 7)), ("2:4", (16, 16)), ("1:4", (8, 12)), ("3:4", (9, 9)), ("1:1", (3, 5)),
    ("4:8", (70, 33)), ("3:8", (16, 24)), ("1:8", (16, 16)), ("8:8", (16, 20)),
    ("8:16", (32, 32)), ("16:32", (32, 64)), ("32:64", (64, 128)),
]
#: The exactly-N problem is checked on a subset (it is secondary, and edge tiles included).
SATURATE_CASES = [CASES[i] for i in (0, 2, 3, 5, 6, 9, 11)]


@cache
def family_case(family: str, pattern: str, shape: tuple[int, int], saturate: bool):
    n, m = map(int, pattern.split(":"))
    rng = np.random.default_rng(zlib.crc32(repr((family, pattern, shape)).encode()))
    scores = oracles.INPUTS[family](rng, shape)
    lo, hi = oracles.tile_optima(scores, n, m, saturate)
    assert (hi - lo <= 1e-9 * np.maximum(hi, 1e-300)).all(), "oracle bracket not tight"
    return scores, lo, hi


def exact_solver_or_skip(name, n, m, saturate, shape):
    reason = nmopt.solvers.status()[name]
    if reason is not None:
        pytest.skip(f"solver {name!r} unavailable: {reason}")
    inst = nmopt.solvers.get(name)
    if not inst.exact or not inst.transposable:
        pytest.skip(f"{name!r} is not an exact transposable solver")
    why = oracles.refused(inst, n, m, saturate, shape)
    if why is not None:
        pytest.skip(f"{name} refuses {n}:{m} (saturate={saturate}): {why}")
    return inst


def assert_tiles_optimal(res, scores, m, lo, hi):
    kept = oracles.tile_kept(scores, res.mask, m)
    err = np.abs(kept - lo) / np.maximum(hi, 1e-300)
    assert err.max() <= 1e-9, f"tile {int(err.argmax())} off by {err.max():.3e} relative"
    assert res.objective == pytest.approx(lo.sum(), rel=1e-9, abs=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=[f"{p}-{r}x{c}" for p, (r, c) in CASES])
@pytest.mark.parametrize("name", SOLVERS)
def test_exact_solver_matches_oracle(name, case, family):
    pattern, shape = case
    n, m = map(int, pattern.split(":"))
    exact_solver_or_skip(name, n, m, False, shape)
    scores, lo, hi = family_case(family, pattern, shape, False)
    res = nmopt.find_mask(scores, pattern, solver=name)
    oracles.check_result(res, scores, n, m)
    assert_tiles_optimal(res, scores, m, lo, hi)
    assert res.optimal and res.gap <= 1e-7
    auto = nmopt.find_mask(scores, pattern)
    assert auto.objective == pytest.approx(res.objective, rel=1e-9, abs=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", SATURATE_CASES,
                         ids=[f"{p}-{r}x{c}" for p, (r, c) in SATURATE_CASES])
@pytest.mark.parametrize("name", SOLVERS)
def test_exact_solver_matches_oracle_saturate(name, case, family):
    pattern, shape = case
    n, m = map(int, pattern.split(":"))
    exact_solver_or_skip(name, n, m, True, shape)
    scores, lo, hi = family_case(family, pattern, shape, True)
    res = nmopt.find_mask(scores, pattern, solver=name, saturate=True)
    oracles.check_result(res, scores, n, m, saturate=True)
    assert_tiles_optimal(res, scores, m, lo, hi)
    free_lo = family_case(family, pattern, shape, False)[1]
    assert (lo <= free_lo * (1 + 1e-9)).all(), "exactly N beat at most N"


# -- the oracles against each other ------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(1, 2), (1, 3), (2, 3), (1, 4), (2, 4), (3, 4), (4, 4)])
@pytest.mark.parametrize("saturate", [False, True])
def test_brute_force_agrees_with_lp_oracle(n, m, saturate):
    rng = np.random.default_rng(n * 10 + m)
    for family in ("gaussian", "ties", "wide_range"):
        s = oracles.INPUTS[family](rng, (3 * m + 1, 2 * m + 1))
        brute = oracles.brute_force_tile_optima(s, n, m, saturate)
        lo, hi = oracles.lp_tile_optima(s, n, m, saturate)
        np.testing.assert_allclose(brute, lo, rtol=1e-9, atol=0)
        np.testing.assert_allclose(brute, hi, rtol=1e-9, atol=0)


@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_assignment_oracle_agrees_for_1_to_m(m):
    """1:M is an assignment problem: scipy's Hungarian method is a third, unrelated oracle."""
    s = np.abs(np.random.default_rng(m).standard_normal((3 * m, 2 * m + 3)))
    lo, hi = oracles.lp_tile_optima(s, 1, m)
    best = oracles.assignment_optimum(s, m)
    assert lo.sum() == pytest.approx(best, rel=1e-12) == hi.sum()
    for name in nmopt.solvers.available():
        inst = nmopt.solvers.get(name)
        if inst.exact and inst.transposable and inst.refuses(1, m, False, 1000) is None:
            assert nmopt.find_mask(s, f"1:{m}", solver=name).objective == pytest.approx(best,
                                                                                        rel=1e-9)


@pytest.mark.parametrize("n,m,saturate", [(2, 4, False), (2, 4, True), (1, 3, False),
                                          (3, 4, True), (2, 3, False)])
def test_brute_force_pattern_counts_are_mask_diversity(n, m, saturate):
    """The brute-force enumeration finds exactly the masks mask_diversity counts."""
    pats = oracles.all_patterns(m, m, n, saturate)
    assert len(pats) == nmopt.mask_diversity(f"{n}:{m}", at_most=not saturate)


def test_brute_force_on_a_hand_solved_tile():
    s = np.array([[9, 8, 0, 0], [8, 0, 0, 7], [0, 0, 5, 0], [0, 6, 0, 1]], dtype=float)
    assert oracles.brute_force_optimum(s, 1, 4) == 9 + 7 + 5 + 6
    assert oracles.brute_force_optimum(s, 2, 4) == 9 + 8 + 8 + 7 + 5 + 6 + 1
    assert oracles.brute_force_optimum(s, 4, 4) == s.sum()


# -- at most N versus exactly N ----------------------------------------------------------------
def test_at_most_n_beats_exactly_n_on_some_gaussian_tiles():
    """DESIGN.md: a few % of 4x4 N(0,1) tiles keep more score with 7 entries than with any 8.
    Exact solvers must find those better masks (and count the empty slots as deficit)."""
    rng = np.random.default_rng(7)
    tiles = np.abs(rng.standard_normal((400, 4, 4)))
    free = oracles.all_patterns(4, 4, 2, False) @ tiles.reshape(400, 16).T
    sat = oracles.all_patterns(4, 4, 2, True) @ tiles.reshape(400, 16).T
    better = np.flatnonzero(free.max(axis=0) > sat.max(axis=0) * (1 + 1e-12))
    assert 0.005 * 400 < better.size < 0.1 * 400
    s = np.concatenate(tiles[better], axis=1)  # a 4 x (4k) matrix of those tiles
    for name in nmopt.solvers.available():
        inst = nmopt.solvers.get(name)
        if not (inst.exact and inst.transposable):
            continue
        res = nmopt.find_mask(s, "2:4", solver=name)
        assert res.objective == pytest.approx(free.max(axis=0)[better].sum(), rel=1e-12)
        assert res.deficit >= 2 * better.size
        if inst.refuses(2, 4, True, better.size) is None:
            exactly = nmopt.find_mask(s, "2:4", solver=name, saturate=True)
            assert exactly.objective < res.objective
