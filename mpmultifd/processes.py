"""Starting, stopping and reaping mpmultifd's worker processes.

Every coordinator (a migration's source and destination, a save, a restore,
the worker pool) starts its workers through :func:`start_worker` and ends
them through :func:`nudge_worker` and :func:`reap_workers`, so one lock
orders every start in the process and one grace period bounds every stop.
"""

from __future__ import annotations

import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from . import _mp
from .config import MigrationConfig
from .messages import Stop

__all__ = [
    "JOIN_GRACE",
    "mp_context",
    "nudge_worker",
    "reap_workers",
    "start_forkserver",
    "start_worker",
    "worker_start_method",
]

# how long a stopped worker may take to exit before it is killed
JOIN_GRACE = 2.0

_START_LOCK = threading.Lock()


def start_worker(
    ctx: Any, target: Callable[..., Any], args: tuple[Any, ...], name: str, pool: Any = None
) -> tuple[Any, Any]:
    """Start a worker process with a connection to it; returns (process, our end of the connection).

    With a :class:`~mpmultifd.pool.WorkerPool`, an idle pool worker runs the job
    instead, and the handles returned give it back to the pool when joined and
    closed.

    One lock serialises every worker start in this process: a fork in one
    thread must not copy the half-made pipes of a start in another thread (a
    Source and a Destination in one process), or the copy would keep a dead
    worker's pipes open and hide its death.

    TLS workers are forked (their TLS session lives in this process's memory);
    Python 3.12+ warns about forking a process that has threads. The child runs
    only mpmultifd's worker code, which takes none of the parent threads' locks.
    """
    if pool is not None:
        proc, conn = pool.run(target, args)
        return proc, conn
    with _START_LOCK:
        parent_conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=target, args=(*args, child_conn), name=name, daemon=True)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=".*use of fork\\(\\) may lead to deadlocks", category=DeprecationWarning
                )
                proc.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()
    return proc, parent_conn


def nudge_worker(conn: Any, sock: socket.socket | None) -> None:
    """Ask a worker to stop, and wake it if it is blocked on its socket (file workers have none)."""
    try:
        conn.send(Stop())
    except (OSError, ValueError):
        pass  # it already left
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def reap_workers(workers: list[tuple[Any, Any, socket.socket | None]]) -> None:
    """Join ``(process, connection, socket)`` workers within one grace period, kill the
    ones still running, and close this side's connection and socket of each."""
    deadline = time.monotonic() + JOIN_GRACE
    for proc, _, _ in workers:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc, conn, sock in workers:
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
        conn.close()
        if sock is not None:
            sock.close()


def worker_start_method(config: MigrationConfig) -> str:
    return "fork" if config.tls is not None else config.start_method


def start_forkserver() -> None:
    """Launch the forkserver that forkserver workers come from, if it is not running yet,
    so its imports happen before the first worker is needed."""
    _mp.start_forkserver()


def mp_context(method: str) -> Any:
    """The multiprocessing context for workers: their children never run the caller's ``__main__``,
    and forkserver ones come from a server of ours that preloads numpy and the worker modules."""
    return _mp.context(method)


