"""Payload methods from bytes: round trips, fallbacks, hostile payloads, the plugin registry, end to end."""

from __future__ import annotations

import math
import os
import socket
import sys
import textwrap
import threading
import zlib

import lz4.block
import numpy as np
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from mpmultifd import ConfigError, Destination, GuestRAM, MigrationConfig, MigrationError, RemoteProtocolError, Source
from mpmultifd.errors import ChannelClosed
from mpmultifd.methods import (
    Method,
    MethodReceiver,
    MethodSender,
    PageBatch,
    PageSink,
    Prepared,
    available_methods,
    get_method,
    register,
)
from mpmultifd.methods.compress import ENCODING_LZ4, ENCODING_ZLIB, ENCODING_ZSTD, _AutoSender, _Lz4Codec
from mpmultifd.testing import RemoteDestination, fill
from mpmultifd.transport import IOV_MAX, recv_exact_into_views, sendmsg_all
from mpmultifd.wire import ENCODING_RAW, DataHeaderDecoder, DataHeaderEncoder

PS = 4096
PP = 16
METHODS = ["none", "lz4", "zstd", "zlib", "auto"]
ENCODINGS = {"lz4": ENCODING_LZ4, "zstd": ENCODING_ZSTD, "zlib": ENCODING_ZLIB, "auto": ENCODING_LZ4}


def make_pages(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(0, 256, size=(n, PS), dtype=np.uint8)
    if kind == "zero":
        return np.zeros((n, PS), dtype=np.uint8)
    if kind == "text":
        out = rng.integers(97, 100, size=(n, PS), dtype=np.uint8)
        out[:, ::5] = 32
        return out
    # mixed: alternate random and text pages
    out = make_pages("random", n, seed)
    out[::2] = make_pages("text", n, seed)[::2]
    return out


def transfer(
    method_name: str,
    pages_data: np.ndarray,
    page_idx: np.ndarray,
    *,
    level=None,
    use_fd: bool = False,
    direct: bool = False,
):
    """Send one batch through a socketpair with the method's sender and receive it with its receiver."""
    method = get_method(method_name)(level, {})
    npages = int(page_idx.max()) + 1 if len(page_idx) else 1
    src = np.zeros((npages, PS), dtype=np.uint8)
    src[page_idx] = pages_data
    batch = PageBatch(0, PS, page_idx, memoryview(src).cast("B"), src)
    prep = method.sender(PS, PP).send_prepare(batch)
    enc = DataHeaderEncoder(PP)
    hdr = enc.encode(encoding=prep.encoding, normal_offsets=page_idx * PS, payload_len=prep.payload_len)
    dec = DataHeaderDecoder(
        packet_pages=PP, page_size=PS, block_sizes=[npages * PS], encodings=method.encodings, max_payload=PP * PS
    )
    a, b = socket.socketpair()
    try:
        sendmsg_all(a, [bytes(hdr), *prep.iovs])
        raw = b.recv(len(hdr), socket.MSG_WAITALL)
        header = dec.decode(raw)
        with GuestRAM.create({"d": npages * PS}) as dst:
            fds = (
                [
                    os.open(
                        dst.block(0).segment if os.sep in dst.block(0).segment else "/dev/shm/" + dst.block(0).segment,
                        os.O_RDWR,
                    )
                ]
                if use_fd
                else None
            )
            received = [np.zeros(npages, dtype=np.uint8)]
            if direct:
                dst.populate(0)
            sink = PageSink([dst.pages(0)], [memoryview(dst.view(0)).cast("B")], received, fds, direct=direct)
            try:
                method.receiver(PS, PP).recv(header, b, sink)
            finally:
                if fds:
                    os.close(fds[0])
            out = dst.pages(0)[page_idx].copy()
            rec = received[0].copy()
        return prep, out, rec
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["random", "zero", "text", "mixed"])
def test_round_trip(method, kind):
    idx = np.array([0, 1, 2, 5, 9, 10, 15], dtype=np.intp)
    data = make_pages(kind, len(idx), seed=3)
    prep, out, rec = transfer(method, data, idx)
    assert np.array_equal(out, data)
    assert rec[idx].all()
    if method in ("lz4", "zstd", "zlib"):
        if kind == "random":
            assert prep.encoding == ENCODING_RAW  # incompressible: raw, straight from RAM
            assert prep.payload_len == len(idx) * PS
        else:
            assert prep.encoding == ENCODINGS[method]
            bound = {"zero": 0.05, "text": 0.7, "mixed": 0.9}[kind]
            assert prep.payload_len < len(idx) * PS * bound


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_through_file_writes(method):
    idx = np.array([3, 4, 5, 7], dtype=np.intp)
    data = make_pages("mixed", len(idx), seed=9)
    _, out, _ = transfer(method, data, idx, use_fd=True)
    assert np.array_equal(out, data)


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_straight_into_a_populated_mapping(method):
    # runs of 1, 3 and 2 pages: one IOV each, pages between them untouched
    idx = np.array([0, 2, 3, 4, 9, 10], dtype=np.intp)
    data = make_pages("random", len(idx), seed=11)
    _, out, rec = transfer(method, data, idx, direct=True)
    assert np.array_equal(out, data)
    assert rec[idx].all() and rec.sum() == len(idx)


