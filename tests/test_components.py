"""Largest connected component: exact grids for each connectivity, against scipy on random masks."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from sacrum_masks import components
from sacrum_masks.components import largest_component

# the grid of the docstring: one slice with a 2x2 block and a single voxel touching it at a corner,
# then an empty slice
CORNER = np.array([[[1, 1, 0, 0],
                    [1, 1, 0, 0],
                    [0, 0, 1, 0],
                    [0, 0, 0, 0]],
                   [[0, 0, 0, 0]] * 4])


def test_doctests():
    result = doctest.testmod(components)
    assert result.attempted > 0 and result.failed == 0


def test_corner_contact_6_connectivity_removes_the_single_voxel():
    out, removed = largest_component(CORNER, connectivity=6)
    expected = CORNER.copy()
    expected[0, 2, 2] = 0
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8 and removed == 1


def test_corner_contact_26_connectivity_keeps_everything():
    out, removed = largest_component(CORNER, connectivity=26)
    np.testing.assert_array_equal(out, CORNER)
    assert removed == 0


def test_edge_contact_18_connects_but_6_does_not():
    m = np.zeros((3, 3, 3), np.uint8)
    m[0, 0, 0] = m[0, 0, 1] = 1     # a pair
    m[1, 1, 1] = 1                  # touches [0, 0, 1] along an edge (differs in two axes)
    assert largest_component(m, 18)[1] == 0
    out6, removed6 = largest_component(m, 6)
    assert removed6 == 1 and out6.sum() == 2 and out6[1, 1, 1] == 0


def test_empty_and_single_component():
    out, removed = largest_component(np.zeros((3, 4, 5), np.float64))
    assert out.shape == (3, 4, 5) and out.dtype == np.uint8 and not out.any() and removed == 0
    m = np.zeros((3, 4, 5), np.int16)
    m[1:3, 1:3, 2:5] = 7
    out, removed = largest_component(m)
    np.testing.assert_array_equal(out, (m != 0).astype(np.uint8))
    assert removed == 0


def test_input_not_modified_and_memory_order_does_not_matter():
    rng = np.random.default_rng(1)
    m = (rng.random((9, 10, 11)) > 0.7).astype(np.float64)
    before = m.copy()
    out_c, n_c = largest_component(m)
    out_f, n_f = largest_component(np.asfortranarray(m))
    np.testing.assert_array_equal(m, before)
    np.testing.assert_array_equal(out_c, out_f)
    assert n_c == n_f


def test_tie_keeps_the_component_met_first_in_c_order():
    m = np.zeros((5, 5, 5), np.uint8)
    m[4, 0, 0] = 1   # same size, later in C order
    m[0, 4, 4] = 1
    out, removed = largest_component(m)
    assert out[0, 4, 4] == 1 and out[4, 0, 0] == 0 and removed == 1


def test_bad_connectivity():
    with pytest.raises(ValueError, match="connectivity"):
        largest_component(np.ones((2, 2, 2)), connectivity=8)


def scipy_largest(mask):
    """The original procedure's function (scipy.ndimage.label with a 3x3x3 structure, largest by bincount)."""
    labels, n = ndimage.label(mask != 0, np.ones((3, 3, 3)))
    if n == 0:
        return np.zeros(mask.shape, np.uint8), 0
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == sizes.argmax() + 1).astype(np.uint8), n - 1


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.3, 0.9))
def test_same_as_scipy_26_connectivity(seed, density):
    m = np.random.default_rng(seed).random((7, 8, 9)) > density
    out, removed = largest_component(m)
    ref, ref_removed = scipy_largest(m)
    assert removed == ref_removed
    # the kept size is the same; on ties both keep the first component in C order
    np.testing.assert_array_equal(out, ref)
