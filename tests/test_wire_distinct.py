"""The data header decoder's duplicate-page check: its fast path (each part increasing, the
parts disjoint) must accept and refuse exactly what ``np.unique`` does."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmultifd.errors import RemoteProtocolError
from mpmultifd.wire import DataHeaderDecoder, DataHeaderEncoder, _distinct

PS = 4096
SLOTS = 64
BLOCK_PAGES = 48  # fewer pages than slots, so a full packet must repeat a page


def _by_unique(values: np.ndarray) -> bool:
    return bool(np.unique(values).size == values.size)


def _parts(draw, pages: int, sizes: st.SearchStrategy[int]) -> tuple[list[int], list[int]]:
    """Two lists of page numbers: increasing, shuffled, overlapping or not, with or without repeats."""
    out = []
    for _ in range(2):
        n = draw(sizes)
        if draw(st.booleans()):
            # sorted, usually distinct: the senders' shape
            vals = sorted(draw(st.sets(st.integers(0, pages - 1), max_size=n)))
        else:
            vals = draw(st.lists(st.integers(0, pages - 1), max_size=n))
        out.append(vals)
    return out[0], out[1]


@given(st.data())
def test_fast_check_agrees_with_unique(data):
    normal, zero = _parts(data.draw, BLOCK_PAGES, st.integers(0, 40))
    if data.draw(st.booleans()) and normal and zero:
        # force a page shared by the two parts (the case only searchsorted catches)
        shared = data.draw(st.sampled_from(normal))
        zero = sorted(set(zero) | {shared}) if data.draw(st.booleans()) else [*zero, shared]
    offsets = np.array(normal + zero, dtype=">u8") * PS
    assert _distinct(offsets, len(normal)) == _by_unique(offsets)


@given(st.data())
def test_decoder_accepts_exactly_the_packets_without_a_repeated_page(data):
    normal, zero = _parts(data.draw, BLOCK_PAGES, st.integers(0, SLOTS // 2))
    if not normal and not zero:
        zero = [data.draw(st.integers(0, BLOCK_PAGES - 1))]
    no = np.array(normal, dtype=np.uint64) * PS
    zo = np.array(zero, dtype=np.uint64) * PS
    header = bytes(
        DataHeaderEncoder(SLOTS).encode(normal_offsets=no, zero_offsets=zo, payload_len=len(normal) * PS)
    )
    decoder = DataHeaderDecoder(packet_pages=SLOTS, page_size=PS, block_sizes=[BLOCK_PAGES * PS])
    if _by_unique(np.concatenate([no, zo])):
        h = decoder.decode(header)
        assert list(h.normal_offsets) == list(no) and list(h.zero_offsets) == list(zo)
    else:
        with pytest.raises(RemoteProtocolError, match="a page appears twice in one packet") as e:
            decoder.decode(header)
        assert e.value.field == "offsets"


@pytest.mark.parametrize(
    ("normal", "zero", "distinct"),
    [
        ([], [], True),
        ([3], [], True),
        ([], [3], True),
        ([1, 2, 3], [0, 4, 5], True),
        ([1, 2, 3], [0, 3, 5], False),  # shared, both parts increasing
        ([1, 2, 3], [7, 9, 3], False),  # shared, zero part out of order
        ([5, 1], [2], True),  # out of order but distinct: the np.unique fallback
        ([1, 1], [2], False),  # repeat within a part
        ([9], [1, 2, 9], False),  # the last normal page is the largest zero page
        ([0], [0], False),
    ],
)
def test_distinct_cases(normal, zero, distinct):
    offsets = np.array(normal + zero, dtype=">u8") * PS
    assert _distinct(offsets, len(normal)) is distinct
