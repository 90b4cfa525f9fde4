"""The nm-packed checkpoint format: N:M-pruned tensors as kept values plus bit-packed positions.

An nm-packed file is an ordinary safetensors file. A packed tensor ``NAME`` of dense shape S is
seen as the matrix (R, C) = (S[0], S[1]*S[2]*...) (a conv weight (out, in, kh, kw) as
(out, in*kh*kw)), C a multiple of M, N:M along its rows, and stored as

- ``NAME.nm_values``: (R, C/M*N), NAME's dtype. Group g of row r (columns g*M .. g*M+M-1) owns
  slots g*N .. g*N+N-1: its kept values in ascending column order, then zeros if it keeps fewer;
- ``NAME.nm_index``: (R, ceil(C/M*N*B/8)) uint8, B = ceil(log2 M) bits per slot. Slot j of row
  r holds the position (0..M-1) of its value within its group in bits j*B .. j*B+B-1 of the
  row's bytes, least significant first (bit k is bit k%8 of byte k//8; unused end bits are 0).
  Padding slots take the lowest positions their group does not keep, so a group's N positions
  are distinct and the dense tensor is ``dense[r, g*M + pos] = values[r, slot]``, zero elsewhere;
- metadata key ``nm_packed``: JSON ``{"version": 1, "tensors": {NAME: {"pattern": "N:M",
  "shape": S, "index_bits": B}}}``.

Every other tensor is stored unchanged under its own name. Values and positions are the
:mod:`nmopt.packed` format (its pack/unpack kernels); this module adds the bit packing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nmopt._arrays import is_torch_tensor
from nmopt._packed import PackedNM
from nmopt.checkpoint import CheckpointError, checkpoint_format, load
from nmopt.errors import UsageError
from nmopt.packed import pack, unpack
from nmopt.patterns import Pattern, parse_pattern
from nmopt.safetensors_stream import HF_INDEX, Entry, SafetensorsReader, from_storage, model_shards

KEY, VALUES, INDEX, VERSION = "nm_packed", ".nm_values", ".nm_index", 1
_PACKABLE = {2: np.float16, 4: np.float32, 8: np.float64}  # pack copies values bit for bit
FLOAT_CODES = ("F16", "BF16", "F32", "F64")  # the dtypes a packed tensor may have


def index_bits(m: int) -> int:
    """Bits per stored position: ceil(log2 M)."""
    return (int(m) - 1).bit_length()


def pack_bits(positions: np.ndarray, bits: int) -> np.ndarray:
    """(R, W) uint8 positions < 2**bits -> (R, ceil(W*bits/8)) uint8, ``bits`` per position."""
    rows, width = positions.shape
    if bits == 0:
        return np.zeros((rows, 0), np.uint8)
    planes = np.unpackbits(positions[..., None], axis=2, bitorder="little")[..., :bits]
    return np.packbits(planes.reshape(rows, width * bits), axis=1, bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, width: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: (R, ceil(width*bits/8)) uint8 -> (R, width) uint8."""
    rows = data.shape[0]
    if bits == 0:
        return np.zeros((rows, width), np.uint8)
    planes = np.unpackbits(data, axis=1, count=width * bits, bitorder="little")
    return np.packbits(planes.reshape(rows, width, bits), axis=2, bitorder="little")[..., 0]


