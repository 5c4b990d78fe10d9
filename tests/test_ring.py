"""Tests of the shared-memory SPSC ring: unit, model-based, cross-process stress, wake-ups, liveness."""

from __future__ import annotations

import collections
import multiprocessing
import os
import pickle
import platform
import random
import select
import threading
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpmultifd import ring as ring_mod
from mpmultifd.errors import ConfigError, RingClosed, RingTimeout
from mpmultifd.ring import KIND_DATA, KIND_EOS, KIND_STOP, KIND_SYNC, Batch, Ring

X86 = platform.machine() in ("x86_64", "AMD64", "i686")
MODES = ("eventidx", "credit") if X86 else ("credit",)
needs_x86 = pytest.mark.skipif(not X86, reason="eventidx mode needs x86 store ordering")


def _expected_pages(i: int, capacity: int) -> np.ndarray:
    return np.arange(min(i % 129, capacity), dtype=np.uint64) + np.uint64(i)


def _run_child(ctx: Any, target: Any, args: tuple[Any, ...]) -> tuple[Any, Any]:
    """Start ``target(*args, conn)``; return (process, parent end of the pipe)."""
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def _reap(proc: Any) -> None:
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def _readable(fd: int) -> bool:
    """Whether ``fd`` is readable right now."""
    return bool(select.select([fd], [], [], 0)[0])


# ------------------------------------------------- child entry points (module level, for spawn)


def _child_probe(ring: Ring, conn: Any) -> None:
    """Pop one batch, write a counter, try to unlink, report."""
    with ring:  # a non-creator's context manager closes without unlinking
        batch = ring.pop(timeout=10)
        ring.counters[3] = 12345
        try:
            ring.unlink()
            unlink = "unlinked"
        except PermissionError:
            unlink = "PermissionError"
        conn.send((batch.packet_num, batch.pages.tolist(), ring.mode, unlink))


def _forked_copy_unlink(ring: Ring) -> None:
    """Exit 0 if this (non-creator) process may not unlink the ring, and its context manager does not either."""
    try:
        ring.unlink()
    except PermissionError:
        with ring:
            pass
        return
    raise SystemExit(1)


def _stress_consumer(ring: Ring, n: int, conn: Any) -> None:
    """Pop until closed, checking each batch is exactly the next expected one."""
    report: dict[str, Any] = {"lost": 0, "duplicated": 0, "reordered": 0, "corrupt": 0, "total": 0, "error": None}
    try:
        capacity = ring.capacity
        rnd = random.Random(os.getpid()).random
        skipped: set[int] = set()
        expect = 0
        total = 0
        corrupt = 0
        chunk_pns: list[int] = []
        chunk_pages: list[np.ndarray] = []
        while True:
            if rnd() < 0.001:
                time.sleep(0.0005)
            try:
                b = ring.pop(timeout=10)
            except RingClosed:
                break
            if b is None:
                report["error"] = "pop timed out with a live producer"
                break
            total += 1
            pn = b.packet_num
            if pn == expect:
                expect += 1
            elif pn > expect:
                skipped.update(range(expect, pn))
                report["lost"] += pn - expect
                expect = pn + 1
            elif pn in skipped:
                skipped.discard(pn)
                report["lost"] -= 1
                report["reordered"] += 1
            else:
                report["duplicated"] += 1
            count = min(pn % 129, capacity)
            if b.kind != KIND_DATA or b.block != pn % 7 or b.round != pn // 1000 or len(b.pages) != count:
                corrupt += 1
                continue
            chunk_pns.append(pn)
            chunk_pages.append(b.pages)
            if len(chunk_pns) == 4096:
                corrupt += _check_chunk(chunk_pns, chunk_pages, capacity)
                chunk_pns, chunk_pages = [], []
        corrupt += _check_chunk(chunk_pns, chunk_pages, capacity)
        report["lost"] += n - expect  # never arrived at the end
        report["total"] = total
        report["corrupt"] = corrupt
    except BaseException as exc:  # report rather than die silently
        report["error"] = repr(exc)
    report["stats"] = ring.stats
    ring.close()
    conn.send(report)


