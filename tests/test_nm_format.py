"""The nm-packed checkpoint format: exact round trips, sizes, refusals, directories."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import nmopt
from nmopt.checkpoint import CheckpointError, load, save
from nmopt.cli import main
from nmopt.nm_format import INDEX, KEY, VALUES, decode, encode, layout, pack_bits, unpack_bits
from nmopt.patterns import parse_pattern
from nmopt.prune_stream import prune_path
from nmopt.safetensors_stream import CODES, HF_INDEX, Entry

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def _round_trip(tmp_path, tensors, pattern, **kw):
    src = tmp_path / "in.safetensors"
    save(tensors, src)
    prune_path(src, tmp_path / "dense.safetensors", pattern, progress=False, **kw)
    prune_path(src, tmp_path / "packed.safetensors", pattern, fmt="nm-packed", progress=False, **kw)
    return load(tmp_path / "dense.safetensors"), nmopt.load_pruned(tmp_path / "packed.safetensors")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "3:5"])
def test_round_trip_exact_2d_and_4d(tmp_path, dtype, pattern):
    g = torch.Generator().manual_seed(0)
    m = parse_pattern(pattern).m
    tensors = {"lin.weight": torch.randn(4 * m, 3 * m, generator=g).to(dtype),
               "conv.weight": torch.randn(2 * m, m, 1, 2, generator=g).to(dtype),
               "lin.bias": torch.randn(4 * m, generator=g).to(dtype), "count": torch.tensor(3)}
    dense, packed = _round_trip(tmp_path, tensors, pattern)
    assert set(packed) == set(dense)
    for name, t in dense.items():
        assert packed[name].dtype == t.dtype and packed[name].shape == t.shape
        assert torch.equal(_bits(packed[name]), _bits(t)), name
    stored = safetensors_torch.load_file(str(tmp_path / "packed.safetensors"))  # safetensors' own reader
    assert {"lin.weight" + VALUES, "lin.weight" + INDEX, "conv.weight" + INDEX, "lin.bias"} <= set(stored)
    assert stored["conv.weight" + VALUES].dtype == dtype


def test_groups_keeping_fewer_than_n_round_trip():
    w = np.arange(1, 2 * 16 + 1, dtype=np.float32).reshape(2, 16)
    mask = np.zeros_like(w, dtype=bool)
    mask[0, [1, 3]] = True       # 2 of 4 in group 0 (full, 4:8)
    mask[0, 13] = True           # 1 in group 1
    mask[1, [0, 2, 5, 7]] = True  # full, group 1 of row 1 keeps none
    lay = layout(Entry("w", "F32", w.shape), "4:8")
    values, index = encode(lay, w * mask, mask)
    assert values.shape == (2, 8) and index.shape == (2, 3)  # 8 slots x 3 bits = 3 bytes
    assert np.array_equal(decode(lay, values, index), w * mask)


def test_bit_layout_is_lsb_first():
    assert pack_bits(np.array([[1, 3]], np.uint8), 2).tolist() == [[0b1101]]
    assert pack_bits(np.array([[5, 2, 7]], np.uint8), 3).tolist() == [[0b010_101 | (0b11 << 6), 0b1]]


@given(st.integers(1, 8), st.integers(1, 7), st.integers(1, 40), st.data())
@settings(max_examples=60, deadline=None)
def test_bits_round_trip(bits, rows, width, data):
    seed = data.draw(st.integers(0, 2**32 - 1))
    pos = np.random.default_rng(seed).integers(0, 2**bits, (rows, width)).astype(np.uint8)
    packed = pack_bits(pos, bits)
    assert packed.shape == (rows, -(-width * bits // 8))
    assert np.array_equal(unpack_bits(packed, bits, width), pos)


@given(st.sampled_from(["1:2", "2:4", "3:4", "4:8", "5:8", "8:16", "7:32"]), st.integers(1, 6),
       st.integers(1, 4), st.sampled_from(["F16", "BF16", "F32", "F64"]), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_any_nm_mask_round_trips(pattern, rows, groups, code, seed):
    p = parse_pattern(pattern)
    rng = np.random.default_rng(seed)
    store = {"F16": np.uint16, "BF16": np.uint16, "F32": np.uint32, "F64": np.uint64}[code]
    w = rng.integers(1, np.iinfo(store).max, (rows, groups * p.m), dtype=store)  # any bits, NaNs too
    mask = np.zeros(w.shape, bool)
    for r in range(rows):
        for g in range(groups):
            keep = rng.choice(p.m, rng.integers(0, p.n + 1), replace=False)
            mask[r, g * p.m + keep] = True
    w = np.where(mask, w, 0).astype(store)
    lay = layout(Entry("w", code, w.shape), p)
    values, index = encode(lay, w, mask)
    assert values.dtype == store and np.array_equal(decode(lay, values, index), w)


@pytest.mark.parametrize("pattern,expected", [("2:4", 0.5625), ("4:8", 0.59375)])
def test_bf16_size_ratio(tmp_path, pattern, expected):
    g = torch.Generator().manual_seed(0)
    tensors = {f"l{i}.weight": torch.randn(256, 256, generator=g).bfloat16() for i in range(4)}
    _round_trip(tmp_path, tensors, pattern)
    ratio = (tmp_path / "packed.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio == pytest.approx(expected, abs=0.005)


def test_refuses_tensors_not_nm_along_rows(tmp_path):
    save({"odd.weight": torch.randn(8, 10)}, tmp_path / "in.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'odd.weight' \[8, 10\] cannot be stored 4:8 along its rows: "
                                         r"10 columns is not a multiple of M=8.*--exclude"):
        prune_path(tmp_path / "in.safetensors", tmp_path / "o.safetensors", "4:8", fmt="nm-packed",
                   progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]
    lay = layout(Entry("w", "F32", (1, 4)), "2:4")
    with pytest.raises(ValueError, match="'w' is not 2:4 along its rows.*keep 3 > N=2"):
        encode(lay, np.ones((1, 4), np.float32), np.array([[True, True, True, False]]))
    with pytest.raises(ValueError, match="dtype int64 is not a float"):
        layout(Entry("n", CODES["int64"], (4, 4)), "2:4")


def write_model(directory):
    g = torch.Generator().manual_seed(3)
    parts = {"model-00001-of-00002.safetensors": {"a.weight": torch.randn(8, 16, generator=g).bfloat16(),
                                                  "embed.weight": torch.randn(10, 4, generator=g)},
             "model-00002-of-00002.safetensors": {"b.weight": torch.randn(4, 2, 2, 2, generator=g),
                                                  "b.bias": torch.randn(4, generator=g)}}
    directory.mkdir()
    for shard, tensors in parts.items():
        save(tensors, directory / shard)
    weight_map = {k: shard for shard, tensors in parts.items() for k in tensors}
    (directory / HF_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text("{}")
    return directory


def test_directory_round_trip_keeps_shard_layout(tmp_path, capsys):
    model = write_model(tmp_path / "model")
    argv = ["prune", str(model), "--pattern", "2:4", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "dense")]) == 0
    assert main([*argv, "--out", str(tmp_path / "packed"), "--format", "nm-packed"]) == 0
    names = sorted(p.name for p in model.iterdir())
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == names
    old = json.loads((model / HF_INDEX).read_text())["weight_map"]
    new = json.loads((tmp_path / "packed" / HF_INDEX).read_text())["weight_map"]
    assert {k.removesuffix(VALUES).removesuffix(INDEX): v for k, v in new.items()} == old
    dense, packed = nmopt.load_pruned(tmp_path / "dense"), nmopt.load_pruned(tmp_path / "packed")
    assert set(dense) == set(packed) == set(old)
    for name, t in dense.items():
        assert torch.equal(_bits(packed[name]), _bits(t)), name
    # a packed directory as input: pruning again with the same pattern restores the dense one
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    assert main(["prune", str(tmp_path / "packed"), "--pattern", "2:4", "--out", str(tmp_path / "back"),
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == names
    back = nmopt.load_pruned(tmp_path / "back")
    for name, t in dense.items():
        assert torch.equal(_bits(back[name]), _bits(t)), name
    shard = next(iter(set(new.values())))
    meta = safetensors_torch.safe_open(str(tmp_path / "packed" / shard), "pt").metadata()
    assert json.loads(meta[KEY])["version"] == 1


def test_packed_file_as_input_of_a_pytorch_output(tmp_path):
    g = torch.Generator().manual_seed(2)
    dense, _ = _round_trip(tmp_path, {"w": torch.randn(16, 16, generator=g)}, "2:4")
    assert main(["prune", str(tmp_path / "packed.safetensors"), "--pattern", "2:4",
                 "--out", str(tmp_path / "o.pt"), "--no-progress"]) == 0
    assert torch.equal(load(tmp_path / "o.pt")["w"], dense["w"])


def test_a_tensor_named_like_a_packed_part_is_refused_before_work(tmp_path):
    """It failed mid-write with "tensor 'a.weight.nm_values': 128 bytes written beyond its size"."""
    save({"a.weight": torch.randn(8, 8), "a.weight.nm_values": torch.randn(8)}, tmp_path / "in.safetensors")
    with pytest.raises(ValueError, match="already has a tensor 'a.weight.nm_values'.*--format dense"):
        prune_path(tmp_path / "in.safetensors", tmp_path / "o.safetensors", "4:8", fmt="nm-packed",
                   progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_corrupt_packed_files_are_refused_naming_file_and_tensor(tmp_path):
    """Duplicate or out-of-range positions, an unknown version or index width loaded silently
    (wrong weights) or as a bare ValueError."""
    from safetensors import safe_open

    save({"w": torch.randn(12, 12)}, tmp_path / "in.safetensors")
    prune_path(tmp_path / "in.safetensors", tmp_path / "p.safetensors", "3:6", fmt="nm-packed",
               progress=False)
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        meta, good = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    def write(name, tensors=good, **info):
        d = json.loads(meta[KEY])
        d.update({k: v for k, v in info.items() if k == "version"})
        d["tensors"]["w"].update({k: v for k, v in info.items() if k != "version"})
        path = tmp_path / f"{name}.safetensors"
        safetensors_torch.save_file(tensors, str(path), metadata={**meta, KEY: json.dumps(d)})
        return path

    cases = {"same position twice": write("dup", {**good, "w" + INDEX: torch.zeros_like(good["w" + INDEX])}),
             "version 2; this nmopt reads version 1": write("ver", version=2),
             "index_bits 4 is not 3": write("bits", index_bits=4),
             "positions must be < M=6, found 7": write("range", {**good, "w" + INDEX: torch.from_numpy(
                 pack_bits(np.tile(np.array([5, 6, 7], np.uint8), (12, 2)), 3))})}
    for text, path in cases.items():
        with pytest.raises(CheckpointError, match=f"^input '{path}': .*{text}"):
            nmopt.load_pruned(path)


def test_tampered_packed_values_shapes_and_names_are_refused(tmp_path):
    """A non-float values dtype raised a bare KeyError; float shapes a TypeError; a plain tensor
    under a packed tensor's name was dropped silently."""
    from safetensors import safe_open

    save({"w": torch.randn(8, 8)}, tmp_path / "in.safetensors")
    prune_path(tmp_path / "in.safetensors", tmp_path / "p.safetensors", "2:4", fmt="nm-packed",
               progress=False)
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        meta, good = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    d = json.loads(meta[KEY])
    floats = {**d, "tensors": {"w": {**d["tensors"]["w"], "shape": [8.0, 8.0]}}}
    cases = {
        "values of dtype U8": ({**good, "w" + VALUES: good["w" + VALUES].view(torch.uint8)}, d),
        "values of dtype I32": ({**good, "w" + VALUES: good["w" + VALUES].view(torch.int32)}, d),
        r"shape \[8.0, 8.0\] is not a list of integers": (good, floats),
        "'w' is stored both plain and packed": ({**good, "w": torch.full((8, 8), 7.0)}, d),
    }
    for i, (text, (tensors, info)) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.safetensors"
        safetensors_torch.save_file(tensors, str(path), metadata={**meta, KEY: json.dumps(info)})
        with pytest.raises(CheckpointError, match=f"^input '{path}': .*{text}"):
            nmopt.load_pruned(path)
        assert main(["prune", str(path), "--pattern", "2:4", "--out",
                     str(tmp_path / "o.safetensors"), "--no-progress"]) == 1
        assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("edit, text", [
    (lambda wm: wm.update({"b.weight": "model-00001-of-00002.safetensors"}),
     "maps tensor 'b.weight' to 'model-00001-of-00002.safetensors' but it is in"),
    (lambda wm: wm.update({"ghost": "model-00001-of-00002.safetensors"}), "no shard holds it"),
])
def test_load_pruned_refuses_an_index_that_does_not_match_its_shards(tmp_path, edit, text):
    model = write_model(tmp_path / "model")
    index = json.loads((model / HF_INDEX).read_text())
    edit(index["weight_map"])
    (model / HF_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=text):
        nmopt.load_pruned(model)


