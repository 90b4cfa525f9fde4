"""``nmopt bench gap``: gaps against the certified optimum, baselines, refusals, outputs."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

import nmopt
from nmopt import _report, solvers
from nmopt.bench import _contenders, gap
from nmopt.bench._gap_report import format_markdown, format_text, write_outputs
from nmopt.cli import main


def _rows_by_solver(rows):
    return {r["solver"]: r for r in rows}


def signed_greedy_oracle(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Independent reference: per tile, visit signed values in descending order (stable)."""
    mask = np.zeros(w.shape, dtype=bool)
    for bi, bj in itertools.product(range(0, w.shape[0], m), range(0, w.shape[1], m)):
        tile = w[bi:bi + m, bj:bj + m]
        rows, cols = np.zeros(m, int), np.zeros(m, int)
        for flat in sorted(range(tile.size), key=lambda k: (-tile.flat[k], k)):
            i, j = divmod(flat, tile.shape[1])
            if rows[i] < n and cols[j] < n:
                rows[i] += 1
                cols[j] += 1
                mask[bi + i, bj + j] = True
    return mask


def test_synthetic_matrices_are_seeded():
    a = gap.synthetic("student-t", 8, 12, seed=3)
    assert a.shape == (8, 12) and a.dtype == np.float32
    assert np.array_equal(a, gap.synthetic("student-t", 8, 12, seed=3))
    assert not np.array_equal(a, gap.synthetic("student-t", 8, 12, seed=4))
    assert not np.array_equal(gap.synthetic("gaussian", 8, 8), gap.synthetic("laplace", 8, 8))
    with pytest.raises(ValueError, match="unknown distribution"):
        gap.synthetic("cauchy", 4, 4)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_bench_matrix_gaps(pattern):
    mat = gap.Matrix("g", gap.synthetic("gaussian", 64, 64), "test")
    rows, ref = gap.bench_matrix(mat, nmopt.parse_pattern(pattern), gap.contenders(),
                                 time_limit=None)
    by = _rows_by_solver(rows)
    assert ref["exact"] and ref["note"] is None
    # the certified optimum is an exact solver's bound and independent exact solvers agree
    opt = nmopt.find_mask(mat.data, pattern, solver="lp")
    assert ref["bound"] >= opt.objective * (1 - 1e-12)
    assert ref["bound"] <= opt.objective * (1 + nmopt.OPTIMALITY_TOL)
    for name in ("mcf", "lp", "networkx"):
        assert by[name]["status"] == "ok" and by[name]["gap"] < 1e-9
    greedy = by["greedy"]
    assert 0 < greedy["gap"] <= 0.5  # the 2-approximation guarantee
    assert greedy["own_gap"] >= greedy["gap"] - 1e-12  # its own bound is weaker or equal
    # signed greedy: the kept |W| of an independent implementation of PyTorch's algorithm
    n, m = map(int, pattern.split(":"))
    oracle = signed_greedy_oracle(mat.data.astype(np.float64), n, m)
    kept = float(np.abs(mat.data.astype(np.float64))[oracle].sum())
    assert by["signed-greedy"]["objective"] == pytest.approx(kept, rel=1e-12)
    assert by["signed-greedy"]["gap"] > greedy["gap"]
    # exactly-N never beats at-most-N; row-wise keeps more and has no gap
    assert by["exactly-N"]["gap"] >= -1e-12
    assert by["row-wise"]["gap"] is None and by["row-wise"]["vs_optimum"] > 1
    for r in rows:
        if r["status"] == "ok":
            assert r["seconds"] > 0 and r["weights_per_s"] > 0
            assert 0 < r["kept_fraction"] <= 1
    if pattern == "2:4":
        assert by["torch-tile"]["status"] == "ok"
        assert by["torch-tile"]["objective"] == pytest.approx(kept, rel=1e-12)
        assert by["enumerate"]["gap"] < 1e-9
    else:
        assert "2:4 only" in by["torch-tile"]["reason"]
        assert "valid tile patterns" in by["enumerate"]["reason"]


def test_signed_greedy_on_odd_shape():
    w = gap.synthetic("laplace", 10, 13)
    res = _contenders._run_signed_greedy(w, nmopt.parse_pattern("2:4"))
    nmopt.check_mask(res.mask, "2:4")
    oracle = signed_greedy_oracle(w.astype(np.float64), 2, 4)
    assert res.objective == pytest.approx(float(np.abs(w.astype(np.float64))[oracle].sum()))


