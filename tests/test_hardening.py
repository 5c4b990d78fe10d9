"""Hardening against hostile local users and peers: safe save files, shared-memory ownership,
key files, bounded control frames and admission that a flood cannot starve."""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
import time
import warnings

import pytest

from mpmultifd import (
    ConfigError,
    Destination,
    GuestRAM,
    MigrationConfig,
    MigrationError,
    RemoteProtocolError,
    Source,
    UntrustedSegmentError,
    auth,
)
from mpmultifd._shm import unique_name
from mpmultifd.auth import load_key
from mpmultifd.errors import KeyFileWarning
from mpmultifd.savefile import read_layout
from mpmultifd.testing import fill, same_contents
from mpmultifd.wire import (
    CONTROL_CHANNEL,
    HELLO_FLAG_AUTH,
    KIND_CONTROL,
    BlockSpec,
    Config,
    ConfigAck,
    ControlDecoder,
    ErrorMessage,
    Hello,
    RoundEnd,
    encode_control,
    encode_hello,
)

PS = 4096
BLOCKS = {"pc.ram": 2 << 20, "vga": 256 << 10}


def _cfg(**kw) -> MigrationConfig:
    kw.setdefault("channels", 2)
    kw.setdefault("start_method", "forkserver")
    return MigrationConfig(**kw)


def _save(src: GuestRAM, path: str, **kw) -> None:
    with Source(src, _cfg()) as s:
        s.save(path, **kw)


def _restored_equal(src: GuestRAM, dst: GuestRAM, path: str) -> bool:
    dst.view("pc.ram")[:] = 0
    dst.view("vga")[:] = 0
    with Destination(dst, config=_cfg()) as d:
        d.restore(path)
    return same_contents(src, dst)


# ---------------------------------------------------------------------- save files


@pytest.mark.timeout(120)
def test_save_replaces_a_symlink_instead_of_writing_through_it(regions, tmp_path):
    src, dst = regions
    fill(src, "random", 3)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "state.mpsave"
    link.symlink_to(victim)
    _save(src, str(link))
    assert victim.read_bytes() == b"precious"
    st = os.lstat(link)
    assert stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode)
    assert _restored_equal(src, dst, str(link))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.mpsave", "victim"]  # no temporary left


@pytest.mark.timeout(120)
def test_save_over_a_world_readable_file_is_0600(regions, tmp_path):
    src, _ = regions
    fill(src, "random", 4)
    path = tmp_path / "state.mpsave"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    old_umask = os.umask(0)
    try:
        _save(src, str(path))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    read_layout(str(path))  # a complete save


@pytest.mark.timeout(120)
def test_a_failed_save_leaves_the_previous_one_intact(regions, tmp_path):
    src, dst = regions
    fill(src, "half-zero", 5)
    path = str(tmp_path / "good.mpsave")
    _save(src, path)
    with open(path, "rb") as f:
        before = f.read()
    fill(src, "random", 6)  # the guest moves on; the second save fails at its pause

    def boom() -> None:
        raise RuntimeError("the guest could not be paused")

    with pytest.raises(MigrationError):
        _save(src, path, pause=boom)
    with open(path, "rb") as f:
        assert f.read() == before
    assert os.listdir(tmp_path) == ["good.mpsave"]  # the failed save's file is gone
    fill(src, "half-zero", 5)
    assert _restored_equal(src, dst, path)


