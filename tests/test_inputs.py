"""Inputs to find_mask: every supported dtype works, every bad input fails clearly.

A clear failure is a ValueError or TypeError whose message names the offending parameter, so
the user knows what to fix; never a crash and never a silently wrong mask.
"""

from __future__ import annotations

import nmopt_test_oracles as oracles
import numpy as np
import pytest

import nmopt

RNG = np.random.default_rng(11)
W = RNG.standard_normal((8, 12))


# -- dtypes that work ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.int32,
                                   np.int64, np.uint8])
def test_numpy_dtypes(dtype):
    w = (W * 20).astype(dtype) if np.dtype(dtype).kind in "iu" else W.astype(dtype)
    if np.dtype(dtype).kind == "u":
        w = np.abs(W * 20).astype(dtype)
    res = nmopt.find_mask(w, "2:4")
    scores = np.abs(w.astype(np.float64))
    oracles.check_result(res, scores, 2, 4)
    assert res.objective == pytest.approx(oracles.brute_force_optimum(scores, 2, 4), rel=1e-12)


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "float64", "int32",
                                  "int64", "int8"])
def test_torch_dtypes(name):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, name)
    w = torch.from_numpy(W * 20).to(dtype)
    res = nmopt.find_mask(w, "2:4")
    assert isinstance(res.mask, torch.Tensor) and res.mask.dtype == torch.bool
    assert res.mask.shape == w.shape
    scores = w.double().abs().numpy()
    res.mask = res.mask.numpy()
    oracles.check_result(res, scores, 2, 4)
    assert res.objective == pytest.approx(oracles.brute_force_optimum(scores, 2, 4), rel=1e-12)


def test_torch_weights_with_numpy_scores():
    torch = pytest.importorskip("torch")
    w = torch.from_numpy(W)
    scores = np.arange(W.size, dtype=float).reshape(W.shape)
    res = nmopt.find_mask(w, "2:4", scores=scores)
    assert isinstance(res.mask, torch.Tensor)
    assert res.objective == pytest.approx(oracles.brute_force_optimum(scores, 2, 4))


def test_nested_list_and_pattern_forms():
    best = oracles.brute_force_optimum(np.abs(W), 2, 4)
    for pattern in ("2:4", " 2:4 ", (2, 4), [2, 4], (np.int64(2), np.int64(4)),
                    nmopt.Pattern(2, 4)):
        assert nmopt.find_mask(W, pattern).objective == pytest.approx(best, rel=1e-12)
    assert nmopt.find_mask(W.tolist(), "2:4").objective == pytest.approx(best, rel=1e-12)


def test_negative_weights_use_magnitude():
    """The default score is |W|: a large negative weight is kept."""
    w = np.ones((4, 4))
    w[0, 0] = -100
    res = nmopt.find_mask(w, "1:4")
    assert res.mask[0, 0]
    assert res.objective == 100 + 3


def test_custom_scores_replace_magnitude():
    """scores= is what is maximised; weights only give the shape and array type."""
    w = np.ones((4, 4))
    w[0, 0] = 100
    scores = np.ones((4, 4))
    scores[0, 0] = 0
    scores[0, 1] = 50
    res = nmopt.find_mask(w, "1:4", scores=scores)
    assert not res.mask[0, 0] and res.mask[0, 1]
    assert res.objective == pytest.approx(oracles.brute_force_optimum(scores, 1, 4))


def test_dense_pattern_keeps_everything_of_value():
    """N = M: nothing is pruned (every entry with positive score is kept)."""
    w = np.abs(RNG.standard_normal((6, 10))) + 0.1
    for solver in ("auto", "greedy", "mcf"):
        res = nmopt.find_mask(w, "4:4", solver=solver)
        assert res.mask.all() and res.objective == pytest.approx(w.sum())
        assert res.optimal and res.deficit == 0


def test_wide_and_extreme_magnitudes():
    """Scores from 1e-300 to 1e300 and subnormals: valid masks, sound bounds, exact optimum."""
    rng = np.random.default_rng(5)
    for scale in (1e-300, 1e-310, 1e300, 1.0):
        s = np.abs(rng.standard_normal((8, 8))) * scale
        best = oracles.brute_force_optimum(s, 2, 4)
        for solver in nmopt.solvers.available():
            inst = nmopt.solvers.get(solver)
            if not inst.transposable:
                continue
            res = nmopt.find_mask(s, "2:4", solver=solver)
            oracles.check_result(res, s, 2, 4)
            assert res.objective <= best * (1 + 1e-9)
            if inst.exact:
                assert res.objective == pytest.approx(best, rel=1e-9), (solver, scale)


# -- bad inputs --------------------------------------------------------------------------------
def _torch_bool():
    torch = pytest.importorskip("torch")
    return torch.from_numpy(W) > 0


