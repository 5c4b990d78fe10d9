"""The mpmultifd wire format: a pure codec, bytes in and typed messages out.

Nothing here touches a socket, a process or a clock. Workers and coordinators
drive it; tests feed it bytes. Every field that arrives from the network is
checked before use, and a violation raises :class:`RemoteProtocolError` whose
``field`` names what was wrong. ``docs/protocol.md`` is
the specification, with byte-level test vectors that the tests check.

All integers are big-endian. Three kinds of bytes travel:

- a fixed 32-byte **hello** opens every connection (control and data);
- a data channel then carries **data packets**: a fixed-size header (32 bytes
  plus 8 bytes per page slot) followed by ``payload_len`` payload bytes;
- the control channel carries **framed messages**: a 12-byte frame header and
  a body whose shape depends on the message type.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "HELLO_MAGIC",
    "DATA_MAGIC",
    "CONTROL_MAGIC",
    "HELLO_SIZE",
    "CONTROL_CHANNEL",
    "KIND_CONTROL",
    "KIND_DATA",
    "KIND_STREAM",
    "HELLO_FLAG_AUTH",
    "MAX_CHANNELS",
    "MAX_PACKET_PAGES",
    "FLAG_SYNC",
    "FLAG_EOS",
    "ENCODING_RAW",
    "Hello",
    "encode_hello",
    "decode_hello",
    "data_header_size",
    "DataHeader",
    "DataHeaderEncoder",
    "DataHeaderDecoder",
    "ChannelState",
    "BlockSpec",
    "Config",
    "ConfigAck",
    "RoundEnd",
    "Complete",
    "Verify",
    "Result",
    "ErrorMessage",
    "RoundAck",
    "Cancel",
    "Commit",
    "Resume",
    "ChannelLost",
    "CommitAck",
    "Repair",
    "RepairPages",
    "RepairDone",
    "MAX_REPAIR_PAGES",
    "REPAIR_CHUNK_PAGES",
    "ControlMessage",
    "ControlMac",
    "encode_control",
    "ControlDecoder",
    "MAX_CONTROL_BODY",
    "MAX_JSON_DEPTH",
    "MAX_PEER_TEXT",
    "verify_body_limit",
    "repair_pages_body_limit",
    "peer_text",
]

PROTOCOL_VERSION = 1
HELLO_MAGIC = 0x4D504D48  # "MPMH"
DATA_MAGIC = 0x4D504D44  # "MPMD"
CONTROL_MAGIC = 0x4D504D43  # "MPMC"

KIND_CONTROL = 0
KIND_DATA = 1
KIND_STREAM = 2  # a byte stream for the agent (e.g. a VM's device state), admitted like the others
_KINDS = (KIND_CONTROL, KIND_DATA, KIND_STREAM)
CONTROL_CHANNEL = 0xFFFF
HELLO_FLAG_AUTH = 0x01  # a client nonce and a proof of the key follow the hello
MAX_CHANNELS = 256
# one header IOV plus one per page must fit IOV_MAX (1024) when no page is coalesced
MAX_PACKET_PAGES = 1023
MAX_BLOCKS = 1024
MAX_BLOCK_NAME = 255
MAX_BLOCK_SIZE = 1 << 52

FLAG_SYNC = 0x0001
FLAG_EOS = 0x0002
_KNOWN_FLAGS = FLAG_SYNC | FLAG_EOS

ENCODING_RAW = 0
MAX_ENCODING = 255


def _fail(field_name: str, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{field_name}: {message}", field=field_name)


# --------------------------------------------------------------------------- hello

_HELLO = struct.Struct(">IHBB16sHHI")
HELLO_SIZE = _HELLO.size  # 32


@dataclass(frozen=True)
class Hello:
    """The first bytes on every connection.

    ``channel`` is the data channel index, or :data:`CONTROL_CHANNEL` on the
    control connection; ``nchannels`` is the number of data channels.
    """

    kind: int
    session_id: bytes
    channel: int
    nchannels: int
    flags: int = 0


def encode_hello(hello: Hello) -> bytes:
    """Encode a hello; raises :class:`LocalProtocolError` for values the format cannot carry."""
    if hello.kind not in _KINDS:
        raise LocalProtocolError(f"kind: unknown connection kind {hello.kind}", field="kind")
    if len(hello.session_id) != 16:
        raise LocalProtocolError("session_id: must be 16 bytes", field="session_id")
    if not 1 <= hello.nchannels <= MAX_CHANNELS:
        raise LocalProtocolError(f"nchannels: {hello.nchannels} not in 1..{MAX_CHANNELS}", field="nchannels")
    if hello.kind != KIND_DATA and hello.channel != CONTROL_CHANNEL:
        raise LocalProtocolError("channel: a control or stream hello carries channel 0xFFFF", field="channel")
    if hello.kind == KIND_DATA and not 0 <= hello.channel < hello.nchannels:
        raise LocalProtocolError(f"channel: {hello.channel} not below nchannels {hello.nchannels}", field="channel")
    if hello.flags & ~HELLO_FLAG_AUTH:
        raise LocalProtocolError(f"flags: unknown hello flags 0x{hello.flags:02x}", field="flags")
    return _HELLO.pack(
        HELLO_MAGIC, PROTOCOL_VERSION, hello.kind, hello.flags, hello.session_id, hello.channel, hello.nchannels, 0
    )


def decode_hello(
    data: bytes | bytearray | memoryview,
    *,
    session_id: bytes | None = None,
    nchannels: int | None = None,
) -> Hello:
    """Decode and validate a hello.

    With ``session_id`` and ``nchannels`` given (the destination knows both once
    the control connection is set up), the hello must match them.
    """
    if len(data) != HELLO_SIZE:
        raise _fail("hello", f"expected {HELLO_SIZE} bytes, got {len(data)}")
    magic, version, kind, flags, sid, channel, nch, reserved = _HELLO.unpack(data)
    if magic != HELLO_MAGIC:
        raise _fail("magic", f"0x{magic:08x} is not the hello magic 0x{HELLO_MAGIC:08x}")
    if version != PROTOCOL_VERSION:
        raise _fail("version", f"protocol version {version} is not supported (this end speaks {PROTOCOL_VERSION})")
    if kind not in _KINDS:
        raise _fail("kind", f"unknown connection kind {kind}")
    if flags & ~HELLO_FLAG_AUTH:
        raise _fail("flags", f"unknown hello flags 0x{flags:02x}")
    if reserved != 0:
        raise _fail("reserved", "reserved hello bytes must be zero")
    if not 1 <= nch <= MAX_CHANNELS:
        raise _fail("nchannels", f"{nch} not in 1..{MAX_CHANNELS}")
    if nchannels is not None and nch != nchannels:
        raise _fail("nchannels", f"{nch} does not match the session's {nchannels} channels")
    if kind != KIND_DATA:
        if channel != CONTROL_CHANNEL:
            raise _fail("channel", f"a control or stream hello must carry 0xFFFF, got {channel}")
    elif channel >= nch:
        # QEMU checks "id > channels"; an id equal to the count is one past the end.
        raise _fail("channel", f"channel id {channel} is not below the channel count {nch}")
    if session_id is not None and sid != session_id:
        raise _fail("session_id", f"session {sid.hex()} is not this session")
    return Hello(kind=kind, session_id=bytes(sid), channel=channel, nchannels=nch, flags=flags)


# --------------------------------------------------------------------------- data packets

_DATA_FIXED = struct.Struct(">IHBBHHHHIIQ")
DATA_FIXED_SIZE = _DATA_FIXED.size  # 32


def data_header_size(packet_pages: int) -> int:
    """Size of a data packet header with ``packet_pages`` page slots."""
    return DATA_FIXED_SIZE + 8 * packet_pages


@dataclass(frozen=True, eq=False)
class DataHeader:
    """A decoded data packet header.

    ``offsets`` holds the ``normal`` data pages' byte offsets first (in payload
    order), then the ``zero`` zero pages' offsets. It is a view into the buffer
    the header was decoded from: copy it if the buffer will be reused.
    """

    flags: int
    encoding: int
    block: int
    round: int
    packet_num: int
    normal: int
    zero: int
    payload_len: int
    offsets: np.ndarray

    @property
    def is_sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)

    @property
    def is_eos(self) -> bool:
        return bool(self.flags & FLAG_EOS)

    @property
    def normal_offsets(self) -> np.ndarray:
        return self.offsets[: self.normal]

    @property
    def zero_offsets(self) -> np.ndarray:
        return self.offsets[self.normal : self.normal + self.zero]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataHeader):
            return NotImplemented
        return (
            self.flags,
            self.encoding,
            self.block,
            self.round,
            self.packet_num,
            self.normal,
            self.zero,
            self.payload_len,
        ) == (
            other.flags,
            other.encoding,
            other.block,
            other.round,
            other.packet_num,
            other.normal,
            other.zero,
            other.payload_len,
        ) and np.array_equal(self.offsets, other.offsets)


class DataHeaderEncoder:
    """Encodes data packet headers into a reusable buffer.

    ``encode`` returns a memoryview of the encoder's own buffer, valid until the
    next call: a sender that must keep several headers alive (zero-copy sends)
    uses several encoders.
    """

    def __init__(self, packet_pages: int) -> None:
        if not 1 <= packet_pages <= MAX_PACKET_PAGES:
            raise LocalProtocolError(f"packet_pages: {packet_pages} not in 1..{MAX_PACKET_PAGES}", field="packet_pages")
        self.packet_pages = packet_pages
        self.size = data_header_size(packet_pages)
        self._buf = bytearray(self.size)
        self._offsets = np.frombuffer(self._buf, dtype=">u8", offset=DATA_FIXED_SIZE)
        self._view = memoryview(self._buf)

    def encode(
        self,
        *,
        flags: int = 0,
        encoding: int = ENCODING_RAW,
        block: int = 0,
        round: int = 0,
        packet_num: int = 0,
        normal_offsets: np.ndarray | None = None,
        zero_offsets: np.ndarray | None = None,
        payload_len: int = 0,
    ) -> memoryview:
        normal = 0 if normal_offsets is None else len(normal_offsets)
        zero = 0 if zero_offsets is None else len(zero_offsets)
        if normal + zero > self.packet_pages:
            raise LocalProtocolError(
                f"count: {normal} + {zero} pages exceed the packet's {self.packet_pages} slots", field="count"
            )
        if flags & ~_KNOWN_FLAGS:
            raise LocalProtocolError(f"flags: unknown bits 0x{flags:04x}", field="flags")
        if not 0 <= encoding <= MAX_ENCODING:
            raise LocalProtocolError(f"encoding: {encoding} does not fit a byte", field="encoding")
        if not 0 <= block <= 0xFFFF or not 0 <= round <= 0xFFFFFFFF or not 0 <= payload_len <= 0xFFFFFFFF:
            raise LocalProtocolError("block, round or payload_len out of range", field="header")
        _DATA_FIXED.pack_into(
            self._buf, 0, DATA_MAGIC, flags, encoding, 0, block, normal, zero, 0, round, payload_len, packet_num
        )
        offs = self._offsets
        if normal:
            offs[:normal] = normal_offsets
        if zero:
            offs[normal : normal + zero] = zero_offsets
        if normal + zero < self.packet_pages:
            offs[normal + zero :] = 0
        return self._view


class DataHeaderDecoder:
    """Stateless validation of one data packet header against the session's layout.

    ``block_sizes`` are the sizes in bytes of the session's blocks, in order;
    ``max_payload`` bounds ``payload_len`` for encoded (compressed) packets;
    ``encodings`` is the set of encodings the session's method may use.
    """

    def __init__(
        self,
        *,
        packet_pages: int,
        page_size: int,
        block_sizes: list[int] | tuple[int, ...],
        encodings: frozenset[int] | set[int] = frozenset({ENCODING_RAW}),
        max_payload: int | None = None,
    ) -> None:
        self.packet_pages = packet_pages
        self.page_size = page_size
        self.size = data_header_size(packet_pages)
        self.block_sizes = tuple(int(s) for s in block_sizes)
        self.encodings = frozenset(encodings)
        self.max_payload = packet_pages * page_size if max_payload is None else max_payload

    def decode(self, data: bytes | bytearray | memoryview) -> DataHeader:
        if len(data) != self.size:
            raise _fail("header", f"expected {self.size} bytes, got {len(data)}")
        (magic, flags, encoding, reserved1, block, normal, zero, reserved2, rnd, payload_len, packet_num) = (
            _DATA_FIXED.unpack_from(data, 0)
        )
        if magic != DATA_MAGIC:
            raise _fail("magic", f"0x{magic:08x} is not the data packet magic 0x{DATA_MAGIC:08x}")
        if flags & ~_KNOWN_FLAGS:
            raise _fail("flags", f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:04x}")
        if reserved1 or reserved2:
            raise _fail("reserved", "reserved header fields must be zero")
        if encoding not in self.encodings:
            raise _fail("encoding", f"encoding {encoding} is not one this session's method uses")
        count = normal + zero
        if count > self.packet_pages:
            raise _fail("count", f"{normal} normal + {zero} zero pages exceed the {self.packet_pages} slots")
        offsets = np.frombuffer(data, dtype=">u8", count=self.packet_pages, offset=DATA_FIXED_SIZE)
        if flags:
            # SYNC and EOS packets are markers: no pages, no payload
            if count or payload_len or block or encoding:
                raise _fail("flags", "a SYNC/EOS packet must carry no pages, payload, block or encoding")
            if offsets.any():
                raise _fail("offsets", "a SYNC/EOS packet must carry zero offsets")
            return DataHeader(flags, encoding, block, rnd, packet_num, 0, 0, 0, offsets[:0])
        if count == 0:
            raise _fail("count", "a data packet must carry at least one page")
        if block >= len(self.block_sizes):
            raise _fail("block", f"block {block} does not exist (the session has {len(self.block_sizes)})")
        used = offsets[:count]
        if (used % self.page_size).any():
            bad = int(used[(used % self.page_size) != 0][0])
            raise _fail("offsets", f"offset {bad} is not aligned to the page size {self.page_size}")
        limit = self.block_sizes[block] - self.page_size
        if (used > limit).any():
            bad = int(used[used > limit][0])
            raise _fail("offsets", f"offset {bad} is outside block {block} ({self.block_sizes[block]} bytes)")
        if count < self.packet_pages and offsets[count:].any():
            raise _fail("offsets", "unused offset slots must be zero")
        if not _distinct(used, normal):
            raise _fail("offsets", "a page appears twice in one packet")
        raw_len = normal * self.page_size
        if encoding == ENCODING_RAW:
            if payload_len != raw_len:
                raise _fail("payload_len", f"{payload_len} bytes for {normal} raw pages of {self.page_size} bytes")
        elif normal == 0:
            if payload_len:
                raise _fail("payload_len", "an encoded packet without normal pages must carry no payload")
        elif payload_len == 0 or payload_len > self.max_payload:
            raise _fail("payload_len", f"{payload_len} bytes is not in 1..{self.max_payload}")
        return DataHeader(flags, encoding, block, rnd, packet_num, normal, zero, payload_len, used)


def _distinct(offsets: np.ndarray, split: int) -> bool:
    """True if no value occurs twice in ``offsets``, a packet's normal offsets followed
    (from ``split``) by its zero offsets.

    Senders list each part in increasing order, so the common case costs two
    comparisons of neighbours and one ``searchsorted`` of one part into the
    other; any other order falls back to ``np.unique``.
    """
    a, b = offsets[:split], offsets[split:]
    if not ((a[1:] > a[:-1]).all() and (b[1:] > b[:-1]).all()):
        return bool(np.unique(offsets).size == offsets.size)
    if not a.size or not b.size:
        return True
    i = np.searchsorted(a, b)
    np.minimum(i, a.size - 1, out=i)
    return not (a[i] == b).any()


class ChannelState:
    """The per-channel ordering rules a receiver enforces (sans-IO).

    Rounds start at 0. Within a round, data packets carry the current round and
    strictly increasing packet numbers; a SYNC ends the round (the receiver then
    parks until every channel reached it, and calls :meth:`next_round`); an EOS
    ends the stream, after which nothing may arrive.
    """

    def __init__(self, start_round: int = 0) -> None:
        self.round = start_round
        self.last_packet = -1
        self.packets_in_round = 0
        self.at_sync = False
        self.finished = False

    def check(self, header: DataHeader) -> None:
        """Validate ordering; raises :class:`RemoteProtocolError` naming ``round`` or ``packet_num``."""
        if self.finished:
            raise _fail("flags", "packet after end of stream")
        if self.at_sync:
            raise _fail("flags", "packet while parked at a SYNC")
        if header.round != self.round:
            raise _fail("round", f"round {header.round} where round {self.round} was expected")
        if header.packet_num <= self.last_packet:
            raise _fail("packet_num", f"packet {header.packet_num} is not after packet {self.last_packet}")
        self.last_packet = header.packet_num
        if header.is_eos:
            self.finished = True
        elif header.is_sync:
            self.at_sync = True
        else:
            self.packets_in_round += 1

    def next_round(self) -> None:
        """Leave a SYNC: every channel reached it."""
        if not self.at_sync:
            raise LocalProtocolError("next_round outside a SYNC", field="round")
        self.at_sync = False
        self.round += 1
        self.packets_in_round = 0


# --------------------------------------------------------------------------- control messages

_FRAME = struct.Struct(">IBBHI")
FRAME_SIZE = _FRAME.size  # 12
# every message but VERIFY fits in 1 MiB (a CONFIG of 1024 blocks with 255-byte names is ~300 KiB);
# VERIFY carries 8 bytes a page of one block, so its limit follows the session's largest block
MAX_CONTROL_BODY = 1 << 20
MAX_VERIFY_BODY = 1 << 28  # a decoder that knows no session: 32 Mi pages
MAX_JSON_DEPTH = 16
MAX_PEER_TEXT = 500  # characters of a peer's error text kept in our logs and exceptions


def verify_body_limit(max_block_pages: int) -> int:
    """The largest VERIFY body a session whose largest block has ``max_block_pages`` pages needs."""
    return 8 + 8 * max_block_pages


def repair_pages_body_limit(page_size: int) -> int:
    """The largest REPAIR_PAGES body a session of ``page_size`` pages needs (64 pages, their
    indices, fingerprints and bytes)."""
    return 12 + REPAIR_CHUNK_PAGES * (16 + page_size)


def peer_text(text: str, limit: int = MAX_PEER_TEXT) -> str:
    """A peer's text cut to ``limit`` characters (saying how much was cut), for logs and exceptions."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"

