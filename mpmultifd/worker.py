"""Channel worker processes: one per data channel on each end.

A **sender** pops page batches from its ring, detects zero pages, lets the
method turn the rest into IOVs (``send_prepare``), and writes header + IOVs
with one ``sendmsg``. A **receiver** reads a header, validates it, and puts
the pages into the destination's shared RAM; at a SYNC it parks until its
coordinator says every channel got there.

Workers talk to their coordinator through a ``multiprocessing`` connection
(rare events, :mod:`mpmultifd.messages`) and publish counters in shared memory (the
ring's counter words), which the coordinator reads at any time for ``query()``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from ._shm import Segment
from .errors import ChannelClosed, MigrationError
from .messages import AtBarrier, Failed, Go, Leave, Log, Ready, Receive, Scanned, Stop, StreamEnded, Warm
from .methods import PageBatch, PageSink, Prepared, get_method
from .pageprint import fingerprint_extents, fingerprint_rows
from .ram import GuestRAM
from .ring import KIND_DATA, KIND_EOS, KIND_SCAN, KIND_STOP, KIND_SYNC, KIND_ZERO, Ring
from .transport import recv_exact_into, send_buffers
from .wire import (
    ENCODING_RAW,
    FLAG_EOS,
    FLAG_SYNC,
    ChannelState,
    DataHeaderDecoder,
    DataHeaderEncoder,
)
from .zerocopy import ZeroCopySender
from .zeropage import nonzero_pages

__all__ = [
    "WorkerSpec",
    "PageRecords",
    "sender_main",
    "receiver_main",
    "warm_receiver_main",
    "COUNTERS",
    "report_failure",
]

log = logging.getLogger("mpmultifd.worker")

# counter words (in the channel's ring segment on the source, in a stats
# segment on the destination); written by the worker only
C_PACKETS = 0
C_NORMAL = 1
C_ZERO = 2
C_WIRE_BYTES = 3
C_PAYLOAD = 4
C_ROUND_DONE = 5  # last round whose SYNC was handled, plus one
C_SYSCALLS = 6
C_BUSY_NS = 7
C_ZERO_WRITTEN = 8
C_ENCODED = 9  # data packets whose payload the method encoded (compressed)
C_RAW = 10  # data packets with pages sent raw
C_ENCODED_IN = 11  # raw bytes that went into encoded packets
C_ZC_SENDS = 12  # sendmsg calls made with MSG_ZEROCOPY
C_ZC_COMPLETIONS = 13
C_ZC_COPIED = 14  # completions the kernel flagged as copied after all
C_ZC_ENOBUFS = 15
C_ZC_ACTIVE = 16  # 1 while the channel sends with MSG_ZEROCOPY
COUNTERS = {
    "packets": C_PACKETS,
    "normal": C_NORMAL,
    "duplicate": C_ZERO,
    "bytes": C_WIRE_BYTES,
    "payload-bytes": C_PAYLOAD,
    "syscalls": C_SYSCALLS,
    "busy-ns": C_BUSY_NS,
    "compressed-packets": C_ENCODED,
    "raw-packets": C_RAW,
    "compressed-input-bytes": C_ENCODED_IN,
    "zerocopy-sends": C_ZC_SENDS,
    "zerocopy-completions": C_ZC_COMPLETIONS,
    "zerocopy-copied": C_ZC_COPIED,
    "zerocopy-enobufs": C_ZC_ENOBUFS,
    "zerocopy-active": C_ZC_ACTIVE,
}

_POLL = 0.25  # seconds between liveness checks while idle


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides its RAM, socket, ring and connection (picklable)."""

    channel: int
    page_size: int
    packet_pages: int
    block_sizes: tuple[int, ...]
    method: str = "none"
    level: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    zero_page: str = "multifd"
    zerocopy: str = "off"  # resolved by the source: "on" (never fall back), "auto" (fall back), "off"
    flush_timeout: float = 10.0
    start_round: int = 0  # a receiver replacing a broken channel starts at the destination's round
    log_level: int = logging.WARNING
    # sender: the page-fingerprint key (pageprint) for scan jobs and sent-page records, and the
    # shared segment of per-page fingerprints (see PageRecords); snapshot=True sends private
    # copies and records what was sent (the scanning tracker's exact baseline)
    print_key: np.ndarray | None = None
    prints_name: str | None = None
    snapshot: bool = False


