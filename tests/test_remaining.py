"""query()['expected-remaining'] and the progress line's time left."""

from __future__ import annotations

import threading

from mpmultifd import Destination, MigrationConfig, Source
from mpmultifd.progress import describe
from mpmultifd.testing import fill

BLOCKS = {"a": 8 << 20}


def test_expected_remaining_while_migrating_and_zero_at_the_end(regions):
    src_ram, dst_ram = regions
    fill(src_ram, "random", 41)
    cfg = MigrationConfig(channels=1, max_bandwidth=4 << 20)  # about 2 s: many polls see it active
    seen: list[int] = []
    with Destination(dst_ram, config=cfg) as dst, Source(src_ram, cfg) as src:
        assert "expected-remaining" not in src.query()  # nothing sent yet: no estimate
        done = threading.Event()

        def poll():
            while not done.wait(0.05):
                q = src.query()
                if q["status"] == "active" and "expected-remaining" in q:
                    seen.append(q["expected-remaining"])

        t = threading.Thread(target=poll)
        t.start()
        try:
            src.migrate(dst.address)
        finally:
            done.set()
            t.join()
        dst.wait(30)
        final = src.query()
    assert seen, "no estimate while the migration was active"
    assert all(isinstance(v, int) and v >= 0 for v in seen)
    assert max(seen) > 0
    assert final["expected-remaining"] == 0


def test_progress_line_shows_time_left():
    q = {"rounds": 1, "confirmed-bytes": 0, "expected-downtime": 12, "expected-remaining": 75_000,
         "ram": {"transferred": 1 << 20, "remaining": 1 << 20, "mbps": 100.0, "dirty-pages-rate": 5}}
    assert "about 1:15 min left" in describe(q)
    q["expected-remaining"] = 2_500
    assert "about 2.5 s left" in describe(q)
    del q["expected-remaining"]
    assert "left" not in describe(q)