def _check_chunk(pns: list[int], pages: list[np.ndarray], capacity: int) -> int:
    """Vectorised content check: page k of batch i must be i + k. Returns the number of bad batches."""
    if not pns:
        return 0
    pn = np.asarray(pns, dtype=np.uint64)
    counts = np.minimum(pn % 129, capacity).astype(np.int64)
    got = np.concatenate(pages)
    starts = np.cumsum(counts) - counts
    expected = np.repeat(pn, counts) + (
        np.arange(got.size, dtype=np.uint64) - np.repeat(starts, counts).astype(np.uint64)
    )
    if np.array_equal(got, expected):
        return 0
    return sum(1 for p, a in zip(pns, pages) if not np.array_equal(a, _expected_pages(p, capacity)))


def _paced_consumer(ring: Ring, conn: Any) -> None:
    """Sleep on the eventfd whenever the ring is empty (no spinning); count arrivals."""
    ring.spin = 0
    got: list[int] = []
    error = None
    try:
        while True:
            try:
                b = ring.pop(timeout=10)
            except RingClosed:
                break
            if b is None:
                error = "pop timed out with a live producer"
                break
            got.append(b.packet_num)
    except BaseException as exc:
        error = repr(exc)
    stats = ring.stats
    ring.close()
    conn.send((got == list(range(len(got))), len(got), stats, error))


def _stalled_consumer(ring: Ring, conn: Any) -> None:
    """Pop what is there, say so, then hang until killed."""
    n = 0
    while ring.pop(timeout=0.5) is not None:
        n += 1
    conn.send(n)
    time.sleep(60)


def _stalled_producer(ring: Ring, conn: Any) -> None:
    """Publish three batches, say so, then hang until killed."""
    for i in range(3):
        ring.push(KIND_DATA, 0, 0, i, np.arange(i, dtype=np.uint64), timeout=5)
    conn.send("pushed")
    time.sleep(60)


# ------------------------------------------------- unit tests


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_every_field(mode: str) -> None:
    assert (KIND_DATA, KIND_SYNC, KIND_EOS, KIND_STOP) == (0, 1, 2, 3)
    with Ring.create(4, 16, mode=mode) as ring:
        assert (ring.nslots, ring.capacity, ring.mode) == (4, 16, mode)
        big = 2**64 - 1
        ring.push(KIND_DATA, 3, 7, 11, np.array([5, 0, big], dtype=np.uint64))
        ring.push(KIND_SYNC, big, big, big, [1, 2, 3])  # a list is accepted
        ring.push(KIND_EOS, 0, 0, 0, np.arange(16, dtype=np.int32))
        ring.push(KIND_STOP, 1, 2, 3, np.array([7], dtype=np.uint8))
        assert len(ring) == 4 and ring.free_slots() == 0
        b = ring.pop(timeout=0)
        assert isinstance(b, Batch)
        assert (b.kind, b.block, b.round, b.packet_num) == (KIND_DATA, 3, 7, 11)
        assert b.pages.dtype == np.uint64 and b.pages.tolist() == [5, 0, big]
        b2 = ring.pop()
        assert (b2.kind, b2.block, b2.round, b2.packet_num, b2.pages.tolist()) == (KIND_SYNC, big, big, big, [1, 2, 3])
        b3 = ring.pop()
        assert b3.kind == KIND_EOS and b3.pages.tolist() == list(range(16))
        b4 = ring.pop()
        assert (b4.kind, b4.block, b4.round, b4.packet_num, b4.pages.tolist()) == (KIND_STOP, 1, 2, 3, [7])
        assert len(ring) == 0 and ring.free_slots() == 4
        # popped pages are private copies: reusing the slot does not change them
        for i in range(4):
            ring.push(KIND_DATA, 0, 0, 100 + i, np.full(16, 99, dtype=np.uint64))
        assert b.pages.tolist() == [5, 0, big]
        assert b.pages.flags.owndata and b.pages.flags.writeable


@pytest.mark.parametrize("mode", MODES)
def test_empty_pages(mode: str) -> None:
    with Ring.create(2, 4, mode=mode) as ring:
        ring.push(KIND_SYNC, 1, 2, 3)
        ring.push(KIND_EOS, 1, 2, 4, np.empty(0, dtype=np.int64))
        for pn in (3, 4):
            b = ring.pop(timeout=0)
            assert b.packet_num == pn and b.pages.dtype == np.uint64 and b.pages.shape == (0,)


