"""Checkpoint I/O: both formats, dtypes, clear errors; atomic outputs (files and directories) that
leave nothing behind, never clobber without force, and clean up after killed runs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import nmopt._atomic as atomic
from nmopt.checkpoint import (
    AtomicFiles,
    CheckpointError,
    OutputExistsError,
    OutputWriteError,
    check_writable,
    checkpoint_format,
    load,
    read_metadata,
    save,
)

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")


def _state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(8, 12, generator=g),
        "w16": torch.randn(8, 8, generator=g).half(),
        "wbf": torch.randn(8, 8, generator=g).bfloat16(),
        "conv": torch.randn(4, 2, 3, 3, generator=g),
        "count": torch.tensor(7, dtype=torch.int64),
        "flags": torch.tensor([True, False]),
    }


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("ext", [".safetensors", ".pt", ".bin", ".pth"])
def test_round_trip_keeps_values_and_dtypes(tmp_path, ext):
    sd = _state_dict()
    path = tmp_path / f"m{ext}"
    save(sd, path)
    back = load(path)
    assert list(back) == list(sd) or sorted(back) == sorted(sd)
    for name, t in sd.items():
        assert back[name].dtype == t.dtype
        assert torch.equal(back[name], t)
    assert _listing(tmp_path) == [path.name]  # no temporary file left


def test_safetensors_metadata_format_pt(tmp_path):
    path = tmp_path / "m.safetensors"
    save({"w": torch.ones(2, 2)}, path, metadata={"origin": "test"})
    assert read_metadata(path) == {"origin": "test", "format": "pt"}


@pytest.mark.parametrize("length", [128, 640, 0x8080])
def test_safetensors_whose_header_length_starts_like_a_pickle_load(tmp_path, length):
    """A header length whose first byte is 0x80 (a pickle's first byte; 640 even reads as
    pickle protocol 2) is still safetensors: its JSON follows at byte 8."""
    from nmopt.safetensors_stream import read_header

    text = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    text += b" " * (length - len(text))  # the library pads headers with spaces too
    path = tmp_path / "m.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + text + np.float32([1, 2]).tobytes())
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(load(path)["w"], torch.tensor([1.0, 2.0]))
    assert list(read_header(path)[0]) == ["w"]
    torch.save({"w": torch.ones(2)}, path)  # a real PyTorch file under that name is still refused
    with pytest.raises(CheckpointError, match="looks like a PyTorch file"):
        load(path)
    with pytest.raises(CheckpointError, match="looks like a PyTorch file"):
        read_header(path)


def test_numpy_arrays_to_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, path)
    assert torch.equal(load(path)["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_tied_tensors_save_to_safetensors(tmp_path):
    w = torch.randn(4, 4)
    path = tmp_path / "tied.safetensors"
    save({"embed.weight": w, "lm_head.weight": w}, path)  # safetensors refuses shared memory
    back = load(path)
    assert torch.equal(back["embed.weight"], back["lm_head.weight"])


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_truncated_file_is_one_line_error(tmp_path, ext):
    path = tmp_path / f"m{ext}"
    save(_state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "cannot read" in msg


def test_missing_and_unknown(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="unknown extension"):
        load(tmp_path / "model.npz")
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        load(tmp_path / "dir.pt")
    assert checkpoint_format("a/B.SafeTensors") == "safetensors"


def test_pt_must_be_a_flat_state_dict(tmp_path):
    path = tmp_path / "nested.pt"
    torch.save({"model": {"w": torch.ones(2)}, "step": 3}, path)
    with pytest.raises(CheckpointError, match="entry 'model' is a dict, not a tensor"):
        load(path)
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load(path)


def test_pt_with_code_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "obj": Path("x")}, path)  # not allowed by weights_only
    with pytest.raises(CheckpointError, match="cannot read as a PyTorch state dict"):
        load(path)


def test_atomic_files_all_or_nothing(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    b.write_text("old")
    with pytest.raises(RuntimeError), AtomicFiles() as files:
        Path(files.add(a)).write_text("new a")
        Path(files.add(b)).write_text("new b")
        raise RuntimeError("fail before commit")
    assert _listing(tmp_path) == ["b.txt"] and b.read_text() == "old"
    with pytest.raises(KeyboardInterrupt), AtomicFiles() as files:
        Path(files.add(a)).write_text("new a")
        raise KeyboardInterrupt
    assert _listing(tmp_path) == ["b.txt"]
    with AtomicFiles() as files:
        Path(files.add(a)).write_text("new a")
        Path(files.add(b)).write_text("new b")
    assert a.read_text() == "new a" and b.read_text() == "new b"
    assert _listing(tmp_path) == ["a.txt", "b.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert a.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_save_keeps_existing_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save({"w": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="dtype"):  # the writer refuses a non-tensor
        save({"w": object()}, path)  # not a tensor: the writer fails
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["m.safetensors"]


def test_output_directory_must_exist(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        save({"w": torch.ones(2)}, tmp_path / "nope" / "m.pt")


# -- atomic outputs: directories, no-clobber, races, rollback, stale temporaries -------------------

@pytest.fixture(params=["renameat2", "fallback"])
def rename_impl(request, monkeypatch):
    """Every commit test runs with Linux renameat2 and with the portable fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(atomic, "_renameat2_fn", lambda: None)
    elif atomic._renameat2_fn() is None:
        pytest.skip("no renameat2 here")
    return request.param


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_add_dir_commits_a_complete_directory(tmp_path, rename_impl):
    out = tmp_path / "model"
    with AtomicFiles(force=False) as files:
        staged = Path(files.add_dir(out))
        assert staged.parent == tmp_path and staged.is_dir() and not out.exists()
        (staged / "a.safetensors").write_text("a")
        (staged / "sub").mkdir()
        (staged / "sub" / "b").write_text("b")
    assert sorted(p.name for p in out.rglob("*")) == ["a.safetensors", "b", "sub"]
    assert _listing(tmp_path) == ["model"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "a.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError), AtomicFiles(force=True) as files:
        (Path(files.add_dir(out)) / "half").write_text("x")
        raise RuntimeError("fail before commit")
    assert _listing(tmp_path) == ["model"] and _listing(out) == ["a.safetensors", "sub"]
    with AtomicFiles(force=True) as files:
        (Path(files.add_dir(out)) / "new").write_text("n")
    assert _listing(out) == ["new"] and _listing(tmp_path) == ["model"]


@pytest.mark.parametrize("kind", ["file", "dir", "empty dir"])
def test_no_clobber_even_when_the_output_appears_meanwhile(tmp_path, rename_impl, kind):
    """Another run creating the output between the check and the move: refused, theirs kept."""
    out = tmp_path / ("out.pt" if kind == "file" else "model")
    with pytest.raises(OutputExistsError, match="exists; pass --force"), \
            AtomicFiles(force=False) as files:
        if kind == "file":
            Path(files.add(out)).write_text("mine")
            out.write_text("theirs")
        else:
            (Path(files.add_dir(out)) / "mine").write_text("mine")
            out.mkdir()  # rename(2) onto an empty directory succeeds: must still be refused
            if kind == "dir":
                (out / "theirs").write_text("theirs")
    assert _listing(tmp_path) == [out.name]
    if kind == "file":
        assert out.read_text() == "theirs"
    else:
        assert _listing(out) == ([] if kind == "empty dir" else ["theirs"])


def test_exists_is_refused_up_front_without_force(tmp_path):
    (tmp_path / "m.pt").write_text("old")
    with pytest.raises(OutputExistsError, match="exists; pass --force"):
        save({"w": torch.ones(2)}, tmp_path / "m.pt", force=False)
    assert (tmp_path / "m.pt").read_text() == "old" and _listing(tmp_path) == ["m.pt"]


def test_two_concurrent_writers_one_wins_whole(tmp_path, rename_impl, monkeypatch):
    out = tmp_path / "m.safetensors"
    barrier, real = threading.Barrier(2), atomic._publish_mode

    def together(tmp):
        barrier.wait(timeout=10)  # both have written their file: now both move it
        real(tmp)

    monkeypatch.setattr(atomic, "_publish_mode", together)
    outcome = {}

    def run(value):
        try:
            save({"w": torch.full((64,), float(value))}, out, force=False)
            outcome[value] = "wrote"
        except OutputExistsError:
            outcome[value] = "exists"

    threads = [threading.Thread(target=run, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome.values()) == ["exists", "wrote"]
    winner = next(v for v, o in outcome.items() if o == "wrote")
    assert torch.equal(load(out)["w"], torch.full((64,), float(winner)))
    assert _listing(tmp_path) == ["m.safetensors"]


def test_failed_commit_rolls_back_earlier_outputs(tmp_path, rename_impl, monkeypatch):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c"
    a.write_text("old a")
    real, calls = atomic._move_new, []

    def fail_third(tmp, dest):
        calls.append(dest)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error")
        real(tmp, dest)

    monkeypatch.setattr(atomic, "_move_new", fail_third)
    with pytest.raises(OutputWriteError, match=r"output '.*c': cannot move it into place \(input/"), \
            AtomicFiles(force=True) as files:
        Path(files.add(a)).write_text("new a")   # replaces: swapped back on failure
        Path(files.add(b)).write_text("new b")   # created: removed on failure
        Path(files.add_dir(c)).joinpath("x").write_text("x")
    assert _listing(tmp_path) == ["a.txt"] and a.read_text() == "old a"


def test_long_output_names_work(tmp_path):
    """The temporary's name stays short: any legal output name can be written."""
    out = tmp_path / ("w" * 240 + ".safetensors")
    check_writable(out)
    save({"w": torch.ones(2)}, out)
    assert _listing(tmp_path) == [out.name]
    with AtomicFiles() as files:
        Path(files.add_dir(tmp_path / ("d" * 255))).joinpath("x").write_text("x")
    with pytest.raises(CheckpointError, match=r"^out 'w{300}.pt': the file name is longer than"):
        check_writable("w" * 300 + ".pt", "out")


def test_unwritable_directory_is_found_before_work_and_names_the_output(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".x.tmp"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputWriteError) as err:
        check_writable(tmp_path / "m.pt", "--out")
    msg = str(err.value)
    assert msg.startswith(f"--out '{tmp_path / 'm.pt'}': cannot write in") and ".tmp" not in msg
    assert msg.endswith("(permission denied)") and isinstance(err.value, OSError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputWriteError, match="cannot write in"):
            check_writable(ro / "m.pt")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_disk_full_is_one_line_naming_the_output(tmp_path, monkeypatch, ext):
    import safetensors.torch

    out = tmp_path / f"m{ext}"
    out.write_text("old")
    if ext == ".safetensors":
        def full(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 10)
            raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, "
                                              "kind: StorageFull, message: \"No space left on device\" })")
        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:
        def full(obj, f):
            Path(f).write_bytes(b"\0" * 10)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                               "frames")
        monkeypatch.setattr(torch, "save", full)
        monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: SimpleNamespace(free=5))
    with pytest.raises(OutputWriteError) as err:
        save({"w": torch.ones(1000, 300)}, out)
    assert str(err.value) == f"output '{out}': no space left on device (writing 0.0012 GB)"
    assert _listing(tmp_path) == [out.name] and out.read_text() == "old"


