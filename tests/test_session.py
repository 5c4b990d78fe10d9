"""The session's rules without I/O: made-up message sequences against the transition tables."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpmultifd.errors import (
    ChannelBroken,
    CommitUnknown,
    MigrationCancelled,
    MigrationError,
    PeerFailed,
    RemoteProtocolError,
    VerificationError,
)
from mpmultifd.session import (
    DESTINATION_TRANSITIONS,
    MAX_ROUNDS_AHEAD,
    SOURCE_TRANSITIONS,
    DestinationPhase,
    DestinationSession,
    SourcePhase,
    SourceSession,
    classify_failure,
    tell_peer,
)
from mpmultifd.wire import (
    BlockSpec,
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

BLOCKS = (4, 2)  # pages per block


def config(channels: int = 2, verify: bool = True) -> Config:
    return Config(
        session_id=b"s" * 16,
        page_size=4096,
        channels=channels,
        packet_pages=8,
        blocks=tuple(BlockSpec(f"b{i}", n * 4096) for i, n in enumerate(BLOCKS)),
        method="none",
        method_options={},
        zero_page=True,
        verify=verify,
        channel_retries=0,
        base=None,
    )


def verifies() -> list[Verify]:
    return [Verify(i, np.arange(n, dtype=np.uint64)) for i, n in enumerate(BLOCKS)]


def destination(channels: int = 2, verify: bool = True) -> DestinationSession:
    d = DestinationSession(BLOCKS)
    assert d.receive(config(channels, verify)) is DestinationPhase.ROUNDS
    return d


# ------------------------------------------------------------------ destination


def test_a_whole_destination_session_with_a_repair_pass():
    d = destination()
    d.receive(RoundEnd(0, (3, 4)))
    d.receive(RoundEnd(1, (1, 0)))  # a marker may run ahead of the barrier
    assert d.barrier({0: (0, 3)}) is None  # channel 1 is not parked yet
    assert d.barrier({0: (0, 3), 1: (0, 4)}) == (3, 4)
    assert d.round == 1
    assert d.barrier({0: (1, 1), 1: (1, 0)}) == (1, 0)
    assert d.receive(Complete(2, (2, 2))) is DestinationPhase.FINAL
    ended = {0: (2, 2), 1: (2, 2)}
    assert not d.stream_complete(ended)  # the fingerprints are not all here
    for v in verifies():
        d.receive(v)
    assert d.stream_complete(ended)
    d.sending(Repair(1, ((0, np.array([1])),)))
    assert d.phase is DestinationPhase.REPAIRING
    d.receive(RepairPages(1, 0, np.array([1]), np.array([7], dtype=np.uint64), bytes(4096)))
    assert d.receive(RepairDone(1, 1)) is DestinationPhase.FINAL
    d.sending(Result(True, True, None, {}))
    assert d.phase is DestinationPhase.AWAIT_COMMIT
    assert d.receive(Commit()) is DestinationPhase.COMMITTED
    with pytest.raises(RemoteProtocolError, match="after the session ended"):
        d.receive(Commit())


def test_the_barrier_refuses_counts_that_differ_from_the_marker():
    d = destination()
    d.receive(RoundEnd(0, (3, 4)))
    with pytest.raises(RemoteProtocolError, match=r"round 0: channels received \(3, 5\) packets") as e:
        d.barrier({0: (0, 3), 1: (0, 5)})
    assert e.value.field == "packets"


def test_the_end_refuses_counts_that_differ_from_complete():
    d = destination(verify=False)
    d.receive(Complete(0, (1, 1)))
    with pytest.raises(RemoteProtocolError, match="final round"):
        d.stream_complete({0: (0, 1), 1: (0, 2)})


@pytest.mark.parametrize(
    "msgs, field",
    [
        ([RoundEnd(0, (1, 1)), RoundEnd(0, (1, 1))], "round"),  # twice
        ([RoundEnd(MAX_ROUNDS_AHEAD, (1, 1))], "round"),  # too far ahead
        ([RoundEnd(0, (1,))], "packets"),  # one count for two channels
        ([Complete(0, (1, 1)), RoundEnd(1, (1, 1))], "type"),  # after COMPLETE
        ([Verify(0, np.zeros(4, dtype=np.uint64))], "type"),  # before COMPLETE
        ([Complete(0, (1, 1)), Verify(5, np.zeros(4, dtype=np.uint64))], "block"),
        ([Complete(0, (1, 1)), Verify(0, np.zeros(3, dtype=np.uint64))], "npages"),
        ([Complete(0, (1, 1)), verifies()[0], verifies()[0]], "block"),
        ([Commit()], "type"),  # before RESULT
        ([RepairDone(1, 0)], "type"),  # no repair was asked for
        ([config()], "type"),  # a second CONFIG
        ([ConfigAck()], "type"),  # the source's word
    ],
)
def test_a_destination_refuses_messages_out_of_place(msgs, field):
    d = destination()
    with pytest.raises(RemoteProtocolError) as e:
        for m in msgs:
            d.receive(m)
    assert e.value.field == field


def test_verify_without_verification_is_refused():
    d = destination(verify=False)
    d.receive(Complete(0, (1, 1)))
    with pytest.raises(RemoteProtocolError, match="without verification"):
        d.receive(verifies()[0])


def test_repair_pages_of_another_pass_are_refused():
    d = destination()
    d.receive(Complete(0, (1, 1)))
    d.sending(Repair(2, ((0, np.array([0])),)))
    with pytest.raises(RemoteProtocolError, match="pass 1 during pass 2") as e:
        d.receive(RepairDone(1, 0))
    assert e.value.field == "attempt"


def test_config_must_come_first():
    d = DestinationSession(BLOCKS)
    with pytest.raises(RemoteProtocolError, match="expected CONFIG first, got RoundEnd"):
        d.receive(RoundEnd(0, (1,)))


@pytest.mark.parametrize("phase_msgs", [[], [Complete(0, (1, 1))]])
def test_cancel_and_error_end_a_destination_session_in_any_live_phase(phase_msgs):
    for word, exc in ((Cancel(), MigrationCancelled), (ErrorMessage("oops", "disk full", 1), PeerFailed)):
        d = destination()
        for m in phase_msgs:
            d.receive(m)
        with pytest.raises(exc) as e:
            d.receive(word)
        assert d.phase is DestinationPhase.ENDED
        if exc is PeerFailed:
            assert e.value.peer == "source" and e.value.channel == 1 and "source failed: disk full" in str(e.value)


def test_a_failed_result_ends_the_destination_session():
    d = destination()
    d.receive(Complete(0, (1, 1)))
    d.sending(Result(False, False, "pages differ", {}))
    assert d.phase is DestinationPhase.ENDED


# ------------------------------------------------------------------ source


def test_a_whole_source_session():
    s = SourceSession(2)
    assert s.receive(ConfigAck()) is SourcePhase.PRECOPY
    s.receive(RoundAck(0))
    s.receive(Resume(1, 1))
    s.receive(ChannelLost(0, 1))
    assert s.confirmed_round == 0
    s.sending(RoundEnd(1, (1, 1)))
    assert s.phase is SourcePhase.PRECOPY
    s.sending(Complete(2, (1, 1)))
    assert s.phase is SourcePhase.SWITCHOVER
    s.receive(Repair(1, ((0, np.array([3])),)))
    s.receive(Repair(2, ((0, np.array([3])),)))
    assert s.repair_passes == 2
    s.receive(Result(True, True, None, {}))
    s.sending(Commit())
    assert s.phase is SourcePhase.COMMITTING
    s.receive(RoundAck(2))  # news of the channels is still legal, and ignored
    assert s.receive(CommitAck()) is SourcePhase.COMMITTED


@pytest.mark.parametrize(
    "before, msg, field",
    [
        ([], RoundAck(0), "type"),  # before CONFIG_ACK
        ([ConfigAck()], ConfigAck(), "type"),
        ([ConfigAck()], Result(True, True, None, {}), "type"),  # before the final round
        ([ConfigAck()], Repair(1, ()), "type"),
        ([ConfigAck()], CommitAck(), "type"),
        ([ConfigAck()], Resume(2, 0), "channel"),  # no channel 2 of 2
        ([ConfigAck()], ChannelLost(-1, 0), "channel"),
    ],
)
def test_a_source_refuses_messages_out_of_place(before, msg, field):
    s = SourceSession(2)
    for m in before:
        s.receive(m)
    with pytest.raises(RemoteProtocolError) as e:
        s.receive(msg)
    assert e.value.field == field


def test_a_repair_pass_out_of_order_is_refused():
    s = SourceSession(1)
    s.receive(ConfigAck())
    s.sending(Complete(0, (1,)))
    with pytest.raises(RemoteProtocolError, match="REPAIR pass 2 after pass 0"):
        s.receive(Repair(2, ()))


def test_an_error_from_the_destination_is_peer_failed():
    s = SourceSession(2)
    s.receive(ConfigAck())
    with pytest.raises(PeerFailed) as e:
        s.receive(ErrorMessage("destination-failed", "no room", None))
    assert e.value.peer == "destination" and str(e.value) == "destination failed: no room"
    assert s.phase is SourcePhase.ENDED


# ------------------------------------------------------------------ tables and failures


def test_every_transition_names_a_phase_of_its_role():
    assert all(isinstance(a, SourcePhase) and isinstance(b, SourcePhase) for (a, _), b in SOURCE_TRANSITIONS.items())
    assert all(
        isinstance(a, DestinationPhase) and isinstance(b, DestinationPhase)
        for (a, _), b in DESTINATION_TRANSITIONS.items()
    )
    # nothing leads out of the end
    assert not any(a in (SourcePhase.COMMITTED, SourcePhase.ENDED) for a, _ in SOURCE_TRANSITIONS)
    assert not any(a in (DestinationPhase.COMMITTED, DestinationPhase.ENDED) for a, _ in DESTINATION_TRANSITIONS)


_DESTINATION_WORDS = st.sampled_from(
    [
        RoundEnd(0, (1, 1)),
        RoundEnd(1, (1, 1)),
        Complete(0, (1, 1)),
        Complete(1, (1, 1)),
        *verifies(),
        RepairPages(1, 0, np.array([0]), np.zeros(1, dtype=np.uint64), bytes(4096)),
        RepairDone(1, 1),
        Commit(),
        Cancel(),
        ErrorMessage("x", "y", None),
        ConfigAck(),
        Result(True, True, None, {}),
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_DESTINATION_WORDS, max_size=12), st.booleans())
def test_any_sequence_either_follows_the_table_or_is_refused_by_a_typed_error(msgs, verify):
    d = destination(verify=verify)
    for m in msgs:
        before = d.phase
        try:
            after = d.receive(m)
        except (RemoteProtocolError, MigrationCancelled, PeerFailed):
            continue  # refused, typed: that is the only other outcome
        assert DESTINATION_TRANSITIONS[(before, type(m))] is after


def test_failures_are_classified_in_one_place():
    err, status = classify_failure(OSError(104, "reset"))
    assert isinstance(err, ChannelBroken) and status == "failed" and isinstance(err.__cause__, OSError)
    err, status = classify_failure(KeyError("x"))
    assert type(err) is MigrationError and "KeyError" in str(err) and status == "failed"
    err, status = classify_failure(KeyError("x"), cancel_requested=True)
    assert isinstance(err, MigrationCancelled) and status == "cancelled"
    assert classify_failure(CommitUnknown("?"))[1] == "commit-unknown"
    v = VerificationError("differs", mismatches={})
    assert classify_failure(v) == (v, "failed")
    assert not tell_peer(PeerFailed("no room", "destination"))
    assert not tell_peer(v) and not tell_peer(MigrationCancelled("c"))
    assert tell_peer(ChannelBroken("reset"))
