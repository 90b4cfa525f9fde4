"""Atomic outputs: files and directories staged beside their destination, moved in all or none.

A staged output is a temporary ``.<name>.<hash>.<pid>.<random>.tmp`` in the destination's
directory (same file system, and short whatever the name's length). :class:`AtomicFiles` moves
it into place only when its ``with`` block succeeds. Without ``force`` the move is exclusive:
it fails, leaving the destination alone, when something is already there, even something
another process put there a moment ago. With ``force`` it swaps atomically (Linux
``renameat2``), so the destination always holds the complete old or the complete new output.
A successful commit also removes the temporaries of the same destinations that killed runs left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_NOREPLACE, _EXCHANGE, _AT_FDCWD = 1, 2, -100  # renameat2(2) flags
_KEEP = 32  # characters of the destination's name kept in its temporaries' names


class CheckpointError(ValueError):
    """A checkpoint or output cannot be read or written; the message is one line naming it."""


class OutputExistsError(CheckpointError):
    """An output exists (perhaps written meanwhile by another run) and overwriting is off."""


class OutputWriteError(CheckpointError, OSError):
    """An output cannot be written (read-only directory, disk full, ...): also an ``OSError``."""


def _parent(dest: Path) -> Path:
    return dest.parent if str(dest.parent) else Path(".")


def _stem(dest: Path) -> str:
    """The common start of every temporary of ``dest``: its name cut short, plus a hash."""
    digest = hashlib.sha1(os.fsencode(dest.name)).hexdigest()[:8]
    return f".{dest.name[:_KEEP]}.{digest}."


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _stage(dest: Path, directory: bool, what: str = "output") -> Path:
    """A new temporary file (or directory) for ``dest``; CheckpointError naming ``dest``."""
    parent = _parent(dest)
    if not parent.is_dir():
        raise CheckpointError(f"{what} {str(dest)!r}: directory {str(parent)!r} does not exist")
    prefix = f"{_stem(dest)}{os.getpid()}."
    try:
        if directory:
            return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
        os.close(fd)
        return Path(tmp)
    except OSError as exc:
        raise OutputWriteError(f"{what} {str(dest)!r}: cannot write in {str(parent)!r} "
                              f"({_reason(exc)})") from None


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Raise CheckpointError naming ``what`` now if ``path`` could not be written later.

    Checks that its directory exists and takes a new file (not read-only, not full of inodes)
    and that its name is not too long, so a run fails before its work, not after.
    """
    dest = Path(path)
    parent = _parent(dest)
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(dest.name)) > limit:
        raise CheckpointError(f"{what} {str(dest)!r}: the file name is longer than the {limit} "
                              "bytes the file system allows; use a shorter name")
    _remove(_stage(dest, False, what))


def error_writing(path: str | os.PathLike, exc: BaseException, nbytes: int | None = None,
                  ) -> OutputWriteError:
    """One line for a failed write of output ``path``: the cause, e.g. no space left."""
    cause = exc  # torch.save's own error hides the OSError of the write in its context
    while not isinstance(cause, OSError) and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    exc = cause if isinstance(cause, OSError) else exc
    text = str(exc)
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text
    if not full and nbytes:
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(_parent(Path(path))).free < nbytes
    cause = "no space left on device" if full else _reason(exc)
    size = f" (writing {nbytes / 1e9:.2g} GB)" if full and nbytes else ""
    return OutputWriteError(f"output {str(path)!r}: {cause}{size}")


