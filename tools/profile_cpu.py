#!/usr/bin/env python3
"""CPU cost of each stage of a migration, per packet and per GiB, with the package's own functions.

Every stage runs alone in this process over a region of ``--size`` bytes cut
into packets of ``--packet-pages`` pages (the default configuration's 512 x 4 KiB),
and is timed with CPU time (``time.process_time``, or ``time.thread_time`` in the
sending and receiving threads), not wall time: the figures hold on a machine
other people load too. Each stage is repeated ``--runs`` times; the table shows
the median.

Stages (S: the source does it, D: the destination):

- ``ring push+pop`` (S): one batch of page indices through a ``Ring`` (producer
  and consumer in one process).
- ``header encode`` (S) / ``header decode`` (D): ``DataHeaderEncoder.encode`` of
  a half-zero packet (offsets computed as the worker does) and
  ``DataHeaderDecoder.decode`` of it.
- ``zero detect, data`` / ``zero detect, zero`` (S): ``zeropage.nonzero_pages``
  over random pages (the probe decides) and over zero pages (every byte read).
- ``fingerprint`` (S and D with verification): ``pageprint.fingerprint_rows``.
- ``sendmsg`` (S) / ``recv_into`` (D): one ``send_buffers`` (header + IOVs, one
  ``sendmsg``) over loopback TCP, and the receiver's ``recv_exact_into`` into its
  bounce buffer: each thread's own CPU time (loopback's softirq work lands on
  either side). ``recvmsg_into, populated mapping`` (D): what a prepared receiver
  does instead, ``recv_exact_into_views`` straight into pages already allocated
  and mapped.
- ``store, fresh shm`` / ``store, allocated`` (D): ``PageSink.store`` (``pwrite``
  into the destination's file) into pages never touched before and into pages
  already allocated; the difference is the page allocation.
- ``store half the pages`` (D): the same for a random half of every packet's
  pages (a half-zero region's data pages: one ``pwrite`` per run, runs of about
  two pages); still per page of the region.
- ``verify compare`` (D): comparing the destination's and the source's
  fingerprint arrays (``np.flatnonzero(a != b)``).

Usage::

    python tools/profile_cpu.py                  # 256 MiB, 5 runs
    python tools/profile_cpu.py --size 1G --runs 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd import GuestRAM  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.methods import PageBatch, PageSink, page_runs  # noqa: E402
from mpmultifd.methods.nocomp import NoCompression  # noqa: E402
from mpmultifd.pageprint import fingerprint_rows, random_key  # noqa: E402
from mpmultifd.ring import KIND_DATA, Ring  # noqa: E402
from mpmultifd.transport import recv_exact_into, recv_exact_into_views, send_buffers  # noqa: E402
from mpmultifd.wire import DataHeaderDecoder, DataHeaderEncoder  # noqa: E402
from mpmultifd.zeropage import nonzero_pages  # noqa: E402

GIB = 1 << 30


def packets(npages: int, pp: int) -> list[np.ndarray]:
    return [np.arange(s, min(s + pp, npages), dtype=np.intp) for s in range(0, npages, pp)]


def stage_ring(npages: int, pp: int) -> float:
    ring = Ring.create(nslots=32, capacity=pp)
    try:
        batches = [p.astype(np.uint64) for p in packets(npages, pp)]
        t = time.process_time()
        for i, b in enumerate(batches):
            ring.push(KIND_DATA, 0, 0, i, b)
            ring.pop(timeout=1.0)
        return time.process_time() - t
    finally:
        ring.close()
        ring.unlink()


def stage_header(npages: int, pp: int, ps: int, size: int) -> tuple[float, float]:
    enc = DataHeaderEncoder(pp)
    dec = DataHeaderDecoder(packet_pages=pp, page_size=ps, block_sizes=[size])
    pk = packets(npages, pp)
    t = time.process_time()
    for i, pages in enumerate(pk):
        half = len(pages) // 2
        normal, zero = pages[:half], pages[half:]  # as the worker: index arrays times the page size
        enc.encode(block=0, round=0, packet_num=i, normal_offsets=normal * ps, zero_offsets=zero * ps,
                   payload_len=half * ps)
    t_enc = time.process_time() - t
    bufs = []
    for i, pages in enumerate(pk):
        half = len(pages) // 2
        bufs.append(bytes(enc.encode(block=0, round=0, packet_num=i, normal_offsets=pages[:half] * ps,
                                     zero_offsets=pages[half:] * ps, payload_len=half * ps)))
    t = time.process_time()
    for b in bufs:
        dec.decode(b)
    return t_enc, time.process_time() - t


def stage_zero(words: np.ndarray, npages: int, pp: int) -> float:
    t = time.process_time()
    for pages in packets(npages, pp):
        nonzero_pages(words, pages)
    return time.process_time() - t


def stage_fingerprint(grid: np.ndarray, npages: int, pp: int, key: np.ndarray) -> float:
    out = np.empty(pp, dtype=np.uint64)
    t = time.process_time()
    for s in range(0, npages, pp):
        e = min(s + pp, npages)
        fingerprint_rows(grid[s:e], key, out[: e - s])
    return time.process_time() - t


def stage_socket(ram: GuestRAM, npages: int, pp: int, ps: int, into: GuestRAM | None = None) -> tuple[float, float]:
    """sendmsg (header + IOVs) and recv_exact_into, each thread's CPU time.

    With ``into`` (a region whose pages are allocated and mapped), the payload is received as a
    prepared receiver does: ``recv_exact_into_views`` (``recvmsg_into``) straight into its pages."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    csock = socket.create_connection(lsock.getsockname())
    ssock, _ = lsock.accept()
    lsock.close()
    enc = DataHeaderEncoder(pp)
    hsize = enc.size
    bounce = memoryview(np.empty(pp * ps, dtype=np.uint8)).cast("B")
    hbuf = memoryview(bytearray(hsize))
    grid = ram.pages(0)
    data = memoryview(ram.view(0)).cast("B")
    sender = NoCompression().sender(ps, pp)
    cpu: dict[str, float] = {}
    pk = packets(npages, pp)

    dview = memoryview(into.view(0)).cast("B") if into is not None else None

    def receive() -> None:
        t = time.thread_time()
        for pages in pk:
            recv_exact_into(ssock, hbuf)
            if dview is None:
                recv_exact_into(ssock, bounce[: len(pages) * ps])
            else:
                starts, lengths = page_runs(pages)
                recv_exact_into_views(ssock, [dview[a * ps : (a + n) * ps] for a, n in zip(starts, lengths)])
        cpu["recv"] = time.thread_time() - t

    th = threading.Thread(target=receive)
    th.start()
    try:
        t = time.thread_time()
        for i, pages in enumerate(pk):
            prep = sender.send_prepare(PageBatch(0, ps, pages, data, grid))
            header = enc.encode(block=0, packet_num=i, normal_offsets=pages * ps, payload_len=prep.payload_len)
            send_buffers(csock, [header, *prep.iovs])
        cpu["send"] = time.thread_time() - t
    finally:
        th.join()
        csock.close()
        ssock.close()
    return cpu["send"], cpu["recv"]


