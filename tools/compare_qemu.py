#!/usr/bin/env python3
"""mpmultifd next to QEMU's own multifd, side by side in one run, on the same bytes.

For every size, content, compression and channel count, each run migrates:

- **QEMU multifd**: a paused source ``qemu-system-x86_64`` (``-S``, TCG, no disk,
  no kernel) whose guest RAM is a ``memory-backend-file,share=on`` in ``/dev/shm``
  holding exactly the bytes below (a fresh copy of the filled file per run), to a
  destination QEMU started with ``-incoming defer``, over ``tcp:127.0.0.1``. Both
  are driven over QMP (a Unix socket each): ``multifd`` and ``events``
  capabilities, ``multifd-channels``, ``multifd-compression`` (``zstd`` at
  ``multifd-zstd-level`` 1), ``max-bandwidth`` 100 GB/s (QEMU's default is a
  128 MiB/s cap) and a 60 s ``downtime-limit`` on both ends (with QEMU's default
  300 ms a paused guest still iterates, which is slower), then
  ``migrate-incoming`` / ``migrate``. The
  time is QEMU's own ``total-time`` from ``query-migrate`` on the source; the
  wall time until the destination's ``MIGRATION`` event says ``completed`` is
  recorded too. Both QEMUs are killed and their backend files deleted after
  every run, whatever happens.
- **mpmultifd**: ``Source.migrate`` of the same bytes (the source file mapped
  with ``GuestRAM.from_files``) in the DEFAULT configuration
  (``MigrationConfig(channels=N)``, ``zstd`` level 1 when compressing, and the
  same 60 s downtime limit QEMU gets, since the guest is paused) into a fresh
  region of a plain ``Destination`` in a destination process
  (``RemoteDestination``); the time is the wall time around ``Source.migrate``.
  The default verifies every page at switchover (QEMU does not);
  ``--no-verify`` turns it off.

CPU seconds are measured over the same window for both tools, from ``migrate``
until the destination is done (for QEMU its ``MIGRATION`` completed event):
the whole machine's busy time (``/proc/stat``) and each process's own
(``/proc/PID/stat`` utime+stime): QEMU's source and destination, and for
mpmultifd the tool's process (the coordinator, ``os.times``), every sender
worker, the destination process and every receiver worker (a sampler thread
walks the process tree every 10 ms until each exits; its own CPU time is taken
out). Beside them, the physical floor of the row, measured in the same run:
one read of the region, a loopback TCP copy of its non-zero bytes (sender and
receiver threads) and the allocation of as many fresh shared-memory pages.

The guest is paused and nothing writes the region, so both migrations are one
pass over RAM. The two tools alternate run by run (QEMU first on even runs,
mpmultifd first on odd ones) so both see the same machine state; the table
shows medians and the throughput ratio mpmultifd / QEMU. On the first run of
every row the destinations' RAM is hashed (sha256) and compared with the
source bytes: the QEMU destination's backend file, the QEMU source's backend
file after the migration (a paused QEMU must not have changed it), and the
mpmultifd destination region.

With ``iperf3`` installed, a loopback TCP ceiling is measured first with as many
parallel streams as channels (``iperf3 -s -1`` / ``iperf3 -c 127.0.0.1 -P N``).
The tool installs nothing; without ``qemu-system-x86_64`` it says so and exits 2.

The defaults are the full comparison (about 10 minutes on a 2-vCPU VM)::

    python tools/compare_qemu.py --sizes 256M,1G --channels 1,2,4 \\
        --contents random,half-zero,zero,mixed --compression none,zstd --runs 3

A quick look (well under a minute)::

    python tools/compare_qemu.py --sizes 256M --channels 2 --contents half-zero --compression none
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd import (  # noqa: E402
    GuestRAM,
    MigrationConfig,
    Source,
    _mp,  # noqa: E402
)
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.testing import CONTENTS, QMP, QMPError, RemoteDestination, fill  # noqa: E402
from mpmultifd.testing import log_tail as _log_tail  # noqa: E402

from bench import warm_up  # noqa: E402
from toolkit import fmt_size, raise_interrupt  # noqa: E402

BLOCK = "pc.ram"
MAX_BANDWIDTH = 100 * 10**9  # bytes/s; QEMU 7.2 defaults to 128 MiB/s
DOWNTIME_LIMIT_MS = 60_000  # the guest is paused anyway; QEMU's default 300 ms makes it iterate (slower)
SHM = "/dev/shm"


QemuError = QMPError  # QEMU failed to start, answer, or migrate; the message ends with its log
tail = _log_tail


# --------------------------------------------------------------------------- CPU accounting

TCK = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far: /proc/stat user+nice+system+irq+softirq, all CPUs."""
    with open("/proc/stat") as f:
        v = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in v[:7])
    return (user + nice + system + irq + softirq) / TCK


