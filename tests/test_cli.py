"""The ``nmopt`` command line, run in-process through ``main([...])`` and once as a script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nmopt
from nmopt.cli import main

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from nmopt.checkpoint import load, save


def state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(12, 8, generator=g),
        "l1.weight": torch.randn(16, 8, generator=g),
        "l1.bias": torch.randn(16, generator=g),
        "norm.weight": torch.ones(16),
        "l2.weight": torch.randn(8, 16, generator=g).half(),
        "conv.weight": torch.randn(8, 2, 2, 2, generator=g),
        "steps": torch.tensor(3, dtype=torch.int64),
        "keep": torch.ones(8, 8, dtype=torch.bool),
    }


PRUNED = {"l1.weight", "l2.weight", "conv.weight"}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.safetensors"
    save(state_dict(), path)
    return path


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nmopt {nmopt.__version__}"
    for argv in (["--help"], ["prune", "--help"], ["bench", "--help"], ["bench", "gap", "--help"],
                 ["diversity", "--help"], ["solvers", "--help"], ["backends", "--help"],
                 ["demo", "--help"]):
        assert main(argv) == 0
        assert "usage: nmopt" in capsys.readouterr().out
    assert main([]) == 2  # no command: help on stderr


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_prune_end_to_end(tmp_path, capsys, ext):
    src = tmp_path / f"model{ext}"
    save(state_dict(), src)
    out, masks, report = tmp_path / f"out{ext}", tmp_path / "masks.safetensors", tmp_path / "r.json"
    rc = main(["prune", str(src), "--pattern", "4:8", "--out", str(out), "--masks", str(masks),
               "--report", str(report), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "4:8 transposable masks for 3 layers" in text and "total (3 layers)" in text
    for name in PRUNED:
        assert name in text
    original, pruned, kept = load(src), load(out), load(masks)
    data = json.loads(report.read_text())
    assert set(kept) == PRUNED == {x["name"] for x in data["layers"]}
    for layer in data["layers"]:
        name = layer["name"]
        w, mask = original[name], kept[name]
        nmopt.check_mask(mask, "4:8")  # tile by tile, rows and columns
        assert pruned[name].dtype == w.dtype
        assert torch.equal(pruned[name], w.masked_fill(~mask, 0))
        assert layer["objective"] == pytest.approx(float(w.double().abs()[mask].sum()), rel=1e-12)
        ref = nmopt.find_mask(w, "4:8", solver="lp")
        assert layer["objective"] == pytest.approx(ref.objective, rel=1e-7)
        assert layer["bound"] >= layer["objective"]
    # integer, bool and 1-D tensors and the embedding are copied unchanged
    for name in set(original) - PRUNED:
        assert torch.equal(pruned[name], original[name])
        assert pruned[name].dtype == original[name].dtype
    assert _files(tmp_path) == sorted([src.name, out.name, masks.name, report.name])


def test_prune_row_wise_and_include(ckpt, tmp_path):
    out = tmp_path / "rw.safetensors"
    masks = tmp_path / "rw-masks.safetensors"
    assert main(["prune", str(ckpt), "--pattern", "2:4", "--row-wise", "--include", "embed|l1",
                 "--exclude", "bias", "--out", str(out), "--masks", str(masks)]) == 0
    kept = load(masks)
    assert set(kept) == {"embed.weight", "l1.weight"}
    for m in kept.values():
        nmopt.check_mask(m, "2:4", transposable=False)


def test_overwrite_guard_and_force(ckpt, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    args = ["prune", str(ckpt), "--pattern", "2:4", "--out", str(out)]
    assert main(args) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(args[:3] + ["4:8"] + args[4:]) == 2
    assert "exists; pass --force" in _one_error_line(capsys)
    assert out.read_bytes() == before
    report = tmp_path / "r.json"
    report.write_text("{}")
    fresh = ["prune", str(ckpt), "--pattern", "2:4", "--out", str(tmp_path / "new.pt")]
    assert main(fresh + ["--report", str(report)]) == 2  # an existing report is guarded too
    assert "--report" in _one_error_line(capsys)
    assert not (tmp_path / "new.pt").exists() and report.read_text() == "{}"
    assert main(args[:3] + ["4:8"] + args[4:] + ["--force"]) == 0
    assert out.read_bytes() != before


def test_refuses_to_overwrite_input(ckpt, tmp_path, capsys):
    before = ckpt.read_bytes()
    other_path = tmp_path / "sub" / ".." / ckpt.name
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.safetensors"
    os.symlink(ckpt, link)
    for target in (ckpt, other_path, link):
        assert main(["prune", str(ckpt), "--pattern", "2:4", "--out", str(target),
                     "--force"]) == 2
        assert "is the input file" in _one_error_line(capsys)
    assert main(["prune", str(ckpt), "--pattern", "2:4", "--out", str(tmp_path / "o.pt"),
                 "--masks", str(link), "--force"]) == 2
    _one_error_line(capsys)
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("pattern", ["5:4", "0:4", "2-4", "two:four", "2:128"])
def test_wrong_pattern(ckpt, tmp_path, capsys, pattern):
    out = tmp_path / "out.pt"
    assert main(["prune", str(ckpt), "--pattern", pattern, "--out", str(out)]) == 2
    assert "pattern" in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv,code,text", [
    (["--out", "{d}/o.npz"], 2, "unknown extension"),
    (["--out", "{d}/o.pt", "--masks", "{d}/m.pt"], 2, "masks are written as .safetensors"),
    (["--out", "{d}/o.pt", "--report", "{d}/r.txt"], 2, ".json"),
    (["--out", "{d}/o.pt", "--solver", "nope"], 2, "unknown solver"),
    (["--out", "{d}/o.pt", "--solver", "rowwise"], 2, "row-wise masks"),
    (["--out", "{d}/o.pt", "--solver", "enumerate", "--pattern", "4:8"], 2, "valid tile patterns"),
    (["--out", "{d}/o.pt", "--backend", "nope"], 2, "unknown backend"),
    (["--out", "{d}/o.pt", "--include", "("], 2, "invalid regular expression"),
    (["--out", "{d}/missing-dir/o.pt"], 2, "does not exist"),
    (["--out", "{d}/o.pt", "--include", "nothing-matches"], 1, "nothing to prune"),
])
def test_usage_and_failure_errors(ckpt, tmp_path, capsys, argv, code, text):
    argv = [a.format(d=tmp_path) for a in argv]
    rc = main(["prune", str(ckpt), "--pattern", "2:4", *argv])
    assert rc == code
    assert text in _one_error_line(capsys)
    assert _files(tmp_path) == [ckpt.name]


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_unreadable_inputs(tmp_path, capsys, ext):
    src = tmp_path / f"model{ext}"
    save(state_dict(), src)
    src.write_bytes(src.read_bytes()[:300])  # truncated
    out = tmp_path / "out.safetensors"
    assert main(["prune", str(src), "--pattern", "2:4", "--out", str(out)]) == 1
    assert "cannot read" in _one_error_line(capsys)
    assert main(["prune", str(tmp_path / f"absent{ext}"), "--pattern", "2:4", "--out",
                 str(out)]) == 1
    assert "no such file" in _one_error_line(capsys)
    assert _files(tmp_path) == [src.name]


def test_non_tensor_entry_is_an_error(tmp_path, capsys):
    src = tmp_path / "model.pt"
    torch.save({"w": torch.ones(4, 4), "epoch": 3}, src)
    assert main(["prune", str(src), "--pattern", "2:4", "--out", str(tmp_path / "o.pt")]) == 1
    assert "entry 'epoch' is a int, not a tensor" in _one_error_line(capsys)


def test_interrupted_run_leaves_nothing(ckpt, tmp_path, capsys, monkeypatch):
    from nmopt import prune as prune_mod

    real, calls = prune_mod.find_mask, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_mod, "find_mask", interrupted)
    rc = main(["prune", str(ckpt), "--pattern", "2:4", "--out", str(tmp_path / "o.pt"),
               "--masks", str(tmp_path / "m.safetensors"), "--report", str(tmp_path / "r.json")])
    assert rc == 130
    assert "interrupted" in _one_error_line(capsys)
    assert _files(tmp_path) == [ckpt.name]  # no output, no temporary file


def test_failing_layer_leaves_nothing(ckpt, tmp_path, capsys, monkeypatch):
    from nmopt import prune as prune_mod

    real, calls = prune_mod.find_mask, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("solver exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_mod, "find_mask", failing)
    rc = main(["prune", str(ckpt), "--pattern", "2:4", "--out", str(tmp_path / "o.safetensors")])
    assert rc == 1
    line = _one_error_line(capsys)
    assert "solver exploded" in line and "layer" in line
    assert _files(tmp_path) == [ckpt.name]


def test_small_commands(capsys):
    assert main(["diversity", "4:8"]) == 0
    assert "116963796250" in capsys.readouterr().out
    assert main(["diversity", "2:4", "--at-most"]) == 0
    assert ": 7343 " in capsys.readouterr().out
    assert main(["diversity", "2:4", "--row-wise", "--shape", "4", "8"]) == 0
    assert f": {6 ** 8} " in capsys.readouterr().out
    assert main(["diversity", "2:4", "--shape", "4", "6"]) == 2  # a usage error
    assert "shape" in _one_error_line(capsys)
    assert main(["solvers"]) == 0
    out = capsys.readouterr().out
    for name, why in nmopt.solvers.status().items():
        assert name in out
        assert ("available" if why is None else why) in out
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in nmopt.backends.names():
        assert name in out


def test_bench_registry_skips_missing_and_propagates_other_errors(monkeypatch):
    import argparse
    import importlib

    from nmopt import bench

    parser = argparse.ArgumentParser()
    monkeypatch.setattr(bench, "BENCHMARKS", ("gap", "not_written_yet"))
    assert bench.add_parsers(parser.add_subparsers()) == ["gap"]

    real = importlib.import_module

    def broken(name, *args):
        if name.endswith(".gap"):
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")
        return real(name, *args)

    monkeypatch.setattr(bench.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        bench.add_parsers(argparse.ArgumentParser().add_subparsers())


def test_demo_small(tmp_path, capsys, monkeypatch):
    from nmopt import demo

    monkeypatch.setattr(demo, "DEMO_SIZES", ((64, 64),))
    full = demo.demo_state_dict
    # the same tensors, cut to a few rows, so that the test stays fast
    monkeypatch.setattr(demo, "demo_state_dict", lambda seed=0: {
        k: (v[:16] if v.ndim >= 2 else v) for k, v in full(seed).items()})
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "re-validate" in out and "done in" in out
    names = _files(tmp_path / "demo")
    assert names == sorted(["gap.json", "gap.md", "gap.png", "demo-model.safetensors",
                            "demo-model-4of8.safetensors", "demo-masks-4of8.safetensors",
                            "demo-prune-report.json"])
    report = json.loads((tmp_path / "demo" / "demo-prune-report.json").read_text())
    masks = load(tmp_path / "demo" / "demo-masks-4of8.safetensors")
    assert {x["name"] for x in report["layers"]} == set(masks)
    for m in masks.values():
        nmopt.check_mask(m, "4:8")


def test_imports_stay_light():
    code = ("import sys, nmopt.cli, nmopt.prune, nmopt.checkpoint, nmopt._report; "
            "nmopt.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'ortools', 'networkx', 'matplotlib', 'safetensors') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_console_script(ckpt, tmp_path):
    exe = shutil.which("nmopt", path=str(Path(sys.executable).parent)) or shutil.which("nmopt")
    if exe is None:
        pytest.skip("the nmopt console script is not installed (pip install -e .)")
    res = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stdout.strip() == f"nmopt {nmopt.__version__}"
    out = tmp_path / "out.pt"
    res = subprocess.run([exe, "prune", str(ckpt), "--pattern", "2:4", "--out", str(out)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "total (3 layers)" in res.stdout
    for name, mask in ((n, load(out)[n] != 0) for n in PRUNED):
        assert nmopt.is_valid_mask(mask, "2:4"), name
    res = subprocess.run([exe, "prune", str(ckpt), "--pattern", "9:4", "--out", str(out)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
