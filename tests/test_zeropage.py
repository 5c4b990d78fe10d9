"""Zero-page detection against the plain definition: a page is zero when every byte is."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from mpmultifd.zeropage import nonzero_pages

PS = 4096


@given(
    npages=st.integers(1, 200),
    marks=st.lists(st.tuples(st.integers(0, 199), st.integers(0, PS - 1), st.integers(1, 255)), max_size=60),
    dense=st.floats(0.0, 1.0),
    order=st.sampled_from(["run", "sorted", "shuffled", "subset"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_nonzero_pages_matches_a_full_read(npages, marks, dense, order, seed):
    rng = np.random.default_rng(seed)
    grid = np.zeros((npages, PS), dtype=np.uint8)
    full = rng.random(npages) < dense  # pages of data: non-zero almost everywhere
    grid[full] = rng.integers(0, 256, size=(int(full.sum()), PS), dtype=np.uint8)
    for page, byte, value in marks:  # single bytes anywhere: the probe misses most of them
        if page < npages:
            grid[page, byte] = value
    pages = np.arange(npages, dtype=np.intp)
    if order == "shuffled":
        pages = rng.permutation(pages)
    elif order == "subset":
        pages = np.sort(rng.choice(pages, size=max(1, npages // 2), replace=False))
    elif order == "sorted":
        pages = pages[rng.random(npages) < 0.8] if npages > 1 else pages
        if len(pages) == 0:
            pages = np.array([0], dtype=np.intp)
    got = nonzero_pages(grid.view(np.uint64), pages)
    assert got.dtype == bool and got.shape == pages.shape
    assert np.array_equal(got, grid[pages].any(axis=1))


def test_a_page_whose_only_byte_is_in_the_middle_is_not_zero():
    grid = np.zeros((128, PS), dtype=np.uint8)
    grid[:, 1] = 7  # every page shows data at the probe except the ones below
    grid[5] = 0
    grid[5, PS // 2] = 1
    grid[9] = 0
    mask = nonzero_pages(grid.view(np.uint64), np.arange(128, dtype=np.intp))
    assert mask[5] and not mask[9] and mask.sum() == 127


def test_empty_batch():
    assert nonzero_pages(np.zeros((4, PS // 8), dtype=np.uint64), np.zeros(0, dtype=np.intp)).shape == (0,)
