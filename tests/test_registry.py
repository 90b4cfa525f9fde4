"""The solver and backend registries, exercised with dummy plug-ins (removed after each test)."""

from __future__ import annotations

import warnings

import nmopt_test_oracles as oracles
import numpy as np
import pytest

import nmopt
from nmopt.backends import Backend
from nmopt.solvers import Solver

W = np.random.default_rng(3).standard_normal((8, 12))


@pytest.fixture
def clean_registries(monkeypatch):
    """Give each test private copies of both registries, so nothing it registers survives."""
    for registry in (nmopt.solvers.SOLVERS, nmopt.backends.BACKENDS):
        monkeypatch.setattr(registry, "classes", dict(registry.classes))
        monkeypatch.setattr(registry, "instances", dict(registry.instances))
    monkeypatch.delenv("NMOPT_BACKEND", raising=False)


def circulant(tiles, n):
    m = tiles.shape[1]
    i, j = np.indices((m, m))
    return np.broadcast_to(((j - i) % m) < n, tiles.shape).copy()


def register_dummy_solver(**attrs):
    calls = []

    class Dummy(Solver):
        name = "dummy"
        exact = False
        backends = None

        def solve(self, tiles, n, *, saturate, backend):
            calls.append((tiles.shape, n, saturate, backend.name))
            z = np.zeros(tiles.shape[:2])
            return circulant(tiles, n), z + tiles.max(), z

    for key, value in attrs.items():
        setattr(Dummy, key, value)
    nmopt.solvers.register(Dummy)
    return calls


def test_dummy_solver_goes_through_find_mask(clean_registries):
    calls = register_dummy_solver()
    assert nmopt.solvers.names()[-1] == "dummy" and "dummy" in nmopt.solvers.available()
    assert nmopt.solvers.status()["dummy"] is None
    res = nmopt.find_mask(W, "2:4", solver="dummy")
    preferred = nmopt.backends.select(None, "numpy")[0].name  # cffi when built, else numpy
    assert calls == [((6, 4, 4), 2, False, preferred)]
    assert res.solver == "dummy" and not res.optimal
    oracles.check_result(res, np.abs(W), 2, 4)
    assert nmopt.find_mask(W, "2:4").solver != "dummy"  # auto wants exact solvers


def test_dummy_solver_is_removed_again():
    assert "dummy" not in nmopt.solvers.names()
    assert "dummy" not in nmopt.backends.names()


def test_unavailable_solver(clean_registries):
    register_dummy_solver(requires=("no_such_module",), extra="dummy-extra", exact=True)
    reason = nmopt.solvers.status()["dummy"]
    assert "no_such_module" in reason and "nmopt[dummy-extra]" in reason
    assert "dummy" not in nmopt.solvers.available()
    with pytest.raises(ImportError, match=r"dummy.*no_such_module.*nmopt\[dummy-extra\]"):
        nmopt.solvers.get("dummy")
    with pytest.raises(ImportError, match="dummy-extra"):
        nmopt.find_mask(W, "2:4", solver="dummy")


def test_auto_skips_an_unavailable_exact_solver_in_front(clean_registries, monkeypatch):
    register_dummy_solver(requires=("no_such_module",), exact=True)
    reg = nmopt.solvers.SOLVERS
    monkeypatch.setattr(reg, "preference", ("dummy", *reg.preference))
    assert nmopt.solvers.names()[0] == "dummy"
    res = nmopt.find_mask(W, "2:4")
    assert res.solver != "dummy" and res.optimal


def test_auto_picks_an_available_exact_solver_in_front(clean_registries, monkeypatch):
    """The registry's preference tuple is the preference order of 'auto'."""
    calls = register_dummy_solver(exact=True)
    reg = nmopt.solvers.SOLVERS
    monkeypatch.setattr(reg, "preference", ("dummy", *reg.preference))
    res = nmopt.find_mask(W, "2:4")
    assert res.solver == "dummy" and len(calls) == 1


def test_auto_with_nothing_exact_is_a_clear_error(clean_registries, monkeypatch):
    reg = nmopt.solvers.SOLVERS
    monkeypatch.setattr(reg, "classes", {k: v for k, v in reg.classes.items() if not v.exact})
    with pytest.raises(RuntimeError, match="no exact solver"):
        nmopt.find_mask(W, "2:4")


