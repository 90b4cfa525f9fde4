"""Pretrained models in and out: load, calibrate, evaluate, save (the ``nmopt prune MODEL`` path).

A MODEL is a Hugging Face model directory (``config.json`` plus weights) or a ``.gguf`` file,
which ``transformers`` dequantizes to float32 on load (its tokenizer comes from the same file).
The pruned model is written as a plain float safetensors directory that ``from_pretrained``
loads back without ``gguf``, staged next to OUT_DIR (``AtomicFiles.add_dir``) and moved into place
only when complete.
``transformers``, ``accelerate`` and ``gguf`` are the optional extra ``nmopt[hf]``; they are
imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nmopt.checkpoint import CheckpointError
from nmopt.safetensors_stream import model_shards, read_header

HF_HINT = "pip install 'nmopt[hf]'"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(f"pretrained models need transformers: {HF_HINT}") from None
    return transformers


@dataclass
class Pretrained:
    """A loaded model with its tokenizer, where it came from and the dtype it was stored in."""

    model: Any
    tokenizer: Any
    path: Path
    gguf: bool
    source_dtype: str = "float32"
    source_dtypes: dict[str, str] = field(default_factory=dict)  # per tensor, from the files


def is_model_path(path: str | os.PathLike) -> bool:
    """True for a directory or a ``.gguf`` file (what ``nmopt prune`` treats as a MODEL)."""
    p = Path(path)
    return p.is_dir() or p.suffix.lower() == ".gguf"


def _dtype_kw(transformers, dtype) -> dict:  # ``torch_dtype`` became ``dtype`` in transformers 4.56
    return {"dtype" if tuple(map(int, transformers.__version__.split(".")[:2])) >= (4, 56) else "torch_dtype": dtype}


def load_pretrained(path: str | os.PathLike, device: str | None = None) -> Pretrained:
    """Load a model directory (the class its config names) or a GGUF file, in float32, with its tokenizer.

    Raises ValueError naming ``path`` when it is neither or cannot be loaded, ImportError naming
    ``nmopt[hf]`` when ``transformers`` (or, for GGUF, ``gguf`` / ``accelerate``) is missing.
    """
    import torch

    tf = _transformers()
    p = Path(path)
    kw: dict[str, Any] = _dtype_kw(tf, torch.float32)
    source_dtype = "float32"
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ValueError(f"MODEL {str(p)!r}: no such GGUF file")
        for dep in ("gguf", "accelerate"):
            try:
                __import__(dep)
            except ImportError:
                raise ImportError(f"loading GGUF files needs {dep}: {HF_HINT}") from None
        where, extra, cls = str(p.parent), {"gguf_file": p.name}, tf.AutoModelForCausalLM
    elif (p / "config.json").is_file():
        try:
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
            archs = cfg.get("architectures") or []
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"MODEL {str(p)!r}: config.json is not a JSON object ({exc})") from None
        stored = stored_dtypes(p)
        source_dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or _most_common(stored))
        cls = getattr(tf, archs[0], None) if archs else None
        if cls is None:
            causal = any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
            cls = tf.AutoModelForCausalLM if causal else tf.AutoModel
        where, extra = str(p), {}
    else:
        raise ValueError(f"MODEL {str(p)!r}: not a Hugging Face model directory (no config.json) "
                         "or a .gguf file")
    with _quiet(tf):
        try:
            model = cls.from_pretrained(where, **extra, **kw)
        except Exception as exc:  # noqa: BLE001 - a corrupt file fails anywhere (struct.error...)
            if isinstance(exc, ImportError):
                raise
            raise ValueError(f"MODEL {str(p)!r}: cannot load it ({_first_line(exc)})") from None
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(where, **extra)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"MODEL {str(p)!r}: no usable tokenizer ({_first_line(exc)})") from None
    model.eval()
    if device is not None:
        model.to(device)
    return Pretrained(model, tokenizer, p, p.suffix.lower() == ".gguf", source_dtype,
                      {} if p.suffix.lower() == ".gguf" else stored)


def stored_dtypes(directory: str | os.PathLike) -> dict[str, str]:
    """The dtype (torch's name) each tensor of a model directory's safetensors weights is stored
    in; {} when it has none (other formats: the config's dtype stands for every tensor)."""
    try:
        shards, _ = model_shards(directory)
        return {name: e.dtype for shard in shards
                for name, e in read_header(Path(directory) / shard)[0].items()}
    except CheckpointError:
        return {}


def _most_common(dtypes: dict[str, str]) -> str:
    """The floating dtype most tensors are stored in ("float32" when there is none)."""
    floats = [d for d in dtypes.values() if d in ("float32", "float16", "bfloat16", "float64")]
    return max(sorted(set(floats)), key=floats.count) if floats else "float32"  # ties: by name


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet(tf):
    """transformers' warnings (sequence longer than the model, GGUF notes) off for a moment."""
    before, bars = tf.logging.get_verbosity(), tf.utils.logging.is_progress_bar_enabled()
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        tf.logging.set_verbosity(before)
        if bars:
            tf.utils.logging.enable_progress_bar()


def max_positions(config) -> int | None:
    """The longest sequence the model's config allows (None when it states none)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode(tokenizer, text: str):
    """All token ids of ``text`` as a 1-D LongTensor (no special tokens, no truncation)."""
    import torch

    with _quiet(_transformers()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def read_text(path: str | os.PathLike, what: str = "--calibration") -> str:
    """A UTF-8 text file's contents; ValueError naming the file when missing, binary or empty."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} {str(p)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {str(p)!r}: cannot read it as UTF-8 text ({_first_line(exc)})") from None
    if not text.strip():
        raise ValueError(f"{what} {str(p)!r} is empty: no calibration tokens")
    return text


def calibration_windows(ids, nsamples: int, seqlen: int, seed: int = 0, positions: int | None = None):
    """``nsamples`` windows of ``seqlen`` tokens of ``ids`` at uniform starts drawn with ``seed``.

    Returns a LongTensor (nsamples, seqlen); ``positions`` (the model's limit) bounds ``seqlen``.
    """
    import torch

    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 1, got {nsamples} and {seqlen}")
    if positions is not None and seqlen > positions:
        raise ValueError(f"--seqlen {seqlen} is longer than the model's {positions} positions")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise ValueError("the calibration text has no tokens")
    if ids.numel() < seqlen:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than one window of "
                         f"--seqlen {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)
    return ids[starts[:, None] + torch.arange(seqlen)]


def perplexity(model, ids, seqlen: int, max_tokens: int | None = None) -> float:
    """Perplexity of a causal LM on the non-overlapping ``seqlen`` windows of ``ids[:max_tokens]``.

    The remainder shorter than a window is dropped; each window predicts its ``seqlen - 1`` next
    tokens and the mean negative log-likelihood over all of them is exponentiated.
    """
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long).flatten()[:max_tokens]
    windows = ids.numel() // seqlen
    if windows == 0:
        raise ValueError(f"perplexity needs at least {seqlen} tokens, got {ids.numel()}")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(windows):
                x = ids[i * seqlen:(i + 1) * seqlen][None].to(device)
                logits = getattr(model(input_ids=x), "logits", None)
                if logits is None:
                    raise ValueError(f"{type(model).__name__} returns no logits: perplexity needs a causal LM")
                nll += float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:],
                                                               reduction="sum"))
                count += seqlen - 1
    finally:
        model.train(was_training)
    return math.exp(nll / count)