def stage_store(
    size: int, npages: int, pp: int, ps: int, src: memoryview, scattered: bool = False
) -> tuple[float, float]:
    """PageSink.store (pwrite) into a fresh region, then again into the same, now allocated, pages.

    ``scattered``: only a random half of each packet's pages (a half-zero region's data pages, in runs of
    about two pages), as many pwrite calls as runs; the CPU time is still given per page of the region."""
    keep = None
    if scattered:
        keep = np.random.default_rng(5).random(npages) < 0.5
    with GuestRAM.create({"d": size}) as dst:
        fd = os.open(dst.blocks[0].path, os.O_RDWR)
        try:
            received = np.zeros(npages, dtype=np.uint8)
            sink = PageSink([dst.pages(0)], [memoryview(dst.view(0)).cast("B")], [received], [fd])
            out = []
            for _ in range(2):
                t = time.process_time()
                for pages in packets(npages, pp):
                    if keep is not None:
                        pages = pages[keep[pages]]
                    sink.store(0, pages, src[: len(pages) * ps])
                out.append(time.process_time() - t)
        finally:
            os.close(fd)
    return out[0], out[1]


def stage_compare(npages: int) -> float:
    a = np.random.default_rng(1).integers(0, 2**63, npages, dtype=np.uint64)
    b = a.copy()
    t = time.process_time()
    np.flatnonzero(a != b)
    return time.process_time() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256M", help="region size (default 256M)")
    p.add_argument("--packet-pages", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    size = parse_size(args.size)
    ps = 4096
    pp = args.packet_pages
    npages = size // ps
    npackets = -(-npages // pp)
    res: dict[str, list[float]] = {}

    def add(name: str, v: float) -> None:
        res.setdefault(name, []).append(v)

    key = random_key(ps)
    with GuestRAM.create({"s": size}) as ram, GuestRAM.create({"z": size}) as zram, \
            GuestRAM.create({"p": size}) as pram:
        grid = ram.pages(0)
        rng = np.random.default_rng(7)
        for s in range(0, npages, 4096):
            e = min(s + 4096, npages)
            grid[s:e] = rng.integers(0, 256, (e - s, ps), dtype=np.uint8)
        zram.view(0)[::ps] = 0  # allocated zero pages, as a written-then-cleared guest's
        pram.view(0)[::ps] = 0  # allocated and mapped, as a prepared receiver's region
        words = grid.view(np.uint64)
        zwords = zram.pages(0).view(np.uint64)
        src = memoryview(np.ascontiguousarray(grid[:pp])).cast("B")
        for _ in range(args.runs):
            add("ring push+pop", stage_ring(npages, pp))
            e, d = stage_header(npages, pp, ps, size)
            add("header encode", e)
            add("header decode", d)
            add("zero detect, data", stage_zero(words, npages, pp))
            add("zero detect, zero", stage_zero(zwords, npages, pp))
            add("fingerprint", stage_fingerprint(grid, npages, pp, key))
            s, r = stage_socket(ram, npages, pp, ps)
            add("sendmsg", s)
            add("recv_into", r)
            _, r = stage_socket(ram, npages, pp, ps, into=pram)
            add("recvmsg_into, populated mapping", r)
            f, a = stage_store(size, npages, pp, ps, src)
            add("store, fresh shm", f)
            add("store, allocated", a)
            f, a = stage_store(size, npages, pp, ps, src, scattered=True)
            add("store half the pages, fresh shm", f)
            add("store half the pages, allocated", a)
            add("verify compare", stage_compare(npages))
    med = {k: statistics.median(v) for k, v in res.items()}
    med["page allocation (fresh - allocated)"] = med["store, fresh shm"] - med["store, allocated"]
    table = {k: {"us_per_packet": v / npackets * 1e6, "us_per_page": v / npages * 1e6, "s_per_GiB": v * GIB / size}
             for k, v in med.items()}
    if args.json:
        print(json.dumps({"size": size, "packet_pages": pp, "runs": args.runs, "stages": table}, indent=2))
        return 0
    print(f"# {args.size} region, {pp} pages of {ps} B per packet ({npackets} packets), median of {args.runs} runs, "
          f"CPU time; load average {os.getloadavg()[0]:.2f}")
    print(f"{'stage':<38} {'us/packet':>10} {'us/page':>8} {'CPU-s/GiB':>10}")
    for k, v in table.items():
        print(f"{k:<38} {v['us_per_packet']:>10.1f} {v['us_per_page']:>8.3f} {v['s_per_GiB']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
