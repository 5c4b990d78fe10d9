"""Hostile-input fuzzing of the destination: capture real streams, mutate them, replay them.

The harness has three parts:

- :func:`capture` runs a real migration through a :class:`RecordingRelay`
  (a TCP relay on loopback that records every byte the source sent, per
  connection) and returns a :class:`Capture`: the source's bytes at
  switchover plus the control and data streams cut into chunks (the hello,
  then one control frame or one data packet per chunk).
- :func:`apply_mutations` turns a capture into hostile :class:`Streams` with a
  list of :class:`Mutation` descriptors. Every descriptor field is an integer
  that is reduced modulo whatever it indexes, so any descriptor is valid for
  any capture (which lets hypothesis shrink them freely).
- :func:`replay` speaks the streams to a fresh :class:`~mpmultifd.Destination`
  over new connections and judges what it did (:class:`Outcome`): it either
  failed with a typed :class:`~mpmultifd.MigrationError` and marked its region
  invalid, or it completed with the source's bytes; it never hangs once the
  peer has closed every connection, never writes a page that no acceptable
  header named, never touches memory outside its region.

Replays work because, without an auth key, admission depends only on the
hello: the recorded hello, CONFIG and data hellos carry one session id, so a
verbatim replay is a consistent (old) session. They stay causal: the relay
notes how many control messages the destination had sent before each control
message of the source (COMMIT, say, answers RESULT), and a replay holds each
one back until it has seen as many.

:func:`stray_connection` opens the kind of unauthenticated junk connection that
must not disturb a running session.
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import os
import random
import shutil
import socket
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from mpmultifd import auth
from mpmultifd.config import MigrationConfig
from mpmultifd.destination import Destination
from mpmultifd.errors import MigrationError, WorkerDied
from mpmultifd.methods import get_method
from mpmultifd.ram import GuestRAM
from mpmultifd.source import Source
from mpmultifd.testing import fill
from mpmultifd.wire import (
    CONTROL_CHANNEL,
    DATA_MAGIC,
    FLAG_EOS,
    FLAG_SYNC,
    HELLO_MAGIC,
    HELLO_SIZE,
    KIND_CONTROL,
    KIND_DATA,
    ChannelState,
    Config,
    ConfigAck,
    ControlDecoder,
    DataHeaderDecoder,
    ErrorMessage,
    data_header_size,
    decode_hello,
)

__all__ = [
    "METHODS",
    "KINDS",
    "Capture",
    "Streams",
    "Mutation",
    "Outcome",
    "RecordingRelay",
    "RelayRecord",
    "capture",
    "capture_rounds",
    "streams_of",
    "apply_mutations",
    "header_field",
    "with_header_field",
    "marker",
    "with_payload",
    "data_packets",
    "compress_like",
    "random_mutations",
    "named_pages",
    "replay",
    "bomb_payloads",
    "stray_connection",
    "STRAY_KINDS",
    "save_case",
    "load_case",
]

METHODS = ("none", "lz4", "zstd", "zlib")
FRAME_SIZE = 12
_FRAME = struct.Struct(">IBBHI")

# verdicts that mean the destination behaved; everything else is a finding
CLEAN_VERDICTS = ("benign", "failed", "refused")


# --------------------------------------------------------------------------- capture


@dataclass(frozen=True)
class Capture:
    """One real migration's source→destination bytes, cut into chunks, and the source's region.

    ``control`` is the control connection: the hello, then one control frame
    per chunk (``control[1]`` is CONFIG). ``data[i]`` is data channel ``i``:
    the hello, then one packet (header and payload) per chunk.

    ``control_after[k]`` is how many control messages the destination had sent
    (counted at the relay) before the source sent ``control[k]``: an upper
    bound on what the source waited for (COMMIT, for one, answers RESULT), and
    never a message that ``control[k]`` or a later chunk caused. A replay
    sends a chunk only once it has seen that many, so it stays causal.
    """

    method: str
    page_size: int
    packet_pages: int
    blocks: tuple[tuple[str, int], ...]
    region: dict[str, bytes]
    control: tuple[bytes, ...]
    data: tuple[tuple[bytes, ...], ...]
    control_after: tuple[int, ...] = ()

    @property
    def channels(self) -> int:
        return len(self.data)

    @property
    def header_size(self) -> int:
        return data_header_size(self.packet_pages)


@dataclass
class RelayRecord:
    """One relayed connection: what the client sent, and what it had been told when it sent it.

    ``marks`` holds, for every chunk of bytes read from the client, its offset
    in ``sent`` and how many control frames the server had sent by then
    (counted before they were forwarded, so the client cannot have reacted to
    a frame the mark does not count).
    """

    sent: bytearray = field(default_factory=bytearray)
    reply: bytearray = field(default_factory=bytearray)
    marks: list[tuple[int, int]] = field(default_factory=list)
    frames: int = 0
    _parsed: int = auth.GREETING_SIZE + auth.WELCOME_SIZE

    def count_frames(self) -> None:
        """Advance ``frames`` over the complete control frames in ``reply`` (after greeting and welcome)."""
        while len(self.reply) >= self._parsed + FRAME_SIZE:
            length = _FRAME.unpack_from(self.reply, self._parsed)[4]
            if len(self.reply) < self._parsed + FRAME_SIZE + length:
                return
            self._parsed += FRAME_SIZE + length
            self.frames += 1

    def after(self, offset: int) -> int:
        """Frames the server had sent before the client's byte at ``offset`` was read."""
        n = 0
        for off, frames in self.marks:
            if off > offset:
                break
            n = frames
        return n


