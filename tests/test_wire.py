"""The wire codec from bytes only: documented vectors, round trips, and every malformed field."""

from __future__ import annotations

import json
import pathlib
import re
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmultifd.errors import LocalProtocolError, RemoteProtocolError
from mpmultifd.wire import (
    CONTROL_CHANNEL,
    FLAG_EOS,
    FLAG_SYNC,
    HELLO_SIZE,
    KIND_CONTROL,
    KIND_DATA,
    KIND_STREAM,
    MAX_BLOCKS,
    MAX_REPAIR_PAGES,
    REPAIR_CHUNK_PAGES,
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
    ControlMac,
    DataHeaderDecoder,
    DataHeaderEncoder,
    ErrorMessage,
    Hello,
    Repair,
    RepairDone,
    RepairPages,
    Result,
    RoundAck,
    RoundEnd,
    Verify,
    data_header_size,
    decode_hello,
    encode_control,
    encode_hello,
)

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
SID = bytes(range(16))


def doc_vectors() -> dict[str, bytes]:
    text = DOC.read_text()
    out = {}
    for name, body in re.findall(r"```vector ([\w-]+)\n(.*?)```", text, re.S):
        out[name] = bytes.fromhex(body.replace("\n", " "))
    return out


VECTORS = doc_vectors()

CONFIG = Config(
    session_id=SID,
    page_size=4096,
    channels=4,
    packet_pages=128,
    blocks=(BlockSpec("pc.ram", 1 << 20),),
    method="none",
    method_options={"level": None},
    zero_page="multifd",
    verify=True,
)


def decode_one(data: bytes):
    d = ControlDecoder()
    d.feed(data)
    msg = d.next_message()
    assert d.pending == 0
    return msg


def test_document_has_every_vector():
    assert set(VECTORS) == {
        "hello-control",
        "hello-data-2",
        "data-raw",
        "data-sync",
        "config",
        "round-end",
        "verify",
        "result",
    }


def test_vector_hellos():
    ctrl = Hello(KIND_CONTROL, SID, CONTROL_CHANNEL, 4)
    data = Hello(KIND_DATA, SID, 2, 4)
    assert encode_hello(ctrl) == VECTORS["hello-control"]
    assert encode_hello(data) == VECTORS["hello-data-2"]
    assert decode_hello(VECTORS["hello-control"]) == ctrl
    assert decode_hello(VECTORS["hello-data-2"], session_id=SID, nchannels=4) == data


def _small_decoder(**kw):
    args = dict(packet_pages=4, page_size=4096, block_sizes=[1 << 20, 1 << 20])
    args.update(kw)
    return DataHeaderDecoder(**args)


def test_vector_data_headers():
    enc = DataHeaderEncoder(4)
    raw = enc.encode(
        block=1,
        round=3,
        packet_num=42,
        normal_offsets=np.array([0, 4096]),
        zero_offsets=np.array([16384]),
        payload_len=8192,
    )
    assert bytes(raw) == VECTORS["data-raw"]
    h = _small_decoder().decode(VECTORS["data-raw"])
    assert (h.block, h.round, h.packet_num, h.normal, h.zero, h.payload_len) == (1, 3, 42, 2, 1, 8192)
    assert h.normal_offsets.tolist() == [0, 4096] and h.zero_offsets.tolist() == [16384]
    assert bytes(enc.encode(flags=FLAG_SYNC, round=3, packet_num=43)) == VECTORS["data-sync"]
    s = _small_decoder().decode(VECTORS["data-sync"])
    assert s.is_sync and not s.is_eos and s.round == 3 and s.packet_num == 43


def test_vector_control_messages():
    assert encode_control(CONFIG) == VECTORS["config"]
    assert decode_one(VECTORS["config"]) == CONFIG
    assert encode_control(RoundEnd(3, (5, 6))) == VECTORS["round-end"]
    assert decode_one(VECTORS["round-end"]) == RoundEnd(3, (5, 6))
    v = Verify(0, np.array([1, 2], dtype=np.uint64))
    assert encode_control(v) == VECTORS["verify"]
    assert decode_one(VECTORS["verify"]) == v
    r = Result(True, True, None, {})
    assert encode_control(r) == VECTORS["result"]
    assert decode_one(VECTORS["result"]) == r


# ----------------------------------------------------------------------------- hello rejections