@dataclass(frozen=True)
class PackedLayout:
    """Where a packed tensor lives: its dense entry, pattern and the two stored shapes."""

    dense: Entry
    pattern: Pattern

    @property
    def cols(self) -> int:
        return int(np.prod(self.dense.shape[1:], dtype=np.int64))

    @property
    def width(self) -> int:
        return self.cols // self.pattern.m * self.pattern.n

    @property
    def bits(self) -> int:
        return index_bits(self.pattern.m)

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, code, shape) of the values and index tensors."""
        rows, name = self.dense.rows, self.dense.name
        return [(name + VALUES, self.dense.code, (rows, self.width)),
                (name + INDEX, "U8", (rows, -(-self.width * self.bits // 8)))]

    def describe(self) -> dict[str, Any]:
        return {"pattern": str(self.pattern), "shape": list(self.dense.shape), "index_bits": self.bits}


def layout(entry: Entry, pattern) -> PackedLayout:
    """The packed layout of ``entry``; ValueError naming it when it cannot be N:M along its rows."""
    p = parse_pattern(pattern)
    lay = PackedLayout(entry, p)
    if len(entry.shape) < 2 or lay.cols % p.m or entry.code not in FLOAT_CODES:
        why = (f"dtype {entry.dtype} is not a float" if entry.code not in FLOAT_CODES
               else f"{lay.cols} columns is not a multiple of M={p.m}" if len(entry.shape) >= 2
               else "it is not a matrix")
        raise UsageError(f"--format nm-packed: tensor {entry.name!r} {list(entry.shape)} cannot be stored "
                         f"{p} along its rows: {why}; leave it out (--exclude) or use --format dense")
    return lay


def metadata(metadata: dict[str, str] | None, layouts: list[PackedLayout]) -> dict[str, str]:
    """``metadata`` plus the ``nm_packed`` key describing ``layouts``."""
    tensors = {lay.dense.name: lay.describe() for lay in layouts}
    return {**(metadata or {}), KEY: json.dumps({"version": VERSION, "tensors": tensors})}


def encode(lay: PackedLayout, rows: np.ndarray, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values, index) of some rows of a pruned tensor (storage dtype) and their boolean mask."""
    mask = np.asarray(mask.cpu() if is_torch_tensor(mask) else mask, dtype=bool)
    w = rows.reshape(rows.shape[0], lay.cols)
    w = w.view(_PACKABLE[w.dtype.itemsize])  # bfloat16 (any 2-byte bits) as float16
    try:
        packed = pack(w, mask.reshape(w.shape), lay.pattern)
    except ValueError as err:
        raise ValueError(f"--format nm-packed: tensor {lay.dense.name!r} is not {lay.pattern} along its "
                         f"rows ({err}); use --format dense") from None
    return packed.values.view(rows.dtype), pack_bits(packed.indices, lay.bits)


