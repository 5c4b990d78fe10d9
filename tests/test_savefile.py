"""The save file format from bytes only: documented vectors, round trips, and every malformed field."""

from __future__ import annotations

import os
import pathlib
import re
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmultifd.errors import ConfigError, MigrationError, SaveFileError
from mpmultifd.savefile import (
    DATA_ALIGN,
    FIXED_SIZE,
    FORMAT_VERSION,
    MAX_HEADER_SIZE,
    META_ALIGN,
    STATE_OFFSET,
    STATE_SIZE,
    TABLE_OFFSET_AFTER_STATE,
    TABLE_OFFSET_INLINE,
    SaveBlock,
    SaveLayout,
    SaveState,
    decode_header,
    decode_state,
    encode_state,
    pack_bitmap,
    pack_digests,
    read_layout,
    unpack_bitmap,
    unpack_digests,
)

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "savefile.md"
SID = bytes(range(16))
CREATED = 1700000000123456789
PS = 4096


def doc_vectors() -> dict[str, bytes]:
    text = DOC.read_text()
    out = {}
    for name, body in re.findall(r"```vector ([\w-]+)\n(.*?)```", text, re.S):
        out[name] = bytes.fromhex(body.replace("\n", " "))
    return out


VECTORS = doc_vectors()


def small() -> SaveLayout:
    return SaveLayout.plan([("pc.ram", 8 * PS)], PS, save_id=SID, created_ns=CREATED)


def two() -> SaveLayout:
    return SaveLayout.plan([("pc.ram", 64 * PS), ("vga.vram", 3 * PS)], PS, save_id=SID, created_ns=CREATED)


def complete(header: bytes, present: int = 0) -> bytearray:
    buf = bytearray(header)
    buf[STATE_OFFSET : STATE_OFFSET + STATE_SIZE] = encode_state(SaveState(True, 1, present))
    return buf


def resign(buf: bytearray) -> bytearray:
    """Recompute header_crc, as a buggy writer with a correct checksum would."""
    hs = struct.unpack_from("<I", buf, 12)[0]
    hs = min(hs, len(buf)) if hs >= STATE_OFFSET + STATE_SIZE else len(buf)
    area = bytearray(buf[:hs])
    area[64:68] = bytes(4)
    area[STATE_OFFSET : STATE_OFFSET + STATE_SIZE] = bytes(STATE_SIZE)
    struct.pack_into("<I", buf, 64, zlib.crc32(area))
    return buf


def resign_state(buf: bytearray) -> bytearray:
    rec = bytearray(buf[STATE_OFFSET : STATE_OFFSET + STATE_SIZE])
    rec[28:32] = bytes(4)
    struct.pack_into("<I", buf, STATE_OFFSET + 28, zlib.crc32(rec))
    return buf


def field_of(data, **kw) -> str | None:
    with pytest.raises(SaveFileError) as ei:
        decode_header(bytes(data), **kw)
    return ei.value.field


# --------------------------------------------------------------------------- vectors


def test_document_has_every_vector():
    assert set(VECTORS) == {"header-fixed", "header-table", "state-incomplete", "state-complete"}


def test_vector_header():
    header = bytearray(4096)
    header[:FIXED_SIZE] = VECTORS["header-fixed"]
    table = VECTORS["header-table"]
    header[FIXED_SIZE : FIXED_SIZE + len(table)] = table
    header[STATE_OFFSET : STATE_OFFSET + STATE_SIZE] = VECTORS["state-incomplete"]
    lay = small()
    assert lay.encode_header() == bytes(header)
    assert (lay.header_size, lay.file_size, lay.table_offset) == (4096, 1081344, 72)
    b = lay.blocks[0]
    assert (b.bitmap_offset, b.digest_offset, b.data_offset) == (4096, 8192, 1048576)
    got, state = decode_header(header, file_size=1081344, require_complete=False)
    assert got == lay and state == SaveState(False, 0, 0)
    assert struct.unpack_from("<I", header, 64)[0] == 0x2739F29C
    header[STATE_OFFSET : STATE_OFFSET + STATE_SIZE] = VECTORS["state-complete"]
    got, state = decode_header(header, file_size=1081344)
    assert got == lay and state == SaveState(True, 1700000001000000000, 5)


