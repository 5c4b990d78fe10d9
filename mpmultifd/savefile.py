"""The save file format: a pure codec for the header of a region saved to a file.

A save file holds every page of a :class:`~mpmultifd.ram.GuestRAM` at a fixed
offset (like QEMU's ``mapped-ram``), so channel workers write pages in parallel
with ``os.pwritev`` and never coordinate on placement; zero pages are never
written and stay holes of a sparse file. ``docs/savefile.md`` is the
specification, with a byte-level test vector that the tests check.

Nothing here writes a file or starts a worker. :meth:`SaveLayout.plan` computes
where everything goes, :meth:`SaveLayout.encode_header` and
:func:`encode_state` produce the bytes a saver writes, :func:`decode_header`
validates what a restorer read, and :func:`read_layout` is the one helper that
touches the file system (it only reads the header). Every field read from a
file is checked before use, and a violation raises :class:`SaveFileError`
whose ``field`` names what was wrong; hostile bytes never raise anything else
and never make the decoder allocate more than :data:`MAX_HEADER_SIZE` bytes.

The file, version 1 (little-endian):

- a header area of ``header_size`` bytes (a multiple of 4096) at offset 0: the
  72-byte fixed part, the block table (at offset 72 when it ends at or before
  :data:`STATE_OFFSET`, otherwise at 4096), and the 32-byte state record at
  :data:`STATE_OFFSET`, alone in its 512-byte sector so that flipping it to
  COMPLETE is one atomic sector write;
- for each block in order: its presence bitmap (4096-aligned), its per-page
  fingerprints (4096-aligned), and its data region (1 MiB-aligned, page ``i``
  at ``data_offset + i * page_size``).
"""

from __future__ import annotations

import operator
import os
import secrets
import stat
import struct
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard, overload

import numpy as np

from .errors import ConfigError, SaveFileError
from .ram import MAX_PAGE_SIZE, MIN_PAGE_SIZE
from .wire import MAX_BLOCK_NAME, MAX_BLOCK_SIZE, MAX_BLOCKS

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "STATE_MAGIC",
    "STATE_OFFSET",
    "STATE_SIZE",
    "STATE_INCOMPLETE",
    "STATE_COMPLETE",
    "FIXED_SIZE",
    "TABLE_OFFSET_INLINE",
    "TABLE_OFFSET_AFTER_STATE",
    "DATA_ALIGN",
    "META_ALIGN",
    "MAX_HEADER_SIZE",
    "MAX_METHOD_LEN",
    "SaveBlock",
    "SaveState",
    "SaveLayout",
    "encode_state",
    "decode_state",
    "decode_header",
    "read_layout",
    "pack_bitmap",
    "unpack_bitmap",
    "pack_digests",
    "unpack_digests",
]

FORMAT_VERSION = 1
MAGIC = b"MPMFSAVE"
STATE_MAGIC = b"MPMFSTAT"

META_ALIGN = 4096
"""Alignment of the header area's size and of every bitmap and digest region."""

DATA_ALIGN = 1 << 20
"""Alignment of every data region (so ``O_DIRECT`` works on any device)."""

STATE_OFFSET = 3584
"""Offset of the state record: the last 512-byte sector of the first 4 KiB."""

STATE_INCOMPLETE = 0
STATE_COMPLETE = 1

# magic, version, flags, header_size, page_size, nblocks, save_id, method,
# created_ns, header_crc, table_offset
_FIXED = struct.Struct("<8sHHIII16s16sQII")
FIXED_SIZE = _FIXED.size  # 72
_CRC_OFFSET = 64
_TABLE_OFFSET_FIELD = 68

TABLE_OFFSET_INLINE = FIXED_SIZE
"""Where the block table starts when it ends at or before :data:`STATE_OFFSET`."""

TABLE_OFFSET_AFTER_STATE = 4096
"""Where the block table starts when it does not fit below the state record."""

# magic, state, completed_ns, present_pages, state_crc
_STATE = struct.Struct("<8sIQQI")
STATE_SIZE = _STATE.size  # 32
_STATE_CRC_OFFSET = 28