def decode(lay: PackedLayout, values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The dense rows (storage dtype, dense shape) of some rows of ``values`` and ``index``."""
    store = values.dtype
    v = np.ascontiguousarray(values).view(_PACKABLE[store.itemsize])
    positions = unpack_bits(index, lay.bits, lay.width)
    if lay.pattern.n > 1 and positions.size:  # a group's N positions are distinct (the format)
        ordered = np.sort(positions.reshape(positions.shape[0], -1, lay.pattern.n), axis=2)
        if (ordered[..., 1:] == ordered[..., :-1]).any():
            raise ValueError("a group of M holds the same position twice")
    dense = unpack(PackedNM(v, positions, lay.pattern.n, lay.pattern.m, (v.shape[0], lay.cols)))
    return dense.view(store).reshape((v.shape[0], *lay.dense.shape[1:]))


class TensorFile(SafetensorsReader):
    """A safetensors file seen as its dense tensors: nm-packed ones are decoded as they are read.

    ``entries`` holds the dense (logical) tensors in file order and ``metadata`` the metadata
    without the ``nm_packed`` key; ``packed`` the layouts of the packed ones.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        stored, meta = self.entries, dict(self.metadata)
        self.packed: dict[str, PackedLayout] = {}
        if KEY in meta:
            try:
                info = json.loads(meta.pop(KEY))
                if info.get("version") != VERSION:
                    raise ValueError(f"version {info.get('version')!r}; this nmopt reads version "
                                     f"{VERSION} (upgrade nmopt)")
                for name, d in info["tensors"].items():
                    values = stored[name + VALUES]
                    if name in stored:
                        raise ValueError(f"tensor {name!r} is stored both plain and packed")
                    if values.code not in FLOAT_CODES:
                        raise ValueError(f"tensor {name!r}: values of dtype {values.code}; packed "
                                         f"values are one of {', '.join(FLOAT_CODES)}")
                    shape = d["shape"]
                    if not isinstance(shape, list) or not all(type(v) is int for v in shape):
                        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of integers")
                    lay = PackedLayout(Entry(name, values.code, tuple(shape)), parse_pattern(d["pattern"]))
                    if d.get("index_bits", lay.bits) != lay.bits:
                        raise ValueError(f"tensor {name!r}: index_bits {d['index_bits']!r} is not "
                                         f"{lay.bits} for {lay.pattern}")
                    if [(n, c, tuple(s)) for n, c, s in lay.entries()] != [
                            (e.name, e.code, e.shape) for e in (values, stored[name + INDEX])]:
                        raise ValueError(f"tensor {name!r}: stored shapes do not match {d}")
                    self.packed[name] = lay
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self.close()
                why = f"missing {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
                raise CheckpointError(f"input {str(self.path)!r}: invalid nm-packed metadata ({why})") from None
        hidden = {n + suffix for n in self.packed for suffix in (VALUES, INDEX)}
        self.entries = {}
        for e in stored.values():
            name = e.name[: -len(VALUES)] if e.name.endswith(VALUES) and e.name in hidden else e.name
            if name in self.packed:
                self.entries[name] = self.packed[name].dense
            elif e.name not in hidden:
                self.entries[name] = e
        self.stored, self.metadata = stored, meta

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        lay = self.packed.get(name)
        if lay is None:
            return super().read(name, start, stop)
        try:
            return decode(lay, self.read_entry(self.stored[name + VALUES], start, stop),
                          self.read_entry(self.stored[name + INDEX], start, stop))
        except ValueError as exc:
            raise CheckpointError(f"input {str(self.path)!r}: tensor {name!r}: corrupt nm-packed "
                                  f"data ({exc})") from None


def load_pruned(path: str | os.PathLike) -> dict[str, Any]:
    """Every tensor of a checkpoint, nm-packed ones restored to their exact dense (pruned) form.

    ``path`` is a safetensors file or a Hugging Face model directory (all its shards, in index
    order); plain checkpoints load too. Torch tensors when torch is installed, else numpy
    arrays (then bfloat16 / float8 tensors are refused).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"input {str(p)!r}: no such file or directory")
    files = [p]
    if p.is_dir():
        shards, index = model_shards(p)
        with contextlib.ExitStack() as stack:
            open_shards(p, shards, index, stack)  # the index checked against the shards
        files = [p / s for s in shards]
    framework = "torch" if importlib.util.find_spec("torch") is not None else "numpy"
    out: dict[str, Any] = {}
    for file in files:
        if checkpoint_format(file, "input") == "safetensors":
            with TensorFile(file) as f:
                if f.packed:
                    out.update((n, from_storage(f.read(n), e.code, framework)) for n, e in f.entries.items())
                    continue
        out.update(load(file))  # plain checkpoints: the usual loader
    return out


def open_shards(src: Path, shards: list[str], index: dict | None,
                stack: contextlib.ExitStack) -> tuple[list[TensorFile], dict[str, Entry], dict[str, str]]:
    """Open the safetensors ``shards`` of ``src`` (a file, or a model directory with its
    ``index``) in ``stack``: (readers, every dense tensor's entry, the shard holding it).

    CheckpointError for a tensor in two shards, or an index that sends a tensor to a shard
    without it (``from_pretrained`` would fail on such a model).
    """
    base = src if src.is_dir() else src.parent
    readers = [stack.enter_context(TensorFile(base / s)) for s in shards]
    entries: dict[str, Entry] = {}
    where: dict[str, str] = {}
    for reader, shard in zip(readers, shards):
        for name, e in reader.entries.items():
            if name in entries:
                raise CheckpointError(f"input {str(src)!r}: tensor {name!r} is in two shards")
            entries[name], where[name] = e, shard
    if index is None:
        return readers, entries, where

    def held(name):  # the parts of a packed tensor are held where the tensor is
        for part in (VALUES, INDEX):
            if name not in where and name.endswith(part) and name.removesuffix(part) in where:
                return where[name.removesuffix(part)]
        return where.get(name)

    wrong = [(name, shard) for name, shard in index["weight_map"].items() if held(name) != shard]
    if wrong:
        name, shard = wrong[0]
        found = f"it is in {held(name)!r}" if held(name) else "no shard holds it"
        raise CheckpointError(f"input {str(src / HF_INDEX)!r}: maps tensor {name!r} to {shard!r} but "
                              f"{found} ({len(wrong)} such entries); regenerate the index")
    return readers, entries, where
