"""Switchover: exact tracking of foreign writers, repair, the acknowledged commit, stream connections."""

from __future__ import annotations

import math
import os
import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpmultifd import (
    CommitUnknown,
    Destination,
    GuestRAM,
    MigrationConfig,
    MigrationError,
    Source,
    VerificationError,
)
from mpmultifd.pageprint import fingerprint_rows, random_key
from mpmultifd.testing import DirtyingWriter, fill
from mpmultifd.tracking import ScanningTracker

from conftest import START_METHODS

PS = 4096


# ---------------------------------------------------------------- the tracker's rule, without processes


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_scan_tracker_compares_with_what_was_sent(data):
    """Any interleaving of writes (ABA included), scans and sends ends with the copy equal to the source.

    A model of the migration: ``send`` copies pages to the destination and
    records the fingerprints of exactly the bytes it copied; ``collect`` names
    what differs from the record. Writes happen between any two steps, also
    between a collect and the send of what it found.
    """
    npages = 8
    with GuestRAM.create({"ram": npages * PS}) as ram:
        try:
            grid = ram.pages(0)
            words = grid.view(np.uint32)
            dest = np.zeros_like(grid)
            tracker = ScanningTracker(ram, random_key(PS))
            tracker.recorded = True
            tracker.start()

            def send(pages: np.ndarray) -> None:
                snap = grid[pages]
                dest[pages] = snap
                prints = np.empty(len(pages), dtype=np.uint64)
                fingerprint_rows(snap, tracker.key, prints)
                tracker.baseline[0][pages] = prints

            def write() -> None:
                page = data.draw(st.integers(0, npages - 1))
                word = data.draw(st.integers(0, PS // 4 - 1))
                words[page : page + 1, word] += np.uint32(data.draw(st.sampled_from([1, 2**31, 0xFFFFFFFF, 12345])))

            pending = np.arange(npages)
            for _ in range(data.draw(st.integers(1, 6))):
                for _ in range(data.draw(st.integers(0, 3))):
                    write()
                send(pending)
                for _ in range(data.draw(st.integers(0, 3))):
                    write()  # after the send: the lock is released, the counter moves back...
                pending = tracker.collect(0)
            # the pause: nothing writes any more; the final round sends what differs
            send(tracker.collect(0))
            assert len(tracker.collect(0)) == 0
            assert np.array_equal(dest, grid)
            grid = words = None  # drop the views (the closures' too) before the region closes
            tracker.release()
        finally:
            ram.unlink()


# ---------------------------------------------------------------- live migrations with ABA writers


def _aba_migration(start_method: str, seed: int, rate: float, packet_pages: int, channels: int) -> None:
    cfg = MigrationConfig(
        channels=channels,
        dirty_tracker="scan",
        start_method=start_method,
        packet_pages=packet_pages,
        downtime_limit=0.02,
        max_rounds=6,
        stall_downtime_limit=math.inf,
        repair_passes=0,  # exact: not one page may differ at switchover
    )
    layout = {"pc.ram": 24 << 20, "vga": 2 << 20}
    with GuestRAM.create(layout) as src_ram, GuestRAM.create(layout) as dst_ram:
        try:
            fill(src_ram, "half-zero", seed)
            with Destination(dst_ram, config=cfg) as dst, DirtyingWriter(
                src_ram.name, seed=seed, rate=rate, start_method=start_method, mark=False, pattern="aba"
            ) as writer, Source(src_ram, cfg) as src:
                res = src.migrate(dst.address, pause=writer.pause)
                assert dst.wait(30).verified
                assert writer.writes > 100
            assert res.verified and res.repaired_pages == 0 and res.rounds >= 2
            for b in src_ram.blocks:
                assert np.array_equal(src_ram.view(b.index), dst_ram.view(b.index)), b.name
        finally:
            src_ram.unlink()
            dst_ram.unlink()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("start_method", START_METHODS)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    rate=st.sampled_from([3000.0, 20000.0]),
    packet_pages=st.sampled_from([64, 512]),
    channels=st.integers(1, 3),
)
def test_aba_writers_leave_no_page_behind(start_method, seed, rate, packet_pages, channels):
    """Lock words taken and released, counters up and down, pages rewritten with their old bytes,
    from another process: the scanning tracker misses none of it, with repair off."""
    _aba_migration(start_method, seed, rate, packet_pages, channels)


# ---------------------------------------------------------------- a relay that sees control frames

_FRAME = struct.Struct(">IBBHI")
T_COMMIT, T_COMMIT_ACK, T_REPAIR_PAGES = 10, 12, 14


class ControlRelay:
    """Forwards every connection to ``upstream``; the first one (control) frame by frame.

    ``hook(direction, mtype, frame) -> bytes | None`` may rewrite a control
    frame (``direction`` is ``"up"`` from the source, ``"down"`` from the
    destination); ``None`` cuts the control connection right there.
    """

    def __init__(self, upstream, hook, data_hook=None):
        self.upstream, self.hook, self.data_hook = upstream, hook, data_hook
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.address = self.lsock.getsockname()
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.cut = threading.Event()
        self.accepted = 0
        self._spawn(self._accept)

    def _spawn(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self):
        self.lsock.settimeout(0.1)
        while True:
            try:
                client, _ = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            self.socks += [client, up]
            index = self.accepted
            self.accepted += 1
            for a, b, d in ((client, up, "up"), (up, client, "down")):
                self._spawn(self._pump, a, b, d, client, up, index)

    def _pump(self, a, b, direction, client, up, index):
        buf = bytearray()
        greeted = index != 0
        moved = 0
        try:
            while True:
                data = a.recv(1 << 16)
                if not data:
                    b.shutdown(socket.SHUT_WR)
                    return
                if index != 0:
                    if self.data_hook is not None:
                        data = self.data_hook(index, direction, moved, data)
                    moved += len(data)
                    b.sendall(data)
                    continue
                buf += data
                if not greeted:
                    # the handshake (greeting, hello, proofs) goes through as it is; frames start
                    # with the control magic, which the handshake bytes never do at this point
                    at = buf.find(b"MPMC")
                    if at < 0:
                        b.sendall(bytes(buf))
                        buf.clear()
                        continue
                    b.sendall(bytes(buf[:at]))
                    del buf[:at]
                    greeted = True
                while len(buf) >= _FRAME.size:
                    _, mtype, flags, _, length = _FRAME.unpack_from(buf)
                    size = _FRAME.size + length + (32 if flags & 1 else 0)  # an authenticated frame's tag
                    if len(buf) < size:
                        break
                    frame = bytes(buf[:size])
                    del buf[:size]
                    out = self.hook(direction, mtype, frame)
                    if out is None:
                        self.cut.set()
                        for s in (client, up):
                            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            s.close()
                        return
                    b.sendall(out)
        except OSError:
            pass

    def close(self):
        self.lsock.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass
        for t in self.threads:
            t.join(5)


def _small_pair():
    layout = {"pc.ram": 8 << 20}
    src = GuestRAM.create(layout)
    dst = GuestRAM.create(layout)
    fill(src, "mixed", 3)
    return src, dst


def _cleanup(*rams):
    for r in rams:
        r.close()
        r.unlink()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("drop", ["commit", "ack"])
def test_a_connection_lost_around_commit_is_reported_not_guessed(drop):
    """The control connection breaks as COMMIT passes (``commit``: before the destination reads it;
    ``ack``: after, so only the acknowledgement is lost). The source never says completed, never
    resumes the guest, and raises CommitUnknown; the destination owns the region exactly when it read COMMIT."""
    src_ram, dst_ram = _small_pair()
    cfg = MigrationConfig(channels=2, start_method="fork", timeout=3.0)

    def hook(direction, mtype, frame):
        if drop == "commit" and direction == "up" and mtype == T_COMMIT:
            return None
        if drop == "ack" and direction == "down" and mtype == T_COMMIT_ACK:
            return None
        return frame

    calls = []
    try:
        with Destination(dst_ram, config=cfg) as dst:
            relay = ControlRelay(dst.address, hook)
            try:
                with Source(src_ram, cfg) as src:
                    with pytest.raises(CommitUnknown):
                        src.migrate(
                            relay.address, pause=lambda: calls.append("pause"), resume=lambda: calls.append("resume")
                        )
                    assert src.status == "commit-unknown"
                    assert src.query()["status"] == "commit-unknown"
                assert calls == ["pause"]  # the guest is not resumed: the destination may own it
                assert relay.cut.is_set()
                if drop == "ack":
                    assert dst.wait(10).status == "completed" and dst.valid
                    assert np.array_equal(src_ram.view(0), dst_ram.view(0))
                else:
                    with pytest.raises(MigrationError):
                        dst.wait(10)
                    assert not dst.valid
            finally:
                relay.close()
    finally:
        _cleanup(src_ram, dst_ram)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["cancel", "close"])