def _hello_with(offset: int, fmt: str, value) -> bytes:
    b = bytearray(VECTORS["hello-data-2"])
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize(
    "data, field",
    [
        (_hello_with(0, ">I", 0x11223344), "magic"),
        (_hello_with(4, ">H", 2), "version"),
        (_hello_with(6, ">B", 7), "kind"),
        (_hello_with(7, ">B", 2), "flags"),
        (_hello_with(28, ">I", 1), "reserved"),
        (_hello_with(26, ">H", 0), "nchannels"),
        (_hello_with(26, ">H", 257), "nchannels"),
        (_hello_with(24, ">H", 4), "channel"),  # == nchannels: QEMU's off-by-one
        (_hello_with(24, ">H", 9), "channel"),
        (VECTORS["hello-data-2"][:-1], "hello"),
        (VECTORS["hello-data-2"] + b"\0", "hello"),
    ],
)
def test_hello_rejects(data, field):
    with pytest.raises(RemoteProtocolError) as ei:
        decode_hello(data)
    assert ei.value.field == field


def test_hello_rejects_wrong_session_and_count():
    with pytest.raises(RemoteProtocolError) as ei:
        decode_hello(VECTORS["hello-data-2"], session_id=b"x" * 16)
    assert ei.value.field == "session_id"
    with pytest.raises(RemoteProtocolError) as ei:
        decode_hello(VECTORS["hello-data-2"], nchannels=8)
    assert ei.value.field == "nchannels"
    bad = bytearray(VECTORS["hello-control"])
    struct.pack_into(">H", bad, 24, 0)
    with pytest.raises(RemoteProtocolError) as ei:
        decode_hello(bytes(bad))
    assert ei.value.field == "channel"


def test_hello_encoder_refuses_impossible_values():
    with pytest.raises(LocalProtocolError):
        encode_hello(Hello(KIND_DATA, SID, 4, 4))
    with pytest.raises(LocalProtocolError):
        encode_hello(Hello(KIND_DATA, b"short", 0, 4))
    with pytest.raises(LocalProtocolError):
        encode_hello(Hello(KIND_CONTROL, SID, 0, 4))


@given(
    kind=st.sampled_from([KIND_CONTROL, KIND_DATA, KIND_STREAM]),
    sid=st.binary(min_size=16, max_size=16),
    n=st.integers(1, 256),
    data=st.data(),
)
def test_hello_round_trip(kind, sid, n, data):
    ch = data.draw(st.integers(0, n - 1)) if kind == KIND_DATA else CONTROL_CHANNEL
    h = Hello(kind, sid, ch, n)
    b = encode_hello(h)
    assert len(b) == HELLO_SIZE
    assert decode_hello(b, session_id=sid, nchannels=n) == h


@given(st.binary(min_size=HELLO_SIZE, max_size=HELLO_SIZE))
def test_hello_random_bytes_never_crash(b):
    try:
        h = decode_hello(b)
    except RemoteProtocolError as e:
        assert e.field
    else:  # whatever decodes must re-encode to the same bytes
        assert encode_hello(h) == b


# ----------------------------------------------------------------------------- data header rejections


def _raw_with(offset: int, fmt: str, value) -> bytes:
    b = bytearray(VECTORS["data-raw"])
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize(
    "data, field",
    [
        (_raw_with(0, ">I", 0x11223344), "magic"),
        (_raw_with(4, ">H", 0x0004), "flags"),
        (_raw_with(6, ">B", 9), "encoding"),
        (_raw_with(7, ">B", 1), "reserved"),
        (_raw_with(14, ">H", 1), "reserved"),
        (_raw_with(8, ">H", 2), "block"),
        (_raw_with(10, ">H", 4), "count"),  # 4 normal + 1 zero > 4 slots
        (_raw_with(12, ">H", 3), "count"),  # 2 normal + 3 zero > 4 slots
        (_raw_with(32, ">Q", 100), "offsets"),  # misaligned
        (_raw_with(32, ">Q", 1 << 20), "offsets"),  # one past the block
        (_raw_with(32, ">Q", 1 << 40), "offsets"),
        (_raw_with(32, ">Q", 4096), "offsets"),  # the same page twice
        (_raw_with(56, ">Q", 8192), "offsets"),  # unused slot not zero
        (_raw_with(20, ">I", 8191), "payload_len"),
        (_raw_with(20, ">I", 1 << 31), "payload_len"),
        (VECTORS["data-raw"][:-1], "header"),
    ],
)
def test_data_header_rejects(data, field):
    with pytest.raises(RemoteProtocolError) as ei:
        _small_decoder().decode(data)
    assert ei.value.field == field


