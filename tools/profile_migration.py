#!/usr/bin/env python3
"""Where a migration's CPU time goes: py-spy over the coordinator and every worker, summarised by role.

Runs one migration of a filled region (both ends in this process, workers from
a warm pool so start-up is not in the picture) under ``py-spy record
--subprocesses`` and prints, for each process role (coordinator, sender,
receiver), the share of samples per leaf function: the Python line on top of
the stack, where ``recv_into``, ``sendmsg``, ``pwrite`` and numpy calls stand
for the system calls and C loops they run. py-spy must be installed
(``pip install py-spy``); the tool installs nothing::

    python tools/profile_migration.py --size 1G --channels 2 --content half-zero
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def run_migration(size: int, channels: int, content: str, compression: str, prefault: bool = False) -> None:
    from mpmultifd import Destination, GuestRAM, MigrationConfig, Source, WorkerPool
    from mpmultifd.testing import fill

    cfg = MigrationConfig(channels=channels, compression=compression, verify=False)
    with GuestRAM.create({"pc.ram": size}) as src, GuestRAM.create({"pc.ram": size}) as dst, WorkerPool(
        2 * channels
    ) as pool:
        try:
            fill(src, content, 1)
            time.sleep(0.5)  # a quiet gap that separates filling from the migration in the samples
            with (
                Destination(dst, config=cfg, pool=pool, prefault=prefault, prepare_receivers=prefault) as d,
                Source(src, cfg, pool=pool) as s,
            ):
                d.wait_prepared()  # allocated, receivers prepared: before the timing, as an agent would
                t0 = time.perf_counter()
                r = s.migrate(d.address)
                d.wait(60)
                print(
                    f"migrated {size >> 20} MiB in {time.perf_counter() - t0:.3f} s "
                    f"({r.transferred >> 20} MiB on the wire)",
                    flush=True,
                )
        finally:
            src.unlink()
            dst.unlink()


def role(frames: list[str]) -> str:
    text = ";".join(frames)
    if "_run_sender" in text:
        return "sender"
    if "_run_receiver" in text:
        return "receiver"
    if "_pool_worker_main" in text:
        return "pool (idle)"
    if "fill (" in text:
        return "filling (not the migration)"
    if "Destination" in text or "_serve_session" in text:
        return "destination coordinator"
    if "Source" in text or "_precopy" in text or "_send_round" in text:
        return "source coordinator"
    return "other"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1G")
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--content", default="half-zero")
    p.add_argument("--compression", default="none")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--prefault", action="store_true",
                   help="Destination(prefault=True, prepare_receivers=True): allocated region and prepared "
                        "receivers, before the timing")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    from mpmultifd.cli import parse_size

    size = parse_size(a.size)
    if a.child:
        run_migration(size, a.channels, a.content, a.compression, a.prefault)
        return 0
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    print(f"# {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "profile.raw")
        cmd = [pyspy, "record", "--subprocesses", "--rate", str(a.rate), "--format", "raw", "-o", raw, "--",
               sys.executable, os.path.abspath(__file__), "--child", "--size", a.size, "--channels", str(a.channels),
               "--content", a.content, "--compression", a.compression] + (["--prefault"] if a.prefault else [])
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        by_role: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        with open(raw) as f:
            for line in f:
                stack, n = line.rstrip().rsplit(" ", 1)
                frames = stack.split(";")
                leaf = re.sub(r" \(/.*/", " (", frames[-1])
                by_role[role(frames)][leaf] += int(n)
    total = sum(sum(c.values()) for c in by_role.values())
    print(f"{total} samples at {a.rate}/s (busy time only; idle waits are not sampled)\n")
    for r, counter in sorted(by_role.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(counter.values())
        print(f"## {r}: {n} samples ({100 * n / total:.0f}%)")
        for leaf, k in counter.most_common(a.top):
            print(f"  {100 * k / n:5.1f}%  {leaf}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