def test_torch_tile_reference_is_there():
    torch = pytest.importorskip("torch")
    import inspect

    fn = _contenders._torch_tile_fn()
    assert list(inspect.signature(fn).parameters) == ["dense"], torch.__version__
    big = np.zeros((1025, 1024), dtype=np.float32)
    assert "up to" in _contenders._refuse_torch_tile(big, nmopt.parse_pattern("2:4"))


def test_refusals_are_reported():
    # 65 x 65 = 4225 tiles of 2:4: more than networkx's default limit of 4096
    mat = gap.Matrix("big", gap.synthetic("gaussian", 260, 260), "test")
    rows, _ = gap.bench_matrix(mat, nmopt.parse_pattern("2:4"),
                               gap.contenders(["networkx", "greedy"]), time_limit=None)
    by = _rows_by_solver(rows)
    assert by["networkx"]["status"] == "skipped" and "max_tiles" in by["networkx"]["reason"]
    assert by["greedy"]["status"] == "ok"


def test_time_limit_skips_slow_contenders():
    def slow(tiles, n, saturate):
        time.sleep(1e-4 * len(tiles))
        return nmopt.backends.get("numpy").greedy(tiles, n)

    slow_c = gap.Contender("slow", "approximate", "transposable",
                           lambda w, p: nmopt.find_mask(w, p, solver=slow), lambda w, p: None)
    mat = gap.Matrix("m", gap.synthetic("gaussian", 256, 256), "test")  # 4096 tiles: >= 0.4 s
    p = nmopt.parse_pattern("2:4")
    rows, _ = gap.bench_matrix(mat, p, [slow_c], time_limit=0.1)
    assert rows[0]["status"] == "skipped" and "estimated" in rows[0]["reason"]
    assert "--time-limit 0.1 s" in rows[0]["reason"]


def test_new_registered_solver_is_picked_up(monkeypatch):
    monkeypatch.setattr(solvers.SOLVERS, "classes", dict(solvers.SOLVERS.classes))
    monkeypatch.setattr(solvers.SOLVERS, "instances", dict(solvers.SOLVERS.instances))

    @solvers.register
    class Dummy(solvers.Solver):
        name = "dummy-greedy"
        backends = None

        def solve(self, tiles, n, *, saturate, backend):
            mask = backend.greedy(tiles, n)
            return mask, np.zeros(tiles.shape[:2]), np.full(tiles.shape[:2], tiles.max())

    assert "dummy-greedy" in gap.contender_names()
    mat = gap.Matrix("m", gap.synthetic("gaussian", 16, 16), "test")
    rows, _ = gap.bench_matrix(mat, nmopt.parse_pattern("2:4"),
                               gap.contenders(["dummy-greedy"]), time_limit=None)
    assert rows[0]["solver"] == "dummy-greedy" and rows[0]["status"] == "ok"
    assert rows[0]["gap"] > 0


def test_without_exact_solver_the_best_bound_is_used(monkeypatch):
    def no_exact(*args, **kwargs):
        raise RuntimeError("no exact solver can take 2:4 here")

    monkeypatch.setattr(solvers, "auto", no_exact)
    mat = gap.Matrix("m", gap.synthetic("gaussian", 32, 32), "test")
    rows, ref = gap.bench_matrix(mat, nmopt.parse_pattern("2:4"), gap.contenders(["greedy"]),
                                 time_limit=None)
    assert not ref["exact"] and "no exact solver could run" in ref["note"]
    assert ref["bound"] == pytest.approx(rows[0]["bound"])
    assert rows[0]["gap"] == pytest.approx(rows[0]["own_gap"])


def test_unknown_contender():
    with pytest.raises(ValueError, match="unknown"):
        gap.contenders(["simplex"])
    # row-wise solvers are the row-wise baseline, not transposable contenders
    assert "rowwise" not in gap.contender_names() and "row-wise" in gap.contender_names()


