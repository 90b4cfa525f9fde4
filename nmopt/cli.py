"""The ``nmopt`` command line: prune checkpoints, benchmark solvers, inspect what is installed.

Exit codes: 0 success, 1 failure (unreadable input, a layer that cannot be solved, ...),
2 usage error (bad arguments, an output that exists without ``--force``), 130 interrupted.
Every error is one line on stderr; set ``NMOPT_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import nmopt
from nmopt import backends, bench, solvers
from nmopt._report import Column, check_output_arguments, format_table
from nmopt.bench._args import integer, number
from nmopt.checkpoint import (
    CheckpointError,
    OutputExistsError,
    check_output_paths,
    checkpoint_format,
)
from nmopt.demo import DEMO_TIME_LIMIT, run_demo
from nmopt.diversity import matrix_tiles
from nmopt.errors import UsageError
from nmopt.patterns import parse_pattern
from nmopt.prune import print_report
from nmopt.prune_stream import FORMATS, prune_path


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _pattern(text: str) -> str:
    try:
        return str(parse_pattern(text))
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- prune -----------------------------------------------------------------------------------

# Calibration flags of a MODEL; None on the parser, so that a checkpoint can refuse them.
MODEL_DEFAULTS = {"nsamples": 32, "seqlen": 512, "seed": 0}

def _check_outputs(args) -> None:
    """Every usage check of ``nmopt prune`` that can fail before any work is done."""
    import re

    for flag, value in (("--include", args.include), ("--exclude", args.exclude)):
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise UsageError(f"{flag}: invalid regular expression {value!r}: {exc}") from None
    in_dir = Path(args.input).is_dir()  # a model directory, streamed into the directory --out
    try:
        if not in_dir:
            checkpoint_format(args.input, "input")
            checkpoint_format(args.out, "--out")
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    if args.format != "dense" and not in_dir and Path(args.out).suffix.lower() != ".safetensors":
        raise UsageError(f"--format {args.format} writes safetensors: give --out a .safetensors path")
    if args.masks and Path(args.masks).suffix.lower() != ".safetensors":
        raise UsageError(f"--masks {args.masks!r}: masks are written as .safetensors")
    if args.report and Path(args.report).suffix.lower() != ".json":
        raise UsageError(f"--report {args.report!r}: the report is written as .json")
    p = parse_pattern(args.pattern)
    if args.solver != "auto":
        if args.solver not in solvers.names():
            raise UsageError(f"--solver: unknown solver {args.solver!r}; choose auto or one of "
                             f"{', '.join(solvers.names())}")
        inst = solvers.get(args.solver)  # ImportError (exit 1) if not installed
        if inst.transposable == args.row_wise:
            want = "--row-wise" if inst.transposable is False else "no --row-wise"
            raise UsageError(f"--solver {args.solver} finds "
                             f"{'transposable' if inst.transposable else 'row-wise'} masks; "
                             f"use {want} or --solver auto")
        why = inst.refuses(p.n, p.m, args.saturate, 1)
        if why:
            raise UsageError(f"--solver {args.solver}: {why}")
        if args.backend is not None and inst.backends is not None \
                and args.backend not in inst.backends:
            raise UsageError(f"--solver {args.solver} runs on the {', '.join(inst.backends)} "
                             f"backend, not --backend {args.backend}; drop one of them")
    if args.backend is not None and args.backend not in backends.names():
        raise UsageError(f"--backend: unknown backend {args.backend!r}; choose one of "
                         f"{', '.join(backends.names())}")
    if args.backend is not None:
        backends.get(args.backend)  # ImportError (exit 1) if it cannot run here
    try:
        _ = backends.BACKENDS.instance("cffi").num_threads  # NMOPT_NUM_THREADS, checked up front
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    outs = [("--out", args.out)] + [(flag, v) for flag, v in (("--masks", args.masks),
                                                               ("--report", args.report)) if v]
    try:
        check_output_paths(args.input, outs, args.force, out_dir=in_dir)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None


def cmd_prune(args) -> int:
    # calibration-aware pruning of a MODEL; a model directory alone is streamed by magnitude
    if (Path(args.input).suffix.lower() == ".gguf" or args.method not in (None, "magnitude")
            or args.calibration):
        if args.format != "dense":
            raise UsageError(f"--format {args.format} applies to checkpoints and model directories "
                             "pruned by magnitude (no --method/--calibration)")
        from nmopt.posttrain.prune_cli import run_prune_command  # imports torch

        for flag, default in MODEL_DEFAULTS.items():
            if getattr(args, flag) is None:
                setattr(args, flag, default)
        return run_prune_command(args)
    given = [f"--{flag}" for flag in (*MODEL_DEFAULTS, "device", "blocks")
             if getattr(args, flag) is not None]
    if given:
        one = len(given) == 1
        raise UsageError(f"{', '.join(given)} appl{'ies' if one else 'y'} to a MODEL pruned on "
                         f"--calibration text; {args.input!r} without --calibration is pruned by "
                         f"magnitude: drop {'it' if one else 'them'} or add --calibration TEXT_FILE")
    _check_outputs(args)
    try:
        report = prune_path(
            args.input, args.out, args.pattern, fmt=args.format, masks_path=args.masks,
            report_path=args.report, transposable=not args.row_wise, saturate=args.saturate,
            solver=args.solver, backend=args.backend, include=args.include, exclude=args.exclude,
            progress=False if args.no_progress else None, force=args.force)
    except OutputExistsError as exc:  # another run wrote it after the check above
        raise UsageError(str(exc)) from None
    print_report(report)
    if report.get("not_copied"):
        print(f"not copied (dense weights in another format): {', '.join(report['not_copied'])}")
    out_kind = "pruned model directory" if Path(args.input).is_dir() else "pruned checkpoint"
    for path, what in ((args.out, out_kind), (args.masks, "masks"),
                       (args.report, "report")):
        if path:
            print(f"wrote {what}: {path}")
    return 0


# -- small commands --------------------------------------------------------------------------

def cmd_diversity(args) -> int:
    import math

    p = parse_pattern(args.pattern)
    shape = tuple(args.shape) if args.shape else None
    kw = dict(transposable=not args.row_wise, at_most=args.at_most)
    try:
        tiles = matrix_tiles(shape, p.m) if shape else 1
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None  # "shape: expected ..."
    per_tile = nmopt.mask_diversity(p, **kw)
    kind = "row-wise" if args.row_wise else "transposable"
    rule = "at most" if args.at_most else "exactly"
    where = f"a {shape[0]}x{shape[1]} matrix" if shape else f"one {p.m}x{p.m} tile"
    what = "per row" if args.row_wise else "per row and column"
    if per_tile == 0:
        text = "0"
    else:  # the magnitude from the per-tile count: the whole count can have billions of digits
        exp, bits = tiles * math.log10(per_tile), tiles * math.log2(per_tile)
        approx = f"10^{exp:.2f}, {bits:.1f} bits"
        # Python refuses str() of ints beyond 4300 digits; past ~60 digits show the magnitude
        text = f"{per_tile ** tiles} ({approx})" if exp < 60 else f"~{approx}"
    print(f"{kind} {p} masks of {where} ({rule} {p.n} kept {what}): {text}")
    return 0


def _status_table(status: dict, attrs) -> int:
    rows = [dict(name=name, status="available" if why is None else f"unavailable: {why}",
                 **attrs(name, why)) for name, why in status.items()]
    cols = [Column("name", "name", align="<")]
    cols += [Column(k, k, align="<") for k in rows[0] if k not in ("name", "status")] if rows else []
    cols.append(Column("status", "status", align="<"))
    print(format_table(rows, cols))
    return 0


def cmd_solvers(args) -> int:
    def attrs(name, why):
        if why is not None:
            return {"exact": "", "masks": ""}
        inst = solvers.get(name)
        return {"exact": "yes" if inst.exact else "no",
                "masks": "transposable" if inst.transposable else "row-wise"}

    _status_table(solvers.status(), attrs)
    picks = []
    for pattern in ("2:4", "4:8", "8:16", "16:32"):
        n, m = map(int, pattern.split(":"))
        try:
            pick = solvers.auto(n, m, transposable=True, saturate=False,
                                num_tiles=(1024 // m) ** 2).name
        except RuntimeError:
            pick = "none"
        picks.append(f"{pattern} {pick}")
    print(f"auto (the first exact solver that takes the problem), for a 1024x1024 weight: "
          f"{', '.join(picks)}")
    return 0


def cmd_backends(args) -> int:
    return _status_table(backends.status(), lambda name, why: {})


# -- demo ------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    run_demo(Path(args.out), time_limit=args.time_limit or None)
    return 0


# -- parser and main ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (benchmarks register themselves from :mod:`nmopt.bench`)."""

    parser = _Parser(prog="nmopt", description="Optimal N:M transposable sparsity masks with "
                     "certified optimality gaps. N:M keeps at most N of every M weights "
                     "(NVIDIA convention).")
    parser.add_argument("--version", action="version", version=f"nmopt {nmopt.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a checkpoint or a pretrained model with N:M masks",
                       description="Prune every 2-D (and 4-D conv) float weight of a checkpoint "
                       "with optimal N:M masks; biases, norms, 1-D, integer and bool tensors are "
                       "copied unchanged, embeddings too unless --include names them. Safetensors "
                       "files and Hugging Face model directories (shards and index mirrored, other "
                       "files copied) are streamed a block at a time, in bounded memory. With "
                       "--calibration, a MODEL (Hugging Face directory or .gguf file) is pruned block "
                       "by block on calibration text with --method (default admm) into the model "
                       "directory OUT. Writes atomically: a failed run leaves nothing behind.")
    p.add_argument("input", metavar="IN", help="input checkpoint (.safetensors, .pt, .bin, .pth) or MODEL "
                   "(Hugging Face model directory or .gguf file)")
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt", "admm", "adaprune"),
                   help="MODEL only (checkpoints: magnitude): calibration-aware method (default admm)")
    p.add_argument("--calibration", metavar="TEXT_FILE", help="MODEL: UTF-8 calibration text")
    p.add_argument("--nsamples", type=integer(1),
                   help=f"MODEL: calibration windows (default {MODEL_DEFAULTS['nsamples']})")
    p.add_argument("--seqlen", type=integer(1),
                   help=f"MODEL: tokens per window (default {MODEL_DEFAULTS['seqlen']})")
    p.add_argument("--seed", type=int,
                   help=f"MODEL: seed of the window starts (default {MODEL_DEFAULTS['seed']})")
    p.add_argument("--device", default=None, help="MODEL: torch device (default cpu)")
    p.add_argument("--blocks", default=None, metavar="NAME",
                   help="MODEL: the block list to prune, e.g. decoder.block of an encoder-decoder "
                        "(default: found automatically)")
    p.add_argument("--pattern", required=True, type=_pattern, metavar="N:M",
                   help="keep at most N of every M, e.g. 2:4 or 4:8")
    p.add_argument("--row-wise", action="store_true",
                   help="ordinary row-wise N:M instead of transposable masks")
    p.add_argument("--saturate", action="store_true",
                   help="exactly N per tile row and column (the original paper's formulation)")
    p.add_argument("--solver", default="auto", help="solver name (see `nmopt solvers`; "
                   "default auto: the fastest exact one)")
    p.add_argument("--backend", default=None, help="backend name (see `nmopt backends`)")
    p.add_argument("--include", metavar="REGEX", help="prune only tensors whose name matches")
    p.add_argument("--exclude", metavar="REGEX", help="do not prune tensors whose name matches")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="pruned checkpoint (its extension picks the format), or for a model "
                   "directory or MODEL the output model directory (safetensors; from_pretrained "
                   "loads it)")
    p.add_argument("--format", choices=FORMATS, default="dense",
                   help="dense (default): pruned tensors as they are; nm-packed: kept values plus "
                   "bit-packed positions, ~56%% (2:4) / 59%% (4:8) of the size (nmopt.load_pruned "
                   "reads it; layout in the README)")
    p.add_argument("--masks", metavar="MASKS", help="write the boolean masks (.safetensors; one "
                   "file for a model directory too)")
    p.add_argument("--report", metavar="REPORT.json", help="write the per-layer report as JSON")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prune)

    b = sub.add_parser("bench", help="benchmarks (solver quality, ...)",
                       description="Benchmarks; each writes a table and optional JSON, Markdown "
                       "and plot files.")
    bench_sub = b.add_subparsers(dest="bench", metavar="BENCHMARK")
    bench.add_parsers(bench_sub)
    b.set_defaults(func=lambda args: _missing(b))

    d = sub.add_parser("diversity", help="count the distinct valid N:M masks",
                       description="Exact number of valid N:M masks (the mask-diversity measure), "
                       "per M x M tile or for a matrix.")
    d.add_argument("pattern", metavar="PATTERN", type=_pattern, help="N:M, e.g. 4:8")
    d.add_argument("--row-wise", action="store_true", help="count row-wise N:M masks")
    d.add_argument("--at-most", action="store_true", help="count masks keeping at most N")
    d.add_argument("--shape", type=int, nargs=2, metavar=("R", "C"),
                   help="a matrix shape (multiples of M) instead of one tile")
    d.set_defaults(func=cmd_diversity)

    s = sub.add_parser("solvers", help="list the solvers and whether they can run here",
                       description="Each registered solver, whether it is exact, and available "
                       "or the reason it is not.")
    s.set_defaults(func=cmd_solvers)
    k = sub.add_parser("backends", help="list the backends and whether they can run here",
                       description="Each registered backend: available or the reason it is not.")
    k.set_defaults(func=cmd_backends)

    m = sub.add_parser("demo", help="run the main job on built-in data (a few minutes)",
                       description="The solver-quality benchmark on Gaussian 512x512 and "
                       "1024x1024 matrices (2:4, 4:8, 8:16, 16:32), then a 4:8 transposable prune "
                       "of a small generated checkpoint, re-validated tile by tile. Overwrites "
                       "its own files in --out.")
    m.add_argument("--out", default="nmopt-demo", metavar="DIR",
                   help="output directory (default: nmopt-demo)")
    m.add_argument("--time-limit", type=number(0), default=DEMO_TIME_LIMIT, metavar="S",
                   help=f"per-run time limit of the benchmark (default {DEMO_TIME_LIMIT:g}, "
                   "0: none)")
    m.set_defaults(func=cmd_demo)
    parser.set_defaults(func=lambda args: _missing(parser))
    return parser


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    debug = os.environ.get("NMOPT_DEBUG", "") not in ("", "0")
    previous = _on_sigterm_interrupt()
    try:
        check_output_arguments(args)  # --json/--markdown/--plot, before any work
        if args.command in ("prune", "bench", "demo"):
            try:
                backends.environment_backend()
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        return int(args.func(args))
    except UsageError as exc:
        if debug:
            raise
        print(f"nmopt: error: {_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `nmopt ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("nmopt: interrupted; no partial output file was left behind", file=sys.stderr)
        return 130
    except (ValueError, TypeError, ImportError, OSError, RuntimeError) as exc:
        if debug:
            raise
        print(f"nmopt: error: {_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if previous is not False:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _on_sigterm_interrupt():
    """Turn SIGTERM into KeyboardInterrupt so that staged temporary files are removed.

    Returns the previous handler, or False when handlers cannot be set (off the main thread).
    """

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:
        return False


#: The extra that installs an optional dependency, for a missing module's error line.
_EXTRAS = {"torch": "torch", "ortools": "ortools", "networkx": "networkx", "safetensors": "io",
           "matplotlib": "plot", "transformers": "hf", "accelerate": "hf", "gguf": "hf"}


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    missing = (getattr(exc, "name", None) or "").partition(".")[0]
    if isinstance(exc, ModuleNotFoundError) and missing in _EXTRAS and "pip install" not in text:
        text += f"; pip install 'nmopt[{_EXTRAS[missing]}]'"
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
