#!/usr/bin/env python3
"""What receiving into shared memory costs, by how the pages get there.

One thread sends ``--size`` bytes in 512 KiB chunks over a socketpair; the
receiver puts them into a fresh ``/dev/shm`` file, in one of these ways:

- ``pwrite``: ``recv_into`` a private 512 KiB buffer, then ``pwrite`` into the
  file (what the receiver workers do);
- ``direct``: ``recv_into`` the file's shared mapping (every first touch faults
  inside the copy);
- ``falloc-pwrite`` / ``falloc-direct``: the same after ``posix_fallocate`` of
  the whole file (``Destination(prefault=True)``), whose time is shown apart
  because it can happen before a migration arrives;
- ``falloc+populate-direct``: also ``MADV_POPULATE_WRITE`` of the mapping in
  the receiving process.

Modes alternate run by run; medians::

    python tools/bench_receive.py --size 1G --runs 3
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import socket
import statistics
import sys
import threading
import time

CHUNK = 512 * 1024
MODES = ("pwrite", "direct", "falloc-pwrite", "falloc-direct", "falloc+populate-direct")
_MADV_POPULATE_WRITE = 23


def _sender(sock: socket.socket, size: int, data: bytes) -> None:
    mv = memoryview(data)
    for _ in range(0, size, CHUNK):
        sock.sendall(mv)
    sock.shutdown(socket.SHUT_WR)


def run(mode: str, size: int, data: bytes) -> tuple[float, float]:
    path = f"/dev/shm/mpm-bench-receive-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        view = memoryview(mm)
        t0 = time.perf_counter()
        if mode.startswith("falloc"):
            os.posix_fallocate(fd, 0, size)
        if "populate" in mode:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            if libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(size), _MADV_POPULATE_WRITE) != 0:
                raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE)")
        prep = time.perf_counter() - t0
        a, b = socket.socketpair()
        buf = bytearray(CHUNK)
        bv = memoryview(buf)
        t = threading.Thread(target=_sender, args=(a, size, data))
        t0 = time.perf_counter()
        t.start()
        off = 0
        while off < size:
            if mode.endswith("pwrite"):
                got = 0
                while got < CHUNK:
                    got += b.recv_into(bv[got:], CHUNK - got)
                os.pwrite(fd, bv, off)
                off += CHUNK
            else:
                m = min(CHUNK, size - off)
                off += b.recv_into(view[off : off + m], m)
        elapsed = time.perf_counter() - t0
        t.join()
        a.close()
        b.close()
        del view
        mm.close()
        return prep, elapsed
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from mpmultifd.cli import parse_size

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1G"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    a = p.parse_args()
    modes = a.modes.split(",")
    data = os.urandom(CHUNK)
    print(f"# {' '.join(sys.argv)}\n# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    res: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for _ in range(a.runs):
        for m in modes:
            res[m].append(run(m, a.size, data))
    print(f"\n{a.size >> 20} MiB, medians of {a.runs}\n")
    print("| mode | preparation s | receive s | receive GB/s |")
    print("|---|---|---|---|")
    for m in modes:
        prep = statistics.median(x[0] for x in res[m])
        rec = statistics.median(x[1] for x in res[m])
        print(f"| {m} | {prep:.3f} | {rec:.3f} | {a.size / rec / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