def test_refusing_solver(clean_registries):
    register_dummy_solver(refuses=lambda self, n, m, sat, t: "only odd M" if m % 2 == 0 else None)
    with pytest.raises(ValueError, match="only odd M"):
        nmopt.find_mask(W, "2:4", solver="dummy")
    assert nmopt.find_mask(W, "1:3", solver="dummy").solver == "dummy"


def test_register_rejects_bad_names(clean_registries):
    for bad in ("", "auto"):
        cls = type("Bad", (Solver,), {"name": bad})
        with pytest.raises(ValueError):
            nmopt.solvers.register(cls)
    with pytest.raises(ValueError):
        nmopt.backends.register(type("Bad", (Backend,), {"name": ""}))


def test_get_passes_instances_and_wraps_callables():
    inst = nmopt.solvers.get("greedy")
    assert nmopt.solvers.get(inst) is inst
    wrapped = nmopt.solvers.get(lambda tiles, n, sat: circulant(tiles, n))
    assert isinstance(wrapped, Solver) and not wrapped.exact


# -- backends ------------------------------------------------------------------------------------
def register_dummy_backend(**attrs):
    calls = []

    class DummyBackend(Backend):
        name = "dummy"

        def greedy(self, tiles, n):
            calls.append(tiles.shape)
            return nmopt.backends.get("numpy").greedy(tiles, n)

        def rowwise(self, tiles, n):
            calls.append(tiles.shape)
            return nmopt.backends.get("numpy").rowwise(tiles, n)

    for key, value in attrs.items():
        setattr(DummyBackend, key, value)
    nmopt.backends.register(DummyBackend)
    return calls


def test_dummy_backend_by_argument(clean_registries):
    calls = register_dummy_backend()
    assert "dummy" in nmopt.backends.available()
    res = nmopt.find_mask(W, "2:4", solver="greedy", backend="dummy")
    assert res.backend == "dummy" and calls == [(6, 4, 4)] and res.fallbacks == []
    ref = nmopt.find_mask(W, "2:4", solver="greedy", backend="numpy")
    np.testing.assert_array_equal(res.mask, ref.mask)
    oracles.check_result(res, np.abs(W), 2, 4)
    rw = nmopt.find_mask(W, "2:4", transposable=False, backend="dummy")
    assert rw.backend == "dummy" and len(calls) == 2


