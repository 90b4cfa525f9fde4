"""The model-level API: ``sparsify_``, ``densify_``, export, refresh scheduling and statistics."""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from nmopt.training.config import SparsityConfig
from nmopt.training.layers import SparseConv, SparseLinear, _SparseLayer
from nmopt.training.modules import (
    disable_fast_paths,
    drop_shared_weights,
    restore_fast_paths,
    unfit_reason,
    unsupported_reason,
    unwrap,
    unwrap_path,
)
from nmopt.training.refresh import refresh_layers
from nmopt.training.sharded import is_dtensor, is_fully_sharded, select

_ATTR = "_nmopt_sparse"


class SparseTraining:
    """What :func:`nmopt.sparsify_` did to a model, and its mask-refresh schedule.

    Attributes
    ----------
    config : SparsityConfig
    layers : dict name -> sparse layer
    skipped : dict name -> reason the layer was left dense
    steps : optimizer steps counted so far
    refreshes : refreshes done (the one in ``sparsify_`` included)
    last_refresh_seconds, total_refresh_seconds : wall time of mask refreshes
    """

    def __init__(self, config: SparsityConfig, process_group=None):
        self.config = config
        self.layers: dict[str, _SparseLayer] = OrderedDict()
        self.skipped: dict[str, str] = OrderedDict()
        self.steps = 0
        self.refreshes = 0
        self.last_refresh_seconds = 0.0
        self.total_refresh_seconds = 0.0
        self.process_group = process_group
        self.fast_paths: dict[str, int] = {}  # TransformerEncoderLayer flags turned off
        self._hook = None

    def refresh(self) -> float:
        """Recompute every mask now (collective under torch.distributed); return seconds."""
        seconds = refresh_layers(list(self.layers.items()), self.config.sync, self.process_group)
        self.refreshes += 1
        self.last_refresh_seconds = seconds
        self.total_refresh_seconds += seconds
        return seconds

    def step(self) -> bool:
        """Count one optimizer step; refresh when ``refresh_every`` divides the count."""
        self.steps += 1
        k = self.config.refresh_every
        if k and self.steps % k == 0:
            self.refresh()
            return True
        return False

    def state_dict(self) -> dict:
        """The refresh schedule (steps and refreshes counted), to save with a checkpoint: like an
        LR scheduler's, it is in neither the model's nor the optimizer's state dict."""
        return {"steps": self.steps, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict) -> None:
        """Resume the schedule saved by :meth:`state_dict` (the masks come with the model's
        state dict), so the next refresh comes when it would have without the interruption."""
        for key in ("steps", "refreshes"):
            value = state.get(key) if isinstance(state, dict) else None
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state: expected {key!r} as an integer >= 0 (from "
                                 f"SparseTraining.state_dict()), got {value!r}")
        self.steps, self.refreshes = state["steps"], state["refreshes"]

    def attach(self, optimizer) -> None:
        """Count steps with a post-step hook on ``optimizer`` (replacing any earlier hook)."""
        self.detach()
        self._hook = optimizer.register_step_post_hook(lambda *_: self.step())

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __getstate__(self):  # hook handles are not picklable; a copied model is not hooked
        state = dict(self.__dict__)
        state["_hook"] = None
        state["process_group"] = None
        return state

    def __repr__(self) -> str:
        return (f"SparseTraining({self.config.describe()}, sparse={len(self.layers)}, "
                f"left dense={len(self.skipped)}, steps={self.steps}, refreshes={self.refreshes}, "
                f"refresh time total={self.total_refresh_seconds:.3f}s)")


def _controller(model: nn.Module) -> SparseTraining:
    ctrl = getattr(unwrap(model), _ATTR, None)
    if ctrl is None:
        raise ValueError("model: not sparsified; call nmopt.sparsify_(model, config) first")
    return ctrl


# The deprecated filter_fn(name, module) order is recognised by its parameters (see sparsify_).
_OLD_FIRST = frozenset({"name", "n", "fqn", "path", "qualname", "module_name", "layer_name", "key"})
_OLD_SECOND = frozenset({"module", "mod", "m", "layer"})


