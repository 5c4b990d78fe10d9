"""What coordinators and their worker processes say to each other over the worker's pipe.

Every message is a small frozen dataclass, pickled by the
``multiprocessing`` connection. They travel a few times per round, never per
page: pages go through the shared-memory rings and the sockets. The
protocol, in order (``docs/workers.md`` has the whole picture):

* a worker attaches to its ring and segments and says :class:`Ready`;
* a sender or file worker reports :class:`AtBarrier` when it has handed
  every batch of a round to its socket or file, and :class:`StreamEnded`
  after the final round (the end of stream); a receiver reports them when
  it reached the SYNC / EOS marker of its connection, with the number of
  packets it received in that round, and waits for :class:`Go` to pass the
  round barrier;
* a sender reports :class:`Scanned` for each scan job it finished;
* :class:`Log` forwards a log record; :class:`Failed` is the last word of a
  worker that failed and is rebuilt into a typed error by :meth:`Failed.error`;
* :class:`Stop` asks a worker to leave early (its socket is shut down too,
  in case it is blocked on it).

Prepared receivers (pool workers that populate a destination's mapping
ahead) say :class:`Warm` when populated and then take one :class:`Receive`
(with the socket passed alongside). A pool worker says :class:`Idle` when a
job ended and it can take the next :class:`Job`; :class:`Leave` ends it.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from . import errors
from .errors import ChannelBroken, MigrationError

__all__ = [
    "AtBarrier",
    "Failed",
    "Go",
    "Idle",
    "Job",
    "Leave",
    "Log",
    "Ready",
    "Receive",
    "Scanned",
    "Stop",
    "StreamEnded",
    "Warm",
    "WorkerMessage",
]

# the OSError names a worker reports for a connection that broke under it
_BROKEN_CONNECTION = frozenset(
    {"ConnectionResetError", "BrokenPipeError", "ConnectionAbortedError", "TimeoutError", "OSError"}
)


# ---------------------------------------------------------------- worker -> coordinator


@dataclass(frozen=True)
class Ready:
    """The worker attached to its ring and shared segments: their names may be unlinked."""


@dataclass(frozen=True)
class AtBarrier:
    """Round ``round`` is done on this channel: a sender handed its every batch to the socket,
    a receiver reached its SYNC marker after ``packets`` packets and waits for :class:`Go`."""

    round: int
    packets: int = 0


@dataclass(frozen=True)
class StreamEnded:
    """The end of stream: the final round ``round`` is done on this channel (``packets`` as above);
    the worker exits after this."""

    round: int
    packets: int = 0


@dataclass(frozen=True)
class Scanned:
    """Scan job ``job`` is done: ``pages`` fingerprinted in ``seconds`` of the worker's time."""

    job: int
    pages: int
    seconds: float


@dataclass(frozen=True)
class Log:
    """A log record of the worker's, for the coordinator's logging configuration to handle."""

    level: int
    name: str
    message: str

    def emit(self) -> None:
        logging.getLogger(self.name).log(self.level, "%s", self.message)


@dataclass(frozen=True)
class Failed:
    """The worker's last word: what it failed with."""

    error_type: str
    message: str
    field: str | None
    traceback: str

    @classmethod
    def of(cls, exc: BaseException) -> "Failed":
        return cls(type(exc).__name__, str(exc), getattr(exc, "field", None), traceback.format_exc(limit=8))

    def error(self, channel: int) -> MigrationError:
        """The report as a typed exception naming the channel (the worker's traceback attached)."""
        cls = getattr(errors, self.error_type, None)
        err: MigrationError
        if isinstance(cls, type) and issubclass(cls, errors.ProtocolError):
            err = cls(self.message, field=self.field, channel=channel)
        elif isinstance(cls, type) and issubclass(cls, MigrationError) and cls is not errors.VerificationError:
            err = cls(self.message, channel=channel)
        elif self.error_type in _BROKEN_CONNECTION:
            err = ChannelBroken(f"{self.error_type}: {self.message}", channel=channel)
        else:
            err = MigrationError(f"worker failed with {self.error_type}: {self.message}", channel=channel)
        err.worker_traceback = self.traceback
        return err


@dataclass(frozen=True)
class Warm:
    """A prepared receiver populated the region's mapping (``whole``: all of it) in ``seconds``."""

    whole: bool
    seconds: float


@dataclass(frozen=True)
class Idle:
    """A pool worker finished its job and takes the next one."""


# ---------------------------------------------------------------- coordinator -> worker


@dataclass(frozen=True)
class Stop:
    """Leave now: the migration is over or failed."""


@dataclass(frozen=True)
class Go:
    """A receiver passes the round barrier and reads the next round."""


@dataclass(frozen=True)
class Receive:
    """A prepared receiver's channel: its spec, the destination's segments, and the socket's
    family, type and protocol (the descriptor follows with ``send_handle``)."""

    spec: Any
    received_name: str
    stats_name: str
    family: int
    type: int
    proto: int


@dataclass(frozen=True)
class Job:
    """A pool worker's next job: ``target(*args, conn)`` with ``nfds`` descriptors passed after it."""

    target: Callable[..., Any]
    args: tuple[Any, ...]
    nfds: int


@dataclass(frozen=True)
class Leave:
    """A pool worker exits."""


WorkerMessage = Ready | AtBarrier | StreamEnded | Scanned | Log | Failed | Warm | Idle
