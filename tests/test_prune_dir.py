"""``nmopt prune`` on Hugging Face model directories and safetensors files, streamed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import nmopt
from nmopt import prune as prune_mod
from nmopt.checkpoint import load, save
from nmopt.cli import main
from nmopt.prune import prune_state_dict
from nmopt.prune_stream import prune_path
from nmopt.safetensors_stream import HF_INDEX, SafetensorsReader

OTHER = {"config.json": "{}\n", "tokenizer.json": '{"model": {}}\n', "generation_config.json": "{}\n"}
PRUNED = {"layers.0.q.weight", "layers.0.up.weight", "layers.1.q.weight", "layers.1.conv.weight"}


def shards():
    g = torch.Generator().manual_seed(0)
    return [
        {"model.embed_tokens.weight": torch.randn(32, 16, generator=g),
         "layers.0.q.weight": torch.randn(16, 16, generator=g),
         "layers.0.norm.weight": torch.ones(16)},
        {"layers.0.up.weight": torch.randn(24, 16, generator=g).bfloat16(),
         "layers.1.q.weight": torch.randn(16, 24, generator=g).half(),
         "steps": torch.tensor(7)},
        {"layers.1.conv.weight": torch.randn(8, 4, 2, 2, generator=g),
         "layers.1.bias": torch.randn(8, generator=g)},
    ]


def write_model(directory: Path, parts=None) -> Path:
    parts = parts or shards()
    directory.mkdir()
    weight_map = {}
    for i, tensors in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save(tensors, directory / name)
        weight_map.update({k: name for k in tensors})
    (directory / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    for name, text in OTHER.items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "model")


def _bits(t):
    return t.view(torch.uint8) if t.dtype != torch.int64 else t


def test_directory_mirrored_and_every_tensor_valid(model, tmp_path, capsys):
    out, masks, report = tmp_path / "out", tmp_path / "m.safetensors", tmp_path / "r.json"
    assert main(["prune", str(model), "--pattern", "2:4", "--out", str(out), "--masks", str(masks),
                 "--report", str(report), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "total (4 layers)" in text and "wrote pruned model directory" in text
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in model.iterdir())
    for name, content in OTHER.items():
        assert (out / name).read_text() == content
    index, old_index = (json.loads((d / HF_INDEX).read_text()) for d in (out, model))
    assert index["weight_map"] == old_index["weight_map"]
    kept = load(masks)
    assert set(kept) == PRUNED
    for shard in set(index["weight_map"].values()):
        original, pruned = load(model / shard), safetensors_torch.load_file(str(out / shard))
        assert set(pruned) == set(original)
        for name, w in original.items():
            assert pruned[name].dtype == w.dtype and pruned[name].shape == w.shape
            if name in PRUNED:
                nmopt.check_mask(kept[name], "2:4")
                assert torch.equal(_bits(pruned[name]), _bits(w.masked_fill(~kept[name], 0)))
            else:
                assert torch.equal(_bits(pruned[name]), _bits(w))
    sizes = sum(sum(t.numel() * t.element_size() for t in load(out / s).values())
                for s in set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] == sizes
    data = json.loads(report.read_text())
    assert {x["name"] for x in data["layers"]} == PRUNED and data["format"] == "dense"
    assert data["totals"]["optimal"] and data["input"] == str(model)


def test_single_file_model_dir_and_other_weights_not_copied(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    save({"a.weight": torch.randn(8, 8), "b": torch.ones(3)}, model / "model.safetensors")
    (model / "pytorch_model.bin").write_bytes(b"dense")
    (model / "config.json").write_text("{}")
    assert main(["prune", str(model), "--pattern", "2:4", "--out", str(tmp_path / "o")]) == 0
    assert "not copied (dense weights in another format): pytorch_model.bin" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json", "model.safetensors"]
    nmopt.check_mask(load(tmp_path / "o" / "model.safetensors")["a.weight"] != 0, "2:4")


def test_failure_leaves_nothing_and_existing_output_refused(model, tmp_path, capsys, monkeypatch):
    real, calls = prune_mod.find_mask, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("solver exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_mod, "find_mask", failing)
    argv = ["prune", str(model), "--pattern", "2:4", "--out", str(tmp_path / "out"),
            "--masks", str(tmp_path / "m.safetensors"), "--report", str(tmp_path / "r.json")]
    assert main(argv) == 1
    assert "solver exploded" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output, no temporary
    monkeypatch.setattr(prune_mod, "find_mask", real)
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


@pytest.mark.parametrize("edit, text", [
    (lambda m: m.update({"layers.0.q.weight": "model-00002-of-00003.safetensors"}),
     "maps tensor 'layers.0.q.weight' to 'model-00002-of-00003.safetensors' but it is in "
     "'model-00001-of-00003.safetensors' \\(1 such entries\\)"),
    (lambda m: m.update({"layers.9.q.weight": "model-00001-of-00003.safetensors"}), "no shard holds it"),
])
def test_an_index_that_does_not_match_its_shards_is_refused_before_work(model, tmp_path, capsys, edit, text):
    index = json.loads((model / HF_INDEX).read_text())
    edit(index["weight_map"])
    (model / HF_INDEX).write_text(json.dumps(index))
    assert main(["prune", str(model), "--pattern", "2:4", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert re.search(text, err) and "regenerate the index" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("argv,text", [
    (["--out", "{m}/inside"], "inside the input directory"),
    (["--out", "{d}/file.txt"], "is a file"),
    (["--out", "{d}/o.pt", "--format", "nm-packed", "--include", "x"], "--format nm-packed writes"),
])
def test_usage_errors(model, tmp_path, capsys, argv, text):
    (tmp_path / "file.txt").write_text("x")
    src = model if "{m}" in argv[1] or "file" in argv[1] else model / "model-00001-of-00003.safetensors"
    argv = [a.format(m=model, d=tmp_path) for a in argv]
    assert main(["prune", str(src), "--pattern", "2:4", *argv]) == 2
    assert text in capsys.readouterr().err


def test_single_file_stream_equals_load_whole(tmp_path):
    tensors = {k: v for part in shards() for k, v in part.items()}
    src = tmp_path / "in.safetensors"
    save(tensors, src)
    report = prune_path(src, tmp_path / "out.safetensors", "4:8", masks_path=tmp_path / "m.safetensors",
                        progress=False)
    old = prune_state_dict(load(src), "4:8", progress=False)
    new, kept = load(tmp_path / "out.safetensors"), load(tmp_path / "m.safetensors")
    assert set(new) == set(old.tensors) and set(kept) == set(old.masks)
    for name, t in old.tensors.items():
        assert new[name].dtype == t.dtype and torch.equal(_bits(new[name]), _bits(t)), name
    for name, m in old.masks.items():
        assert torch.equal(kept[name], m), name
    for row, ref in zip(report["layers"], old.layers):
        assert row["name"] == ref.name and row["objective"] == pytest.approx(ref.objective, rel=1e-12)
    with SafetensorsReader(tmp_path / "out.safetensors") as f:
        assert f.metadata == {"format": "pt"}


def _raw_safetensors(path, header: dict, data_bytes: int) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(data_bytes))


@pytest.mark.parametrize("offsets, size, why", [
    ({"a": [0, 16], "b": [8, 24]}, 24, "tensor 'b' overlaps tensor 'a'"),
    ({"a": [0, 16], "b": [0, 16]}, 16, "overlaps"),
    ({"a": [0, 16], "b": [20, 36]}, 36, "4 bytes before tensor 'b' belong to no tensor"),
    ({"a": [8, 24], "b": [24, 40]}, 40, "8 bytes before tensor 'a'"),
    ({"a": [0, 16], "b": [16, 32]}, 40, "8 bytes after the last tensor"),
])
def test_safetensors_whose_data_does_not_tile_the_file_are_refused(tmp_path, offsets, size, why):
    """As the safetensors library demands: the tensors' bytes follow each other, no overlap,
    no hole, nothing after them (a file that breaks this is corrupt)."""
    from nmopt.checkpoint import CheckpointError
    from nmopt.safetensors_stream import read_header

    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, {k: {"dtype": "F32", "shape": [4], "data_offsets": v} for k, v in offsets.items()}, size)
    with pytest.raises(CheckpointError, match=f"cannot read as safetensors .*{why}"):
        read_header(path)
    with pytest.raises(safetensors_torch.SafetensorError if hasattr(safetensors_torch, "SafetensorError")
                       else Exception):
        safetensors_torch.load_file(path)  # the library refuses it too
    _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                            "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}, 32)
    assert list(read_header(path)[0]) == ["a", "b"]
    assert set(safetensors_torch.load_file(path)) == {"a", "b"}


def test_blocks_give_the_masks_of_one_call(monkeypatch):
    w = torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
    whole = prune_state_dict({"w": w}, "4:8", progress=False)
    monkeypatch.setattr(prune_mod, "BLOCK_WEIGHTS", 8 * 40)  # 8 blocks of 8 rows
    blocks = prune_state_dict({"w": w}, "4:8", progress=False)
    assert torch.equal(whole.masks["w"], blocks.masks["w"])
    assert blocks.layers[0].objective == pytest.approx(whole.layers[0].objective, rel=1e-12)
    assert blocks.layers[0].deficit == whole.layers[0].deficit


def _prune_layer_calls(monkeypatch, w, budget, **kw):
    """(mask, report, find_mask calls) of prune_layer on ``w`` with BLOCK_WEIGHTS = budget."""
    from nmopt.api import find_mask
    from nmopt.patterns import parse_pattern

    calls, out = [], []
    monkeypatch.setattr(prune_mod, "BLOCK_WEIGHTS", budget)
    monkeypatch.setattr(prune_mod, "find_mask", lambda x, *a, **k: calls.append(1) or find_mask(x, *a, **k))
    rep = prune_mod.prune_layer("w", tuple(w.shape), "float32", lambda r0, r1: w[r0:r1],
                                lambda r0, r1, m, p: out.append(m), parse_pattern("4:8"), **kw)
    return torch.cat(out), rep, len(calls)


@pytest.mark.parametrize("shape, kw", [
    ((4, 200), {}), ((12, 203), {}), ((4, 200), {"transposable": False}),
    ((3, 5, 4, 4), {}), ((20, 96), {"transposable": False, "in_out": True}),
])
def test_bands_of_tile_columns_give_the_masks_of_one_call(monkeypatch, shape, kw):
    """A block wider than the budget (fewer than M rows of many columns) is cut into bands of
    whole tile columns; it used to be solved whole (4 x 2M float32: 506 MiB peak)."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    whole, a, one = _prune_layer_calls(monkeypatch, w, 1 << 20, **kw)
    banded, b, many = _prune_layer_calls(monkeypatch, w, 24, **kw)  # bands of 8 columns
    assert many > one and banded.shape == w.shape and torch.equal(whole, banded)
    assert b.objective == pytest.approx(a.objective, rel=1e-12) and b.deficit == a.deficit
    assert (b.kept_weights, b.optimal) == (a.kept_weights, a.optimal)


