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

Why a scanning fingerprint misses (almost) nothing
--------------------------------------------------
A page is read as 32-bit words ``x[i]`` and fingerprinted as
``F = sum(K[i] * x[i]) mod 2**64`` with ``K`` drawn at random (odd) when the
tracker starts. A change turns ``x`` into ``x + d`` with every ``|d[i]| < 2**32``
and changes ``F`` by ``sum(K[i] * d[i]) mod 2**64``:

- if one word changed, ``K[i] * d[i]`` is never 0 mod ``2**64``, because ``K[i]``
  is odd and ``0 < |d[i]| < 2**64``: every change confined to one aligned
  32-bit word (any single byte, first or last of the page included) is caught
  with certainty;
- otherwise, let ``2**t`` be the largest power of two dividing the changed word
  with the fewest trailing zero bits (``t <= 31``, because ``|d[i]| < 2**32``).
  For any fixed change, the fingerprint is unchanged for at most one residue of
  that word's key modulo ``2**(64 - t)``, so over the random key the miss
  probability is at most ``2**-(63 - t) <= 2**-32``, and ``2**-63`` for the
  typical change whose lowest changed bit is bit 0.

Reading 32-bit rather than 64-bit words is what bounds ``t``: with 64-bit words a
change that only flips the sign bits of two doubles would be missed every time.
The key is secret to the process, so no writer can aim at a collision, and the
switchover's verification (``MigrationConfig.verify``) fingerprints every page
again with an independent key, so a miss would fail the migration loudly, never
leave a silent difference.
"""

from __future__ import annotations

import abc
import os
import time
from typing import ClassVar

import numpy as np

from .config import DIRTY_TRACKERS
from .errors import ConfigError
from .ram import GuestRAM

__all__ = [
    "DirtyTracker",
    "DirtyMapTracker",
    "ScanningTracker",
    "TRACKERS",
    "make_tracker",
    "scan_fingerprints",
]

TRACKERS = DIRTY_TRACKERS  # the names MigrationConfig.dirty_tracker accepts

# pages fingerprinted per numpy call: the uint64 temporary (8 KiB per 4 KiB page)
# stays in the cache
_SCAN_CHUNK = 256


class DirtyTracker(abc.ABC):
    """Reports the pages written since it last reported; one per region and Source.

    ``start()`` begins tracking: every write from then on is reported by a later
    ``collect``. ``collect(block)`` returns the pages of ``block`` (an index)
    written since the previous ``collect`` of that block, or since ``start()``.
    ``seconds`` is the time spent in ``start`` and ``collect`` so far.
    """

    name: ClassVar[str]

    def __init__(self, ram: GuestRAM) -> None:
        self.ram = ram
        self.seconds = 0.0
        self.started = False

    def start(self) -> None:
        t0 = time.perf_counter()
        self._start()
        self.started = True
        self.seconds += time.perf_counter() - t0

    def collect(self, block: int) -> np.ndarray:
        if not self.started:
            raise RuntimeError(f"{type(self).__name__}.collect() before start()")
        t0 = time.perf_counter()
        pages = self._collect(block)
        self.seconds += time.perf_counter() - t0
        return pages

    def collect_all(self) -> list[np.ndarray]:
        """``collect`` of every block, in block order."""
        return [self.collect(b.index) for b in self.ram.blocks]

    def close(self) -> None:
        """Stop tracking and release what the tracker holds; idempotent."""
        self.started = False

    @abc.abstractmethod
    def _start(self) -> None: ...

    @abc.abstractmethod
    def _collect(self, block: int) -> np.ndarray: ...


class DirtyMapTracker(DirtyTracker):
    """The writers mark pages in the region's shared dirty map; this takes the marks."""

    name = "map"

    def _start(self) -> None:
        for b in self.ram.blocks:
            self.ram.snapshot_dirty(b.index)

    def _collect(self, block: int) -> np.ndarray:
        return self.ram.snapshot_dirty(block)


def _scan_key(page_size: int) -> np.ndarray:
    words = page_size // 4
    key = np.frombuffer(os.urandom(8 * words), dtype=np.uint64).copy()
    key |= np.uint64(1)
    return key


def scan_fingerprints(
    ram: GuestRAM, block: int, key: np.ndarray, out: np.ndarray, *, chunk: int = _SCAN_CHUNK
) -> None:
    """Fingerprint every page of ``block`` that holds data into ``out`` (uint64); holes get 0.

    The fingerprint of an all-zero page is 0 too, so a page that becomes a hole
    (or is zeroed) reads as unchanged only if it was zero before.
    """
    pages = ram.pages(block)
    words = pages.view(np.uint32)
    out[:] = 0
    tmp = np.empty((chunk, words.shape[1]), dtype=np.uint64)
    for first, end in ram.data_extents(block):
        for s in range(first, end, chunk):
            e = min(s + chunk, end)
            t = tmp[: e - s]
            np.copyto(t, words[s:e])  # widen; the products wrap mod 2**64 as intended
            np.matmul(t, key, out=out[s:e])


class ScanningTracker(DirtyTracker):
    """Finds written pages by fingerprinting every page with data once per round.

    Needs no cooperation from the writers, so it works for a region another
    program writes. Costs one read of the region's allocated pages per round
    (``tools/bench_convergence.py`` measures it per GiB) and 16 bytes per page.
    See the module documentation for why it misses no single-word change and
    any other change with probability at most ``2**-32``.
    """

    name = "scan"

    def __init__(self, ram: GuestRAM) -> None:
        super().__init__(ram)
        self._key = _scan_key(ram.page_size)
        self._prints = [np.zeros(b.npages, dtype=np.uint64) for b in ram.blocks]
        self._fresh = [np.zeros(b.npages, dtype=np.uint64) for b in ram.blocks]

    def _start(self) -> None:
        for b in self.ram.blocks:
            scan_fingerprints(self.ram, b.index, self._key, self._prints[b.index])

    def _collect(self, block: int) -> np.ndarray:
        fresh = self._fresh[block]
        scan_fingerprints(self.ram, block, self._key, fresh)
        changed = np.flatnonzero(fresh != self._prints[block]).astype(np.int64, copy=False)
        self._fresh[block], self._prints[block] = self._prints[block], fresh
        return changed


def make_tracker(kind: str, ram: GuestRAM) -> DirtyTracker:
    """The tracker named ``kind`` (one of :data:`TRACKERS`) for ``ram``.

    Raises :class:`~mpmultifd.errors.TrackingUnavailable` (a ConfigError) with
    the reason when the kernel tracker cannot run here.
    """
    if kind == "map":
        return DirtyMapTracker(ram)
    if kind == "scan":
        return ScanningTracker(ram)
    if kind == "kernel":
        from .uffd import KernelTracker

        return KernelTracker(ram)
    raise ConfigError(f"dirty_tracker: {kind!r} is not one of {', '.join(TRACKERS)}")
