"""Prune a state dict: an N:M mask per selected weight, the pruned tensors and a report.

Selection rules (:func:`select_layers`): a tensor is pruned when it is a floating-point 2-D
weight ``(out, in)`` or 4-D conv weight ``(out, in, kh, kw)``, its name matches ``include``
(when given) and not ``exclude``, and it is not an embedding (:data:`EMBEDDING_RE`) unless
``include`` names it explicitly. Everything else (biases, norms, other 1-D / 3-D tensors,
integer or boolean tensors: counts and indices, not weights) is copied unchanged.
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from nmopt._arrays import is_torch_tensor
from nmopt._report import Column, format_table, json_text
from nmopt._version import __version__
from nmopt.api import find_mask
from nmopt.certificates import OPTIMALITY_TOL
from nmopt.checkpoint import AtomicFiles, read_metadata, write_checkpoint
from nmopt.nm_format import load_pruned
from nmopt.patterns import parse_pattern
from nmopt.safetensors_stream import bf16_to_float32

#: Embeddings (skipped unless ``include`` names them): ``embed``, GPT-2's ``wte``/``wpe``, T5's
#: ``shared`` and ``relative_attention_bias``.
EMBEDDING_RE = re.compile(r"embed|(^|\.)(wte|wpe|shared|relative_attention_bias)(\.|$)",
                          re.IGNORECASE)

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass
class LayerReport:
    """What pruning one weight did (one row of the report)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    weights: int
    kept_weights: int
    score: float  # total score sum(|W|)
    objective: float  # kept score
    bound: float
    gap: float
    deficit: int
    optimal: bool
    solver: str
    backend: str
    seconds: float

    @property
    def kept_fraction(self) -> float:
        """Kept share of the layer's total score."""
        return self.objective / self.score if self.score > 0 else 1.0


@dataclass
class PruneResult:
    """Pruned tensors (all names of the input, same order), masks and the per-layer report."""

    tensors: dict[str, Any]
    masks: dict[str, Any]
    layers: list[LayerReport]
    copied: dict[str, str]  # name -> why it was copied unchanged
    pattern: str
    transposable: bool
    saturate: bool
    totals: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """The JSON-ready report: settings, one entry per pruned layer, totals, copied tensors."""
        layers = []
        for layer in self.layers:
            row = asdict(layer)
            row["shape"] = list(layer.shape)
            row["kept_fraction"] = layer.kept_fraction
            layers.append(row)
        return {"pattern": self.pattern, "transposable": self.transposable,
                "saturate": self.saturate, "layers": layers, "totals": self.totals,
                "copied": [{"name": k, "reason": v} for k, v in self.copied.items()]}


def _dtype_name(t: Any) -> str:
    return str(t.dtype).replace("torch.", "")