_NAME_LEN = struct.Struct("<H")
# size, npages, bitmap_offset, digest_offset, data_offset
_ENTRY = struct.Struct("<QQQQQ")
_ENTRY_OVERHEAD = _NAME_LEN.size + _ENTRY.size  # 42 bytes plus the name

MAX_METHOD_LEN = 16
MAX_HEADER_SIZE = 1 << 20
"""Largest header area a decoder accepts (1024 blocks with 255-byte names need 304 KiB)."""

_MAX_U64 = (1 << 64) - 1
_MAX_FILE_SIZE = (1 << 63) - 1  # off_t

assert _CRC_OFFSET == _FIXED.size - 8 and FIXED_SIZE <= STATE_OFFSET
assert STATE_OFFSET % 512 == 0 and STATE_OFFSET + STATE_SIZE <= 4096


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _fail(field_name: str, message: str, path: str | None) -> SaveFileError:
    where = f"{path}: " if path else ""
    return SaveFileError(f"{where}{field_name}: {message}", field=field_name, path=path)


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class SaveBlock:
    """Where one block lives in a save file.

    ``size`` is in bytes (``npages * page_size``). The presence bitmap
    (:attr:`bitmap_size` bytes) starts at ``bitmap_offset``, the per-page
    fingerprints (:attr:`digest_size` bytes) at ``digest_offset``, and page
    ``i``'s bytes at ``data_offset + i * page_size``.
    """

    name: str
    size: int
    npages: int
    bitmap_offset: int
    digest_offset: int
    data_offset: int
    page_size: int

    @property
    def bitmap_size(self) -> int:
        """Bytes of the presence bitmap: one bit per page, rounded up to a byte."""
        return (self.npages + 7) // 8

    @property
    def digest_size(self) -> int:
        """Bytes of the digest region: one little-endian uint64 per page."""
        return 8 * self.npages

    @property
    def data_end(self) -> int:
        """Offset one past the block's last data byte."""
        return self.data_offset + self.size

    @overload
    def page_offset(self, page: int) -> int: ...

    @overload
    def page_offset(self, page: np.ndarray) -> np.ndarray: ...

    def page_offset(self, page: int | np.ndarray) -> int | np.ndarray:
        """File offset of page ``page`` (an index, or an integer array of indices -> int64 array).

        Raises :class:`ConfigError` for an index outside ``0..npages-1``.
        """
        if isinstance(page, np.ndarray):
            if page.dtype.kind not in "iu":
                raise ConfigError(f"block {self.name!r}: page indices must be integers, got {page.dtype}")
            if page.size and (int(page.min()) < 0 or int(page.max()) >= self.npages):
                raise ConfigError(f"block {self.name!r}: page index outside 0..{self.npages - 1}")
            return page.astype(np.int64) * self.page_size + self.data_offset
        if isinstance(page, bool):
            raise ConfigError(f"block {self.name!r}: a page index must be an integer, got {page!r}")
        try:
            i = operator.index(page)
        except TypeError:
            raise ConfigError(f"block {self.name!r}: a page index must be an integer, got {page!r}") from None
        if not 0 <= i < self.npages:
            raise ConfigError(f"block {self.name!r}: page {i} is outside 0..{self.npages - 1}")
        return self.data_offset + i * self.page_size


@dataclass(frozen=True)
class SaveState:
    """The state record: whether the save finished.

    ``complete`` is set by the saver's last write, after every page, bitmap and
    digest reached the disk. ``completed_ns`` is the wall-clock time of that
    write (0 while incomplete) and ``present_pages`` the number of pages whose
    bytes are in the file (set bits over all bitmaps; 0 while incomplete).
    """

    complete: bool
    completed_ns: int = 0
    present_pages: int = 0


INCOMPLETE = SaveState(False, 0, 0)


def _is_int(v: object) -> TypeGuard[int | np.integer[Any]]:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_method(method: object) -> str:
    if (
        not isinstance(method, str)
        or not method
        or not method.isascii()
        or not method.isprintable()
        or len(method) > MAX_METHOD_LEN
    ):
        raise ConfigError(f"method: {method!r} is not 1..{MAX_METHOD_LEN} printable ASCII characters")
    return method


