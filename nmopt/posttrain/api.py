"""``prune_model``: calibration-aware N:M pruning of a pretrained model, block by block."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from nmopt._arrays import is_conv1d
from nmopt.masks import check_mask
from nmopt.posttrain.adaprune import adaprune
from nmopt.posttrain.admm import admm
from nmopt.posttrain.capture import (
    block_linears,
    calibration_batches,
    capture,
    encoder_states,
    find_blocks,
    input_embeddings,
    other_block_lists,
    token_mask,
)
from nmopt.posttrain.config import PruneConfig
from nmopt.posttrain.hessian import ErrorMeter, StatsCollector, weight_matrix, write_weight
from nmopt.posttrain.methods import magnitude, sparsegpt, wanda
from nmopt.posttrain.report import LayerReport, PruneReport, SkippedLayer

METHODS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt, "admm": admm, "adaprune": adaprune}


def prune_model(model: nn.Module, calibration, config: PruneConfig | None = None, *, blocks=None,
                progress: bool = True) -> PruneReport:
    """Prune every Linear of a pretrained model's blocks to an N:M (transposable) mask, in place.

    Blocks are processed in order; the layers of block b are pruned from the statistics of their
    inputs when blocks < b are already pruned (sequential, as SparseGPT, Wanda and ALPS do), and
    only one block's calibration activations are held at a time.

    Parameters
    ----------
    model : torch.nn.Module
        Typically a Hugging Face ``transformers`` model (LLaMA-style decoder, BERT-style encoder),
        or any module whose forward runs a list of blocks. Pruned on its own device and dtype;
        statistics and solves are float32/float64 whatever that dtype.
    calibration : LongTensor or iterable
        Token ids ``(nsamples, seqlen)`` (split into batches of whole samples), or an iterable of
        model-input dicts (``model(**batch)``) or of input tensors (``model(tensor)``).
    config : PruneConfig, optional
        Pattern, method and settings (default ``PruneConfig()``: transposable 4:8, admm).
    blocks : str or nn.ModuleList, optional
        The repeated blocks (a dotted name such as ``"model.layers"``, or the container). Default:
        the largest ``ModuleList`` of identical blocks.
    progress : bool
        Show a progress bar over the blocks.

    Returns
    -------
    PruneReport
        One row per pruned layer (errors before and after reconstruction, certified gaps, time)
        and the layers left dense with the reason.

    Raises
    ------
    ValueError
        For empty calibration data, sequences longer than ``max_position_embeddings``, token ids
        outside the vocabulary, non-finite activations (naming the block or layer), a model with
        no prunable Linear in its blocks, a selection (``include``/``exclude``) or a pattern that
        fits no layer. Everything that can be checked before a weight changes is checked first.
    TypeError
        For a model that is not an ``nn.Module`` or a config that is not a ``PruneConfig``.
    """
    start = time.perf_counter()
    if config is None:
        config = PruneConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config: expected an nmopt.PruneConfig, got {type(config).__name__}")
    if config.method == "adaprune" and torch.is_inference_mode_enabled():
        raise RuntimeError("method='adaprune' trains the kept weights with autograd, which "
                           "torch.inference_mode() forbids; call prune_model outside it (torch.no_grad "
                           "is fine)")
    block_name, block_list = find_blocks(model, blocks)
    names = [f"{block_name}.{i}" if block_name else str(i) for i in range(len(block_list))]
    plan, skipped = _plan(block_list, names, config)
    for other, count in other_block_lists(model, block_name):  # listed; warned unless chosen
        if blocks is None:
            warnings.warn(f"prune_model: pruning the blocks of {block_name!r}; {other!r} ({count} blocks) holds "
                          f"Linear layers too and stays dense (call prune_model again with blocks={other!r})",
                          stacklevel=2)
        skipped += [SkippedLayer(lname, tuple(weight_matrix_shape(mod)),
                                 f"in the other block stack {other!r}: prune it with blocks={other!r}")
                    for i, block in enumerate(model.get_submodule(other))
                    for lname, mod in block_linears(block, f"{other}.{i}")]
    head = _lm_head(model, config)
    batches = calibration_batches(calibration, model, _input_device(model))

    report = PruneReport(config=config.to_dict(), blocks=f"{block_name or '(model)'} ({len(block_list)} blocks)",
                         skipped=skipped)
    method = METHODS[config.method]
    backup = _Backup()
    with _inference_state(model):
        hidden, calls = capture(model, block_list, names, batches)
        decoder = any(encoder_states(block_list[0], c) is not None for c in calls[0])
        masks = [token_mask(batch, h, decoder) for batch, h in zip(batches, hidden)]  # padding out
        cross = [token_mask(batch, None) for batch in batches]  # the encoder's, for cross-attention
        report.samples = int(sum(h.shape[0] for h in hidden))
        report.tokens = int(sum(h.numel() // h.shape[-1] if k is None else k.sum()
                                for h, k in zip(hidden, masks)))
        bar = _progress(len(block_list), progress)
        try:
            _run_blocks(block_list, names, plan, hidden, calls, (masks, cross), config, method, report,
                        backup, bar)
            if head is not None:
                encdec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
                head_masks = [token_mask(batch, None, encdec) for batch in batches]  # the decoder's
                _prune_head(model, batches, head_masks, head, config, method, report, backup)
        except BaseException:
            backup.restore()  # an error (or Ctrl-C) half-way leaves the model as it was
            raise
        finally:
            if bar is not None:
                bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _run_blocks(block_list, names, plan, hidden, calls, masks, config, method, report, backup, bar) -> None:
    """The sequential pass: statistics of block b on the outputs of the pruned blocks < b (real
    tokens only: ``masks`` = (hidden states', encoder output's) per batch), prune b's layers,
    then run the pruned block b to make the inputs of block b + 1."""
    masks, cross = masks
    fraction = _row_fraction(config, report.tokens)
    for b, block in enumerate(block_list):
        if plan[b]:
            collector = StatsCollector(dict(plan[b]), keep_rows_per_token=fraction, seed=config.seed + b)
            try:
                for i, h in enumerate(hidden):
                    collector.token_mask = masks[i]
                    enc = encoder_states(block, calls[b][i])
                    collector.input_masks = [] if enc is None else [(enc, cross[i])]
                    calls[b][i].run(block, h)
            finally:
                stats = collector.finish()
            cache: dict = {}  # factorisations shared by layers with the same input
            for name, mod in plan[b]:
                if bar is not None:
                    bar.set_postfix_str(name.rsplit(".", 1)[-1])
                row = _prune_layer(name, mod, stats.pop(name), config, method, cache, names[b], backup)
                (report.layers if isinstance(row, LayerReport) else report.skipped).append(row)
            del stats, cache
        if b < len(block_list) - 1:
            hidden[:] = [calls[b][i].run(block, h) for i, h in enumerate(hidden)]
            _check_finite(hidden, names[b])
        calls[b] = None  # this block's recorded arguments are no longer needed
        if bar is not None:
            bar.update(1)


def _input_device(model):
    """Where the calibration inputs go: the input embedding's device, else the first parameter's."""
    weight = getattr(input_embeddings(model), "weight", None)
    if torch.is_tensor(weight):
        return weight.device
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _row_fraction(config, tokens: int) -> float:
    """Share of input rows each layer stores (adaprune only): ``adaprune_tokens`` in all."""
    return min(1.0, config.adaprune_tokens / max(1, tokens)) if config.method == "adaprune" else 0.0


class _Backup:
    """Host copies of the weights (and biases) changed so far, to undo a run that fails half-way."""

    def __init__(self):
        self.saved: list = []

    def save(self, mod) -> None:
        bias = getattr(mod, "bias", None)
        self.saved.append((mod, mod.weight.detach().to("cpu", copy=True),
                           None if bias is None else bias.detach().to("cpu", copy=True)))

    def restore(self) -> None:
        with torch.no_grad():
            for mod, weight, bias in reversed(self.saved):
                mod.weight.copy_(weight.to(mod.weight.device))
                if bias is not None:
                    mod.bias.copy_(bias.to(mod.bias.device))
        self.saved.clear()


def _plan(block_list, names, config) -> tuple[list, list]:
    """Which Linear of which block is pruned; the others with the reason. Raises when none is."""
    p = config.parsed_pattern
    plan, skipped, found, selected = [], [], 0, 0
    for block, name in zip(block_list, names):
        layers, linears = [], block_linears(block, name)
        for lname, mod in linears:
            found += 1
            shape = tuple(weight_matrix_shape(mod))
            if not config.selects(lname):
                skipped.append(SkippedLayer(lname, shape, "not selected by include/exclude"))
                continue
            selected += 1
            if mod.weight.is_meta:
                raise ValueError(f"model: the weights of {lname} are on the meta device (not loaded or "
                                 "offloaded); load the model's weights first")
            if not bool(torch.isfinite(mod.weight).all()):
                raise ValueError(f"model: the weights of {lname} hold nan or inf; nothing was pruned")
            if shape[1] % p.m or (config.transposable and shape[0] % p.m):
                need = "both sides must be multiples" if config.transposable else "its inputs must be a multiple"
                skipped.append(SkippedLayer(lname, shape, f"shape {shape[0]}x{shape[1]}: {need} of M={p.m}"))
                continue
            if nn.utils.parametrize.is_parametrized(mod) or not isinstance(mod.weight, nn.Parameter):
                skipped.append(SkippedLayer(lname, shape, "its weight is computed (parametrize, weight_norm); "
                                            "prune the underlying parameters instead"))
                continue
            layers.append((lname, mod))
        plan.append(layers)
        skipped += _other_weights(block, name, {id(mod) for _, mod in linears}, config)
    if not found and not config.include_lm_head:
        raise ValueError("model: no prunable nn.Linear (or Conv1D) inside the blocks "
                         f"{names[0].rsplit('.', 1)[0] or '(model)'}; nothing to prune")
    if found and not selected and not config.include_lm_head:
        raise ValueError(f"include/exclude: select none of the {found} Linear layers in the blocks "
                         f"(include={config.include}, exclude={config.exclude})")
    if selected and not any(plan) and not config.include_lm_head:
        raise ValueError(f"pattern: {p} fits no layer: no selected Linear has both dimensions a multiple of "
                         f"M={p.m} (e.g. {skipped[-1].name} is {skipped[-1].shape[0]}x{skipped[-1].shape[1]})")
    return plan, skipped


def _other_weights(block, name: str, linears: set, config) -> list:
    """The weights of 2 or more dimensions in a block held by something other than a Linear or an
    embedding (fused MoE experts as one 3-D tensor, convolutions): left dense, listed so that a
    report never claims a block pruned whole. ``linears``: ids of the block's Linear layers."""
    out = []
    for mname, mod in block.named_modules():
        if id(mod) in linears or isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            continue  # embeddings (T5's position bias) are tables, not GEMM weights
        for pname, w in mod.named_parameters(recurse=False):
            full = ".".join(part for part in (name, mname, pname) if part)
            if w.dim() >= 2 and config.selects(full):
                out.append(SkippedLayer(full, tuple(w.shape), f"a {w.dim()}-D weight of "
                                        f"{type(mod).__name__}, not an nn.Linear (e.g. fused MoE "
                                        "experts): not pruned"))
    return out


