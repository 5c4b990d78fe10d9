"""Local trust without a key: a peer on the same host counts only if it runs as the same user.

A destination finds a TCP loopback peer's uid in the kernel's socket table
(``SO_PEERCRED`` on a Unix socket); a keyless source checks the destination it
reached the same way before it sends anything, and refuses a remote address
outright. The other user is uid 65534 in a forked child that drops root.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import struct
import tempfile
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmultifd import AuthenticationError, Destination, GuestRAM, MigrationConfig, MigrationError, Source, auth, peers
from mpmultifd.errors import ChannelBroken
from mpmultifd.testing import fill
from mpmultifd.wire import CONTROL_CHANNEL, HELLO_SIZE, KIND_CONTROL, Hello, decode_hello, encode_hello

PS = 4096
BLOCKS = {"pc.ram": 1 << 20}
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running a peer as another user needs root")


def _cfg(**kw) -> MigrationConfig:
    kw.setdefault("channels", 2)
    kw.setdefault("start_method", "fork")
    kw.setdefault("timeout", 5.0)
    return MigrationConfig(**kw)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HOSTS = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1"))]


class _Child:
    """``fn(say)`` in a forked child running as ``uid`` (None: ours); ``say`` sends the parent a line."""

    def __init__(self, uid: int | None, fn) -> None:
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            out = "?"
            try:
                os.close(r)
                if uid is not None:
                    os.setgid(uid)
                    os.setuid(uid)
                out = fn(lambda line: os.write(w, (line + "\n").encode()))
            except BaseException as e:
                out = f"error: {e!r}"
            finally:
                os.write(w, (str(out).replace("\n", " ")[:4000] + "\n").encode())
                os._exit(0)
        os.close(w)
        self._r = os.fdopen(r, "rb")

    def line(self) -> str:
        return self._r.readline().decode().rstrip("\n")

    def finish(self) -> str:
        try:
            return self.line()
        finally:
            self._r.close()
            os.waitpid(self.pid, 0)


def _hello_over_tcp(address) -> callable:
    """A child body: connect to ``address``, send a keyless control hello, say what admission answered."""

    def run(say) -> str:
        s = socket.create_connection(address, timeout=10)
        auth.decode_greeting(s.recv(auth.GREETING_SIZE, socket.MSG_WAITALL))
        s.sendall(encode_hello(Hello(KIND_CONTROL, bytes(16), CONTROL_CHANNEL, 2)))
        try:
            auth.decode_welcome(s.recv(auth.WELCOME_SIZE, socket.MSG_WAITALL))
            return "welcomed"
        except Exception as e:
            return f"refused: {e}"

    return run


def _fake_destination(host: str, answer: bytes | None):
    """A child body: listen on ``host``, greet one connection without a key, report what arrived
    (and answer ``answer`` after a hello)."""

    def run(say) -> str:
        lsock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        lsock.bind((host, 0))
        lsock.listen(4)
        lsock.settimeout(20)
        say(str(lsock.getsockname()[1]))
        conn, _ = lsock.accept()
        conn.settimeout(20)
        conn.sendall(auth.encode_greeting(auth.Greeting(False, auth.new_nonce())))
        got = b""
        while len(got) < HELLO_SIZE:
            part = conn.recv(HELLO_SIZE - len(got))
            if not part:
                break
            got += part
        if len(got) == HELLO_SIZE and answer is not None:
            conn.sendall(answer)
        kind = decode_hello(got).kind if len(got) == HELLO_SIZE else None
        return f"received {len(got)} bytes, kind {kind}"

    return run


def _wait_for(cond, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ---------------------------------------------------------------------- the /proc/net/tcp parser


def _kernel_format(ip: ipaddress._BaseAddress, port: int) -> str:
    """An address as the kernel prints it in /proc/net/tcp{,6}: 32-bit words in host order, then the port."""
    raw = ip.packed
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


ips = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
)
ports = st.integers(0, 65535)


def _expected(ip):
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


@given(ips, ports)
def test_proc_address_round_trips(ip, port):
    assert peers.parse_proc_address(_kernel_format(ip, port)) == (_expected(ip), port)


@given(ips, ports, ips, ports, st.integers(0, 11), st.integers(0, 2**32 - 2))
def test_proc_row_parses(lip, lport, rip, rport, state, uid):
    row = (
        f"  12: {_kernel_format(lip, lport)} {_kernel_format(rip, rport)} {state:02X} 00000000:00000000 "
        f"00:00000000 00000000 {uid:>5} 0 123456 1 0000000000000000 20 4 30 10 -1"
    )
    assert peers.parse_proc_line(row) == ((_expected(lip), lport), (_expected(rip), rport), state, uid)


@given(st.text(max_size=60))
def test_proc_parser_rejects_garbage_with_valueerror(text):
    for parse in (peers.parse_proc_address, peers.parse_proc_line):
        try:
            parse(text)
        except ValueError:
            pass


def test_the_kernel_format_is_what_proc_shows():
    """The test's encoder agrees with the kernel: a listening socket appears with its address and our uid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with open("/proc/net/tcp") as f:
            rows = [peers.parse_proc_line(line) for line in list(f)[1:]]
    assert ((ipaddress.ip_address("127.0.0.1"), port), (ipaddress.ip_address("0.0.0.0"), 0), 0x0A, os.geteuid()) in rows


