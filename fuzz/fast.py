"""In-process, coverage-guided fuzzing of everything that parses a peer's or a file's bytes.

:mod:`fuzz.harness` replays mutated streams into real destinations, which
is faithful but slow (a fresh destination per input). This module feeds the
same decoders directly, in this process, millions of times:

- ``hello``: the greeting, hello and welcome codecs of admission (control,
  data and stream hellos);
- ``data_header``: the data packet header decoder and the per-channel
  ordering rules (:class:`~mpmultifd.wire.ChannelState`);
- ``control``: the incremental control decoder, fed in random pieces;
- ``recv-<method>``: each payload method's receiver (decompression), reading
  a header and payload from a fake socket into a small region guarded by
  canary bytes on both sides, then the packet's zero pages;
- ``savefile``: the save-file header decoder, then the bitmaps and digests.

Each target starts from a corpus of valid inputs made with the encoders
(plus the test vectors of ``docs/protocol.md`` when the file is there) and
mutates it: bit flips, interesting integers, inserted, deleted, repeated and
spliced bytes, and, for framed inputs, a length field fixed up so the
mutation reaches the body. Coverage is edges between consecutive traced
lines in ``mpmultifd`` (``sys.settrace``); tracing is slow, so only one input
in ``trace_every`` is traced, and an input that reaches a new edge joins the
corpus. Everything else runs untraced.

An **escape** is any exception that is not a
:class:`~mpmultifd.errors.MigrationError` (the typed errors a decoder means
to raise), a write outside the region (a canary changed), or an input that
ran for longer than ``hang_seconds`` (a watchdog thread interrupts it).
"""

from __future__ import annotations

import _thread
import functools
import os
import random
import re
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import mpmultifd
from mpmultifd import auth
from mpmultifd.errors import MigrationError
from mpmultifd.methods import PageBatch, PageSink, available_methods, get_method
from mpmultifd.savefile import (
    STATE_OFFSET,
    SaveLayout,
    SaveState,
    decode_header,
    encode_state,
    unpack_bitmap,
    unpack_digests,
)
from mpmultifd.wire import (
    CONTROL_CHANNEL,
    FLAG_EOS,
    FLAG_SYNC,
    HELLO_SIZE,
    KIND_CONTROL,
    KIND_DATA,
    KIND_STREAM,
    BlockSpec,
    Cancel,
    ChannelLost,
    ChannelState,
    Commit,
    CommitAck,
    Complete,
    Config,
    ConfigAck,
    ControlDecoder,
    DataHeaderDecoder,
    DataHeaderEncoder,
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
    decode_hello,
    encode_control,
    encode_hello,
)

__all__ = ["Target", "TargetStats", "Escape", "targets", "run", "FakeSocket"]

PAGE = 512  # the smallest page size: small inputs, fast decompression
PACKET_PAGES = 4
BLOCK_PAGES = (16, 8)
SID = bytes(range(16))
# coverage is measured in the package under test, not in this harness
_PKG_DIR = os.path.dirname(os.path.abspath(mpmultifd.__file__))
_REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- targets


