"""Helpers for demos, benchmarks and tests: synthetic guests, a dirtying writer, a destination process.

These are real components (processes, sockets, shared memory), not fakes:
``DirtyingWriter`` is a separate process that writes pages and marks them the
way a cooperating guest would, and ``RemoteDestination`` runs a
:class:`~mpmultifd.Destination` in its own process, as on another host.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import MigrationConfig
from .errors import MigrationError
from .ram import GuestRAM
from .source import mp_context

__all__ = [
    "CONTENTS",
    "fill",
    "same_contents",
    "DirtyingWriter",
    "WriterThread",
    "ResetRelay",
    "RemoteDestination",
    "QMP",
    "QMPError",
]

CONTENTS = ("random", "half-zero", "zero", "mixed")


def fill(ram: GuestRAM, content: str = "half-zero", seed: int = 0) -> None:
    """Fill every block: ``random`` (incompressible), ``half-zero`` (random pages, half of them
    zero), ``zero``, or ``mixed`` (a quarter each of zero, random, text-like and repeated-word pages)."""
    if content not in CONTENTS:
        raise ValueError(f"content must be one of {', '.join(CONTENTS)}, not {content!r}")
    rng = np.random.default_rng(seed)
    for b in ram.blocks:
        grid = ram.pages(b.index)
        if content == "zero":
            grid[:] = 0
            continue
        chunk = 4096  # pages at a time, so no temporary grows with the region
        for start in range(0, b.npages, chunk):
            g = grid[start : start + chunk]
            g[:] = rng.integers(0, 256, size=g.shape, dtype=np.uint8)
            if content == "half-zero":
                g[rng.random(len(g)) < 0.5] = 0
            elif content == "mixed":
                kind = rng.integers(0, 4, size=len(g))
                g[kind == 0] = 0
                text = rng.integers(97, 123, size=(int((kind == 2).sum()), g.shape[1]), dtype=np.uint8)
                text[:, ::7] = 32
                g[kind == 2] = text
                words = g[kind == 3].view(np.uint64)
                words[:] = words[:, :1]
                g[kind == 3] = words.view(np.uint8)


def same_contents(a: GuestRAM, b: GuestRAM) -> bool:
    """True when every block of ``a`` holds the same bytes as the block of ``b`` with its index."""
    return all(np.array_equal(a.view(x.index), b.view(x.index)) for x in a.blocks)


def _aba_writer(ram: GuestRAM, stop: Any, started: Any, count: Any, rng: np.random.Generator, rate: float) -> None:
    """Writes that undo themselves a moment later, as a running kernel's do.

    Three kinds, each on a few random pages at a time: a lock word taken and
    released (+1, later -1), a counter moved up and back down by a random
    amount (sign bits included), and a page overwritten with random bytes and
    later restored to its old bytes. Each is undone 0-5 ms later, so a page is
    often read in its changed state and scanned again in its original one.
    """
    grids = [ram.pages(b.index) for b in ram.blocks]
    words = [g.view(np.uint32) for g in grids]
    held: list[tuple[float, int, int, np.ndarray, int, Any]] = []
    n = 0
    group = 8
    t_next = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        keep = []
        for entry in held:
            due, kind, block, pages, word, back = entry
            if due > now:
                keep.append(entry)
                continue
            if kind == 2:
                grids[block][pages] = back
            else:
                words[block][pages, word] -= np.uint32(back)
        held = keep
        for _ in range(group):
            block = int(rng.integers(0, len(grids)))
            npages, nwords = words[block].shape
            pages = np.unique(rng.integers(0, npages, int(rng.integers(1, 4))))
            word = int(rng.integers(0, nwords))
            kind = int(rng.integers(0, 3))
            undo: Any
            if kind == 0:
                undo = 1
            elif kind == 1:
                undo = int(rng.choice([1, 7, 1 << 16, 1 << 31, 0xFFFFFFFF]))
            else:
                undo = grids[block][pages].copy()
            if kind == 2:
                grids[block][pages] = rng.integers(0, 256, size=undo.shape, dtype=np.uint8)
            else:
                words[block][pages, word] += np.uint32(undo)
            held.append((now + float(rng.uniform(0, 0.005)), kind, block, pages, word, undo))
            n += 1
        count.value = n
        if n >= 64:
            started.set()
        t_next += group / rate if rate else 0.0
        pause = t_next - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            t_next = time.monotonic()
    for _, kind, block, pages, word, undo in reversed(held):  # put everything back, newest first
        if kind == 2:
            grids[block][pages] = undo
        else:
            words[block][pages, word] -= np.uint32(undo)
    del grids, words, held


def _writer_main(
    ram_name: str,
    stop: Any,
    stopped: Any,
    started: Any,
    count: Any,
    seed: int,
    rate: float,
    mark: bool,
    throttle: Any,
    pattern: str = "random",
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the process running the migration
    ram = GuestRAM.attach(ram_name)
    if pattern == "aba":
        try:
            _aba_writer(ram, stop, started, count, np.random.default_rng(seed), rate)
        finally:
            started.set()
            stopped.set()
            ram.close()
        return
    rng = np.random.default_rng(seed)
    ps = ram.page_size
    blocks = [(b.index, b.npages) for b in ram.blocks]
    views = [ram.view(b.index) for b in ram.blocks]
    n = 0
    group = 16
    t_next = time.monotonic()
    try:
        while not stop.is_set():
            t_work = time.monotonic()
            for _ in range(group):
                block, npages = blocks[n % len(blocks)]
                length = int(rng.integers(1, 3 * ps))
                off = int(rng.integers(0, npages * ps - length + 1))
                data = rng.integers(0, 256, size=length, dtype=np.uint8)
                if mark:
                    ram.write(block, off, data.tobytes())
                else:
                    views[block][off : off + length] = data  # a foreign writer: no marks
                n += 1
            count.value = n
            if n >= 64:
                started.set()
            # a throttle of p percent keeps the writer idle p percent of the time
            p = int(throttle.value)
            interval = group / rate if rate else time.monotonic() - t_work
            t_next += interval * 100 / (100 - p) if p < 100 else interval
            pause = t_next - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                t_next = time.monotonic()
    finally:
        count.value = n
        started.set()
        stopped.set()
        del views
        ram.close()


class DirtyingWriter:
    """A process that keeps writing random bytes into a region and marking them dirty.

    ``rate`` is writes per second (each of 1 byte to 3 pages at a random
    offset); 0 means as fast as it can. With ``mark=False`` it writes through
    the mapping without marking the dirty map, as a program that knows nothing
    of mpmultifd would (only the ``scan`` and ``kernel`` trackers see it).
    :meth:`throttle` is a ready-made ``throttle`` callback for ``migrate()``.

    Use :meth:`pause` as the migration's ``pause`` callback: it stops the
    writer and returns once it has stopped writing.

    ``pattern="aba"`` writes what a running kernel writes: lock words taken and
    released, counters moved and moved back, pages overwritten and restored,
    each undone within a few milliseconds, without marking (``rate`` is then
    operations per second).
    """

    def __init__(
        self,
        ram_name: str,
        *,
        seed: int = 1,
        rate: float = 5000.0,
        start_method: str = "spawn",
        mark: bool = True,
        pattern: str = "random",
    ) -> None:
        if pattern not in ("random", "aba"):
            raise ValueError(f"pattern must be 'random' or 'aba', not {pattern!r}")
        # the library's context: a forkserver started here preloads numpy and the
        # worker module, so workers started later through it start in milliseconds
        ctx = mp_context(start_method)
        self._stop, self._stopped, self._started = ctx.Event(), ctx.Event(), ctx.Event()
        self._count = ctx.Value("q", 0, lock=False)
        self._throttle = ctx.Value("i", 0, lock=False)
        self.throttles: list[int] = []
        self._proc = ctx.Process(
            target=_writer_main,
            args=(
                ram_name,
                self._stop,
                self._stopped,
                self._started,
                self._count,
                seed,
                rate,
                mark,
                self._throttle,
                pattern,
            ),
            name="mpmultifd-writer",
            daemon=True,
        )
        self.pauses = 0

    def start(self, timeout: float = 30.0) -> DirtyingWriter:
        self._proc.start()
        if not self._started.wait(timeout):
            raise RuntimeError("writer did not start")
        return self

    @property
    def writes(self) -> int:
        return int(self._count.value)

    def throttle(self, percent: int) -> None:
        """Stay idle ``percent`` percent of the time (0 writes at full rate again)."""
        self.throttles.append(percent)
        self._throttle.value = max(0, min(int(percent), 99))

    def pause(self) -> None:
        """Stop writing; returns once the writer wrote its last byte."""
        self.pauses += 1
        self._stop.set()
        if not self._stopped.wait(30):
            raise RuntimeError("writer did not stop")

    def close(self) -> None:
        self._stop.set()
        if self._proc.pid is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()

    def __enter__(self) -> DirtyingWriter:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class _Listening:
    """The destination process listens at ``address``."""

    address: Any


@dataclass(frozen=True)
class _Outcome:
    """How the destination process's migration ended: its result, or its error."""

    result: Any
    error: MigrationError | None
    valid: bool


