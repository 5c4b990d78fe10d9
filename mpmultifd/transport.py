"""Socket helpers: whole-message sends and receives over many buffers.

``sendmsg`` and ``recv_into`` may move fewer bytes than asked (signals,
timeouts, socket buffer limits); these loops finish the job or raise.
"""

from __future__ import annotations

import socket
from typing import Sequence

from .errors import ChannelBroken, ChannelClosed

__all__ = ["IOV_MAX", "sendmsg_all", "recv_exact_into", "recv_exact", "connect", "listen"]

IOV_MAX = 1024


def sendmsg_all(sock: socket.socket, buffers: Sequence, flags: int = 0) -> int:
    """Send every byte of ``buffers`` with as few ``sendmsg`` calls as possible.

    ``buffers`` must hold at most :data:`IOV_MAX` entries. After a partial
    send, fully sent buffers are dropped and the first remaining one is sliced,
    so no byte is sent twice or skipped. Returns the number of calls made.
    """
    total = sum(memoryview(b).nbytes for b in buffers)
    sent = sock.sendmsg(buffers, (), flags)
    calls = 1
    if sent == total:
        return calls
    views = [memoryview(b).cast("B") for b in buffers]
    while True:
        total -= sent
        if total == 0:
            return calls
        if sent == 0:
            raise ChannelBroken("sendmsg made no progress")
        i = 0
        while sent >= views[i].nbytes:
            sent -= views[i].nbytes
            i += 1
        views = views[i:]
        views[0] = views[0][sent:]
        sent = sock.sendmsg(views, (), flags)
        calls += 1


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` completely from ``sock``; EOF before that is :class:`ChannelClosed`."""
    want = view.nbytes
    got = sock.recv_into(view, want, socket.MSG_WAITALL)
    while got < want:
        if got == 0 and want:
            raise ChannelClosed(f"connection closed after {view.nbytes - want} of {view.nbytes} bytes")
        view = view[got:]
        want -= got
        got = sock.recv_into(view, want, socket.MSG_WAITALL)


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Receive exactly ``n`` bytes."""
    buf = bytearray(n)
    recv_exact_into(sock, memoryview(buf))
    return buf


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(address: tuple[str, int], timeout: float) -> socket.socket:
    """Connect to a destination; the socket comes back in blocking mode."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as e:
        raise ChannelBroken(f"cannot connect to {address[0]}:{address[1]}: {e}") from e
    sock.settimeout(None)
    _tune(sock)
    return sock


def listen(address: tuple[str, int], backlog: int = 64) -> socket.socket:
    """A listening TCP socket on ``address`` (port 0 picks a free port)."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def tune_accepted(sock: socket.socket) -> None:
    """Options for an accepted data or control connection."""
    sock.settimeout(None)
    _tune(sock)
