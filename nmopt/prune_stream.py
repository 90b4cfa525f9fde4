"""Prune safetensors checkpoints as a stream: a file, or a Hugging Face model directory.

:func:`prune_path` reads one block of rows at a time (:mod:`nmopt.safetensors_stream`, plain
reads, no memory map), prunes it with :func:`nmopt.prune.prune_layer` and writes it straight
into its output file, whose header is laid out first; the ``masks`` file (one file, also for a
directory) is written the same way. Peak memory is one block (``BLOCK_WEIGHTS`` weights while
solving, ``COPY_BYTES`` while copying) whatever the size of the model, its shards or its largest
tensor. A directory's output mirrors its input: the same shard files holding the same tensors,
the index with its ``weight_map`` and ``total_size`` updated, and every other file (config,
tokenizer, ...) copied, except dense weights in other formats (listed in the report). Every
output appears complete or not at all (:class:`nmopt.checkpoint.AtomicFiles`).
``fmt="nm-packed"`` stores the pruned tensors in the nm-packed format (:mod:`nmopt.nm_format`);
an nm-packed input is read as its dense tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from nmopt._report import json_text
from nmopt.checkpoint import AtomicFiles, CheckpointError, error_writing
from nmopt.errors import UsageError
from nmopt.nm_format import INDEX, VALUES, TensorFile, encode, layout, open_shards
from nmopt.nm_format import metadata as packed_metadata
from nmopt.patterns import parse_pattern
from nmopt.prune import PruneResult, _totals, file_report, prune_file, prune_layer, select_layers, untie
from nmopt.safetensors_stream import HF_INDEX, Entry, SafetensorsWriter, model_shards

FORMATS = ("dense", "nm-packed")
COPY_BYTES = 16 << 20
#: transformers' model types whose ``Conv1D`` layers store weights (in, out), and those layers.
CONV1D_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp")
CONV1D_RE = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$")
#: Weight files of other formats: not copied into a pruned directory (they would be unpruned).
OTHER_WEIGHTS = re.compile(r"^(pytorch_model|tf_model|flax_model)\b.*|.*\.(safetensors|gguf|h5|msgpack|ckpt)$")
#: In subfolders, only copies of the model itself are left out (Meta's ``original/consolidated*``);
#: other weights there (a sentence-transformers ``2_Dense/model.safetensors``) are copied.
SUBFOLDER_COPIES = re.compile(r"^consolidated\b.*\.(pth?|safetensors|bin)$")


def prune_path(input_path, out_path, pattern, *, fmt: str = "dense", masks_path=None,
               report_path=None, transposable: bool = True, saturate: bool = False,
               solver="auto", backend=None, include: str | None = None,
               exclude: str | None = None, progress: bool | None = None,
               force: bool = True) -> dict[str, Any]:
    """Prune a checkpoint file or model directory into ``out_path``; return the report.

    A directory (``model.safetensors`` or shards with ``model.safetensors.index.json``) and a
    ``.safetensors`` file written as ``.safetensors`` are streamed; PyTorch files go through
    :func:`nmopt.prune.prune_file` (loaded whole). ``fmt``: ``"dense"`` or ``"nm-packed"``;
    ``masks_path``: one ``.safetensors`` file of boolean masks; ``report_path``: the JSON
    report; ``force``: replace existing outputs. Selection, solver options and the report are
    those of :func:`nmopt.prune.prune_state_dict`.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src, out = Path(input_path), Path(out_path)
    streamed = src.is_dir() or (src.suffix.lower() == out.suffix.lower() == ".safetensors")
    if not streamed:
        if fmt != "dense":
            raise UsageError(f"--format {fmt}: streams safetensors only; give IN and --out as .safetensors "
                             "(PyTorch files are loaded whole and written dense)")
        return prune_file(src, out, pattern, masks_path=masks_path, report_path=report_path,
                          transposable=transposable, saturate=saturate, solver=solver,
                          backend=backend, include=include, exclude=exclude, progress=progress,
                          force=force)[1]
    from tqdm.auto import tqdm

    p = parse_pattern(pattern)
    solve = dict(transposable=transposable, saturate=saturate, solver=solver, backend=backend)
    shards, index = model_shards(src) if src.is_dir() else ([src.name], None)
    if src.is_dir():
        _check_others(src, shards)  # before any work: a file that could not be copied
    with contextlib.ExitStack() as inputs:
        readers, entries, where = open_shards(src, shards, index, inputs)
        names, copied = select_layers(entries, include, exclude)
        reader_of = {n: r for r in readers for n in r.entries}
        names = untie(names, copied, lambda n: (entries[n].code, entries[n].shape),
                      lambda a, b: _same_data(reader_of[a], a, reader_of[b], b, entries[a]))
        in_out = _conv1d(src, names)
        if in_out and fmt == "nm-packed" and not transposable:
            raise UsageError(f"--format nm-packed with --row-wise: {in_out[0]!r} is a Conv1D "
                             "weight stored (in, out), whose row-wise groups run down its "
                             "columns and do not pack; use --format dense or a transposable "
                             "pattern")
        if not names:
            raise ValueError(f"nothing to prune in {str(src)!r}: no 2-D/4-D float weight was "
                             "selected (embeddings need --include; check --include/--exclude)")
        layouts = {n: layout(entries[n], p) for n in names} if fmt == "nm-packed" else {}
        for clash in (s[0] for lay in layouts.values() for s in lay.entries() if s[0] in entries):
            raise UsageError(f"--format nm-packed: the input already has a tensor {clash!r}, the "
                             "name of a packed part; rename it, --exclude its weight or use "
                             "--format dense")
        bar = tqdm(total=sum(e.nbytes for e in entries.values()), unit="B", unit_scale=True,
                   desc="pruning", leave=False, disable=None if progress is None else not progress)
        inputs.callback(bar.close)
        layers, weight_map, sizes, skipped = [], {}, 0, []
        with AtomicFiles(force=force) as files, contextlib.ExitStack() as outputs:
            root = Path(files.add_dir(out)) if src.is_dir() else None
            masks = outputs.enter_context(SafetensorsWriter(
                files.add(masks_path), [(n, "BOOL", entries[n].shape) for n in names],
                {"format": "pt"}, output=masks_path)) if masks_path else None
            for reader, shard in zip(readers, shards):
                specs = [s for n, e in reader.entries.items()
                         for s in (layouts[n].entries() if n in layouts else [(n, e.code, e.shape)])]
                meta = {"format": "pt", **reader.metadata}
                mine = [layouts[n] for n in reader.entries if n in layouts]
                target = root / shard if root is not None else files.add(out)
                with SafetensorsWriter(target, specs, packed_metadata(meta, mine) if mine else meta,
                                       output=out / shard if root is not None else out) as w:
                    for name, e in reader.entries.items():
                        bar.set_postfix_str(f"{len(layers)}/{len(names)} layers {name}", refresh=False)
                        if name in names:
                            layers.append(_prune_one(reader, w, masks, e, layouts.get(name), p,
                                                     dict(solve, in_out=name in in_out)))
                        else:
                            _copy(reader, w, e)
                        bar.update(e.nbytes)
                weight_map.update({s[0]: shard for s in specs})
                sizes += sum(Entry(*s).nbytes for s in specs)
            if masks is not None:
                masks.close()
            if root is not None:
                try:
                    skipped = _copy_others(src, root, shards, index, weight_map, sizes)
                except OSError as exc:
                    raise error_writing(out, exc) from None
            result = PruneResult(tensors={}, masks={}, layers=layers, copied=copied, pattern=str(p),
                                 transposable=bool(transposable), saturate=bool(saturate),
                                 totals=_totals(layers))
            report = file_report(result, src, out, masks_path, solver)
            report.update(format=fmt, not_copied=skipped)
            if report_path is not None:
                try:
                    Path(files.add(report_path)).write_text(json_text(report), encoding="utf-8")
                except OSError as exc:
                    raise error_writing(report_path, exc) from None
    return report