def test_stale_temporaries_of_dead_runs_are_removed_on_success(tmp_path):
    out = tmp_path / "m.pt"
    stem = atomic._stem(out)
    dead, live = _dead_pid(), os.getppid()
    leftovers = [f"{stem}{dead}.abc123.tmp", f"{stem}{dead}.abc124.old"]
    for name in leftovers:
        (tmp_path / name).write_text("partial")
    (tmp_path / f"{stem}{dead}.dir.tmp").mkdir()
    (tmp_path / f"{stem}{live}.xyz.tmp").write_text("a live run's")
    (tmp_path / f".other.pt.{dead}.tmp").write_text("not ours")
    save({"w": torch.ones(2)}, out)
    assert _listing(tmp_path) == sorted([f".other.pt.{dead}.tmp", f"{stem}{live}.xyz.tmp", "m.pt"])


def test_torch_file_named_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=r"looks like a PyTorch file .*; rename it to \.pt$"):
        load(path)
    path = tmp_path / "m.pt"
    save({"w": torch.ones(2)}, tmp_path / "s.safetensors")
    os.rename(tmp_path / "s.safetensors", path)
    with pytest.raises(CheckpointError, match="looks like a safetensors file"):
        load(path)


class _Code:
    def __reduce__(self):
        return (os.system, ("true",))


