"""Channel workers that write pages to a save file and read them back (QEMU's mapped-ram).

Every page has a fixed place in the file (``savefile.SaveLayout``), so the
workers need no coordination beyond the batches they are given: a saver writes
each run of consecutive pages with one ``os.pwritev`` straight from the shared
RAM, a loader reads each run with one ``os.preadv`` straight into it. Zero
pages are never written: in a fresh file they are holes already, and a page
that held data in an earlier round and is zero now gets its hole punched back
(``fallocate``), so the file stays as sparse as the guest.

A saver records, per page, whether the file holds data for it in a shared
byte map (``present``); pages are in one batch per round and rounds are
separated by SYNC, so no two workers ever touch the same entry at once. The
coordinator packs the map into the file's bitmaps at the end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from ._shm import Segment
from .errors import ConfigError, MigrationError
from .methods import page_runs
from .ram import GuestRAM
from .ring import KIND_DATA, KIND_EOS, KIND_STOP, KIND_SYNC, Ring
from .zeropage import nonzero_pages
from .messages import AtBarrier, Ready, StreamEnded
from .worker import (
    C_BUSY_NS,
    C_NORMAL,
    C_PACKETS,
    C_PAYLOAD,
    C_ROUND_DONE,
    C_SYSCALLS,
    C_WIRE_BYTES,
    C_ZERO,
    C_ZERO_WRITTEN,
    CoordinatorWatch,
    WorkerSpec,
    _child_setup,
    report_failure,
    _Stopped,
)

__all__ = [
    "FileSpec",
    "file_spec",
    "present_offsets",
    "saver_main",
    "loader_main",
    "open_file",
    "punch_hole",
]

log = logging.getLogger(__name__)

_POLL = 0.25
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


@dataclass(frozen=True)
class FileSpec:
    """What a file worker needs besides its RAM, ring and connection (picklable)."""

    worker: WorkerSpec
    path: str
    data_offsets: tuple[int, ...]  # per block: where page 0 lives in the file
    present_name: str | None = None  # saver: the shared byte map of pages with data in the file
    present_offsets: tuple[int, ...] = ()  # per block: where its entries start in that map
    direct: bool = False  # O_DIRECT


def present_offsets(ram: GuestRAM) -> tuple[int, ...]:
    """Where each block's entries start in a save's shared map of pages with data."""
    offsets, total = [], 0
    for b in ram.blocks:
        offsets.append(total)
        total += b.npages
    return tuple(offsets)


def file_spec(
    ram: GuestRAM,
    data_offsets: tuple[int, ...],
    path: str,
    channel: int,
    *,
    packet_pages: int,
    zero_page: str = "multifd",
    direct: bool = False,
    present_name: str | None = None,
) -> FileSpec:
    """The spec of file channel ``channel`` over ``ram``; with ``present_name``, a saver's."""
    return FileSpec(
        worker=WorkerSpec(
            channel=channel,
            page_size=ram.page_size,
            packet_pages=packet_pages,
            block_sizes=tuple(b.size for b in ram.blocks),
            zero_page=zero_page,
            log_level=logging.getLogger("mpmultifd").getEffectiveLevel(),
        ),
        path=path,
        data_offsets=data_offsets,
        present_name=present_name,
        present_offsets=present_offsets(ram) if present_name is not None else (),
        direct=direct,
    )


