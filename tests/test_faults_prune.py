"""Fault injection into ``nmopt prune``'s writes: every step fails or dies, outputs stay whole.

Each write step of a prune (stage a temporary, write it, fix its mode, move it into place,
remove the replaced output, remove stale temporaries) is counted; a run fails at the k-th step,
for every k, either by an ``OSError`` (the process goes on: every output must be all old or all
new and no temporary left) or by ``os._exit`` in a forked child (a kill: each output must be
old or new, never partial). A rerun must then succeed and leave no temporary behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

import nmopt._atomic as atomic
import nmopt.checkpoint as ckpt
from nmopt.cli import main
from nmopt.safetensors_stream import SafetensorsWriter

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

#: Where a kill can land: each step of the write path (the writer also halfway through).
STEPS = [(atomic, "_stage"), (ckpt, "_write"), (SafetensorsWriter, "write"), (SafetensorsWriter, "close"),
         (atomic, "_publish_mode"), (atomic, "_move_new"), (atomic, "_swap"), (atomic, "_remove"),
         (atomic, "remove_stale")]
#: What can fail with an OSError: the system calls of the write path, and the writers.
CALLS = [(tempfile, "mkstemp"), (tempfile, "mkdtemp"), (os, "chmod"), (os, "rename"),
         (atomic, "_renameat2"), (ckpt, "_write"), (SafetensorsWriter, "write")]
#: The outputs of each kind of prune: a .pt file (loaded whole), a .safetensors file and a model
#: directory (both streamed).
KINDS = {"pt": ("in.safetensors", "out.pt"), "safetensors": ("in.safetensors", "out.safetensors"),
         "dir": ("in", "out")}


class Faults:
    """Counts the write steps; at step ``at`` calls ``fail(where)`` (raise, or die)."""

    def __init__(self, monkeypatch, at: int, fail, sites) -> None:
        self.at, self.fail, self.step, self.where = at, fail, 0, None
        for module, name in sites:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), name))

    def _tick(self, where: str, torn: Path | None = None) -> None:
        self.step += 1
        if self.step == self.at:
            self.where = where
            if torn is not None:  # die with a half-written temporary
                torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
            self.fail(where)

    def _wrap(self, real, name):
        def step(*args, **kwargs):
            self._tick(f"before {name}")
            out = real(*args, **kwargs)
            if name == "_write":
                self._tick(f"during {name}", torn=Path(args[1]))
            if name == "_write":  # the writer may fail after writing (a system call, or a kill,
                self._tick(f"after {name}")  # before the next step is the same as after this one)
            return out
        return step


def _raise(where: str):
    raise OSError(errno.EIO, f"injected {where}")


def _die(where: str):
    os._exit(137)


def _input(d: Path, kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(16, 16, generator=g), "b.weight": torch.randn(8, 16, generator=g),
               "b.bias": torch.randn(8, generator=g)}
    if kind != "dir":
        ckpt.save(tensors, d / "in.safetensors")
        return
    (d / "in").mkdir()
    shards = {"a.weight": "model-1.safetensors", "b.weight": "model-2.safetensors", "b.bias": "model-2.safetensors"}
    for shard in set(shards.values()):
        ckpt.save({k: v for k, v in tensors.items() if shards[k] == shard}, d / "in" / shard)
    (d / "in" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    (d / "in" / "config.json").write_text("{}")


def _outs(kind: str) -> tuple[str, str, str]:
    return KINDS[kind][1], "masks.safetensors", "report.json"


def _prune(d: Path, pattern: str, kind: str, force: bool = True) -> int:
    src, out = KINDS[kind]
    return main(["prune", str(d / src), "--pattern", pattern, "--no-progress", "--out", str(d / out),
                 "--masks", str(d / "masks.safetensors"), "--report", str(d / "report.json")]
                + (["--force"] if force else []))


def _snapshot(path: Path):
    """The output's content: bytes; a .pt file's tensors (its zip names the file it was written
    as, a temporary); a directory's files."""
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    if path.suffix == ".pt" and path.exists():
        return {k: v.numpy().tobytes() for k, v in ckpt.load(path).items()}
    return path.read_bytes() if path.exists() else None


def _state(d: Path, kind: str) -> dict:
    return {name: _snapshot(d / name) for name in _outs(kind)}


def _which(d: Path, kind: str, old: dict, new: dict) -> list[str]:
    """Per output: "old", "new" or "absent" (when old was absent); fails on anything partial."""
    out = []
    for name, now in _state(d, kind).items():
        if now == old[name]:
            out.append("old" if now is not None else "absent")
        elif name == "report.json":  # timings differ between runs: compare the layers
            strip = [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads(now)["layers"]]
            want = [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads(new[name])["layers"]]
            assert strip == want, f"{name}: partial or foreign content"
            out.append("new")
        else:
            assert now == new[name], f"{name}: partial or foreign content"
            out.append("new")
    return out


