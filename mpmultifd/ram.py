"""Guest RAM: named blocks of shared memory, each with a shared per-page dirty map.

A :class:`GuestRAM` is one *meta* segment plus one data mapping per block:

- the meta segment (``/dev/shm/<name>``) starts with a fixed header
  (:data:`MAGIC`, :data:`VERSION`, the length of a JSON layout), then the JSON
  layout (page size; per block its name, size, data segment name or file path,
  and whether the region created it), then every block's dirty map: one
  ``uint8`` per page, each map 64-byte aligned. The layout travels with the
  name, so ``GuestRAM.attach(name)`` needs nothing else;
- each block's bytes live in a segment of their own (``create``) or in an
  existing file that another program made (``from_files``), mapped shared,
  never copied.

Dirty tracking is a byte map, not a bitmap: writers mark a page with a plain
store of 1, so two writers never race on a read-modify-write. A writer stores
the page bytes first and marks the page after; the coordinator snapshots a
copy of the map, clears exactly the entries it saw, and only then reads those
pages (:meth:`GuestRAM.snapshot_dirty`). A page written again after the copy
is either read with its new bytes or still marked for the next snapshot, so no
write is lost.

Attaching never registers a segment with the resource tracker (see
:mod:`mpmultifd._shm`): only the creator's tracker may unlink it.
"""

from __future__ import annotations

import errno
import json
import mmap
import operator
import os
import stat
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpmultifd._shm import SHM_DIR, Segment, unique_name
from mpmultifd.errors import ConfigError, UntrustedSegmentError

__all__ = ["BlockInfo", "GuestRAM", "file_data_extents", "MAGIC", "VERSION", "MIN_PAGE_SIZE", "MAX_PAGE_SIZE"]

MAGIC = b"MPMFDRAM"
"""First 8 bytes of every meta segment."""

VERSION = 1
"""Version of the meta segment format (header, JSON layout, dirty-map placement)."""

MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 30
MAX_NAME_BYTES = 255

# magic, format version, length of the UTF-8 JSON layout that follows
_HEADER = struct.Struct("<8sII")
# dirty maps start on their own cache line, so writers of different blocks never share one
_ALIGN = 64

BlockKey = str | int

# A locked read-modify-write (taking and releasing a lock) is a full barrier on
# x86-64; see GuestRAM.snapshot_dirty for why the clear needs one.
_FENCE = threading.Lock()
_MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14


@dataclass(frozen=True)
class BlockInfo:
    """One block of a :class:`GuestRAM`.

    ``segment`` is the name of the block's data segment in ``/dev/shm``, or the
    absolute path of a foreign file (``from_files``). ``owned`` is True when the
    region created the data segment (so its owner's ``unlink()`` removes it),
    False for foreign files, which are never unlinked.
    """

    index: int
    name: str
    size: int
    page_size: int
    npages: int
    segment: str
    owned: bool

    @property
    def path(self) -> str:
        """The file that backs the block: ``/dev/shm/<segment>``, or the foreign file's path."""
        return self.segment if os.sep in self.segment else os.path.join(SHM_DIR, self.segment)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


def _fmt_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n} bytes ({n / (1 << shift):.1f} {unit})"
    return f"{n} bytes"


def _as_int(value: object, what: str) -> int:
    # operator.index accepts numpy integers but not floats or strings; bool is
    # an int subclass that is never a size or an offset
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{what} must be an integer, got {value!r}") from None


def _check_page_size(page_size: object, what: str = "page_size") -> int:
    ps = _as_int(page_size, what)
    if not (MIN_PAGE_SIZE <= ps <= MAX_PAGE_SIZE) or ps & (ps - 1):
        raise ConfigError(
            f"{what} must be a power of two between {MIN_PAGE_SIZE} and {MAX_PAGE_SIZE} (1 GiB), got {ps}"
        )
    return ps


