"""MSG_ZEROCOPY sends of page IOVs, with completion tracking.

With ``SO_ZEROCOPY`` set on a TCP socket, ``sendmsg(..., MSG_ZEROCOPY)`` pins
the user pages and returns before the kernel has read them. The kernel later
queues a notification on the socket's error queue saying which sends (a
32-bit id per ``sendmsg`` call that sent bytes, counted from 0 on each socket
and wrapping at 2**32) it no longer needs. Until then the memory behind every
IOV, the packet header included, must stay alive and unchanged: Python's own
buffer exports end when ``sendmsg`` returns, so nothing else protects it.

Two consequences the callers must respect:

- a completion arrives only once the peer has ACKed the data, so
  :meth:`ZeroCopySender.flush` needs a reader on the other side;
- the kernel copies anyway (and flags the completion ``COPIED``) whenever the
  data is delivered to a local socket: loopback, and veth between network
  namespaces. ``"auto"`` mode watches that flag and turns zero-copy off for the
  channel when it stops paying. (A native XDP program on the receiving veth
  clears the flag, but veth then copies the bytes itself: the flag says who
  copied, not that nobody did.)

Python's :mod:`socket` module defines none of the constants (3.10 to 3.13),
so they are spelt out here (``include/uapi/linux/errqueue.h``, ``socket.h``).
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from .transport import drop_sent

__all__ = [
    "SO_ZEROCOPY",
    "MSG_ZEROCOPY",
    "SO_EE_ORIGIN_ZEROCOPY",
    "SO_EE_CODE_ZEROCOPY_COPIED",
    "IP_RECVERR",
    "IPV6_RECVERR",
    "enable_zerocopy",
    "ZeroCopySender",
]

SO_ZEROCOPY = 60
MSG_ZEROCOPY = 0x4000000
SO_EE_ORIGIN_ZEROCOPY = 5
SO_EE_CODE_ZEROCOPY_COPIED = 1
IP_RECVERR = 11
IPV6_RECVERR = 25

_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "IPPROTO_IPV6", 41)
_RECVERR_LEVELS = frozenset({(_SOL_IP, IP_RECVERR), (_SOL_IPV6, IPV6_RECVERR)})
_MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
_ERRQ_FLAGS = _MSG_ERRQUEUE | socket.MSG_DONTWAIT
_ANCBUF = 256  # one cmsg: sock_extended_err (16 bytes) + offender address (<= 28 bytes)
# struct sock_extended_err: ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data
_EE = struct.Struct("=IBBBBII")
_MASK = 0xFFFFFFFF
_POLLERR = select.POLLERR
_POLLOUT = select.POLLOUT
_POLLHUP = select.POLLHUP | select.POLLNVAL


def enable_zerocopy(sock: socket.socket) -> str | None:
    """Set ``SO_ZEROCOPY`` on ``sock``.

    Returns ``None`` on success, otherwise a sentence saying why zero-copy sends
    are unavailable on this socket (the caller reports it and sends plainly).
    """
    if isinstance(sock, ssl.SSLSocket):
        return (
            "TLS socket: the ssl module encrypts in user space, so there are no guest pages "
            "to hand to the kernel (MSG_ZEROCOPY is off with TLS)"
        )
    if not sys.platform.startswith("linux"):
        return f"MSG_ZEROCOPY is Linux-only (this is {sys.platform})"
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    except OSError as e:
        if e.errno == errno.ENOPROTOOPT:
            return f"this kernel does not know SO_ZEROCOPY (Linux 4.14 or later is needed): {e}"
        if e.errno == errno.EOPNOTSUPP:
            family = getattr(sock.family, "name", str(sock.family))
            return f"{family} sockets do not support SO_ZEROCOPY (only TCP and UDP over IPv4/IPv6): {e}"
        return f"setsockopt(SO_ZEROCOPY) failed: {e}"
    return None


class ZeroCopySender:
    """Sends buffer lists with ``MSG_ZEROCOPY`` on one TCP socket and tracks completions.

    One sender per socket, for the socket's whole life: the kernel numbers the
    zero-copy sends of a socket itself, and this object must see every one of
    them (pass ``first_id`` if the socket made zero-copy sends before).

    Buffers and ``keepalive`` objects handed to :meth:`send` are referenced
    until the completion covering that send has been reaped; keeping a
    memoryview of a ``SharedMemory`` referenced also makes an early
    ``SharedMemory.close()`` fail with ``BufferError`` instead of silently
    freeing pages the kernel may still read. Call :meth:`flush` before the
    region may change meaning (every SYNC, end of stream) and before the
    socket or the RAM is released.

    ``enabled`` turns ``False`` (for good) once at least ``fallback_after``
    completions were reaped and at least ``fallback_ratio`` of them were
    ``COPIED``; from then on :meth:`send` sends without ``MSG_ZEROCOPY``
    (pass ``fallback_ratio`` > 1 to never fall back). On ``ENOBUFS`` (the
    per-socket option-memory limit ``net.core.optmem_max``, or the locked-memory
    limit of an unprivileged user) :meth:`send` waits up to
    ``enobufs_timeout`` seconds for completions and retries; if none arrive
    (or none are outstanding) it sends that piece with a plain copying
    ``sendmsg``. Either way each byte is sent exactly once.

    :meth:`send` reads the error queue by itself every ``reap_every``
    zero-copy sends (one non-blocking ``recvmsg``), which keeps the held
    buffers few and lets the fallback decision come early; call :meth:`reap`
    when the channel idles.

    Not thread-safe: one thread sends, reaps and flushes.

    Attributes:
        stats: counters, ``sends`` (zero-copy ``sendmsg`` calls that sent bytes,
            i.e. ids consumed), ``completions`` (ids completed), ``copied`` (ids
            the kernel reported ``COPIED``), ``notifications`` (error-queue
            messages read), ``enobufs`` (``ENOBUFS`` retries), ``plain_sends``
            (``sendmsg`` calls without ``MSG_ZEROCOPY``: after the fallback or
            to get past ``ENOBUFS``), ``bytes`` (bytes sent zero-copy).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        fallback_after: int = 64,
        fallback_ratio: float = 0.9,
        enobufs_timeout: float = 0.1,
        reap_every: int = 16,
        first_id: int = 0,
    ) -> None:
        if sock.type != socket.SOCK_STREAM:
            raise OSError(errno.EOPNOTSUPP, f"ZeroCopySender needs a TCP socket, not {sock.type!r}")
        reason = enable_zerocopy(sock)
        if reason is not None:
            raise OSError(errno.EOPNOTSUPP, reason)
        if fallback_after < 0:
            raise ValueError(f"fallback_after must be >= 0, not {fallback_after!r}")
        self._sock = sock
        self._fallback_after = max(1, int(fallback_after))
        self._fallback_ratio = float(fallback_ratio)
        self._enobufs_timeout = float(enobufs_timeout)
        self._reap_every = max(1, int(reap_every))
        self._since_drain = 0
        # Ids are kept as unbounded counters and reduced mod 2**32 only when
        # matched against the kernel's: no wrap-around arithmetic elsewhere.
        self._next = first_id & _MASK  # id of the next zero-copy send
        self._done = self._next  # every id below this one completed
        self._ahead: dict[int, int] = {}  # completed ranges [start, end) above _done
        self._ahead_count = 0
        # (last id of a send, buffers, keepalive): released once _done passes it
        self._held: deque[tuple[int, tuple, Any]] = deque()
        self.enabled = True
        self.stats: dict[str, int] = {
            "sends": 0,
            "completions": 0,
            "copied": 0,
            "notifications": 0,
            "enobufs": 0,
            "plain_sends": 0,
            "bytes": 0,
        }

    # ------------------------------------------------------------------ state

    @property
    def outstanding(self) -> int:
        """Zero-copy sends (ids) made but not yet completed."""
        return self._next - self._done - self._ahead_count

    @property
    def next_id(self) -> int:
        """The 32-bit id the kernel will give the next zero-copy send."""
        return self._next & _MASK

    # ------------------------------------------------------------------ sending

    def send(self, buffers: Sequence[Any], keepalive: object = None, *, nbytes: int | None = None) -> int:
        """Send every byte of ``buffers`` (at most IOV_MAX of them) in order, exactly once.

        Partial sends are continued like :func:`mpmultifd.transport.sendmsg_all`.
        ``buffers`` and ``keepalive`` (e.g. the packet header) stay referenced
        until the last id this call used has completed; their contents must not
        change before then. ``nbytes``, when the caller knows it, saves summing
        the buffer sizes. Returns the number of ``sendmsg`` calls made.

        On a non-blocking socket it waits for buffer space as a blocking send
        would; on a socket with a timeout each wait is bounded by that timeout.
        Raises ``OSError`` for socket errors other than ``ENOBUFS``/``EAGAIN``/
        ``EINTR``, and ``TimeoutError`` when a socket timeout expires (bytes
        sent before that stay sent, and their buffers stay held).
        """
        if nbytes is None:
            nbytes = sum([memoryview(b).nbytes for b in buffers])
        if nbytes == 0:
            return 0
        sock = self._sock
        calls = 0
        first = self._next
        views: list[memoryview] | None = None
        pending: Sequence[Any] = buffers
        plain_once = False
        timeout = sock.gettimeout()
        # A socket with a timeout would make Python wait for POLLOUT before each
        # call, and a non-empty error queue keeps the fd polling as ready: a busy
        # loop. Send through a non-blocking alias instead and wait here.
        alias = self._alias(sock) if timeout else None
        sendmsg = alias.sendmsg if alias is not None else sock.sendmsg
        try:
            while True:
                zc = self.enabled and not plain_once
                try:
                    sent = sendmsg(pending, (), MSG_ZEROCOPY if zc else 0)
                except BlockingIOError:
                    self._wait_writable(timeout)
                    continue
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno != errno.ENOBUFS or not zc:
                        raise
                    # Nothing was sent and no id was consumed: make room, retry.
                    self.stats["enobufs"] += 1
                    if not (self.outstanding and self.reap(self._enobufs_timeout)):
                        plain_once = True  # no completion to wait for: copy this piece
                    continue
                calls += 1
                plain_once = False
                if zc and sent > 0:
                    self._next += 1
                    self.stats["sends"] += 1
                    self.stats["bytes"] += sent
                elif not zc:
                    self.stats["plain_sends"] += 1
                nbytes -= sent
                if nbytes <= 0:
                    break
                if sent == 0:
                    raise OSError(errno.EPIPE, "sendmsg made no progress")
                if views is None:
                    views = [memoryview(b).cast("B") for b in pending]
                views = drop_sent(views, sent)
                pending = views
        finally:
            if alias is not None:
                alias.detach()
            self._since_drain += self._next - first
            # Hold unless this send's ids all completed already (reaped while
            # waiting out ENOBUFS or a full buffer).
            if self._next != first and self._next > self._done:
                self._held.append((self._next - 1, tuple(buffers), keepalive))
        if self._since_drain >= self._reap_every:
            self._drain()
        return calls

    def _alias(self, sock: socket.socket) -> socket.socket:
        """A non-blocking socket object on ``sock``'s fd; the caller must ``detach()`` it."""
        alias = socket.socket(sock.family, sock.type, sock.proto, sock.fileno())
        try:
            # Sockets with a timeout already have O_NONBLOCK on the shared file
            # description, so this changes only the alias's Python-side mode.
            alias.settimeout(0.0)
        except BaseException:
            alias.detach()
            raise
        return alias

    def _wait_writable(self, timeout: float | None) -> None:
        """Wait for send-buffer space, reaping completions meanwhile (they keep POLLERR up)."""
        # Blocking and non-blocking sockets wait as long as a blocking send
        # would; a socket timeout bounds each wait like Python's own sendmsg.
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            if deadline is None:
                ms = -1
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out waiting for socket buffer space")
                ms = max(1, int(left * 1000))
            revents = self._poll(_POLLOUT, ms)
            if revents & _POLLERR:
                if not self._drain() and not revents & _POLLOUT:
                    self._raise_pending_error()
                    return  # let sendmsg report the state of the socket
            if revents & (_POLLOUT | _POLLHUP):
                return

    # ------------------------------------------------------------------ completions

    def reap(self, timeout: float = 0.0) -> int:
        """Read completion notifications; returns the number of ids completed.

        With ``timeout`` > 0 and nothing queued, waits up to ``timeout`` seconds
        for a notification (as long as any send is outstanding). Releases the
        buffers and keepalives of every send whose ids have all completed.
        """
        got = self._drain()
        if got or timeout <= 0 or not self.outstanding:
            return got
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return got
            revents = self._poll(0, max(1, int(left * 1000)))
            if not revents:
                return got
            got = self._drain()
            if got:
                return got
            if revents & _POLLERR:
                self._raise_pending_error()
            if revents & _POLLHUP:
                # Both directions shut and data still unacked: nothing to wait
                # on that poll could tell us about; don't spin.
                time.sleep(min(left, 0.01))

    def flush(self, timeout: float) -> None:
        """Wait until every zero-copy send has completed.

        Call at every SYNC and before the socket or the RAM is released (after
        this, the caller may modify or free everything it sent). Completions need
        the peer to ACK, so the peer must keep reading. Raises ``TimeoutError``
        naming the outstanding count if ``timeout`` seconds pass first.
        """
        deadline = time.monotonic() + timeout
        self._drain()
        while self.outstanding:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{self.outstanding} zero-copy send(s) still outstanding after {timeout:g} s "
                    f"(ids {self._done & _MASK}..{(self._next - 1) & _MASK}); completions arrive only "
                    "once the peer has ACKed the data"
                )
            self.reap(left)

    def _drain(self) -> int:
        """Read everything on the error queue without waiting."""
        sock = self._sock
        alias = self._alias(sock) if sock.gettimeout() else None
        recvmsg = alias.recvmsg if alias is not None else sock.recvmsg
        got = 0
        try:
            while True:
                try:
                    _, ancdata, _, _ = recvmsg(0, _ANCBUF, _ERRQ_FLAGS)
                except (BlockingIOError, InterruptedError):
                    break
                for level, kind, data in ancdata:
                    if (level, kind) not in _RECVERR_LEVELS or len(data) < _EE.size:
                        continue
                    ee_errno, origin, _, code, _, lo, hi = _EE.unpack_from(data)
                    if origin != SO_EE_ORIGIN_ZEROCOPY:
                        continue  # e.g. a TX timestamp someone else asked for
                    if ee_errno != 0:
                        raise OSError(ee_errno, f"zero-copy notification for ids {lo}..{hi} carries an error")
                    got += self._complete(lo, hi, bool(code & SO_EE_CODE_ZEROCOPY_COPIED))
        finally:
            if alias is not None:
                alias.detach()
        self._since_drain = 0
        if got:
            self._after_completions()
        return got

    def _complete(self, lo: int, hi: int, copied: bool) -> int:
        """Account for the inclusive, possibly wrapping id range ``[lo, hi]``."""
        count = ((hi - lo) & _MASK) + 1
        start = self._done + ((lo - self._done) & _MASK)
        end = start + count
        if end > self._next or start in self._ahead:
            raise OSError(
                errno.EPROTO,
                f"zero-copy completion for ids {lo}..{hi} does not match the sends made "
                f"(next id {self._next & _MASK}, oldest outstanding {self._done & _MASK}); "
                "was MSG_ZEROCOPY used on this socket by someone else?",
            )
        self.stats["notifications"] += 1
        self.stats["completions"] += count
        if copied:
            self.stats["copied"] += count
        if start == self._done:
            self._done = end
            while self._done in self._ahead:  # out-of-order ranges that now join up
                nxt = self._ahead.pop(self._done)
                self._ahead_count -= nxt - self._done
                self._done = nxt
        else:
            self._ahead[start] = end
            self._ahead_count += count
        return count

    def _after_completions(self) -> None:
        held = self._held
        done = self._done
        while held and held[0][0] < done:
            held.popleft()
        if self.enabled:
            n = self.stats["completions"]
            if n >= self._fallback_after and self.stats["copied"] >= self._fallback_ratio * n:
                self.enabled = False

    # ------------------------------------------------------------------ helpers

    def _poll(self, events: int, ms: int) -> int:
        """poll(2) one fd; POLLERR (a non-empty error queue) is always reported."""
        p = select.poll()
        p.register(self._sock.fileno(), events)
        while True:
            try:
                ready = p.poll(ms)
            except InterruptedError:
                continue
            return ready[0][1] if ready else 0

    def _raise_pending_error(self) -> None:
        """POLLERR with no notification means a socket error (e.g. a reset): raise it."""
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"socket error while waiting for zero-copy completions: {errno.errorcode.get(err, err)}")
