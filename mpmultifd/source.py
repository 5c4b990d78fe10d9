"""The source side: the precopy coordinator and its channel workers."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import mmap
import os
import secrets
import socket
import ssl
import statistics
import threading
import time
from dataclasses import replace
from multiprocessing.connection import wait as mp_wait
from typing import Any, Callable, Iterator

import numpy as np

from . import auth
from .config import MigrationConfig
from ._shm import Segment, unique_name
from .digest import fingerprint_pages, fingerprint_some
from .file_worker import file_spec, present_offsets, saver_main
from .errors import (
    AuthenticationError,
    ChannelBroken,
    ChannelError,
    ChannelClosed,
    CommitUnknown,
    ConfigError,
    ConvergenceError,
    MigrationCancelled,
    MigrationError,
    RemoteProtocolError,
    RingClosed,
    RingTimeout,
    VerificationError,
)
from .channels import Channel, ChannelGroup
from .messages import Scanned
from .methods import get_method
from .pageprint import fingerprint_extents, fingerprint_rows, key_from_seed, session_seed, split_ranges
from .pacing import AutoConverge, BandwidthWindow, StallDetector, TokenBucket, rounds_to_converge
from .ram import GuestRAM
from .ring import KIND_DATA, KIND_EOS, KIND_SCAN, KIND_SYNC, KIND_ZERO, Ring
from .pool import WorkerPool
from .processes import JOIN_GRACE, mp_context, start_worker, worker_start_method
from .savefile import STATE_OFFSET, SaveLayout, SaveState, encode_state, pack_bitmap, pack_digests
from .stats import DirtyRateEstimate, EventHub, MigrationResult, SaveResult
from .tracking import DirtyTracker, ScanningTracker, make_tracker
from .peers import untrusted_peer
from .transport import Address, connect, format_address, is_loopback, parse_address, read_available, recv_exact
from .wire import (
    CONTROL_CHANNEL,
    MAX_CONTROL_BODY,
    HELLO_FLAG_AUTH,
    KIND_CONTROL,
    KIND_DATA as HELLO_DATA,
    KIND_STREAM,
    REPAIR_CHUNK_PAGES,
    BlockSpec,
    Cancel,
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
    ChannelLost,
    RoundAck,
    RoundEnd,
    Verify,
    encode_control,
    encode_hello,
)
from .worker import (
    C_NORMAL,
    C_WIRE_BYTES,
    C_ZERO,
    PageRecords,
    WorkerSpec,
    sender_main,
)

__all__ = ["Source"]

log = logging.getLogger("mpmultifd.source")

# round trips and wake-ups of a switchover (EOS, RESULT, COMMIT and its acknowledgement)
_SWITCH_LATENCY = 0.01
# the VERIFY message and the destination's comparison, per page of the region
_COMPARE_SECONDS_PER_PAGE = 20e-9
# pages each worker fingerprints per round to price the pause's verification pass
_CALIBRATION_PAGES = 4096
# the pause's verification pass against its calibration (tools/bench_downtime.py, 1 GiB, map tracker)
_PAUSE_CONTENTION = 1.25


_FINGERPRINT_COST: dict[int, float] = {}


def _fingerprint_seconds_per_page(page_size: int) -> float:
    """What fingerprinting one page costs on this machine, timed once on a private buffer.

    Times the keyed 32-bit fingerprint (migrations' scans and verification),
    the dearer of the two kinds, so the estimate errs on the long side.
    """
    cost = _FINGERPRINT_COST.get(page_size)
    if cost is None:
        n = max(1, (2 << 20) // page_size)
        buf = np.ones((n, page_size), dtype=np.uint8)  # touched now, not inside the timing
        key = key_from_seed(b"timing", page_size)
        out = np.empty(n, dtype=np.uint64)
        fingerprint_rows(buf, key, out)
        # the best of several short passes: what the pass costs, not how often this process was preempted
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            fingerprint_rows(buf, key, out)
            best = min(best, time.perf_counter() - t0)
        cost = _FINGERPRINT_COST[page_size] = best / n
    return cost


def _skip_pages(extents: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """``extents`` without their first ``n`` pages."""
    out = []
    for f, e in extents:
        if n >= e - f:
            n -= e - f
            continue
        out.append((f + n, e))
        n = 0
    return out


def _take_pages(extents: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The first ``n`` pages of ``extents``, as extents."""
    out: list[tuple[int, int]] = []
    for f, e in extents:
        if n <= 0:
            break
        take = min(e - f, n)
        out.append((f, f + take))
        n -= take
    return out


def _block_fingerprints(ram: GuestRAM, block: int) -> np.ndarray:
    """Fingerprints of every page of a block, reading only pages with data (a hole's is 0, a zero page's)."""
    pages = ram.pages(block)
    out = np.zeros(len(pages), dtype=np.uint64)
    for first, end in ram.data_extents(block):
        out[first:end] = fingerprint_pages(pages[first:end])
    return out


def _save_temp(path: str) -> tuple[int, str]:
    """A new file for a save beside ``path``: created exclusively (never through a symlink), mode 0600.

    The save is written there and renamed over ``path`` only once complete and
    synced, so a failed save never touches a previous one, and a symlink at
    ``path`` is replaced rather than written through.
    """
    where = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    if not base:
        raise ConfigError(f"path: {path!r} names a directory, not a save file")
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(16):
        tmp = os.path.join(where, f".{base[:200]}.{secrets.token_hex(6)}.part")
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, 0o600)  # whatever the umask left, guest bytes are for the owner only
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return fd, tmp
    raise FileExistsError(f"cannot create a fresh temporary file beside {path!r}")