@pytest.mark.parametrize("mode", MODES)
def test_capacity_and_argument_limits(mode: str) -> None:
    with Ring.create(2, 8, mode=mode) as ring:
        ring.push(KIND_DATA, 0, 0, 0, np.arange(8))  # exactly capacity is fine
        bad_batches = [
            dict(pages=np.arange(9)),  # over capacity
            dict(pages=np.array([1, -1])),  # negative index
            dict(pages=np.array([1.0, 2.0])),  # not integers
            dict(pages=np.array([True])),
            dict(pages=np.zeros((2, 2), dtype=np.uint64)),  # not 1-D
            dict(kind=6),
            dict(kind=-1),
            dict(block=-1),
            dict(packet_num=2**64),
        ]
        for bad in bad_batches:
            args = dict(kind=KIND_DATA, block=0, round=0, packet_num=1, pages=None) | bad
            with pytest.raises(ConfigError):
                ring.push(args["kind"], args["block"], args["round"], args["packet_num"], args["pages"])
            with pytest.raises(ConfigError):
                ring.try_push(args["kind"], args["block"], args["round"], args["packet_num"], args["pages"])
        # rejected batches consumed no slot
        assert len(ring) == 1
        ring.push(KIND_DATA, 0, 0, 1)
        assert [ring.pop().packet_num, ring.pop().packet_num] == [0, 1]
    for nslots in (0, 1, 3, 6, 2**17, -4, 8.0, True, "8"):
        with pytest.raises(ConfigError):
            Ring.create(nslots, 8)  # type: ignore[arg-type]
    for capacity in (0, -1, 65537, 1.5):
        with pytest.raises(ConfigError):
            Ring.create(8, capacity)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Ring.create(8, 8, mode="fast")


@needs_x86
def test_mode_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    with Ring.create(2, 1) as ring:
        assert ring.mode == "eventidx"  # auto on x86
    monkeypatch.setattr(ring_mod.platform, "machine", lambda: "aarch64")
    with Ring.create(2, 1) as ring:
        assert ring.mode == "credit"
    with pytest.raises(ConfigError):
        Ring.create(2, 1, mode="eventidx")


@pytest.mark.parametrize("mode", MODES)
def test_full_ring(mode: str) -> None:
    with Ring.create(4, 2, mode=mode) as ring:
        for i in range(4):
            assert ring.try_push(KIND_DATA, 0, 0, i, np.arange(i % 3))
        assert ring.free_slots() == 0 and len(ring) == 4
        assert not ring.try_push(KIND_DATA, 0, 0, 4)
        with pytest.raises(RingTimeout):
            ring.push(KIND_DATA, 0, 0, 4, timeout=0)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):  # RingTimeout is a TimeoutError
            ring.push(KIND_DATA, 0, 0, 4, timeout=0.05)
        assert 0.04 <= time.monotonic() - t0 < 2.0
        assert not ring.try_push(KIND_DATA, 0, 0, 4)
        assert not _readable(ring.wait_space_fd())
        assert ring.pop().packet_num == 0
        # after try_push failed, the space fd fires once a slot is free
        assert _readable(ring.wait_space_fd())
        assert ring.try_push(KIND_DATA, 0, 0, 4)
        assert not ring.try_push(KIND_DATA, 0, 0, 5)
        assert [ring.pop().packet_num for _ in range(4)] == [1, 2, 3, 4]