def test_vector_states():
    assert encode_state(SaveState(False)) == VECTORS["state-incomplete"]
    assert encode_state(SaveState(True, 1700000001000000000, 5)) == VECTORS["state-complete"]
    assert decode_state(VECTORS["state-complete"]) == SaveState(True, 1700000001000000000, 5)


# --------------------------------------------------------------------------- round trips and invariants

NAME = st.text(min_size=1, max_size=40).filter(lambda s: "\0" not in s and len(s.encode("utf-8", "replace")) <= 255)
SAFE_NAME = NAME.filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s))
LONG_NAME = st.text(alphabet="abcdefghij.-_", min_size=150, max_size=255)


@st.composite
def layouts(draw, names=SAFE_NAME, max_blocks=12):
    shift = draw(st.integers(9, 30))
    ps = 1 << shift
    pairs = draw(
        st.lists(
            st.tuples(names, st.integers(1, min(1 << 22, (1 << 52) >> shift))),
            min_size=1,
            max_size=max_blocks,
            unique_by=lambda t: t[0],
        )
    )
    sid = draw(st.binary(min_size=16, max_size=16))
    created = draw(st.integers(0, (1 << 64) - 1))
    method = draw(st.sampled_from(["raw", "lz4", "zstd", "zlib", "none", "a" * 16]))
    return SaveLayout.plan([(n, k * ps) for n, k in pairs], ps, method=method, save_id=sid, created_ns=created)


def check_invariants(lay: SaveLayout) -> None:
    assert lay.header_size % META_ALIGN == 0 and lay.header_size <= MAX_HEADER_SIZE
    end = lay.header_size
    for b in lay.blocks:
        assert b.page_size == lay.page_size and b.npages * lay.page_size == b.size
        assert b.bitmap_offset % META_ALIGN == 0 and b.digest_offset % META_ALIGN == 0
        assert b.data_offset % DATA_ALIGN == 0
        assert end <= b.bitmap_offset
        assert b.bitmap_offset + b.bitmap_size <= b.digest_offset
        assert b.digest_offset + b.digest_size <= b.data_offset
        # the planner leaves no gap larger than the alignment
        assert b.bitmap_offset - end < META_ALIGN and b.data_offset - (b.digest_offset + b.digest_size) < DATA_ALIGN
        assert b.page_offset(b.npages - 1) + lay.page_size == b.data_end
        end = b.data_end
    assert lay.file_size == end == lay.blocks[-1].data_end


@given(layouts())
def test_plan_encode_decode_round_trip(lay):
    check_invariants(lay)
    header = lay.encode_header()
    assert len(header) == lay.header_size
    got, state = decode_header(header, file_size=lay.file_size, require_complete=False)
    assert got == lay and state == SaveState(False, 0, 0)
    got, state = decode_header(complete(header, lay.total_pages), file_size=lay.file_size)
    assert got == lay and state == SaveState(True, 1, lay.total_pages)
    # extra bytes after the header area (the rest of the file) are ignored
    assert decode_header(header + b"\x01" * 100, require_complete=False)[0] == lay