def test_sync_with_payload_or_pages_rejected():
    for off, fmt, val in [(10, ">H", 1), (20, ">I", 1), (8, ">H", 1), (6, ">B", 1), (40, ">Q", 4096)]:
        b = bytearray(VECTORS["data-sync"])
        struct.pack_into(fmt, b, off, val)
        with pytest.raises(RemoteProtocolError):
            _small_decoder(encodings={0, 1}).decode(bytes(b))


def test_empty_data_packet_rejected():
    b = bytearray(VECTORS["data-raw"])
    struct.pack_into(">HH", b, 10, 0, 0)
    struct.pack_into(">I", b, 20, 0)
    b[32:] = bytes(len(b) - 32)
    with pytest.raises(RemoteProtocolError) as ei:
        _small_decoder().decode(bytes(b))
    assert ei.value.field == "count"


def test_encoded_payload_bounds():
    enc = DataHeaderEncoder(4)
    dec = _small_decoder(encodings={0, 1}, max_payload=5000)
    ok = enc.encode(encoding=1, normal_offsets=np.array([0, 4096]), payload_len=5000)
    assert dec.decode(bytes(ok)).payload_len == 5000
    for bad in (0, 5001):
        hdr = enc.encode(encoding=1, normal_offsets=np.array([0]), payload_len=bad)
        with pytest.raises(RemoteProtocolError) as ei:
            dec.decode(bytes(hdr))
        assert ei.value.field == "payload_len"


def test_encoder_refuses_too_many_pages():
    enc = DataHeaderEncoder(4)
    with pytest.raises(LocalProtocolError):
        enc.encode(normal_offsets=np.arange(3) * 4096, zero_offsets=np.array([5 * 4096, 6 * 4096]))
    with pytest.raises(LocalProtocolError):
        enc.encode(flags=0x80)


@st.composite
def data_packets(draw):
    pp = draw(st.integers(1, 64))
    ps = draw(st.sampled_from([512, 4096, 65536]))
    sizes = draw(st.lists(st.integers(1, 300), min_size=1, max_size=4))
    block = draw(st.integers(0, len(sizes) - 1))
    npages = sizes[block]
    count = draw(st.integers(1, min(pp, npages)))
    pages = draw(st.lists(st.integers(0, npages - 1), min_size=count, max_size=count, unique=True))
    normal = draw(st.integers(0, count))
    rnd = draw(st.integers(0, 2**32 - 1))
    num = draw(st.integers(0, 2**64 - 1))
    return pp, ps, [s * ps for s in sizes], block, pages, normal, rnd, num


@given(data_packets())
def test_data_header_round_trip(case):
    pp, ps, sizes, block, pages, normal, rnd, num = case
    offs = np.array(pages, dtype=np.uint64) * ps
    enc = DataHeaderEncoder(pp)
    hdr = enc.encode(
        block=block,
        round=rnd,
        packet_num=num,
        normal_offsets=offs[:normal],
        zero_offsets=offs[normal:],
        payload_len=normal * ps,
    )
    assert len(hdr) == data_header_size(pp)
    h = DataHeaderDecoder(packet_pages=pp, page_size=ps, block_sizes=sizes).decode(bytes(hdr))
    assert (h.block, h.round, h.packet_num, h.normal, h.zero) == (block, rnd, num, normal, len(pages) - normal)
    assert h.offsets.tolist() == offs.tolist()


@given(st.binary(min_size=data_header_size(4), max_size=data_header_size(4)))
def test_data_header_random_bytes(b):
    dec = _small_decoder()
    try:
        h = dec.decode(b)
    except RemoteProtocolError as e:
        assert e.field
    else:  # anything accepted is in bounds
        assert all(o % 4096 == 0 and o <= (1 << 20) - 4096 for o in h.offsets.tolist())


