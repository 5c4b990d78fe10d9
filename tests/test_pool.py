"""The warm worker pool: the same processes serve migrations, saves and restores one after another."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

from mpmultifd import ConfigError, Destination, GuestRAM, MigrationConfig, MigrationError, Source, WorkerPool
from mpmultifd.testing import fill, same_contents

BLOCKS = {"pc.ram": 8 << 20, "vga": 2 << 20}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_pooled_migrations_reuse_the_same_processes(start_method):
    cfg = MigrationConfig(channels=2, start_method=start_method)
    with GuestRAM.create(BLOCKS) as src, GuestRAM.create(BLOCKS) as dst, WorkerPool(
        4, start_method=start_method
    ) as pool:
        try:
            pids = set(pool.pids())
            assert len(pids) == 4 and pool.idle == 4
            for seed in range(3):
                fill(src, "mixed", seed)
                with Destination(dst, config=cfg, pool=pool) as d, Source(src, cfg, pool=pool) as s:
                    result = s.migrate(d.address)
                    assert d.wait(30).verified and result.verified
                assert same_contents(src, dst)
                assert pool.idle == 4, "every borrowed worker came back"
            assert set(pool.pids()) == pids, "no process was started for the migrations"
            assert pool.reused == 3 * 4 and pool.started == 4
        finally:
            src.unlink()
            dst.unlink()


@pytest.mark.timeout(120)
def test_pooled_save_and_restore(tmp_path):
    with GuestRAM.create(BLOCKS) as src, GuestRAM.create(BLOCKS) as dst, WorkerPool(2) as pool:
        try:
            fill(src, "half-zero", 4)
            cfg = MigrationConfig(channels=2)
            path = str(tmp_path / "pooled.mpsave")
            with Source(src, cfg, pool=pool) as s:
                s.save(path)
            with Destination(dst, config=cfg, pool=pool) as d:
                assert d.restore(path).verified
            assert same_contents(src, dst)
            assert pool.started == 2 and pool.idle == 2
        finally:
            src.unlink()
            dst.unlink()


@pytest.mark.timeout(120)
def test_a_failed_job_does_not_poison_the_pool(tmp_path):
    with GuestRAM.create(BLOCKS) as src, GuestRAM.create(BLOCKS) as dst, WorkerPool(2) as pool:
        try:
            fill(src, "random", 5)
            cfg = MigrationConfig(channels=2)
            path = str(tmp_path / "good.mpsave")
            with Source(src, cfg, pool=pool) as s:
                s.save(path)
            with open(path, "r+b") as f:  # damage page data: the restore fails after the workers ran
                f.seek(os.path.getsize(path) - 4096 * 3 + 7)
                f.write(b"\xff")
            with Destination(dst, config=cfg, pool=pool) as d:
                with pytest.raises(MigrationError):
                    d.restore(path)
            # the pool still serves a full migration afterwards
            with Destination(dst, config=cfg, pool=pool) as d, Source(src, cfg, pool=pool) as s:
                s.migrate(d.address)
                assert d.wait(30).verified
            assert pool.idle == pool.size >= 2
        finally:
            src.unlink()
            dst.unlink()


def _own_a_pool(conn) -> None:
    pool = WorkerPool(2, start_method="forkserver")
    conn.send(pool.pids())
    time.sleep(60)


@pytest.mark.timeout(60)
def test_pool_workers_leave_when_their_owner_dies():
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    owner = ctx.Process(target=_own_a_pool, args=(child,))
    owner.start()
    try:
        assert parent.poll(30)
        pids = parent.recv()
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        os.kill(owner.pid, signal.SIGKILL)
        owner.join(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        if owner.is_alive():
            owner.kill()
        owner.join()


def test_pool_arguments_are_checked():
    with pytest.raises(ConfigError, match="start_method"):
        WorkerPool(1, start_method="teleport")
    with pytest.raises(ConfigError, match="size"):
        WorkerPool(-1)
    pool = WorkerPool(0)
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(MigrationError, match="closed"):
        pool.run(print, ())


@pytest.mark.timeout(120)
def test_a_migration_that_breaks_gives_its_pooled_workers_back_cleanly():
    """A destination that dies mid-migration fails the source's jobs; the pool carries on."""
    from mpmultifd.testing import RemoteDestination

    big = {"pc.ram": 96 << 20}
    with GuestRAM.create(big) as src, GuestRAM.create(big) as dst, WorkerPool(2) as pool:
        try:
            fill(src, "random", 6)
            cfg = MigrationConfig(channels=2, max_bandwidth=8_000_000, timeout=5.0)
            with RemoteDestination(dst.name, cfg, start_method="forkserver") as dest, Source(src, cfg, pool=pool) as s:
                def kill_later():
                    # once data flows: every receiver has attached (and the destination dropped its
                    # segments' names), so the kill tests the pool, not a setup cut short
                    deadline = time.monotonic() + 30
                    while s.query()["ram"]["transferred"] < (12 << 20) and time.monotonic() < deadline:
                        time.sleep(0.02)
                    time.sleep(0.2)
                    os.kill(dest._proc.pid, signal.SIGKILL)

                threading.Thread(target=kill_later).start()
                with pytest.raises(MigrationError):
                    s.migrate(dest.address)
                assert s.status == "failed"
            # the pool still works: a full migration into a fresh in-process destination
            cfg2 = MigrationConfig(channels=2)
            with GuestRAM.create(big) as dst2:
                try:
                    with Destination(dst2, config=cfg2, pool=pool) as d, Source(src, cfg2, pool=pool) as s:
                        s.migrate(d.address)
                        assert d.wait(30).verified
                    assert np.array_equal(src.view(0), dst2.view(0))
                finally:
                    dst2.unlink()
            assert pool.idle == pool.size >= 2
        finally:
            src.unlink()
            dst.unlink()


