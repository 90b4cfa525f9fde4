"""Hostile inputs to the solver API: byte order, a callable that changes its input, kept
padding, tampered warm starts, odd mask and price types, malformed packed weights, counts too
large to finish, overflowing scores on every backend."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

import nmopt
from nmopt import cli
from nmopt.cli import main
from nmopt.packed import PackedNM, pack, sparse_matmul, unpack

RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 12))


@pytest.mark.parametrize("dtype", [">f8", ">f4"])
@pytest.mark.parametrize("kw", [{}, {"solver": "greedy"}, {"transposable": False}],
                         ids=["exact", "greedy", "rowwise"])
def test_big_endian_weights_give_the_native_result(dtype, kw):
    """The C kernels read native byte order: a big-endian array once gave a wrong mask with
    an objective near 1e303 and optimal=True."""
    native = nmopt.find_mask(W.astype(dtype[1:]), "2:4", **kw)
    got = nmopt.find_mask(W.astype(dtype), "2:4", **kw)
    assert np.array_equal(got.mask, native.mask)
    assert got.objective == pytest.approx(native.objective, rel=1e-12)
    assert got.bound == pytest.approx(native.bound, rel=1e-12)


def test_a_callable_solver_that_changes_its_tiles_cannot_corrupt_the_certificate():
    def vandal(tiles, n, saturate):
        tiles[...] = 0
        return np.zeros(tiles.shape, dtype=bool)

    res = nmopt.find_mask(W, "2:4", solver=vandal)
    assert res.objective == 0.0 and not res.optimal
    assert res.bound >= nmopt.find_mask(W, "2:4").objective  # a bound on the real scores
    assert res.bound == pytest.approx(nmopt.dual_bound(np.abs(W), "2:4", res.u, res.v))


@pytest.mark.parametrize("solver", ["exact", "enumerate", "networkx"])
def test_edge_tiles_are_filled_to_a_maximal_mask(solver):
    """Kept padding used to count as a row's or column's, leaving real free slots unset."""
    res = nmopt.find_mask(np.zeros((5, 7)), "2:4", solver=solver)
    mask = np.zeros((8, 8), dtype=bool)
    mask[:5, :7] = res.mask
    real = np.zeros((8, 8), dtype=bool)
    real[:5, :7] = True
    for r in range(0, 8, 4):
        for c in range(0, 8, 4):
            t, ok = mask[r:r + 4, c:c + 4], real[r:r + 4, c:c + 4]
            free = ok & ~t & (t.sum(axis=1) < 2)[:, None] & (t.sum(axis=0) < 2)[None, :]
            assert not free.any(), (r, c)
    nmopt.check_mask(res.mask, "2:4")


@pytest.mark.parametrize("bad", [lambda v: v.tolist(), lambda v: v[:, :-1], lambda v: None],
                         ids=["list", "shape", "none"])
def test_a_tampered_warm_start_is_refused_by_name(bad):
    prev = nmopt.find_mask(W, "2:4")
    tampered = dataclasses.replace(prev, v=bad(prev.v))
    if tampered.v is None:  # a result without prices starts cold, as documented
        assert nmopt.find_mask(W, "2:4", warm_start=tampered).objective == prev.objective
        return
    with pytest.raises(ValueError, match=r"warm_start: its column prices v"):
        nmopt.find_mask(W, "2:4", warm_start=tampered)


def test_warm_start_of_a_conv_weight():
    w = RNG.standard_normal((8, 4, 2, 2))
    prev = nmopt.find_mask(w, "2:4")
    again = nmopt.find_mask(w * 1.001, "2:4", warm_start=prev)
    assert again.optimal and np.array_equal(again.mask, prev.mask)


def test_check_mask_takes_a_bfloat16_tensor():
    torch = pytest.importorskip("torch")
    block = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    nmopt.check_mask(block.to(torch.bfloat16), "2:4")
    with pytest.raises(ValueError):
        nmopt.check_mask(torch.ones(4, 4, dtype=torch.bfloat16), "2:4")


def test_dual_bound_names_bad_prices():
    with pytest.raises(TypeError, match="u: expected a numpy array or torch tensor"):
        nmopt.dual_bound(np.abs(W), "2:4", "abc")


def test_pattern_takes_numpy_integers():
    p = nmopt.Pattern(np.int64(2), np.int32(4))
    assert p == nmopt.Pattern(2, 4) and type(p.n) is int and str(p) == "2:4"


def test_packed_positions_must_be_distinct_and_the_shape_integral():
    values = np.array([[1.0, 2.0]], np.float32)
    dup = PackedNM(values, np.array([[0, 0]], np.uint8), 2, 4, (1, 4))
    for call in (lambda: unpack(dup), lambda: sparse_matmul(np.ones((1, 4), np.float32), dup)):
        with pytest.raises(ValueError, match="names a position twice"):
            call()
    with pytest.raises(ValueError, match="shape"):
        PackedNM(values, np.array([[0, 1]], np.uint8), 2, 4, (1.0, 4.9))
    w = RNG.standard_normal((4, 8)).astype(np.float32)
    mask = nmopt.find_mask(w, "2:4", transposable=False).mask
    packed = pack(w, mask, "2:4")
    assert np.array_equal(unpack(packed), np.where(mask, w, 0))


def test_counting_that_would_take_hours_is_refused():
    with pytest.raises(ValueError, match="too large to count exactly"):
        nmopt.mask_diversity("6:12", at_most=True)  # refused after 1.6 M steps


@pytest.mark.parametrize("backend", ["numpy", "cffi", "torch"])
def test_overflowing_scores_name_the_weights_on_every_backend(backend):
    try:
        nmopt.backends.get(backend)
    except Exception as exc:  # an optional backend not built or installed here
        pytest.skip(str(exc))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match="weights: the kept score or its bound overflows"):
            nmopt.find_mask(np.full((4, 4), 1e308), "2:4", backend=backend)


@pytest.mark.parametrize("argv, says", [(["--seed", "-1"], "--seed"),
                                        (["--time-limit", "nan"], "--time-limit")])
def test_bench_gap_usage_errors(capsys, argv, says):
    assert main(["bench", "gap", "--sizes", "8", "--no-progress", *argv]) == 2
    assert says in capsys.readouterr().err


def test_mask_tensor_saturate_keeps_edge_tiles_at_most_n_as_find_mask():
    torch = pytest.importorskip("torch")
    from nmopt.backends.torch_backend import mask_tensor

    w = torch.from_numpy(RNG.standard_normal((7, 9)))
    got = mask_tensor(w, "2:4", saturate=True)
    want = nmopt.find_mask(w.numpy(), "2:4", saturate=True)
    assert float(w.abs()[got].sum()) == pytest.approx(want.objective, rel=1e-12)
    nmopt.check_mask(got.numpy(), "2:4")
    with pytest.raises(TypeError, match="weight: dtype torch.bool"):
        mask_tensor(torch.ones(4, 4, dtype=torch.bool), "2:4")
    with pytest.raises(TypeError, match="scores: expected a torch.Tensor"):
        mask_tensor(w, "2:4", scores=np.abs(w.numpy()))


@pytest.mark.parametrize("argv, flag", [
    (["bench", "speed", "--threads", "100000"], "--threads"),  # torch segfaulted on it
    (["bench", "kernels", "--threads", "100000"], "--threads"),
    (["bench", "speed", "--repeats", "0"], "--repeats"),
    (["bench", "speed", "--min-time", "nan"], "--min-time"),
    (["bench", "train", "--steps", "0"], "--steps"),
    (["bench", "train", "--eval-every", "0"], "--eval-every"),
    (["bench", "train", "--dense-fraction", "2"], "--dense-fraction"),
    (["bench", "prune-memory", "--shards", "0"], "--shards"),
    (["demo", "--time-limit", "-1"], "--time-limit"),
    (["prune", "x", "--pattern", "2:4", "--out", "y", "--nsamples", "0"], "--nsamples"),
])
def test_bad_numbers_are_usage_errors_naming_the_flag(capsys, argv, flag):
    assert main(argv) == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("extra, says", [
    (["--plot", "x.txt"], "--plot"), (["--json", "no-such-dir/x.json"], "does not exist"),
    (["--markdown", "x.json"], "--markdown"),
])
def test_bench_outputs_are_checked_before_the_run(tmp_path, capsys, monkeypatch, extra, says):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "gap", "--sizes", "8", "--no-progress", *extra]) == 2
    assert says in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_missing_optional_module_names_its_extra():
    from nmopt.cli import _line

    exc = ModuleNotFoundError("No module named 'torch'", name="torch")
    assert "pip install 'nmopt[torch]'" in _line(exc)


def test_python_dash_m_nmopt_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "nmopt", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("nmopt ")


def test_diversity_of_a_huge_matrix_is_its_magnitude(capsys):
    assert main(["diversity", "2:4", "--shape", "400000", "400000"]) == 0  # was minutes, GBs
    assert "~10^19542425094.39" in capsys.readouterr().out
    with pytest.raises(ValueError, match="bits"):
        nmopt.mask_diversity("2:4", shape=(400000, 400000))


@pytest.mark.parametrize("argv, says", [
    (["bench", "speed", "--patterns", "foo"], "--patterns"),
    (["bench", "kernels", "--out", "{file}", "--size", "64"], "is a file"),
])
def test_more_bench_usage_errors_before_the_run(tmp_path, capsys, argv, says):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([a.replace("{file}", str(afile)) for a in argv]) == 2
    assert says in capsys.readouterr().err


def test_a_solver_and_a_backend_it_does_not_run_on_are_refused_up_front(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from nmopt.checkpoint import save

    src = tmp_path / "w.safetensors"
    save({"w": RNG.standard_normal((8, 8)).astype(np.float32)}, src)
    assert main(["prune", str(src), "--pattern", "2:4", "--solver", "exact", "--backend", "numpy",
                 "--out", str(tmp_path / "o.safetensors"), "--no-progress"]) == 2
    assert "--solver exact runs on" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("flags", [["--nsamples", "4"], ["--seed", "3", "--device", "cpu"],
                                   ["--blocks", "layers"], ["--seqlen", "32"]])
def test_model_only_flags_are_refused_on_a_checkpoint(tmp_path, capsys, flags):
    pytest.importorskip("safetensors")
    from nmopt.checkpoint import save

    src = tmp_path / "w.safetensors"
    save({"w": RNG.standard_normal((8, 8)).astype(np.float32)}, src)
    out = tmp_path / "o.safetensors"
    assert main(["prune", str(src), "--pattern", "2:4", *flags, "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in flags if f.startswith("--")) and "--calibration" in err
    assert not out.exists()


def test_a_dangling_link_as_out_is_refused_before_the_work_and_replaced_with_force(
        tmp_path, capsys, monkeypatch):
    pytest.importorskip("safetensors")
    from nmopt.checkpoint import save

    src = tmp_path / "w.safetensors"
    save({"w": RNG.standard_normal((8, 8)).astype(np.float32)}, src)
    link = tmp_path / "o.safetensors"
    link.symlink_to(tmp_path / "missing" / "x.safetensors")
    argv = ["prune", str(src), "--pattern", "2:4", "--out", str(link), "--no-progress"]
    with monkeypatch.context() as m:  # refused before any pruning
        m.setattr(cli, "prune_path", lambda *a, **k: pytest.fail("pruned before refusing"))
        assert main(argv) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0
    assert not link.is_symlink() and link.stat().st_size > 0


def test_bench_posttrain_makes_its_out_directory_only_after_the_run(tmp_path, monkeypatch, capsys):
    from nmopt.bench import posttrain

    def failing(args):
        raise RuntimeError("the run failed")

    monkeypatch.setattr(posttrain, "run", failing)
    monkeypatch.setattr(posttrain, "_validate", lambda args: None)  # no model needed
    out = tmp_path / "new" / "results"
    assert main(["bench", "posttrain", "--quick", "--out", str(out)]) == 1
    assert "the run failed" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_packed_calls_avoid_a_backend_without_packed_kernels(monkeypatch):
    w = RNG.standard_normal((8, 16)).astype(np.float32)
    mask = nmopt.find_mask(w, "2:4").mask
    with pytest.raises(ValueError, match="'torch' has no packed N:M kernels"):
        pack(w, mask, "2:4", backend="torch")
    monkeypatch.setenv("NMOPT_BACKEND", "torch")
    with pytest.warns(RuntimeWarning, match="NMOPT_BACKEND='torch' cannot serve"):
        p = pack(w, mask, "2:4")
    with pytest.warns(RuntimeWarning, match="NMOPT_BACKEND='torch' cannot serve"):
        assert np.array_equal(unpack(p), w * mask)


def test_diversity_shape_not_of_whole_tiles_is_a_usage_error(capsys):
    assert main(["diversity", "4:8", "--shape", "10", "16"]) == 2
    assert "--shape: expected (rows, cols)" in capsys.readouterr().err


def test_prune_memory_has_no_plot_option_and_makes_out_only_after_the_run(tmp_path, capsys,
                                                                           monkeypatch):
    from nmopt.bench import prune_memory

    assert main(["bench", "prune-memory", "--plot", str(tmp_path / "x.png")]) == 2
    monkeypatch.setattr(prune_memory, "run", lambda args, log: (_ for _ in ()).throw(
        RuntimeError("the run failed")))
    assert main(["bench", "prune-memory", "--out", str(tmp_path / "new")]) == 1
    assert not (tmp_path / "new").exists()


def test_bench_out_as_a_broken_link_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    from nmopt.bench import prune_memory

    monkeypatch.setattr(prune_memory, "run", lambda args, log: pytest.fail("ran before refusing"))
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing")
    assert main(["bench", "prune-memory", "--out", str(link)]) == 2
    assert "is a broken link" in capsys.readouterr().err


def test_packed_indices_stay_read_only_through_pickle_and_deepcopy():
    import copy
    import pickle

    w = RNG.standard_normal((4, 8)).astype(np.float32)
    p = pack(w, nmopt.find_mask(w, "2:4", transposable=False).mask, "2:4")
    for q in (pickle.loads(pickle.dumps(p)), copy.deepcopy(p)):
        assert not q.indices.flags.writeable and np.array_equal(unpack(q), unpack(p))
