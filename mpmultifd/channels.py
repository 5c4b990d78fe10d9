"""The channel engine: a coordinator's worker processes, one per channel, as one group.

Every coordinator runs its channels through a :class:`ChannelGroup`: the
source's senders, a save's writers and a restore's loaders (each fed through
a shared-memory ring), and the destination's receivers (fed by their
sockets). The group

* starts a worker per channel (borrowed from a pool when there is one),
* waits on the workers' pipes and process sentinels together with the
  coordinator's own descriptors (a control socket, a wake-up pipe),
* turns their :mod:`~mpmultifd.messages` into channel state (ready, the last
  round at its barrier, end of stream) and their failures into typed errors,
  handed to one failure hook, which may repair the channel (reconnect it) or
  let the error end the run (the coordinator keeps that error),
* pushes batches into the rings, keeping the resend log a reconnected
  channel is replayed from, and swaps a replaced channel's handles without
  losing its counters,
* and stops, reaps and releases everything in one place.

What a round means (when to send SYNC, when the barrier passes) stays with
the coordinator's session; the group only moves batches and reports.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from typing import Any

import numpy as np

from .errors import MigrationError, RingClosed, RingTimeout, WorkerDied
from .messages import AtBarrier, Failed, Go, Log, Ready, Scanned, StreamEnded
from .processes import nudge_worker, reap_workers, start_worker
from .ring import KIND_STOP, Ring
from .worker import C_WIRE_BYTES, COUNTERS

__all__ = ["Channel", "ChannelGroup", "Batch"]

# a batch as pushed: (kind, block, round, packet number, pages); kept for resending
Batch = tuple[int, int, int, int, np.ndarray | None]


@dataclass(eq=False)
class Channel:
    """One channel's worker: its process, pipe, socket (None for file workers) and ring (None for receivers)."""

    index: int
    proc: Any
    conn: Any
    sock: socket.socket | None = None
    ring: Ring | None = None
    ready: bool = False  # the worker attached to its ring and segments
    synced: int = -1  # the last round this worker reported at its barrier (or ended)
    packets: int = 0  # packets a receiver counted in that round
    parked: bool = False  # a receiver waits at its barrier for Go
    done: bool = False  # the worker reported its end of stream
    exited: bool = False  # its process exit was seen
    generation: int = 0  # bumped when the channel is replaced
    reconnecting: bool = False  # left out of event handling while it is replaced
    awaiting_resume: bool = False  # reconnecting, and the peer has not admitted the new connection yet
    lost: bool = False  # the peer lost the new connection while it was being resent on
    packets_in_round: int = 0
    # every batch pushed since the last round the peer confirmed, for resending
    log: list[Batch] = field(default_factory=list)
    counter_base: dict[str, int] = field(default_factory=dict)  # counts of the workers it replaced
    progress_bytes: int = -1  # wire bytes at the last check, and when they last moved
    progress_at: float = field(default_factory=time.monotonic)

    @property
    def at_sync(self) -> int | None:
        """The round a receiver is parked at, waiting for Go (None while it is not)."""
        return self.synced if self.parked else None

    @property
    def handles(self) -> tuple[Any, Any, socket.socket | None]:
        return self.proc, self.conn, self.sock

    def queued(self) -> int:
        """Batches waiting in its ring (0 for a receiver)."""
        return len(self.ring) if self.ring is not None else 0

    def listening(self) -> bool:
        """Whether its pipe and sentinel are waited on: a finished worker's stay ready (no spinning)."""
        return not self.done and not self.reconnecting


FailureHook = Callable[[Channel, MigrationError], None]


def _raise(_: Channel, err: MigrationError) -> None:
    raise err