def select_layers(tensors: dict[str, Any], include: str | None = None,
                  exclude: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(names to prune in input order, {name: why it is copied unchanged}) of ``tensors``.

    ``tensors`` maps names to anything with ``shape`` and ``dtype`` (torch, numpy, or the
    entries of a file's header); ``include`` / ``exclude`` are searched in each name.
    """
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    prune: list[str] = []
    copied: dict[str, str] = {}
    for name, t in tensors.items():
        ndim = len(t.shape)
        dtype = _dtype_name(t)
        if ndim not in (2, 4):
            copied[name] = f"{ndim}-D (only 2-D and 4-D weights are pruned)"
        elif dtype.startswith("float8"):
            copied[name] = f"dtype {dtype} (float8 pruning is not supported)"
        elif dtype not in _FLOAT_DTYPES:
            copied[name] = f"dtype {dtype} is not floating point (only float weights are pruned)"
        elif inc is not None and not inc.search(name):
            copied[name] = "not matched by --include"
        elif exc is not None and exc.search(name):
            copied[name] = "matched by --exclude"
        elif inc is None and EMBEDDING_RE.search(name):
            copied[name] = "embedding (name it in --include to prune it)"
        elif 0 in tuple(t.shape):
            copied[name] = "empty"
        else:
            prune.append(name)
    return prune, copied


def untie(names: list[str], copied: dict[str, str], kind, same) -> list[str]:
    """``names`` without the copies of a tensor that stays dense (a tied output head saved next to
    its embedding): pruning one copy alone would untie them. Those move to ``copied``.
    ``kind(name)``: (dtype, shape); ``same(a, b)``: whether tensors a and b hold the same values."""
    dense = [n for n in copied if len(kind(n)[1]) in (2, 4)]
    kept = []
    for name in names:
        twin = next((t for t in dense if kind(t) == kind(name) and same(name, t)), None)
        if twin is None:
            kept.append(name)
        else:
            copied[name] = (f"a copy of {twin!r} (tied), which stays dense ({copied[twin]}); "
                            "prune both or neither (--include both)")
    return kept


def _same_values(a: Any, b: Any) -> bool:
    """One storage, or equal values that are not all zero (zero-initialised weights are not
    ties)."""
    if is_torch_tensor(a) and is_torch_tensor(b):
        if a.device != b.device:
            return False
        if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
            return True
        return bool(a.any()) and bool(a.eq(b).all())
    a, b = np.asarray(a), np.asarray(b)
    return bool(a.any()) and np.array_equal(a, b)


def apply_mask(weight: Any, mask: Any) -> Any:
    """``weight`` with the entries outside ``mask`` set to zero, in the weight's own dtype."""
    if isinstance(weight, np.ndarray):
        return np.where(mask, weight, np.zeros((), dtype=weight.dtype))
    return weight.masked_fill(~mask, 0)


def _numel(t: Any) -> int:
    return int(np.prod(tuple(t.shape), dtype=np.int64))


#: Weights per :func:`nmopt.find_mask` call: a layer is solved in blocks of whole tile rows, so
#: the solver's memory (about 30 bytes per weight) stays bounded whatever the layer's size.
BLOCK_WEIGHTS = 1 << 20


def block_rows(shape: tuple[int, ...], m: int, budget: int | None = None) -> int:
    """Rows per block of a weight of ``shape``: a multiple of M near ``budget`` weights."""
    cols = max(1, int(np.prod(shape[1:], dtype=np.int64)))
    return max(m, (budget or BLOCK_WEIGHTS) // cols // m * m)


def prune_layer(name: str, shape: tuple[int, ...], dtype: str, read, emit, p, *,
                transposable: bool = True, saturate: bool = False, solver="auto",
                backend=None, in_out: bool = False) -> LayerReport:
    """Prune one weight block by block: the one routine behind every prune (dict, file, directory).

    ``read(r0, r1)`` returns rows r0:r1 of the weight (numpy or torch; bfloat16 may come as
    numpy uint16 bits), ``emit(r0, r1, mask, pruned)`` takes each block's mask and pruned rows.
    Blocks are whole M x M tile rows, so the masks equal those of one call on the whole weight.
    ``in_out``: the weight is stored (in, out) (transformers' ``Conv1D``), so row-wise groups
    run down its columns, along the reduction dimension.
    """
    shape = tuple(int(s) for s in shape)
    step, rows = block_rows(shape, p.m), shape[0]
    width = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    sums = dict(objective=0.0, bound=0.0, score=0.0, kept=0, deficit=0, seconds=0.0)
    res = None
    flip = in_out and not transposable  # a transposable mask's transpose is one too
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = read(r0, r1)
        x = bf16_to_float32(w) if dtype == "bfloat16" and isinstance(w, np.ndarray) else w
        # a block wider than the budget (fewer than M rows of many columns are a padded tile
        # row) is solved a band of whole tile columns at a time: the same tiles, the same masks
        cut = max(p.m, BLOCK_WEIGHTS // (r1 - r0) // p.m * p.m)
        bands = [x] if width <= cut else [x.reshape(r1 - r0, width)[:, c0:c0 + cut]
                                          for c0 in range(0, width, cut)]
        masks = []
        for part in bands:
            try:
                res = find_mask(part.T if flip else part, p, transposable=transposable,
                                saturate=saturate, solver=solver, backend=backend)
            except (ValueError, TypeError) as err:
                raise ValueError(f"layer {name!r} {shape}: {err}") from None
            masks.append(res.mask.T if flip else res.mask)
            for key, value in (("objective", res.objective), ("bound", res.bound),
                               ("kept", int(res.mask.sum())), ("deficit", res.deficit),
                               ("seconds", res.seconds)):
                sums[key] += value
        mask = masks[0] if len(masks) == 1 else _join(masks, axis=1).reshape(tuple(x.shape))
        sums["score"] += _abs_sum(x)
        emit(r0, r1, mask, apply_mask(w, mask))
    bound, objective = sums["bound"], sums["objective"]
    gap = (bound - objective) / bound if bound > 0 else 0.0
    return LayerReport(
        name=name, shape=shape, dtype=dtype, weights=int(np.prod(shape, dtype=np.int64)),
        kept_weights=sums["kept"], score=sums["score"], objective=objective, bound=bound, gap=gap,
        deficit=sums["deficit"], optimal=gap <= OPTIMALITY_TOL, solver=res.solver,
        backend=res.backend, seconds=sums["seconds"])


def _join(blocks: list, axis: int = 0) -> Any:
    if len(blocks) == 1 or isinstance(blocks[0], np.ndarray):
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=axis)
    import torch

    return torch.cat(blocks, dim=axis)


def prune_state_dict(tensors: dict[str, Any], pattern, *, transposable: bool = True,
                     saturate: bool = False, solver="auto", backend=None,
                     include: str | None = None, exclude: str | None = None,
                     progress: bool | None = None) -> PruneResult:
    """Prune every selected weight of a state dict (name -> torch tensor or numpy array).

    ``transposable``, ``saturate``, ``solver`` and ``backend`` go to :func:`nmopt.find_mask` for
    every layer; ``include`` / ``exclude`` select them (:func:`select_layers`); ``progress``
    shows a bar on stderr (None: when stderr is a terminal). Returns a :class:`PruneResult`:
    every tensor (pruned ones in their dtype), the boolean masks, one :class:`LayerReport` per
    pruned layer and the totals. ValueError naming the layer when one cannot be pruned (NaN).
    """
    from tqdm.auto import tqdm

    p = parse_pattern(pattern)
    names, copied = select_layers(tensors, include, exclude)
    names = untie(names, copied, lambda n: (_dtype_name(tensors[n]), tuple(tensors[n].shape)),
                  lambda a, b: _same_values(tensors[a], tensors[b]))
    masks: dict[str, Any] = {}
    pruned: dict[str, Any] = {}
    layers: list[LayerReport] = []
    total = sum(_numel(tensors[n]) for n in names)
    bar = tqdm(total=total, unit="w", unit_scale=True, desc="pruning", leave=False,
               disable=None if progress is None else not progress)
    try:
        for name in names:
            w = tensors[name]
            bar.set_postfix_str(name, refresh=False)
            blocks: tuple[list, list] = ([], [])

            def emit(r0, r1, mask, out, blocks=blocks):
                blocks[0].append(mask)
                blocks[1].append(out)

            layers.append(prune_layer(name, tuple(w.shape), _dtype_name(w), lambda r0, r1, w=w: w[r0:r1],
                                      emit, p, transposable=transposable, saturate=saturate,
                                      solver=solver, backend=backend))
            masks[name], pruned[name] = _join(blocks[0]), _join(blocks[1])
            bar.update(_numel(w))
    finally:
        bar.close()
    out = {name: pruned.get(name, t) for name, t in tensors.items()}
    result = PruneResult(tensors=out, masks=masks, layers=layers, copied=copied, pattern=str(p),
                         transposable=bool(transposable), saturate=bool(saturate))
    result.totals = _totals(layers)
    return result


def _abs_sum(w: Any) -> float:
    if isinstance(w, np.ndarray):
        return float(np.abs(w, dtype=np.float64).sum())
    import torch

    return float(w.detach().to(torch.float64).abs().sum())


def _totals(layers: list[LayerReport]) -> dict[str, Any]:
    score = sum(x.score for x in layers)
    objective = sum(x.objective for x in layers)
    bound = sum(x.bound for x in layers)
    weights = sum(x.weights for x in layers)
    return {
        "layers": len(layers), "weights": weights,
        "kept_weights": sum(x.kept_weights for x in layers),
        "score": score, "objective": objective, "bound": bound,
        "kept_fraction": objective / score if score > 0 else 1.0,
        "gap": (bound - objective) / bound if bound > 0 else 0.0,
        "deficit": sum(x.deficit for x in layers),
        "optimal": all(x.optimal for x in layers),
        "seconds": sum(x.seconds for x in layers),
    }


def prune_file(input_path, out_path, pattern, *, masks_path=None, report_path=None,
               transposable: bool = True, saturate: bool = False, solver="auto", backend=None,
               include: str | None = None, exclude: str | None = None,
               progress: bool | None = None,
               force: bool = True) -> tuple[PruneResult, dict[str, Any]]:
    """Prune a checkpoint file and write the results, all or nothing.

    Reads ``input_path`` (safetensors or PyTorch state dict), prunes it with
    :func:`prune_state_dict` and writes the pruned checkpoint (format from ``out_path``'s
    extension; safetensors metadata is kept), the boolean masks (safetensors) and the JSON
    report. Nothing is written until every layer is solved, and the files are staged as
    temporary files moved into place together, so a failed or interrupted run leaves no output.
    ``force=False`` never replaces an output, even one created meanwhile (``OutputExistsError``);
    ``nmopt prune`` also refuses existing outputs up front without ``--force``.

    Returns
    -------
    (PruneResult, dict)
        The result and the report written to ``report_path``.
    """

    tensors = load_pruned(input_path)  # nm-packed inputs come back dense
    result = prune_state_dict(tensors, pattern, transposable=transposable, saturate=saturate,
                              solver=solver, backend=backend, include=include, exclude=exclude,
                              progress=progress)
    if not result.layers:
        raise ValueError(f"nothing to prune in {str(input_path)!r}: no 2-D/4-D float weight was "
                         "selected (embeddings need --include; check --include/--exclude)")
    report = file_report(result, input_path, out_path, masks_path, solver)
    metadata = None
    if str(input_path).lower().endswith(".safetensors"):
        metadata = read_metadata(input_path)
    with AtomicFiles(force=force) as files:
        write_checkpoint(files, result.tensors, out_path, metadata)
        if masks_path is not None:
            write_checkpoint(files, result.masks, masks_path)
        if report_path is not None:
            with open(files.add(report_path), "w", encoding="utf-8") as f:
                f.write(json_text(report))
    return result, report


def file_report(result: PruneResult, input_path, out_path, masks_path, solver) -> dict[str, Any]:
    """The report of a prune that wrote files: the result's, plus the paths and versions."""
    report = result.report()
    report.update(input=str(input_path), output=str(out_path),
                  masks=None if masks_path is None else str(masks_path),
                  solver_requested=solver if isinstance(solver, str) else repr(solver),
                  nmopt=__version__)
    return report


def report_columns():
    """Columns of the per-layer table of a prune report."""

    return [
        Column("name", "layer", align="<"),
        Column("shape", "shape", lambda s: "x".join(map(str, s)), align="<"),
        Column("kept_fraction", "kept score", lambda v: f"{100 * v:.3f}%"),
        Column("density", "kept w", lambda v: f"{100 * v:.2f}%"),
        Column("gap", "gap", lambda g: f"{g:.1e}"), Column("deficit", "deficit"),
        Column("solver", "solver", align="<"), Column("seconds", "seconds", "{:.3f}"),
    ]


def print_report(report: dict, out=None) -> None:
    """The per-layer table and totals of a prune report."""

    out = out or sys.stdout
    rows = [dict(r, density=r["kept_weights"] / r["weights"]) for r in report["layers"]]
    t = report["totals"]
    rows.append({"name": f"total ({t['layers']} layers)", "shape": (f"{t['weights']} w",),
                 "kept_fraction": t["kept_fraction"], "density": t["kept_weights"] / t["weights"],
                 "gap": t["gap"], "deficit": t["deficit"], "seconds": t["seconds"]})
    kind = "transposable" if report["transposable"] else "row-wise"
    print(f"{report['pattern']} {kind}{', exactly N' if report['saturate'] else ''} masks for "
          f"{t['layers']} layers of {report['input']}", file=out)
    print(format_table(rows, report_columns()), file=out)
    copied = report["copied"]
    print(f"copied unchanged: {len(copied)} tensors" + (
        f" ({', '.join(c['name'] for c in copied[:4])}{', ...' if len(copied) > 4 else ''}; "
        "reasons in the report)" if copied else ""), file=out)
