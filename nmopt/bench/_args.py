"""Argument types the benchmarks share: numbers checked when the command line is parsed, so a
bad value is one usage error (exit 2) naming the flag, never a crash after the work started."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from nmopt.errors import UsageError
from nmopt.patterns import parse_pattern

#: Most threads a benchmark asks torch or the C kernels for (the C kernels' own limit).
MAX_THREADS = 4096


def integer(low: int, high: int | None = None):
    """An argparse type: an integer in ``low..high``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            span = f"in {low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer {span}")
        return value
    return parse


def number(low: float, high: float | None = None):
    """An argparse type: a finite number in ``[low, high]``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            span = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number {span}")
        return value
    return parse


#: ``--threads`` of the torch benchmarks: 0 keeps torch's default.
THREADS = integer(0, MAX_THREADS)


def patterns(text: str) -> list[str]:
    """An argparse type: comma-separated N:M patterns (at least one)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N:M patterns, e.g. 2:4,4:8")
    try:
        return [str(parse_pattern(t)) for t in items]
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_out_dir(path) -> None:
    """:class:`UsageError` naming ``--out`` when it exists and is not a directory (checked
    before the run, not when its results are written)."""
    if path and os.path.lexists(path) and not Path(path).is_dir():
        what = "a broken link" if Path(path).is_symlink() else "a file"
        raise UsageError(f"--out {str(path)!r} is {what}; give a directory for the results")