@given(st.data())
def test_data_header_single_byte_mutations(data):
    """Flipping any byte of a valid header either still decodes to an in-bounds header or names a field."""
    b = bytearray(VECTORS["data-raw"])
    pos = data.draw(st.integers(0, len(b) - 1))
    b[pos] ^= data.draw(st.integers(1, 255))
    try:
        h = _small_decoder().decode(bytes(b))
    except RemoteProtocolError as e:
        assert e.field
    else:
        assert h.block < 2
        assert all(o % 4096 == 0 and o <= (1 << 20) - 4096 for o in h.offsets.tolist())
        assert h.payload_len == h.normal * 4096


# ----------------------------------------------------------------------------- channel ordering


def _hdr(rnd, num, flags=0):
    enc = DataHeaderEncoder(4)
    if flags:
        raw = enc.encode(flags=flags, round=rnd, packet_num=num)
    else:
        raw = enc.encode(round=rnd, packet_num=num, normal_offsets=np.array([0]), payload_len=4096)
    return _small_decoder().decode(bytes(raw))


def test_channel_state_orders_rounds_and_packets():
    s = ChannelState()
    s.check(_hdr(0, 1))
    s.check(_hdr(0, 5))
    with pytest.raises(RemoteProtocolError) as ei:
        s.check(_hdr(0, 5))  # repeated packet number
    assert ei.value.field == "packet_num"
    s.check(_hdr(0, 6, FLAG_SYNC))
    assert s.at_sync and s.packets_in_round == 2
    with pytest.raises(RemoteProtocolError):
        s.check(_hdr(1, 7))  # still parked
    s.next_round()
    with pytest.raises(RemoteProtocolError) as ei:
        s.check(_hdr(0, 7))  # round going backwards
    assert ei.value.field == "round"
    s2 = ChannelState()
    with pytest.raises(RemoteProtocolError) as ei:
        s2.check(_hdr(1, 0))  # round from the future
    assert ei.value.field == "round"
    s.check(_hdr(1, 9, FLAG_EOS))
    assert s.finished
    with pytest.raises(RemoteProtocolError):
        s.check(_hdr(1, 10))


# ----------------------------------------------------------------------------- control messages


@pytest.mark.parametrize(
    "msg",
    [
        CONFIG,
        ConfigAck(),
        RoundEnd(0, (1,)),
        RoundEnd(2**32 - 1, tuple(range(256))),
        Complete(7, (3, 4, 5)),
        Verify(3, np.array([0, 2**64 - 1], dtype=np.uint64)),
        Result(False, False, "pages differ", {"pc.ram": [1, 2]}),
        Result(True, None, None, {}),
        ErrorMessage("boom", "it broke", 3),
        ErrorMessage("boom", "it broke", None),
        RoundAck(12),
        Cancel(),
        Commit(),
        CommitAck(),
        Repair(1, ((0, np.array([1, 5, 9])), (2, np.array([3])))),
        RepairPages(2, 1, np.array([4, 5]), np.array([7, 2**64 - 1], dtype=np.uint64), bytes(range(256)) * 32),
        RepairDone(3, 17),
        ChannelLost(5, 9),
    ],
)
def test_control_round_trip(msg):
    assert decode_one(encode_control(msg)) == msg


def test_control_decoder_is_incremental():
    stream = encode_control(CONFIG) + encode_control(RoundEnd(0, (1, 2, 3, 4))) + encode_control(Cancel())
    d = ControlDecoder()
    got = []
    for i in range(len(stream)):
        d.feed(stream[i : i + 1])
        m = d.next_message()
        while m is not None:
            got.append(m)
            m = d.next_message()
    assert got == [CONFIG, RoundEnd(0, (1, 2, 3, 4)), Cancel()]


def _frame(mtype: int, body: bytes, magic: int = 0x4D504D43, flags: int = 0) -> bytes:
    return struct.pack(">IBBHI", magic, mtype, flags, 0, len(body)) + body


