"""The shared conformance suite: every registered solver, on every backend it can use.

Parametrised from ``nmopt.solvers.names()`` and ``nmopt.backends.names()`` at collection time,
so a solver or backend registered later gets the whole suite. A combination is skipped only when
the solver is unavailable here (``status()``), or when ``solver.refuses(...)`` says so (with its
reason). Optima come from the independent oracles in ``tests/oracles.py``.
"""

from __future__ import annotations

import zlib
from functools import cache

import nmopt_test_oracles as oracles
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nmopt

SOLVERS = nmopt.solvers.names()


def _solver_backends() -> list[tuple[str, str]]:
    """(solver, backend) pairs the solver declares it can run on (all backends if unknown)."""
    pairs = []
    for name in SOLVERS:
        try:
            declared = nmopt.solvers.get(name).backends
        except ImportError:  # unavailable here: one pair, skipped with the reason
            declared = ("numpy",)
        pairs += [(name, b) for b in nmopt.backends.names() if declared is None or b in declared]
    return pairs

#: (pattern, shape): 1:M, N=M, M up to 64, shapes that are not multiples of M.
CASES = [
    ("1:1", (5, 7)), ("1:2", (9, 6)), ("2:3", (9, 10)), ("1:4", (13, 7)), ("2:4", (13, 7)),
    ("2:4", (1, 1)), ("2:4", (5, 64)), ("3:4", (16, 16)), ("4:4", (8, 12)), ("4:8", (70, 33)),
    ("3:8", (24, 40)), ("5:8", (17, 17)), ("8:16", (32, 48)), ("16:32", (64, 64)),
    ("32:64", (64, 128)),
]
CASE_IDS = [f"{p}-{r}x{c}" for p, (r, c) in CASES]


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


@cache
def case_data(pattern: str, shape: tuple[int, int], family: str = "gaussian", saturate=False):
    """Scores of a case and the per-tile (lower, upper) optimum from the oracle."""
    n, m = map(int, pattern.split(":"))
    rng = np.random.default_rng(seed_of(pattern, shape, family))
    scores = oracles.INPUTS[family](rng, shape)
    lo, hi = oracles.tile_optima(scores, n, m, saturate)
    assert (hi - lo <= 1e-9 * np.maximum(hi, 1e-300)).all(), "oracle is not tight"
    return scores, lo, hi


def solver_or_skip(name: str):
    reason = nmopt.solvers.status()[name]
    if reason is not None:
        pytest.skip(f"solver {name!r} unavailable: {reason}")
    return nmopt.solvers.get(name)


def skip_if_refused(inst, n: int, m: int, saturate: bool, shape) -> None:
    why = oracles.refused(inst, n, m, saturate, shape)
    if why is not None:
        pytest.skip(f"{inst.name} refuses {n}:{m} (saturate={saturate}): {why}")


