"""N:M patterns: parsing and the convention nmopt uses.

nmopt follows the NVIDIA/PyTorch convention: ``N:M`` means *at most N kept* in every group of
M consecutive weights along the reduction dimension (2:4 keeps 2 of 4). The 2021 paper that
introduced transposable masks counts N as *zeros*; for 2:4 and 4:8 the two readings coincide,
for 1:4 or 3:8 they do not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MAX_M = 64


@dataclass(frozen=True)
class Pattern:
    """An N:M pattern: keep at most ``n`` of every ``m`` consecutive weights."""

    n: int
    m: int

    def __post_init__(self) -> None:
        for name, value in (("n", self.n), ("m", self.m)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"pattern: {name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy integers as plain ints
        if self.m < 1 or self.m > MAX_M:
            raise ValueError(f"pattern: M must be in 1..{MAX_M}, got M={self.m}")
        if self.n < 1:
            raise ValueError(f"pattern: N must be >= 1 (N=0 would prune everything), got N={self.n}")
        if self.n > self.m:
            raise ValueError(
                f"pattern: N must be <= M, got {self.n}:{self.m}; N counts the weights *kept* "
                f"per group of M (NVIDIA convention), e.g. '2:4'"
            )

    @property
    def dense(self) -> bool:
        """True when N = M, i.e. nothing is pruned."""
        return self.n == self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(pattern: str | tuple[int, int] | Pattern) -> Pattern:
    """Turn ``"N:M"`` text, an ``(n, m)`` tuple or a :class:`Pattern` into a :class:`Pattern`.

    Raises ``ValueError`` (or ``TypeError``) naming the problem, e.g. N > M or N < 1.
    """
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str):
        match = re.fullmatch(r"\s*(-?[0-9]+)\s*:\s*(-?[0-9]+)\s*", pattern)
        if match is None:  # ASCII digits only: '--2' or '²' must not reach int()
            raise ValueError(f"pattern: expected text 'N:M' such as '2:4' or '4:8', got {pattern!r}")
        return Pattern(int(match[1]), int(match[2]))
    if isinstance(pattern, (tuple, list)) and len(pattern) == 2:
        n, m = pattern
        if all(hasattr(x, "__index__") and not isinstance(x, bool) for x in (n, m)):
            return Pattern(int(n.__index__()), int(m.__index__()))
    raise TypeError(f"pattern: expected 'N:M' text or an (n, m) tuple, got {pattern!r}")
