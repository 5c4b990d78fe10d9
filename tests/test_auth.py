"""Admission: keys, proofs, replays, duplicate channels, floods, Unix sockets, listening policy."""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest

from mpmultifd import (
    AuthenticationError,
    ConfigError,
    Destination,
    GuestRAM,
    MigrationConfig,
    RemoteProtocolError,
    Source,
    auth,
)
from mpmultifd.testing import fill
from mpmultifd.wire import CONTROL_CHANNEL, HELLO_FLAG_AUTH, KIND_CONTROL, KIND_DATA, Hello, encode_hello

KEY = b"k" * 32
OTHER = b"o" * 32


def cfg(**kw):
    base = dict(channels=2, start_method="fork", timeout=5.0)
    base.update(kw)
    return MigrationConfig(**base)


def migrate(src_cfg, dst_cfg, size=2 << 20, listen=("127.0.0.1", 0)):
    with GuestRAM.create({"a": size}) as s, GuestRAM.create({"a": size}) as d:
        fill(s, "mixed", 2)
        with Destination(d, listen, dst_cfg) as dst, Source(s, src_cfg) as src:
            res = src.migrate(dst.address)
            dres = dst.wait(10)
            same = np.array_equal(s.view(0), d.view(0))
            return res, dres, same, dst.query()


# ----------------------------------------------------------------------------- codec


def test_greeting_and_welcome_round_trip():
    n = auth.new_nonce()
    assert auth.decode_greeting(auth.encode_greeting(auth.Greeting(True, n))) == auth.Greeting(True, n)
    assert auth.decode_greeting(auth.encode_greeting(auth.Greeting(False, n))).auth_required is False
    proof = os.urandom(32)
    assert auth.decode_welcome(auth.encode_welcome(proof)) == proof
    with pytest.raises(AuthenticationError, match="proof of the key is wrong"):
        auth.decode_welcome(auth.encode_refused(auth.REFUSE_BAD_PROOF))


@pytest.mark.parametrize(
    "offset, value, field", [(0, b"XXXX", "magic"), (4, b"\0\2", "version"), (6, b"\0\2", "flags")]
)
def test_greeting_rejects(offset, value, field):
    b = bytearray(auth.encode_greeting(auth.Greeting(False, bytes(32))))
    b[offset : offset + len(value)] = value
    with pytest.raises(RemoteProtocolError) as ei:
        auth.decode_greeting(bytes(b))
    assert ei.value.field == field


def test_proofs_bind_key_nonces_and_hello():
    sn, cn = auth.new_nonce(), auth.new_nonce()
    hello = encode_hello(Hello(KIND_DATA, bytes(16), 1, 4, HELLO_FLAG_AUTH))
    p = auth.client_proof(KEY, sn, cn, hello)
    assert auth.check_client_proof(KEY, sn, cn, hello, p)
    assert not auth.check_client_proof(OTHER, sn, cn, hello, p)
    assert not auth.check_client_proof(KEY, auth.new_nonce(), cn, hello, p)  # replay on a new connection
    other_channel = encode_hello(Hello(KIND_DATA, bytes(16), 2, 4, HELLO_FLAG_AUTH))
    assert not auth.check_client_proof(KEY, sn, cn, other_channel, p)
    assert auth.server_proof(KEY, sn, cn, hello) != p


# ----------------------------------------------------------------------------- end to end


def test_migration_with_matching_keys():
    res, dres, same, q = migrate(cfg(auth_key=KEY), cfg(auth_key=KEY))
    assert same and res.verified and dres.verified
    assert q["authentication-failures"] == 0


