"""``nmopt bench speed``: dense vs N:M sparse GEMMs of a linear layer, per backend and shape.

Three operations per shape (tokens x in -> out): the forward GEMM ``Y = X W^T``, the
backward-data GEMM ``dX = dY W`` and a whole linear layer's forward + backward (forward,
backward-data and the dense weight gradient, as in training). Every kernel runs in the same
process on the same tensors, so the ``speedup`` column (dense time / kernel time) is a ratio
measured in one run. Times are medians of ``--repeats`` batches after a warm-up, timed in
interleaved rounds (one batch of every kernel per round) so that load changes hit all alike.

Kernels:

- CPU: ``dense`` (torch matmul), ``masked dense`` (``W * mask`` then torch matmul, the fallback
  sparse layers use), ``cffi`` (the C backend's compressed N:M matmul on pre-packed W and W^T,
  if built) and, for the layer step, nmopt's ``SparseLinear`` on each kernel (per-step packing
  included);
- CUDA (code path present, measured only where a GPU is available): ViT-L MLP shapes
  (13 008 tokens, 1024 <-> 4096, bfloat16), dense cuBLAS vs PyTorch semi-structured 2:4 for the
  forward and backward-data GEMMs and for the layer step with transposable 2:4 *including*
  the per-step repacking of the values (ideal 1.5x for the layer: two of three GEMMs sparse),
  in the packing mode a sparse layer picks on that device (cuSPARSELt, CUTLASS or full
  repack; the notes say which and why).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import nmopt
from nmopt import backends
from nmopt._report import (
    Column,
    add_output_arguments,
    environment,
    format_table,
    markdown_table,
    write_outputs,
)
from nmopt.backends.torch_backend import mask_tensor
from nmopt.bench._args import THREADS, integer, number, patterns

CPU_SHAPES = ((1, 1024, 4096), (16, 1024, 4096), (256, 1024, 4096), (2048, 1024, 4096),
              (256, 4096, 1024), (2048, 4096, 1024))
CUDA_SHAPES = ((13008, 1024, 4096), (13008, 4096, 1024))
QUICK_SHAPES = ((8, 64, 32),)
OPS = ("forward", "backward-data", "linear fwd+bwd")


def _shape(text: str) -> tuple[int, int, int]:
    try:
        t, i, o = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected TOKENSxINxOUT, e.g. "
                                         "256x1024x4096") from None
    return t, i, o


def _batch(fn, sync, budget: float) -> int:
    """Calls per timed batch: warm up, then double until a batch takes ``budget`` seconds."""
    fn()
    sync()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        if time.perf_counter() - t0 >= budget or n >= 1 << 14:
            return n
        n *= 2


def time_interleaved(fns, sync, min_time: float, repeats: int) -> list[float]:
    """Median milliseconds per call of each function, timed in interleaved rounds.

    Every round times one batch of every function in turn, so a load change on a shared
    machine hits the dense reference and the sparse kernels alike and their ratio stays fair.
    """
    sizes = [_batch(fn, sync, min_time / repeats) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, n, out in zip(fns, sizes, samples):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            out.append((time.perf_counter() - t0) / n)
    return [1e3 * statistics.median(out) for out in samples]


def _layer_step(layer, x, gy):
    import torch

    params = [p for p in (layer.weight, layer.bias) if p is not None]

    def run():
        torch.autograd.grad(layer(x), [x, *params], gy)
    return run


def _semi_structured_cases(w, mask, x, gy, pattern, notes):
    """The semi-structured plan's GEMMs and per-step packing, in the mode a sparse layer would
    use on this device (said in ``notes``, as is why none could run)."""
    from nmopt.training import SparsityConfig  # imports torch
    from nmopt.training.matmul import semi_structured_plan, semi_structured_unsupported

    shape = f"{x.shape[0]}x{w.shape[1]}x{w.shape[0]}"
    why = semi_structured_unsupported(SparsityConfig(pattern=pattern), w)
    plan, failed = (None, [why]) if why is not None else semi_structured_plan(w, mask)
    if plan is None:
        notes.append(f"semi-structured 2:4 not measured at {shape}: {'; '.join(failed)}")
        return []
    notes.append(f"semi-structured 2:4 at {shape}: {plan.detail}")
    packs = plan.pack(w, mask)
    return [("forward", "semi-structured", lambda: plan.forward(x, packs)),
            ("backward-data", "semi-structured", lambda: plan.backward_data(gy, packs, w, mask)),
            ("repack W and W^T", "semi-structured", lambda: plan.pack(w, mask))]


def _cases(device, tokens, fan_in, fan_out, pattern, dtype, cffi, notes):
    """(op, kernel, fn) for one shape: every kernel of this device on the same tensors (what
    could not run is said in ``notes``)."""
    import torch
    from torch import nn


    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(fan_out, fan_in, generator=gen, device=device).to(dtype)
    x = torch.randn(tokens, fan_in, generator=gen, device=device).to(dtype)
    gy = torch.randn(tokens, fan_out, generator=gen, device=device).to(dtype)
    mask = mask_tensor(w, pattern)
    wm = w * mask
    cases = [("forward", "dense", lambda: x @ w.t()),
             ("forward", "masked dense", lambda: x @ (w * mask).t()),
             ("backward-data", "dense", lambda: gy @ w),
             ("backward-data", "masked dense", lambda: gy @ (w * mask))]
    if device == "cpu" and cffi is not None:
        import numpy as np

        p = nmopt.parse_pattern(pattern)
        pw = cffi.pack(wm.numpy(), mask.numpy(), p.n, p.m)
        pwt = cffi.pack(np.ascontiguousarray(wm.numpy().T), np.ascontiguousarray(mask.numpy().T),
                        p.n, p.m)
        xn, gn = x.numpy(), gy.numpy()
        cases += [("forward", "cffi", lambda: cffi.sparse_matmul(xn, pw)),
                  ("backward-data", "cffi", lambda: cffi.sparse_matmul(gn, pwt)),
                  ("pack W and W^T", "cffi", lambda: (cffi.pack(wm.numpy(), mask.numpy(), p.n,
                                                                p.m),
                                                     cffi.pack(np.ascontiguousarray(wm.numpy().T),
                                                               np.ascontiguousarray(
                                                                   mask.numpy().T), p.n, p.m)))]
    if device == "cuda":
        cases += _semi_structured_cases(w, mask, x, gy, pattern, notes)
    xg = x.clone().requires_grad_(True)
    dense = nn.Linear(fan_in, fan_out, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
    cases.append(("linear fwd+bwd", "dense", _layer_step(dense, xg, gy)))
    matmuls = {"cpu": (("masked", "masked dense"), ("cffi", "cffi")),
               "cuda": (("masked", "masked dense"), ("semi-structured", "semi-structured"))}
    for matmul, label in matmuls[device]:
        if matmul == "cffi" and cffi is None:
            continue
        model = nn.Sequential(nn.Linear(fan_in, fan_out, device=device, dtype=dtype))
        with torch.no_grad():
            model[0].weight.copy_(w)
        nmopt.sparsify_(model, nmopt.SparsityConfig(pattern=pattern, refresh_every=0,
                                                    matmul=matmul))
        note = model[0].matmul
        if label != "masked dense" and "masked dense" in note:
            continue  # the sparse kernel cannot serve this layer (the reason is in its repr)
        cases.append(("linear fwd+bwd", label, _layer_step(model[0], xg, gy)))
    return cases


def run(args) -> dict:
    import torch


    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    notes = []
    cffi_reason = backends.status().get("cffi", "not registered")
    cffi = backends.get("cffi") if cffi_reason is None else None
    if cffi is None:
        notes.append(f"cffi kernels not measured: {cffi_reason}")
    devices = [("cpu", args.shapes or (QUICK_SHAPES if args.quick else CPU_SHAPES),
                torch.float32)]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(("cuda", args.cuda_shapes or (QUICK_SHAPES if args.quick
                                                      else CUDA_SHAPES), torch.bfloat16))
        notes.append(f"CUDA device: {torch.cuda.get_device_name()}")
    else:
        notes.append("CUDA not measured: " + ("--cpu-only" if args.cpu_only else
                                              "no CUDA device in this run"))
    rows = []
    for device, shapes, dtype in devices:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for pattern in args.patterns if device == "cpu" else ["2:4"]:
            for tokens, fan_in, fan_out in shapes:
                cases = _cases(device, tokens, fan_in, fan_out, pattern, dtype, cffi, notes)
                times = time_interleaved([fn for _, _, fn in cases], sync, args.min_time,
                                         args.repeats)
                dense_ms = {op: ms for (op, kernel, _), ms in zip(cases, times)
                            if kernel == "dense"}
                for (op, kernel, _), ms in zip(cases, times):
                    row = {"device": device, "dtype": str(dtype).replace("torch.", ""),
                           "pattern": pattern, "shape": f"{tokens}x{fan_in}x{fan_out}",
                           "tokens": tokens, "in": fan_in, "out": fan_out, "op": op,
                           "kernel": kernel, "ms": ms}
                    if op in dense_ms:
                        row["speedup"] = dense_ms[op] / ms
                    rows.append(row)
                    if not args.quiet:
                        print(f"{device} {pattern} {tokens}x{fan_in}x{fan_out} {op:15s} "
                              f"{kernel:15s} {ms:9.3f} ms", flush=True)
    settings = {"min_time": args.min_time, "repeats": args.repeats,
                "torch_threads": torch.get_num_threads(), "patterns": args.patterns,
                "cffi_threads": None if cffi is None else cffi.num_threads}
    if hasattr(os, "getloadavg"):
        notes.append(f"load average (1 min) at start {load0:.2f}, at end "
                     f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs: timings on a shared "
                     "machine are noisy; the interleaved rounds keep each ratio fair")
    return {"benchmark": "speed", "settings": settings, "notes": notes, "rows": rows,
            "environment": environment()}


COLUMNS = [Column("device", "device", align="<"), Column("pattern", "N:M", align="<"),
           Column("shape", "tokens x in x out", align="<"), Column("op", "op", align="<"),
           Column("kernel", "kernel", align="<"), Column("ms", "ms", "{:.3f}"),
           Column("speedup", "vs dense", "{:.2f}x")]


def format_markdown(result: dict) -> str:
    s = result["settings"]
    return "\n".join([
        "# nmopt bench speed", "",
        (f"Median of {s['repeats']} interleaved batches (each >= "
        f"{s['min_time'] / s['repeats']:.2f} s), torch threads: {s['torch_threads']}, C kernel "
        f"threads: {s.get('cffi_threads')}. `vs dense` = dense time / kernel time for the "
        "same op and shape, measured in the same run. Masked dense includes the `W * mask` "
        "multiply a masked layer does every step; the layer step (`linear fwd+bwd`) of a sparse "
        "kernel includes its per-step repacking of the values (`pack W and W^T` is the C "
        "backend's full pack, for reference: sparse layers pack the indices once per mask; "
        "`repack W and W^T` is the semi-structured plan's per-step packing alone)."), "",
        markdown_table(result["rows"], COLUMNS), "",
        *[f"- {n}" for n in result["notes"]], ""])


def draw_plot(result: dict):
    def draw(fig):
        groups = sorted({(r["device"], r["pattern"]) for r in result["rows"]})
        for k, (device, pattern) in enumerate(groups):
            ax = fig.add_subplot(len(groups), 1, k + 1)
            rows = [r for r in result["rows"] if (r["device"], r["pattern"]) == (device, pattern)
                    and r["kernel"] != "dense" and r.get("speedup")]
            kernels = sorted({r["kernel"] for r in rows})
            cats = list(dict.fromkeys(f"{r['shape']}\n{r['op']}" for r in rows))
            width = 0.8 / max(1, len(kernels))
            for j, kernel in enumerate(kernels):
                vals = {f"{r['shape']}\n{r['op']}": r["speedup"] for r in rows
                        if r["kernel"] == kernel}
                xs = [i + j * width for i, c in enumerate(cats) if c in vals]
                ax.bar(xs, [vals[c] for c in cats if c in vals], width, label=kernel)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, fontsize=6,
                          rotation=90)
            ax.set_yscale("log")
            ax.set_ylabel("speedup vs dense (log)")
            ax.set_title(f"{device}, {pattern} transposable")
            ax.legend(fontsize=7)
        fig.subplots_adjust(hspace=0.9)
    return draw


def main(args) -> int:
    if args.quick:
        args.min_time, args.repeats = min(args.min_time, 0.02), min(args.repeats, 2)
        args.patterns = args.patterns[:1]
    result = run(args)
    print(format_table(result["rows"], COLUMNS))
    for note in result["notes"]:
        print(f"note: {note}")
    groups = len({(r["device"], r["pattern"]) for r in result["rows"]})
    write_outputs(args, result, format_markdown(result), draw_plot(result), figsize=(12.0, 4.5 * groups))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("speed", help="dense vs sparse GEMM and linear-layer timings",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=_shape, nargs="+", metavar="TxINxOUT",
                   help="CPU shapes (default: batch 1..2048, 1024<->4096)")
    p.add_argument("--cuda-shapes", type=_shape, nargs="+", metavar="TxINxOUT",
                   help="CUDA shapes (default: ViT-L MLP, 13008x1024x4096 and 13008x4096x1024)")
    p.add_argument("--patterns", type=patterns, default=["2:4", "4:8"],
                   metavar="N:M,...", help="CPU patterns (CUDA always runs 2:4)")
    p.add_argument("--min-time", type=number(0), default=1.0, metavar="S",
                   help="seconds per measurement, split over the repeats")
    p.add_argument("--repeats", type=integer(1), default=5)
    p.add_argument("--threads", type=THREADS, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--quick", action="store_true", help="one tiny shape (tests, smoke)")
    p.add_argument("--quiet", action="store_true")
    add_output_arguments(p)
    p.set_defaults(func=main)
    return p