class ChannelGroup:
    """The workers of one coordinator, one per channel (see the module's docstring).

    ``what`` names the workers in errors ("channel", "restore worker").
    ``on_failure(channel, error)`` gets every error that names a channel: it
    returns if it repaired the channel, or raises. ``on_scanned(channel,
    message)`` gets the senders' scan reports. ``keep_log`` keeps every
    pushed batch until :meth:`confirm` (for resending after a reconnect).
    """

    def __init__(
        self,
        what: str = "worker",
        *,
        on_failure: FailureHook = _raise,
        on_scanned: Callable[[Channel, Scanned], None] | None = None,
        keep_log: bool = False,
    ) -> None:
        self.what = what
        self.channels: list[Channel] = []
        self.on_failure = on_failure
        self.on_scanned = on_scanned
        self.keep_log = keep_log
        # held while counters are read and while a ring is swapped or closed, so a reader on
        # another thread never meets a closed ring nor counts a retired worker twice
        self.lock = threading.Lock()
        self.final_counters: list[dict[str, int]] = []

    def __len__(self) -> int:
        return len(self.channels)

    def __iter__(self) -> Any:
        return iter(self.channels)

    # ---------------------------------------------------------------- starting

    def start(
        self,
        index: int,
        ctx: Any,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        name: str,
        pool: Any = None,
        *,
        ring: Ring | None = None,
        sock: socket.socket | None = None,
    ) -> Channel:
        """Start ``target(*args, conn)`` as channel ``index``'s worker and add it to the group.

        The ring and socket are the group's from here on: closed if the start fails.
        """
        try:
            proc, conn = start_worker(ctx, target, args, name, pool)
        except BaseException:
            if ring is not None:
                ring.close()
                ring.unlink()
            if sock is not None:
                sock.close()
            raise
        ch = Channel(index, proc, conn, sock, ring)
        self.channels.append(ch)
        return ch

    def add(self, ch: Channel) -> None:
        self.channels.append(ch)

    def remove(self, ch: Channel) -> None:
        """Forget a retired channel (its slot may be taken by a new one)."""
        if ch in self.channels:
            self.channels.remove(ch)

    def wait_ready(self, deadline: float, pump: Callable[[float], Any], workers: str = "workers") -> None:
        """Pump until every worker attached; then drop the rings' names (a crash leaves no ring behind)."""
        while not all(ch.ready for ch in self.channels):
            if time.monotonic() > deadline:
                raise WorkerDied(f"{workers} did not start in time")
            pump(0.1)
        for ch in self.channels:
            if ch.ring is not None:
                ch.ring.unlink()

    # ---------------------------------------------------------------- events

    def waitables(self) -> list[Any]:
        out: list[Any] = []
        for ch in self.channels:
            if ch.listening():
                out.append(ch.conn)
                if not ch.exited:
                    out.append(ch.proc.sentinel)
        return out

    def wait(self, extra: list[Any], timeout: float | None) -> list[Any]:
        """Wait up to ``timeout`` for a worker event or one of ``extra``; returns what is ready."""
        waitables = self.waitables() + extra
        if not waitables:
            if timeout:
                time.sleep(timeout)
            return []
        for x in extra:
            if isinstance(x, ssl.SSLSocket) and x.pending():
                timeout = 0  # decrypted bytes wait inside the TLS object, not on the socket
        ready = mp_wait(waitables, timeout)
        for x in extra:
            if isinstance(x, ssl.SSLSocket) and x.pending() and x not in ready:
                ready.append(x)
        return ready

    def handle_messages(self, ready: list[Any]) -> None:
        """Read the reports of the workers whose pipes are ready.

        ``ready`` may be stale by the time a channel's turn comes: a failure hook that
        reconnects one channel pumps events itself and may read the others' reports. So a
        pipe is read only if it still holds a message (``recv`` would block otherwise, and
        the coordinator with it).
        """
        for ch in list(self.channels):
            if ch.conn in ready and ch.listening() and ch.conn.poll(0):
                self._guarded(ch, self._read_message)

    def handle_exits(self, ready: list[Any]) -> None:
        """Blame the workers whose process ended before their end of stream."""
        for ch in list(self.channels):
            if ch.proc.sentinel in ready and ch.listening() and not ch.exited:
                self._guarded(ch, self._exited)

    def pump(self, timeout: float) -> None:
        """Wait for and handle worker events only (coordinators with no socket of their own)."""
        ready = self.wait([], timeout)
        self.handle_messages(ready)
        self.handle_exits(ready)

    def read_message(self, ch: Channel) -> None:
        """Handle one report of ``ch``'s worker now (it is known to be waiting)."""
        self._read_message(ch)

    def _guarded(self, ch: Channel, step: Callable[[Channel], None]) -> None:
        if ch not in self.channels:
            return  # retired by the failure hook of another channel's event
        try:
            step(ch)
        except MigrationError as e:
            if e.channel is None:
                raise
            self.on_failure(ch, e)

    def _exited(self, ch: Channel) -> None:
        # its last reports (say Scanned, then StreamEnded) may all still be in the pipe
        wait = 0.2
        while not ch.done and ch.conn.poll(wait):
            self._read_message(ch)
            wait = 0.0
        if not ch.done:
            ch.exited = True
            raise WorkerDied(f"{self.what} exited with code {ch.proc.exitcode}", channel=ch.index)

    def _read_message(self, ch: Channel) -> None:
        try:
            msg = ch.conn.recv()
        except (EOFError, OSError):
            if ch.done:
                return
            ch.proc.join(0.5)
            raise WorkerDied(f"{self.what} exited with code {ch.proc.exitcode}", channel=ch.index) from None
        if isinstance(msg, Log):
            msg.emit()
        elif isinstance(msg, Ready):
            ch.ready = True
        elif isinstance(msg, AtBarrier):
            ch.synced, ch.packets = msg.round, msg.packets
            ch.parked = ch.ring is None  # a receiver waits for Go; a sender goes on by itself
        elif isinstance(msg, StreamEnded):
            ch.synced, ch.packets = msg.round, msg.packets
            ch.done = True
        elif isinstance(msg, Scanned):
            if self.on_scanned is not None:
                self.on_scanned(ch, msg)
        elif isinstance(msg, Failed):
            raise msg.error(ch.index)
        else:
            raise MigrationError(f"{self.what} sent an unexpected {type(msg).__name__}", channel=ch.index)

    def release(self) -> None:
        """Let every receiver parked at its barrier go on to the next round."""
        for ch in self.channels:
            if ch.parked:
                ch.parked = False
                ch.conn.send(Go())

    # ---------------------------------------------------------------- batches

    def push(self, ch: Channel, batch: Batch, pump: Callable[[float], Any]) -> None:
        """Hand ``batch`` to ``ch``'s worker, pumping events while its ring is full.

        Returns early if the channel was replaced meanwhile: the replacement
        resends the batch from the log.
        """
        assert ch.ring is not None
        if self.keep_log and ch.sock is not None:
            ch.log.append(batch)
        gen = ch.generation
        while True:
            try:
                ch.ring.push(*batch, timeout=0.1)
                return
            except RingTimeout:
                pump(0)  # full ring: is anyone failing, or cancelling?
            except RingClosed:
                pump(0.5)
                if ch.generation == gen:
                    self.on_failure(ch, WorkerDied("worker stopped taking batches", channel=ch.index))
            if ch.generation != gen:
                return

    def confirm(self, rnd: int) -> None:
        """The peer holds every round up to ``rnd``: those batches need no resend."""
        for ch in self.channels:
            if ch.log and ch.log[0][2] <= rnd:
                ch.log = [b for b in ch.log if b[2] > rnd]

    def replace(self, ch: Channel, ring: Ring, sock: socket.socket | None, proc: Any, conn: Any) -> None:
        """Put a new worker in ``ch``'s place; its counters go on from the old one's."""
        with self.lock:
            old = self._counters_of([ch])[0]
            ch.counter_base = {name: value for name, value in old.items() if name != "channel"}
            old_ring, ch.ring = ch.ring, ring
            ch.sock, ch.proc, ch.conn = sock, proc, conn
            if old_ring is not None:
                old_ring.close()
        ch.generation += 1
        ch.exited = False

    def resend(self, ch: Channel, start: int, pump: Callable[[float], Any]) -> int:
        """Push again every logged batch of round ``start`` on; returns how many (stops early if the
        channel was replaced again or its new worker stopped: that replacement resends it all)."""
        assert ch.ring is not None
        ch.log = [b for b in ch.log if b[2] >= start]
        ch.synced = min(ch.synced, start - 1)
        ch.done = False
        ch.progress_bytes, ch.progress_at = -1, time.monotonic()
        gen = ch.generation
        for batch in list(ch.log):
            while True:
                try:
                    ch.ring.push(*batch, timeout=0.1)
                    break
                except RingTimeout:
                    pump(0)
                    if ch.generation != gen:
                        return -1
                except RingClosed:
                    return -1
        return len(ch.log)

    def stalled(self, timeout: float, busy: Callable[[Channel], bool]) -> list[Channel]:
        """Channels whose workers have work (``busy``) but moved no byte for ``timeout`` seconds."""
        now = time.monotonic()
        out = []
        for ch in self.channels:
            if ch.done or ch.reconnecting or ch.ring is None:
                continue
            sent = int(ch.ring.counters[C_WIRE_BYTES])
            if sent != ch.progress_bytes:
                ch.progress_bytes, ch.progress_at = sent, now
            elif not busy(ch):
                ch.progress_at = now
            elif now - ch.progress_at > timeout:
                out.append(ch)
        return out

    # ---------------------------------------------------------------- counters

    def counters(self, chans: list[Channel] | None = None) -> list[dict[str, int]]:
        """Each ring channel's counters (its workers' so far); the last ones after :meth:`shutdown`."""
        chans = self.channels if chans is None else chans
        if not chans:
            return [dict(c) for c in self.final_counters]
        with self.lock:
            return self._counters_of(chans)

    def wire_bytes(self) -> int:
        return sum(c["bytes"] for c in self.counters())

    def _counters_of(self, chans: list[Channel]) -> list[dict[str, int]]:
        out = []
        for ch in chans:
            base = ch.counter_base
            ring = ch.ring
            # a ring is closed only at teardown (under the lock): its worker's counters are gone,
            # and what is left is the base of the workers before it
            c = None if ring is None or ring.closed else ring.counters
            out.append(
                {
                    "channel": ch.index,
                    **{name: (int(c[i]) if c is not None else 0) + base.get(name, 0) for name, i in COUNTERS.items()},
                }
            )
            del c
        return out

    # ---------------------------------------------------------------- teardown

    def retire(self, ch: Channel) -> None:
        """Stop and reap one worker whose connection broke or is replaced; its slot stays."""
        if ch.ring is not None and not ch.done:
            try:
                ch.ring.try_push(KIND_STOP, 0, 0, 0, None)
            except RingClosed:
                pass
        nudge_worker(ch.conn, ch.sock)
        if ch.ring is not None:
            ch.ring.close_producer()
        reap_workers([ch.handles])

    def shutdown(self) -> None:
        """Stop every worker, reap them, close sockets and release rings: every run ends here."""
        chans, self.channels = self.channels, []
        if not chans:
            return
        self.final_counters = self.counters(chans) if any(ch.ring is not None for ch in chans) else []
        for ch in chans:
            if ch.ring is not None:
                if not ch.done:
                    try:
                        ch.ring.try_push(KIND_STOP, 0, 0, 0, None)
                    except RingClosed:
                        pass  # the worker already left
                    nudge_worker(ch.conn, ch.sock)
                ch.ring.close_producer()
            elif ch.proc.is_alive():
                nudge_worker(ch.conn, ch.sock)
        reap_workers([ch.handles for ch in chans])
        for ch in chans:
            if ch.ring is None:
                continue
            if ch.proc.exitcode is not None:
                ch.proc.close()
            with self.lock:
                ch.ring.close()
            ch.ring.unlink()
