"""Progress that never runs backwards, QEMU-style events, snapshots that outlive the run, forwarded logs."""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import threading
import time

import pytest

from mpmultifd import Destination, GuestRAM, MigrationConfig, MigrationResult, Source
from mpmultifd.progress import ProgressDisplay
from mpmultifd.testing import DirtyingWriter, RemoteDestination, fill

BLOCKS = {"pc.ram": 24 << 20, "vga.vram": 8 << 20}


def test_progress_never_decreases_while_the_writer_redirties_pages():
    cfg = MigrationConfig(
        channels=2, start_method="forkserver", downtime_limit=0.002, max_rounds=6, stall_downtime_limit=math.inf
    )
    seen: list[float] = []
    events: list[dict] = []
    with GuestRAM.create(BLOCKS) as s, GuestRAM.create(BLOCKS) as d:
        fill(s, "random", 1)
        with RemoteDestination(d.name, cfg, start_method="forkserver") as dest, DirtyingWriter(
            s.name, rate=20000, start_method="forkserver"
        ) as writer, Source(s, cfg, on_event=events.append) as src:
            done = threading.Event()

            def poll():
                while not done.is_set():
                    seen.append(src.query()["progress"])
                    time.sleep(0.001)

            t = threading.Thread(target=poll)
            t.start()
            try:
                res = src.migrate(dest.address, pause=writer.pause)
            finally:
                done.set()
                t.join()
            assert dest.result().verified
            final = src.query()
    assert res.rounds >= 3  # the writer made it re-send pages over several rounds
    assert len(seen) > 10
    assert all(b >= a for a, b in zip(seen, seen[1:])), "progress ran backwards"
    assert max(seen[:-1]) <= 100.0
    assert final["progress"] == 100.0
    passes = [e for e in events if e["event"] == "MIGRATION_PASS"]
    assert len(passes) == res.rounds - 1  # one per precopy round; the final round ends in "completed"
    assert [e["pass"] for e in passes] == list(range(1, len(passes) + 1))
    statuses = [e["status"] for e in events if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "active", "device", "completed"]


def test_event_iterator_and_snapshots_outlive_the_migration():
    cfg = MigrationConfig(channels=2, start_method="fork")
    with GuestRAM.create({"a": 8 << 20}) as s, GuestRAM.create({"a": 8 << 20}) as d:
        fill(s, "half-zero", 2)
        with Destination(d, config=cfg) as dst, Source(s, cfg) as src:
            got: list[dict] = []
            it = src.events(timeout=30)
            t = threading.Thread(target=lambda: got.extend(it))
            t.start()
            time.sleep(0.05)
            res = src.migrate(dst.address)
            t.join(10)
            dst.wait(10)
            q1 = src.query()
            time.sleep(0.05)
            q2 = src.query()
    assert [e["status"] for e in got if e["event"] == "MIGRATION"][-1] == "completed"
    assert q1["ram"] == q2["ram"] and q1["status"] == "completed"  # a stable snapshot after the run
    assert q1["ram"]["transferred"] == res.transferred
    assert q1["ram"]["duplicate"] == res.duplicate > 0
    assert q1["config"]["channels"] == 2 and len(q1["channels"]) == 2
    assert q1["confirmed-bytes"] == q1["ram"]["transferred"]
    assert isinstance(res, MigrationResult)
    d = res.to_dict()
    assert d["status"] == "completed" and d["total-time"] == res.total_time
    import json

    assert json.loads(res.to_json())["verified"] is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.rounds = 3  # frozen


def test_a_failing_event_callback_does_not_break_the_migration():
    def boom(event):
        raise RuntimeError("callback bug")

    cfg = MigrationConfig(channels=1, start_method="fork")
    with GuestRAM.create({"a": 1 << 20}) as s, GuestRAM.create({"a": 1 << 20}) as d:
        with Destination(d, config=cfg) as dst, Source(s, cfg, on_event=boom) as src:
            assert src.migrate(dst.address).status == "completed"
            dst.wait(10)


