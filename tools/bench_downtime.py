#!/usr/bin/env python3
"""Downtime against the limit for growing regions, with a writer at the demo's rates.

For every region size, dirty tracker and writer rate, ``--runs`` migrations
(interleaved) of a demo-shaped region (``pc.ram`` 3/4, ``vga.vram`` 1/4,
``--content``) dirtied by a ``DirtyingWriter`` process, to a destination in a
process of its own, with the default configuration (``downtime_limit`` 0.3 s,
``verify`` on, no ``stall_downtime_limit``). Each run prints the limit, the
expected downtime the source switched over on, the measured downtime and its
phases (``MigrationResult.downtime_phases``), or the refusal: a migration whose
pause alone would exceed the limit must fail with ``ConvergenceError`` before
pausing, never overrun it. The map tracker's writer marks its pages; the scan
tracker's writer marks nothing (``mark=False``), as a guest would.

The downtime includes ``writer.pause()`` (the writer wakes from its sleep between
groups of 16 writes: up to 16/rate s), shown as ``pause-call``.

Example::

    python tools/bench_downtime.py --sizes 256M,1G,4G --trackers map,scan --rates 5000,20000 --runs 3
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd import ConvergenceError, GuestRAM, MigrationConfig, MigrationError, Source  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.testing import CONTENTS, DirtyingWriter, RemoteDestination, fill  # noqa: E402

from toolkit import fmt_size, log, machine_header, print_end, raise_interrupt  # noqa: E402


def one_run(size: int, tracker: str, rate: float, a: argparse.Namespace, seed: int) -> dict:
    main = size * 3 // 4 // 4096 * 4096
    blocks = {"pc.ram": main, "vga.vram": (size - main) // 4096 * 4096}
    cfg = MigrationConfig(channels=a.channels, dirty_tracker=tracker, start_method=a.start_method)
    row: dict = {"size": size, "tracker": tracker, "rate": rate, "limit": cfg.downtime_limit}
    with GuestRAM.create(blocks) as src_ram, GuestRAM.create(blocks) as dst_ram:
        try:
            fill(src_ram, a.content, seed=seed)
            with RemoteDestination(dst_ram.name, cfg, start_method=cfg.start_method) as dest:
                with DirtyingWriter(
                    src_ram.name, rate=rate, seed=seed, start_method=cfg.start_method, mark=tracker == "map"
                ) as writer:
                    with Source(src_ram, cfg) as src:
                        t0 = time.monotonic()
                        try:
                            res = src.migrate(dest.address, pause=writer.pause)
                        except ConvergenceError as e:
                            row.update(outcome="refused", expected=e.expected_downtime, rounds=e.rounds,
                                       paused=writer.pauses > 0, why=str(e).split(";")[0])
                            return row
                        except MigrationError as e:
                            row.update(outcome="failed", why=str(e)[:200], paused=writer.pauses > 0)
                            return row
                        row["total"] = time.monotonic() - t0
                try:
                    dest.result(timeout=60)
                except MigrationError as e:
                    row.update(outcome="failed", why=f"destination: {e}"[:200])
                    return row
            same = all(np.array_equal(src_ram.view(b.index), dst_ram.view(b.index)) for b in src_ram.blocks)
            row.update(
                outcome="completed" if same else "DIFFERENT",
                expected=res.expected_downtime,
                downtime=res.downtime,
                rounds=res.rounds,
                converged=res.converged,
                repaired=res.repaired_pages,
                phases=res.downtime_phases,
            )
            return row
        finally:
            src_ram.unlink()
            dst_ram.unlink()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256M,1G,4G")
    p.add_argument("--trackers", default="map,scan")
    p.add_argument("--rates", default="5000,20000", help="writer writes/s (the demo's default is 5000)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--content", default="half-zero", choices=CONTENTS)
    p.add_argument("--start-method", default="forkserver")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, raise_interrupt)
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    trackers = a.trackers.split(",")
    rates = [float(r) for r in a.rates.split(",")]
    doc = {"machine": machine_header(), "runs": []}
    if not a.json:
        for k, v in doc["machine"].items():
            print(f"# {k}: {v}")
        print(
            f"# {a.runs} runs per row, interleaved; {a.channels} channels; content {a.content}; limit 0.3 s (default)"
        )
    t_all = time.monotonic()
    for size in sizes:
        for run in range(a.runs):
            for tracker in trackers:
                for rate in rates:
                    log(f"{fmt_size(size)} {tracker} {rate:g}/s run {run + 1}")
                    row = one_run(size, tracker, rate, a, seed=run + 1)
                    doc["runs"].append(row)
                    if not a.json:
                        phases = " ".join(f"{k}={v * 1000:.0f}" for k, v in row.get("phases", {}).items())
                        print(
                            f"{fmt_size(size):>6} {tracker:5} {rate:>7g}/s run {run + 1}: {row['outcome']:9} "
                            f"limit {row['limit'] * 1000:.0f} ms, expected "
                            f"{row.get('expected', float('nan')) * 1000:.0f} ms, measured "
                            f"{row.get('downtime', float('nan')) * 1000:.0f} ms"
                            + (f", rounds {row['rounds']}" if "rounds" in row else "")
                            + (f", repaired {row['repaired']}" if row.get("repaired") else "")
                            + (f" [{phases}]" if phases else "")
                            + (f" ({row['why']})" if "why" in row else ""),
                            flush=True,
                        )
    if not a.json:
        print(
            "\n| size | tracker | writes/s | completed | refused before pausing "
            "| downtime median (ms) | expected median (ms) | over the limit |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for size in sizes:
            for tracker in trackers:
                for rate in rates:
                    rows = [r for r in doc["runs"] if (r["size"], r["tracker"], r["rate"]) == (size, tracker, rate)]
                    done = [r for r in rows if r["outcome"] == "completed"]
                    refused = [r for r in rows if r["outcome"] == "refused"]
                    dts = [r["downtime"] for r in done]
                    exp = [r["expected"] for r in done]
                    over = sum(1 for r in done if r["downtime"] > r["limit"])
                    med = f"{statistics.median(dts) * 1000:.0f}" if dts else "-"
                    emed = f"{statistics.median(exp) * 1000:.0f}" if exp else "-"
                    print(
                        f"| {fmt_size(size)} | {tracker} | {rate:g} | {len(done)}/{len(rows)} | {len(refused)} "
                        f"| {med} | {emed} | {over} |"
                    )
    doc["wall_time"] = time.monotonic() - t_all
    print_end(doc, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
