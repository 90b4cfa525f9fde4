"""check_mask and is_valid_mask: tile rows and columns, edge tiles, 4-D, numpy and torch."""

from __future__ import annotations

import nmopt_test_oracles as oracles
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nmopt


def block_mask(rows, cols, n=2, m=4):
    """A valid transposable mask: a circulant pattern in every tile."""
    i, j = np.indices((rows, cols))
    return ((j % m - i % m) % m) < n


def test_valid_masks_pass():
    for shape in ((4, 4), (8, 12), (13, 7), (1, 1), (70, 33)):
        mask = block_mask(*shape)
        nmopt.check_mask(mask, "2:4")
        assert nmopt.is_valid_mask(mask, "2:4")
        assert nmopt.is_valid_mask(mask, "2:4", transposable=False)
    assert nmopt.is_valid_mask(np.zeros((5, 5), bool), "1:4")
    assert nmopt.is_valid_mask(np.ones((4, 4), bool), "4:4")


def test_row_violation_names_tile_and_row():
    mask = block_mask(8, 12)
    mask[5, 8:12] = [True, True, True, False]  # tile (1, 2), row 5 keeps 3
    with pytest.raises(ValueError) as info:
        nmopt.check_mask(mask, "2:4")
    msg = str(info.value)
    assert "tile (1, 2)" in msg and "row 5" in msg and "3 > N=2" in msg
    assert not nmopt.is_valid_mask(mask, "2:4")
    assert not nmopt.is_valid_mask(mask, "2:4", transposable=False)


def test_column_violation_names_tile_and_column():
    mask = np.zeros((8, 12), bool)
    mask[4:7, 9] = True  # tile (1, 2), column 9 keeps 3; every row keeps 1
    with pytest.raises(ValueError) as info:
        nmopt.check_mask(mask, "2:4")
    msg = str(info.value)
    assert "tile (1, 2)" in msg and "column 9" in msg and "3 > N=2" in msg
    assert "transposable" in msg


def test_row_wise_mode_ignores_columns():
    mask = np.zeros((8, 8), bool)
    mask[:, 0] = True  # every column-0 group keeps 4 > 2, every row keeps 1
    assert nmopt.is_valid_mask(mask, "2:4", transposable=False)
    nmopt.check_mask(mask, "2:4", transposable=False)
    assert not nmopt.is_valid_mask(mask, "2:4", transposable=True)


def test_first_violating_tile_is_reported():
    mask = np.zeros((8, 8), bool)
    mask[6, 4:8] = True  # tile (1, 1)
    mask[1, 4:7] = True  # tile (0, 1): reported first (row-major tile order)
    with pytest.raises(ValueError, match=r"tile \(0, 1\).*row 1 keeps 3"):
        nmopt.check_mask(mask, "2:4")


def test_partial_edge_tiles():
    mask = np.zeros((5, 7), bool)
    mask[4, 4:6] = True  # edge tile (1, 1) is 1 x 3: row 4 keeps 2 > 1
    with pytest.raises(ValueError, match=r"tile \(1, 1\).*row 4 keeps 2"):
        nmopt.check_mask(mask, "1:4")
    mask = np.zeros((5, 7), bool)
    mask[0:3, 6] = True  # edge tile (0, 1) is 4 x 3: column 6 keeps 3 > 2
    with pytest.raises(ValueError, match=r"tile \(0, 1\).*column 6 keeps 3"):
        nmopt.check_mask(mask, "2:4")
    mask[0, 6] = False
    assert nmopt.is_valid_mask(mask, "2:4")


def test_four_d_masks_are_checked_as_their_2d_view():
    mask = block_mask(8, 12).reshape(8, 3, 2, 2)
    assert nmopt.is_valid_mask(mask, "2:4")
    bad = mask.copy().reshape(8, 12)
    bad[0, :3] = True
    with pytest.raises(ValueError, match="row 0"):
        nmopt.check_mask(bad.reshape(8, 3, 2, 2), "2:4")


def test_torch_masks():
    torch = pytest.importorskip("torch")
    mask = torch.from_numpy(block_mask(8, 8))
    assert nmopt.is_valid_mask(mask, "2:4")
    assert nmopt.is_valid_mask(mask.to(torch.uint8), "2:4")
    assert nmopt.is_valid_mask(mask.float(), "2:4")
    bad = mask.clone()
    bad[3, :] = True
    with pytest.raises(ValueError, match="row 3"):
        nmopt.check_mask(bad, "2:4")
    assert not nmopt.is_valid_mask(bad.reshape(8, 2, 2, 2), "2:4")


def test_zero_one_masks_and_bad_masks():
    mask = block_mask(4, 8)
    assert nmopt.is_valid_mask(mask.astype(np.int8), "2:4")
    assert nmopt.is_valid_mask(mask.astype(float), "2:4")
    with pytest.raises(ValueError, match="mask"):
        nmopt.check_mask(mask * 2.0, "2:4")  # values other than 0/1
    with pytest.raises(TypeError, match="mask"):
        nmopt.check_mask(mask.astype(str), "2:4")
    with pytest.raises(ValueError, match="mask"):
        nmopt.check_mask(mask.ravel(), "2:4")
    with pytest.raises(ValueError, match="pattern"):
        nmopt.check_mask(mask, "2:")
    assert not nmopt.is_valid_mask(mask * 2.0, "2:4")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 13), st.integers(1, 13), st.floats(0.05, 0.95),
       st.integers(0, 2**32 - 1), st.booleans())
def test_agrees_with_independent_check(m, rows, cols, density, seed, transposable):
    """Validity and the named location agree with a plain-loop check over every tile."""
    n = max(1, m // 2)
    mask = np.random.default_rng(seed).random((rows, cols)) < density
    bad = oracles.violations(mask, n, m, transposable)
    assert nmopt.is_valid_mask(mask, (n, m), transposable) == (not bad)
    if bad:
        with pytest.raises(ValueError) as info:
            nmopt.check_mask(mask, (n, m), transposable)
        first_tile = bad[0][:2]
        in_tile = [b for b in bad if b[:2] == first_tile]
        kind, index, count = in_tile[0][2:]  # rows are listed before columns
        msg = str(info.value)
        assert f"tile {first_tile}" in msg
        assert f"{kind} {index} keeps {count}" in msg