def _check_block_name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"{what}: block name must be a str, got {type(name).__name__} {name!r}")
    if not name:
        raise ConfigError(f"{what}: block name must not be empty")
    if "\0" in name:
        raise ConfigError(f"{what}: block name {name!r} contains a NUL character")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what}: block name {name!r} is not valid UTF-8 text: {exc}") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise ConfigError(f"{what}: block name is {len(encoded)} UTF-8 bytes, at most {MAX_NAME_BYTES} allowed")
    return name


def _check_block_size(size: object, page_size: int, what: str) -> int:
    n = _as_int(size, f"{what}: size")
    if n <= 0 or n % page_size:
        raise ConfigError(f"{what}: size {n} must be a positive multiple of the page size {page_size}")
    return n


def _check_segment_name(name: object, what: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or "\0" in name
        or name in (".", "..")
        or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
    ):
        raise ConfigError(
            f"{what} must be a non-empty /dev/shm file name without '/' or NUL, "
            f"at most {MAX_NAME_BYTES} bytes, got {name!r}"
        )
    return name


def _pairs(blocks: object, what: str, value: str) -> list[tuple[Any, Any]]:
    """``blocks`` as a list of (name, value) pairs, from a mapping or a sequence of pairs."""
    if isinstance(blocks, Mapping):
        pairs = list(blocks.items())
    elif isinstance(blocks, Sequence) and not isinstance(blocks, (str, bytes, bytearray, memoryview)):
        pairs = []
        for i, item in enumerate(blocks):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ConfigError(f"{what}[{i}] must be a (name, {value}) pair, got {item!r}")
            pairs.append((item[0], item[1]))
    else:
        raise ConfigError(
            f"{what} must be a mapping of block name to {value} or a sequence of (name, {value}) pairs, "
            f"got {type(blocks).__name__}"
        )
    if not pairs:
        raise ConfigError(f"a guest RAM needs at least one block, {what} is empty")
    names: set[str] = set()
    for i, (name, _) in enumerate(pairs):
        _check_block_name(name, f"block {i}")
        if name in names:
            raise ConfigError(f"duplicate block name {name!r} (block {i})")
        names.add(name)
    return pairs


def _layout_json(
    page_size: int, entries: Sequence[tuple[str, int, str, bool]], uids: Sequence[int | None] | None = None
) -> bytes:
    blocks: list[dict[str, Any]] = [{"name": n, "size": s, "segment": seg, "owned": o} for n, s, seg, o in entries]
    for b, uid in zip(blocks, uids or ()):
        if uid is not None:
            b["uid"] = uid  # a foreign file's owner, accepted by from_files(allow_foreign=True)
    doc = {"page_size": page_size, "blocks": blocks}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _map_offsets(layout_len: int, npages: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of the dirty maps in the meta segment, and the segment's size.

    Derived from the layout alone (part of the format :data:`VERSION`), so the
    offsets need not be stored.
    """
    off = _align(_HEADER.size + layout_len)
    offsets = []
    for n in npages:
        offsets.append(off)
        off = _align(off + n)
    return offsets, off


def _check_room(need: int, what: str) -> None:
    """Refuse to over-commit /dev/shm: touching a page of a full tmpfs is a SIGBUS, not an error."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return  # nothing to measure; creating the segment reports its own error
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise ConfigError(
            f"not enough room in {SHM_DIR}: {what} need {_fmt_size(need)}, only {_fmt_size(free)} free "
            f"(a process touching a page of an over-committed tmpfs is killed by SIGBUS); "
            f"use smaller blocks or enlarge {SHM_DIR}"
        )


def _as_byte_array(data: object) -> np.ndarray:
    """The raw bytes of ``data`` (bytes-like or numpy array) as a 1-D uint8 array, copying only if strided."""
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject:
            raise TypeError("cannot write an object array into guest RAM: it holds pointers, not data")
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        mv = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"data must be a bytes-like object or a numpy array, got {type(data).__name__}") from None
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return np.frombuffer(mv.cast("B"), dtype=np.uint8)


def _close_all(segments: Sequence[Segment]) -> None:
    for seg in segments:
        seg.close()