class FakeSocket:
    """Just enough of a socket for the receivers: reads come from ``data``; EOF after it."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def recv_into(self, view: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(view).cast("B")
        n = min(nbytes or view.nbytes, view.nbytes, len(self._data) - self._pos)
        view[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> tuple[int, list, int, Any]:
        total = 0
        for b in buffers:
            v = memoryview(b).cast("B")
            got = self.recv_into(v, v.nbytes)
            total += got
            if got < v.nbytes:
                break
        return total, [], 0, None

    def recv(self, n: int, flags: int = 0) -> bytes:
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += len(out)
        return out


@dataclass
class Target:
    """A parser to fuzz: ``run(data)`` returns normally or raises; ``seeds`` start its corpus.

    ``fix`` (optional) repairs a mutated input's length fields now and then, so
    mutations reach past the framing; ``check`` (optional) looks for damage an
    exception would not show (a canary outside the region).
    """

    name: str
    run: Callable[[bytes], Any]
    seeds: list[bytes]
    fix: Callable[[bytearray, random.Random], None] | None = None
    check: Callable[[], str | None] | None = None
    max_len: int = 1 << 16


def _hello_target() -> Target:
    seeds = [
        encode_hello(Hello(KIND_CONTROL, SID, CONTROL_CHANNEL, 4)),
        encode_hello(Hello(KIND_DATA, SID, 3, 4, 1)) + bytes(64),
        encode_hello(Hello(KIND_STREAM, SID, CONTROL_CHANNEL, 4)),
        auth.encode_greeting(auth.Greeting(True, bytes(range(32)))),
        auth.encode_welcome(bytes(range(32))),
        auth.encode_refused(auth.REFUSE_BAD_PROOF),
    ]

    def run(data: bytes) -> None:
        sel = data[0] % 4 if data else 0
        body = data[1:]
        if sel == 0:
            decode_hello(body[:HELLO_SIZE])
        elif sel == 1:
            decode_hello(body[:HELLO_SIZE], session_id=SID, nchannels=4)
        elif sel == 2:
            auth.decode_greeting(body[: auth.GREETING_SIZE])
        else:
            auth.decode_welcome(body[: auth.WELCOME_SIZE])

    return Target("hello", run, [bytes([i]) + s for i in range(4) for s in seeds], max_len=128)


def _header_decoder(encodings: frozenset[int]) -> DataHeaderDecoder:
    return DataHeaderDecoder(
        packet_pages=PACKET_PAGES,
        page_size=PAGE,
        block_sizes=[n * PAGE for n in BLOCK_PAGES],
        encodings=encodings,
    )


def _headers() -> list[bytes]:
    enc = DataHeaderEncoder(PACKET_PAGES)
    out = []
    offs = np.array([0, PAGE, 5 * PAGE], dtype=np.uint64)
    out.append(bytes(enc.encode(block=0, round=0, packet_num=0, normal_offsets=offs, payload_len=3 * PAGE)))
    out.append(
        bytes(
            enc.encode(
                block=1, round=0, packet_num=1, normal_offsets=offs[:1], zero_offsets=offs[1:2] + PAGE, payload_len=PAGE
            )
        )
    )
    out.append(bytes(enc.encode(flags=FLAG_SYNC, round=0, packet_num=2)))
    out.append(bytes(enc.encode(flags=FLAG_EOS, round=1, packet_num=3)))
    return out


def _data_header_target() -> Target:
    dec = _header_decoder(frozenset({0, 1, 2, 3}))
    size = dec.size
    hs = _headers()
    seeds = [b"".join(hs), hs[0] + hs[2] + hs[0], hs[1] + hs[3]]

    def run(data: bytes) -> None:
        state = ChannelState()
        for at in range(0, min(len(data), 8 * size) - size + 1, size):
            h = dec.decode(data[at : at + size])
            state.check(h)
            if state.at_sync:
                state.next_round()

    return Target("data_header", run, seeds, max_len=8 * size + 16)


def _control_seeds() -> list[bytes]:
    cfg = Config(
        SID,
        PAGE,
        2,
        PACKET_PAGES,
        (BlockSpec("pc.ram", BLOCK_PAGES[0] * PAGE), BlockSpec("vga", BLOCK_PAGES[1] * PAGE)),
        method="zstd",
        method_options={"level": 3},
        verify=True,
        channel_retries=2,
        base=bytes(16),
    )
    msgs = [
        cfg,
        ConfigAck(),
        RoundEnd(3, (5, 7)),
        Complete(4, (1, 2)),
        Verify(1, np.arange(8, dtype=np.uint64)),
        Result(False, False, "pages differ", {"pc.ram": [1, 2]}),
        ErrorMessage("destination-failed", "boom", 1),
        RoundAck(2),
        Cancel(),
        Commit(),
        Resume(1, 3),
        ChannelLost(1, 3),
        CommitAck(),
        Repair(1, ((0, np.array([1, 5], dtype=np.uint64)), (1, np.array([0], dtype=np.uint64)))),
        RepairPages(1, 0, np.array([1, 5], dtype=np.uint64), np.array([7, 9], dtype=np.uint64), bytes(2 * PAGE)),
        RepairDone(1, 3),
    ]
    one = [encode_control(m) for m in msgs]
    return one + [b"".join(one), one[0] + one[2] + one[4]]


def _fix_frame(buf: bytearray, rng: random.Random) -> None:
    """Make the first frame's length field match what follows (a mutated JSON body then gets parsed)."""
    if len(buf) >= 12:
        struct.pack_into(">I", buf, 8, len(buf) - 12)


def _control_target() -> Target:
    def run(data: bytes) -> None:
        dec = ControlDecoder(max_verify=1 << 16, max_repair=1 << 16)
        # fed in pieces, as a socket would deliver it; the cut points come from the input itself
        step = (data[-1] % 61 + 1) if data else 1
        pos = 0
        while pos < len(data):
            dec.feed(data[pos : pos + step])
            pos += step
            while dec.next_message() is not None:
                pass

    return Target("control", run, _control_seeds(), fix=_fix_frame, max_len=1 << 15)


