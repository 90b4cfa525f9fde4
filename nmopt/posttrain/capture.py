"""Finding the blocks, turning calibration data into batches, and capturing the blocks' inputs."""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from nmopt._arrays import is_conv1d

# Calibration token tensors are split into batches of about this many tokens (whole samples).
_BATCH_TOKENS = 2048


class _Stop(Exception):
    """Raised by the capture hook to end the model's forward once the inputs are recorded."""


def find_blocks(model: nn.Module, blocks) -> tuple[str, list]:
    """The name and the list of the repeated transformer blocks.

    Without ``blocks``: the largest ``nn.ModuleList`` (or ``nn.Sequential``) of at least two
    children that all have the same class and hold Linear layers (``model.layers``,
    ``encoder.layer``, ``h``...), not inside a block of another such list (a block's MoE
    experts); the first such list wins a tie (an encoder-decoder's encoder).
    ``blocks`` may name it (dotted path) or be the container itself.
    """
    if blocks is None:
        best, best_key = None, None
        lists = list(_block_lists(model))
        names = [name for name, _ in lists]
        for name, mod in lists:
            if any(name.startswith(outer + ".") for outer in names if outer):
                continue  # inside a block of another list (MoE experts): that list is the stack
            # prefer lists whose blocks hold Linear layers, then the longest, then the first found
            key = (bool(block_linears(mod[0], "")), len(mod))
            if best_key is None or key > best_key:
                best, best_key = (name, mod), key
        if best is None:
            raise ValueError("blocks: no repeated nn.ModuleList of identical blocks found in the model; "
                             "pass blocks= (a dotted module name such as 'model.layers', or the ModuleList)")
        return best[0], list(best[1])
    if isinstance(blocks, str):
        try:
            container = model.get_submodule(blocks) if blocks else model
        except AttributeError:
            raise ValueError(f"blocks: the model has no submodule {blocks!r}") from None
        name = blocks
    elif isinstance(blocks, nn.Module):
        container = blocks
        name = next((n for n, mod in model.named_modules() if mod is blocks), None)
        if name is None:
            raise ValueError("blocks: the module given is not part of the model")
    else:
        raise TypeError(f"blocks: expected None, a dotted module name or an nn.ModuleList, got {blocks!r}")
    if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
        raise ValueError(f"blocks: {name or 'the model'!r} is a {type(container).__name__}, expected a non-empty "
                         "nn.ModuleList or nn.Sequential of blocks")
    return name, list(container)


def _block_lists(model: nn.Module):
    """``(name, list)`` of every ModuleList / Sequential of two or more same-class blocks with
    parameters."""
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 2 \
                and len({type(child) for child in mod}) == 1 and any(True for _ in mod[0].parameters()) \
                and not isinstance(mod[0], (nn.ModuleList, nn.ModuleDict)):  # lists of lists: no forward
            yield name, mod


def other_block_lists(model: nn.Module, chosen: str) -> list[tuple[str, int]]:
    """``(name, blocks)`` of the block lists with Linear layers that are neither ``chosen`` nor
    inside or around it (an encoder-decoder's other stack), which a call on ``chosen`` leaves dense."""
    return [(name, len(mod)) for name, mod in _block_lists(model)
            if name != chosen and not name.startswith(chosen + ".") and not chosen.startswith(name + ".")
            and block_linears(mod[0], "")]


