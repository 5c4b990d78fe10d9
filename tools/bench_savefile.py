#!/usr/bin/env python3
"""Save and restore speed through a file, next to ``cp`` of a file of the same size on the same disk.

For each channel count, each run:

- **save**: ``Source.save(path)`` of a filled region (paused guest: one pass plus
  an empty final round, the digests, fsync, the complete mark); GB/s of region.
- **restore**: ``checkpoint.restore(path, ram)`` into a fresh region (every page
  checked against its digest unless ``--no-verify``); GB/s of region.
- **cp**: ``cp`` of a plain file holding the same bytes (written once, up front)
  to a new file in the same directory, then ``sync`` of that file, so it pays
  the same fsync the save does; GB/s.

With ``--drop-caches`` (root) the page cache is dropped before every restore and
every cp, so both read from the disk rather than from memory. Runs alternate in
one loop so all three see the same machine state; medians are printed::

    python tools/bench_savefile.py --size 1G --channels 1,2,4 --runs 3 --dir /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd import GuestRAM, MigrationConfig, Source  # noqa: E402
from mpmultifd.checkpoint import restore  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.testing import CONTENTS, fill  # noqa: E402


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1G"))
    p.add_argument("--channels", default="1,2,4")
    p.add_argument("--content", choices=CONTENTS, default="random")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go (the disk under test)")
    p.add_argument("--direct", action="store_true", help="save and restore with O_DIRECT")
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before reads (root)")
    p.add_argument("--start-method", default="forkserver")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    channels = [int(c) for c in a.channels.split(",")]
    gib = a.size / (1 << 30)
    print(f"# {' '.join(sys.argv)}")
    print(f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, files in {a.dir}")
    rows: dict[int, dict[str, list[float]]] = {c: {"save": [], "restore": [], "cp": []} for c in channels}
    plain = os.path.join(a.dir, f"mpm-bench-plain-{os.getpid()}")
    saved = os.path.join(a.dir, f"mpm-bench-save-{os.getpid()}.mpsave")
    copied = os.path.join(a.dir, f"mpm-bench-cp-{os.getpid()}")
    with GuestRAM.create({"pc.ram": a.size}) as src, GuestRAM.create({"pc.ram": a.size}) as dst:
        try:
            fill(src, a.content, 1)
            with open(plain, "wb") as f:
                f.write(src.view("pc.ram").data)
                os.fsync(f.fileno())
            for run in range(a.runs):
                for c in channels:
                    cfg = MigrationConfig(channels=c, start_method=a.start_method)
                    with Source(src, cfg) as s:
                        t0 = time.perf_counter()
                        res = s.save(saved, direct=a.direct)
                        rows[c]["save"].append(time.perf_counter() - t0)
                    if a.drop_caches:
                        drop_caches()
                    dst.view("pc.ram")[:] = 0
                    t0 = time.perf_counter()
                    restore(saved, dst, cfg, verify=a.verify, direct=a.direct)
                    rows[c]["restore"].append(time.perf_counter() - t0)
                    if a.drop_caches:
                        drop_caches()
                    t0 = time.perf_counter()
                    subprocess.run(["cp", plain, copied], check=True)
                    subprocess.run(["sync", copied], check=True)
                    rows[c]["cp"].append(time.perf_counter() - t0)
                    os.unlink(copied)
                    print(
                        f"run {run} ch {c}: save {gib / rows[c]['save'][-1]:.2f} GB/s "
                        f"({res.allocated >> 20} MiB on disk), restore {gib / rows[c]['restore'][-1]:.2f}, "
                        f"cp {gib / rows[c]['cp'][-1]:.2f}",
                        flush=True,
                    )
        finally:
            for f in (plain, saved, copied):
                try:
                    os.unlink(f)
                except OSError:
                    pass
            src.unlink()
            dst.unlink()
    out = {}
    print(f"\n{a.size >> 20} MiB, {a.content}, medians of {a.runs} (GiB/s of region; cp includes sync of the copy)\n")
    print("| channels | save | restore | cp + sync | save / cp | restore / cp |")
    print("|---|---|---|---|---|---|")
    for c in channels:
        m = {k: gib / statistics.median(v) for k, v in rows[c].items()}
        out[c] = m
        print(f"| {c} | {m['save']:.2f} | {m['restore']:.2f} | {m['cp']:.2f} | "
              f"{m['save'] / m['cp']:.2f} | {m['restore'] / m['cp']:.2f} |")
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
