"""Checkpoint I/O: both formats, dtypes, clear errors, atomic writes that leave nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from nmopt.checkpoint import (
    AtomicFiles,
    CheckpointError,
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