def test_pt_with_code_keeps_the_informative_line(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Code()}, path)
    with pytest.raises(CheckpointError) as err:
        load(path)
    msg = str(err.value)
    assert "posix.system" in msg and "weights_only" not in msg and "\n" not in msg


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_and_meta_tensors_are_named(tmp_path, kind):
    path = tmp_path / "m.pt"
    bad = torch.ones(4, 4).to_sparse() if kind == "sparse" else torch.ones(4, 4, device="meta")
    torch.save({"ok": torch.ones(2), "layer.weight": bad}, path)
    with pytest.raises(CheckpointError, match=f"tensor 'layer.weight' is .*{kind}"):
        load(path)


def test_a_failed_pt_write_names_its_cause_not_torch_internals(tmp_path):
    """torch.save's ``inline_container.cc ... unexpected pos`` hid why a .pt write failed."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # writes past 4 KiB fail (EFBIG)
    try:
        with pytest.raises(OutputWriteError) as info:
            save({"w": torch.zeros(64, 64)}, tmp_path / "o.pt")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(info.value) == f"output {str(tmp_path / 'o.pt')!r}: file too large"
    assert _listing(tmp_path) == []
    full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 896 vs 790")
    full.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert str(atomic.error_writing("o.pt", full)) == "output 'o.pt': no space left on device"
