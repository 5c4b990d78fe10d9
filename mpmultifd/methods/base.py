"""The method interface: what a payload method's sender and receiver sides are, and the page batch and
sink they work on (:mod:`mpmultifd.methods` re-exports all of it; methods import it from here)."""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..pageprint import fingerprint_rows
from ..transport import recv_exact_into, recv_exact_into_views
from ..wire import DataHeader

__all__ = ["Method", "MethodReceiver", "MethodSender", "PageBatch", "PageSink", "Prepared", "is_one_run", "page_runs"]


def page_runs(pages: np.ndarray) -> tuple[list[int], list[int]]:
    """Split page indices (in order) into runs of consecutive pages: (starts, lengths)."""
    if len(pages) == 0:
        return [], []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return pages[starts].tolist(), (ends - starts).tolist()


def is_one_run(pages: np.ndarray) -> bool:
    """True when ``pages`` (non-empty, in payload order) are consecutive: a slice, not a gather.

    The ends alone would not tell, since pages come in payload order, not sorted.
    """
    n = len(pages)
    return int(pages[-1]) - int(pages[0]) == n - 1 and (n < 3 or bool((np.diff(pages) == 1).all()))


@dataclass
class PageBatch:
    """The normal (non-zero) pages of one packet, as a method's sender sees them.

    ``pages`` are page indices into block ``block`` in payload order; ``data``
    is the whole block's memory (shared RAM: it may change while being read);
    ``grid`` is the same memory as a ``(npages, page_size)`` uint8 array.
    """

    block: int
    page_size: int
    pages: np.ndarray
    data: memoryview
    grid: np.ndarray

    def iovs(self) -> list[memoryview]:
        """Memoryview slices of the shared RAM, one per run of consecutive pages (no copy)."""
        ps = self.page_size
        starts, lengths = page_runs(self.pages)
        data = self.data
        return [data[s * ps : (s + n) * ps] for s, n in zip(starts, lengths)]

    def gather(self, out: np.ndarray | None = None) -> np.ndarray:
        """A private contiguous copy of the pages (what a compressor must read from)."""
        if out is None:
            return self.grid[self.pages]
        return np.take(self.grid, self.pages, axis=0, out=out[: len(self.pages)])


@dataclass
class Prepared:
    """What follows the header: ``iovs`` holding ``payload_len`` bytes in ``encoding``."""

    encoding: int
    iovs: Sequence[Any]
    payload_len: int