# --------------------------------------------------------------------------- prepared receivers


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_prepared_receivers_take_the_channels(regions, start_method, compression):
    """prefault + pool: the receivers populate the mapping ahead and receive straight into it."""
    src, dst = regions
    cfg = MigrationConfig(channels=2, compression=compression, start_method=start_method)
    with WorkerPool(4, start_method=start_method) as pool:
        fill(src, "mixed", 7)  # zero pages too, which must overwrite what the destination held
        fill(dst, "random", 8)
        pids = set(pool.pids())
        with Destination(dst, config=cfg, pool=pool, prefault=True, prepare_receivers=True) as d:
            assert d.wait_prepared(60)
            assert pool.idle == 2, "two workers are held, prepared, before any source connects"
            with Source(src, cfg, pool=pool) as s:
                result = s.migrate(d.address)
            assert d.wait(30).verified and result.verified
            assert d.query()["prepared-receivers"] == 2
        assert same_contents(src, dst)
        assert pool.idle == 4 and set(pool.pids()) == pids, "every worker came back; none was started"


@pytest.mark.timeout(120)
def test_prepared_receivers_a_source_does_not_use_go_back_unused(regions):
    src, dst = regions
    with WorkerPool(6) as pool:
        fill(src, "half-zero", 9)
        with Destination(
            dst, config=MigrationConfig(channels=4), pool=pool, prefault=True, prepare_receivers=True
        ) as d:
            assert d.wait_prepared(60) and pool.idle == 2
            with Source(src, MigrationConfig(channels=2), pool=pool) as s:
                s.migrate(d.address)
            assert d.wait(30).verified
            assert d.query()["prepared-receivers"] == 2
        assert same_contents(src, dst)
        assert pool.idle == pool.size == 6 and pool.started == 6
        # and they serve the next migration as plain pool workers
        fill(src, "random", 10)
        cfg = MigrationConfig(channels=3)
        with Destination(dst, config=cfg, pool=pool) as d, Source(src, cfg, pool=pool) as s:
            s.migrate(d.address)
            assert d.wait(30).verified and d.query()["prepared-receivers"] == 0
        assert same_contents(src, dst) and pool.idle == 6


@pytest.mark.timeout(120)
def test_destination_closed_while_its_receivers_prepare_gives_them_back():
    big = {"pc.ram": 192 << 20}
    with GuestRAM.create(big) as dst, WorkerPool(4) as pool:
        try:
            for _ in range(3):
                t0 = time.monotonic()
                d = Destination(
                    dst, config=MigrationConfig(channels=4), pool=pool, prefault=True, prepare_receivers=True
                )
                time.sleep(0.05)
                d.close()
                assert time.monotonic() - t0 < 15
                assert d.wait_prepared(0) and d.status == "cancelled"
                deadline = time.monotonic() + 10
                while pool.idle != 4 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert pool.idle == pool.size == 4 and pool.started == 4
        finally:
            dst.unlink()


def test_wait_prepared_without_prefault_is_immediate(regions):
    _, dst = regions
    with Destination(dst) as d:
        assert d.wait_prepared(0)
        assert d.query()["prepared-receivers"] == 0


def test_prepare_receivers_needs_prefault_and_a_pool(regions):
    _, dst = regions
    with WorkerPool(0) as pool:
        for kw in (dict(prefault=True), dict(pool=pool), dict(pool=pool, prefault=False)):
            with pytest.raises(ConfigError, match="prepare_receivers: needs prefault=True and a pool"):
                Destination(dst, prepare_receivers=True, **kw)


@pytest.mark.timeout(120)
def test_prefault_with_a_pool_prepares_nothing_unless_asked(regions):
    src, dst = regions
    with WorkerPool(4) as pool:
        fill(src, "mixed", 12)
        fill(dst, "random", 13)
        cfg = MigrationConfig(channels=2)
        with Destination(dst, config=cfg, pool=pool, prefault=True) as d:
            assert d.wait_prepared(60) and pool.idle == 4
            with Source(src, cfg, pool=pool) as s:
                s.migrate(d.address)
            assert d.wait(30).verified and d.query()["prepared-receivers"] == 0
        assert same_contents(src, dst) and pool.idle == 4
