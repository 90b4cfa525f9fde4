"""Pruning real model layouts: dtypes as stored, tied weights, GPT-2's (in, out) ``Conv1D``
weights, T5's embeddings and its second block stack, files in subfolders, and usage errors that
must come before any work (``--device``, a corrupt GGUF, ``--masks`` inside ``--out``).

Tiny models are built here from configs (no download), each with a word-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file

import nmopt
from nmopt.checkpoint import CheckpointError
from nmopt.cli import main
from nmopt.posttrain import PruneConfig

WORDS = "the quick brown fox jumps over the lazy dog while pruning keeps n of m weights".split()


def _text(words=600):
    g = torch.Generator().manual_seed(0)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=g).tolist())


def _save(model, directory: Path, dtype=None) -> Path:
    """``model`` (cast to ``dtype``) and a word-level tokenizer into ``directory``, plus a
    calibration text file next to it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([_text()], trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "<s>", "</s>", "<pad>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    (model if dtype is None else model.to(dtype)).save_pretrained(directory)
    fast.save_pretrained(directory)
    (directory.parent / "calib.txt").write_text(_text(), encoding="utf-8")
    return directory


def _llama(tie=False):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=32, max_position_embeddings=64,
        tie_word_embeddings=tie))


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=32, n_positions=64))


def _t5():
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0))


def _calibrated(model_dir: Path, out: Path, *extra, pattern="4:8") -> list[str]:
    return ["prune", str(model_dir), "--pattern", pattern, "--method", "wanda", "--calibration",
            str(model_dir.parent / "calib.txt"), "--nsamples", "2", "--seqlen", "16",
            "--out", str(out), "--no-progress", *extra]


