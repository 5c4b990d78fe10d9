"""The destination side: accept the session, run receiver workers, enforce the round barrier."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import wait as mp_wait
from typing import Any

import numpy as np

from ._shm import Segment, unique_name
from .channels import Channel, ChannelGroup
from .config import MigrationConfig
from .control import ControlConnection
from .errors import (
    ChannelBroken,
    ChannelError,
    ConfigError,
    MigrationCancelled,
    MigrationError,
    PeerFailed,
    RemoteProtocolError,
    VerificationError,
)
from .listener import Listener
from .methods import get_method
from .pageprint import fingerprint_extents, fingerprint_rows, key_from_seed, session_seed, split_ranges
from .pool import WorkerPool
from .prepared import Prefaulter, allocated_pages
from .processes import JOIN_GRACE, mp_context, start_worker, worker_start_method
from .ram import GuestRAM, file_data_extents
from .session import DestinationSession, classify_failure, tell_peer
from .stats import EventHub, MigrationResult, RestoreResult
from .transport import Address
from .wire import (
    KIND_CONTROL,
    KIND_STREAM,
    MAX_CONTROL_BODY,
    MAX_REPAIR_PAGES,
    Cancel,
    ChannelLost,
    Commit,
    CommitAck,
    Complete,
    Config,
    ConfigAck,
    ControlDecoder,
    ControlMac,
    ErrorMessage,
    Repair,
    RepairDone,
    RepairPages,
    Result,
    Resume,
    RoundAck,
    repair_pages_body_limit,
    verify_body_limit,
)
from .worker import (
    COUNTERS,
    STATS_WORDS,
    PageRecords,
    WorkerSpec,
    received_offsets,
    receiver_main,
)

__all__ = ["Destination"]

log = logging.getLogger("mpmultifd.destination")

_MAX_MISMATCHES_REPORTED = 32


def verify_threads(channels: int) -> int:
    """Threads a destination fingerprints its whole region with (a top-up's starting point)."""
    return max(1, min(channels, os.cpu_count() or 1))




class Destination:
    """Receives one migration into a :class:`GuestRAM`; listens as soon as it is made.

    The region's blocks must have the same names, sizes and page size as the
    source's. ``wait()`` returns the :class:`MigrationResult` once every
    channel reached end of stream and (with ``verify``) the fingerprints
    matched; until then, and after any failure (``valid`` is ``False``), the
    region must not be treated as migrated.

    ``prefault=True`` allocates the region's memory in a background thread as
    soon as the destination is made (``posix_fallocate`` of every block), so
    that receiving writes into allocated pages, which costs about half as
    much (``tools/bench_receive.py``); the pages that were holes before still
    count as zero, so zero pages are not written. A migration that arrives
    before the allocation ends waits for it. The region then takes its full
    size in memory, zero pages included. ``pool`` lends the receiver workers.

    ``prepare_receivers=True`` (with ``prefault`` and a ``pool``) also
    prepares ``config.channels`` receivers ahead: pool workers that map every
    page of the region into their own page tables once it is allocated, then
    wait for their channel and receive raw pages straight into the mapping,
    with no copy in user space and no page fault
    (``query()["prepared-receivers"]``). Each prepared worker spends about
    0.3 s of CPU per GiB of region before the migration, and keeps 2 MiB of
    page tables per GiB until it ends; :meth:`wait_prepared` waits for them.

    ``on_stream(sock)`` receives every stream connection the source opens
    during the session (``Source.migrate(..., before_commit=...)``), admitted
    like the channels (auth key, TLS), each in a thread of its own; the
    handler owns the socket. While one runs, the destination keeps waiting for
    COMMIT. Without a handler, stream connections are refused.

    Events, as the source's (``on_event=callback`` or :meth:`events`):
    ``{"event": "MIGRATION", "status": ...}`` on every status change and
    ``{"event": "MIGRATION_PASS", "pass": n, "round": r, ...}`` each time a
    round passes the barrier.

    The region is the destination's from the moment COMMIT arrives: ``wait()``
    then returns the result and neither ``cancel()`` nor ``close()`` can undo
    it; COMMIT is acknowledged only after that, so a source that saw the
    acknowledgement knows the destination owns the region.
    """

    def __init__(
        self,
        ram: GuestRAM,
        listen: Address = ("127.0.0.1", 0),
        config: MigrationConfig | None = None,
        *,
        pool: WorkerPool | None = None,
        prefault: bool = False,
        prepare_receivers: bool = False,
        on_stream: Callable[[socket.socket], Any] | None = None,
        on_event: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.ram = ram
        self._events = EventHub(on_event)
        self.config = config if config is not None else MigrationConfig()
        self._pool = pool if self.config.tls is None else None  # a TLS session cannot be handed over
        if prepare_receivers and (pool is None or not prefault or self.config.tls is not None):
            raise ConfigError(
                "prepare_receivers: needs prefault=True and a pool, and no TLS (prepared receivers are "
                "pool workers that populate the allocated region; a TLS session cannot be handed to them)"
            )
        # the accepting side: listening socket, admission handshakes, admitted connections
        self._listener = Listener(listen, self.config, self._wake_for_hello)
        self.address: Any = self._listener.address
        self._pending = self._listener.pending  # handshakes in progress (read by tests and diagnostics)
        self._drops = self._listener.drops
        self._status = "setup"
        self._valid = False
        self._result: MigrationResult | None = None
        self._error: MigrationError | None = None
        self._done = threading.Event()
        self._settled = threading.Event()  # the outcome is known: set at COMMIT, or at the end of a failure
        self._cancel_requested = False
        self._closing = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._session: Config | None = None
        # the receiver workers, one per data channel of the session
        self._group = ChannelGroup("receiver", on_failure=self._receiver_failed)
        self._names_dropped = False  # every receiver attached and the segments' names unlinked
        self._final_counters: list[dict[str, int]] = []
        self._ctl: ControlConnection | None = None  # the control connection, once the session began
        self._dsession: DestinationSession | None = None  # the session's rules, from its CONFIG on
        self._control: socket.socket | None = None
        self._received: Segment | None = None
        self._held: PageRecords | None = None  # fingerprints of what each page holds, written by the receivers
        self._verify_key: np.ndarray | None = None
        self._stats: Segment | None = None
        self._t_start = time.monotonic()
        self._t_end: float | None = None
        self._rounds = 0
        self._rejected = 0  # admitted connections no session claimed (the listener counts the rest)
        self._retries_left = 0
        self._broken: dict[int, float] = {}  # channel -> deadline for its reconnection
        self._connected: set[int] = set()
        self._on_stream = on_stream
        self._streams: list[tuple[threading.Thread, socket.socket]] = []
        self._committed = False
        self._repaired_pages = 0
        self._repair_passes = 0
        # prefault: allocate the region's memory now, while no migration needs the CPU;
        # the holes found first still count as known-zero pages
        self._prepared = Prefaulter(ram, self._pool, self.config.channels, prepare_receivers)
        if prefault:
            self._prepared.start()
        self._restore_lock = threading.Lock()
        self._restored_id: bytes | None = None  # the save this region was restored from
        self._coordinator = threading.Thread(target=self._run, name="mpmultifd-destination", daemon=True)
        if self._pool is None and worker_start_method(self.config) == "forkserver":
            from .processes import start_forkserver

            start_forkserver()  # its imports (0.3-0.6 CPU-s) run now, before the source arrives
        self._listener.start()
        self._coordinator.start()

    # ------------------------------------------------------------------ public

    @property
    def status(self) -> str:
        """QEMU's status word for the receiving side: setup, active, device, completed, failed,
        cancelling, cancelled."""
        return self._status

    @property
    def valid(self) -> bool:
        """True only once the region arrived whole (and verified, when verification is on)."""
        return self._valid

    def wait(self, timeout: float | None = None) -> MigrationResult:
        """Block until the outcome is known (COMMIT arrived, or the migration failed); returns the result or raises.

        Raises :class:`TimeoutError` if ``timeout`` seconds pass first (the
        migration goes on).
        """
        # returns at COMMIT: the receivers are reaped afterwards, off the caller's critical path
        if not self._settled.wait(timeout):
            raise TimeoutError(f"migration still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def events(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Iterate over events as they happen (``MIGRATION`` on every status change,
        ``MIGRATION_PASS`` each time a round passes the barrier); ends after a final
        status, or when ``timeout`` seconds pass without one."""
        return self._events.subscribe(timeout)

    def _set_status(self, status: str) -> None:
        if self._status != status:
            log.info("migration status %s -> %s", self._status, status)
            self._status = status
            self._events.emit("MIGRATION", status=status)

    def wait_prepared(self, timeout: float | None = None) -> bool:
        """Wait until ``prefault``'s allocation (and, with a pool, the prepared receivers) is done.

        Returns ``False`` if ``timeout`` seconds pass first; ``True`` at once
        without ``prefault``. A migration that arrives earlier simply waits.
        """
        return self._prepared.join(timeout)

    def cancel(self) -> None:
        """Stop receiving; idempotent, safe from any thread or a signal handler."""
        if self._committed:
            return  # the region is ours: nothing left to cancel
        self._cancel_requested = True
        if self._status in ("setup", "active", "device"):
            self._status = "cancelling"  # no event from here: this may run in a signal handler
        try:
            os.write(self._wake_w, b"c")
        except OSError:
            pass

    def restore(
        self, path: str | os.PathLike[str], *, verify: bool = True, direct: bool = False
    ) -> RestoreResult:
        """Fill this destination's region from a save file, before a migration arrives.

        Uses the configured ``channels`` workers, each reading runs of pages
        with ``os.preadv`` straight into the shared RAM; with ``verify``,
        every page is checked against the digests the save recorded. Raises
        :class:`SaveFileError` (naming the field) for an incomplete,
        truncated, corrupted or mismatched file. Afterwards the source that
        wrote the file can send just what changed since
        (``Source.migrate(..., top_up=True)``); this destination refuses a
        top-up from any other save.
        """
        from .checkpoint import restore

        self._prepared.join()
        with self._restore_lock:
            if self._session is not None or self._closing:
                raise MigrationError("restore: a migration already reached this destination; restore before it starts")
            self._restored_id = None
            result, save_id = restore(path, self.ram, self.config, verify=verify, direct=direct, pool=self._pool)
            self._restored_id = save_id
            return result

    def query(self) -> dict[str, Any]:
        """Counters of the receiving side, shaped like the source's ``query()``."""
        per = self._counters()
        end = self._t_end if self._t_end is not None else time.monotonic()
        return {
            "status": self._status,
            "total-time": int((end - self._t_start) * 1000),
            "ram": {
                "transferred": sum(c["bytes"] for c in per),
                "normal": sum(c["normal"] for c in per),
                "duplicate": sum(c["duplicate"] for c in per),
                "total": self.ram.total_size,
                "page-size": self.ram.page_size,
            },
            "rounds": self._rounds,
            "repaired-pages": self._repaired_pages,
            "repair-passes": self._repair_passes,
            "prepared-receivers": self._prepared.used,
            "rejected-connections": self._rejected + self._listener.rejected,
            "authentication-failures": self._listener.auth_failures,
            "channels": per,
        }

    def close(self) -> None:
        """Stop everything and release workers and segments; works while ``wait()`` blocks elsewhere."""
        self._closing = True
        self._prepared.stop()
        self._prepared.join()
        if not self._done.is_set():
            self.cancel()
        self._coordinator.join(self.config.timeout + 2 * JOIN_GRACE)
        self._listener.close(2.0)  # also wakes the accept loop out of its poll at once
        for thread, _ in self._streams:
            thread.join(JOIN_GRACE)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> Destination:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ accepting

    def _wake_for_hello(self) -> None:
        """The listener admitted a connection: wake the coordinator to claim it."""
        os.write(self._wake_w, b"h")

    # ------------------------------------------------------------------ the run

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._serve()
        except BaseException as exc:
            error = exc
        finally:
            self._finish(error)

    def _serve(self) -> None:
        cfg = self.config
        # 1. the control connection and the session's configuration
        while self._control is None:
            self._wait(None)
            self._take_incoming(accept_data=False)
        key = cfg.auth_key
        # with a key every control frame is authenticated, from CONFIG on (the hello's proof binds the session)
        mac = ControlMac(key, self._control_hello.session_id, "destination") if key is not None else None
        decoder = ControlDecoder(max_verify=MAX_CONTROL_BODY, mac=mac)  # no VERIFY is due before the session is known
        # the session's rules: CONFIG first, then rounds, COMPLETE, VERIFY, repairs, COMMIT
        self._dsession = DestinationSession(tuple(b.npages for b in self.ram.blocks))
        self._ctl = ControlConnection(self._control, "the source", self._dsession, decoder=decoder, mac=mac)
        msg = self._next_message(time.monotonic() + cfg.timeout)
        assert isinstance(msg, Config)  # the session refused anything else
        with self._restore_lock:  # a restore still running finishes first
            try:
                self._check_config(msg)
            except MigrationError as e:
                self._send(ErrorMessage("config-refused", str(e)))
                raise
            self._session = msg
        ctl = self._ctl
        ctl.decoder.max_verify = verify_body_limit(max(b.npages for b in self.ram.blocks))
        ctl.decoder.max_repair = repair_pages_body_limit(self.ram.page_size)
        self._retries_left = msg.channel_retries
        self._make_segments(msg)
        self._send(ConfigAck())
        self._set_status("active")
        log.info("session %s: %d channels, method %s", msg.session_id.hex(), msg.channels, msg.method)
        # 2. data channels, rounds and the final result
        self._serve_session(msg)

    def _check_config(self, c: Config) -> None:
        ram = self.ram
        # docs/protocol.md: CONFIG's session equals the control hello's (the one a key proof is bound to)
        if c.session_id != self._control_hello.session_id:
            raise RemoteProtocolError("session: CONFIG names another session than the control hello", field="session")
        if c.page_size != ram.page_size:
            raise ConfigError(f"page_size: source uses {c.page_size}, this region {ram.page_size}")
        if c.channels > self.config.channels:
            # each channel costs a receiver process here: the source cannot ask for more than we allow
            raise ConfigError(
                f"channels: the source asks for {c.channels} channels, this destination allows at most "
                f"{self.config.channels} (its MigrationConfig(channels=...))"
            )
        mine = [(b.name, b.size) for b in ram.blocks]
        theirs = [(b.name, b.size) for b in c.blocks]
        if mine != theirs:
            raise ConfigError(f"blocks: source sends {theirs}, this region has {mine}")
        # ConfigError names the methods this end has, or the levels the method takes
        get_method(c.method)(c.method_options.get("level"), {})
        if c.base is not None and c.base != self._restored_id:
            have = "was not restored from a save" if self._restored_id is None else (
                f"was restored from save {self._restored_id.hex()}"
            )
            raise ConfigError(
                f"base: the source sends only the changes since save {c.base.hex()}, but this region {have}; "
                "restore that file first, or migrate without top_up"
            )

    def _make_segments(self, c: Config) -> None:
        ram = self.ram
        roffs = received_offsets(ram)
        self._received = Segment.create(unique_name("rcv"), max(roffs[-1], 64))
        self._prepared.join()  # a migration that arrives early waits for the allocation
        for b in ram.blocks:
            m = np.frombuffer(self._received.buf, dtype=np.uint8, count=b.npages, offset=roffs[b.index])
            holes_before = self._prepared.holes_before
            if holes_before is not None:
                m[:] = holes_before[b.index]  # what held data before the prefault
            else:
                allocated_pages(b.path, b.npages, b.page_size, m)
            del m
        self._stats = Segment.create(unique_name("rst"), c.channels * STATS_WORDS * 8)
        if c.verify:
            key = key_from_seed(session_seed(self.config.auth_key, c.session_id, 0), ram.page_size)
            npages = tuple(b.npages for b in ram.blocks)
            self._held = PageRecords(Segment.create(unique_name("held"), PageRecords.size(npages)), npages)
            self._verify_key = key
            if c.base is not None:
                # a top-up sends only what changed since the save: the rest is what the restore put here
                for block, prints in enumerate(self._fingerprint_held(key, c.channels)):
                    self._held.sent[block][:] = prints

    def _serve_session(self, c: Config) -> None:
        cfg = self.config
        ctx = mp_context(worker_start_method(cfg))
        spec_base: dict[str, Any] = dict(
            page_size=c.page_size,
            packet_pages=c.packet_pages,
            block_sizes=tuple(b.size for b in c.blocks),
            method=c.method,
            level=c.method_options.get("level"),
            options={},
            zero_page=c.zero_page,
            log_level=logging.getLogger("mpmultifd").getEffectiveLevel(),
            print_key=self._verify_key,
            prints_name=self._held.seg.name if self._held is not None else None,
        )
        session = self._dsession
        received, stats, ctl = self._received, self._stats, self._ctl
        assert session is not None and received is not None and stats is not None and ctl is not None
        setup_deadline = time.monotonic() + cfg.timeout
        last_seen = (-1, -1)
        last_progress = time.monotonic()
        while True:
            # a source that sends nothing for `timeout` seconds (dead, frozen, or a
            # half-open connection) fails the migration instead of hanging it
            seen = (sum(c["bytes"] for c in self._counters()), ctl.decoder.pending + ctl.bytes_read)
            now = time.monotonic()
            if seen != last_seen:
                last_seen, last_progress = seen, now
            elif now - last_progress > cfg.timeout:
                raise ChannelBroken(f"no data from the source for {cfg.timeout:g} s")
            # new data channels
            for sock, hello in self._take_incoming(accept_data=True):
                resumed = hello.channel in self._connected
                self._connected.add(hello.channel)
                spec = WorkerSpec(channel=hello.channel, start_round=session.round if resumed else 0, **spec_base)
                handles = self._hand_to_warm(spec, sock)
                proc, parent_conn = handles if handles is not None else start_worker(
                    ctx,
                    receiver_main,
                    (spec, self.ram, received.name, stats.name, sock),
                    f"mpmultifd-recv-{hello.channel}",
                    self._pool,
                )
                if resumed:
                    # the source resends this channel's packets from our current round on
                    self._send(Resume(hello.channel, session.round))
                self._group.add(Channel(hello.channel, proc, parent_conn, sock))
            now = time.monotonic()
            if len(self._group) < c.channels and now > setup_deadline:
                missing = sorted(set(range(c.channels)) - {r.index for r in self._group} - set(self._broken))
                if missing:
                    raise ChannelBroken(f"data channels {missing} did not connect within {cfg.timeout} s")
            for ch, deadline in self._broken.items():
                if now > deadline:
                    raise ChannelBroken(f"the source did not reconnect within {cfg.timeout:g} s", channel=ch)
            # control messages: the session checks each is legal now (CANCEL and ERROR end it)
            while (msg := ctl.next_message()) is not None:
                if isinstance(msg, Complete):
                    self._set_status("device")
            recv = {r.index: r for r in self._group}
            # the round barrier: every channel parked at this round's SYNC, and the marker arrived
            parked = {r.index: (r.synced, r.packets) for r in recv.values() if r.parked}
            expected = session.barrier(parked)
            if expected is not None:
                self._group.release()
                self._send(RoundAck(session.round - 1))
                self._rounds = session.round
                per = self._counters()
                self._events.emit(
                    "MIGRATION_PASS",
                    **{
                        "pass": session.round,
                        "round": session.round - 1,
                        "packets": sum(expected),
                        "transferred": sum(x["bytes"] for x in per),
                    },
                )
                log.info("round %d passed the barrier", session.round - 1)
            # the end: every channel at end of stream, counts match, fingerprints all here
            if session.stream_complete({r.index: (r.synced, r.packets) for r in recv.values() if r.done}):
                assert session.complete is not None
                self._finish_session(c, session.complete, session.verify)
                return
            self._wait(ctl.sock)
            ctl.read()

    def _hand_to_warm(self, spec: WorkerSpec, sock: socket.socket) -> tuple[Any, Any] | None:
        """Give a data channel to a prepared receiver, if one is left; returns its handles."""
        assert self._received is not None and self._stats is not None
        return self._prepared.hand(spec, sock, self._received.name, self._stats.name)

    def _finish_session(
        self, c: Config, complete: Complete, verify: dict[int, np.ndarray]
    ) -> None:
        verified: bool | None = None
        if c.verify:
            self._verify_and_repair(c, verify)
            verified = True
        self._send(Result(True, verified, None, {}))
        # the region is ours only once the source commits (it then will not resume
        # its copy); a CANCEL, an error or silence leaves it invalid. A stream the
        # source opened before committing (a VM's device state) may take its time.
        ctl = self._ctl
        assert ctl is not None
        deadline = time.monotonic() + self.config.timeout
        while True:
            msg = ctl.next_message()  # only COMMIT is legal now (the session checks)
            if msg is None:
                if time.monotonic() > deadline:
                    if not self._streams_running():
                        raise ChannelBroken("the source did not commit the migration")
                    deadline = time.monotonic() + self.config.timeout
                self._wait(ctl.sock, 0.5)
                self._take_incoming(accept_data=False)
                ctl.read()
                continue
            if isinstance(msg, Commit):
                break
        # from here on nothing undoes the migration: not a cancel, not a lost connection
        self._committed = True
        self._valid = True
        self._set_status("completed")
        self._t_end = time.monotonic()
        per = self._counters()
        self._result = MigrationResult(
            status="completed",
            total_time=self._t_end - self._t_start,
            setup_time=0.0,
            downtime=0.0,
            rounds=complete.round + 1,
            total=self.ram.total_size,
            transferred=sum(x["bytes"] for x in per),
            normal=sum(x["normal"] for x in per),
            duplicate=sum(x["duplicate"] for x in per),
            verified=verified,
            channels=c.channels,
            method=c.method,
            per_channel=tuple(per),
            repaired_pages=self._repaired_pages,
            repair_passes=self._repair_passes,
        )
        self._settled.set()  # wait() returns now: the region is ours, the rest is teardown
        try:
            self._send(CommitAck())
        except MigrationError as e:
            # the source will report that it does not know who owns the region; we do
            log.warning("COMMIT_ACK could not be sent (%s); the region is this destination's all the same", e)

    def _verify_and_repair(self, c: Config, verify: dict[int, np.ndarray]) -> None:
        """Compare every page with the source's fingerprints; have differing pages resent and check them again."""
        ram = self.ram
        assert self._held is not None
        # the receivers fingerprinted every page as they put it in place: no read of the region now
        mine = [self._held.sent[b.index] for b in ram.blocks]
        bad = {b.index: np.flatnonzero(mine[b.index] != verify[b.index]) for b in ram.blocks}
        bad = {i: p for i, p in bad.items() if len(p)}
        attempt = 0
        while bad:
            total = sum(len(p) for p in bad.values())
            if attempt >= self.config.repair_passes or total > MAX_REPAIR_PAGES:
                mismatches = {ram.blocks[i].name: p[:_MAX_MISMATCHES_REPORTED].tolist() for i, p in bad.items()}
                text = "; ".join(f"{k}: pages {v}" for k, v in mismatches.items())
                why = (
                    f"after {attempt} repair passes"
                    if attempt
                    else ("too many to repair" if total > MAX_REPAIR_PAGES else "repair is off (repair_passes=0)")
                )
                message = f"pages differ after migration ({total} pages, {why}): {text}"
                self._send(Result(False, False, message, mismatches))
                raise VerificationError(message, mismatches=mismatches)
            attempt += 1
            self._repair_passes = attempt
            log.warning("%d pages differ at switchover; asking the source for them (repair pass %d)", total, attempt)
            self._send(Repair(attempt, tuple(sorted(bad.items()))))
            bad = self._receive_repair(c, attempt, bad)
            self._repaired_pages += total

    def _receive_repair(
        self, c: Config, attempt: int, asked: dict[int, np.ndarray]
    ) -> dict[int, np.ndarray]:
        """Write the resent pages; returns those whose bytes still do not match their fingerprints."""
        ram = self.ram
        ps = ram.page_size
        key = key_from_seed(session_seed(self.config.auth_key, c.session_id, attempt), ps)
        outstanding = {i: np.zeros(ram.blocks[i].npages, dtype=bool) for i in asked}
        for i, pages in asked.items():
            outstanding[i][pages] = True
        still: dict[int, list[np.ndarray]] = {}
        got = 0
        while True:
            # only this pass's REPAIR_PAGES and REPAIR_DONE are legal now (the session checks)
            msg = self._next_message(time.monotonic() + self.config.timeout, "the resent pages")
            if isinstance(msg, RepairPages):
                n = len(msg.pages)
                if msg.block not in outstanding or len(msg.data) != n * ps:
                    raise RemoteProtocolError(
                        f"REPAIR_PAGES for block {msg.block} with {len(msg.data)} bytes", field="block"
                    )
                todo = outstanding[msg.block]
                if int(msg.pages.max()) >= len(todo) or not todo[msg.pages].all():
                    raise RemoteProtocolError("REPAIR_PAGES carries pages that were not asked for", field="pages")
                todo[msg.pages] = False
                grid = ram.pages(msg.block)
                grid[msg.pages] = np.frombuffer(msg.data, dtype=np.uint8).reshape(n, ps)
                held = np.empty(n, dtype=np.uint64)
                fingerprint_rows(grid[msg.pages], key, held)  # what the region holds now, read back
                wrong = msg.pages[held != msg.fingerprints]
                if len(wrong):
                    still.setdefault(msg.block, []).append(wrong)
                got += n
            elif isinstance(msg, RepairDone):
                if msg.pages != got or any(t.any() for t in outstanding.values()):
                    raise RemoteProtocolError(
                        f"REPAIR_DONE after {got} pages; pass {attempt} asked for "
                        f"{sum(len(p) for p in asked.values())}",
                        field="pages",
                    )
                return {i: np.unique(np.concatenate(p)) for i, p in still.items()}

    def _fingerprint_held(self, key: np.ndarray, channels: int) -> list[np.ndarray]:
        """Fingerprints of every page this region holds, reading only pages with data, in threads."""
        ram = self.ram
        out = [np.zeros(b.npages, dtype=np.uint64) for b in ram.blocks]
        jobs: list[tuple[int, list[tuple[int, int]]]] = []
        threads = verify_threads(channels)
        for b in ram.blocks:
            # holes in the backing file are zero by the kernel's word; reading them
            # through the mapping would allocate them, so only data pages are read
            runs = file_data_extents(b.path, b.npages, b.page_size)
            jobs += [(b.index, part) for part in split_ranges(runs, threads)]

        def run(job: tuple[int, list[tuple[int, int]]]) -> None:
            block, part = job
            fingerprint_extents(ram.pages(block), part, key, out[block])

        if threads == 1 or len(jobs) <= 1:
            for job in jobs:
                run(job)
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="mpmultifd-verify") as ex:
                list(ex.map(run, jobs))
        return out

    def _streams_running(self) -> bool:
        return any(t.is_alive() for t, _ in self._streams)

    def _serve_stream(self, sock: socket.socket) -> None:
        handler = self._on_stream
        try:
            if handler is not None:
                handler(sock)
        except Exception:
            log.exception("the stream handler failed")
        finally:
            try:
                sock.close()
            except OSError:
                pass

    # ------------------------------------------------------------------ events

    def _take_incoming(self, *, accept_data: bool) -> list[tuple[socket.socket, Any]]:
        """Claim handshaken connections: the first control hello opens the session, data hellos join it."""
        out: list[tuple[socket.socket, Any]] = []
        while True:
            try:
                _, sock, hello = self._listener.incoming.get_nowait()
            except queue.Empty:
                return out
            reason = None
            s = self._session
            if hello.kind == KIND_CONTROL:
                if self._control is None:
                    self._control = sock
                    self._control_hello = hello
                    continue
                reason = "a control connection already exists"
            elif hello.kind == KIND_STREAM:
                if self._on_stream is None:
                    reason = "a stream connection, but this destination has no on_stream handler"
                elif s is None or hello.session_id != s.session_id or self._committed:
                    reason = "a stream connection outside this session"
                else:
                    sock.setblocking(True)
                    t = threading.Thread(target=self._serve_stream, args=(sock,), name="mpmultifd-stream", daemon=True)
                    self._streams.append((t, sock))
                    t.start()
                    continue
            elif s is None:
                reason = "data channel before the session was configured"
            elif not accept_data:
                reason = "data channel after the final round"
            elif hello.session_id != s.session_id:
                reason = f"session {hello.session_id.hex()} is not this session"
            elif hello.nchannels != s.channels or hello.channel >= s.channels:
                reason = f"channel {hello.channel}/{hello.nchannels} does not fit {s.channels} channels"
            elif any(h.channel == hello.channel for _, h in out):
                # claimed earlier in this same batch: the group does not show it yet
                reason = f"channel {hello.channel} is already connected"
            elif self._receiver(hello.channel) is not None or hello.channel in self._broken:
                if self._retries_left > 0:
                    # a replacement for a broken channel (the source saw it break, perhaps first)
                    self._retries_left -= 1
                    replaced = self._receiver(hello.channel)
                    if replaced is not None:
                        self._retire(replaced, "replaced by a new connection")
                    self._broken.pop(hello.channel, None)
                    log.warning("channel %d reconnected; %d retries left", hello.channel, self._retries_left)
                else:
                    reason = f"channel {hello.channel} is already connected"
            if reason is not None:
                self._drops.drop("unclaimed", None, reason)
                self._rejected += 1
                sock.close()
                continue
            out.append((sock, hello))

    @property
    def _receivers(self) -> dict[int, Channel]:
        """The receivers by channel (tests watch channels connect)."""
        return {r.index: r for r in self._group}

    def _receiver(self, channel: int) -> Channel | None:
        return next((r for r in self._group if r.index == channel), None)

    def _retire(self, r: Channel, why: str) -> None:
        """Stop a receiver whose connection broke or is being replaced; its slot stays open."""
        self._group.remove(r)
        self._group.retire(r)
        log.info("channel %d retired: %s", r.index, why)

    def _receiver_failed(self, r: Channel, err: MigrationError) -> None:
        """A receiver's connection broke: keep its slot open for the source's reconnect, or fail."""
        if r not in self._group.channels:
            return  # a report from a receiver already retired (replaced by a reconnection)
        if self._retries_left <= 0 or not isinstance(err, ChannelError):
            if isinstance(err, ChannelError):
                self._raise_why_source_left(err)
                budget = self._session.channel_retries if self._session is not None else 0
                if budget:  # say why this break ends it, as the source does when it sees it first
                    raise ChannelBroken(
                        f"channel broke and the retry budget ({budget}) is spent: {err}", channel=r.index
                    ) from err
            raise err
        self._retire(r, str(err))
        self._broken[r.index] = time.monotonic() + self.config.timeout
        log.warning("channel %d broke (%s); waiting for the source to reconnect it", r.index, err)
        # say so: the source may never see this break itself (its worker has nothing to
        # send, or already sent its end of stream, and never touches the socket), and
        # then nothing would move until both ends time out
        self._send(ChannelLost(r.index, self._rounds))

    def _raise_why_source_left(self, err: MigrationError, grace: float = 0.5) -> None:
        """A data channel closed: if the source said why on the control channel (a cancel, its own
        failure), that is the error to report, not the closed channel it caused."""
        ctl = self._ctl
        if ctl is None:
            return
        decoder = ctl.decoder  # read here without the session: only CANCEL or ERROR matter now
        deadline = time.monotonic() + grace
        while True:
            try:
                msgs = []
                while (msg := decoder.next_message()) is not None:
                    msgs.append(msg)
            except MigrationError:
                return  # garbage on the control channel: the closed channel stands
            for msg in msgs:
                if isinstance(msg, Cancel):
                    raise MigrationCancelled("the source cancelled the migration") from err
                if isinstance(msg, ErrorMessage):
                    raise PeerFailed(msg.message, "source") from err
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                if not mp_wait([ctl.sock], left):
                    return
                ctl.read()
            except (MigrationError, OSError):
                return

    def _wait(self, ctrl: socket.socket | None, timeout: float | None = 1.0) -> None:
        """Wait up to ``timeout`` for a receiver's report, the control connection, a new connection or a cancel."""
        group = self._group
        ready = group.wait([self._wake_r] + ([ctrl] if ctrl is not None else []), timeout)
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except OSError:
                pass
        if self._cancel_requested:
            raise MigrationCancelled("cancelled")
        group.handle_messages(ready)
        self._drop_names_when_attached()
        group.handle_exits(ready)

    def _drop_names_when_attached(self) -> None:
        """Once every receiver attached, unlink the segments' names: a crash of this process then
        leaves nothing of ours in /dev/shm (a replacement receiver would attach by name: not with retries)."""
        s = self._session
        if self._names_dropped or s is None or s.channel_retries:
            return
        if len(self._group) == s.channels and all(r.ready for r in self._group):
            self._names_dropped = True
            for seg in (self._received, self._stats, self._held.seg if self._held is not None else None):
                if seg is not None:
                    seg.unlink()

    def _next_message(self, deadline: float, what: str = "the source's configuration") -> Any:
        """The next control message (checked by the session), waiting until ``deadline``."""
        ctl = self._ctl
        assert ctl is not None
        while True:
            msg = ctl.next_message()
            if msg is not None:
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelBroken(f"timed out waiting for {what}")
            self._wait(ctl.sock, min(left, 1.0))
            ctl.read()

    def _send(self, msg: Any) -> None:
        if self._ctl is not None:
            self._ctl.send(msg, timeout=self.config.timeout)  # REPAIR opens a repair pass, RESULT awaits COMMIT

    def _counters(self) -> list[dict[str, int]]:
        st = self._stats
        if st is None or st.closed or self._session is None:
            return list(self._final_counters)
        words = np.frombuffer(st.buf, dtype=np.uint64, count=self._session.channels * STATS_WORDS)
        out = []
        for i in range(self._session.channels):
            c = words[i * STATS_WORDS : (i + 1) * STATS_WORDS]
            out.append({"channel": i, **{name: int(c[j]) for name, j in COUNTERS.items()}})
        del words
        return out

    # ------------------------------------------------------------------ teardown

    def _finish(self, error: BaseException | None) -> None:
        if error is not None and self._committed:
            # after COMMIT the region is ours whatever failed since (say, the acknowledgement)
            log.warning("after the commit: %s", error)
            error = None
        if error is not None:
            err, status = classify_failure(error)
            if tell_peer(err):
                try:
                    self._send(ErrorMessage("destination-failed", str(err)[:1000], err.channel))
                except MigrationError:
                    pass
            if self._dsession is not None:
                self._dsession.commit_missing()
            self._valid = False
            self._error = err
            unexpected = error if not isinstance(error, MigrationError) else None
            log.warning("migration %s: %s", status, err, exc_info=unexpected)
        else:
            status = "completed"
        self._final_counters = self._counters()
        self._group.shutdown()
        self._prepared.close()  # prepared receivers no channel took
        if self._ctl is not None:
            self._ctl.close()
        elif self._control is not None:
            self._control.close()  # a control connection whose session never began
        self._control = None
        if error is not None:
            for _, sock in self._streams:  # wake handlers blocked on a stream of a failed session
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for seg in (self._received, self._stats):
            if seg is not None:
                seg.close()
                seg.unlink()
        self._received = self._stats = None
        held, self._held = self._held, None
        if held is not None:
            held.close()
            held.seg.unlink()
        if self._t_end is None:
            self._t_end = time.monotonic()
        self._set_status(status)
        self._done.set()
        self._settled.set()
        self._listener.stop()  # wakes the accept loop now, and closes what no session claimed