T_CONFIG = 1
T_CONFIG_ACK = 2
T_ROUND_END = 3
T_COMPLETE = 4
T_VERIFY = 5
T_RESULT = 6
T_ERROR = 7
T_ROUND_ACK = 8
T_CANCEL = 9
T_COMMIT = 10
T_RESUME = 11
T_COMMIT_ACK = 12
T_REPAIR = 13
T_REPAIR_PAGES = 14
T_REPAIR_DONE = 15
T_CHANNEL_LOST = 16
_LAST_TYPE = T_CHANNEL_LOST

_ZERO_PAGE_MODES = ("multifd", "none")


@dataclass(frozen=True)
class BlockSpec:
    name: str
    size: int


@dataclass(frozen=True)
class Config:
    """Source → destination, first message: what is about to be migrated and how."""

    session_id: bytes
    page_size: int
    channels: int
    packet_pages: int
    blocks: tuple[BlockSpec, ...]
    method: str = "none"
    method_options: dict[str, Any] = field(default_factory=dict)
    zero_page: str = "multifd"
    verify: bool = True
    channel_retries: int = 0
    base: bytes | None = None  # top-up: the save id the destination must have been restored from


@dataclass(frozen=True)
class ConfigAck:
    """Destination → source: the configuration is accepted; data channels may connect."""


