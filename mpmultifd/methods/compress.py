"""Compressing methods: ``lz4`` (block), ``zstd``, ``zlib``, and ``auto``.

Each packet is compressed on its own, from a private gather of its pages
(the guest may write them while they are being compressed), so a packet can
be resent or restarted without the others. A packet that does not shrink goes
raw, straight from the shared RAM. The receiver bounds every decompression by
the packet's ``normal × page_size`` and rejects anything that does not
decompress to exactly that.

``auto`` compresses with lz4 only while it pays: it keeps running estimates
of its compression speed and ratio and of the link's speed (from how long raw
sends take), and compresses a packet when ``speed > link / (1 − ratio)``,
probing now and then to keep the estimates fresh. On a fast link it sends raw
pages; on a slow one it compresses.
"""

from __future__ import annotations

import socket
import time
import zlib
from collections.abc import Callable
from typing import Any

import lz4.block
import numpy as np
import zstandard

from ..errors import ConfigError, RemoteProtocolError
from ..transport import recv_exact_into
from ..wire import ENCODING_RAW, DataHeader
from .base import Method, MethodReceiver, MethodSender, PageBatch, PageSink, Prepared, is_one_run

__all__ = ["Lz4", "Zstd", "Zlib", "Auto", "ENCODING_LZ4", "ENCODING_ZSTD", "ENCODING_ZLIB"]

ENCODING_LZ4 = 1
ENCODING_ZSTD = 2
ENCODING_ZLIB = 3


class _Codec:
    """One compressor and decompressor pair, private to a worker process."""

    encoding: int

    def __init__(self, level: int | None) -> None:
        """``level``: the method's compression level, or None for the codec's default."""

    def compress(self, data: memoryview) -> bytes:
        raise NotImplementedError

    def decompress(self, data: memoryview, size: int) -> bytes:
        """Exactly ``size`` bytes, or :class:`RemoteProtocolError`."""
        raise NotImplementedError


def _bad(method: str, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"payload: {method} payload {why}", field="payload")


class _Lz4Codec(_Codec):
    encoding = ENCODING_LZ4

    def __init__(self, level: int | None) -> None:
        if level:
            self._kw: dict[str, Any] = {"mode": "high_compression", "compression": level}
        else:
            self._kw = {"mode": "default"}

    def compress(self, data: memoryview) -> bytes:
        return lz4.block.compress(data, store_size=False, **self._kw)

    def decompress(self, data: memoryview, size: int) -> bytes:
        try:
            out = lz4.block.decompress(data, uncompressed_size=size)
        except lz4.block.LZ4BlockError as e:
            raise _bad("lz4", f"does not decompress within {size} bytes: {e}") from None
        if len(out) != size:
            raise _bad("lz4", f"decompressed to {len(out)} bytes, expected {size}")
        return out


class _ZstdCodec(_Codec):
    encoding = ENCODING_ZSTD

    def __init__(self, level: int | None) -> None:
        # one reusable context per worker: contexts are not thread-safe, and
        # building one per packet would cost more than compressing
        self._c = zstandard.ZstdCompressor(level=3 if level is None else level, write_content_size=True)
        self._d = zstandard.ZstdDecompressor()

    def compress(self, data: memoryview) -> bytes:
        return self._c.compress(data)

    def decompress(self, data: memoryview, size: int) -> bytes:
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as e:
            raise _bad("zstd", f"has no valid frame header: {e}") from None
        if declared != size:  # refuse before allocating what a hostile header declares
            raise _bad("zstd", f"declares {declared} bytes, expected {size}")
        try:
            out = self._d.decompress(data, max_output_size=size)
        except zstandard.ZstdError as e:
            raise _bad("zstd", f"does not decompress: {e}") from None
        if len(out) != size:
            raise _bad("zstd", f"decompressed to {len(out)} bytes, expected {size}")
        return out


class _ZlibCodec(_Codec):
    encoding = ENCODING_ZLIB

    def __init__(self, level: int | None) -> None:
        self._level = 1 if level is None else level

    def compress(self, data: memoryview) -> bytes:
        return zlib.compress(data, self._level)

    def decompress(self, data: memoryview, size: int) -> bytes:
        d = zlib.decompressobj()
        try:
            out = d.decompress(data, size)  # max_length: output can never exceed the bound
        except zlib.error as e:
            raise _bad("zlib", f"does not decompress: {e}") from None
        if len(out) != size or not d.eof or d.unconsumed_tail or d.unused_data:
            raise _bad("zlib", f"does not decompress to exactly {size} bytes")
        return out


class _Sender(MethodSender):
    def __init__(self, codec: _Codec, page_size: int, packet_pages: int) -> None:
        self.codec = codec
        self.page_size = page_size
        self._gather = np.empty((packet_pages, page_size), dtype=np.uint8)

    def _gathered(self, batch: PageBatch) -> memoryview:
        n = len(batch.pages)
        out = self._gather[:n]
        if is_one_run(batch.pages):  # the usual case: one block copy
            first = int(batch.pages[0])
            np.copyto(out, batch.grid[first : first + n])
        else:
            np.take(batch.grid, batch.pages, axis=0, out=out)
        return out.data.cast("B")

    def _compressed(self, batch: PageBatch) -> Prepared:
        raw_len = len(batch.pages) * self.page_size
        blob = self.codec.compress(self._gathered(batch))
        if len(blob) >= raw_len:
            # did not shrink: raw pages, straight from the shared RAM
            return Prepared(ENCODING_RAW, batch.iovs(), raw_len)
        return Prepared(self.codec.encoding, (blob,), len(blob))

    def send_prepare(self, batch: PageBatch) -> Prepared:
        return self._compressed(batch)