def backend_or_skip(backend: str) -> None:
    reason = nmopt.backends.status()[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def solve(name, weights, pattern, *, saturate=False, backend=None, **kw):
    inst = nmopt.solvers.get(name)
    try:
        return nmopt.find_mask(weights, pattern, transposable=inst.transposable,
                               saturate=saturate, solver=name, backend=backend, **kw)
    except NotImplementedError as exc:  # a backend without this solver's kernel
        pytest.skip(str(exc))


def compare_with_optimum(inst, res, scores, n, m, lo, hi) -> None:
    """Exact: every tile equals the optimum. Approximate: no tile beats it. Greedy: >= 1/2."""
    kept = oracles.tile_kept(scores, res.mask, m)
    tol = 1e-9 * np.maximum(hi, 1e-300)
    assert (kept <= hi + tol).all(), "a tile beats the certified optimum"
    if inst.exact:
        assert (np.abs(kept - lo) <= tol).all(), np.max(np.abs(kept - lo) / np.maximum(hi, 1e-300))
        assert res.optimal and res.gap <= 1e-7
        assert res.objective == pytest.approx(lo.sum(), rel=1e-9)
    if "greedy" in inst.name:
        assert (kept >= 0.5 * lo - tol).all(), "greedy below 1/2 of the optimum"


# -- the conformance suite -------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name,backend", _solver_backends())
def test_conformance(name, backend, case):
    """Valid mask, sound certificate, correct deficit, and the optimum (or below it)."""
    inst = solver_or_skip(name)
    backend_or_skip(backend)
    pattern, shape = case
    n, m = map(int, pattern.split(":"))
    skip_if_refused(inst, n, m, False, shape)
    scores, lo, hi = case_data(pattern, shape)
    res = solve(name, scores, pattern, backend=backend)
    oracles.check_result(res, scores, n, m, transposable=inst.transposable)
    assert res.solver == name and res.backend == backend
    if inst.transposable:
        compare_with_optimum(inst, res, scores, n, m, lo, hi)
    else:
        best = oracles.rowwise_optimum(scores, n, m)
        assert res.objective <= best * (1 + 1e-12)
        if inst.exact:
            assert res.objective == pytest.approx(best, rel=1e-12)
            assert res.optimal and res.gap <= 1e-7


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", SOLVERS)
def test_saturate(name, case):
    """Exactly N: full tiles keep exactly N, exact solvers hit the exactly-N optimum, and it
    never beats the at-most-N optimum."""
    inst = solver_or_skip(name)
    pattern, shape = case
    n, m = map(int, pattern.split(":"))
    skip_if_refused(inst, n, m, True, shape)
    scores, lo, hi = case_data(pattern, shape)
    res = solve(name, scores, pattern, saturate=True)
    oracles.check_result(res, scores, n, m, transposable=inst.transposable, saturate=True)
    if not inst.transposable:
        return
    kept = oracles.tile_kept(scores, res.mask, m)
    assert (kept <= hi * (1 + 1e-9)).all(), "saturate=True beat the at-most-N optimum"
    if inst.exact:
        _, slo, shi = case_data(pattern, shape, saturate=True)
        assert (shi <= hi * (1 + 1e-9)).all()
        assert (np.abs(kept - slo) <= 1e-9 * np.maximum(shi, 1e-300)).all()
        # exactly N on full tiles, at most N on edge tiles: the certificate is tight everywhere
        assert res.optimal and res.gap <= 1e-7
        if inst.refuses(n, m, False, len(lo)) is None:
            free = solve(name, scores, pattern)
            assert res.objective <= free.objective * (1 + 1e-12)


def first_pattern(inst, shape, saturate=False) -> tuple[int, int]:
    for n, m in ((2, 4), (4, 8), (8, 16), (1, 4), (16, 32)):
        if oracles.refused(inst, n, m, saturate, shape) is None:
            return n, m
    pytest.skip(f"{inst.name} takes none of the round-trip patterns")


@pytest.mark.parametrize("name", SOLVERS)
def test_round_trip_numpy(name):
    """numpy in -> numpy bool out, same shape, also for a 4-D conv weight and int weights."""
    inst = solver_or_skip(name)
    rng = np.random.default_rng(1)
    n, m = first_pattern(inst, (16, 24))
    pattern = f"{n}:{m}"
    w2 = rng.standard_normal((16, 24)).astype(np.float32)
    res2 = solve(name, w2, pattern)
    assert isinstance(res2.mask, np.ndarray) and res2.mask.dtype == bool
    assert res2.mask.shape == w2.shape
    w4 = w2.reshape(16, 6, 2, 2)
    res4 = solve(name, w4, pattern)
    assert res4.mask.shape == w4.shape and res4.mask.dtype == bool
    np.testing.assert_array_equal(res4.mask.reshape(16, 24), res2.mask)
    oracles.check_result(res4, np.abs(w4), n, m, transposable=inst.transposable)
    wi = rng.integers(-50, 50, (16, 24))
    resi = solve(name, wi, pattern)
    oracles.check_result(resi, np.abs(wi).astype(float), n, m, transposable=inst.transposable)


@pytest.mark.parametrize("name", SOLVERS)
def test_round_trip_torch(name):
    """torch in -> torch.bool out, same shape and device; same mask as for the numpy input."""
    torch = pytest.importorskip("torch")
    inst = solver_or_skip(name)
    n, m = first_pattern(inst, (16, 24))
    pattern = f"{n}:{m}"
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(2))
    res = solve(name, w, pattern)
    assert isinstance(res.mask, torch.Tensor) and res.mask.dtype == torch.bool
    assert res.mask.shape == w.shape and res.mask.device == w.device
    ref = solve(name, w.numpy(), pattern)
    np.testing.assert_array_equal(res.mask.numpy(), ref.mask)
    assert res.objective == ref.objective
    w4 = w.reshape(16, 6, 2, 2)
    res4 = solve(name, w4, pattern)
    assert isinstance(res4.mask, torch.Tensor) and res4.mask.shape == w4.shape
    np.testing.assert_array_equal(res4.mask.reshape(16, 24).numpy(), ref.mask)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        wd = w.to(dtype)
        rd = solve(name, wd, pattern)
        assert rd.mask.dtype == torch.bool and rd.mask.shape == wd.shape
        scores = wd.abs().double().numpy()
        rd.mask = rd.mask.numpy()
        oracles.check_result(rd, scores, n, m, transposable=inst.transposable)


