"""The channel engine without processes: pipes and handles, driven by hand."""

from __future__ import annotations

import multiprocessing
import threading

from mpmultifd.channels import Channel, ChannelGroup
from mpmultifd.errors import ChannelBroken, MigrationError
from mpmultifd.messages import AtBarrier, Failed, Ready, StreamEnded


class _Proc:
    """A stand-in for a worker process that never exits."""

    def __init__(self) -> None:
        self._r, self._w = multiprocessing.Pipe(duplex=False)
        self.sentinel = self._r.fileno()
        self.exitcode = None

    def is_alive(self) -> bool:
        return True


def _pair(index: int):
    ours, theirs = multiprocessing.Pipe()
    return Channel(index, _Proc(), ours), theirs


def test_a_failure_hook_that_reads_other_channels_does_not_leave_the_loop_blocked():
    """A reconnect inside the failure hook pumps events and may read the other channels' reports:
    the loop that called it must not then block reading a pipe it thought was ready."""
    group = ChannelGroup("worker")
    ch0, w0 = _pair(0)
    ch1, w1 = _pair(1)
    group.add(ch0)
    group.add(ch1)
    w0.send(Failed.of(ChannelBroken("reset")))
    w1.send(AtBarrier(3))

    def repair(ch: Channel, err: MigrationError) -> None:
        assert ch is ch0 and isinstance(err, ChannelBroken) and err.channel == 0
        group.pump(0)  # what a reconnect does while it waits: ch1's report is read here

    group.on_failure = repair
    ready = group.wait([], 1.0)
    assert ch0.conn in ready and ch1.conn in ready
    done = threading.Event()

    def run() -> None:
        group.handle_messages(ready)
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5.0)
    assert done.is_set(), "handle_messages blocked on a pipe whose report a nested pump had already read"
    assert ch1.synced == 3  # read once, by the nested pump


def test_messages_become_channel_state_and_a_receiver_waits_for_go():
    group = ChannelGroup("receiver")
    ch, w = _pair(0)
    group.add(ch)
    for msg in (Ready(), AtBarrier(0, 7)):
        w.send(msg)
        group.pump(1.0)
    assert ch.ready and ch.parked and ch.at_sync == 0 and ch.packets == 7
    group.release()
    assert not ch.parked and w.poll(1.0) and type(w.recv()).__name__ == "Go"
    w.send(StreamEnded(1, 4))
    group.pump(1.0)
    assert ch.done and ch.synced == 1 and ch.packets == 4