def _fsync_dir(path: str) -> None:
    """Make a new file's directory entry durable too."""
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _compression_stats(per_channel: list[dict[str, int]]) -> dict[str, Any]:
    """How many data packets went compressed and how many raw, and the ratio achieved."""
    encoded = sum(c["compressed-packets"] for c in per_channel)
    raw = sum(c["raw-packets"] for c in per_channel)
    raw_in = sum(c["compressed-input-bytes"] for c in per_channel)
    payload = sum(c["payload-bytes"] for c in per_channel)
    return {"compressed-packets": encoded, "raw-packets": raw, "compressed-input-bytes": raw_in, "payload-bytes": payload}


def _host_of(address: Any) -> str | None:
    return address[0] if isinstance(address, tuple) else None


class _AdmissionDropped(Exception):
    """The destination closed a connection before welcoming it: worth another try (``error`` if not)."""

    def __init__(self, error: MigrationError) -> None:
        super().__init__(str(error))
        self.error = error


class Source:
    """Migrates a :class:`GuestRAM` to a :class:`~mpmultifd.Destination` while its owner keeps writing.

    ``migrate()`` blocks the calling thread, which runs the precopy loop;
    ``query()`` and ``cancel()`` may be called from any other thread meanwhile.
    A Source runs one migration at a time; workers it starts end with the
    migration, and ``close()`` releases whatever is left. With ``pool``, a
    :class:`~mpmultifd.pool.WorkerPool` of the caller's, the channel workers
    are borrowed from it (no process start) and given back at the end.
    """

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
        self._control: socket.socket | None = None
        self._opening: socket.socket | None = None  # a connection in its handshake
        self._decoder = ControlDecoder(max_verify=MAX_CONTROL_BODY)  # a source receives no VERIFY
        self._mac: ControlMac | None = None  # authenticates control frames when there is a key
        self._early: list[Any] = []
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
            raise self._raised(exc)
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
        opening = self._opening
        if opening is not None:
            try:
                opening.shutdown(socket.SHUT_RDWR)  # wakes a handshake blocked in recv
            except OSError:
                pass

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
            fd, tmp = _save_temp(path)
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
            raise self._raised(exc)
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
        ps = self.ram.page_size
        bad: dict[str, list[int]] = {}
        for b, entry, mine, fp in zip(self.ram.blocks, layout.blocks, maps, prints):
            untracked = np.flatnonzero((mine == 0) & (fp != 0))  # data the file never got
            mm = mmap.mmap(fd, entry.npages * ps, mmap.MAP_SHARED, mmap.PROT_READ, offset=entry.data_offset)
            try:
                file_pages = np.frombuffer(mm, dtype=np.uint8).reshape(entry.npages, ps)
                have = fingerprint_some(file_pages, np.flatnonzero(mine))
                wrong = np.flatnonzero((mine != 0) & (have != fp))
                del file_pages
            finally:
                mm.close()
            pages = np.union1d(untracked, wrong)
            if len(pages):
                bad[b.name] = pages[:32].tolist()
        if bad:
            raise VerificationError(
                "the save file differs from the paused guest in "
                + ", ".join(f"block {k!r} pages {v}" for k, v in bad.items())
                + f": pages changed without the {self.config.dirty_tracker!r} tracker seeing them "
                "(a writer that does not mark its pages needs dirty_tracker='scan')",
                mismatches=bad,
            )

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
        self._wait_done()
        # the digests are of the paused guest's RAM itself: the file is checked against them
        # (here, with verify, and by every restore)
        prints = [_block_fingerprints(ram, b.index) for b in ram.blocks]
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
        _fsync_dir(path)
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
        if not (isinstance(duration, (int, float)) and 0 < duration < 3600):
            raise ConfigError(f"duration: {duration!r} is not a number of seconds in (0, 3600)")
        if not (isinstance(interval, (int, float)) and 0 < interval <= duration):
            raise ConfigError(f"interval: {interval!r} is not a number of seconds in (0, duration]")
        with self._lock:
            if self._closed or self._running:
                raise MigrationError("estimate() needs an idle, open Source")
            self._running = True
        try:
            if self.config.dirty_tracker == "kernel" and self._tracker is not None and self._tracker.started:
                raise MigrationError(
                    "estimate(): the kernel tracker of this region is busy tracking the changes since the last "
                    "save (for a top-up); a region takes one kernel tracker at a time"
                )
            tracker = make_tracker(self.config.dirty_tracker, self.ram)
            taken: list[list[np.ndarray]] = []
            samples: list[float] = []
            try:
                if tracker.name == "map":
                    # marks made before the estimate (since a save, say) are given back afterwards too
                    taken.append([self.ram.snapshot_dirty(b.index) for b in self.ram.blocks])
                tracker.start()
                t_prev = t0 = time.monotonic()
                while True:
                    wake = min(t_prev + interval, t0 + duration)
                    while (left := wake - time.monotonic()) > 0:
                        time.sleep(min(left, 0.05))
                        self._check_cancel()
                    got = tracker.collect_all()
                    now = time.monotonic()
                    taken.append(got)
                    samples.append(sum(len(g) for g in got) * self.ram.page_size / (now - t_prev))
                    t_prev = now
                    if now >= t0 + duration - 1e-3:
                        break
                scan = tracker.seconds
            finally:
                tracker.close()
                if tracker.name == "map":  # give the marks back
                    for i, dm in enumerate(self.ram.dirty_map(b.index) for b in self.ram.blocks):
                        for got in taken:
                            dm[got[i]] = 1
            rate = float(np.median(samples))
            limit = self._downtime_limit if downtime_limit is None else downtime_limit
            forecast = (
                rounds_to_converge(self.ram.total_size, rate, bandwidth, limit, self.config.max_rounds)
                if bandwidth
                else None
            )
            return DirtyRateEstimate(
                dirty_rate=rate,
                samples=tuple(samples),
                interval=interval,
                duration=duration,
                tracker=tracker.name,
                tracker_seconds=scan,
                total=self.ram.total_size,
                page_size=self.ram.page_size,
                bandwidth=bandwidth,
                downtime_limit=limit,
                converges=None if forecast is None else forecast.converges,
                rounds=None if forecast is None else forecast.rounds,
                expected_downtime=None if forecast is None else forecast.expected_downtime,
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

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def _channels(self) -> list[Channel]:
        """This run's channels (fault-injection tests pick a worker to kill from them)."""
        return self._group.channels

    # ------------------------------------------------------------------ state

    def _reset_stats(self) -> None:
        self._t_start: float | None = None
        self._t_end: float | None = None
        self._paused_at: float | None = None
        self._setup_time = 0.0
        self._downtime: float | None = None
        self._expected_downtime = 0.0
        self._remaining_pages = self.ram.total_pages
        self._dirty_rate = 0.0
        self._dirty_syncs = 0
        self._round = 0
        self._error: BaseException | None = None
        # the channel workers of this run (a fresh group each run: the last one's counts stay readable)
        self._group = ChannelGroup(
            "worker process", on_failure=self._channel_failed, on_scanned=self._scanned, keep_log=bool(self.config.channel_retries)
        )
        self._progress_max = 0.0
        self._round_end_bytes: dict[int, int] = {}
        self._retries_left = self.config.channel_retries
        self._reconnects = 0
        self._resumes: dict[int, int] = {}
        self._zerocopy_reason: str | None = None
        self._confirmed_round = -1
        self._throttle_percent = 0
        self._throttle_max = 0
        self._throttle_cb: Callable[[int], Any] | None = None
        self._sync_seconds = 0.0
        self._pages_pushed = 0
        self._next_channel = 0  # where the next tie between equally empty rings starts
        self._stall_reason: str | None = None
        self._before_commit: Callable[[Callable[[], socket.socket]], Any] | None = None
        self._commit_sent = False
        self._repaired_pages = 0
        self._repair_passes = 0
        self._pause_phases: dict[str, float] = {}
        # scan jobs handed to workers and not reported done: id -> (block, extents, channel, generation)
        self._scan_pending: dict[int, tuple[int, list[tuple[int, int]], Channel, int]] = {}
        self._scan_job_seq = 0
        self._scan_seconds_per_page: float | None = None  # measured by the latest scan
        self._worker_spp: dict[int, list[float]] = {}  # channel -> seconds per page of its latest scan jobs

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
        if isinstance(exc, CommitUnknown):
            self._error = exc
            self._set_status("commit-unknown")
            log.error("migration outcome unknown: %s", exc)
            return exc
        if isinstance(exc, MigrationCancelled) or (self._cancel_requested and not isinstance(exc, MigrationError)):
            err: MigrationError = exc if isinstance(exc, MigrationCancelled) else MigrationCancelled("cancelled")
            self._set_status("cancelled")
        else:
            if isinstance(exc, MigrationError):
                err = exc
            elif isinstance(exc, OSError):
                err = ChannelBroken(f"{type(exc).__name__}: {exc}")
            else:
                err = MigrationError(f"{type(exc).__name__}: {exc}")
            self._set_status("failed")
        self._error = err
        log.warning("migration %s: %s", self._status, err)
        return err

    # ------------------------------------------------------------------ the run

    def _run(self, address: Address, pause: Callable[[], Any] | None, top_up: bool) -> MigrationResult:
        cfg = self.config
        ram = self.ram
        session = secrets.token_bytes(16)
        self._check_cancel()
        ctrl = self._open(address, Hello(KIND_CONTROL, session, CONTROL_CHANNEL, cfg.channels))
        self._control = ctrl
        # with a key every control frame is authenticated: a relay cannot change VERIFY, RESULT or COMMIT
        self._mac = ControlMac(cfg.auth_key, session, "source") if cfg.auth_key is not None else None
        self._decoder = ControlDecoder(mac=self._mac)
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
        ctrl.sendall(encode_control(config_msg, self._mac))
        ctrl.setblocking(False)
        reply = self._next_control(time.monotonic() + cfg.timeout, "the destination's answer to the configuration")
        if not isinstance(reply, ConfigAck):
            raise RemoteProtocolError(f"expected CONFIG_ACK, got {type(reply).__name__}", field="type")
        # both ends derive the verification key from the session (and the auth key): it never
        # crosses the wire, so a relay without the key cannot match a page it changed
        self._verify_key = key_from_seed(session_seed(cfg.auth_key, session, 0), ram.page_size)
        npages = tuple(b.npages for b in ram.blocks)
        self._records = PageRecords(Segment.create(unique_name("prt"), PageRecords.size(npages)), npages)
        tracker = self._migration_tracker(top_up)
        self._start_channels(address, session)
        # every worker attached: the rings' names are dropped, so a crash of this process leaves none behind
        self._group.wait_ready(time.monotonic() + cfg.timeout, self._pump, "channel workers")
        if not cfg.channel_retries:
            self._records.seg.unlink()  # a replacement worker would attach by name
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
            tracker.scanner = self._parallel_scan
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
        """Connect and pass admission; a destination that drops the connection before its welcome
        (it cuts off the oldest handshakes when flooded) is tried again until ``timeout`` runs out."""
        deadline = time.monotonic() + self.config.timeout
        delay = 0.02
        while True:
            try:
                return self._open_once(address, hello)
            except _AdmissionDropped as e:
                if time.monotonic() + delay >= deadline:
                    raise e.error from e.error.__cause__
                log.info("%s; trying again", e.error)
                time.sleep(delay)
                self._check_cancel()
                delay = min(2 * delay, 0.5)

    def _open_once(self, address: Address, hello: Hello) -> socket.socket:
        """Connect and pass admission: greeting, hello (with a proof of the key), welcome."""
        cfg = self.config
        key = cfg.auth_key
        what = {KIND_CONTROL: "control connection", KIND_STREAM: "stream connection"}.get(
            hello.kind, f"data channel {hello.channel}"
        )
        vouch = key is None and not cfg.allow_unauthenticated and not _tls_verifies(cfg.tls)
        if vouch:
            _keyless_address_check(address, what)  # before connecting: a remote address is refused outright
        sock = connect(address, cfg.timeout)
        self._opening = sock
        try:
            self._check_cancel()
            sock.settimeout(cfg.timeout)
            if cfg.tls is not None:
                sock = cfg.tls.wrap_socket(sock, server_hostname=cfg.tls_hostname or _host_of(address))
            try:
                greeting = auth.decode_greeting(recv_exact(sock, auth.GREETING_SIZE))
            except ChannelClosed:
                raise _AdmissionDropped(
                    ChannelClosed(f"{what}: the destination closed the connection before greeting")
                ) from None
            if vouch:
                _keyless_peer_check(sock, address, what)  # nothing but the connection itself sent yet
            if greeting.auth_required and key is None:
                raise AuthenticationError(
                    f"{what}: the destination requires an auth key; set MigrationConfig(auth_key=...)"
                )
            if key is not None and not greeting.auth_required:
                raise AuthenticationError(
                    f"{what}: the destination does not authenticate connections; refusing to send pages "
                    "to a peer that cannot prove it holds the key"
                )
            if key is None:
                hello_bytes = encode_hello(hello)
                sock.sendall(hello_bytes)
            else:
                hello_bytes = encode_hello(replace(hello, flags=HELLO_FLAG_AUTH))
                nonce = auth.new_nonce()
                sock.sendall(hello_bytes + nonce + auth.client_proof(key, greeting.nonce, nonce, hello_bytes))
            try:
                proof = auth.decode_welcome(recv_exact(sock, auth.WELCOME_SIZE))
            except ChannelClosed:
                raise _AdmissionDropped(
                    ChannelClosed(f"{what}: the destination closed the connection after our hello")
                ) from None
            if key is not None and not hmac.compare_digest(
                proof, auth.server_proof(key, greeting.nonce, nonce, hello_bytes)
            ):
                raise AuthenticationError(f"{what}: the destination failed to prove it holds the key")
            sock.settimeout(None)
            self._check_cancel()
            return sock
        except AuthenticationError as e:
            sock.close()
            if e.channel is None and hello.kind == HELLO_DATA:
                e.channel = hello.channel
            raise
        except _AdmissionDropped:
            sock.close()
            self._check_cancel()
            raise
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError) as e:
            # the destination dropped us during admission (a flood made it cut off the oldest attempts)
            sock.close()
            self._check_cancel()
            err = ChannelBroken(f"{what}: the destination dropped the connection during admission: {e}")
            err.__cause__ = e
            raise _AdmissionDropped(err) from e
        except ssl.SSLError as e:
            sock.close()
            raise AuthenticationError(f"{what}: TLS handshake failed: {e}") from e
        except OSError as e:
            sock.close()
            self._check_cancel()
            raise ChannelBroken(f"{what}: {e}") from e
        except BaseException as e:
            sock.close()
            if not isinstance(e, MigrationCancelled):
                self._check_cancel()  # a cancel that broke the handshake wins over what it broke
            raise
        finally:
            self._opening = None

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
        spec_base = dict(
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

    def _fingerprint_cost(self, save: bool) -> float:
        """Seconds the pause will spend fingerprinting pages, beyond the last dirty sync.

        A save fingerprints the paused guest here for its digests. A migration
        with ``verify`` fingerprints it in the workers, in parallel (nothing
        extra when the scanning tracker's final scan serves); the destination
        fingerprinted each page as it arrived and only compares arrays.
        """
        ram = self.ram
        pages = sum(e - f for b in ram.blocks for f, e in ram.data_extents(b.index))
        per_page = _fingerprint_seconds_per_page(ram.page_size)
        if save:
            return per_page * pages
        cost = _SWITCH_LATENCY + _COMPARE_SECONDS_PER_PAGE * ram.total_pages
        if not isinstance(self._tracker, ScanningTracker):
            workers = max(1, len(self._usable_for_scans()) or self.config.channels)
            # the slowest worker's measured pace, when the workers have scanned (see _calibrate_scans)
            measured = max(statistics.median(v) for v in self._worker_spp.values()) if self._worker_spp else None
            if measured is not None:
                # in the pause the pass shares the CPUs with the final round's receivers, and reads
                # from memory what a calibration slice may find in cache: 1 GiB measured 10-25% above
                cost += _PAUSE_CONTENTION * measured * -(-pages // workers)
            else:
                cost += per_page * pages / max(1, min(workers, os.cpu_count() or 1))
        return cost

    def _calibrate_scans(self, rnd: int) -> None:
        """Every idle worker fingerprints a slice of the region's data (a different one each round)
        and reports how long it took: the pause's verification pass is priced from that."""
        ram = self.ram
        usable = self._usable_for_scans()
        if not usable or self._records is None:
            return
        ids = []
        for i, ch in enumerate(usable):
            block = ram.blocks[(rnd + i) % len(ram.blocks)]
            extents = ram.data_extents(block.index)
            total = sum(e - f for f, e in extents)
            if total == 0:
                continue
            n = min(_CALIBRATION_PAGES, total)
            start = ((rnd * len(usable) + i) * n) % (total - n + 1)  # a different slice each time
            ids += self._queue_scan(ch, block.index, _take_pages(_skip_pages(extents, start), n))
        self._finish_scans(time.monotonic() + self.config.timeout, ids)

    def _precopy(
        self, top_up: bool = False, save: bool = False, tracker: DirtyTracker | None = None
    ) -> tuple[int, list[np.ndarray], bool]:
        """Run precopy rounds until the rest fits the downtime limit; returns (next round, pages left, converged)."""
        cfg = self.config
        ram = self.ram
        ps = ram.page_size
        self._packet_num = 0
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
                pending, holes = self._split_holes()
        self._sync_seconds += time.perf_counter() - t_sync
        rnd = 0
        fingerprint_cost = self._fingerprint_cost(save) if (cfg.verify or save) else 0.0
        window = BandwidthWindow()
        auto = AutoConverge(
            cfg.cpu_throttle_initial, cfg.cpu_throttle_increment, cfg.max_cpu_throttle, cfg.throttle_trigger_threshold
        )
        stall = StallDetector(cfg.stall_rounds)
        converged = True
        while True:
            t_round = time.monotonic()
            before = self._wire_bytes()
            self._round = rnd
            self._send_round(rnd, pending, final=False, known_zero=holes if rnd == 0 else None)
            self._wait_synced(rnd)
            elapsed = time.monotonic() - t_round
            sent = self._wire_bytes() - before
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
                self._calibrate_scans(rnd)
                fingerprint_cost = self._fingerprint_cost(save)
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
        self._send_round(rnd, final, final=True, before_end=self._queue_verify_scans if by_workers else None)
        self._wait_done()
        t = self._phase("final-round", t)
        verified_prints: list[np.ndarray] = []
        if cfg.verify:
            records = self._records
            assert records is not None
            if by_workers:
                self._finish_scans(time.monotonic() + cfg.timeout)
            elif not reuse_scan:
                for b in ram.blocks:
                    records.scanned[b.index][:] = 0
                    fingerprint_extents(ram.pages(b.index), ram.data_extents(b.index), self._verify_key, records.scanned[b.index])
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
        if msg.attempt != self._repair_passes + 1:
            raise RemoteProtocolError(
                f"REPAIR pass {msg.attempt} after pass {self._repair_passes}", field="attempt"
            )
        self._repair_passes = msg.attempt
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
        ctrl = self._control
        assert ctrl is not None
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
                msg = self._early.pop(0) if self._early else self._decoder.next_message()
                if msg is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ChannelBroken(f"no acknowledgement within {cfg.timeout:g} s")
                    pending_tls = isinstance(ctrl, ssl.SSLSocket) and ctrl.pending()
                    if pending_tls or mp_wait([ctrl], min(left, 0.5)):
                        self._read_control()
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

    def _usable_for_scans(self) -> list[Channel]:
        return [ch for ch in self._group.channels if ch.ready and not ch.done and not ch.reconnecting and ch.sock is not None]

    def _parallel_scan(self, block: int, out: np.ndarray) -> None:
        """Fingerprint every page of ``block`` that holds data into ``out`` (the shared scan record),
        holes as 0, spread over the idle channel workers (and this thread, with a CPU to spare)."""
        t0 = time.perf_counter()
        ram = self.ram
        extents = ram.data_extents(block)
        out[:] = 0
        npages = sum(e - f for f, e in extents)
        usable = self._usable_for_scans()
        local = len(usable) < (os.cpu_count() or 1) or not usable
        parts = split_ranges(extents, len(usable) + (1 if local else 0))
        jobs = []
        for ch, part in zip(usable, parts):
            jobs += self._queue_scan(ch, block, part)
        for part in parts[len(usable) :]:
            fingerprint_extents(ram.pages(block), part, self._print_key(), out)
        self._finish_scans(time.monotonic() + self.config.timeout, jobs)
        if npages:
            self._scan_seconds_per_page = (time.perf_counter() - t0) / npages

    def _queue_verify_scans(self) -> None:
        """Before the final EOS: every worker fingerprints its share of the paused guest."""
        assert self._records is not None
        usable = self._usable_for_scans()
        for b in self.ram.blocks:
            self._records.scanned[b.index][:] = 0
            parts = split_ranges(self.ram.data_extents(b.index), len(usable))
            for ch, part in zip(usable, parts):
                self._queue_scan(ch, b.index, part)

    def _queue_scan(self, ch: Channel, block: int, extents: list[tuple[int, int]]) -> list[int]:
        """Hand ``extents`` of ``block`` to ``ch``'s worker as scan jobs; returns their ids."""
        per_job = max(1, ch.ring.capacity // 2)
        ids = []
        for s in range(0, len(extents), per_job):
            part = extents[s : s + per_job]
            jid = self._scan_job_seq
            self._scan_job_seq += 1
            self._scan_pending[jid] = (block, part, ch, ch.generation)
            ids.append(jid)
            pairs = np.asarray(part, dtype=np.uint64).reshape(-1)
            while True:
                try:
                    ch.ring.push(KIND_SCAN, block, jid, 0, pairs, timeout=0.1)
                    break
                except RingTimeout:
                    self._pump(0)
                except RingClosed:
                    break  # the worker is gone: _finish_scans does this job here
        return ids

    def _finish_scans(self, deadline: float, ids: list[int] | None = None) -> None:
        """Wait for scan jobs; any whose worker died, was replaced or ran out of time is done here."""
        pending = self._scan_pending
        want = list(pending) if ids is None else ids
        while any(j in pending for j in want) and time.monotonic() < deadline:
            lost = [j for j in want if j in pending and (pending[j][2].generation != pending[j][3] or pending[j][2].done)]
            if lost and len(lost) == sum(1 for j in want if j in pending):
                break
            self._pump(0.2)
        key = self._print_key()
        assert self._records is not None
        for j in want:
            job = pending.pop(j, None)
            if job is not None:
                block, part, _, _ = job
                fingerprint_extents(self.ram.pages(block), part, key, self._records.scanned[block])

    # ------------------------------------------------------------------ rounds

    def _wire_bytes(self) -> int:
        return self._group.wire_bytes()

    def _split_holes(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every page of every block, as (pages with data, holes) per block."""
        data, holes = [], []
        for b in self.ram.blocks:
            mask = np.zeros(b.npages, dtype=bool)
            for first, end in self.ram.data_extents(b.index):
                mask[first:end] = True
            data.append(np.flatnonzero(mask).astype(np.int64, copy=False))
            holes.append(np.flatnonzero(~mask).astype(np.int64, copy=False))
        return data, holes

    def _send_round(
        self,
        rnd: int,
        pending: list[np.ndarray],
        *,
        final: bool,
        before_end: Callable[[], None] | None = None,
        known_zero: list[np.ndarray] | None = None,
    ) -> None:
        """Cut the round's pages into batches and hand them to the emptiest rings, then SYNC (or EOS)."""
        chans = self._group.channels
        n = self.config.packet_pages
        for ch in chans:
            ch.packets_in_round = 0
        ps = self.ram.page_size
        paced = not final  # the final round runs with the guest paused: no cap (as QEMU)
        batches = [(KIND_DATA, block, pages) for block, pages in enumerate(pending)]
        if known_zero is not None:
            batches += [(KIND_ZERO, block, pages) for block, pages in enumerate(known_zero)]
        for kind, block, pages in batches:
            for first in range(0, len(pages), n):
                batch = pages[first : first + n]
                if paced and self._max_bandwidth is not None:
                    self._wait_for_budget(len(batch) * ps if kind == KIND_DATA else 8 * len(batch))
                # the emptiest ring; ties go round the channels, not always to channel 0 (a paced
                # round would otherwise leave the others idle)
                turn = self._next_channel % len(chans)
                ch = min(chans[turn:] + chans[:turn], key=lambda c: len(c.ring))
                self._next_channel = ch.index + 1
                self._push(ch, kind, block, rnd, batch)
                self._pages_pushed += len(batch)
                ch.packets_in_round += 1
        if before_end is not None:
            before_end()
        kind = KIND_EOS if final else KIND_SYNC
        for ch in chans:
            self._push(ch, kind, 0, rnd, None)
        counts = tuple(ch.packets_in_round for ch in chans)
        if self._control is not None:  # a save has no destination to tell
            self._control_send(Complete(rnd, counts) if final else RoundEnd(rnd, counts))

    def _wait_for_budget(self, nbytes: int) -> None:
        """Hold the next batch until the shared token bucket has room for it."""
        ps = self.ram.page_size
        while self._max_bandwidth is not None:
            wire = done = 0
            for ch in self._group.channels:
                c, base = ch.ring.counters, ch.counter_base
                wire += int(c[C_WIRE_BYTES]) + base.get("bytes", 0)
                done += int(c[C_NORMAL]) + int(c[C_ZERO]) + base.get("normal", 0) + base.get("duplicate", 0)
            # bytes sent, plus batches queued but not sent yet at their full size
            # (resent batches after a reconnect make done run ahead: never negative)
            used = wire + max(self._pages_pushed - done, 0) * ps + nbytes
            wait = self._bucket.delay(used, time.monotonic())
            if wait <= 0:
                return
            self._pump(min(wait, 0.05))

    def _push(self, ch: Channel, kind: int, block: int, rnd: int, pages: np.ndarray | None) -> None:
        num = self._packet_num
        self._packet_num += 1
        self._group.push(ch, (kind, block, rnd, num, pages), self._pump)

    def _wait_synced(self, rnd: int) -> None:
        while any(ch.synced < rnd for ch in self._group.channels):
            self._pump(1.0)

    def _wait_confirmed(self, rnd: int) -> None:
        """Wait until the destination passed round ``rnd``'s barrier (its ROUND_ACK)."""
        deadline = time.monotonic() + self.config.timeout
        while self._confirmed_round < rnd:
            if time.monotonic() > deadline:
                raise ChannelBroken(
                    f"the destination did not confirm round {rnd} within {self.config.timeout:g} s of it being sent"
                )
            self._pump(0.05)

    def _wait_done(self) -> None:
        while not all(ch.done for ch in self._group.channels):
            self._pump(1.0)

    # ------------------------------------------------------------------ events

    def _check_cancel(self) -> None:
        if self._cancel_requested:
            raise MigrationCancelled("cancelled")

    def _pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` for worker, control or cancel events and handle them; raises on failure."""
        self._check_cancel()
        group = self._group
        ctrl = self._control
        ready = group.wait([self._wake_r] + ([ctrl] if ctrl is not None else []), timeout)
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
        if self._control is not None and self._control in ready:
            self._read_control()
            msg = self._decoder.next_message()
            while msg is not None:
                self._control_message(msg)
                msg = self._decoder.next_message()
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

    def _scanned(self, ch: Channel, msg: Scanned) -> None:
        self._scan_pending.pop(msg.job, None)
        if msg.pages > 0:
            # seconds per page as that worker ran it; its last three, so one preempted job does not count alone
            samples = self._worker_spp.setdefault(ch.index, [])
            samples.append(msg.seconds / msg.pages)
            del samples[:-3]

    def _read_control(self) -> None:
        assert self._control is not None
        self._decoder.feed(read_available(self._control, "the destination"))

    def _control_message(self, msg: Any) -> None:
        if isinstance(msg, ErrorMessage):
            raise MigrationError(f"destination failed: {msg.message}", channel=msg.channel)
        if isinstance(msg, RoundAck):
            self._confirmed_round = max(self._confirmed_round, msg.round)
            self._group.confirm(msg.round)  # the destination holds those rounds: no resend needed
            return
        if isinstance(msg, Resume):
            if not 0 <= msg.channel < len(self._group):
                raise RemoteProtocolError(f"RESUME for channel {msg.channel}", field="channel")
            self._resumes[msg.channel] = msg.round
            return
        if isinstance(msg, ChannelLost):
            if not 0 <= msg.channel < len(self._group):
                raise RemoteProtocolError(f"CHANNEL_LOST for channel {msg.channel}", field="channel")
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
            msg = self._decoder.next_message()
            if msg is not None:
                self._control_message(msg)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelBroken(f"timed out waiting for {what}")
            self._pump(min(left, 1.0))

    def _control_send(self, msg: Any) -> None:
        assert self._control is not None
        data = memoryview(encode_control(msg, self._mac))
        while data:
            try:
                n = self._control.send(data)
                data = data[n:]
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                mp_wait([self._control], 0.1)  # a big VERIFY can fill the buffer
                self._pump(0)
            except OSError as e:
                raise ChannelBroken(f"control connection failed: {e}") from e

    # ------------------------------------------------------------------ teardown

    def _shutdown(self, error: BaseException | None) -> None:
        """Tell the destination why (if it is not committed), stop the workers, release everything."""
        if error is not None:
            self._group.fail(error)
        ctrl, self._control = self._control, None
        if error is not None and ctrl is not None and not self._commit_sent:
            msg = Cancel() if isinstance(error, MigrationCancelled) or self._cancel_requested else ErrorMessage(
                "source-failed", str(error)[:1000]
            )
            try:
                ctrl.setblocking(True)
                ctrl.settimeout(0.5)
                ctrl.sendall(encode_control(msg, self._mac))
            except OSError:
                pass
        self._group.shutdown()  # keeps the last counters for query()
        if ctrl is not None:
            ctrl.close()
        self._decoder = ControlDecoder(max_verify=MAX_CONTROL_BODY)  # a source receives no VERIFY
        self._mac = None
        self._early = []


_KEYLESS_HINT = (
    "set MigrationConfig(auth_key=...) on both ends, use TLS that checks the destination's certificate, "
    "or opt out with allow_unauthenticated=True"
)


def _tls_verifies(ctx: Any) -> bool:
    """A TLS context that checks the destination's certificate authenticates it without a key."""
    return ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED


def _keyless_address_check(address: Address, what: str) -> None:
    """Without a key, pages go only to this host: a literal non-loopback IP is refused before connecting."""
    family, addr = parse_address(address)
    if family == socket.AF_UNIX or is_loopback(address):
        return
    try:
        ipaddress.ip_address(addr[0].split("%", 1)[0])
    except ValueError:
        return  # a host name: the address it resolves to is checked once connected
    raise AuthenticationError(
        f"{what}: refusing to send pages without a key to {format_address(address)}, a destination that "
        f"cannot be authenticated; {_KEYLESS_HINT}"
    )


def _keyless_peer_check(sock: socket.socket, address: Address, what: str) -> None:
    """Without a key, the destination must be on this host (loopback or a Unix socket) and run as our user."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = sock.getpeername()[0]
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if not ip.is_loopback:
            raise AuthenticationError(
                f"{what}: refusing to send pages without a key to {format_address(address)} ({host}), "
                f"a destination that cannot be authenticated; {_KEYLESS_HINT}"
            )
    stranger = untrusted_peer(sock)
    if stranger is not None:
        raise AuthenticationError(
            f"{what}: the destination at {format_address(address)} is not run by this user "
            f"(uid {os.geteuid()}): {stranger}; without a key, pages go only to a local destination of "
            f"the same user; {_KEYLESS_HINT}"
        )