@pytest.mark.parametrize("out", ["o.pt", "o.safetensors"])
@pytest.mark.parametrize("src", ["in.pt", "in.safetensors"])
def test_a_tied_head_stays_dense_with_its_embedding_in_every_format(tmp_path, src, out, capsys):
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(16, 8, generator=g)
    state = {"embed_tokens.weight": emb, "proj.weight": torch.randn(8, 8, generator=g) + 5,
             "lm_head.weight": emb, "a.lora_B.weight": torch.zeros(8, 8),
             "b.lora_B.weight": torch.zeros(8, 8)}  # equal zeros are not ties
    if src.endswith(".pt"):
        torch.save(state, tmp_path / src)  # one storage, as a tied model saves it
    else:
        save({k: v.clone() for k, v in state.items()}, tmp_path / src)  # byte-equal copies
    assert main(["prune", str(tmp_path / src), "--pattern", "2:4", "--out", str(tmp_path / out),
                 "--no-progress"]) == 0
    pruned = load(tmp_path / out)
    assert torch.equal(pruned["lm_head.weight"], emb) and torch.equal(pruned["embed_tokens.weight"], emb)
    assert (pruned["proj.weight"] == 0).sum() == 32
    from nmopt.prune import prune_state_dict

    pruned_names = [r.name for r in prune_state_dict(state, "2:4", progress=False).layers]
    assert pruned_names == ["proj.weight", "a.lora_B.weight", "b.lora_B.weight"]
