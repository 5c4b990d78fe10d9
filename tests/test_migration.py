"""End to end: real worker processes, real sockets on loopback, a live writer."""

from __future__ import annotations

import math
import os
import socket
import time

import numpy as np
import pytest

from mpmultifd import (
    ConfigError,
    Destination,
    GuestRAM,
    MigrationConfig,
    MigrationError,
    Source,
)
from mpmultifd.testing import DirtyingWriter, RemoteDestination, fill
from mpmultifd.wire import (
    CONTROL_CHANNEL,
    FLAG_EOS,
    FLAG_SYNC,
    KIND_CONTROL,
    KIND_DATA,
    BlockSpec,
    Commit,
    Complete,
    Config,
    ConfigAck,
    ControlDecoder,
    DataHeaderEncoder,
    Hello,
    Result,
    RoundAck,
    RoundEnd,
    encode_control,
    encode_hello,
)

BLOCKS = {"pc.ram": 24 << 20, "vga.vram": 8 << 20}
PS = 4096


def run_live_migration(start_method: str, config: MigrationConfig, *, seed: int = 1, content: str = "half-zero"):
    """Migrate a two-block guest that a writer process keeps dirtying, to a destination in another process."""
    with GuestRAM.create(BLOCKS) as src_ram, GuestRAM.create(BLOCKS) as dst_ram:
        fill(src_ram, content, seed)
        resumes = []
        with RemoteDestination(dst_ram.name, config, start_method=start_method) as dest, DirtyingWriter(
            src_ram.name, seed=seed + 1, start_method=start_method
        ) as writer:
            with Source(src_ram, config) as src:
                result = src.migrate(dest.address, pause=writer.pause, resume=lambda: resumes.append(1))
                final_query = src.query()
            dest_result = dest.result()
            same = {b.name: bool(np.array_equal(src_ram.view(b.name), dst_ram.view(b.name))) for b in src_ram.blocks}
            return result, final_query, (dest_result, dest.valid), same, writer.pauses, resumes


def test_live_writer_four_channels_two_blocks(start_method):
    config = MigrationConfig(
        channels=4, start_method=start_method, downtime_limit=0.005, max_rounds=5, stall_downtime_limit=math.inf
    )
    result, query, dest_report, same, pauses, resumes = run_live_migration(start_method, config)
    dest_result, dest_valid = dest_report
    assert dest_valid is True  # the destination presents the region as valid
    assert dest_result.verified is True
    assert same == {"pc.ram": True, "vga.vram": True}
    assert pauses == 1 and resumes == []
    assert result.status == "completed" and result.verified is True
    assert result.rounds >= 2
    total_pages = sum(BLOCKS.values()) // PS
    # the writer re-dirtied pages, so some were sent more than once
    assert result.normal + result.duplicate > total_pages
    assert result.duplicate > 0, result  # half the guest is zero pages
    assert query["status"] == "completed"
    assert query["ram"]["dirty-sync-count"] >= 2
    assert query["downtime"] >= 0
    assert len(query["channels"]) == 0 or all(c["packets"] > 0 for c in query["channels"])
    # every channel carried traffic
    assert len(result.per_channel) == 4 and all(c["packets"] > 0 for c in result.per_channel)


def test_zero_page_none_sends_everything_as_data():
    config = MigrationConfig(
        channels=2, zero_page="none", start_method="fork", downtime_limit=0.05, stall_downtime_limit=math.inf
    )
    result, _, dest_report, same, _, _ = run_live_migration("fork", config, seed=5)
    assert dest_report[1] is True and all(same.values())
    assert result.duplicate == 0
    assert result.normal >= sum(BLOCKS.values()) // PS


def test_query_is_live_during_migration():
    """query() from another thread sees counters grow while the migration runs."""
    import threading

    config = MigrationConfig(
        channels=2, start_method="forkserver", downtime_limit=0.005, max_rounds=6, stall_downtime_limit=math.inf
    )
    seen = []
    with GuestRAM.create({"ram": 32 << 20}) as src_ram, GuestRAM.create({"ram": 32 << 20}) as dst_ram:
        fill(src_ram, "random", 3)
        with RemoteDestination(dst_ram.name, config, start_method="fork") as dest, Source(src_ram, config) as src:
            done = threading.Event()

            def poll():
                while not done.is_set():
                    seen.append(src.query())
                    time.sleep(0.002)

            t = threading.Thread(target=poll)
            t.start()
            try:
                result = src.migrate(dest.address)
            finally:
                done.set()
                t.join()
            assert dest.result().verified
    statuses = [q["status"] for q in seen]
    assert "active" in statuses
    transferred = [q["ram"]["transferred"] for q in seen]
    assert transferred == sorted(transferred)  # monotonic
    assert result.transferred >= 32 << 20


def test_config_mismatch_refused_before_any_page_moves():
    with GuestRAM.create({"a": 1 << 20}) as src_ram, GuestRAM.create({"a": 2 << 20}) as dst_ram:
        dst_ram.view("a")[:] = 7
        with Destination(dst_ram, config=MigrationConfig(start_method="fork")) as dst:
            with Source(src_ram, MigrationConfig(start_method="fork")) as src:
                with pytest.raises(MigrationError, match="blocks"):
                    src.migrate(dst.address)
                assert src.status == "failed"
            with pytest.raises(MigrationError, match="blocks"):
                dst.wait(10)
            assert not dst.valid
        assert (dst_ram.view("a") == 7).all()


def test_unknown_method_refused_locally():
    with GuestRAM.create({"a": 1 << 20}) as ram:
        with Source(ram, MigrationConfig(compression="nope")) as src:
            with pytest.raises(ConfigError, match="nope"):
                src.migrate(("127.0.0.1", 9))


