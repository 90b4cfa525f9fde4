"""mask_diversity: exact counts, checked against brute force and closed forms."""

from __future__ import annotations

from itertools import combinations, product
from math import comb, factorial

import nmopt_test_oracles as oracles
import pytest

import nmopt


@pytest.mark.parametrize("pattern,kwargs,expected", [
    ("2:4", {}, 90),
    ("4:8", {}, 116_963_796_250),
    ("3:6", {}, 297_200),
    ("2:4", {"at_most": True}, 7_343),
    ("2:4", {"transposable": False}, 6**4),
    ("2:4", {"transposable": False, "at_most": True}, (1 + 4 + 6) ** 4),
    ("4:8", {"transposable": False}, 70**8),
    ("2:4", {"shape": (8, 8)}, 90**4),
    ("2:4", {"shape": (4, 12), "at_most": True}, 7_343**3),
    ("2:4", {"shape": (8, 4), "transposable": False}, 6**8),
    ((2, 4), {}, 90),
    ("2:5", {}, 2_040),  # OEIS A000681
    ("2:6", {}, 67_950),
    ("3:5", {}, 2_040),  # OEIS A001501
    ("1:1", {}, 1),
    ("3:3", {}, 1),
])
def test_known_values(pattern, kwargs, expected):
    got = nmopt.mask_diversity(pattern, **kwargs)
    assert got == expected and isinstance(got, int)


def test_big_shapes_are_exact_python_integers():
    got = nmopt.mask_diversity("4:8", shape=(768, 3072))
    assert got == 116_963_796_250 ** (96 * 384)
    assert got.bit_length() > 1_000_000


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7])
def test_closed_forms(m):
    """1:M and (M-1):M transposable masks are permutations (and their complements); at most
    1:M masks are partial permutations."""
    assert nmopt.mask_diversity((1, m)) == factorial(m)
    if m > 1:
        assert nmopt.mask_diversity((m - 1, m)) == factorial(m)
    partial = sum(comb(m, k) ** 2 * factorial(k) for k in range(m + 1))
    assert nmopt.mask_diversity((1, m), at_most=True) == partial
    assert nmopt.mask_diversity((m, m)) == 1
    if m <= 5:  # larger ones are exact but slow to count
        assert nmopt.mask_diversity((m, m), at_most=True) == 2 ** (m * m)


@pytest.mark.parametrize("n,m", [(1, 2), (1, 3), (2, 3), (1, 4), (2, 4), (3, 4), (4, 4)])
@pytest.mark.parametrize("at_most", [False, True])
def test_transposable_counts_match_brute_force(n, m, at_most):
    """Enumerate all 2**(M*M) 0/1 tiles and count the valid ones."""
    brute = len(oracles.all_patterns(m, m, n, not at_most))
    assert nmopt.mask_diversity((n, m), at_most=at_most) == brute


@pytest.mark.parametrize("n,m", [(1, 3), (2, 4), (1, 4), (2, 3), (3, 5)])
@pytest.mark.parametrize("at_most", [False, True])
def test_rowwise_counts_match_brute_force(n, m, at_most):
    """Row-wise: count per-row choices by enumeration, then one choice per row of the tile."""
    sizes = range(n + 1) if at_most else (n,)
    per_row = sum(1 for k in sizes for _ in combinations(range(m), k))
    per_row_brute = sum(1 for bits in product((0, 1), repeat=m)
                        if (sum(bits) <= n if at_most else sum(bits) == n))
    assert per_row == per_row_brute
    got = nmopt.mask_diversity((n, m), transposable=False, at_most=at_most)
    assert got == per_row_brute ** m


@pytest.mark.parametrize("shape", [(6, 8), (8, 6), (0, 8), (-4, 8), (8,), (4, 4, 4), (3, 4),
                                   (8.5, 8), (8.0, 8), ("8", "8"), 8])
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match="shape"):
        nmopt.mask_diversity("2:4", shape=shape)


@pytest.mark.parametrize("pattern", ["5:4", "0:4", "2-4", ""])
def test_bad_patterns(pattern):
    with pytest.raises(ValueError, match="pattern"):
        nmopt.mask_diversity(pattern)


def test_too_large_to_count_is_a_clear_error():
    with pytest.raises(ValueError, match="mask_diversity"):
        nmopt.mask_diversity("8:16")


def test_docstring_warns_about_the_overcounting_formula():
    doc = nmopt.mask_diversity.__doc__
    assert "overcount" in doc and "1.76e13" in doc