@pytest.fixture(scope="module", params=list(KINDS))
def states(request, tmp_path_factory):
    """(kind, a directory with the input and the outputs of a 2:4 prune, old state, new state)."""
    kind = request.param
    d = tmp_path_factory.mktemp(kind)
    _input(d, kind)
    assert _prune(d, "4:8", kind) == 0
    new = _state(d, kind)
    assert _prune(d, "2:4", kind) == 0
    return kind, d, _state(d, kind), new


def _fresh(states, tmp_path: Path, k: int, with_old: bool) -> Path:
    kind, template = states[:2]
    d = tmp_path / f"k{k}"
    d.mkdir()
    for name in (KINDS[kind][0], *(_outs(kind) if with_old else ())):
        (shutil.copytree if (template / name).is_dir() else shutil.copy)(template / name, d / name)
    return d


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _temporaries(d: Path) -> list[str]:
    return [n for n in _listing(d) if n.startswith(".")]


@pytest.mark.parametrize("with_old", [True, False], ids=["replace", "new"])
def test_a_failing_write_step_leaves_all_old_or_all_new(states, tmp_path, monkeypatch, capsys, with_old):
    kind, _, old, new = states
    old = old if with_old else dict.fromkeys(_outs(kind))
    k = 0
    while True:
        k += 1
        d = _fresh(states, tmp_path, k, with_old)
        with monkeypatch.context() as m:
            faults = Faults(m, k, _raise, CALLS)
            rc = _prune(d, "4:8", kind, force=with_old)
        if faults.where is None:
            assert rc == 0 and k > 10  # past the last step: the run went through
            break
        err = capsys.readouterr().err.strip().splitlines()  # found up front (2) or when writing (1)
        assert rc in (1, 2) and len(err) == 1 and "injected" in err[0], (faults.where, err)
        if kind == "pt":  # the streamed writers' OSErrors do not name the output yet: see below
            assert err[0].startswith(("nmopt: error: output '", "nmopt: error: --")), err
        which = _which(d, kind, old, new)
        assert which in (["old"] * 3, ["absent"] * 3, ["new"] * 3), (faults.where, which)
        assert _temporaries(d) == [], (faults.where, _listing(d))
        assert _prune(d, "4:8", kind) == 0 and _which(d, kind, old, new) == ["new"] * 3


