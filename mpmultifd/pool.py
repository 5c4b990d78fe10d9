"""A warm pool of channel worker processes that an agent reuses across migrations.

Starting a worker process costs milliseconds under forkserver (numpy
preloaded) and a good part of a second under spawn; an agent that migrates,
saves or restores often pays it every time. A :class:`WorkerPool` keeps idle
worker processes that run one job after another: a job is the same entry point
and arguments a freshly started worker gets (``sender_main``,
``receiver_main``, ``saver_main``, ``loader_main``), sent over the worker's
pipe; sockets and the ring's eventfds travel through
``multiprocessing.reduction`` (file descriptors passed over a Unix socket), so
it works under every start method.

Ownership is plain: a Source or Destination given a pool borrows workers and
returns them when its migration ends; the pool, and every process in it, is
the caller's to close. A worker whose job failed exits, and the pool starts a
new one when one is needed. TLS channels never use the pool: a TLS session
lives in the memory of the process that made it and cannot be handed over.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any, Callable

from .messages import Idle, Job, Leave, Log
from .processes import mp_context, start_worker

__all__ = ["WorkerPool"]

log = logging.getLogger("mpmultifd.pool")

_IDLE_POLL = 0.5
_RETURN_GRACE = 2.0


class _RingRef:
    """A ring in a job's arguments: its name, and which passed descriptors are its eventfds."""

    def __init__(self, name: str, data: int, space: int, spin: int) -> None:
        self.name, self.data, self.space, self.spin = name, data, space, spin


class _SocketRef:
    def __init__(self, family: int, type: int, proto: int, fd: int) -> None:
        self.family, self.type, self.proto, self.fd = family, type, proto, fd


class _Passed:
    """A received descriptor, shaped like reduction.DupFd for the ring's rebuild."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def detach(self) -> int:
        return self.fd


def _pack(args: tuple) -> tuple[tuple, list[int]]:
    """Replace rings and sockets by references to descriptors passed alongside (SCM_RIGHTS)."""
    from .ring import Ring

    out: list[Any] = []
    fds: list[int] = []
    for a in args:
        if isinstance(a, Ring):
            out.append(_RingRef(a.name, len(fds), len(fds) + 1, a.spin))
            fds += [a._data_efd, a._space_efd]
        elif isinstance(a, socket.socket):
            out.append(_SocketRef(a.family, a.type, a.proto, len(fds)))
            fds.append(a.fileno())
        else:
            out.append(a)
    return tuple(out), fds


def _unpack(args: tuple, fds: list[int]) -> tuple:
    from .ring import rebuild_ring

    out: list[Any] = []
    for a in args:
        if isinstance(a, _RingRef):
            out.append(rebuild_ring(a.name, _Passed(fds[a.data]), _Passed(fds[a.space]), a.spin))
        elif isinstance(a, _SocketRef):
            out.append(socket.socket(a.family, a.type, a.proto, fileno=fds[a.fd]))
        else:
            out.append(a)
    return tuple(out)


def _pool_worker_main(conn: Connection) -> None:
    """Run jobs until told to leave, or until the pool's owner is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ppid = os.getppid()
    while True:
        try:
            if not conn.poll(_IDLE_POLL):
                if os.getppid() != ppid:
                    return  # re-parented: the owner is gone
                continue
            job = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(job, Leave):
            return
        if not isinstance(job, Job):
            continue  # a Stop that reached us after the job it was meant for had ended
        fds = [reduction.recv_handle(conn) for _ in range(job.nfds)]
        try:
            args = _unpack(job.args, fds)
        except BaseException as exc:
            for fd in fds:
                os.close(fd)
            from .worker import report_failure

            report_failure(conn, exc)
            return
        try:
            job.target(*args, conn)
        except SystemExit as e:
            if e.code:
                return  # the job failed and said so: a fresh process serves the next one
        try:
            conn.send(Idle())
        except (OSError, ValueError):
            return


