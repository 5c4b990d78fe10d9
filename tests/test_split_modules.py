"""Unit tests of the modules Source and Destination are built from: connect, listener, prepared, saving, estimate."""

from __future__ import annotations

import os
import secrets
import socket
import stat
import threading
import time

import numpy as np
import pytest

from mpmultifd import GuestRAM, MigrationConfig
from mpmultifd.connect import Connector, host_of, keyless_address_check, tls_verifies
from mpmultifd.digest import fingerprint_pages
from mpmultifd.errors import (
    AuthenticationError,
    ChannelBroken,
    ConfigError,
    MigrationCancelled,
    MigrationError,
)
from mpmultifd.estimate import check_estimate_arguments, estimate_dirty_rate
from mpmultifd.listener import Listener
from mpmultifd.prepared import Prefaulter, allocated_pages
from mpmultifd.saving import block_fingerprints, fsync_dir, save_temp
from mpmultifd.transport import connect
from mpmultifd.wire import CONTROL_CHANNEL, KIND_CONTROL, KIND_DATA, Hello

BLOCKS = {"pc.ram": 1 << 20, "vga": 256 << 10}

KEY = b"k" * 32


def _never_cancelled() -> None:
    pass


def _wait_until(cond, what: str, limit: float = 30.0) -> None:
    """Poll ``cond`` until true; a bound against hangs, not a timing assertion."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def region():
    with GuestRAM.create(BLOCKS) as ram:
        try:
            yield ram
        finally:
            ram.unlink()


# ---------------------------------------------------------------------- connect + listener


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", [None, KEY])
def test_a_connector_is_admitted_by_a_listener_and_the_hello_arrives(key):
    cfg = MigrationConfig(auth_key=key, timeout=10)
    woken = threading.Event()
    lst = Listener(("127.0.0.1", 0), cfg, woken.set)
    lst.start()
    try:
        session = secrets.token_bytes(16)
        hello = Hello(KIND_DATA, session, 1, 2)
        sock = Connector(cfg, connect, _never_cancelled).open(lst.address, hello)
        try:
            _wait_until(woken.is_set, "the listener's wake-up")
            tag, theirs, got = lst.incoming.get_nowait()
            assert tag == "hello"
            assert (got.kind, got.session_id, got.channel, got.nchannels) == (KIND_DATA, session, 1, 2)
            # the admitted socket is the other end of ours
            theirs.sendall(b"ping")
            assert sock.recv(4) == b"ping"
            theirs.close()
            assert (lst.rejected, lst.auth_failures) == (0, 0)
        finally:
            sock.close()
    finally:
        lst.close()


@pytest.mark.timeout(60)
def test_a_wrong_key_fails_both_ends_and_is_counted():
    lst = Listener(("127.0.0.1", 0), MigrationConfig(auth_key=KEY, timeout=10), lambda: None)
    lst.start()
    try:
        wrong = MigrationConfig(auth_key=b"w" * 32, timeout=10)
        with pytest.raises(AuthenticationError):
            Connector(wrong, connect, _never_cancelled).open(lst.address, Hello(KIND_DATA, bytes(16), 3, 4))
        _wait_until(lambda: lst.auth_failures == 1, "the listener to count the failure")
        assert lst.rejected == 1
        assert lst.incoming.empty()
        keyless = MigrationConfig(timeout=10)
        with pytest.raises(AuthenticationError, match="requires an auth key"):
            Connector(keyless, connect, _never_cancelled).open(
                lst.address, Hello(KIND_CONTROL, bytes(16), CONTROL_CHANNEL, 1)
            )
    finally:
        lst.close()


@pytest.mark.timeout(60)
def test_garbage_instead_of_a_hello_is_rejected_and_nothing_is_admitted():
    lst = Listener(("127.0.0.1", 0), MigrationConfig(timeout=10), lambda: None)
    lst.start()
    try:
        with socket.create_connection(lst.address, timeout=10) as s:
            s.recv(64)  # the greeting
            s.sendall(b"\xff" * 64)
            _wait_until(lambda: lst.rejected == 1, "the rejection")
        assert lst.auth_failures == 0
        assert lst.incoming.empty()
    finally:
        lst.close()


@pytest.mark.timeout(60)
def test_stop_closes_what_no_session_claimed(tmp_path):
    path = str(tmp_path / "l.sock")
    cfg = MigrationConfig(timeout=10)
    lst = Listener(f"unix:{path}", cfg, lambda: None)
    assert lst.address == f"unix:{path}" and os.path.exists(path)
    lst.start()
    sock = Connector(cfg, connect, _never_cancelled).open(lst.address, Hello(KIND_DATA, bytes(16), 0, 1))
    try:
        _wait_until(lambda: not lst.incoming.empty(), "the admission")
        lst.stop()
        assert lst.stopped and lst.incoming.empty()
        sock.settimeout(10)
        assert sock.recv(1) == b""  # the admitted end was closed
        with pytest.raises(ChannelBroken):
            Connector(cfg, connect, _never_cancelled).open(lst.address, Hello(KIND_DATA, bytes(16), 0, 1))
    finally:
        sock.close()
        lst.close()
    assert not os.path.exists(path)


def test_a_keyless_listener_refuses_a_non_loopback_address_before_binding():
    with pytest.raises(ConfigError, match="listen:"):
        Listener(("0.0.0.0", 0), MigrationConfig(), lambda: None)


@pytest.mark.timeout(60)
def test_open_tries_again_when_the_destination_drops_it_before_the_greeting():
    cfg = MigrationConfig(timeout=10)
    lst = Listener(("127.0.0.1", 0), cfg, lambda: None)
    lst.start()
    dialled = []

    def dial(address, timeout):
        dialled.append(address)
        if len(dialled) <= 2:  # a flooded destination cuts these off before greeting
            a, b = socket.socketpair()
            b.close()
            return a
        return connect(address, timeout)

    try:
        sock = Connector(cfg, dial, _never_cancelled).open(lst.address, Hello(KIND_DATA, bytes(16), 0, 1))
        sock.close()
        assert dialled == [lst.address] * 3
    finally:
        lst.close()


@pytest.mark.timeout(60)
def test_abort_ends_a_handshake_blocked_on_a_silent_destination():
    silent = socket.create_server(("127.0.0.1", 0))
    cancelled = threading.Event()
    dialled = threading.Event()

    def check_cancel() -> None:
        if cancelled.is_set():
            raise MigrationCancelled("cancelled")

    def dial(address, timeout):
        s = connect(address, timeout)
        dialled.set()
        return s

    conn = Connector(MigrationConfig(timeout=60), dial, check_cancel)

    def cancel() -> None:
        dialled.wait(30)
        cancelled.set()
        conn.abort()

    t = threading.Thread(target=cancel)
    t.start()
    try:
        with pytest.raises(MigrationCancelled):
            conn.open(silent.getsockname(), Hello(KIND_DATA, bytes(16), 0, 1))
    finally:
        t.join()
        silent.close()


def test_keyless_helpers():
    keyless_address_check(("127.0.0.1", 1), "x")
    keyless_address_check("unix:/nonexistent", "x")
    with pytest.raises(AuthenticationError, match="allow_unauthenticated=True"):
        keyless_address_check(("192.0.2.7", 1), "data channel 0")
    assert host_of(("example.org", 1)) == "example.org" and host_of("unix:/x") is None
    assert not tls_verifies(None)


def test_the_connector_reads_the_current_configuration():
    cfgs = [MigrationConfig(timeout=5)]
    conn = Connector(lambda: cfgs[-1], connect, _never_cancelled)
    assert conn.config.timeout == 5
    cfgs.append(MigrationConfig(timeout=7))
    assert conn.config.timeout == 7


# ---------------------------------------------------------------------- prepared


def test_allocated_pages_marks_only_data(tmp_path):
    ps = 4096
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(64 * ps)
        f.seek(5 * ps)
        f.write(b"x" * ps)
    out = np.full(64, 7, dtype=np.uint8)
    allocated_pages(str(path), 64, ps, out)
    assert out[5] == 1
    assert int(out.sum()) == 1  # holes are 0 (a file system may allocate more, never less)


def test_a_prefaulter_never_started_holds_nothing(region):
    p = Prefaulter(region, None, 2, False)
    assert p.join(0) and not p.started
    assert p.take() is None and p.holes_before is None and p.used == 0
    a, b = socket.socketpair()
    try:
        assert p.hand(None, a, "rcv", "st") is None  # type: ignore[arg-type]
    finally:
        a.close()
        b.close()
    p.close()


@pytest.mark.timeout(60)
def test_prefault_allocates_and_remembers_the_holes(region):
    ps = region.page_size
    written = [3, 17]
    for page in written:
        region.write(0, page * ps, b"\x01" * ps)
    p = Prefaulter(region, None, 2, False)
    p.start()
    assert p.join(30)
    assert p.holes_before is not None
    assert np.flatnonzero(p.holes_before[0]).tolist() == written
    assert not p.holes_before[1].any()
    for b in region.blocks:
        assert os.stat(b.path).st_blocks * 512 >= b.size  # every page allocated now
    p.close()


# ---------------------------------------------------------------------- saving and estimate


def test_save_temp_is_private_and_beside_the_target(tmp_path):
    target = tmp_path / "vm.save"
    fd, tmp = save_temp(str(target))
    try:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert os.path.basename(tmp).startswith(".vm.save.") and tmp.endswith(".part")
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        assert not target.exists()
    finally:
        os.close(fd)
        os.unlink(tmp)
    fsync_dir(str(target))  # a directory entry made durable; no error
    with pytest.raises(ConfigError, match="path:"):
        save_temp(str(tmp_path) + "/")


def test_block_fingerprints_read_only_data_but_match_every_page(region):
    ps = region.page_size
    rng = np.random.default_rng(5)
    for page in (0, 9, 200):
        region.write(0, page * ps, rng.integers(0, 256, ps, dtype=np.uint8).tobytes())
    got = block_fingerprints(region, 0)
    assert np.array_equal(got, fingerprint_pages(region.pages(0)))
    assert np.count_nonzero(got) == 3


def test_estimate_arguments_and_a_busy_kernel_tracker(region):
    with pytest.raises(ConfigError, match="duration"):
        check_estimate_arguments(0, 0.1)
    with pytest.raises(ConfigError, match="interval"):
        check_estimate_arguments(1, 2)
    with pytest.raises(MigrationError, match="busy"):
        estimate_dirty_rate(
            region,
            MigrationConfig(dirty_tracker="kernel"),
            tracker_in_use=True,
            check_cancel=_never_cancelled,
            downtime_limit=0.3,
            duration=0.1,
            interval=0.1,
        )


@pytest.mark.timeout(60)
def test_estimate_gives_the_map_trackers_marks_back(region):
    ps = region.page_size
    region.write(0, 4 * ps, b"\x02" * ps)  # marks the page dirty, before the estimate
    est = estimate_dirty_rate(
        region,
        MigrationConfig(dirty_tracker="map"),
        tracker_in_use=False,
        check_cancel=_never_cancelled,
        downtime_limit=0.3,
        duration=0.05,
        interval=0.05,
        bandwidth=1 << 30,
    )
    assert est.tracker == "map" and est.downtime_limit == 0.3 and est.converges is not None
    assert region.snapshot_dirty(0).tolist() == [4]  # the mark is back for a later migration
