"""The migration session's rules, without I/O: which control message is legal when, the round barrier,
the end of the stream, the status word, and what a failure is called.

Like h11's ``_state.py``, every transition of each role is one row of a
table (:data:`SOURCE_TRANSITIONS`, :data:`DESTINATION_TRANSITIONS`): a
message that has no row in the current phase is a protocol error naming both.
:class:`SourceSession` and :class:`DestinationSession` keep the phase and
the session's numbers (rounds, packet counts, fingerprints) and check what
the peer sends; the coordinators do the I/O and call them. They are tested
with made-up message sequences (``tests/test_session.py``).

A CANCEL or an ERROR from the peer is legal in every live phase: it ends the
session as :class:`~mpmultifd.errors.MigrationCancelled` or
:class:`~mpmultifd.errors.PeerFailed`. Messages about the data channels
(ROUND_ACK, RESUME, CHANNEL_LOST) may reach the source until it commits.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import numpy as np

from .errors import (
    ChannelBroken,
    CommitUnknown,
    MigrationCancelled,
    MigrationError,
    PeerFailed,
    RemoteProtocolError,
    VerificationError,
)
from .wire import (
    Cancel,
    ChannelLost,
    Commit,
    CommitAck,
    Complete,
    Config,
    ConfigAck,
    ErrorMessage,
    Repair,
    RepairDone,
    RepairPages,
    Result,
    Resume,
    RoundAck,
    RoundEnd,
    Verify,
)

__all__ = [
    "DESTINATION_TRANSITIONS",
    "MAX_ROUNDS_AHEAD",
    "SOURCE_TRANSITIONS",
    "DestinationPhase",
    "DestinationSession",
    "SourcePhase",
    "SourceSession",
    "classify_failure",
    "tell_peer",
]

# ROUND_END markers a destination keeps for rounds its barrier has not reached: a source runs
# ahead of the barrier only as far as socket buffers let it
MAX_ROUNDS_AHEAD = 256


class SourcePhase(enum.Enum):
    CONFIGURING = "configuring"  # CONFIG sent, waiting for CONFIG_ACK
    PRECOPY = "precopy"  # rounds while the guest runs
    SWITCHOVER = "switchover"  # the final round is out: waiting for RESULT (or REPAIR)
    COMMITTING = "committing"  # COMMIT sent, waiting for COMMIT_ACK
    COMMITTED = "committed"
    ENDED = "ended"  # failed or cancelled


class DestinationPhase(enum.Enum):
    CONFIGURING = "configuring"  # waiting for CONFIG
    ROUNDS = "rounds"  # ROUND_END markers and the round barrier
    FINAL = "final"  # COMPLETE arrived: the last round and the fingerprints (VERIFY)
    REPAIRING = "repairing"  # REPAIR sent: the resent pages
    AWAIT_COMMIT = "await-commit"  # RESULT sent: COMMIT, or the source gives up
    COMMITTED = "committed"
    ENDED = "ended"


_CHANNEL_NEWS = (RoundAck, Resume, ChannelLost)

# (phase, message type) -> the phase after it; nothing else is legal (CANCEL and ERROR aside)
SOURCE_TRANSITIONS: dict[tuple[SourcePhase, type], SourcePhase] = {
    (SourcePhase.CONFIGURING, ConfigAck): SourcePhase.PRECOPY,
    **{(SourcePhase.PRECOPY, t): SourcePhase.PRECOPY for t in _CHANNEL_NEWS},
    **{(SourcePhase.SWITCHOVER, t): SourcePhase.SWITCHOVER for t in _CHANNEL_NEWS},
    (SourcePhase.SWITCHOVER, Repair): SourcePhase.SWITCHOVER,
    (SourcePhase.SWITCHOVER, Result): SourcePhase.SWITCHOVER,  # the source then commits or gives up
    **{(SourcePhase.COMMITTING, t): SourcePhase.COMMITTING for t in _CHANNEL_NEWS},
    (SourcePhase.COMMITTING, CommitAck): SourcePhase.COMMITTED,
}

DESTINATION_TRANSITIONS: dict[tuple[DestinationPhase, type], DestinationPhase] = {
    (DestinationPhase.CONFIGURING, Config): DestinationPhase.ROUNDS,
    (DestinationPhase.ROUNDS, RoundEnd): DestinationPhase.ROUNDS,
    (DestinationPhase.ROUNDS, Complete): DestinationPhase.FINAL,
    (DestinationPhase.FINAL, Verify): DestinationPhase.FINAL,
    (DestinationPhase.REPAIRING, RepairPages): DestinationPhase.REPAIRING,
    (DestinationPhase.REPAIRING, RepairDone): DestinationPhase.FINAL,
    (DestinationPhase.AWAIT_COMMIT, Commit): DestinationPhase.COMMITTED,
}

# what this end sends that moves its own phase
_SOURCE_SENDS: dict[tuple[SourcePhase, type], SourcePhase] = {
    (SourcePhase.PRECOPY, Complete): SourcePhase.SWITCHOVER,
    (SourcePhase.SWITCHOVER, Commit): SourcePhase.COMMITTING,
}
_DESTINATION_SENDS: dict[tuple[DestinationPhase, type], DestinationPhase] = {
    (DestinationPhase.FINAL, Repair): DestinationPhase.REPAIRING,
    (DestinationPhase.FINAL, Result): DestinationPhase.AWAIT_COMMIT,
}

# the wire names of the messages, for errors that speak the protocol's language
_NAMES = {
    Config: "CONFIG", ConfigAck: "CONFIG_ACK", RoundEnd: "ROUND_END", RoundAck: "ROUND_ACK",
    Complete: "COMPLETE", Verify: "VERIFY", Result: "RESULT", Repair: "REPAIR",
    RepairPages: "REPAIR_PAGES", RepairDone: "REPAIR_DONE", Commit: "COMMIT", CommitAck: "COMMIT_ACK",
    Resume: "RESUME", ChannelLost: "CHANNEL_LOST", Cancel: "CANCEL", ErrorMessage: "ERROR",
}  # fmt: skip


def _name(msg: object) -> str:
    return _NAMES.get(type(msg), type(msg).__name__)


def _end_on_peer_word(msg: object, peer: str) -> None:
    """CANCEL and ERROR end a session in any live phase."""
    if isinstance(msg, Cancel):
        raise MigrationCancelled(f"the {peer} cancelled the migration")
    if isinstance(msg, ErrorMessage):
        raise PeerFailed(msg.message, peer, channel=msg.channel)


class SourceSession:
    """The source's side of the control conversation."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.phase = SourcePhase.CONFIGURING
        self.confirmed_round = -1  # the last round the destination passed (its ROUND_ACK)
        self.repair_passes = 0

    def receive(self, msg: object) -> SourcePhase:
        """Check ``msg`` against the table (and its numbers) and move on; raises if it is not legal now."""
        if self.phase in (SourcePhase.COMMITTED, SourcePhase.ENDED):
            raise RemoteProtocolError(f"{_name(msg)} after the session ended", field="type")
        try:
            _end_on_peer_word(msg, "destination")
        except MigrationError:
            self.phase = SourcePhase.ENDED
            raise
        nxt = SOURCE_TRANSITIONS.get((self.phase, type(msg)))
        if nxt is None:
            raise RemoteProtocolError(f"{_name(msg)} is not expected while {self.phase.value}", field="type")
        if isinstance(msg, (Resume, ChannelLost)) and not 0 <= msg.channel < self.channels:
            raise RemoteProtocolError(f"{_name(msg)} for channel {msg.channel}", field="channel")
        if isinstance(msg, RoundAck):
            self.confirmed_round = max(self.confirmed_round, msg.round)
        if isinstance(msg, Repair):
            if msg.attempt != self.repair_passes + 1:
                raise RemoteProtocolError(f"REPAIR pass {msg.attempt} after pass {self.repair_passes}", field="attempt")
            self.repair_passes = msg.attempt
        self.phase = nxt
        return nxt

    def sending(self, msg: object) -> None:
        """Note a message this end is about to send (COMPLETE starts the switchover, COMMIT commits)."""
        nxt = _SOURCE_SENDS.get((self.phase, type(msg)))
        if nxt is not None:
            self.phase = nxt


