"""The source side: the precopy coordinator and its channel workers."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait as mp_wait
from typing import Any

import numpy as np

from ._shm import Segment, unique_name
from .channels import Channel, ChannelGroup
from .config import MigrationConfig
from .connect import Connector
from .control import ControlConnection
from .errors import (
    ChannelBroken,
    ChannelError,
    CommitUnknown,
    ConfigError,
    ConvergenceError,
    MigrationCancelled,
    MigrationError,
    PeerFailed,
    RemoteProtocolError,
    VerificationError,
)
from .estimate import check_estimate_arguments, estimate_dirty_rate
from .file_worker import file_spec, present_offsets, saver_main
from .methods import get_method
from .pacing import AutoConverge, BandwidthWindow, StallDetector, TokenBucket
from .pageprint import fingerprint_extents, fingerprint_rows, key_from_seed, session_seed
from .pool import WorkerPool
from .processes import JOIN_GRACE, mp_context, start_worker, worker_start_method
from .ram import GuestRAM
from .ring import Ring
from .rounds import RoundDispatcher, split_holes
from .savefile import STATE_OFFSET, SaveLayout, SaveState, encode_state, pack_bitmap, pack_digests
from .saving import block_fingerprints, fsync_dir, save_temp, verify_save
from .scans import ScanScheduler
from .session import SourceSession, classify_failure
from .stats import DirtyRateEstimate, EventHub, MigrationResult, SaveResult
from .tracking import DirtyTracker, ScanningTracker, make_tracker
from .transport import Address, connect, is_loopback, parse_address
from .wire import (
    CONTROL_CHANNEL,
    KIND_CONTROL,
    KIND_STREAM,
    MAX_CONTROL_BODY,
    REPAIR_CHUNK_PAGES,
    BlockSpec,
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
    Hello,
    Repair,
    RepairDone,
    RepairPages,
    Result,
    Resume,
    RoundAck,
    RoundEnd,
    Verify,
)
from .wire import (
    KIND_DATA as HELLO_DATA,
)
from .worker import PageRecords, WorkerSpec, sender_main

__all__ = ["Source"]

log = logging.getLogger("mpmultifd.source")



def _compression_stats(per_channel: list[dict[str, int]]) -> dict[str, Any]:
    """How many data packets went compressed and how many raw, and the ratio achieved."""
    encoded = sum(c["compressed-packets"] for c in per_channel)
    raw = sum(c["raw-packets"] for c in per_channel)
    raw_in = sum(c["compressed-input-bytes"] for c in per_channel)
    payload = sum(c["payload-bytes"] for c in per_channel)
    return {
        "compressed-packets": encoded,
        "raw-packets": raw,
        "compressed-input-bytes": raw_in,
        "payload-bytes": payload,
    }


class Source:
    """Migrates a :class:`GuestRAM` to a :class:`~mpmultifd.Destination` while its owner keeps writing.

    ``migrate()`` blocks the calling thread, which runs the precopy loop;
    ``query()`` and ``cancel()`` may be called from any other thread meanwhile.
    A Source runs one migration at a time; workers it starts end with the
    migration, and ``close()`` releases whatever is left. With ``pool``, a
    :class:`~mpmultifd.pool.WorkerPool` of the caller's, the channel workers
    are borrowed from it (no process start) and given back at the end.
    """

    # one run's state, set by _reset_stats (declared here: methods above it assign to it too)
    _t_start: float | None
    _t_end: float | None
    _paused_at: float | None
    _downtime: float | None
    _error: BaseException | None
    _group: ChannelGroup
    _scans: ScanScheduler
    _rounds: RoundDispatcher
    _sync_seconds: float
    _dirty_syncs: int
    _throttle_max: int
    _throttle_cb: Callable[[int], Any] | None
    _before_commit: Callable[[Callable[[], socket.socket]], Any] | None
    _round_end_bytes: dict[int, int]
    _resumes: dict[int, int]
    _zerocopy_reason: str | None
    _stall_reason: str | None
    _pause_phases: dict[str, float]

    def __init__(
        self,
        ram: GuestRAM,
        config: MigrationConfig | None = None,
        *,
        on_event: Callable[[dict[str, Any]], Any] | None = None,
        pool: WorkerPool | None = None,
    ) -> None:
        self.ram = ram
        self.config = config if config is not None else MigrationConfig()
        # TLS channel workers must be forked with their session: never pooled
        self._pool = pool if self.config.tls is None else None
        self._events = EventHub(on_event)
        self._lock = threading.Lock()
        self._progress_lock = threading.Lock()
        self._status = "none"
        self._cancel_requested = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._ctl: ControlConnection | None = None  # the control connection, while a migration runs
        # admission: `connect` is looked up now, so a test may replace this module's transport function
        self._connector = Connector(lambda: self.config, connect, self._check_cancel)
        self._early: list[Any] = []  # control messages that came before anyone asked for them
        self._running = False
        self._closed = False
        self._tracker: DirtyTracker | None = None
        self._save_base: bytes | None = None  # the id of the last save, while the tracker still covers it
        self._present: Segment | None = None  # a save's map of pages with data in the file
        self._save_resume: Callable[[], Any] | None = None  # called once a save no longer needs the pause
        self._records: PageRecords | None = None  # per-page fingerprints the workers write (migrations)
        self._verify_key = np.zeros(0, dtype=np.uint64)  # this migration's verification key (pass 0)
        # live parameters, changeable while a migration runs (QEMU's migrate-set-parameters)
        self._max_bandwidth = self.config.max_bandwidth
        self._downtime_limit = self.config.downtime_limit
        self._bucket = TokenBucket(self._max_bandwidth, self._burst())
        self._reset_stats()

    # ------------------------------------------------------------------ public

    @property
    def status(self) -> str:
        """QEMU's status word: none, setup, active, device, completed, failed, cancelling, cancelled."""
        return self._status

    def migrate(
        self,
        address: Address,
        pause: Callable[[], Any] | None = None,
        resume: Callable[[], Any] | None = None,
        *,
        throttle: Callable[[int], Any] | None = None,
        top_up: bool = False,
        before_commit: Callable[[Callable[[], socket.socket]], Any] | None = None,
    ) -> MigrationResult:
        """Migrate the region to the destination listening at ``address``; blocks until done.

        ``pause()`` is called once, when the remaining dirty pages fit in the
        downtime limit: the writer must stop dirtying pages until the migration
        ends. ``resume()`` is called only if the migration fails or is
        cancelled after ``pause()``. ``throttle(percent)``, if given, is how
        the source slows the writer when rounds stop shrinking (QEMU's
        auto-converge): the writer should spend about ``percent`` percent of its
        time not writing. It is called from this thread between rounds with a
        rising percentage, and with 0 when the migration ends, however it ends.
        Raises :class:`MigrationError` (a subclass says what went wrong) on
        failure; :class:`ConvergenceError` when the writer outruns the link and
        the caller allowed no longer downtime.

        ``top_up=True`` sends only the pages changed since this Source's last
        :meth:`save`, to a destination restored from that file
        (:meth:`Destination.restore`); the destination refuses a top-up from
        any other save. The save's tracking ends with any migration, so after
        a failed top-up the next migration must be a full one.

        ``before_commit(open_stream)``, if given, runs on this thread once the
        destination reported the region complete and verified, with the guest
        still paused, and before COMMIT: the last moment at which the migration
        can still fail and ``resume()`` the guest here. ``open_stream()``
        returns a connected, blocking socket to the destination's ``on_stream``
        handler, admitted like the channels (auth key, TLS), for whatever else
        must travel before the switch (a VM's device state). If it raises, the
        migration fails with that exception as the cause.

        The migration is ``completed`` only once the destination acknowledged
        COMMIT; from then on the region is the destination's. If the
        connection breaks between COMMIT and that acknowledgement,
        :class:`CommitUnknown` is raised and ``resume()`` is *not* called: the
        destination may already own the region, so the agent must find out
        (``Destination.valid`` on the other host) before running either copy.
        """
        self._begin("migration")
        error: BaseException | None = None
        try:
            if top_up and self._save_base is None:
                raise ConfigError(
                    "top_up: this Source has no save to top up from: save() first (and migrate nothing "
                    "else in between), then restore that file on the destination"
                )
            # an unknown method or a level it cannot take fails before any byte moves
            get_method(self.config.compression)(self.config.compression_level, {})
            self._t_start = time.monotonic()
            self._throttle_cb = throttle
            self._before_commit = before_commit
            self._set_status("setup")
            result = self._run(address, pause, top_up)
            self._set_status("completed")
            return result
        except BaseException as exc:
            error = exc
            raise self._raised(exc)  # noqa: B904 (the cause is set by _raised, and is not exc itself)
        finally:
            self._shutdown(error)
            self._release_throttle()
            self._drop_records()
            if (
                error is not None
                and self._paused_at is not None
                and resume is not None
                and not isinstance(self._error, CommitUnknown)
            ):
                try:
                    resume()
                except Exception:
                    log.exception("resume() failed after a failed migration")
            self._t_end = time.monotonic()
            self._running = False

    def _begin(self, what: str) -> None:
        """Claim this Source for one migration or save; a cancel that came first ends it here."""
        with self._lock:
            if self._closed:
                raise MigrationError("this Source is closed")
            if self._running:
                raise MigrationError("a migration or save is already running on this Source")
            self._running = True
            self._reset_stats()
            cancelled_early = self._cancel_requested
        if cancelled_early:
            self._set_status("cancelled")
            self._running = False
            raise MigrationCancelled(f"cancelled before the {what} started")

    def cancel(self) -> None:
        """Ask the running migration to stop; idempotent, and safe from any thread or a signal handler.

        The migration ends with :class:`MigrationCancelled` and status
        ``cancelled``; a cancel before ``migrate()`` makes it fail at once.
        """
        self._cancel_requested = True
        if self._status in ("setup", "active", "device"):
            self._status = "cancelling"
        try:
            os.write(self._wake_w, b"c")
        except (BlockingIOError, OSError):
            pass
        self._connector.abort()  # wakes a handshake blocked in recv

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        pause: Callable[[], Any] | None = None,
        resume: Callable[[], Any] | None = None,
        throttle: Callable[[int], Any] | None = None,
        direct: bool = False,
    ) -> SaveResult:
        """Save the region to a file while its owner keeps writing; blocks until the file is complete.

        The channel workers write every page at its fixed place in the file
        (``docs/savefile.md``) with positional writes straight from the shared
        RAM, round after round like a migration (the same trackers, bandwidth
        cap, throttle and stall rules apply); zero pages stay holes. Then
        ``pause()``, a final round, the bitmaps and digests, ``fsync``, and only
        then the mark that the file is complete. ``resume()`` is called as
        soon as the file holds the paused state (before the digests are
        written and the file is synced, which need no pause), or if the save
        fails after ``pause()``: the guest stays with this host either way.
        With ``verify``, the file's pages are checked against the paused
        guest before the file is marked complete. The file is written under a
        new name in ``path``'s directory (created exclusively, mode 0600) and
        renamed over ``path`` only once complete and synced: a failed or
        cancelled save removes it and leaves a previous file at ``path``
        intact; one killed outright leaves that ``.<name>.<random>.part`` file
        (which ``restore`` refuses as incomplete). A symlink at ``path`` is
        replaced, never written through. ``direct=True`` writes with O_DIRECT
        (ConfigError where the file system does not support it).

        Afterwards this Source keeps tracking the pages the guest changes, so
        ``migrate(..., top_up=True)`` to a destination restored from this file
        sends only those.
        """
        path = os.fspath(path)
        self._begin("save")
        error: BaseException | None = None
        fd = -1
        tmp: str | None = None
        try:
            cfg = self.config
            if cfg.compression != "none":
                raise ConfigError(
                    f"compression: a save file keeps every page raw at its own offset (as QEMU's mapped-ram), "
                    f"so {cfg.compression!r} cannot apply; save with compression='none'"
                )
            if direct and self.ram.page_size < 4096:
                raise ConfigError(f"direct: O_DIRECT needs pages of at least 4096 bytes, not {self.ram.page_size}")
            self._t_start = time.monotonic()
            self._throttle_cb = throttle
            self._retries_left = 0  # a file channel is not reconnected
            self._set_status("setup")
            layout = SaveLayout.plan([(b.name, b.size) for b in self.ram.blocks], self.ram.page_size, method="raw")
            fd, tmp = save_temp(path)
            os.ftruncate(fd, layout.file_size)  # sparse: every page a hole until written
            os.pwrite(fd, layout.encode_header(), 0)  # state INCOMPLETE, from the first byte on
            self._save_resume = resume
            self._start_file_channels(tmp, layout, direct)
            self._group.wait_ready(time.monotonic() + cfg.timeout, self._pump, "save workers")
            assert self._present is not None
            self._present.unlink()
            self._setup_time = time.monotonic() - self._t_start
            self._set_status("active")
            rnd, pending, converged = self._precopy(save=True)
            result = self._finish_save(fd, path, layout, rnd, pending, pause, converged, direct, tmp)
            tmp = None  # renamed over the target
            self._set_status("completed")
            return result
        except BaseException as exc:
            error = exc
            raise self._raised(exc)  # noqa: B904 (the cause is set by _raised, and is not exc itself)
        finally:
            self._shutdown(error)
            self._release_throttle()
            if self._present is not None:
                self._present.close()
                self._present.unlink()
                self._present = None
            if fd >= 0:
                os.close(fd)
            if tmp is not None:
                try:
                    os.unlink(tmp)  # never leave a half-written save behind; the target was not touched
                except OSError:
                    pass
            if self._paused_at is not None and self._save_resume is not None:
                try:
                    self._resume_now()
                except Exception:
                    log.exception("resume() failed after the save")
            self._save_resume = None
            self._t_end = time.monotonic()
            self._running = False

    def _resume_now(self) -> None:
        cb, self._save_resume = self._save_resume, None
        if cb is not None:
            cb()

    def _verify_save(self, fd: int, layout: SaveLayout, maps: list[np.ndarray], prints: list[np.ndarray]) -> None:
        """Check the file's pages against the paused guest's fingerprints before marking it complete."""
        verify_save(self.ram, fd, layout, maps, prints, self.config.dirty_tracker)

    def _start_file_channels(self, path: str, layout: SaveLayout, direct: bool) -> None:
        cfg = self.config
        ram = self.ram
        self._ctx = mp_context(cfg.start_method)
        self._present = Segment.create(unique_name("present"), max(ram.total_pages, 1))
        data_offsets = tuple(b.data_offset for b in layout.blocks)
        for i in range(cfg.channels):
            self._check_cancel()
            spec = file_spec(
                ram,
                data_offsets,
                path,
                i,
                packet_pages=cfg.packet_pages,
                zero_page=cfg.zero_page,
                direct=direct,
                present_name=self._present.name,
            )
            ring = Ring.create(nslots=cfg.ring_slots, capacity=cfg.packet_pages)
            self._group.start(i, self._ctx, saver_main, (spec, ram, ring), f"mpmultifd-save-{i}", self._pool, ring=ring)

    def _finish_save(
        self,
        fd: int,
        path: str,
        layout: SaveLayout,
        rnd: int,
        pending: list[np.ndarray],
        pause: Callable[[], Any] | None,
        converged: bool,
        direct: bool,
        tmp: str,
    ) -> SaveResult:
        ram = self.ram
        self._check_cancel()
        self._paused_at = time.monotonic()
        if pause is not None:
            pause()
        self._set_status("device")
        assert self._tracker is not None and self._present is not None
        t_sync = time.perf_counter()
        final = [np.union1d(p, more) for p, more in zip(pending, self._tracker.collect_all())]
        self._sync_seconds += time.perf_counter() - t_sync
        self._dirty_syncs += 1
        self._round = rnd
        self._send_round(rnd, final, final=True)
        self._rounds.wait_done()
        # the digests are of the paused guest's RAM itself: the file is checked against them
        # (here, with verify, and by every restore)
        prints = [block_fingerprints(ram, b.index) for b in ram.blocks]
        # the file holds the paused state: the guest may run again while the file is finished
        self._downtime = time.monotonic() - self._paused_at
        self._resume_now()
        present = np.frombuffer(self._present.buf, dtype=np.uint8)
        maps = [present[at : at + b.npages].copy() for at, b in zip(present_offsets(ram), ram.blocks)]
        del present
        if self.config.verify:
            self._verify_save(fd, layout, maps, prints)
        npresent = 0
        for entry, mine, fp in zip(layout.blocks, maps, prints):
            npresent += int(np.count_nonzero(mine))
            os.pwrite(fd, pack_bitmap(mine), entry.bitmap_offset)
            os.pwrite(fd, pack_digests(fp), entry.digest_offset)
        self._check_cancel()
        os.fsync(fd)  # every page, bitmap and digest is on disk before the file says it is complete
        os.pwrite(fd, encode_state(SaveState(True, time.time_ns(), npresent)), STATE_OFFSET)
        os.fsync(fd)
        # complete and synced: only now does it replace the target (a symlink there is replaced,
        # not followed), and the directory entry is made durable too
        os.rename(tmp, path)
        fsync_dir(path)
        self._remaining_pages = 0
        self._save_base = layout.save_id  # the tracker keeps running: a top-up sends what changes next
        self._t_end = time.monotonic()
        q = self.query()
        st = os.fstat(fd)
        return SaveResult(
            path=path,
            save_id=layout.save_id.hex(),
            total_time=self._t_end - (self._t_start or self._t_end),
            setup_time=self._setup_time,
            downtime=self._downtime,
            rounds=rnd + 1,
            total=ram.total_size,
            written=q["ram"]["transferred"],
            present_pages=npresent,
            zero_pages=ram.total_pages - npresent,
            file_size=st.st_size,
            allocated=st.st_blocks * 512,
            converged=converged,
            channels=self.config.channels,
            direct=direct,
            stall_reason=self._stall_reason,
            throttle=self._throttle_max,
            dirty_tracker=self.config.dirty_tracker,
        )

    def set_max_bandwidth(self, bytes_per_second: int | None) -> None:
        """Cap the migration at ``bytes_per_second`` over all channels (None: no cap); takes effect at once.

        Callable from any thread, before or during a migration (QEMU's
        ``migrate-set-parameters max-bandwidth``).
        """
        MigrationConfig(max_bandwidth=bytes_per_second)  # the same validation as the config's
        self._max_bandwidth = bytes_per_second
        self._bucket.set_rate(bytes_per_second)

    def set_downtime_limit(self, seconds: float) -> None:
        """Change the downtime limit; the next round boundary compares against it."""
        MigrationConfig(downtime_limit=seconds)
        self._downtime_limit = float(seconds)

    def estimate(
        self,
        duration: float = 2.0,
        *,
        interval: float = 0.5,
        bandwidth: float | None = None,
        downtime_limit: float | None = None,
    ) -> DirtyRateEstimate:
        """Measure how fast the region's pages are being dirtied, without migrating.

        Samples the configured dirty tracker every ``interval`` seconds for
        ``duration`` seconds (QEMU's ``calc-dirty-rate``). With the ``map``
        tracker, the marks it takes are put back, so a later migration (or a
        top-up after a save) still sees them. With ``bandwidth`` (bytes per
        second), the estimate also forecasts whether a migration would
        converge within ``downtime_limit`` (default: the configured one).
        """
        check_estimate_arguments(duration, interval)
        with self._lock:
            if self._closed or self._running:
                raise MigrationError("estimate() needs an idle, open Source")
            self._running = True
        try:
            return estimate_dirty_rate(
                self.ram,
                self.config,
                tracker_in_use=self._tracker is not None and self._tracker.started,
                check_cancel=self._check_cancel,
                downtime_limit=self._downtime_limit,
                duration=duration,
                interval=interval,
                bandwidth=bandwidth,
                downtime_limit_override=downtime_limit,
            )
        finally:
            self._running = False

    def query(self) -> dict[str, Any]:
        """A ``query-migrate``-shaped snapshot; cheap, callable from any thread at any time."""
        now = time.monotonic()
        t_end = self._t_end if self._t_end is not None else now
        total_time = (t_end - self._t_start) if self._t_start is not None else 0.0
        per_channel = self._channel_counters()
        transferred = sum(c["bytes"] for c in per_channel)
        normal = sum(c["normal"] for c in per_channel)
        duplicate = sum(c["duplicate"] for c in per_channel)
        ps = self.ram.page_size
        elapsed_active = max(total_time - self._setup_time, 1e-9)
        info: dict[str, Any] = {
            "status": self._status,
            "progress": self._progress(normal + duplicate),
            # bytes of the rounds the destination confirmed it holds (passed their barrier)
            "confirmed-bytes": transferred
            if self._status == "completed"
            else self._round_end_bytes.get(self._confirmed_round, 0),
            "total-time": int(total_time * 1000),
            "setup-time": int(self._setup_time * 1000),
            "expected-downtime": int(self._expected_downtime * 1000),
            "ram": {
                "transferred": transferred,
                "remaining": self._remaining_pages * ps,
                "total": self.ram.total_size,
                "duplicate": duplicate,
                "normal": normal,
                "normal-bytes": normal * ps,
                "page-size": ps,
                "dirty-pages-rate": int(self._dirty_rate),
                "mbps": transferred * 8 / 1e6 / elapsed_active if self._setup_time else 0.0,
                "dirty-sync-count": self._dirty_syncs,
                "multifd-bytes": transferred,
                "dirty-sync-missed-zero-copy": sum(c["zerocopy-copied"] for c in per_channel),
            },
            "compression": _compression_stats(per_channel),
            "zerocopy": {
                "mode": self.config.zerocopy,
                "active-channels": sum(c["zerocopy-active"] for c in per_channel),
                "sends": sum(c["zerocopy-sends"] for c in per_channel),
                "completions": sum(c["zerocopy-completions"] for c in per_channel),
                "copied": sum(c["zerocopy-copied"] for c in per_channel),
                "enobufs": sum(c["zerocopy-enobufs"] for c in per_channel),
                "plain-reason": self._zerocopy_reason,
            },
            "rounds": self._round,
            "cpu-throttle-percentage": self._throttle_percent,
            "parameters": {
                "max-bandwidth": self._max_bandwidth,
                "downtime-limit": int(self._downtime_limit * 1000),
                "dirty-tracker": self.config.dirty_tracker,
            },
            "dirty-sync-time": round(self._sync_seconds, 6),
            "repaired-pages": self._repaired_pages,
            "repair-passes": self._repair_passes,
            "reconnected-channels": self._reconnects,
            "channels": per_channel,
            "config": self.config.to_dict(),
        }
        if self._downtime is not None:
            info["downtime"] = int(self._downtime * 1000)
        eta = self._expected_remaining(normal + duplicate, elapsed_active)
        if eta is not None:
            info["expected-remaining"] = int(eta * 1000)
        if self._error is not None:
            info["error-desc"] = str(self._error)
        return info

    def close(self) -> None:
        """Release workers and shared memory; idempotent. Cancels a running migration first."""
        if self._running:
            self.cancel()
            deadline = time.monotonic() + self.config.timeout + JOIN_GRACE
            while self._running and time.monotonic() < deadline:
                time.sleep(0.01)
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._shutdown(None)
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def _channels(self) -> list[Channel]:
        """This run's channels (fault-injection tests pick a worker to kill from them)."""
        return self._group.channels

    # ------------------------------------------------------------------ state

    def _reset_stats(self) -> None:
        self._t_start = None
        self._t_end = None
        self._paused_at = None
        self._setup_time = 0.0
        self._downtime = None
        self._expected_downtime = 0.0
        self._remaining_pages = self.ram.total_pages
        self._dirty_rate = 0.0
        self._dirty_syncs = 0
        self._round = 0
        self._error = None
        # the channel workers of this run (a fresh group each run: the last one's counts stay readable)
        self._group = ChannelGroup(
            "worker process", on_failure=self._channel_failed, keep_log=bool(self.config.channel_retries)
        )
        # fingerprinting jobs for the workers: scans, the pause's verification pass, its price
        self._scans = ScanScheduler(self.ram, self._group, self._pump, self._print_key, self.config.timeout)
        self._group.on_scanned = self._scans.scanned
        self._progress_max = 0.0
        self._round_end_bytes = {}
        self._retries_left = self.config.channel_retries
        self._reconnects = 0
        self._resumes = {}
        self._zerocopy_reason = None
        self._confirmed_round = -1
        self._throttle_percent = 0
        self._throttle_max = 0
        self._throttle_cb = None
        self._sync_seconds = 0.0
        # a fresh budget each run: the byte counts it is charged with start from 0 with the run
        self._bucket = TokenBucket(self._max_bandwidth, self._burst())
        # the run's rounds: batches to the emptiest rings, paced by the shared bucket, SYNC/EOS
        self._rounds = RoundDispatcher(
            self._group, self.ram, self.config.packet_pages, self._bucket, lambda: self._max_bandwidth, self._pump
        )
        self._stall_reason = None
        self._before_commit = None
        self._commit_sent = False
        self._repaired_pages = 0
        self._repair_passes = 0
        self._pause_phases = {}

    def _expected_remaining(self, pages_sent: int, elapsed: float) -> float | None:
        """Seconds until the end at the pace pages have gone so far: the pages still to send, then
        the switchover's expected downtime; None before the first page or once it ended otherwise."""
        if self._status == "completed":
            return 0.0
        if self._status not in ("active", "device") or pages_sent == 0:
            return None
        left = self._remaining_pages if self._round > 0 else max(self.ram.total_pages - pages_sent, 0)
        return left * elapsed / pages_sent + self._expected_downtime

    def _progress(self, pages_sent: int) -> float:
        """Percent done that never runs backwards, even while the guest re-dirties pages.

        Work done is every page sent so far; work left is the pages still dirty
        (plus the rest of round 0). The ratio can dip when the guest dirties
        faster than we send, so the figure keeps its running maximum; it reaches
        100 only when the migration completes.
        """
        if self._status == "completed":
            return 100.0
        total = self.ram.total_pages
        left = self._remaining_pages if self._round > 0 else max(total - pages_sent, 0)
        done = pages_sent
        value = 100.0 * done / (done + left) if done + left else 0.0
        with self._progress_lock:
            self._progress_max = max(self._progress_max, min(value, 99.9))
            return round(self._progress_max, 2)

    def _set_status(self, status: str) -> None:
        if self._status != status:
            log.info("migration status %s -> %s", self._status, status)
            self._status = status
            self._events.emit("MIGRATION", status=status)

    def events(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Iterate over events as they happen (QEMU's ``MIGRATION`` on every status change,
        ``MIGRATION_PASS`` after every round); ends after a final status, or when ``timeout``
        seconds pass without one. Events already emitted are not replayed."""
        return self._events.subscribe(timeout)

    def _channel_counters(self) -> list[dict[str, int]]:
        group = self._group
        try:
            return group.counters()  # the last run's after its teardown
        except (ValueError, AttributeError):  # a ring closed under us: teardown is running
            return [dict(c) for c in group.final_counters]

    def _raised(self, exc: BaseException) -> MigrationError:
        """The error to raise for ``exc``: a MigrationError keeps the cause it was raised with
        (a refused connect, say); anything else becomes the cause of its MigrationError."""
        err = self._fail(exc)
        if err is not exc:
            err.__cause__ = exc
        return err

    def _fail(self, exc: BaseException) -> MigrationError:
        err, status = classify_failure(exc, cancel_requested=self._cancel_requested)
        self._error = err
        self._set_status(status)
        if status == "commit-unknown":
            log.error("migration outcome unknown: %s", err)
        else:
            log.warning("migration %s: %s", status, err)
        return err

    # ------------------------------------------------------------------ the run

    def _run(self, address: Address, pause: Callable[[], Any] | None, top_up: bool) -> MigrationResult:
        cfg = self.config
        ram = self.ram
        session = secrets.token_bytes(16)
        self._check_cancel()
        sock = self._open(address, Hello(KIND_CONTROL, session, CONTROL_CHANNEL, cfg.channels))
        # with a key every control frame is authenticated: a relay cannot change VERIFY, RESULT or COMMIT
        mac = ControlMac(cfg.auth_key, session, "source") if cfg.auth_key is not None else None
        # a source receives no VERIFY: the decoder's default limit on a frame holds
        decoder = ControlDecoder(max_verify=MAX_CONTROL_BODY, mac=mac)
        self._ctl = ControlConnection(sock, "the destination", SourceSession(cfg.channels), decoder=decoder, mac=mac)
        config_msg = Config(
            session_id=session,
            page_size=ram.page_size,
            channels=cfg.channels,
            packet_pages=cfg.packet_pages,
            blocks=tuple(BlockSpec(b.name, b.size) for b in ram.blocks),
            method=cfg.compression,
            method_options={"level": cfg.compression_level},
            zero_page=cfg.zero_page,
            verify=cfg.verify,
            channel_retries=cfg.channel_retries,
            base=self._save_base if top_up else None,
        )
        self._ctl.send(config_msg, timeout=cfg.timeout)
        reply = self._next_control(time.monotonic() + cfg.timeout, "the destination's answer to the configuration")
        if not isinstance(reply, ConfigAck):
            raise RemoteProtocolError(f"expected CONFIG_ACK, got {type(reply).__name__}", field="type")
        # both ends derive the verification key from the session (and the auth key): it never
        # crosses the wire, so a relay without the key cannot match a page it changed
        self._verify_key = key_from_seed(session_seed(cfg.auth_key, session, 0), ram.page_size)
        npages = tuple(b.npages for b in ram.blocks)
        self._records = PageRecords(Segment.create(unique_name("prt"), PageRecords.size(npages)), npages)
        self._scans.records = self._records
        tracker = self._migration_tracker(top_up)
        self._start_channels(address, session)
        # every worker attached: the rings' names are dropped, so a crash of this process leaves none behind
        self._group.wait_ready(time.monotonic() + cfg.timeout, self._pump, "channel workers")
        if not cfg.channel_retries:
            self._records.seg.unlink()  # a replacement worker would attach by name
        assert self._t_start is not None
        self._setup_time = time.monotonic() - self._t_start
        self._set_status("active")
        rnd, pending, converged = self._precopy(top_up, tracker=tracker)
        # let the destination drain what is still in flight while the guest runs:
        # otherwise the pause would also wait for socket buffers to empty
        self._wait_confirmed(rnd - 1)
        return self._switchover(rnd, pending, pause, converged)

    def _migration_tracker(self, top_up: bool) -> DirtyTracker:
        """The tracker for this migration; a scanning one compares against what the workers record as sent."""
        records = self._records
        assert records is not None
        if top_up:
            assert self._tracker is not None and self._tracker.started
            tracker = self._tracker
            if isinstance(tracker, ScanningTracker):
                # from here on the workers record what they send; until then, the save's last scan
                for b in self.ram.blocks:
                    records.sent[b.index][:] = tracker.baseline[b.index]
                tracker.baseline, tracker.fresh = records.sent, records.scanned
        else:
            tracker = self._fresh_tracker(key=self._verify_key, baseline=records.sent, fresh=records.scanned)
        if isinstance(tracker, ScanningTracker):
            tracker.recorded = True
            tracker.scanner = self._scans.scan_block
        return tracker

    def _print_key(self) -> np.ndarray:
        """The key the workers fingerprint with: the scanning tracker's, else the verification key."""
        t = self._tracker
        return t.key if isinstance(t, ScanningTracker) else self._verify_key

    def _drop_records(self) -> None:
        t = self._tracker
        if isinstance(t, ScanningTracker) and t.recorded:
            # its arrays are views of the records: a later migration starts a fresh tracker
            t.close()
            t.release()
            self._tracker = None
        records, self._records = self._records, None
        self._scans.records = None
        if records is not None:
            records.close()
            if records.seg.owned:
                records.seg.unlink()

    def _open_stream(self) -> socket.socket:
        """A stream connection to the destination's ``on_stream``, admitted like a channel."""
        sock = self._open(self._address, Hello(KIND_STREAM, self._session, CONTROL_CHANNEL, self.config.channels))
        sock.setblocking(True)
        return sock

    def _open(self, address: Address, hello: Hello) -> socket.socket:
        """Connect and pass admission (retrying a destination that drops us before its welcome)."""
        return self._connector.open(address, hello)

    def _zerocopy_mode(self, address: Address) -> str:
        """What the workers do about MSG_ZEROCOPY, and why (logged once)."""
        cfg = self.config
        if cfg.zerocopy == "off":
            return "off"
        if cfg.zerocopy == "on":
            return "on"
        family, _ = parse_address(address)
        reason = None
        if isinstance(self._tracker, ScanningTracker):
            reason = "the scanning tracker sends private copies of the pages"
        elif cfg.tls is not None:
            reason = "TLS encrypts into its own buffers"
        elif cfg.compression != "none":
            reason = f"{cfg.compression} packets are built in private buffers"
        elif family == socket.AF_UNIX:
            reason = "Unix sockets do not support it"
        elif is_loopback(address):
            reason = "the kernel copies every zero-copy send to a local socket"
        if reason:
            log.info("zerocopy auto: plain sends (%s)", reason)
            self._zerocopy_reason = reason
            return "off"
        self._zerocopy_reason = None
        return "auto"

    def _start_channels(self, address: Address, session: bytes) -> None:
        cfg = self.config
        ctx = mp_context(worker_start_method(cfg))
        spec_base: dict[str, Any] = dict(
            page_size=self.ram.page_size,
            packet_pages=cfg.packet_pages,
            block_sizes=tuple(b.size for b in self.ram.blocks),
            method=cfg.compression,
            level=cfg.compression_level,
            options={},
            zero_page=cfg.zero_page,
            zerocopy=self._zerocopy_mode(address),
            flush_timeout=cfg.timeout,
            log_level=logging.getLogger("mpmultifd").getEffectiveLevel(),
            print_key=self._print_key(),
            prints_name=self._records.seg.name if self._records is not None else None,
            snapshot=isinstance(self._tracker, ScanningTracker),
        )
        self._ctx = ctx
        self._spec_base = spec_base
        self._address = address
        self._session = session
        for i in range(cfg.channels):
            self._check_cancel()
            self._group.add(Channel(i, *self._spawn_channel(i)))

    def _spawn_channel(self, i: int) -> tuple[Any, Any, socket.socket, Ring]:
        """Ring, admitted connection and worker process for data channel ``i``."""
        cfg = self.config
        ring = Ring.create(nslots=cfg.ring_slots, capacity=cfg.packet_pages)
        try:
            sock = self._open(self._address, Hello(HELLO_DATA, self._session, i, cfg.channels))
        except BaseException:
            ring.close()
            ring.unlink()
            raise
        try:
            proc, parent_conn = start_worker(
                self._ctx,
                sender_main,
                (WorkerSpec(channel=i, **self._spec_base), self.ram, ring, sock),
                f"mpmultifd-send-{i}",
                self._pool,
            )
        except BaseException:
            ring.close()
            ring.unlink()
            sock.close()
            raise
        return proc, parent_conn, sock, ring

    def _channel_failed(self, ch: Channel, err: MigrationError) -> None:
        """A data channel broke: reconnect it while the retry budget lasts, else fail."""
        while True:
            if self._retries_left <= 0 or ch.reconnecting or not isinstance(err, ChannelError):
                if self._retries_left <= 0 and self.config.channel_retries:
                    raise ChannelBroken(
                        f"channel broke and the retry budget ({self.config.channel_retries}) is spent: {err}",
                        channel=ch.index,
                    ) from err
                raise err
            self._retries_left -= 1
            log.warning("channel %d broke (%s); reconnecting, %d retries left", ch.index, err, self._retries_left)
            self._reconnects += 1
            ch.reconnecting = True
            ch.lost = False
            try:
                self._replace_channel(ch)
            finally:
                ch.reconnecting = ch.awaiting_resume = False
            if not ch.lost:
                return
            # the destination lost the new connection while we resent on it: its CHANNEL_LOST
            # came while this channel was left out of event handling, so act on it now
            err = ChannelBroken("the destination lost the reconnected channel", channel=ch.index)

    def _replace_channel(self, ch: Channel) -> None:
        # retire the old worker first: once it exited, its counters are final
        self._group.retire(ch)
        self._resumes.pop(ch.index, None)
        ch.awaiting_resume = True
        ch.ready = False
        # the old ring stays in place until the new one is there: if connecting fails,
        # teardown and query() still find an open ring (a closed one raised ValueError)
        proc, conn, sock, ring = self._spawn_channel(ch.index)
        self._group.replace(ch, ring, sock, proc, conn)
        # the destination names the round it stands at; everything from there is resent
        deadline = time.monotonic() + self.config.timeout
        while ch.index not in self._resumes or not ch.ready:
            if time.monotonic() > deadline:
                raise ChannelBroken("the destination did not take the reconnected channel back", channel=ch.index)
            if not ch.ready and ch.conn.poll(0):
                self._group.read_message(ch)  # Ready (this channel is left out of _pump while it reconnects)
            self._pump(0.05)
        ring.unlink()
        # a CHANNEL_LOST for this channel from here on is about the new connection
        ch.awaiting_resume = False
        start = self._resumes.pop(ch.index)
        resent = self._group.resend(ch, start, self._pump)
        if resent < 0:
            # replaced again while resending, or the new worker stopped already (its connection
            # broke too): that replacement, or the handling of its exit, resends everything
            log.info("channel %d: the new worker stopped while packets were resent", ch.index)
            return
        log.info("channel %d reconnected; resent %d packets from round %d", ch.index, resent, start)

    def _pause_cost(self, save: bool) -> float:
        """Seconds the pause spends fingerprinting, beyond the last dirty sync (see ScanScheduler.pause_cost)."""
        scanned = isinstance(self._tracker, ScanningTracker)
        return self._scans.pause_cost(save=save, scanned_by_tracker=scanned, channels=self.config.channels)

    def _precopy(
        self, top_up: bool = False, save: bool = False, tracker: DirtyTracker | None = None
    ) -> tuple[int, list[np.ndarray], bool]:
        """Run precopy rounds until the rest fits the downtime limit; returns (next round, pages left, converged)."""
        cfg = self.config
        ram = self.ram
        ps = ram.page_size
        t_sync = time.perf_counter()
        holes: list[np.ndarray] | None = None  # round 0's pages known to be zero
        if top_up:
            # the tracker has run since the save: round 0 sends only what changed since
            assert self._tracker is not None and self._tracker.started
            tracker = self._tracker
            pending = tracker.collect_all()
            # those pages are taken: if this migration fails, a later top-up would miss them
            self._save_base = None
        else:
            tracker = tracker if tracker is not None else self._fresh_tracker()
            # round 0 sends everything; tracking starts first, so writes made from now on are seen again
            tracker.start()
            pending = [np.arange(b.npages, dtype=np.int64) for b in ram.blocks]
            if not save:
                # holes of the source's files (found after tracking started, so a page written since
                # is seen again) go as zero pages without being read: a read would allocate them
                pending, holes = split_holes(ram)
        self._sync_seconds += time.perf_counter() - t_sync
        rnd = 0
        fingerprint_cost = self._pause_cost(save) if (cfg.verify or save) else 0.0
        window = BandwidthWindow()
        auto = AutoConverge(
            cfg.cpu_throttle_initial, cfg.cpu_throttle_increment, cfg.max_cpu_throttle, cfg.throttle_trigger_threshold
        )
        stall = StallDetector(cfg.stall_rounds)
        converged = True
        while True:
            t_round = time.monotonic()
            before = self._group.wire_bytes()
            self._round = rnd
            self._send_round(rnd, pending, final=False, known_zero=holes if rnd == 0 else None)
            self._rounds.wait_synced(rnd)
            elapsed = time.monotonic() - t_round
            sent = self._group.wire_bytes() - before
            self._round_end_bytes[rnd] = before + sent
            window.add(sent, elapsed)
            bandwidth = window.rate
            # dirty sync: what the writer changed while this round was on the wire
            t_sync = time.perf_counter()
            pending = tracker.collect_all()
            sync_time = time.perf_counter() - t_sync
            if cfg.verify and not save and not isinstance(tracker, ScanningTracker):
                # the pause will have the workers fingerprint the whole region: time a slice of
                # it on them now, under the load they really have
                self._scans.calibrate(rnd)
                fingerprint_cost = self._pause_cost(save)
            self._sync_seconds += sync_time
            self._dirty_syncs += 1
            remaining = sum(len(p) for p in pending)
            self._remaining_pages = remaining
            self._dirty_rate = remaining / elapsed if elapsed > 0 else 0.0
            if remaining == 0:
                transfer = 0.0
            else:
                transfer = remaining * ps / bandwidth if bandwidth > 0 else float("inf")
            # the pause also pays one more dirty sync and, with verify (or a save's digests),
            # a fingerprint of the region: no round can make those smaller
            overhead = sync_time + fingerprint_cost
            self._expected_downtime = transfer + overhead
            log.info(
                "round %d: %d bytes in %.3f s, %d pages dirty, expected downtime %.3f s",
                rnd,
                sent,
                elapsed,
                remaining,
                self._expected_downtime,
            )
            self._events.emit(
                "MIGRATION_PASS",
                **{
                    "pass": rnd + 1,
                    "round": rnd,
                    "round-bytes": sent,
                    "round-time": elapsed,
                    "dirty-pages": remaining,
                    "dirty-pages-rate": self._dirty_rate,
                    "mbps": bandwidth * 8 / 1e6,
                    "expected-downtime": self._expected_downtime,
                    "dirty-sync-time": sync_time,
                    "cpu-throttle-percentage": self._throttle_percent,
                },
            )
            rnd += 1
            if self._expected_downtime <= self._downtime_limit:
                break
            self._check_cancel()
            if remaining == 0 and overhead > self._downtime_limit:
                converged = False
                self._give_up_or_force(
                    f"the pause's fixed cost alone ({sync_time:.3f} s to find the last dirty pages with the "
                    f"{tracker.name!r} tracker, {fingerprint_cost:.3f} s to fingerprint the region) exceeds "
                    "downtime_limit, and more rounds cannot lower it (verify=False or a cheaper tracker can)",
                    rnd,
                    bandwidth,
                )
                break
            dirty_bytes = remaining * ps
            # round 0 sent the whole region, so only later rounds say how the writer keeps up
            stalled = stall.update(dirty_bytes) if rnd > 1 else False
            if self._throttle_cb is not None and rnd > 1:
                percent = auto.update(dirty_bytes, sent)
                if percent is not None:
                    self._set_throttle(percent)
            why = None
            if rnd >= cfg.max_rounds:
                why = f"max_rounds={cfg.max_rounds} reached"
            elif stalled and (self._throttle_cb is None or auto.exhausted):
                why = f"the dirty set has not shrunk for {cfg.stall_rounds} rounds" + (
                    f" with the throttle at {auto.percent}%" if self._throttle_cb is not None else ""
                )
            if why is not None:
                converged = False
                self._give_up_or_force(why, rnd, bandwidth)
                break
        return rnd, pending, converged

    def _give_up_or_force(self, why: str, rounds: int, bandwidth: float) -> None:
        """Precopy will not converge: switch over with a longer downtime if allowed, else fail."""
        cfg = self.config
        ps = self.ram.page_size
        dirty_rate = self._dirty_rate * ps  # bytes per second
        expected = self._expected_downtime
        allowed = cfg.stall_downtime_limit
        if allowed is not None and expected <= allowed:
            self._stall_reason = why
            log.warning(
                "%s: expected downtime %.3f s is above downtime_limit %.3f s but within stall_downtime_limit %g s; "
                "switching over",
                why,
                expected,
                self._downtime_limit,
                allowed,
            )
            return
        mb = 1e6
        raise ConvergenceError(
            f"not converging: {why}; the guest dirties {dirty_rate / mb:.3g} MB/s against "
            f"{bandwidth / mb:.3g} MB/s of bandwidth, so the {self._remaining_pages * ps / mb:.3g} MB still dirty "
            f"would take {expected:.3g} s of downtime, above downtime_limit {self._downtime_limit:g} s"
            + (f" and stall_downtime_limit {allowed:g} s" if allowed is not None else "")
            + ". Raise max_bandwidth, pass throttle= to slow the writer, or accept a longer downtime "
            "with stall_downtime_limit",
            dirty_rate=dirty_rate,
            bandwidth=bandwidth,
            expected_downtime=expected,
            downtime_limit=self._downtime_limit,
            rounds=rounds,
            throttle=self._throttle_percent,
        )

    def _fresh_tracker(self, **scan_options: Any) -> DirtyTracker:
        self._save_base = None  # a new tracker knows nothing of the last save
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        kind = self.config.dirty_tracker
        self._tracker = make_tracker(kind, self.ram, **(scan_options if kind == "scan" else {}))
        return self._tracker

    def _set_throttle(self, percent: int) -> None:
        cb = self._throttle_cb
        if cb is None or percent == self._throttle_percent:
            return
        log.info("throttling the writer to %d%%", percent)
        self._throttle_percent = percent
        self._throttle_max = max(self._throttle_max, percent)
        self._events.emit("MIGRATION_THROTTLE", **{"cpu-throttle-percentage": percent})
        try:
            cb(percent)
        except Exception as e:
            raise MigrationError(f"throttle({percent}) callback failed: {type(e).__name__}: {e}") from e

    def _release_throttle(self) -> None:
        if self._throttle_cb is not None and self._throttle_percent:
            try:
                self._set_throttle(0)
            except MigrationError:
                log.exception("throttle(0) failed at the end of the migration")
        self._throttle_cb = None

    def _burst(self) -> int:
        # one packet per channel may be in flight beyond the budget
        return self.config.channels * self.config.packet_pages * self.ram.page_size

    def _switchover(
        self, rnd: int, pending: list[np.ndarray], pause: Callable[[], Any] | None, converged: bool
    ) -> MigrationResult:
        cfg = self.config
        ram = self.ram
        self._check_cancel()
        expected = self._expected_downtime
        phases = self._pause_phases
        self._paused_at = time.monotonic()
        if pause is not None:
            pause()
        t = self._phase("pause-call", self._paused_at)
        self._set_status("device")
        # pages dirtied between the last sync and the pause (a scanning tracker's scan of the
        # paused guest is also the verification's fingerprints: the region is read once)
        tracker = self._tracker
        assert tracker is not None
        final = [np.union1d(p, more) for p, more in zip(pending, tracker.collect_all())]
        t = self._phase("dirty-sync", t)
        self._sync_seconds += phases["dirty-sync"]
        self._dirty_syncs += 1
        self._round = rnd
        reuse_scan = isinstance(tracker, ScanningTracker) and tracker.key is self._verify_key
        by_workers = cfg.verify and not reuse_scan and self._print_key() is self._verify_key
        # without a reusable scan the workers fingerprint the paused guest after their last pages
        self._send_round(rnd, final, final=True, before_end=self._scans.queue_verification if by_workers else None)
        self._rounds.wait_done()
        t = self._phase("final-round", t)
        verified_prints: list[np.ndarray] = []
        if cfg.verify:
            records = self._records
            assert records is not None
            if by_workers:
                self._scans.finish(time.monotonic() + cfg.timeout)
            elif not reuse_scan:
                for b in ram.blocks:
                    records.scanned[b.index][:] = 0
                    fingerprint_extents(
                        ram.pages(b.index), ram.data_extents(b.index), self._verify_key, records.scanned[b.index]
                    )
            verified_prints = [records.scanned[b.index].copy() for b in ram.blocks]
            t = self._phase("verify-prints", t)
            for b in ram.blocks:
                self._control_send(Verify(b.index, verified_prints[b.index]))
        msg = self._await_result()
        t = self._phase("destination-check", t)
        if not msg.ok:
            if msg.mismatches:
                raise VerificationError(msg.error or "verification failed", mismatches=msg.mismatches)
            raise MigrationError(f"destination reported failure: {msg.error}")
        if self._before_commit is not None:
            try:
                self._before_commit(self._open_stream)
            except MigrationError:
                raise
            except Exception as e:
                raise MigrationError(f"before_commit failed: {type(e).__name__}: {e}") from e
            t = self._phase("before-commit", t)
        # the point of no return: a cancel that came in before it still wins
        self._check_cancel()
        self._commit()
        self._phase("commit", t)
        self._downtime = time.monotonic() - self._paused_at
        self._remaining_pages = 0
        self._t_end = time.monotonic()
        q = self.query()
        assert self._t_start is not None
        return MigrationResult(
            status="completed",
            total_time=self._t_end - self._t_start,
            setup_time=self._setup_time,
            downtime=self._downtime,
            rounds=rnd + 1,
            total=ram.total_size,
            transferred=q["ram"]["transferred"],
            normal=q["ram"]["normal"],
            duplicate=q["ram"]["duplicate"],
            verified=msg.verified,
            converged=converged,
            expected_downtime=expected,
            channels=cfg.channels,
            method=cfg.compression,
            per_channel=tuple(q["channels"]),
            stall_reason=self._stall_reason,
            throttle=self._throttle_max,
            dirty_tracker=cfg.dirty_tracker,
            dirty_sync_time=self._sync_seconds,
            repaired_pages=self._repaired_pages,
            repair_passes=self._repair_passes,
            downtime_phases=dict(phases),
        )

    def _phase(self, name: str, since: float) -> float:
        """Record how long pause phase ``name`` took since ``since``; returns now."""
        now = time.monotonic()
        self._pause_phases[name] = now - since
        return now

    def _await_result(self) -> Result:
        """The destination's RESULT, resending the pages it names while it asks for repairs."""
        cfg = self.config
        budget = cfg.timeout + 2.0 * self.ram.total_size / (1 << 30)
        deadline = time.monotonic() + budget
        while True:
            msg = self._next_control(deadline, "the destination's result")
            if isinstance(msg, Result):
                return msg
            if isinstance(msg, Repair):
                self._repair(msg)
                deadline = time.monotonic() + budget
                continue
            raise RemoteProtocolError(f"expected RESULT or REPAIR, got {type(msg).__name__}", field="type")

    def _repair(self, msg: Repair) -> None:
        """Send again, over the control connection, the pages the destination found different."""
        ram = self.ram
        self._repair_passes = msg.attempt  # the session checked it is the next pass
        key = key_from_seed(session_seed(self.config.auth_key, self._session, msg.attempt), ram.page_size)
        total = 0
        for block, pages in msg.pages:
            if not 0 <= block < len(ram.blocks):
                raise RemoteProtocolError(f"REPAIR names block {block}", field="block")
            npages = ram.blocks[block].npages
            if len(pages) and (int(pages.min()) < 0 or int(pages.max()) >= npages):
                raise RemoteProtocolError(f"REPAIR names pages outside block {block}", field="pages")
            grid = ram.pages(block)
            for s in range(0, len(pages), REPAIR_CHUNK_PAGES):
                chunk = pages[s : s + REPAIR_CHUNK_PAGES]
                data = grid[chunk]  # a private copy: its fingerprint is of exactly what is sent
                prints = np.empty(len(chunk), dtype=np.uint64)
                fingerprint_rows(data, key, prints)
                self._control_send(RepairPages(msg.attempt, block, chunk, prints, data.tobytes()))
            total += len(pages)
        self._control_send(RepairDone(msg.attempt, total))
        self._repaired_pages += total
        log.warning("resent %d pages that differed at switchover (repair pass %d)", total, msg.attempt)

    def _commit(self) -> None:
        """Send COMMIT and wait for its acknowledgement; a break in between is CommitUnknown.

        Cancelling no longer applies once COMMIT is out: the destination may own the region.
        """
        cfg = self.config
        ctl = self._ctl
        assert ctl is not None
        try:
            self._control_send(Commit())
        except MigrationError as e:
            raise CommitUnknown(
                f"COMMIT may not have reached the destination ({e}): it may or may not own the region"
            ) from e
        self._commit_sent = True
        deadline = time.monotonic() + cfg.timeout
        while True:
            try:
                # only COMMIT_ACK, or news of the channels, is legal now (the session checks)
                msg = self._early.pop(0) if self._early else ctl.next_message()
                if msg is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ChannelBroken(f"no acknowledgement within {cfg.timeout:g} s")
                    if ctl.pending() or mp_wait([ctl.sock], min(left, 0.5)):
                        ctl.read()
                    continue
            except MigrationError as e:
                raise CommitUnknown(
                    f"COMMIT was sent but not acknowledged ({e}): the destination may or may not own the "
                    "region; this side did not resume the guest"
                ) from e
            if isinstance(msg, CommitAck):
                return
            if isinstance(msg, (RoundAck, Resume, ChannelLost)):
                continue
            raise CommitUnknown(
                f"the destination answered COMMIT with {type(msg).__name__}"
                + (f" ({msg.message})" if isinstance(msg, ErrorMessage) else "")
                + ": it may or may not own the region; this side did not resume the guest"
            )

    # ------------------------------------------------------------------ scans

    # ------------------------------------------------------------------ rounds

    def _send_round(
        self,
        rnd: int,
        pending: list[np.ndarray],
        *,
        final: bool,
        before_end: Callable[[], None] | None = None,
        known_zero: list[np.ndarray] | None = None,
    ) -> None:
        """Hand a round to the workers, then tell the destination how many packets each channel carries."""
        counts = self._rounds.send_round(rnd, pending, final=final, before_end=before_end, known_zero=known_zero)
        if self._ctl is not None:  # a save has no destination to tell
            self._control_send(Complete(rnd, counts) if final else RoundEnd(rnd, counts))

    def _wait_confirmed(self, rnd: int) -> None:
        """Wait until the destination passed round ``rnd``'s barrier (its ROUND_ACK)."""
        deadline = time.monotonic() + self.config.timeout
        while self._confirmed_round < rnd:
            if time.monotonic() > deadline:
                raise ChannelBroken(
                    f"the destination did not confirm round {rnd} within {self.config.timeout:g} s of it being sent"
                )
            self._pump(0.05)

    # ------------------------------------------------------------------ events

    def _check_cancel(self) -> None:
        if self._cancel_requested:
            raise MigrationCancelled("cancelled")

    def _pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` for worker, control or cancel events and handle them; raises on failure."""
        self._check_cancel()
        group = self._group
        ctl = self._ctl
        ready = group.wait([self._wake_r] + ([ctl.sock] if ctl is not None else []), timeout)
        self._check_progress()
        if not ready:
            return
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except OSError:
                pass
        self._check_cancel()
        group.handle_messages(ready)
        if ctl is not None and ctl.sock in ready:
            ctl.read()
            while (msg := ctl.next_message()) is not None:
                self._control_message(msg)
        # give a dead worker's last reports a moment to arrive, then blame the death
        group.handle_exits(ready)

    def _check_progress(self) -> None:
        """Fail a channel that has work queued but moved no byte for ``timeout`` seconds.

        That is what a destination that stopped reading, or a half-open
        connection, looks like from here: the worker sits in ``sendmsg``.
        """
        timeout = self.config.timeout
        busy = lambda ch: len(ch.ring) > 0 or ch.synced < self._round  # noqa: E731
        for ch in self._group.stalled(timeout, busy):
            self._channel_failed(
                ch,
                ChannelBroken(
                    f"no progress for {timeout:g} s with data queued: "
                    "the destination stopped reading or the connection is dead",
                    channel=ch.index,
                ),
            )

    def _control_message(self, msg: Any) -> None:
        """Act on news of the channels (the session already checked the message is legal now);
        anything else waits in order for whoever expects it."""
        if isinstance(msg, RoundAck):
            self._confirmed_round = max(self._confirmed_round, msg.round)
            self._group.confirm(msg.round)  # the destination holds those rounds: no resend needed
            return
        if isinstance(msg, Resume):
            self._resumes[msg.channel] = msg.round
            return
        if isinstance(msg, ChannelLost):
            ch = self._group.channels[msg.channel]
            if ch.awaiting_resume:
                return  # about the connection being replaced already (it comes before the RESUME)
            if ch.reconnecting:
                ch.lost = True  # about the new connection, while it is resent on: _channel_failed goes again
                return
            # a break this side may never see: the worker has nothing to send, or already sent
            # its end of stream, and the relay or the network dropped what it sent last
            self._channel_failed(
                ch,
                ChannelBroken(f"the destination lost the connection in round {msg.round}", channel=ch.index),
            )
            return
        self._early.append(msg)

    def _next_control(self, deadline: float, what: str) -> Any:
        """The next control message that is not a progress note, waiting until ``deadline``."""
        while True:
            if self._early:
                return self._early.pop(0)
            assert self._ctl is not None
            msg = self._ctl.next_message()
            if msg is not None:
                self._control_message(msg)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelBroken(f"timed out waiting for {what}")
            self._pump(min(left, 1.0))

    def _control_send(self, msg: Any) -> None:
        assert self._ctl is not None
        self._ctl.send(msg, self._pump)  # events are handled while a big VERIFY fills the buffer

    # ------------------------------------------------------------------ teardown

    def _shutdown(self, error: BaseException | None) -> None:
        """Tell the destination why (if it is not committed), stop the workers, release everything."""
        ctl, self._ctl = self._ctl, None
        if error is not None and ctl is not None and not self._commit_sent and not isinstance(error, PeerFailed):
            cancelled = isinstance(error, MigrationCancelled) or self._cancel_requested
            ctl.last_word(Cancel() if cancelled else ErrorMessage("source-failed", str(error)[:1000]))
        self._group.shutdown()  # keeps the last counters for query()
        if ctl is not None:
            ctl.close()
        self._early = []

