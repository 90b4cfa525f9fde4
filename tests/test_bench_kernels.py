"""``nmopt bench kernels`` at tiny sizes: the record's structure, never its timings."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from nmopt import backends, solvers
from nmopt.bench import BENCHMARKS
from nmopt.bench._kernel_cases import MEMORY, RATIOS
from nmopt.cli import main

PATTERNS = ["2:4", "4:8", "8:16", "16:32"]
TINY = ["bench", "kernels", "--size", "64", "--mcf-size", "32", "--repeat", "1", "--quiet"]


def run_tiny(out, *extra: str) -> dict:
    assert main([*TINY, "--out", str(out), *extra]) == 0
    return json.loads((out / "kernels.json").read_text())


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    result = run_tiny(out, "--memory-size", "256", "--batches", "1,16")
    return result, (out / "kernels.md").read_text()


def rows_of(result: dict, key: str) -> list[dict]:
    return [r for r in result["ratios"] if r["ratio"] == key]


def test_registered_and_light():
    assert "kernels" in BENCHMARKS
    code = ("import sys, nmopt.bench.kernels; "
            "assert not {'torch', 'ortools'} & set(sys.modules), 'heavy import at module level'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_ratio_is_a_number_or_a_skip_with_a_reason(record):
    result, _ = record
    expected = [(r.key, p) for r in RATIOS for p in PATTERNS] + [(MEMORY.key, "4:8")]
    assert [(r["ratio"], r["pattern"]) for r in result["ratios"]] == expected
    for row in result["ratios"]:
        if row["skipped"] is None:
            assert isinstance(row["value"], float) and math.isfinite(row["value"]) and row["value"] > 0, row
        else:
            assert row["value"] is None and isinstance(row["skipped"], str) and row["skipped"], row
        if row["source"] is None:  # a diagnostic ratio without a target
            assert row["target"] is None and row["met"] is None
        else:  # a ratio with a target from the issue says whether it was met
            assert row["target"].startswith(("<=", ">=")) and "issue 13" in row["source"]
            assert row["met"] is None if row["value"] is None else isinstance(row["met"], bool)
    assert {r["size"] for r in rows_of(result, "mcf/find_mask")} == {32}
    assert {r["size"] for r in rows_of(result, "exact/greedy")} == {64}


def test_markdown_has_every_section_and_ratio(record):
    result, md = record
    for heading in ("# nmopt bench kernels", "## Ratios (issue 13)", "## Masks, 64 x 64",
                    "## OR-Tools, 32 x 32"):
        assert heading in md
    for r in RATIOS + (MEMORY,):
        assert f"| {r.label} |" in md
    assert "| 32:64 |" in md  # the kernel-table pattern
    assert [r["pattern"] for r in result["masks"] if r["size"] == 64] == PATTERNS + ["32:64"]


def test_kernel_ratios_measured_with_the_c_backend(record):
    if backends.status().get("cffi", "not registered") is not None:
        pytest.skip("the C extension is not built")
    result, _ = record
    for key in ("exact/greedy", "find_mask/exact", "find_mask/greedy"):
        assert all(r["value"] is not None for r in rows_of(result, key)), key
    for rec in result["masks"]:
        if rec["size"] == 64:
            assert rec["checks"]["exact_gap"] == pytest.approx(0.0, abs=1e-9)
            assert rec["checks"]["exact_unverified_tiles"] == 0


def test_ortools_ratio(record):
    result, _ = record
    rows = rows_of(result, "mcf/find_mask")
    if solvers.status().get("mcf", "not registered") is not None:
        assert all("OR-Tools" in r["skipped"] for r in rows)
        return
    assert all(r["value"] is not None for r in rows)
    for rec in result["masks"]:
        if rec["size"] == 32:
            assert rec["checks"]["exact_vs_mcf_objective"] == pytest.approx(0.0, abs=1e-9)


def test_torch_rows(record):
    pytest.importorskip("torch")
    result, md = record
    for key in ("torch/numpy", "torch/numpy row-wise"):
        assert all(r["value"] is not None for r in rows_of(result, key)), key
    assert {(r["pattern"], r["gemm"], r["batch"]) for r in result["matmul"]} == {
        (p, g, b) for p in ("2:4", "4:8") for g in ("forward", "backward-data") for b in (1, 16)}
    assert all(r["max_rel_error"] < 1e-4 for r in result["matmul"])
    assert "## Sparse matmul" in md


def test_warm_start_hook(record):
    result, _ = record
    rows = rows_of(result, "warm/cold")
    assert [r["target"] for r in rows] == ["<= 0.35x"] * 4
    for r in rows:
        assert r["value"] is not None or "warm_start" in r["skipped"]


def test_memory_row_and_skips(tmp_path, monkeypatch, record):
    result, _ = record
    (mem,) = rows_of(result, MEMORY.key)
    assert mem["size"] == 256 and mem["target"] == "<= 3x"
    if mem["value"] is not None:
        assert mem["input_bytes"] == 256 * 256 * 4 and mem["method"]
    # without OR-Tools, the memory probe and the matmul table: skips with their reasons
    monkeypatch.setattr(solvers, "status", lambda: {"mcf": "ortools: not installed"})
    lean = run_tiny(tmp_path, "--memory-size", "0", "--matmul-patterns", "", "--extra-patterns", "")
    assert all("OR-Tools" in r["skipped"] for r in rows_of(lean, "mcf/find_mask"))
    assert rows_of(lean, MEMORY.key)[0]["skipped"] == "--memory-size 0"
    assert lean["matmul"] == [] and all(not r["extra"] for r in lean["masks"])


def test_bad_arguments_are_usage_errors(tmp_path, capsys):
    assert main([*TINY, "--patterns", "5:4", "--out", str(tmp_path)]) == 2
    assert main([*TINY, "--repeat", "0", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "kernels.json").exists()
    assert "--repeat" in capsys.readouterr().err


def test_thread_settings_are_restored(tmp_path):
    """The benchmark sets --threads for its run only: the shared backend keeps its setting."""
    from nmopt import backends

    if backends.status().get("cffi") is not None:
        pytest.skip("the C extension is not built")
    cffi = backends.get("cffi")
    cffi.num_threads = 1
    try:
        assert main([*TINY, "--threads", "2", "--memory-size", "0", "--out", str(tmp_path)]) == 0
        assert cffi.num_threads == 1
    finally:
        cffi.num_threads = None