class DestinationSession:
    """The destination's side: CONFIG, the round markers and barrier, COMPLETE, VERIFY, repair, COMMIT."""

    def __init__(self, block_pages: tuple[int, ...]) -> None:
        self.block_pages = block_pages
        self.phase = DestinationPhase.CONFIGURING
        self.config: Config | None = None
        self.round = 0  # the round the barrier waits for
        self.round_ends: dict[int, tuple[int, ...]] = {}
        self.complete: Complete | None = None
        self.verify: dict[int, np.ndarray] = {}
        self.repair_attempt = 0

    @property
    def channels(self) -> int:
        return self.config.channels if self.config is not None else 0

    def receive(self, msg: object) -> DestinationPhase:
        """Check ``msg`` against the table (and its numbers) and record it; raises if it is not legal now."""
        if self.phase in (DestinationPhase.COMMITTED, DestinationPhase.ENDED):
            raise RemoteProtocolError(f"{_name(msg)} after the session ended", field="type")
        try:
            _end_on_peer_word(msg, "source")
        except MigrationError:
            self.phase = DestinationPhase.ENDED
            raise
        nxt = DESTINATION_TRANSITIONS.get((self.phase, type(msg)))
        if nxt is None:
            raise RemoteProtocolError(self._unexpected(msg), field="type")
        if isinstance(msg, Config):
            self.config = msg
        elif isinstance(msg, RoundEnd):
            self._round_end(msg)
        elif isinstance(msg, Complete):
            if msg.round < self.round or len(msg.packets) != self.channels:
                raise RemoteProtocolError(f"COMPLETE for round {msg.round} during round {self.round}", field="round")
            self.complete = msg
        elif isinstance(msg, Verify):
            assert self.config is not None
            if not self.config.verify:
                raise RemoteProtocolError("VERIFY before COMPLETE or without verification", field="type")
            if not 0 <= msg.block < len(self.block_pages) or msg.block in self.verify:
                raise RemoteProtocolError(f"VERIFY for block {msg.block}", field="block")
            if len(msg.fingerprints) != self.block_pages[msg.block]:
                raise RemoteProtocolError("VERIFY fingerprint count differs from the block", field="npages")
            self.verify[msg.block] = msg.fingerprints
        elif isinstance(msg, (RepairPages, RepairDone)) and msg.attempt != self.repair_attempt:
            raise RemoteProtocolError(
                f"{_name(msg)} for pass {msg.attempt} during pass {self.repair_attempt}", field="attempt"
            )
        self.phase = nxt
        return nxt

    def _unexpected(self, msg: object) -> str:
        if self.phase is DestinationPhase.CONFIGURING:
            return f"expected CONFIG first, got {type(msg).__name__}"
        if isinstance(msg, RoundEnd):
            return f"ROUND_END for round {msg.round} during round {self.round}"
        if isinstance(msg, Complete):
            return f"COMPLETE for round {msg.round} during round {self.round}"
        if isinstance(msg, Verify):
            return "VERIFY before COMPLETE or without verification"
        if isinstance(msg, (RepairPages, RepairDone)):
            return (
                f"expected {'COMMIT' if self.phase is DestinationPhase.AWAIT_COMMIT else 'nothing'}, got {_name(msg)}"
            )
        if self.phase is DestinationPhase.AWAIT_COMMIT:
            return f"expected COMMIT, got {type(msg).__name__}"
        if self.phase is DestinationPhase.REPAIRING:
            return f"expected REPAIR_PAGES, got {type(msg).__name__}"
        return f"unexpected {type(msg).__name__} on the control channel"

    def _round_end(self, msg: RoundEnd) -> None:
        # the source does not wait for our barrier, so markers may run ahead of it
        if msg.round < self.round or msg.round in self.round_ends:
            raise RemoteProtocolError(f"ROUND_END for round {msg.round} during round {self.round}", field="round")
        if msg.round >= self.round + MAX_ROUNDS_AHEAD:
            raise RemoteProtocolError(
                f"ROUND_END for round {msg.round} is {msg.round - self.round} rounds ahead of the barrier "
                f"(round {self.round}; at most {MAX_ROUNDS_AHEAD})",
                field="round",
            )
        if len(msg.packets) != self.channels:
            raise RemoteProtocolError("ROUND_END counts do not match the channels", field="packets")
        self.round_ends[msg.round] = msg.packets

    def sending(self, msg: object) -> None:
        """Note a message this end is about to send (REPAIR opens a repair pass, RESULT awaits COMMIT)."""
        nxt = _DESTINATION_SENDS.get((self.phase, type(msg)))
        if nxt is None:
            return
        if isinstance(msg, Repair):
            self.repair_attempt = msg.attempt
        if isinstance(msg, Result) and not msg.ok:
            nxt = DestinationPhase.ENDED
        self.phase = nxt

    def barrier(self, parked: Mapping[int, tuple[int, int]]) -> tuple[int, ...] | None:
        """Whether the round barrier passes: every channel parked at this round's SYNC
        (``parked``: channel -> (round, packets)) and its ROUND_END arrived. Returns the round's
        packet counts and moves to the next round, or None while it does not pass yet."""
        rnd = self.round
        if len(parked) != self.channels or rnd not in self.round_ends:
            return None
        if any(at != rnd for at, _ in parked.values()):
            return None
        expected = self.round_ends.pop(rnd)
        got = tuple(parked[i][1] for i in range(self.channels))
        if got != expected:
            raise RemoteProtocolError(
                f"round {rnd}: channels received {got} packets, the source sent {expected}", field="packets"
            )
        self.round += 1
        return expected

    def stream_complete(self, ended: Mapping[int, tuple[int, int]]) -> bool:
        """Whether everything arrived: COMPLETE, every channel at its end of stream (``ended``:
        channel -> (round, packets)) with the counts COMPLETE names, and every block's fingerprints."""
        c = self.complete
        if c is None or self.config is None or len(ended) != self.channels:
            return False
        if self.config.verify and len(self.verify) != len(self.block_pages):
            return False
        got = tuple(ended[i][1] for i in range(self.channels))
        if got != c.packets or any(rnd != c.round for rnd, _ in ended.values()):
            raise RemoteProtocolError(
                f"final round: channels received {got} packets, the source sent {c.packets}", field="packets"
            )
        return True

    def commit_missing(self) -> None:
        self.phase = DestinationPhase.ENDED


def classify_failure(exc: BaseException, *, cancel_requested: bool = False) -> tuple[MigrationError, str]:
    """The error to report for ``exc`` and the status word it ends in, decided in one place.

    A MigrationError stays itself; an OSError is a broken channel; anything
    else is wrapped (the original chained as the cause). A cancel that was
    asked for wins over whatever it broke.
    """
    if isinstance(exc, CommitUnknown):
        return exc, "commit-unknown"
    if isinstance(exc, MigrationCancelled):
        return exc, "cancelled"
    if cancel_requested and not isinstance(exc, MigrationError):
        err: MigrationError = MigrationCancelled("cancelled")
        err.__cause__ = exc
        return err, "cancelled"
    if isinstance(exc, MigrationError):
        return exc, "failed"
    if isinstance(exc, OSError):
        err = ChannelBroken(f"{type(exc).__name__}: {exc}")
    else:
        err = MigrationError(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err, "failed"


def tell_peer(err: MigrationError) -> bool:
    """Whether the peer should hear of ``err`` with an ERROR: not when it said so itself, not for a
    cancel (that is CANCEL), and not for a failed verification (the RESULT told it already)."""
    return not isinstance(err, (PeerFailed, MigrationCancelled, VerificationError, CommitUnknown))