def _torch_complex():
    torch = pytest.importorskip("torch")
    return torch.from_numpy(W).to(torch.complex64)


BAD = [
    # (id, weights factory, keyword arguments, exception type, words the message must contain)
    ("nan", lambda: np.where(W > 1, np.nan, W), {}, ValueError, ["weights", "NaN"]),
    ("inf", lambda: np.where(W > 1, -np.inf, W), {}, ValueError, ["weights", "inf"]),
    ("float16-inf", lambda: np.where(W > 1, np.inf, W).astype(np.float16), {}, ValueError,
     ["weights", "inf"]),
    ("nan-scores", lambda: W, {"scores": np.full(W.shape, np.nan)}, ValueError, ["scores"]),
    ("negative-scores", lambda: W, {"scores": W}, ValueError, ["scores", "negative"]),
    ("N>M", lambda: W, {"pattern": "5:4"}, ValueError, ["pattern", "N"]),
    ("N<1", lambda: W, {"pattern": "0:4"}, ValueError, ["pattern", "N"]),
    ("N<0", lambda: W, {"pattern": (-1, 4)}, ValueError, ["pattern"]),
    ("M>64", lambda: W, {"pattern": "2:128"}, ValueError, ["pattern", "64"]),
    ("2-4", lambda: W, {"pattern": "2-4"}, ValueError, ["pattern", "N:M"]),
    ("4:2", lambda: W, {"pattern": "4:2"}, ValueError, ["pattern"]),
    ("empty-pattern", lambda: W, {"pattern": ""}, ValueError, ["pattern"]),
    ("a:b", lambda: W, {"pattern": "a:b"}, ValueError, ["pattern"]),
    ("2:4:8", lambda: W, {"pattern": "2:4:8"}, ValueError, ["pattern"]),
    ("float-tuple", lambda: W, {"pattern": (2, 4.0)}, TypeError, ["pattern"]),
    ("bool-tuple", lambda: W, {"pattern": (True, 4)}, TypeError, ["pattern"]),
    ("None-pattern", lambda: W, {"pattern": None}, TypeError, ["pattern"]),
    ("int-pattern", lambda: W, {"pattern": 4}, TypeError, ["pattern"]),
    ("bool", lambda: W > 0, {}, TypeError, ["weights", "bool"]),
    ("complex", lambda: W + 1j, {}, TypeError, ["weights", "complex"]),
    ("object", lambda: W.astype(object), {}, TypeError, ["weights", "object"]),
    ("str", lambda: W.astype(str), {}, TypeError, ["weights"]),
    ("torch-bool", _torch_bool, {}, TypeError, ["weights", "bool"]),
    ("torch-complex", _torch_complex, {}, TypeError, ["weights", "complex"]),
    ("python-scalar", lambda: 3.0, {}, TypeError, ["weights"]),
    ("dict", lambda: {"w": W}, {}, TypeError, ["weights"]),
    ("ragged-list", lambda: [[1.0, 2.0], [3.0]], {}, TypeError, ["weights"]),
    ("0-D", lambda: np.array(3.0), {}, ValueError, ["weights", "2-D"]),
    ("1-D", lambda: W.ravel(), {}, ValueError, ["weights", "2-D"]),
    ("3-D", lambda: W.reshape(2, 4, 12), {}, ValueError, ["weights", "3-D"]),
    ("5-D", lambda: W.reshape(2, 2, 2, 3, 4), {}, ValueError, ["weights", "5-D"]),
    ("empty", lambda: np.zeros((0, 8)), {}, ValueError, ["weights", "empty"]),
    ("empty-cols", lambda: np.zeros((8, 0)), {}, ValueError, ["weights", "empty"]),
    ("empty-4D", lambda: np.zeros((4, 0, 3, 3)), {}, ValueError, ["weights", "empty"]),
    ("empty-4D-out", lambda: np.zeros((0, 3, 3, 3)), {}, ValueError, ["weights", "empty"]),
    ("scores-shape", lambda: W, {"scores": np.abs(W[:4])}, ValueError, ["scores", "shape"]),
    ("scores-transposed", lambda: W, {"scores": np.abs(W.T)}, ValueError, ["scores", "shape"]),
    ("scores-dtype", lambda: W, {"scores": W > 0}, TypeError, ["scores"]),
    ("unknown-solver", lambda: W, {"solver": "simplex"}, ValueError, ["solver", "mcf", "auto"]),
    ("solver-int", lambda: W, {"solver": 3}, TypeError, ["solver"]),
    ("transposable-str", lambda: W, {"transposable": "yes"}, TypeError, ["transposable"]),
    ("transposable-int", lambda: W, {"transposable": 1}, TypeError, ["transposable"]),
    ("saturate-int", lambda: W, {"saturate": 1}, TypeError, ["saturate"]),
    ("saturate-None", lambda: W, {"saturate": None}, TypeError, ["saturate"]),
    ("enumerate-4:8", lambda: W, {"solver": "enumerate", "pattern": "4:8"}, ValueError,
     ["solver", "enumerate", "4:8"]),
    ("greedy-saturate", lambda: W, {"solver": "greedy", "saturate": True}, ValueError,
     ["solver", "greedy", "saturate"]),
    ("rowwise-transposable", lambda: W, {"solver": "rowwise"}, ValueError,
     ["rowwise", "transposable"]),
    ("transposable-solver-rowwise", lambda: W, {"solver": "mcf", "transposable": False},
     ValueError, ["mcf", "transposable"]),
    ("networkx-too-many-tiles", lambda: np.ones((4 * 65, 4 * 64)), {"solver": "networkx"},
     ValueError, ["solver", "networkx", "tiles"]),
    ("unknown-backend", lambda: W, {"backend": "fpga"}, ValueError, ["backend", "numpy"]),
]