class PageRecords:
    """Two uint64 per page of every block in one shared segment: ``sent`` and ``scanned``.

    ``sent[b][p]`` is the fingerprint of the bytes last sent for page ``p`` of
    block ``b`` (written by the sender that sent it); ``scanned[b][p]`` is the
    fingerprint a scan job found. Pages are in one batch per round and scan jobs
    cover disjoint ranges, so no two workers write the same entry at once; the
    coordinator reads them only after every worker reported the round or job done.
    """

    def __init__(self, seg: Segment, npages: tuple[int, ...]) -> None:
        self.seg = seg
        total = sum(npages)
        words = np.frombuffer(seg.buf, dtype=np.uint64, count=2 * total)
        offsets = np.concatenate(([0], np.cumsum(npages)))
        self.sent = [words[offsets[i] : offsets[i + 1]] for i in range(len(npages))]
        self.scanned = [words[total + offsets[i] : total + offsets[i + 1]] for i in range(len(npages))]
        del words

    @staticmethod
    def size(npages: tuple[int, ...]) -> int:
        return 16 * max(sum(npages), 1)

    def close(self) -> None:
        self.sent = []
        self.scanned = []
        self.seg.close()


class _ForwardHandler(logging.Handler):
    """Sends this worker's log records to its coordinator, which logs them in the agent's process."""

    def __init__(self, conn: Connection, channel: int) -> None:
        super().__init__()
        self.conn = conn
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.conn.send(Log(record.levelno, record.name, f"channel {self.channel}: {record.getMessage()}"))
        except (OSError, ValueError):
            pass


def child_setup(spec: WorkerSpec, conn: Connection) -> None:
    """A worker's first step: leave Ctrl-C and hangups to the agent, forward log records to it."""
    # Ctrl-C, and a hangup sent to the terminal's process group, belong to the agent: the
    # coordinator cancels and stops us in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # records go to the agent, whose logging configuration decides what to keep
    root = logging.getLogger("mpmultifd")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_ForwardHandler(conn, spec.channel))
    root.setLevel(spec.log_level)
    root.propagate = False


def report_failure(conn: Connection, exc: BaseException) -> None:
    """Send the coordinator this worker's last word: what it failed with."""
    try:
        conn.send(Failed.of(exc))
    except (OSError, ValueError):
        pass  # the coordinator is gone; it will notice our exit instead


class Stopped(Exception):
    """The coordinator told this worker to stop, or is gone."""


_child_setup, _Stopped = child_setup, Stopped  # the names this module uses


