"""Which modules :func:`nmopt.sparsify_` works on: the model inside its wrappers, and the
Linear and convolution layers a sparse layer can replace without changing what they compute."""

from __future__ import annotations

import torch
from torch import nn

from nmopt._arrays import is_conv1d
from nmopt.training.config import SparsityConfig

_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_path(model: nn.Module) -> tuple[nn.Module, str]:
    """The module inside DistributedDataParallel / DataParallel wrappers and ``torch.compile``,
    and the prefix its keys have in the outer module's ``state_dict`` ("module.", "_orig_mod.")."""
    prefix = ""
    while True:
        if isinstance(model, _WRAPPERS):
            model, prefix = model.module, prefix + "module."
        elif _is_compiled(model):
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix


def _is_compiled(model: nn.Module) -> bool:
    """True for the wrapper ``torch.compile(module)`` returns (it holds ``_orig_mod``)."""
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    compiled = getattr(compiled, "OptimizedModule", None)
    return compiled is not None and isinstance(model, compiled)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel and ``torch.compile`` wrappers."""
    return unwrap_path(model)[0]


def unfit_reason(name: str, module: nn.Module, parent: nn.Module | None,
                 config: SparsityConfig) -> str | None:
    """Why a Linear/conv module cannot be sparsified with ``config`` (None if it can)."""
    if isinstance(parent, nn.MultiheadAttention):
        return ("inside nn.MultiheadAttention, which uses the weight directly "
                "(F.multi_head_attention_forward), not through the Linear module")
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convolutions are not supported (weight layout is (in, out, ...))"
    w = module.weight
    if isinstance(w, nn.parameter.UninitializedParameter):
        return "uninitialized (lazy) weight; run one forward pass before sparsify_"
    why = _replace_would_lose(module)
    if why is not None:
        return why
    if w is None or w.dim() < 2:
        return "no 2-D weight"
    if w.numel() == 0:
        return f"empty weight {tuple(w.shape)}"
    rows, cols = w.shape[0], w[0].numel()
    m = config.m
    if cols % m or (config.transposable and rows % m):
        need = "in and out features" if config.transposable else "in features"
        return (f"weight view ({rows}, {cols}) is not a multiple of M={m} along the {need}; "
                f"left dense rather than masked across a partial group")
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a weight layer of a type sparse layers do not replace stays dense (None: not one)."""
    if is_conv1d(module):
        return ("transformers Conv1D (GPT-2 style, weight stored (in, out)) is not supported by "
                "sparse training; prune such a model with nmopt.prune_model instead")
    return None


def drop_shared_weights(root: nn.Module, todo: list, skipped: dict) -> list:
    """``todo`` ((name, module) pairs) without the layers whose weight Parameter another module
    uses that is not sparsified with it (a tied embedding would keep reading it dense, and an
    export would hold two different values for one tensor); those go to ``skipped``."""
    owners: dict[int, list] = {}
    for name, mod in root.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, mod))
    while True:  # dropping one layer can leave another sharing with it
        chosen = {id(mod) for _, mod in todo}
        bad = {}
        for name, mod in todo:
            other = next(((n, o) for n, o in owners[id(mod.weight)]
                          if o is not mod and id(o) not in chosen), None)
            if other is not None:
                bad[name] = (f"its weight is shared with {other[0]!r} ({type(other[1]).__name__}),"
                             " which would keep using it dense (tied weights)")
        if not bad:
            return todo
        skipped.update(bad)
        todo = [(name, mod) for name, mod in todo if name not in bad]


_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _replace_would_lose(module: nn.Module) -> str | None:
    """What replacing ``module`` by a sparse layer (which keeps only ``weight`` and ``bias`` and
    runs the base class's computation) would drop, or None: a subclass's own ``forward`` or
    state, a parametrization, ``weight_norm``, hooks."""
    base = next((b for b in _BASES if isinstance(module, b)), None)
    cls = type(module)
    if base is None:
        return f"{cls.__name__} is not one of nn.Linear, nn.Conv1d/2d/3d or a plain subclass"
    if nn.utils.parametrize.is_parametrized(module):
        return ("its weight is parametrized (torch.nn.utils.parametrize); the sparse layer would "
                "drop the parametrization")
    extra = sorted({name for name, _ in module.named_parameters(recurse=False)}
                   - {"weight", "bias"}
                   | {name for name, _ in module.named_buffers(recurse=False)}
                   | {name for name, _ in module.named_children()})
    if extra:
        return (f"{cls.__name__} holds more than weight and bias ({', '.join(extra)}, e.g. "
                "weight_norm or an adapter); the sparse layer would drop it")
    if "forward" in vars(module) or hasattr(module, "_hf_hook"):
        return ("its forward is replaced on the instance (e.g. an accelerate hook for device_map "
                "or offload); the sparse layer would drop it")
    if cls is not base and cls.forward is not base.forward:
        return (f"{cls.__name__} overrides forward; the sparse layer would run "
                f"{base.__name__}'s instead")
    hooks = [kind for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                               "_backward_pre_hooks") if getattr(module, kind, None)]
    if hooks:
        return (f"has {', '.join(h.strip('_').replace('_', ' ') for h in hooks)}, which the "
                "sparse layer would not run; register them on the sparse layer after sparsify_")
    return None


def disable_fast_paths(root: nn.Module, sparse: tuple[type, ...]) -> dict[str, int]:
    """Turn off the inference fast path (eval, no grad) of every ``nn.TransformerEncoderLayer``
    whose ``linear1``/``linear2`` is now a sparse layer (of a type in ``sparse``): that path
    reads their weights directly, dense. Torch takes it only while ``activation_relu_or_gelu``
    is set (also for a whole ``nn.TransformerEncoder``, which asks its first layer); that flag
    is not used otherwise. Returns the flags changed, by layer name, for :func:`restore_fast_paths`."""
    saved = {}
    for name, mod in root.named_modules():
        if not isinstance(mod, nn.TransformerEncoderLayer) or not mod.activation_relu_or_gelu:
            continue
        if any(isinstance(getattr(mod, lin, None), sparse) for lin in ("linear1", "linear2")):
            saved[name] = mod.activation_relu_or_gelu
            mod.activation_relu_or_gelu = 0
    return saved


def restore_fast_paths(root: nn.Module, saved: dict[str, int]) -> None:
    """Undo :func:`disable_fast_paths`."""
    for name, flag in saved.items():
        root.get_submodule(name).activation_relu_or_gelu = flag