@contextlib.contextmanager
def _plain_float(model):
    """Hide a GGUF load's quantization markers so ``save_pretrained`` writes plain floats."""
    cfg = model.config
    saved = {k: getattr(model, k) for k in ("hf_quantizer", "is_quantized") if k in vars(model)}
    qcfg = vars(cfg).pop("quantization_config", None)
    for k in saved:
        setattr(model, k, None if k == "hf_quantizer" else False)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(model, k, v)
        if qcfg is not None:
            cfg.quantization_config = qcfg


def save_pretrained_dir(model, tokenizer, directory: str | os.PathLike, dtype: str | None = None,
                        dtypes: dict[str, str] | None = None) -> None:
    """Write ``model`` (safetensors) and ``tokenizer`` into an existing (staged) ``directory``.

    A model loaded from GGUF is written as plain floats that reload without ``gguf``. Floating
    weights are cast to ``dtypes[name]`` (the dtype each was stored in, :func:`stored_dtypes`),
    else to ``dtype`` (e.g. the source config's ``"bfloat16"``); zeros stay zeros, and tied
    weights stay one tensor.
    """
    state = _cast_state(model, dtype, dtypes or {})
    with _plain_float(model), _quiet(_transformers()):
        model.save_pretrained(str(directory), safe_serialization=True, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
    if state is not None and dtype not in (None, "float32", "auto"):
        path = Path(directory) / "config.json"
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg["dtype" if "dtype" in cfg else "torch_dtype"] = dtype
        path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _cast_state(model, dtype: str | None, dtypes: dict[str, str]):
    """``model.state_dict()`` with floating tensors cast as :func:`save_pretrained_dir` says, or
    None when nothing changes. A tensor under several names (tied) is cast once."""
    import torch

    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    state, cast, changed = {}, {}, False
    for key, v in model.state_dict().items():
        want = dtypes.get(key) or dtypes.get(key.removeprefix(prefix)) \
            or dtypes.get(prefix + key) or dtype
        to = getattr(torch, str(want), None) if want not in (None, "auto") else None
        if not v.is_floating_point() or not isinstance(to, torch.dtype) \
                or not to.is_floating_point or v.dtype == to:
            state[key] = v
            continue
        same = (v.device, v.data_ptr(), tuple(v.shape), v.stride(), to)  # state_dict detaches
        state[key] = cast[same] if same in cast else cast.setdefault(same, v.to(to))
        changed = True
    return state if changed else None


def layer_masks(model, report) -> dict[str, Any]:
    """Boolean masks (``weight != 0``) of the layers ``report`` pruned, by weight name, shaped as
    the weight is stored (a ``Conv1D``'s is (in, out)), as the checkpoint path writes them.

    The nonzeros of a pruned weight are a subset of its mask, so they form a valid N:M mask too.
    """

    modules = dict(model.named_modules())
    return {f"{row.name}.weight": modules[row.name].weight.detach().ne(0).cpu().contiguous()
            for row in report.layers}