def test_an_agent_stopped_right_after_the_source_returned_leaves_the_destination_committed(how):
    """The race seen with real agents: the destination's agent stops (cancel or close) the moment the
    source's migrate() returns. The source returns only on COMMIT_ACK, so the destination owns the region."""
    for attempt in range(5):
        src_ram, dst_ram = _small_pair()
        cfg = MigrationConfig(channels=2, start_method="fork")
        try:
            dst = Destination(dst_ram, config=cfg)
            try:
                with Source(src_ram, cfg) as src:
                    res = src.migrate(dst.address)
                    assert res.status == "completed"
                    if how == "cancel":
                        dst.cancel()
                    else:
                        dst.close()
                assert dst.status == "completed" and dst.valid, attempt
                assert dst.wait(5).verified
            finally:
                dst.close()
            assert np.array_equal(src_ram.view(0), dst_ram.view(0))
        finally:
            _cleanup(src_ram, dst_ram)


@pytest.mark.timeout(120)
def test_a_repair_that_cannot_converge_fails_and_resumes():
    """A relay corrupts every resent page: the repair passes run out, verification fails, the guest resumes."""
    src_ram, dst_ram = _small_pair()
    cfg = MigrationConfig(channels=2, start_method="fork", dirty_tracker="map", repair_passes=2)
    writes = []

    def foreign_write():
        # an unmarked write after round 0: the map tracker misses it, verification finds it
        src_ram.view(0)[4 * PS : 4 * PS + 8] = 0xAB
        writes.append(1)

    def hook(direction, mtype, frame):
        if direction == "up" and mtype == T_REPAIR_PAGES:
            b = bytearray(frame)
            b[-1] ^= 0xFF  # the last byte of the last page
            return bytes(b)
        return frame

    calls = []
    try:
        with Destination(dst_ram, config=cfg) as dst:
            relay = ControlRelay(dst.address, hook)
            try:
                with Source(src_ram, cfg) as src:

                    def pause():
                        foreign_write()
                        calls.append("pause")

                    with pytest.raises(VerificationError) as ei:
                        src.migrate(relay.address, pause=pause, resume=lambda: calls.append("resume"))
                    assert "after 2 repair passes" in str(ei.value)
                    assert ei.value.mismatches == {"pc.ram": [4]}
                    assert src.query()["status"] == "failed"
                assert calls == ["pause", "resume"]
                with pytest.raises(VerificationError):
                    dst.wait(10)
                assert not dst.valid and dst.query()["repair-passes"] == 2
            finally:
                relay.close()
    finally:
        _cleanup(src_ram, dst_ram)


