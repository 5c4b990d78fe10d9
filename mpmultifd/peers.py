"""Who is at the other end of a local connection: the user that owns the peer's socket.

Without a key, a peer on the same host is trusted only if it runs as the same
user. On a Unix socket the kernel says who the peer is (``SO_PEERCRED``). On
TCP loopback it says it through its socket table, which lists every socket of
this network namespace with the uid that created it: the peer's socket is the
one whose local address is our socket's peer address and whose remote address
is our own local address. The table is asked through the ``sock_diag`` netlink
(one exact lookup), or where that is unavailable read from ``/proc/net/tcp``
and ``/proc/net/tcp6`` (a scan of every socket). For
a destination that row is the source's connecting socket; for a source it is
the destination's accepted socket, which carries the uid of the user that
made the listening socket.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator

__all__ = [
    "Endpoint",
    "PeerUnknown",
    "parse_proc_address",
    "parse_proc_line",
    "find_socket_uid",
    "peer_uid",
    "untrusted_peer",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IPAddress, int]

PROC_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


class PeerUnknown(LookupError):
    """The owner of a peer's socket could not be found (no ``/proc``, no matching row, a foreign family)."""


def _ip(address: str) -> IPAddress:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return ip


def parse_proc_address(text: str) -> Endpoint:
    """``"0100007F:1F90"`` → (127.0.0.1, 8080); 32 hex digits before the colon are an IPv6 address.

    The kernel prints an address as 32-bit words in the host's byte order
    (one word for IPv4, four for IPv6) and the port as a plain hex number.
    An IPv4-mapped IPv6 address comes back as the IPv4 address.
    """
    host, sep, port_hex = text.partition(":")
    if not sep or len(host) not in (8, 32) or not 1 <= len(port_hex) <= 4:
        raise ValueError(f"{text!r} is not a /proc/net/tcp address")
    raw = bytes.fromhex(host)
    port = int(port_hex, 16)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip: IPAddress
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw)
    else:
        ip = ipaddress.IPv6Address(raw)
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    return ip, port


def parse_proc_line(line: str) -> tuple[Endpoint, Endpoint, int, int]:
    """One row of ``/proc/net/tcp{,6}``: (local endpoint, remote endpoint, state, uid)."""
    fields = line.split()
    if len(fields) < 8 or not fields[0].endswith(":"):
        raise ValueError(f"{line.strip()[:120]!r} is not a /proc/net/tcp row")
    return parse_proc_address(fields[1]), parse_proc_address(fields[2]), int(fields[3], 16), int(fields[7])


def _rows(tables: Iterable[str], port: int) -> Iterator[str]:
    """Rows of the tables that name ``port`` (a cheap filter before parsing); PeerUnknown if none can be read."""
    needle = f":{port:04X} "
    read = False
    errors = []
    for path in tables:
        try:
            with open(path, encoding="ascii") as f:
                next(f, None)  # the header
                read = True
                for line in f:
                    if needle in line:
                        yield line
        except OSError as e:
            errors.append(f"{path}: {e.strerror or e}")
    if not read:
        raise PeerUnknown("cannot read the kernel's socket table (" + "; ".join(errors) + ")")


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_NLMSG = struct.Struct("=IHHII")
_DIAG_REQ = struct.Struct("=BBBBI")  # family, protocol, extensions, pad, states
_SYN_RECV_STATES = (3, 12)  # SYN_RECV and NEW_SYN_RECV: a request socket, whose diag uid is not its owner's
NETLINK = hasattr(socket, "AF_NETLINK")  # the exact lookup; False falls back to scanning PROC_TABLES


