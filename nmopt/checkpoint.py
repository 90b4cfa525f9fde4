"""Read and write weight checkpoints (safetensors and PyTorch state dicts), atomically.

The format follows the file extension: ``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` for a
PyTorch state dict (a flat ``name -> tensor`` dict, loaded with ``torch.load(weights_only=True)``,
so no code in the file runs). Every write goes to a temporary file in the destination's
directory and is moved into place only when it is complete (:mod:`nmopt._atomic`), so a failed or
interrupted run never leaves a partial output. torch and safetensors are imported only when a
file is read or written.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from nmopt._atomic import (  # noqa: F401 - re-exported: the io layer's public names
    AtomicFiles,
    CheckpointError,
    OutputExistsError,
    OutputWriteError,
    check_writable,
    error_writing,
)

FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _torch_reason(exc: BaseException) -> str:
    """torch.load's refusal without its advice to load with ``weights_only=False``."""
    text = str(exc)
    if "weights_only" not in text:
        return _one_line(exc)
    lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
    useful = [ln for ln in lines if "weights_only" not in ln and not ln.startswith("Check the doc")]
    what = useful[0] if useful else "objects other than tensors"
    return f"it holds code or objects other than tensors: {what}"


def checkpoint_format(path: str | os.PathLike, what: str = "checkpoint") -> str:
    """``"safetensors"`` or ``"torch"`` from the extension; ``CheckpointError`` otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise CheckpointError(f"{what} {str(path)!r}: unknown extension {suffix or '(none)'!r}; "
                              f"use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


#: Files that mark a directory as a model (one that an output directory may replace).
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def _same_path(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _input_clash(input_path: Path, path: Path) -> str | None:
    """Why output ``path`` must not be written when reading ``input_path`` (None if it may):
    it is the input, replacing it would delete the input (a directory holding it), or it is
    inside an input directory. ``path`` itself is what gets replaced, so a symlink there is not
    followed (its directory's are)."""
    if _same_path(input_path, path):
        kind = "directory" if input_path.is_dir() else "file"
        return f"is the input {kind}; write to another path"
    inp = Path(os.path.realpath(input_path))
    dest = (Path(os.path.realpath(path)) if path.name in ("", ".", "..")
            else Path(os.path.realpath(path.parent if str(path.parent) else ".")) / path.name)
    if inp != dest and inp.is_relative_to(dest):
        return f"contains the input {str(input_path)!r}; replacing it would delete the input"
    if inp.is_dir() and inp != dest and dest.is_relative_to(inp):
        return "is inside the input directory; write to another path"
    return None


def _inside(path: Path, directory: Path) -> bool:
    """True when ``path`` would lie inside ``directory`` (links resolved)."""
    inner, outer = Path(os.path.realpath(path)), Path(os.path.realpath(directory))
    return inner != outer and inner.is_relative_to(outer)


def _replace_refusal(path: Path) -> str | None:
    """Why an existing output must not be replaced even with ``--force``: a non-empty
    directory that holds no model (``MODEL_FILES``), so that ``--force`` never deletes
    unrelated files."""
    if path.is_dir() and not path.is_symlink() and any(path.iterdir()) \
            and not any((path / f).exists() for f in MODEL_FILES):
        return ("is a directory that holds no model (no config.json, model.safetensors or "
                "its index); nmopt replaces only model directories, even with --force: remove "
                "it yourself or write elsewhere")
    return None


def check_output_paths(input_path: str | os.PathLike, outputs: list[tuple[str, str | os.PathLike]],
                  force: bool = False, out_dir: bool = False) -> None:
    """Every check of a run's outputs that can fail before any work; one CheckpointError each.

    ``outputs`` are ``(flag, path)`` pairs, ``--out`` first. Each must be writable with a name
    short enough for its temporary (:func:`check_writable`, done first: a too-long name fails
    every later check); none may be the input, hold it or lie inside an input directory, and
    no two may be the same; an existing one needs ``force`` and, with it, must be replaceable
    (a model directory, or empty). With ``out_dir`` ``--out`` is a directory (a model's
    output), else every output is a file.
    """
    inp = Path(input_path)
    outs = [(flag, Path(path)) for flag, path in outputs]
    for flag, path in outs:
        check_writable(path, flag)  # missing or read-only directory, too long a name
    for i, (flag, path) in enumerate(outs):
        why = _input_clash(inp, path)
        for flag2, path2 in outs[i + 1:]:
            if _same_path(path, path2):
                why = why or f"and {flag2} name the same path"
            elif out_dir and flag == "--out" and _inside(path2, path):
                why = why or (f"holds {flag2} {str(path2)!r}; the model directory is written as "
                              f"a whole, so write {flag2} outside it")
        directory = out_dir and flag == "--out"
        if not why and path.is_dir() and not directory:
            why = "is a directory"
        if not why and directory and path.exists() and not path.is_dir():
            why = "is a file; OUT_DIR must be a directory (the output of a model directory)"
        if not why and os.path.lexists(path) and not force:  # a dangling link too
            why = "exists; pass --force to overwrite it"
        why = why or _replace_refusal(path)
        if why:
            raise CheckpointError(f"{flag} {str(path)!r} {why}")


def _have_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def refuse_torch_file(path: str | os.PathLike, head: bytes) -> None:
    """Raise when a file named ``.safetensors`` starts like a PyTorch file (zip or pickle).

    ``head``: the file's first 9 bytes or more. A safetensors header (8-byte length, then the
    JSON's ``{``) never counts: its length's first byte may well be 0x80, a pickle's first byte.
    """
    if head[8:9] == b"{":
        return
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise CheckpointError(f"input {str(path)!r}: looks like a PyTorch file (zip/pickle), not "
                              "safetensors; rename it to .pt")


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint into a ``name -> tensor`` dict (torch tensors; numpy without torch).

    Raises
    ------
    CheckpointError
        Missing or unreadable file (truncated, wrong format, not a flat dict of tensors).
    """
    path = Path(path)
    fmt = checkpoint_format(path, "input")
    if not path.exists():
        raise CheckpointError(f"input {str(path)!r}: no such file")
    if not path.is_file():
        raise CheckpointError(f"input {str(path)!r}: not a regular file")
    with open(path, "rb") as f:
        head = f.read(16)
    if fmt == "safetensors":
        refuse_torch_file(path, head)
    if fmt == "safetensors":
        try:
            if _have_torch():
                from safetensors.torch import load_file
            else:
                from safetensors.numpy import load_file
            return dict(load_file(str(path)))
        except ImportError:
            raise CheckpointError("reading .safetensors needs safetensors: pip install "
                                  "'nmopt[io]'") from None
        except Exception as exc:  # noqa: BLE001 - any parse failure is "unreadable"
            raise CheckpointError(f"input {str(path)!r}: cannot read as safetensors "
                                  f"({_one_line(exc)})") from None
    if not _have_torch():
        raise CheckpointError(f"input {str(path)!r}: reading PyTorch files needs torch: "
                              "pip install 'nmopt[torch]'")
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        if len(head) > 8 and head[8:9] == b"{":  # a u64 header length, then JSON
            raise CheckpointError(f"input {str(path)!r}: looks like a safetensors file, not a "
                                  "PyTorch one; rename it to .safetensors") from None
        raise CheckpointError(f"input {str(path)!r}: cannot read as a PyTorch state dict "
                              f"({_torch_reason(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"input {str(path)!r}: holds a {type(obj).__name__}, not a state "
                              "dict; save model.state_dict() (a dict of name -> tensor)")
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"input {str(path)!r}: entry {name!r} is a {type(value).__name__}, not a tensor; "
                "pass a flat state dict (name -> tensor), e.g. torch.save(model.state_dict(), f)")
        if value.layout != torch.strided:
            raise CheckpointError(f"input {str(path)!r}: tensor {name!r} is {value.layout} "
                                  "(sparse); save dense tensors, e.g. t.to_dense()")
        if value.is_meta:
            raise CheckpointError(f"input {str(path)!r}: tensor {name!r} is on the meta device "
                                  "(a shape without values); save the materialized weights")
    return {str(k): v for k, v in obj.items()}


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The string metadata of a safetensors file (None for other formats or none stored)."""
    if checkpoint_format(path, "input") != "safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()


def save(tensors: dict[str, Any], path: str | os.PathLike,
         metadata: dict[str, str] | None = None, force: bool = True) -> None:
    """Write a ``name -> tensor`` dict atomically in the format of ``path``'s extension.

    Torch tensors and numpy arrays are accepted for safetensors (torch tensors get the
    ``{"format": "pt"}`` metadata that Hugging Face loaders expect); PyTorch files need torch.
    ``force=False`` refuses to replace an existing file (:class:`OutputExistsError`).
    """
    with AtomicFiles(force=force) as files:
        write_checkpoint(files, tensors, path, metadata)


def _write(tensors: dict[str, Any], tmp: str, fmt: str, metadata: dict[str, str] | None) -> None:
    """Write to an already-chosen (temporary) path."""
    is_torch = any(type(v).__module__.startswith("torch") for v in tensors.values())
    if fmt == "torch":
        import torch

        with open(tmp, "wb") as f:  # a failed write then shows its OSError (error_writing)
            torch.save(dict(tensors), f)
        return
    meta = dict(metadata or {})
    if is_torch:
        from safetensors.torch import save_file

        meta.setdefault("format", "pt")
        seen: set[int] = set()
        out = {}
        for name, t in tensors.items():
            t = t.contiguous()
            if t.numel() and t.untyped_storage().data_ptr() in seen:
                t = t.clone()  # safetensors refuses tensors that share memory (tied weights)
            if t.numel():
                seen.add(t.untyped_storage().data_ptr())
            out[name] = t
    else:
        import numpy as np
        from safetensors.numpy import save_file

        out = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    save_file(out, tmp, metadata=meta or None)


def write_checkpoint(files: AtomicFiles, tensors: dict[str, Any], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Stage a checkpoint in ``files`` (moved into place when the block succeeds)."""
    fmt = checkpoint_format(path, "output")
    tmp = files.add(path)
    try:
        _write(tensors, tmp, fmt, metadata)
    except Exception as exc:  # noqa: BLE001 - disk full, quota, I/O error: one line naming path
        nbytes = sum(int(getattr(t, "nbytes", 0) or 0) for t in tensors.values())
        raise error_writing(path, exc, nbytes) from None