def _scatter_target(sizes: list[int], gap: int) -> tuple[bytearray, list[memoryview]]:
    """One buffer filled with 0xEE, and views of ``sizes`` bytes in it with ``gap`` bytes between them."""
    buf = bytearray(b"\xee" * (sum(sizes) + gap * (len(sizes) + 1)))
    mv, views, pos = memoryview(buf), [], gap
    for n in sizes:
        views.append(mv[pos : pos + n])
        pos += n + gap
    return buf, views


@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=40),
    chunks=st.lists(st.integers(1, 9000), min_size=1, max_size=20),
    many=st.booleans(),
)
def test_recv_into_views_fills_every_view_in_order_and_nothing_else(sizes, chunks, many):
    if many:  # more views than one recvmsg_into may take
        sizes = (sizes * (IOV_MAX // len(sizes) + 2))[: IOV_MAX + 37]
    payload = np.random.default_rng(len(sizes)).integers(0, 256, sum(sizes), dtype=np.uint8).tobytes()
    buf, views = _scatter_target(sizes, gap=3)
    a, b = socket.socketpair()

    def send() -> None:  # arbitrary write sizes: the reader sees short reads
        pos, i = 0, 0
        while pos < len(payload):
            n = chunks[i % len(chunks)]
            a.sendall(payload[pos : pos + n])
            pos, i = pos + n, i + 1

    t = threading.Thread(target=send)
    t.start()
    try:
        b.settimeout(30)
        recv_exact_into_views(b, views)
    finally:
        t.join(30)
        a.close()
        b.close()
    assert b"".join(bytes(v) for v in views) == payload
    gaps, pos = [], 0
    for n in sizes:
        gaps.append(bytes(buf[pos : pos + 3]))
        pos += 3 + n
    gaps.append(bytes(buf[pos:]))
    assert all(g == b"\xee" * 3 for g in gaps), "a byte landed between the views"


def test_recv_into_views_reports_eof_with_the_count():
    _, views = _scatter_target([100, 200, 300], gap=0)
    a, b = socket.socketpair()
    try:
        a.sendall(b"x" * 250)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelClosed, match="after 250 of 600 bytes"):
            recv_exact_into_views(b, views)
    finally:
        a.close()
        b.close()


@given(
    pages=st.lists(st.integers(0, 63), min_size=1, max_size=PP, unique=True),
    kind=st.sampled_from(["random", "zero", "text", "mixed"]),
    method=st.sampled_from(METHODS),
    sink=st.sampled_from(["store", "pwrite", "direct"]),
    shuffle=st.randoms(use_true_random=False),
)
def test_round_trip_property(pages, kind, method, sink, shuffle):
    # any page order: runs are found in payload order, not sorted order
    idx = np.array(pages if shuffle.random() < 0.5 else sorted(pages), dtype=np.intp)
    data = make_pages(kind, len(idx), seed=len(pages))
    _, out, _ = transfer(method, data, idx, use_fd=sink == "pwrite", direct=sink == "direct")
    assert np.array_equal(out, data)


def _receive_forged(method_name: str, encoding: int, payload: bytes, normal: int = 2):
    """Feed a forged packet to the method's receiver."""
    method = get_method(method_name)(None, {})
    idx = np.arange(normal, dtype=np.intp)
    enc = DataHeaderEncoder(PP)
    hdr = enc.encode(encoding=encoding, normal_offsets=idx * PS, payload_len=len(payload))
    dec = DataHeaderDecoder(packet_pages=PP, page_size=PS, block_sizes=[PP * PS], encodings=method.encodings)
    grid = np.zeros((PP, PS), dtype=np.uint8)
    guard = np.full(64, 0xAB, dtype=np.uint8)
    sink = PageSink([grid], [memoryview(grid).cast("B")], [np.zeros(PP, dtype=np.uint8)])
    a, b = socket.socketpair()
    try:
        a.sendall(bytes(hdr) + payload)
        header = dec.decode(b.recv(len(hdr), socket.MSG_WAITALL))
        method.receiver(PS, PP).recv(header, b, sink)
    finally:
        a.close()
        b.close()
    assert (guard == 0xAB).all()
    return grid


CODECS = {
    "lz4": (ENCODING_LZ4, lambda d: lz4.block.compress(d, store_size=False)),
    "zstd": (ENCODING_ZSTD, lambda d: zstandard.ZstdCompressor().compress(d)),
    "zlib": (ENCODING_ZLIB, lambda d: zlib.compress(d)),
}


@pytest.mark.parametrize("method", ["lz4", "zstd", "zlib"])
def test_truncated_payload_rejected(method):
    encoding, compress = CODECS[method]
    blob = compress(make_pages("text", 2).tobytes())
    with pytest.raises(RemoteProtocolError) as ei:
        _receive_forged(method, encoding, blob[: len(blob) // 2])
    assert ei.value.field == "payload"


@pytest.mark.parametrize("method", ["lz4", "zstd", "zlib"])
def test_payload_inflating_past_its_bound_rejected(method):
    """A payload that decompresses to more than normal × page_size is refused, never written."""
    encoding, compress = CODECS[method]
    bomb = compress(bytes(64 * PS))  # 256 KiB of zeros in a few hundred bytes
    with pytest.raises(RemoteProtocolError) as ei:
        _receive_forged(method, encoding, bomb, normal=2)
    assert ei.value.field == "payload"


@pytest.mark.parametrize("method", ["lz4", "zstd", "zlib"])
def test_payload_short_of_its_size_rejected(method):
    encoding, compress = CODECS[method]
    blob = compress(make_pages("text", 1).tobytes())  # one page for a packet that claims two
    with pytest.raises(RemoteProtocolError):
        _receive_forged(method, encoding, blob, normal=2)


@pytest.mark.parametrize("method", ["lz4", "zstd", "zlib"])
def test_garbage_payload_rejected(method):
    encoding, _ = CODECS[method]
    with pytest.raises(RemoteProtocolError):
        _receive_forged(method, encoding, os.urandom(3000))


def test_zstd_frame_declaring_huge_size_rejected_before_allocation():
    blob = bytearray(zstandard.ZstdCompressor().compress(bytes(2 * PS)))
    # a hand-made frame whose header declares 1 TiB
    hostile = zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 10)
    params = zstandard.get_frame_parameters(hostile)
    assert params.content_size == 10
    forged = bytearray(hostile)
    # content size lives in the header: claim 1 TiB by rebuilding the frame with a big pledged size
    cctx = zstandard.ZstdCompressor(write_content_size=True)
    chunker = cctx.compressobj(size=1 << 40)
    forged = chunker.compress(b"x" * 100) + chunker.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    assert zstandard.frame_content_size(forged) == 1 << 40
    with pytest.raises(RemoteProtocolError, match="declares"):
        _receive_forged("zstd", ENCODING_ZSTD, forged)
    assert blob  # the honest frame above stays valid


def test_compressed_payload_not_smaller_than_raw_rejected():
    with pytest.raises(RemoteProtocolError):
        _receive_forged("lz4", ENCODING_LZ4, os.urandom(2 * PS), normal=2)


def test_wrong_encoding_for_method_rejected_by_decoder():
    enc = DataHeaderEncoder(PP)
    hdr = enc.encode(encoding=ENCODING_ZSTD, normal_offsets=np.array([0]), payload_len=100)
    dec = DataHeaderDecoder(packet_pages=PP, page_size=PS, block_sizes=[PP * PS], encodings=get_method("lz4").encodings)
    with pytest.raises(RemoteProtocolError) as ei:
        dec.decode(bytes(hdr))
    assert ei.value.field == "encoding"


@pytest.mark.parametrize("method, level", [("zstd", 23), ("zstd", "3"), ("zlib", 10), ("lz4", 13), ("zlib", True)])
def test_bad_levels_rejected(method, level):
    with pytest.raises(ConfigError, match="compression_level"):
        get_method(method)(level, {})


def test_levels_change_the_output():
    data = make_pages("mixed", 8, seed=1)
    idx = np.arange(8, dtype=np.intp)
    p1, out1, _ = transfer("zstd", data, idx, level=1)
    p19, out19, _ = transfer("zstd", data, idx, level=19)
    assert np.array_equal(out1, data) and np.array_equal(out19, data)
    assert p19.payload_len <= p1.payload_len


def test_compression_reads_a_private_copy():
    """The guest may write pages while they are compressed: the compressor must read a gather, not the RAM."""
    data = make_pages("text", 4, seed=2)
    src = data.copy()
    sender = get_method("lz4")(None, {}).sender(PS, PP)
    batch = PageBatch(0, PS, np.arange(4, dtype=np.intp), memoryview(src).cast("B"), src)
    prep = sender.send_prepare(batch)
    assert prep.encoding == ENCODING_LZ4
    src[:] = 0  # the guest overwrites after prepare: the compressed blob is unaffected
    assert lz4.block.decompress(prep.iovs[0], uncompressed_size=4 * PS) == data.tobytes()


# ----------------------------------------------------------------------------- auto


class _FakeClock:
    def __init__(self):
        self.now = 0.0
        self.step = 0.0

    def __call__(self):
        self.now += self.step
        return self.now


def _auto_decisions(compress_seconds: float, link_bytes_per_s: float, kind: str, n: int = 64) -> list[int]:
    clock = _FakeClock()
    sender = _AutoSender(_Lz4Codec(None), PS, PP, clock=clock)
    data = make_pages(kind, PP, seed=4)
    batch = PageBatch(0, PS, np.arange(PP, dtype=np.intp), memoryview(data).cast("B"), data)
    encodings = []
    for _ in range(n):
        clock.step = compress_seconds / 2  # two clock reads around one compression
        prep = sender.send_prepare(batch)
        encodings.append(prep.encoding)
        sender.sent(prep, prep.payload_len / link_bytes_per_s)
    return encodings


def test_auto_compresses_on_a_slow_link():
    # compressing 64 KiB in 0.1 ms (640 MB/s) against a 100 MB/s link: worth it for text
    enc = _auto_decisions(1e-4, 100e6, "text")
    assert enc[-32:].count(ENCODING_LZ4) >= 30


def test_auto_sends_raw_on_a_fast_link():
    # 640 MB/s compression against a 5 GB/s link: compressing would slow the channel down
    enc = _auto_decisions(1e-4, 5e9, "text")
    assert enc[-32:].count(ENCODING_RAW) >= 30


def test_auto_sends_raw_when_data_does_not_shrink():
    enc = _auto_decisions(1e-5, 1e6, "random")
    assert enc[-32:].count(ENCODING_RAW) >= 30


# ----------------------------------------------------------------------------- registry and plugins


class XorMethod(Method):
    """A test method: pages XOR-ed with 0x5A travel as encoding 7."""

    name = "xor-test"
    encodings = frozenset({0, 7})

    def sender(self, page_size, packet_pages):
        class S(MethodSender):
            def send_prepare(self, batch):
                blob = (batch.gather() ^ 0x5A).tobytes()
                return Prepared(7, (blob,), len(blob))

        return S()

    def receiver(self, page_size, packet_pages):
        class R(MethodReceiver):
            def recv(self, header, sock, sink):
                buf = bytearray(header.payload_len)
                sock.recv_into(buf, len(buf), socket.MSG_WAITALL)
                data = np.frombuffer(buf, dtype=np.uint8) ^ 0x5A
                sink.store(header.block, (header.normal_offsets // page_size).astype(np.intp), memoryview(data))

        return R()


def test_builtins_are_registered():
    assert {"none", "lz4", "zstd", "zlib", "auto"} <= set(available_methods())


def test_unknown_method_names_the_available_ones():
    with pytest.raises(ConfigError, match="lz4"):
        get_method("does-not-exist")


def test_register_rejects_non_methods():
    with pytest.raises(TypeError):
        register("bad", object)  # type: ignore[arg-type]


def test_runtime_registered_method_end_to_end():
    register("xor-test", XorMethod)
    cfg = MigrationConfig(channels=2, compression="xor-test", start_method="fork")
    with GuestRAM.create({"a": 4 << 20}) as s, GuestRAM.create({"a": 4 << 20}) as d:
        fill(s, "mixed", 5)
        with Destination(d, config=cfg) as dst, Source(s, cfg) as src:
            res = src.migrate(dst.address)
            assert dst.wait(10).verified
        assert res.verified and np.array_equal(s.view(0), d.view(0))
        assert sum(c["compressed-packets"] for c in res.per_channel) > 0


def test_destination_without_the_method_refuses_before_any_page_moves():
    register("xor-test", XorMethod)  # only in this process: the destination process lacks it
    cfg = MigrationConfig(channels=2, compression="xor-test", start_method="spawn")
    with GuestRAM.create({"a": 1 << 20}) as s, GuestRAM.create({"a": 1 << 20}) as d:
        s.view(0)[:] = 9
        with RemoteDestination(d.name, MigrationConfig(start_method="spawn"), start_method="spawn") as dst:
            with Source(s, cfg) as src:
                with pytest.raises(MigrationError, match="xor-test"):
                    src.migrate(dst.address)
            with pytest.raises(MigrationError, match="xor-test"):
                dst.result()
            assert dst.valid is False
        assert not d.view(0).any()  # no page moved


PLUGIN = textwrap.dedent(
    '''
    import numpy as np
    from mpmultifd.methods import Method, MethodSender, MethodReceiver, Prepared
    from mpmultifd.transport import recv_exact_into

    class Negate(Method):
        """Pages bit-inverted on the wire (encoding 9)."""
        name = "negate-plugin"
        encodings = frozenset({0, 9})

        def sender(self, page_size, packet_pages):
            class S(MethodSender):
                def send_prepare(self, batch):
                    blob = (~batch.gather()).tobytes()
                    return Prepared(9, (blob,), len(blob))
            return S()

        def receiver(self, page_size, packet_pages):
            class R(MethodReceiver):
                def recv(self, header, sock, sink):
                    buf = bytearray(header.payload_len)
                    recv_exact_into(sock, memoryview(buf))
                    data = ~np.frombuffer(buf, dtype=np.uint8)
                    sink.store(header.block, (header.normal_offsets // page_size).astype(np.intp), memoryview(data))
            return R()
    '''
)


def test_entry_point_plugin_end_to_end(tmp_path, monkeypatch):
    """A separate 'package' adds a method through the mpmultifd.methods entry point group."""
    (tmp_path / "mpmf_negate_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "mpmf_negate_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mpmf-negate-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mpmultifd.methods]\nnegate-plugin = mpmf_negate_plugin:Negate\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    import mpmultifd.methods as registry

    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert "negate-plugin" in available_methods()
    # the destination runs in a freshly spawned interpreter: it finds the plugin through the entry point too
    cfg = MigrationConfig(channels=2, compression="negate-plugin", start_method="spawn")
    with GuestRAM.create({"a": 2 << 20}) as s, GuestRAM.create({"a": 2 << 20}) as d:
        fill(s, "mixed", 8)
        with RemoteDestination(d.name, cfg, start_method="spawn") as dst, Source(s, cfg) as src:
            res = src.migrate(dst.address)
            assert dst.result().verified
        assert res.verified and np.array_equal(s.view(0), d.view(0))
    assert "mpmf_negate_plugin" in sys.modules


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["lz4", "zstd", "zlib", "auto"])
def test_live_writer_every_method(method):
    from test_migration import run_live_migration

    config = MigrationConfig(
        channels=4,
        compression=method,
        start_method="forkserver",
        downtime_limit=0.005,
        max_rounds=4,
        stall_downtime_limit=math.inf,
    )
    result, query, (dest_result, dest_valid), same, pauses, resumes = run_live_migration(
        "forkserver", config, content="mixed"
    )
    assert all(same.values()) and dest_valid and dest_result.verified
    assert pauses == 1 and resumes == []
    comp = query["compression"]
    assert comp["compressed-packets"] + comp["raw-packets"] > 0
    if method != "auto":
        assert comp["compressed-packets"] > 0
        # mixed content shrinks: fewer bytes on the wire than the data pages sent
        assert result.transferred < result.normal * 4096


def test_mostly_zero_guest_keeps_destination_memory_low():
    """Zero pages are never written into fresh shared memory: the destination allocates only the data pages."""
    size = 64 << 20
    with GuestRAM.create({"a": size}) as s, GuestRAM.create({"a": size}) as d:
        grid = s.pages(0)
        rng = np.random.default_rng(1)
        data_pages = rng.choice(len(grid), size=len(grid) // 100, replace=False)
        grid[data_pages] = rng.integers(1, 256, size=(len(data_pages), PS), dtype=np.uint8)
        cfg = MigrationConfig(channels=2, start_method="fork")
        with Destination(d, config=cfg) as dst, Source(s, cfg) as src:
            res = src.migrate(dst.address)
            dst.wait(10)
        seg = d.block(0).segment
        # measured before anything reads the destination: reading a hole of shared memory allocates it
        allocated = os.stat(seg if os.sep in seg else "/dev/shm/" + seg).st_blocks * 512
        assert res.verified  # verification did not read the holes either
        assert res.duplicate >= len(grid) - len(data_pages)
        assert allocated <= 2 * len(data_pages) * PS + (1 << 20), allocated  # ~1% of 64 MiB, not 64 MiB
        assert np.array_equal(s.view(0), d.view(0))