def _config_json(**changes) -> bytes:
    import json

    obj = json.loads(VECTORS["config"][12:])
    for k, v in changes.items():
        if v is KeyError:
            del obj[k]
        else:
            obj[k] = v
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "data, field",
    [
        (_frame(1, b"{}", magic=0x11223344), "magic"),
        (_frame(1, b"{}", flags=2), "reserved"),
        (_frame(1, b"{}", flags=1), "mac"),  # a tag where the session has no key
        (_frame(0, b""), "type"),
        (_frame(17, b""), "type"),
        (_frame(16, b"\0"), "length"),  # CHANNEL_LOST is 8 bytes
        (_frame(16, b"\0\1\0\1\0\0\0\2"), "reserved"),
        (_frame(12, b"\0"), "length"),
        (_frame(13, b"\0\0\0\1\0\0\0\0"), "nblocks"),
        (_frame(13, b"\0\0\0\1\0\1\0\0" + b"\0\0\0\0\0\0\0\0"), "npages"),
        (_frame(13, b"\0\0\0\1\0\1\0\0" + b"\0\0\0\0\0\0\0\2" + bytes(8)), "length"),
        (_frame(13, b"\0\0\0\1\0\1\0\0" + b"\0\0\0\0\0\0\0\1" + bytes(9)), "length"),
        (_frame(13, b"\0\0\0\1\0\1\0\0" + b"\0\0\0\0\0\1\0\1" + bytes(8)), "npages"),
        (_frame(14, b"\0\0\0\1\0\0\0\0\0\0\0\0"), "npages"),
        (_frame(14, b"\0\0\0\1\0\0\0\0\0\0\0\1" + bytes(16)), "length"),
        (_frame(14, b"\0\0\0\1\0\0\0\0\0\0\0\2" + bytes(32) + bytes(4097)), "length"),
        (_frame(14, b"\0\0\0\1\0\0\0\1\0\0\0\1" + bytes(16) + bytes(8)), "reserved"),
        (_frame(15, b"\0\0\0\1"), "length"),
        (_frame(1, b"not json"), "config"),
        (_frame(1, b"[1]"), "config"),
        (_frame(1, _config_json(page_size=4095)), "page_size"),
        (_frame(1, _config_json(page_size=True)), "page_size"),
        (_frame(1, _config_json(channels=0)), "channels"),
        (_frame(1, _config_json(channels=257)), "channels"),
        (_frame(1, _config_json(packet_pages=1024)), "packet_pages"),
        (_frame(1, _config_json(session="zz")), "session"),
        (_frame(1, _config_json(blocks=[])), "blocks"),
        (_frame(1, _config_json(blocks=[{"name": "a", "size": 100}])), "blocks[0].size"),
        (_frame(1, _config_json(blocks=[{"name": "", "size": 4096}])), "blocks[0].name"),
        (_frame(1, _config_json(blocks=[{"name": "a", "size": 4096}, {"name": "a", "size": 4096}])), "blocks[1].name"),
        (_frame(1, _config_json(blocks=[{"name": "a"}])), "blocks[0]"),
        (_frame(1, _config_json(method="")), "method"),
        (_frame(1, _config_json(zero_page="legacy")), "zero_page"),
        (_frame(1, _config_json(verify=1)), "verify"),
        (_frame(1, _config_json(verify=KeyError)), "verify"),
        (_frame(1, _config_json(extra=1)), "extra"),
        (_frame(2, b"x"), "length"),
        (_frame(3, b"\0\0\0\1\0\2\0\0" + bytes(8)), "packets"),
        (_frame(3, b"\0\0\0\1\0\0\0\0"), "nchannels"),
        (_frame(3, b"\0\0"), "round_end"),
        (_frame(5, b"\0\0\0\0\0\0\0\3" + bytes(8)), "npages"),
        (_frame(6, b'{"ok": 1, "verified": null, "error": null, "mismatches": {}}'), "ok"),
        (_frame(6, b'{"ok": true, "verified": null, "error": null, "mismatches": {"a": [-1]}}'), "mismatches"),
        (_frame(7, b'{"code": "x", "message": "y", "channel": 999}'), "channel"),
        (_frame(8, b"\0\0"), "length"),
        (_frame(9, b"\0"), "length"),
        (_frame(10, b"\0"), "length"),
    ],
)
def test_control_rejects(data, field):
    d = ControlDecoder()
    d.feed(data)
    with pytest.raises(RemoteProtocolError) as ei:
        d.next_message()
    assert ei.value.field == field


def test_control_length_bound():
    d = ControlDecoder(max_body=1000)
    d.feed(struct.pack(">IBBHI", 0x4D504D43, 1, 0, 0, 1001))
    with pytest.raises(RemoteProtocolError) as ei:
        d.next_message()
    assert ei.value.field == "length"


