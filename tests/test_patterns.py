"""Pattern parsing: the N:M text and tuple forms, and clear errors for everything else."""

from __future__ import annotations

import numpy as np
import pytest

import nmopt
from nmopt.patterns import MAX_M


@pytest.mark.parametrize("text,n,m", [
    ("2:4", 2, 4), ("4:8", 4, 8), (" 8 : 16 ", 8, 16), ("1:1", 1, 1), ("32:64", 32, 64),
    ("64:64", 64, 64), ("3:8\n", 3, 8),
])
def test_text(text, n, m):
    p = nmopt.parse_pattern(text)
    assert (p.n, p.m) == (n, m) and str(p) == f"{n}:{m}"


def test_other_forms():
    p = nmopt.Pattern(2, 4)
    assert nmopt.parse_pattern(p) is p
    assert nmopt.parse_pattern((2, 4)) == p == nmopt.parse_pattern([2, 4])
    assert nmopt.parse_pattern((np.int64(2), np.uint8(4))) == p
    assert hash(p) == hash(nmopt.Pattern(2, 4))
    assert nmopt.parse_pattern("4:4").dense and not p.dense
    assert MAX_M == 64


@pytest.mark.parametrize("bad,words", [
    ("2-4", ["N:M"]), ("4:2", ["N must be <= M"]), ("", ["N:M"]), ("a:b", ["N:M"]),
    ("2:4:8", ["N:M"]), ("2.0:4", ["N:M"]), ("2:", ["N:M"]), (":4", ["N:M"]), ("--2:4", ["N:M"]),
    ("²:4", ["N:M"]), ("0:4", ["N must be >= 1"]), ("-1:4", ["N must be >= 1"]),
    ("2:0", ["M must be in 1..64"]), ("2:65", ["M must be in 1..64"]), ("2:-4", ["M"]),
    ((5, 4), ["N must be <= M"]), ((0, 4), ["N"]), ((2, 128), ["M"]),
])
def test_bad_values(bad, words):
    with pytest.raises(ValueError) as info:
        nmopt.parse_pattern(bad)
    msg = str(info.value)
    assert msg.startswith("pattern:")
    for word in words:
        assert word in msg


@pytest.mark.parametrize("bad", [None, 4, 2.5, b"2:4", (2,), (2, 4, 8), (2.0, 4), (2, 4.0),
                                 (True, 4), (1, True), ("2", "4"), {"n": 2, "m": 4}])
def test_bad_types(bad):
    with pytest.raises(TypeError, match="^pattern:"):
        nmopt.parse_pattern(bad)


def test_pattern_constructor_checks():
    with pytest.raises(TypeError, match="pattern"):
        nmopt.Pattern(2.0, 4)
    with pytest.raises(ValueError, match="pattern"):
        nmopt.Pattern(5, 4)


def test_convention_is_documented():
    """N counts the *kept* weights (NVIDIA convention); the paper counts zeros."""
    from nmopt import patterns

    assert "kept" in patterns.__doc__ and "zeros" in patterns.__doc__
    assert nmopt.mask_diversity("1:4", transposable=False) == 4**4  # keep 1 of 4
