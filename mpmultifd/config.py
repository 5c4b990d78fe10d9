"""MigrationConfig: the typed, frozen, validated knobs of a migration."""

from __future__ import annotations

import dataclasses
import math
import ssl
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .wire import MAX_CHANNELS, MAX_PACKET_PAGES

__all__ = ["MigrationConfig", "START_METHODS"]

START_METHODS = ("forkserver", "spawn", "fork")
_ZEROCOPY = ("auto", "on", "off")
_ZERO_PAGE = ("multifd", "none")
DIRTY_TRACKERS = ("map", "scan", "kernel")


@dataclass(frozen=True)
class MigrationConfig:
    """How a migration runs. Both ends take one; the source's choices travel to the destination.

    Attributes:
        channels: data channels, each a socket driven by its own worker process
            (QEMU's ``multifd-channels``; its default is 2).
        compression: payload method by name: ``"none"`` or any registered method.
        compression_level: method-specific level, ``None`` for the method's default.
        zero_page: ``"multifd"`` detects zero pages in the workers and sends only
            their offsets; ``"none"`` sends them as data.
        zerocopy: MSG_ZEROCOPY for raw page sends. ``"auto"`` uses it on TCP to a
            non-loopback address without TLS or compression, and turns a channel back
            to plain sends when the kernel keeps copying anyway; ``"on"`` always uses
            it (refused with compression or TLS); ``"off"`` never does. On loopback
            and between network namespaces the kernel always copies.
        downtime_limit: seconds the guest may stay paused at switchover; the final
            round starts once the remaining dirty bytes fit in it at the measured rate.
        max_bandwidth: bytes per second over all channels, or ``None`` for no cap.
            A token bucket shared by every channel paces the precopy rounds;
            ``Source.set_max_bandwidth`` changes it while a migration runs. The
            final round, while the guest is paused, is not capped (as QEMU).
        max_rounds: the most precopy rounds before giving up on converging: then
            the migration switches over if the expected downtime fits in
            ``stall_downtime_limit``, and fails with ConvergenceError otherwise.
        dirty_tracker: how the source learns which pages changed: ``"map"`` (the
            writers mark the region's dirty map), ``"scan"`` (fingerprint every
            page each round: no cooperation needed, works for a region another
            program writes), or ``"kernel"`` (userfaultfd write-protection and
            PAGEMAP_SCAN, Linux 6.7+, writers must be threads of this process).
        stall_rounds: a stall is this many rounds in a row whose dirty set did not
            shrink below the best seen so far, with the throttle (if any) at its
            maximum. A stall ends precopy as ``max_rounds`` does.
        stall_downtime_limit: the longer downtime (seconds) the caller accepts when
            the migration does not converge; ``None`` fails instead, with a
            ConvergenceError that reports the dirty rate against the bandwidth.
        cpu_throttle_initial, cpu_throttle_increment, max_cpu_throttle: the
            percentages passed to the ``throttle`` callback of ``migrate()``
            (QEMU's auto-converge): first step, each further step, and the cap.
        throttle_trigger_threshold: throttle when a round's dirtied bytes exceed
            this percentage of the bytes it sent, twice in a row (QEMU's rule).
        verify: compare per-page fingerprints of every block at switchover. Pages
            that differ are sent again while the guest is still paused and checked
            again (``repair_passes``); only a repair that does not converge fails the
            migration, naming the pages.
        repair_passes: on the destination, how many times pages that differ at
            switchover may be resent and checked again before the migration fails
            with VerificationError (0: fail at the first difference).
        auth_key: shared secret (bytes, at least 16) that every connection, control
            and data, must prove it knows (HMAC-SHA256 challenge-response bound to
            the session and the channel). Both ends must have the same key.
        tls: an ``ssl.SSLContext`` that wraps every connection, or ``None``: a
            client context (``ssl.PROTOCOL_TLS_CLIENT``) on the source, a server
            context with its certificate on the destination. TLS channel workers
            start with ``fork`` whatever ``start_method`` says, because a TLS
            session cannot be handed to a spawned process; zero-copy is off.
        tls_hostname: the name the source checks the destination's certificate
            against; defaults to the host of the address.
        packet_pages: pages per data packet (512 × 4 KiB = 2 MiB). QEMU uses
            128; each packet costs Python a fixed amount on both ends, so larger
            packets go faster here (README, configuration reference).
        ring_slots: batches queued per channel (a power of two).
        start_method: how worker processes start: ``"forkserver"`` (default, with
            numpy preloaded), ``"spawn"`` or ``"fork"``.
        timeout: seconds allowed for connecting, handshakes and a silent peer
            before the migration fails.
        allow_unauthenticated: without ``auth_key``, a destination refuses to
            listen on a non-loopback address and admits only local peers of its
            own user, and a source sends pages only to a local destination of its
            own user (or one whose TLS certificate it checks), unless this is True.
        channel_retries: how many times a broken data channel may be reconnected
            during one migration (0: a broken channel fails the migration). The
            source reconnects it and resends every packet that channel carried
            since the last round the destination confirmed.
    """

    channels: int = 2
    compression: str = "none"
    compression_level: int | None = None
    zero_page: str = "multifd"
    zerocopy: str = "auto"
    downtime_limit: float = 0.3
    max_bandwidth: int | None = None
    max_rounds: int = 30
    dirty_tracker: str = "map"
    stall_rounds: int = 5
    stall_downtime_limit: float | None = None
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    max_cpu_throttle: int = 99
    throttle_trigger_threshold: int = 50
    verify: bool = True
    repair_passes: int = 3
    auth_key: bytes | None = field(default=None, repr=False)
    tls: Any = None
    tls_hostname: str | None = None
    packet_pages: int = 512
    ring_slots: int = 32
    start_method: str = "forkserver"
    timeout: float = 10.0
    allow_unauthenticated: bool = False
    channel_retries: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}: {why}")

        if not _is_int(self.channels) or not 1 <= self.channels <= MAX_CHANNELS:
            raise bad("channels", f"{self.channels!r} is not a whole number in 1..{MAX_CHANNELS}")
        if not isinstance(self.compression, str) or not self.compression:
            raise bad("compression", f"{self.compression!r} is not a method name")
        if self.compression_level is not None and not _is_int(self.compression_level):
            raise bad("compression_level", f"{self.compression_level!r} is not a whole number or None")
        if self.zero_page not in _ZERO_PAGE:
            raise bad("zero_page", f"{self.zero_page!r} is not one of {', '.join(_ZERO_PAGE)}")
        if self.zerocopy not in _ZEROCOPY:
            raise bad("zerocopy", f"{self.zerocopy!r} is not one of {', '.join(_ZEROCOPY)}")
        if self.zerocopy == "on" and self.compression != "none":
            raise bad(
                "zerocopy",
                f"'on' needs compression='none': compressed packets are built in private buffers, "
                f"not sent from the shared RAM (got compression={self.compression!r}); use zerocopy='auto'",
            )
        if self.zerocopy == "on" and self.tls is not None:
            raise bad("zerocopy", "'on' cannot be combined with TLS: TLS encrypts into its own buffers; use 'auto'")
        if not _is_num(self.downtime_limit) or not 0 < self.downtime_limit < math.inf:
            raise bad("downtime_limit", f"{self.downtime_limit!r} is not a positive number of seconds")
        if self.max_bandwidth is not None and (not _is_int(self.max_bandwidth) or self.max_bandwidth < 4096):
            raise bad(
                "max_bandwidth", f"{self.max_bandwidth!r} is not a whole number of bytes per second >= 4096, or None"
            )
        if not _is_int(self.max_rounds) or self.max_rounds < 1:
            raise bad("max_rounds", f"{self.max_rounds!r} is not a whole number >= 1")
        if self.dirty_tracker not in DIRTY_TRACKERS:
            raise bad("dirty_tracker", f"{self.dirty_tracker!r} is not one of {', '.join(DIRTY_TRACKERS)}")
        if not _is_int(self.stall_rounds) or self.stall_rounds < 1:
            raise bad("stall_rounds", f"{self.stall_rounds!r} is not a whole number >= 1")
        sdl = self.stall_downtime_limit
        if sdl is not None and (not _is_num(sdl) or not sdl >= self.downtime_limit):
            raise bad(
                "stall_downtime_limit",
                f"{sdl!r} is not a number of seconds >= downtime_limit ({self.downtime_limit:g}), "
                "math.inf, or None",
            )
        for name in ("cpu_throttle_initial", "cpu_throttle_increment", "max_cpu_throttle"):
            v = getattr(self, name)
            if not _is_int(v) or not 1 <= v <= 99:
                raise bad(name, f"{v!r} is not a whole percentage in 1..99")
        if self.cpu_throttle_initial > self.max_cpu_throttle:
            raise bad(
                "cpu_throttle_initial",
                f"{self.cpu_throttle_initial} is above max_cpu_throttle ({self.max_cpu_throttle})",
            )
        if not _is_int(self.throttle_trigger_threshold) or not 1 <= self.throttle_trigger_threshold <= 100:
            raise bad(
                "throttle_trigger_threshold", f"{self.throttle_trigger_threshold!r} is not a whole percentage in 1..100"
            )
        if not isinstance(self.verify, bool):
            raise bad("verify", f"{self.verify!r} is not True or False")
        if not _is_int(self.repair_passes) or not 0 <= self.repair_passes <= 16:
            raise bad("repair_passes", f"{self.repair_passes!r} is not a whole number in 0..16")
        if self.auth_key is not None:
            if not isinstance(self.auth_key, (bytes, bytearray)):
                raise bad("auth_key", "must be bytes (read a key file in binary mode)")
            if len(self.auth_key) < 16:
                raise bad("auth_key", f"{len(self.auth_key)} bytes is too short; use at least 16 random bytes")
        if not _is_int(self.channel_retries) or not 0 <= self.channel_retries <= 1000:
            raise bad("channel_retries", f"{self.channel_retries!r} is not a whole number in 0..1000")
        if not isinstance(self.allow_unauthenticated, bool):
            raise bad("allow_unauthenticated", f"{self.allow_unauthenticated!r} is not True or False")
        if self.tls is not None and not isinstance(self.tls, ssl.SSLContext):
            raise bad("tls", f"{type(self.tls).__name__} is not an ssl.SSLContext")
        if self.tls_hostname is not None and not isinstance(self.tls_hostname, str):
            raise bad("tls_hostname", "must be a host name or None")
        if not _is_int(self.packet_pages) or not 1 <= self.packet_pages <= MAX_PACKET_PAGES:
            raise bad("packet_pages", f"{self.packet_pages!r} is not in 1..{MAX_PACKET_PAGES}")
        rs = self.ring_slots
        if not _is_int(rs) or rs < 2 or rs & (rs - 1) or rs > 4096:
            raise bad("ring_slots", f"{rs!r} is not a power of two in 2..4096")
        if self.start_method not in START_METHODS:
            raise bad("start_method", f"{self.start_method!r} is not one of {', '.join(START_METHODS)}")
        if not _is_num(self.timeout) or not 0 < self.timeout < math.inf:
            raise bad("timeout", f"{self.timeout!r} is not a positive number of seconds")

    def replace(self, **changes: Any) -> MigrationConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The configuration in effect, JSON-friendly (secrets are not shown)."""
        # not dataclasses.asdict: it deep-copies, and an SSLContext cannot be copied
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["auth_key"] = None if self.auth_key is None else "<set>"
        out["tls"] = None if self.tls is None else "<SSLContext>"
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