def _recv_target(method_name: str) -> Target:
    method = get_method(method_name)(None, {})
    receiver = method.receiver(PAGE, PACKET_PAGES)
    sender = method.sender(PAGE, PACKET_PAGES)
    dec = _header_decoder(frozenset(method.encodings))
    hsize = dec.size
    guard = 2 * PAGE
    total = sum(BLOCK_PAGES) * PAGE
    arena = np.zeros(guard + total + guard, dtype=np.uint8)
    grids, datas, received = [], [], []
    at = guard
    for n in BLOCK_PAGES:
        mem = arena[at : at + n * PAGE]
        grids.append(mem.reshape(n, PAGE))
        datas.append(memoryview(mem))
        received.append(np.zeros(n, dtype=np.uint8))
        at += n * PAGE
    sink = PageSink(grids, datas, received)
    canary = np.frombuffer(os.urandom(guard), dtype=np.uint8)
    arena[:guard] = canary
    arena[-guard:] = canary

    # seeds: real packets of this method, compressible and not
    src = np.zeros((BLOCK_PAGES[0], PAGE), dtype=np.uint8)
    rng = np.random.default_rng(1)
    src[::2] = rng.integers(0, 4, size=(len(src[::2]), PAGE), dtype=np.uint8)  # compressible
    src[1::2] = rng.integers(0, 256, size=(len(src[1::2]), PAGE), dtype=np.uint8)  # not
    enc = DataHeaderEncoder(PACKET_PAGES)
    seeds = []
    for pages in ([0, 2, 4], [1, 3], [6], [8, 10, 12, 14]):
        idx = np.array(pages, dtype=np.int64)
        flat = src.reshape(-1)
        batch = PageBatch(0, PAGE, idx, memoryview(flat), src)
        prep = sender.send_prepare(batch)
        payload = b"".join(bytes(memoryview(v).cast("B")) for v in prep.iovs)
        zero = np.array([15 * PAGE], dtype=np.uint64) if len(pages) < PACKET_PAGES else None
        head = enc.encode(
            encoding=prep.encoding,
            block=0,
            normal_offsets=idx.astype(np.uint64) * PAGE,
            zero_offsets=zero,
            payload_len=prep.payload_len,
        )
        seeds.append(bytes(head) + payload)

    def fix(buf: bytearray, rng: random.Random) -> None:
        if len(buf) >= hsize:
            struct.pack_into(">I", buf, 20, len(buf) - hsize)  # payload_len: what follows

    def run(data: bytes) -> None:
        h = dec.decode(data[:hsize])
        if h.flags:
            return
        receiver.recv(h, FakeSocket(data[hsize:]), sink)  # type: ignore[arg-type]
        if h.zero:
            sink.write_zero(h.block, (h.zero_offsets // PAGE).astype(np.intp))

    def check() -> str | None:
        if not (np.array_equal(arena[:guard], canary) and np.array_equal(arena[-guard:], canary)):
            arena[:guard] = canary
            arena[-guard:] = canary
            return "a write outside the region (canary changed)"
        return None

    return Target(f"recv-{method_name}", run, seeds, fix=fix, check=check, max_len=hsize + 2 * PACKET_PAGES * PAGE)


def _savefile_target() -> Target:
    seeds = []
    for blocks in ([("pc.ram", 64 * 4096), ("vga", 16 * 4096)], [("a" * 200, 4096)]):
        layout = SaveLayout.plan(blocks, 4096, method="raw", save_id=bytes(16), created_ns=1)
        head = bytearray(layout.encode_header())
        for state in (SaveState(False, 0, 0), SaveState(True, 2, 3)):
            h = bytearray(head)
            raw = encode_state(state)
            h[STATE_OFFSET : STATE_OFFSET + len(raw)] = raw
            seeds.append(bytes(h))

    def run(data: bytes) -> None:
        layout, state = decode_header(data, require_complete=False)
        tail = data[layout.header_size :] if len(data) > layout.header_size else b""
        for b in layout.blocks[:4]:
            n = min(b.npages, 8 * len(tail) + 8)
            unpack_bitmap(tail[: (n + 7) // 8], n)
            unpack_digests(tail[: 8 * min(n, len(tail) // 8)], min(n, len(tail) // 8))

    return Target("savefile", run, seeds, max_len=1 << 14)


def _protocol_vectors() -> dict[str, bytes]:
    doc = os.path.join(_REPO_DIR, "docs", "protocol.md")
    try:
        with open(doc, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return {}
    return {
        name: bytes.fromhex(body.replace("\n", " "))
        for name, body in re.findall(r"```vector ([\w-]+)\n(.*?)```", text, re.S)
    }


def targets(names: list[str] | None = None) -> list[Target]:
    """The fuzz targets (all, or those named), their corpora seeded from encoders and the test vectors."""
    made = [_hello_target(), _data_header_target(), _control_target()]
    made += [_recv_target(m) for m in available_methods() if m in ("none", "lz4", "zstd", "zlib")]
    made.append(_savefile_target())
    vectors = _protocol_vectors()
    for t in made:
        for name, v in vectors.items():
            if t.name == "hello" and name.startswith("hello"):
                t.seeds += [bytes([i]) + v for i in range(2)]
            elif t.name == "data_header" and name.startswith("data"):
                t.seeds.append(v)
            elif t.name == "control" and not name.startswith(("hello", "data")):
                t.seeds.append(v)
    if names:
        unknown = set(names) - {t.name for t in made}
        if unknown:
            raise ValueError(f"unknown targets {sorted(unknown)}; there are {[t.name for t in made]}")
        made = [t for t in made if t.name in names]
    return made


# --------------------------------------------------------------------------- mutation

_INTERESTING = [0, 1, 2, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 511, 512, 1023, 1024, 4095, 4096,
                0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1,
                1 << 63, (1 << 64) - 1]
_TOKENS = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"null", b"true", b"false", b"-1", b"1e999", b"0.5",
           b'"level"', b'"blocks"', b'"name"', b'"size"', b"\\u0000", b"\xff", b"\x00" * 8]


def mutate(data: bytes, rng: random.Random, corpus: list[bytes], max_len: int) -> bytearray:
    buf = bytearray(data)
    for _ in range(1 + int(rng.expovariate(0.7))):
        op = rng.randrange(10)
        n = len(buf)
        if op == 0 and n:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op in (2, 3) and n >= 2:
            width, fmt = rng.choice(((2, "H"), (4, "I"), (8, "Q")))
            if n >= width:
                i = rng.randrange(n - width + 1)
                v = rng.choice(_INTERESTING) + rng.choice((0, 0, 1, -1))
                v &= (1 << (8 * width)) - 1
                struct.pack_into(rng.choice(("<", ">")) + fmt, buf, i, v)
        elif op == 4 and n:
            i = rng.randrange(n)
            del buf[i : i + rng.choice((1, 1, 2, 4, 8, 32, 256))]
        elif op == 5:
            i = rng.randrange(n + 1)
            buf[i:i] = os.urandom(rng.choice((1, 2, 4, 8, 32)))
        elif op == 6 and n:
            i = rng.randrange(n)
            j = min(n, i + rng.choice((1, 4, 16, 64, 512)))
            buf[i:i] = buf[i:j] * rng.choice((1, 2, 8))
        elif op == 7 and corpus:
            other = rng.choice(corpus)
            if other:
                i = rng.randrange(n + 1)
                a = rng.randrange(len(other))
                buf[i:] = other[a:] if rng.random() < 0.5 else other[a:] + buf[i:]
        elif op == 8:
            i = rng.randrange(n + 1)
            buf[i:i] = rng.choice(_TOKENS)
        elif op == 9 and n:
            del buf[rng.randrange(n) :]
    if len(buf) > max_len:
        del buf[max_len:]
    return buf


# --------------------------------------------------------------------------- coverage


class _Coverage:
    """Edges between consecutive lines executed in mpmultifd's own files (sys.settrace)."""

    def __init__(self) -> None:
        self.edges: set[int] = set()
        self._new: set[int] = set()
        self._prev = 0
        # code objects carry the path as imported (perhaps "tools/../mpmultifd/wire.py")
        self._prefixes = tuple({_PKG_DIR + os.sep, os.path.dirname(mpmultifd.__file__) + os.sep})

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        fn = frame.f_code.co_filename
        if not fn.startswith(self._prefixes):
            return None
        return self._local

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            cur = hash((frame.f_code.co_filename, frame.f_lineno)) & 0xFFFFFFFF
            edge = (self._prev * 31 + cur) & 0xFFFFFFFFFFFF
            self._prev = cur
            if edge not in self.edges:
                self._new.add(edge)
        return self._local

    def traced(self, fn: Callable[[], Any]) -> tuple[BaseException | None, int]:
        self._new = set()
        self._prev = 0
        old = sys.gettrace()
        sys.settrace(self._global)
        try:
            fn()
            err = None
        except BaseException as e:  # judged by the caller
            err = e
        finally:
            sys.settrace(old)
        new = len(self._new)
        self.edges |= self._new
        return err, new


# --------------------------------------------------------------------------- the loop


@dataclass
class Escape:
    target: str
    kind: str  # exception type name, "hang" or "out-of-bounds"
    detail: str
    data: bytes


@dataclass
class TargetStats:
    name: str
    inputs: int = 0
    traced: int = 0
    typed_errors: int = 0
    edges: int = 0
    corpus: int = 0
    seconds: float = 0.0
    escapes: list[Escape] = field(default_factory=list)


class _Watchdog:
    """Interrupts the main thread when one input runs longer than ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = 0.0
        self.busy = False
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastfuzz-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            if self.busy and time.monotonic() - self.started > self.seconds and not self.fired:
                self.fired = True
                _thread.interrupt_main()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _judge(t: Target, stats: TargetStats, data: bytes, err: BaseException | None, max_escapes: int) -> None:
    if err is None:
        pass
    elif isinstance(err, MigrationError):
        stats.typed_errors += 1
    elif len(stats.escapes) < max_escapes:
        tb = traceback.extract_tb(err.__traceback__)
        where = f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else "?"
        stats.escapes.append(Escape(t.name, type(err).__name__, f"{err!s:.200} at {where}", bytes(data)))
    else:
        stats.escapes.append(Escape(t.name, type(err).__name__, "", b""))  # counted, not kept
    if t.check is not None:
        damage = t.check()
        if damage is not None:
            stats.escapes.append(Escape(t.name, "out-of-bounds", damage, bytes(data)))


def fuzz_target(
    t: Target,
    seconds: float,
    *,
    seed: int = 0,
    trace_every: int = 64,
    hang_seconds: float = 5.0,
    max_escapes: int = 20,
    watchdog: _Watchdog | None = None,
) -> TargetStats:
    """Fuzz one target for ``seconds``; returns what was tried and what escaped."""
    rng = random.Random(seed)
    cov = _Coverage()
    stats = TargetStats(t.name)
    corpus = [bytes(s) for s in t.seeds if len(s) <= t.max_len]
    own_dog = watchdog is None
    dog = watchdog if watchdog is not None else _Watchdog(hang_seconds)
    t0 = time.monotonic()
    try:
        for s in corpus:  # the seeds' own coverage first
            err, _ = cov.traced(functools.partial(t.run, s))
            _judge(t, stats, s, err, max_escapes)
            stats.inputs += 1
            stats.traced += 1
        deadline = t0 + seconds
        i = 0
        while True:
            i += 1
            if i & 255 == 0 and time.monotonic() > deadline:
                break
            base = corpus[rng.randrange(len(corpus))]
            data = mutate(base, rng, corpus, t.max_len)
            if t.fix is not None and rng.random() < 0.3:
                t.fix(data, rng)
            data = bytes(data)
            dog.started, dog.busy = time.monotonic(), True
            try:
                if i % trace_every == 0:
                    err, new = cov.traced(functools.partial(t.run, data))
                    stats.traced += 1
                    if new and err is None or new and isinstance(err, MigrationError):
                        corpus.append(data)
                else:
                    try:
                        t.run(data)
                        err = None
                    except MigrationError as e:
                        err = e
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:
                        err = e
            except KeyboardInterrupt:
                if not dog.fired:
                    raise
                dog.fired = False
                stats.escapes.append(Escape(t.name, "hang", f"ran over {dog.seconds:g} s", data))
                err = None
            finally:
                dog.busy = False
            stats.inputs += 1
            if err is not None and not isinstance(err, MigrationError) or t.check is not None:
                _judge(t, stats, data, err, max_escapes)
            elif err is not None:
                stats.typed_errors += 1
    finally:
        if own_dog:
            dog.stop()
    stats.seconds = time.monotonic() - t0
    stats.edges = len(cov.edges)
    stats.corpus = len(corpus)
    return stats


def run(
    seconds: float,
    *,
    names: list[str] | None = None,
    seed: int = 0,
    trace_every: int = 64,
    hang_seconds: float = 5.0,
    report: Callable[[TargetStats], None] | None = None,
) -> list[TargetStats]:
    """Fuzz every target (or those named) for ``seconds`` in all, split evenly; one stats per target."""
    chosen = targets(names)
    dog = _Watchdog(hang_seconds)
    out = []
    try:
        for k, t in enumerate(chosen):
            st = fuzz_target(t, seconds / len(chosen), seed=seed + k, trace_every=trace_every, watchdog=dog)
            out.append(st)
            if report is not None:
                report(st)
    finally:
        dog.stop()
    return out