def test_dummy_backend_by_environment(clean_registries, monkeypatch):
    calls = register_dummy_backend()
    monkeypatch.setenv("NMOPT_BACKEND", "dummy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = nmopt.find_mask(W, "2:4", solver="greedy")
    assert res.backend == "dummy" and calls and res.fallbacks == []


def test_environment_fallback_warns_and_is_recorded(clean_registries, monkeypatch):
    value = "dummy-missing"
    register_dummy_backend(name=value, requires=("no_such_module",))
    monkeypatch.setenv("NMOPT_BACKEND", value)
    with pytest.warns(RuntimeWarning, match="NMOPT_BACKEND") as record:
        res = nmopt.find_mask(W, "2:4", solver="greedy")
    assert res.backend == "numpy"
    assert len(res.fallbacks) == 1 and value in res.fallbacks[0]
    assert "numpy" in res.fallbacks[0] and str(record[0].message) == res.fallbacks[0]
    assert "no_such_module" in res.fallbacks[0]
    oracles.check_result(res, np.abs(W), 2, 4)


def test_an_unknown_environment_backend_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv("NMOPT_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="NMOPT_BACKEND='no-such-backend' is not a backend"):
        nmopt.find_mask(W, "2:4")
    from nmopt.cli import main

    assert main(["diversity", "2:4"]) == 0  # commands without a backend still run
    capsys.readouterr()
    assert main(["demo"]) == 2  # commands that solve refuse it before any work
    err = capsys.readouterr()
    assert "NMOPT_BACKEND='no-such-backend'" in err.err and err.out == ""


def test_environment_backend_the_solver_cannot_use_falls_back(clean_registries, monkeypatch):
    register_dummy_backend()
    monkeypatch.setenv("NMOPT_BACKEND", "dummy")
    if nmopt.solvers.status().get("mcf") is not None:
        pytest.skip("mcf unavailable")
    with pytest.warns(RuntimeWarning, match="NMOPT_BACKEND"):
        res = nmopt.find_mask(W, "4:8", solver="mcf")
    assert res.backend == "numpy" and res.fallbacks


def test_explicit_backend_errors(clean_registries):
    register_dummy_backend(name="dummy-missing", requires=("no_such_module",))
    with pytest.raises(ValueError, match=r"backend.*'fpga'.*numpy"):
        nmopt.find_mask(W, "2:4", backend="fpga")
    with pytest.raises(ValueError, match=r"backend.*no_such_module"):
        nmopt.find_mask(W, "2:4", solver="greedy", backend="dummy-missing")
    register_dummy_backend()
    if nmopt.solvers.status().get("mcf") is None:
        with pytest.raises(ValueError, match="backend"):
            nmopt.find_mask(W, "4:8", solver="mcf", backend="dummy")
    with pytest.raises(ValueError, match="backend"):
        nmopt.backends.get("fpga")
    with pytest.raises(ImportError, match="no_such_module"):
        nmopt.backends.get("dummy-missing")
    assert "no_such_module" in nmopt.backends.status()["dummy-missing"]


def test_backend_instance_is_used_as_is(clean_registries):
    calls = register_dummy_backend()
    inst = nmopt.backends.get("dummy")
    res = nmopt.find_mask(W, "2:4", solver="greedy", backend=inst)
    assert res.backend == "dummy" and calls


# -- find_mask refuses what a broken solver returns ----------------------------------------------
def broken_solver(mask_fn, u_fn, exactly=True):
    class Broken(Solver):
        name = "broken"
        backends = None

        def solve(self, tiles, n, *, saturate, backend):
            z = np.zeros(tiles.shape[:2])
            return mask_fn(tiles, n), u_fn(z), z

    Broken.exactly = exactly
    nmopt.solvers.register(Broken)


def test_invalid_mask_from_a_solver_is_an_error(clean_registries):
    broken_solver(lambda t, n: np.ones(t.shape, bool), lambda z: z)
    with pytest.raises(RuntimeError, match=r"'broken' returned an invalid mask.*row 0 keeps 4"):
        nmopt.find_mask(W, "2:4", solver="broken")


def test_non_finite_prices_are_an_error(clean_registries):
    broken_solver(circulant, lambda z: z + np.nan)
    with pytest.raises(RuntimeError, match="not finite"):
        nmopt.find_mask(W, "2:4", solver="broken")


def test_negative_prices_are_clipped_so_the_bound_stays_valid(clean_registries):
    broken_solver(circulant, lambda z: z - 100.0)
    res = nmopt.find_mask(W, "2:4", solver="broken")
    assert (res.u >= 0).all() and res.bound >= oracles.brute_force_optimum(np.abs(W), 2, 4)
    oracles.check_result(res, np.abs(W), 2, 4)


def test_saturate_mask_that_is_not_exactly_n_is_an_error(clean_registries):
    broken_solver(lambda t, n: np.zeros(t.shape, bool), lambda z: z)
    with pytest.raises(RuntimeError, match="exactly N"):
        nmopt.find_mask(W, "2:4", solver="broken", saturate=True)


def test_preference_is_an_explicit_tuple_not_import_order(clean_registries):
    """Registering a solver named in the preference tuple puts it there, whatever the order of
    registration; names the tuple does not list come after it."""
    reg = nmopt.solvers.SOLVERS
    assert nmopt.solvers.names()[: len(nmopt.solvers.PREFERENCE)] == [
        n for n in nmopt.solvers.PREFERENCE if n in reg.classes]
    cls = reg.classes.pop("exact")
    register_dummy_solver()
    reg.register(cls)  # registered last, still preferred first
    assert nmopt.solvers.names()[0] == "exact" and nmopt.solvers.names()[-1] == "dummy"
    assert nmopt.backends.names()[: 2] == ["cffi", "numpy"]


def test_one_registry_class_serves_solvers_and_backends():
    from nmopt._registry import Registry

    assert type(nmopt.solvers.SOLVERS) is Registry and type(nmopt.backends.BACKENDS) is Registry
    assert nmopt.solvers.Solver.unavailable_reason is nmopt.backends.Backend.unavailable_reason