def test_worker_log_records_reach_the_agent(caplog):
    cfg = MigrationConfig(channels=2, start_method="spawn")
    with caplog.at_level(logging.DEBUG, logger="mpmultifd"):
        with GuestRAM.create({"a": 1 << 20}) as s, GuestRAM.create({"a": 1 << 20}) as d:
            with Destination(d, config=cfg) as dst, Source(s, cfg) as src:
                src.migrate(dst.address)
                dst.wait(10)
    worker_lines = [r.getMessage() for r in caplog.records if r.name == "mpmultifd.worker"]
    assert any("sender worker 1 started" in m for m in worker_lines)
    assert any("receiver worker 0 started" in m for m in worker_lines)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name == "mpmultifd.source"]
    assert any("-> active" in m for m in infos) and any(m.startswith("round 0") for m in infos)
    # the library installs no handler of its own: only a NullHandler, which keeps logging's
    # last-resort handler from printing warnings the agent did not ask for
    handlers = logging.getLogger("mpmultifd").handlers
    assert [type(h) for h in handlers] == [logging.NullHandler]


def test_no_logging_configured_prints_nothing(tmp_path):
    """Without logging configured, a failed migration writes nothing to stderr (no last-resort handler)."""
    import subprocess
    import sys

    code = (
        "from mpmultifd import GuestRAM, MigrationConfig, MigrationError, Source\n"
        "import socket\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "with GuestRAM.create({'a': 1 << 20}) as r, Source(r, MigrationConfig(channels=1)) as src:\n"
        "    try:\n"
        "        src.migrate(('127.0.0.1', port))\n"
        "    except MigrationError:\n"
        "        print('failed as expected')\n"
    )
    root = __file__.rsplit("/tests/", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "PYTHONPATH": root})
    assert proc.stdout.strip() == "failed as expected", proc.stderr
    assert proc.stderr == ""


def test_progress_display_plain_lines_when_not_a_terminal():
    samples = iter(
        [
            {"status": "active", "progress": p, "rounds": r, "confirmed-bytes": 0, "expected-downtime": 5,
             "ram": {"transferred": 1 << 20, "remaining": 0, "mbps": 100.0, "dirty-pages-rate": 10}}
            for p, r in ((10.0, 0), (50.0, 1), (99.0, 2), (99.0, 2))
        ]
    )
    last = {}

    def query():
        nonlocal last
        last = next(samples, last)
        return last

    out = io.StringIO()
    with ProgressDisplay(query, out, interval=0.01, tty=False):
        time.sleep(0.1)
    lines = out.getvalue().splitlines()
    assert lines and all("round" in line and "expected downtime" in line for line in lines)
    assert len(lines) == len(set(lines))  # unchanged figures are not repeated


def test_destination_events_follow_the_migration():
    """The destination reports QEMU-style events too: its status changes and each round's barrier."""
    cfg = MigrationConfig(
        channels=2, start_method="fork", downtime_limit=0.002, max_rounds=4, stall_downtime_limit=math.inf
    )
    got: list[dict] = []
    with GuestRAM.create(BLOCKS) as s, GuestRAM.create(BLOCKS) as d:
        try:
            fill(s, "random", 2)
            with Destination(d, config=cfg, on_event=got.append) as dst:
                stream = dst.events(timeout=30)
                with DirtyingWriter(s.name, rate=5000, start_method="fork") as writer, Source(s, cfg) as src:
                    res = src.migrate(dst.address, pause=writer.pause)
                assert dst.wait(10).status == "completed"
                streamed = list(stream)  # ends by itself after the terminal status
        finally:
            s.unlink()
            d.unlink()
    statuses = [e["status"] for e in got if e["event"] == "MIGRATION"]
    assert statuses == ["active", "device", "completed"]
    passes = [e for e in got if e["event"] == "MIGRATION_PASS"]
    assert [e["round"] for e in passes] == list(range(res.rounds - 1))  # every precopy round, in order
    assert all(b["transferred"] >= a["transferred"] for a, b in zip(passes, passes[1:]))
    assert [e for e in streamed if e["event"] == "MIGRATION"][-1]["status"] == "completed"
