"""``nmopt bench gap``: solver quality -- kept score against the certified optimum, per N:M.

Every contender (see :mod:`nmopt.bench._contenders`: the registered transposable solvers and
the baselines signed-greedy, torch-tile, exactly-N and row-wise) runs on the same matrix in the
same process. The *certified optimum* is the lowest dual bound any of them proved on that
matrix; when no exact contender ran, the preferred exact solver (``solver="auto"``) runs untimed
as the reference, and when none can run the best bound available is used and the output says
so. Each row reports: kept score (share of ``sum |W|``), gap to the certified optimum
``(bound* - kept) / bound*`` (an upper bound on the true relative loss), the solver's own
certificate gap, deficit (rows + columns of full tiles keeping fewer than N), seconds (median of
``--repeat`` whole ``find_mask`` calls, certificate included, after a warm-up) and weights per
second. Row-wise N:M keeps *more* than any transposable mask, so it has no gap; its ratio to
the transposable optimum is the price of transposability.

``--time-limit`` skips a contender whose time on a matrix, extrapolated from runs on growing
blocks of tiles, exceeds the limit (the LP and networkx on large matrices), saying so.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nmopt._report import add_output_arguments, environment
from nmopt._tiles import TileGrid
from nmopt.api import find_mask
from nmopt.bench._contenders import BASELINES, Contender, contender_names, contenders, num_tiles
from nmopt.bench._gap_report import format_text, write_outputs
from nmopt.checkpoint import load
from nmopt.errors import UsageError
from nmopt.patterns import Pattern, parse_pattern
from nmopt.prune import select_layers

DISTS = ("gaussian", "laplace", "student-t")
DEFAULT_PATTERNS = ("2:4", "4:8", "8:16", "16:32")
DEFAULT_SIZES = ((256, 256), (1024, 1024))
DEFAULT_TIME_LIMIT = 5.0
#: A timing probe must run at least this long before its extrapolation is trusted.
MIN_PROBE_SECONDS = 0.2


@dataclass
class Matrix:
    """One benchmark matrix (2-D float array) with a display name and where it came from."""

    name: str
    data: np.ndarray
    source: str


def synthetic(dist: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A seeded float32 matrix: N(0,1), Laplace(0,1) or Student-t with 3 degrees of freedom."""
    if dist not in DISTS:
        raise ValueError(f"dists: unknown distribution {dist!r}; choose from {list(DISTS)}")
    rng = np.random.default_rng([seed, DISTS.index(dist), rows, cols])
    if dist == "gaussian":
        w = rng.standard_normal((rows, cols))
    elif dist == "laplace":
        w = rng.laplace(size=(rows, cols))
    else:
        w = rng.standard_t(3, size=(rows, cols))
    return w.astype(np.float32)


def synthetic_matrices(dists, sizes, seed: int = 0) -> list[Matrix]:
    """One :class:`Matrix` per distribution and size."""
    return [Matrix(f"{d} {r}x{c}", synthetic(d, r, c, seed), f"synthetic {d}, seed {seed}")
            for d in dists for r, c in sizes]


def file_matrices(path: str) -> list[Matrix]:
    """Every weight that ``nmopt prune`` would prune in a checkpoint, as 2-D float arrays."""

    tensors = load(path)
    names, _ = select_layers(tensors)
    out = []
    for name in names:
        t = tensors[name]
        arr = t if isinstance(t, np.ndarray) else t.detach().float().cpu().numpy()
        arr = arr.reshape(arr.shape[0], -1)
        out.append(Matrix(f"{Path(path).stem}:{name}", arr, str(path)))
    if not out:
        raise ValueError(f"weights: {path!r} holds no 2-D/4-D float weight to benchmark")
    return out


# -- running -------------------------------------------------------------------------------