def _tensors(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_calibrated_prune_writes_every_tensor_in_its_stored_dtype(tmp_path):
    """bf16 weights with float32 norms, and a config that names no dtype: each tensor comes
    back in the dtype its file stored it in (the config's dtype used to be applied to all)."""
    src = _save(_llama(), tmp_path / "m", torch.bfloat16)
    stored = load_file(src / "model.safetensors")
    mixed = {k: v.float() if "norm" in k else v for k, v in stored.items()}
    save_file(mixed, src / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main(_calibrated(src, out)) == 0
    got = _tensors(out)
    assert set(got) == set(mixed)
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in mixed.items()}
    assert any(v.dtype == torch.float32 for v in got.values())
    transformers.AutoModelForCausalLM.from_pretrained(out)  # loads back


def test_calibrated_prune_keeps_tied_weights_one_tensor(tmp_path):
    src = _save(_llama(tie=True), tmp_path / "m", torch.bfloat16)
    out = tmp_path / "out"
    assert main(_calibrated(src, out)) == 0
    assert set(_tensors(out)) == set(_tensors(src))  # no lm_head copy of the embedding
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _row_wise_along_input(w: torch.Tensor, n: int, m: int) -> bool:
    """A Conv1D weight (in, out): at most n of every m consecutive inputs, in every column."""
    return nmopt.is_valid_mask((w != 0).T.numpy(), f"{n}:{m}", transposable=False)


def test_gpt2_conv1d_row_wise_groups_run_along_the_input_on_both_paths(tmp_path):
    src = _save(_gpt2(), tmp_path / "m")
    streamed, calibrated = tmp_path / "s", tmp_path / "c"
    for _out, argv in ((streamed, ["prune", str(src), "--pattern", "2:4", "--row-wise",
                                  "--out", str(streamed), "--masks", str(tmp_path / "sm.safetensors"),
                                  "--no-progress"]),
                      (calibrated, _calibrated(src, calibrated, "--row-wise", "--masks",
                                               str(tmp_path / "cm.safetensors"), pattern="2:4"))):
        assert main(argv) == 0
    for out, masks in ((streamed, "sm"), (calibrated, "cm")):
        got, mk = _tensors(out), load_file(tmp_path / f"{masks}.safetensors")
        name = "transformer.h.0.mlp.c_fc.weight"
        assert got[name].shape == (32, 128) and mk[name].shape == (32, 128)  # stored (in, out)
        assert _row_wise_along_input(got[name], 2, 4), masks
        for key, mask in mk.items():  # the masks are shaped and oriented like the weights
            assert not bool((got[key][~mask] != 0).any()), key


def test_gpt2_row_wise_nm_packed_is_refused_before_work(tmp_path, capsys):
    src = _save(_gpt2(), tmp_path / "m")
    capsys.readouterr()
    assert main(["prune", str(src), "--pattern", "2:4", "--row-wise", "--format", "nm-packed",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2  # a usage error
    assert "Conv1D" in _one_error_line(capsys) and not (tmp_path / "o").exists()


def test_a_tied_head_stored_twice_stays_dense_with_its_embedding(tmp_path):
    src = tmp_path / "m"
    _save(_llama(tie=True), src)
    state = load_file(src / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    out, report = tmp_path / "o", tmp_path / "r.json"
    assert main(["prune", str(src), "--pattern", "4:8", "--out", str(out), "--report", str(report),
                 "--no-progress"]) == 0
    got = _tensors(out)
    assert torch.equal(got["lm_head.weight"], state["lm_head.weight"])
    copied = {c["name"]: c["reason"] for c in json.loads(report.read_text())["copied"]}
    assert "tied" in copied["lm_head.weight"]
    both = tmp_path / "both"
    assert main(["prune", str(src), "--pattern", "4:8", "--out", str(both), "--include",
                 "lm_head|embed_tokens|layers", "--no-progress"]) == 0
    got = _tensors(both)
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    assert bool((got["lm_head.weight"] == 0).any())
    head = tmp_path / "head"  # the head alone named: still kept dense with its twin
    assert main(["prune", str(src), "--pattern", "4:8", "--out", str(head), "--include",
                 "lm_head|layers", "--no-progress"]) == 0
    assert torch.equal(_tensors(head)["lm_head.weight"], state["lm_head.weight"])


def test_t5_embeddings_stay_dense_and_the_decoder_is_reported(tmp_path):
    src = _save(_t5(), tmp_path / "m")
    out, report = tmp_path / "o", tmp_path / "r.json"
    assert main(["prune", str(src), "--pattern", "4:8", "--out", str(out), "--report", str(report),
                 "--no-progress"]) == 0
    copied = {c["name"] for c in json.loads(report.read_text())["copied"]}
    assert {"shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"} \
        <= copied
    cal, cal_report = tmp_path / "c", tmp_path / "c.json"
    with pytest.warns(UserWarning, match="decoder.block"):
        assert main(_calibrated(src, cal, "--report", str(cal_report))) == 0
    skipped = json.loads(cal_report.read_text())["skipped"]
    assert len(skipped) == 20 and all("blocks='decoder.block'" in s["reason"] for s in skipped)
    dec = tmp_path / "d"
    assert main(_calibrated(cal, dec, "--blocks", "decoder.block")) == 0
    got = _tensors(dec)
    for name in ("decoder.block.0.layer.1.EncDecAttention.k.weight",
                 "encoder.block.0.layer.0.SelfAttention.q.weight"):
        assert nmopt.is_valid_mask((got[name] != 0).numpy(), "4:8") and bool((got[name] == 0).any())


def test_weights_in_subfolders_are_left_out_and_listed(tmp_path):
    src = _save(_llama(), tmp_path / "m")
    (src / "original").mkdir()
    save_file({"w": torch.ones(8, 8)}, src / "original" / "consolidated.safetensors")
    torch.save({"w": torch.ones(2)}, src / "original" / "consolidated.00.pth")
    (src / "original" / "params.json").write_text("{}")
    (src / "2_Dense").mkdir()  # a sentence-transformers head: its only copy, kept
    save_file({"linear.weight": torch.ones(4, 4)}, src / "2_Dense" / "model.safetensors")
    out, report = tmp_path / "o", tmp_path / "r.json"
    assert main(["prune", str(src), "--pattern", "4:8", "--out", str(out), "--report", str(report),
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "original").iterdir()) == ["params.json"]
    assert set(json.loads(report.read_text())["not_copied"]) == {
        "original/consolidated.safetensors", "original/consolidated.00.pth"}
    assert (out / "2_Dense" / "model.safetensors").read_bytes() == \
        (src / "2_Dense" / "model.safetensors").read_bytes()
    (src / "original" / "params.json").unlink()  # a folder of left-out copies only: not made
    (src / "original" / "sub").mkdir()  # nor one holding only such a folder
    torch.save({"w": torch.ones(2)}, src / "original" / "sub" / "consolidated.01.pth")
    assert main(["prune", str(src), "--pattern", "4:8", "--out", str(out), "--force",
                 "--no-progress"]) == 0
    assert not (out / "original").exists() and (out / "2_Dense").is_dir()


@pytest.mark.parametrize("device, says", [("bogus", "not a torch device"), ("meta", "no data"),
                                          ("cuda:99", "CUDA")])
def test_bad_device_is_refused_before_loading(tmp_path, capsys, device, says):
    src = _save(_llama(), tmp_path / "m")
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 CUDA devices")
    capsys.readouterr()
    assert main(_calibrated(src, tmp_path / "o", "--device", device)) == 2
    line = _one_error_line(capsys)
    assert "--device" in line and says in line and not (tmp_path / "o").exists()


def test_a_corrupt_gguf_is_one_error_line(tmp_path, capsys):
    pytest.importorskip("gguf")
    bad = tmp_path / "t.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    (tmp_path / "calib.txt").write_text(_text())
    assert main(["prune", str(bad), "--pattern", "4:8", "--calibration", str(tmp_path / "calib.txt"),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "cannot load it" in _one_error_line(capsys)


@pytest.mark.parametrize("calibrated", [False, True])
def test_masks_inside_a_replaced_out_are_refused_before_work(tmp_path, capsys, calibrated):
    src = _save(_llama(), tmp_path / "m")
    out = tmp_path / "o"
    assert main(["prune", str(src), "--pattern", "4:8", "--out", str(out), "--no-progress"]) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    extra = ["--masks", str(out / "m.safetensors"), "--force"]
    argv = _calibrated(src, out, *extra) if calibrated else \
        ["prune", str(src), "--pattern", "4:8", "--out", str(out), "--no-progress", *extra]
    assert main(argv) == 2
    assert "holds --masks" in _one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("kw, says", [(dict(seed=2**70), "seed"), (dict(damp=1e308), "damp")])
def test_prune_config_bounds(kw, says):
    with pytest.raises(ValueError, match=says):
        PruneConfig(**kw)


def test_calibration_forms_with_clear_errors():
    model = _llama()
    ids = torch.randint(0, 32, (2, 8))
    with pytest.raises(TypeError, match="list of such dicts"):
        nmopt.prune_model(model, {"input_ids": ids}, PruneConfig(method="wanda"), progress=False)
    padding = [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}]
    with pytest.raises(ValueError, match="every token is padding"):
        nmopt.prune_model(model, padding, PruneConfig(method="wanda"), progress=False)


def test_load_pruned_names_a_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        nmopt.load_pruned(tmp_path / "missing")


def test_a_model_out_with_a_file_extension_is_refused(tmp_path, capsys):
    src = _save(_llama(), tmp_path / "m")
    capsys.readouterr()
    assert main(_calibrated(src, tmp_path / "o.safetensors")) == 2
    assert "model directory" in _one_error_line(capsys) and not (tmp_path / "o.safetensors").exists()