@functools.lru_cache(maxsize=1)
def _renameat2_fn() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or file system lacks it."""
    fn = _renameat2_fn()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextlib.contextmanager
def _dir_lock(directory: Path):
    """An exclusive lock on ``directory`` among the processes that take it (none without fcntl)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _move_new(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` to ``dest``; FileExistsError, nothing moved, if ``dest`` exists."""
    if _renameat2(tmp, dest, _NOREPLACE):
        return
    with _dir_lock(_parent(dest)):  # rename onto an empty directory would succeed: check first
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, "File exists", str(dest))
        os.rename(tmp, dest)


def _swap(tmp: Path, dest: Path) -> None:
    """Exchange ``tmp`` and ``dest`` (afterwards ``tmp`` holds the old ``dest``)."""
    if _renameat2(tmp, dest, _EXCHANGE):
        return
    # no atomic exchange here: ``dest`` is missing for a moment, its old content at ``.old``
    side = tmp.with_name(tmp.name[:-4] + ".old")
    os.rename(dest, side)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(side, dest)
        raise
    os.rename(side, tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``dest`` left by processes that no longer run; return them."""
    dest = Path(dest)
    stem, removed = _stem(dest), []
    with contextlib.suppress(OSError), os.scandir(_parent(dest)) as entries:
        for entry in entries:
            name = entry.name
            if not (name.startswith(stem) and name.endswith((".tmp", ".old"))):
                continue
            pid = name[len(stem):].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                _remove(Path(entry.path))
                removed.append(Path(entry.path))
    return removed


def _publish_mode(tmp: Path) -> None:
    """The usual permissions (mkstemp, mkdtemp and safetensors make private ones)."""
    mask = os.umask(0)
    os.umask(mask)
    if not tmp.is_dir():
        os.chmod(tmp, 0o666 & ~mask)
        return
    os.chmod(tmp, 0o777 & ~mask)
    for path in tmp.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


class AtomicFiles:
    """Context manager staging outputs: they move into place together at the end, or none.

    ``add(path)`` returns a temporary file path and ``add_dir(path)`` a new temporary directory,
    both beside ``path`` (same file system). When the ``with`` block succeeds each staged output
    moves to its destination, which then holds it complete; when the block raises (including
    ``KeyboardInterrupt``) every temporary is removed and no destination is touched.

    ``force=False`` never overwrites: a destination that exists at the moment of the move
    (however recently created) raises :class:`OutputExistsError` and every output is rolled
    back. ``force=True`` (the default) replaces destinations atomically. A kill at any moment
    leaves each destination either as it was or complete; the temporaries it leaves are removed
    by the next successful commit to the same destination. Several outputs are each atomic, not
    all together: a kill between two moves leaves the first new and the second old.

    Examples
    --------
    >>> with AtomicFiles(force=False) as files:                         # doctest: +SKIP
    ...     Path(files.add("report.json")).write_text("{}")
    ...     shards = files.add_dir("model-pruned")  # write the directory's files in here
    """

    def __init__(self, force: bool = True) -> None:
        self.force = force
        self._staged: list[tuple[Path, Path]] = []

    def add(self, path: str | os.PathLike) -> str:
        """A temporary file that becomes ``path`` at commit."""
        return self._add(Path(path), False)

    def add_dir(self, path: str | os.PathLike) -> str:
        """A new empty temporary directory that becomes the directory ``path`` at commit."""
        return self._add(Path(path), True)

    def _add(self, dest: Path, directory: bool) -> str:
        if dest.is_dir() and not dest.is_symlink() and not directory:
            raise CheckpointError(f"output {str(dest)!r} is a directory")
        if not self.force and os.path.lexists(dest):
            raise OutputExistsError(f"output {str(dest)!r} exists; pass --force to overwrite it")
        tmp = _stage(dest, directory)
        self._staged.append((tmp, dest))
        return str(tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        staged, self._staged = self._staged, []
        done: list[tuple[Path, Path, bool]] = []  # (tmp, dest, swapped)
        try:
            if exc_type is None:
                for tmp, dest in staged:
                    done.append((tmp, dest, self._commit(tmp, dest)))
        except BaseException:
            for tmp, dest, swapped in reversed(done):
                with contextlib.suppress(OSError):
                    if swapped:
                        _swap(tmp, dest)
                    else:
                        _remove(dest)
            raise
        finally:
            if exc_type is not None or len(done) < len(staged):
                for tmp, _ in staged:
                    _remove(tmp)
        for tmp, dest, swapped in done:
            if swapped:
                _remove(tmp)  # the previous output
            remove_stale(dest)

    def _commit(self, tmp: Path, dest: Path) -> bool:
        """Move ``tmp`` to ``dest``; True when it swapped with an existing ``dest``."""
        try:
            _publish_mode(tmp)
            try:
                _move_new(tmp, dest)
                return False
            except FileExistsError:
                if not self.force:
                    raise OutputExistsError(f"output {str(dest)!r} exists; pass --force to "
                                            "overwrite it") from None
            if tmp.is_dir() != dest.is_dir() and not dest.is_symlink():
                raise CheckpointError(f"output {str(dest)!r} is a "
                                      f"{'directory' if dest.is_dir() else 'file'}; remove it "
                                      "or choose another path")
            _swap(tmp, dest)
            return True
        except OSError as exc:
            raise OutputWriteError(f"output {str(dest)!r}: cannot move it into place "
                                  f"({_reason(exc)})") from None
