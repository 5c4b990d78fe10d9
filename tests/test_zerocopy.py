"""MSG_ZEROCOPY sender: completions, partial sends, buffer lifetime, fallback, ENOBUFS, veth.

Unit tests drive :class:`ZeroCopySender` through a scripted fake socket (exact
control over partial sends, ENOBUFS and the kernel's notifications, including
32-bit wrap-around and out-of-order ranges). Integration tests use real TCP
sockets on loopback and, in network namespaces that the test creates and
deletes, over loopback with a lowered ``net.core.optmem_max`` (ENOBUFS) and
over a veth pair (198.18.0.0/30, the benchmarking range).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mpmultifd
from mpmultifd.zerocopy import (
    IP_RECVERR,
    MSG_ZEROCOPY,
    SO_EE_CODE_ZEROCOPY_COPIED,
    SO_EE_ORIGIN_ZEROCOPY,
    SO_ZEROCOPY,
    ZeroCopySender,
    enable_zerocopy,
)

PAGE = 4096
EE = struct.Struct("=IBBBBII")
SOL_IP = getattr(socket, "SOL_IP", 0)
MASK = 0xFFFFFFFF


# --------------------------------------------------------------------------- fake socket


class FakeSocket:
    """Just enough of a TCP socket for ZeroCopySender, with a script of sendmsg outcomes.

    Script entries: an int ``n`` sends at most ``n`` bytes, ``"eagain"`` raises
    BlockingIOError, ``"enobufs"`` raises ENOBUFS, ``"enobufs+complete"`` first
    queues a completion for every outstanding id (as the kernel would while the
    sender waits) and then raises ENOBUFS. An empty script sends everything.
    ``fileno()`` is a real, always-writable socket so ``poll`` works.
    """

    family = socket.AF_INET
    type = socket.SOCK_STREAM
    proto = socket.IPPROTO_TCP

    def __init__(self, script: list[Any] | None = None, first_id: int = 0) -> None:
        self.script = deque(script or [])
        self.received = bytearray()
        self.errq: deque[bytes] = deque()
        self.next_id = first_id & MASK
        self.completed_upto = first_id & MASK
        self.ok_calls = 0
        self.zc_calls = 0
        self.options: dict[tuple[int, int], int] = {}
        self._a, self._b = socket.socketpair()

    def close(self) -> None:
        self._a.close()
        self._b.close()

    # socket API used by the sender
    def fileno(self) -> int:
        return self._a.fileno()

    def gettimeout(self) -> float | None:
        return None

    def setsockopt(self, level: int, opt: int, value: int) -> None:
        self.options[(level, opt)] = value

    def getsockopt(self, level: int, opt: int) -> int:
        return 0

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0) -> int:
        action = self.script.popleft() if self.script else None
        if action == "eagain":
            raise BlockingIOError(errno.EAGAIN, "fake EAGAIN")
        if action in ("enobufs", "enobufs+complete"):
            if flags & MSG_ZEROCOPY:
                if action == "enobufs+complete":
                    self.complete_all()
                raise OSError(errno.ENOBUFS, "fake ENOBUFS")
            action = None  # a plain send never fails for optmem
        data = b"".join(memoryview(b).cast("B").tobytes() for b in buffers)
        n = len(data) if action is None else min(int(action), len(data))
        self.received += data[:n]
        self.ok_calls += 1
        if flags & MSG_ZEROCOPY and n > 0:
            self.next_id = (self.next_id + 1) & MASK
            self.zc_calls += 1
        return n

    def recvmsg(self, bufsize: int, ancbufsize: int, flags: int) -> tuple[bytes, list, int, Any]:
        assert flags & socket.MSG_ERRQUEUE and flags & socket.MSG_DONTWAIT
        if not self.errq:
            raise BlockingIOError(errno.EAGAIN, "error queue empty")
        return b"", [(SOL_IP, IP_RECVERR, self.errq.popleft())], socket.MSG_ERRQUEUE, None

    # test controls
    def notify(self, lo: int, hi: int, copied: bool = False, *, origin: int = SO_EE_ORIGIN_ZEROCOPY, err: int = 0):
        code = SO_EE_CODE_ZEROCOPY_COPIED if copied else 0
        if origin == SO_EE_ORIGIN_ZEROCOPY and lo & MASK == self.completed_upto:
            self.completed_upto = (hi + 1) & MASK
        self.errq.append(EE.pack(err, origin, 0, code, 0, lo & MASK, hi & MASK) + bytes(16))

    def complete_all(self, copied: bool = False) -> None:
        if self.next_id != self.completed_upto:
            self.notify(self.completed_upto, self.next_id - 1, copied)


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeSocket]]:
    made: list[FakeSocket] = []

    def make(script: list[Any] | None = None, first_id: int = 0) -> FakeSocket:
        f = FakeSocket(script, first_id)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


class Marker:
    """A weakref-able stand-in for a packet header or any object that must outlive a send."""


# --------------------------------------------------------------------------- unit tests (fake socket)


def test_fake_partial_sends_are_continued_without_loss_or_duplication(fake):
    sock = fake([5, "eagain", 1, 4100, "enobufs"])
    zs = ZeroCopySender(sock, enobufs_timeout=0.001)
    assert sock.options[(socket.SOL_SOCKET, SO_ZEROCOPY)] == 1
    bufs = [b"header--", bytes(range(256)) * 16, b"x" * 3, bytearray(b"tail")]
    calls = zs.send(bufs)
    assert bytes(sock.received) == b"".join(bufs)
    # 5, 1 and 4100 bytes zero-copy (ids 0-2); ENOBUFS, no completion within
    # enobufs_timeout, so the remaining 3+4 bytes go out in one plain send
    assert calls == sock.ok_calls == 4
    assert zs.stats["sends"] == sock.zc_calls == 3 and zs.next_id == sock.next_id == 3
    assert zs.stats["enobufs"] == 1 and zs.stats["plain_sends"] == 1
    assert zs.outstanding == 3


def test_fake_enobufs_waits_for_completions_then_retries_zero_copy(fake):
    sock = fake()
    zs = ZeroCopySender(sock, enobufs_timeout=5.0)
    zs.send([b"a" * 100])
    assert zs.outstanding == 1
    sock.script.append("enobufs+complete")  # the kernel frees id 0 while we wait
    t0 = time.monotonic()
    zs.send([b"b" * 50])
    assert time.monotonic() - t0 < 2.0, "the completion was queued: no need to wait out enobufs_timeout"
    assert zs.stats["enobufs"] == 1 and zs.stats["completions"] == 1
    assert zs.stats["sends"] == 2 and zs.stats["plain_sends"] == 0, "the retry is zero-copy again"
    assert bytes(sock.received) == b"a" * 100 + b"b" * 50
    sock.complete_all()
    zs.flush(1.0)
    assert zs.outstanding == 0


def test_fake_enobufs_with_nothing_to_wait_for_falls_back_to_one_plain_send(fake):
    sock = fake(["enobufs"])
    zs = ZeroCopySender(sock, enobufs_timeout=5.0)
    t0 = time.monotonic()
    assert zs.send([b"x" * 10, b"y" * 10]) == 1
    assert time.monotonic() - t0 < 1.0, "nothing outstanding: no reason to wait"
    assert zs.stats["enobufs"] == 1 and zs.stats["plain_sends"] == 1 and zs.stats["sends"] == 0
    assert zs.outstanding == 0 and bytes(sock.received) == b"x" * 10 + b"y" * 10


@given(
    packets=st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=6), min_size=1, max_size=6),
    script=st.lists(
        st.one_of(st.integers(1, 60), st.sampled_from(["eagain", "enobufs", "enobufs+complete"])), max_size=30
    ),
    first_id=st.one_of(st.just(0), st.integers(MASK - 8, MASK), st.integers(0, MASK)),
)
def test_fake_any_mix_of_short_sends_and_errors_delivers_each_byte_once(packets, script, first_id):
    sock = FakeSocket(script, first_id)
    try:
        zs = ZeroCopySender(sock, enobufs_timeout=0.0005, first_id=first_id, fallback_ratio=2.0)
        markers = [Marker() for _ in packets]
        refs = [weakref.ref(m) for m in markers]
        calls = 0
        for bufs, m in zip(packets, markers):
            calls += zs.send(bufs, m)
        del m
        expected = b"".join(b"".join(bufs) for bufs in packets)
        assert bytes(sock.received) == expected
        assert calls == sock.ok_calls
        assert zs.stats["sends"] == sock.zc_calls
        assert zs.next_id == sock.next_id == (first_id + sock.zc_calls) & MASK
        assert zs.outstanding == (sock.next_id - sock.completed_upto) & MASK
        del markers
        sock.complete_all()
        zs.flush(1.0)
        assert zs.outstanding == 0
        assert zs.stats["completions"] == sock.zc_calls
        assert all(r() is None for r in refs), "every keepalive is released once all ids completed"
    finally:
        sock.close()


@given(
    first_id=st.one_of(st.integers(MASK - 20, MASK), st.integers(0, MASK)),
    n=st.integers(1, 40),
    data=st.data(),
)
def test_fake_completion_ranges_wrap_and_may_arrive_out_of_order(first_id, n, data):
    sock = FakeSocket(None, first_id)
    try:
        zs = ZeroCopySender(sock, first_id=first_id, fallback_ratio=2.0)
        markers = [Marker() for _ in range(n)]
        refs = [weakref.ref(m) for m in markers]
        for i, m in enumerate(markers):
            zs.send([bytes([i])], m)
        del markers, m
        assert zs.outstanding == n
        # cut [0, n) into ranges and deliver them in any order
        cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=n)) if n > 1 else []))
        bounds = [0, *cuts, n]
        ranges = [(bounds[i], bounds[i + 1] - 1) for i in range(len(bounds) - 1)]
        order = data.draw(st.permutations(ranges))
        done: set[int] = set()
        for lo, hi in order:
            sock.notify(first_id + lo, first_id + hi)
            zs.reap()
            done.update(range(lo, hi + 1))
            assert zs.outstanding == n - len(done)
            contiguous = 0
            while contiguous in done:
                contiguous += 1
            for i, r in enumerate(refs):
                # released once it and everything before it completed, never earlier
                assert (r() is None) == (i < contiguous), (i, contiguous, order)
        assert zs.stats["completions"] == n and zs.outstanding == 0
    finally:
        sock.close()


def test_fake_keepalive_of_a_split_send_lives_until_its_last_id(fake):
    sock = fake([3, 3])  # one send() -> three sendmsg calls -> ids 0, 1, 2
    zs = ZeroCopySender(sock)
    header = Marker()
    ref = weakref.ref(header)
    arr = np.arange(4, dtype=np.uint8)
    aref = weakref.ref(arr)
    assert zs.send([b"hdr", arr, b"zz"], header) == 3
    del header, arr
    assert zs.outstanding == 3
    sock.notify(0, 1)
    assert zs.reap() == 2
    assert ref() is not None and aref() is not None, "id 2 of this send is still outstanding"
    sock.notify(2, 2)
    assert zs.reap() == 1
    assert ref() is None and aref() is None


def test_fake_auto_fallback_after_enough_copied_completions(fake):
    sock = fake()
    zs = ZeroCopySender(sock, fallback_after=8, fallback_ratio=0.9)
    for _ in range(20):
        zs.send([b"p" * 10])
    sock.notify(0, 6, copied=True)
    zs.reap()
    assert zs.enabled, "7 completions < fallback_after=8"
    sock.notify(7, 7, copied=True)
    zs.reap()
    assert not zs.enabled, "8 of 8 completions COPIED"
    before = sock.zc_calls
    zs.send([b"q" * 10])
    assert sock.zc_calls == before and zs.stats["plain_sends"] == 1, "disabled: plain sends, no new ids"
    assert zs.outstanding == 12, "the caller must still flush what was sent zero-copy"
    sock.complete_all()
    zs.flush(1.0)


def test_fake_auto_fallback_stays_on_when_the_kernel_did_not_copy(fake):
    sock = fake()
    zs = ZeroCopySender(sock, fallback_after=8, fallback_ratio=0.9)
    for _ in range(20):
        zs.send([b"p" * 10])
    sock.notify(0, 9, copied=True)  # 10 of 20 copied: 50 % < 90 %
    sock.notify(10, 19, copied=False)
    zs.reap()
    assert zs.enabled
    assert zs.stats["copied"] == 10 and zs.stats["completions"] == 20 and zs.stats["notifications"] == 2


def test_fake_foreign_and_inconsistent_notifications(fake):
    sock = fake()
    zs = ZeroCopySender(sock)
    zs.send([b"a"])
    sock.notify(0, 0, origin=4)  # SO_EE_ORIGIN_TIMESTAMPING: not ours, ignored
    assert zs.reap() == 0 and zs.outstanding == 1
    sock.notify(0, 5)  # more ids than were ever sent
    with pytest.raises(OSError, match="does not match the sends made"):
        zs.reap()
    sock.errq.clear()
    sock.notify(0, 0, err=errno.EIO)
    with pytest.raises(OSError, match="carries an error"):
        zs.reap()


def test_fake_flush_timeout_names_the_outstanding_count(fake):
    sock = fake()
    zs = ZeroCopySender(sock)
    for _ in range(3):
        zs.send([b"abc"])
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="3 zero-copy send"):
        zs.flush(0.1)
    assert 0.09 <= time.monotonic() - t0 < 2.0
    sock.complete_all()
    zs.flush(0.1)
    assert zs.outstanding == 0


def test_fake_empty_send_consumes_nothing(fake):
    sock = fake()
    zs = ZeroCopySender(sock)
    assert zs.send([b"", bytearray()]) == 0
    assert sock.ok_calls == 0 and zs.outstanding == 0


# --------------------------------------------------------------------------- real sockets on loopback


@contextlib.contextmanager
def tcp_pair(
    host: str = "127.0.0.1", *, rcvbuf: int | None = None, sndbuf: int | None = None
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (client, server) TCP pair on ``host`` with an ephemeral port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lst = socket.socket(family, socket.SOCK_STREAM)
    cli = socket.socket(family, socket.SOCK_STREAM)
    srv = None
    try:
        if rcvbuf:
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # inherited, sets the window
        lst.bind((host, 0))
        lst.listen(1)
        if sndbuf:
            cli.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        cli.settimeout(10)
        cli.connect(lst.getsockname()[:2])
        cli.settimeout(None)
        lst.settimeout(10)
        srv, _ = lst.accept()
        srv.settimeout(30)
        yield cli, srv
    finally:
        for s in (cli, srv, lst):
            if s is not None:
                s.close()


class Reader(threading.Thread):
    """Reads a connection to EOF into memory; ``delay`` before the first read, ``pause`` between reads."""

    def __init__(self, sock: socket.socket, *, chunk: int = 1 << 20, pause: float = 0.0, start_event=None):
        super().__init__(daemon=True)
        self.sock, self.chunk, self.pause, self.start_event = sock, chunk, pause, start_event
        self.data = bytearray()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.start_event is not None:
                self.start_event.wait(30)
            while True:
                d = self.sock.recv(self.chunk)
                if not d:
                    return
                self.data += d
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as e:  # surfaced by finish()
            self.error = e

    def finish(self, timeout: float = 30) -> bytes:
        self.join(timeout)
        assert not self.is_alive(), "reader did not see EOF in time"
        if self.error:
            raise self.error
        return bytes(self.data)


def make_packets(region: np.ndarray, count: int, pages: int, seed: int = 2) -> list[tuple[bytearray, list]]:
    """Packets as the channel workers build them: a fresh header plus one IOV per (random) page."""
    mv = memoryview(region).cast("B")
    npages = region.nbytes // PAGE
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        offs = (rng.integers(0, npages, pages) * PAGE).tolist()
        header = bytearray(struct.pack("<QQ", 0x6D706D66_64000000 + i, pages) * 4)
        out.append((header, [header, *(mv[o : o + PAGE] for o in offs)]))
    return out


def stream_of(packets: list[tuple[bytearray, list]]) -> bytes:
    return b"".join(b"".join(bytes(b) for b in bufs) for _, bufs in packets)


@pytest.fixture(scope="module")
def region() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=8 << 20, dtype=np.uint8)


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_loopback_real_completions_all_copied(host, region):
    if host == "::1" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    packets = make_packets(region, 64, 128)
    expected = stream_of(packets)
    with tcp_pair(host) as (cli, srv):
        reader = Reader(srv)
        reader.start()
        zs = ZeroCopySender(cli, fallback_ratio=2.0)  # count only: never fall back here
        calls = sum(zs.send(bufs, header) for header, bufs in packets)
        zs.flush(30)
        cli.shutdown(socket.SHUT_WR)
        got = reader.finish()
    s = zs.stats
    assert got == expected, f"stream differs ({len(got)} of {len(expected)} bytes)"
    assert s["sends"] == calls == zs.next_id, s
    assert zs.outstanding == 0
    assert s["completions"] == s["sends"], f"completions {s['completions']} != ids {s['sends']}: {s}"
    # Loopback delivers every skb to a local socket: the kernel copies (deferred) and says so.
    assert s["copied"] == s["completions"], f"loopback copied {s['copied']} of {s['completions']} ids: {s}"
    assert 1 <= s["notifications"] <= s["completions"], s


def test_enable_zerocopy_reasons():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as u:
        reason = enable_zerocopy(u)
        assert reason is not None and "AF_UNIX" in reason, reason
        with pytest.raises(OSError) as ei:
            ZeroCopySender(u)
        assert ei.value.errno == errno.EOPNOTSUPP
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with ctx.wrap_socket(socket.socket(), server_hostname="x", do_handshake_on_connect=False) as t:
        reason = enable_zerocopy(t)
        assert reason is not None and "TLS" in reason
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        assert enable_zerocopy(s) is None
        assert s.getsockopt(socket.SOL_SOCKET, SO_ZEROCOPY) == 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as d:
        assert enable_zerocopy(d) is None  # UDP supports it too...
        with pytest.raises(OSError):
            ZeroCopySender(d)  # ...but this sender tracks TCP streams only


def test_msg_zerocopy_without_so_zerocopy_is_silently_a_plain_send():
    with tcp_pair() as (cli, srv):
        reader = Reader(srv)
        reader.start()
        payload = bytes(range(256)) * 1024
        for _ in range(8):
            assert cli.sendmsg([payload], (), MSG_ZEROCOPY) == len(payload)
        cli.shutdown(socket.SHUT_WR)
        assert reader.finish() == payload * 8
        time.sleep(0.05)
        with pytest.raises(BlockingIOError):
            cli.recvmsg(0, 256, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)


@pytest.mark.parametrize("mode", ["timeout", "nonblocking"])
def test_partial_sends_on_small_buffers_deliver_every_byte_once(mode, region):
    packets = make_packets(region, 12, 128, seed=3)
    expected = stream_of(packets)
    # A small send buffer forces short sends. The receive buffer stays roomy:
    # a tiny one makes loopback drop zero-copy skbs (their truesize overruns it,
    # TCPRcvQDrop) and the retransmit timer then backs off for minutes.
    with tcp_pair(rcvbuf=1 << 20, sndbuf=16384) as (cli, srv):
        reader = Reader(srv, chunk=16384, pause=0.0005)
        reader.start()
        if mode == "timeout":
            cli.settimeout(20)
        else:
            cli.setblocking(False)
        zs = ZeroCopySender(cli, fallback_ratio=2.0)
        calls = sum(zs.send(bufs, header) for header, bufs in packets)
        zs.flush(30)
        cli.shutdown(socket.SHUT_WR)
        got = reader.finish()
    assert calls > len(packets), f"expected short sends: {calls} sendmsg calls for {len(packets)} packets"
    assert got == expected, f"{len(got)} of {len(expected)} bytes, first difference at " + str(
        next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    )
    s = zs.stats
    assert s["sends"] == calls and s["completions"] == calls and zs.outstanding == 0, s


def test_keepalive_released_only_after_its_completion_was_reaped():
    # A tiny receive window and a reader that has not started: bytes past the
    # window stay unacked in the sender's queue, so no completion can arrive.
    go = threading.Event()
    with tcp_pair(rcvbuf=4096, sndbuf=1 << 20) as (cli, srv):
        reader = Reader(srv, start_event=go)
        reader.start()
        try:
            cli.sendall(b"f" * (256 << 10))  # plain, fills the window and queues behind it
            zs = ZeroCopySender(cli)
            header, data = Marker(), np.full(64 << 10, 7, dtype=np.uint8)
            href, dref = weakref.ref(header), weakref.ref(data)
            zs.send([b"hdr!", data], header)
            del header, data
            assert zs.reap(0.3) == 0 and zs.outstanding == 1
            assert href() is not None and dref() is not None, "released before the kernel was done"
            with pytest.raises(TimeoutError, match="1 zero-copy send"):
                zs.flush(0.2)
            assert href() is not None and dref() is not None
        finally:
            go.set()
        zs.flush(30)
        assert href() is None and dref() is None, "completed but still referenced"
        cli.shutdown(socket.SHUT_WR)
        got = reader.finish()
    assert got == b"f" * (256 << 10) + b"hdr!" + bytes([7]) * (64 << 10)


def test_auto_fallback_on_loopback(region):
    packets = make_packets(region, 24, 16, seed=4)
    with tcp_pair() as (cli, srv):
        reader = Reader(srv)
        reader.start()
        zs = ZeroCopySender(cli, fallback_after=8, fallback_ratio=0.9)
        for header, bufs in packets[:8]:
            zs.send(bufs, header)
        zs.flush(30)
        assert zs.stats["completions"] == 8 and zs.stats["copied"] == 8
        assert not zs.enabled, f"8 COPIED completions of 8 should turn zero-copy off: {zs.stats}"
        ids = zs.next_id
        for header, bufs in packets[8:]:
            zs.send(bufs, header)
        assert zs.next_id == ids and zs.stats["plain_sends"] == 16
        zs.flush(30)
        cli.shutdown(socket.SHUT_WR)
        assert reader.finish() == stream_of(packets)


def test_send_on_a_socket_with_timeout_raises_timeout_when_the_peer_stalls():
    with tcp_pair(rcvbuf=4096, sndbuf=65536) as (cli, srv):
        cli.settimeout(0.3)
        zs = ZeroCopySender(cli)
        chunk = np.zeros(512 << 10, dtype=np.uint8)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            for _ in range(256):  # 128 MiB: far more than any buffer on the way
                zs.send([chunk], nbytes=chunk.nbytes)
        assert time.monotonic() - t0 < 10
        assert zs.outstanding > 0, "what was sent stays outstanding (and held)"


def test_flush_after_peer_reset_does_not_hang():
    with tcp_pair(rcvbuf=4096, sndbuf=1 << 20) as (cli, srv):
        zs = ZeroCopySender(cli)
        payload = bytearray(200_000)
        zs.send([payload])
        zs.send([payload])
        assert zs.outstanding == 2
        srv.close()  # unread data: the peer resets, the kernel purges the write queue
        t0 = time.monotonic()
        try:
            zs.flush(10)
        except OSError as e:  # the reset itself is an acceptable answer too
            assert e.errno in (errno.ECONNRESET, errno.EPIPE), e
        assert time.monotonic() - t0 < 5
        with pytest.raises(OSError):
            zs.send([payload])


# --------------------------------------------------------------------------- network namespaces

# Runs in a child process. Each socket is made in a short-lived thread that
# first joins the wanted network namespace with setns(2): a socket keeps the
# namespace it was created in, and the thread's namespace dies with it.
CHILD = r"""
import ctypes, json, os, platform, socket, struct, sys, threading, time
import numpy as np
from mpmultifd.zerocopy import ZeroCopySender

cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)

def in_netns(path, fn):
    box = {}
    def run():
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    e = ctypes.get_errno()
                    raise OSError(e, "setns: " + os.strerror(e))
            finally:
                os.close(fd)
            box["v"] = fn()
        except BaseException as e:
            box["e"] = e
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]

def set_optmem(value):
    with open("/proc/sys/net/core/optmem_max", "w") as f:
        f.write(str(value))
    with open("/proc/sys/net/core/optmem_max") as f:
        return int(f.read())

def xdp_pass(ifname):
    # bpf(BPF_PROG_LOAD) of "r0 = XDP_PASS; exit", attached in native (driver) mode with rtnetlink
    nr = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
    if nr is None:
        raise OSError(0, "bpf syscall number unknown for " + platform.machine())
    insns = ctypes.create_string_buffer(struct.pack("<BBhiBBhi", 0xB7, 0, 0, 2, 0x95, 0, 0, 0), 16)
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(struct.pack("<IIQQIIQII16sII", 6, 2, ctypes.addressof(insns),
                                                   ctypes.addressof(lic), 0, 0, 0, 0, 0, b"zcpass", 0, 0), 128)
    fd = libc.syscall(nr, 5, attr, 128)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, "BPF_PROG_LOAD: " + os.strerror(e))
    try:
        def nla(t, payload):
            n = 4 + len(payload)
            return struct.pack("<HH", n, t) + payload + bytes(-n % 4)
        xdp = nla(1, struct.pack("<i", fd)) + nla(3, struct.pack("<I", 4))  # IFLA_XDP_FD, FLAGS=DRV_MODE
        body = struct.pack("<BBHiII", 0, 0, 0, socket.if_nametoindex(ifname), 0, 0) + nla(43 | 0x8000, xdp)
        msg = struct.pack("<IHHII", 16 + len(body), 19, 1 | 4, 1, 0) + body  # RTM_SETLINK, REQUEST|ACK
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
            nl.settimeout(10)
            nl.bind((0, 0))
            nl.send(msg)
            resp = nl.recv(65536)
        if struct.unpack_from("<H", resp, 4)[0] == 2:  # NLMSG_ERROR
            err = -struct.unpack_from("<i", resp, 16)[0]
            if err:
                raise OSError(err, "attach XDP: " + os.strerror(err))
    finally:
        os.close(fd)