class CoordinatorWatch:
    """Notices that the coordinator that started this worker is gone.

    Two signs, because each start method hides one of them: the connection to
    the coordinator reaches EOF (spawn, forkserver; under fork a sibling
    inherits the coordinator's end and keeps it open), or this process was
    re-parented (fork and spawn; a forkserver parent outlives the coordinator).
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.ppid = os.getppid()

    def gone(self) -> bool:
        if os.getppid() != self.ppid:
            return True
        try:
            if self.conn.poll():
                return isinstance(self.conn.recv(), Stop)
        except (EOFError, OSError):
            return True
        return False

    def check(self) -> None:
        if self.gone():
            raise _Stopped()


# --------------------------------------------------------------------------- sender


def sender_main(spec: WorkerSpec, ram: GuestRAM, ring: Ring, sock: socket.socket, conn: Connection) -> None:
    """Entry point of a source channel worker."""
    _child_setup(spec, conn)
    records: PageRecords | None = None
    try:
        if spec.prints_name is not None:
            npages = tuple(s // spec.page_size for s in spec.block_sizes)
            records = PageRecords(Segment.attach(spec.prints_name), npages)
        # attached to the ring, the RAM and the records: the coordinator may unlink their names
        conn.send(Ready())
        log.debug("sender worker %d started (pid %d, method %s)", spec.channel, os.getpid(), spec.method)
        _run_sender(spec, ram, ring, sock, conn, records)
    except _Stopped:
        pass
    except BaseException as exc:  # every failure is reported, then the process ends
        report_failure(conn, exc)
        raise SystemExit(1) from None
    finally:
        if records is not None:
            records.close()
        ring.close_consumer()
        ring.close()
        ram.close()
        sock.close()


def _run_sender(
    spec: WorkerSpec, ram: GuestRAM, ring: Ring, sock: socket.socket, conn: Connection, records: PageRecords | None
) -> None:
    ps = spec.page_size
    grids = [ram.pages(b.index) for b in ram.blocks]
    words = [g.view(np.uint64) for g in grids]
    datas = [ram.view(b.index).data.cast("B") for b in ram.blocks]
    method = get_method(spec.method)(spec.level, spec.options)
    sender = method.sender(ps, spec.packet_pages)
    detect_zero = spec.zero_page == "multifd"
    encoder = DataHeaderEncoder(spec.packet_pages)
    counters = ring.counters
    no_pages = np.empty(0, dtype=np.int64)
    watch = CoordinatorWatch(conn)
    key = spec.print_key
    snapshot = spec.snapshot and records is not None and key is not None
    zc: ZeroCopySender | None = None
    if spec.zerocopy != "off":
        # "on" never falls back; "auto" does once most completions say "copied"
        ratio = 2.0 if spec.zerocopy == "on" else 0.9
        zc = ZeroCopySender(sock, fallback_ratio=ratio)
        counters[C_ZC_ACTIVE] = 1

    def zc_stats() -> None:
        assert zc is not None
        st = zc.stats
        counters[C_ZC_SENDS] = st["sends"]
        counters[C_ZC_COMPLETIONS] = st["completions"]
        counters[C_ZC_COPIED] = st["copied"]
        counters[C_ZC_ENOBUFS] = st["enobufs"]
        if counters[C_ZC_ACTIVE] and not zc.enabled:
            log.warning(
                "zero-copy fell back to plain sends: %d of %d completions were copied by the kernel",
                st["copied"],
                st["completions"],
            )
        counters[C_ZC_ACTIVE] = int(zc.enabled)

    try:
        while True:
            batch = ring.pop(timeout=_POLL)
            if batch is None:
                watch.check()
                continue
            t0 = time.perf_counter_ns()
            if batch.kind == KIND_DATA:
                blk = batch.block
                pages = batch.pages.astype(np.intp, copy=False)
                n = len(pages)
                if snapshot and n:
                    # a private copy is what goes on the wire, and its fingerprints are what
                    # the scanning tracker compares later scans against: exact, whatever the
                    # writer does to the shared pages meanwhile
                    assert records is not None and key is not None
                    snap = grids[blk][pages]
                    prints = np.empty(n, dtype=np.uint64)
                    if detect_zero:
                        # one pass finds the zero pages and fingerprints the others, chunk by chunk in the cache
                        nonzero = np.empty(n, dtype=bool)
                        fingerprint_rows(snap, key, prints, nonzero=nonzero)
                    else:
                        fingerprint_rows(snap, key, prints)
                        nonzero = np.ones(n, dtype=bool)
                    records.sent[blk][pages] = prints
                    rows = np.arange(n, dtype=np.intp)
                    normal = pages[nonzero]
                    zero = pages[~nonzero]
                    src = PageBatch(blk, ps, rows[nonzero], snap.data.cast("B"), snap)
                else:
                    if detect_zero and n:
                        nonzero = nonzero_pages(words[blk], pages)
                        normal = pages[nonzero]
                        zero = pages[~nonzero]
                    else:
                        normal, zero = pages, no_pages
                    src = PageBatch(blk, ps, normal, datas[blk], grids[blk])
                if len(normal):
                    prep = sender.send_prepare(src)
                else:
                    prep = Prepared(ENCODING_RAW, (), 0)
                header = encoder.encode(
                    encoding=prep.encoding,
                    block=blk,
                    round=batch.round,
                    packet_num=batch.packet_num,
                    normal_offsets=normal * ps,
                    zero_offsets=zero * ps,
                    payload_len=prep.payload_len,
                )
                t_send = time.perf_counter()
                if zc is not None and zc.enabled and prep.encoding == ENCODING_RAW:
                    # the kernel reads these after sendmsg returns: the header gets a
                    # private copy that the sender keeps until its completion arrives
                    hdr = bytearray(header)
                    counters[C_SYSCALLS] += zc.send([hdr, *prep.iovs], hdr, nbytes=encoder.size + prep.payload_len)
                else:
                    counters[C_SYSCALLS] += send_buffers(sock, [header, *prep.iovs])
                sender.sent(prep, time.perf_counter() - t_send)
                if prep.encoding != ENCODING_RAW:
                    counters[C_ENCODED] += 1
                    counters[C_ENCODED_IN] += len(normal) * ps
                elif len(normal):
                    counters[C_RAW] += 1
                counters[C_PACKETS] += 1
                counters[C_NORMAL] += len(normal)
                counters[C_ZERO] += len(zero)
                counters[C_PAYLOAD] += prep.payload_len
                counters[C_WIRE_BYTES] += encoder.size + prep.payload_len
            elif batch.kind in (KIND_SYNC, KIND_EOS):
                if zc is not None:
                    # every page of the round is on the wire before the round ends (as QEMU)
                    zc.flush(spec.flush_timeout)
                    zc_stats()
                flags = FLAG_SYNC if batch.kind == KIND_SYNC else FLAG_EOS
                header = encoder.encode(flags=flags, round=batch.round, packet_num=batch.packet_num)
                counters[C_SYSCALLS] += send_buffers(sock, [header])
                counters[C_WIRE_BYTES] += encoder.size
                counters[C_ROUND_DONE] = batch.round + 1
                if batch.kind == KIND_EOS:
                    counters[C_BUSY_NS] += time.perf_counter_ns() - t0
                    conn.send(StreamEnded(batch.round))
                    return
                conn.send(AtBarrier(batch.round))
            elif batch.kind == KIND_ZERO:
                # holes of the source's file: zero without reading them (a read would allocate them)
                blk = batch.block
                zero = batch.pages.astype(np.intp, copy=False)
                if records is not None:
                    records.sent[blk][zero] = 0
                header = encoder.encode(
                    block=blk,
                    round=batch.round,
                    packet_num=batch.packet_num,
                    normal_offsets=no_pages,
                    zero_offsets=zero * ps,
                )
                counters[C_SYSCALLS] += send_buffers(sock, [header])
                counters[C_PACKETS] += 1
                counters[C_ZERO] += len(zero)
                counters[C_WIRE_BYTES] += encoder.size
            elif batch.kind == KIND_SCAN:
                if records is None or key is None:
                    raise MigrationError("scan job for a worker without page records", channel=spec.channel)
                extents = batch.pages.reshape(-1, 2)
                t_scan = time.perf_counter()
                scanned = fingerprint_extents(grids[batch.block], extents, key, records.scanned[batch.block])
                conn.send(Scanned(batch.round, scanned, time.perf_counter() - t_scan))
            elif batch.kind == KIND_STOP:
                return
            counters[C_BUSY_NS] += time.perf_counter_ns() - t0
    finally:
        if zc is not None:
            # the shared RAM must outlive every send the kernel still reads from
            try:
                zc.flush(1.0)
            except (OSError, TimeoutError):
                pass
            zc_stats()
        sender.cleanup()
        del grids, words, datas


# --------------------------------------------------------------------------- receiver


def receiver_main(
    spec: WorkerSpec,
    ram: GuestRAM,
    received_name: str,
    stats_name: str,
    sock: socket.socket,
    conn: Connection,
    *,
    direct: bool = False,
) -> None:
    """Entry point of a destination channel worker.

    ``direct`` (a warm worker, see :func:`warm_receiver_main`): this process
    has populated the region's mapping, so pages are received straight into it.
    """
    _child_setup(spec, conn)
    records: PageRecords | None = None
    try:
        received = Segment.attach(received_name)
        stats = Segment.attach(stats_name)
        if spec.prints_name is not None and spec.print_key is not None:
            npages = tuple(size // spec.page_size for size in spec.block_sizes)
            records = PageRecords(Segment.attach(spec.prints_name), npages)
    except BaseException as exc:
        report_failure(conn, exc)
        ram.close()
        sock.close()
        raise SystemExit(1) from None
    try:
        conn.send(Ready())  # attached: the coordinator may unlink the segment names
        log.debug(
            "receiver worker %d started (pid %d, method %s%s)",
            spec.channel,
            os.getpid(),
            spec.method,
            ", into a populated mapping" if direct else "",
        )
        _run_receiver(spec, ram, received, stats, sock, conn, direct, records)
    except _Stopped:
        pass
    except BaseException as exc:
        report_failure(conn, exc)
        raise SystemExit(1) from None
    finally:
        if records is not None:
            records.close()
        received.close()
        stats.close()
        ram.close()
        sock.close()


_WARM_STEP = 64 << 20  # bytes populated between looks at the pipe


def warm_receiver_main(ram: GuestRAM, conn: Connection) -> None:
    """A pooled destination worker made ready before its migration arrives.

    It maps every page of ``ram`` into this process (:meth:`GuestRAM.populate`,
    in steps, stopping early if its coordinator speaks), reports
    a :class:`~mpmultifd.messages.Warm`, then waits for its channel: a
    :class:`~mpmultifd.messages.Receive` followed by the socket's descriptor.
    It then runs :func:`receiver_main` receiving straight into the mapping,
    which costs no page faults now. A :class:`~mpmultifd.messages.Stop`
    instead hands it back to the pool unused.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    t0 = time.perf_counter()
    whole = True
    try:
        try:
            for b in ram.blocks:
                for start in range(0, b.size, _WARM_STEP):
                    if conn.poll(0):
                        whole = False
                        break
                    ram.populate(b.index, start, min(_WARM_STEP, b.size - start))
                if not whole:
                    break
        except OSError as e:  # no MADV_POPULATE_WRITE here: the pages fault in as they arrive
            whole = False
            conn.send(Log(logging.DEBUG, log.name, f"warm receiver: populate failed: {e}"))
        conn.send(Warm(whole, time.perf_counter() - t0))
        ppid = os.getppid()
        while not conn.poll(_POLL):
            if os.getppid() != ppid:
                raise SystemExit(1)  # the coordinator is gone
        msg = conn.recv()
        if isinstance(msg, Leave):
            raise SystemExit(1)  # the pool is closing: leave
        if not isinstance(msg, Receive):
            ram.close()
            return  # not needed after all: back to the pool
        from multiprocessing import reduction

        sock = socket.socket(msg.family, msg.type, msg.proto, fileno=reduction.recv_handle(conn))
        spec, received_name, stats_name = msg.spec, msg.received_name, msg.stats_name
    except (EOFError, OSError):
        ram.close()
        raise SystemExit(1) from None
    except BaseException:
        ram.close()
        raise
    receiver_main(spec, ram, received_name, stats_name, sock, conn, direct=True)