@pytest.mark.parametrize("factory,kwargs,exc,words", [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(factory, kwargs, exc, words):
    kwargs = dict(kwargs)
    pattern = kwargs.pop("pattern", "2:4")
    if "solver" in kwargs and isinstance(kwargs["solver"], str):
        reason = nmopt.solvers.status().get(kwargs["solver"])
        if reason is not None:
            pytest.skip(f"solver {kwargs['solver']!r} unavailable: {reason}")
    with pytest.raises(exc) as info:
        nmopt.find_mask(factory(), pattern, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_empty_error_shows_the_original_shape():
    with pytest.raises(ValueError, match=r"\(4, 0, 3, 3\)"):
        nmopt.find_mask(np.zeros((4, 0, 3, 3)), "2:4")


def test_unknown_solver_lists_every_registered_name():
    with pytest.raises(ValueError) as info:
        nmopt.find_mask(W, "2:4", solver="nope")
    for name in nmopt.solvers.names():
        assert repr(name) in str(info.value)


def test_nan_in_weights_is_fine_when_scores_are_given_and_finite():
    """Only the scores are optimised; the weights give shape and array type."""
    w = W.copy()
    w[0, 0] = np.nan
    res = nmopt.find_mask(w, "2:4", scores=np.abs(W))
    assert res.objective == pytest.approx(oracles.brute_force_optimum(np.abs(W), 2, 4))


# -- callable and instance solvers --------------------------------------------------------------
def test_callable_solver():
    """solver= may be a plain callable f(tiles, n, saturate) -> bool tiles."""
    calls = []

    def keep_diagonal(tiles, n, saturate):
        calls.append((tiles.shape, n, saturate))
        return np.broadcast_to(np.eye(tiles.shape[1], dtype=bool), tiles.shape).copy()

    res = nmopt.find_mask(W, "2:4", solver=keep_diagonal)
    assert calls == [((6, 4, 4), 2, False)]
    assert res.solver == "keep_diagonal"
    oracles.check_result(res, np.abs(W), 2, 4)
    assert not res.optimal


def test_callable_solver_that_returns_the_optimum_is_certified():
    pats = oracles.all_patterns(4, 4, 2, False)

    def brute(tiles, n, saturate):
        best = np.argmax(tiles.reshape(len(tiles), 16) @ pats.T, axis=1)
        return pats[best].reshape(tiles.shape).astype(bool)

    res = nmopt.find_mask(W, "2:4", solver=brute)
    oracles.check_result(res, np.abs(W), 2, 4)
    assert res.optimal and res.gap <= 1e-7


def test_lambda_solver():
    res = nmopt.find_mask(W, "2:4", solver=lambda tiles, n, sat: np.zeros(tiles.shape, bool))
    assert res.objective == 0 and not res.mask.any()
    assert res.bound >= oracles.brute_force_optimum(np.abs(W), 2, 4)


@pytest.mark.parametrize("bad,exc,words", [
    (lambda t, n, s: np.ones(t.shape, bool), RuntimeError, ["invalid mask", "row"]),
    (lambda t, n, s: np.zeros((1, 4, 4), bool), ValueError, ["shape"]),
])
def test_callable_solver_with_bad_output_is_refused(bad, exc, words):
    """A solver that returns an invalid mask never gets it past find_mask."""
    with pytest.raises(exc) as info:
        nmopt.find_mask(W, "2:4", solver=bad)
    for word in words:
        assert word in str(info.value)


def test_solver_instance():
    inst = nmopt.solvers.get("greedy")
    res = nmopt.find_mask(W, "2:4", solver=inst)
    assert res.solver == "greedy"
    oracles.check_result(res, np.abs(W), 2, 4)
