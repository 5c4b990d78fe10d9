#!/usr/bin/env python3
"""Prepared receivers against pwrite receivers, end to end, side by side.

Both destinations are ``Destination(prefault=True)`` with a warm ``WorkerPool``
and are ready before the timing; one also has ``prepare_receivers=True``, so
its receivers have populated the region's mapping and receive straight into
it, while the other's receive into a buffer and ``pwrite`` into the file. The
source is the same pooled ``Source`` for both. The variants alternate run by
run; medians, with each side's receiver and sender busy time per channel::

    python tools/bench_prepared.py --size 1G --channels 1,2,4 --contents random,half-zero --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd import Destination, GuestRAM, MigrationConfig, Source, WorkerPool  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.testing import fill  # noqa: E402


def once(src: GuestRAM, size: int, cfg: MigrationConfig, dpool: WorkerPool, spool: WorkerPool, prepared: bool) -> dict:
    with GuestRAM.create({"pc.ram": size}) as dst:
        try:
            with Destination(dst, config=cfg, pool=dpool, prefault=True, prepare_receivers=prepared) as d, Source(
                src, cfg, pool=spool
            ) as s:
                t = time.perf_counter()
                d.wait_prepared()
                prep = time.perf_counter() - t
                t0 = time.perf_counter()
                r = s.migrate(d.address)
                elapsed = time.perf_counter() - t0
                dr = d.wait(120)
                assert d.query()["prepared-receivers"] == (cfg.channels if prepared else 0)
            return {
                "time": elapsed,
                "prepare": prep,
                "recv_busy": statistics.mean(c["busy-ns"] for c in dr.per_channel) / 1e9,
                "send_busy": statistics.mean(c["busy-ns"] for c in r.per_channel) / 1e9,
            }
        finally:
            dst.unlink()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1G")
    p.add_argument("--channels", default="1,2,4")
    p.add_argument("--contents", default="random,half-zero")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    size = parse_size(a.size)
    print(f"# {' '.join(sys.argv)}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"# {size >> 20} MiB, verify off, medians of {a.runs}; busy: mean per channel, seconds")
    print(f"{'content':<10} {'ch':>2} {'pwrite s':>9} {'prepared s':>11} {'ratio':>6} "
          f"{'recv busy':>10} {'-> prep':>8} {'send busy':>10} {'-> prep':>8} {'prepare s':>10}")
    for content in a.contents.split(","):
        with GuestRAM.create({"pc.ram": size}) as src:
            try:
                fill(src, content, 1)
                for ch in (int(c) for c in a.channels.split(",")):
                    cfg = MigrationConfig(channels=ch, verify=False)
                    with WorkerPool(ch) as spool, WorkerPool(ch) as dpool:
                        runs: dict[bool, list[dict]] = {False: [], True: []}
                        for _ in range(a.runs):
                            for prepared in (False, True):
                                runs[prepared].append(once(src, size, cfg, dpool, spool, prepared))
                    m = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
                    print(f"{content:<10} {ch:>2} {m[False]['time']:>9.3f} {m[True]['time']:>11.3f} "
                          f"{m[False]['time'] / m[True]['time']:>6.2f} {m[False]['recv_busy']:>10.3f} "
                          f"{m[True]['recv_busy']:>8.3f} {m[False]['send_busy']:>10.3f} {m[True]['send_busy']:>8.3f} "
                          f"{m[True]['prepare']:>10.3f}", flush=True)
            finally:
                src.unlink()
    print("\nratio = pwrite s / prepared s (> 1: prepared faster). prepare s: allocation plus preparing, before "
          "the timing (the pwrite side's allocation alone is not shown)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