@pytest.mark.gpu
@pytest.mark.parametrize("name", SOLVERS)
def test_round_trip_cuda(name):
    """A CUDA tensor gets its mask back on the same CUDA device."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    inst = solver_or_skip(name)
    n, m = first_pattern(inst, (32, 32))
    w = torch.randn(32, 32, device="cuda")
    res = solve(name, w, f"{n}:{m}")
    assert res.mask.device == w.device and res.mask.dtype == torch.bool
    assert nmopt.is_valid_mask(res.mask, f"{n}:{m}", transposable=inst.transposable)


@pytest.mark.parametrize("name", SOLVERS)
def test_custom_scores_are_maximised(name):
    """``scores=`` is what gets maximised, not |weights|."""
    inst = solver_or_skip(name)
    n, m = first_pattern(inst, (16, 16))
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 16))
    scores = 1.0 / (np.abs(w) + 0.1)  # the opposite ranking of |w|
    res = solve(name, w, f"{n}:{m}", scores=scores)
    oracles.check_result(res, scores, n, m, transposable=inst.transposable)
    if inst.transposable:
        best = oracles.lp_tile_optima(scores, n, m)[0].sum()
    else:
        best = oracles.rowwise_optimum(scores, n, m)
    assert res.objective <= best * (1 + 1e-9)
    if inst.exact:
        assert res.objective == pytest.approx(best, rel=1e-9)
        by_abs = solve(name, w, f"{n}:{m}")
        assert not np.array_equal(by_abs.mask, res.mask)


@pytest.mark.parametrize("name", SOLVERS)
def test_deterministic(name):
    """The same input gives the same mask (ties included)."""
    inst = solver_or_skip(name)
    n, m = first_pattern(inst, (16, 16))
    w = np.random.default_rng(4).integers(0, 3, (16, 16)).astype(float)
    a = solve(name, w, f"{n}:{m}")
    b = solve(name, w.copy(), f"{n}:{m}")
    np.testing.assert_array_equal(a.mask, b.mask)


# -- greedy specifics ------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,shape", [("2:4", (16, 16)), ("4:8", (13, 21)), ("3:8", (16, 16)),
                                           ("1:4", (8, 8))])
@pytest.mark.parametrize("family", ["gaussian", "ties", "zero_heavy"])
def test_greedy_matches_reference(pattern, shape, family):
    """The greedy is the paper's rule with the documented tie-break, on every backend."""
    n, m = map(int, pattern.split(":"))
    scores = oracles.INPUTS[family](np.random.default_rng(seed_of(pattern, family)), shape)
    want = oracles.greedy_reference(scores, n, m)
    for backend in nmopt.backends.available():
        try:
            res = nmopt.find_mask(scores, pattern, solver="greedy", backend=backend)
        except (NotImplementedError, ValueError) as exc:
            if "greedy" in str(exc) or "cannot serve" in str(exc):
                continue
            raise
        np.testing.assert_array_equal(res.mask, want, err_msg=f"backend {backend}")


def test_greedy_all_ties_is_block_diagonal():
    res = nmopt.find_mask(np.ones((4, 4)), "2:4", solver="greedy")
    want = np.kron(np.eye(2, dtype=bool), np.ones((2, 2), dtype=bool))
    np.testing.assert_array_equal(res.mask, want)