def test_invalid_configs_rejected():
    for kwargs in (
        {"channels": 0},
        {"channels": 1.5},
        {"zero_page": "legacy"},
        {"zerocopy": "maybe"},
        {"downtime_limit": 0},
        {"max_rounds": 0},
        {"verify": "yes"},
        {"packet_pages": 1024},
        {"ring_slots": 3},
        {"start_method": "thread"},
    ):
        with pytest.raises(ConfigError):
            MigrationConfig(**kwargs)


# --------------------------------------------------------------------------- invariant 1


def _sendall(sock, data):
    sock.sendall(bytes(data))


def _admit(address, hello):
    """Connect and pass admission without a key: read the greeting, send the hello, read the welcome."""
    from mpmultifd import auth

    sock = socket.create_connection(address)
    sock.settimeout(10)
    greeting = auth.decode_greeting(sock.recv(auth.GREETING_SIZE, socket.MSG_WAITALL))
    assert not greeting.auth_required
    sock.sendall(encode_hello(hello))
    auth.decode_welcome(sock.recv(auth.WELCOME_SIZE, socket.MSG_WAITALL))
    return sock


def test_newer_copy_wins_across_channels():
    """Round 0's copy of a page travels on a delayed channel 0, round 1's on channel 1: round 1's must win.

    The test speaks the wire protocol itself, so it decides exactly which
    channel carries which copy and when: channel 1 sends its SYNC and the
    round-1 copy *before* channel 0 sends the round-0 copy.
    """
    pp = 128
    sid = os.urandom(16)
    old = np.full(PS, 0x11, dtype=np.uint8)
    new = np.full(PS, 0x22, dtype=np.uint8)
    page = 5
    with GuestRAM.create({"ram": 64 * PS}) as ram:
        cfg = MigrationConfig(start_method="fork", timeout=10)
        with Destination(ram, config=cfg) as dst:
            ctrl = _admit(dst.address, Hello(KIND_CONTROL, sid, CONTROL_CHANNEL, 2))
            chans = []
            try:
                conf = Config(sid, PS, 2, pp, (BlockSpec("ram", 64 * PS),), "none", {}, "multifd", False)
                _sendall(ctrl, encode_control(conf))
                dec = ControlDecoder()

                def next_msg():
                    while True:
                        m = dec.next_message()
                        if m is not None:
                            return m
                        ctrl.settimeout(10)
                        data = ctrl.recv(65536)
                        assert data, "destination closed the control channel"
                        dec.feed(data)

                assert isinstance(next_msg(), ConfigAck)
                for i in range(2):
                    chans.append(_admit(dst.address, Hello(KIND_DATA, sid, i, 2)))
                enc = DataHeaderEncoder(pp)
                offs = np.array([page * PS])
                # channel 1: nothing in round 0, then SYNC, then the NEW copy in round 1, then EOS
                _sendall(chans[1], enc.encode(flags=FLAG_SYNC, round=0, packet_num=2))
                _sendall(chans[1], enc.encode(round=1, packet_num=3, normal_offsets=offs, payload_len=PS))
                _sendall(chans[1], new.tobytes())
                _sendall(chans[1], enc.encode(flags=FLAG_EOS, round=1, packet_num=5))
                _sendall(ctrl, encode_control(RoundEnd(0, (1, 0))))
                time.sleep(0.5)  # channel 0 is late: the round-1 copy is already at the destination
                assert (ram.pages("ram")[page] == 0).all(), "round-1 copy landed before round 0 finished"
                # channel 0, delayed: the OLD copy in round 0, then SYNC, then EOS
                _sendall(chans[0], enc.encode(round=0, packet_num=1, normal_offsets=offs, payload_len=PS))
                _sendall(chans[0], old.tobytes())
                _sendall(chans[0], enc.encode(flags=FLAG_SYNC, round=0, packet_num=2))
                _sendall(chans[0], enc.encode(flags=FLAG_EOS, round=1, packet_num=4))
                _sendall(ctrl, encode_control(Complete(1, (0, 1))))
                msgs = [next_msg(), next_msg()]
                assert isinstance(msgs[0], RoundAck) and msgs[0].round == 0
                assert isinstance(msgs[1], Result) and msgs[1].ok, msgs[1]
                assert not dst.valid  # not before the source commits
                _sendall(ctrl, encode_control(Commit()))
                res = dst.wait(10)
                assert res.rounds == 2
                assert (ram.pages("ram")[page] == new).all()
                assert dst.valid
            finally:
                for s in chans:
                    s.close()
                ctrl.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stale", [False, True])
def test_prefaulted_destination(stale):
    """prefault allocates the region up front; pages that were holes still count as zero, stale data is still zeroed."""
    with GuestRAM.create(BLOCKS) as src_ram, GuestRAM.create(BLOCKS) as dst_ram:
        try:
            fill(src_ram, "half-zero", 21)
            if stale:
                fill(dst_ram, "random", 22)  # a region that held another guest
            cfg = MigrationConfig(channels=2, start_method="forkserver")
            with Destination(dst_ram, config=cfg, prefault=True) as dst, Source(src_ram, cfg) as src:
                result = src.migrate(dst.address)
                assert dst.wait(30).verified and result.verified
            for b in dst_ram.blocks:
                assert np.array_equal(src_ram.view(b.index), dst_ram.view(b.index)), b.name
                assert os.stat(b.path).st_blocks * 512 >= b.size  # every page allocated
        finally:
            src_ram.unlink()
            dst_ram.unlink()