@dataclass(frozen=True)
class RoundEnd:
    """Source → destination: round ``round`` ended; ``packets[i]`` data packets went on channel i."""

    round: int
    packets: tuple[int, ...]


@dataclass(frozen=True)
class Complete:
    """Source → destination: ``round`` was the final round; every channel then sent EOS."""

    round: int
    packets: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Verify:
    """Source → destination: per-page fingerprints of one block at switchover."""

    block: int
    fingerprints: np.ndarray

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Verify):
            return NotImplemented
        return self.block == other.block and np.array_equal(self.fingerprints, other.fingerprints)


@dataclass(frozen=True)
class Result:
    """Destination → source, last message: did the region arrive intact."""

    ok: bool
    verified: bool | None = None
    error: str | None = None
    mismatches: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorMessage:
    """Either direction: the sender failed; ``code`` is a short machine word."""

    code: str
    message: str
    channel: int | None = None


@dataclass(frozen=True)
class RoundAck:
    """Destination → source: every channel passed the SYNC of ``round``."""

    round: int


@dataclass(frozen=True)
class Cancel:
    """Source → destination: the source cancelled; release everything."""


@dataclass(frozen=True)
class Resume:
    """Destination → source: a replacement connection for ``channel`` was admitted;
    resend that channel's packets from ``round`` on (the destination's current round)."""

    channel: int
    round: int