# ---------------------------------------------------------------------- shared memory and socket files

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@needs_root
def test_attach_refuses_a_segment_another_user_owns():
    with GuestRAM.create({"pc.ram": 4 * PS}) as ram:
        meta = os.path.join("/dev/shm", ram.name)
        os.chown(meta, NOBODY, -1)  # as if another user had planted it under that name
        with pytest.raises(UntrustedSegmentError) as e:
            GuestRAM.attach(ram.name)
        assert e.value.path == meta and e.value.owner == NOBODY and e.value.mode == 0o600
        assert ram.name in str(e.value) and str(NOBODY) in str(e.value)
        with GuestRAM.attach(ram.name, allow_foreign=True) as other:  # the opt-in
            other.write("pc.ram", 0, b"asked for")
        os.chown(meta, 0, -1)
        # a data segment planted by another user is refused too, naming the block
        data = os.path.join("/dev/shm", ram.block(0).segment)
        os.chown(data, NOBODY, -1)
        with pytest.raises(UntrustedSegmentError, match="pc.ram") as e:
            GuestRAM.attach(ram.name)
        assert e.value.path == data and e.value.owner == NOBODY
        os.chown(data, 0, -1)
        assert ram.view(0)[:9].tobytes() == b"asked for"


def test_attach_refuses_a_segment_open_to_others():
    with GuestRAM.create({"pc.ram": 4 * PS}) as ram:
        meta = os.path.join("/dev/shm", ram.name)
        for mode in (0o644, 0o660, 0o606):
            os.chmod(meta, mode)
            with pytest.raises(UntrustedSegmentError) as e:
                GuestRAM.attach(ram.name)
            assert e.value.mode == mode and f"{mode:04o}" in str(e.value)
        os.chmod(meta, 0o600)
        with GuestRAM.attach(ram.name) as other:
            assert other.blocks == ram.blocks


def test_attach_never_follows_a_symlink_in_dev_shm(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * PS)
    name = unique_name("link")
    os.symlink(target, os.path.join("/dev/shm", name))
    try:
        with pytest.raises(OSError):
            GuestRAM.attach(name)
    finally:
        os.unlink(os.path.join("/dev/shm", name))


@needs_root
def test_from_files_with_another_users_file_needs_the_opt_in(tmp_path):
    path = tmp_path / "qemu-ram"
    path.write_bytes(b"\0" * (4 * PS))
    os.chown(path, NOBODY, -1)
    with pytest.raises(UntrustedSegmentError) as e:
        GuestRAM.from_files({"pc.ram": str(path)})
    assert e.value.owner == NOBODY and "pc.ram" in str(e.value)
    with GuestRAM.from_files({"pc.ram": str(path)}, allow_foreign=True) as ram:
        # the accepted owner travels with the layout: a process attaching the region accepts it
        with GuestRAM.attach(ram.name) as other:
            other.write("pc.ram", PS, b"through the attachment")
        assert ram.view(0)[PS : PS + 22].tobytes() == b"through the attachment"
        os.chown(path, NOBODY + 1, -1)  # but not a file swapped for another owner's
        with pytest.raises(UntrustedSegmentError):
            GuestRAM.attach(ram.name)


def test_unix_socket_file_is_0600_whatever_the_umask(tmp_path):
    path = str(tmp_path / "dest.sock")
    old = os.umask(0)
    try:
        with GuestRAM.create({"pc.ram": 4 * PS}) as ram, Destination(ram, f"unix:{path}", _cfg()):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)


# ---------------------------------------------------------------------- key files


