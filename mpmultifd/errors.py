"""The error tree of mpmultifd.

Everything the library raises on purpose derives from :class:`MigrationError`,
so an agent can catch one name. The branches say who is at fault:

- :class:`ConfigError`: the caller asked for something invalid; raised before
  any byte moves.
- :class:`ProtocolError`: bytes that break the wire protocol.
  :class:`LocalProtocolError` means we were about to send them,
  :class:`RemoteProtocolError` means the peer sent them (``field`` names the
  offending field).
- :class:`ChannelError`: a connection ended. :class:`ChannelClosed` is an
  orderly end at the wrong moment, :class:`ChannelBroken` a reset, timeout or
  dead peer, with the cause chained.
- :class:`AuthenticationError`: a peer failed to prove it belongs to the session.
- :class:`VerificationError`: the destination's bytes differ from the source's.
- :class:`ConvergenceError`: the guest dirties memory faster than the link
  carries it and nothing made it converge (dirty rate against bandwidth).
- :class:`TrackingUnavailable`: the dirty tracker asked for cannot run here.
- :class:`SaveFileError`: a save file is incomplete, truncated or corrupted.
- :class:`UntrustedSegmentError`: a shared-memory segment or block file
  belongs to another user or is open to others (a :class:`ConfigError`).
- :class:`CommitUnknown`: the connection broke after COMMIT was sent and
  before the destination acknowledged it; either side may own the region.
- :class:`MigrationCancelled`: someone called ``cancel()``.
- :class:`PeerFailed`: the other end failed and said so on the control
  connection (``peer`` is ``"source"`` or ``"destination"``); this side only
  reports it, and does not tell the peer again.
- :class:`RingError`: a shared-memory ring was closed or timed out.
"""

from __future__ import annotations

__all__ = [
    "MigrationError",
    "ConfigError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ChannelError",
    "ChannelClosed",
    "ChannelBroken",
    "AuthenticationError",
    "VerificationError",
    "CommitUnknown",
    "MigrationCancelled",
    "PeerFailed",
    "ConvergenceError",
    "TrackingUnavailable",
    "SaveFileError",
    "UntrustedSegmentError",
    "KeyFileWarning",
    "RingError",
    "RingClosed",
    "RingTimeout",
    "WorkerDied",
]


class MigrationError(Exception):
    """Base class of every error mpmultifd raises on purpose.

    ``channel`` is the data channel index the error belongs to, or ``None``
    for the control channel and the coordinators.
    """

    # the worker's traceback, when a worker process raised it
    worker_traceback: str | None = None

    def __init__(self, message: str, *, channel: int | None = None) -> None:
        super().__init__(message)
        self.channel = channel

    def __str__(self) -> str:
        text = super().__str__()
        if self.channel is not None:
            return f"channel {self.channel}: {text}"
        return text


class ConfigError(MigrationError, ValueError):
    """An invalid configuration or argument, rejected before any byte moves."""


class ProtocolError(MigrationError):
    """Bytes that violate the wire protocol.

    ``field`` names the header or message field that was wrong, when one was.
    """

    def __init__(self, message: str, *, field: str | None = None, channel: int | None = None) -> None:
        super().__init__(message, channel=channel)
        self.field = field


class LocalProtocolError(ProtocolError):
    """We were asked to encode something the protocol cannot carry."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that fail validation."""


class ChannelError(MigrationError):
    """A control or data connection ended."""


class ChannelClosed(ChannelError):
    """The peer closed the connection in an orderly way, but at the wrong moment."""


class ChannelBroken(ChannelError):
    """The connection was reset, timed out, or its process died; the cause is chained."""


class AuthenticationError(MigrationError):
    """A connection failed to prove it belongs to the session."""


class VerificationError(MigrationError):
    """The destination's RAM differs from the source's at switchover.

    ``mismatches`` maps block names to the first differing page indices.
    """

    def __init__(self, message: str, *, mismatches: dict[str, list[int]] | None = None) -> None:
        super().__init__(message)
        self.mismatches = mismatches or {}


class ConvergenceError(MigrationError):
    """The guest dirties memory faster than the channels can carry it, and nothing made it converge.

    Raised at a round boundary when the stall detector or ``max_rounds`` gives
    up and the caller did not allow a longer downtime. The figures say why:
    ``dirty_rate`` and ``bandwidth`` in bytes per second, ``expected_downtime``
    and ``downtime_limit`` in seconds, ``rounds`` done, and the ``throttle``
    percentage reached (0 when no throttle callback was given).
    """

    def __init__(
        self,
        message: str,
        *,
        dirty_rate: float,
        bandwidth: float,
        expected_downtime: float,
        downtime_limit: float,
        rounds: int,
        throttle: int,
    ) -> None:
        super().__init__(message)
        self.dirty_rate = dirty_rate
        self.bandwidth = bandwidth
        self.expected_downtime = expected_downtime
        self.downtime_limit = downtime_limit
        self.rounds = rounds
        self.throttle = throttle


class TrackingUnavailable(ConfigError):
    """The dirty tracker asked for cannot run here; the message says why (kernel, permissions, mapping)."""


class SaveFileError(MigrationError):
    """A save file is incomplete, truncated, corrupted or does not match the region.

    ``field`` names the header field or region that is wrong, ``path`` the file.
    """

    def __init__(self, message: str, *, field: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.path = path


class UntrustedSegmentError(ConfigError):
    """A shared-memory segment or block file that another user could have planted or can change.

    ``path`` is the file, ``owner`` its uid and ``mode`` its permission bits.
    Raised unless the caller opted in (``allow_foreign=True``).
    """

    def __init__(self, message: str, *, path: str, owner: int, mode: int) -> None:
        super().__init__(message)
        self.path = path
        self.owner = owner
        self.mode = mode


class KeyFileWarning(UserWarning):
    """A key file that users other than its owner can read (see :func:`mpmultifd.auth.load_key`)."""


class CommitUnknown(MigrationError):
    """COMMIT went out but its acknowledgement never came back: who owns the region is unknown here.

    The destination may have taken the region (it owns it from the moment it
    reads COMMIT) or may never have seen COMMIT. The source therefore does not
    call ``resume()``: the guest stays paused until the agent learns which side
    owns it (``Destination.valid`` / its agent, as libvirt's confirm phase
    does) and either starts the destination's copy or resumes this one.
    """


class MigrationCancelled(MigrationError):
    """The migration was cancelled by ``cancel()``."""


class PeerFailed(MigrationError):
    """The peer reported its own failure (an ERROR message): ``peer`` names which end it was."""

    def __init__(self, message: str, peer: str = "peer", *, channel: int | None = None) -> None:
        super().__init__(f"{peer} failed: {message}", channel=channel)
        self.peer = peer
        self.reason = message

    def __reduce__(self) -> tuple[object, ...]:  # pickles across the pipes of worker processes
        return (type(self), (self.reason, self.peer), self.__dict__)


class WorkerDied(ChannelBroken):
    """A channel worker process ended without saying why (killed or crashed)."""


class RingError(MigrationError):
    """A shared-memory ring could not be used."""


class RingClosed(RingError):
    """The other end closed the ring."""


class RingTimeout(RingError, TimeoutError):
    """A ring operation did not complete within its timeout."""
