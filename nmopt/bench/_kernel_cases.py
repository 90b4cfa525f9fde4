"""What ``nmopt bench kernels`` measures: the timed cases, the ratio table and the probes.

Two tables drive the benchmark, and a new measurement is one entry in them:

- :data:`CASES`, the timed calls. Each builds, from one matrix and pattern (:class:`Context`),
  a call to time, or raises :class:`Skip` with the reason it cannot run here. All cases of one
  matrix and pattern are timed in interleaved rounds (:func:`nmopt.bench._timing.interleaved`).
- :data:`RATIOS`, the ratios of issue 13: a numerator case over a denominator case at one of
  the sizes, with the issue's target.

Imports stay light: torch and ortools are reached only when a case runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from nmopt import backends, solvers
from nmopt._tiles import TileGrid
from nmopt.api import find_mask
from nmopt.bench._timing import Timing, interleaved
from nmopt.certificates import tile_bounds
from nmopt.patterns import Pattern


class Skip(Exception):
    """A case that cannot run here; the message says why."""


@dataclass(frozen=True)
class Target:
    """An issue's target for a ratio: ``ratio <op> value``."""

    op: str  # "<=" or ">="
    value: float
    source: str

    def met(self, ratio: float) -> bool:
        return ratio <= self.value if self.op == "<=" else ratio >= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}x"


@dataclass(frozen=True)
class Ratio:
    """``numerator`` seconds / ``denominator`` seconds (best of the runs) at ``size``."""

    key: str
    label: str
    numerator: str
    denominator: str
    target: Target | None
    size: str = "size"  # the command-line size it is measured at: size or mcf_size


#: The ratios of issue 13 (exact masks at greedy speed), in the order the issue lists them.
RATIOS = (
    Ratio("exact/greedy", "C exact kernel alone / C greedy kernel alone", "exact_kernel",
          "greedy_kernel", Target("<=", 1.5, "issue 13, deliverable 3")),
    Ratio("find_mask/exact", "`find_mask` (auto) / exact kernel alone", "find_mask",
          "exact_kernel", None),
    Ratio("find_mask/greedy", "`find_mask` end to end / C greedy kernel alone", "find_mask",
          "greedy_kernel", Target("<=", 2.0, "issue 13, deliverable 1")),
    Ratio("mcf/find_mask", "OR-Tools mcf / `find_mask` end to end", "mcf", "find_mask",
          Target(">=", 50.0, "issue 13, deliverable 2"), size="mcf_size"),
    Ratio("torch/numpy", "torch CPU tensor / numpy array input, transposable",
          "find_mask_torch", "find_mask", Target("<=", 1.25, "issue 13, deliverable 5")),
    Ratio("torch/numpy row-wise", "torch CPU tensor / numpy array input, row-wise",
          "rowwise_torch", "rowwise_numpy", Target("<=", 1.25, "issue 13, deliverable 5")),
    Ratio("warm/cold", "`find_mask(W', p, warm_start=prev)` / cold `find_mask(W', p)`, "
          "W' = W + 1e-3 noise", "warm", "cold", Target("<=", 0.35, "issue 13, deliverable 6")),
)

#: Not a timing: measured by :func:`peak_memory` in a subprocess.
MEMORY = Ratio("memory/input", "peak memory of `find_mask` / input bytes", "", "",
               Target("<=", 3.0, "issue 13, deliverable 4"), size="memory_size")


class Context:
    """One matrix and pattern; what the cases share, built on first use."""

    def __init__(self, w: np.ndarray, p: Pattern, extra: bool):
        self.w, self.p, self.extra = w, p, extra

    @cached_property
    def cffi(self):
        reason = backends.status().get("cffi", "not registered")
        if reason is not None:
            raise Skip(f"the C backend is unavailable: {reason}")
        return backends.get("cffi")

    @cached_property
    def tiles(self) -> np.ndarray:
        """|W| as float64 tiles: the input of the kernels alone (tiling is not timed)."""
        return TileGrid(*self.w.shape, self.p.m).to_tiles(np.abs(self.w.astype(np.float64)))

    @cached_property
    def torch_w(self):
        try:
            import torch
        except ImportError:
            raise Skip("torch is not installed") from None
        return torch.from_numpy(self.w)

    @cached_property
    def perturbed(self) -> tuple[np.ndarray, Any]:
        """(W', the result on W) for a re-solve after a small change, as in training."""
        noise = np.random.default_rng(1).standard_normal(self.w.shape).astype(self.w.dtype)
        return self.w + 1e-3 * noise, find_mask(self.w, self.p)


def _slow(ctx: Context) -> None:
    if ctx.p.m > 32:
        raise Skip("slow reference: not run beyond M = 32")


def _main_only(ctx: Context) -> None:
    if ctx.extra:
        raise Skip("kernel-table pattern: not part of the ratios")


def _mcf(ctx: Context) -> Callable[[], Any]:
    _slow(ctx)
    reason = solvers.status().get("mcf", "not registered")
    if reason is not None:
        raise Skip(f"OR-Tools min-cost flow is unavailable: {reason}")
    mcf, numpy_be = solvers.get("mcf"), backends.get("numpy")
    return lambda: mcf.solve(ctx.tiles, ctx.p.n, saturate=False, backend=numpy_be)


