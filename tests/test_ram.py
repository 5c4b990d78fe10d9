"""GuestRAM: layout, views, dirty tracking, attachment across processes, validation."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmultifd._shm import SHM_DIR, unique_name
from mpmultifd.errors import ConfigError
from mpmultifd.ram import MAGIC, VERSION, BlockInfo, GuestRAM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PS = 4096
CHILD_TIMEOUT = 60.0


# ---------------------------------------------------------------------- helpers


def _exists(name_or_path: str) -> bool:
    return os.path.exists(name_or_path if os.sep in name_or_path else os.path.join(SHM_DIR, name_or_path))


def _segments(ram: GuestRAM) -> list[str]:
    """Every /dev/shm name the region created."""
    return [ram.name] + [b.segment for b in ram.blocks if b.owned]


def _run_child(ctx: multiprocessing.context.BaseContext, target, *args) -> None:
    proc = ctx.Process(target=target, args=args)
    proc.start()
    proc.join(CHILD_TIMEOUT)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"child {target.__name__} did not finish within {CHILD_TIMEOUT} s")
    assert proc.exitcode == 0, f"child {target.__name__} failed (exit code {proc.exitcode}); see captured stderr"


def _pattern(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture
def shm_file():
    """Factory for a foreign file in /dev/shm (made here, not by GuestRAM), removed at the end."""
    made: list[str] = []

    def make(size: int, content: bytes = b"") -> str:
        path = os.path.join(SHM_DIR, unique_name("ext"))
        assert os.path.basename(path).startswith(os.environ["MPMULTIFD_SHM_PREFIX"])
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        made.append(path)
        try:
            os.ftruncate(fd, size)
            if content:
                os.pwrite(fd, content, 0)
        finally:
            os.close(fd)
        return path

    yield make
    for path in made:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _forge_meta(path: str, *, magic: bytes = MAGIC, version: int = VERSION, layout: object = None,
                raw_layout: bytes | None = None, length: int | None = None, tail: int = 4096) -> None:
    """Write a meta segment by hand, to feed attach() broken headers and layouts."""
    body = raw_layout if raw_layout is not None else json.dumps(layout).encode()
    header = struct.pack("<8sII", magic, version, len(body) if length is None else length)
    with open(path, "wb") as f:
        f.write(header + body + bytes(tail))


# ---------------------------------------------------------------------- round trips


def test_create_attach_view_write_round_trip():
    with GuestRAM.create({"pc.ram": 16 * PS}) as ram:
        assert ram.owner and not ram.closed
        assert ram.page_size == PS
        assert ram.total_size == 16 * PS and ram.total_pages == 16
        info = ram.block("pc.ram")
        assert info == ram.block(0) == ram.blocks[0]
        assert isinstance(info, BlockInfo)
        assert (info.index, info.name, info.size, info.page_size, info.npages, info.owned) == (
            0, "pc.ram", 16 * PS, PS, 16, True)
        assert all(_exists(n) for n in _segments(ram))
        assert ram.name.startswith(os.environ["MPMULTIFD_SHM_PREFIX"])
        assert info.segment.startswith(os.environ["MPMULTIFD_SHM_PREFIX"])

        view = ram.view("pc.ram")
        assert view.dtype == np.uint8 and view.shape == (16 * PS,) and view.flags.writeable
        assert not view.any() and ram.dirty_count() == 0

        data = _pattern(PS + 10, 1)
        ram.write("pc.ram", 3 * PS - 5, data)  # spans pages 2, 3 and 4
        assert view[3 * PS - 5 : 4 * PS + 5].tobytes() == data
        assert np.flatnonzero(ram.dirty_map(0)).tolist() == [2, 3, 4]
        assert ram.pages(0).shape == (16, PS)
        assert ram.pages(0)[3].tobytes() == data[5 : 5 + PS]

        with GuestRAM.attach(ram.name) as other:
            assert not other.owner
            assert other.blocks == ram.blocks and other.page_size == PS
            assert other.view(0)[3 * PS - 5 : 4 * PS + 5].tobytes() == data
            assert np.flatnonzero(other.dirty_map("pc.ram")).tolist() == [2, 3, 4]
            other.write(0, 15 * PS, b"\xff")
            other.mark_dirty(0, 7 * PS, 1)
        assert view[15 * PS] == 0xFF
        assert np.flatnonzero(ram.dirty_map(0)).tolist() == [2, 3, 4, 7, 15]
        assert ram.dirty_count() == 5
        ram.mark_all_dirty()
        assert ram.dirty_count() == 16 and ram.dirty_map(0).all()
        names = _segments(ram)
    assert ram.closed
    assert not any(_exists(n) for n in names)


def test_two_blocks_are_independent():
    with GuestRAM.create([("pc.ram", 8 * 512), ("vga.vram", 3 * 512)], page_size=512) as ram:
        assert [b.name for b in ram.blocks] == ["pc.ram", "vga.vram"]
        assert [b.index for b in ram.blocks] == [0, 1]
        assert [b.npages for b in ram.blocks] == [8, 3]
        assert ram.total_pages == 11 and ram.total_size == 11 * 512
        assert len({b.segment for b in ram.blocks}) == 2
        for i in range(2):
            # each dirty map starts on its own cache line
            assert ram.dirty_map(i).ctypes.data % 64 == 0

        ram.write("vga.vram", 512, b"\x01" * 512)
        ram.write(0, 0, np.arange(4, dtype=np.uint32))  # numpy data is written as raw bytes
        assert ram.view(0)[:16].tobytes() == np.arange(4, dtype=np.uint32).tobytes()
        assert ram.view("vga.vram")[512:1024].all() and not ram.view(1)[:512].any()
        assert ram.dirty_map(0).tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
        assert ram.dirty_map(1).tolist() == [0, 1, 0]
        assert ram.snapshot_dirty(1).tolist() == [1]
        assert ram.dirty_map(0).tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # other block untouched

        with GuestRAM.attach(ram.name) as other:
            assert other.block("vga.vram") == ram.block(1)
            assert other.view(1)[512:1024].all()


def test_block_lookup_errors():
    with GuestRAM.create({"a": PS, "b": PS}) as ram:
        with pytest.raises(KeyError, match="no block named 'c'"):
            ram.block("c")
        for bad in (2, -1):
            with pytest.raises(KeyError, match=f"no block index {bad}"):
                ram.view(bad)
        with pytest.raises(TypeError):
            ram.block(1.0)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            ram.block(True)  # type: ignore[arg-type]
        assert ram.block(np.int64(1)).name == "b"


def test_write_accepts_buffers_and_copies():
    with GuestRAM.create({"a": 2 * PS}) as ram:
        src = bytearray(b"abcdef")
        ram.write("a", 0, src)
        src[0:1] = b"Z"  # the RAM holds a copy, not a reference
        assert ram.view(0)[:6].tobytes() == b"abcdef"
        strided = np.arange(12, dtype=np.uint16).reshape(3, 4)[:, ::2]
        ram.write("a", 100, strided)
        assert ram.view(0)[100:112].tobytes() == strided.tobytes()
        ram.write("a", 200, memoryview(strided))
        assert ram.view(0)[200:212].tobytes() == strided.tobytes()
        ram.write("a", PS, b"")  # empty write marks nothing
        assert ram.dirty_map(0).tolist() == [1, 0]
        with pytest.raises(TypeError):
            ram.write("a", 0, "text")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            ram.write("a", 0, np.array([object()]))


def test_close_keeps_views_and_is_idempotent():
    ram = GuestRAM.create({"a": 2 * PS})
    try:
        view, dm = ram.view(0), ram.dirty_map(0)
        ram.write(0, 10, b"kept")
        ram.close()
        ram.close()
        assert ram.closed and "closed" in repr(ram)
        assert view[10:14].tobytes() == b"kept" and dm[0] == 1  # still mapped
        for call in (lambda: ram.view(0), lambda: ram.write(0, 0, b"x"), lambda: ram.mark_dirty(0, 0, 1),
                     lambda: ram.snapshot_dirty(0), ram.dirty_count, ram.mark_all_dirty):
            with pytest.raises(ValueError, match="closed"):
                call()
        assert ram.block(0).name == "a"  # metadata outlives the mappings
    finally:
        ram.unlink()
        ram.unlink()  # idempotent too
    assert not any(_exists(n) for n in _segments(ram))


def test_non_owner_cannot_unlink():
    with GuestRAM.create({"a": PS}) as ram:
        with GuestRAM.attach(ram.name) as other:
            assert not other.owner and "attached" in repr(other)
            with pytest.raises(PermissionError, match="only its creator"):
                other.unlink()
        # leaving the attacher's with-block closed it without unlinking anything
        assert all(_exists(n) for n in _segments(ram))


def test_explicit_name_and_cleanup_after_failed_create():
    name = unique_name("ram")
    with GuestRAM.create({"a": PS}, name=name) as ram:
        assert ram.name == name and _exists(name)
        prefix = os.environ["MPMULTIFD_SHM_PREFIX"]
        before = {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)}
        with pytest.raises(FileExistsError):
            GuestRAM.create({"a": PS, "b": PS}, name=name)
        # no data segment left behind
        assert {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)} == before
    with pytest.raises(ConfigError, match="name"):
        GuestRAM.create({"a": PS}, name="bad/name")


def test_pickle_in_process_attaches():
    with GuestRAM.create({"a": PS}) as ram:
        copy = pickle.loads(pickle.dumps(ram))
        try:
            assert isinstance(copy, GuestRAM) and copy is not ram
            assert copy.name == ram.name and copy.blocks == ram.blocks and not copy.owner
            copy.write("a", 0, b"via pickle")
            assert ram.view(0)[:10].tobytes() == b"via pickle"
        finally:
            copy.close()


# ---------------------------------------------------------------------- other processes


def _child_attach_and_write(name: str, offset: int, data: bytes) -> None:
    with GuestRAM.attach(name) as ram:
        assert not ram.owner
        ram.write("pc.ram", offset, data)
        ram.write(1, 0, b"second block")


def test_child_attaches_and_writes(start_method: str):
    ctx = multiprocessing.get_context(start_method)
    data = _pattern(PS + 1, 7)
    with GuestRAM.create({"pc.ram": 8 * PS, "rom": PS}) as ram:
        _run_child(ctx, _child_attach_and_write, ram.name, 2 * PS + 100, data)
        assert ram.view(0)[2 * PS + 100 : 3 * PS + 101].tobytes() == data
        assert np.flatnonzero(ram.dirty_map("pc.ram")).tolist() == [2, 3]
        assert ram.view("rom")[:12].tobytes() == b"second block"
        assert ram.dirty_map("rom").tolist() == [1]
        assert all(_exists(n) for n in _segments(ram))  # the child's exit unlinked nothing


def _child_uses_passed_ram(ram: GuestRAM) -> None:
    # under spawn/forkserver this object was unpickled (attach by name); under
    # fork it is the parent's object inherited, which must not act as owner
    assert isinstance(ram, GuestRAM) and not ram.owner
    try:
        ram.unlink()
    except PermissionError:
        pass
    else:
        raise AssertionError("a child unlinked its parent's guest RAM")
    with ram:
        ram.write("a", PS, b"from the child")
    assert ram.closed


def test_guest_ram_as_process_argument(start_method: str):
    ctx = multiprocessing.get_context(start_method)
    with GuestRAM.create({"a": 2 * PS}) as ram:
        _run_child(ctx, _child_uses_passed_ram, ram)
        assert ram.view(0)[PS : PS + 14].tobytes() == b"from the child"
        assert ram.dirty_map(0).tolist() == [0, 1]
        assert all(_exists(n) for n in _segments(ram))


def test_independent_process_neither_unlinks_nor_warns():
    with GuestRAM.create({"pc.ram": 4 * PS}) as ram:
        code = textwrap.dedent(
            f"""
            from mpmultifd.ram import GuestRAM
            with GuestRAM.attach({ram.name!r}) as ram:
                assert not ram.owner
                ram.write("pc.ram", 5000, b"independent")
            other = GuestRAM.attach({ram.name!r})
            other.close()
            print("done")
            """
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=CHILD_TIMEOUT)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "done"
        assert "resource_tracker" not in res.stderr and "leaked" not in res.stderr, res.stderr
        assert all(_exists(n) for n in _segments(ram))
        assert ram.view(0)[5000:5011].tobytes() == b"independent"
        assert ram.dirty_map(0).tolist() == [0, 1, 0, 0]


# ---------------------------------------------------------------------- foreign files


def test_from_files_maps_without_copying_and_never_unlinks(shm_file):
    first = _pattern(3 * PS, 3)
    path_a = shm_file(3 * PS, first)
    path_b = shm_file(PS)
    with GuestRAM.from_files({"pc.ram": path_a, "rom": path_b}) as ram:
        assert ram.owner and _exists(ram.name)
        assert [(b.name, b.size, b.segment, b.owned) for b in ram.blocks] == [
            ("pc.ram", 3 * PS, path_a, False), ("rom", PS, path_b, False)]
        assert ram.view("pc.ram").tobytes() == first  # file -> RAM
        ram.write("pc.ram", PS + 1, b"into the file")
        with open(path_a, "rb") as f:  # RAM -> file
            f.seek(PS + 1)
            assert f.read(13) == b"into the file"
        fd = os.open(path_b, os.O_RDWR)
        try:
            os.pwrite(fd, b"external writer", 100)
        finally:
            os.close(fd)
        assert ram.view("rom")[100:115].tobytes() == b"external writer"
        with GuestRAM.attach(ram.name) as other:
            assert other.blocks == ram.blocks
            assert other.view("pc.ram")[PS + 1 : PS + 14].tobytes() == b"into the file"
            assert other.dirty_map(0).tolist() == [0, 1, 0]
        meta = ram.name
    assert not _exists(meta)  # the meta segment was ours
    assert _exists(path_a) and _exists(path_b)  # the files were not


def test_from_files_validation(shm_file, tmp_path):
    odd = shm_file(PS + 1)
    empty = shm_file(0)
    good = shm_file(PS)
    with pytest.raises(ConfigError, match=f"{odd}.*{PS + 1} bytes.*multiple of the page size"):
        GuestRAM.from_files({"a": odd})
    with pytest.raises(ConfigError, match=f"{empty}.*0 bytes"):
        GuestRAM.from_files({"a": empty})
    with pytest.raises(ConfigError, match="No such file"):
        GuestRAM.from_files({"a": os.path.join(SHM_DIR, unique_name("missing"))})
    with pytest.raises(ConfigError, match="not a regular file"):
        GuestRAM.from_files({"a": str(tmp_path)})
    with pytest.raises(ConfigError, match="both backed by"):
        GuestRAM.from_files({"a": good, "b": good})
    with pytest.raises(ConfigError, match="page size 8192"):
        GuestRAM.from_files({"a": good}, page_size=8192)
    with pytest.raises(ConfigError, match="at least one block"):
        GuestRAM.from_files({})
    assert _exists(good) and _exists(odd)


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "blocks, kwargs, match",
    [
        ({}, {}, "at least one block"),
        ([], {}, "at least one block"),
        ("pc.ram", {}, "mapping of block name"),
        (12, {}, "mapping of block name"),
        ([("a", PS, 1)], {}, r"blocks\[0\] must be a \(name, size\) pair"),
        ({"a": 0}, {}, "size 0 must be a positive multiple"),
        ({"a": -PS}, {}, "positive multiple"),
        ({"a": PS + 1}, {}, f"size {PS + 1} must be a positive multiple of the page size {PS}"),
        ({"a": 4096.0}, {}, "must be an integer"),
        ({"a": True}, {}, "must be an integer"),
        ({"a": "4096"}, {}, "must be an integer"),
        ({"a": PS}, {"page_size": 256}, "power of two between 512"),
        ({"a": PS}, {"page_size": 3000}, "power of two"),
        ({"a": 2 << 30}, {"page_size": 2 << 30}, "power of two"),
        ({"a": PS}, {"page_size": 0}, "power of two"),
        ({"a": PS}, {"page_size": 4096.0}, "page_size must be an integer"),
        ([("a", PS), ("a", PS)], {}, "duplicate block name 'a'"),
        ({"": PS}, {}, "must not be empty"),
        ({"a\0b": PS}, {}, "NUL"),
        ({"\u00e9" * 128: PS}, {}, "256 UTF-8 bytes, at most 255"),
        ({"\udcff": PS}, {}, "UTF-8"),
        ({7: PS}, {}, "must be a str"),
    ],
)
def test_create_rejects_bad_arguments(blocks, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GuestRAM.create(blocks, **kwargs)


def test_create_accepts_limits():
    with GuestRAM.create({"a" * 255: 512, "b": 1024}, page_size=512) as ram:
        assert ram.block("a" * 255).npages == 1
    with GuestRAM.create({"a": np.int64(PS)}) as ram:
        assert ram.block(0).size == PS and type(ram.block(0).size) is int


def test_create_refuses_more_than_dev_shm_holds():
    free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize
    too_big = (free // PS + 1) * PS
    with pytest.raises(ConfigError, match=rf"not enough room in /dev/shm: blocks 'huge' {too_big}.*SIGBUS"):
        GuestRAM.create({"huge": too_big})


def test_out_of_bounds_access_is_rejected():
    with GuestRAM.create({"pc.ram": 2 * PS}) as ram:
        cases = [
            (lambda: ram.write("pc.ram", 2 * PS - 3, b"four"), "write.*'pc.ram'.*offset 8189 length 4.*size 8192"),
            (lambda: ram.write("pc.ram", -1, b"x"), "offset -1"),
            (lambda: ram.mark_dirty("pc.ram", 0, 2 * PS + 1), "mark_dirty.*offset 0 length 8193.*size 8192"),
            (lambda: ram.mark_dirty("pc.ram", 2 * PS, 1), "offset 8192 length 1"),
            (lambda: ram.mark_dirty("pc.ram", 10, -1), "length -1"),
            (lambda: ram.mark_dirty("pc.ram", 1.5, 1), "must be an integer"),
        ]
        for call, match in cases:
            with pytest.raises(ConfigError, match=match):
                call()
        ram.mark_dirty("pc.ram", 2 * PS, 0)  # empty range at the end: allowed, marks nothing
        ram.write("pc.ram", 2 * PS, b"")
        assert ram.dirty_count() == 0 and not ram.view(0).any()
        with pytest.raises(KeyError):
            ram.write("nope", 0, b"x")
        with pytest.raises(KeyError):
            ram.mark_dirty(5, 0, 1)


def test_attach_rejects_foreign_and_broken_segments(shm_file):
    garbage = shm_file(PS, b"this is not a guest RAM layout")
    with pytest.raises(ConfigError, match="field 'magic'.*not an mpmultifd guest RAM"):
        GuestRAM.attach(os.path.basename(garbage))
    tiny = shm_file(8, b"MPMFDRAM")
    with pytest.raises(ConfigError, match="field 'magic'.*too small"):
        GuestRAM.attach(os.path.basename(tiny))
    empty = shm_file(0)
    with pytest.raises(ConfigError, match="empty"):
        GuestRAM.attach(os.path.basename(empty))
    with pytest.raises(FileNotFoundError):
        GuestRAM.attach(unique_name("missing"))
    with pytest.raises(ConfigError):
        GuestRAM.attach("")

    with GuestRAM.create({"pc.ram": 2 * PS}) as ram:
        seg = ram.block(0).segment
        good = {"page_size": PS, "blocks": [{"name": "pc.ram", "size": 2 * PS, "segment": seg, "owned": True}]}

        def block(**changes):
            return {**good, "blocks": [{**good["blocks"][0], **changes}]}

        cases = [
            (dict(layout=good, magic=b"MPMFDXXX"), "field 'magic'"),
            (dict(layout=good, version=VERSION + 1), f"field 'version' is {VERSION + 1}"),
            (dict(layout=good, length=0), "field 'layout_length' is 0"),
            (dict(layout=good, length=1 << 20), "field 'layout_length'"),
            (dict(raw_layout=b"{not json"), "field 'layout' is not valid"),
            (dict(raw_layout=b"\xff\xfe"), "field 'layout' is not valid"),
            (dict(layout=[1, 2]), "field 'layout' must be a JSON object"),
            (dict(layout={**good, "page_size": 1000}), "field 'page_size'"),
            (dict(layout={**good, "page_size": "4096"}), "field 'page_size'"),
            (dict(layout={**good, "blocks": []}), "field 'blocks' must be a non-empty list"),
            (dict(layout={**good, "blocks": [7]}), r"field 'blocks\[0\]' must be a JSON object"),
            (dict(layout=block(name="")), r"field 'blocks\[0\].name'"),
            (dict(layout=block(size=100)), r"field 'blocks\[0\].size'"),
            (dict(layout=block(size=True)), r"field 'blocks\[0\].size'"),
            (dict(layout=block(owned="yes")), r"field 'blocks\[0\].owned'"),
            (dict(layout=block(segment="../etc/passwd")), r"field 'blocks\[0\].segment'"),
            (dict(layout=block(owned=False, segment="relative")), r"field 'blocks\[0\].segment'.*absolute"),
            (dict(layout=block(segment=unique_name("gone"))), r"field 'blocks\[0\].segment'.*does not exist"),
            (dict(layout=block(size=4 * PS)), r"field 'blocks\[0\].size'.*holds only 8192"),
            (dict(layout={**good, "blocks": [good["blocks"][0]] * 2}), "duplicate block name"),
            (dict(layout=good, tail=0), "field 'blocks'.*dirty maps need"),
        ]
        forged = shm_file(1)
        for kwargs, match in cases:
            _forge_meta(forged, **kwargs)
            with pytest.raises(ConfigError, match=match):
                GuestRAM.attach(os.path.basename(forged))
        _forge_meta(forged, layout=good)  # and the well-formed forgery attaches
        with GuestRAM.attach(os.path.basename(forged)) as other:
            assert other.blocks == ram.blocks


# ---------------------------------------------------------------------- dirty tracking


def test_snapshot_dirty_clears_exactly_the_snapshot():
    with GuestRAM.create({"pc.ram": 32 * 512}, page_size=512) as ram:
        ram.mark_dirty(0, 3 * 512, 1)
        ram.write(0, 10 * 512 - 1, b"xy")  # pages 9 and 10
        first = ram.snapshot_dirty("pc.ram")
        assert first.dtype == np.int64 and first.tolist() == [3, 9, 10]
        assert ram.dirty_count() == 0
        ram.mark_dirty(0, 20 * 512, 2 * 512)
        ram.mark_dirty(0, 3 * 512 + 7, 1)
        assert ram.snapshot_dirty(0).tolist() == [3, 20, 21]
        assert ram.snapshot_dirty(0).tolist() == []


def test_page_marked_during_snapshot_stays_marked(monkeypatch):
    with GuestRAM.create({"pc.ram": 8 * 512}, page_size=512) as ram:
        dm = ram.dirty_map(0)
        ram.mark_dirty(0, 512, 2 * 512)  # pages 1 and 2
        scan = np.flatnonzero

        def writer_strikes_during_scan(a):
            dm[5] = 1  # a writer marks page 5 after the map was copied
            dm[1] = 1  # and re-marks page 1, already in the copy
            return scan(a)

        monkeypatch.setattr(np, "flatnonzero", writer_strikes_during_scan)
        taken = ram.snapshot_dirty(0)
        monkeypatch.undo()
        assert taken.tolist() == [1, 2]  # the scan ran on the copy
        assert dm.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]  # page 5 waits for the next snapshot
        assert ram.snapshot_dirty(0).tolist() == [5]


@given(
    page_size=st.sampled_from([512, 1024, 4096]),
    npages=st.integers(1, 12),
    data=st.data(),
)
def test_mark_dirty_matches_page_model(page_size: int, npages: int, data: st.DataObject):
    size = page_size * npages
    with GuestRAM.create({"b": size}, page_size=page_size) as ram:
        for _ in range(data.draw(st.integers(1, 4), label="calls")):
            offset = data.draw(st.integers(-page_size, size + page_size), label="offset")
            length = data.draw(st.integers(-2, size + page_size), label="length")
            use_write = data.draw(st.booleans(), label="use_write")
            if use_write:
                length = max(length, 0)  # a write's length is its data's
            before = ram.dirty_map(0).copy()
            if offset < 0 or length < 0 or offset + length > size:
                with pytest.raises(ConfigError):
                    if use_write:
                        ram.write("b", offset, bytes(length))
                    else:
                        ram.mark_dirty("b", offset, length)
                assert np.array_equal(ram.dirty_map(0), before)
                continue
            if use_write:
                payload = bytes((offset + k) % 251 + 1 for k in range(length))
                ram.write("b", offset, payload)
                assert ram.view(0)[offset : offset + length].tobytes() == payload
            else:
                ram.mark_dirty("b", offset, length)
            touched = {(offset + k) // page_size for k in range(length)}  # every byte's page
            expected = [1 if (p in touched or before[p]) else 0 for p in range(npages)]
            assert ram.dirty_map(0).tolist() == expected
            assert ram.dirty_count() == sum(expected)


def _random_writer(name: str, slot_pages: int, stop, progress, seed: int) -> None:
    """Write random bytes into random slots of block 0 until told to stop.

    Each pass visits every slot once in a fresh random order, so the writes of
    the last pass are the final bytes of their pages: one lost mark among them
    leaves the mirror stale.
    """
    rng = np.random.default_rng(seed)
    noise = np.frombuffer(rng.bytes(1 << 20), dtype=np.uint8)
    with GuestRAM.attach(name) as ram:
        slot = slot_pages * ram.page_size
        nslots = ram.block(0).size // slot
        count = 0
        while not stop.is_set():
            starts = rng.integers(0, slot, nslots)
            lengths = rng.integers(1, slot + 1, nslots)
            sources = rng.integers(0, noise.size - slot, nslots)
            for k, s in enumerate(rng.permutation(nslots).tolist()):
                start = int(starts[k])
                length = min(int(lengths[k]), slot - start)
                src = int(sources[k])
                ram.write(0, s * slot + start, noise[src : src + length])
                count += 1
                if count % 256 == 0:
                    progress.value = count
                    if stop.is_set():
                        break


def test_concurrent_writer_loses_no_write():
    ctx = multiprocessing.get_context("forkserver")
    page_size, npages, slot_pages = 512, 1 << 15, 4
    with GuestRAM.create({"pc.ram": page_size * npages}, page_size=page_size) as ram:
        stop, progress = ctx.Event(), ctx.Value("q", 0, lock=False)
        proc = ctx.Process(target=_random_writer, args=(ram.name, slot_pages, stop, progress, 1234))
        proc.start()
        try:
            pages = ram.pages(0)
            mirror = np.zeros_like(pages)  # fresh RAM is zero, so is the mirror
            start = time.monotonic()
            while progress.value == 0 and proc.is_alive() and time.monotonic() - start < CHILD_TIMEOUT:
                time.sleep(0.002)
            first = progress.value
            assert first > 0, "writer never started"
            rounds = copied = 0
            deadline = time.monotonic() + 0.8
            # run for a while, and at least through one full pass of the writer
            while (time.monotonic() < deadline or progress.value - first < npages // slot_pages) and proc.is_alive():
                idx = ram.snapshot_dirty(0)
                mirror[idx] = pages[idx]
                rounds += 1
                copied += idx.size
                if time.monotonic() - start > CHILD_TIMEOUT:
                    break
        finally:
            stop.set()
            proc.join(CHILD_TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert proc.exitcode == 0
        writes = progress.value - first
        assert writes >= npages // slot_pages and rounds > 10, (writes, rounds, copied)
        idx = ram.snapshot_dirty(0)  # the final round, with the writer stopped
        mirror[idx] = pages[idx]
        assert ram.dirty_count() == 0
        diff = np.flatnonzero((mirror != pages).any(axis=1))
        assert diff.size == 0, (
            f"lost writes on {diff.size} pages (first {diff[:10].tolist()}) after {writes} writes, {rounds} rounds"
        )