def test_run_gap_outputs(tmp_path):
    mats = gap.synthetic_matrices(["gaussian", "student-t"], [(32, 32)])
    result = gap.run_gap(mats, ["2:4", "8:16"], ["mcf", "greedy", "row-wise"], repeat=3,
                         time_limit=None, progress=False)
    assert len(result["rows"]) == 2 * 2 * 3 and len(result["references"]) == 4
    assert all(len(r["times"]) == 3 for r in result["rows"])
    paths = write_outputs(result, tmp_path / "g.json", tmp_path / "g.md", tmp_path / "g.png")
    assert len(paths) == 3
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["config"]["patterns"] == ["2:4", "8:16"] and data["rows"][0]["matrix"]
    md = (tmp_path / "g.md").read_text()
    assert "## Summary" in md and "| gaussian 32x32 | 2:4 | mcf |" in md
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_text(result)
    assert "row-wise keeps x1.0" in text and "total" in text
    assert "Skipped" not in format_markdown(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json", "g.md", "g.png"]


def test_weights_files(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from nmopt.checkpoint import save

    path = tmp_path / "m.pt"
    save({"a.weight": torch.randn(8, 8), "a.bias": torch.randn(8),
          "conv.weight": torch.randn(8, 2, 2, 2)}, path)
    mats = gap.file_matrices(str(path))
    assert [m.name for m in mats] == ["m:a.weight", "m:conv.weight"]
    assert mats[1].data.shape == (8, 8)


def test_real_weights_gap(real_weights):
    name, w = next((k, v) for k, v in real_weights.items() if v.ndim == 2)
    mat = gap.Matrix(name, np.ascontiguousarray(w[:64, :64]), "minilm")
    rows, ref = gap.bench_matrix(mat, nmopt.parse_pattern("4:8"),
                                 gap.contenders(["mcf", "lp", "greedy"]), time_limit=None)
    by = _rows_by_solver(rows)
    assert ref["exact"] and by["mcf"]["gap"] < 1e-9 and by["lp"]["gap"] < 1e-9
    assert 0 < by["greedy"]["gap"] <= 0.5


def test_cli_bench_gap(tmp_path, capsys):
    out = tmp_path / "g.json"
    rc = main(["bench", "gap", "--sizes", "16,8x24", "--dists", "laplace", "--patterns", "2:4",
               "--solvers", "mcf,signed-greedy", "--json", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "laplace 16x16" in text and "laplace 8x24" in text and f"wrote {out}" in text
    assert len(json.loads(out.read_text())["rows"]) == 4
    assert main(["bench", "gap", "--solvers", "simplex"]) == 2
    assert "unknown simplex" in capsys.readouterr().err
    assert main(["bench", "gap", "--patterns", "3:2"]) == 2
    assert main(["bench", "gap", "--sizes", "0"]) == 2
    assert main(["bench", "gap", "--markdown", str(tmp_path / "x.txt")]) == 2
    assert list(tmp_path.iterdir()) == [out]


def test_report_helpers(tmp_path):
    cols = [_report.Column("name", "name", align="<"), _report.Column("x", "value", "{:.2f}")]
    rows = [{"name": "a|b", "x": 1.0}, {"name": "long name", "x": None}]
    table = _report.format_table(rows, cols).splitlines()
    assert table[0] == "name       value" and table[2] == "a|b         1.00"
    assert table[3] == "long name      -"
    md = _report.markdown_table(rows, cols).splitlines()
    assert md[1] == "| :--- | ---: |" and md[2] == "| a\\|b | 1.00 |"
    path = tmp_path / "d.json"
    _report.write_json(path, {"a": np.float32(1.5), "b": np.arange(3), "c": float("nan"),
                              "d": (1, 2)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": None, "d": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]
    env = _report.environment()
    assert env["versions"]["numpy"] == np.__version__


def test_write_outputs_writes_what_the_options_ask_for(tmp_path):
    from types import SimpleNamespace

    args = SimpleNamespace(json=tmp_path / "r.json", markdown=tmp_path / "r.md", plot=None)
    seen = []
    written = _report.write_outputs(args, {"a": 1}, lambda plot: seen.append(plot) or "# r\n", draw=None)
    assert written == [str(args.json), str(args.markdown)] and seen == [None]
    assert (tmp_path / "r.md").read_text() == "# r\n" and json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert _report.write_outputs(SimpleNamespace(json=None, markdown=None, plot=None), {"a": 1}) == []