def test_wrong_key_fails_fast_and_leaves_destination_untouched():
    with GuestRAM.create({"a": 1 << 20}) as s, GuestRAM.create({"a": 1 << 20}) as d:
        s.view(0)[:] = 5
        with Destination(d, config=cfg(auth_key=KEY)) as dst:
            with Source(s, cfg(auth_key=OTHER)) as src:
                t0 = time.monotonic()
                with pytest.raises(AuthenticationError, match="wrong"):
                    src.migrate(dst.address)
                assert time.monotonic() - t0 < 3
            assert dst.status == "setup"  # still waiting for a real source
            deadline = time.monotonic() + 5
            while dst.query()["authentication-failures"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # the destination logs and counts after it refused
            assert dst.query()["authentication-failures"] == 1
            # the right source can still migrate into the same destination afterwards
            with Source(s, cfg(auth_key=KEY)) as src:
                src.migrate(dst.address)
            assert dst.wait(10).verified
        assert (d.view(0) == 5).all()


def test_untouched_after_wrong_key():
    with GuestRAM.create({"a": 1 << 20}) as s, GuestRAM.create({"a": 1 << 20}) as d:
        s.view(0)[:] = 5
        with Destination(d, config=cfg(auth_key=KEY)) as dst, Source(s, cfg(auth_key=OTHER)) as src:
            with pytest.raises(AuthenticationError):
                src.migrate(dst.address)
        assert not d.view(0).any()


def test_missing_key_on_source():
    with GuestRAM.create({"a": 1 << 20}) as s, GuestRAM.create({"a": 1 << 20}) as d:
        with Destination(d, config=cfg(auth_key=KEY)) as dst, Source(s, cfg()) as src:
            with pytest.raises(AuthenticationError, match="requires an auth key"):
                src.migrate(dst.address)


def test_source_with_key_refuses_unauthenticating_destination():
    with GuestRAM.create({"a": 1 << 20}) as s, GuestRAM.create({"a": 1 << 20}) as d:
        with Destination(d, config=cfg()) as dst, Source(s, cfg(auth_key=KEY)) as src:
            with pytest.raises(AuthenticationError, match="does not authenticate"):
                src.migrate(dst.address)


def _raw_connect(address):
    sock = socket.create_connection(address, timeout=5)
    greeting = auth.decode_greeting(sock.recv(auth.GREETING_SIZE, socket.MSG_WAITALL))
    return sock, greeting


def test_replayed_hello_is_refused():
    """A hello with a valid proof, captured from one connection, fails on the next: the nonce is new."""
    with GuestRAM.create({"a": 1 << 20}) as d:
        with Destination(d, config=cfg(auth_key=KEY)) as dst:
            sid = os.urandom(16)
            hello = encode_hello(Hello(KIND_CONTROL, sid, CONTROL_CHANNEL, 2, HELLO_FLAG_AUTH))
            sock, greeting = _raw_connect(dst.address)
            cn = auth.new_nonce()
            captured = hello + cn + auth.client_proof(KEY, greeting.nonce, cn, hello)
            sock2, _ = _raw_connect(dst.address)
            try:
                sock2.sendall(captured)  # the replay, on a connection with a different nonce
                with pytest.raises(AuthenticationError, match="proof of the key is wrong"):
                    auth.decode_welcome(sock2.recv(auth.WELCOME_SIZE, socket.MSG_WAITALL))
                assert sock2.recv(1) == b""  # and the destination closed it
            finally:
                sock.close()
                sock2.close()
            deadline = time.monotonic() + 5
            while dst.query()["authentication-failures"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert dst.query()["authentication-failures"] == 1
            assert dst.status == "setup"


def test_flood_and_duplicate_channel_during_migration_still_completes():
    """Unauthenticated connections and a second claim on a used channel id are dropped; the migration completes."""
    stop = threading.Event()
    attempts = []

    def flood(address):
        while not stop.is_set() and len(attempts) < 300:
            try:
                s = socket.create_connection(address, timeout=2)
                s.sendall(os.urandom(int.from_bytes(os.urandom(1), "big")))
                s.close()
                attempts.append(1)
            except OSError:
                pass

    size = 64 << 20
    with GuestRAM.create({"a": size}) as s, GuestRAM.create({"a": size}) as d:
        fill(s, "random", 3)
        # about a second of migration (capped at 64 MB/s): the duplicate claim must land during it
        src_cfg = cfg(auth_key=KEY, max_bandwidth=64_000_000)
        with Destination(d, config=cfg(auth_key=KEY)) as dst, Source(s, src_cfg) as src:
            threads = [threading.Thread(target=flood, args=(dst.address,)) for _ in range(2)]
            for t in threads:
                t.start()
            dup_result = {}

            def duplicate():
                # once both channels are connected, claim channel 0 again with a valid proof of the key
                deadline = time.monotonic() + 10
                while len(dst._receivers) < 2 and time.monotonic() < deadline:
                    time.sleep(0.002)
                sid = dst._session.session_id
                sock, greeting = _raw_connect(dst.address)
                try:
                    hello = encode_hello(Hello(KIND_DATA, sid, 0, 2, HELLO_FLAG_AUTH))
                    cn = auth.new_nonce()
                    sock.sendall(hello + cn + auth.client_proof(KEY, greeting.nonce, cn, hello))
                    auth.decode_welcome(sock.recv(auth.WELCOME_SIZE, socket.MSG_WAITALL))
                    dup_result["closed"] = sock.recv(1) == b""  # admitted, then dropped by the session
                except (AuthenticationError, OSError) as e:
                    dup_result["error"] = e
                finally:
                    sock.close()

            dup = threading.Thread(target=duplicate)
            dup.start()
            try:
                res = src.migrate(dst.address)
            finally:
                stop.set()
                for t in threads:
                    t.join()
                dup.join()
            assert dst.wait(10).verified
            q = dst.query()
        assert res.verified and np.array_equal(s.view(0), d.view(0))
        assert len(attempts) > 0
        assert q["rejected-connections"] >= 1
        assert dup_result.get("closed") is True, dup_result


def test_a_connection_admitted_after_the_migration_ended_is_closed_at_once():
    """A handshake that completes after the session ended is not left open until close()."""
    size = 4 << 20
    with GuestRAM.create({"a": size}) as s, GuestRAM.create({"a": size}) as d:
        fill(s, "random", 5)
        with Destination(d, config=cfg(auth_key=KEY, timeout=30.0)) as dst:
            late, greeting = _raw_connect(dst.address)  # accepted now; its hello comes later
            try:
                with Source(s, cfg(auth_key=KEY)) as src:
                    assert src.migrate(dst.address).verified
                assert dst.wait(10).verified
                sid = dst._session.session_id
                hello = encode_hello(Hello(KIND_DATA, sid, 0, 2, HELLO_FLAG_AUTH))
                cn = auth.new_nonce()
                try:
                    late.sendall(hello + cn + auth.client_proof(KEY, greeting.nonce, cn, hello))
                except OSError:
                    pass  # already cut off: the ended destination dropped its pending handshakes
                t0 = time.monotonic()
                got = b""
                try:
                    while chunk := late.recv(4096):
                        got += chunk
                except OSError:
                    pass
                # either cut off before its welcome, or welcomed and closed at once; never kept open
                assert got == b"" or auth.decode_welcome(got) is not None, got
                assert time.monotonic() - t0 < 2.0, "admitted after the end, and then kept open"
                assert dst.valid and dst.status == "completed"
            finally:
                late.close()


def test_non_loopback_listen_needs_a_key_or_an_explicit_opt_out():
    with GuestRAM.create({"a": 1 << 20}) as d:
        with pytest.raises(ConfigError, match="auth_key"):
            Destination(d, ("0.0.0.0", 0), cfg())
        with Destination(d, ("0.0.0.0", 0), cfg(auth_key=KEY)):
            pass
        with Destination(d, ("0.0.0.0", 0), cfg(allow_unauthenticated=True)):
            pass


def test_short_key_rejected():
    with pytest.raises(ConfigError, match="auth_key"):
        MigrationConfig(auth_key=b"short")
    with pytest.raises(ConfigError, match="auth_key"):
        MigrationConfig(auth_key="a string key")  # type: ignore[arg-type]


def test_key_not_shown_in_repr_or_dict():
    c = MigrationConfig(auth_key=KEY)
    assert "kkkk" not in repr(c) and c.to_dict()["auth_key"] == "<set>"


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_unix_socket_transport(tmp_path, start_method):
    path = str(tmp_path / "mig.sock")
    res, dres, same, _ = migrate(cfg(start_method=start_method), cfg(start_method=start_method), listen=f"unix:{path}")
    assert same and res.verified
    assert not os.path.exists(path)  # the destination removed its socket file


def test_unix_socket_with_plain_path_and_key(tmp_path):
    path = tmp_path / "k.sock"
    res, _, same, _ = migrate(cfg(auth_key=KEY), cfg(auth_key=KEY), listen=path)
    assert same and res.verified