def _takes_name_first(filter_fn: Callable) -> bool:
    """True if ``filter_fn`` declares the deprecated ``(name, module)`` order (see sparsify_)."""
    try:
        params = [p for p in inspect.signature(filter_fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # no signature (some builtins): the current order
        return False
    if len(params) < 2:
        return False
    first, second = params[0], params[1]
    hint = first.annotation
    if hint is not inspect.Parameter.empty:
        if hint is str or hint == "str":
            return True
        if (isinstance(hint, type) and issubclass(hint, nn.Module)) \
                or (isinstance(hint, str) and hint.endswith("Module")):
            return False
    return first.name in _OLD_FIRST or second.name in _OLD_SECOND


def _module_filter(filter_fn: Callable | None) -> Callable | None:
    """``filter_fn`` as a ``(module, fqn) -> bool`` callable, warning for the deprecated order."""
    if filter_fn is None or not _takes_name_first(filter_fn):
        return filter_fn
    warnings.warn("sparsify_: filter_fn(name, module) is deprecated and will stop working in the "
                  "next release; take the arguments in torchao's order, filter_fn(module, fqn)",
                  DeprecationWarning, stacklevel=3)
    return lambda module, fqn: filter_fn(fqn, module)


def sparsify_(model: nn.Module, config: SparsityConfig | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, *,
              optimizer=None, process_group=None) -> SparseTraining:
    """Make a model's Linear and convolution layers N:M sparse, in place.

    Parameters
    ----------
    model : torch.nn.Module
        Sparsify before wrapping in DistributedDataParallel (a wrapper is unwrapped) and before
        FSDP2's ``fully_shard`` (the other order is refused).
    config : SparsityConfig, optional
        Pattern, transposability, solver, refresh schedule, STE/SR-STE, matmul
        (default ``SparsityConfig()``: transposable 2:4).
    filter_fn : callable (module, fqn) -> bool, optional
        Sparsify only modules for which it returns True (e.g. to keep the output head dense),
        called with the module and its fully qualified name, as torchao's ``filter_fn``. The
        old order ``(name, module)`` still works for one release, with a
        ``DeprecationWarning``; it is recognised by the function's first two positional
        parameters: the first annotated ``str``, or (without an annotation that says
        otherwise) the first named ``name``, ``n``, ``fqn``, ``path``, ``qualname``,
        ``module_name``, ``layer_name`` or ``key``, or the second named ``module``, ``mod``,
        ``m`` or ``layer``. Anything else (e.g. ``lambda a, b: ...``) is called as
        ``(module, fqn)``.
    optimizer : torch.optim.Optimizer, optional
        If given, masks refresh every ``config.refresh_every`` calls of ``optimizer.step()``
        (a post-step hook). Without it, call :func:`step` after each ``optimizer.step()``,
        or :func:`refresh_masks` whenever you like.
    process_group : torch.distributed group, optional
        Group whose ranks must share masks (default: the world).

    Returns
    -------
    SparseTraining
        The sparse layers, the layers left dense with the reason (also warned), the schedule.

    Notes
    -----
    Masks are computed once here, then at every refresh; each is checked valid (rows and, for
    transposable masks, columns of every tile) before it is installed. Layers whose 2-D weight
    view is not a multiple of M (in features; and out features when transposable) are left dense
    and reported, never masked across a partial group. All or nothing: if the first masks
    cannot be computed (``RuntimeError``, e.g. a NaN weight, naming the layer) the model is left
    exactly as it was; a weight on the meta device, sparse or already sharded is refused first
    (``ValueError`` naming the layer).
    """
    config = SparsityConfig() if config is None else config
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config: expected nmopt.SparsityConfig, got {type(config).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        warnings.warn("sparsify_: model is wrapped in (Distributed)DataParallel; sparsify the "
                      "inner module before wrapping so the wrapper sees the mask buffers",
                      RuntimeWarning, stacklevel=2)
    root = unwrap(model)
    if getattr(root, _ATTR, None) is not None:
        raise ValueError("model: already sparsified; call nmopt.densify_(model) first")
    if is_fully_sharded(root):
        raise ValueError("model: already wrapped by fully_shard (FSDP2); call "
                         "nmopt.sparsify_(model, config) first, then fully_shard")
    if optimizer is not None and not callable(getattr(optimizer, "register_step_post_hook",
                                                      None)):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer (its step() counts the "
                        f"refresh schedule), got {type(optimizer).__name__}")
    keep = _module_filter(filter_fn)
    ctrl = SparseTraining(config, process_group)
    parents = {name: mod for name, mod in root.named_modules()}
    todo = []
    for name, module in root.named_modules():
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            why = unsupported_reason(module)  # weight layers of other types are listed
            if why is not None and _kept(keep, module, name):
                ctrl.skipped[name] = why
            continue
        if keep is not None and not keep(module, name):
            continue
        parent = parents.get(name.rpartition(".")[0]) if name else None
        why = unfit_reason(name, module, parent, config)
        if why is not None:
            ctrl.skipped[name] = why
            continue
        _check_weight(name, module.weight)
        todo.append((name, module))
    todo = drop_shared_weights(root, todo, ctrl.skipped)  # tied to a module left dense
    # A module registered under several names (shared) is replaced under every one of them.
    aliases: dict[int, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    if any(not alias for name, module in todo for alias in aliases[id(module)]):
        raise ValueError("model: the root module itself is a Linear/conv layer; wrap it in a "
                         "container (e.g. nn.Sequential) to sparsify it in place")
    # All or nothing: the sparse layers get their first masks before any replaces its module,
    # so a failure (NaN weights, a solver error) leaves the model as it was.
    for name, module in todo:
        ones = torch.ones_like(module.weight, dtype=torch.bool)
        cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv
        ctrl.layers[name] = cls(module, config, ones)
    try:
        ctrl.refresh()
    except RuntimeError as exc:
        raise RuntimeError(f"sparsify_ failed, the model is unchanged: {exc}") from exc
    for name, module in todo:
        for alias in aliases[id(module)]:
            _set_submodule(root, alias, ctrl.layers[name])
    ctrl.fast_paths = disable_fast_paths(root, (_SparseLayer,))
    if ctrl.skipped:
        lines = "; ".join(f"{k or '<root>'}: {v}" for k, v in ctrl.skipped.items())
        warnings.warn(f"sparsify_: {len(ctrl.skipped)} layer(s) left dense: {lines}",
                      RuntimeWarning, stacklevel=2)
    root.__dict__[_ATTR] = ctrl
    config.__dict__["_users"] = config.__dict__.get("_users", 0) + 1  # pattern now fixed
    if optimizer is not None:
        ctrl.attach(optimizer)
    return ctrl


def _kept(keep, module: nn.Module, name: str) -> bool:
    """Whether ``filter_fn`` chooses a layer of a type it may not expect (True if it fails on it)."""
    try:
        return keep is None or bool(keep(module, name))
    except (AttributeError, TypeError):  # e.g. a filter reading Linear's out_features
        return True


def _check_weight(name: str, weight) -> None:
    """``ValueError`` naming the layer for a weight ``sparsify_`` cannot mask."""
    if weight.is_meta:
        raise ValueError(f"layer {name!r}: weight is on the meta device; materialise the model "
                         "(to_empty + load) before sparsify_")
    if is_dtensor(weight):
        raise ValueError(f"layer {name!r}: weight is a DTensor (already sharded); call "
                         "nmopt.sparsify_(model, config) before fully_shard")
    if weight.layout != torch.strided:
        raise ValueError(f"layer {name!r}: weight is a {weight.layout} tensor; sparsify_ needs "
                         "a dense (strided) weight, convert it with .to_dense() first")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ValueError("model: the root module itself is a Linear/conv layer; wrap it in a "
                         "container (e.g. nn.Sequential) to sparsify it in place")
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def densify_(model: nn.Module, *, apply_mask: bool = False) -> nn.Module:
    """Undo :func:`sparsify_` in place: put the original dense modules back.

    With ``apply_mask=True`` the pruned weights are first set to 0 (finalise the pruning; NaN
    or inf in a pruned weight becomes 0 too); otherwise they keep their dense straight-through
    values. The optimizer hook is removed. Refused under FSDP2's ``fully_shard`` (use
    :func:`export_pruned_state_dict`). Returns ``model``.
    """
    root = unwrap(model)
    ctrl = _controller(root)
    if is_fully_sharded(root):
        raise ValueError("model: wrapped by fully_shard (FSDP2), whose hooks hold the sparse "
                         "layers; use nmopt.export_pruned_state_dict(model) (sharded, pruned "
                         "weights) instead of densify_")
    if apply_mask:  # every mask checked before any weight changes
        for layer in ctrl.layers.values():
            layer.check_mask()
    ctrl.detach()
    for layer in ctrl.layers.values():
        original = layer._original
        if apply_mask:
            with torch.no_grad():
                layer.weight.masked_fill_(~layer.mask, 0)  # NaN/inf pruned too
        original.weight = layer.weight
        original.bias = layer.bias
        for alias, module in list(root.named_modules(remove_duplicate=False)):
            if module is layer:
                _set_submodule(root, alias, original)
    restore_fast_paths(root, ctrl.fast_paths)
    del root.__dict__[_ATTR]
    ctrl.config.__dict__["_users"] = max(0, ctrl.config.__dict__.get("_users", 1) - 1)
    return model


def export_pruned_state_dict(model: nn.Module) -> dict:
    """The state dict of the dense model with pruned weights (``W * mask``, pruned entries exactly
    0 even where W is NaN or inf), mask keys dropped.

    Keys are those of the original dense model (load it with ``strict=True``); the model is not
    changed. Under FSDP2 the weights are DTensors with the model's sharding. Wrappers' prefixes
    (``module.``, ``_orig_mod.``) are kept as ``model.state_dict()`` has them; a layer
    registered under several names is pruned under each.
    """
    ctrl = _controller(model)
    sd = model.state_dict()
    root, prefix = unwrap_path(model)
    layers = {id(layer) for layer in ctrl.layers.values()}
    for layer in ctrl.layers.values():
        layer.check_mask()
    for name, module in root.named_modules(remove_duplicate=False):  # every alias of a layer
        if id(module) in layers:
            key = f"{prefix}{name}."
            sd[key + "weight"] = select(module.weight.detach(), module.mask)
            sd.pop(key + "mask", None)
    return sd


def refresh_masks(model: nn.Module) -> float:
    """Recompute every mask now with the configured solver; return the wall time in seconds."""
    return _controller(model).refresh()


def step(model: nn.Module) -> bool:
    """Count one optimizer step (call after ``optimizer.step()`` when no optimizer was given to
    :func:`sparsify_`); refreshes the masks every ``refresh_every`` steps. Returns True if it
    refreshed."""
    return _controller(model).step()


def model_sparsity_stats(model: nn.Module) -> dict:
    """Per-layer and total statistics: density, matmul, solver, refresh count and times.

    Returns
    -------
    dict with keys ``layers`` (name -> dict), ``skipped`` (name -> reason), ``steps``,
    ``refreshes``, ``last_refresh_seconds``, ``total_refresh_seconds``, ``density`` (kept
    fraction over sparse layers) and ``config``. A layer's ``matmul`` says which GEMMs run;
    its ``kernel`` key is the same string under the deprecated name (removed next release).
    """
    ctrl = _controller(model)
    layers = {}
    kept = total = 0
    for name, layer in ctrl.layers.items():
        n_kept = int(layer.mask.sum())
        kept += n_kept
        total += layer.mask.numel()
        layers[name] = {
            "shape": tuple(layer.weight.shape), "density": n_kept / layer.mask.numel(),
            "matmul": layer.matmul, "kernel": layer.matmul,  # "kernel": deprecated alias
            "solver": layer.solver_note, "gap": layer.gap,
            "refresh_count": layer.refresh_count, "refresh_seconds": layer.refresh_seconds,
            "refresh_total_seconds": layer.refresh_total, "mask_changed": layer.mask_changed,
        }
    return {
        "config": ctrl.config.describe(), "layers": layers, "skipped": dict(ctrl.skipped),
        "steps": ctrl.steps, "refreshes": ctrl.refreshes,
        "last_refresh_seconds": ctrl.last_refresh_seconds,
        "total_refresh_seconds": ctrl.total_refresh_seconds,
        "density": kept / total if total else 1.0,
    }
