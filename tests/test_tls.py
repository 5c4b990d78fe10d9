"""TLS on every channel, with a self-signed certificate made by the test."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import numpy as np
import pytest

from mpmultifd import AuthenticationError, Destination, GuestRAM, MigrationConfig, MigrationError, Source
from mpmultifd.testing import fill

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl command is needed to make a certificate"
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return key, cert


def contexts(key, cert):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    return server, client


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_tls_migration_with_key(certs, start_method):
    server, client = contexts(*certs)
    key = b"s" * 32
    size = 8 << 20
    with GuestRAM.create({"a": size, "b": 1 << 20}) as s, GuestRAM.create({"a": size, "b": 1 << 20}) as d:
        fill(s, "mixed", 4)
        dcfg = MigrationConfig(channels=2, tls=server, auth_key=key, start_method=start_method)
        scfg = MigrationConfig(channels=2, tls=client, auth_key=key, start_method=start_method, compression="lz4")
        with Destination(d, config=dcfg) as dst, Source(s, scfg) as src:
            res = src.migrate(dst.address)
            assert dst.wait(10).verified
        assert res.verified
        assert all(np.array_equal(s.view(b.name), d.view(b.name)) for b in s.blocks)


def test_tls_refuses_an_untrusted_certificate(certs, tmp_path):
    server, _ = contexts(*certs)
    untrusting = ssl.create_default_context()  # system CAs only: the self-signed cert is not trusted
    with GuestRAM.create({"a": 1 << 20}) as s, GuestRAM.create({"a": 1 << 20}) as d:
        with Destination(d, config=MigrationConfig(tls=server, start_method="fork")) as dst:
            with Source(s, MigrationConfig(tls=untrusting, start_method="fork", timeout=5)) as src:
                with pytest.raises(AuthenticationError, match="TLS"):
                    src.migrate(dst.address)
        assert not d.view(0).any()


def test_plain_source_cannot_talk_to_tls_destination(certs):
    server, _ = contexts(*certs)
    with GuestRAM.create({"a": 1 << 20}) as s, GuestRAM.create({"a": 1 << 20}) as d:
        with Destination(d, config=MigrationConfig(tls=server, start_method="fork")) as dst:
            with Source(s, MigrationConfig(start_method="fork", timeout=3)) as src:
                with pytest.raises(MigrationError):  # a typed error, whichever side gives up first
                    src.migrate(dst.address)
        assert not d.view(0).any()


def test_tls_config_must_be_a_context():
    from mpmultifd import ConfigError

    with pytest.raises(ConfigError, match="SSLContext"):
        MigrationConfig(tls="cert.pem")  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_tls_idle_and_trickling_connections_do_not_lock_out_a_real_source(certs):
    """With TLS, silent peers hold the handshake slots inside the TLS handshake itself; they are cut
    off (the oldest first, or at the deadline) and the real source migrates."""
    import socket
    import threading
    import time

    server, client = contexts(*certs)
    key = b"s" * 32
    size = 4 << 20
    with GuestRAM.create({"a": size}) as s, GuestRAM.create({"a": size}) as d:
        fill(s, "mixed", 5)
        dcfg = MigrationConfig(channels=2, tls=server, auth_key=key, timeout=3.0)
        scfg = MigrationConfig(channels=2, tls=client, auth_key=key, tls_hostname="localhost")
        idle = []
        with Destination(dst_ram := d, config=dcfg) as dst:
            # a TLS ClientHello that trickles in, a byte every 0.5 s: cut off at the 3 s deadline
            sent = []

            def trickle():
                n = 0
                t = socket.create_connection(dst.address, timeout=10)
                try:
                    for _ in range(40):
                        t.sendall(b"\x16")
                        n += 1
                        time.sleep(0.5)
                except OSError:
                    pass
                finally:
                    sent.append(n)
                    t.close()

            th = threading.Thread(target=trickle)
            th.start()
            th.join(30)
            assert sent and sent[0] < 16, sent  # the deadline covers the TLS handshake too
            assert dst.status == "setup"
            try:
                for _ in range(64):
                    idle.append(socket.create_connection(dst.address, timeout=10))
                with Source(s, scfg) as src:
                    res = src.migrate(dst.address)
                assert res.verified and dst.wait(10).verified
            finally:
                for sock in idle:
                    sock.close()
        assert np.array_equal(s.view(0), dst_ram.view(0))