@pytest.mark.parametrize("mode", MODES)
def test_pop_empty_times_out(mode: str) -> None:
    with Ring.create(2, 1, mode=mode) as ring:
        assert ring.pop(timeout=0) is None
        t0 = time.monotonic()
        assert ring.pop(timeout=0.05) is None
        assert 0.04 <= time.monotonic() - t0 < 2.0
        assert ring.stats["timeouts_with_work"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_ring_closed_by_producer_after_drain(mode: str) -> None:
    with Ring.create(4, 1, mode=mode) as ring:
        ring.push(KIND_DATA, 0, 0, 0)
        ring.push(KIND_EOS, 0, 0, 1)
        ring.close_producer()
        ring.close_producer()  # idempotent
        assert ring.producer_closed
        with pytest.raises(RingClosed):
            ring.push(KIND_DATA, 0, 0, 2)
        assert ring.pop(timeout=0).packet_num == 0
        assert ring.pop(timeout=1).packet_num == 1
        with pytest.raises(RingClosed):
            ring.pop(timeout=0)
        with pytest.raises(RingClosed):
            ring.pop(timeout=1)
        with pytest.raises(RingClosed):
            ring.pop()


@pytest.mark.parametrize("mode", MODES)
def test_push_raises_after_consumer_closed(mode: str) -> None:
    with Ring.create(4, 1, mode=mode) as ring:
        ring.push(KIND_DATA, 0, 0, 0)
        ring.close_consumer()
        assert ring.consumer_closed
        with pytest.raises(RingClosed):
            ring.push(KIND_DATA, 0, 0, 1)
        with pytest.raises(RingClosed):
            ring.try_push(KIND_DATA, 0, 0, 1)


@pytest.mark.parametrize("mode", MODES)
def test_close_wakes_a_sleeping_end(mode: str) -> None:
    """Threads of one process share the object: one end sleeps, the other closes it."""
    with Ring.create(2, 1, mode=mode) as ring:
        outcome: list[Any] = []

        def consume() -> None:
            try:
                outcome.append(ring.pop(timeout=None))
            except RingClosed as exc:
                outcome.append(exc)

        t = threading.Thread(target=consume)
        t0 = time.monotonic()
        t.start()
        time.sleep(0.1)
        ring.close_producer()
        t.join(5)
        assert not t.is_alive() and isinstance(outcome[0], RingClosed)
        assert time.monotonic() - t0 < 2.0
        assert ring.stats["consumer_sleeps"] >= 1

    with Ring.create(2, 1, mode=mode) as ring:
        ring.push(KIND_DATA, 0, 0, 0)
        ring.push(KIND_DATA, 0, 0, 1)
        outcome.clear()

        def produce() -> None:
            try:
                ring.push(KIND_DATA, 0, 0, 2, timeout=None)
                outcome.append("pushed")
            except RingClosed as exc:
                outcome.append(exc)

        t = threading.Thread(target=produce)
        t.start()
        time.sleep(0.1)
        ring.close_consumer()
        t.join(5)
        assert not t.is_alive() and isinstance(outcome[0], RingClosed)
        assert ring.stats["producer_sleeps"] >= 1


@pytest.mark.parametrize("mode", MODES)
def test_wake_sleeping_consumer_thread(mode: str) -> None:
    with Ring.create(2, 4, mode=mode) as ring:
        got: list[Batch] = []
        t = threading.Thread(target=lambda: got.append(ring.pop(timeout=10)))
        t.start()
        time.sleep(0.1)
        ring.push(KIND_DATA, 1, 2, 3, np.arange(4))
        t.join(5)
        assert got[0].packet_num == 3 and got[0].pages.tolist() == [0, 1, 2, 3]
        stats = ring.stats
        assert stats["consumer_sleeps"] >= 1 and stats["data_notifications"] >= 1
        assert stats["timeouts_with_work"] == 0


@needs_x86
def test_eventidx_no_notification_without_sleeper() -> None:
    with Ring.create(8, 1, mode="eventidx") as ring:
        for i in range(8):
            ring.push(KIND_DATA, 0, 0, i)
        for _ in range(8):
            ring.pop()
        assert ring.stats["notifications"] == 0  # nobody slept, so no eventfd write


def test_pickling_outside_process_start_is_refused() -> None:
    with Ring.create(2, 1) as ring:
        with pytest.raises(TypeError, match="Process"):
            pickle.dumps(ring)


def test_close_and_unlink() -> None:
    ring = Ring.create(2, 1)
    path = os.path.join("/dev/shm", ring.name)
    with ring:
        assert os.path.exists(path)
        counters = ring.counters
        assert counters.shape == (32,) and counters.dtype == np.uint64 and not counters.any()
        del counters
    assert not os.path.exists(path) and ring.closed
    ring.close()  # idempotent
    with pytest.raises(ValueError):
        ring.push(KIND_DATA, 0, 0, 0)
    with pytest.raises(ValueError):
        ring.pop(timeout=0)
    with pytest.raises(ValueError):
        _ = ring.counters
    # a forked copy of the object is not the creator: it may neither unlink nor (on exit) remove the name
    ctx = multiprocessing.get_context("fork")
    with Ring.create(2, 1) as ring:
        proc = ctx.Process(target=_forked_copy_unlink, args=(ring,))
        proc.start()
        proc.join(10)
        assert proc.exitcode == 0
        assert os.path.exists(os.path.join("/dev/shm", ring.name))


@pytest.mark.parametrize("mode", MODES)
def test_child_attaches_under_every_start_method(start_method: str, mode: str) -> None:
    ctx = multiprocessing.get_context(start_method)
    with Ring.create(4, 8, mode=mode) as ring:
        proc, conn = _run_child(ctx, _child_probe, (ring,))
        try:
            ring.push(KIND_SYNC, 1, 2, 42, np.array([9, 8, 7]), timeout=10)
            assert conn.poll(30), "child did not report"
            packet_num, pages, mode, unlink = conn.recv()
        finally:
            _reap(proc)
        assert (packet_num, pages, mode) == (42, [9, 8, 7], ring.mode)
        assert unlink == "PermissionError"
        assert int(ring.counters[3]) == 12345  # consumer statistics are shared
        assert os.path.exists(os.path.join("/dev/shm", ring.name))
        assert proc.exitcode == 0


# ------------------------------------------------- model-based test

_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("push"),
            st.sampled_from(["push", "try_push"]),
            st.integers(0, 3),
            st.integers(0, 2**64 - 1),
            st.lists(st.integers(0, 2**63 - 1), max_size=5),
            st.sampled_from([np.uint64, np.int64, np.uint32, None]),
        ),
        st.tuples(st.just("pop")),
    ),
    max_size=80,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(MODES), nslots=st.sampled_from([2, 4, 8]), ops=_ops)
