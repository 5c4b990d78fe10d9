"""A destination's work before its migration arrives: prefault the region, prepare receivers.

``Destination(prefault=True)`` allocates every block's memory up front, in
a thread, while no migration needs the CPU (writes into allocated pages cost
half as much); the holes found first still count as known-zero pages
(:attr:`Prefaulter.holes_before`). With ``prepare_receivers`` it then borrows
``channels`` pool workers that populate the region's mapping and wait for a
data channel (:meth:`Prefaulter.hand`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import numpy as np

from .messages import Log, Receive, Warm
from .pool import WorkerPool
from .processes import nudge_worker, reap_workers
from .ram import GuestRAM, file_data_extents
from .worker import WorkerSpec, warm_receiver_main

__all__ = ["Prefaulter", "allocated_pages"]

log = logging.getLogger("mpmultifd.destination")

#: a prepared receiver: its process and pipe handles
Handles = tuple[Any, Any]


def allocated_pages(path: str, npages: int, page_size: int, out: np.ndarray) -> None:
    """Mark pages of ``path`` that hold data (not holes); holes read as zeros and need no zeroing."""
    out[:] = 0
    for first, end in file_data_extents(path, npages, page_size):
        out[first:end] = 1


def _release(warm: list[Handles]) -> None:
    for _, conn in warm:
        nudge_worker(conn, None)
    reap_workers([(proc, conn, None) for proc, conn in warm])


class Prefaulter:
    """Prefaults ``ram`` in a thread (:meth:`start`), then, with ``prepare``, readies ``channels``
    receivers borrowed from ``pool``.

    :meth:`join` waits for both; :meth:`hand` gives a data channel to a
    prepared receiver; :meth:`stop` asks the thread to stop early (a closing
    destination); :meth:`close` releases the prepared receivers no channel
    took, and any that come ready later. Without :meth:`start` nothing is
    prefaulted or prepared and :meth:`join` returns at once.
    """

    def __init__(self, ram: GuestRAM, pool: WorkerPool | None, channels: int, prepare: bool) -> None:
        self.ram = ram
        self.pool = pool
        self.channels = channels
        self.prepare = prepare
        self.used = 0  # prepared receivers given a channel
        # per block, the pages that held data before the prefault (None until it finished)
        self.holes_before: list[np.ndarray] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._warm: list[Handles] = []  # prepared receivers not yet given a channel
        self._closed = False

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start allocating the region (and preparing receivers) in a thread."""
        self._thread = threading.Thread(target=self._prefault, name="mpmultifd-prefault", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the allocation and the prepared receivers; False if ``timeout`` seconds pass first."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Ask the allocation and the preparation to stop early (its thread still ends by itself)."""
        self._stopping.set()

    def close(self) -> None:
        """Release the prepared receivers not given a channel; none is kept from now on."""
        with self._lock:
            self._closed = True
            warm, self._warm = self._warm, []
        _release(warm)

    def take(self) -> Handles | None:
        """A prepared receiver not yet given a channel, or None."""
        with self._lock:
            return self._warm.pop() if self._warm else None

    def hand(self, spec: WorkerSpec, sock: socket.socket, received_name: str, stats_name: str) -> Handles | None:
        """Give a data channel to a prepared receiver, if one is left; returns its handles."""
        while True:
            warm = self.take()
            if warm is None:
                return None
            proc, conn = warm
            try:
                conn.send(Receive(spec, received_name, stats_name, sock.family, sock.type, sock.proto))
                conn.send_handle(sock.fileno())
            except (OSError, ValueError) as e:  # it died while waiting: try the next one
                log.debug("prepared receiver gone (%s)", e)
                proc.kill()
                reap_workers([(proc, conn, None)])
                continue
            self.used += 1
            return proc, conn

    # ------------------------------------------------------------------ the thread

    def _prefault(self) -> None:
        """Allocate every block's memory up front; writes into allocated pages cost half as much here."""
        maps = []
        try:
            for b in self.ram.blocks:
                m = np.empty(b.npages, dtype=np.uint8)
                allocated_pages(b.path, b.npages, b.page_size, m)
                maps.append(m)
                fd = os.open(b.path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    os.posix_fallocate(fd, 0, b.size)
                finally:
                    os.close(fd)
                if self._stopping.is_set():
                    break
        except OSError as e:  # no room, or a file system without fallocate: receive without it
            log.warning("prefault of region %s stopped: %s", self.ram.name, e)
        finally:
            if len(maps) == len(self.ram.blocks):
                self.holes_before = maps
        if self.prepare and self.holes_before is not None and not self._stopping.is_set():
            self._prepare_receivers()

    def _prepare_receivers(self) -> None:
        """Borrow ``channels`` pool workers that populate the region's mapping and wait for a channel."""
        pool = self.pool
        assert pool is not None  # Destination checks: prepare_receivers needs a pool
        t0 = time.monotonic()
        started = []
        for _ in range(self.channels):
            try:
                proc, conn = pool.run(warm_receiver_main, (self.ram,))
            except Exception as e:  # noqa: BLE001 - a closed pool, no process to start: receive without
                log.warning("cannot prepare receivers: %s", e)
                break
            with self._lock:
                if self._closed:
                    nudge_worker(conn, None)
                    reap_workers([(proc, conn, None)])
                    break
                started.append((proc, conn))
        ready: list[Handles] = []
        for proc, conn in started:
            nudged = False
            while True:
                try:
                    if not conn.poll(0.1):
                        if self._stopping.is_set() and not nudged:
                            nudge_worker(conn, None)  # stop populating early; it still reports
                            nudged = True
                        continue
                    msg = conn.recv()
                except (EOFError, OSError):
                    reap_workers([(proc, conn, None)])
                    break
                if isinstance(msg, Log):
                    msg.emit()
                elif isinstance(msg, Warm):
                    ready.append((proc, conn))
                    break
        with self._lock:
            if self._closed or self._stopping.is_set():
                leftover, ready = ready, []
            else:
                self._warm, leftover = ready, []
        _release(leftover)
        log.debug("%d receivers prepared in %.3f s", len(ready), time.monotonic() - t0)