def _destination_main(
    ram_name: str,
    listen: tuple[str, int],
    config: MigrationConfig,
    restore_from: str | None,
    pool_size: int,
    prefault: bool,
    prepare_receivers: bool,
    conn: Any,
) -> None:
    from .destination import Destination
    from .pool import WorkerPool

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the source side cancels; the destination follows it
    ram = GuestRAM.attach(ram_name)
    pool = WorkerPool(pool_size, start_method=config.start_method) if pool_size else None
    try:
        with Destination(ram, listen, config, pool=pool, prefault=prefault, prepare_receivers=prepare_receivers) as dst:
            if restore_from is not None:
                dst.restore(restore_from)
            elif prefault:
                dst.wait_prepared()  # ready before the address is reported: the agent prepared ahead
            conn.send(_Listening(dst.address))
            try:
                res = dst.wait()
                conn.send(_Outcome(res, None, dst.valid))
            except MigrationError as e:
                conn.send(_Outcome(None, e, dst.valid))
    finally:
        if pool is not None:
            pool.close()
        ram.close()


class RemoteDestination:
    """A :class:`~mpmultifd.Destination` receiving into ``ram_name`` in its own process.

    With ``restore_from``, the destination first restores that save file, so it
    can take a top-up migration (``Source.migrate(..., top_up=True)``). With
    ``pool_size``, its receiver workers come from a warm ``WorkerPool`` started
    before the address is reported, as an agent that migrates often keeps one.
    With ``prefault``, the region is allocated before the address is reported,
    and with ``prepare_receivers`` too (and ``pool_size``), the receivers are
    prepared before it.
    """

    def __init__(
        self,
        ram_name: str,
        config: MigrationConfig | None = None,
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        start_method: str = "spawn",
        timeout: float = 60.0,
        restore_from: str | None = None,
        pool_size: int = 0,
        prefault: bool = False,
        prepare_receivers: bool = False,
    ) -> None:
        # the library's context: a forkserver started here preloads numpy and the
        # worker module, so workers started later through it start in milliseconds
        ctx = mp_context(start_method)
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_destination_main,
            args=(
                ram_name,
                listen,
                config or MigrationConfig(),
                restore_from,
                pool_size,
                prefault,
                prepare_receivers,
                child,
            ),
            name="mpmultifd-destination",  # not a daemon: it starts worker processes
        )
        self._proc.start()
        child.close()
        if not self._conn.poll(timeout):
            self.close()
            raise RuntimeError("destination process did not start")
        self.address = self._conn.recv().address
        self.valid: bool | None = None

    def result(self, timeout: float = 120.0):
        """The destination's MigrationResult; raises its MigrationError."""
        if not self._conn.poll(timeout):
            raise TimeoutError("destination did not report")
        outcome = self._conn.recv()
        self.valid = outcome.valid
        if outcome.error is not None:
            raise outcome.error
        return outcome.result

    def close(self) -> None:
        if self._proc.is_alive():
            self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()

    def __enter__(self) -> RemoteDestination:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- QEMU