class PageSink:
    """Where a receiver puts pages: the destination's blocks plus a "received" map.

    ``received[block][page]`` is non-zero once the page holds data that is not
    all zeros (or may not be): only such pages need writing when a zero page
    arrives, so untouched shared memory is never faulted in for nothing.

    Pages are stored with ``pwrite`` on the block's backing file (``fds``)
    rather than through the mapping: the kernel then fills the file's pages
    without a user page fault per fresh page, which measured 1.5-1.8x faster
    than copying into freshly mapped shared memory on this class of machine.

    ``direct=True`` is for a mapping whose pages this process has already
    populated (:meth:`mpmultifd.ram.GuestRAM.populate`): raw pages are then
    received straight into their places, with no copy in user space at all.

    With ``prints`` (one uint64 array per block) and ``key``, every page put
    in place gets its fingerprint (:mod:`mpmultifd.pageprint`) recorded there,
    0 for a zero page: the destination then verifies the region at switchover
    by comparing arrays, without reading it while the guest is paused.
    """

    def __init__(
        self,
        grids: Sequence[np.ndarray],
        datas: Sequence[memoryview],
        received: Sequence[np.ndarray],
        fds: Sequence[int] | None = None,
        *,
        direct: bool = False,
        prints: Sequence[np.ndarray] | None = None,
        key: np.ndarray | None = None,
    ):
        self.grids = list(grids)
        self.datas = list(datas)
        self.received = list(received)
        self.fds = list(fds) if fds is not None else None
        self.direct = direct
        self.prints = list(prints) if prints is not None and key is not None else None
        self.key = key

    def _record(self, block: int, pages: np.ndarray, rows: np.ndarray) -> None:
        if self.prints is not None and self.key is not None:  # both or neither
            out = np.empty(len(pages), dtype=np.uint64)
            fingerprint_rows(rows, self.key, out)
            self.prints[block][pages] = out

    def recv_pages(self, block: int, pages: np.ndarray, sock: socket.socket, bounce: memoryview) -> None:
        """Receive ``len(pages)`` raw pages from ``sock`` into ``pages`` of the block.

        Without ``direct`` they go through ``bounce`` (at least that many pages
        long) and :meth:`store`; with it, one ``recvmsg_into`` scatters them
        into the mapping, an IOV per run of consecutive pages.
        """
        ps = self.grids[block].shape[1]
        if not self.direct:
            payload = bounce[: len(pages) * ps]
            recv_exact_into(sock, payload)
            self.store(block, pages, payload)
            return
        data = self.datas[block]
        starts, lengths = page_runs(pages)
        recv_exact_into_views(
            sock, [data[s * ps : (s + n) * ps] for s, n in zip(starts, lengths)]
        )
        self.received[block][pages] = 1
        self._record(block, pages, self.grids[block][pages])

    def store(self, block: int, pages: np.ndarray, src: memoryview) -> None:
        """Put ``src`` (``len(pages)`` whole pages, in order) at ``pages`` of the block."""
        ps = self.grids[block].shape[1]
        if self.fds is None:
            self.grids[block][pages] = np.frombuffer(src, dtype=np.uint8, count=len(pages) * ps).reshape(len(pages), ps)
        else:
            fd = self.fds[block]
            starts, lengths = page_runs(pages)
            pos = 0
            for start, n in zip(starts, lengths):
                chunk = src[pos : pos + n * ps]
                done = os.pwrite(fd, chunk, start * ps)
                while done < len(chunk):  # pwrite to tmpfs is whole, but a short write must not lose bytes
                    done += os.pwrite(fd, chunk[done:], start * ps + done)
                pos += n * ps
        self.received[block][pages] = 1
        self._record(block, pages, np.frombuffer(src, dtype=np.uint8, count=len(pages) * ps).reshape(len(pages), ps))

    def write_pages(self, block: int, pages: np.ndarray, src: np.ndarray) -> None:
        """Scatter ``src`` (``len(pages)`` rows of a page each) into the block."""
        self.store(block, pages, np.ascontiguousarray(src).data.cast("B"))

    def mark_received(self, block: int, pages: np.ndarray) -> None:
        self.received[block][pages] = 1

    def write_zero(self, block: int, pages: np.ndarray) -> int:
        """Zero the pages that hold data; returns how many were written."""
        rec = self.received[block]
        dirty = pages[rec[pages] != 0]
        if len(dirty):
            self.grids[block][dirty] = 0
            rec[dirty] = 0
        if self.prints is not None:
            self.prints[block][pages] = 0
        return len(dirty)


class MethodSender(ABC):
    """Per-worker sender state of a method (contexts, buffers). Lives in one process."""

    @abstractmethod
    def send_prepare(self, batch: PageBatch) -> Prepared:
        """Turn the batch into payload IOVs. Must not keep references past the next call."""

    def sent(self, prepared: Prepared, seconds: float) -> None:
        """Called after ``prepared`` went out; ``seconds`` is how long the send took."""

    def cleanup(self) -> None:
        """Release what the sender holds; called once when the worker ends."""


class MethodReceiver(ABC):
    """Per-worker receiver state of a method."""

    @abstractmethod
    def recv(self, header: DataHeader, sock: socket.socket, sink: PageSink) -> None:
        """Read exactly ``header.payload_len`` bytes from ``sock`` and write the normal pages into ``sink``.

        Must bound every decoding by ``header.normal * page_size`` and raise
        :class:`mpmultifd.errors.RemoteProtocolError` for a payload that does
        not decode to exactly that.
        """

    def cleanup(self) -> None:
        """Release what the receiver holds."""


class Method(ABC):
    """A named payload method: a factory for its sender and receiver sides.

    Subclasses set ``name`` and ``encodings`` (the header encoding values they
    may put on the wire; 0 is raw pages, which every method may fall back to).
    ``level`` and ``options`` come from the configuration and travel to the
    destination, so both ends build the same method.
    """

    name: ClassVar[str]
    encodings: ClassVar[frozenset[int]] = frozenset({0})

    def __init__(self, level: int | None = None, options: dict[str, Any] | None = None) -> None:
        self.level = level
        self.options = dict(options or {})

    def max_payload(self, page_size: int, packet_pages: int) -> int:
        """The largest payload a packet of this method may announce."""
        return page_size * packet_pages

    @abstractmethod
    def sender(self, page_size: int, packet_pages: int) -> MethodSender: ...

    @abstractmethod
    def receiver(self, page_size: int, packet_pages: int) -> MethodReceiver: ...