def _discard(segments: Sequence[Segment]) -> None:
    """Undo a half-built region: unlink what we created, unmap everything."""
    for seg in segments:
        if seg.owned:
            try:
                seg.unlink()
            except OSError:
                pass
        seg.close()


class GuestRAM:
    """Named blocks of shared memory with shared per-page dirty maps.

    Build one with :meth:`create` (the owner), :meth:`from_files` (the owner of
    a layout over existing files) or :meth:`attach` (any other process). The
    owner removes the segments with :meth:`unlink`, or by leaving a ``with``
    block. Pickling yields ``GuestRAM.attach(name)``, so a region can be passed
    to a ``multiprocessing.Process`` under any start method.
    """

    name: str
    page_size: int
    blocks: tuple[BlockInfo, ...]
    total_size: int
    total_pages: int

    def __init__(
        self,
        name: str,
        page_size: int,
        blocks: tuple[BlockInfo, ...],
        meta: Segment,
        data: list[Segment],
        map_offsets: Sequence[int],
        owner: bool,
    ) -> None:
        """Wrap mapped segments; use :meth:`create`, :meth:`from_files` or :meth:`attach` instead."""
        self.name = name
        self.page_size = page_size
        self.blocks = blocks
        self.total_size = sum(b.size for b in blocks)
        self.total_pages = sum(b.npages for b in blocks)
        self._owner = owner
        self._allow_foreign = False
        # a forked child inherits this object but must not unlink its parent's region
        self._pid = os.getpid()
        self._shift = page_size.bit_length() - 1
        self._by_name = {b.name: b.index for b in blocks}
        self._meta = meta
        self._data = data
        views: list[np.ndarray] = []
        dirty: list[np.ndarray] = []
        for b, seg, off in zip(blocks, data, map_offsets):
            views.append(np.frombuffer(seg.buf, dtype=np.uint8, count=b.size))
            dirty.append(np.frombuffer(meta.buf, dtype=np.uint8, count=b.npages, offset=off))
        self._views: list[np.ndarray] | None = views
        self._dirty: list[np.ndarray] | None = dirty

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        blocks: Mapping[str, int] | Sequence[tuple[str, int]],
        *,
        page_size: int = 4096,
        name: str | None = None,
    ) -> GuestRAM:
        """Create a new zero-filled region owned by this process.

        ``blocks`` maps block names to sizes in bytes (positive multiples of
        ``page_size``), in block-index order. ``page_size`` is a power of two
        between 512 bytes and 1 GiB. ``name`` names the meta segment (default:
        a fresh ``unique_name("ram")``); other processes attach with it.

        Raises :class:`ConfigError` for invalid arguments or when ``/dev/shm``
        lacks room for the region, ``FileExistsError`` if ``name`` is taken.
        """
        ps = _check_page_size(page_size)
        pairs = _pairs(blocks, "blocks", "size")
        sizes = [_check_block_size(size, ps, f"block {bname!r}") for bname, size in pairs]
        meta_name = _check_segment_name(name, "name") if name is not None else unique_name("ram")
        seg_names = [unique_name("blk") for _ in pairs]
        entries = [(bname, size, seg, True) for (bname, _), size, seg in zip(pairs, sizes, seg_names)]
        layout = _layout_json(ps, entries)
        npages = [size // ps for size in sizes]
        offsets, meta_size = _map_offsets(len(layout), npages)
        listed = ", ".join(f"{bname!r} {size}" for (bname, _), size in zip(pairs, sizes))
        _check_room(
            sum(sizes) + meta_size,
            f"blocks {listed} plus {meta_size} bytes of layout and dirty maps",
        )

        # The meta segment comes first so a taken name fails before any allocation;
        # its magic is written last, so an early attacher sees "not initialised".
        meta = Segment.create(meta_name, meta_size)
        created = [meta]
        try:
            data = []
            for seg_name, size in zip(seg_names, sizes):
                seg = Segment.create(seg_name, size)
                created.append(seg)
                data.append(seg)
            _publish(meta, layout)
            infos = tuple(
                BlockInfo(i, bname, size, ps, n, seg_name, True)
                for i, ((bname, _), size, n, seg_name) in enumerate(zip(pairs, sizes, npages, seg_names))
            )
            return cls(meta_name, ps, infos, meta, data, offsets, owner=True)
        except BaseException:
            _discard(created)
            raise

    @classmethod
    def from_files(
        cls,
        blocks: Mapping[str, str] | Sequence[tuple[str, str]],
        *,
        page_size: int = 4096,
        name: str | None = None,
        allow_foreign: bool = False,
    ) -> GuestRAM:
        """Build a region over existing files, mapped shared without copying.

        ``blocks`` maps block names to file paths (e.g. a ``/dev/shm`` file a
        QEMU ``memory-backend-file`` made). Each block's size is its file's
        size, which must be a positive multiple of ``page_size``. The files are
        never unlinked by this class; the meta segment (layout and dirty maps)
        is created and owned as in :meth:`create`.

        A file owned by another uid than this process's is
        :class:`UntrustedSegmentError` unless ``allow_foreign=True`` (say,
        QEMU runs as its own user); the owner accepted then is recorded in
        the layout, so processes that attach the region accept that owner
        for that file too.
        """
        ps = _check_page_size(page_size)
        pairs = _pairs(blocks, "blocks", "file path")
        meta_name = _check_segment_name(name, "name") if name is not None else None
        data: list[Segment] = []
        try:
            paths: list[str] = []
            uids: list[int | None] = []
            seen: dict[str, str] = {}
            for bname, raw in pairs:
                try:
                    path = os.path.abspath(os.fspath(raw))
                except TypeError:
                    raise ConfigError(f"block {bname!r}: file must be a path, got {raw!r}") from None
                if not isinstance(path, str):
                    raise ConfigError(f"block {bname!r}: file path must be text, got {raw!r}")
                try:
                    st = os.stat(path)
                except OSError as exc:
                    raise ConfigError(f"block {bname!r}: cannot use file {path!r}: {exc.strerror}") from exc
                if not stat.S_ISREG(st.st_mode):
                    raise ConfigError(f"block {bname!r}: {path!r} is not a regular file")
                real = os.path.realpath(path)
                if real in seen:
                    raise ConfigError(f"blocks {seen[real]!r} and {bname!r} are both backed by {real!r}")
                seen[real] = bname
                if st.st_size <= 0 or st.st_size % ps:
                    raise ConfigError(
                        f"block {bname!r}: file {path!r} is {st.st_size} bytes, "
                        f"not a positive multiple of the page size {ps}"
                    )
                try:
                    seg = Segment.attach(path, allow_foreign=allow_foreign)
                except UntrustedSegmentError as exc:
                    raise UntrustedSegmentError(
                        f"block {bname!r}: {exc}", path=exc.path, owner=exc.owner, mode=exc.mode
                    ) from None
                except (OSError, ValueError) as exc:
                    raise ConfigError(f"block {bname!r}: cannot map file {path!r}: {exc}") from exc
                uids.append(st.st_uid if st.st_uid != os.geteuid() else None)
                data.append(seg)
                # the file may have changed size between stat and mmap
                if seg.size % ps:
                    raise ConfigError(
                        f"block {bname!r}: file {path!r} is {seg.size} bytes, "
                        f"not a positive multiple of the page size {ps}"
                    )
                paths.append(path)
        except BaseException:
            _close_all(data)
            raise

        sizes = [seg.size for seg in data]
        entries = [(bname, size, path, False) for (bname, _), size, path in zip(pairs, sizes, paths)]
        layout = _layout_json(ps, entries, uids)
        npages = [size // ps for size in sizes]
        offsets, meta_size = _map_offsets(len(layout), npages)
        try:
            _check_room(meta_size, f"the layout and dirty maps ({len(pairs)} blocks)")
            meta = Segment.create(meta_name if meta_name is not None else unique_name("ram"), meta_size)
        except BaseException:
            _close_all(data)
            raise
        try:
            _publish(meta, layout)
            infos = tuple(
                BlockInfo(i, bname, size, ps, n, path, False)
                for i, ((bname, _), size, n, path) in enumerate(zip(pairs, sizes, npages, paths))
            )
            return cls(meta.name, ps, infos, meta, data, offsets, owner=True)
        except BaseException:
            _discard([meta, *data])
            raise

    @classmethod
    def attach(cls, name: str, *, allow_foreign: bool = False) -> GuestRAM:
        """Map an existing region by its meta segment's name; ``owner`` is False.

        Raises ``FileNotFoundError`` if no such segment exists and
        :class:`ConfigError`, naming the offending field, if it is not a valid
        mpmultifd guest RAM (wrong magic or version, bad layout, missing or
        short data segment).

        The meta and data segments must belong to this process's uid and be
        closed to group and others (as :meth:`create` makes them), and a
        foreign block file must belong to this uid or to the owner that
        ``from_files(allow_foreign=True)`` accepted; otherwise
        :class:`UntrustedSegmentError` names the file, its owner and mode
        (another user could have planted the segment to be written into, or
        can read the guest's memory). ``allow_foreign=True`` skips these
        checks, here and in the processes this region is passed to.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"guest RAM name must be a non-empty str, got {name!r}")
        try:
            meta = Segment.attach(name, allow_foreign=allow_foreign)
        except UntrustedSegmentError as exc:
            raise UntrustedSegmentError(
                f"cannot attach guest RAM {name!r}: {exc}", path=exc.path, owner=exc.owner, mode=exc.mode
            ) from None
        except ValueError as exc:  # empty file or invalid name
            raise ConfigError(f"cannot attach guest RAM {name!r}: {exc}") from exc
        data: list[Segment] = []
        try:
            ps, entries, offsets, uids = _parse_meta(meta, name)
            for i, ((bname, size, seg_name, _owned), uid) in enumerate(zip(entries, uids)):
                where = f"guest RAM {name!r}: field 'blocks[{i}].segment'"
                try:
                    seg = Segment.attach(seg_name, allow_foreign=allow_foreign, owners=() if uid is None else (uid,))
                except UntrustedSegmentError as exc:
                    raise UntrustedSegmentError(
                        f"{where}: block {bname!r}: {exc}", path=exc.path, owner=exc.owner, mode=exc.mode
                    ) from None
                except FileNotFoundError as exc:
                    raise ConfigError(
                        f"{where}: data segment {seg_name!r} of block {bname!r} does not exist (unlinked?)"
                    ) from exc
                except (OSError, ValueError) as exc:
                    raise ConfigError(f"{where}: cannot map {seg_name!r} of block {bname!r}: {exc}") from exc
                data.append(seg)
                if seg.size < size:
                    # touching past the end of a mapped file is a SIGBUS
                    raise ConfigError(
                        f"guest RAM {name!r}: field 'blocks[{i}].size': block {bname!r} is {size} bytes "
                        f"but {seg_name!r} holds only {seg.size}"
                    )
            infos = tuple(
                BlockInfo(i, bname, size, ps, size // ps, seg_name, owned)
                for i, (bname, size, seg_name, owned) in enumerate(entries)
            )
            ram = cls(name, ps, infos, meta, data, offsets, owner=False)
            ram._allow_foreign = allow_foreign
            return ram
        except BaseException:
            _close_all([meta, *data])
            raise

    # ------------------------------------------------------------------ properties

    @property
    def owner(self) -> bool:
        """True in the process that created the region (not in its forked children)."""
        return self._owner and os.getpid() == self._pid

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._views is None

    def block(self, key: BlockKey) -> BlockInfo:
        """The block named ``key`` (str) or with index ``key`` (int); KeyError if none."""
        return self.blocks[self._index(key)]

    def _index(self, key: BlockKey) -> int:
        if isinstance(key, str):
            try:
                return self._by_name[key]
            except KeyError:
                names = ", ".join(repr(b.name) for b in self.blocks)
                raise KeyError(f"guest RAM {self.name!r} has no block named {key!r} (blocks: {names})") from None
        if isinstance(key, bool):
            raise TypeError(f"block key must be a name (str) or an index (int), got {key!r}")
        try:
            i = operator.index(key)
        except TypeError:
            raise TypeError(f"block key must be a name (str) or an index (int), got {type(key).__name__}") from None
        if not 0 <= i < len(self.blocks):
            raise KeyError(
                f"guest RAM {self.name!r} has no block index {i} (valid: 0..{len(self.blocks) - 1})"
            )
        return i

    def _live(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        views, dirty = self._views, self._dirty
        if views is None or dirty is None:
            raise ValueError(f"guest RAM {self.name!r} is closed")
        return views, dirty

    def _check_range(self, i: int, offset: object, length: object, op: str) -> tuple[int, int]:
        info = self.blocks[i]
        off = _as_int(offset, f"{op} offset")
        n = _as_int(length, f"{op} length")
        if off < 0 or n < 0 or off + n > info.size:
            raise ConfigError(
                f"{op} out of bounds in block {info.name!r}: offset {off} length {n} "
                f"does not fit its size {info.size}"
            )
        return off, n

    # ------------------------------------------------------------------ data

    def view(self, block: BlockKey) -> np.ndarray:
        """A writable 1-D uint8 view of the block's bytes (shared, not a copy).

        Writing through it does not mark pages dirty; call :meth:`mark_dirty`
        after writing, or use :meth:`write`.
        """
        i = self._index(block)
        return self._live()[0][i][:]

    def pages(self, block: BlockKey) -> np.ndarray:
        """The block as a writable 2-D ``(npages, page_size)`` uint8 view."""
        i = self._index(block)
        return self._live()[0][i].reshape(self.blocks[i].npages, self.page_size)

    def dirty_map(self, block: BlockKey) -> np.ndarray:
        """The block's shared dirty map: uint8 ``(npages,)``, nonzero = dirty."""
        i = self._index(block)
        return self._live()[1][i][:]

    def write(self, block: BlockKey, offset: int, data: object) -> None:
        """Copy ``data`` (bytes-like or numpy array, as raw bytes) into the block at ``offset``, then mark it dirty.

        Bounds are checked before any byte is written (:class:`ConfigError`,
        naming block, offset, length and size). Bytes are stored before the
        marks, so a coordinator that sees a mark also sees the bytes.
        """
        i = self._index(block)
        src = _as_byte_array(data)
        off, n = self._check_range(i, offset, src.size, "write")
        views, dirty = self._live()
        if n == 0:
            return
        views[i][off : off + n] = src
        dirty[i][off >> self._shift : ((off + n - 1) >> self._shift) + 1] = 1

    def mark_dirty(self, block: BlockKey, offset: int, length: int) -> None:
        """Mark every page that ``[offset, offset + length)`` touches; length 0 marks nothing."""
        i = self._index(block)
        off, n = self._check_range(i, offset, length, "mark_dirty")
        dirty = self._live()[1]
        if n == 0:
            return
        dirty[i][off >> self._shift : ((off + n - 1) >> self._shift) + 1] = 1

    def mark_all_dirty(self) -> None:
        """Mark every page of every block (the first round of a migration sends everything)."""
        for dm in self._live()[1]:
            dm.fill(1)

    def dirty_count(self) -> int:
        """Number of dirty pages over all blocks (a moment's estimate while writers run)."""
        return sum(int(np.count_nonzero(dm)) for dm in self._live()[1])

    def data_extents(self, block: BlockKey) -> list[tuple[int, int]]:
        """Page ranges ``[first, end)`` of the block whose backing file holds data.

        The rest are holes, which read as zeros; reading a hole through the
        mapping would allocate it, so scanners read only these ranges. When
        the file system cannot tell (no ``SEEK_DATA``), the whole block.
        """
        i = self._index(block)
        return file_data_extents(self.blocks[i].path, self.blocks[i].npages, self.page_size)

    def populate(self, block: BlockKey, offset: int = 0, length: int | None = None) -> None:
        """Map the block's pages into this process now, without changing them.

        Uses ``MADV_POPULATE_WRITE`` (Linux 5.14+). On pages already allocated
        (``posix_fallocate``) it only fills this process's page tables, so later
        copies into the mapping take no page fault; on holes it allocates them.
        Raises ``OSError`` where the kernel does not support it.
        """
        i = self._index(block)
        size = self.blocks[i].size
        off, n = self._check_range(i, offset, size - offset if length is None else length, "populate")
        self._live()
        if n:
            start = off - off % mmap.PAGESIZE  # madvise takes system-page-aligned ranges
            self._data[i].buf.madvise(_MADV_POPULATE_WRITE, start, n + off - start)

    def snapshot_dirty(self, block: BlockKey) -> np.ndarray:
        """Take the block's dirty pages: return their indices (int64, ascending) and clear exactly those entries.

        The map is copied first and scanned on the copy, because numpy scans
        of an array that writers change underneath can mislead. Only the
        entries seen in the copy are cleared: a page marked after the copy
        stays marked for the next snapshot. A page re-marked between the copy
        and the clear loses that mark, but its bytes were stored before it, so
        reading the page after this call returns them.
        """
        i = self._index(block)
        dm = self._live()[1][i]
        snap = dm.copy()
        idx = np.flatnonzero(snap)
        if idx.size:
            dm[idx] = 0
            # x86 may let this thread's later page loads pass the clearing
            # stores still in its store buffer; a full barrier forbids that,
            # so a write whose mark the clear overwrote is read afterwards.
            with _FENCE:
                pass
        return idx.astype(np.int64, copy=False)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Drop this process's mappings; idempotent. Views already handed out stay valid."""
        if self._views is None:
            return
        self._views = None
        self._dirty = None
        _close_all(self._data)
        self._meta.close()

    def unlink(self) -> None:
        """Remove the meta segment and the data segments the region created (owner only).

        Foreign files (``from_files``) are never removed. Mappings stay valid
        until closed. Raises ``PermissionError`` in any process but the owner,
        including the owner's forked children.
        """
        if not self.owner:
            raise PermissionError(
                f"guest RAM {self.name!r} is attached, not owned, in this process: only its creator unlinks it"
            )
        # meta first: a late attacher then finds nothing rather than a layout with holes
        self._meta.unlink()
        for seg in self._data:
            if seg.owned:
                seg.unlink()

    def keep(self) -> None:
        """Leave the region in ``/dev/shm`` after this process exits (owner only).

        The resource tracker forgets its segments, and this object stops being
        the owner (leaving a ``with`` block no longer removes it). Another
        process attaches by :attr:`name`; removing the files is then up to it.
        """
        if not self.owner:
            raise PermissionError(f"guest RAM {self.name!r} is attached, not owned, in this process: nothing to keep")
        self._meta.keep()
        for seg in self._data:
            seg.keep()
        self._owner = False

    def __enter__(self) -> GuestRAM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
        if self.owner:
            self.unlink()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # another process attaches by name; the mappings themselves do not travel
        if self._allow_foreign:
            return (_attach_foreign, (self.name,))
        return (type(self).attach, (self.name,))

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        role = "owner" if self.owner else "attached"
        names = ", ".join(repr(b.name) for b in self.blocks)
        return (
            f"<GuestRAM {self.name!r} blocks=[{names}] size={self.total_size} "
            f"page_size={self.page_size} {role} {state}>"
        )


def file_data_extents(path: str, npages: int, page_size: int) -> list[tuple[int, int]]:
    """Page ranges ``[first, end)`` of the first ``npages`` pages of ``path`` that hold data (not holes)."""
    size = npages * page_size
    extents: list[tuple[int, int]] = []
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return [(0, npages)]
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            first, last = start // page_size, (end + page_size - 1) // page_size
            if extents and extents[-1][1] >= first:
                extents[-1] = (extents[-1][0], last)
            else:
                extents.append((first, last))
            pos = end
    except OSError:
        return [(0, npages)]  # no hole information: every page may hold data
    finally:
        os.close(fd)
    return extents


def _attach_foreign(name: str) -> GuestRAM:
    """Unpickling a region that was attached with ``allow_foreign=True``."""
    return GuestRAM.attach(name, allow_foreign=True)


def _publish(meta: Segment, layout: bytes) -> None:
    """Write the header and layout; the magic goes last so readers never see a half-written layout as valid."""
    buf = meta.buf
    end = _HEADER.size + len(layout)
    buf[_HEADER.size : end] = layout
    buf[8 : _HEADER.size] = _HEADER.pack(MAGIC, VERSION, len(layout))[8:]
    buf[0:8] = MAGIC


def _parse_meta(
    meta: Segment, name: str
) -> tuple[int, list[tuple[str, int, str, bool]], list[int], list[int | None]]:
    """Validate a meta segment; return page size, (name, size, segment, owned) per block, map offsets,
    and per block the foreign owner uid ``from_files`` accepted (or None)."""
    where = f"guest RAM {name!r}"
    buf = meta.buf
    if meta.size < _HEADER.size:
        raise ConfigError(
            f"{where}: field 'magic': segment is {meta.size} bytes, too small to be an mpmultifd guest RAM"
        )
    magic, version, length = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ConfigError(
            f"{where}: field 'magic' is {magic!r}, expected {MAGIC!r}: not an mpmultifd guest RAM "
            f"(or its creator has not finished)"
        )
    if version != VERSION:
        raise ConfigError(f"{where}: field 'version' is {version}, this mpmultifd reads version {VERSION}")
    if length == 0 or _HEADER.size + length > meta.size:
        raise ConfigError(
            f"{where}: field 'layout_length' is {length}, segment has {meta.size - _HEADER.size} bytes after the header"
        )
    raw = bytes(buf[_HEADER.size : _HEADER.size + length])
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{where}: field 'layout' is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: field 'layout' must be a JSON object, got {type(doc).__name__}")
    ps = _check_page_size(doc.get("page_size"), f"{where}: field 'page_size'")
    blocks = doc.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise ConfigError(f"{where}: field 'blocks' must be a non-empty list, got {blocks!r}")
    entries: list[tuple[str, int, str, bool]] = []
    uids: list[int | None] = []
    seen: set[str] = set()
    for i, b in enumerate(blocks):
        field = f"{where}: field 'blocks[{i}]"
        if not isinstance(b, dict):
            raise ConfigError(f"{field}' must be a JSON object, got {b!r}")
        bname = _check_block_name(b.get("name"), f"{field}.name'")
        if bname in seen:
            raise ConfigError(f"{field}.name': duplicate block name {bname!r}")
        seen.add(bname)
        size = _check_block_size(b.get("size"), ps, f"{field}.size'")
        owned = b.get("owned")
        if not isinstance(owned, bool):
            raise ConfigError(f"{field}.owned' must be true or false, got {owned!r}")
        seg = b.get("segment")
        if owned:
            seg = _check_segment_name(seg, f"{field}.segment'")
        elif not isinstance(seg, str) or not os.path.isabs(seg) or "\0" in seg:
            raise ConfigError(f"{field}.segment' must be an absolute file path for a foreign block, got {seg!r}")
        uid = b.get("uid")
        if uid is not None and (owned or not isinstance(uid, int) or isinstance(uid, bool) or uid < 0):
            raise ConfigError(f"{field}.uid' must be a uid of a foreign block's file, got {uid!r}")
        entries.append((bname, size, seg, owned))
        uids.append(uid)
    offsets, need = _map_offsets(length, [size // ps for _, size, _, _ in entries])
    if need > meta.size:
        raise ConfigError(
            f"{where}: field 'blocks': the dirty maps need a {need}-byte segment, this one has {meta.size}"
        )
    return ps, entries, offsets, uids