@dataclass(frozen=True)
class ChannelLost:
    """Destination → source: the connection of ``channel`` broke here while ``round`` was current.

    The source may not see it (a worker with nothing to send, or one that
    already sent its end of stream, never touches its socket): it reconnects
    the channel as for a break it saw itself. Sent only while retries remain.
    """

    channel: int
    round: int


@dataclass(frozen=True)
class Commit:
    """Source → destination, after a successful RESULT: the source will not resume; the region is yours."""


@dataclass(frozen=True)
class CommitAck:
    """Destination → source, answering COMMIT: the region is the destination's now, whatever happens next."""


@dataclass(frozen=True, eq=False)
class Repair:
    """Destination → source, instead of RESULT: these pages differ; send them again (repair pass ``attempt``)."""

    attempt: int
    pages: tuple[tuple[int, np.ndarray], ...]  # (block index, ascending page indices), blocks ascending

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Repair):
            return NotImplemented
        return (
            self.attempt == other.attempt
            and len(self.pages) == len(other.pages)
            and all(a == c and np.array_equal(b, d) for (a, b), (c, d) in zip(self.pages, other.pages))
        )


@dataclass(frozen=True, eq=False)
class RepairPages:
    """Source → destination: whole pages of one block, each with its fingerprint under the pass's key."""

    attempt: int
    block: int
    pages: np.ndarray  # page indices
    fingerprints: np.ndarray  # uint64, one per page
    data: bytes  # len(pages) * page_size bytes, in page order

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RepairPages):
            return NotImplemented
        return (
            (self.attempt, self.block, self.data) == (other.attempt, other.block, other.data)
            and np.array_equal(self.pages, other.pages)
            and np.array_equal(self.fingerprints, other.fingerprints)
        )


@dataclass(frozen=True)
class RepairDone:
    """Source → destination: every page the REPAIR named was sent; ``pages`` of them in all."""

    attempt: int
    pages: int


ControlMessage = (
    Config
    | ConfigAck
    | RoundEnd
    | Complete
    | Verify
    | Result
    | ErrorMessage
    | RoundAck
    | Cancel
    | Commit
    | Resume
    | CommitAck
    | Repair
    | RepairPages
    | RepairDone
    | ChannelLost
)

# a REPAIR names at most this many pages: more than that is a tracker that
# missed the writer altogether, which a resend at switchover cannot fix
MAX_REPAIR_PAGES = 1 << 16
# a REPAIR_PAGES message carries at most this many pages
REPAIR_CHUNK_PAGES = 64