def _prune_one(reader: TensorFile, out: SafetensorsWriter, masks, e, lay, p, solve):
    """Prune tensor ``e`` of ``reader`` block by block into ``out`` (and ``masks``)."""

    def emit(r0, r1, mask, pruned):
        if lay is None:
            out.write(e.name, pruned)
        else:
            values, index = encode(lay, pruned, mask)
            out.write(e.name + VALUES, values)
            out.write(e.name + INDEX, index)
        if masks is not None:
            masks.write(e.name, np.asarray(mask))

    return prune_layer(e.name, e.shape, e.dtype, lambda r0, r1: reader.read(e.name, r0, r1), emit, p,
                       **solve)


def _rows_per_copy(e) -> int:
    """Rows of tensor ``e`` in ``COPY_BYTES`` (at least one)."""
    return max(1, COPY_BYTES // max(1, e.nbytes // max(1, e.rows)))


def _copy(reader: TensorFile, out: SafetensorsWriter, e) -> None:
    """Copy tensor ``e`` unchanged, ``COPY_BYTES`` at a time."""
    step = _rows_per_copy(e)
    for r0 in range(0, e.rows, step):
        out.write(e.name, reader.read(e.name, r0, min(e.rows, r0 + step)))


def _conv1d(src: Path, names: list[str]) -> list[str]:
    """The weights of ``names`` stored (in, out): Conv1D layers of a directory whose config names
    a model type that has them (a lone file says nothing: its weights count as (out, in))."""
    try:
        cfg = json.loads((src / "config.json").read_text(encoding="utf-8")) if src.is_dir() else {}
    except (OSError, ValueError):
        cfg = {}
    if not isinstance(cfg, dict) or cfg.get("model_type") not in CONV1D_TYPES:
        return []
    return [n for n in names if CONV1D_RE.search(n)]


def _same_data(r1: TensorFile, n1: str, r2: TensorFile, n2: str, e) -> bool:
    """True when tensors ``n1`` of ``r1`` and ``n2`` of ``r2`` (both like ``e``) hold the same
    bytes, not all zero: the first row, then ``COPY_BYTES`` at a time (different tensors differ
    at once)."""
    step, nonzero = _rows_per_copy(e), False
    for r0 in [0, *range(1, e.rows, step)]:
        r1_ = min(e.rows, r0 + (step if r0 else 1))
        a, b = r1.read(n1, r0, r1_), r2.read(n2, r0, r1_)
        if not np.array_equal(a, b):
            return False
        nonzero = nonzero or bool(a.view(np.uint8).any())
    return nonzero


def _check_others(src: Path, shards: list[str]) -> None:
    """CheckpointError naming the first entry of ``src`` that copying would fail on: a broken
    link, a link to a directory holding it (the copy would never end), or something neither a
    file nor a directory (a named pipe, a socket)."""
    for item in sorted(src.rglob("*")):
        why = None
        if item.is_symlink() and not item.exists():
            why = f"a broken symbolic link (to {os.readlink(item)!r})"
        elif item.is_symlink() and item.is_dir():
            target, here = item.resolve(), item.parent.resolve()
            if target == here or target in here.parents:
                why = f"a symbolic link to {str(target)!r}, which holds it"
        elif not item.is_dir() and not item.is_file():
            why = "neither a file nor a directory (a named pipe, a socket)"
        if why:
            raise CheckpointError(f"input {str(item)!r}: {why}, which cannot be copied; remove "
                                  "it or fix it")


def _copy_others(src: Path, root: Path, shards: list[str], index, weight_map, sizes) -> list[str]:
    """The index (weight_map and total_size updated) and the directory's other files; returns
    the weight files of other formats left out."""
    if index is not None:
        new = dict(index, metadata={**(index.get("metadata") or {}), "total_size": sizes},
                   weight_map=weight_map)
        (root / HF_INDEX).write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")
    skipped, emptied = [], []

    def weights(directory, names):  # copies of the model in subfolders (Meta's original/)
        out = [n for n in names if SUBFOLDER_COPIES.match(n) and (Path(directory) / n).is_file()]
        skipped.extend((Path(directory) / n).relative_to(src).as_posix() for n in out)
        if out and len(out) == len(names):  # nothing of it is copied: no empty folder either
            emptied.append(root / Path(directory).relative_to(src))
        return out

    for item in sorted(src.iterdir()):
        if item.name in shards or item.name == HF_INDEX:
            continue
        if item.is_file() and OTHER_WEIGHTS.match(item.name):
            skipped.append(item.name)
        elif item.is_dir():
            shutil.copytree(item, root / item.name, ignore=weights)
        else:
            shutil.copy2(item, root / item.name)
    for folder in reversed(emptied):  # deepest first, then parents left empty by it
        while folder != root:
            try:
                folder.rmdir()
            except OSError:  # not empty: it holds something that was copied
                break
            folder = folder.parent
    return skipped