def _numpy_greedy(ctx: Context) -> Callable[[], Any]:
    _slow(ctx)
    numpy_be = backends.get("numpy")
    return lambda: numpy_be.greedy(ctx.tiles, ctx.p.n)


def _torch_case(transposable: bool) -> Callable[[Context], Callable[[], Any]]:
    def build(ctx: Context) -> Callable[[], Any]:
        _main_only(ctx)
        wt = ctx.torch_w
        return lambda: find_mask(wt, ctx.p, transposable=transposable)
    return build


def _rowwise_numpy(ctx: Context) -> Callable[[], Any]:
    _main_only(ctx)
    return lambda: find_mask(ctx.w, ctx.p, transposable=False)


def _cold(ctx: Context) -> Callable[[], Any]:
    _main_only(ctx)
    w2, _ = ctx.perturbed
    return lambda: find_mask(w2, ctx.p)


def _warm(ctx: Context) -> Callable[[], Any]:
    _main_only(ctx)
    w2, prev = ctx.perturbed
    return lambda: find_mask(w2, ctx.p, warm_start=prev)


@dataclass(frozen=True)
class Case:
    """A timed call: ``build(ctx)`` returns it (or raises Skip); ``sizes`` are the command-line
    sizes it runs at; ``once``: a slow reference timed in the first round only."""

    name: str
    label: str
    build: Callable[[Context], Callable[[], Any]]
    sizes: tuple[str, ...] = ("size",)
    once: bool = False


#: The timed calls, each at the sizes it serves.
CASES = (
    Case("exact_kernel", "C exact kernel (mask + prices + self-check)",
         lambda c: lambda: c.cffi.exact(c.tiles, c.p.n), ("size", "mcf_size")),
    Case("greedy_kernel", "C greedy kernel", lambda c: lambda: c.cffi.greedy(c.tiles, c.p.n)),
    Case("greedy_numpy", "numpy greedy kernel", _numpy_greedy, once=True),
    Case("find_mask", "find_mask(W, p), solver auto", lambda c: lambda: find_mask(c.w, c.p),
         ("size", "mcf_size")),
    Case("find_mask_greedy", "find_mask(W, p, solver='greedy')",
         lambda c: lambda: find_mask(c.w, c.p, solver="greedy"), once=True),
    Case("find_mask_torch", "find_mask on a torch CPU tensor", _torch_case(True)),
    Case("rowwise_numpy", "find_mask(W, p, transposable=False)", _rowwise_numpy),
    Case("rowwise_torch", "same on a torch CPU tensor", _torch_case(False)),
    Case("mcf", "OR-Tools min-cost flow solver on the tiles (mask + prices)", _mcf,
         ("mcf_size",)),
    Case("cold", "find_mask(W', p)", _cold),
    Case("warm", "find_mask(W', p, warm_start=find_mask(W, p))", _warm),
)


def _kept(tiles: np.ndarray, mask: np.ndarray) -> float:
    return float(np.where(mask, tiles, 0.0).sum())


def _checks(ctx: Context, t: dict[str, Timing]) -> dict[str, Any]:
    """What the results say beyond their time: gaps, losses, agreement, who served."""
    out: dict[str, Any] = {}
    if "exact_kernel" in t:
        mask, u, v, status = t["exact_kernel"].result
        kept = _kept(ctx.tiles, mask)
        bound = float(tile_bounds(ctx.tiles, ctx.p.n, u, v).sum())
        out.update(exact_gap=(bound - kept) / bound if bound else 0.0,
                   exact_fallback_tiles=int(np.count_nonzero(status == 1)),
                   exact_unverified_tiles=int(np.count_nonzero(status == 2)))
        if "greedy_kernel" in t:
            out["greedy_loss"] = (kept - _kept(ctx.tiles, t["greedy_kernel"].result)) / kept if kept else 0.0
        if "mcf" in t:
            ref = _kept(ctx.tiles, t["mcf"].result[0])
            out["exact_vs_mcf_objective"] = (kept - ref) / ref if ref else 0.0
    if "greedy_numpy" in t and "greedy_kernel" in t:
        out["greedy_numpy_same"] = bool(np.array_equal(t["greedy_numpy"].result,
                                                       t["greedy_kernel"].result))
    for name in ("find_mask", "find_mask_greedy", "find_mask_torch", "rowwise_numpy", "rowwise_torch",
                 "cold", "warm"):
        if name in t:
            res = t[name].result
            out[f"{name}_by"] = f"{res.solver} on {res.backend}"
            out[f"{name}_gap"] = res.gap
    if "cold" in t and "warm" in t:
        out["warm_same_objective"] = abs(t["warm"].result.objective - t["cold"].result.objective) <= \
            1e-9 * max(1.0, abs(t["cold"].result.objective))
    return out