def test_load_key_reads_every_byte_and_refuses_short_keys(tmp_path):
    path = tmp_path / "key"
    key = b" \n\tkey bytes with whitespace at both ends \r\n"
    path.write_bytes(key)
    os.chmod(path, 0o600)
    assert load_key(path) == key  # nothing stripped: the API and the CLI use the same bytes
    path.write_bytes(b"x" * 16)
    assert load_key(str(path)) == b"x" * 16
    path.write_bytes(b"x" * 15)
    with pytest.raises(ConfigError, match="15 bytes is too short"):
        load_key(path)
    with pytest.raises(ConfigError, match="cannot open"):
        load_key(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_key(tmp_path)


def test_load_key_warns_about_a_file_others_can_read(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(os.urandom(32))
    os.chmod(path, 0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_key(path)  # no warning
    for mode in (0o640, 0o604):
        os.chmod(path, mode)
        with pytest.warns(KeyFileWarning, match=f"{mode:04o}"):
            load_key(path)


def test_cli_uses_the_key_bytes_exactly(tmp_path):
    from mpmultifd.cli import _config, build_parser

    key = b"\n" + os.urandom(30) + b" "
    path = tmp_path / "key"
    path.write_bytes(key)
    os.chmod(path, 0o600)
    a = build_parser().parse_args(["recv", "--listen", "127.0.0.1:0", "--auth-key-file", str(path)])
    assert _config(a).auth_key == key


# ---------------------------------------------------------------------- bounds on what a peer sends

KEY = b"k" * 32


def _control(address, session: bytes, nchannels: int, key: bytes | None = None) -> socket.socket:
    """A raw control connection through admission (with a proof of ``key``)."""
    sock = socket.create_connection(address, timeout=10)
    greeting = auth.decode_greeting(sock.recv(auth.GREETING_SIZE, socket.MSG_WAITALL))
    if key is None:
        sock.sendall(encode_hello(Hello(KIND_CONTROL, session, CONTROL_CHANNEL, nchannels)))
    else:
        hello = encode_hello(Hello(KIND_CONTROL, session, CONTROL_CHANNEL, nchannels, HELLO_FLAG_AUTH))
        cn = auth.new_nonce()
        sock.sendall(hello + cn + auth.client_proof(key, greeting.nonce, cn, hello))
    auth.decode_welcome(sock.recv(auth.WELCOME_SIZE, socket.MSG_WAITALL))
    return sock


def _config(ram: GuestRAM, session: bytes, channels: int) -> Config:
    return Config(session, ram.page_size, channels, 512, tuple(BlockSpec(b.name, b.size) for b in ram.blocks))


def _read_reply(sock: socket.socket):
    dec = ControlDecoder()
    while (msg := dec.next_message()) is None:
        data = sock.recv(65536)
        if not data:
            return None
        dec.feed(data)
    return msg


@pytest.mark.timeout(60)
def test_a_source_cannot_ask_for_more_channels_than_the_destination_allows(regions):
    src, dst = regions
    with Destination(dst, config=_cfg(channels=2, timeout=5.0)) as d:
        sid = os.urandom(16)
        sock = _control(d.address, sid, 256)
        try:
            sock.sendall(encode_control(_config(dst, sid, 256)))
            reply = _read_reply(sock)
        finally:
            sock.close()
        assert isinstance(reply, ErrorMessage) and "at most 2" in reply.message
        with pytest.raises(ConfigError, match="asks for 256 channels"):
            d.wait(10)
    # a real source asking for more than the destination's configuration is told why
    with Destination(dst, config=_cfg(channels=2)) as d, Source(src, _cfg(channels=4)) as s:
        with pytest.raises(MigrationError, match="at most 2"):
            s.migrate(d.address)


@pytest.mark.timeout(60)
def test_an_oversized_config_is_refused_from_its_frame_header(regions):
    _, dst = regions
    with Destination(dst, config=_cfg(timeout=5.0)) as d:
        sid = os.urandom(16)
        sock = _control(d.address, sid, 2)
        try:
            # a 4 MiB CONFIG announced: refused before its body is buffered
            sock.sendall(struct.pack(">IBBHI", 0x4D504D43, 1, 0, 0, 4 << 20) + b"{" * 65536)
            with pytest.raises(RemoteProtocolError) as e:
                d.wait(10)
        finally:
            sock.close()
        assert e.value.field == "length"


@pytest.mark.timeout(60)
def test_round_ends_far_ahead_of_the_barrier_are_a_protocol_error(regions):
    _, dst = regions
    with Destination(dst, config=_cfg(timeout=5.0)) as d:
        sid = os.urandom(16)
        sock = _control(d.address, sid, 2)
        try:
            sock.sendall(encode_control(_config(dst, sid, 2)))
            assert isinstance(_read_reply(sock), ConfigAck)
            burst = b"".join(encode_control(RoundEnd(r, (1, 1))) for r in range(1, 3000))
            try:
                sock.sendall(burst)
            except OSError:
                pass  # the destination may close first
            with pytest.raises(RemoteProtocolError, match="rounds ahead") as e:
                d.wait(10)
        finally:
            sock.close()
        assert e.value.field == "round"


# ---------------------------------------------------------------------- admission under a flood


def _trickle(address, stop: threading.Event, sent: list[int], interval: float) -> None:
    """Connect and send a hello one byte per ``interval``; record how many bytes went before the drop."""
    try:
        sock = socket.create_connection(address, timeout=30)
    except OSError:
        return
    n = 0
    try:
        sock.recv(auth.GREETING_SIZE, socket.MSG_WAITALL)
        hello = encode_hello(Hello(KIND_CONTROL, os.urandom(16), CONTROL_CHANNEL, 2))
        sock.settimeout(interval)
        for i in range(len(hello)):
            if stop.is_set():
                break
            sock.sendall(hello[i : i + 1])
            n += 1
            try:
                if sock.recv(1) == b"":
                    break  # the destination dropped us
            except TimeoutError:
                pass
    except OSError:
        pass
    finally:
        sent.append(n)
        sock.close()


@pytest.mark.timeout(60)
def test_a_trickled_hello_is_dropped_at_the_handshake_deadline():
    """The deadline covers the whole handshake: a byte every 0.6 s against a 1 s timeout
    (never idle for a whole timeout) is cut off long before its 32-byte hello is complete."""
    stop = threading.Event()
    sent: list[int] = []
    with GuestRAM.create({"a": 4 * PS}) as ram, Destination(ram, config=_cfg(timeout=1.0)) as d:
        t = threading.Thread(target=_trickle, args=(d.address, stop, sent, 0.6))
        t.start()
        t.join(40)
        stop.set()
        deadline = time.monotonic() + 10
        while d.query()["rejected-connections"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        q = d.query()
    assert sent and sent[0] < 8, sent  # dropped after about 2 bytes; without a deadline all 32 go
    assert q["rejected-connections"] == 1


@pytest.mark.timeout(120)
def test_idle_and_trickling_connections_do_not_lock_out_a_real_source(regions, caplog):
    """64 idle connections and 8 trickling ones fill every handshake slot; a real source (with a key)
    still migrates, threads stay bounded, and the drops make a few log lines, not one each."""
    src, dst = regions
    fill(src, "random", 9)
    stop = threading.Event()
    sent: list[int] = []
    idle: list[socket.socket] = []
    with Destination(dst, config=_cfg(auth_key=KEY, timeout=10.0)) as d:
        threads_before = threading.active_count()
        trick = [threading.Thread(target=_trickle, args=(d.address, stop, sent, 0.5)) for _ in range(8)]
        for t in trick:
            t.start()
        try:
            for _ in range(64):
                idle.append(socket.create_connection(d.address, timeout=10))
            deadline = time.monotonic() + 10
            limit = d._pending.per_peer  # all of them come from 127.0.0.1, as the source will
            while len(d._pending) < limit and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(d._pending) == limit  # every slot its address may hold is taken by a silent peer
            with Source(src, _cfg(auth_key=KEY)) as s:
                res = s.migrate(d.address)
            assert res.verified and d.wait(10).verified
            assert same_contents(src, dst)
            # handshake threads are bounded by the slots, whatever the flood
            assert threading.active_count() - threads_before <= 64 + 8 + 2 * 2 + 4
        finally:
            stop.set()
            for t in trick:
                t.join(30)
            for sock in idle:
                sock.close()
        q = d.query()
    assert q["rejected-connections"] >= 64 + 8 - limit  # the oldest idle ones were cut off, not the source
    drops = [r for r in caplog.records if r.name == "mpmultifd.destination" and "dropp" in r.getMessage()]
    assert len(drops) <= 3, [r.getMessage() for r in drops]


@pytest.mark.timeout(60)
def test_a_burst_of_bad_connections_is_one_log_line(caplog):
    with GuestRAM.create({"a": 4 * PS}) as ram, Destination(ram, config=_cfg(timeout=5.0)) as d:
        for _ in range(100):
            with socket.create_connection(d.address, timeout=5) as sock:
                sock.sendall(b"not a hello, not at all, 32 byte")
        deadline = time.monotonic() + 20
        while d.query()["rejected-connections"] < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert d.query()["rejected-connections"] == 100
    lines = [r.getMessage() for r in caplog.records if r.name == "mpmultifd.destination" and "dropp" in r.getMessage()]
    assert 1 <= len(lines) <= 3, lines
    assert "invalid" in lines[-1] and ("99 more" in lines[-1] or len(lines) > 2)


def _relay(address, drop_first: int, stop: threading.Event) -> tuple[socket.socket, list[int]]:
    """A loopback relay to ``address`` that closes its first ``drop_first`` connections at once
    (as a flooded destination cuts off handshakes) and forwards the rest."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.2)
    seen = [0]

    def pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve() -> None:
        pairs = []
        while not stop.is_set():
            try:
                c, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            seen[0] += 1
            if seen[0] <= drop_first:
                c.close()
                continue
            u = socket.create_connection(address)
            pairs.append((c, u))
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()
        lsock.close()
        for c, u in pairs:
            c.close()
            u.close()

    threading.Thread(target=serve, daemon=True).start()
    return lsock, seen


@pytest.mark.timeout(60)
def test_the_source_retries_admission_when_dropped_before_the_welcome(regions):
    src, dst = regions
    fill(src, "half-zero", 10)
    stop = threading.Event()
    with Destination(dst, config=_cfg(auth_key=KEY)) as d:
        lsock, seen = _relay(d.address, 3, stop)
        try:
            with Source(src, _cfg(auth_key=KEY)) as s:
                assert s.migrate(lsock.getsockname()).verified
            assert d.wait(10).verified and same_contents(src, dst)
        finally:
            stop.set()
    assert seen[0] >= 3 + 3  # three dropped, then control and two channels


# ---------------------------------------------------------------------- local trust

def _hello_as(uid: int, path: str) -> str:
    """In a forked child running as ``uid``: connect to ``path`` and say what admission answered."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        text = "?"
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            auth.decode_greeting(s.recv(auth.GREETING_SIZE, socket.MSG_WAITALL))
            s.sendall(encode_hello(Hello(KIND_CONTROL, bytes(16), CONTROL_CHANNEL, 2)))
            try:
                auth.decode_welcome(s.recv(auth.WELCOME_SIZE, socket.MSG_WAITALL))
                text = "welcomed"
            except Exception as e:
                text = f"refused: {e}"
        except BaseException as e:
            text = f"error: {e!r}"
        finally:
            os.write(w, text.encode()[:4000])
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            return f.read().decode()
    finally:
        os.waitpid(pid, 0)


@needs_root
@pytest.mark.timeout(60)
def test_a_keyless_unix_socket_admits_only_its_own_user():
    import tempfile

    where = tempfile.mkdtemp(prefix="mpm-harden-")
    os.chmod(where, 0o755)  # so that the other user can reach the socket, once we let it
    path = os.path.join(where, "d.sock")
    try:
        with GuestRAM.create({"a": 4 * PS}) as ram, Destination(ram, f"unix:{path}", _cfg(timeout=5.0)) as d:
            os.chmod(path, 0o666)  # the file mode is one guard; the peer's credentials are the other
            out = _hello_as(NOBODY, path)
            assert out.startswith("refused:") and "its own user" in out, out
            deadline = time.monotonic() + 10
            while d.query()["authentication-failures"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert d.query()["authentication-failures"] == 1
            assert d.status == "setup"  # it never became the control connection
    finally:
        import shutil

        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.timeout(60)
def test_a_keyless_unix_socket_still_admits_its_own_user(regions, tmp_path):
    src, dst = regions
    fill(src, "half-zero", 12)
    with Destination(dst, f"unix:{tmp_path / 'd.sock'}", _cfg()) as d, Source(src, _cfg()) as s:
        assert s.migrate(d.address).verified
        assert d.wait(10).verified