def test_control_frames_are_capped_at_1_mib_except_verify():
    """A CONFIG (or any message but VERIFY) over 1 MiB is refused from its frame header, before any body
    is buffered; VERIFY's limit is the decoder's max_verify (a destination sets it from its largest block)."""
    from mpmultifd.wire import MAX_CONTROL_BODY, verify_body_limit

    assert MAX_CONTROL_BODY == 1 << 20
    for mtype in range(1, 12):
        if mtype == 5:
            continue
        d = ControlDecoder()
        d.feed(struct.pack(">IBBHI", 0x4D504D43, mtype, 0, 0, (1 << 20) + 1))
        with pytest.raises(RemoteProtocolError) as ei:
            d.next_message()
        assert ei.value.field == "length"
    npages = 300_000  # a 1.2 GB block of 4 KiB pages: 2.4 MB of fingerprints
    d = ControlDecoder(max_verify=verify_body_limit(npages))
    fps = np.arange(npages, dtype=np.uint64)
    d.feed(encode_control(Verify(0, fps)))
    assert np.array_equal(d.next_message().fingerprints, fps)
    d = ControlDecoder(max_verify=verify_body_limit(npages - 1))
    d.feed(encode_control(Verify(0, fps))[:12])
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        d.next_message()


def test_deep_json_is_a_typed_error_not_a_recursion_error():
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        for mtype in (1, 6, 7):
            d = ControlDecoder()
            d.feed(struct.pack(">IBBHI", 0x4D504D43, mtype, 0, 0, len(body)) + body)
            with pytest.raises(RemoteProtocolError, match="deeper than"):
                d.next_message()
    nested = {"level": 1}
    for _ in range(20):
        nested = {"x": nested}
    body = json.dumps({"code": "x", "message": "m", "channel": None, "deep": nested}).encode()
    d = ControlDecoder()
    d.feed(struct.pack(">IBBHI", 0x4D504D43, 7, 0, 0, len(body)) + body)
    with pytest.raises(RemoteProtocolError, match="deeper than"):
        d.next_message()


def test_peer_error_texts_are_cut():
    d = ControlDecoder()
    d.feed(encode_control(ErrorMessage("c" * 1000, "m" * 100_000, None)))
    d.feed(encode_control(Result(False, False, "e" * 100_000, {})))
    err, res = d.next_message(), d.next_message()
    assert len(err.message) < 600 and err.message.startswith("m" * 500) and "99500 more" in err.message
    assert len(err.code) < 200
    assert len(res.error) < 600 and "99500 more" in res.error


@given(st.binary(max_size=400))
def test_control_random_bytes(b):
    d = ControlDecoder(max_body=1 << 16)
    d.feed(b)
    try:
        while d.next_message() is not None:
            pass
    except RemoteProtocolError as e:
        assert e.field


@given(
    rnd=st.integers(0, 2**32 - 1),
    counts=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=256),
    fps=st.lists(st.integers(0, 2**64 - 1), max_size=64),
    block=st.integers(0, 0xFFFF),
)
def test_control_binary_round_trips(rnd, counts, fps, block):
    assert decode_one(encode_control(RoundEnd(rnd, tuple(counts)))) == RoundEnd(rnd, tuple(counts))
    assert decode_one(encode_control(Complete(rnd, tuple(counts)))) == Complete(rnd, tuple(counts))
    v = Verify(block, np.array(fps, dtype=np.uint64))
    assert decode_one(encode_control(v)) == v


@given(
    attempt=st.integers(0, 2**32 - 1),
    blocks=st.dictionaries(
        st.integers(0, MAX_BLOCKS - 1), st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=50, unique=True),
        min_size=1, max_size=5,
    ),
    npages=st.integers(1, REPAIR_CHUNK_PAGES),
    page=st.sampled_from([512, 4096]),
    data=st.data(),
)
def test_repair_messages_round_trip(attempt, blocks, npages, page, data):
    r = Repair(attempt, tuple((b, np.array(sorted(p), dtype=np.int64)) for b, p in sorted(blocks.items())))
    assert decode_one(encode_control(r)) == r
    pages = np.array(data.draw(st.lists(st.integers(0, 2**63 - 1), min_size=npages, max_size=npages)), dtype=np.int64)
    prints = np.array(data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=npages, max_size=npages)), dtype=np.uint64)
    rp = RepairPages(
        attempt,
        data.draw(st.integers(0, 0xFFFF)),
        pages,
        prints,
        data.draw(st.binary(min_size=page, max_size=page)) * npages,
    )
    assert decode_one(encode_control(rp)) == rp
    assert decode_one(encode_control(RepairDone(attempt, npages))) == RepairDone(attempt, npages)


