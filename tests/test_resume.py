"""A data connection cut mid-migration by a relay the test controls: resumed, or failed cleanly."""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest

from mpmultifd import ChannelError, Destination, GuestRAM, MigrationConfig, MigrationError, Source
from mpmultifd.testing import DirtyingWriter, fill


class Relay:
    """Forwards every connection to ``upstream``; cuts chosen connections (by accept order) with a reset.

    ``cuts`` maps a connection's accept index (0 = control, 1 = channel 0, ...)
    to the number of source bytes after which it is reset.
    """

    def __init__(self, upstream, cuts: dict[int, int]):
        self.upstream = upstream
        self.cuts = dict(cuts)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(32)
        self.address = self.lsock.getsockname()
        self.accepted = 0
        self.cut_done: list[int] = []
        self.stop = threading.Event()
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self):
        self.lsock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                client, _ = self.lsock.accept()
            except OSError:
                continue
            index = self.accepted
            self.accepted += 1
            up = socket.create_connection(self.upstream)
            self.socks += [client, up]
            limit = self.cuts.get(index)
            for a, b, lim in ((client, up, limit), (up, client, None)):
                t = threading.Thread(target=self._pump, args=(a, b, lim, index, client, up), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, a, b, limit, index, client, up):
        moved = 0
        try:
            while not self.stop.is_set():
                data = a.recv(65536)
                if not data:
                    b.shutdown(socket.SHUT_WR)
                    return
                if limit is not None and moved + len(data) >= limit:
                    b.sendall(data[: max(0, limit - moved)])
                    for s in (client, up):  # reset both ends, as a broken network path would
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.close()
                    self.cut_done.append(index)
                    return
                b.sendall(data)
                moved += len(data)
        except OSError:
            pass

    def close(self):
        self.stop.set()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass
        self.lsock.close()
        for t in self.threads:
            t.join(5)


SIZE = 24 << 20


def cfg(retries):
    return MigrationConfig(channels=2, start_method="forkserver", timeout=5.0, channel_retries=retries, downtime_limit=0.05)


def test_cut_channel_is_resumed_and_ends_byte_identical():
    with GuestRAM.create({"a": SIZE, "b": 4 << 20}) as s, GuestRAM.create({"a": SIZE, "b": 4 << 20}) as d:
        fill(s, "random", 1)
        with Destination(d, config=cfg(2)) as dst:
            relay = Relay(dst.address, {2: 3 << 20})  # channel 1 is reset after 3 MiB
            try:
                with DirtyingWriter(s.name, seed=3, start_method="forkserver") as writer, Source(s, cfg(2)) as src:
                    res = src.migrate(relay.address, pause=writer.pause)
                    q = src.query()
                assert dst.wait(10).verified
            finally:
                relay.close()
        assert relay.cut_done == [2]
        assert res.verified and q["reconnected-channels"] == 1
        assert all(np.array_equal(s.view(b.name), d.view(b.name)) for b in s.blocks)
        assert dst.valid


def test_cut_channel_without_resume_fails_cleanly():
    with GuestRAM.create({"a": SIZE}) as s, GuestRAM.create({"a": SIZE}) as d:
        fill(s, "random", 2)
        with Destination(d, config=cfg(0)) as dst:
            relay = Relay(dst.address, {2: 3 << 20})
            try:
                with Source(s, cfg(0)) as src:
                    t0 = time.monotonic()
                    with pytest.raises(ChannelError):
                        src.migrate(relay.address)
                    assert time.monotonic() - t0 < 15
                    assert src.status == "failed"
                with pytest.raises(MigrationError):
                    dst.wait(15)
                assert not dst.valid
            finally:
                relay.close()


def test_spent_retry_budget_fails_cleanly():
    with GuestRAM.create({"a": SIZE}) as s, GuestRAM.create({"a": SIZE}) as d:
        fill(s, "random", 3)
        with Destination(d, config=cfg(1)) as dst:
            relay = Relay(dst.address, {2: 2 << 20, 3: 1 << 20})  # the reconnection is cut too
            try:
                with Source(s, cfg(1)) as src:
                    with pytest.raises(MigrationError, match="retry budget|broke|reset|closed|receiver exited"):
                        src.migrate(relay.address)
                with pytest.raises(MigrationError):
                    dst.wait(15)
                assert not dst.valid
            finally:
                relay.close()