# the QMP client lives in mpmultifd.qemu (the VM handover uses it); tests and tools import it from here too
from .qemu import QMP, QMPError, log_tail  # noqa: E402,F401

_log_tail = log_tail  # the name tests knew it by


class WriterThread:
    """A thread of this process that keeps writing random bytes into one block and marking them.

    The in-process counterpart of :class:`DirtyingWriter` (an agent's own
    writer thread). Each write covers 1 byte to ``max_bytes`` at a random
    offset; ``interval`` seconds pass between writes. :meth:`pause` stops it
    and returns once it stopped (use it as ``migrate(pause=...)``).
    """

    def __init__(self, ram: GuestRAM, block: str | int = 0, *, seed: int = 1, interval: float = 0.0002,
                 max_bytes: int = 3 * 4096) -> None:
        import threading

        self.ram, self.block = ram, block
        self.writes = 0
        self._rng = np.random.default_rng(seed)
        self._interval, self._max = interval, max_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpmultifd-writer-thread", daemon=True)

    def start(self) -> WriterThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        arr = self.ram.view(self.block)
        size = len(arr)
        rng = self._rng
        while not self._stop.is_set():
            n = int(rng.integers(1, self._max + 1))
            off = int(rng.integers(0, size - n + 1))
            arr[off : off + n] = rng.integers(0, 256, n, dtype=np.uint8)  # write first, mark second
            self.ram.mark_dirty(self.block, off, n)
            self.writes += 1
            if self._interval:
                time.sleep(self._interval)

    def pause(self) -> None:
        self._stop.set()
        self._thread.join()

    stop = pause

    def __enter__(self) -> WriterThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.pause()