def _diag_uid(local: Endpoint, remote: Endpoint) -> int:
    """The socket's uid from the kernel's ``sock_diag`` netlink: one exact lookup by address and ports.

    ``OSError`` when this kernel or sandbox offers no such netlink; :class:`PeerUnknown` when it has
    no such socket."""
    v4 = isinstance(local[0], ipaddress.IPv4Address) and isinstance(remote[0], ipaddress.IPv4Address)
    family = socket.AF_INET if v4 else socket.AF_INET6

    def packed(ip: IPAddress) -> bytes:
        raw = ip.packed if v4 or isinstance(ip, ipaddress.IPv6Address) else b"\0" * 10 + b"\xff\xff" + ip.packed
        return raw + bytes(16 - len(raw))

    sockid = struct.pack("!HH", local[1], remote[1]) + packed(local[0]) + packed(remote[0])
    sockid += struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
    req = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5)
        nl.sendto(_NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + req, (0, 0))
        data = nl.recv(65536)
    if len(data) < _NLMSG.size + 4:
        raise OSError(f"sock_diag: a {len(data)}-byte answer")
    kind = _NLMSG.unpack_from(data)[1]
    if kind == _NLMSG_ERROR:
        err = -struct.unpack_from("=i", data, _NLMSG.size)[0]
        if err == errno.ENOENT:
            raise PeerUnknown(
                f"no socket {local[0]}:{local[1]} -> {remote[0]}:{remote[1]} on this host "
                "(a peer in another network namespace, or one that already left)"
            )
        raise OSError(err, f"sock_diag: {os.strerror(err)}")
    if kind != _SOCK_DIAG_BY_FAMILY or len(data) < _NLMSG.size + 72:
        raise OSError(f"sock_diag: an answer of type {kind}, {len(data)} bytes")
    state = data[_NLMSG.size + 1]
    if state in _SYN_RECV_STATES:
        raise PeerUnknown(f"the socket {local[0]}:{local[1]} is still being set up")
    return int(struct.unpack_from("=I", data, _NLMSG.size + 64)[0])


def find_socket_uid(local: Endpoint, remote: Endpoint, tables: Iterable[str] | None = None) -> int:
    """The uid owning the TCP socket whose local endpoint is ``local`` and remote endpoint ``remote``.

    Asked of the ``sock_diag`` netlink (an exact lookup) when :data:`NETLINK` is set and ``tables``
    is not given; without it, or where the netlink is unavailable, the rows of ``tables`` (by
    default :data:`PROC_TABLES`) are searched."""
    want = (_ip(str(local[0])), int(local[1])), (_ip(str(remote[0])), int(remote[1]))
    if NETLINK and tables is None:
        try:
            return _diag_uid(*want)
        except OSError:
            pass  # no sock_diag here (a sandbox, an old kernel): read the tables
    tables = PROC_TABLES if tables is None else tables
    for line in _rows(tables, want[0][1]):
        try:
            here, there, _state, uid = parse_proc_line(line)
        except ValueError:
            continue
        if (here, there) == want:
            return uid
    raise PeerUnknown(
        f"no socket {want[0][0]}:{want[0][1]} -> {want[1][0]}:{want[1][1]} in the kernel's socket table "
        "(a peer in another network namespace, or one that already left)"
    )


def peer_uid(sock: socket.socket) -> tuple[int, int | None]:
    """(uid, pid or None) of the process at the other end of a local connection.

    A Unix socket answers with ``SO_PEERCRED``; a TCP socket is looked up in
    the kernel's socket table. :class:`PeerUnknown` when neither works.
    """
    if sock.family == socket.AF_UNIX:
        if not hasattr(socket, "SO_PEERCRED"):
            raise PeerUnknown("this system has no SO_PEERCRED")
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError as e:
            raise PeerUnknown(f"SO_PEERCRED: {e.strerror or e}") from e
        pid, uid, _gid = struct.unpack("3i", creds)
        return uid, pid
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise PeerUnknown(f"socket family {sock.family!r} has no known peer owner")
    try:
        mine = sock.getsockname()[:2]
        theirs = sock.getpeername()[:2]
    except OSError as e:
        raise PeerUnknown(f"the connection has no addresses: {e.strerror or e}") from e
    return find_socket_uid((theirs[0], theirs[1]), (mine[0], mine[1])), None


def untrusted_peer(sock: socket.socket) -> str | None:
    """None when the peer of a local connection runs as this process's user; else who it is, or why
    that is unknown (a text for logs and errors)."""
    try:
        uid, pid = peer_uid(sock)
    except PeerUnknown as e:
        return f"its user is unknown: {e}"
    if uid == os.geteuid():
        return None
    return f"uid {uid}" + (f", pid {pid}" if pid else "")
