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
        max_rounds: after this many rounds the migration switches over even if the
            downtime estimate is still above the limit (the result says so).
        verify: compare per-page fingerprints of every block at switchover; a
            mismatch fails the migration and names the pages.
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
        packet_pages: pages per data packet (128 × 4 KiB = 512 KiB, as QEMU).
        ring_slots: batches queued per channel (a power of two).
        start_method: how worker processes start: ``"forkserver"`` (default, with
            numpy preloaded), ``"spawn"`` or ``"fork"``.
        timeout: seconds allowed for connecting, handshakes and a silent peer
            before the migration fails.
        allow_unauthenticated: a destination refuses to listen on a non-loopback
            address without ``auth_key`` unless this is True.
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
    verify: bool = True
    auth_key: bytes | None = field(default=None, repr=False)
    tls: Any = None
    tls_hostname: str | None = None
    packet_pages: int = 128
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
        if self.max_bandwidth is not None:
            raise bad(
                "max_bandwidth",
                "a bandwidth cap is not supported by this version; leave it None",
            )
        if not _is_int(self.max_rounds) or self.max_rounds < 1:
            raise bad("max_rounds", f"{self.max_rounds!r} is not a whole number >= 1")
        if not isinstance(self.verify, bool):
            raise bad("verify", f"{self.verify!r} is not True or False")
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

    def replace(self, **changes: Any) -> "MigrationConfig":
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
