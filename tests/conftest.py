"""Shared fixtures: the real-weights file and the available backends."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# CI (CI=true) explores a fixed set of examples so a run is reproducible; locally hypothesis
# keeps searching new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# tests/oracles.py holds the independent oracles; pytest runs with --import-mode=importlib, so
# tests/ is not on sys.path: register it once here, test modules `import nmopt_test_oracles`.
if "nmopt_test_oracles" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("nmopt_test_oracles",
                                                   Path(__file__).with_name("oracles.py"))
    sys.modules["nmopt_test_oracles"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["nmopt_test_oracles"])

REAL_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "minilm-l6-layer0.safetensors"


@pytest.fixture(scope="session")
def real_weights():
    """The six MiniLM layer-0 matrices as float32 numpy arrays (skips when ../shared is absent)."""
    if not REAL_WEIGHTS.exists():
        pytest.skip(f"real weights not found at {REAL_WEIGHTS} (a user's clone has no ../shared)")
    from safetensors.numpy import load_file

    return load_file(str(REAL_WEIGHTS))


@pytest.fixture(scope="module")
def cffi():
    """The C backend (skips with the reason when the extension is not built)."""
    from nmopt import backends

    reason = backends.status().get("cffi")
    if reason is not None:
        pytest.skip(reason)
    return backends.get("cffi")


@pytest.fixture(scope="module")
def one_torch_thread():
    """`make test` runs two pytest workers on two cores: one torch thread each avoids
    oversubscription (OpenMP spin-waits make small ops many times slower)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Appended to every worker: the ranks meet, tear the process group down and leave without the
# interpreter's and C++'s exit-time destructors. gloo's teardown at exit aborted a rank once in
# CI ("terminate called without an active exception", SIGABRT) after it had written its results.
_DONE = "nmopt-test-worker: results written"
_WORKER_END = f"""
import os as _os, sys as _sys
import torch.distributed as _dist
print({_DONE!r}, flush=True)
_dist.barrier()
_dist.destroy_process_group()
_sys.stdout.flush()
_sys.stderr.flush()
_os._exit(0)
"""
_GLOO_EXIT_ABORT = "terminate called without an active exception"


def _finished(returncode: int, log: str) -> bool:
    """A rank succeeded, or wrote its results and then died in gloo's teardown (SIGABRT with
    nothing but the C++ runtime's message after the results were written)."""
    if returncode == 0:
        return True
    after = log.partition(_DONE)[2].strip()
    return returncode == -6 and _DONE in log and after in ("", _GLOO_EXIT_ABORT)


def _spawn_ranks(worker: str, tmp: Path, *args: str, world: int = 2, timeout: int = 120) -> list[Path]:
    """Run ``worker`` (Python source, ending once it has saved its results) as ``world``
    processes, argv ``rank world port out *args``; fail the test with a process's log if any
    fails or runs past ``timeout`` s. Returns the ``out`` paths (one per rank) the workers
    wrote."""
    import subprocess

    script = tmp / "worker.py"
    script.write_text(worker + _WORKER_END)
    port = str(_free_port())
    outs = [tmp / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), port, str(outs[r]),
                               *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{world} worker processes did not finish within {timeout} s")
    for p, log in zip(procs, logs):
        assert _finished(p.returncode, log), log
    return outs


@pytest.fixture(scope="session")
def spawn_ranks():
    """:func:`_spawn_ranks`: multi-process tests (DDP, FSDP2) on one machine."""
    return _spawn_ranks