def test_behaves_like_bounded_fifo(mode: str, nslots: int, ops: list[tuple[Any, ...]]) -> None:
    model: collections.deque[tuple[int, int, int, int, list[int]]] = collections.deque()
    with Ring.create(nslots, 5, mode=mode) as ring:
        for seq, op in enumerate(ops):
            if op[0] == "push":
                _, how, kind, block, pages, dtype = op
                if dtype is np.uint32:
                    pages = [p % 2**32 for p in pages]
                arr = None if dtype is None else np.array(pages, dtype=dtype)
                want = list(pages) if dtype is not None else []
                full = len(model) == nslots
                if how == "try_push":
                    assert ring.try_push(kind, block, seq, seq, arr) is not full
                elif full:
                    with pytest.raises(RingTimeout):
                        ring.push(kind, block, seq, seq, arr, timeout=0)
                else:
                    ring.push(kind, block, seq, seq, arr, timeout=0)
                if not full:
                    model.append((kind, block, seq, seq, want))
            else:
                b = ring.pop(timeout=0)
                if not model:
                    assert b is None
                else:
                    kind, block, rnd, pn, want = model.popleft()
                    assert (b.kind, b.block, b.round, b.packet_num) == (kind, block, rnd, pn)
                    assert b.pages.dtype == np.uint64 and b.pages.tolist() == want
            assert len(ring) == len(model)
            assert ring.free_slots() == nslots - len(model)
        assert ring.stats["timeouts_with_work"] == 0