def received_offsets(ram: GuestRAM) -> list[int]:
    """Byte offset of each block's map in the "received" segment (64-byte aligned)."""
    offs, pos = [], 0
    for b in ram.blocks:
        offs.append(pos)
        pos += (b.npages + 63) // 64 * 64
    offs.append(pos)
    return offs


STATS_WORDS = 32


def _run_receiver(
    spec: WorkerSpec,
    ram: GuestRAM,
    received: Segment,
    stats: Segment,
    sock: socket.socket,
    conn: Connection,
    direct: bool = False,
    records: PageRecords | None = None,
) -> None:
    ps = spec.page_size
    ch = spec.channel
    grids = [ram.pages(b.index) for b in ram.blocks]
    datas = [ram.view(b.index).data.cast("B") for b in ram.blocks]
    roffs = received_offsets(ram)
    rmaps = [
        np.frombuffer(received.buf, dtype=np.uint8, count=b.npages, offset=roffs[b.index]) for b in ram.blocks
    ]
    counters = np.frombuffer(stats.buf, dtype=np.uint64, count=STATS_WORDS, offset=ch * STATS_WORDS * 8)
    # pwrite into the backing files, unless this process populated the mapping
    fds = [] if direct else [os.open(b.path, os.O_RDWR) for b in ram.blocks]
    sink = PageSink(grids, datas, rmaps, None if direct else fds, direct=direct)
    method = get_method(spec.method)(spec.level, spec.options)
    receiver = method.receiver(ps, spec.packet_pages)
    decoder = DataHeaderDecoder(
        packet_pages=spec.packet_pages,
        page_size=ps,
        block_sizes=spec.block_sizes,
        encodings=method.encodings | {ENCODING_RAW},
        max_payload=method.max_payload(ps, spec.packet_pages),
    )
    state = ChannelState(spec.start_round)
    hbuf = bytearray(decoder.size)
    hview = memoryview(hbuf)
    watch = CoordinatorWatch(conn)
    if records is not None:
        # what this channel puts in place is fingerprinted as it lands: the switchover compares arrays
        sink.prints, sink.key = list(records.sent), spec.print_key
    try:
        while True:
            watch.check()  # an orphaned receiver must not keep the source's connection open
            try:
                recv_exact_into(sock, hview)
            except ChannelClosed as e:
                raise ChannelClosed(f"source closed the channel before end of stream ({e})", channel=ch) from None
            t0 = time.perf_counter_ns()
            header = decoder.decode(hbuf)
            state.check(header)
            counters[C_WIRE_BYTES] += decoder.size + header.payload_len
            if header.is_eos:
                counters[C_ROUND_DONE] = header.round + 1
                conn.send(StreamEnded(header.round, state.packets_in_round))
                return
            if header.is_sync:
                counters[C_ROUND_DONE] = header.round + 1
                conn.send(AtBarrier(header.round, state.packets_in_round))
                _wait_release(watch, ch)
                state.next_round()
                continue
            if header.zero:
                zero_pages = (header.zero_offsets // ps).astype(np.intp)
                counters[C_ZERO_WRITTEN] += sink.write_zero(header.block, zero_pages)
                counters[C_ZERO] += header.zero
            if header.normal:
                receiver.recv(header, sock, sink)
                if header.encoding != ENCODING_RAW:
                    counters[C_ENCODED] += 1
                    counters[C_ENCODED_IN] += header.normal * ps
                else:
                    counters[C_RAW] += 1
                counters[C_NORMAL] += header.normal
                counters[C_PAYLOAD] += header.payload_len
            counters[C_PACKETS] += 1
            counters[C_BUSY_NS] += time.perf_counter_ns() - t0
    finally:
        receiver.cleanup()
        for fd in fds:
            os.close(fd)
        sink.prints = None
        del grids, datas, rmaps, counters, sink


def _wait_release(watch: CoordinatorWatch, ch: int) -> None:
    """Park at a SYNC until the coordinator says every channel reached it."""
    conn = watch.conn
    while True:
        try:
            if not conn.poll(_POLL):
                if os.getppid() != watch.ppid:
                    raise _Stopped()
                continue
            msg = conn.recv()
        except (EOFError, OSError):
            raise _Stopped() from None
        if isinstance(msg, Go):
            return
        if isinstance(msg, Stop):
            raise _Stopped()
        raise MigrationError(f"unexpected coordinator message {msg!r}", channel=ch)
