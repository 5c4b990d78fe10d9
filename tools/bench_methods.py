#!/usr/bin/env python3
"""Payload methods side by side: zero-page detection speed and migration throughput per method.

Part 1 measures, in one process (one worker's view), how fast the channel
worker's zero-page detection scans a region, against the memory read
bandwidth measured the same way on the same region.

Part 2 migrates the same region with each method (``none``, ``lz4``,
``zstd`` levels, ``zlib``, ``auto``) on half-zero and random content,
interleaved run by run, and prints medians of throughput and bytes on the wire.

Example::

    python tools/bench_methods.py --size 512M --channels 2 --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd import GuestRAM  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.testing import fill  # noqa: E402
from mpmultifd.zeropage import nonzero_pages  # noqa: E402

from bench import migrate_once, warm_up  # noqa: E402

METHODS = ["none", "lz4", "zstd:1", "zstd:3", "zlib", "auto"]


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _detection_times(ram: GuestRAM) -> tuple[float, float]:
    """Best-of times of a plain read and of zero-page detection over ``ram`` (its views die with this call)."""
    words = ram.pages(0).view(np.uint64)
    flat = ram.view(0).view(np.uint64)
    npages = len(words)

    def read_all() -> None:
        # a plain streaming read of the region: the memory read bandwidth reference
        np.bitwise_or.reduce(flat)

    def detect() -> None:
        # exactly what a channel worker does, batch by batch (128 pages)
        for first in range(0, npages, 128):
            nonzero_pages(words, np.arange(first, min(first + 128, npages)))

    read_all(), detect()
    return best_of(read_all), best_of(detect)


def zero_detection(size: int) -> None:
    print("zero-page detection, one process, best of 5 passes")
    print(f"{'content':<10} {'read GB/s':>10} {'detect GB/s':>12} {'ratio':>6}")
    for content in ("zero", "half-zero", "random"):
        with GuestRAM.create({"a": size}) as ram:
            fill(ram, content, seed=1)
            t_read, t_detect = _detection_times(ram)
        print(f"{content:<10} {size / t_read / 1e9:>10.2f} {size / t_detect / 1e9:>12.2f} {t_read / t_detect:>6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("512M"))
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--content", default="half-zero,random,mixed")
    p.add_argument("--start-method", default="forkserver")
    args = p.parse_args()
    args.verify = False
    args.compression = "none"
    zero_detection(args.size)
    print()
    warm_up(2 * args.size)
    methods = [(m.split(":")[0], int(m.split(":")[1]) if ":" in m else None) for m in args.methods.split(",")]
    print(f"migration, {args.size / (1 << 20):.0f} MiB, {args.channels} channels, {args.runs} runs each (medians)")
    print(
        f"{'content':<10} {'method':<8} {'GB/s':>6} {'wire MiB':>9} {'wire %':>7} "
        f"{'compressed':>11} {'raw':>6} {'x none':>7}"
    )
    for content in args.content.split(","):
        with GuestRAM.create({"a": args.size}) as src:
            fill(src, content, seed=3)
            results: dict[tuple[str, int | None], list[dict]] = {m: [] for m in methods}
            for _ in range(args.runs):
                for m in methods:
                    results[m].append(migrate_once(src, args.channels, args, m[0], m[1]))
            base = statistics.median(r["time"] for r in results[methods[0]])
            for (name, level), runs in results.items():
                t = statistics.median(r["time"] for r in runs)
                wire = statistics.median(r["wire"] for r in runs)
                label = name if level is None else f"{name}-{level}"
                print(
                    f"{content:<10} {label:<8} {args.size / t / 1e9:>6.2f} {wire / (1 << 20):>9.0f} "
                    f"{100 * wire / args.size:>6.1f}% {int(statistics.median(r['compressed'] for r in runs)):>11} "
                    f"{int(statistics.median(r['raw'] for r in runs)):>6} {base / t:>7.2f}"
                )


if __name__ == "__main__":
    main()