@given(layouts(names=LONG_NAME, max_blocks=40))
def test_round_trip_long_tables(lay):
    check_invariants(lay)
    header = lay.encode_header()
    table = sum(42 + len(b.name.encode()) for b in lay.blocks)
    if FIXED_SIZE + table <= STATE_OFFSET:
        assert lay.table_offset == TABLE_OFFSET_INLINE and lay.header_size == 4096
    else:
        assert lay.table_offset == TABLE_OFFSET_AFTER_STATE
        assert lay.header_size == -(-(4096 + table) // 4096) * 4096
    assert struct.unpack_from("<I", header, 68)[0] == lay.table_offset
    assert decode_header(header, require_complete=False)[0] == lay


@pytest.mark.parametrize(
    "nblocks, namelen, table_offset, header_size",
    [(11, 255, 72, 4096), (12, 255, 4096, 8192), (81, 1, 72, 4096), (82, 1, 4096, 8192), (1024, 255, 4096, 311296)],
)
def test_table_placement_boundaries(nblocks, namelen, table_offset, header_size):
    if namelen == 1:
        names = [chr(0x21 + i) for i in range(nblocks)]  # one UTF-8 byte each
    else:
        names = [f"{i:05d}".ljust(namelen, "x") for i in range(nblocks)]
    lay = SaveLayout.plan([(n, PS) for n in names], PS, save_id=SID, created_ns=1)
    assert (lay.table_offset, lay.header_size) == (table_offset, header_size)
    check_invariants(lay)
    assert decode_header(lay.encode_header(), require_complete=False)[0] == lay


@given(st.booleans(), st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
def test_state_round_trip(done, ns, present):
    state = SaveState(done, ns, present) if done else SaveState(False)
    rec = encode_state(state)
    assert len(rec) == STATE_SIZE and decode_state(rec) == state


def test_encode_state_refuses_bad_values():
    for bad in (SaveState(False, 5, 0), SaveState(False, 0, 1), SaveState(True, -1, 0), SaveState(True, 0, 1 << 64)):
        with pytest.raises(ConfigError):
            encode_state(bad)


def test_page_offsets():
    lay = two()
    b = lay.block("vga.vram")
    assert b is lay.block(1) and lay.block("pc.ram") is lay.blocks[0]
    assert b.page_offset(0) == b.data_offset and b.page_offset(2) == b.data_offset + 2 * PS
    arr = b.page_offset(np.array([0, 2, 1], dtype=np.uint32))
    assert arr.dtype == np.int64 and arr.tolist() == [b.data_offset + p * PS for p in (0, 2, 1)]
    assert b.page_offset(np.array([], dtype=np.int64)).tolist() == []
    for bad in (3, -1, True, 1.0):
        with pytest.raises(ConfigError):
            b.page_offset(bad)
    for bad_arr in (np.array([3]), np.array([-1]), np.array([0.0])):
        with pytest.raises(ConfigError):
            b.page_offset(bad_arr)
    with pytest.raises(KeyError):
        lay.block("nope")
    with pytest.raises(KeyError):
        lay.block(2)
    with pytest.raises(TypeError):
        lay.block(True)
    assert lay.total_pages == 67 and lay.nblocks == 2


@pytest.mark.parametrize(
    "blocks, page_size, kw",
    [
        ([("a", 4096)], 4095, {}),
        ([("a", 4096)], 256, {}),
        ([("a", 1 << 31)], 1 << 31, {}),
        ([("a", 4096)], True, {}),
        ([], 4096, {}),
        ([("a", 4096), ("a", 4096)], 4096, {}),
        ([("", 4096)], 4096, {}),
        ([("a\0b", 4096)], 4096, {}),
        ([("x" * 256, 4096)], 4096, {}),
        ([("\udc80", 4096)], 4096, {}),
        ([(1, 4096)], 4096, {}),
        ([("a", 4095)], 4096, {}),
        ([("a", 0)], 4096, {}),
        ([("a", True)], 4096, {}),
        ([("a", 1 << 53)], 4096, {}),
        ([("a", 4096)], 4096, {"method": ""}),
        ([("a", 4096)], 4096, {"method": "x" * 17}),
        ([("a", 4096)], 4096, {"method": "zstd\u00e9"}),
        ([("a", 4096)], 4096, {"save_id": b"short"}),
        ([("a", 4096)], 4096, {"created_ns": -1}),
        ([("a", 4096)], 4096, {"created_ns": 1 << 64}),
        ([("a", 4096, 1)], 4096, {}),
        ("a", 4096, {}),
    ],
)
def test_plan_refuses(blocks, page_size, kw):
    with pytest.raises(ConfigError):
        SaveLayout.plan(blocks, page_size, **kw)


def test_plan_accepts_mapping_and_defaults():
    a = SaveLayout.plan({"pc.ram": 1 << 20, "vga": 1 << 16}, 4096)
    b = SaveLayout.plan({"pc.ram": 1 << 20, "vga": 1 << 16}, 4096)
    assert len(a.save_id) == 16 and a.save_id != b.save_id and a.created_ns > 0
    assert [x.name for x in a.blocks] == ["pc.ram", "vga"] and a.method == "raw"


def test_encode_header_refuses_hand_built_layouts():
    good = two()
    b0, b1 = good.blocks
    overlap = SaveBlock(b1.name, b1.size, b1.npages, b0.data_offset, b1.digest_offset, b1.data_offset, PS)
    bad = [
        SaveLayout(**{**good.__dict__, "blocks": (b0, overlap)}),
        SaveLayout(**{**good.__dict__, "header_size": 8192}),
        SaveLayout(**{**good.__dict__, "file_size": good.file_size + 1}),
        SaveLayout(**{**good.__dict__, "page_size": 8192}),
        SaveLayout(**{**good.__dict__, "save_id": b"x"}),
        SaveLayout(**{**good.__dict__, "created_ns": -1}),
        SaveLayout(**{**good.__dict__, "blocks": ()}),
        SaveLayout(**{**good.__dict__, "blocks": (b0, b0)}),
    ]
    for lay in bad:
        with pytest.raises(ConfigError):
            lay.encode_header()


# --------------------------------------------------------------------------- malformed fields


def _set(fmt: str, offset: int, value, crc: bool = True):
    def mutate(buf: bytearray) -> bytearray:
        struct.pack_into(fmt, buf, offset, value)
        return resign(buf) if crc else buf

    return mutate


def _table(i_block: int, what: str) -> int:
    """Offset of field ``what`` of a block entry in the two-block header."""
    lay = two()
    pos = FIXED_SIZE
    for b in lay.blocks[:i_block]:
        pos += 42 + len(b.name.encode())
    n = len(lay.blocks[i_block].name.encode())
    return {
        "name_len": pos,
        "name": pos + 2,
        "size": pos + 2 + n,
        "npages": pos + 10 + n,
        "bitmap_offset": pos + 18 + n,
        "digest_offset": pos + 26 + n,
        "data_offset": pos + 34 + n,
    }[what]


def _zero_magic(buf):
    buf[:8] = bytes(8)
    return buf


def _relocate_table(buf):
    # a small table moved after the state sector: legal placement, wrong by the rule
    lay = two()
    size = sum(42 + len(b.name.encode()) for b in lay.blocks)
    out = bytearray(8192)
    out[:FIXED_SIZE] = buf[:FIXED_SIZE]
    out[4096 : 4096 + size] = buf[FIXED_SIZE : FIXED_SIZE + size]
    out[STATE_OFFSET : STATE_OFFSET + STATE_SIZE] = buf[STATE_OFFSET : STATE_OFFSET + STATE_SIZE]
    struct.pack_into("<II", out, 64, 0, 4096)
    struct.pack_into("<I", out, 12, 8192)
    # keep the offsets past the larger header
    for i in range(2):
        bo = _table(i, "bitmap_offset") - FIXED_SIZE + 4096
        struct.pack_into("<Q", out, bo, struct.unpack_from("<Q", out, bo)[0] + 4096)
        struct.pack_into("<Q", out, bo + 8, struct.unpack_from("<Q", out, bo + 8)[0] + 4096)
    return resign(out)


MUTATIONS = [
    ("magic", lambda b: b.__setitem__(0, ord("X")) or b),
    ("magic", _zero_magic),
    ("version", _set("<H", 8, 2)),
    ("version", _set("<H", 8, 0)),
    ("flags", _set("<H", 10, 1)),
    ("flags", _set("<H", 10, 0x8000)),
    ("header_size", _set("<I", 12, 0)),
    ("header_size", _set("<I", 12, 4095)),
    ("header_size", _set("<I", 12, 5000)),
    ("header_size", _set("<I", 12, 1 << 21)),
    ("header_size", _set("<I", 12, 0xFFFFF000)),
    ("header_size", _set("<I", 12, 8192)),  # longer than the buffer
    ("page_size", _set("<I", 16, 4095)),
    ("page_size", _set("<I", 16, 256)),
    ("page_size", _set("<I", 16, 0)),
    ("page_size", _set("<I", 16, 1 << 31)),
    ("block[0].npages", _set("<I", 16, 8192)),  # a valid page size: 64 pages of 4096 are 32 of 8192
    ("nblocks", _set("<I", 20, 0)),
    ("nblocks", _set("<I", 20, 1025)),
    ("nblocks", _set("<I", 20, 0xFFFFFFFF)),
    ("block[2].name", _set("<I", 20, 3)),  # the third entry reads zeros: name length 0
    ("padding", _set("<I", 20, 1)),  # the second entry is left over
    ("method", _set("16s", 40, b"")),
    ("method", _set("16s", 40, b"r\0w")),
    ("method", _set("16s", 40, b"raw\xff")),
    ("method", _set("16s", 40, b"raw\n")),
    ("header_crc", _set("<I", 64, 0, crc=False)),
    ("header_crc", lambda b: b.__setitem__(30, b[30] ^ 1) or b),  # save_id flipped
    ("header_crc", lambda b: b.__setitem__(2000, 1) or b),  # padding flipped
    ("table_offset", _set("<I", 68, 0)),
    ("table_offset", _set("<I", 68, 100)),
    ("header_size", _set("<I", 68, 4096)),  # the table would run past the 4096-byte header
    ("table_offset", _relocate_table),
    ("block[0].name", _set("<H", _table(0, "name_len"), 0)),
    ("block[0].name", _set("<H", _table(0, "name_len"), 256)),
    ("block[0].name", _set("<H", _table(0, "name_len"), 7)),  # swallows size's first byte, a NUL
    ("block[0].name", _set("2s", _table(0, "name"), b"\xff\xfe")),
    ("block[0].name", _set("1s", _table(0, "name") + 2, b"\0")),
    ("block[1].name", _set("8s", _table(1, "name"), b"vga\0vram")),
    ("block[0].size", _set("<Q", _table(0, "size"), 0)),
    ("block[0].size", _set("<Q", _table(0, "size"), 64 * PS + 1)),
    ("block[0].size", _set("<Q", _table(0, "size"), (1 << 52) + PS)),
    ("block[0].npages", _set("<Q", _table(0, "npages"), 63)),
    ("block[0].npages", _set("<Q", _table(0, "npages"), 0)),
    ("block[1].npages", _set("<Q", _table(1, "npages"), 1 << 63)),
    ("block[0].bitmap_offset", _set("<Q", _table(0, "bitmap_offset"), 0)),
    ("block[0].bitmap_offset", _set("<Q", _table(0, "bitmap_offset"), 4097)),
    ("block[0].digest_offset", _set("<Q", _table(0, "digest_offset"), 4096)),
    ("block[0].digest_offset", _set("<Q", _table(0, "digest_offset"), 8193)),
    ("block[0].data_offset", _set("<Q", _table(0, "data_offset"), 0)),
    ("block[0].data_offset", _set("<Q", _table(0, "data_offset"), DATA_ALIGN + 4096)),
    ("block[0].data_offset", _set("<Q", _table(0, "data_offset"), (1 << 64) - DATA_ALIGN)),
    ("block[1].bitmap_offset", _set("<Q", _table(1, "bitmap_offset"), DATA_ALIGN)),  # inside block 0's data
    ("block[1].data_offset", _set("<Q", _table(1, "data_offset"), DATA_ALIGN)),
    ("padding", lambda b: resign(b.__setitem__(3000, 1) or b)),
    ("padding", lambda b: resign(b.__setitem__(STATE_OFFSET + STATE_SIZE, 1) or b)),
    ("padding", lambda b: resign(b.__setitem__(4095, 0x80) or b)),
    ("state", lambda b: b.__setitem__(STATE_OFFSET, 0) or b),
    ("state", lambda b: b.__setitem__(STATE_OFFSET + 20, 1) or b),  # crc no longer matches
    ("state", lambda b: resign_state(_set("<I", STATE_OFFSET + 8, 2, crc=False)(b))),
    ("state", lambda b: resign_state(_set("<Q", STATE_OFFSET + 20, 68, crc=False)(b))),  # > 67 pages
    ("state", lambda b: resign_state(_set("<I", STATE_OFFSET + 8, 0, crc=False)(b))),  # incomplete, ns 1
    ("state", lambda b: b.__setitem__(slice(STATE_OFFSET, STATE_OFFSET + STATE_SIZE), bytes(STATE_SIZE)) or b),
]


@pytest.mark.parametrize("field, mutate", MUTATIONS, ids=[f"{i}-{m[0]}" for i, m in enumerate(MUTATIONS)])
def test_every_malformed_field_is_named(field, mutate):
    base = complete(two().encode_header(), present=10)
    decode_header(bytes(base))  # the unmutated header is fine
    bad = mutate(bytearray(base))
    assert bytes(bad) != bytes(base)
    assert field_of(bad) == field


def test_duplicate_block_name():
    lay = SaveLayout.plan([("aa", PS), ("bb", PS)], PS)
    buf = bytearray(lay.encode_header())
    pos = buf.index(b"bb")
    buf[pos : pos + 2] = b"aa"
    with pytest.raises(SaveFileError, match="twice") as ei:
        decode_header(bytes(resign(buf)), require_complete=False)
    assert ei.value.field == "block[1].name"


def test_error_carries_path_and_is_a_migration_error():
    bad = bytearray(small().encode_header())
    bad[0] = 0
    with pytest.raises(MigrationError) as ei:
        decode_header(bytes(bad), path="/x/save.img")
    e = ei.value
    assert isinstance(e, SaveFileError) and e.path == "/x/save.img" and e.field == "magic"
    assert "/x/save.img" in str(e) and "magic" in str(e)


def test_all_zero_header_says_interrupted():
    with pytest.raises(SaveFileError, match="interrupted before its header") as ei:
        decode_header(bytes(4096))
    assert ei.value.field == "magic"


def test_incomplete_state_refused():
    lay = small()
    header = lay.encode_header()
    with pytest.raises(SaveFileError, match="never completed.*interrupted.*still running") as ei:
        decode_header(header, file_size=lay.file_size)
    assert ei.value.field == "state"
    assert decode_header(header, file_size=lay.file_size, require_complete=False)[1].complete is False


def test_file_size_checked():
    lay = small()
    header = bytes(complete(lay.encode_header()))
    assert decode_header(header, file_size=lay.file_size)[0] == lay
    for size in (0, 1, 4095, 4096, lay.file_size - 1, lay.file_size + 1, lay.file_size + DATA_ALIGN):
        with pytest.raises(SaveFileError) as ei:
            decode_header(header, file_size=size)
        assert ei.value.field == "file_size", size
    with pytest.raises(SaveFileError, match="truncated"):
        decode_header(header, file_size=lay.file_size - 1)


@pytest.mark.parametrize("build", [small, two])
def test_truncated_buffers(build):
    lay = build()
    header = bytes(complete(lay.encode_header()))
    lengths = sorted({*range(0, 80), *range(80, len(header), 37), len(header) - 1, STATE_OFFSET, STATE_OFFSET + 31})
    for n in lengths:
        with pytest.raises(SaveFileError) as ei:
            decode_header(header[:n])
        assert ei.value.field == "header_size", n
        with pytest.raises(SaveFileError) as ei:
            decode_header(header[:n], file_size=n)
        assert ei.value.field == "file_size", n
    with pytest.raises(SaveFileError) as ei:
        decode_header(b"XY")
    assert ei.value.field == "magic"


@given(st.data())
def test_random_byte_flips(data):
    lay = data.draw(layouts(max_blocks=4))
    header = complete(lay.encode_header(), present=data.draw(st.integers(0, lay.total_pages)))
    good = bytes(header)
    positions = data.draw(st.lists(st.integers(0, len(header) - 1), min_size=1, max_size=8))
    for p in positions:
        header[p] ^= data.draw(st.integers(1, 255))
    if bytes(header) == good:
        return
    try:
        got, _ = decode_header(bytes(header), require_complete=False)
    except SaveFileError:
        return
    assert got == lay  # only a flip that cancels out can pass the checksums


@given(st.data())
def test_random_byte_flips_with_valid_checksums(data):
    """What a buggy writer could produce: every check, not just the CRC, must hold the line."""
    lay = data.draw(layouts(names=st.sampled_from(["a", "pc.ram", "vga.vram", "é"]), max_blocks=3))
    header = complete(lay.encode_header(), present=data.draw(st.integers(0, lay.total_pages)))
    limit = max(FIXED_SIZE + sum(42 + len(b.name.encode()) for b in lay.blocks), 128)
    region = data.draw(st.sampled_from(["table", "anywhere", "state"]))
    for _ in range(data.draw(st.integers(1, 4))):
        if region == "table":
            p = data.draw(st.integers(0, min(limit, len(header)) - 1))
        elif region == "state":
            p = data.draw(st.integers(STATE_OFFSET, STATE_OFFSET + STATE_SIZE - 1))
        else:
            p = data.draw(st.integers(0, len(header) - 1))
        header[p] = data.draw(st.integers(0, 255))
    resign(header)
    resign_state(header)
    try:
        got, state = decode_header(bytes(header), require_complete=False)
    except SaveFileError:
        return
    # what decodes is canonical: re-encoding it gives back exactly these bytes
    again = bytearray(got.encode_header())
    again[STATE_OFFSET : STATE_OFFSET + STATE_SIZE] = encode_state(state)
    assert bytes(again) == bytes(header[: got.header_size])


@given(st.binary(max_size=5000))
def test_garbage_only_raises_save_file_error(blob):
    for data in (blob, b"MPMFSAVE" + blob, b"MPMFSAVE\x01\x00\x00\x00\x00\x10\x00\x00" + blob):
        for file_size in (None, len(data), 1 << 40):
            try:
                decode_header(data, file_size=file_size, require_complete=False)
            except SaveFileError as e:
                assert e.field
            else:  # pragma: no cover - a random blob never carries a valid CRC
                raise AssertionError("garbage decoded")


def test_memoryview_input():
    lay = two()
    header = complete(lay.encode_header())
    assert decode_header(memoryview(header))[0] == lay
    assert decode_header(memoryview(header).cast("I"))[0] == lay


# --------------------------------------------------------------------------- check_matches


def test_check_matches():
    lay = two()
    lay.check_matches([("pc.ram", 64 * PS), ("vga.vram", 3 * PS)], PS)
    lay.check_matches({"pc.ram": 64 * PS, "vga.vram": 3 * PS}, PS)
    cases = [
        (([("pc.ram", 64 * PS), ("vga.vram", 3 * PS)], 8192), "page_size"),
        (([("pc.ram", 64 * PS)], PS), "nblocks"),
        (([("pc.ram", 64 * PS), ("vga.vram", 3 * PS), ("x", PS)], PS), "nblocks"),
        (([("pc.ram", 64 * PS), ("vga", 3 * PS)], PS), "block[1].name"),
        (([("vga.vram", 3 * PS), ("pc.ram", 64 * PS)], PS), "block[0].name"),
        (([("pc.ram", 32 * PS), ("vga.vram", 3 * PS)], PS), "block[0].size"),
        (([("pc.ram", 64 * PS), ("vga.vram", 4 * PS)], PS), "block[1].size"),
        (("pc.ram", PS), "nblocks"),
    ]
    for (blocks, ps), field in cases:
        with pytest.raises(SaveFileError) as ei:
            lay.check_matches(blocks, ps, path="/saves/vm1")
        assert ei.value.field == field and ei.value.path == "/saves/vm1"
        assert "/saves/vm1" in str(ei.value)


# --------------------------------------------------------------------------- bitmaps and digests


@given(st.lists(st.booleans(), max_size=3000))
def test_bitmap_round_trip(flags):
    arr = np.array(flags, dtype=bool)
    packed = pack_bitmap(arr)
    assert len(packed) == (len(flags) + 7) // 8
    back = unpack_bitmap(packed, len(flags))
    assert back.dtype == bool and back.tolist() == flags
    assert pack_bitmap(arr.astype(np.uint8) * 7) == packed  # any non-zero byte is present


def test_bitmap_bit_order():
    present = np.zeros(12, dtype=np.uint8)
    present[[0, 9]] = 1
    assert pack_bitmap(present) == bytes([0x01, 0x02])
    assert unpack_bitmap(bytes([0x80]), 8).tolist() == [False] * 7 + [True]


def test_malformed_bitmaps():
    for data, npages in [(b"", 1), (b"\0\0", 8), (b"\0", 9), (b"\x02", 1), (b"\xff\x10", 12), (b"\x00", 0)]:
        with pytest.raises(SaveFileError) as ei:
            unpack_bitmap(data, npages, path="/p")
        assert ei.value.field == "bitmap" and ei.value.path == "/p"
    with pytest.raises(SaveFileError) as ei:
        unpack_bitmap(b"\x80", 7, field="block[3].bitmap")
    assert ei.value.field == "block[3].bitmap"
    assert unpack_bitmap(b"\xff\x0f", 12).all()
    with pytest.raises(ConfigError):
        pack_bitmap(np.zeros((2, 2)))


@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=200))
def test_digest_round_trip(values):
    arr = np.array(values, dtype=np.uint64)
    data = pack_digests(arr)
    assert len(data) == 8 * len(values)
    assert unpack_digests(data, len(values)).tolist() == values
    with pytest.raises(SaveFileError) as ei:
        unpack_digests(data + b"\0", len(values))
    assert ei.value.field == "digest"


