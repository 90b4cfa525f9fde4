"""Real weights: the six MiniLM layer-0 matrices (skipped when ../shared is absent)."""

from __future__ import annotations

import nmopt_test_oracles as oracles
import numpy as np
import pytest

import nmopt

NAMES = [
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.attention.self.key.weight",
    "encoder.layer.0.attention.self.value.weight",
    "encoder.layer.0.attention.output.dense.weight",
    "encoder.layer.0.intermediate.dense.weight",
    "encoder.layer.0.output.dense.weight",
]
PATTERNS = [(name, p) for name in NAMES for p in ("2:4", "4:8")]
PATTERNS.append((NAMES[5], "8:16"))


def short(name: str) -> str:
    return name.replace("encoder.layer.0.", "").replace(".weight", "")


def need(name: str) -> None:
    reason = nmopt.solvers.status().get(name, "not registered")
    if reason is not None:
        pytest.skip(f"solver {name!r} unavailable: {reason}")


@pytest.mark.parametrize("name,pattern", PATTERNS, ids=[f"{short(n)}-{p}" for n, p in PATTERNS])
def test_exact_and_greedy_on_real_layers(real_weights, name, pattern):
    need("mcf")
    w = real_weights[name]
    n, m = map(int, pattern.split(":"))
    scores = np.abs(w.astype(np.float64))
    auto = nmopt.find_mask(w, pattern)
    oracles.check_result(auto, scores, n, m)
    assert auto.optimal and auto.gap <= 1e-7
    mcf = auto if auto.solver == "mcf" else nmopt.find_mask(w, pattern, solver="mcf")
    oracles.check_result(mcf, scores, n, m)
    assert mcf.optimal
    np.testing.assert_allclose(oracles.tile_kept(scores, auto.mask, m),
                               oracles.tile_kept(scores, mcf.mask, m), rtol=1e-9, atol=0)
    assert auto.objective == pytest.approx(mcf.objective, rel=1e-9)
    greedy = nmopt.find_mask(w, pattern, solver="greedy")
    oracles.check_result(greedy, scores, n, m)
    ratio = greedy.objective / auto.objective
    assert 0.5 <= ratio <= 1 + 1e-12
    assert greedy.bound >= auto.objective * (1 - 1e-12)


@pytest.mark.parametrize("name", NAMES, ids=[short(n) for n in NAMES])
def test_real_layer_blocks_against_independent_oracle(real_weights, name):
    """A 64 x 64 block of every layer: each exact solver equals the HiGHS + cycle-cancelling
    oracle tile by tile, at 4:8 and 16:32."""
    block = np.abs(real_weights[name][64:128, 128:192].astype(np.float64))
    for pattern in ("4:8", "16:32"):
        n, m = map(int, pattern.split(":"))
        lo, hi = oracles.lp_tile_optima(block, n, m)
        for solver in nmopt.solvers.available():
            inst = nmopt.solvers.get(solver)
            if not (inst.exact and inst.transposable) or inst.refuses(n, m, False, 64):
                continue
            res = nmopt.find_mask(block, pattern, solver=solver)
            kept = oracles.tile_kept(block, res.mask, m)
            np.testing.assert_allclose(kept, lo, rtol=1e-9, atol=0, err_msg=solver)
            assert (kept <= hi * (1 + 1e-12)).all()


def test_real_conv_view_and_torch_round_trip(real_weights):
    """A real matrix viewed as a 4-D conv weight and as a bfloat16 tensor."""
    torch = pytest.importorskip("torch")
    w = real_weights[NAMES[0]]
    conv = torch.from_numpy(w).reshape(384, 96, 2, 2).to(torch.bfloat16)
    res = nmopt.find_mask(conv, "2:4")
    assert res.mask.shape == conv.shape and res.mask.dtype == torch.bool
    assert nmopt.is_valid_mask(res.mask, "2:4") and res.optimal
