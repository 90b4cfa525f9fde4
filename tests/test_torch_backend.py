"""The torch backend: kernels against the numpy reference and independent exact oracles."""

from __future__ import annotations

import subprocess
import sys

import nmopt_test_oracles as oracles
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nmopt

torch = pytest.importorskip("torch")

from nmopt._costs import integer_costs
from nmopt.backends import _torch_ops as kernels
from nmopt.backends.torch_backend import mask_tensor
from nmopt.certificates import tile_bounds

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none here)")
PATTERNS = [(1, 4), (2, 4), (3, 4), (2, 5), (3, 8), (4, 8), (5, 8), (8, 16)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def backend():
    return nmopt.backends.get("torch")


def random_tiles(seed, t, m, family="gaussian"):
    return oracles.INPUTS[family](np.random.default_rng(seed), (t, m, m))


def test_registered_and_lazy():
    assert "torch" in nmopt.backends.names()
    assert nmopt.backends.status()["torch"] is None
    code = "import sys, nmopt; nmopt.backends.get('torch'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([(1, 4), (2, 4), (4, 8), (3, 6), (8, 16)]),
       st.sampled_from(["gaussian", "ties", "zero_heavy", "all_zeros"]))
def test_greedy_identical_to_numpy(seed, pattern, family):
    n, m = pattern
    tiles = random_tiles(seed, 7, m, family)
    want = nmopt.backends.get("numpy").greedy(tiles, n)
    np.testing.assert_array_equal(backend().greedy(tiles, n), want)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([(1, 4), (2, 4), (4, 8), (5, 16)]),
       st.sampled_from(["gaussian", "ties", "all_zeros"]))
def test_rowwise_identical_to_numpy(seed, pattern, family):
    n, m = pattern
    tiles = random_tiles(seed, 5, m, family)
    want = nmopt.backends.get("numpy").rowwise(tiles, n)
    np.testing.assert_array_equal(backend().rowwise(tiles, n), want)


def _check_exact(tiles, n, m, saturate, mask, u, v):
    assert (mask.sum(axis=1) <= n).all() and (mask.sum(axis=2) <= n).all()
    if saturate:
        assert (mask.sum(axis=1) == n).all() and (mask.sum(axis=2) == n).all()
    kept = np.where(mask, tiles, 0.0).sum(axis=(1, 2))
    bound = tile_bounds(tiles, n, u, v)
    # The certificate proves optimality up to the integer-cost tolerance of _costs.
    assert (bound >= kept * (1 - 1e-12) - 1e-300).all()
    np.testing.assert_allclose(kept, bound, rtol=1e-7, atol=0)
    return kept


@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p[1] <= 4])
@pytest.mark.parametrize("family", sorted(oracles.INPUTS))
def test_exact_matches_brute_force(pattern, saturate, family):
    n, m = pattern
    tiles = random_tiles(11, 40, m, family)
    mask, u, v, status = backend().exact(tiles, n, saturate)
    assert (status == 0).all()
    kept = _check_exact(tiles, n, m, saturate, mask, u, v)
    # Tiles side by side: the oracle's row-major tile order is the kernel's tile order.
    best = oracles.brute_force_tile_optima(np.concatenate(list(tiles), axis=1), n, m, saturate)
    np.testing.assert_allclose(kept, best, rtol=1e-8, atol=1e-300)


@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p[1] > 4])
@pytest.mark.parametrize("family", ["gaussian", "cauchy", "ties", "zero_heavy", "wide_range"])
def test_exact_matches_mcf(pattern, saturate, family):
    """The successive-shortest-path kernel against OR-Tools min-cost flow (solver 'mcf')."""
    pytest.importorskip("ortools")
    n, m = pattern
    tiles = random_tiles(5, 30, m, family)
    mask, u, v, status = backend().exact(tiles, n, saturate)
    assert (status == 0).all()
    kept = _check_exact(tiles, n, m, saturate, mask, u, v)
    ref, _, _ = nmopt.solvers.get("mcf").solve(tiles, n, saturate=saturate,
                                               backend=nmopt.backends.get("numpy"))
    want = np.where(ref, tiles, 0.0).sum(axis=(1, 2))
    np.testing.assert_allclose(kept, want, rtol=1e-8, atol=1e-300)


def test_ssp_agrees_with_enumeration_on_small_tiles():
    """Both exact kernels on the same integer costs give the same optimum."""
    for n in (1, 2, 3):
        for saturate in (False, True):
            costs = integer_costs(torch.from_numpy(random_tiles(n, 200, 4, "ties")))[0]
            a = kernels.ssp_tiles(costs, n, saturate)
            b = kernels.enumerate_tiles(costs, n, saturate)
            assert torch.equal((costs * a).sum(dim=(1, 2)), (costs * b).sum(dim=(1, 2)))