_MEMORY = r"""
import sys
from nmopt.cli import main
def status(key):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key + ":"))
before = status("VmRSS")
rc = main(sys.argv[1:])
print(rc, before, status("VmHWM"))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_memory_is_bounded_by_a_block_not_the_model(tmp_path):
    from nmopt.bench.prune_memory import generate

    made = generate(tmp_path / "model", 96, 1024, 4, "float32")  # 24 x 1024^2 float32
    res = subprocess.run([sys.executable, "-c", _MEMORY, "prune", str(tmp_path / "model"), "--pattern", "4:8",
                          "--out", str(tmp_path / "out"), "--masks", str(tmp_path / "m.safetensors"),
                          "--no-progress"], capture_output=True, text=True, check=False)
    rc, before, peak = (int(x) for x in res.stdout.split()[-3:])
    assert rc == 0, res.stderr
    growth = (peak - before) * 1024
    assert growth < made["bytes"] / 2, (growth, made)
    with SafetensorsReader(tmp_path / "m.safetensors") as f:
        mask = f.read("model.layers.5.mlp.weight")
    assert nmopt.is_valid_mask(mask, "4:8") and np.count_nonzero(mask) > 0


def test_bench_prune_memory_small(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "prune-memory", "--size-mib", "1", "--dim", "128", "--shards", "2", "--quiet",
                 "--tmp", str(tmp_path), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["run"] for r in data["rows"]] == ["stream", "stream nm-packed", "load whole"]
    assert all(r["returncode"] == 0 and r["peak_rss_mib"] > 0 for r in data["rows"])
    assert data["rows"][1]["output_fraction"] < 0.6 and data["target"]["met"]


def test_outputs_that_would_destroy_the_input_are_refused_before_work(model, tmp_path, capsys):
    """--force used to replace a directory holding the input (deleting it) and to write --masks
    or --report over a file of the input directory."""
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    shard = model / "model-00001-of-00003.safetensors"
    cases = [(["--out", str(tmp_path)], f"--out '{tmp_path}' contains the input"),
             (["--out", str(tmp_path / "o"), "--masks", str(shard)], "is inside the input directory"),
             (["--out", str(tmp_path / "o"), "--report", str(model / "config.json")],
              "is inside the input directory")]
    for argv, text in cases:
        assert main(["prune", str(model), "--pattern", "2:4", "--force", "--no-progress", *argv]) == 2
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert main(["prune", str(model), "--pattern", "2:4", "--out", str(tmp_path / "o")]) == 0
    assert main(["prune", str(model), "--pattern", "4:8", "--out", str(tmp_path / "o"), "--force"]) == 0


def test_a_broken_link_in_the_model_directory_is_refused_before_work(model, tmp_path, capsys,
                                                                      monkeypatch):
    """It failed after every layer was solved, as "output ...: no such file or directory"."""
    (model / "tokenizer.model").symlink_to(tmp_path / "gone")
    monkeypatch.setattr(prune_mod, "find_mask", lambda *a, **k: pytest.fail("solved first"))
    assert main(["prune", str(model), "--pattern", "2:4", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"input '{model / 'tokenizer.model'}': a broken symbolic link" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_model_cli_refuses_outputs_that_would_destroy_the_input(model, tmp_path):
    from nmopt.posttrain.prune_cli import check_outputs

    with pytest.raises(ValueError, match="contains the input .*would delete the input"):
        check_outputs(model, tmp_path, force=True)
    with pytest.raises(ValueError, match="--report .* is inside the input directory"):
        check_outputs(model, tmp_path / "o", report=model / "config.json", force=True)


def test_force_replaces_only_model_directories(model, tmp_path, capsys):
    victim = tmp_path / "victim"
    (victim / "deep").mkdir(parents=True)
    (victim / "deep" / "precious.txt").write_text("keep me")
    argv = ["prune", str(model), "--pattern", "2:4", "--out", str(victim), "--force", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no model" in err and err.count("\n") == 0
    assert (victim / "deep" / "precious.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an empty directory, and a previous output, are replaced
    assert main([*argv[:5], str(tmp_path / "empty"), "--force", "--no-progress"]) == 0
    assert main([*argv[:5], str(tmp_path / "empty"), "--force", "--no-progress"]) == 0


@pytest.mark.parametrize("info, why", [
    ({"dtype": "F32", "shape": [4, 2 ** 70], "data_offsets": [0, 64]}, "do not fit shape"),
    ({"dtype": "F32", "shape": [16, 2 ** 60 + 1], "data_offsets": [0, 64]}, "do not fit shape"),
    ({"dtype": ["F32"], "shape": [4, 4], "data_offsets": [0, 64]}, r"dtype \['F32'\] is not supported"),
    ({"dtype": "F32", "shape": [4.0, 4], "data_offsets": [0, 64]}, "lists of integers"),
    ({"dtype": "F32", "shape": [4, 4], "data_offsets": ["0", 64]}, "lists of integers"),
])
def test_crafted_header_sizes_and_types_are_refused_naming_the_tensor(tmp_path, info, why):
    """A dimension past 2^63 overflowed int64 (a traceback); one whose product wrapped around
    was accepted and failed later without a name."""
    from nmopt.checkpoint import CheckpointError
    from nmopt.safetensors_stream import read_header

    _raw_safetensors(tmp_path / "x.safetensors", {"x": info}, 64)
    with pytest.raises(CheckpointError, match=f"tensor 'x': .*{why}"):
        read_header(tmp_path / "x.safetensors")


@pytest.mark.parametrize("index, why", [
    ({"weight_map": {"a.weight": 5}}, "weight_map must map tensor names to shard file names"),
    ({"metadata": "v1", "weight_map": {"a.weight": "model.safetensors"}}, "metadata must be a JSON object"),
])
def test_a_malformed_index_is_refused_before_any_work(tmp_path, index, why):
    from nmopt.checkpoint import CheckpointError, save
    from nmopt.safetensors_stream import model_shards

    model = tmp_path / "m"
    model.mkdir()
    save({"a.weight": np.ones((8, 8), np.float32)}, model / "model.safetensors")
    (model / HF_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=why):
        model_shards(model)


@pytest.mark.parametrize("make, why", [
    (lambda d: (d / "sub").mkdir() or (d / "sub" / "loop").symlink_to(d), "which holds it"),
    (lambda d: os.mkfifo(d / "pipe"), "neither a file nor a directory"),
])
def test_other_files_that_cannot_be_copied_are_refused_before_any_work(tmp_path, make, why):
    from nmopt.checkpoint import CheckpointError, save

    model = tmp_path / "m"
    model.mkdir()
    save({"a.weight": np.ones((8, 8), np.float32)}, model / "model.safetensors")
    make(model)
    with pytest.raises(CheckpointError, match=why):
        prune_path(model, tmp_path / "out", "2:4", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