def _in_child(fn) -> int:
    """Run ``fn`` in a forked child; its exit status (137: killed by the fault)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the child hung")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_kill_at_any_write_step_leaves_each_output_whole(states, tmp_path, monkeypatch):
    """The output is replaced, the masks and report are new: both kinds of move are killed."""
    kind, template, old, new = states
    old = dict(dict.fromkeys(_outs(kind)), **{_outs(kind)[0]: old[_outs(kind)[0]]})
    with_old = True
    k = 0
    while True:
        k += 1
        d = _fresh(states, tmp_path, k, with_old=False)
        out = _outs(kind)[0]
        (shutil.copytree if (template / out).is_dir() else shutil.copy)(template / out, d / out)
        with monkeypatch.context() as m:
            Faults(m, k, _die, STEPS)
            rc = _in_child(lambda d=d: _prune(d, "4:8", kind, force=with_old))
        if rc == 0:
            assert k > 10
            break
        assert rc == 137, rc
        which = _which(d, kind, old, new)  # each output old or new (a kill between moves: some of each)
        assert set(which) <= {"old", "new", "absent"}
        assert _prune(d, "4:8", kind) == 0 and _which(d, kind, old, new) == ["new"] * 3
        assert _listing(d) == sorted([KINDS[kind][0], *_outs(kind)]), (k, _listing(d))


def _write_model_dir(out: Path, value: float, force: bool) -> int:
    """A stand-in for a model-directory prune: shards and an index staged with ``add_dir``."""
    with atomic.AtomicFiles(force=force) as files:
        root = Path(files.add_dir(out))
        for i in range(2):
            ckpt.save({f"w{i}": torch.full((4, 4), value)}, root / f"model-{i}.safetensors")
        (root / "model.safetensors.index.json").write_text(json.dumps({"value": value}))
    return 0


def _dir_state(out: Path):
    if not out.exists():
        return None
    files = _listing(out)
    assert files == ["model-0.safetensors", "model-1.safetensors", "model.safetensors.index.json"], files
    values = {float(ckpt.load(out / f)[f"w{i}"][0, 0]) for i, f in enumerate(files[:2])}
    values.add(json.loads((out / files[2]).read_text())["value"])
    assert len(values) == 1, "a mix of two runs"
    return values.pop()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_staged_directory_is_all_old_or_all_new(tmp_path, monkeypatch, mode):
    k = 0
    while True:
        k += 1
        out = tmp_path / f"k{k}" / "model"
        out.parent.mkdir()
        _write_model_dir(out, 1.0, force=False)
        with monkeypatch.context() as m:
            if mode == "kill":
                Faults(m, k, _die, STEPS)
                rc = _in_child(lambda out=out: _write_model_dir(out, 2.0, force=True))
                hit = rc != 0
            else:
                faults = Faults(m, k, _raise, CALLS)
                try:
                    _write_model_dir(out, 2.0, force=True)
                except OSError as exc:
                    assert "injected" in str(exc)
                hit = faults.where is not None
        if not hit:
            assert k > 5
            break
        assert _dir_state(out) in (1.0, 2.0)
        if mode == "raise":
            assert _dir_state(out) == 1.0 and _listing(out.parent) == ["model"]
        assert _write_model_dir(out, 3.0, force=True) == 0 and _dir_state(out) == 3.0
        assert _listing(out.parent) == ["model"], (k, _listing(out.parent))


# -- the command line: no clobbering race, output problems found before any work --------------

def _no_solving(monkeypatch):
    import nmopt.cli
    import nmopt.prune

    def solve(*args, **kwargs):
        raise AssertionError("pruned before checking the outputs")

    for module, name in ((nmopt.prune, "prune_state_dict"), (nmopt.prune, "prune_file"),
                         (nmopt.cli, "prune_path"), (nmopt.cli, "prune_file")):
        monkeypatch.setattr(module, name, solve, raising=False)


def test_a_prune_finishing_first_is_not_overwritten(states, tmp_path, monkeypatch, capsys):
    kind = states[0]
    d = _fresh(states, tmp_path, 0, with_old=False)
    out = d / KINDS[kind][1]
    real = atomic._publish_mode

    def other_run_finishes_meanwhile(tmp):  # between the up-front check and the move
        if not out.exists():
            out.mkdir() if kind == "dir" else out.write_bytes(b"the other run's")
        real(tmp)

    monkeypatch.setattr(atomic, "_publish_mode", other_run_finishes_meanwhile)
    assert _prune(d, "4:8", kind, force=False) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"nmopt: error: output '{out}' exists; pass --force to overwrite it"]
    assert (_snapshot(out) == {}) if kind == "dir" else (out.read_bytes() == b"the other run's")
    assert _listing(d) == sorted([KINDS[kind][0], out.name])  # masks and report rolled back


@pytest.mark.parametrize("flag", ["--out", "--masks", "--report"])
def test_unwritable_outputs_are_found_before_work(states, tmp_path, monkeypatch, capsys, flag):
    kind = states[0]
    d = _fresh(states, tmp_path, 0, with_old=False)
    target = d / dict(zip(("--out", "--masks", "--report"), _outs(kind)))[flag]
    real = tempfile.mkstemp

    def read_only(*args, prefix="", **kwargs):
        if prefix.startswith(f".{target.name}."):
            raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))
        return real(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    _no_solving(monkeypatch)
    assert _prune(d, "4:8", kind) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"nmopt: error: {flag} '{target}': cannot write in '{d}' (read-only file system)"
    assert _listing(d) == [KINDS[kind][0]]


def test_output_names_too_long_are_found_before_work_and_long_legal_ones_work(tmp_path, monkeypatch,
                                                                             capsys):
    d = tmp_path
    _input(d, "pt")
    legal = d / ("o" * 240 + ".safetensors")  # 252 bytes: legal, but not with a long temporary suffix
    assert main(["prune", str(d / "in.safetensors"), "--pattern", "4:8", "--out", str(legal),
                 "--no-progress"]) == 0
    assert _listing(d) == sorted(["in.safetensors", legal.name])
    capsys.readouterr()
    _no_solving(monkeypatch)
    long = d / ("o" * 300 + ".pt")
    assert main(["prune", str(d / "in.safetensors"), "--pattern", "4:8", "--out", str(long)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nmopt: error: --out '{long}': the file name is longer than")


def test_model_outputs_are_checked_before_loading(tmp_path, monkeypatch):
    from nmopt.posttrain.prune_cli import check_outputs

    (tmp_path / "model").mkdir()
    out = tmp_path / "pruned"
    real = tempfile.mkdtemp

    def refuse(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(ValueError, match=f"^--out '{out}': cannot write in '{tmp_path}' \\(permission denied\\)$"):
        check_outputs(tmp_path / "model", out)
    monkeypatch.setattr(tempfile, "mkstemp", real)
    with pytest.raises(ValueError, match="the file name is longer than"):
        check_outputs(tmp_path / "model", tmp_path / ("d" * 300))


def test_float8_weights_are_copied_with_the_reason():
    from nmopt.prune import select_layers

    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    _, copied = select_layers({"w": torch.zeros(8, 8, dtype=torch.float8_e4m3fn)})
    assert copied == {"w": "dtype float8_e4m3fn (float8 pruning is not supported)"}


def test_a_streamed_write_failure_names_the_output(tmp_path, monkeypatch, capsys):
    _input(tmp_path, "safetensors")
    import nmopt.safetensors_stream as stream

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream.os, "pwrite", full)
    assert _prune(tmp_path, "4:8", "safetensors") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nmopt: error: output '{tmp_path / 'out.safetensors'}': no space left"), err
    assert "\n" not in err and not list(tmp_path.glob(".*.tmp"))
