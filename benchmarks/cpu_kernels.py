"""The CPU-kernel record of the C backend (issue 4): solver speed and sparse-matmul speed.

One run, one process, 4096 x 4096 N(0,1) (seed 0), every ratio taken from timings measured
side by side in this run:

- masks: the C exact kernel (mask + optimal prices + self-check) against OR-Tools min-cost
  flow (``solver="mcf"``) and against the C greedy; the C greedy against the numpy greedy;
  plus ``find_mask(solver="exact")`` end to end. Patterns 2:4, 4:8, 8:16, 16:32 (and 32:64
  for the C kernels only);
- sparse matmul: ``sparse_matmul(x, pack(W, mask))`` (2:4 and 4:8, float32) against dense
  ``torch.matmul(x, W_masked.T)`` with the same thread count, batch 1, 16, 256, 2048, and the
  backward-data GEMM ``dY @ W`` from ``pack(W.T, mask.T)``;
- the sanitizer test (``tests/test_sanitizers.py``), whose verdict is recorded.

Each fast timing is repeated (``--repeat``, default 7; exact and greedy alternate): the tables
show the median and the spread (max / min) as a noise measure; the ratios use medians. The
machine load average before and after is recorded, since other jobs may share the CPU. Writes
``benchmarks/results/cpu_kernels.{json,md}`` atomically.

Run from the repository root: ``.venv/bin/python benchmarks/cpu_kernels.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import nmopt
from nmopt import backends, solvers
from nmopt._tiles import TileGrid
from nmopt.packed import pack, sparse_matmul

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def timed(fn, repeat: int) -> dict:
    """Run ``fn`` ``repeat`` times; median, min, max wall seconds, the median CPU seconds of
    the process (all threads: insensitive to other jobs taking turns on the cores) and the
    last result."""
    times, cpu, out = [], [], None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "cpu": statistics.median(cpu), "runs": len(times), "result": out}


def merge(parts: list[dict]) -> dict:
    """Combine single timings into one record (median, min, max, cpu, runs, last result)."""
    times = [p["median"] for p in parts]
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "cpu": statistics.median(p["cpu"] for p in parts), "runs": len(times),
            "result": parts[-1]["result"]}


def strip(t: dict) -> dict:
    return {k: v for k, v in t.items() if k != "result"}


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def bench_masks(w: np.ndarray, patterns, repeat: int, mcf_repeat: int, cffi, log) -> list[dict]:
    numpy_be = backends.get("numpy")
    mcf = solvers.get("mcf") if solvers.status().get("mcf") is None else None
    rows = []
    scores = np.abs(w.astype(np.float64))
    for n, m in patterns:
        tiles = TileGrid(*scores.shape, m).to_tiles(scores)
        row = {"pattern": f"{n}:{m}", "tiles": int(tiles.shape[0])}
        # exact and greedy alternate, so that a change of machine load hits both alike
        runs = [(timed(lambda t=tiles, n=n: cffi.exact(t, n), 1),
                 timed(lambda t=tiles, n=n: cffi.greedy(t, n), 1)) for _ in range(repeat)]
        ex, gr = (merge([r[i] for r in runs]) for i in (0, 1))
        mask, u, v, status = ex["result"]
        kept = np.where(mask, tiles, 0.0).sum()
        bound = nmopt.certificates.tile_bounds(tiles, n, u, v).sum()
        row["exact"] = strip(ex)
        row["exact_gap"] = float((bound - kept) / bound)
        row["exact_fallback_tiles"] = int(np.count_nonzero(status == 1))
        row["exact_unverified_tiles"] = int(np.count_nonzero(status == 2))
        row["greedy_c"] = strip(gr)
        row["greedy_loss"] = float((kept - np.where(gr["result"], tiles, 0.0).sum()) / kept)
        fm = timed(lambda p=(n, m): nmopt.find_mask(w, p, solver="exact"), max(1, repeat // 2))
        row["find_mask_exact"] = strip(fm)
        fg = timed(lambda p=(n, m): nmopt.find_mask(w, p, solver="greedy"), max(1, repeat // 4))
        row["find_mask_greedy"] = strip(fg)
        if m <= 32:
            ng = timed(lambda t=tiles, n=n: numpy_be.greedy(t, n), 1)
            assert np.array_equal(ng["result"], gr["result"]), "C greedy differs from numpy"
            row["greedy_numpy"] = strip(ng)
            if mcf is not None:
                mc = timed(lambda t=tiles, n=n: mcf.solve(t, n, saturate=False, backend=numpy_be),
                           mcf_repeat)
                ref = np.where(mc["result"][0], tiles, 0.0).sum()
                row["mcf"] = strip(mc)
                row["exact_vs_mcf_objective"] = float((kept - ref) / ref)
        log(f"  masks {n}:{m}: exact {row['exact']['median']:.3f}s, greedy "
            f"{row['greedy_c']['median']:.3f}s" + (f", mcf {row['mcf']['median']:.2f}s"
                                                   if "mcf" in row else ""))
        rows.append(row)
    return rows


def bench_matmul(w: np.ndarray, patterns, batches, threads: int, repeat: int, log) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(1)
    rows = []
    for n, m in patterns:
        res = nmopt.find_mask(w, (n, m), solver="exact")
        wm = (w * res.mask).astype(np.float32)
        pw = pack(w, res.mask, (n, m))
        pwt = pack(np.ascontiguousarray(w.T), np.ascontiguousarray(res.mask.T), (n, m))
        dense = torch.from_numpy(wm)
        for gemm, packed, dense_op in (
                ("forward", pw, lambda t, d=dense: torch.matmul(t, d.T)),
                ("backward-data", pwt, lambda t, d=dense: torch.matmul(t, d))):
            for b in batches:
                if gemm == "backward-data" and b not in (1, 16):
                    continue
                x = rng.standard_normal((b, w.shape[1])).astype(np.float32)
                xt = torch.from_numpy(x)
                reps = repeat * (6 if b <= 16 else 1)
                # interleave sparse and dense so that load changes hit both alike
                ts, td = [], []
                for _ in range(reps):
                    ts.append(timed(lambda x=x, p=packed: sparse_matmul(x, p), 1)["median"])
                    td.append(timed(lambda f=dense_op, t=xt: f(t), 1)["median"])
                y = sparse_matmul(x, packed)
                ref = dense_op(xt).numpy()
                err = float(np.abs(y - ref).max() / np.abs(ref).max())
                sp, de = statistics.median(ts), statistics.median(td)
                row = {"pattern": f"{n}:{m}", "gemm": gemm, "batch": b,
                       "sparse": {"median": sp, "min": min(ts), "max": max(ts)},
                       "dense": {"median": de, "min": min(td), "max": max(td)},
                       "speedup": de / sp, "max_rel_error": err,
                       "packed_mb": packed.nbytes / 2**20, "dense_mb": wm.nbytes / 2**20}
                log(f"  matmul {n}:{m} {gemm} batch {b}: sparse {sp * 1e3:.2f} ms, dense "
                    f"{de * 1e3:.2f} ms, speedup {de / sp:.2f}x")
                rows.append(row)
    return rows


def run_sanitizers() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_sanitizers.py"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=HERE.parent)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": last,
            "seconds": time.perf_counter() - t0}


def spread(t: dict) -> str:
    return f"{t['median']:.3f} ({t['max'] / t['min']:.2f})"


def markdown(rec: dict) -> str:
    out = ["# CPU kernels of the C backend (issue 4)", "",
           (f"Generated by `benchmarks/cpu_kernels.py` on {rec['date']}: {rec['machine']}, "
           f"{rec['cpus']} CPUs, C kernels on {rec['threads']} threads, torch "
           f"{rec['torch_version']} on {rec['threads']} threads. Matrix {rec['size']} x "
           f"{rec['size']} N(0,1). Load average before {rec['load_before']}, after "
           f"{rec['load_after']} (above 0: other jobs shared the CPUs during the run)."), "",
           "## Masks", "",
           ("Seconds, median of the repeats with the spread max/min in parentheses (noise). "
           "`exact` = C kernel: optimal mask + optimal prices + per-tile self-check; `mcf` = "
           "OR-Tools SimpleMinCostFlow solver (mask + prices); greedy kernels give the mask only. "
           "`same, CPU time`: the ratio of the process's CPU seconds (both threads), which other "
           "jobs taking turns on the cores do not inflate. `find_mask exact`: the whole call "
           "(input checks, tiling, kernel, re-validation, certificate from the prices); `find_mask "
           "greedy` likewise, its certificate from block coordinate descent on the prices."),
           "",
           ("| pattern | exact C | greedy C | greedy numpy | mcf | exact vs mcf | exact / greedy C "
           "| same, CPU time | numpy / C greedy | find_mask exact | find_mask greedy | gap "
           "| greedy loss |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["masks"]:
        ex, gc = r["exact"]["median"], r["greedy_c"]["median"]
        mcf = f"{r['mcf']['median']:.2f}" if "mcf" in r else "-"
        vs = f"**{r['mcf']['median'] / ex:.0f}x** faster" if "mcf" in r else "-"
        ng = spread(r["greedy_numpy"]) if "greedy_numpy" in r else "-"
        ngr = f"**{r['greedy_numpy']['median'] / gc:.0f}x**" if "greedy_numpy" in r else "-"
        out.append(f"| {r['pattern']} | {spread(r['exact'])} | {spread(r['greedy_c'])} | {ng} "
                   f"| {mcf} | {vs} | **{ex / gc:.2f}x** | "
                   f"{r['exact']['cpu'] / r['greedy_c']['cpu']:.2f}x | {ngr} | "
                   f"{r['find_mask_exact']['median']:.2f} | "
                   f"{r['find_mask_greedy']['median']:.2f} | {r['exact_gap']:.1e} | "
                   f"{100 * r['greedy_loss']:.2f}% |")
    out += ["", "`gap`: (bound - kept) / bound from the exact kernel's own prices; `greedy loss`: "
            "kept score the greedy gives up against the optimum. Tiles that needed a fallback "
            "(cycle cancelling; for 4x4 tiles, the general path): "
            + ", ".join(f"{r['pattern']} {r['exact_fallback_tiles']}" for r in rec["masks"])
            + "; uncertified tiles: "
            + ", ".join(f"{r['pattern']} {r['exact_unverified_tiles']}" for r in rec["masks"])
            + ". Objective of exact minus mcf, relative: "
            + ", ".join(f"{r['pattern']} {r['exact_vs_mcf_objective']:+.1e}"
                        for r in rec["masks"] if "exact_vs_mcf_objective" in r)
            + " (mcf optimises costs rounded to 40 bits per tile).", "",
            "## Sparse matmul", "",
            ("Milliseconds, median of interleaved repeats (max/min spread in parentheses). Dense = "
            "`torch.matmul` on the masked float32 weight; sparse = `nmopt.packed.sparse_matmul` "
            "on `pack(W, mask)` (forward, `X W^T`) or `pack(W.T, mask.T)` (backward-data, "
            "`dY W`). Same thread count for both."), "",
            "| pattern | GEMM | batch | sparse ms | dense ms | speedup | max rel. error |",
            "|---|---|---|---|---|---|---|"]
    for r in rec["matmul"]:
        s, d = r["sparse"], r["dense"]
        out.append(f"| {r['pattern']} | {r['gemm']} | {r['batch']} | {1e3 * s['median']:.2f} "
                   f"({s['max'] / s['min']:.2f}) | {1e3 * d['median']:.2f} "
                   f"({d['max'] / d['min']:.2f}) | **{r['speedup']:.2f}x** | "
                   f"{r['max_rel_error']:.1e} |")
    if rec["matmul"]:
        r0 = rec["matmul"][0]
        byte_ratio = r0["dense_mb"] / r0["packed_mb"]
        one = [r["speedup"] for r in rec["matmul"] if r["batch"] == 1]
        beyond = (" (measured gains above that ratio mean the dense GEMV does not reach full "
                  "memory bandwidth here)" if one and min(one) > byte_ratio else "")
        cross = []
        for pat in dict.fromkeys(r["pattern"] for r in rec["matmul"]):
            fwd = [r for r in rec["matmul"] if r["pattern"] == pat and r["gemm"] == "forward"]
            wins = [r["batch"] for r in fwd if r["speedup"] >= 1]
            loses = [r["batch"] for r in fwd if r["speedup"] < 1]
            if wins and loses:
                cross.append(f"{pat}: faster up to batch {max(wins)}, slower from batch "
                             f"{min(loses)}")
        out += ["", (f"Bytes streamed per product at batch 1: packed {r0['packed_mb']:.0f} MiB "
                     f"(float32 values + uint8 indices) against dense {r0['dense_mb']:.0f} MiB. "
                     "Crossover (forward): " + ("; ".join(cross) or "none in this range")
                     + "."), "",
                ("Why: at batch 1 both products read each weight once and do one multiply-add "
                 "per weight, so both are bound by memory traffic and the packed form wins by "
                 f"moving {byte_ratio:.1f}x fewer bytes{beyond}. As the batch grows "
                 "each weight is reused across the batch and the products become compute-bound. "
                 "The dense GEMM is register-blocked (several rows of W share every load of x), "
                 "while the packed kernel needs one load of x per multiply-add: each packed "
                 "weight scales a 16-wide row of the transposed batch block, because the "
                 "positions of different rows of W differ. It does half the multiply-adds but "
                 "not fewer loads, so from a few dozen rows of batch on the dense GEMM wins. "
                 "A sparse tensor-core GEMM (GPU) does not have this limit.")]
    san = rec.get("sanitizers")
    if san:
        verdict = "ran clean" if san["returncode"] == 0 else "FAILED or was skipped"
        out += ["", "## Sanitizers", "",
                (f"`{san['command']}`: {san['summary']} ({san['seconds']:.0f} s) - the C kernels "
                f"{verdict} under AddressSanitizer + UndefinedBehaviorSanitizer "
                "(every kernel, random and edge-case inputs, 1-3 threads).")]
    return "\n".join(out) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--mcf-repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-sanitizers", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    reason = backends.status().get("cffi")
    if reason is not None:
        print(f"the C backend is unavailable: {reason}", file=sys.stderr)
        return 1
    cffi = backends.get("cffi")
    cffi.num_threads = args.threads

    def log(msg):
        print(msg, flush=True)

    import torch

    rec = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor()
           or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
           "torch_version": torch.__version__, "size": args.size, "repeat": args.repeat,
           "load_before": loadavg()}
    w = np.random.default_rng(0).standard_normal((args.size, args.size)).astype(np.float32)
    log("masks")
    rec["masks"] = bench_masks(w, [(2, 4), (4, 8), (8, 16), (16, 32), (32, 64)], args.repeat,
                               args.mcf_repeat, cffi, log)
    log("sparse matmul")
    rec["matmul"] = bench_matmul(w, [(2, 4), (4, 8)], [1, 16, 256, 2048], args.threads,
                                 args.repeat, log)
    rec["load_after"] = loadavg()
    if not args.no_sanitizers:
        log("sanitizers")
        rec["sanitizers"] = run_sanitizers()
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "cpu_kernels.json", json.dumps(rec, indent=2) + "\n")
    write_atomic(args.out / "cpu_kernels.md", markdown(rec))
    log(markdown(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
