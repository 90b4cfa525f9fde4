"""``nmopt bench train`` and ``nmopt bench speed`` in their tiny configurations."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def parse(module, argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    module.add_parser(sub)
    return parser.parse_args(argv)


def test_modules_import_without_torch():
    code = ("import sys, nmopt.bench.train, nmopt.bench.speed; "
            "assert 'torch' not in sys.modules, 'torch imported at module level'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_train_quick(tmp_path, capsys):
    from nmopt.bench import train

    out = {k: tmp_path / f"train.{k}" for k in ("json", "md", "png")}
    args = parse(train, ["train", "--quick", "--quiet", "--variants",
                         "dense,rowwise-2:4,transposable-4:8", "--json", str(out["json"]),
                         "--markdown", str(out["md"]), "--plot", str(out["png"])])
    assert args.func(args) == 0
    result = json.loads(out["json"].read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "rowwise-2:4", "transposable-4:8"]
    for r in rows.values():
        assert math.isfinite(r["val_loss"]) and r["step_ms"] > 0
    assert rows["dense"]["vs_dense"] == 0.0
    sparse = rows["transposable-4:8"]
    assert sparse["refreshes"] == 1 + 6 // 3 and 0.45 < sparse["density"] <= 0.5
    assert "standard-library" in out["md"].read_text()
    s = result["settings"]  # 6 steps of batch 4, context 32, over 90% of 64 000 bytes
    assert s["passes"] == pytest.approx(6 * 4 * 32 / s["train_chars"]) and s["passes"] < 1
    assert f"({s['passes']:.2f} passes over the training text)" in out["md"].read_text()
    assert out["png"].stat().st_size > 1000
    assert "transposable-4:8" in capsys.readouterr().out


def test_bench_train_jobs_give_the_same_rows(tmp_path):
    """Variants trained in worker processes (--jobs 2) end where a sequential run ends."""
    from nmopt.bench import train

    def rows(jobs):
        out = tmp_path / f"jobs{jobs}.json"
        args = parse(train, ["train", "--quick", "--quiet", "--threads", "1", "--jobs", str(jobs),
                             "--variants", "dense,transposable-2:4", "--json", str(out)])
        assert args.func(args) == 0
        return {r["variant"]: r["val_loss"] for r in json.loads(out.read_text())["rows"]}

    assert rows(2) == rows(1)


def test_bench_train_rejects_unknown_variant(capsys):
    from nmopt.bench import train

    args = parse(train, ["train", "--quick", "--variants", "dense,sparse-3:7"])
    assert args.func(args) == 2
    assert "sparse-3:7" in capsys.readouterr().err


def test_load_corpus_stops_at_what_the_standard_library_holds():
    """A request beyond the corpus gets all of it (and ``run`` says so), never an error."""
    from nmopt.bench import train

    small, _ = train.load_corpus(50_000)
    everything, files = train.load_corpus(10**12)
    assert len(small) == 50_000 and everything.startswith(small)
    assert 50_000 < len(everything) < 10**12 and len(files) > 10


def test_bench_speed_quick(tmp_path):
    from nmopt.bench import speed

    out = {k: tmp_path / f"speed.{k}" for k in ("json", "md", "png")}
    args = parse(speed, ["speed", "--quick", "--json", str(out["json"]), "--markdown",
                         str(out["md"]), "--plot", str(out["png"])])
    assert args.func(args) == 0
    result = json.loads(out["json"].read_text())
    ops = {(r["op"], r["kernel"]) for r in result["rows"]}
    assert {("forward", "dense"), ("forward", "masked dense"), ("backward-data", "dense"),
            ("linear fwd+bwd", "dense")} <= ops
    dense_ops = {r["op"] for r in result["rows"] if r["kernel"] == "dense"}
    for r in result["rows"]:
        assert r["ms"] > 0
        assert (r["speedup"] > 0) if r["op"] in dense_ops else ("speedup" not in r)
    assert out["png"].stat().st_size > 1000 and "speed" in out["md"].read_text()
