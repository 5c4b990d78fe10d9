"""Dirty sources: who tells the coordinator which pages changed since the last round.

Every tracker answers one question per block and round, ``collect(block)``:
the pages written since the previous ``collect`` (or since ``start()``), as
ascending int64 page indices. The coordinator calls ``collect`` and only then
lets workers read those pages, so a write that lands after ``collect`` has
returned is reported by the next one (invariant 2).

- ``"map"`` (:class:`DirtyMapTracker`): the writers mark pages in the region's
  shared dirty map (``GuestRAM.write`` / ``mark_dirty``). Cheapest; needs
  cooperation.
- ``"scan"`` (:class:`ScanningTracker`): no cooperation at all. One numpy pass
  per round computes a keyed 64-bit fingerprint of every page that holds data;
  a changed fingerprint means the page is dirty. Works for a region another
  program writes, such as a running QEMU guest's ``memory-backend-file``.
- ``"kernel"`` (:class:`~mpmultifd.uffd.KernelTracker`): userfaultfd
  write-protection in asynchronous mode plus the ``PAGEMAP_SCAN`` ioctl
  (Linux 6.7+). The kernel records writes made through this process's
  mappings, so every writer must be a thread of this process.

What the scanning tracker compares against
------------------------------------------
A page is dirty when its bytes differ from the bytes the destination holds,
not from the previous scan: a lock word taken between a scan and the send and
released before the next scan would otherwise look clean while the
destination keeps the taken copy. So during a migration the channel workers
copy each batch into private memory, send that copy, and record its
fingerprints (:mod:`mpmultifd.pageprint`) in a shared array; ``collect``
compares a fresh scan against that record (``recorded=True``). Without
workers that record (``estimate``) it compares consecutive scans. The
fingerprint misses no change confined to one 32-bit word and any other with
probability at most ``2**-32`` (:mod:`mpmultifd.pageprint`); the
switchover's verification fingerprints every page again, so a miss is
repaired or fails loudly, never left silent.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .config import DIRTY_TRACKERS
from .errors import ConfigError
from .pageprint import ROWS_PER_CALL, fingerprint_extents, random_key
from .ram import GuestRAM
from .tracker_base import DirtyTracker
from .uffd import KernelTracker

__all__ = [
    "DirtyTracker",
    "DirtyMapTracker",
    "ScanningTracker",
    "TRACKERS",
    "make_tracker",
    "scan_fingerprints",
]

TRACKERS = DIRTY_TRACKERS  # the names MigrationConfig.dirty_tracker accepts



class DirtyMapTracker(DirtyTracker):
    """The writers mark pages in the region's shared dirty map; this takes the marks."""

    name = "map"

    def _start(self) -> None:
        for b in self.ram.blocks:
            self.ram.snapshot_dirty(b.index)

    def _collect(self, block: int) -> np.ndarray:
        return self.ram.snapshot_dirty(block)


def scan_fingerprints(
    ram: GuestRAM, block: int, key: np.ndarray, out: np.ndarray, *, chunk: int = ROWS_PER_CALL
) -> None:
    """Fingerprint every page of ``block`` that holds data into ``out`` (uint64); holes get 0.

    The fingerprint of an all-zero page is 0 too, so a page that becomes a hole
    (or is zeroed) reads as unchanged only if it was zero before.
    """
    out[:] = 0
    fingerprint_extents(ram.pages(block), ram.data_extents(block), key, out)


# fills its second argument with the fingerprints of every page of block (holes 0)
Scanner = Callable[[int, np.ndarray], None]


class ScanningTracker(DirtyTracker):
    """Finds written pages by fingerprinting every page with data once per round.

    Needs no cooperation from the writers, so it works for a region another
    program writes. Costs one read of the region's allocated pages per round
    (``tools/bench_convergence.py`` measures it per GiB) and 16 bytes per page.

    ``baseline`` and ``fresh`` (one uint64 per page of each block) may be
    arrays in shared memory that channel workers write: with ``recorded=True``
    the workers put the fingerprint of every page they send into ``baseline``,
    and a page is dirty when a fresh scan differs from it. ``scanner`` replaces
    the in-process scan (the source spreads it over its idle channel workers).
    """

    name = "scan"

    def __init__(
        self,
        ram: GuestRAM,
        key: np.ndarray | None = None,
        *,
        baseline: list[np.ndarray] | None = None,
        fresh: list[np.ndarray] | None = None,
    ) -> None:
        super().__init__(ram)
        self.key = key if key is not None else random_key(ram.page_size)
        self.baseline = baseline if baseline is not None else [np.zeros(b.npages, dtype=np.uint64) for b in ram.blocks]
        self.fresh = fresh if fresh is not None else [np.zeros(b.npages, dtype=np.uint64) for b in ram.blocks]
        self.recorded = False
        self.scanner: Scanner | None = None

    def _scan(self, block: int, out: np.ndarray) -> None:
        if self.scanner is not None:
            self.scanner(block, out)
        else:
            scan_fingerprints(self.ram, block, self.key, out)

    def _start(self) -> None:
        if self.recorded:
            return  # the first round sends every page and records what it sent
        for b in self.ram.blocks:
            self._scan(b.index, self.baseline[b.index])

    def _collect(self, block: int) -> np.ndarray:
        fresh = self.fresh[block]
        self._scan(block, fresh)
        changed = np.flatnonzero(fresh != self.baseline[block]).astype(np.int64, copy=False)
        if not self.recorded:
            self.baseline[block][:] = fresh
        return changed

    def release(self) -> None:
        """Drop the arrays (they may be views of shared memory the caller wants to close)."""
        self.baseline = []
        self.fresh = []
        self.scanner = None


def make_tracker(kind: str, ram: GuestRAM, **scan_options: object) -> DirtyTracker:
    """The tracker named ``kind`` (one of :data:`TRACKERS`) for ``ram``.

    Raises :class:`~mpmultifd.errors.TrackingUnavailable` (a ConfigError) with
    the reason when the kernel tracker cannot run here.
    """
    if kind == "map":
        return DirtyMapTracker(ram)
    if kind == "scan":
        return ScanningTracker(ram, **scan_options)  # type: ignore[arg-type]
    if kind == "kernel":
        return KernelTracker(ram)
    raise ConfigError(f"dirty_tracker: {kind!r} is not one of {', '.join(TRACKERS)}")
