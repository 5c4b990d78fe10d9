"""Fingerprinting the source's region in its channel workers: scans, the verification pass, and their price.

The scanning tracker's scans, the verification fingerprints of the paused
guest and the calibration slices that price them are all ring jobs
(``KIND_SCAN``) for the idle sender workers, which fingerprint their part of
the shared RAM into the shared page records (:class:`~mpmultifd.worker.PageRecords`)
and report :class:`~mpmultifd.messages.Scanned`. A job whose worker died,
was replaced or ran out of time is done by the coordinator itself, so a scan
always completes.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from .channels import Channel, ChannelGroup
from .errors import RingClosed, RingTimeout
from .messages import Scanned
from .pageprint import fingerprint_extents, fingerprint_rows, key_from_seed, split_ranges
from .ram import GuestRAM
from .ring import KIND_SCAN
from .worker import PageRecords

__all__ = ["ScanScheduler", "fingerprint_seconds_per_page"]

Extents = list[tuple[int, int]]

# round trips and wake-ups of a switchover (EOS, RESULT, COMMIT and its acknowledgement)
SWITCH_LATENCY = 0.01
# the VERIFY message and the destination's comparison, per page of the region
COMPARE_SECONDS_PER_PAGE = 20e-9
# pages each worker fingerprints per round to price the pause's verification pass
CALIBRATION_PAGES = 4096
# the pause's verification pass against its calibration (tools/bench_downtime.py, 1 GiB, map tracker)
PAUSE_CONTENTION = 1.25

_FINGERPRINT_COST: dict[int, float] = {}


def fingerprint_seconds_per_page(page_size: int) -> float:
    """What fingerprinting one page costs on this machine, timed once on a private buffer.

    Times the keyed 32-bit fingerprint (migrations' scans and verification),
    the dearer of the two kinds, so the estimate errs on the long side.
    """
    cost = _FINGERPRINT_COST.get(page_size)
    if cost is None:
        n = max(1, (2 << 20) // page_size)
        buf = np.ones((n, page_size), dtype=np.uint8)  # touched now, not inside the timing
        key = key_from_seed(b"timing", page_size)
        out = np.empty(n, dtype=np.uint64)
        fingerprint_rows(buf, key, out)
        # the best of several short passes: what the pass costs, not how often this process was preempted
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            fingerprint_rows(buf, key, out)
            best = min(best, time.perf_counter() - t0)
        cost = _FINGERPRINT_COST[page_size] = best / n
    return cost


def skip_pages(extents: Extents, n: int) -> Extents:
    """``extents`` without their first ``n`` pages."""
    out = []
    for f, e in extents:
        if n >= e - f:
            n -= e - f
            continue
        out.append((f + n, e))
        n = 0
    return out


def take_pages(extents: Extents, n: int) -> Extents:
    """The first ``n`` pages of ``extents``, as extents."""
    out: Extents = []
    for f, e in extents:
        if n <= 0:
            break
        take = min(e - f, n)
        out.append((f, f + take))
        n -= take
    return out


class ScanScheduler:
    """Hands fingerprinting jobs to a migration's sender workers and prices the pause's share of them.

    ``key_of()`` is the key the workers fingerprint with (the scanning
    tracker's, else the verification key); ``records`` are the shared page
    records the results land in; ``pump(timeout)`` handles the coordinator's
    events while it waits.
    """

    def __init__(
        self,
        ram: GuestRAM,
        group: ChannelGroup,
        pump: Callable[[float], object],
        key_of: Callable[[], np.ndarray],
        timeout: float,
    ) -> None:
        self.ram = ram
        self.group = group
        self.pump = pump
        self.key_of = key_of
        self.timeout = timeout
        self.records: PageRecords | None = None
        # jobs handed out and not reported done: id -> (block, extents, channel, its generation then)
        self.pending: dict[int, tuple[int, Extents, Channel, int]] = {}
        self._next_id = 0
        self.worker_pace: dict[int, list[float]] = {}  # channel -> seconds per page of its latest jobs

    def usable(self) -> list[Channel]:
        """The sender workers that can take a job now."""
        return [ch for ch in self.group if ch.ready and not ch.done and not ch.reconnecting and ch.sock is not None]

    def scanned(self, ch: Channel, msg: Scanned) -> None:
        """A worker's report that job ``msg.job`` is done."""
        self.pending.pop(msg.job, None)
        if msg.pages > 0:
            # seconds per page as that worker ran it; its last three, so one preempted job does not count alone
            samples = self.worker_pace.setdefault(ch.index, [])
            samples.append(msg.seconds / msg.pages)
            del samples[:-3]

    def queue(self, ch: Channel, block: int, extents: Extents) -> list[int]:
        """Hand ``extents`` of ``block`` to ``ch``'s worker as scan jobs; returns their ids."""
        assert ch.ring is not None
        per_job = max(1, ch.ring.capacity // 2)
        ids = []
        for s in range(0, len(extents), per_job):
            part = extents[s : s + per_job]
            jid = self._next_id
            self._next_id += 1
            self.pending[jid] = (block, part, ch, ch.generation)
            ids.append(jid)
            pairs = np.asarray(part, dtype=np.uint64).reshape(-1)
            while True:
                try:
                    ch.ring.push(KIND_SCAN, block, jid, 0, pairs, timeout=0.1)
                    break
                except RingTimeout:
                    self.pump(0)
                except RingClosed:
                    break  # the worker is gone: finish() does this job here
        return ids

    def finish(self, deadline: float, ids: list[int] | None = None) -> None:
        """Wait for scan jobs; any whose worker died, was replaced or ran out of time is done here."""
        pending = self.pending
        want = list(pending) if ids is None else ids
        while any(j in pending for j in want) and time.monotonic() < deadline:
            lost = [
                j for j in want if j in pending and (pending[j][2].generation != pending[j][3] or pending[j][2].done)
            ]
            if lost and len(lost) == sum(1 for j in want if j in pending):
                break
            self.pump(0.2)
        key = self.key_of()
        assert self.records is not None
        for j in want:
            job = pending.pop(j, None)
            if job is not None:
                block, part, _, _ = job
                fingerprint_extents(self.ram.pages(block), part, key, self.records.scanned[block])

    def scan_block(self, block: int, out: np.ndarray) -> None:
        """Fingerprint every page of ``block`` that holds data into ``out`` (the shared scan record),
        holes as 0, spread over the idle channel workers (and this thread, with a CPU to spare)."""
        ram = self.ram
        extents = ram.data_extents(block)
        out[:] = 0
        usable = self.usable()
        local = len(usable) < (os.cpu_count() or 1) or not usable
        parts = split_ranges(extents, len(usable) + (1 if local else 0))
        jobs = []
        for ch, part in zip(usable, parts):
            jobs += self.queue(ch, block, part)
        for part in parts[len(usable) :]:
            fingerprint_extents(ram.pages(block), part, self.key_of(), out)
        self.finish(time.monotonic() + self.timeout, jobs)

    def queue_verification(self) -> None:
        """Before the final EOS: every worker fingerprints its share of the paused guest."""
        assert self.records is not None
        usable = self.usable()
        for b in self.ram.blocks:
            self.records.scanned[b.index][:] = 0
            parts = split_ranges(self.ram.data_extents(b.index), len(usable))
            for ch, part in zip(usable, parts):
                self.queue(ch, b.index, part)

    def calibrate(self, rnd: int) -> None:
        """Every idle worker fingerprints a slice of the region's data (a different one each round)
        and reports how long it took: the pause's verification pass is priced from that."""
        ram = self.ram
        usable = self.usable()
        if not usable or self.records is None:
            return
        ids = []
        for i, ch in enumerate(usable):
            block = ram.blocks[(rnd + i) % len(ram.blocks)]
            extents = ram.data_extents(block.index)
            total = sum(e - f for f, e in extents)
            if total == 0:
                continue
            n = min(CALIBRATION_PAGES, total)
            start = ((rnd * len(usable) + i) * n) % (total - n + 1)  # a different slice each time
            ids += self.queue(ch, block.index, take_pages(skip_pages(extents, start), n))
        self.finish(time.monotonic() + self.timeout, ids)

    def pause_cost(self, *, save: bool, scanned_by_tracker: bool, channels: int) -> float:
        """Seconds the pause will spend fingerprinting pages, beyond the last dirty sync.

        A save fingerprints the paused guest in the coordinator for its
        digests. A migration with ``verify`` fingerprints it in the workers, in
        parallel (nothing extra when the scanning tracker's final scan serves);
        the destination fingerprinted each page as it arrived and only
        compares arrays.
        """
        ram = self.ram
        pages = sum(e - f for b in ram.blocks for f, e in ram.data_extents(b.index))
        per_page = fingerprint_seconds_per_page(ram.page_size)
        if save:
            return per_page * pages
        cost = SWITCH_LATENCY + COMPARE_SECONDS_PER_PAGE * ram.total_pages
        if not scanned_by_tracker:
            workers = max(1, len(self.usable()) or channels)
            # the slowest worker's measured pace, when the workers have scanned (see calibrate)
            measured = max(statistics.median(v) for v in self.worker_pace.values()) if self.worker_pace else None
            if measured is not None:
                # in the pause the pass shares the CPUs with the final round's receivers, and reads
                # from memory what a calibration slice may find in cache: 1 GiB measured 10-25% above
                cost += PAUSE_CONTENTION * measured * -(-pages // workers)
            else:
                cost += per_page * pages / max(1, min(workers, os.cpu_count() or 1))
        return cost