def proc_stat(pid: int, tid: int | None = None) -> tuple[int, str, float, float] | None:
    """(ppid, comm, utime+stime, cutime+cstime) of a process (or one of its threads), seconds; None once gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            s = f.read()
    except OSError:
        return None
    comm = s[s.index("(") + 1 : s.rindex(")")]
    r = s[s.rindex(")") + 2 :].split()
    return int(r[1]), comm, (int(r[11]) + int(r[12])) / TCK, (int(r[13]) + int(r[14])) / TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a live process (threads of one name summed; QEMU names its threads)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        st = proc_stat(pid, int(tid))
        if st is not None:
            name = re.sub(r"\d+", "N", st[1])  # multifdsend_0, multifdsend_1 -> multifdsend_N
            out[name] = out.get(name, 0.0) + st[2]
    return out


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return kids


class TreeSampler(threading.Thread):
    """Every ``interval`` seconds, the CPU seconds of every process below ``root`` (found through
    /proc/PID/task/*/children), so processes that exit before the end are still counted up to their
    last sample. Its own CPU time (thread_time) is kept in ``own`` and reported apart."""

    def __init__(self, root: int, interval: float = 0.01, discover_every: int = 5) -> None:
        super().__init__(name="cpu-sampler", daemon=True)
        self.root, self.interval, self.discover_every = root, interval, discover_every
        self.last: dict[int, tuple[int, str, float, float]] = {}
        self.first: dict[int, tuple[int, str, float, float]] = {}
        self.live: set[int] = {root}
        self.own = 0.0
        self._stop_event = threading.Event()
        self.sample()
        self.start()

    def sample(self) -> None:
        todo, seen = [self.root], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            st = proc_stat(pid)
            if st is None:
                continue
            self.first.setdefault(pid, st)
            self.last[pid] = st
            todo += children(pid)
        self.live = seen

    def sample_known(self) -> None:
        """Only the processes already found (cheap: one read each); the tree walk runs less often."""
        gone = set()
        for pid in self.live:
            st = proc_stat(pid)
            if st is None:
                gone.add(pid)
            else:
                self.last[pid] = st
        self.live -= gone

    def run(self) -> None:
        t0 = time.thread_time()
        n = 0
        while not self._stop_event.wait(self.interval):
            n += 1
            if n % self.discover_every:
                self.sample_known()
            else:
                self.sample()
        self.sample()
        self.own = time.thread_time() - t0

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def mpm_roles(sm: TreeSampler, dest_pid: int, fs_pid: int | None, before: set[int]) -> dict:
    """Split the sampled tree into the roles of one mpmultifd migration.

    Processes that existed before the migration (the tool, its forkserver, the destination process)
    count from their first sample; new ones from zero. Under forkserver the sender workers are
    children of the source's forkserver, the receivers children of the destination's forkserver
    (a child of the destination process); under fork/spawn they are children of the tool and of
    the destination process.
    """
    def used(pid: int) -> float:
        st = sm.last[pid]
        base = sm.first[pid][2] if pid in before else 0.0
        return st[2] - base

    parent = {pid: st[0] for pid, st in sm.first.items()}  # as first seen: an orphan's parent changes

    def under(pid: int, anc: int) -> bool:
        while pid in parent:
            if pid == anc:
                return True
            pid = parent[pid]
        return False

    senders, receivers, dst_fs, other = [], [], 0.0, 0.0
    dest = used(dest_pid) if dest_pid in sm.last else 0.0
    for pid, (ppid, comm, _, _) in sm.first.items():
        if pid in (sm.root, dest_pid, fs_pid):
            continue
        if under(pid, dest_pid):
            if ppid == dest_pid and children_were_workers(sm, pid):
                dst_fs += used(pid)  # the destination's forkserver (started when the Destination was made)
            elif comm.startswith("python"):
                receivers.append(used(pid))
            else:
                other += used(pid)  # e.g. ldconfig run by ctypes.util.find_library in a preload
        elif pid in before and ppid != fs_pid:
            other += used(pid)  # e.g. the resource tracker (a warm pool's workers are the forkserver's children)
        else:
            senders.append(used(pid))
    fs = used(fs_pid) if fs_pid is not None and fs_pid in sm.last else 0.0
    return {"destination": dest, "dst_forkserver": dst_fs, "senders": senders, "receivers": receivers,
            "src_forkserver": fs, "other": other}


def children_were_workers(sm: TreeSampler, pid: int) -> bool:
    """True for a process whose own children were sampled (a forkserver), not a worker."""
    return any(st[0] == pid for st in sm.first.values())


# --------------------------------------------------------------------------- QEMU


class Qemu:
    """One qemu-system-x86_64, paused, guest RAM in a shared /dev/shm file, driven over QMP."""

    def __init__(self, binary: str, machine: str, mem_path: str, size: int, workdir: str, role: str,
                 incoming: bool = False, prealloc: bool = False) -> None:
        self.qmp_path = os.path.join(workdir, f"{role}.qmp")
        self.log = os.path.join(workdir, f"{role}.log")
        self.argv = self.command(binary, machine, mem_path, size, self.qmp_path, incoming, prealloc)
        self.qmp: QMP | None = None
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @staticmethod
    def command(binary: str, machine: str, mem_path: str, size: int, qmp_path: str, incoming: bool,
                prealloc: bool = False) -> list[str]:
        """A paused TCG guest without devices, disk or kernel whose RAM is the shared file ``mem_path``."""
        mib = size >> 20
        extra = ",prealloc=on" if prealloc else ""
        argv = [
            binary, "-machine", f"{machine},memory-backend=mem",
            "-accel", "tcg", "-nodefaults", "-no-user-config", "-nographic", "-display", "none", "-S",
            "-smp", "1", "-m", f"{mib}M",
            "-object", f"memory-backend-file,id=mem,size={mib}M,mem-path={mem_path},share=on{extra}",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
        ]
        if incoming:
            argv += ["-incoming", "defer"]
        return argv

    def connect(self) -> QMP:
        self.qmp = QMP(self.qmp_path, self.proc, self.log)
        return self.qmp

    def kill(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()  # this pid only: it was started by us
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        with_suppressed(os.unlink, self.qmp_path)


def with_suppressed(fn, *a) -> None:
    try:
        fn(*a)
    except OSError:
        pass


def setup_migration(q: QMP, channels: int, compression: str, downtime_limit_ms: int, max_bandwidth: int) -> None:
    q.cmd("migrate-set-capabilities", {"capabilities": [
        {"capability": "multifd", "state": True},
        {"capability": "events", "state": True},
    ]})
    params = {
        "multifd-channels": channels,
        "multifd-compression": compression,
        "downtime-limit": downtime_limit_ms,
    }
    if max_bandwidth:  # 0: keep QEMU's default cap (128 MiB/s in 7.2)
        params["max-bandwidth"] = max_bandwidth
    if compression == "zstd":
        params["multifd-zstd-level"] = 1
    q.cmd("migrate-set-parameters", params)
    got = q.cmd("query-migrate-parameters")
    for k, v in params.items():
        if got.get(k) != v:
            raise QemuError(f"QEMU kept {k}={got.get(k)!r}, asked for {v!r}")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(16 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def copy_file(src: str, dst: str) -> None:
    """Byte copy into a new /dev/shm file (every page allocated, as the source's guest RAM is)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        done = 0
        while done < size:
            n = os.copy_file_range(fi.fileno(), fo.fileno(), size - done)
            if n <= 0:
                raise OSError(f"copy_file_range stopped at {done} of {size} bytes")
            done += n


def qemu_once(master: str, size: int, channels: int, compression: str, args: argparse.Namespace,
              check: str | None) -> dict:
    """One QEMU-to-QEMU multifd migration of a copy of ``master``; QEMU's times and bytes."""
    tag = f"mpm-cmpq-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    src_mem, dst_mem = os.path.join(SHM, f"{tag}-src"), os.path.join(SHM, f"{tag}-dst")
    workdir = tempfile.mkdtemp(prefix=f"{tag}-")
    src = dst = None
    try:
        copy_file(master, src_mem)
        src = Qemu(args.qemu, args.machine, src_mem, size, workdir, "src")
        dst = Qemu(args.qemu, args.machine, dst_mem, size, workdir, "dst", incoming=True, prealloc=args.prefault)
        sq, dq = src.connect(), dst.connect()
        setup_migration(dq, channels, compression, args.qemu_downtime_limit, args.qemu_max_bandwidth)
        setup_migration(sq, channels, compression, args.qemu_downtime_limit, args.qemu_max_bandwidth)
        dq.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        addrs = dq.cmd("query-migrate").get("socket-address") or []
        port = next(int(a["port"]) for a in addrs if a.get("type") == "inet")
        pids = {"src": src.proc.pid, "dst": dst.proc.pid}
        cpu0 = {n: proc_stat(pid)[2] for n, pid in pids.items()}
        busy: dict[str, float] = {}
        b0 = machine_busy()
        t0 = time.monotonic()
        sq.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        status: dict[str, str] = {}
        done_at: dict[str, float] = {}

        def note(name: str, t: float, ev: dict) -> None:
            note_event(name, t, ev, status, done_at)
            if name == "dst" and "dst" in done_at and "end" not in busy:
                busy["end"] = machine_busy()  # the window ends when the destination is done

        for name, q in (("src", sq), ("dst", dq)):  # events that arrived with command replies
            for t, ev in q.events:
                note(name, t, ev)
        deadline = t0 + args.timeout
        terminal = ("completed", "failed", "cancelled")
        while not all(status.get(n) in terminal for n in ("src", "dst")):
            if status.get("src") in ("failed", "cancelled"):
                break
            pending = [(n, q) for n, q in (("src", sq), ("dst", dq)) if status.get(n) not in terminal]
            ready = [(n, q) for n, q in pending if q.buffered()]
            if not ready:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                r, _, _ = select.select([q for _, q in pending], [], [], min(left, 1.0))
                ready = [(n, q) for n, q in pending if q in r]
            for n, q in ready:
                ev = q.read()
                note(n, time.monotonic(), ev)
        # both QEMUs are alive and idle now; a process's counters include its exited threads
        cpu1 = {n: proc_stat(pid)[2] for n, pid in pids.items()}
        threads = {n: thread_cpu(pid) for n, pid in pids.items()}
        info = sq.cmd("query-migrate")
        if info.get("status") != "completed":
            dinfo = {}
            with_suppressed_any(lambda: dinfo.update(dq.cmd("query-migrate")))
            raise QemuError(f"QEMU migration ended {info.get('status')!r} (destination {status.get('dst')!r}): "
                            f"{info.get('error-desc') or dinfo.get('error-desc') or 'timed out'}")
        if status.get("dst") != "completed":
            raise QemuError(f"source completed, destination says {status.get('dst')!r}")
        ram = info.get("ram", {})
        out = {
            "time": info["total-time"] / 1000.0,
            "dst_wall": done_at["dst"] - t0,
            "setup": info.get("setup-time", 0) / 1000.0,
            "downtime": info.get("downtime", 0) / 1000.0,
            "wire": ram.get("transferred", 0),
            "multifd_bytes": ram.get("multifd-bytes", 0),
            "duplicate": ram.get("duplicate", 0),
            "normal": ram.get("normal", 0),
            "cpu_machine": busy.get("end", machine_busy()) - b0,
            "cpu_src": cpu1["src"] - cpu0["src"],
            "cpu_dst": cpu1["dst"] - cpu0["dst"],
            "cpu_procs": cpu1["src"] - cpu0["src"] + cpu1["dst"] - cpu0["dst"],
            "cpu_threads": threads,  # whole lifetime per thread name, startup included
        }
        if check is not None:
            out["check_dst"] = sha256_file(dst_mem) == check
            out["check_src"] = sha256_file(src_mem) == check
        return out
    finally:
        for q in (src, dst):
            if q is not None:
                q.kill()
        for path in (src_mem, dst_mem):
            with_suppressed(os.unlink, path)
        shutil.rmtree(workdir, ignore_errors=True)


def note_event(name: str, t: float, ev: dict, status: dict, done_at: dict) -> None:
    if ev.get("event") == "MIGRATION":
        st = ev.get("data", {}).get("status")
        status[name] = st
        if st in ("completed", "failed", "cancelled"):
            done_at.setdefault(name, t)


def with_suppressed_any(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - only used to enrich an error message
        pass


# --------------------------------------------------------------------------- mpmultifd


def mpm_config(channels: int, compression: str, args: argparse.Namespace) -> MigrationConfig:
    """The default configuration with this channel count; only what a flag asks for differs."""
    # the guest is paused, so QEMU gets a 60 s downtime-limit (with its 300 ms it iterates); mpmultifd the same,
    # else its pause pricing may refuse a migration of a region nothing writes (ConvergenceError)
    kw: dict = {"channels": channels, "downtime_limit": args.qemu_downtime_limit / 1000.0}
    if compression != "none":
        kw.update(compression=compression, compression_level=1)
    if args.start_method:
        kw["start_method"] = args.start_method
    if args.no_verify:
        kw["verify"] = False
    return MigrationConfig(**kw)


def mpm_once(src: GuestRAM, size: int, channels: int, compression: str, args: argparse.Namespace,
             check: str | None) -> dict:
    """One mpmultifd migration of ``src`` into a fresh region in a destination process."""
    cfg = mpm_config(channels, compression, args)
    pool_size = channels if args.pool else 0
    with GuestRAM.create({BLOCK: size}) as dst:
        sm = None
        try:
            with RemoteDestination(dst.name, cfg, start_method=cfg.start_method, pool_size=pool_size,
                                   prefault=args.prefault,
                                   prepare_receivers=args.prefault and args.pool) as dest, Source(
                src, cfg, pool=args.source_pool
            ) as source:
                sm = TreeSampler(os.getpid(), args.sample_interval)
                before = set(sm.first)
                r0 = os.times()
                b0 = machine_busy()
                t0 = time.perf_counter()
                res = source.migrate(dest.address)
                elapsed = time.perf_counter() - t0
                dest.result()
                dst_done = time.perf_counter() - t0
                busy = machine_busy() - b0
                dest_pid = dest._proc.pid
            sm.stop()  # after both ends closed: every worker has exited, its last sample taken
            r1 = os.times()
        finally:
            if sm is not None and sm.is_alive():
                sm.stop()
        coord = (r1.user - r0.user) + (r1.system - r0.system) - sm.own
        roles = mpm_roles(sm, dest_pid, _mp.forkserver_pid(), before)
        # the destination's forkserver starts when the Destination is made, just before the window here (numpy
        # and the worker modules imported once per destination process, ~0.3-0.5 CPU-s), as the source's did when
        # the tool's first Source was made, outside the window; QEMU's processes start outside it too. Reported
        # apart, not in the total.
        procs = coord + sum(roles["senders"]) + roles["src_forkserver"] + roles["destination"] \
            + sum(roles["receivers"]) + roles["other"]
        out = {
            "time": elapsed,
            "dst_wall": dst_done,
            "setup": res.setup_time,
            "downtime": res.downtime,
            "wire": res.transferred,
            "duplicate": res.duplicate,
            "normal": res.normal,
            "cpu_machine": busy - sm.own,  # the sampler's own time is the measurement's, not the migration's
            "cpu_procs": procs,
            "cpu_coordinator": coord,
            "cpu_senders": roles["senders"],
            "cpu_src_forkserver": roles["src_forkserver"],
            "cpu_destination": roles["destination"],
            "cpu_dst_forkserver": roles["dst_forkserver"],
            "cpu_receivers": roles["receivers"],
            "cpu_other": roles["other"],
            "cpu_sampler": sm.own,
        }
        if check is not None:
            out["check_dst"] = hashlib.sha256(memoryview(dst.view(0)).cast("B")).hexdigest() == check
    return out


# --------------------------------------------------------------------------- physical floor


def floor_once(src: GuestRAM, nonzero_bytes: int) -> dict:
    """CPU seconds of the least any migration of this region must do on this machine: one read of the
    region, a loopback TCP copy of the non-zero bytes (sender and receiver), and the allocation of that
    many fresh shared-memory pages on the destination."""
    words = src.view(0).view(np.uint64)
    chunk = (8 << 20) // 8
    t = time.thread_time()
    acc = np.uint64(0)
    for s in range(0, len(words), chunk):
        acc |= np.bitwise_or.reduce(words[s : s + chunk])  # one read; the result is used so nothing is skipped
    read = time.thread_time() - t
    tcp = tcp_copy_cpu(memoryview(src.view(0)).cast("B"), nonzero_bytes) if nonzero_bytes else 0.0
    alloc = 0.0
    if nonzero_bytes:
        # the cheapest way to get that many fresh, zeroed shared-memory pages: fallocate on tmpfs (touching them
        # through a mapping costs about three times more: page tables and a fault per page)
        path = os.path.join(SHM, f"mpm-cmpq-{os.getpid()}-floor-{uuid.uuid4().hex[:8]}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.unlink(path)
            t = time.thread_time()
            os.posix_fallocate(fd, 0, nonzero_bytes)
            alloc = time.thread_time() - t
        finally:
            os.close(fd)
    return {"read": read, "tcp": tcp, "alloc": alloc, "sum": read + tcp + alloc + (int(acc) & 0)}


def tcp_copy_cpu(data: memoryview, nbytes: int) -> float:
    """CPU seconds (both threads) to send ``nbytes`` of ``data`` over one loopback TCP connection
    and receive them into a 64 MiB buffer that was touched before (so no allocation is counted)."""
    piece = 1 << 20
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    csock = socket.create_connection(lsock.getsockname())
    ssock, _ = lsock.accept()
    lsock.close()
    buf = np.ones(64 << 20, dtype=np.uint8)
    bview = memoryview(buf).cast("B")
    cpu = {}

    def receiver() -> None:
        t = time.thread_time()
        got, off = 0, 0
        while got < nbytes:
            if off + piece > len(bview):
                off = 0
            n = ssock.recv_into(bview[off : off + piece])
            if n == 0:
                break
            got += n
            off += n
        cpu["recv"] = time.thread_time() - t

    th = threading.Thread(target=receiver)
    th.start()
    t = time.thread_time()
    sent, off = 0, 0
    try:
        while sent < nbytes:
            if off >= len(data):
                off = 0
            n = min(piece, nbytes - sent, len(data) - off)
            csock.sendall(data[off : off + n])
            sent += n
            off += n
        cpu["send"] = time.thread_time() - t
    finally:
        csock.close()
        th.join()
        ssock.close()
    return cpu["send"] + cpu.get("recv", 0.0)


# --------------------------------------------------------------------------- iperf3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iperf3_rate(binary: str, streams: int, seconds: int) -> float:
    """Loopback TCP bytes/s with ``streams`` parallel streams (iperf3's received sum)."""
    port = free_port()
    server = subprocess.Popen([binary, "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out = None
        for _ in range(50):  # the server needs a moment to listen
            time.sleep(0.1)
            r = subprocess.run([binary, "-c", "127.0.0.1", "-p", str(port), "-P", str(streams), "-t", str(seconds),
                                "-J"], capture_output=True, text=True, timeout=seconds + 30)
            if r.returncode == 0:
                out = json.loads(r.stdout)
                break
        if out is None:
            raise RuntimeError(f"iperf3 client failed: {r.stdout[-500:]} {r.stderr[-500:]}")
        return out["end"]["sum_received"]["bits_per_second"] / 8
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


# --------------------------------------------------------------------------- main


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256M,1G", help="guest RAM sizes (default 256M,1G)")
    p.add_argument("--channels", default="1,2,4", help="channel counts (default 1,2,4)")
    p.add_argument("--contents", default="random,half-zero,zero,mixed", help=f"from {','.join(CONTENTS)}")
    p.add_argument("--compression", default="none,zstd", help="none and/or zstd (level 1 on both sides)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--json-file", help="also write that JSON document to this file")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    p.add_argument("--machine", default="pc", help="QEMU machine type (pc or q35)")
    p.add_argument("--start-method", default=None,
                   help="mpmultifd worker start method (default: the library's, forkserver)")
    p.add_argument("--no-verify", action="store_true",
                   help="mpmultifd: verify=False (the default configuration verifies every page; QEMU does not)")
    p.add_argument("--no-floor", action="store_true", help="skip measuring the physical floor")
    p.add_argument("--sample-interval", type=float, default=0.01,
                   help="seconds between samples of mpmultifd's process tree (default 0.01)")
    p.add_argument("--prefault", action="store_true",
                   help="both destinations allocate their RAM before the timing: QEMU's prealloc=on, "
                        "mpmultifd's Destination(prefault=True); with --pool also prepare_receivers=True")
    p.add_argument("--pool", action="store_true",
                   help="mpmultifd: warm WorkerPools on both ends (started before the timing, as an agent keeps one)")
    p.add_argument("--no-check", action="store_true", help="skip the sha256 checks of the destinations")
    p.add_argument("--no-iperf", action="store_true", help="skip the iperf3 ceiling even if installed")
    p.add_argument("--iperf-seconds", type=int, default=3)
    p.add_argument("--qemu-max-bandwidth", type=int, default=MAX_BANDWIDTH,
                   help="QEMU max-bandwidth in bytes/s (default 100e9; 0 keeps QEMU's default 128 MiB/s cap)")
    p.add_argument("--qemu-downtime-limit", type=int, default=DOWNTIME_LIMIT_MS,
                   help=f"QEMU downtime-limit in ms (default {DOWNTIME_LIMIT_MS}; QEMU's own default is 300)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one QEMU migration may take")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    channels = [int(c) for c in args.channels.split(",")]
    args.source_pool = None
    if args.pool:
        from mpmultifd import WorkerPool

        args.source_pool = WorkerPool(max(channels), start_method=args.start_method or MigrationConfig().start_method)
    contents = args.contents.split(",")
    comps = args.compression.split(",")
    for c in contents:
        if c not in CONTENTS:
            p.error(f"content {c!r} not in {CONTENTS}")
    for c in comps:
        if c not in ("none", "zstd"):
            p.error(f"compression {c!r}: only none and zstd are compared")
    for s in sizes:
        if s % (1 << 20):
            p.error("sizes must be whole MiB")
    qemu = shutil.which(args.qemu)
    if qemu is None:
        print(f"{args.qemu} not found: nothing to compare with (install the Debian package qemu-system-x86)",
              file=sys.stderr)
        return 2
    args.qemu = qemu
    qemu_version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    t_start = time.monotonic()
    # A Ctrl-C / SIGTERM must still reach the finally blocks that kill QEMU and delete files.
    signal.signal(signal.SIGTERM, raise_interrupt)

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    log(f"# {qemu_version}; machine {args.machine}, TCG, paused (-S); max-bandwidth "
        f"{f'{args.qemu_max_bandwidth / 1e9:g} GB/s' if args.qemu_max_bandwidth else 'QEMU default'}, "
        f"downtime-limit {args.qemu_downtime_limit} ms; "
        f"mpmultifd default configuration (start method {args.start_method or 'forkserver'}, "
        f"verify {not args.no_verify}); "
        f"{os.cpu_count()} CPUs, {args.runs} runs each; load average {os.getloadavg()[0]:.2f} at start")

    iperf = {}
    iperf_bin = shutil.which("iperf3")
    if iperf_bin and not args.no_iperf:
        for ch in channels:
            iperf[ch] = iperf3_rate(iperf_bin, ch, args.iperf_seconds)
            log(f"# iperf3 loopback, {ch} stream(s): {iperf[ch] / 1e9:.2f} GB/s")
    elif not args.no_iperf:
        log("# iperf3 not installed: no loopback ceiling (apt-get install iperf3)")

    # Touch as much memory as a QEMU run holds at once (the filled source, QEMU's copy of it, the destination):
    # the first touch of guest memory on a fresh VM costs several times more.
    warm_up(3 * max(sizes))
    rows = []
    for size in sizes:
        for content in contents:
            master = os.path.join(SHM, f"mpm-cmpq-{os.getpid()}-master")
            try:
                with open(master, "wb") as f:
                    f.truncate(size)
                with GuestRAM.from_files({BLOCK: master}) as src:
                    fill(src, content, seed=args.seed)
                    digest = None if args.no_check else hashlib.sha256(memoryview(src.view(0)).cast("B")).hexdigest()
                    grid = src.pages(0)
                    nonzero_bytes = int(sum(int(grid[s : s + 4096].any(axis=1).sum())
                                            for s in range(0, len(grid), 4096))) * grid.shape[1]
                    floors: list[dict] = []
                    for comp in comps:
                        runs = {ch: {"qemu": [], "mpm": []} for ch in channels}
                        for i in range(args.runs):
                            if not args.no_floor and len(floors) < args.runs:
                                floors.append(floor_once(src, nonzero_bytes))
                            for ch in channels:
                                check = digest if i == 0 else None
                                order = ("qemu", "mpm") if i % 2 == 0 else ("mpm", "qemu")
                                for tool in order:
                                    if tool == "qemu":
                                        r = qemu_once(master, size, ch, comp, args, check)
                                    else:
                                        r = mpm_once(src, size, ch, comp, args, check)
                                    runs[ch][tool].append(r)
                                lq, lm = runs[ch]["qemu"][-1], runs[ch]["mpm"][-1]
                                log(f"  {fmt_size(size)} {content} {comp} ch={ch} run {i + 1}: "
                                    f"QEMU {lq['time']:.3f} s (destination done {lq['dst_wall']:.3f} s, "
                                    f"CPU {lq['cpu_procs']:.2f} s, machine {lq['cpu_machine']:.2f}), "
                                    f"mpmultifd {lm['time']:.3f} s (CPU {lm['cpu_procs']:.2f} s, "
                                    f"machine {lm['cpu_machine']:.2f})")
                        for ch in channels:
                            q, m = runs[ch]["qemu"], runs[ch]["mpm"]
                            qt, mt = median(q, "time"), median(m, "time")
                            row = {
                                "size": size, "content": content, "channels": ch, "compression": comp,
                                "qemu_s": qt, "qemu_GBps": size / qt / 1e9,
                                "qemu_dst_wall_s": median(q, "dst_wall"),
                                "qemu_transferred_bytes": int(median(q, "wire")),  # QEMU 7.2: before compression
                                "mpm_s": mt, "mpm_GBps": size / mt / 1e9, "mpm_setup_s": median(m, "setup"),
                                "mpm_wire_bytes": int(median(m, "wire")),
                                "ratio": qt / mt,
                                "ratio_dst": median(q, "dst_wall") / mt,
                                "iperf3_GBps": iperf[ch] / 1e9 if ch in iperf else None,
                                "nonzero_bytes": nonzero_bytes,
                                "qemu_cpu_s": median(q, "cpu_procs"), "qemu_cpu_machine_s": median(q, "cpu_machine"),
                                "qemu_cpu_src_s": median(q, "cpu_src"), "qemu_cpu_dst_s": median(q, "cpu_dst"),
                                "mpm_cpu_s": median(m, "cpu_procs"), "mpm_cpu_machine_s": median(m, "cpu_machine"),
                                "mpm_cpu_coordinator_s": median(m, "cpu_coordinator"),
                                "mpm_cpu_senders_s": statistics.median(sum(r["cpu_senders"]) for r in m),
                                "mpm_cpu_destination_s": statistics.median(
                                    r["cpu_destination"] + r["cpu_other"] for r in m),
                                "mpm_cpu_dst_forkserver_s": median(m, "cpu_dst_forkserver"),
                                "mpm_cpu_receivers_s": statistics.median(sum(r["cpu_receivers"]) for r in m),
                                "mpm_dst_wall_s": median(m, "dst_wall"),
                                "cpu_ratio": median(m, "cpu_procs") / median(q, "cpu_procs"),
                                "cpu_ratio_machine": median(m, "cpu_machine") / median(q, "cpu_machine"),
                                "floor_cpu_s": statistics.median(f["sum"] for f in floors) if floors else None,
                                "floor": {k: statistics.median(f[k] for f in floors) for k in ("read", "tcp", "alloc")}
                                if floors else None,
                                "qemu_runs": q, "mpm_runs": m,
                            }
                            if digest is not None:
                                row["check"] = {
                                    "qemu_dst_equals_source": q[0]["check_dst"],
                                    "qemu_src_unchanged": q[0]["check_src"],
                                    "mpm_dst_equals_source": m[0]["check_dst"],
                                }
                            rows.append(row)
            finally:
                with_suppressed(os.unlink, master)
    elapsed = time.monotonic() - t_start
    if args.source_pool is not None:
        args.source_pool.close()

    example = Qemu.command(args.qemu, args.machine, f"{SHM}/<unique>", max(sizes), "<dir>/dst.qmp", incoming=True)
    doc = json.dumps(
        {
            "qemu": qemu_version,
            "qemu_destination_argv": example,
            "machine": args.machine,
            "runs": args.runs,
            "max_bandwidth": args.qemu_max_bandwidth or None,
            "downtime_limit_ms": args.qemu_downtime_limit,
            "start_method": args.start_method or "forkserver",
            "verify": not args.no_verify,
            "pool": args.pool,
            "prefault": args.prefault,
            "loadavg_end": os.getloadavg(),
            "cpus": os.cpu_count(),
            "iperf3_Bps": iperf,
            "elapsed_s": elapsed,
            "rows": rows,
        },
        indent=2,
    )
    if args.json_file:
        with open(args.json_file, "w") as f:
            f.write(doc + "\n")
    if args.json:
        print(doc)
        return 0
    print()
    print(f"{args.runs} runs each, medians; GB/s = 1e9 bytes of guest RAM per second; "
          f"ratio = mpmultifd GB/s / QEMU GB/s")
    hdr = (f"{'size':>5} {'content':<10} {'ch':>2} {'method':<6} {'QEMU s':>7} {'GB/s':>6} {'dst s':>7} "
           f"{'wire MiB':>9} {'mpm s':>7} {'setup':>6} {'GB/s':>6} {'wire MiB':>9} {'ratio':>6} {'r dst':>6}")
    if iperf:
        hdr += f" {'iperf3':>7} {'x ip3':>6}"
    if not args.no_check:
        hdr += "  check"
    print(hdr)
    for r in rows:
        # QEMU 7.2 counts multifd bytes before compression: no wire figure for its zstd rows
        qwire = "-" if r["compression"] != "none" else f"{r['qemu_transferred_bytes'] / (1 << 20):.0f}"
        line = (f"{fmt_size(r['size']):>5} {r['content']:<10} {r['channels']:>2} {r['compression']:<6} "
                f"{r['qemu_s']:>7.3f} {r['qemu_GBps']:>6.2f} {r['qemu_dst_wall_s']:>7.3f} "
                f"{qwire:>9} {r['mpm_s']:>7.3f} {r['mpm_setup_s']:>6.3f} {r['mpm_GBps']:>6.2f} "
                f"{r['mpm_wire_bytes'] / (1 << 20):>9.0f} {r['ratio']:>6.2f} {r['ratio_dst']:>6.2f}")
        if iperf:
            ip = r["iperf3_GBps"]
            line += f" {ip:>7.2f} {r['mpm_GBps'] / ip:>6.2f}"
        if "check" in r:
            c = r["check"]
            line += "  " + ("ok" if all(c.values()) else "MISMATCH " + ",".join(k for k, v in c.items() if not v))
        print(line)
    print()
    print("QEMU s: QEMU's own total-time (query-migrate on the source); dst s: wall time from `migrate` until the")
    print("destination QEMU's MIGRATION event said completed; mpm s: wall time around Source.migrate, which returns")
    print("after the destination committed; setup: the part of it before the first page (connections, worker")
    print("processes on both ends); ratio = QEMU s / mpm s, r dst = dst s / mpm s (> 1: mpmultifd faster).")
    print("wire MiB: QEMU's ram.transferred (main + multifd channels; '-' for zstd, which QEMU 7.2 counts before")
    print("compression) and mpmultifd's data-channel bytes, headers included.")
    if iperf:
        print("iperf3: loopback TCP GB/s with as many streams as channels; x ip3 = mpmultifd GB/s / iperf3 GB/s.")
    if not args.no_check:
        checked = [r["check"] for r in rows]
        bad = sum(not all(c.values()) for c in checked)
        print(f"check (first run of every row, sha256 against the source bytes): QEMU destination RAM "
              f"{sum(c['qemu_dst_equals_source'] for c in checked)}/{len(checked)} equal, QEMU source RAM unchanged "
              f"{sum(c['qemu_src_unchanged'] for c in checked)}/{len(checked)}, mpmultifd destination "
              f"{sum(c['mpm_dst_equals_source'] for c in checked)}/{len(checked)} equal"
              + ("" if not bad else f"; {bad} row(s) MISMATCH"))
    print_cpu_table(rows)
    print(f"elapsed {elapsed:.0f} s, load average {os.getloadavg()[0]:.2f} at the end")
    return 0


def print_cpu_table(rows: list[dict]) -> None:
    print()
    print("CPU seconds, medians, from `migrate` until the destination is done (per process: until it exited)")
    hdr = (f"{'size':>5} {'content':<10} {'ch':>2} {'method':<6} | {'Q src':>6} {'Q dst':>6} {'QEMU':>6} "
           f"{'Q mach':>6} | {'coord':>6} {'send':>6} {'dest':>6} {'recv':>6} {'mpm':>6} {'m mach':>6} {'d fs':>5} | "
           f"{'Q /GiB':>6} {'m /GiB':>6} {'m/Q':>5} {'m/Q mc':>6} | {'floor':>6} {'m/fl':>5}")
    print(hdr)
    for r in rows:
        gib = r["size"] / (1 << 30)
        fl = r["floor_cpu_s"]
        print(
            f"{fmt_size(r['size']):>5} {r['content']:<10} {r['channels']:>2} {r['compression']:<6} | "
            f"{r['qemu_cpu_src_s']:>6.2f} {r['qemu_cpu_dst_s']:>6.2f} {r['qemu_cpu_s']:>6.2f} "
            f"{r['qemu_cpu_machine_s']:>6.2f} | {r['mpm_cpu_coordinator_s']:>6.2f} {r['mpm_cpu_senders_s']:>6.2f} "
            f"{r['mpm_cpu_destination_s']:>6.2f} {r['mpm_cpu_receivers_s']:>6.2f} {r['mpm_cpu_s']:>6.2f} "
            f"{r['mpm_cpu_machine_s']:>6.2f} {r['mpm_cpu_dst_forkserver_s']:>5.2f} | "
            f"{r['qemu_cpu_s'] / gib:>6.2f} {r['mpm_cpu_s'] / gib:>6.2f} "
            f"{r['cpu_ratio']:>5.2f} {r['cpu_ratio_machine']:>6.2f} | "
            + (f"{fl:>6.2f} {r['mpm_cpu_s'] / fl if fl else float('inf'):>5.1f}" if fl is not None else "     -     -")
        )
    print("Q src / Q dst: the two QEMU processes (/proc/PID/stat utime+stime, all threads); QEMU = their sum;")
    print("Q mach / m mach: the whole machine's busy CPU (/proc/stat user+nice+system+irq+softirq) in the same")
    print("window (includes anything else the machine ran). coord: the source's own process (os.times, minus")
    print("the sampler thread); send: the sender workers; dest: the destination process; recv: the receiver")
    print("workers; mpm = all of them. d fs: the destination's forkserver starting (once per destination process,")
    print("when it is made, just before the window; the source's started earlier, QEMU's processes too): not in mpm;")
    print("it is in m mach. Workers are")
    print("sampled every few ms until they exit (the last few ms of each may be missed). /GiB: CPU-s per GiB")
    print("of guest RAM; m/Q: mpm / QEMU (goal <= 0.33). floor: one read of the region + a loopback TCP copy")
    print("of the non-zero bytes (sender + receiver) + the allocation of as many fresh shared-memory pages")
    print("(posix_fallocate on /dev/shm);")
    print("m/fl: mpm / floor.")


if __name__ == "__main__":
    sys.exit(main())