_ROUND = struct.Struct(">IHH")
_VERIFY = struct.Struct(">HHI")
_ACK = struct.Struct(">I")
_RESUME = struct.Struct(">HHI")
_REPAIR = struct.Struct(">IHH")  # attempt, nblocks, reserved; then per block _REPAIR_BLOCK + u64 pages
_REPAIR_BLOCK = struct.Struct(">HHI")  # block, reserved, npages
_REPAIR_PAGES = struct.Struct(">IHHI")  # attempt, block, reserved, npages; then pages, fingerprints, data
_REPAIR_DONE = struct.Struct(">II")


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _frame(mtype: int, body: bytes) -> bytes:
    return _FRAME.pack(CONTROL_MAGIC, mtype, 0, 0, len(body)) + body


FRAME_FLAG_MAC = 0x01  # a 32-byte tag follows the body (sessions with a key)
MAC_SIZE = 32


class ControlMac:
    """Authenticates the control frames of one session in one direction each way.

    With a shared key, every control frame carries ``HMAC-SHA256`` under a key
    derived from the auth key and the session id, over a per-direction frame
    counter, the frame header and the body: a relay without the key can
    neither change, drop, reorder nor replay a frame without the other end
    noticing (a dropped frame shows at the next one). ``role`` is this end's,
    ``"source"`` or ``"destination"``.
    """

    def __init__(self, key: bytes, session_id: bytes, role: str) -> None:
        if role not in ("source", "destination"):
            raise ValueError(f"role must be 'source' or 'destination', not {role!r}")
        base = hmac.new(key, b"mpmultifd/1 control mac\0" + session_id, hashlib.sha256).digest()
        down = hmac.new(base, b"source to destination", hashlib.sha256).digest()
        up = hmac.new(base, b"destination to source", hashlib.sha256).digest()
        self._send_key, self._recv_key = (down, up) if role == "source" else (up, down)
        self._sent = 0
        self._received = 0

    def seal(self, frame: bytes) -> bytes:
        """``frame`` (header with flags 0, then body) with the MAC flag set and its tag appended."""
        header = bytearray(frame[:FRAME_SIZE])
        header[5] |= FRAME_FLAG_MAC
        tag = hmac.new(self._send_key, self._sent.to_bytes(8, "big") + header + frame[FRAME_SIZE:], hashlib.sha256)
        self._sent += 1
        return bytes(header) + frame[FRAME_SIZE:] + tag.digest()

    def check(self, header: bytes, body: bytes, tag: bytes) -> None:
        """Raise RemoteProtocolError (field ``mac``) unless ``tag`` is this frame's, in order."""
        want = hmac.new(self._recv_key, self._received.to_bytes(8, "big") + header + body, hashlib.sha256).digest()
        if not hmac.compare_digest(want, tag):
            raise _fail("mac", f"control frame {self._received} fails authentication (changed, dropped or replayed)")
        self._received += 1


def encode_control(msg: ControlMessage, mac: ControlMac | None = None) -> bytes:
    """Encode one control message with its frame header (sealed by ``mac`` when the session has a key)."""
    frame = _encode_control(msg)
    return mac.seal(frame) if mac is not None else frame