class RecordingRelay:
    """A loopback TCP relay that forwards both directions and records both.

    ``records`` holds one :class:`RelayRecord` per accepted connection, in
    accept order. Use it as a context manager; :meth:`close` stops every thread.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = (upstream[0], upstream[1])
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self._lsock.settimeout(0.1)
        self.address: tuple[str, int] = self._lsock.getsockname()[:2]
        self.records: list[RelayRecord] = []
        self._socks: list[socket.socket] = []
        self._pumps: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="fuzz-relay", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                up = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            up.settimeout(None)
            rec = RelayRecord()
            with self._lock:
                self._socks += [client, up]
                self.records.append(rec)
                for args in ((client, up, rec, True), (up, client, rec, False)):
                    t = threading.Thread(target=self._pump, args=args, daemon=True)
                    self._pumps.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, rec: RelayRecord, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    if from_client:
                        rec.marks.append((len(rec.sent), rec.frames))
                        rec.sent += data
                    else:
                        rec.reply += data
                        rec.count_frames()  # before forwarding: the client cannot react earlier
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)  # pass the end of stream on
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._lsock.close()
        self._acceptor.join(5)
        with self._lock:
            socks, pumps = list(self._socks), list(self._pumps)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in pumps:
            t.join(5)
        for s in socks:
            s.close()

    def __enter__(self) -> RecordingRelay:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Writer:
    """A thread that keeps writing random bytes into the source region (so there are several rounds)."""

    def __init__(self, ram: GuestRAM, seed: int) -> None:
        self._ram = ram
        self._rng = np.random.default_rng(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ram, rng = self._ram, self._rng
        ps = ram.page_size
        while not self._stop.is_set():
            b = ram.blocks[int(rng.integers(0, len(ram.blocks)))]
            length = int(rng.integers(1, 2 * ps))
            off = int(rng.integers(0, b.size - length + 1))
            ram.write(b.index, off, rng.integers(0, 256, size=length, dtype=np.uint8).tobytes())
            time.sleep(0.0005)

    def pause(self) -> None:
        self._stop.set()
        self._thread.join()


def _split_control(stream: bytes) -> list[bytes]:
    chunks, pos = [stream[:HELLO_SIZE]], HELLO_SIZE
    while pos + FRAME_SIZE <= len(stream):
        length = _FRAME.unpack_from(stream, pos)[4]
        chunks.append(stream[pos : pos + FRAME_SIZE + length])
        pos += FRAME_SIZE + length
    if pos < len(stream):
        chunks.append(stream[pos:])
    return chunks


def _split_data(stream: bytes, header_size: int) -> list[bytes]:
    chunks, pos = [stream[:HELLO_SIZE]], HELLO_SIZE
    while pos + header_size <= len(stream):
        payload_len = struct.unpack_from(">I", stream, pos + 20)[0]
        chunks.append(stream[pos : pos + header_size + payload_len])
        pos += header_size + payload_len
    if pos < len(stream):
        chunks.append(stream[pos:])
    return chunks


def capture(
    method: str = "none",
    *,
    size: int = 512 << 10,
    blocks: Sequence[tuple[str, int]] | None = None,
    channels: int = 2,
    packet_pages: int = 8,
    seed: int = 1,
    writer: bool = True,
    max_rounds: int = 3,
    min_rounds: int = 3,
    attempts: int = 5,
) -> Capture:
    """Run one real migration through a :class:`RecordingRelay` and return what the source sent.

    ``blocks`` defaults to one block ``"ram"`` of ``size`` bytes. With
    ``writer`` a thread dirties the source until switchover, so the capture
    has several rounds (up to ``max_rounds`` plus the final one). Whether the
    writer got to dirty a page during a round depends on scheduling, so a
    capture with fewer than ``min_rounds`` rounds is retried, at most
    ``attempts`` times in all (the last one is kept whatever it has).
    """
    cap = _capture_once(method, size, blocks, channels, packet_pages, seed, writer, max_rounds)
    for i in range(1, attempts):
        if not writer or capture_rounds(cap) >= min_rounds:
            break
        cap = _capture_once(method, size, blocks, channels, packet_pages, seed + 1000 * i, writer, max_rounds)
    return cap


def capture_rounds(cap: Capture) -> int:
    """Rounds in a capture, final one included (one ROUND_END per round, then COMPLETE)."""
    return sum(1 for c in cap.control[1:] if len(c) > 4 and c[4] in (3, 4))


def _capture_once(
    method: str,
    size: int,
    blocks: Sequence[tuple[str, int]] | None,
    channels: int,
    packet_pages: int,
    seed: int,
    writer: bool,
    max_rounds: int,
) -> Capture:
    layout = tuple(blocks) if blocks is not None else (("ram", size),)
    cfg = MigrationConfig(
        channels=channels,
        compression=method,
        packet_pages=packet_pages,
        start_method="fork",
        max_rounds=max_rounds,
        downtime_limit=1e-6 if writer else 0.3,
        stall_downtime_limit=math.inf,  # a capture wants its rounds, then a switchover
        timeout=10.0,
    )
    with GuestRAM.create(dict(layout)) as src_ram, GuestRAM.create(dict(layout)) as dst_ram:
        fill(src_ram, "mixed", seed)
        with Destination(dst_ram, config=cfg) as dst, RecordingRelay(dst.address) as relay:
            w = _Writer(src_ram, seed + 1) if writer else None
            try:
                with Source(src_ram, cfg) as src:
                    src.migrate(relay.address, pause=w.pause if w else None)
            finally:
                if w is not None:
                    w.pause()
            dst.wait(30)
            relay.close()
            records = list(relay.records)
        region = {b.name: src_ram.view(b.index).tobytes() for b in src_ram.blocks}
        if any(dst_ram.view(b.index).tobytes() != region[b.name] for b in dst_ram.blocks):
            raise RuntimeError("the captured migration itself did not arrive intact")
    control: list[bytes] | None = None
    after: list[int] = []
    data: dict[int, list[bytes]] = {}
    hsize = data_header_size(packet_pages)
    for rec in records:
        sent = bytes(rec.sent)
        hello = decode_hello(sent[:HELLO_SIZE])
        if hello.kind == KIND_CONTROL:
            control = _split_control(sent)
            starts = np.cumsum([0] + [len(c) for c in control[:-1]]).tolist()
            after = [rec.after(int(off)) for off in starts]
        else:
            data[hello.channel] = _split_data(sent, hsize)
    if control is None or sorted(data) != list(range(channels)):
        raise RuntimeError(f"relay saw an incomplete session: {len(records)} connections")
    return Capture(
        method=method,
        page_size=src_ram.page_size,
        packet_pages=packet_pages,
        blocks=layout,
        region=region,
        control=tuple(control),
        data=tuple(tuple(data[i]) for i in range(channels)),
        control_after=tuple(after),
    )


# --------------------------------------------------------------------------- streams and mutations


@dataclass
class Streams:
    """What a replay sends: the control connection and the data connections, in connect order.

    A connection in ``truncated`` (0 is control, ``i + 1`` is ``data[i]``) is
    shut down for writing right after its last chunk; the others stay open
    until the destination answers (or the replay gives up). With
    ``control_late`` the control messages after CONFIG go only once every data
    connection sent its bytes. ``control_after`` runs parallel to ``control``
    (see :attr:`Capture.control_after`).
    """

    control: list[bytes]
    data: list[list[bytes]]
    truncated: set[int] = field(default_factory=set)
    control_late: bool = False
    control_after: list[int] = field(default_factory=list)

    def copy(self) -> Streams:
        return Streams(
            list(self.control),
            [list(d) for d in self.data],
            set(self.truncated),
            self.control_late,
            list(self.control_after),
        )

    def after(self, target: int) -> list[int] | None:
        """The ``control_after`` list when ``target`` is the control connection, else None."""
        return self.control_after if self.conn_index(target) == 0 else None

    def conn(self, target: int) -> list[bytes]:
        """Connection ``target`` modulo the number of connections (0 is control)."""
        n = 1 + len(self.data)
        t = target % n
        return self.control if t == 0 else self.data[t - 1]

    def conn_index(self, target: int) -> int:
        return target % (1 + len(self.data))


def streams_of(cap: Capture) -> Streams:
    """The capture's streams, unmodified."""
    after = list(cap.control_after) or [0] * len(cap.control)
    return Streams(list(cap.control), [list(d) for d in cap.data], control_after=after)


KINDS = (
    "flip",  # xor one byte anywhere
    "truncate",  # cut a connection at a byte and close it
    "drop",  # remove a chunk (packet or control message)
    "dup",  # insert a copy of a chunk elsewhere on the same connection
    "swap",  # swap two chunks of one connection
    "field",  # set a data header field to a boundary value
    "marker",  # a SYNC or EOS in the wrong place, or a data packet turned into one
    "payload",  # replace a payload: bomb, garbage, a valid encoding of other bytes, ...
    "hello",  # set a hello field to a boundary value
    "control",  # change a control message's fields, or insert an unexpected message
    "conn",  # reorder, duplicate, drop or cross connections; send control late
)