def weight_matrix_shape(mod) -> tuple[int, int]:
    """``(out, in)`` of a Linear or Conv1D."""
    out, inp = mod.weight.shape
    return (inp, out) if is_conv1d(mod) else (out, inp)


def _lm_head(model, config):
    """``(name, module)`` of the output projection to prune, or None; refusals name the setting."""
    if not config.include_lm_head:
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        raise ValueError("include_lm_head: the model has no Linear output projection (get_output_embeddings())")
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is not None and getattr(emb, "weight", None) is head.weight:
        raise ValueError("include_lm_head: the LM head shares its weight with the input embeddings (tied); "
                         "pruning it would prune the embeddings too. Untie them first or leave include_lm_head=False")
    name = next(n for n, mod in model.named_modules() if mod is head)
    m = config.parsed_pattern.m
    if head.weight.shape[0] % m or head.weight.shape[1] % m:
        raise ValueError(f"include_lm_head: the LM head {name} is {tuple(head.weight.shape)}, not a multiple of M={m}")
    return name, head


def _prune_layer(name, mod, stats, config, method, cache, block_name, backup):
    """Prune one layer in place and return its :class:`LayerReport` (or a SkippedLayer)."""
    start = time.perf_counter()
    W = weight_matrix(mod).to(stats.H.device)
    if stats.tokens == 0:
        return SkippedLayer(name, tuple(W.shape), "no calibration input reached it")
    if not bool(torch.isfinite(stats.H).all()):
        raise ValueError(f"calibration: non-finite activations (nan/inf) reach layer {name} in block {block_name}; "
                         "the model was left unchanged")
    bias = getattr(mod, "bias", None)
    if method is adaprune:
        res = adaprune(W, stats, config, cache, bias=None if bias is None else bias.detach().float())
    else:
        res = method(W, stats, config, cache)
    mask = res.mask
    try:
        check_mask(mask, config.pattern, config.transposable)
    except ValueError as exc:  # find_mask validates its masks: reaching this is a bug, never a user error
        raise RuntimeError(f"{config.method} produced an invalid mask for {name}: {exc}") from None
    masked = W * mask
    W_hat = res.weight * mask
    dbias = None if res.bias is None else bias.detach().float() - res.bias
    meter = ErrorMeter(W, stats.H, stats.xsum, stats.tokens)
    err_before = meter(masked)
    # finite as stored: float16 overflows past 65504 (then the mask alone is kept)
    finite = bool(torch.isfinite(W_hat.to(mod.weight.dtype)).all()) and (
        res.bias is None or bool(torch.isfinite(res.bias.to(bias.dtype)).all()))
    err_after = meter(W_hat, dbias) if finite else float("inf")
    fallback = not err_after <= err_before * (1 + 1e-6) + 1e-12
    if fallback:
        W_hat, err_after, res.bias = masked, err_before, None
    backup.save(mod)
    write_weight(mod, W_hat)
    if res.bias is not None:
        with torch.no_grad():
            bias.copy_(res.bias.to(bias.dtype))
    written = weight_matrix(mod) != 0
    if bool((written & ~mask).any()):  # cannot happen: multiplying by the mask zeroes the rest
        raise RuntimeError(f"{name}: a weight outside the mask is nonzero after writing")
    return LayerReport(name=name, shape=tuple(W.shape), method=config.method, pattern=config.pattern,
                       transposable=config.transposable, error_before=err_before, error_after=err_after,
                       gaps=[float(g) for g in res.gaps], kept=float(mask.float().mean()),
                       seconds=time.perf_counter() - start, iterations=int(res.iterations), fallback=fallback)


