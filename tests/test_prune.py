"""Pruning a state dict: selection rules, valid masks, dtypes, report, all-or-nothing files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import nmopt
from nmopt import prune as prune_mod
from nmopt.checkpoint import load, save
from nmopt.prune import apply_mask, prune_file, prune_state_dict, select_layers

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")


def state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(20, 16, generator=g),
        "wte.weight": torch.randn(20, 16, generator=g),
        "layer.0.attn.weight": torch.randn(16, 16, generator=g),
        "layer.0.attn.bias": torch.randn(16, generator=g),
        "layer.0.norm.weight": torch.ones(16),
        "layer.0.fc.weight": torch.randn(24, 16, generator=g).half(),
        "layer.0.bf.weight": torch.randn(8, 16, generator=g).bfloat16(),
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),  # (8, 27): padded to 8 x 32
        "conv1d.weight": torch.randn(8, 4, 3, generator=g),
        "odd.weight": torch.randn(10, 13, generator=g),
        "bn.num_batches_tracked": torch.tensor(5),
        "int.table": torch.arange(32).reshape(4, 8),
        "bool.mask": torch.ones(8, 8, dtype=torch.bool),
    }


PRUNED = {"layer.0.attn.weight", "layer.0.fc.weight", "layer.0.bf.weight", "conv.weight",
          "odd.weight"}


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_select_layers_rules():
    names, copied = select_layers(state_dict())
    assert set(names) == PRUNED
    assert "embedding" in copied["embed.weight"] and "embedding" in copied["wte.weight"]
    assert "1-D" in copied["layer.0.attn.bias"] and "3-D" in copied["conv1d.weight"]
    assert "not floating point" in copied["int.table"]
    assert "not floating point" in copied["bool.mask"]
    assert "0-D" in copied["bn.num_batches_tracked"]
    names, copied = select_layers(state_dict(), include=r"embed|attn")
    assert set(names) == {"embed.weight", "layer.0.attn.weight"}
    assert copied["conv.weight"] == "not matched by --include"
    names, _ = select_layers(state_dict(), exclude=r"^conv|odd")
    assert set(names) == PRUNED - {"conv.weight", "odd.weight"}


@pytest.mark.parametrize("pattern,transposable", [("2:4", True), ("4:8", True), ("2:4", False)])
def test_prune_state_dict_masks_valid_and_optimal(pattern, transposable):
    sd = state_dict()
    res = prune_state_dict(sd, pattern, transposable=transposable, progress=False)
    assert set(res.masks) == PRUNED and list(res.tensors) == list(sd)
    for layer in res.layers:
        w, mask, out = sd[layer.name], res.masks[layer.name], res.tensors[layer.name]
        nmopt.check_mask(mask, pattern, transposable=transposable)
        assert mask.shape == w.shape and out.dtype == w.dtype
        assert torch.equal(out, torch.where(mask, w, torch.zeros((), dtype=w.dtype)))
        # kept score recomputed from the weights, and equal to an independent exact solver's
        kept = float(w.double().abs()[mask].sum())
        assert layer.objective == pytest.approx(kept, rel=1e-12)
        other = "lp" if transposable else "rowwise"
        ref = nmopt.find_mask(w, pattern, transposable=transposable, solver=other)
        assert layer.objective == pytest.approx(ref.objective, rel=1e-7)
        assert layer.bound >= layer.objective and layer.gap <= nmopt.OPTIMALITY_TOL
        assert layer.kept_weights == int(mask.sum())
    for name in set(sd) - PRUNED:
        assert res.tensors[name] is sd[name]  # copied unchanged
    t = res.totals
    assert t["layers"] == len(PRUNED) and t["objective"] == pytest.approx(
        sum(x.objective for x in res.layers))


def test_saturate_and_solver_are_passed_on():
    sd = {"w": torch.randn(16, 16, generator=torch.Generator().manual_seed(1))}
    res = prune_state_dict(sd, "2:4", saturate=True, solver="mcf", progress=False)
    mask = res.masks["w"]
    assert res.layers[0].solver == "mcf"
    assert (mask.reshape(4, 4, 4, 4).sum(axis=3) == 2).all()  # exactly N per tile row


def test_numpy_state_dict():
    rng = np.random.default_rng(0)
    sd = {"w": rng.standard_normal((8, 8)).astype(np.float32), "b": np.zeros(8, np.float32)}
    res = prune_state_dict(sd, "2:4", progress=False)
    assert isinstance(res.tensors["w"], np.ndarray) and res.tensors["w"].dtype == np.float32
    nmopt.check_mask(res.masks["w"], "2:4")
    assert np.array_equal(res.tensors["w"], np.where(res.masks["w"], sd["w"], 0))


def test_apply_mask_keeps_dtype():
    w = torch.randn(4, 4).bfloat16()
    m = torch.rand(4, 4) > 0.5
    assert apply_mask(w, m).dtype == torch.bfloat16


def test_nan_layer_error_names_the_layer():
    sd = state_dict()
    sd["odd.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'odd.weight' \(10, 13\).*NaN"):
        prune_state_dict(sd, "2:4", progress=False)


def _write_input(tmp_path, ext=".safetensors"):
    path = tmp_path / f"in{ext}"
    save(state_dict(), path)
    return path


@pytest.mark.parametrize("ext_in,ext_out", [(".safetensors", ".pt"), (".pt", ".safetensors")])
def test_prune_file_writes_everything(tmp_path, ext_in, ext_out):
    src = _write_input(tmp_path, ext_in)
    out, masks, report = tmp_path / f"out{ext_out}", tmp_path / "m.safetensors", tmp_path / "r.json"
    _, rep = prune_file(src, out, "4:8", masks_path=masks, report_path=report,
                        progress=False)
    pruned, kept, original = load(out), load(masks), load(src)
    assert set(pruned) == set(original) and set(kept) == PRUNED
    for name in PRUNED:
        nmopt.check_mask(kept[name], "4:8")
        assert kept[name].dtype == torch.bool
        assert torch.equal(pruned[name], apply_mask(original[name], kept[name]))
    for name in set(original) - PRUNED:
        assert torch.equal(pruned[name], original[name])
    data = json.loads(report.read_text())
    assert data == json.loads(json.dumps(rep))
    assert data["pattern"] == "4:8" and data["transposable"] is True
    assert {x["name"] for x in data["layers"]} == PRUNED
    assert {x["name"] for x in data["copied"]} == set(original) - PRUNED
    for layer in data["layers"]:
        w = original[layer["name"]]
        ref = nmopt.find_mask(w, "4:8", solver="lp")
        assert layer["objective"] == pytest.approx(ref.objective, rel=1e-7)
        assert layer["shape"] == list(w.shape)
        assert 0 <= layer["gap"] <= nmopt.OPTIMALITY_TOL
    assert _listing(tmp_path) == sorted([src.name, out.name, masks.name, report.name])


def test_failed_layer_leaves_nothing(tmp_path, monkeypatch):
    src = _write_input(tmp_path)
    real = prune_mod.find_mask
    calls = []

    def flaky(w, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # an interrupt during a later layer
        return real(w, *args, **kwargs)

    monkeypatch.setattr(prune_mod, "find_mask", flaky)
    with pytest.raises(KeyboardInterrupt):
        prune_file(src, tmp_path / "out.pt", "2:4", masks_path=tmp_path / "m.safetensors",
                   report_path=tmp_path / "r.json", progress=False)
    assert _listing(tmp_path) == [src.name]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import nmopt.checkpoint as ckpt

    src = _write_input(tmp_path)
    real = ckpt._write
    calls = []

    def flaky(tensors, tmp, fmt, metadata):
        calls.append(1)
        real(tensors, tmp, fmt, metadata)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write", flaky)
    with pytest.raises(OSError, match="disk full"):
        prune_file(src, tmp_path / "out.safetensors", "2:4",
                   masks_path=tmp_path / "m.safetensors", progress=False)
    assert _listing(tmp_path) == [src.name]


def test_nothing_selected_is_an_error(tmp_path):
    src = _write_input(tmp_path)
    with pytest.raises(ValueError, match="nothing to prune"):
        prune_file(src, tmp_path / "out.pt", "2:4", include="no-such-layer", progress=False)
    assert _listing(tmp_path) == [src.name]


def test_verify_pruned_catches_tampering(tmp_path):
    from nmopt.demo import verify_pruned

    src = _write_input(tmp_path)
    out, masks = tmp_path / "out.safetensors", tmp_path / "m.safetensors"
    _, rep = prune_file(src, out, "2:4", masks_path=masks, progress=False)
    lines = verify_pruned(src, out, masks, rep)
    assert len(lines) == len(PRUNED) and all("valid 2:4 transposable" in x for x in lines)
    kept = load(masks)
    bad = dict(kept)
    bad["layer.0.attn.weight"] = kept["layer.0.attn.weight"].clone()
    bad["layer.0.attn.weight"][0, :4] = True  # 4 kept in a tile row: not 2:4
    save(bad, masks)
    with pytest.raises(ValueError, match="row 0 keeps 4 > N=2"):
        verify_pruned(src, out, masks, rep)
    save(kept, masks)
    weights = load(out)
    weights["odd.weight"] = weights["odd.weight"] * 2
    save(weights, out)
    with pytest.raises(RuntimeError, match="differ from original"):
        verify_pruned(src, out, masks, rep)