def _encode_control(msg: ControlMessage) -> bytes:
    if isinstance(msg, Config):
        _validate_config(msg, LocalProtocolError)
        obj = {
            "session": msg.session_id.hex(),
            "page_size": msg.page_size,
            "channels": msg.channels,
            "packet_pages": msg.packet_pages,
            "blocks": [{"name": b.name, "size": b.size} for b in msg.blocks],
            "method": msg.method,
            "method_options": msg.method_options,
            "zero_page": msg.zero_page,
            "verify": msg.verify,
            "channel_retries": msg.channel_retries,
        }
        if msg.base is not None:
            obj["base"] = msg.base.hex()
        return _frame(T_CONFIG, _json(obj))
    if isinstance(msg, ConfigAck):
        return _frame(T_CONFIG_ACK, b"")
    if isinstance(msg, (RoundEnd, Complete)):
        if not 1 <= len(msg.packets) <= MAX_CHANNELS or not 0 <= msg.round <= 0xFFFFFFFF:
            raise LocalProtocolError("packets: 1..256 channel counts and a 32-bit round required", field="packets")
        counts = np.asarray(msg.packets, dtype=">u8")
        body = _ROUND.pack(msg.round, len(msg.packets), 0) + counts.tobytes()
        return _frame(T_ROUND_END if isinstance(msg, RoundEnd) else T_COMPLETE, body)
    if isinstance(msg, Verify):
        fps = np.asarray(msg.fingerprints, dtype=">u8")
        return _frame(T_VERIFY, _VERIFY.pack(msg.block, 0, len(fps)) + fps.tobytes())
    if isinstance(msg, Result):
        return _frame(
            T_RESULT,
            _json({"ok": msg.ok, "verified": msg.verified, "error": msg.error, "mismatches": msg.mismatches}),
        )
    if isinstance(msg, ErrorMessage):
        return _frame(T_ERROR, _json({"code": msg.code, "message": msg.message, "channel": msg.channel}))
    if isinstance(msg, RoundAck):
        return _frame(T_ROUND_ACK, _ACK.pack(msg.round))
    if isinstance(msg, Cancel):
        return _frame(T_CANCEL, b"")
    if isinstance(msg, Commit):
        return _frame(T_COMMIT, b"")
    if isinstance(msg, Resume):
        if not 0 <= msg.channel < MAX_CHANNELS or not 0 <= msg.round <= 0xFFFFFFFF:
            raise LocalProtocolError("resume: channel or round out of range", field="channel")
        return _frame(T_RESUME, _RESUME.pack(msg.channel, 0, msg.round))
    if isinstance(msg, ChannelLost):
        if not 0 <= msg.channel < MAX_CHANNELS or not 0 <= msg.round <= 0xFFFFFFFF:
            raise LocalProtocolError("channel-lost: channel or round out of range", field="channel")
        return _frame(T_CHANNEL_LOST, _RESUME.pack(msg.channel, 0, msg.round))
    if isinstance(msg, CommitAck):
        return _frame(T_COMMIT_ACK, b"")
    if isinstance(msg, Repair):
        total = sum(len(p) for _, p in msg.pages)
        if not 1 <= len(msg.pages) <= MAX_BLOCKS or not 1 <= total <= MAX_REPAIR_PAGES:
            raise LocalProtocolError(f"repair: {total} pages in {len(msg.pages)} blocks", field="pages")
        parts = [_REPAIR.pack(msg.attempt, len(msg.pages), 0)]
        for block, pages in msg.pages:
            parts.append(_REPAIR_BLOCK.pack(block, 0, len(pages)))
            parts.append(np.asarray(pages, dtype=">u8").tobytes())
        return _frame(T_REPAIR, b"".join(parts))
    if isinstance(msg, RepairPages):
        n = len(msg.pages)
        if not 1 <= n <= REPAIR_CHUNK_PAGES or len(msg.fingerprints) != n or len(msg.data) % n:
            raise LocalProtocolError(f"repair_pages: {n} pages, {len(msg.fingerprints)} fingerprints", field="pages")
        return _frame(
            T_REPAIR_PAGES,
            _REPAIR_PAGES.pack(msg.attempt, msg.block, 0, n)
            + np.asarray(msg.pages, dtype=">u8").tobytes()
            + np.asarray(msg.fingerprints, dtype=">u8").tobytes()
            + bytes(msg.data),
        )
    if isinstance(msg, RepairDone):
        return _frame(T_REPAIR_DONE, _REPAIR_DONE.pack(msg.attempt, msg.pages))
    raise LocalProtocolError(f"not a control message: {type(msg).__name__}", field="type")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_config(cfg: Config, err: type) -> None:
    def bad(name: str, text: str) -> Exception:
        e = err(f"{name}: {text}", field=name)
        return e

    if len(cfg.session_id) != 16:
        raise bad("session", "must be 16 bytes")
    ps = cfg.page_size
    if not _is_int(ps) or ps < 512 or ps > (1 << 30) or ps & (ps - 1):
        raise bad("page_size", f"{ps!r} is not a power of two in 512..1 GiB")
    if not _is_int(cfg.channels) or not 1 <= cfg.channels <= MAX_CHANNELS:
        raise bad("channels", f"{cfg.channels!r} not in 1..{MAX_CHANNELS}")
    if not _is_int(cfg.packet_pages) or not 1 <= cfg.packet_pages <= MAX_PACKET_PAGES:
        raise bad("packet_pages", f"{cfg.packet_pages!r} not in 1..{MAX_PACKET_PAGES}")
    if not 1 <= len(cfg.blocks) <= MAX_BLOCKS:
        raise bad("blocks", f"{len(cfg.blocks)} blocks, expected 1..{MAX_BLOCKS}")
    names = set()
    for i, b in enumerate(cfg.blocks):
        if not isinstance(b.name, str) or not b.name or "\0" in b.name or len(b.name.encode()) > MAX_BLOCK_NAME:
            raise bad(f"blocks[{i}].name", f"{b.name!r} is not a name of 1..{MAX_BLOCK_NAME} bytes")
        if b.name in names:
            raise bad(f"blocks[{i}].name", f"{b.name!r} appears twice")
        names.add(b.name)
        if not _is_int(b.size) or b.size <= 0 or b.size % ps or b.size > MAX_BLOCK_SIZE:
            raise bad(f"blocks[{i}].size", f"{b.size!r} is not a positive multiple of the page size {ps}")
    if not isinstance(cfg.method, str) or not cfg.method or len(cfg.method) > 64:
        raise bad("method", f"{cfg.method!r} is not a method name")
    if not isinstance(cfg.method_options, dict):
        raise bad("method_options", "must be an object")
    if cfg.zero_page not in _ZERO_PAGE_MODES:
        raise bad("zero_page", f"{cfg.zero_page!r} is not one of {', '.join(_ZERO_PAGE_MODES)}")
    if not isinstance(cfg.verify, bool):
        raise bad("verify", f"{cfg.verify!r} is not a boolean")
    if not _is_int(cfg.channel_retries) or not 0 <= cfg.channel_retries <= 1000:
        raise bad("channel_retries", f"{cfg.channel_retries!r} not in 0..1000")
    if cfg.base is not None and (not isinstance(cfg.base, bytes) or len(cfg.base) != 16):
        raise bad("base", "must be a 16-byte save id or absent")


_CONFIG_KEYS = {
    "session",
    "page_size",
    "channels",
    "packet_pages",
    "blocks",
    "method",
    "method_options",
    "zero_page",
    "verify",
    "channel_retries",
}


