"""Hostile inputs to ``find_mask`` and the thread setting (issue 15): extreme scales, the
thread count, meta and sparse tensors. Each gets the right answer or one clear error."""

from __future__ import annotations

import numpy as np
import pytest

import nmopt
from nmopt.backends import BACKENDS
from nmopt.cli import main

W = np.random.default_rng(0).standard_normal((64, 64))


@pytest.mark.parametrize("solver", ["mcf", "networkx", "lp", "exact", "torch-exact"])
@pytest.mark.parametrize("scale", [1e-300, 1e-310, 1e300])
def test_extreme_scales_are_certified_optimal(solver, scale):
    if solver not in nmopt.solvers.available():
        pytest.skip(f"{solver} not installed")
    w = W[:16, :16] if solver == "networkx" else W
    ref = nmopt.find_mask(w, "4:8", solver="exact" if "exact" in nmopt.solvers.available()
                          else "mcf")
    res = nmopt.find_mask(w * scale, "4:8", solver=solver)
    assert res.optimal and res.gap <= 1e-9, (res.gap, solver)
    assert np.isfinite(res.objective) and np.isfinite(res.bound)
    if scale > 1e-305:  # subnormal scores lose digits: only the certificate is compared
        assert res.objective == pytest.approx(ref.objective * scale, rel=1e-9)


@pytest.mark.parametrize("solver", ["auto", "mcf", "greedy"])
def test_scores_whose_sums_overflow_are_refused(solver, recwarn):
    for w in (W * 1e306, (W * 1e306)[:63]):  # read in place, and with edge tiles
        with pytest.raises(ValueError, match="weights: the kept score or its bound overflows "
                                             "float64 .*scale the weights down"):
            nmopt.find_mask(w, "4:8", solver=solver)
    assert not [w for w in recwarn if "overflow" in str(w.message)]


def test_thread_count_overflow_is_one_clear_error(monkeypatch, tmp_path, capsys):
    if BACKENDS.instance("cffi").unavailable_reason() is not None:
        pytest.skip("C kernels not built")
    monkeypatch.setenv("NMOPT_NUM_THREADS", "3000000000")
    with pytest.raises(ValueError, match="NMOPT_NUM_THREADS='3000000000': expected an integer "
                                         "from 1 to 4096"):
        nmopt.find_mask(W, "4:8")
    np_ckpt = tmp_path / "w.safetensors"
    nmopt.checkpoint.save({"a.weight": W.astype(np.float32)}, np_ckpt)
    assert main(["prune", str(np_ckpt), "--pattern", "2:4", "--out",
                 str(tmp_path / "o.safetensors"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "NMOPT_NUM_THREADS" in err
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(ValueError, match="num_threads: expected an integer from 1 to 4096"):
        BACKENDS.instance("cffi").num_threads = 2**40


def test_meta_and_sparse_tensors_are_named():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="weights: tensor is on the meta device"):
        nmopt.find_mask(torch.empty(8, 8, device="meta"), "2:4")
    with pytest.raises(TypeError, match=r"weights: torch.sparse_coo tensors are not supported; "
                                        r"pass a dense tensor \(x.to_dense\(\)\)"):
        nmopt.find_mask(torch.eye(8).to_sparse(), "2:4")
    with pytest.raises(ValueError, match="scores: tensor is on the meta device"):
        nmopt.find_mask(torch.eye(8), "2:4", scores=torch.empty(8, 8, device="meta"))
