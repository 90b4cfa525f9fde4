"""Wall-clock timing shared by the ``nmopt bench`` commands.

:func:`best_of` times one call repeatedly; :func:`interleaved` times several calls in rounds
(one run of each per round), so that a change of machine load during the measurement hits
every contender alike and their ratio stays fair. Both return :class:`Timing` records whose
:meth:`Timing.record` is JSON-ready (the call's last result is kept aside, not recorded).

Example
-------
>>> t = best_of(lambda: sum(range(1000)), repeat=3)
>>> t.runs, t.best <= t.median <= t.worst, t.result
(3, True, 499500)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timing:
    """Seconds of ``runs`` calls: best (min), median, worst (max), the median CPU seconds of the
    process (all threads; other jobs taking turns on the cores do not inflate it) and the last
    call's result."""

    best: float
    median: float
    worst: float
    cpu: float
    runs: int
    result: Any = field(default=None, repr=False)

    @property
    def spread(self) -> float:
        """worst / best: how noisy the runs were (1.0 = identical)."""
        return self.worst / self.best if self.best > 0 else 1.0

    def record(self) -> dict[str, float]:
        """The timing as a JSON-ready dict (without the result)."""
        return {"best": self.best, "median": self.median, "worst": self.worst, "cpu": self.cpu,
                "runs": self.runs, "spread": self.spread}


def _one(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def _timing(walls: list[float], cpus: list[float], result: Any) -> Timing:
    return Timing(min(walls), statistics.median(walls), max(walls), statistics.median(cpus),
                  len(walls), result)


def best_of(fn: Callable[[], Any], repeat: int = 3) -> Timing:
    """Call ``fn`` ``repeat`` times (at least once) in a row; the :class:`Timing` of the calls."""
    walls, cpus, out = [], [], None
    for _ in range(max(1, repeat)):
        wall, cpu, out = _one(fn)
        walls.append(wall)
        cpus.append(cpu)
    return _timing(walls, cpus, out)


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int = 3,
                once: frozenset[str] | set[str] = frozenset()) -> dict[str, Timing]:
    """Time every function of ``fns`` in ``repeat`` interleaved rounds (one call each per round).

    Names in ``once`` (slow references) run in the first round only. Returns name -> Timing.
    """
    samples: dict[str, tuple[list[float], list[float], list[Any]]] = {k: ([], [], [None]) for k in fns}
    for r in range(max(1, repeat)):
        for name, fn in fns.items():
            if r and name in once:
                continue
            wall, cpu, out = _one(fn)
            walls, cpus, last = samples[name]
            walls.append(wall)
            cpus.append(cpu)
            last[0] = out
    return {k: _timing(w, c, last[0]) for k, (w, c, last) in samples.items()}