@pytest.mark.timeout(120)
def test_a_foreign_write_is_repaired_at_switchover():
    """Without a relay the same unmarked write is resent once and the copy verifies byte for byte."""
    src_ram, dst_ram = _small_pair()
    cfg = MigrationConfig(channels=2, start_method="fork", dirty_tracker="map")
    try:
        with Destination(dst_ram, config=cfg) as dst, Source(src_ram, cfg) as src:

            def pause():
                src_ram.view(0)[[4 * PS + 9, 7 * PS, 2000 * PS - 1]] = [1, 2, 3]

            res = src.migrate(dst.address, pause=pause)
            assert (res.repaired_pages, res.repair_passes) == (3, 1)
            assert (src.query()["repaired-pages"], src.query()["repair-passes"]) == (3, 1)
            d = dst.wait(10)
            assert (d.repaired_pages, d.verified) == (3, True)
            assert dst.query()["repaired-pages"] == 3
        assert np.array_equal(src_ram.view(0), dst_ram.view(0))
    finally:
        _cleanup(src_ram, dst_ram)


# ---------------------------------------------------------------- stream connections


@pytest.mark.timeout(120)
@pytest.mark.parametrize("key", [None, b"k" * 32])
def test_before_commit_stream_reaches_the_destination(key):
    """What travels in before_commit arrives through the same port and admission, before COMMIT."""
    src_ram, dst_ram = _small_pair()
    cfg = MigrationConfig(channels=2, start_method="fork", auth_key=key)
    got = []
    order = []

    def on_stream(sock):
        data = b""
        while len(data) < 100_000:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        got.append(data)
        order.append(("stream", dst.status))
        sock.sendall(b"loaded")

    def before_commit(open_stream):
        with open_stream() as s:
            s.sendall(bytes(range(256)) * 390 + b"tail")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(16) == b"loaded"
        order.append(("before_commit", src.status))

    try:
        with Destination(dst_ram, config=cfg, on_stream=on_stream) as dst, Source(src_ram, cfg) as src:
            res = src.migrate(dst.address, before_commit=before_commit)
            assert res.status == "completed" and "before-commit" in res.downtime_phases
            assert dst.wait(10).verified
        assert got == [bytes(range(256)) * 390 + b"tail"]
        # the stream ran while the destination had not been committed yet
        assert order == [("stream", "device"), ("before_commit", "device")]
    finally:
        _cleanup(src_ram, dst_ram)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("handler", [True, False])