def _json_depth_over(obj: Any, limit: int) -> bool:
    """True when ``obj`` nests lists and objects deeper than ``limit`` (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            children: Any = o.values()
        elif isinstance(o, list):
            children = o
        else:
            continue
        if d > limit:
            return True
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _load_json(body: bytes, what: str) -> dict[str, Any]:
    if len(body) > MAX_CONTROL_BODY:
        raise _fail(what, f"JSON body of {len(body)} bytes exceeds {MAX_CONTROL_BODY}")
    try:
        obj = json.loads(body.decode("utf-8"))
    except RecursionError:
        raise _fail(what, f"JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(what, f"body is not valid JSON: {peer_text(str(e), 200)}") from None
    if not isinstance(obj, dict):
        raise _fail(what, "body must be a JSON object")
    if _json_depth_over(obj, MAX_JSON_DEPTH):
        raise _fail(what, f"JSON nests deeper than {MAX_JSON_DEPTH} levels")
    return obj


def _decode_config(body: bytes) -> Config:
    obj = _load_json(body, "config")
    missing = _CONFIG_KEYS - obj.keys()
    if missing:
        raise _fail(sorted(missing)[0], "missing from the config")
    extra = obj.keys() - _CONFIG_KEYS - {"base"}
    if extra:
        raise _fail(sorted(extra)[0], "is not a config field")
    session = obj["session"]
    try:
        if not isinstance(session, str) or len(session) != 32:
            raise ValueError
        sid = bytes.fromhex(session)
    except ValueError:
        raise _fail("session", "must be 32 hex digits") from None
    base = None
    if "base" in obj:
        try:
            if not isinstance(obj["base"], str) or len(obj["base"]) != 32:
                raise ValueError
            base = bytes.fromhex(obj["base"])
        except ValueError:
            raise _fail("base", "must be 32 hex digits") from None
    blocks_raw = obj["blocks"]
    if not isinstance(blocks_raw, list):
        raise _fail("blocks", "must be a list")
    blocks = []
    for i, b in enumerate(blocks_raw[: MAX_BLOCKS + 1]):
        if not isinstance(b, dict) or set(b) != {"name", "size"}:
            raise _fail(f"blocks[{i}]", "must be an object with exactly name and size")
        blocks.append(BlockSpec(b["name"], b["size"]))
    cfg = Config(
        session_id=sid,
        page_size=obj["page_size"],
        channels=obj["channels"],
        packet_pages=obj["packet_pages"],
        blocks=tuple(blocks),
        method=obj["method"],
        method_options=obj["method_options"],
        zero_page=obj["zero_page"],
        verify=obj["verify"],
        channel_retries=obj["channel_retries"],
        base=base,
    )
    _validate_config(cfg, RemoteProtocolError)
    return cfg


def _decode_counts(body: bytes, what: str) -> tuple[int, tuple[int, ...]]:
    if len(body) < _ROUND.size:
        raise _fail(what, f"body of {len(body)} bytes is shorter than {_ROUND.size}")
    rnd, n, reserved = _ROUND.unpack_from(body)
    if reserved:
        raise _fail("reserved", "must be zero")
    if not 1 <= n <= MAX_CHANNELS:
        raise _fail("nchannels", f"{n} not in 1..{MAX_CHANNELS}")
    if len(body) != _ROUND.size + 8 * n:
        raise _fail("packets", f"{len(body) - _ROUND.size} bytes for {n} channel counts")
    counts = np.frombuffer(body, dtype=">u8", offset=_ROUND.size)
    return rnd, tuple(int(c) for c in counts)


def _decode_body(mtype: int, body: bytes) -> ControlMessage:
    empty = _EMPTY_MESSAGES.get(mtype)
    if empty is not None:
        name, cls = empty
        if body:
            raise _fail("length", f"{name} carries no body")
        return cls()
    if mtype == T_CONFIG:
        return _decode_config(body)
    if mtype in (T_ROUND_END, T_COMPLETE):
        rnd, counts = _decode_counts(body, "round_end" if mtype == T_ROUND_END else "complete")
        return RoundEnd(rnd, counts) if mtype == T_ROUND_END else Complete(rnd, counts)
    if mtype == T_VERIFY:
        if len(body) < _VERIFY.size:
            raise _fail("verify", "body too short")
        block, reserved, n = _VERIFY.unpack_from(body)
        if reserved:
            raise _fail("reserved", "must be zero")
        if len(body) != _VERIFY.size + 8 * n:
            raise _fail("npages", f"{n} fingerprints announced, {(len(body) - _VERIFY.size) / 8} present")
        fps = np.frombuffer(body, dtype=">u8", offset=_VERIFY.size).astype(np.uint64)
        return Verify(block, fps)
    if mtype == T_RESULT:
        obj = _load_json(body, "result")
        if set(obj) != {"ok", "verified", "error", "mismatches"}:
            raise _fail("result", "must carry exactly ok, verified, error, mismatches")
        if not isinstance(obj["ok"], bool):
            raise _fail("ok", "must be a boolean")
        if obj["verified"] is not None and not isinstance(obj["verified"], bool):
            raise _fail("verified", "must be a boolean or null")
        if obj["error"] is not None and not isinstance(obj["error"], str):
            raise _fail("error", "must be a string or null")
        mm = obj["mismatches"]
        if not isinstance(mm, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(_is_int(p) and p >= 0 for p in v) for k, v in mm.items()
        ):
            raise _fail("mismatches", "must map block names to lists of page indices")
        error = None if obj["error"] is None else peer_text(obj["error"])
        return Result(obj["ok"], obj["verified"], error, mm)
    if mtype == T_ERROR:
        obj = _load_json(body, "error")
        if set(obj) != {"code", "message", "channel"}:
            raise _fail("error", "must carry exactly code, message, channel")
        if not isinstance(obj["code"], str) or not isinstance(obj["message"], str):
            raise _fail("code", "code and message must be strings")
        ch = obj["channel"]
        if ch is not None and (not _is_int(ch) or not 0 <= ch < MAX_CHANNELS):
            raise _fail("channel", f"{ch!r} is not a channel index")
        return ErrorMessage(peer_text(obj["code"], 64), peer_text(obj["message"]), ch)
    if mtype == T_ROUND_ACK:
        if len(body) != _ACK.size:
            raise _fail("length", f"ROUND_ACK body must be {_ACK.size} bytes")
        return RoundAck(_ACK.unpack(body)[0])
    if mtype == T_RESUME:
        return Resume(*_decode_channel_round(body, "RESUME"))
    if mtype == T_CHANNEL_LOST:
        return ChannelLost(*_decode_channel_round(body, "CHANNEL_LOST"))
    if mtype == T_REPAIR:
        return _decode_repair(body)
    if mtype == T_REPAIR_PAGES:
        if len(body) < _REPAIR_PAGES.size:
            raise _fail("repair_pages", "body too short")
        attempt, block, reserved, n = _REPAIR_PAGES.unpack_from(body)
        if reserved:
            raise _fail("reserved", "must be zero")
        if not 1 <= n <= REPAIR_CHUNK_PAGES:
            raise _fail("npages", f"{n} not in 1..{REPAIR_CHUNK_PAGES}")
        data_len = len(body) - _REPAIR_PAGES.size - 16 * n
        if data_len <= 0 or data_len % n:
            raise _fail("length", f"{data_len} bytes of page data for {n} pages")
        off = _REPAIR_PAGES.size
        pages = np.frombuffer(body, dtype=">u8", count=n, offset=off).astype(np.int64)
        prints = np.frombuffer(body, dtype=">u8", count=n, offset=off + 8 * n).astype(np.uint64)
        return RepairPages(attempt, block, pages, prints, body[off + 16 * n :])
    if mtype == T_REPAIR_DONE:
        if len(body) != _REPAIR_DONE.size:
            raise _fail("length", f"REPAIR_DONE body must be {_REPAIR_DONE.size} bytes")
        return RepairDone(*_REPAIR_DONE.unpack(body))
    raise _fail("type", f"unknown control message type {mtype}")


# messages whose body is empty: type -> (name, class)
_EMPTY_MESSAGES: dict[int, tuple[str, Any]] = {
    T_CONFIG_ACK: ("CONFIG_ACK", ConfigAck),
    T_CANCEL: ("CANCEL", Cancel),
    T_COMMIT: ("COMMIT", Commit),
    T_COMMIT_ACK: ("COMMIT_ACK", CommitAck),
}


def _decode_channel_round(body: bytes, name: str) -> tuple[int, int]:
    """The (channel, round) body that RESUME and CHANNEL_LOST share."""
    if len(body) != _RESUME.size:
        raise _fail("length", f"{name} body must be {_RESUME.size} bytes")
    channel, reserved, rnd = _RESUME.unpack(body)
    if reserved:
        raise _fail("reserved", "must be zero")
    if channel >= MAX_CHANNELS:
        raise _fail("channel", f"{channel} is not a channel index")
    return channel, rnd


def _decode_repair(body: bytes) -> Repair:
    if len(body) < _REPAIR.size:
        raise _fail("repair", "body too short")
    attempt, nblocks, reserved = _REPAIR.unpack_from(body)
    if reserved:
        raise _fail("reserved", "must be zero")
    if not 1 <= nblocks <= MAX_BLOCKS:
        raise _fail("nblocks", f"{nblocks} not in 1..{MAX_BLOCKS}")
    off, total, out = _REPAIR.size, 0, []
    for _ in range(nblocks):
        if len(body) < off + _REPAIR_BLOCK.size:
            raise _fail("length", "REPAIR ends inside a block entry")
        block, reserved, n = _REPAIR_BLOCK.unpack_from(body, off)
        off += _REPAIR_BLOCK.size
        total += n
        if reserved:
            raise _fail("reserved", "must be zero")
        if n == 0 or total > MAX_REPAIR_PAGES:
            raise _fail("npages", f"{n} pages for block {block} ({total} in all; 1..{MAX_REPAIR_PAGES})")
        if len(body) < off + 8 * n:
            raise _fail("length", "REPAIR ends inside a page list")
        out.append((block, np.frombuffer(body, dtype=">u8", count=n, offset=off).astype(np.int64)))
        off += 8 * n
    if off != len(body):
        raise _fail("length", f"{len(body) - off} bytes after the last block of REPAIR")
    return Repair(attempt, tuple(out))


class ControlDecoder:
    """Incremental decoder for the control channel (sans-IO, like h11).

    Feed it whatever bytes arrived with :meth:`feed`; call :meth:`next_message`
    until it returns ``None`` (it needs more bytes). ``max_body`` bounds the
    body a frame may announce, so a hostile length cannot make us buffer
    without limit; ``max_verify`` does so for VERIFY, whose body grows with
    the block (a destination sets it from its region with
    :func:`verify_body_limit` once it knows the session), and
    ``max_repair`` for REPAIR_PAGES, which grows with the page size
    (:func:`repair_pages_body_limit`). Peer error texts
    come out cut to :data:`MAX_PEER_TEXT` characters.
    """

    def __init__(
        self,
        *,
        max_body: int = MAX_CONTROL_BODY,
        max_verify: int = MAX_VERIFY_BODY,
        max_repair: int | None = None,
        mac: ControlMac | None = None,
    ) -> None:
        self._buf = bytearray()
        self.max_body = max_body
        self.max_verify = max_verify
        # REPAIR_PAGES carries 64 whole pages: its limit follows the page size (default: 4 KiB pages)
        self.max_repair = repair_pages_body_limit(4096) if max_repair is None else max_repair
        self.mac = mac  # every frame must then carry a valid tag

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buf)

    def next_message(self) -> ControlMessage | None:
        if len(self._buf) < FRAME_SIZE:
            return None
        magic, mtype, flags, reserved, length = _FRAME.unpack_from(self._buf)
        if magic != CONTROL_MAGIC:
            raise _fail("magic", f"0x{magic:08x} is not the control magic 0x{CONTROL_MAGIC:08x}")
        if reserved or flags & ~FRAME_FLAG_MAC:
            raise _fail("reserved", "frame flags and reserved bytes must be zero")
        if bool(flags & FRAME_FLAG_MAC) != (self.mac is not None):
            raise _fail(
                "mac",
                "an authenticated frame where none was expected"
                if flags
                else "a frame without its authentication tag in a session with a key",
            )
        if not T_CONFIG <= mtype <= _LAST_TYPE:
            raise _fail("type", f"unknown control message type {mtype}")
        if mtype == T_VERIFY:
            limit = self.max_verify
        elif mtype == T_REPAIR_PAGES:
            limit = max(self.max_repair, self.max_body)
        else:
            limit = self.max_body
        if length > limit:
            raise _fail("length", f"body of {length} bytes exceeds the limit of {limit}")
        tag_size = MAC_SIZE if self.mac is not None else 0
        if len(self._buf) < FRAME_SIZE + length + tag_size:
            return None
        body = bytes(self._buf[FRAME_SIZE : FRAME_SIZE + length])
        if self.mac is not None:
            end = FRAME_SIZE + length
            self.mac.check(bytes(self._buf[:FRAME_SIZE]), body, bytes(self._buf[end : end + MAC_SIZE]))
        del self._buf[: FRAME_SIZE + length + tag_size]
        return _decode_body(mtype, body)