@pytest.mark.parametrize("netlink", [True, False])
@pytest.mark.parametrize("host", HOSTS)
def test_peer_uid_of_a_loopback_connection_is_ours_both_ways(host, netlink, monkeypatch):
    monkeypatch.setattr(peers, "NETLINK", netlink)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as lsock:
        lsock.bind((host, 0))
        lsock.listen()
        with socket.create_connection(lsock.getsockname()[:2]) as c:
            a, _ = lsock.accept()
            with a:
                assert peers.peer_uid(a) == (os.geteuid(), None)
                assert peers.peer_uid(c) == (os.geteuid(), None)
                assert peers.untrusted_peer(a) is None


@needs_root
@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", HOSTS)
def test_both_lookups_find_another_users_sockets(host, monkeypatch):
    """sock_diag and /proc/net/tcp agree on the owner of a connecting socket and of an accepted one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def connect_and_listen(say) -> str:
        theirs = socket.socket(family)
        theirs.bind((host, 0))
        theirs.listen()
        theirs.settimeout(20)
        say(str(theirs.getsockname()[1]))
        s = socket.create_connection((host, int(os.read(go_r, 16))), timeout=20)  # our listener's port
        conn, _ = theirs.accept()
        conn.settimeout(20)
        conn.recv(1)  # until the parent has looked
        s.close()
        return "done"

    go_r, go_w = os.pipe()
    with socket.socket(family) as ours:
        ours.bind((host, 0))
        ours.listen()
        ours.settimeout(20)
        child = _Child(NOBODY, connect_and_listen)
        try:
            their_port = int(child.line())
            os.write(go_w, str(ours.getsockname()[1]).encode())
            with socket.create_connection((host, their_port), timeout=20) as c:
                a, _ = ours.accept()
                with a:
                    for netlink in (True, False):
                        monkeypatch.setattr(peers, "NETLINK", netlink)
                        assert peers.peer_uid(a) == (NOBODY, None), netlink  # their connecting socket
                        assert peers.peer_uid(c) == (NOBODY, None), netlink  # their accepted socket
                        assert peers.untrusted_peer(c) == f"uid {NOBODY}"
                c.sendall(b"x")
        finally:
            assert child.finish() == "done"
            os.close(go_r)
            os.close(go_w)


@pytest.mark.parametrize("netlink", [True, False])
def test_a_socket_that_is_not_there_is_peerunknown(netlink, monkeypatch):
    monkeypatch.setattr(peers, "NETLINK", netlink)
    with socket.socket() as s:  # a port nobody is connected from: bound, never connected
        s.bind(("127.0.0.1", 0))
        gone = ("127.0.0.1", s.getsockname()[1])
        with pytest.raises(peers.PeerUnknown, match="no socket"):
            peers.find_socket_uid((ipaddress.ip_address(gone[0]), gone[1]), (ipaddress.ip_address("127.0.0.1"), 9))


def test_an_unknown_owner_is_peerunknown(monkeypatch):
    monkeypatch.setattr(peers, "NETLINK", False)
    monkeypatch.setattr(peers, "PROC_TABLES", ("/nonexistent/tcp",))
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        with socket.create_connection(lsock.getsockname()) as c:
            with pytest.raises(peers.PeerUnknown, match="socket table"):
                peers.peer_uid(c)
            assert peers.untrusted_peer(c).startswith("its user is unknown")


# ---------------------------------------------------------------------- the destination


@needs_root
@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", HOSTS)
def test_a_keyless_loopback_destination_refuses_another_user(host):
    with GuestRAM.create({"a": 4 * PS}) as ram:
        try:
            with Destination(ram, (host, 0), _cfg()) as d:
                out = _Child(NOBODY, _hello_over_tcp(d.address)).finish()
                assert out.startswith("refused:") and "its own user" in out, out
                assert _wait_for(lambda: d.query()["authentication-failures"] == 1)
                assert d.status == "setup"  # it never became the control connection
                # the same client as our own user is welcomed: the uid is the difference
                assert _Child(None, _hello_over_tcp(d.address)).finish() == "welcomed"
        finally:
            ram.unlink()


@needs_root
@pytest.mark.timeout(60)
def test_allow_unauthenticated_admits_another_user_on_loopback():
    with GuestRAM.create({"a": 4 * PS}) as ram:
        try:
            with Destination(ram, ("127.0.0.1", 0), _cfg(allow_unauthenticated=True)) as d:
                assert _Child(NOBODY, _hello_over_tcp(d.address)).finish() == "welcomed"
        finally:
            ram.unlink()


@pytest.mark.timeout(60)
def test_a_destination_that_cannot_find_the_peers_user_refuses_it(monkeypatch, caplog):
    monkeypatch.setattr(peers, "NETLINK", False)
    monkeypatch.setattr(peers, "PROC_TABLES", ("/nonexistent/tcp",))
    with GuestRAM.create({"a": 4 * PS}) as ram:
        try:
            with Destination(ram, ("127.0.0.1", 0), _cfg()) as d:
                with socket.create_connection(d.address, timeout=10) as s:
                    auth.decode_greeting(s.recv(auth.GREETING_SIZE, socket.MSG_WAITALL))
                    s.sendall(encode_hello(Hello(KIND_CONTROL, bytes(16), CONTROL_CHANNEL, 2)))
                    with pytest.raises(AuthenticationError, match="its own user"):
                        auth.decode_welcome(s.recv(auth.WELCOME_SIZE, socket.MSG_WAITALL))
                assert _wait_for(lambda: d.query()["authentication-failures"] == 1)
        finally:
            ram.unlink()
    # the log says why (the drop log flushes its summary at the latest when the destination closes)
    assert "user is unknown" in caplog.text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("host", HOSTS)
def test_a_keyless_loopback_migration_of_one_user_still_works(regions, host):
    src, dst = regions
    fill(src, "half-zero", 3)
    with Destination(dst, (host, 0), _cfg()) as d, Source(src, _cfg()) as s:
        assert s.migrate(d.address).verified
        assert d.wait(10).verified


# ---------------------------------------------------------------------- the source


def _migrate_to_fake(src, uid, cfg, answer=None, host="127.0.0.1"):
    child = _Child(uid, _fake_destination(host, answer))
    try:
        port = int(child.line())
        with Source(src, cfg) as s:
            try:
                s.migrate((host, port))
                err = None
            except MigrationError as e:
                err = e
    finally:
        out = child.finish()
    return err, out


REFUSE_HELLO = auth.encode_refused(auth.REFUSE_HELLO)


@needs_root
@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", HOSTS)
def test_a_keyless_source_sends_nothing_to_a_destination_of_another_user(regions, host):
    src, _ = regions
    err, out = _migrate_to_fake(src, NOBODY, _cfg(), REFUSE_HELLO, host)
    assert isinstance(err, AuthenticationError) and "not run by this user" in str(err) and f"uid {NOBODY}" in str(err)
    assert out == "received 0 bytes, kind None", out  # not even the hello
    # the same fake run by our own user gets the hello (and its refusal is what the source reports)
    err, out = _migrate_to_fake(src, None, _cfg(), REFUSE_HELLO, host)
    assert out == f"received {HELLO_SIZE} bytes, kind {KIND_CONTROL}", out
    assert isinstance(err, AuthenticationError) and "hello was not accepted" in str(err), err


@needs_root
@pytest.mark.timeout(60)
def test_allow_unauthenticated_lets_a_source_reach_another_user(regions):
    src, _ = regions
    err, out = _migrate_to_fake(src, NOBODY, _cfg(allow_unauthenticated=True), REFUSE_HELLO)
    assert out == f"received {HELLO_SIZE} bytes, kind {KIND_CONTROL}", out
    assert "hello was not accepted" in str(err), err


@pytest.mark.timeout(60)
def test_a_source_that_cannot_find_the_destinations_user_sends_nothing(regions, monkeypatch):
    src, _ = regions
    monkeypatch.setattr(peers, "NETLINK", False)
    monkeypatch.setattr(peers, "PROC_TABLES", ("/nonexistent/tcp",))
    err, out = _migrate_to_fake(src, None, _cfg(), REFUSE_HELLO)
    assert isinstance(err, AuthenticationError) and "user is unknown" in str(err), err
    assert out == "received 0 bytes, kind None", out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("address", [("192.0.2.1", 9), ("2001:db8::1", 9), ("10.255.255.1", 1)])
def test_a_keyless_source_refuses_a_remote_address_before_connecting(regions, address, monkeypatch):
    src, _ = regions

    tried = []

    def no_connect(address, timeout):  # the refusal must come first: this test never touches the network
        tried.append(address)
        raise ChannelBroken("stub: this test does not connect")

    monkeypatch.setattr("mpmultifd.source.connect", no_connect)
    with Source(src, _cfg()) as s:
        with pytest.raises(AuthenticationError, match="allow_unauthenticated=True"):
            s.migrate(address)
    assert tried == []
    # with the opt-in, the source goes on to connect (stopped here by the stub)
    with Source(src, _cfg(allow_unauthenticated=True)) as s:
        with pytest.raises(ChannelBroken, match="stub"):
            s.migrate(address)
    assert tried == [address]


@pytest.mark.timeout(60)
def test_a_keyless_source_reaches_its_own_users_unix_socket(regions, tmp_path):
    src, dst = regions
    fill(src, "random", 5)
    with Destination(dst, f"unix:{tmp_path / 'd.sock'}", _cfg()) as d, Source(src, _cfg()) as s:
        assert s.migrate(d.address).verified


@needs_root
@pytest.mark.timeout(60)
def test_a_keyless_source_refuses_another_users_unix_socket(regions):
    src, _ = regions
    where = tempfile.mkdtemp(prefix="mpm-trust-")  # pytest's tmp_path is closed to other users
    os.chmod(where, 0o777)
    path = os.path.join(where, "fake.sock")

    def run(say) -> str:
        lsock = socket.socket(socket.AF_UNIX)
        lsock.bind(path)
        os.chmod(path, 0o666)
        lsock.listen(4)
        lsock.settimeout(20)
        say("ready")
        conn, _ = lsock.accept()
        conn.settimeout(20)
        conn.sendall(auth.encode_greeting(auth.Greeting(False, auth.new_nonce())))
        got = conn.recv(HELLO_SIZE, socket.MSG_WAITALL)
        return f"received {len(got)} bytes"

    child = _Child(NOBODY, run)
    try:
        assert child.line() == "ready"
        with Source(src, _cfg()) as s:
            with pytest.raises(AuthenticationError, match=f"uid {NOBODY}"):
                s.migrate(f"unix:{path}")
    finally:
        out = child.finish()
        shutil.rmtree(where, ignore_errors=True)
    assert out == "received 0 bytes", out