def test_a_failed_before_commit_fails_the_migration_and_resumes(handler):
    """before_commit raises (or the destination has no stream handler): no commit, the guest resumes."""
    src_ram, dst_ram = _small_pair()
    cfg = MigrationConfig(channels=2, start_method="fork")
    calls = []

    def before_commit(open_stream):
        s = open_stream()
        try:
            s.sendall(b"x")
            if handler:
                raise RuntimeError("device state refused")
            try:
                got = s.recv(1)  # a refused stream is closed at once (or reset: "x" was never read)
            except OSError:
                got = b""
            if got:
                raise AssertionError("stream not refused")
            raise RuntimeError("stream refused")
        finally:
            s.close()

    try:
        kwargs = {"on_stream": lambda sock: sock.recv(1)} if handler else {}
        with Destination(dst_ram, config=cfg, **kwargs) as dst, Source(src_ram, cfg) as src:
            with pytest.raises(MigrationError, match="before_commit failed: RuntimeError"):
                src.migrate(
                    dst.address, pause=lambda: calls.append("pause"), resume=lambda: calls.append("resume"),
                    before_commit=before_commit,
                )
            with pytest.raises(MigrationError):
                dst.wait(10)
            assert not dst.valid
        assert calls == ["pause", "resume"]
    finally:
        _cleanup(src_ram, dst_ram)


@pytest.mark.timeout(60)
def test_the_pause_costs_are_in_the_estimate_and_the_phases():
    """The result splits the downtime into phases that add up to it, and the estimate counts the final scan."""
    src_ram, dst_ram = _small_pair()
    cfg = MigrationConfig(channels=2, start_method="fork", dirty_tracker="scan")
    try:
        with Destination(dst_ram, config=cfg) as dst, Source(src_ram, cfg) as src:
            res = src.migrate(dst.address)
            dst.wait(10)
        phases = res.downtime_phases
        assert {"dirty-sync", "final-round", "destination-check", "commit"} <= set(phases)
        assert sum(phases.values()) <= res.downtime + 1e-3
        assert sum(phases.values()) >= 0.9 * res.downtime
        assert res.expected_downtime > 0
    finally:
        _cleanup(src_ram, dst_ram)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("patch_verify", [False, True])
def test_a_relay_without_the_key_cannot_change_what_lands(patch_verify):
    """With a key and no TLS, a relay changes a page on a data channel (and, in the second case, the
    VERIFY fingerprints too). The changed page is found and repaired over the authenticated control
    channel; a changed control frame fails the migration. Never 'verified' with the relay's bytes."""
    layout = {"pc.ram": 8 << 20}
    src_ram, dst_ram = GuestRAM.create(layout), GuestRAM.create(layout)
    fill(src_ram, "random", 5)
    cfg = MigrationConfig(channels=2, start_method="fork", auth_key=b"r" * 32)
    flipped = []

    def data_hook(index, direction, moved, data):
        at = 1_000_000 - moved  # inside the first packet's pages on the first data connection
        if index == 1 and direction == "up" and 0 <= at < len(data):
            data = bytearray(data)
            data[at] ^= 0x5A
            flipped.append(at)
            return bytes(data)
        return data

    def hook(direction, mtype, frame):
        if patch_verify and direction == "up" and mtype == 5:  # VERIFY
            b = bytearray(frame)
            b[40] ^= 1
            return bytes(b)
        return frame

    try:
        with Destination(dst_ram, config=cfg) as dst:
            relay = ControlRelay(dst.address, hook, data_hook)
            try:
                with Source(src_ram, cfg) as src:
                    if patch_verify:
                        with pytest.raises(MigrationError, match="mac"):
                            src.migrate(relay.address)
                        with pytest.raises(MigrationError, match="mac"):
                            dst.wait(10)
                        assert not dst.valid
                    else:
                        res = src.migrate(relay.address)
                        assert res.verified and res.repaired_pages >= 1
                        assert dst.wait(10).verified and dst.valid
                        assert np.array_equal(src_ram.view(0), dst_ram.view(0))
                assert flipped
            finally:
                relay.close()
    finally:
        _cleanup(src_ram, dst_ram)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracker", ["map", "scan"])
def test_the_source_regions_holes_are_never_read(tracker):
    """Pages a guest never wrote (holes of its file) travel as zero pages without being read:
    reading them would allocate them, and a scanning tracker would then scan them every round."""
    layout = {"pc.ram": 64 << 20}
    src_ram, dst_ram = GuestRAM.create(layout), GuestRAM.create(layout)
    try:
        src_ram.pages(0)[::64] = 5  # one page in 64 holds data
        before = os.stat(src_ram.blocks[0].path).st_blocks
        cfg = MigrationConfig(channels=2, start_method="fork", dirty_tracker=tracker)
        with Destination(dst_ram, config=cfg) as dst, Source(src_ram, cfg) as src:
            res = src.migrate(dst.address)
            assert dst.wait(10).verified and res.duplicate >= (64 << 20) // PS * 63 // 64
        assert os.stat(src_ram.blocks[0].path).st_blocks == before  # not one hole was allocated
        assert np.array_equal(src_ram.view(0), dst_ram.view(0))
    finally:
        _cleanup(src_ram, dst_ram)