# --------------------------------------------------------------------------- read_layout (the one helper with I/O)


def write_save(path: pathlib.Path, lay: SaveLayout, *, done: bool = True) -> None:
    with open(path, "wb") as f:
        f.truncate(lay.file_size)
        f.write(lay.encode_header())
        f.flush()
        if done:
            os.pwrite(f.fileno(), encode_state(SaveState(True, 123, 0)), STATE_OFFSET)


def test_read_layout(tmp_path):
    lay = two()
    p = tmp_path / "vm.save"
    write_save(p, lay)
    got, state = read_layout(str(p))
    assert got == lay and state == SaveState(True, 123, 0)
    assert read_layout(p)[0] == lay  # a PathLike works too


def test_read_layout_large_header(tmp_path):
    names = [f"{i:04d}".ljust(255, "n") for i in range(1024)]
    lay = SaveLayout.plan([(n, PS) for n in names], PS)
    assert lay.header_size == 311296
    p = tmp_path / "big.save"
    write_save(p, lay)
    assert read_layout(str(p))[0] == lay


def test_read_layout_incomplete(tmp_path):
    lay = small()
    p = tmp_path / "vm.save"
    write_save(p, lay, done=False)
    with pytest.raises(SaveFileError, match="never completed") as ei:
        read_layout(str(p))
    assert ei.value.field == "state" and ei.value.path == str(p)
    assert read_layout(str(p), require_complete=False)[1] == SaveState(False)