out = {}
if cfg.get("optmem") is not None:
    out["optmem"] = in_netns(cfg["send_ns"], lambda: set_optmem(cfg["optmem"]))
if cfg.get("xdp_ifname"):
    try:
        in_netns(cfg["recv_ns"], lambda: xdp_pass(cfg["xdp_ifname"]))
        out["xdp"] = "native"
    except OSError as e:
        out["xdp_error"] = str(e)
        print(json.dumps(out))
        sys.exit(0)

ps, pages = 4096, cfg["pages"]
region = np.random.default_rng(1).integers(0, 256, size=8 << 20, dtype=np.uint8)
mv = memoryview(region)
rng = np.random.default_rng(2)
plan = []
for i in range(cfg["packets"]):
    offs = (rng.integers(0, region.nbytes // ps, pages) * ps).tolist()
    hdr = bytearray(struct.pack("<QQ", i, pages) * 4)
    plan.append((hdr, [hdr] + [mv[o:o + ps] for o in offs]))
expected = b"".join(b"".join(bytes(b) for b in bufs) for _, bufs in plan)

def listener():
    s = socket.socket()
    s.bind((cfg["recv_host"], 0))
    s.listen(1)
    s.settimeout(30)
    return s
lst = in_netns(cfg["recv_ns"], listener)
port = lst.getsockname()[1]

def reader():
    try:
        conn, _ = lst.accept()
        with conn:
            conn.settimeout(30)
            time.sleep(cfg.get("reader_delay", 0.0))
            buf = bytearray(len(expected) + 1)
            v = memoryview(buf)
            got = 0
            while True:
                n = conn.recv_into(v[got:])
                if n == 0:
                    break
                got += n
            out["received"] = got
            out["intact"] = bytes(v[:got]) == expected
    except BaseException as e:
        out["reader_error"] = repr(e)
t = threading.Thread(target=reader, daemon=True)
t.start()

def connector():
    s = socket.socket()
    s.settimeout(30)
    s.connect((cfg["recv_host"], port))
    s.settimeout(None)
    return s
sock = in_netns(cfg["send_ns"], connector)
try:
    zs = ZeroCopySender(sock, fallback_ratio=cfg.get("fallback_ratio", 0.9),
                        enobufs_timeout=cfg.get("enobufs_timeout", 0.1))
    calls = 0
    for hdr, bufs in plan:
        calls += zs.send(bufs, hdr)
    zs.flush(30)
    sock.shutdown(socket.SHUT_WR)
    t.join(30)
    out.update(stats=zs.stats, outstanding=zs.outstanding, calls=calls, ids=zs.next_id,
               enabled=zs.enabled, expected=len(expected))
finally:
    sock.close()
    lst.close()
print(json.dumps(out))
"""


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def _ip_ok(*args: str) -> None:
    r = _ip(*args)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@contextlib.contextmanager
def namespaces(count: int) -> Iterator[list[str]]:
    """``count`` fresh network namespaces with loopback up; deleted (with their links) afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed")
    tag = f"{os.getpid()}x{os.urandom(3).hex()}"
    made: list[str] = []
    try:
        for i in range(count):
            name = f"mpzc{tag}{'ab'[i]}"
            r = _ip("netns", "add", name)
            if r.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
            made.append(name)
            _ip_ok("-n", name, "link", "set", "lo", "up")
        yield made
    finally:
        for name in made:
            _ip("netns", "del", name)


def run_child(cfg: dict) -> dict:
    root = str(Path(mpmultifd.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, timeout=90, env=env
    )
    assert r.returncode == 0, f"child failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _root_optmem() -> int:
    with open("/proc/sys/net/core/optmem_max") as f:
        return int(f.read())


@pytest.mark.timeout(150)
def test_enobufs_in_a_namespace_with_low_optmem_delivers_every_byte_once():
    """``net.core.optmem_max`` is per network namespace: lower it in a namespace of our own.

    With 1 KiB of option memory a socket cannot hold a second ``ubuf_info``
    while the first is outstanding, so nearly every zero-copy send meets
    ENOBUFS; the reader starts late, so some waits time out and those pieces go
    out as plain copies. Every byte must still arrive once, in order.
    """
    host_optmem = _root_optmem()
    with namespaces(1) as (ns,):
        res = run_child(
            {
                "send_ns": f"/run/netns/{ns}",
                "recv_ns": f"/run/netns/{ns}",
                "recv_host": "127.0.0.1",
                "optmem": 1024,
                "packets": 48,
                "pages": 128,
                "reader_delay": 0.3,
                "enobufs_timeout": 0.05,
                "fallback_ratio": 2.0,
            }
        )
    assert _root_optmem() == host_optmem, "the host's optmem_max must not change"
    s = res["stats"]
    assert res["optmem"] == 1024
    assert "reader_error" not in res, res
    assert res["intact"] and res["received"] == res["expected"], res
    assert s["enobufs"] > 0, f"no ENOBUFS with optmem_max=1024: {res}"
    assert s["completions"] == s["sends"] == res["ids"] and res["outstanding"] == 0, res


def _veth_pair(a: str, b: str) -> tuple[str, str]:
    suffix = os.urandom(4).hex()
    va, vb = f"zc{suffix}a", f"zc{suffix}b"
    r = _ip("link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
    if r.returncode != 0:
        pytest.skip(f"cannot create a veth pair: {r.stderr.strip()}")
    _ip_ok("-n", a, "addr", "add", "198.18.0.1/30", "dev", va)
    _ip_ok("-n", b, "addr", "add", "198.18.0.2/30", "dev", vb)
    _ip_ok("-n", a, "link", "set", va, "up")
    _ip_ok("-n", b, "link", "set", vb, "up")
    return va, vb


@pytest.mark.timeout(150)
def test_veth_between_namespaces():
    """Zero-copy A -> B over veth: every completion arrives, and the kernel copies.

    Finding (Linux 6.18): with a plain veth pair every completion is flagged
    COPIED, exactly as on loopback: B's stack delivers the skb to a local
    socket, and ``__netif_receive_skb_core`` runs ``skb_orphan_frags_rx``, which
    copies any zero-copy frags and marks the notification. veth's own
    forwarding (``skb_orphan_frags``) does not copy, because MSG_ZEROCOPY
    buffers carry ``SKBFL_DONTCOPY``.

    Attaching a native XDP program (even one that only returns XDP_PASS) to
    B's veth changes the report: veth then rebuilds each skb from its page pool
    (``skb_pp_cow_data``) and frees the original, whose user pages are released
    as a *success*. So completions come back **not** COPIED and "auto" mode keeps
    zero-copy on, although the bytes were still copied once, by veth, on the
    receiving side. That path is asserted below when the program can be loaded;
    generic (skb-mode) XDP gives COPIED again. Neither is a real NIC: whether
    zero-copy pays needs hardware with scatter-gather, which this machine lacks.
    """
    with namespaces(2) as (a, b):
        va, vb = _veth_pair(a, b)
        base = {
            "send_ns": f"/run/netns/{a}",
            "recv_ns": f"/run/netns/{b}",
            "recv_host": "198.18.0.2",
            "packets": 96,
            "pages": 128,
        }
        plain = run_child({**base, "fallback_ratio": 2.0})
        xdp = run_child({**base, "xdp_ifname": vb})
    s = plain["stats"]
    assert plain["intact"] and plain["received"] == plain["expected"], plain
    assert s["completions"] == s["sends"] == plain["ids"] == 96 and plain["outstanding"] == 0, plain
    assert s["copied"] == s["completions"], f"veth copied {s['copied']} of {s['completions']} ids: {plain}"
    if "xdp_error" in xdp:
        pytest.skip(f"plain veth checked (all {s['completions']} COPIED); XDP part skipped: {xdp['xdp_error']}")
    x = xdp["stats"]
    assert xdp["intact"] and xdp["received"] == xdp["expected"], xdp
    assert x["completions"] == x["sends"] == xdp["ids"] == 96 and xdp["outstanding"] == 0, xdp
    assert x["copied"] == 0, f"with native XDP on the receiving veth, COPIED {x['copied']} of {x['completions']}"
    assert xdp["enabled"], "auto mode keeps zero-copy on when the kernel reports no copies"