def test_repair_is_bounded_on_both_ends():
    with pytest.raises(LocalProtocolError):
        encode_control(Repair(1, ((0, np.arange(MAX_REPAIR_PAGES + 1)),)))
    with pytest.raises(LocalProtocolError):
        encode_control(
            RepairPages(
                1,
                0,
                np.arange(REPAIR_CHUNK_PAGES + 1),
                np.zeros(REPAIR_CHUNK_PAGES + 1, np.uint64),
                bytes(512 * (REPAIR_CHUNK_PAGES + 1)),
            )
        )
    # a hostile REPAIR that announces more pages than the limit, split over blocks
    body = b"\0\0\0\1\0\2\0\0"
    for b in range(2):
        body += (
            bytes([0, b, 0, 0])
            + (MAX_REPAIR_PAGES // 2 + 1).to_bytes(4, "big")
            + bytes(8 * (MAX_REPAIR_PAGES // 2 + 1))
        )
    d = ControlDecoder()
    d.feed(_frame(13, body))
    with pytest.raises(RemoteProtocolError) as ei:
        d.next_message()
    assert ei.value.field == "npages"


@given(
    names=st.lists(
        st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s), min_size=1, max_size=5, unique=True
    ),
    ps_exp=st.integers(9, 16),
    channels=st.integers(1, 256),
    pp=st.integers(1, 1023),
    verify=st.booleans(),
    zp=st.sampled_from(["multifd", "none"]),
    data=st.data(),
)
def test_config_round_trip(names, ps_exp, channels, pp, verify, zp, data):
    ps = 1 << ps_exp
    blocks = tuple(BlockSpec(n, ps * data.draw(st.integers(1, 1 << 20))) for n in names)
    cfg = Config(SID, ps, channels, pp, blocks, "zstd", {"level": 3}, zp, verify)
    assert decode_one(encode_control(cfg)) == cfg


@given(
    msgs=st.lists(
        st.sampled_from([ConfigAck(), RoundAck(7), Cancel(), Commit(), CommitAck(), RepairDone(1, 2)]),
        min_size=1,
        max_size=6,
    ),
    data=st.data(),
)
def test_authenticated_frames_round_trip_and_any_change_is_refused(msgs, data):
    """With a key every frame carries a tag over its counter, header and body: a changed byte,
    a dropped, reordered or replayed frame, or a missing tag is refused (field ``mac``)."""
    sid, key = bytes(range(16)), b"q" * 32
    src, dst = ControlMac(key, sid, "source"), ControlMac(key, sid, "destination")
    frames = [encode_control(m, src) for m in msgs]
    d = ControlDecoder(mac=dst)
    for f in frames:
        d.feed(f)
    assert [d.next_message() for _ in msgs] == msgs
    # tampering: flip one byte of one frame, or drop / repeat / swap frames
    src2, dst2 = ControlMac(key, sid, "source"), ControlMac(key, sid, "destination")
    frames = [bytearray(encode_control(m, src2)) for m in msgs]
    how = data.draw(st.sampled_from(["flip", "drop", "repeat", "swap", "untagged", "other-direction"]))
    i = data.draw(st.integers(0, len(frames) - 1))
    if how == "flip":
        j = data.draw(st.integers(0, len(frames[i]) - 1))
        frames[i][j] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "drop":
        if len(frames) < 2:
            return
        del frames[min(i, len(frames) - 2)]  # a dropped last frame shows as a missing message, not here
    elif how == "repeat":
        frames.insert(i, frames[i])
    elif how == "swap":
        if len(frames) < 2 or frames[0] == frames[1]:
            return
        frames[0], frames[1] = frames[1], frames[0]
    elif how == "untagged":
        frames[i] = bytearray(encode_control(msgs[i]))
    else:
        frames = [bytearray(encode_control(m, ControlMac(key, sid, "destination"))) for m in msgs]
    d2 = ControlDecoder(mac=dst2)
    for f in frames:
        d2.feed(bytes(f))
    with pytest.raises(RemoteProtocolError) as ei:
        for _ in range(len(frames)):
            if d2.next_message() is None:
                raise RemoteProtocolError("truncated", field="length")
    assert ei.value.field in ("mac", "length", "type", "reserved", "magic")
