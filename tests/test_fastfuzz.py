"""The in-process coverage-guided fuzzer: a short run of every target finds no escape, and the
fuzzer does notice an untyped exception, a write outside the region and a hang."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fuzz import fast as fastfuzz
from mpmultifd.errors import RemoteProtocolError


@pytest.mark.timeout(120)
def test_a_short_run_of_every_target_lets_nothing_escape():
    stats = fastfuzz.run(8.0, seed=11, trace_every=16)
    names = {s.name for s in stats}
    assert {"hello", "data_header", "control", "recv-none", "recv-zstd", "recv-lz4", "recv-zlib", "savefile"} <= names
    for s in stats:
        assert s.inputs > len(fastfuzz.targets([s.name])[0].seeds), s
        assert s.edges > 0 and s.traced > 0, s  # coverage was measured
        assert not s.escapes, [(e.kind, e.detail, e.data.hex()) for e in s.escapes]


def test_the_fuzzer_reports_untyped_errors_writes_outside_and_hangs():
    def run(data: bytes) -> None:
        if len(data) > 3 and data[0] == 0x41:
            raise IndexError("an untyped error")
        raise RemoteProtocolError("typed", field="x")

    t = fastfuzz.Target("toy", run, [b"AAAA", b"BBBB"])
    st = fastfuzz.fuzz_target(t, 1.0, seed=1)
    assert any(e.kind == "IndexError" for e in st.escapes)
    assert st.typed_errors > 0

    arena = np.zeros(8, dtype=np.uint8)

    def writes_past(data: bytes) -> None:
        if data[:1] == b"W":
            arena[7] = 1  # pretend a receiver wrote past its block

    def check():
        if arena[7]:
            arena[7] = 0
            return "canary changed"
        return None

    st = fastfuzz.fuzz_target(fastfuzz.Target("oob", writes_past, [b"W"], check=check), 0.5, seed=2)
    assert any(e.kind == "out-of-bounds" for e in st.escapes)

    calls = []

    def hangs(data: bytes) -> None:
        calls.append(1)
        if len(calls) == 3:
            end = time.monotonic() + 30
            while time.monotonic() < end:  # a decoder stuck in a loop
                pass

    st = fastfuzz.fuzz_target(fastfuzz.Target("hang", hangs, [b"x"]), 1.0, seed=3, hang_seconds=0.5)
    assert [e.kind for e in st.escapes] == ["hang"]