def _block(w: np.ndarray, m: int, k: int) -> tuple[np.ndarray, int]:
    """A top-left block of about ``k`` tiles of ``w`` and its tile count."""
    grid = TileGrid(w.shape[0], w.shape[1], m)
    tr, tc = grid.tile_rows, grid.tile_cols
    b = min(tc, k)
    a = min(tr, -(-k // b))
    return w[: a * m, : b * m], a * b


def _warm_up(c: Contender, w: np.ndarray, p: Pattern, limit: float | None) -> str | None:
    """Warm the contender up on a small block, then, with a limit, extrapolate its time.

    The first run on a 16-tile block pays one-time costs (imports, pattern tables) outside the
    timed runs. With ``limit``, blocks of 16, 128, 1024, ... tiles follow while the matrix has
    at least 4x as many tiles, and the per-tile rate of the last block is extrapolated. Probing
    stops early once a block ran ``MIN_PROBE_SECONDS`` and extrapolates under the limit, or when
    the next block (about 8x longer) would take the probes past a quarter of the limit. Costs
    need not be linear in the tile count (LP chunks, fixed per-call overheads), so an estimate
    is approximate; the skip reason states what was measured. Returns the reason, or None.
    """
    total = num_tiles(w, p.m)
    block, _ = _block(w, p.m, 16)
    c.run(block, p)
    if not limit:
        return None
    k, spent, estimate, measured = 16, 0.0, 0.0, None
    while k * 4 <= total:
        block, tiles = _block(w, p.m, k)
        seconds = c.run(block, p).seconds
        spent += seconds
        measured, estimate = (seconds, tiles), seconds * total / tiles
        if estimate <= limit and seconds >= MIN_PROBE_SECONDS:
            break
        if estimate > limit and spent + 8 * seconds > limit / 4:
            break
        k *= 8
    if measured is not None and estimate > limit:
        seconds, tiles = measured
        return (f"estimated {estimate:.3g} s on this matrix ({seconds:.2f} s on {tiles} of "
                f"{total} tiles) > --time-limit {limit:g} s")
    return None


def _row(matrix: Matrix, p: Pattern, c: Contender, **values) -> dict[str, Any]:
    rows, cols = matrix.data.shape
    row = {"matrix": matrix.name, "rows": rows, "cols": cols, "weights": rows * cols,
           "pattern": str(p), "solver": c.name, "kind": c.kind, "problem": c.problem,
           "status": "ok", "reason": None, "objective": None, "kept_fraction": None,
           "bound": None, "gap": None, "own_gap": None, "vs_optimum": None, "deficit": None,
           "seconds": None, "weights_per_s": None, "times": None, "optimal": None,
           "backend": None}
    row.update(values)
    return row


def bench_matrix(matrix: Matrix, p: Pattern, entries: list[Contender], repeat: int = 1,
                 time_limit: float | None = DEFAULT_TIME_LIMIT) -> tuple[list[dict], dict]:
    """Run every contender on one matrix and pattern; return the rows and the reference."""

    w = matrix.data
    total_score = float(np.abs(w, dtype=np.float64).sum())
    rows = []
    for c in entries:
        reason = c.refuses(w, p) or _warm_up(c, w, p, time_limit)
        if reason is not None:
            rows.append(_row(matrix, p, c, status="skipped", reason=reason))
            continue
        results = [c.run(w, p) for _ in range(max(1, repeat))]
        res = results[-1]
        times = [r.seconds for r in results]
        seconds = statistics.median(times)
        rows.append(_row(matrix, p, c, objective=res.objective, bound=res.bound,
                         kept_fraction=res.objective / total_score if total_score else 1.0,
                         own_gap=res.gap, deficit=res.deficit, seconds=seconds,
                         weights_per_s=w.size / seconds if seconds > 0 else None, times=times,
                         optimal=res.optimal, backend=res.backend, solver_used=res.solver))
    proved = [r for r in rows if r["status"] == "ok" and r["problem"] == "transposable"]
    exact = [r["solver"] for r in proved if r["kind"] == "exact" and r["optimal"]]
    reference, note = None, None
    if not exact:  # no contender certified an optimum: run the preferred exact solver untimed
        try:
            reference = find_mask(w, p)
        except RuntimeError as exc:
            note = (f"no exact solver could run ({exc}); gaps are against the best bound "
                    "available")
    bounds = [(r["bound"], r["solver"]) for r in proved]
    objectives = [r["objective"] for r in proved]
    if reference is not None:
        bounds.append((reference.bound, reference.solver))
        objectives.append(reference.objective)
    ref = {"matrix": matrix.name, "pattern": str(p), "exact": bool(exact) or bool(getattr(reference, "optimal", False)),
           "reference_solver": exact[0] if exact else getattr(reference, "solver", None),
           "bound": None, "bound_from": None, "best_objective": None, "note": note}
    if bounds:
        bound, source = min(bounds)
        best = max(objectives)
        ref.update(bound=bound, bound_from=source, best_objective=best)
        for r in rows:
            if r["status"] != "ok":
                continue
            r["vs_optimum"] = r["objective"] / best if best > 0 else 1.0
            if r["problem"] != "row-wise":
                r["gap"] = (bound - r["objective"]) / bound if bound > 0 else 0.0
    return rows, ref


def run_gap(matrices: list[Matrix], patterns, solvers: list[str] | None = None, repeat: int = 1,
            time_limit: float | None = DEFAULT_TIME_LIMIT, progress: bool | None = None,
            ) -> dict[str, Any]:
    """Run the benchmark; return a JSON-ready dict (config, environment, rows, references).

    Parameters
    ----------
    matrices : list of :class:`Matrix`
    patterns : iterable of "N:M"
    solvers : contender names (see :func:`contender_names`), or None for all
    repeat : timed runs per contender (the median is reported)
    time_limit : skip a contender whose estimated time on a matrix exceeds this (None: never)
    progress : progress bar on stderr (None: only on a terminal)
    """
    from tqdm.auto import tqdm

    pats = [parse_pattern(p) for p in patterns]
    entries = contenders(solvers)
    start = time.perf_counter()
    rows: list[dict] = []
    refs: list[dict] = []
    jobs = [(mat, p) for mat in matrices for p in pats]
    with tqdm(jobs, desc="bench gap", unit="job", disable=None if progress is None
              else not progress, leave=False) as bar:
        for mat, p in bar:
            bar.set_postfix_str(f"{mat.name} {p}", refresh=False)
            r, ref = bench_matrix(mat, p, entries, repeat, time_limit)
            rows += r
            refs.append(ref)
    return {
        "benchmark": "gap",
        "config": {"patterns": [str(p) for p in pats], "solvers": [c.name for c in entries],
                   "repeat": repeat, "time_limit": time_limit,
                   "matrices": [{"name": m.name, "shape": list(m.data.shape),
                                 "source": m.source} for m in matrices]},
        "environment": environment(),
        "seconds_total": time.perf_counter() - start,
        "references": refs,
        "rows": rows,
    }


# -- command line --------------------------------------------------------------------------

def _csv(convert: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [convert(t) for t in items]
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def parse_size(text: str) -> tuple[int, int]:
    """``"1024"`` -> (1024, 1024); ``"512x2048"`` -> (512, 2048)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"size {text!r}: expected a positive integer or ROWSxCOLS, e.g. 1024 or "
                         "512x2048")
    return (int(parts[0]), int(parts[-1]))


def _dist(text: str) -> str:
    if text not in DISTS:
        raise ValueError(f"unknown distribution {text!r}; choose from {', '.join(DISTS)}")
    return text


def _flat(lists) -> list | None:
    return None if lists is None else [x for chunk in lists for x in chunk]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``nmopt bench gap``."""
    p = subparsers.add_parser(
        "gap", help="solver quality: gap to the certified optimum, per N:M and solver",
        description="Solver quality: kept score against the certified optimum (an exact solver's "
        "dual bound), deficit, seconds and weights/s per matrix, N:M and solver. Runs every "
        "registered solver and the baselines signed-greedy (PyTorch's default tile algorithm), "
        "torch-tile (PyTorch's CPU reference, 2:4), exactly-N (saturate=True) and row-wise (the "
        "price of transposability) on the same matrices in one process.")
    p.add_argument("--patterns", type=_csv(lambda t: str(parse_pattern(t))), action="append",
                   metavar="N:M,...", help="patterns (default: 2:4,4:8,8:16,16:32)")
    p.add_argument("--sizes", type=_csv(parse_size), action="append", metavar="SIZE,...",
                   help="synthetic square sizes or ROWSxCOLS (default: 256,1024; none when "
                   "--weights is given without --sizes/--dists)")
    p.add_argument("--dists", type=_csv(_dist), action="append", metavar="DIST,...",
                   help=f"synthetic distributions, from {','.join(DISTS)} (default: all)")
    p.add_argument("--weights", nargs="+", default=[], metavar="FILE",
                   help="checkpoints (.safetensors/.pt/.bin/.pth): every 2-D/4-D float weight")
    p.add_argument("--solvers", type=_csv(str), action="append", metavar="NAME,...",
                   help="contenders: registered solvers and the baselines "
                   f"{','.join(BASELINES)} (default: all)")
    p.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="timed runs per contender; the median is reported (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic matrices")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT, metavar="S",
                   help="skip a contender whose estimated time on a matrix exceeds S seconds; "
                   f"0 = no limit (default {DEFAULT_TIME_LIMIT:g})")
    add_output_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Handler of ``nmopt bench gap``."""

    if args.repeat < 1:
        raise UsageError("--repeat: expected K >= 1")
    if not 0 <= args.time_limit < float("inf"):  # NaN fails too
        raise UsageError("--time-limit: expected S >= 0 (0 = no limit)")
    if args.seed < 0:
        raise UsageError(f"--seed: expected an integer >= 0, got {args.seed}")
    names = _flat(args.solvers)
    valid = contender_names()
    bad = [n for n in names or () if n not in valid]
    if bad:
        raise UsageError(f"--solvers: unknown {', '.join(bad)}; choose from {', '.join(valid)}")
    synth = args.sizes is not None or args.dists is not None or not args.weights
    sizes = _flat(args.sizes) or list(DEFAULT_SIZES)
    dists = _flat(args.dists) or list(DISTS)
    matrices = synthetic_matrices(dists, sizes, args.seed) if synth else []
    for path in args.weights:
        matrices += file_matrices(path)
    patterns = _flat(args.patterns) or list(DEFAULT_PATTERNS)
    result = run_gap(matrices, patterns, names, args.repeat, args.time_limit or None,
                     progress=False if args.no_progress else None)
    written = write_outputs(result, args.json, args.markdown, args.plot)
    print(format_text(result))
    for path in written:
        print(f"wrote {path}")
    return 0
