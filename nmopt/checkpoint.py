"""Read and write weight checkpoints (safetensors and PyTorch state dicts), atomically.

The format follows the file extension: ``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` for a
PyTorch state dict (a flat ``name -> tensor`` dict, loaded with ``torch.load(weights_only=True)``,
so no code in the file runs). Every write goes to a temporary file in the destination's
directory and is moved into place with ``os.replace`` only when it is complete, so a failed or
interrupted run never leaves a partial output. torch and safetensors are imported only when a
file is read or written.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message is one line naming the file."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def checkpoint_format(path: str | os.PathLike, what: str = "checkpoint") -> str:
    """``"safetensors"`` or ``"torch"`` from the extension; ``CheckpointError`` otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise CheckpointError(f"{what} {str(path)!r}: unknown extension {suffix or '(none)'!r}; "
                              f"use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def _have_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


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
        raise CheckpointError(f"input {str(path)!r}: cannot read as a PyTorch state dict "
                              f"({_one_line(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"input {str(path)!r}: holds a {type(obj).__name__}, not a state "
                              "dict; save model.state_dict() (a dict of name -> tensor)")
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"input {str(path)!r}: entry {name!r} is a {type(value).__name__}, not a tensor; "
                "pass a flat state dict (name -> tensor), e.g. torch.save(model.state_dict(), f)")
    return {str(k): v for k, v in obj.items()}


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The string metadata of a safetensors file (None for other formats or none stored)."""
    if checkpoint_format(path, "input") != "safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()


def save(tensors: dict[str, Any], path: str | os.PathLike,
         metadata: dict[str, str] | None = None) -> None:
    """Write a ``name -> tensor`` dict atomically in the format of ``path``'s extension.

    Torch tensors and numpy arrays are accepted for safetensors (torch tensors get the
    ``{"format": "pt"}`` metadata that Hugging Face loaders expect); PyTorch files need torch.
    """
    with AtomicFiles() as files:
        write_checkpoint(files, tensors, path, metadata)


def _write(tensors: dict[str, Any], tmp: str, fmt: str, metadata: dict[str, str] | None) -> None:
    """Write to an already-chosen (temporary) path."""
    is_torch = any(type(v).__module__.startswith("torch") for v in tensors.values())
    if fmt == "torch":
        import torch

        torch.save(dict(tensors), tmp)
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
    _write(tensors, files.add(path), fmt, metadata)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicFiles:
    """Context manager staging output files: they move into place together at the end, or none.

    ``add(path)`` returns a temporary path in the same directory as ``path`` (so the final
    ``os.replace`` is atomic on one file system). When the ``with`` block succeeds every staged
    file replaces its destination; when it raises (including ``KeyboardInterrupt``) every
    temporary file is removed and no destination is touched.

    Examples
    --------
    >>> with AtomicFiles() as files:                                    # doctest: +SKIP
    ...     Path(files.add("report.json")).write_text("{}")
    """

    def __init__(self) -> None:
        self._staged: list[tuple[str, Path]] = []

    def add(self, path: str | os.PathLike) -> str:
        dest = Path(path)
        directory = dest.parent if str(dest.parent) else Path(".")
        if not directory.is_dir():
            raise CheckpointError(f"output {str(dest)!r}: directory {str(directory)!r} does not "
                                  "exist")
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        self._staged.append((tmp, dest))
        return tmp

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                mode = 0o666 & ~_umask()
                for tmp, dest in self._staged:
                    # mkstemp (and some writers) make 0600 files; outputs get the usual mode
                    os.chmod(tmp, mode)
                    os.replace(tmp, dest)
                self._staged = []
                return
            except BaseException:
                self._cleanup()
                raise
        self._cleanup()

    def _cleanup(self) -> None:
        for tmp, _ in self._staged:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._staged = []