def _block_pairs(blocks: object) -> list[tuple[object, object]]:
    if isinstance(blocks, Mapping):
        return list(blocks.items())
    if isinstance(blocks, Sequence) and not isinstance(blocks, (str, bytes, bytearray, memoryview)):
        out = []
        for i, item in enumerate(blocks):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ConfigError(f"blocks[{i}] must be a (name, size) pair, got {item!r}")
            out.append((item[0], item[1]))
        return out
    raise ConfigError(f"blocks must be a sequence of (name, size) pairs or a mapping, got {type(blocks).__name__}")


def _name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a block name, or None."""
    if not isinstance(name, str):
        return f"{name!r} is not a str"
    if not name or "\0" in name:
        return f"{name!r} is empty or contains NUL"
    try:
        n = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{name!r} is not valid UTF-8 text"
    if n > MAX_BLOCK_NAME:
        return f"{n} UTF-8 bytes, at most {MAX_BLOCK_NAME} allowed"
    return None


def _table_size(names: Sequence[bytes]) -> int:
    return sum(_ENTRY_OVERHEAD + len(n) for n in names)


def _table_placement(table_size: int) -> tuple[int, int]:
    """The rule: (table_offset, header_size) for a block table of ``table_size`` bytes."""
    if TABLE_OFFSET_INLINE + table_size <= STATE_OFFSET:
        return TABLE_OFFSET_INLINE, META_ALIGN
    return TABLE_OFFSET_AFTER_STATE, _align(TABLE_OFFSET_AFTER_STATE + table_size, META_ALIGN)


@dataclass(frozen=True)
class SaveLayout:
    """Where everything lives in a save file; the decoded header minus the state record.

    Build one for a region with :meth:`plan`; get one from a file with
    :func:`decode_header` or :func:`read_layout`. ``file_size`` is the end of
    the last data region: a saver ``ftruncate``\\s the file to it first.
    """

    page_size: int
    blocks: tuple[SaveBlock, ...]
    save_id: bytes
    method: str
    created_ns: int
    header_size: int
    file_size: int

    # ------------------------------------------------------------------ building

    @classmethod
    def plan(
        cls,
        blocks: Sequence[tuple[str, int]] | Mapping[str, int],
        page_size: int,
        *,
        method: str = "raw",
        save_id: bytes | None = None,
        created_ns: int | None = None,
    ) -> SaveLayout:
        """Lay out a save file for ``blocks`` (``(name, size)`` pairs, in order) of ``page_size`` pages.

        ``save_id`` defaults to 16 random bytes and ``created_ns`` to now. The
        rules are the decoder's; a violation raises :class:`ConfigError`.
        """
        if not _is_int(page_size) or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
            raise ConfigError(f"page_size: {page_size!r} is not a power of two in {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}")
        ps = int(page_size)
        pairs = _block_pairs(blocks)
        if not 1 <= len(pairs) <= MAX_BLOCKS:
            raise ConfigError(f"nblocks: {len(pairs)} blocks, expected 1..{MAX_BLOCKS}")
        method = _check_method(method)
        if save_id is None:
            save_id = secrets.token_bytes(16)
        if not isinstance(save_id, (bytes, bytearray)) or len(save_id) != 16:
            raise ConfigError(f"save_id: must be 16 bytes, got {save_id!r}")
        if created_ns is None:
            created_ns = time.time_ns()
        if not _is_int(created_ns) or not 0 <= created_ns <= _MAX_U64:
            raise ConfigError(f"created_ns: {created_ns!r} is not a u64")
        names: list[str] = []
        sizes: list[int] = []
        seen: set[str] = set()
        for i, (name, size) in enumerate(pairs):
            why = _name_problem(name)
            if why is not None:
                raise ConfigError(f"block[{i}].name: {why}")
            assert isinstance(name, str)
            if name in seen:
                raise ConfigError(f"block[{i}].name: {name!r} appears twice")
            seen.add(name)
            if not _is_int(size) or size <= 0 or size % ps or size > MAX_BLOCK_SIZE:
                raise ConfigError(
                    f"block[{i}].size: {size!r} is not a positive multiple of the page size {ps} "
                    f"of at most {MAX_BLOCK_SIZE} bytes"
                )
            names.append(name)
            sizes.append(int(size))
        _, header_size = _table_placement(_table_size([n.encode() for n in names]))
        out: list[SaveBlock] = []
        cursor = header_size
        for name, size in zip(names, sizes):
            npages = size // ps
            bitmap = _align(cursor, META_ALIGN)
            digest = _align(bitmap + (npages + 7) // 8, META_ALIGN)
            data = _align(digest + 8 * npages, DATA_ALIGN)
            out.append(SaveBlock(name, size, npages, bitmap, digest, data, ps))
            cursor = data + size
        if cursor > _MAX_FILE_SIZE:
            raise ConfigError(f"file_size: {cursor} bytes does not fit an off_t")
        return cls(ps, tuple(out), bytes(save_id), method, int(created_ns), header_size, cursor)

    # ------------------------------------------------------------------ queries

    @property
    def nblocks(self) -> int:
        return len(self.blocks)

    @property
    def total_pages(self) -> int:
        """Pages over all blocks."""
        return sum(b.npages for b in self.blocks)

    @property
    def table_offset(self) -> int:
        """Where the block table starts (:data:`TABLE_OFFSET_INLINE` or :data:`TABLE_OFFSET_AFTER_STATE`)."""
        return _table_placement(_table_size([b.name.encode() for b in self.blocks]))[0]

    def block(self, name_or_index: str | int) -> SaveBlock:
        """The block named ``name_or_index`` (str) or at that index (int); KeyError if none."""
        if isinstance(name_or_index, str):
            for b in self.blocks:
                if b.name == name_or_index:
                    return b
            names = ", ".join(repr(b.name) for b in self.blocks)
            raise KeyError(f"the save file has no block named {name_or_index!r} (blocks: {names})")
        if isinstance(name_or_index, bool):
            raise TypeError(f"block key must be a name (str) or an index (int), got {name_or_index!r}")
        try:
            i = operator.index(name_or_index)
        except TypeError:
            raise TypeError(
                f"block key must be a name (str) or an index (int), got {type(name_or_index).__name__}"
            ) from None
        if not 0 <= i < len(self.blocks):
            raise KeyError(f"the save file has no block index {i} (valid: 0..{len(self.blocks) - 1})")
        return self.blocks[i]

    def check_matches(
        self,
        blocks: Sequence[tuple[str, int]] | Mapping[str, int],
        page_size: int,
        *,
        path: str | None = None,
    ) -> None:
        """Raise :class:`SaveFileError` unless a region of ``blocks`` and ``page_size`` has this file's layout.

        ``field`` names the first difference: ``page_size``, ``nblocks``,
        ``block[i].name`` or ``block[i].size``.
        """
        try:
            pairs = _block_pairs(blocks)
        except ConfigError as e:
            raise _fail("nblocks", str(e), path) from None
        if page_size != self.page_size:
            raise _fail(
                "page_size", f"the file holds pages of {self.page_size} bytes, the region's are {page_size!r}", path
            )
        if len(pairs) != len(self.blocks):
            raise _fail("nblocks", f"the file holds {len(self.blocks)} blocks, the region has {len(pairs)}", path)
        for i, ((name, size), b) in enumerate(zip(pairs, self.blocks)):
            if name != b.name:
                raise _fail(f"block[{i}].name", f"the file's block {i} is {b.name!r}, the region's is {name!r}", path)
            if size != b.size:
                raise _fail(
                    f"block[{i}].size",
                    f"block {b.name!r} is {b.size} bytes ({b.npages} pages) in the file, {size!r} in the region",
                    path,
                )

    # ------------------------------------------------------------------ encoding

    def encode_header(self) -> bytes:
        """The header area: exactly ``header_size`` bytes, with an INCOMPLETE state record.

        Raises :class:`ConfigError` if the layout (built by hand rather than by
        :meth:`plan` or a decoder) breaks a rule of the format.
        """
        try:
            names = [b.name.encode("utf-8") for b in self.blocks]
            table_offset, header_size = _table_placement(_table_size(names))
            if not 1 <= len(self.blocks) <= MAX_BLOCKS:
                raise ConfigError(f"nblocks: {len(self.blocks)} blocks, expected 1..{MAX_BLOCKS}")
            if header_size != self.header_size:
                raise ConfigError(f"header_size: {self.header_size} for a table that needs {header_size}")
            method = _check_method(self.method).encode("ascii")
            buf = bytearray(header_size)
            _FIXED.pack_into(
                buf,
                0,
                MAGIC,
                FORMAT_VERSION,
                0,
                header_size,
                self.page_size,
                len(self.blocks),
                self.save_id,
                method,
                self.created_ns,
                0,
                table_offset,
            )
            pos = table_offset
            for b, name in zip(self.blocks, names):
                _NAME_LEN.pack_into(buf, pos, len(name))
                buf[pos + 2 : pos + 2 + len(name)] = name
                pos += 2 + len(name)
                _ENTRY.pack_into(buf, pos, b.size, b.npages, b.bitmap_offset, b.digest_offset, b.data_offset)
                pos += _ENTRY.size
        except (struct.error, UnicodeEncodeError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"the layout cannot be encoded: {e}") from None
        buf[STATE_OFFSET : STATE_OFFSET + STATE_SIZE] = encode_state(INCOMPLETE)
        struct.pack_into("<I", buf, _CRC_OFFSET, _header_crc(buf))
        out = bytes(buf)
        # the decoder is the one statement of the rules: what it refuses, we refuse to write
        try:
            back, _ = decode_header(out, require_complete=False)
        except SaveFileError as e:
            raise ConfigError(f"the layout breaks the save file format: {e}") from None
        if back != self:
            raise ConfigError("the layout does not survive encoding (a field is out of range or inconsistent)")
        return out


def _header_crc(header: bytes | bytearray | memoryview) -> int:
    """crc32 of the header area with the header_crc field and the state record read as zeros."""
    crc = zlib.crc32(header[:_CRC_OFFSET])
    crc = zlib.crc32(b"\0\0\0\0", crc)
    crc = zlib.crc32(header[_CRC_OFFSET + 4 : STATE_OFFSET], crc)
    crc = zlib.crc32(bytes(STATE_SIZE), crc)
    return zlib.crc32(header[STATE_OFFSET + STATE_SIZE :], crc)


# --------------------------------------------------------------------------- state record


def encode_state(state: SaveState) -> bytes:
    """The 32-byte state record, to be written at :data:`STATE_OFFSET` with one ``pwrite``.

    An incomplete state carries ``completed_ns`` and ``present_pages`` of 0.
    """
    if not isinstance(state.complete, bool):
        raise ConfigError(f"state.complete: {state.complete!r} is not a bool")
    for name in ("completed_ns", "present_pages"):
        v = getattr(state, name)
        if not _is_int(v) or not 0 <= v <= _MAX_U64:
            raise ConfigError(f"state.{name}: {v!r} is not a u64")
        if not state.complete and v:
            raise ConfigError(f"state.{name}: must be 0 while the save is incomplete")
    rec = bytearray(
        _STATE.pack(
            STATE_MAGIC,
            STATE_COMPLETE if state.complete else STATE_INCOMPLETE,
            int(state.completed_ns),
            int(state.present_pages),
            0,
        )
    )
    struct.pack_into("<I", rec, _STATE_CRC_OFFSET, zlib.crc32(rec))
    return bytes(rec)


def decode_state(data: bytes | bytearray | memoryview, *, path: str | None = None) -> SaveState:
    """Decode and check a 32-byte state record; every problem is field ``state``."""
    if len(data) != STATE_SIZE:
        raise _fail("state", f"the state record is {STATE_SIZE} bytes, got {len(data)}", path)
    magic, value, completed_ns, present, crc = _STATE.unpack(data)
    if magic != STATE_MAGIC:
        raise _fail("state", f"no state record at offset {STATE_OFFSET} (magic {bytes(magic)!r})", path)
    rec = bytearray(data)
    rec[_STATE_CRC_OFFSET:] = b"\0\0\0\0"
    if zlib.crc32(rec) != crc:
        raise _fail("state", "the state record's crc does not match (torn or corrupted write)", path)
    if value not in (STATE_INCOMPLETE, STATE_COMPLETE):
        raise _fail("state", f"unknown state {value} (0 incomplete, 1 complete)", path)
    if value == STATE_INCOMPLETE and (completed_ns or present):
        raise _fail("state", "an incomplete state must carry completed_ns and present_pages of 0", path)
    return SaveState(value == STATE_COMPLETE, completed_ns, present)


# --------------------------------------------------------------------------- decoding


def _too_short(have: int, need: int, file_size: int | None, path: str | None) -> SaveFileError:
    if file_size is not None and file_size < need:
        return _fail("file_size", f"the file is truncated: {file_size} bytes, the header alone needs {need}", path)
    return _fail("header_size", f"{have} bytes of header, at least {need} needed", path)


def decode_header(
    data: bytes | bytearray | memoryview,
    *,
    file_size: int | None = None,
    path: str | None = None,
    require_complete: bool = True,
) -> tuple[SaveLayout, SaveState]:
    """Decode and validate a save file's header area (extra bytes past ``header_size`` are ignored).

    ``file_size``, when given, is the size of the file the bytes came from; it
    must equal the layout's ``file_size``. With ``require_complete`` an
    INCOMPLETE state record is refused (field ``state``). Every violation
    raises :class:`SaveFileError` naming the field.
    """
    if isinstance(data, memoryview):
        data = data.cast("B") if data.format != "B" else data
    n = len(data)
    # ---- what the file is and how much header it has
    if n < len(MAGIC) and MAGIC.startswith(bytes(data)):
        raise _too_short(n, FIXED_SIZE, file_size, path)
    magic = bytes(data[: len(MAGIC)])
    if magic != MAGIC:
        if magic == bytes(len(MAGIC)):
            raise _fail(
                "magic",
                "the file starts with zeros: the save was interrupted before its header was written",
                path,
            )
        raise _fail("magic", f"{magic!r} is not the save file magic {MAGIC!r}", path)
    if n < FIXED_SIZE:
        raise _too_short(n, FIXED_SIZE, file_size, path)
    (_, version, flags, header_size, page_size, nblocks, save_id, method_raw, created_ns, crc, table_offset) = (
        _FIXED.unpack_from(data, 0)
    )
    if version != FORMAT_VERSION:
        raise _fail(
            "version", f"save file version {version} is not supported (this reader knows {FORMAT_VERSION})", path
        )
    if header_size % META_ALIGN or not META_ALIGN <= header_size <= MAX_HEADER_SIZE:
        raise _fail(
            "header_size", f"{header_size} is not a multiple of {META_ALIGN} in {META_ALIGN}..{MAX_HEADER_SIZE}", path
        )
    if n < header_size:
        raise _too_short(n, header_size, file_size, path)
    header = bytes(data[:header_size])  # at most MAX_HEADER_SIZE
    # ---- integrity: past this point a wrong field is a writer's bug, not a bit flip
    if _header_crc(header) != crc:
        raise _fail("header_crc", "the header's crc32 does not match: the header is corrupted", path)
    if flags:
        raise _fail("flags", f"unknown flags 0x{flags:04x} (none are defined)", path)
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise _fail("page_size", f"{page_size} is not a power of two in {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}", path)
    if not 1 <= nblocks <= MAX_BLOCKS:
        raise _fail("nblocks", f"{nblocks} blocks, expected 1..{MAX_BLOCKS}", path)
    method_b = bytes(method_raw).rstrip(b"\0")
    try:
        method = _check_method(method_b.decode("ascii"))
    except (UnicodeDecodeError, ConfigError):
        raise _fail("method", f"{bytes(method_raw)!r} is not a NUL-padded ASCII method name", path) from None
    if table_offset not in (TABLE_OFFSET_INLINE, TABLE_OFFSET_AFTER_STATE):
        raise _fail(
            "table_offset", f"{table_offset} is neither {TABLE_OFFSET_INLINE} nor {TABLE_OFFSET_AFTER_STATE}", path
        )
    # ---- the block table
    if table_offset == TABLE_OFFSET_INLINE:
        limit, limit_field = STATE_OFFSET, "table_offset"
    else:
        limit, limit_field = header_size, "header_size"
    pos = table_offset
    blocks: list[SaveBlock] = []
    names: set[str] = set()
    cursor = header_size
    for i in range(nblocks):
        f = f"block[{i}]"
        if pos + _NAME_LEN.size > limit:
            raise _fail(limit_field, f"the block table runs past offset {limit} at block {i}", path)
        (name_len,) = _NAME_LEN.unpack_from(header, pos)
        if not 1 <= name_len <= MAX_BLOCK_NAME:
            raise _fail(f"{f}.name", f"a name of {name_len} bytes, expected 1..{MAX_BLOCK_NAME}", path)
        if pos + _ENTRY_OVERHEAD + name_len > limit:
            raise _fail(limit_field, f"the block table runs past offset {limit} at block {i}", path)
        raw_name = bytes(header[pos + 2 : pos + 2 + name_len])
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(f"{f}.name", f"{raw_name!r} is not UTF-8", path) from None
        if "\0" in name:
            raise _fail(f"{f}.name", f"{name!r} contains NUL", path)
        if name in names:
            raise _fail(f"{f}.name", f"{name!r} appears twice", path)
        names.add(name)
        pos += 2 + name_len
        size, npages, bitmap_offset, digest_offset, data_offset = _ENTRY.unpack_from(header, pos)
        pos += _ENTRY.size
        if size == 0 or size % page_size or size > MAX_BLOCK_SIZE:
            raise _fail(
                f"{f}.size",
                f"{size} is not a positive multiple of the page size {page_size} of at most {MAX_BLOCK_SIZE}",
                path,
            )
        if npages != size // page_size:
            raise _fail(f"{f}.npages", f"{npages} pages, but {size} bytes hold {size // page_size}", path)
        if bitmap_offset % META_ALIGN or bitmap_offset < cursor:
            raise _fail(
                f"{f}.bitmap_offset",
                f"{bitmap_offset} is not a multiple of {META_ALIGN} at or after offset {cursor}",
                path,
            )
        end = bitmap_offset + (npages + 7) // 8
        if digest_offset % META_ALIGN or digest_offset < end:
            raise _fail(
                f"{f}.digest_offset",
                f"{digest_offset} is not a multiple of {META_ALIGN} at or after the bitmap's end {end}",
                path,
            )
        end = digest_offset + 8 * npages
        if data_offset % DATA_ALIGN or data_offset < end:
            raise _fail(
                f"{f}.data_offset",
                f"{data_offset} is not a multiple of {DATA_ALIGN} at or after the digests' end {end}",
                path,
            )
        cursor = data_offset + size
        if cursor > _MAX_FILE_SIZE:
            raise _fail(f"{f}.data_offset", f"the data region ends at {cursor}, past the largest file offset", path)
        blocks.append(SaveBlock(name, size, npages, bitmap_offset, digest_offset, data_offset, page_size))
    # ---- the table's placement, and nothing else in the header
    table_size = pos - table_offset
    want_offset, want_size = _table_placement(table_size)
    if table_offset != want_offset:
        raise _fail(
            "table_offset", f"a block table of {table_size} bytes belongs at {want_offset}, not {table_offset}", path
        )
    if header_size != want_size:
        raise _fail("header_size", f"{header_size}, but a block table of {table_size} bytes needs {want_size}", path)
    zero_runs = [(FIXED_SIZE, STATE_OFFSET), (STATE_OFFSET + STATE_SIZE, header_size)]
    zero_runs = [(a, b) for lo, hi in zero_runs for a, b in _minus((lo, hi), (table_offset, pos))]
    for lo, hi in zero_runs:
        if header[lo:hi] != bytes(hi - lo):
            raise _fail("padding", f"header bytes {lo}..{hi} outside every field must be zero", path)
    layout = SaveLayout(page_size, tuple(blocks), bytes(save_id), method, created_ns, header_size, cursor)
    # ---- the state record and the file
    state = decode_state(header[STATE_OFFSET : STATE_OFFSET + STATE_SIZE], path=path)
    if state.present_pages > layout.total_pages:
        raise _fail(
            "state", f"{state.present_pages} present pages, but the file has only {layout.total_pages}", path
        )
    if file_size is not None and file_size != layout.file_size:
        if file_size < layout.file_size:
            raise _fail(
                "file_size",
                f"the file is truncated: {file_size} bytes, its layout needs {layout.file_size}",
                path,
            )
        raise _fail(
            "file_size", f"the file is {file_size} bytes, longer than its layout's {layout.file_size}", path
        )
    if require_complete and not state.complete:
        raise _fail(
            "state",
            "the save never completed: it was interrupted, or is still running (state INCOMPLETE)",
            path,
        )
    return layout, state


def _minus(span: tuple[int, int], cut: tuple[int, int]) -> list[tuple[int, int]]:
    """``span`` without ``cut``, as up to two half-open ranges."""
    lo, hi = span
    out = []
    if cut[0] > lo:
        out.append((lo, min(hi, cut[0])))
    if cut[1] < hi:
        out.append((max(lo, cut[1]), hi))
    return [(a, b) for a, b in out if a < b]


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size > 0:
        b = os.pread(fd, size, offset)
        if not b:
            break
        chunks.append(b)
        size -= len(b)
        offset += len(b)
    return b"".join(chunks)


def read_layout(path: str | os.PathLike[str], *, require_complete: bool = True) -> tuple[SaveLayout, SaveState]:
    """Read and validate a save file's header: the one function here that opens a file.

    Reads at most :data:`MAX_HEADER_SIZE` bytes, whatever the file claims.
    Operating-system errors (no such file, permission denied, not a regular
    file) are raised as :class:`SaveFileError` with ``field=None`` and the
    ``OSError`` chained.
    """
    path = os.fsdecode(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise SaveFileError(f"{path}: cannot open the save file: {e.strerror}", path=path) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SaveFileError(f"{path}: not a regular file", path=path)
        first = _pread_all(fd, min(META_ALIGN, st.st_size), 0)
        data = first
        if len(first) >= FIXED_SIZE and first[: len(MAGIC)] == MAGIC:
            (header_size,) = struct.unpack_from("<I", first, 12)
            want = min(header_size, MAX_HEADER_SIZE, st.st_size)
            if want > len(first):
                data = first + _pread_all(fd, want - len(first), len(first))
    except OSError as e:
        raise SaveFileError(f"{path}: cannot read the save file: {e.strerror}", path=path) from e
    finally:
        os.close(fd)
    return decode_header(data, file_size=st.st_size, path=path, require_complete=require_complete)


# --------------------------------------------------------------------------- bitmaps and digests


def pack_bitmap(present: np.ndarray) -> bytes:
    """One flag per page (bool or uint8, non-zero = present) -> the bitmap's bytes.

    Bit ``i`` (bit ``i % 8`` of byte ``i // 8``, little bit order) is page ``i``.
    """
    arr = np.asarray(present)
    if arr.ndim != 1:
        raise ConfigError(f"present must be one flag per page (1-D), got shape {arr.shape}")
    return np.packbits(arr.astype(bool, copy=False), bitorder="little").tobytes()


def unpack_bitmap(
    data: bytes | bytearray | memoryview, npages: int, *, path: str | None = None, field: str = "bitmap"
) -> np.ndarray:
    """A bitmap's bytes -> one bool per page.

    Refuses (field ``bitmap``, or ``field``) a length other than
    ``ceil(npages / 8)`` and set bits past ``npages``.
    """
    want = (npages + 7) // 8
    if len(data) != want:
        raise _fail(field, f"{len(data)} bytes for {npages} pages, expected {want}", path)
    raw = np.frombuffer(data, dtype=np.uint8)
    tail = npages % 8
    if tail and raw[-1] >> tail:
        raise _fail(field, f"bits set past the last page ({npages} pages)", path)
    return np.unpackbits(raw, count=npages, bitorder="little").astype(bool)


def pack_digests(fingerprints: np.ndarray) -> bytes:
    """Per-page fingerprints (uint64, see :mod:`mpmultifd.digest`) -> the digest region's bytes."""
    arr = np.asarray(fingerprints)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ConfigError(f"fingerprints must be a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
    return arr.astype("<u8").tobytes()


def unpack_digests(
    data: bytes | bytearray | memoryview, npages: int, *, path: str | None = None, field: str = "digest"
) -> np.ndarray:
    """The digest region's bytes -> uint64 per page; refuses a length other than ``8 * npages``."""
    if len(data) != 8 * npages:
        raise _fail(field, f"{len(data)} bytes for {npages} pages, expected {8 * npages}", path)
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)

