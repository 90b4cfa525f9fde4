"""Read and write safetensors files a block of rows at a time, and find a model directory's shards.

The format (https://github.com/huggingface/safetensors): 8 bytes, the little-endian length H of
a JSON header ``{NAME: {"dtype": CODE, "shape": [...], "data_offsets": [BEGIN, END]},
"__metadata__": {str: str}}``, then the data (offsets count from the byte after the header),
each tensor row-major and little-endian. Reading uses plain file reads, not a memory map, so a
block read and dropped leaves nothing resident. :class:`SafetensorsWriter` lays the header out
from the shapes first and then writes each tensor's rows where they belong as they come, so a
file of any size is written holding one block at a time. bfloat16 and float8 tensors travel as
their raw bits (uint16 / uint8 arrays); nothing here imports torch or safetensors.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nmopt.checkpoint import CheckpointError, error_writing, refuse_torch_file

#: safetensors dtype code -> (numpy storage dtype, dtype name as torch spells it)
DTYPES = {
    "F64": ("<f8", "float64"), "F32": ("<f4", "float32"), "F16": ("<f2", "float16"),
    "BF16": ("<u2", "bfloat16"), "F8_E4M3": ("u1", "float8_e4m3fn"), "F8_E5M2": ("u1", "float8_e5m2"),
    "I64": ("<i8", "int64"), "I32": ("<i4", "int32"), "I16": ("<i2", "int16"), "I8": ("i1", "int8"),
    "U64": ("<u8", "uint64"), "U32": ("<u4", "uint32"), "U16": ("<u2", "uint16"), "U8": ("u1", "uint8"),
    "BOOL": ("?", "bool"),
}
CODES = {name: code for code, (_, name) in DTYPES.items()}  # dtype name -> code
HF_SINGLE, HF_INDEX = "model.safetensors", "model.safetensors.index.json"
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: name, dtype code, shape and (in a file) its absolute byte offset.

    ``dtype`` is the name torch uses (``"bfloat16"``), so entries go through
    :func:`nmopt.prune.select_layers` like tensors.
    """

    name: str
    code: str
    shape: tuple[int, ...]
    offset: int = -1

    @property
    def dtype(self) -> str:
        return DTYPES[self.code][1]

    @property
    def storage(self) -> np.dtype:
        return np.dtype(DTYPES[self.code][0])

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.storage.itemsize


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values given as their uint16 bits, widened exactly to float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def storage_array(t: Any) -> tuple[np.ndarray, str]:
    """A numpy or torch tensor as (numpy array of its bytes' storage dtype, safetensors code)."""
    if not isinstance(t, np.ndarray):  # torch: bfloat16 / float8 have no numpy dtype
        name = str(t.dtype).replace("torch.", "")
        import torch

        t = t.detach().cpu().contiguous()
        if name not in CODES:
            raise TypeError(f"tensor dtype {name} cannot be stored in safetensors")
        code = CODES[name]
        raw = t.view(torch.uint8 if t.element_size() == 1 else getattr(torch, f"int{8 * t.element_size()}"))
        return raw.numpy().view(DTYPES[code][0]), code
    if t.dtype.name not in CODES:
        raise TypeError(f"tensor dtype {t.dtype} cannot be stored in safetensors")
    return t, CODES[t.dtype.name]


def from_storage(arr: np.ndarray, code: str, framework: str) -> Any:
    """The inverse of :func:`storage_array`: a numpy array, or a torch tensor of the real dtype."""
    if framework == "numpy":
        if DTYPES[code][1] != arr.dtype.name:
            raise TypeError(f"dtype {DTYPES[code][1]} has no numpy equivalent; install torch "
                            "(pip install 'nmopt[torch]') to read it")
        return arr
    import torch

    return torch.from_numpy(np.require(arr, requirements="C")).view(getattr(torch, DTYPES[code][1]))


