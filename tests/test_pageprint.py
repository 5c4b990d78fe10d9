"""Keyed page fingerprints: what they always catch, how the key is derived, and the range helpers."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mpmultifd.pageprint import (
    fingerprint_extents,
    fingerprint_rows,
    key_from_seed,
    random_key,
    session_seed,
    split_ranges,
)

PS = 4096


def _print(page: np.ndarray, key: np.ndarray) -> int:
    out = np.empty(1, dtype=np.uint64)
    fingerprint_rows(page.reshape(1, -1), key, out)
    return int(out[0])


def test_keys_are_odd_deterministic_and_bound_to_the_session():
    a = key_from_seed(b"s" * 32, PS)
    assert a.dtype == np.uint64 and len(a) == PS // 4 and (a & np.uint64(1)).all()
    assert np.array_equal(a, key_from_seed(b"s" * 32, PS))
    assert not np.array_equal(a, key_from_seed(b"t" * 32, PS))
    sid = bytes(range(16))
    seeds = {session_seed(k, s, n) for k in (None, b"k" * 16) for s in (sid, sid[::-1]) for n in (0, 1)}
    assert len(seeds) == 8  # key, session and attempt each change the seed
    assert session_seed(None, sid, 0) == session_seed(b"", sid, 0)


@settings(max_examples=300)
@given(word=st.integers(0, PS // 4 - 1), delta=st.integers(1, 2**32 - 1), fill=st.integers(0, 255))
def test_a_change_confined_to_one_word_is_always_caught(word, delta, fill):
    key = random_key(PS)
    page = np.full(PS, fill, dtype=np.uint8)
    before = _print(page, key)
    w = page.view(np.uint32)
    w[word : word + 1] += np.uint32(delta)
    assert _print(page, key) != before


def test_sign_bit_flips_in_pairs_are_caught():
    """What a 64-bit-word sum would miss every time: two doubles negated."""
    key = random_key(PS)
    page = np.frombuffer(np.random.default_rng(1).bytes(PS), dtype=np.uint8).copy()
    before = _print(page, key)
    d = page.view(np.float64)
    d[[3, 100]] *= -1
    assert _print(page, key) != before
    assert _print(np.zeros(PS, np.uint8), key) == 0  # a zero page (a hole) fingerprints as 0


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 70)), min_size=1, max_size=30),
)
def test_fingerprint_extents_reads_exactly_the_ranges(lengths):
    npages = sum(g + n for g, n in lengths)
    pages = np.frombuffer(np.random.default_rng(npages).bytes(npages * PS), dtype=np.uint8).reshape(npages, PS)
    key = random_key(PS)
    ext, at = [], 0
    for gap, n in lengths:
        ext.append((at + gap, at + gap + n))
        at += gap + n
    out = np.full(npages, 7, dtype=np.uint64)
    assert fingerprint_extents(pages, ext, key, out) == sum(n for _, n in lengths)
    ref = np.full(npages, 7, dtype=np.uint64)
    for f, e in ext:
        fingerprint_rows(pages[f:e], key, ref[f:e])
    assert np.array_equal(out, ref)  # the ranges got their prints, the gaps were left alone


@given(
    ranges=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40)), max_size=20),
    nparts=st.integers(1, 9),
)
def test_split_ranges_covers_every_page_once_in_balanced_parts(ranges, nparts):
    rs, at = [], 0
    for gap, n in ranges:
        rs.append((at + gap, at + gap + n))
        at += gap + n
    parts = split_ranges(rs, nparts)
    total = sum(e - f for f, e in rs)
    assert len(parts) <= nparts and (total == 0) == (parts == [])
    flat = [p for part in parts for f, e in part for p in range(f, e)]
    assert flat == [p for f, e in rs for p in range(f, e)]
    if parts:
        sizes = [sum(e - f for f, e in part) for part in parts]
        assert max(sizes) == -(-total // nparts) or len(parts) == 1


@settings(max_examples=60, deadline=None)
@given(
    npages=st.integers(1, 300),
    dense=st.floats(0.0, 1.0),
    marks=st.lists(st.tuples(st.integers(0, 299), st.integers(0, PS // 4 - 1), st.integers(1, 2**32 - 1)), max_size=40),
    chunk=st.sampled_from([1, 7, 64, 256]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fingerprint_rows_matches_the_definition_whatever_the_zero_pages(npages, dense, marks, chunk, seed):
    # zero pages are skipped, not multiplied: the prints must still be sum(K[i] * x[i]) mod 2**64 for every
    # page, including pages whose only data is a word the first/last-word probe does not see
    rng = np.random.default_rng(seed)
    key = key_from_seed(rng.bytes(32), PS)
    grid = np.zeros((npages, PS), dtype=np.uint8)
    full = rng.random(npages) < dense
    grid[full] = rng.integers(0, 256, size=(int(full.sum()), PS), dtype=np.uint8)
    words = grid.view(np.uint32)
    for page, word, value in marks:
        if page < npages:
            words[page, word] = value
    out = np.full(npages, 12345, dtype=np.uint64)
    fingerprint_rows(grid, key, out, chunk=chunk)
    expect = words.astype(np.uint64) @ key
    assert np.array_equal(out, expect)
    assert not out[~grid.any(axis=1)].any()  # a zero page prints as 0
    # the zero pages found on the way, asked for, are exactly the zero pages; the prints do not change
    nonzero = rng.random(npages) < 0.5  # garbage that must be overwritten
    out2 = np.full(npages, 12345, dtype=np.uint64)
    fingerprint_rows(grid, key, out2, chunk=chunk, nonzero=nonzero)
    assert np.array_equal(out2, expect)
    assert np.array_equal(nonzero, grid.any(axis=1))
