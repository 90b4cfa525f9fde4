"""``nmopt prune MODEL`` and ``nmopt bench posttrain`` on a tiny random LLaMA built here (no download).

The model directory holds a 2-block LLaMA (hidden 64) and a word-level tokenizer trained on a
short text; everything runs in-process through ``nmopt.cli.main``. The SmolLM2 GGUF test skips
when ``../shared/data`` is absent (a user's clone).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import nmopt
from nmopt.cli import main
from nmopt.posttrain import PruneReport

SMOLLM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ("the quick brown fox jumps over the lazy dog while pruning keeps at most n of every m weights in "
         "each tile of a matrix and the transposed matrix stays sparse as well").split()


def make_text(words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx) + "\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model_dir, calibration_file): a random 2-block LLaMA with its tokenizer, and a text file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    text = make_text(1200)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(fast), max_position_embeddings=128)
    torch.manual_seed(0)
    model_dir = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    calib = root / "calib.txt"
    calib.write_text(text, encoding="utf-8")
    return model_dir, calib


def _args(tiny, out, *extra, method="wanda", pattern="4:8"):
    model_dir, calib = tiny
    return ["prune", str(model_dir), "--pattern", pattern, "--method", method, "--calibration", str(calib),
            "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--no-progress", *extra]


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _load(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("method,row_wise", [("wanda", False), ("sparsegpt", True)])
def test_prune_model_dir_reloads_with_its_zeros(tiny, tmp_path, capsys, method, row_wise):
    from safetensors.torch import load_file

    out, masks, report = tmp_path / "pruned", tmp_path / "masks.safetensors", tmp_path / "r.json"
    extra = ["--masks", str(masks), "--report", str(report)] + (["--row-wise"] if row_wise else [])
    assert main(_args(tiny, out, *extra, method=method)) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and f"wrote pruned model: {out}" in text
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.json").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    pruned, dense = _load(out), _load(tiny[0])
    kept = load_file(str(masks))
    rep = PruneReport.from_json(report)
    assert rep.layers_pruned == 14 == len(kept)
    assert PruneReport.from_json(rep.to_json()).to_dict() == rep.to_dict()
    params, original = dict(pruned.named_parameters()), dict(dense.named_parameters())
    for row in rep.layers:
        w, mask = params[f"{row.name}.weight"].detach(), kept[f"{row.name}.weight"]
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert nmopt.is_valid_mask(mask.numpy(), "4:8", transposable=not row_wise)
        assert nmopt.is_valid_mask((w != 0).numpy(), "4:8", transposable=not row_wise)
        assert not w[~mask].any() and 0.4 < float(mask.float().mean()) <= 0.5
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(params[name], original[name])
    if method == "wanda":  # no weight update: the kept weights are the original ones
        name = f"{rep.layers[0].name}.weight"
        assert torch.equal(params[name], original[name] * kept[name])


def test_a_bfloat16_model_is_written_back_in_bfloat16(tiny, tmp_path, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny[0]).to(torch.bfloat16).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((tiny[0] / name).read_bytes())
    out = tmp_path / "out"
    argv = _args(tiny, out, method="magnitude")
    argv[1] = str(src)
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert w.dtype == torch.bfloat16 and nmopt.is_valid_mask((w != 0).numpy(), "4:8")


def test_refuses_an_existing_out_dir_without_force(tiny, tmp_path, capsys):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(_args(tiny, out, method="magnitude")) == 2
    assert "exists; pass --force" in _one_error_line(capsys)
    assert main(_args(tiny, out, "--force", method="magnitude")) == 2  # holds no model
    assert "holds no model" in _one_error_line(capsys) and (out / "old.txt").exists()
    (out / "config.json").write_text("{}")  # a previous output: replaced whole
    assert main(_args(tiny, out, "--force", method="magnitude")) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert _leftovers(tmp_path) == []
    (tmp_path / "file").write_text("x")
    assert main(_args(tiny, tmp_path / "file", "--force", method="magnitude")) == 2
    assert "OUT_DIR must be a directory" in _one_error_line(capsys)


@pytest.mark.parametrize("case,code,message", [
    ("empty", 1, "is empty: no calibration tokens"),
    ("blank", 1, "is empty: no calibration tokens"),
    ("seqlen", 1, "longer than the model's 128 positions"),
    ("too-short", 1, "fewer than one window"),
    ("method", 2, "invalid choice: 'obs'"),
    ("checkpoint", 2, "must be a Hugging Face model directory or a .gguf file"),
    ("no-calibration", 2, "needs --calibration"),
    ("masks-ext", 2, "masks are written as .safetensors"),
    ("solver", 2, "unknown solver 'fast'"),
])
def test_refuses_bad_input_with_one_clear_error(tiny, tmp_path, capsys, case, code, message):
    model_dir, calib = tiny
    out = tmp_path / "pruned"
    argv = _args(tiny, out)
    if case in ("empty", "blank", "too-short"):
        bad = tmp_path / "bad.txt"
        bad.write_text({"empty": "", "blank": " \n\t\n", "too-short": "the quick brown fox"}[case])
        argv[argv.index(str(calib))] = str(bad)
    elif case == "seqlen":
        argv[argv.index("--seqlen") + 1] = "256"
    elif case == "method":
        argv[argv.index("--method") + 1] = "obs"
    elif case == "checkpoint":
        argv[1] = str(model_dir / "model.safetensors")
    elif case == "no-calibration":
        i = argv.index("--calibration")
        del argv[i:i + 2]
    elif case == "solver":
        argv += ["--solver", "fast"]
    else:
        argv += ["--masks", str(tmp_path / "m.pt")]
    assert main(argv) == code
    line = _one_error_line(capsys)
    assert message in line, line
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["save", "masks"])
def test_failure_leaves_no_partial_output(tiny, tmp_path, capsys, monkeypatch, where):
    from nmopt.posttrain import prune_cli

    real_save = prune_cli.save_pretrained_dir

    def save_then_fail(model, tokenizer, directory, dtype=None, dtypes=None):
        real_save(model, tokenizer, directory, dtype, dtypes)
        assert any(Path(directory).iterdir())  # a partial directory exists at this point
        raise OSError("disk full (injected)")

    def fail(*args, **kwargs):
        raise RuntimeError("masks failed (injected)")

    if where == "save":
        monkeypatch.setattr(prune_cli, "save_pretrained_dir", save_then_fail)
    else:
        monkeypatch.setattr(prune_cli, "layer_masks", fail)
    out, masks, report = tmp_path / "pruned", tmp_path / "m.safetensors", tmp_path / "r.json"
    assert main(_args(tiny, out, "--masks", str(masks), "--report", str(report), method="magnitude")) == 1
    assert "injected" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_keyboard_interrupt_leaves_existing_out_dir_intact(tiny, tmp_path, capsys, monkeypatch):
    from nmopt.posttrain import prune_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    (out / "config.json").write_text("{}")  # a previous output
    monkeypatch.setattr(prune_cli, "save_pretrained_dir", interrupted)
    assert main(_args(tiny, out, "--force", method="magnitude")) == 130
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt"]
    assert _leftovers(tmp_path) == []


def test_bench_posttrain_on_the_tiny_model(tiny, tmp_path, capsys):
    model_dir, calib = tiny
    out = tmp_path / "bench"
    argv = ["bench", "posttrain", "--model", str(model_dir), "--text", str(calib), "--patterns", "4:8",
            "--methods", "magnitude,wanda", "--rowwise", "", "--adaprune", "", "--nsamples", "2",
            "--seqlen", "32", "--eval-tokens", "256", "--quiet", "--out", str(out)]
    pytest.importorskip("matplotlib")
    assert main(argv) == 0
    result = json.loads((out / "posttrain.json").read_text())
    runs = [r["run"] for r in result["rows"]]
    assert runs == ["dense", "transposable 4:8 magnitude", "transposable 4:8 wanda"]
    for row in result["rows"]:
        assert row["ppl"] > 1
    assert result["rows"][1]["layers"] == 14 and result["rows"][1]["error"] > 0
    status = {t["target"]: t["status"] for t in result["targets"]}
    assert status["wanda <= magnitude at transposable 4:8"] in ("met", "missed")
    assert status["admm transposable 4:8 perplexity <= 1/4 of wanda's"] == "not run"
    md = (out / "posttrain.md").read_text()
    assert "## Targets" in md and "transposable 4:8 wanda" in md
    assert (out / "posttrain.png").stat().st_size > 0
    assert main(argv[:2] + ["--methods", "obs"]) == 2


def test_bench_targets_are_checked_from_the_rows():
    from nmopt.bench.posttrain import check_targets

    def row(kind, pattern, method, ppl, seconds=1.0):
        return {"kind": kind, "pattern": pattern, "method": method, "ppl": ppl, "seconds": seconds,
                "run": f"{kind} {pattern} {method}"}

    rows = [row("transposable", "4:8", m, p) for m, p in
            (("magnitude", 1000.0), ("wanda", 400.0), ("sparsegpt", 150.0), ("admm", 90.0))]
    rows += [row("transposable", "16:32", "admm", 40.0, seconds=700.0), row("row-wise", "2:4", "wanda", 60.0),
             row("row-wise", "2:4", "admm", 45.0)]
    got = {t["target"]: t["status"] for t in check_targets(rows)}
    assert got["admm transposable 4:8 perplexity <= 1/4 of wanda's"] == "met"
    assert got["best transposable 16:32 <= best row-wise 2:4"] == "met"
    assert got["admm <= sparsegpt <= wanda <= magnitude at transposable 4:8"] == "met"
    assert got["admm <= wanda at row-wise 2:4"] == "met"
    assert got["admm prunes the model in <= 10 minutes"] == "missed"
    rows[1]["ppl"] = 2000.0
    got = {t["target"]: t["status"] for t in check_targets(rows)}
    assert got["admm <= sparsegpt <= wanda <= magnitude at transposable 4:8"] == "missed"


@pytest.mark.slow
def test_gguf_model_prunes_and_reloads_without_gguf(tmp_path, capsys, monkeypatch):
    if not SMOLLM.exists():
        pytest.skip(f"{SMOLLM} not found (a user's clone has no ../shared)")
    pytest.importorskip("gguf")
    calib = tmp_path / "calib.txt"
    calib.write_text(make_text(400), encoding="utf-8")
    out = tmp_path / "smol"
    argv = ["prune", str(SMOLLM), "--pattern", "8:16", "--method", "wanda", "--calibration", str(calib),
            "--nsamples", "1", "--seqlen", "32", "--include", r"layers\.0\.", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "model.layers.0.mlp.down_proj" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    monkeypatch.setitem(sys.modules, "gguf", None)  # reloading must not need gguf
    model = _load(out)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)("def f(): pass")["input_ids"]) > 2
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    assert nmopt.is_valid_mask((w != 0).numpy(), "8:16") and float((w == 0).float().mean()) >= 0.5
    assert float((model.model.layers[1].mlp.down_proj.weight == 0).float().mean()) < 0.01