def read_header(path: str | os.PathLike) -> tuple[dict[str, Entry], dict[str, str]]:
    """The entries (in data order) and string metadata of a safetensors file.

    Raises CheckpointError naming the file when it is missing or is not valid safetensors.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"input {str(path)!r}: no such file")
    if not path.is_file():
        raise CheckpointError(f"input {str(path)!r}: not a regular file")

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"input {str(path)!r}: cannot read as safetensors ({why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        refuse_torch_file(path, head)
        head = head[:8]
        f.seek(len(head))
        if len(head) < 8:
            raise bad("shorter than the 8-byte header length")
        length = int.from_bytes(head, "little")
        if length > min(_MAX_HEADER, size - 8):
            raise bad(f"header length {length} exceeds the file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must map strings to strings")
    start, entries = 8 + length, []
    def integers(value) -> bool:
        return isinstance(value, list) and all(type(v) is int for v in value)

    for name, info in header.items():
        try:
            code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError):
            raise bad(f"tensor {name!r}: needs dtype, shape and data_offsets") from None
        if not integers(shape) or not integers(offsets) or len(offsets) != 2:
            raise bad(f"tensor {name!r}: shape and data_offsets must be lists of integers, got "
                      f"{shape!r} and {offsets!r}")
        if not isinstance(code, str) or code not in DTYPES:
            raise bad(f"tensor {name!r}: dtype {code!r} is not supported ({', '.join(DTYPES)})")
        begin, end = offsets
        nbytes = math.prod(shape) * np.dtype(DTYPES[code][0]).itemsize  # Python ints: no overflow
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes or start + end > size:
            raise bad(f"tensor {name!r}: offsets {[begin, end]} do not fit shape {list(shape)} "
                      f"{code} in a file of {size} bytes (truncated?)")
        entries.append(Entry(name, code, tuple(shape), start + begin))
    entries.sort(key=lambda e: (e.offset, e.nbytes))
    end = start  # the data must tile the rest of the file, as the safetensors library demands
    for prev, e in zip([None] + entries, entries):
        if e.offset != end:
            raise bad(f"tensor {e.name!r} overlaps tensor {prev.name!r}" if e.offset < end else
                      f"{e.offset - end} bytes before tensor {e.name!r} belong to no tensor")
        end = e.offset + e.nbytes
    if end != size:
        raise bad(f"{size - end} bytes after the last tensor belong to no tensor")
    return {e.name: e for e in entries}, meta


class SafetensorsReader:
    """Rows of the tensors of one safetensors file, read on demand (context manager)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries, self.metadata = read_header(self.path)
        self._f = open(self.path, "rb")  # noqa: SIM115 - closed by close()

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` (first axis) of tensor ``name``, in its storage dtype."""
        return self.read_entry(self.entries[name], start, stop)

    def read_entry(self, e: Entry, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of the stored tensor ``e``."""
        stop = e.rows if stop is None else stop
        row = e.nbytes // e.rows if e.rows else 0
        buf = np.empty((stop - start) * row, np.uint8)
        self._f.seek(e.offset + start * row)
        if self._f.readinto(memoryview(buf)) != buf.size:
            raise CheckpointError(f"input {str(self.path)!r}: tensor {e.name!r} is truncated")
        return buf.view(e.storage).reshape((stop - start, *e.shape[1:]) if e.shape else ())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsWriter:
    """A safetensors file written in pieces: the header from ``entries`` (name, code, shape) at
    once, then each tensor's rows in order, tensors in any order (context manager; ``close``
    checks that every tensor is complete). A failed write raises one ``OutputWriteError``
    naming ``output`` (the destination the user asked for; default ``path``)."""

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, output: str | os.PathLike | None = None,
                 ) -> None:
        self.output = Path(path if output is None else output)
        try:
            self._open(path, entries, metadata)
        except OSError as exc:
            raise error_writing(self.output, exc) from None

    def _open(self, path, entries, metadata) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset, self._todo = 0, {}
        for name, code, shape in entries:
            e = Entry(name, code, tuple(int(s) for s in shape))
            header[name] = {"dtype": code, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            self._todo[name] = [offset, e.nbytes]
            offset += e.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # 8-byte aligned data, as safetensors writes it
        self.path, self._base = Path(path), 8 + len(text)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.write(self._fd, len(text).to_bytes(8, "little") + text)
        os.ftruncate(self._fd, self._base + offset)

    def write(self, name: str, rows: np.ndarray) -> None:
        """Append ``rows`` (the next rows of tensor ``name``, its storage dtype) to its data."""
        data = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
        place = self._todo[name]
        if data.size > place[1]:
            raise RuntimeError(f"tensor {name!r}: {data.size} bytes written beyond its size")
        done = 0
        try:
            while done < data.size:
                done += os.pwrite(self._fd, memoryview(data[done:]), self._base + place[0] + done)
        except OSError as exc:
            raise error_writing(self.output, exc, data.size) from None
        place[0] += data.size
        place[1] -= data.size

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError as exc:
            raise error_writing(self.output, exc) from None
        left = [name for name, (_, n) in self._todo.items() if n]
        if left:
            raise RuntimeError(f"{str(self.path)!r}: tensor {left[0]!r} was not written completely")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def model_shards(directory: str | os.PathLike) -> tuple[list[str], dict[str, Any] | None]:
    """The safetensors weight files of a Hugging Face model directory and its index (or None).

    ``model.safetensors.index.json`` (its ``weight_map`` names the shards) wins over a single
    ``model.safetensors``; CheckpointError naming the directory when it has neither.
    """
    d = Path(directory)
    if (d / HF_INDEX).is_file():
        try:
            index = json.loads((d / HF_INDEX).read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to shard file names")
            if not isinstance(index.get("metadata", {}), dict):
                raise TypeError("metadata must be a JSON object")
            shards = list(dict.fromkeys(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"input {str(d / HF_INDEX)!r}: not a safetensors index "
                                  f"(needs a weight_map of tensor -> shard file): {exc}") from None
        for shard in shards:
            if Path(shard).name != shard or not (d / shard).is_file():
                raise CheckpointError(f"input {str(d / HF_INDEX)!r}: shard {shard!r} is not a file of "
                                      f"{str(d)!r}")
        return shards, index
    if (d / HF_SINGLE).is_file():
        return [HF_SINGLE], None
    raise CheckpointError(f"input {str(d)!r}: a model directory needs {HF_SINGLE} or {HF_INDEX} (the "
                          "Hugging Face layout); other weight formats cannot be streamed")
