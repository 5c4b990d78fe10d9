"""Rounds on the source: a round's pages cut into batches for the channels' rings, paced, then SYNC or EOS.

Each batch goes to the emptiest ring (ties taken in turn, so a paced round
keeps every channel busy), after the shared token bucket has room for it;
the final round, with the guest paused, is not paced (as QEMU). The pages
known to be holes of the source's files go as zero-page batches, which the
workers send without reading them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from .channels import Channel, ChannelGroup
from .pacing import TokenBucket
from .ram import GuestRAM
from .ring import KIND_DATA, KIND_EOS, KIND_SYNC, KIND_ZERO
from .worker import C_NORMAL, C_WIRE_BYTES, C_ZERO

__all__ = ["RoundDispatcher", "split_holes"]


def split_holes(ram: GuestRAM) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every page of every block, as (pages with data, holes) per block."""
    data, holes = [], []
    for b in ram.blocks:
        mask = np.zeros(b.npages, dtype=bool)
        for first, end in ram.data_extents(b.index):
            mask[first:end] = True
        data.append(np.flatnonzero(mask).astype(np.int64, copy=False))
        holes.append(np.flatnonzero(~mask).astype(np.int64, copy=False))
    return data, holes


class RoundDispatcher:
    """Hands one run's rounds to a :class:`~mpmultifd.channels.ChannelGroup` of sender or writer workers.

    ``cap()`` is the current bandwidth cap (None: none; it may change while a
    round runs); ``pump(timeout)`` handles the coordinator's events while a
    ring is full or the bucket empty.
    """

    def __init__(
        self,
        group: ChannelGroup,
        ram: GuestRAM,
        packet_pages: int,
        bucket: TokenBucket,
        cap: Callable[[], int | None],
        pump: Callable[[float], object],
    ) -> None:
        self.group = group
        self.ram = ram
        self.packet_pages = packet_pages
        self.bucket = bucket
        self.cap = cap
        self.pump = pump
        self.packet_num = 0  # numbers every packet of the run, in the order pushed
        self.pages_pushed = 0
        self._next_channel = 0  # where the next tie between equally empty rings starts

    def send_round(
        self,
        rnd: int,
        pending: list[np.ndarray],
        *,
        final: bool,
        before_end: Callable[[], None] | None = None,
        known_zero: list[np.ndarray] | None = None,
    ) -> tuple[int, ...]:
        """Cut the round's pages into batches and hand them to the emptiest rings, then SYNC (or EOS)
        on every channel; returns how many packets each channel got (what ROUND_END/COMPLETE say)."""
        chans = self.group.channels
        n = self.packet_pages
        for ch in chans:
            ch.packets_in_round = 0
        ps = self.ram.page_size
        paced = not final  # the final round runs with the guest paused: no cap (as QEMU)
        batches = [(KIND_DATA, block, pages) for block, pages in enumerate(pending)]
        if known_zero is not None:
            batches += [(KIND_ZERO, block, pages) for block, pages in enumerate(known_zero)]
        for kind, block, pages in batches:
            for first in range(0, len(pages), n):
                batch = pages[first : first + n]
                if paced and self.cap() is not None:
                    self._wait_for_budget(len(batch) * ps if kind == KIND_DATA else 8 * len(batch))
                # the emptiest ring; ties go round the channels, not always to channel 0 (a paced
                # round would otherwise leave the others idle)
                turn = self._next_channel % len(chans)
                ch = min(chans[turn:] + chans[:turn], key=lambda c: c.queued())
                self._next_channel = ch.index + 1
                self.push(ch, kind, block, rnd, batch)
                self.pages_pushed += len(batch)
                ch.packets_in_round += 1
        if before_end is not None:
            before_end()
        kind = KIND_EOS if final else KIND_SYNC
        for ch in chans:
            self.push(ch, kind, 0, rnd, None)
        return tuple(ch.packets_in_round for ch in chans)

    def push(self, ch: Channel, kind: int, block: int, rnd: int, pages: np.ndarray | None) -> None:
        num = self.packet_num
        self.packet_num += 1
        self.group.push(ch, (kind, block, rnd, num, pages), self.pump)

    def _wait_for_budget(self, nbytes: int) -> None:
        """Hold the next batch until the shared token bucket has room for it."""
        ps = self.ram.page_size
        while self.cap() is not None:
            wire = done = 0
            for ch in self.group.channels:
                assert ch.ring is not None
                c, base = ch.ring.counters, ch.counter_base
                wire += int(c[C_WIRE_BYTES]) + base.get("bytes", 0)
                done += int(c[C_NORMAL]) + int(c[C_ZERO]) + base.get("normal", 0) + base.get("duplicate", 0)
            # bytes sent, plus batches queued but not sent yet at their full size
            # (resent batches after a reconnect make done run ahead: never negative)
            used = wire + max(self.pages_pushed - done, 0) * ps + nbytes
            wait = self.bucket.delay(used, time.monotonic())
            if wait <= 0:
                return
            self.pump(min(wait, 0.05))

    def wait_synced(self, rnd: int) -> None:
        """Until every worker handed round ``rnd`` to its socket or file."""
        while any(ch.synced < rnd for ch in self.group.channels):
            self.pump(1.0)

    def wait_done(self) -> None:
        """Until every worker reached its end of stream."""
        while not all(ch.done for ch in self.group.channels):
            self.pump(1.0)
