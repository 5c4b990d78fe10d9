"""Live migration of a RUNNING QEMU guest's RAM with the scanning dirty tracker.

The guest (see ``tests/qemu_guest.py``) is a boot sector that keeps incrementing
a word in every page of 16..48 MiB of its 64 MiB, paced by the PIT (10 pages per
~1 ms tick unless a test asks for more), and counts its writes in a marker the
host reads from the ``memory-backend-file``. The source maps that file with
``GuestRAM.from_files``; nobody marks its dirty map, so only a tracker that
looks at the bytes (``dirty_tracker="scan"``) can see what the guest changes.
At switchover ``pause`` is QMP ``stop`` (it returns once the vCPUs are
stopped); the destination must then equal the stopped guest's RAM byte for
byte. The negative control migrates the same kind of guest with the
``"map"`` tracker, which sees nothing, and must fail loudly at verification.

Skipped without ``qemu-system-x86_64`` on PATH. Uses KVM when ``/dev/kvm`` can
be opened, TCG otherwise (``accel=kvm:tcg``).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time

import numpy as np
import pytest

from mpmultifd import GuestRAM, MigrationConfig, MigrationResult, Source, VerificationError
from mpmultifd.testing import RemoteDestination

import qemu_guest
from qemu_guest import MARKER_ADDR, MEM_SIZE, PAGE_SIZE, SWEEP_END, SWEEP_START, QemuGuest

needs_qemu = pytest.mark.skipif(
    qemu_guest.qemu_binary() is None,
    reason=f"{qemu_guest.QEMU_BINARY} is not on PATH (Debian/Ubuntu: apt-get install qemu-system-x86)",
)

BLOCK = "pc.ram"
# pages the guest program writes: the marker page and the swept range
GUEST_PAGES = {MARKER_ADDR // PAGE_SIZE} | set(range(SWEEP_START // PAGE_SIZE, SWEEP_END // PAGE_SIZE))


def test_boot_sector_is_one_bootable_sector():
    image = qemu_guest.boot_sector()
    assert len(image) == 512 and image.endswith(b"\x55\xaa")
    assert qemu_guest.boot_sector(100) != image  # the pace is patched in
    for bad in (0, 1 << 32):
        with pytest.raises(ValueError):
            qemu_guest.boot_sector(bad)


@pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed (only needed for this cross-check)")
@pytest.mark.parametrize("writes_per_tick", [qemu_guest.WRITES_PER_TICK, 1, 100, (1 << 32) - 1])
def test_boot_sector_matches_nasm(tmp_path, writes_per_tick):
    """The hand-assembled bytes are what nasm makes of qemu_guest.ASM_SOURCE."""
    src, out = tmp_path / "boot.asm", tmp_path / "boot.bin"
    src.write_text(qemu_guest.asm_source(writes_per_tick))
    subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(src)], check=True, timeout=30)
    assert out.read_bytes() == qemu_guest.boot_sector(writes_per_tick)


@needs_qemu
@pytest.mark.timeout(120)
def test_guest_harness_runs_stops_and_continues(tmp_path):
    """Boot, see the marker advance, stop (nothing changes), cont (it advances again)."""
    with QemuGuest(tmp_path) as guest:
        first = guest.wait_writing(timeout=60)
        # one full sweep: every page of the range has been written at least once
        swept = guest.wait_writing(timeout=30, sweeps=2, since=first)
        assert guest.status() == "running"
        guest.stop()
        assert guest.status() == "paused"
        stopped = guest.marker()
        assert (stopped.writes - first.writes) % (1 << 32) >= 8192
        time.sleep(0.3)
        assert guest.marker() == stopped  # a stopped guest writes nothing
        ram = np.fromfile(guest.mem_path, dtype=np.uint8)
        assert ram.size == MEM_SIZE
        pages = ram.reshape(-1, PAGE_SIZE)[SWEEP_START // PAGE_SIZE : SWEEP_END // PAGE_SIZE]
        assert pages.any(axis=1).all(), "the guest left pages of its range untouched"
        guest.cont()
        assert guest.status() == "running"
        resumed = guest.wait_writing(timeout=30, writes=100, since=stopped)
        assert resumed.sweeps >= swept.sweeps
        print(f"accelerator {guest.accelerator()}")


def _migrate_guest(guest: QemuGuest, config: MigrationConfig, pause, resume=None):
    """Migrate the running guest's RAM into a fresh region in a destination process.

    Returns ``(outcome, destination outcome, copy of the destination RAM)``;
    an outcome is a MigrationResult or the MigrationError raised.
    """
    with GuestRAM.from_files({BLOCK: guest.mem_path}) as src_ram, GuestRAM.create({BLOCK: MEM_SIZE}) as dst_ram:
        assert src_ram.total_size == MEM_SIZE
        with RemoteDestination(dst_ram.name, config, start_method=config.start_method) as dest:
            with Source(src_ram, config) as src:
                try:
                    outcome = src.migrate(dest.address, pause=pause, resume=resume)
                except VerificationError as exc:
                    outcome = exc
            try:
                dest_outcome = dest.result(timeout=60)
            except Exception as exc:  # noqa: BLE001 - reported to the test
                dest_outcome = exc
            dest_valid = dest.valid
        return outcome, (dest_outcome, dest_valid), np.array(dst_ram.view(BLOCK))


def _scan_migration(tmp_path, config: MigrationConfig, **guest_kwargs) -> tuple[dict, MigrationResult]:
    """Boot a guest, migrate it while it writes with ``config`` (pause = QMP stop), check the copy byte for byte."""
    with QemuGuest(tmp_path, **guest_kwargs) as guest:
        # a first whole sweep: every page of the range holds data before the migration starts
        ready = guest.wait_writing(timeout=60, sweeps=1)
        seen = {}

        def pause():
            seen["at_pause"] = guest.marker()
            t0 = time.monotonic()
            guest.stop()  # returns once the vCPU is stopped
            seen["stop_s"] = time.monotonic() - t0
            seen["after_stop"] = guest.marker()

        t0 = time.monotonic()
        start = guest.marker()
        result, (dest_result, dest_valid), dst = _migrate_guest(guest, config, pause)
        elapsed = time.monotonic() - t0
        assert not isinstance(result, Exception), f"migration failed: {result!r}"
        assert guest.status() == "paused"
        end = guest.marker()
        ram = np.fromfile(guest.mem_path, dtype=np.uint8)
        accel = guest.accelerator()

    # the guest really ran and wrote during the migration, and stopped writing at the pause
    assert ready.started and start.started
    writes = (seen["at_pause"].writes - start.writes) % (1 << 32)
    assert writes > 0, (start, seen)
    assert end == seen["after_stop"], "the guest wrote after QMP stop returned"
    # byte for byte
    assert ram.size == dst.size == MEM_SIZE
    if not np.array_equal(dst, ram):
        differ = np.flatnonzero((dst.reshape(-1, PAGE_SIZE) != ram.reshape(-1, PAGE_SIZE)).any(axis=1))
        pytest.fail(f"{differ.size} pages differ after a {config.dirty_tracker!r} migration, "
                    f"first {differ[:10].tolist()}; {result}")
    assert result.status == "completed" and result.verified is True
    assert result.dirty_tracker == "scan"
    assert dest_valid is True and dest_result.verified is True
    assert result.rounds > 1
    info = {"accel": accel, "elapsed": elapsed, "writes": writes, "stop_s": seen["stop_s"]}
    print(
        f"accel {accel}, start method {config.start_method}: {elapsed:.2f} s, rounds {result.rounds}, "
        f"downtime {result.downtime * 1000:.0f} ms (stop {seen['stop_s'] * 1000:.0f} ms), "
        f"expected {result.expected_downtime * 1000:.1f} ms, converged {result.converged} "
        f"({result.stall_reason}), guest writes during migration {writes}, "
        f"sent {result.normal} normal + {result.duplicate} zero pages, {result.transferred} bytes, "
        f"dirty sync {result.dirty_sync_time * 1000:.0f} ms"
    )
    return info, result


def _scan_config(start_method: str, **changes) -> MigrationConfig:
    config = MigrationConfig(
        channels=2,
        dirty_tracker="scan",
        downtime_limit=0.5,
        stall_downtime_limit=math.inf,
        start_method=start_method,
    )
    return config.replace(**changes) if changes else config


@needs_qemu
@pytest.mark.timeout(120)
def test_scan_tracker_migrates_a_running_guest(tmp_path, start_method):
    """~10 000 page writes a second all over 32 MiB while the migration runs (KVM if it can)."""
    _scan_migration(tmp_path, _scan_config(start_method))


@needs_qemu
@pytest.mark.timeout(120)
def test_scan_tracker_migrates_a_running_tcg_guest(tmp_path):
    """The same under TCG, where QEMU's own threads write the shared pages rather than KVM's vCPU."""
    info, _ = _scan_migration(tmp_path, _scan_config("forkserver"), accel="tcg")
    assert info["accel"] == "tcg"


@needs_qemu
@pytest.mark.timeout(120)
def test_scan_tracker_fast_writer_many_rounds(tmp_path):
    """~100 000 page writes a second (the whole range ~12 times a second) and a 2 ms downtime limit.

    Precopy cannot converge: the scanning tracker has to find the rewritten
    pages round after round until the stall rule switches over (within the
    unlimited stall_downtime_limit); the copy must still be exact.
    """
    _, result = _scan_migration(tmp_path, _scan_config("forkserver", downtime_limit=0.002), writes_per_tick=100)
    assert result.rounds >= 3


@needs_qemu
@pytest.mark.timeout(120)
def test_map_tracker_misses_a_running_guest_and_verification_catches_it(tmp_path):
    """Negative control: nobody marks the dirty map, so the "map" tracker sees no write.

    ``pause`` waits until the guest wrote twice more after precopy had ended (so
    at least the marker page is certainly stale on the destination), then stops
    it.
    Verification must refuse the result (repair is off here: the next test
    shows the repair); ``resume`` (called by the library because the
    migration failed after the pause) lets the guest run on.
    """
    config = MigrationConfig(
        channels=2,
        dirty_tracker="map",
        downtime_limit=0.5,
        stall_downtime_limit=math.inf,
        start_method="forkserver",
        repair_passes=0,
    )
    with QemuGuest(tmp_path) as guest:
        guest.wait_writing(timeout=60, writes=100)
        seen = {}

        def pause():
            seen["at_pause"] = guest.wait_writing(timeout=10, writes=2, since=guest.marker())
            guest.stop()
            seen["stopped"] = guest.marker()

        def resume():
            # the migration failed after pause(): the guest is still stopped, the destination is final
            seen["ram_at_resume"] = np.fromfile(guest.mem_path, dtype=np.uint8)
            seen["marker_at_resume"] = guest.marker()
            guest.cont()

        outcome, (dest_outcome, dest_valid), dst = _migrate_guest(guest, config, pause, resume)
        assert isinstance(outcome, VerificationError), f"expected VerificationError, got {outcome!r}"
        assert isinstance(dest_outcome, VerificationError), dest_outcome
        assert dest_valid is False
        assert seen["marker_at_resume"] == seen["stopped"]
        # the guest runs again after the failed migration
        after = guest.wait_writing(timeout=30, writes=10, since=seen["stopped"])
        assert guest.status() == "running"

    ram = seen["ram_at_resume"]
    differ = np.flatnonzero((dst.reshape(-1, PAGE_SIZE) != ram.reshape(-1, PAGE_SIZE)).any(axis=1))
    assert differ.size > 0
    # only pages the guest program writes can be stale
    assert set(differ.tolist()) <= GUEST_PAGES, sorted(set(differ.tolist()) - GUEST_PAGES)[:10]
    assert MARKER_ADDR // PAGE_SIZE in differ  # it was written after round 0 had sent it
    reported = outcome.mismatches.get(BLOCK, [])
    assert reported and set(reported) <= set(differ.tolist()), (reported[:10], differ[:10])
    print(f"{differ.size} stale pages; verification named {len(reported)} (first {reported[:5]}); "
          f"guest wrote on after resume: {after}")


@needs_qemu
@pytest.mark.timeout(120)
def test_map_tracker_misses_a_running_guest_and_the_switchover_repairs_it(tmp_path):
    """The same blind tracker, with repair on (the default): the pages verification finds
    different while the guest is stopped are sent again, and the copy is byte-identical."""
    config = MigrationConfig(
        channels=2, dirty_tracker="map", downtime_limit=0.5, stall_downtime_limit=math.inf, start_method="forkserver"
    )
    with QemuGuest(tmp_path) as guest:
        guest.wait_writing(timeout=60, writes=100)

        def pause():
            guest.wait_writing(timeout=10, writes=2, since=guest.marker())
            guest.stop()

        outcome, (dest_outcome, dest_valid), dst = _migrate_guest(guest, config, pause)
        assert isinstance(outcome, MigrationResult), outcome
        assert outcome.verified and outcome.repaired_pages > 0 and outcome.repair_passes >= 1
        assert isinstance(dest_outcome, MigrationResult) and dest_valid
        assert dest_outcome.repaired_pages == outcome.repaired_pages
        ram = np.fromfile(guest.mem_path, dtype=np.uint8)
        assert np.array_equal(dst, ram)
