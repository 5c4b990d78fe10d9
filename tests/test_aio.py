"""mpmultifd.aio: real migrations on loopback driven from an asyncio event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mpmultifd import Destination, MigrationCancelled, MigrationConfig, MigrationError, Source, aio
from mpmultifd.testing import fill, same_contents

BLOCKS = {"pc.ram": 6 << 20, "vga": 1 << 20}


def test_migrate_and_wait_on_one_loop_with_coroutine_callbacks(regions):
    src_ram, dst_ram = regions
    fill(src_ram, "mixed", 21)
    cfg = MigrationConfig(channels=2)
    calls = []

    async def main():
        loop_thread = threading.get_ident()

        async def pause():
            calls.append(("pause", threading.get_ident() == loop_thread))

        async def resume():
            calls.append(("resume", True))

        with Destination(dst_ram, config=cfg) as dst, Source(src_ram, cfg) as src:
            stream = aio.events(src)  # subscribed before the migration starts
            seen = []

            async def collect():
                async for ev in stream:
                    seen.append(ev)

            collector = asyncio.create_task(collect())
            res, dres = await asyncio.gather(aio.migrate(src, dst.address, pause=pause, resume=resume), aio.wait(dst))
            await asyncio.wait_for(collector, 30)
        return res, dres, seen

    res, dres, seen = asyncio.run(main())
    assert res.status == "completed" and dres.status == "completed" and res.verified
    assert same_contents(src_ram, dst_ram)
    assert calls == [("pause", True)]  # awaited on the loop; resume only after a failure
    statuses = [ev["status"] for ev in seen if ev["event"] == "MIGRATION"]
    assert statuses[0] == "setup" and statuses[-1] == "completed"
    assert any(ev["event"] == "MIGRATION_PASS" for ev in seen)


def test_task_cancellation_cancels_the_migration_and_waits_for_its_end(regions):
    src_ram, dst_ram = regions
    fill(src_ram, "random", 22)
    # 7 MiB at 1 MiB/s: many seconds, so the cancellation lands mid-migration
    cfg = MigrationConfig(channels=2, max_bandwidth=1 << 20)

    async def main():
        with Destination(dst_ram, config=cfg) as dst, Source(src_ram, cfg) as src:
            waiting = asyncio.create_task(aio.wait(dst))
            async with aio.events(src) as stream:
                task = asyncio.create_task(aio.migrate(src, dst.address))
                async for ev in stream:
                    if ev.get("status") == "active":
                        break
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            status_after = src.status  # the clean end came before the CancelledError
            with pytest.raises(MigrationError):
                await asyncio.wait_for(waiting, 30)
        return status_after

    assert asyncio.run(main()) == "cancelled"


def test_wait_for_timeout_cancels_the_migration(regions):
    src_ram, dst_ram = regions
    fill(src_ram, "random", 23)
    cfg = MigrationConfig(channels=1, max_bandwidth=1 << 20)

    async def main():
        with Destination(dst_ram, config=cfg) as dst, Source(src_ram, cfg) as src:
            waiting = asyncio.create_task(aio.wait(dst))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(aio.migrate(src, dst.address), 1.0)
            assert src.status == "cancelled"
            with pytest.raises(MigrationError):
                await asyncio.wait_for(waiting, 30)

    asyncio.run(main())


def test_cancelling_a_waiting_destination(regions):
    _, dst_ram = regions

    async def main():
        with Destination(dst_ram) as dst:
            task = asyncio.create_task(aio.wait(dst))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(MigrationCancelled):
                dst.wait(10)

    asyncio.run(main())


def test_save_is_awaitable(regions, tmp_path):
    src_ram, dst_ram = regions
    fill(src_ram, "half-zero", 24)
    path = str(tmp_path / "vm.mpsave")

    async def main():
        with Source(src_ram, MigrationConfig(channels=2)) as src:
            return await aio.save(src, path)

    res = asyncio.run(main())
    assert res.path == path and res.present_pages > 0
    with Destination(dst_ram, config=MigrationConfig(channels=2)) as dst:
        assert dst.restore(path).verified
    assert same_contents(src_ram, dst_ram)


def test_a_failed_migration_raises_its_error(regions):
    src_ram, _ = regions
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        with Source(src_ram, MigrationConfig(channels=1)) as src:
            await aio.migrate(src, ("127.0.0.1", port))

    with pytest.raises(MigrationError):
        asyncio.run(main())
