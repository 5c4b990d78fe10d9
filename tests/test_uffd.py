"""KernelTracker: userfaultfd asynchronous write-protection plus PAGEMAP_SCAN.

Every test that needs the kernel skips with the probe's reason where
``kernel_tracking_available()`` says no; the layout, constant and range
conversion tests run everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import multiprocessing
import os
import platform
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmultifd import uffd
from mpmultifd.errors import ConfigError, TrackingUnavailable
from mpmultifd.ram import GuestRAM
from mpmultifd.tracking import make_tracker
from mpmultifd.uffd import KernelTracker, _ranges_to_pages, kernel_tracking_available

PS = 4096
CHILD_TIMEOUT = 60.0

AVAILABLE, REASON = kernel_tracking_available()
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=f"kernel dirty tracking unavailable: {REASON}")


@contextlib.contextmanager
def _region(blocks: dict[str, int], page_size: int = PS) -> Iterator[GuestRAM]:
    with GuestRAM.create(blocks, page_size=page_size) as ram:
        try:
            yield ram
        finally:
            ram.unlink()


@contextlib.contextmanager
def _tracking(ram: GuestRAM) -> Iterator[KernelTracker]:
    tracker = KernelTracker(ram)
    try:
        tracker.start()
        yield tracker
    finally:
        tracker.close()


def _pages(arr: np.ndarray) -> list[int]:
    assert arr.dtype == np.int64
    assert np.all(arr[1:] > arr[:-1]), f"not strictly ascending: {arr}"
    return arr.tolist()


# ---------------------------------------------------------------------- layouts, constants, conversion


def test_struct_layouts_and_request_numbers():
    # sizes from include/uapi/linux/userfaultfd.h and include/uapi/linux/fs.h
    assert ctypes.sizeof(uffd._UffdioApi) == 24
    assert ctypes.sizeof(uffd._UffdioRange) == 16
    assert ctypes.sizeof(uffd._UffdioRegister) == 32
    assert ctypes.sizeof(uffd._UffdioWriteprotect) == 24
    assert ctypes.sizeof(uffd._PmScanArg) == 96
    assert uffd._PmScanArg.walk_end.offset == 32 and uffd._PmScanArg.return_mask.offset == 88
    # the request numbers <linux/userfaultfd.h> yields on x86-64, and _IOWR('f', 16, struct pm_scan_arg)
    assert uffd.UFFDIO_API == 0xC018AA3F
    assert uffd.UFFDIO_REGISTER == 0xC020AA00
    assert uffd.UFFDIO_UNREGISTER == 0x8010AA01
    assert uffd.UFFDIO_WRITEPROTECT == 0xC018AA06
    assert uffd.USERFAULTFD_IOC_NEW == 0xAA00
    assert uffd.PAGEMAP_SCAN == 0xC0606610
    assert (uffd.UFFD_FEATURE_WP_HUGETLBFS_SHMEM, uffd.UFFD_FEATURE_WP_UNPOPULATED, uffd.UFFD_FEATURE_WP_ASYNC) == (
        1 << 12, 1 << 13, 1 << 15)
    assert (uffd.PAGE_IS_WRITTEN, uffd.PM_SCAN_WP_MATCHING, uffd.PM_SCAN_CHECK_WPASYNC) == (1 << 1, 1, 1 << 1)
    assert uffd._SYS_USERFAULTFD["x86_64"] == 323


@given(
    page_size=st.sampled_from([512, 1024, 4096, 16384]),
    npages=st.integers(1, 48),
    ranges=st.lists(st.tuples(st.integers(0, 48 * 16384), st.integers(1, 40000)), max_size=30),
)
def test_ranges_to_pages_matches_brute_force(page_size: int, npages: int, ranges: list[tuple[int, int]]):
    starts = np.array([s for s, _ in ranges], dtype=np.uint64)
    ends = np.array([s + n for s, n in ranges], dtype=np.uint64)
    expected = sorted(
        {p for s, n in ranges for p in range(s // page_size, -(-(s + n) // page_size)) if p < npages}
    )
    assert _pages(_ranges_to_pages(starts, ends, page_size, npages)) == expected


def test_ranges_to_pages_sorted_os_pages_into_larger_block_pages():
    # OS pages 0, 2, 3 and 9 of 4 KiB: block pages of 16 KiB 0 (twice) and 2
    starts = np.array([0, 2 * PS, 9 * PS], dtype=np.uint64)
    ends = np.array([PS, 4 * PS, 10 * PS], dtype=np.uint64)
    assert _pages(_ranges_to_pages(starts, ends, 4 * PS, 4)) == [0, 2]
    assert _pages(_ranges_to_pages(starts[:0], ends[:0], PS, 4)) == []


def test_unavailable_reason_reaches_the_caller(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(uffd, "_PROBE", (False, "no userfaultfd on this test kernel"))
    assert kernel_tracking_available() == (False, "no userfaultfd on this test kernel")
    with _region({"a": 4 * PS}) as ram:
        with pytest.raises(TrackingUnavailable, match="no userfaultfd on this test kernel") as info:
            make_tracker("kernel", ram)
        assert isinstance(info.value, ConfigError)


def test_unknown_architecture_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(platform, "machine", lambda: "ppc64le")
    with pytest.raises(TrackingUnavailable, match="no userfaultfd syscall number known for 'ppc64le'"):
        uffd._check_platform()


def _blocked_syscall(*args: object) -> int:
    ctypes.set_errno(errno.EPERM)  # what a seccomp filter answers
    return -1


def test_blocked_userfaultfd_names_errno_and_the_knobs(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(uffd, "_syscall", _blocked_syscall)
    monkeypatch.setattr(uffd, "_DEV_USERFAULTFD", "/nonexistent/userfaultfd")
    with pytest.raises(TrackingUnavailable) as info:
        uffd._new_userfaultfd(323)
    text = str(info.value)
    assert "userfaultfd(2) failed with EPERM" in text
    assert "vm.unprivileged_userfaultfd" in text and "CAP_SYS_PTRACE" in text
    assert "/nonexistent/userfaultfd: No such file or directory" in text


@needs_kernel
@pytest.mark.skipif(not os.access("/dev/userfaultfd", os.R_OK | os.W_OK), reason="/dev/userfaultfd not usable")
def test_blocked_syscall_falls_back_to_dev_userfaultfd(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(uffd, "_syscall", _blocked_syscall)
    fd = uffd._new_userfaultfd(323)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(fd)
    # and a whole tracker runs on it
    with _region({"a": 4 * PS}) as ram, _tracking(ram) as tracker:
        ram.view(0)[2 * PS] = 1
        assert _pages(tracker.collect(0)) == [2]


def test_probe_answer_is_cached():
    first = kernel_tracking_available()
    assert first is kernel_tracking_available()
    assert isinstance(first[0], bool) and first[1]


# ---------------------------------------------------------------------- exactness


@needs_kernel
def test_writes_from_main_and_second_thread_are_reported_exactly():
    npages = 16
    with _region({"pc.ram": npages * PS}) as ram, _tracking(ram) as tracker:
        view = ram.view(0)
        assert _pages(tracker.collect(0)) == []
        main_pages, thread_pages = {0, 5, 9}, {5, 12, npages - 1}
        for p in main_pages:
            view[p * PS] = 0xAB  # first byte
        writer = threading.Thread(target=lambda: [view.__setitem__((p + 1) * PS - 1, 0xCD) for p in thread_pages])
        writer.start()
        writer.join(10)
        assert not writer.is_alive()
        assert _pages(tracker.collect(0)) == sorted(main_pages | thread_pages)
        assert _pages(tracker.collect(0)) == []
        # reading every byte writes nothing
        assert int(view.sum()) == 0xAB * len(main_pages) + 0xCD * len(thread_pages)
        assert _pages(tracker.collect(0)) == []
        # a page written again after being reported is reported again
        view[5 * PS + 100] = 1
        assert _pages(tracker.collect(0)) == [5]


@needs_kernel
@pytest.mark.parametrize("page_size", [PS, 4 * PS])
def test_random_rounds_match_ground_truth(page_size: int):
    rng = np.random.default_rng(20240607 + page_size)
    blocks = {"pc.ram": 37 * page_size, "vga.vram": 5 * page_size}
    with _region(blocks, page_size) as ram, _tracking(ram) as tracker:
        for _round in range(50):
            truth = []
            for b in ram.blocks:
                view = ram.view(b.index)
                n = int(rng.integers(0, b.npages + 1))
                pages = set(rng.choice(b.npages, size=n, replace=False).tolist())
                if rng.random() < 0.3:
                    pages |= {0, b.npages - 1}  # the block's edges
                for p in pages:
                    where = rng.choice(["first", "last", "any"])
                    off = {"first": 0, "last": page_size - 1}.get(where, int(rng.integers(0, page_size)))
                    view[p * page_size + off] = rng.integers(0, 256)
                truth.append(sorted(pages))
            assert [_pages(got) for got in tracker.collect_all()] == truth, f"round {_round}"


@needs_kernel
def test_block_pages_smaller_than_an_os_page_are_reported_per_os_page():
    ps = 1024  # four block pages per OS page; 14 pages end half-way through the fourth OS page
    with _region({"a": 14 * ps}, ps) as ram, _tracking(ram) as tracker:
        view = ram.view(0)
        view[5 * ps + 7] = 1  # OS page 1: block pages 4-7
        view[13 * ps] = 1  # OS page 3: block pages 12-13 (the rest is past the end of the block)
        assert _pages(tracker.collect(0)) == [4, 5, 6, 7, 12, 13]
        assert _pages(tracker.collect(0)) == []


@needs_kernel
def test_kernel_copies_into_the_mapping_count_file_writes_do_not():
    with _region({"a": 8 * PS}) as ram, _tracking(ram) as tracker:
        view = ram.view(0)
        r, w = os.pipe()
        try:
            os.write(w, b"from a pipe")
            # read(2) copies into this process's mapping, through its page tables
            assert os.readv(r, [memoryview(view[2 * PS : 2 * PS + 11])]) == 11
        finally:
            os.close(r)
            os.close(w)
        assert view[2 * PS : 2 * PS + 11].tobytes() == b"from a pipe"
        assert _pages(tracker.collect(0)) == [2]
        # pwrite to the file goes through the page cache, not the page tables: not seen
        fd = os.open(ram.blocks[0].path, os.O_RDWR)
        try:
            os.pwrite(fd, b"behind its back", 6 * PS)
        finally:
            os.close(fd)
        assert view[6 * PS : 6 * PS + 15].tobytes() == b"behind its back"
        assert _pages(tracker.collect(0)) == []


# ---------------------------------------------------------------------- races


@needs_kernel
@pytest.mark.timeout(60)
def test_write_racing_with_collect_is_never_lost():
    npages, hot = 8, [0, 3, 7]
    with _region({"a": npages * PS}) as ram, _tracking(ram) as tracker:
        view = ram.view(0)
        base = view.ctypes.data
        # page 3 takes its counter in its last 8 bytes, the others in their first
        offset = {p: (PS - 8 if p == 3 else 0) for p in hot}
        stop = threading.Event()
        last: dict[int, int] = {}

        def writer() -> None:
            word = ctypes.c_uint64()
            count = 0
            while not stop.is_set() and count < 5_000_000:
                count += 1
                page = hot[count % len(hot)]
                word.value = count
                # a ctypes call drops the GIL, so the store runs while collect walks the pages
                ctypes.memmove(base + page * PS + offset[page], ctypes.addressof(word), 8)
                last[page] = count

        def read(page: int) -> int:
            start = page * PS + offset[page]
            return int(view[start : start + 8].view(np.uint64)[0])

        seen: dict[int, int] = {}  # page -> its value read right after the collect that reported it
        union: set[int] = set()

        def take() -> None:
            for p in _pages(tracker.collect(0)):
                union.add(p)
                seen[p] = read(p)

        thread = threading.Thread(target=writer)
        thread.start()
        rounds = 0
        try:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                take()
                rounds += 1
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive()
        take()
        assert rounds > 10 and len(last) == len(hot)
        assert set(last) <= union <= set(hot)
        # what a migration would have sent last for each page is its final content
        assert {p: seen[p] for p in hot} == last
        assert _pages(tracker.collect(0)) == []


# ---------------------------------------------------------------------- other processes


def _child_writes(ram: GuestRAM, pages: list[int]) -> None:
    view = ram.view(0)
    for p in pages:
        view[p * PS] = 0x5A
    ram.close()


def _forked_child_writes(tracker: KernelTracker, ram: GuestRAM, pages: list[int]) -> None:
    # the inherited tracker names the parent's address space: no collect here,
    # and close() must leave the parent's registration alone
    try:
        tracker.collect(0)
    except RuntimeError as exc:
        assert "forked child" in str(exc)
    else:
        raise AssertionError("collect() in a forked child did not raise")
    tracker.close()
    _child_writes(ram, pages)


@needs_kernel
@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_writes_from_a_child_process_are_not_reported(method: str):
    ctx = multiprocessing.get_context(method)
    with _region({"a": 8 * PS}) as ram, _tracking(ram) as tracker:
        view = ram.view(0)
        view[1 * PS] = 1
        if method == "fork":
            proc = ctx.Process(target=_forked_child_writes, args=(tracker, ram, [2, 3]))
        else:
            proc = ctx.Process(target=_child_writes, args=(ram, [2, 3]))
        proc.start()
        proc.join(CHILD_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join()
            pytest.fail(f"{method} child did not finish within {CHILD_TIMEOUT} s")
        assert proc.exitcode == 0, f"{method} child failed (exit code {proc.exitcode}); see captured stderr"
        assert view[2 * PS] == view[3 * PS] == 0x5A  # the child's writes landed in the region...
        assert _pages(tracker.collect(0)) == [1]  # ...but only this process's write is reported
        view[4 * PS + 9] = 1  # and tracking in this process goes on
        assert _pages(tracker.collect(0)) == [4]


# ---------------------------------------------------------------------- lifecycle


@needs_kernel
def test_make_tracker_lifecycle_and_close_twice():
    with _region({"a": 4 * PS, "b": 2 * PS}) as ram:
        tracker = make_tracker("kernel", ram)
        try:
            assert isinstance(tracker, KernelTracker) and tracker.name == "kernel"
            with pytest.raises(RuntimeError, match="before start"):
                tracker.collect(0)
            tracker.start()
            ram.view(1)[PS] = 3
            assert [_pages(p) for p in tracker.collect_all()] == [[], [1]]
            assert tracker.seconds > 0
        finally:
            tracker.close()
        tracker.close()
        with pytest.raises(RuntimeError, match="before start"):
            tracker.collect(0)
        # closing without ever starting is fine too
        KernelTracker(ram).close()


@needs_kernel
def test_second_tracker_on_the_same_region_is_refused_until_the_first_closes():
    with _region({"a": 4 * PS}) as ram:
        with _tracking(ram):
            with pytest.raises(TrackingUnavailable, match="EBUSY.*another userfaultfd"):
                KernelTracker(ram)
        # the first one unregistered on close: a new tracker works
        with _tracking(ram) as tracker:
            ram.view(0)[3 * PS] = 1
            assert _pages(tracker.collect(0)) == [3]