@dataclass(frozen=True)
class Mutation:
    """One mutation; every integer is reduced modulo what it selects, so any value is valid."""

    kind: str
    target: int = 0  # connection: 0 control, 1.. data (modulo)
    index: int = 0  # chunk (modulo)
    other: int = 0  # second chunk, or which field / variant
    pos: int = 0  # byte position
    value: int = 0  # value selector

    def describe(self) -> str:
        return f"{self.kind}(t={self.target},i={self.index},o={self.other},p={self.pos},v={self.value})"


# data header fields: name -> (offset, struct format)
_HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "flags": (4, ">H"),
    "encoding": (6, "B"),
    "reserved1": (7, "B"),
    "block": (8, ">H"),
    "normal": (10, ">H"),
    "zero": (12, ">H"),
    "reserved2": (14, ">H"),
    "round": (16, ">I"),
    "payload_len": (20, ">I"),
    "packet_num": (24, ">Q"),
    "offset": (32, ">Q"),  # the slot is chosen by ``pos``
}
_FIELD_NAMES = tuple(_HEADER_FIELDS)

_HELLO_FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "version": (4, ">H"),
    "kind": (6, "B"),
    "flags": (7, "B"),
    "session": (8, "session"),
    "channel": (24, ">H"),
    "nchannels": (26, ">H"),
    "reserved": (28, ">I"),
}
_HELLO_NAMES = tuple(_HELLO_FIELDS)

_MASKS = {"B": 0xFF, ">H": 0xFFFF, ">I": 0xFFFFFFFF, ">Q": (1 << 64) - 1}


def _pick(seq: Sequence[Any], i: int) -> Any:
    return seq[i % len(seq)]


def _set_field(chunk: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(chunk)
    struct.pack_into(fmt, buf, offset, value & _MASKS[fmt])
    return bytes(buf)


def _get_field(chunk: bytes, offset: int, fmt: str) -> int:
    return struct.unpack_from(fmt, chunk, offset)[0]


def _packet_indices(chunks: list[bytes], hsize: int) -> list[int]:
    """Indices of the chunks that hold at least a whole header (not the hello)."""
    return [i for i in range(1, len(chunks)) if len(chunks[i]) >= hsize]


def _header_values(name: str, cur: int, cap: Capture, chunk: bytes) -> list[int]:
    ps, pp = cap.page_size, cap.packet_pages
    bsize = max(s for _, s in cap.blocks)
    normal = _get_field(chunk, 10, ">H")
    common = [0, cur + 1, cur - 1]
    table: dict[str, list[int]] = {
        "magic": [0, DATA_MAGIC ^ 1, HELLO_MAGIC],
        "flags": [FLAG_SYNC, FLAG_EOS, FLAG_SYNC | FLAG_EOS, 4, 0x8000],
        "encoding": [0, 1, 2, 3, 4, 255],
        "reserved1": [1, 255],
        "block": [len(cap.blocks), 0xFFFF, 1],
        "normal": [pp, pp + 1, 0xFFFF, *common],
        "zero": [pp, pp + 1, 0xFFFF, *common],
        "reserved2": [1, 0xFFFF],
        "round": [0xFFFFFFFF, 1 << 31, *common],
        "payload_len": [normal * ps, pp * ps, pp * ps + 1, 0xFFFFFFFF, 1, *common],
        "packet_num": [(1 << 64) - 1, 1 << 63, *common],
        "offset": [bsize, bsize - ps, bsize - ps + 1, 1, ps - 1, (1 << 64) - ps, 1 << 63, *common],
    }
    return table[name]


def _hello_values(name: str, cur: int, nchannels: int) -> list[int]:
    common = [0, cur + 1, cur - 1]
    table: dict[str, list[int]] = {
        "magic": [DATA_MAGIC, HELLO_MAGIC ^ 0x100, 0],
        "version": [0, 2, 0xFFFF],
        "kind": [KIND_CONTROL, KIND_DATA, 2, 255],
        "flags": [1, 2, 0x80],
        "channel": [nchannels, nchannels + 1, CONTROL_CHANNEL, 0, 1, nchannels - 1],
        "nchannels": [0, 1, nchannels + 1, 256, 257, 0xFFFF, *common],
        "reserved": [1, 0xFFFFFFFF],
    }
    return table[name]


def _frame(mtype: int, body: bytes) -> bytes:
    return _FRAME.pack(0x4D504D43, mtype, 0, 0, len(body)) + body


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def compress_like(method: str, data: bytes) -> bytes:
    """``data`` encoded the way ``method``'s sender encodes a packet."""
    if method == "lz4":
        import lz4.block

        return lz4.block.compress(data, store_size=False)
    if method == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    if method == "zlib":
        return zlib.compress(data, 1)
    return data


def _zstd_declaring(data: bytes, declared: int) -> bytes:
    """A zstd frame of ``data`` whose header claims ``declared`` content bytes (a lie, if they differ).

    Only frames with a single-segment 2-byte content-size field are rewritten:
    that covers 256..65791 bytes for both values, which is what packets here use.
    """
    import zstandard

    frame = bytearray(zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data))
    fhd = frame[4]
    if fhd >> 6 == 1 and fhd & 0x20 and 256 <= declared <= 65791 and fhd & 0x03 == 0:
        struct.pack_into("<H", frame, 5, declared - 256)
    return bytes(frame)