def block_linears(block: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Linear`` (and HF ``Conv1D``) inside a block, with full names, in module order."""
    out = []
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) or is_conv1d(mod):
            out.append((".".join(p for p in (prefix, name) if p), mod))  # a block may be a Linear
    return out


def calibration_batches(calibration, model: nn.Module, device) -> list[tuple[tuple, dict]]:
    """Split ``calibration`` into ``(args, kwargs)`` model calls, checking it first.

    A tensor (token ids ``(nsamples, seqlen)``, or any input tensor whose first dimension is the
    sample) is split into batches of whole samples; an iterable yields one batch per item (a dict
    of model inputs, or a tensor / tuple of positional inputs).
    """
    config = getattr(model, "config", None)
    max_pos = getattr(config, "max_position_embeddings", None)
    vocab = getattr(config, "vocab_size", None)
    if torch.is_tensor(calibration):
        ids = calibration
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.numel() == 0:
            raise ValueError(f"calibration: no tokens (shape {tuple(calibration.shape)}); "
                             "pass token ids of shape (nsamples, seqlen) with nsamples, seqlen >= 1")
        if not ids.is_floating_point():
            _check_ids(ids, max_pos, vocab)
        elif ids.dim() == 2 and isinstance(input_embeddings(model), nn.Embedding):
            raise TypeError(f"calibration: token ids must be integers, got {ids.dtype}; pass "
                            "ids.long() (or a list of input dicts, e.g. with inputs_embeds)")
        per = max(1, _BATCH_TOKENS // max(1, math.prod(ids.shape[1:])))
        return [((chunk.to(device),), {}) for chunk in ids.split(per)]
    if isinstance(calibration, Mapping):
        raise TypeError("calibration: got one dict of model inputs; pass a list of such dicts (one "
                        "per batch), e.g. [batch]")
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError(f"calibration: expected a LongTensor of token ids (nsamples, seqlen) or an iterable of "
                        f"model-input dicts, got {type(calibration).__name__}")
    batches = []
    for i, item in enumerate(calibration):
        if isinstance(item, Mapping):
            kwargs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in item.items()}
            ids = kwargs.get("input_ids")
            first = ids if ids is not None else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
            if first is None or first.numel() == 0:
                raise ValueError(f"calibration: batch {i} holds no input tensor (or an empty one)")
            if ids is not None:
                _check_ids(ids, max_pos, vocab)
            batches.append(((), kwargs))
        elif torch.is_tensor(item) or isinstance(item, (tuple, list)):
            args = (item,) if torch.is_tensor(item) else tuple(item)
            args = tuple(a.to(device) if torch.is_tensor(a) else a for a in args)
            if not args or not torch.is_tensor(args[0]) or args[0].numel() == 0:
                raise ValueError(f"calibration: batch {i} is empty")
            if not args[0].is_floating_point():
                _check_ids(args[0], max_pos, vocab)
            batches.append((args, {}))
        else:
            raise TypeError(f"calibration: batch {i} is a {type(item).__name__}; expected a dict of model "
                            "inputs or a tensor")
    if not batches:
        raise ValueError("calibration: no batches (the iterable is empty); pass at least one sample")
    masks = [b[1].get("attention_mask") for b in batches]
    if all(torch.is_tensor(am) and am.dim() == 2 and not bool(am.any()) for am in masks):
        raise ValueError("calibration: every token is padding (attention_mask is 0 everywhere); "
                         "pass at least one real token")
    return batches


def input_embeddings(model: nn.Module):
    """The model's input embedding module (transformers' ``get_input_embeddings``), or None."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def token_mask(batch: tuple[tuple, dict], hidden: torch.Tensor | None,
               decoder: bool = False) -> torch.Tensor | None:
    """The real tokens of a calibration batch, one flag per row of ``hidden`` (B, T, d)
    flattened (None: any shape), from a dict batch's 2-D ``attention_mask`` (0: padding), or
    ``decoder_attention_mask`` for the ``decoder`` of an encoder-decoder; None when every token
    is real or the batch has no such mask."""
    am = batch[1].get("decoder_attention_mask" if decoder else "attention_mask")
    if not torch.is_tensor(am) or am.dim() != 2 \
            or (hidden is not None and tuple(am.shape) != tuple(hidden.shape[:-1])):
        return None
    keep = am.reshape(-1) != 0
    return None if bool(keep.all()) else keep.to(am.device if hidden is None else hidden.device)


def encoder_states(block: nn.Module, call) -> torch.Tensor | None:
    """The encoder output a decoder block of an encoder-decoder receives in ``call`` (its
    ``encoder_hidden_states`` argument, often passed by position), or None."""
    try:
        bound = inspect.signature(block.forward).bind_partial(*call.args, **call.kwargs)
    except (TypeError, ValueError):
        return None
    enc = bound.arguments.get("encoder_hidden_states")
    return enc if torch.is_tensor(enc) else None


def _check_ids(ids: torch.Tensor, max_pos, vocab) -> None:
    if ids.numel() == 0:
        raise ValueError(f"calibration: no tokens (shape {tuple(ids.shape)})")
    if max_pos is not None and ids.shape[-1] > max_pos:
        raise ValueError(f"calibration: sequences of {ids.shape[-1]} tokens are longer than the model's "
                         f"max_position_embeddings={max_pos}; use seqlen <= {max_pos}")
    if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(f"calibration: token ids must lie in 0..{vocab - 1} (vocab_size), got "
                         f"{int(ids.min())}..{int(ids.max())}")


class BlockCall:
    """One recorded call of a block: its args and kwargs, with the hidden state's slot."""

    __slots__ = ("args", "kwargs", "slot")

    def __init__(self, args: tuple, kwargs: dict, slot):
        self.args, self.kwargs, self.slot = args, kwargs, slot

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The block on ``hidden`` (a copy: a block may change its input in place)."""
        args, kwargs = list(self.args), dict(self.kwargs)
        if isinstance(self.slot, int):
            args[self.slot] = hidden.clone()
        else:
            kwargs[self.slot] = hidden.clone()
        return first_output(block(*args, **kwargs))


def first_output(out):
    """The hidden state in a block's output: a tensor, or the first element of a tuple/output."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    if hasattr(out, "to_tuple"):
        return first_output(out.to_tuple())
    raise TypeError(f"blocks: a block returned {type(out).__name__}; expected a tensor or a tuple whose first "
                    "element is the hidden state")


