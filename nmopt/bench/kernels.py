"""``nmopt bench kernels``: the C kernels against ``find_mask``, OR-Tools, torch inputs and dense
GEMMs, and the ratios of issue 13 (exact masks at greedy speed) with their targets.

One process, N(0,1) float32 matrices (seed 0), every ratio taken from timings measured side by
side in this run: each time is the best (min) of ``--repeat`` runs, timed in interleaved rounds
(one run of every call per round) so that load changes hit all alike; slow references (the
numpy greedy, ``find_mask(solver="greedy")``) run once.

- masks at ``--size`` (4096): the C exact kernel (mask + optimal prices + per-tile self-check)
  and the C greedy kernel on ready-made float64 tiles, the numpy greedy, ``find_mask`` end to
  end (solver auto, and greedy), on a torch CPU tensor, and row-wise on numpy and torch; the
  exact kernel's gap, fallback tiles and the greedy's loss;
- OR-Tools min-cost flow on the tiles (``mcf`` solver: mask + prices) at ``--mcf-size`` (2048)
  against ``find_mask`` and the exact kernel;
- the peak memory of ``find_mask`` on a ``--memory-size`` (8192) matrix, in a subprocess
  (``--memory-size 0`` skips it);
- sparse matmul: ``sparse_matmul(x, pack(W, mask))`` against dense ``torch.matmul`` with the
  same threads, forward ``X W^T`` and backward-data ``dY W`` from ``pack(W.T, mask.T)``;
- ``--sanitizers``: runs ``tests/test_sanitizers.py`` (from a checkout) and records its verdict.

Writes ``kernels.json`` (every number) and ``kernels.md`` into ``--out``. New cases and ratios
are entries of the tables in :mod:`nmopt.bench._kernel_cases`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from nmopt import backends
from nmopt._report import Column, environment, format_table, markdown_table, write_json, write_text
from nmopt.api import find_mask
from nmopt.bench._args import MAX_THREADS, check_out_dir, integer
from nmopt.bench._kernel_cases import MEMORY, measure, peak_memory, ratio_rows, run_sanitizers
from nmopt.bench._timing import interleaved
from nmopt.packed import pack, sparse_matmul
from nmopt.patterns import parse_pattern

DEFAULT_OUT = Path("benchmarks") / "results"
STEM = "kernels"


def _patterns(least: int = 0, most: int | None = None):
    """A parser of comma-separated N:M patterns, between ``least`` and ``most`` of them."""
    def parse(text: str) -> list[str]:
        try:
            values = [str(parse_pattern(t.strip())) for t in text.split(",") if t.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if len(values) < least or (most is not None and len(values) > most):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {'one' if most == 1 else 'at least one'} "
                                             "pattern N:M")
        return values
    return parse


def _ints(low: int):
    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            values = [low - 1]
        if any(v < low for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= {low}")
        return values
    return parse


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def bench_matmul(w: np.ndarray, patterns, batches, repeat: int, log) -> list[dict]:
    """Packed N:M ``sparse_matmul`` against dense ``torch.matmul`` on the masked weight."""
    import torch

    rng = np.random.default_rng(1)
    rows = []
    for pat in patterns:
        mask = np.asarray(find_mask(w, pat).mask)
        dense = torch.from_numpy((w * mask).astype(np.float32))
        pw = pack(w, mask, pat)
        pwt = pack(np.ascontiguousarray(w.T), np.ascontiguousarray(mask.T), pat)
        for gemm, packed, width, dense_op in (
                ("forward", pw, w.shape[1], lambda t, d=dense: torch.matmul(t, d.T)),
                ("backward-data", pwt, w.shape[0], lambda t, d=dense: torch.matmul(t, d))):
            for b in batches:
                if gemm == "backward-data" and b > 16:
                    continue
                x = rng.standard_normal((b, width)).astype(np.float32)
                xt = torch.from_numpy(x)
                t = interleaved({"sparse": lambda x=x, p=packed: sparse_matmul(x, p),
                                 "dense": lambda f=dense_op, xt=xt: f(xt)},
                                repeat * (6 if b <= 16 else 1))
                ref = t["dense"].result.numpy()
                err = float(np.abs(t["sparse"].result - ref).max() / max(np.abs(ref).max(), 1e-30))
                sp, de = t["sparse"].best, t["dense"].best
                rows.append({"pattern": pat, "gemm": gemm, "batch": b, "sparse": t["sparse"].record(),
                             "dense": t["dense"].record(), "speedup": de / sp, "max_rel_error": err,
                             "packed_mb": packed.nbytes / 2**20, "dense_mb": dense.numpy().nbytes / 2**20})
                log(f"  matmul {pat} {gemm} batch {b}: sparse {sp * 1e3:.2f} ms, dense {de * 1e3:.2f} ms")
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; the thread settings it makes are undone afterwards."""
    cffi = backends.get("cffi") if backends.status().get("cffi", "") is None else None
    saved = None if cffi is None else cffi._threads  # None: follow NMOPT_NUM_THREADS / cores
    torch_threads = _torch_threads()
    try:
        return _run(args)
    finally:
        if cffi is not None:
            cffi._threads = saved
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure everything; return the JSON-ready record."""
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    notes, load0 = [], _loadavg()
    try:
        import torch
    except ImportError:
        torch = None
        notes.append("torch is not installed: torch inputs and the dense GEMMs are not measured")
    else:
        torch.set_num_threads(args.threads)
    reason = backends.status().get("cffi", "not registered")
    if reason is None:
        backends.get("cffi").num_threads = args.threads
    else:
        notes.append(f"the C backend is unavailable ({reason}): its kernels are not measured")
    sizes = {"size": args.size, "mcf_size": args.mcf_size, "memory_size": args.memory_size}
    extra = [p for p in args.extra_patterns if p not in args.patterns]
    matrices: dict[int, np.ndarray] = {}

    def matrix(size: int) -> np.ndarray:
        if size not in matrices:
            rng = np.random.default_rng(0)
            matrices[size] = rng.standard_normal((size, size)).astype(np.float32)
        return matrices[size]

    records = []
    log(f"masks at {args.size}x{args.size}" + (", OR-Tools at the same size" if args.mcf_size == args.size
                                                 else f", OR-Tools at {args.mcf_size}x{args.mcf_size}"))
    for pat in args.patterns + extra:
        keys = {"size"} | ({"mcf_size"} if args.mcf_size == args.size and pat not in extra else set())
        records.append(measure(matrix(args.size), parse_pattern(pat), keys, args.repeat, pat in extra, log))
    if args.mcf_size != args.size:
        for pat in args.patterns:
            records.append(measure(matrix(args.mcf_size), parse_pattern(pat), {"mcf_size"}, args.repeat,
                                   False, log))
    ratios = ratio_rows(records, args.patterns, sizes)
    log(f"peak memory at {args.memory_size}x{args.memory_size}, {args.memory_pattern}")
    ratios.append(peak_memory(args.memory_size, args.memory_pattern, args.threads))
    matmul = []
    if torch is not None and args.matmul_patterns:
        log("sparse matmul")
        matmul = bench_matmul(matrix(args.size), args.matmul_patterns, args.batches, args.repeat, log)
    result = {"benchmark": "kernels", "date": time.strftime("%Y-%m-%d %H:%M"),
              "settings": {**sizes, "patterns": args.patterns, "extra_patterns": extra,
                           "repeat": args.repeat, "threads": args.threads,
                           "matmul_patterns": args.matmul_patterns, "batches": args.batches,
                           "torch": None if torch is None else torch.__version__},
              "load_before": load0, "load_after": _loadavg(), "ratios": ratios, "masks": records,
              "matmul": matmul, "notes": notes, "environment": environment()}
    if args.sanitizers:
        log("sanitizers")
        result["sanitizers"] = run_sanitizers()
    return result


# -- report -------------------------------------------------------------------------------------

def _cell(row: dict, markdown: bool) -> str:
    if row["value"] is None:
        return "skipped"
    missed = "**missed**" if markdown else "MISSED"
    verdict = "" if row["met"] is None else (" met" if row["met"] else f" {missed}")
    return f"{row['value']:.2f}x{verdict}"


def ratio_table(result: dict, markdown: bool = True) -> tuple[list[dict], list[Column]]:
    """The ratios pivoted: one line per ratio, one column per pattern."""
    lines: dict[str, dict] = {}
    for r in result["ratios"]:
        line = lines.setdefault(r["ratio"], {"label": r["label"], "target": r["target"] or "-",
                                             "size": f"{r['size']}²" if r["size"] else "-"})
        line[r["pattern"]] = _cell(r, markdown)
    pats = list(dict.fromkeys(r["pattern"] for r in result["ratios"]))
    cols = [Column("label", "ratio", align="<"), Column("size", "size"), Column("target", "target")]
    return list(lines.values()), cols + [Column(p, p) for p in pats]


def _secs(key: str):
    return lambda rec: (f"{rec['timings'][key]['best']:.3f} ({rec['timings'][key]['spread']:.2f})"
                        if key in rec["timings"] else None)


def _over(num: str, den: str, field: str = "best"):
    def cell(rec: dict) -> str | None:
        t = rec["timings"]
        return f"{t[num][field] / t[den][field]:.2f}x" if num in t and den in t else None
    return cell


def _table(records: list[dict], cols: list[tuple[str, Any]]) -> str:
    rows = [{h: f(r) for h, f in cols} for r in records]
    return markdown_table(rows, [Column(h, h, align="<" if h == "pattern" else ">") for h, _ in cols])


def format_markdown(result: dict) -> str:
    s, env = result["settings"], result["environment"]
    main = [r for r in result["masks"] if r["size"] == s["size"]]
    mcf = [r for r in result["masks"] if r["size"] == s["mcf_size"] and not r["extra"]]
    rows, cols = ratio_table(result)
    skips: dict[tuple[str, str], list[str]] = {}
    for r in result["ratios"]:
        if r["skipped"]:
            skips.setdefault((r["ratio"], r["skipped"]), []).append(r["pattern"])
    out = ["# nmopt bench kernels", "",
           f"Generated by `nmopt bench kernels` on {result['date']}: {env['machine']}, {env['cpus']} CPUs, "
           f"C kernels and torch ({s['torch']}) on {s['threads']} threads, N(0,1) float32 matrices. "
           f"Seconds are the best of {s['repeat']} runs in interleaved rounds (spread max/min in "
           "parentheses); ratios divide best times measured in this run. Load average before "
           f"{result['load_before']}, after {result['load_after']} (above 0: other jobs shared the CPUs).",
           "", "## Ratios (issue 13)", "", markdown_table(rows, cols), ""]
    out += [f"- {key} ({', '.join(pats)}) skipped: {why}" for (key, why), pats in skips.items()]
    mem = [r for r in result["ratios"] if r["ratio"] == MEMORY.key and r["value"] is not None]
    out += [f"- memory: {m['peak_extra_bytes'] / 2**20:.1f} MiB extra at peak for a "
            f"{m['input_bytes'] / 2**20:.1f} MiB input ({m['by']}); measured as {m['method']}." for m in mem]
    out += ["", f"## Masks, {s['size']} x {s['size']}", "",
            "`exact C`: the exact kernel alone on float64 tiles (mask + optimal prices + per-tile "
            "self-check); `greedy C`/`numpy`: greedy kernels, mask only; `find_mask`: the whole call "
            "(input checks, tiling, solve, re-validation, certificate), solver auto; `torch`: the same "
            "call on a torch CPU tensor; `row-wise`: `transposable=False`. `CPU`: the ratio of process "
            "CPU seconds, which other jobs do not inflate.", "",
            _table(main, [("pattern", lambda r: r["pattern"]), ("exact C", _secs("exact_kernel")),
                          ("greedy C", _secs("greedy_kernel")), ("greedy numpy", _secs("greedy_numpy")),
                          ("find_mask", _secs("find_mask")), ("find_mask greedy", _secs("find_mask_greedy")),
                          ("torch", _secs("find_mask_torch")), ("row-wise", _secs("rowwise_numpy")),
                          ("row-wise torch", _secs("rowwise_torch"))]), "",
            _table(main, [("pattern", lambda r: r["pattern"]),
                          ("exact / greedy C", _over("exact_kernel", "greedy_kernel")),
                          ("same, CPU", _over("exact_kernel", "greedy_kernel", "cpu")),
                          ("numpy / C greedy", _over("greedy_numpy", "greedy_kernel")),
                          ("find_mask greedy / find_mask", _over("find_mask_greedy", "find_mask")),
                          ("gap", lambda r: _fmt(r["checks"].get("exact_gap"), "{:.1e}")),
                          ("greedy loss", lambda r: _fmt(r["checks"].get("greedy_loss"), "{:.2%}")),
                          ("fallback / unverified tiles", lambda r: _fmt(
                              (r["checks"].get("exact_fallback_tiles"), r["checks"].get("exact_unverified_tiles")),
                              "{0[0]} / {0[1]}")),
                          ("find_mask by", lambda r: r["checks"].get("find_mask_by")),
                          ("torch by", lambda r: r["checks"].get("find_mask_torch_by"))])]
    differ = [r["pattern"] for r in main if r["checks"].get("greedy_numpy_same") is False]
    out += ["", f"- the numpy greedy **differs** from the C greedy at {', '.join(differ)}"] if differ else []
    out += ["", f"## OR-Tools, {s['mcf_size']} x {s['mcf_size']}", "",
            "`mcf`: OR-Tools SimpleMinCostFlow through the `mcf` solver on the same tiles (mask + prices, "
            "costs rounded to 40 bits per tile); `objective`: (exact - mcf) / mcf kept score.", "",
            _table(mcf, [("pattern", lambda r: r["pattern"]), ("mcf", _secs("mcf")),
                         ("find_mask", _secs("find_mask")), ("exact C", _secs("exact_kernel")),
                         ("mcf / find_mask", _over("mcf", "find_mask")),
                         ("mcf / exact C", _over("mcf", "exact_kernel")),
                         ("objective", lambda r: _fmt(r["checks"].get("exact_vs_mcf_objective"), "{:+.1e}"))])]
    if result["matmul"]:
        out += ["", "## Sparse matmul", "",
                "Milliseconds, best of interleaved runs (spread). Dense = `torch.matmul` on the masked "
                "float32 weight; sparse = `nmopt.packed.sparse_matmul` on `pack(W, mask)` (forward, "
                "`X W^T`) or `pack(W.T, mask.T)` (backward-data, `dY W`).", "",
                markdown_table(result["matmul"],
                               [Column("pattern", "pattern", align="<"), Column("gemm", "GEMM", align="<"),
                                Column("batch", "batch"), Column("sparse", "sparse ms", _ms),
                                Column("dense", "dense ms", _ms), Column("speedup", "speedup", "{:.2f}x"),
                                Column("max_rel_error", "max rel. error", "{:.1e}")])]
    san = result.get("sanitizers")
    if san:
        text = san.get("skipped") or (f"`{san['command']}`: {san['summary']} ({san['seconds']:.0f} s): the C "
                                      "kernels " + ("ran clean" if san["returncode"] == 0 else "FAILED")
                                      + " under AddressSanitizer + UndefinedBehaviorSanitizer.")
        out += ["", "## Sanitizers", "", text]
    if result["notes"]:
        out += ["", "## Notes", "", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(out) + "\n"


def _fmt(value, pattern: str) -> str | None:
    if value is None or (isinstance(value, tuple) and None in value):
        return None
    return pattern.format(value)


def _ms(t: dict) -> str:
    return f"{1e3 * t['best']:.2f} ({t['spread']:.2f})"


def main(args: argparse.Namespace) -> int:
    """Handler of ``nmopt bench kernels``."""
    check_out_dir(args.out)
    result = run(args)
    rows, cols = ratio_table(result, markdown=False)
    print(format_table(rows, cols))
    args.out.mkdir(parents=True, exist_ok=True)
    for path, write, data in ((args.out / f"{STEM}.json", write_json, result),
                              (args.out / f"{STEM}.md", write_text, format_markdown(result))):
        write(path, data)
        print(f"wrote {path}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("kernels", help="C kernels vs find_mask, OR-Tools, torch; issue-13 ratios",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patterns", type=_patterns(1), default=["2:4", "4:8", "8:16", "16:32"], metavar="N:M,...",
                   help="patterns of the ratios and every table (default 2:4,4:8,8:16,16:32)")
    p.add_argument("--extra-patterns", type=_patterns(), default=["32:64"], metavar="N:M,...",
                   help="patterns for the kernel columns of the mask table only (default 32:64; '' none)")
    p.add_argument("--size", type=integer(1), default=4096, metavar="N",
                   help="N x N matrix of the masks, ratios and matmul (default 4096)")
    p.add_argument("--mcf-size", type=integer(1), default=2048, metavar="N",
                   help="N x N matrix of the OR-Tools comparison (default 2048)")
    p.add_argument("--memory-size", type=integer(0), default=8192, metavar="N",
                   help="N x N matrix of the peak-memory probe (default 8192: about 2.5 GB; 0 skips)")
    p.add_argument("--memory-pattern", type=lambda t: _patterns(1, 1)(t)[0], default="4:8", metavar="N:M",
                   help="pattern of the peak-memory probe (default 4:8)")
    p.add_argument("--repeat", type=integer(1), default=3, metavar="K", help="runs per timing (default 3)")
    p.add_argument("--threads", type=integer(1, MAX_THREADS), default=os.cpu_count() or 1,
                   help="threads of the C kernels and torch (default: all CPUs)")
    p.add_argument("--matmul-patterns", type=_patterns(), default=["2:4", "4:8"], metavar="N:M,...",
                   help="patterns of the sparse-matmul table (default 2:4,4:8; '' skips it)")
    p.add_argument("--batches", type=_ints(1), default=[1, 16, 256, 2048], metavar="B,...",
                   help="sparse-matmul batch sizes (backward-data up to 16; default 1,16,256,2048)")
    p.add_argument("--sanitizers", action="store_true",
                   help="also run tests/test_sanitizers.py (from a checkout) and record its verdict")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help=f"directory of {STEM}.json and {STEM}.md (default {DEFAULT_OUT})")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=main)
    return p