def test_greedy_half_of_optimum_is_tight_ish():
    """One large entry blocks two that are worth nearly twice as much: the 1/2 guarantee."""
    s = np.zeros((4, 4))
    s[0, 0], s[0, 1], s[1, 0] = 10, 9, 9
    greedy = nmopt.find_mask(s, "1:4", solver="greedy")
    exact = nmopt.find_mask(s, "1:4", solver="auto")
    assert exact.objective == 18 and greedy.objective == 10
    assert greedy.objective >= exact.objective / 2
    assert not greedy.optimal and greedy.bound >= exact.objective


def test_greedy_can_leave_slots_empty():
    """A short row and a short column already paired: the greedy keeps fewer than N there."""
    s = np.zeros((4, 4))
    s[:3, :3] = 10 * (1 - np.eye(3))
    s[3, 3] = 5
    greedy = nmopt.find_mask(s, "2:4", solver="greedy")
    assert greedy.mask[3].sum() == 1 and greedy.mask[:, 3].sum() == 1
    assert greedy.deficit == 2 == oracles.deficit(greedy.mask, 2, 4)


# -- hypothesis properties ---------------------------------------------------------------------
@st.composite
def problems(draw):
    m = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    n = draw(st.integers(1, m))
    rows = draw(st.integers(1, 2 * m + 3))
    cols = draw(st.integers(1, 2 * m + 3))
    kind = draw(st.sampled_from(["float", "int", "wide"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "int":
        s = rng.integers(0, 3, (rows, cols)).astype(float)
    elif kind == "wide":
        s = oracles.wide_range(rng, (rows, cols))
    else:
        s = oracles.zero_heavy(rng, (rows, cols)) if seed % 3 == 0 else rng.random((rows, cols))
    return n, m, s


def available_solvers(n, m, saturate, shape, transposable=True):
    out = []
    for name in nmopt.solvers.available():
        inst = nmopt.solvers.get(name)
        if inst.transposable == transposable and oracles.refused(inst, n, m, saturate, shape) is None:
            out.append(name)
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.booleans())
def test_property_every_solver(problem, saturate):
    """Every solver's mask is valid and bounded; exact solvers agree on the objective."""
    n, m, s = problem
    exact = {}
    for name in available_solvers(n, m, saturate, s.shape):
        res = nmopt.find_mask(s, (n, m), saturate=saturate, solver=name)
        oracles.check_result(res, s, n, m, saturate=saturate)
        if nmopt.solvers.get(name).exact:
            exact[name] = res.objective
            # with saturate=True only full tiles carry a tight certificate (see test_saturate)
            assert res.optimal or (saturate and (s.shape[0] % m or s.shape[1] % m))
    values = list(exact.values())
    for v in values[1:]:
        assert v == pytest.approx(values[0], rel=1e-9, abs=1e-300)
    if m <= 4 and values:
        best = oracles.brute_force_optimum(s, n, m, saturate)
        assert values[0] == pytest.approx(best, rel=1e-9, abs=1e-300)


@settings(max_examples=25, deadline=None)
@given(problems())
def test_property_rowwise(problem):
    n, m, s = problem
    for name in available_solvers(n, m, False, s.shape, transposable=False):
        res = nmopt.find_mask(s, (n, m), transposable=False, solver=name)
        oracles.check_result(res, s, n, m, transposable=False)
        if nmopt.solvers.get(name).exact:
            assert res.objective == pytest.approx(oracles.rowwise_optimum(s, n, m), rel=1e-12)


def test_saturate_with_edge_tiles_checks_the_at_most_problem_too():
    """With saturate=True, edge tiles are solved at most N: a solver that refuses that problem
    (enumerate at 8:8, 2**64 candidate patterns) must be refused up front, not left to run."""
    w = np.random.default_rng(0).random((9, 13))
    with pytest.raises(ValueError, match="enumerate"):
        nmopt.find_mask(w, "8:8", solver="enumerate", saturate=True)
    res = nmopt.find_mask(w, "8:8", saturate=True)  # auto skips enumerate for the same reason
    assert res.optimal and res.solver != "enumerate" and res.mask.all()