class _Worker:
    def __init__(self, proc: Any, conn: Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.settled = True  # idle: its last job reported that it released everything
        self.ended: int | None = None  # the exit code, once the pool closed the process object

    @property
    def exitcode(self) -> int | None:
        if self.ended is not None:
            return self.ended
        return self.proc.exitcode

    def alive(self) -> bool:
        return self.ended is None and self.proc.is_alive()


class _BorrowedConnection:
    """The pool worker's pipe as a job sees it: closing it hands the worker back."""

    def __init__(self, pool: "WorkerPool", worker: _Worker) -> None:
        self._pool = pool
        self._worker = worker
        self._returned = False

    def fileno(self) -> int:
        return self._worker.conn.fileno()

    def send(self, obj: Any) -> None:
        self._worker.conn.send(obj)

    def recv(self) -> Any:
        return self._worker.conn.recv()

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self._worker.conn.poll(timeout)

    def send_handle(self, fd: int) -> None:
        """Pass a duplicate of descriptor ``fd`` to the worker (SCM_RIGHTS)."""
        reduction.send_handle(self._worker.conn, fd, self._worker.proc.pid)

    def close(self) -> None:
        if not self._returned:
            self._returned = True
            self._pool._give_back(self._worker)


class _BorrowedProcess:
    """The pool worker's process as a job sees it: it "ends" when the job ends.

    ``join`` waits for the worker's ``idle`` report (the job released the RAM,
    ring and socket) rather than for the process to exit; ``kill`` ends the
    process for good, and the pool forgets it.
    """

    def __init__(self, worker: _Worker) -> None:
        self._worker = worker
        self._idle = False

    @property
    def pid(self) -> int | None:
        return self._worker.proc.pid

    @property
    def sentinel(self) -> int:
        return self._worker.proc.sentinel

    @property
    def exitcode(self) -> int | None:
        return 0 if self._idle else self._worker.exitcode

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = self._worker.conn
        while not self._idle and self._worker.exitcode is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if not conn.poll(left):
                    return
                msg = conn.recv()
            except (EOFError, OSError):
                self._worker.proc.join(left)
                return
            if isinstance(msg, Idle):
                self._idle = True
                self._worker.settled = True
            elif isinstance(msg, Log):
                msg.emit()

    def is_alive(self) -> bool:
        return not self._idle and self._worker.alive()

    def kill(self) -> None:
        if self._worker.ended is None:
            self._worker.proc.kill()

    def close(self) -> None:
        pass  # the process is the pool's


class WorkerPool:
    """Idle worker processes that run channel jobs for any number of migrations, saves and restores.

    ``size`` workers start at once (more start on demand, and stay). Pass the
    pool to ``Source(..., pool=pool)``, ``Destination(..., pool=pool)``; one
    pool can serve both ends in one process. ``close()`` ends every worker;
    workers still busy with a job are killed. Thread-safe.
    """

    def __init__(self, size: int = 0, *, start_method: str = "forkserver") -> None:
        from .config import START_METHODS

        if start_method not in START_METHODS:
            from .errors import ConfigError

            raise ConfigError(f"start_method: {start_method!r} is not one of {', '.join(START_METHODS)}")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= 1024:
            from .errors import ConfigError

            raise ConfigError(f"size: {size!r} is not a whole number in 0..1024")
        self.start_method = start_method
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._closed = False
        self.started = 0
        self.reused = 0
        for _ in range(size):
            self._idle.append(self._new_worker())

    def _new_worker(self) -> _Worker:
        proc, conn = start_worker(mp_context(self.start_method), _pool_worker_main, (), "mpmultifd-pool")
        w = _Worker(proc, conn)
        with self._lock:
            self._all.append(w)
            self.started += 1
        return w

    def run(self, target: Callable[..., Any], args: tuple) -> tuple[_BorrowedProcess, _BorrowedConnection]:
        """Start ``job.target(*args, conn)`` in an idle worker (or a new one); returns process and pipe handles."""
        while True:
            with self._lock:
                if self._closed:
                    from .errors import MigrationError

                    raise MigrationError("the worker pool is closed")
                w = self._idle.pop() if self._idle else None
            if w is None:
                w = self._new_worker()
            elif w.exitcode is not None:
                self._forget(w)
                continue
            else:
                with self._lock:
                    self.reused += 1
            packed, fds = _pack(args)
            try:
                w.conn.send(Job(target, packed, len(fds)))
                for fd in fds:
                    reduction.send_handle(w.conn, fd, w.proc.pid)
            except (OSError, ValueError):
                self._forget(w)
                self._end(w, grace=0.1)
                continue
            w.settled = False
            return _BorrowedProcess(w), _BorrowedConnection(self, w)

    def _give_back(self, w: _Worker) -> None:
        """A job's owner is done with ``w``: keep it if its job reported idle, else end it."""
        if w.settled and w.exitcode is None:
            with self._lock:
                if not self._closed:
                    self._idle.append(w)
                    return
        self._forget(w)
        self._end(w)

    def _forget(self, w: _Worker) -> None:
        with self._lock:
            if w in self._all:
                self._all.remove(w)
            if w in self._idle:
                self._idle.remove(w)

    @staticmethod
    def _end(w: _Worker, grace: float = _RETURN_GRACE) -> None:
        if w.ended is not None:
            return
        try:
            w.conn.send(Leave())
        except (OSError, ValueError):
            pass
        w.proc.join(grace)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(5.0)
        w.conn.close()
        w.ended = w.proc.exitcode if w.proc.exitcode is not None else -9
        try:
            w.proc.close()
        except ValueError:
            pass

    @property
    def idle(self) -> int:
        """Workers waiting for a job."""
        with self._lock:
            return len(self._idle)

    @property
    def size(self) -> int:
        """Worker processes alive in the pool, busy or idle."""
        with self._lock:
            return len(self._all)

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._all if w.proc.pid is not None]

    def close(self) -> None:
        """End every worker (idle ones at once; busy ones are killed after a grace period); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers, self._all, self._idle = list(self._all), [], []
        for w in workers:
            self._end(w)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
