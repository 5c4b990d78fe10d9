"""Socket helpers: whole-message sends and receives over many buffers.

``sendmsg`` and ``recv_into`` may move fewer bytes than asked (signals,
timeouts, socket buffer limits); these loops finish the job or raise.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from typing import Any, Sequence, Tuple, Union

from .errors import ChannelBroken, ChannelClosed, ConfigError

__all__ = [
    "IOV_MAX",
    "Address",
    "drop_sent",
    "sendmsg_all",
    "send_buffers",
    "recv_exact_into",
    "recv_exact_into_views",
    "recv_exact",
    "connect",
    "listen",
    "parse_address",
    "format_address",
    "is_loopback",
    "read_available",
]

IOV_MAX = 1024


def drop_sent(views: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of ``views`` (byte memoryviews) after a send that moved ``sent`` bytes:
    fully sent buffers dropped, the partly sent one sliced."""
    i = 0
    while sent >= views[i].nbytes:
        sent -= views[i].nbytes
        i += 1
    views = views[i:]
    views[0] = views[0][sent:]
    return views


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
        views = drop_sent(views, sent)
        sent = sock.sendmsg(views, (), flags)
        calls += 1


def send_buffers(sock: socket.socket, buffers: Sequence) -> int:
    """Send a header and its IOVs: one gathered ``sendmsg`` on a plain socket.

    TLS sockets have no ``sendmsg``; each buffer then goes with ``sendall`` in
    turn (TLS records of up to 16 KiB each), so no joined copy of the packet is
    ever built. Returns the number of send calls.
    """
    if isinstance(sock, ssl.SSLSocket):
        for b in buffers:
            sock.sendall(b)
        return len(buffers)
    return sendmsg_all(sock, buffers)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` completely from ``sock``; EOF before that is :class:`ChannelClosed`."""
    want = view.nbytes
    # TLS sockets take no recv flags; they return at most one record per call
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    got = sock.recv_into(view, want, flags)
    while got < want:
        if got == 0 and want:
            raise ChannelClosed(f"connection closed after {view.nbytes - want} of {view.nbytes} bytes")
        view = view[got:]
        want -= got
        got = sock.recv_into(view, want, flags)


def recv_exact_into_views(sock: socket.socket, views: Sequence[memoryview]) -> None:
    """Fill byte memoryviews ``views`` in order from ``sock``, scattering with ``recvmsg_into``.

    One call fills up to :data:`IOV_MAX` views; a short read (a signal, the
    socket's timeout) continues where it stopped. EOF first is
    :class:`ChannelClosed`.
    """
    if isinstance(sock, ssl.SSLSocket):
        for v in views:
            recv_exact_into(sock, v)
        return
    total = sum(v.nbytes for v in views)
    done = 0
    for i in range(0, len(views), IOV_MAX):
        part = list(views[i : i + IOV_MAX])
        want = sum(v.nbytes for v in part)
        while want:
            got = sock.recvmsg_into(part, 0, socket.MSG_WAITALL)[0]
            if got == 0:
                raise ChannelClosed(f"connection closed after {done} of {total} bytes")
            done += got
            want -= got
            if want:
                part = drop_sent(part, got)


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Receive exactly ``n`` bytes."""
    buf = bytearray(n)
    recv_exact_into(sock, memoryview(buf))
    return buf


Address = Union[Tuple[str, int], str, "os.PathLike[str]"]


def parse_address(address: Address) -> tuple[int, Any]:
    """(family, sockaddr) for ``(host, port)``, ``"unix:/path"``, or a filesystem path."""
    if isinstance(address, tuple):
        if len(address) != 2 or not isinstance(address[1], int):
            raise ConfigError(f"address: {address!r} is not (host, port)")
        host = address[0]
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, address[1])
    path = os.fspath(address)
    if isinstance(path, bytes):
        path = path.decode()
    if path.startswith("unix:"):
        path = path[len("unix:") :]
    if not path:
        raise ConfigError("address: empty Unix socket path")
    return socket.AF_UNIX, path


def format_address(address: Address) -> str:
    family, addr = parse_address(address)
    if family == socket.AF_UNIX:
        return f"unix:{addr}"
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(address: Address) -> bool:
    """True for loopback TCP addresses and Unix sockets (which never leave the host)."""
    family, addr = parse_address(address)
    if family == socket.AF_UNIX:
        return True
    host = addr[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


KEEPALIVE_IDLE = 5  # seconds of silence before the kernel probes a peer


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a peer host that vanished leaves a half-open connection: probes find it
        # even on a channel that is idle (parked at a SYNC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def connect(address: Address, timeout: float) -> socket.socket:
    """Connect to a destination (TCP or Unix socket); the socket comes back in blocking mode."""
    family, addr = parse_address(address)
    try:
        if family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(addr)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection(addr, timeout=timeout)
    except OSError as e:
        raise ChannelBroken(f"cannot connect to {format_address(address)}: {e}") from e
    sock.settimeout(None)
    _tune(sock)
    return sock


def listen(address: Address, backlog: int = 64) -> socket.socket:
    """A listening socket: TCP on ``(host, port)`` (port 0 picks a free port) or a Unix socket path.

    A Unix socket file is made mode 0600 (only its owner, and root, may connect), whatever the umask.
    """
    family, addr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        if family == socket.AF_UNIX:
            # connecting needs write permission on the socket file: owner only, whatever the
            # umask made it (nobody can connect before listen(), so there is no window)
            os.chmod(addr, 0o600)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def tune_accepted(sock: socket.socket) -> None:
    """Options for an accepted data or control connection."""
    sock.settimeout(None)
    _tune(sock)


def read_available(sock: socket.socket, peer: str) -> bytes:
    """Whatever the non-blocking control socket has now (TLS: every decrypted byte)."""
    chunks = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            break
        except OSError as e:
            raise ChannelBroken(f"control connection failed: {e}") from e
        if not data:
            if chunks:
                break  # report the EOF on the next read, after these bytes are decoded
            raise ChannelClosed(f"{peer} closed the control connection")
        chunks.append(data)
        if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            break
    return b"".join(chunks)