class _AutoSender(_Sender):
    """Compresses only while compressing is faster than sending raw."""

    PROBE_EVERY = 32
    ALPHA = 0.2

    def __init__(
        self, codec: _Codec, page_size: int, packet_pages: int, clock: Callable[[], float] = time.perf_counter
    ):
        super().__init__(codec, page_size, packet_pages)
        self.clock = clock
        self.speed = 0.0  # raw bytes compressed per second
        self.ratio = 1.0  # compressed / raw
        self.link = 0.0  # raw bytes sent per second
        self.packets = 0

    def _ewma(self, old: float, new: float) -> float:
        return new if old == 0.0 else old + self.ALPHA * (new - old)

    def worth_it(self) -> bool:
        """Compressing pays when it takes less time than the bytes it saves would take on the link."""
        if self.ratio >= 0.97:
            return False
        return self.speed > self.link / (1.0 - self.ratio)

    def send_prepare(self, batch: PageBatch) -> Prepared:
        self.packets += 1
        if self.speed == 0.0:
            compress = True  # measure the compressor first...
        elif self.link == 0.0:
            compress = False  # ...then the link
        else:
            compress = self.worth_it()
            if self.packets % self.PROBE_EVERY == 0:
                compress = not compress  # refresh the estimate the decision does not feed
        if not compress:
            return Prepared(ENCODING_RAW, batch.iovs(), len(batch.pages) * self.page_size)
        raw_len = len(batch.pages) * self.page_size
        t0 = self.clock()
        prep = self._compressed(batch)
        elapsed = max(self.clock() - t0, 1e-9)
        self.speed = self._ewma(self.speed, raw_len / elapsed)
        self.ratio = self._ewma(self.ratio, min(prep.payload_len / raw_len, 1.0))
        return prep

    def sent(self, prepared: Prepared, seconds: float) -> None:
        if prepared.encoding == ENCODING_RAW and prepared.payload_len and seconds > 0:
            self.link = self._ewma(self.link, prepared.payload_len / seconds)


class _Receiver(MethodReceiver):
    def __init__(self, codec: _Codec, name: str, page_size: int, packet_pages: int) -> None:
        self.codec = codec
        self.name = name
        self.page_size = page_size
        self._buf = bytearray(page_size * packet_pages)
        self._mv = memoryview(self._buf)

    def recv(self, header: DataHeader, sock: socket.socket, sink: PageSink) -> None:
        size = header.normal * self.page_size
        pages = (header.normal_offsets // self.page_size).astype(np.intp)
        if header.encoding == ENCODING_RAW:
            sink.recv_pages(header.block, pages, sock, self._mv)
            return
        if header.encoding != self.codec.encoding:
            raise RemoteProtocolError(f"encoding: {header.encoding} is not {self.name}'s", field="encoding")
        if header.payload_len >= size:
            # a compressed payload is always smaller than the raw pages
            raise _bad(self.name, f"of {header.payload_len} bytes is not smaller than the {size} raw bytes")
        blob = self._mv[: header.payload_len]
        recv_exact_into(sock, blob)
        out = self.codec.decompress(blob, size)
        sink.store(header.block, pages, memoryview(out))


class _CompressingMethod(Method):
    codec_class: type[_Codec]
    levels: tuple[int, int]

    def __init__(self, level: int | None = None, options: dict[str, Any] | None = None) -> None:
        super().__init__(level, options)
        lo, hi = self.levels
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or not lo <= level <= hi):
            raise ConfigError(f"compression_level: {level!r} is not valid for {self.name}; use {lo}..{hi} or None")

    def sender(self, page_size: int, packet_pages: int) -> MethodSender:
        return _Sender(self.codec_class(self.level), page_size, packet_pages)

    def receiver(self, page_size: int, packet_pages: int) -> MethodReceiver:
        return _Receiver(self.codec_class(self.level), self.name, page_size, packet_pages)


class Lz4(_CompressingMethod):
    """lz4 block compression per packet; ``compression_level`` 1..12 selects lz4-HC."""

    name = "lz4"
    encodings = frozenset({ENCODING_RAW, ENCODING_LZ4})
    codec_class = _Lz4Codec
    levels = (0, 12)


class Zstd(_CompressingMethod):
    """zstd per packet, one reusable context per worker; level -7..22 (default 3)."""

    name = "zstd"
    encodings = frozenset({ENCODING_RAW, ENCODING_ZSTD})
    codec_class = _ZstdCodec
    levels = (-7, 22)


class Zlib(_CompressingMethod):
    """zlib (deflate) per packet, from the standard library; level 0..9 (default 1)."""

    name = "zlib"
    encodings = frozenset({ENCODING_RAW, ENCODING_ZLIB})
    codec_class = _ZlibCodec
    levels = (0, 9)


class Auto(_CompressingMethod):
    """lz4 when it makes the channel faster, raw pages when it would slow it down."""

    name = "auto"
    encodings = frozenset({ENCODING_RAW, ENCODING_LZ4})
    codec_class = _Lz4Codec
    levels = (0, 12)

    def sender(self, page_size: int, packet_pages: int) -> MethodSender:
        return _AutoSender(self.codec_class(self.level), page_size, packet_pages)
