#!/usr/bin/env python3
"""Setup time with fresh channel workers against a warm WorkerPool, side by side.

Each run migrates the same small region (so setup dominates) once with workers
started for the migration and once with workers borrowed from a pool, under
every start method asked for; the table shows median setup time (connect,
admission, workers attached to their rings) and total time::

    python tools/bench_pool.py --size 64M --channels 2,4 --start-methods forkserver,spawn --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd import Destination, GuestRAM, MigrationConfig, Source, WorkerPool  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.testing import fill  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, default=parse_size("64M"))
    p.add_argument("--channels", default="2,4")
    p.add_argument("--start-methods", default="forkserver,spawn")
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    print(f"# {' '.join(sys.argv)}")
    print(f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    rows = []
    with GuestRAM.create({"pc.ram": a.size}) as src, GuestRAM.create({"pc.ram": a.size}) as dst:
        try:
            fill(src, "half-zero", 1)
            for method in a.start_methods.split(","):
                for ch in (int(c) for c in a.channels.split(",")):
                    cfg = MigrationConfig(channels=ch, start_method=method, verify=False)
                    with WorkerPool(2 * ch, start_method=method) as pool:
                        times: dict[str, list[tuple[float, float]]] = {"fresh": [], "pooled": []}
                        for _ in range(a.runs):
                            for kind, use in (("fresh", None), ("pooled", pool)):
                                with Destination(dst, config=cfg, pool=use) as d, Source(src, cfg, pool=use) as s:
                                    r = s.migrate(d.address)
                                    d.wait(60)
                                times[kind].append((r.setup_time, r.total_time))
                    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
                           for k, v in times.items()}
                    rows.append((method, ch, med))
                    print(f"{method} {ch} ch: fresh setup {med['fresh'][0] * 1000:.1f} ms, "
                          f"pooled {med['pooled'][0] * 1000:.1f} ms", flush=True)
        finally:
            src.unlink()
            dst.unlink()
    print(f"\n{a.size >> 20} MiB region, medians of {a.runs} runs\n")
    print("| start method | channels | setup fresh (ms) | setup pooled (ms) | total fresh (ms) | total pooled (ms) |")
    print("|---|---|---|---|---|---|")
    for method, ch, m in rows:
        print(f"| {method} | {ch} | {m['fresh'][0] * 1000:.1f} | {m['pooled'][0] * 1000:.1f} | "
              f"{m['fresh'][1] * 1000:.0f} | {m['pooled'][1] * 1000:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