def test_read_layout_truncated_at_many_lengths(tmp_path):
    lay = two()
    p = tmp_path / "vm.save"
    for n in (0, 1, 7, 8, 71, 72, 100, 3584, 3600, 4095, 4096, 4097, DATA_ALIGN, lay.file_size - 1):
        write_save(p, lay)
        os.truncate(p, n)
        with pytest.raises(SaveFileError) as ei:
            read_layout(str(p))
        assert ei.value.field == "file_size" and "truncated" in str(ei.value), n
    os.truncate(p, lay.file_size + 1)
    with pytest.raises(SaveFileError) as ei:
        read_layout(str(p))
    assert ei.value.field == "file_size"


def test_read_layout_interrupted_before_header(tmp_path):
    p = tmp_path / "vm.save"
    with open(p, "wb") as f:
        f.truncate(small().file_size)
    with pytest.raises(SaveFileError, match="interrupted") as ei:
        read_layout(str(p))
    assert ei.value.field == "magic"


def test_read_layout_bounds_hostile_header_size(tmp_path):
    header = bytearray(small().encode_header())
    struct.pack_into("<I", header, 12, 0xFFFFF000)
    resign(header)
    p = tmp_path / "evil.save"
    p.write_bytes(bytes(header))
    with pytest.raises(SaveFileError) as ei:
        read_layout(str(p))
    assert ei.value.field == "header_size"


def test_read_layout_os_errors(tmp_path):
    with pytest.raises(SaveFileError) as ei:
        read_layout(str(tmp_path / "missing"))
    assert isinstance(ei.value.__cause__, FileNotFoundError) and ei.value.field is None
    with pytest.raises(SaveFileError):
        read_layout(str(tmp_path))  # a directory
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SaveFileError, match="regular file"):
        read_layout(str(fifo))  # refused at once, not blocked waiting for a writer


def test_format_version_constant():
    assert FORMAT_VERSION == 1 and STATE_OFFSET == 3584 and DATA_ALIGN == 1 << 20 and META_ALIGN == 4096