def _is_kv_cache(x) -> bool:
    """A ``transformers`` KV cache (only a model built with transformers loaded can pass one)."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    return cache_utils is not None and isinstance(x, cache_utils.Cache)


def _same_hidden(h, out) -> bool:
    """Whether a block's input ``h`` is block 0's output ``out`` (its first element), as it is
    when each block feeds the next (the later blocks are identities during the capture)."""
    ref = out if torch.is_tensor(out) else out[0] if isinstance(out, tuple) and out else None
    if ref is None or h is ref:  # another output type: the stand-in refuses it, naming it
        return True
    return torch.is_tensor(ref) and h.shape == ref.shape and bool(torch.equal(h, ref))


def capture(model: nn.Module, blocks: list, names: list[str], batches) -> tuple[list, list]:
    """Record every block's call for every batch, running only block 0 of the dense model once.

    Returns ``(hidden, calls)``: the inputs of block 0 per batch, and ``calls[b][i]``, the
    :class:`BlockCall` of block ``b`` on batch ``i`` (its hidden state removed: it is recomputed
    from the pruned blocks). Recording every block, not only block 0, keeps per-layer arguments
    right (sliding-window and global layers get different attention masks). To make that cheap,
    the blocks are stand-ins during the pass: block 0 runs for real on each batch, and every
    later block returns its input with the rest of block 0's output on that batch (T5 passes its
    position bias, which holds the batch's attention mask, from block to block that way). The
    forward stops at the last block. The inputs are recorded before the blocks' own forward
    pre-hooks run (they run again when a block is replayed). Raises ``ValueError`` if block 0's
    input is not finite, or if a block's input is not the previous block's output (blocks that
    do not form a chain, such as XLM's separate attention and feed-forward lists).
    """
    calls: list[list] = [[] for _ in blocks]
    hidden: list = []
    template: list = []  # the real output of block 0 on the current batch

    def pre_hook(b):
        def hook(module, args, kwargs):
            if args and torch.is_tensor(args[0]):
                slot, h = 0, args[0]
            elif torch.is_tensor(kwargs.get("hidden_states")):
                slot, h = "hidden_states", kwargs["hidden_states"]
            else:
                raise TypeError(f"blocks: {names[b]} was called without a tensor as its first argument or "
                                "hidden_states=; cannot tell which input is the hidden state")
            if b > 0 and template and not _same_hidden(h, template[0]):
                raise ValueError(f"blocks: {names[b]} does not take {names[b - 1]}'s output as its input "
                                 "(the model computes something between them), so they cannot be pruned "
                                 "one after the other; pass blocks= naming a list whose blocks each take "
                                 "the previous one's output (a model without one cannot be pruned by blocks)")
            if b == 0:
                if h.is_floating_point() and not bool(torch.isfinite(h).all()):
                    raise ValueError(f"calibration: non-finite activations (nan/inf) enter the first block "
                                     f"{names[0]} on batch {len(hidden)}; nothing was pruned")
                hidden.append(h.detach().clone())  # a block may change its input in place
            # the hidden state is recomputed from the pruned blocks; a KV cache would replay
            # what the dense forward stored (cross-attention keys, say), so both are dropped
            args = tuple(None if (isinstance(slot, int) and j == slot) or _is_kv_cache(a) else a
                         for j, a in enumerate(args))
            kw = {k: (None if k == slot or _is_kv_cache(v) else v) for k, v in kwargs.items()}
            calls[b].append(BlockCall(args, kw, slot))
            if b == len(blocks) - 1:
                raise _Stop
        return hook

    def stand_in(block, b):
        real = block.forward

        def forward(*args, **kwargs):
            if b == 0:  # the real thing: the rest of its output is what later blocks receive
                out = real(*args, **kwargs)
                template[:] = [out]
                return out
            h = args[0] if args and torch.is_tensor(args[0]) else kwargs["hidden_states"]
            out = template[0]
            if torch.is_tensor(out):
                return h
            if isinstance(out, tuple):
                return (h,) + tuple(out[1:])
            raise TypeError(f"blocks: {names[b]} returned {type(out).__name__}; expected a tensor or a tuple "
                            "whose first element is the hidden state")
        return forward

    handles = [blk.register_forward_pre_hook(pre_hook(b), with_kwargs=True, prepend=True)
               for b, blk in enumerate(blocks)]
    own = [("forward" in vars(blk), vars(blk).get("forward")) for blk in blocks]
    for b, blk in enumerate(blocks):
        object.__setattr__(blk, "forward", stand_in(blk, b))
    try:
        for i, (args, kwargs) in enumerate(batches):
            try:
                model(*args, **kwargs)
            except _Stop:
                pass
            else:
                raise ValueError(f"blocks: the model's forward never called the last block {names[-1]} on "
                                 f"calibration batch {i}; are these the model's blocks?")
    finally:
        for h in handles:
            h.remove()
        for blk, (had, fwd) in zip(blocks, own):
            if had:
                object.__setattr__(blk, "forward", fwd)
            else:
                del blk.forward
    for b, rec in enumerate(calls):
        if len(rec) != len(batches):
            raise ValueError(f"blocks: {names[b]} was called {len(rec)} times for {len(batches)} calibration "
                             "batches; each block must run once per forward")
    return hidden, calls