def measure(w: np.ndarray, p: Pattern, size_keys: set[str], repeat: int, extra: bool,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Time every case that runs at one of ``size_keys`` on ``w`` with ``p``; one record."""
    ctx = Context(w, p, extra)
    fns: dict[str, Callable[[], Any]] = {}
    skipped: dict[str, str] = {}
    for case in CASES:
        if size_keys.isdisjoint(case.sizes):
            continue
        try:
            fns[case.name] = case.build(ctx)
        except Skip as exc:
            skipped[case.name] = str(exc)
    once = {c.name for c in CASES if c.once}
    timings = interleaved(fns, repeat, once=once)
    log(f"  {p} at {w.shape[0]}x{w.shape[1]}: " + ", ".join(f"{k} {t.best:.3f}s"
                                                               for k, t in timings.items()))
    return {"pattern": str(p), "size": w.shape[0], "extra": extra,
            "tiles": TileGrid(*w.shape, p.m).num_tiles,
            "timings": {k: t.record() for k, t in timings.items()}, "skipped": skipped,
            "checks": _checks(ctx, timings)}


def ratio_rows(records: list[dict], patterns: list[str], sizes: dict[str, int]) -> list[dict]:
    """One row per ratio of :data:`RATIOS` and pattern, from the measured records."""
    rows = []
    for r in RATIOS:
        for pat in patterns:
            rec = next(x for x in records if x["pattern"] == pat and x["size"] == sizes[r.size])
            row = {"ratio": r.key, "label": r.label, "pattern": pat, "size": sizes[r.size],
                   "numerator": r.numerator, "denominator": r.denominator,
                   "target": None if r.target is None else str(r.target),
                   "source": None if r.target is None else r.target.source,
                   "value": None, "met": None, "skipped": None}
            why = [rec["skipped"][k] for k in (r.numerator, r.denominator) if k in rec["skipped"]]
            if why:
                row["skipped"] = "; ".join(dict.fromkeys(why))
            else:
                num, den = (rec["timings"][k]["best"] for k in (r.numerator, r.denominator))
                row.update(numerator_s=num, denominator_s=den, value=num / den)
                row["met"] = None if r.target is None else r.target.met(row["value"])
            rows.append(row)
    return rows


_MEMORY_CHILD = r"""
import json, resource, sys
import numpy as np
import nmopt

size, pattern = int(sys.argv[1]), sys.argv[2]
nmopt.find_mask(np.ones((64, 64), np.float32), pattern)  # load the kernels before measuring
w = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)

def status(key):
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith(key + ":"))

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before, method = status("VmRSS"), "rss"
except OSError:
    before, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "maxrss"
res = nmopt.find_mask(w, pattern)
peak = status("VmHWM") if method == "rss" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"input_bytes": w.nbytes, "before_bytes": before, "peak_bytes": peak,
                  "method": method, "by": f"{res.solver} on {res.backend}"}))
"""

MEMORY_METHODS = {
    "rss": "resident memory (RSS) of a fresh subprocess: its peak during the call (VmHWM, reset "
           "through /proc/self/clear_refs just before) minus its RSS before the call, which "
           "already holds the input, numpy and the loaded kernels",
    "maxrss": "growth of the subprocess's lifetime peak RSS (ru_maxrss) during the call; a lower "
              "bound if the process had peaked higher before it",
}


def peak_memory(size: int, pattern: str, threads: int) -> dict[str, Any]:
    """Extra peak memory of ``find_mask`` on an N(0,1) float32 ``size`` x ``size`` matrix,
    measured in a fresh subprocess (see :data:`MEMORY_METHODS`), as a :data:`MEMORY` row;
    ``size`` 0 skips it."""
    row = {"ratio": MEMORY.key, "label": MEMORY.label, "pattern": pattern, "size": size or None,
           "numerator": "peak_extra_bytes", "denominator": "input_bytes",
           "target": str(MEMORY.target), "source": MEMORY.target.source, "value": None,
           "met": None, "skipped": None if size else "--memory-size 0"}
    if not size:
        return row
    env = dict(os.environ, NMOPT_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(size), pattern], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        row["skipped"] = f"the measuring subprocess failed (exit {proc.returncode}): {tail}"
        return row
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = got["peak_bytes"] - got["before_bytes"]
    row.update(input_bytes=got["input_bytes"], peak_extra_bytes=extra, by=got["by"],
               method=MEMORY_METHODS[got["method"]])
    if extra <= 0:
        row["skipped"] = (f"no growth of the peak seen ({row['method']}): the input is too small "
                          "to measure")
        return row
    row["value"] = extra / got["input_bytes"]
    row["met"] = MEMORY.target.met(row["value"])
    return row


def run_sanitizers() -> dict[str, Any]:
    """Run the sanitizer test of a checkout (current directory) and record its verdict."""
    path = Path("tests") / "test_sanitizers.py"
    if not path.exists():
        return {"skipped": f"{path} not found: run from a checkout of nmopt"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    return {"command": " ".join(["python", *cmd[1:]]), "returncode": proc.returncode,
            "summary": (proc.stdout.strip().splitlines() or [""])[-1],
            "seconds": time.perf_counter() - t0}