# ------------------------------------------------- cross-process stress


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_cross_process_stress(start_method: str, mode: str) -> None:
    """Every batch arrives exactly once, in order, intact; no wake-up is ever lost."""
    n = 1_000_000 if (start_method, mode) == ("fork", "eventidx") else 100_000
    capacity = 128
    ctx = multiprocessing.get_context(start_method)
    # batch i carries pages i, i+1, ..., i+count-1: a slice of one long range
    seq = np.arange(n + capacity, dtype=np.uint64)
    rnd = random.Random(1234).random
    with Ring.create(8, capacity, mode=mode) as ring:
        proc, conn = _run_child(ctx, _stress_consumer, (ring, n))
        try:
            t0 = time.perf_counter()
            push = ring.push
            for i in range(n):
                if rnd() < 0.001:
                    time.sleep(0.0005)
                push(KIND_DATA, i % 7, i // 1000, i, seq[i : i + min(i % 129, capacity)], 30)
            ring.close_producer()
            assert conn.poll(60), "consumer did not report"
            report = conn.recv()
            elapsed = time.perf_counter() - t0
        finally:
            _reap(proc)
        print(f"\n[{start_method}/{mode}] {n} batches in {elapsed:.2f} s = {n / elapsed:,.0f} batches/s; "
              f"producer {ring.stats}; consumer {report.get('stats')}")
        assert report["error"] is None
        assert (report["lost"], report["duplicated"], report["reordered"], report["corrupt"]) == (0, 0, 0, 0)
        assert report["total"] == n
        # both ends really slept, and no sleep ever needed the safety timeout
        assert report["stats"]["consumer_sleeps"] > 0 and ring.stats["producer_sleeps"] > 0
        assert report["stats"]["timeouts_with_work"] == 0
        assert ring.stats["timeouts_with_work"] == 0
        assert proc.exitcode == 0


# ------------------------------------------------- lost wake-ups and notification suppression


@needs_x86
@pytest.mark.timeout(60)
def test_paced_producer_no_lost_wakeup() -> None:
    """A consumer that sleeps whenever the ring is empty gets exactly one notification per sleep."""
    n = 12_000
    ctx = multiprocessing.get_context("fork")
    rnd = random.Random(99)
    clock = time.perf_counter
    with Ring.create(64, 4, mode="eventidx") as ring:
        proc, conn = _run_child(ctx, _paced_consumer, (ring,))
        try:
            i = 0
            while i < n:
                for _ in range(rnd.randint(1, 3)):
                    if i < n:
                        ring.push(KIND_DATA, 0, 0, i, np.arange(i % 5, dtype=np.uint64), timeout=30)
                        i += 1
                # pause 0-200 us; busy-wait, as time.sleep cannot pause less than ~60 us,
                # and the short pauses are the ones that land in the consumer's arming window
                until = clock() + rnd.uniform(0, 200e-6)
                while clock() < until:
                    pass
            pstats = ring.stats  # before close_producer, whose wake-up is not a notification
            ring.close_producer()
            assert conn.poll(60), "consumer did not report"
            in_order, count, cstats, error = conn.recv()
        finally:
            _reap(proc)
    assert error is None and in_order and count == n
    sleeps, notes = cstats["consumer_sleeps"], pstats["data_notifications"]
    print(f"\npaced: {n} batches, {sleeps} consumer sleeps, {notes} data notifications")
    assert sleeps >= n // 20, "the consumer hardly slept: the test did not exercise the handshake"
    # one notification per sleep; slack for the final sleep (ended by close) and a few
    # stale notifications from the arm/re-check window
    assert abs(sleeps - notes) <= max(5, sleeps // 50)
    assert cstats["timeouts_with_work"] == 0 and pstats["timeouts_with_work"] == 0


# ------------------------------------------------- liveness


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_killed_consumer_push_times_out(start_method: str, mode: str) -> None:
    ctx = multiprocessing.get_context(start_method)
    with Ring.create(8, 4, mode=mode) as ring:
        proc, conn = _run_child(ctx, _stalled_consumer, (ring,))
        try:
            for i in range(3):
                ring.push(KIND_DATA, 0, 0, i, timeout=5)
            assert conn.poll(30)
            assert conn.recv() == 3
            proc.kill()
            proc.join(10)
            assert proc.exitcode is not None and proc.exitcode < 0
        finally:
            _reap(proc)
        t0 = time.monotonic()
        pushed = 0
        with pytest.raises(RingTimeout):
            for i in range(100):
                ring.push(KIND_DATA, 0, 0, 3 + i, timeout=0.2)
                pushed += 1
        assert pushed == 8  # the dead consumer had emptied the ring
        assert time.monotonic() - t0 < 5.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_killed_producer_pop_returns_none(mode: str) -> None:
    ctx = multiprocessing.get_context("fork")
    with Ring.create(8, 4, mode=mode) as ring:
        proc, conn = _run_child(ctx, _stalled_producer, (ring,))
        try:
            assert conn.poll(30) and conn.recv() == "pushed"
            proc.kill()
            proc.join(10)
        finally:
            _reap(proc)
        assert [ring.pop(timeout=5).packet_num for _ in range(3)] == [0, 1, 2]
        t0 = time.monotonic()
        assert ring.pop(timeout=0.2) is None
        assert time.monotonic() - t0 < 5.0
