"""Save and restore through a file: parallel positional writes and reads, live saves, top-up migrations."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from mpmultifd import (
    ConfigError,
    Destination,
    GuestRAM,
    MigrationCancelled,
    MigrationConfig,
    MigrationError,
    SaveFileError,
    Source,
)
from mpmultifd.cli import main as cli_main
from mpmultifd.ram import file_data_extents
from mpmultifd.savefile import STATE_OFFSET, read_layout
from mpmultifd.testing import DirtyingWriter, RemoteDestination, fill, same_contents
from mpmultifd.wire import data_header_size

PS = 4096
BLOCKS = {"pc.ram": 24 << 20, "vga": 4 << 20}


def _cfg(**kw) -> MigrationConfig:
    kw.setdefault("channels", 2)
    kw.setdefault("start_method", "forkserver")
    return MigrationConfig(**kw)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("zero_page,channels", [("multifd", 1), ("multifd", 4), ("none", 2)])
def test_save_restore_byte_identical(regions, tmp_path, zero_page, channels, start_method):
    src, dst = regions
    fill(src, "mixed", 11)
    path = str(tmp_path / "guest.mpsave")
    cfg = _cfg(channels=channels, zero_page=zero_page, start_method=start_method)
    with Source(src, cfg) as s:
        saved = s.save(path)
    zero_pages = sum(int((~src.pages(b.index).any(axis=1)).sum()) for b in src.blocks)
    assert saved.rounds == 1 + 1 and saved.converged
    if zero_page == "multifd":
        # zero pages cost nothing: they are holes, and the bitmap says so
        assert saved.zero_pages == zero_pages > 0
        assert saved.allocated <= (src.total_pages - zero_pages) * PS + (2 << 20)
    else:
        assert saved.zero_pages == 0
    layout, state = read_layout(path)
    assert state.complete and state.present_pages == saved.present_pages
    assert layout.save_id.hex() == saved.save_id
    with Destination(dst, config=cfg) as d:
        restored = d.restore(path)
    assert restored.verified and restored.present_pages == saved.present_pages
    assert same_contents(src, dst)


@pytest.mark.timeout(60)
def test_save_refuses_compression_and_direct_with_small_pages(regions, tmp_path):
    src, _ = regions
    with Source(src, _cfg(compression="lz4")) as s:
        with pytest.raises(ConfigError, match="compression"):
            s.save(str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    with GuestRAM.create({"small": 64 * 512}, page_size=512) as small:
        try:
            with Source(small, _cfg()) as s:
                with pytest.raises(ConfigError, match="O_DIRECT"):
                    s.save(str(tmp_path / "y"), direct=True)
                s.save(str(tmp_path / "y"))  # buffered is fine
            assert read_layout(str(tmp_path / "y"))[0].page_size == 512
        finally:
            small.unlink()
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(120)
def test_save_and_restore_with_o_direct(regions, tmp_path):
    src, dst = regions
    fill(src, "half-zero", 3)
    path = str(tmp_path / "direct.mpsave")
    with Source(src, _cfg()) as s:
        saved = s.save(path, direct=True)
    assert saved.direct
    with Destination(dst, config=_cfg()) as d:
        restored = d.restore(path, direct=True)
    assert restored.direct and restored.verified
    assert same_contents(src, dst)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracker,mark", [("map", True), ("scan", False)])
def test_live_save_with_a_writer(regions, tmp_path, tracker, mark):
    src, dst = regions
    fill(src, "half-zero", 5)
    path = str(tmp_path / "live.mpsave")
    cfg = _cfg(dirty_tracker=tracker, downtime_limit=0.02, stall_downtime_limit=math.inf, max_rounds=8)
    resumed = []
    with DirtyingWriter(src.name, rate=4000, start_method="forkserver", mark=mark) as writer, Source(src, cfg) as s:
        saved = s.save(path, pause=writer.pause, resume=lambda: resumed.append(time.monotonic()))
        assert writer.writes > 100 and writer.pauses == 1
    assert resumed, "resume() is called once the file holds the paused state"
    assert saved.rounds >= 2
    with Destination(dst, config=_cfg()) as d:
        assert d.restore(path).verified
    assert same_contents(src, dst)  # the writer stayed paused: the file holds the paused guest


@pytest.mark.timeout(120)
def test_a_page_that_becomes_zero_gets_its_hole_back(tmp_path):
    with GuestRAM.create({"ram": 256 * PS}) as src, GuestRAM.create({"ram": 256 * PS}) as dst:
        try:
            view = src.view("ram")
            view[:] = 0
            view[10 * PS : 12 * PS] = 9  # pages 10 and 11 have data in round 0
            path = str(tmp_path / "holes.mpsave")

            def on_event(ev):
                if ev["event"] == "MIGRATION_PASS" and ev["round"] == 0:
                    src.write("ram", 10 * PS, bytes(PS))  # page 10 is zero again

            cfg = _cfg(downtime_limit=1e-9, stall_downtime_limit=math.inf, max_rounds=2)
            with Source(src, cfg, on_event=on_event) as s:
                saved = s.save(path)
            assert saved.present_pages == 1
            layout, _ = read_layout(path)
            base = layout.blocks[0].data_offset // PS
            data_pages = {p - base for first, end in file_data_extents(path, layout.file_size // PS, PS)
                          for p in range(first, end) if p >= base}
            assert data_pages == {11}  # page 10's data was punched out
            with Destination(dst, config=_cfg()) as d:
                d.restore(path)
            assert same_contents(src, dst)
        finally:
            src.unlink()
            dst.unlink()


@pytest.mark.timeout(60)
def test_cancelled_save_leaves_no_file(regions, tmp_path):
    src, _ = regions
    fill(src, "random", 1)
    path = str(tmp_path / "cancelled.mpsave")
    cfg = _cfg(max_bandwidth=4_000_000)  # slow enough to cancel mid-way
    with Source(src, cfg) as s:
        import threading

        threading.Timer(0.8, s.cancel).start()
        with pytest.raises(MigrationCancelled):
            s.save(path)
    assert not os.path.exists(path)


def _save_in_child(ram_name: str, path: str) -> None:
    ram = GuestRAM.attach(ram_name)
    with Source(ram, MigrationConfig(channels=2, max_bandwidth=4_000_000, start_method="forkserver")) as s:
        s.save(path)


@pytest.mark.timeout(120)
def test_a_killed_save_is_refused_on_restore(regions, tmp_path):
    src, dst = regions
    fill(src, "random", 2)
    path = str(tmp_path / "killed.mpsave")
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_save_in_child, args=(src.name, path))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # the save is written beside the target and renamed over it only once complete
            parts = [p for p in tmp_path.iterdir() if p.name.startswith(".killed.mpsave.")]
            if parts and os.stat(parts[0]).st_blocks * 512 > (4 << 20):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the save never got going")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(10)
    time.sleep(0.5)  # its workers notice their coordinator is gone
    assert not os.path.exists(path)  # a killed save never took the target's name
    path = str(parts[0])
    with pytest.raises(SaveFileError) as e:
        read_layout(path)
    assert e.value.field == "state" and "never completed" in str(e.value)
    with Destination(dst, config=_cfg()) as d:
        with pytest.raises(SaveFileError) as e:
            d.restore(path)
    assert e.value.field == "state"
    assert not dst.view("pc.ram").any()  # nothing was written into the region


@pytest.fixture
def saved_file(regions, tmp_path):
    src, dst = regions
    fill(src, "half-zero", 7)
    path = str(tmp_path / "good.mpsave")
    with Source(src, _cfg()) as s:
        s.save(path)
    return src, dst, path


def _restore_error(dst: GuestRAM, path: str) -> SaveFileError:
    with Destination(dst, config=_cfg()) as d:
        with pytest.raises(SaveFileError) as e:
            d.restore(path)
    return e.value


@pytest.mark.timeout(60)
def test_truncated_and_corrupted_files_are_refused_naming_the_field(saved_file):
    src, dst, path = saved_file
    layout, _ = read_layout(path)
    with open(path, "rb") as f:
        original = f.read()

    def variant(mutate) -> str:
        data = bytearray(original)
        data = mutate(data)
        with open(path, "wb") as f:
            f.write(data)
        return path

    # truncated
    assert _restore_error(dst, variant(lambda d: d[: len(d) - PS])).field == "file_size"
    # a header byte flipped
    assert _restore_error(dst, variant(lambda d: (d.__setitem__(20, d[20] ^ 1), d)[1])).field == "header_crc"
    # the complete mark damaged
    assert (
        _restore_error(dst, variant(lambda d: (d.__setitem__(STATE_OFFSET + 9, d[STATE_OFFSET + 9] ^ 4), d)[1])).field
        == "state"
    )
    # page data flipped: the digests catch it
    b0 = layout.blocks[0]
    present = np.flatnonzero(src.pages(0).any(axis=1))
    where = b0.data_offset + int(present[3]) * PS + 100
    err = _restore_error(dst, variant(lambda d: (d.__setitem__(where, d[where] ^ 0x55), d)[1]))
    assert err.field == "block[0].data" and str(int(present[3])) in str(err)
    # a bitmap bit cleared: the count no longer matches the complete mark
    bit = layout.blocks[1].bitmap_offset
    assert _restore_error(dst, variant(lambda d: (d.__setitem__(bit, 0), d)[1])).field in ("state", "block[1].digest")
    # a region of another shape
    with open(path, "wb") as f:
        f.write(original)
    with GuestRAM.create({"pc.ram": 24 << 20, "vga": 8 << 20}) as other:
        try:
            assert _restore_error(other, path).field == "block[1].size"
        finally:
            other.unlink()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compression", ["none", "lz4", "zstd", "zlib"])
def test_restore_then_top_up_sends_only_what_changed(regions, tmp_path, compression):
    src, dst = regions
    fill(src, "mixed", 9)
    path = str(tmp_path / "topup.mpsave")
    cfg = _cfg(compression=compression)
    with Source(src, cfg.replace(compression="none")) as s:
        s.save(path)
        # the guest runs on after the save: change 40 pages
        for i in range(40):
            src.write("pc.ram", (i * 97) * PS + 5, b"changed after the save")
        with Destination(dst, config=cfg) as d:
            d.restore(path)
            assert not same_contents(src, dst)
            s.config = cfg  # the top-up may use any method
            result = s.migrate(d.address, top_up=True)
            dres = d.wait(30)
    assert dres.verified and result.verified
    assert same_contents(src, dst)
    full = src.total_size
    # a full migration moves the whole region (28 MiB here); the top-up moved 40 pages and
    # headers: its data packets, and a SYNC or EOS marker per channel per round
    assert result.normal == 40
    hsize = data_header_size(cfg.packet_pages)
    payload = sum(c["payload-bytes"] for c in result.per_channel)
    packets = sum(c["packets"] for c in result.per_channel)
    assert payload <= 40 * PS and packets <= cfg.channels * result.rounds
    assert result.transferred == payload + (packets + cfg.channels * result.rounds) * hsize
    assert result.transferred * 100 < full


@pytest.mark.timeout(120)
def test_top_up_is_refused_without_the_matching_restore(regions, tmp_path):
    src, dst = regions
    fill(src, "random", 4)
    with Source(src, _cfg()) as s:
        with pytest.raises(ConfigError, match="top_up"):
            s.migrate(("127.0.0.1", 1), top_up=True)
        s.save(str(tmp_path / "a.mpsave"))
        with Destination(dst, config=_cfg()) as d:  # never restored
            with pytest.raises(MigrationError, match="not restored"):
                s.migrate(d.address, top_up=True)
        # that attempt never took the save's changes, so the save is still the base
        s.save(str(tmp_path / "b.mpsave"))  # a newer save replaces the base
        with GuestRAM.create(BLOCKS) as other:
            try:
                with Destination(other, config=_cfg()) as d:
                    d.restore(str(tmp_path / "a.mpsave"))
                    with pytest.raises(MigrationError, match="restored from save"):
                        s.migrate(d.address, top_up=True)
            finally:
                other.unlink()


@pytest.mark.timeout(120)
def test_live_save_then_top_up_with_a_writer(regions, tmp_path):
    """The whole checkpoint-then-move story with a guest that never stops writing until the final pause."""
    src, dst = regions
    fill(src, "half-zero", 12)
    path = str(tmp_path / "story.mpsave")
    cfg = _cfg(downtime_limit=0.05, stall_downtime_limit=math.inf)
    with Source(src, cfg) as s:
        with DirtyingWriter(src.name, rate=2000, seed=1, start_method="forkserver") as w1:
            s.save(path, pause=w1.pause)
        # the second writer's rate bounds what the top-up carries per second of a loaded machine's setup
        with RemoteDestination(dst.name, cfg, start_method="forkserver", restore_from=path) as d, DirtyingWriter(
            src.name, rate=500, seed=2, start_method="forkserver"
        ) as w2:
            result = s.migrate(d.address, pause=w2.pause, top_up=True)
            d.result()
    assert result.verified
    assert result.transferred < src.total_size // 4, (result.transferred, src.total_size)
    assert same_contents(src, dst)


@pytest.mark.timeout(120)
def test_cli_save_and_restore(regions, tmp_path, capsys):
    src, dst = regions
    fill(src, "half-zero", 6)
    path = str(tmp_path / "cli.mpsave")
    assert cli_main(["save", path, "--region", src.name, "--channels", "2", "--json", "--no-progress"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    result = lines[-1]
    assert result["event"] == "result" and result["present-pages"] > 0
    assert cli_main(["restore", path, "--region", dst.name, "--channels", "2", "--json"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert out[0]["event"] == "restored" and out[0]["verified"] is True
    assert out[0]["save-id"] == result["save-id"]
    assert same_contents(src, dst)
    os.truncate(path, 8192)
    assert cli_main(["restore", path, "--region", dst.name]) == 1
    assert "file_size" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_an_estimate_between_save_and_top_up_loses_no_marks(regions, tmp_path):
    src, dst = regions
    fill(src, "half-zero", 13)
    path = str(tmp_path / "est.mpsave")
    with Source(src, _cfg()) as s:
        s.save(path)
        for i in range(25):
            src.write("vga", i * 3 * PS, b"after the save")
        est = s.estimate(0.2, interval=0.1)
        assert est.dirty_rate == 0  # nothing new while it sampled
        with Destination(dst, config=_cfg()) as d:
            d.restore(path)
            result = s.migrate(d.address, top_up=True)
            assert d.wait(30).verified
    assert result.normal == 25
    assert same_contents(src, dst)