def _prune_head(model, batches, masks, head, config, method, report, backup) -> None:
    """Prune the LM head from its inputs on the pruned model (one more forward pass)."""
    name, mod = head
    collector = StatsCollector({name: mod}, keep_rows_per_token=_row_fraction(config, report.tokens), seed=config.seed)
    try:
        for (args, kwargs), keep in zip(batches, masks):
            collector.token_mask = keep
            model(*args, **kwargs)
    finally:
        stats = collector.finish()
    row = _prune_layer(name, mod, stats[name], config, method, {}, "(LM head)", backup)
    (report.layers if isinstance(row, LayerReport) else report.skipped).append(row)


def _check_finite(hidden, block_name) -> None:
    for i, h in enumerate(hidden):
        if h.is_floating_point() and not bool(torch.isfinite(h).all()):
            raise ValueError(f"calibration: non-finite activations (nan/inf) leave the pruned block {block_name} on "
                             f"batch {i}; the model was left unchanged")


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="prune", unit="block")


@contextmanager
def _inference_state(model):
    """Eval mode, no autograd, no KV cache; every module's training flag and the cache restored."""
    flags = [(mod, mod.training) for mod in model.modules()]
    config = getattr(model, "config", None)
    had_cache = config is not None and hasattr(config, "use_cache")
    old_cache = getattr(config, "use_cache", None) if had_cache else None
    model.eval()
    if had_cache:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        for mod, flag in flags:
            mod.training = flag
        if had_cache:
            config.use_cache = old_cache