def bomb_payloads(method: str, size: int, rng: random.Random) -> list[bytes]:
    """Payloads a receiver of ``method`` must refuse for a packet of ``size`` raw bytes.

    Each is smaller than ``size`` (so it passes the header's length bound):
    decompression bombs that inflate far past ``size``, frames that lie about
    their size, truncated or padded streams, and garbage.
    """
    out: list[bytes] = []
    big = b"\0" * (size * 64)
    if method == "lz4":
        import lz4.block

        out.append(lz4.block.compress(big, store_size=False))
        out.append(lz4.block.compress(b"\0" * (size + 1), store_size=False))
        out.append(lz4.block.compress(b"\0" * (size - 1), store_size=False))
    elif method == "zstd":
        import zstandard

        out.append(zstandard.ZstdCompressor(level=3, write_content_size=True).compress(big))
        out.append(zstandard.ZstdCompressor(level=3, write_content_size=False).compress(big))
        out.append(_zstd_declaring(b"\0" * (2 * size), size))  # declares size, inflates to twice that
        out.append(_zstd_declaring(b"\0" * (size // 2), size))  # declares size, inflates to half
    elif method == "zlib":
        out.append(zlib.compress(big, 9))
        out.append(zlib.compress(b"\0" * size, 9) + b"\0")  # trailing bytes after the stream
        out.append(zlib.compress(b"\0" * size, 9)[:-3])  # truncated stream
        out.append(zlib.compress(b"\0" * (size + 1), 9))
    if method != "none":
        good = compress_like(method, bytes(size))
        out.append(good[:-1] if len(good) > 1 else b"\x01")
    n = max(1, min(size - 1, 64 + rng.randrange(256)))
    out.append(random.Random(rng.randrange(1 << 30)).randbytes(n))
    return [b for b in out if 0 < len(b) < size]


def _packet_payload_variant(cap: Capture, chunk: bytes, variant: int, rng: random.Random) -> bytes:
    """``chunk`` (a data packet with pages) with its payload replaced; the header keeps the framing."""
    hs = cap.header_size
    header, payload = chunk[:hs], chunk[hs:]
    normal = _get_field(header, 10, ">H")
    size = normal * cap.page_size
    encoding = _get_field(header, 6, "B")
    # other bytes that every codec can shrink: a random 64-byte pattern, tiled, with a few changes
    g = np.random.default_rng(rng.randrange(1 << 30))
    other_pages = np.resize(g.integers(0, 256, size=64, dtype=np.uint8), size)
    other_pages[g.integers(0, max(size, 1), size=8)] ^= 0x5A
    raw_payload = other_pages.tobytes()
    choices: list[tuple[int, bytes]] = [
        (encoding, raw_payload[: len(payload)] if payload else b""),  # garbage of the same length
        (0, raw_payload),  # other bytes, sent raw: only verification can tell
    ]
    if cap.method != "none" and size:
        enc_id = get_method(cap.method).encodings - {0}
        enc = min(enc_id) if enc_id else 0
        other = compress_like(cap.method, raw_payload)
        if len(other) < size:
            choices.append((enc, other))  # a valid encoding of other bytes
        choices.append((enc, compress_like(cap.method, raw_payload) + b"\0"))  # trailing junk
        for b in bomb_payloads(cap.method, size, rng):
            choices.append((enc, b))
        choices.append((enc, b""))  # an encoded packet with no payload
        choices.append((enc, raw_payload))  # "encoded" but as long as the raw pages
    enc, new = _pick(choices, variant)
    h = _set_field(header, 6, "B", enc)
    h = _set_field(h, 20, ">I", len(new))
    return h + new


def _mutate_control_message(cap: Capture, chunk: bytes, variant: int, pos: int) -> bytes:
    """Change a field of a ROUND_END, COMPLETE, VERIFY or CONFIG message, keeping the frame consistent."""
    if len(chunk) < FRAME_SIZE:
        return chunk
    magic, mtype, flags, reserved, length = _FRAME.unpack_from(chunk)
    body = bytearray(chunk[FRAME_SIZE:])
    if mtype in (3, 4) and len(body) >= 8:  # ROUND_END, COMPLETE
        rnd, n, _ = struct.unpack_from(">IHH", body)
        rest = bytes(body[8:])  # an earlier truncation may have cut a count in half
        counts = list(np.frombuffer(rest[: len(rest) // 8 * 8], dtype=">u8").astype(np.uint64))
        j = pos % max(1, len(counts))
        v = variant % 9
        if v == 0 and counts:
            counts[j] = counts[j] + np.uint64(1)
        elif v == 1 and counts:
            counts[j] = counts[j] - np.uint64(1) if counts[j] else np.uint64((1 << 64) - 1)
        elif v == 2:
            rnd += 1
        elif v == 3:
            rnd = (rnd - 1) & 0xFFFFFFFF
        elif v == 4 and counts:
            counts[j] = np.uint64((1 << 64) - 1)
        elif v == 5:
            counts.append(np.uint64(0))
        elif v == 6 and counts:
            counts.pop()
        elif v == 7:
            mtype = 7 - mtype  # ROUND_END <-> COMPLETE
        else:
            n = (n + 1) & 0xFFFF  # announced count no longer matches the body
            return _frame(mtype, struct.pack(">IHH", rnd, n, 0) + np.asarray(counts, dtype=">u8").tobytes())
        return _frame(mtype, struct.pack(">IHH", rnd, len(counts), 0) + np.asarray(counts, dtype=">u8").tobytes())
    if mtype == 5 and len(body) >= 8:  # VERIFY
        block, _, npages = struct.unpack_from(">HHI", body)
        fps = bytearray(body[8:])
        v = variant % 5
        if v == 0 and fps:
            fps[pos % len(fps)] ^= 1 << (pos % 8)
        elif v == 1:
            block += 1
        elif v == 2:
            block = 0xFFFF
        elif v == 3 and fps:
            fps = fps[:-8]
        else:
            fps += b"\0" * 8
        return _frame(5, struct.pack(">HHI", block & 0xFFFF, 0, len(fps) // 8) + bytes(fps))
    if mtype == 1:  # CONFIG: re-encode a changed field (never ``verify``: tampering with it is undetectable)
        try:
            obj = json.loads(bytes(body))
        except ValueError:
            return chunk
        v = variant % 11
        if v == 0:
            obj["page_size"] *= 2
        elif v == 1:
            obj["packet_pages"] += 1
        elif v == 2:
            obj["packet_pages"] = max(1, obj["packet_pages"] - 1)
        elif v == 3:
            obj["channels"] += 1
        elif v == 4:
            obj["channels"] = max(1, obj["channels"] - 1)
        elif v == 5:
            obj["session"] = ("f" if obj["session"][0] != "f" else "0") + obj["session"][1:]
        elif v == 6:
            obj["method"] = _pick([m for m in METHODS if m != obj["method"]], pos)
        elif v == 7:
            obj["blocks"][0]["size"] += cap.page_size
        elif v == 8:
            obj["zero_page"] = "none" if obj["zero_page"] == "multifd" else "multifd"
        elif v == 9 and "channel_retries" in obj:
            obj["channel_retries"] = 1 + pos % 3  # a broken data connection may now be replaced
        else:
            obj["method_options"] = {"level": 99}
        return _frame(1, _json(obj))
    # any other frame: its length field
    return _set_field(chunk, 8, ">I", _pick([0, length + 1, max(0, length - 1), 0xFFFFFFFF, 1 << 28], variant))


def _inserted_control(cap: Capture, variant: int, streams: Streams) -> bytes:
    """An unexpected control message (the source never sends these at that point)."""
    last = len(cap.control) - 1
    n = cap.channels
    options = [
        _frame(9, b""),  # CANCEL
        _frame(7, _json({"code": "x", "message": "stray error", "channel": None})),  # ERROR
        _frame(2, b""),  # CONFIG_ACK (destination → source only)
        _frame(6, _json({"ok": True, "verified": True, "error": None, "mismatches": {}})),  # RESULT
        _frame(8, struct.pack(">I", 0)),  # ROUND_ACK
        cap.control[1],  # a second CONFIG
        _frame(3, struct.pack(">IHH", 1000, n, 0) + bytes(8 * n)),  # ROUND_END far ahead
        _frame(4, struct.pack(">IHH", 0, n, 0) + bytes(8 * n)),  # COMPLETE for round 0, all zero
        cap.control[last],  # the last message (VERIFY or COMPLETE) twice
        _frame(10, b""),  # COMMIT before any RESULT
        _frame(11, struct.pack(">HHI", 0, 0, 0)),  # RESUME (destination → source only)
        _frame(0, b""),  # type 0
        _frame(12, b""),  # type 12
        _FRAME.pack(0x4D504D43, 3, 1, 0, 0),  # non-zero frame flags
    ]
    return _pick(options, variant)


def _apply(cap: Capture, s: Streams, m: Mutation, rng: random.Random) -> None:
    hs = cap.header_size
    kind = m.kind
    if kind == "flip":
        chunks = s.conn(m.target)
        i = m.index % len(chunks)
        c = bytearray(chunks[i])
        if c:
            c[m.pos % len(c)] ^= (m.value % 255) + 1
            chunks[i] = bytes(c)
    elif kind == "truncate":
        t = s.conn_index(m.target)
        chunks = s.conn(t)
        i = m.index % len(chunks)
        cut = m.pos % (len(chunks[i]) + 1)
        del chunks[i + 1 :]
        chunks[i] = chunks[i][:cut]
        if t == 0:
            del s.control_after[i + 1 :]
        s.truncated.add(t)
    elif kind in ("drop", "dup", "swap"):
        chunks = s.conn(m.target)
        if len(chunks) < 2:
            return
        i = 1 + m.index % (len(chunks) - 1)  # never the hello: hello mutations are "hello"
        j = 1 + m.other % (len(chunks) - 1)
        # the causal marks travel with their chunks
        for seq in (chunks, s.after(m.target)):
            if seq is None:
                continue
            if kind == "drop":
                del seq[i]
            elif kind == "dup":
                seq.insert(j, seq[i])
            else:
                seq[i], seq[j] = seq[j], seq[i]
    elif kind == "field":
        if not s.data:
            return
        chunks = s.data[m.target % len(s.data)]
        idx = _packet_indices(chunks, hs)
        if not idx:
            return
        i = _pick(idx, m.index)
        name = _pick(_FIELD_NAMES, m.other)
        off, fmt = _HEADER_FIELDS[name]
        if name == "offset":
            off += 8 * (m.pos % cap.packet_pages)
        cur = _get_field(chunks[i], off, fmt)
        if name == "offset" and m.value % 2 and _get_field(chunks[i], 10, ">H") + _get_field(chunks[i], 12, ">H") > 1:
            value = _get_field(chunks[i], 32, fmt)  # the first page again: a page twice in one packet
            off = 40
        else:
            value = _pick(_header_values(name, cur, cap, chunks[i]), m.value // 2 if name == "offset" else m.value)
        chunks[i] = _set_field(chunks[i], off, fmt, value)
    elif kind == "marker":
        if not s.data:
            return
        chunks = s.data[m.target % len(s.data)]
        idx = _packet_indices(chunks, hs)
        if not idx:
            return
        i = _pick(idx, m.index)
        ref = chunks[i]
        flags = FLAG_SYNC if m.value % 2 == 0 else FLAG_EOS
        v = (m.value // 2) % 4
        if v == 0:  # turn a packet (keeping its pages and payload) into a marker
            chunks[i] = _set_field(ref, 4, ">H", flags)
            return
        rnd = _get_field(ref, 16, ">I") + (0, 0, 1, -1)[v]
        num = _get_field(ref, 24, ">Q") + (m.other % 3) - 1
        chunks.insert(i + (m.pos % 2), marker(cap, flags, rnd & 0xFFFFFFFF, num & _MASKS[">Q"]))
    elif kind == "payload":
        if not s.data:
            return
        chunks = s.data[m.target % len(s.data)]
        idx = [i for i in _packet_indices(chunks, hs) if _get_field(chunks[i], 10, ">H") > 0]
        if not idx:
            return
        i = _pick(idx, m.index)
        chunks[i] = _packet_payload_variant(cap, chunks[i], m.value, rng)
    elif kind == "hello":
        chunks = s.conn(m.target)
        if len(chunks[0]) < HELLO_SIZE:
            return
        name = _pick(_HELLO_NAMES, m.other)
        off, fmt = _HELLO_FIELDS[name]
        if fmt == "session":
            c = bytearray(chunks[0])
            c[off + m.pos % 16] ^= (m.value % 255) + 1
            chunks[0] = bytes(c)
        else:
            cur = _get_field(chunks[0], off, fmt)
            chunks[0] = _set_field(chunks[0], off, fmt, _pick(_hello_values(name, cur, cap.channels), m.value))
    elif kind == "control":
        chunks = s.control
        if m.other % 2 == 0 and len(chunks) > 1:
            i = 1 + m.index % (len(chunks) - 1)
            chunks[i] = _mutate_control_message(cap, chunks[i], m.value, m.pos)
        else:
            at = min(2 + m.index % max(1, len(chunks) - 1), len(chunks))
            chunks.insert(at, _inserted_control(cap, m.value, s))
            s.control_after.insert(at, s.control_after[at - 1])  # goes right after its predecessor
    elif kind == "conn":
        v = m.value % 5
        n = len(s.data)
        if v == 4 or n == 0:
            s.control_late = not s.control_late
            return
        a, b = m.index % n, m.other % n
        if v == 0:  # reorder: connect b before a
            s.data[a], s.data[b] = s.data[b], s.data[a]
            swap = {a + 1: b + 1, b + 1: a + 1}
            s.truncated = {swap.get(t, t) for t in s.truncated}
        elif v == 1:  # a second connection with a's hello and stream
            s.data.append(list(s.data[a]))
        elif v == 2:  # a channel never connects
            del s.data[a]
            s.truncated = {t if t <= a else t - 1 for t in s.truncated if t != a + 1}
        else:  # a's hello with b's packets
            s.data[a] = [s.data[a][0], *s.data[b][1:]]
    else:
        raise ValueError(f"unknown mutation kind {kind!r}")


def header_field(chunk: bytes, name: str, slot: int = 0) -> int:
    """A data header field of a packet chunk (``offset`` reads page slot ``slot``)."""
    off, fmt = _HEADER_FIELDS[name]
    return _get_field(chunk, off + (8 * slot if name == "offset" else 0), fmt)


def with_header_field(chunk: bytes, name: str, value: int, slot: int = 0) -> bytes:
    """``chunk`` with one data header field set (the payload is left as it was)."""
    off, fmt = _HEADER_FIELDS[name]
    return _set_field(chunk, off + (8 * slot if name == "offset" else 0), fmt, value)


def marker(cap: Capture, flags: int, round: int, packet_num: int) -> bytes:
    """A SYNC or EOS packet header for ``cap``'s packet size."""
    buf = bytearray(cap.header_size)
    struct.pack_into(">IHBBHHHHIIQ", buf, 0, DATA_MAGIC, flags, 0, 0, 0, 0, 0, 0, round, 0, packet_num)
    return bytes(buf)


def with_payload(cap: Capture, chunk: bytes, encoding: int, payload: bytes) -> bytes:
    """``chunk``'s header with ``encoding`` and a ``payload_len`` that frames ``payload``, then ``payload``."""
    h = with_header_field(chunk[: cap.header_size], "encoding", encoding)
    return with_header_field(h, "payload_len", len(payload)) + payload


def data_packets(chunks: Sequence[bytes], cap: Capture) -> list[int]:
    """Indices of the chunks of one data connection that carry pages (not the hello, not markers)."""
    return [i for i in _packet_indices(list(chunks), cap.header_size) if header_field(chunks[i], "flags") == 0]


def apply_mutations(cap: Capture, mutations: Sequence[Mutation], *, seed: int = 0) -> Streams:
    """The capture's streams with ``mutations`` applied in order (``seed`` drives random payload bytes)."""
    rng = random.Random(seed)
    s = streams_of(cap)
    for m in mutations:
        _apply(cap, s, m, rng)
    return s


def random_mutations(rng: random.Random, max_count: int = 3) -> list[Mutation]:
    """One to ``max_count`` random mutations (for the long-running tool)."""
    out = []
    for _ in range(rng.randint(1, max_count)):
        out.append(
            Mutation(
                kind=rng.choice(KINDS),
                target=rng.randrange(1 << 16),
                index=rng.randrange(1 << 16),
                other=rng.randrange(1 << 16),
                pos=rng.randrange(1 << 20),
                value=rng.randrange(1 << 16),
            )
        )
    return out


# --------------------------------------------------------------------------- the reference walk


def named_pages(cap: Capture, streams: Streams) -> list[np.ndarray]:
    """Per block, a bool map of the pages that some acceptable header in ``streams`` names.

    It follows what a receiver may accept: the CONFIG the destination would
    decode (with its page size, packet size and method), then each data
    connection whose hello decodes, header by header until the first header a
    receiver must refuse. It assumes every barrier passes and lets a connection
    start in the round its first header names (as a resumed channel does), so
    the result is a superset of the pages a correct destination may write; any
    other page must keep its old bytes.
    """
    maps = [np.zeros(size // cap.page_size, dtype=bool) for _, size in cap.blocks]
    ctl = b"".join(streams.control)
    if len(ctl) < HELLO_SIZE:
        return maps
    dec = ControlDecoder()
    dec.feed(ctl[HELLO_SIZE:])
    try:
        cfg = dec.next_message()
    except MigrationError:
        return maps
    if not isinstance(cfg, Config) or cfg.page_size != cap.page_size:
        return maps
    if [(b.name, b.size) for b in cfg.blocks] != list(cap.blocks):
        return maps
    try:
        method = get_method(cfg.method)(None, {})
    except MigrationError:
        return maps
    decoder = DataHeaderDecoder(
        packet_pages=cfg.packet_pages,
        page_size=cfg.page_size,
        block_sizes=[b.size for b in cfg.blocks],
        encodings=method.encodings | {0},
        max_payload=method.max_payload(cfg.page_size, cfg.packet_pages),
    )
    for chunks in streams.data:
        stream = b"".join(chunks)
        try:
            decode_hello(stream[:HELLO_SIZE])
        except MigrationError:
            continue
        # a replacement connection (channel_retries) starts at the destination's current
        # round: begin where the stream begins, so the walk stays a superset
        first_round = struct.unpack_from(">I", stream, HELLO_SIZE + 16)[0] if len(stream) >= HELLO_SIZE + 20 else 0
        state = ChannelState(start_round=first_round)
        pos = HELLO_SIZE
        while pos + decoder.size <= len(stream):
            try:
                h = decoder.decode(stream[pos : pos + decoder.size])
                state.check(h)
            except MigrationError:
                break
            if h.is_eos:
                break
            if h.is_sync:
                state.next_round()
            else:
                maps[h.block][(np.asarray(h.offsets[: h.normal + h.zero]) // cfg.page_size).astype(np.intp)] = True
            pos += decoder.size + h.payload_len
    return maps


# --------------------------------------------------------------------------- replay


@dataclass
class Outcome:
    """What a destination did with one replay.

    ``verdict`` is ``benign`` (completed with the source's bytes), ``failed``
    (a typed MigrationError, region marked invalid), ``refused`` (no session
    was ever admitted; the destination kept waiting), or a finding: ``hang``,
    ``untyped``, ``crash``, ``wrong-bytes``, ``outside-write``, ``slow-close``,
    ``leak`` (an unclosed socket or file, or a worker alive after ``close()``),
    ``stalled`` (with ``stall``: waited on a silent peer past its timeout).
    """

    verdict: str
    error_type: str | None = None
    error: str | None = None
    field: str | None = None
    detail: str = ""
    seconds: float = 0.0
    traceback: str | None = None

    @property
    def finding(self) -> bool:
        return self.verdict not in CLEAN_VERDICTS


class _Control:
    """The replay's end of the control connection: reads the destination's messages without blocking it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = ControlDecoder()
        self.eof = False
        self.messages: list[Any] = []

    @property
    def ended(self) -> bool:
        """The destination closed the connection or said it failed: no more answers will come."""
        return self.eof or any(isinstance(m, ErrorMessage) for m in self.messages)

    def wait_for(self, frames: int, deadline: float) -> None:
        """Read until the destination has sent ``frames`` messages, has ended, or the deadline passed."""
        while len(self.messages) < frames and not self.ended:
            if self.next(deadline) is None:
                return

    def next(self, deadline: float) -> Any:
        """The next message, ``"eof"``, or ``None`` at the deadline."""
        while True:
            try:
                msg = self.decoder.next_message()
            except MigrationError as e:  # the destination sent bytes that break the protocol
                self.eof = True
                return ("garbage", str(e))
            if msg is not None:
                self.messages.append(msg)
                return msg
            if self.eof:
                return "eof"
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                self.eof = True
            else:
                self.decoder.feed(data)


def _recv_exact(sock: socket.socket, n: int, timeout: float) -> bytes | None:
    sock.settimeout(timeout)
    buf = b""
    try:
        while len(buf) < n:
            data = sock.recv(n - len(buf))
            if not data:
                return None
            buf += data
    except OSError:
        return None
    return buf


def _send_chunks(sock: socket.socket, chunks: Sequence[bytes], timeout: float, close_after: bool) -> None:
    sock.settimeout(timeout)
    try:
        for c in chunks:
            if c:
                sock.sendall(c)
        if close_after:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the destination closed it: that is its answer


def _connect(address: tuple[str, int], timeout: float) -> tuple[socket.socket, bool]:
    """Connect and read the greeting; the flag says whether a greeting arrived."""
    sock = socket.create_connection(address, timeout=timeout)
    g = _recv_exact(sock, auth.GREETING_SIZE, timeout)
    return sock, g is not None


def _classify_error(err: BaseException) -> str | None:
    """A finding verdict for an error that is not a clean, typed failure, else None."""
    if not isinstance(err, MigrationError):
        return "untyped"
    if isinstance(err, WorkerDied):
        return "crash"  # a receiver ended without reporting: killed by a signal, or worse
    if type(err) is MigrationError:
        # a worker's or the coordinator's unexpected exception, wrapped on its way out
        if "worker failed with" in str(err):
            return "untyped"
        cause = err.__cause__
        if cause is not None and not isinstance(cause, (MigrationError, OSError)):
            return "untyped"
    return None


def _prefill(ram: GuestRAM, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for b in ram.blocks:
        ram.view(b.index)[:] = rng.integers(1, 256, size=b.size, dtype=np.uint8)


def replay(
    cap: Capture,
    streams: Streams,
    *,
    settle: float = 5.0,
    dst_timeout: float = 2.0,
    prefill: bool = True,
    stall: bool = False,
) -> Outcome:
    """Speak ``streams`` to a fresh Destination and judge what it did.

    ``settle`` bounds each wait (for the destination's answers, and for it to
    end once every connection is closed); ``dst_timeout`` is the destination's
    own ``MigrationConfig.timeout``. With ``prefill`` the destination's region
    starts with random bytes (as if it held an older guest), so every write is
    visible. With ``stall`` the replay leaves its connections open and silent
    after the last byte, and the destination must give up by itself within
    ``dst_timeout`` plus ``settle``.
    """
    with warnings.catch_warnings(record=True) as caught:
        # a socket or file the destination forgot to close is a finding, not noise
        warnings.simplefilter("always", ResourceWarning)
        children_before = {p.pid for p in multiprocessing.active_children()}
        out = _replay(cap, streams, settle=settle, dst_timeout=dst_timeout, prefill=prefill, stall=stall)
        gc.collect()
        leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    if out.finding:
        return out
    if leaked:
        return replace(out, verdict="leak", detail=f"{len(leaked)} unclosed: {leaked[0][:300]}")
    deadline = time.monotonic() + 3.0
    while True:
        alive = [p for p in multiprocessing.active_children() if p.pid not in children_before]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if alive:
        return replace(out, verdict="leak", detail=f"processes alive after close(): {[p.name for p in alive]}")
    return out


def _replay(
    cap: Capture, streams: Streams, *, settle: float, dst_timeout: float, prefill: bool, stall: bool
) -> Outcome:
    t0 = time.monotonic()
    canary_size = 64 << 10
    with GuestRAM.create(dict(cap.blocks), page_size=cap.page_size) as ram, GuestRAM.create(
        {"canary": canary_size}
    ) as canary:
        if prefill:
            _prefill(ram, 7)
        # the canary is mapped before the destination forks its receivers, so they inherit it
        canary.view(0)[:] = np.arange(canary_size, dtype=np.uint64).astype(np.uint8) ^ 0xA5
        canary_before = canary.view(0).copy()
        before = [ram.view(b.index).copy() for b in ram.blocks]
        paths = [b.path for b in ram.blocks]
        sizes = [os.stat(p).st_size for p in paths]
        # a replay cannot answer a repair request: a page that differs must fail verification
        cfg = MigrationConfig(start_method="fork", timeout=dst_timeout, repair_passes=0)
        err: BaseException | None = None
        result: Any = None
        admitted = False
        close_time = 0.0
        still_waiting = False
        with Destination(ram, config=cfg) as dst:
            socks: list[socket.socket] = []
            senders: list[threading.Thread] = []
            try:
                admitted = _speak(dst.address, streams, socks, senders, settle, dst_timeout, stall)
                if stall and admitted:
                    # silent, open connections: the destination must give up by itself
                    try:
                        dst.wait(dst_timeout + settle)
                    except TimeoutError:
                        still_waiting = True
                    except BaseException:
                        pass
                for t in senders:
                    t.join(settle)
            finally:
                # shut down first: it wakes a sender still blocked in sendall before its fd is closed
                for sk in socks:
                    try:
                        sk.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                for t in senders:
                    t.join(1.0)
                for sk in socks:
                    sk.close()
            limit = settle if admitted else 1.0
            try:
                result = dst.wait(limit)
            except TimeoutError as e:
                err = e
            except Exception as e:  # judged below: anything but a MigrationError is a finding
                err = e
            valid = dst.valid
            status = dst.status
            rejected = dst.query()["rejected-connections"]
            tc = time.monotonic()
            dst.close()
            close_time = time.monotonic() - tc
        seconds = time.monotonic() - t0
        out = _judge(
            cap,
            streams,
            ram,
            before,
            canary,
            canary_before,
            paths,
            sizes,
            err,
            result,
            valid,
            status,
            rejected,
            admitted,
        )
        if still_waiting and not out.finding:
            out.verdict = "stalled"
            out.detail = (
                f"still {status} {dst_timeout + settle:.1f} s after its peer fell silent (timeout {dst_timeout} s)"
            )
        out.seconds = seconds
        if not out.finding and close_time > dst_timeout + 5.0:
            out.verdict, out.detail = "slow-close", f"close() took {close_time:.1f} s"
        return out


def _speak(
    address: tuple[str, int],
    streams: Streams,
    socks: list[socket.socket],
    senders: list[threading.Thread],
    settle: float,
    dst_timeout: float,
    stall: bool,
) -> bool:
    """Play ``streams`` to the destination; True once the destination accepted the CONFIG."""
    ctl_chunks = streams.control
    ctrl, greeted = _connect(address, settle)
    socks.append(ctrl)
    if not greeted:
        return False
    head, tail = ctl_chunks[:2], ctl_chunks[2:]
    after = (streams.control_after + [0] * len(ctl_chunks))[2 : len(ctl_chunks)]
    ctl_trunc = 0 in streams.truncated and not stall
    # hello and CONFIG together: a hello that (mutated) announces a proof then reads the CONFIG as one
    _send_chunks(ctrl, head, settle, ctl_trunc and not tail)
    if _recv_exact(ctrl, auth.WELCOME_SIZE, dst_timeout + settle) is None:
        return False
    control = _Control(ctrl)
    ack = control.next(time.monotonic() + dst_timeout + settle)
    if not isinstance(ack, ConfigAck):
        return isinstance(ack, ErrorMessage)  # refused the CONFIG: the session opened and failed
    # every data connection is greeted first and then all hellos go at once, so the
    # destination admits several in one batch (where duplicates are easiest to miss)
    ready: list[tuple[socket.socket, list[bytes]]] = []
    for chunks in streams.data:
        try:
            sock, greeted = _connect(address, settle)
        except OSError:
            continue
        socks.append(sock)
        if greeted:
            ready.append((sock, chunks))
    for sock, chunks in ready:
        # data connections shut down after their last byte (the receivers then see EOF, not
        # silence), unless the replay plays a silent peer
        t = threading.Thread(target=_send_chunks, args=(sock, chunks, settle, not stall), daemon=True)
        senders.append(t)
        t.start()
    if streams.control_late:
        for t in senders:
            t.join(settle)
    # the rest of the control stream, each message once the destination said what the source
    # had heard before sending it (a message that never comes costs at most ``settle``)
    deadline = time.monotonic() + settle
    for i, (chunk, need) in enumerate(zip(tail, after)):
        control.wait_for(need, deadline)
        last = i == len(tail) - 1
        _send_chunks(ctrl, [chunk], settle, ctl_trunc and last)
    # until the destination closes the control connection (it does when it ends) or gives up
    deadline = time.monotonic() + settle
    while not control.ended:
        if control.next(deadline) is None:
            break
    return True


def _judge(
    cap: Capture,
    streams: Streams,
    ram: GuestRAM,
    before: list[np.ndarray],
    canary: GuestRAM,
    canary_before: np.ndarray,
    paths: list[str],
    sizes: list[int],
    err: BaseException | None,
    result: Any,
    valid: bool,
    status: str,
    rejected: int,
    admitted: bool,
) -> Outcome:
    out = Outcome("failed")
    if err is not None:
        out.error_type = type(err).__name__
        out.error = str(err)[:2000]
        out.field = getattr(err, "field", None)
        out.traceback = getattr(err, "worker_traceback", None)
    # memory outside the region, and the region's files
    if not np.array_equal(canary.view(0), canary_before):
        return replace(out, verdict="outside-write", detail="a canary region mapped next to the destination changed")
    for p, s in zip(paths, sizes):
        now = os.stat(p).st_size
        if now != s:
            return replace(out, verdict="outside-write", detail=f"{p} grew from {s} to {now} bytes")
    if isinstance(err, TimeoutError):
        if not admitted and status == "setup" and rejected:
            return replace(out, verdict="refused", detail="no session was admitted; the destination kept waiting")
        return replace(out, verdict="hang", detail=f"still {status} after the peer closed every connection")
    if err is not None:
        bad = _classify_error(err)
        if bad is not None:
            return replace(out, verdict=bad, detail="error is not a typed, deliberate failure")
        if valid:
            return replace(out, verdict="wrong-bytes", detail="failed but the region is marked valid")
        named = named_pages(cap, streams)
        for b, was, mask in zip(ram.blocks, before, named):
            now = ram.pages(b.index)
            old = was.reshape(now.shape)
            changed = np.flatnonzero((now != old).any(axis=1) & ~mask)
            if len(changed):
                return replace(
                    out,
                    verdict="outside-write",
                    detail=f"block {b.name}: pages {changed[:8].tolist()} changed but no acceptable header named them",
                )
        return out
    # completed: the region must be the source's, byte for byte
    for b in ram.blocks:
        if ram.view(b.index).tobytes() != cap.region[b.name]:
            diff = np.flatnonzero(
                (ram.pages(b.index) != np.frombuffer(cap.region[b.name], np.uint8).reshape(-1, cap.page_size)).any(
                    axis=1
                )
            )
            return replace(
                out, verdict="wrong-bytes", detail=f"completed, but block {b.name} differs at pages {diff[:8].tolist()}"
            )
    if not valid:
        return replace(out, verdict="wrong-bytes", detail="completed but valid is False")
    return replace(out, verdict="benign", detail=f"completed: {getattr(result, 'rounds', '?')} rounds")


# --------------------------------------------------------------------------- stray connections

STRAY_KINDS = (
    "random",  # random bytes instead of a hello
    "short-hello",  # part of a hello, then close
    "wrong-session",  # a valid data hello for another session
    "channel-n",  # a data hello with channel == nchannels
    "second-control",  # another control hello
    "proof",  # a hello announcing a proof (this destination has no key)
    "silent",  # connect and say nothing
    "greeting-only",  # read the greeting, close
    "packets",  # a wrong-session hello followed by data packets
)


def stray_connection(
    address: tuple[str, int], kind: str, rng: random.Random, nchannels: int = 2, hold: float = 0.3
) -> None:
    """Open one unauthenticated junk connection of ``kind`` (see :data:`STRAY_KINDS`) and close it."""
    from mpmultifd.wire import Hello, encode_hello

    try:
        sock = socket.create_connection(address, timeout=5)
    except OSError:
        return
    try:
        sock.settimeout(5)
        if kind != "random":
            if _recv_exact(sock, auth.GREETING_SIZE, 5) is None:
                return
        sid = bytes(rng.randrange(256) for _ in range(16))
        hello = encode_hello(Hello(KIND_DATA, sid, 0, nchannels))
        if kind == "random":
            sock.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))))
        elif kind == "short-hello":
            sock.sendall(hello[: rng.randrange(1, HELLO_SIZE)])
        elif kind == "wrong-session":
            sock.sendall(hello)
        elif kind == "channel-n":
            sock.sendall(hello[:24] + struct.pack(">HH", nchannels, nchannels) + bytes(4))
        elif kind == "second-control":
            sock.sendall(encode_hello(Hello(KIND_CONTROL, sid, CONTROL_CHANNEL, nchannels)))
        elif kind == "proof":
            sock.sendall(encode_hello(Hello(KIND_DATA, sid, 1, nchannels, flags=1)) + bytes(64))
        elif kind == "packets":
            sock.sendall(hello + bytes(rng.randrange(256) for _ in range(2048)))
        elif kind == "silent":
            pass
        elif kind == "greeting-only":
            return
        time.sleep(hold)
        sock.settimeout(max(hold, 0.05))
        try:
            sock.recv(4096)  # a welcome, a refusal or EOF, whichever comes first
        except OSError:
            pass
    except OSError:
        pass
    finally:
        # workers forked from this process may hold copies of the socket: shutdown() ends it for all
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


# --------------------------------------------------------------------------- saving cases


def save_case(
    directory: str,
    cap: Capture,
    streams: Streams,
    mutations: Sequence[Mutation],
    outcome: Outcome,
    *,
    seed: int,
    prefill: bool,
) -> None:
    """Write one input and its outcome to ``directory`` so :func:`load_case` can replay it."""
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    meta = {
        "method": cap.method,
        "page_size": cap.page_size,
        "packet_pages": cap.packet_pages,
        "blocks": [list(b) for b in cap.blocks],
        "mutations": [asdict(m) for m in mutations],
        "seed": seed,
        "prefill": prefill,
        "truncated": sorted(streams.truncated),
        "control_late": streams.control_late,
        "control_after": list(streams.control_after),
        "control_chunks": [len(c) for c in streams.control],
        "data_chunks": [[len(c) for c in d] for d in streams.data],
        "outcome": asdict(outcome),
    }
    with open(os.path.join(directory, "case.json"), "w") as f:
        json.dump(meta, f, indent=1)
    for name, data in cap.region.items():
        with open(os.path.join(directory, f"region-{_safe(name)}.bin"), "wb") as f:
            f.write(data)
    with open(os.path.join(directory, "control.bin"), "wb") as f:
        f.write(b"".join(streams.control))
    for i, d in enumerate(streams.data):
        with open(os.path.join(directory, f"data{i}.bin"), "wb") as f:
            f.write(b"".join(d))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _rechunk(data: bytes, lengths: Sequence[int]) -> list[bytes]:
    out, pos = [], 0
    for n in lengths:
        out.append(data[pos : pos + n])
        pos += n
    return out


def load_case(directory: str) -> tuple[Capture, Streams, dict[str, Any]]:
    """A saved case: the capture's region and layout, the exact streams, and the metadata."""
    with open(os.path.join(directory, "case.json")) as f:
        meta = json.load(f)
    blocks = tuple((n, s) for n, s in meta["blocks"])
    region = {}
    for n, _ in blocks:
        with open(os.path.join(directory, f"region-{_safe(n)}.bin"), "rb") as f:
            region[n] = f.read()
    with open(os.path.join(directory, "control.bin"), "rb") as f:
        control = _rechunk(f.read(), meta["control_chunks"])
    data = []
    for i, lengths in enumerate(meta["data_chunks"]):
        with open(os.path.join(directory, f"data{i}.bin"), "rb") as f:
            data.append(_rechunk(f.read(), lengths))
    after = list(meta.get("control_after") or [0] * len(control))
    cap = Capture(
        meta["method"],
        meta["page_size"],
        meta["packet_pages"],
        blocks,
        region,
        tuple(control),
        tuple(tuple(d) for d in data),
        tuple(after),
    )
    streams = Streams(control, data, set(meta["truncated"]), meta["control_late"], after)
    return cap, streams, meta