def open_file(path: str, flags: int, *, direct: bool) -> int:
    """Open ``path``; with ``direct``, bypass the page cache or say why it cannot."""
    if direct:
        if not hasattr(os, "O_DIRECT"):
            raise ConfigError("direct: O_DIRECT is not available on this platform")
        try:
            return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise ConfigError(
                    f"direct: the file system holding {path!r} does not support O_DIRECT (tmpfs does not); "
                    "save without direct=True"
                ) from None
            raise
    return os.open(path, flags | os.O_CLOEXEC)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset + length)`` of the file, which then reads as zeros; False if unsupported."""
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def _worker(kind: str, spec: FileSpec, ram: GuestRAM, ring: Ring, conn: Connection) -> None:
    _child_setup(spec.worker, conn)
    fd = -1
    present = None
    try:
        flags = os.O_RDWR if kind == "save" else os.O_RDONLY
        fd = open_file(spec.path, flags, direct=spec.direct)
        if spec.present_name is not None:
            present = Segment.attach(spec.present_name)
        conn.send(Ready())
        if kind == "save":
            _run_saver(spec, ram, ring, conn, fd, present)
        else:
            _run_loader(spec, ram, ring, conn, fd)
    except _Stopped:
        pass
    except BaseException as exc:
        report_failure(conn, exc)
        raise SystemExit(1) from None
    finally:
        if fd >= 0:
            os.close(fd)
        if present is not None:
            present.close()
        ring.close_consumer()
        ring.close()
        ram.close()


def saver_main(spec: FileSpec, ram: GuestRAM, ring: Ring, conn: Connection) -> None:
    """Entry point of a save worker: pages from the ring to their places in the file."""
    _worker("save", spec, ram, ring, conn)


def loader_main(spec: FileSpec, ram: GuestRAM, ring: Ring, conn: Connection) -> None:
    """Entry point of a restore worker: pages from their places in the file into the RAM."""
    _worker("load", spec, ram, ring, conn)


def _round_marker(batch, ring: Ring, conn: Connection) -> bool:
    """Handle SYNC/EOS/STOP; True when the worker should end."""
    if batch.kind in (KIND_SYNC, KIND_EOS):
        ring.counters[C_ROUND_DONE] = batch.round + 1
        if batch.kind == KIND_EOS:
            conn.send(StreamEnded(batch.round))
            return True
        conn.send(AtBarrier(batch.round))
        return False
    return batch.kind == KIND_STOP


def _serve_batches(ring: Ring, conn: Connection, handle) -> None:
    """Pop batches until EOS or STOP: ``handle`` each data batch, report each round marker."""
    counters = ring.counters
    watch = CoordinatorWatch(conn)
    while True:
        batch = ring.pop(timeout=_POLL)
        if batch is None:
            watch.check()
            continue
        if batch.kind != KIND_DATA:
            if _round_marker(batch, ring, conn):
                return
            continue
        t0 = time.perf_counter_ns()
        handle(batch)
        counters[C_PACKETS] += 1
        counters[C_BUSY_NS] += time.perf_counter_ns() - t0


def _run_saver(spec: FileSpec, ram: GuestRAM, ring: Ring, conn: Connection, fd: int, present_seg) -> None:
    ps = spec.worker.page_size
    grids = [ram.pages(b.index) for b in ram.blocks]
    words = [g.view(np.uint64) for g in grids]
    datas = [memoryview(ram.view(b.index)).cast("B") for b in ram.blocks]
    presents = [np.frombuffer(present_seg.buf, dtype=np.uint8)]
    detect_zero = spec.worker.zero_page == "multifd"
    counters = ring.counters
    can_punch = [True]

    def save(batch) -> None:
        blk = batch.block
        pages = batch.pages.astype(np.intp, copy=False)
        mine = presents[0][spec.present_offsets[blk] : spec.present_offsets[blk] + len(grids[blk])]
        if detect_zero and len(pages):
            nonzero = nonzero_pages(words[blk], pages)
            normal, zero = pages[nonzero], pages[~nonzero]
        else:
            normal, zero = pages, pages[:0]
        base = spec.data_offsets[blk]
        starts, lengths = page_runs(normal)
        written = 0
        for s, n in zip(starts, lengths):
            view = datas[blk][s * ps : (s + n) * ps]
            off = base + s * ps
            done = os.pwritev(fd, [view], off)
            while done < len(view):  # short writes: a signal, or a full disk (then OSError)
                done += os.pwritev(fd, [view[done:]], off + done)
            written += len(view)
        counters[C_SYSCALLS] += len(starts)
        mine[normal] = 1
        # zero pages that held data in an earlier round lose it again
        stale = zero[mine[zero] != 0]
        if len(stale):
            zs, zl = page_runs(stale)
            for s, n in zip(zs, zl):
                if can_punch[0]:
                    can_punch[0] = punch_hole(fd, base + s * ps, n * ps)
                if not can_punch[0]:
                    os.pwrite(fd, bytes(n * ps), base + s * ps)
            counters[C_ZERO_WRITTEN] += len(stale)
            mine[stale] = 0
        counters[C_NORMAL] += len(normal)
        counters[C_ZERO] += len(zero)
        counters[C_PAYLOAD] += written
        counters[C_WIRE_BYTES] += written

    try:
        _serve_batches(ring, conn, save)
    finally:
        # the mappings close after this: no view of them may outlive it, even in a traceback
        for views in (grids, words, datas, presents):
            views.clear()


def _run_loader(spec: FileSpec, ram: GuestRAM, ring: Ring, conn: Connection, fd: int) -> None:
    ps = spec.worker.page_size
    datas = [memoryview(ram.view(b.index)).cast("B") for b in ram.blocks]
    counters = ring.counters

    def load(batch) -> None:
        blk = batch.block
        pages = batch.pages.astype(np.intp, copy=False)
        base = spec.data_offsets[blk]
        starts, lengths = page_runs(pages)
        read = 0
        for s, n in zip(starts, lengths):
            view = datas[blk][s * ps : (s + n) * ps]
            off = base + s * ps
            got = os.preadv(fd, [view], off)
            while got < len(view):
                more = os.preadv(fd, [view[got:]], off + got)
                if more == 0:
                    raise MigrationError(
                        f"save file ended at offset {off + got} inside block {blk} page {s + got // ps}: "
                        "it was truncated after it was checked"
                    )
                got += more
            read += len(view)
        counters[C_SYSCALLS] += len(starts)
        counters[C_NORMAL] += len(pages)
        counters[C_PAYLOAD] += read
        counters[C_WIRE_BYTES] += read

    try:
        _serve_batches(ring, conn, load)
    finally:
        datas.clear()
