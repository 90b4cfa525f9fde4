"""Argument types the benchmarks share: numbers checked when the command line is parsed, so a
bad value is one usage error (exit 2) naming the flag, never a crash after the work started."""

from __future__ import annotations

import argparse
import math

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