def test_integer_costs_match_the_shared_scaling():
    tiles = oracles.wide_range(np.random.default_rng(3), (50, 8, 8))
    want, _ = integer_costs(tiles)
    np.testing.assert_array_equal(integer_costs(torch.from_numpy(tiles))[0].numpy(), want)


@pytest.mark.parametrize("shape", [(24, 40), (13, 21), (8, 3, 3, 3)])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_mask_tensor_matches_find_mask(shape, pattern):
    """Device path: same optimum as find_mask's exact solver, any shape (padding, conv view)."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    mask = mask_tensor(w, pattern)
    assert mask.dtype == torch.bool and mask.shape == w.shape and mask.device == w.device
    nmopt.check_mask(mask, pattern)
    ref = nmopt.find_mask(w.numpy(), pattern)
    assert abs(float(w.abs()[mask].double().sum()) - ref.objective) <= 1e-9 * ref.objective
    greedy = mask_tensor(w, pattern, method="greedy")
    g_ref = nmopt.find_mask(w.numpy(), pattern, solver="greedy", backend="numpy").mask
    np.testing.assert_array_equal(greedy.numpy(), g_ref)
    rows = mask_tensor(w, pattern, transposable=False)
    nmopt.check_mask(rows, pattern, transposable=False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_mask_tensor_dtypes(dtype):
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    mask = mask_tensor(w, "4:8")
    nmopt.check_mask(mask, "4:8")
    ref = nmopt.find_mask(w, "4:8", solver="mcf") if "mcf" in nmopt.solvers.available() else None
    if ref is not None:
        assert float(w.double().abs()[mask].sum()) == pytest.approx(ref.objective, rel=1e-9)


def test_mask_tensor_scores_and_saturate():
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(4))
    scores = w.abs() * torch.arange(16.0)  # column saliency
    mask = mask_tensor(w, "2:4", scores=scores, saturate=True)
    tiles = mask.reshape(4, 4, 4, 4)
    assert (tiles.sum(dim=3) == 2).all() and (tiles.sum(dim=1) == 2).all()
    ref = nmopt.find_mask(w, "2:4", scores=scores, saturate=True)
    assert float(scores[mask].double().sum()) == pytest.approx(ref.objective, rel=1e-9)


def test_mask_tensor_errors():
    w = torch.randn(8, 8)
    with pytest.raises(TypeError, match="weight"):
        mask_tensor(w.numpy(), "2:4")
    with pytest.raises(ValueError, match="method"):
        mask_tensor(w, "2:4", method="fast")
    with pytest.raises(ValueError, match="weight"):
        mask_tensor(torch.randn(8), "2:4")
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        mask_tensor(bad, "2:4")
    with pytest.raises(ValueError, match="scores"):
        mask_tensor(w, "2:4", scores=torch.ones(4, 4))
    with pytest.raises(ValueError, match="pattern"):
        mask_tensor(w, "5:4")


def test_apply_mask_and_find_mask_via_backend():
    w = torch.randn(8, 8)
    res = nmopt.find_mask(w, "2:4", solver="greedy", backend="torch")
    assert res.backend == "torch" and isinstance(res.mask, torch.Tensor)
    out = backend().apply_mask(w, res.mask)
    assert torch.equal(out, w * res.mask)
    np.testing.assert_array_equal(backend().apply_mask(w.numpy(), res.mask.numpy()),
                                  w.numpy() * res.mask.numpy())


@gpu
@needs_cuda
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "8:16"])
def test_cuda_masks_equal_cpu_masks(pattern):
    """Integer costs make the exact kernel deterministic: same mask on CUDA as on the CPU."""
    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(0))
    for method in ("exact", "greedy"):
        cpu = mask_tensor(w, pattern, method=method)
        dev = mask_tensor(w.cuda(), pattern, method=method)
        assert dev.device.type == "cuda"
        assert torch.equal(dev.cpu(), cpu)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "3:8"])
def test_torch_exact_solver_through_find_mask(pattern):
    """The registered solver 'torch-exact' runs the kernel through find_mask, certified."""

    scores = oracles.gaussian(np.random.default_rng(8), (40, 56))
    res = nmopt.find_mask(scores, pattern, solver="torch-exact")
    assert res.solver == "torch-exact" and res.backend == "torch" and res.optimal
    assert oracles.violations(res.mask, *map(int, pattern.split(":"))) == []
    lo, hi = oracles.tile_optima(scores, *map(int, pattern.split(":")))
    assert lo.sum() * (1 - 1e-9) <= res.objective <= hi.sum() * (1 + 1e-9)
    t = torch.from_numpy(scores)
    res_t = nmopt.find_mask(t, pattern, solver="torch-exact")
    assert torch.equal(res_t.mask, torch.from_numpy(res.mask))
    with pytest.raises(ValueError, match="torch"):
        nmopt.find_mask(scores, pattern, solver="torch-exact", backend="numpy")