def _disconnect(sock: Any) -> None:
    """Reset a TCP connection now, whoever else holds its descriptor.

    ``close()`` with ``SO_LINGER`` 0 sends a reset only when the last descriptor
    goes, and a worker process forked meanwhile holds copies of this process's
    descriptors; ``connect()`` to an ``AF_UNSPEC`` address disconnects the
    socket itself (Linux sends the reset at once).
    """
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    addr = ctypes.create_string_buffer(16)  # sa_family = AF_UNSPEC (0), the rest zero
    libc.connect(sock.fileno(), addr, 16)


class ResetRelay:
    """A loopback TCP relay that resets data connections at chosen points, as a broken path would.

    Every connection to :attr:`address` is forwarded to ``upstream``. The relay
    reads each connection's hello to tell data connections from the control
    connection (and streams), which it never touches. ``points`` are reset
    points ``(nbytes, mode)``, taken in order: once the source has sent
    ``nbytes`` bytes in all over every data connection since the previous reset
    (or since the start), the data connection carrying them is reset on both
    sides (``SO_LINGER`` 0), either at that very byte (``mode="now"``,
    mid-packet as a rule), or once it next stays idle for ``idle`` seconds or
    the source closes it (``mode="idle"``: a channel parked at a round's
    barrier, a source waiting for its next round, a worker done), or like
    ``idle`` but forwarding nothing more from that byte on (``mode="drop"``: a
    path that swallows the tail, say a final round's, before it breaks). ``points`` may be appended to while the relay
    runs (say, from ``pause`` to cut into the final round). :attr:`resets` lists what was reset:
    ``(accept index, data channel, bytes that connection moved, mode)``.
    """

    def __init__(
        self,
        upstream: Any,
        points: list[tuple[int, str]] | None = None,
        *,
        idle: float = 0.03,
        refuse_after_reset: bool = False,
    ) -> None:
        import socket
        import threading

        self.upstream = upstream
        # once a reset was done, close every new connection at once (a path that stays down)
        self.refuse_after_reset = refuse_after_reset
        self.refused = 0
        self._down = False
        self.points = list(points or [])
        self.idle = idle
        self.resets: list[tuple[int, int, int, str]] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._since = 0  # data bytes since the previous reset point was taken
        self._stop = threading.Event()
        self._socks: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._lsock = socket.socket()
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(64)
        self._lsock.settimeout(0.1)
        self.address = self._lsock.getsockname()
        self._spawn(self._accept)

    def _spawn(self, fn: Any, *args: Any) -> None:
        import threading

        t = threading.Thread(target=fn, args=args, name="mpmultifd-relay", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        import socket

        while not self._stop.is_set():
            try:
                client, _ = self._lsock.accept()
            except OSError:
                continue
            index = self.connections
            self.connections += 1
            if self._down:
                self.refused += 1
                client.close()
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=5)
                up.settimeout(None)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            self._socks += [client, up]
            conn = {"client": client, "up": up, "index": index, "reset": False, "lock": __import__("threading").Lock()}
            self._spawn(self._forward, conn)
            self._spawn(self._backward, conn)

    def _reset(self, conn: dict, channel: int, moved: int, mode: str) -> None:
        import socket
        import struct

        with conn["lock"]:
            if conn["reset"]:
                return
            conn["reset"] = True
            self._down = self.refuse_after_reset  # before the reset: a reconnection may follow at once
            for s in (conn["client"], conn["up"]):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    _disconnect(s)
                    s.close()
                except OSError:
                    pass
        self.resets.append((conn["index"], channel, moved, mode))

    def _backward(self, conn: dict) -> None:
        a, b = conn["up"], conn["client"]
        try:
            while not self._stop.is_set():
                data = a.recv(65536)
                if not data:
                    b.shutdown(2)
                    return
                b.sendall(data)
        except OSError:
            pass

    def _forward(self, conn: dict) -> None:
        import socket

        from .wire import HELLO_SIZE, KIND_DATA

        a, b = conn["client"], conn["up"]
        moved = 0
        armed: str | None = None
        try:
            head = b""
            while len(head) < HELLO_SIZE:
                more = a.recv(HELLO_SIZE - len(head))
                if not more:
                    b.shutdown(socket.SHUT_WR)
                    return
                head += more
            b.sendall(head)
            kind, channel = head[6], int.from_bytes(head[24:26], "big")
            data_conn = kind == KIND_DATA
            while not self._stop.is_set():
                if armed is not None:
                    a.settimeout(self.idle)
                try:
                    data = a.recv(65536)
                except TimeoutError:
                    assert armed is not None  # only an armed relay sets a timeout
                    self._reset(conn, channel, moved, armed)
                    return
                if not data:
                    if armed is not None:  # the source is done with it: the reset comes now
                        self._reset(conn, channel, moved, armed)
                        return
                    b.shutdown(socket.SHUT_WR)
                    return
                if armed == "drop":
                    continue  # swallowed
                cut = None
                if data_conn and armed is None:
                    with self._lock:
                        if self.points and self._since + len(data) >= self.points[0][0]:
                            at, mode = self.points.pop(0)
                            cut = (max(0, at - self._since), mode)
                            self._since = 0
                        else:
                            self._since += len(data)
                if cut is not None and cut[1] == "now":
                    b.sendall(data[: cut[0]])
                    self._reset(conn, channel, moved + cut[0], "now")
                    return
                if cut is not None and cut[1] == "drop":
                    b.sendall(data[: cut[0]])
                    moved += cut[0]
                    armed = "drop"
                    continue
                if cut is not None:
                    armed = "idle"
                b.sendall(data)
                moved += len(data)
        except OSError:
            pass

    def close(self) -> None:
        import socket

        self._stop.set()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv or sendall; close() does not
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        self._lsock.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> ResetRelay:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
