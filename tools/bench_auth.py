#!/usr/bin/env python3
"""What integrity costs: the same migration without a key, with a key, and without verification.

With a key every connection is admitted by HMAC challenge-response and every
control frame carries an HMAC tag; verification fingerprints are keyed in
either case (with no key the key derivation is public). So "key" against "no
key" measures the admission and the control tags, and "verify off" against
"no key" what the per-page fingerprints (senders' records, receivers' records,
the comparison) cost. Runs alternate variant by variant; medians of wall time
and of the CPU seconds of this process and its children (getrusage), and the
switchover's downtime.

Example::

    python tools/bench_auth.py --size 256M --runs 5
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd import Destination, GuestRAM, MigrationConfig, Source  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.testing import CONTENTS, fill  # noqa: E402

from toolkit import fmt_size, log, machine_header, print_end, raise_interrupt  # noqa: E402

VARIANTS = {
    "no key": {},
    "key": {"auth_key": b"k" * 32},
    "verify off": {"verify": False},
}


def cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("256M"))
    p.add_argument("--content", default="random", choices=CONTENTS)
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, raise_interrupt)
    doc: dict = {"machine": machine_header(), "size": a.size, "runs": {k: [] for k in VARIANTS}}
    t_all = time.monotonic()
    with GuestRAM.create({"pc.ram": a.size}) as src_ram:
        try:
            fill(src_ram, a.content, 1)
            for run in range(a.runs):
                for name, extra in VARIANTS.items():
                    cfg = MigrationConfig(channels=a.channels, start_method="fork", **extra)
                    with GuestRAM.create({"pc.ram": a.size}) as dst_ram:
                        try:
                            c0, t0 = cpu(), time.monotonic()
                            with Destination(dst_ram, config=cfg) as dst, Source(src_ram, cfg) as src:
                                res = src.migrate(dst.address)
                                dst.wait(60)
                            wall, used = time.monotonic() - t0, cpu() - c0
                        finally:
                            dst_ram.unlink()
                    doc["runs"][name].append({"wall": wall, "cpu": used, "downtime": res.downtime})
                    log(
                        f"run {run + 1} {name}: {wall:.3f} s wall, {used:.2f} CPU-s, "
                        f"downtime {res.downtime * 1000:.0f} ms"
                    )
        finally:
            src_ram.unlink()
    if not a.json:
        for k, v in doc["machine"].items():
            print(f"# {k}: {v}")
        print(f"# {fmt_size(a.size)} {a.content}, {a.channels} channels, loopback, {a.runs} alternating runs, medians")
        print("| variant | wall s | CPU s | downtime ms | wall vs no key | CPU vs no key |")
        print("|---|---|---|---|---|---|")
        base = doc["runs"]["no key"]
        bw = statistics.median(r["wall"] for r in base)
        bc = statistics.median(r["cpu"] for r in base)
        for name, rows in doc["runs"].items():
            w = statistics.median(r["wall"] for r in rows)
            c = statistics.median(r["cpu"] for r in rows)
            d = statistics.median(r["downtime"] for r in rows)
            print(f"| {name} | {w:.3f} | {c:.2f} | {d * 1000:.0f} | {w / bw:.2f}x | {c / bc:.2f}x |")
    doc["wall_time"] = time.monotonic() - t_all
    print_end(doc, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
