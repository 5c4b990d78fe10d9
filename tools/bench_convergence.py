#!/usr/bin/env python3
"""Live-migration convergence: downtime against downtime_limit, and what finding dirty pages costs.

Part 1 migrates a region while a ``DirtyingWriter`` process keeps writing it
(and marking the dirty map, tracker ``map``), over a link fixed by
``max_bandwidth`` (default 100 MB/s), so "the writer dirties 5 % of the link"
means the same thing on a noisy 2-vCPU VM as on a quiet machine. For every
fraction of the link the writer's rate (writes/s) is calibrated first: the
dirty rate of a trial writer is measured with ``Source.estimate()`` and the
rate scaled until it is within 10 % of the target (the measured rate is what
the table reports). Then, for every ``downtime_limit``, ``--runs`` migrations
run (interleaved run by run) with ``pause=writer.pause`` and
``stall_downtime_limit=math.inf``: a migration that does not converge (stall or
``max_rounds``) still switches over, so its downtime shows how far above the
limit it lands. No ``throttle`` callback unless ``--auto-converge``. The
downtime includes ``writer.pause()``, which waits for the test writer to wake
from its sleep between groups of 16 writes (up to 16/rate seconds); the table
shows that wait and the downtime without it too.

Part 2 times the dirty trackers on an idle region: ``ScanningTracker.start()``
and the median of several ``collect()`` passes over every block, per GiB of
region and per GiB of allocated data (the pages that are not holes, which is
all the scanner reads), next to the ``map`` tracker's collect and the
``kernel`` tracker's (userfaultfd + PAGEMAP_SCAN) when this kernel has it.
Contents: ``random``, ``half-zero`` (written, half of the pages zeros) and
``sparse`` (only 10 % of the pages ever written, at random places, so 90 % of
the region is holes; ``sparse:N`` writes runs of N pages instead of single ones).

Example::

    python tools/bench_convergence.py --size 256M --runs 3 --scan-sizes 256M,1G
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd import GuestRAM, MigrationConfig, MigrationError, Source  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.testing import CONTENTS, DirtyingWriter, RemoteDestination, fill  # noqa: E402
from mpmultifd.tracking import make_tracker  # noqa: E402

from bench import warm_up  # noqa: E402
from toolkit import fmt_size, log, machine_header, print_end, raise_interrupt  # noqa: E402

MB = 1e6
GIB = 1 << 30
# a write is 1 byte..3 pages at a random offset: it touches 1 + (length-1)/page_size
# pages on average, about 2.5; only the first guess of the calibration uses this
PAGES_PER_WRITE_GUESS = 2.5


def kernel_tracker_status() -> tuple[bool, str]:
    try:
        from mpmultifd.uffd import kernel_tracking_available
    except ImportError as e:
        return False, f"mpmultifd.uffd not importable: {e}"
    try:
        got = kernel_tracking_available()
    except Exception as e:  # the probe itself failed
        return False, f"probe failed: {type(e).__name__}: {e}"
    if isinstance(got, tuple):
        return bool(got[0]), str(got[1])
    return bool(got), ""


# --------------------------------------------------------------------------- part 1


@contextlib.contextmanager
def running_writer(src: GuestRAM, rate: float, seed: int, args: argparse.Namespace) -> Iterator[DirtyingWriter]:
    """A started DirtyingWriter, closed however the block ends (also when ``start()`` itself is interrupted)."""
    writer = DirtyingWriter(src.name, seed=seed, rate=rate, start_method=args.start_method)
    try:
        writer.start()
        yield writer
    finally:
        writer.close()


def stop_helpers(grace: float = 2.0) -> None:
    """End the destination and writer processes this process started that are still running.

    Only for an interrupted run: a destination whose source left exits by itself
    within ``grace``; one the source never connected to would wait for it. The
    Source's own channel workers are not touched (the Source reaps them).
    """
    for proc in multiprocessing.active_children():
        if proc.name not in ("mpmultifd-destination", "mpmultifd-writer"):
            continue
        proc.join(grace)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def config(args: argparse.Namespace, limit: float) -> MigrationConfig:
    return MigrationConfig(
        channels=args.channels,
        downtime_limit=limit,
        max_bandwidth=args.link,
        dirty_tracker="map",
        stall_downtime_limit=math.inf,
        verify=args.verify,
        start_method=args.start_method,
    )


def measure_dirty_rate(src: GuestRAM, rate: float, args: argparse.Namespace, seed: int) -> float:
    """Bytes/s of distinct pages a writer at ``rate`` writes/s dirties, by ``Source.estimate()``."""
    cfg = config(args, 0.3)
    with running_writer(src, rate, seed, args), Source(src, cfg) as s:
        est = s.estimate(args.calibrate_seconds, interval=0.5)
    return est.dirty_rate


def calibrate(src: GuestRAM, target: float, args: argparse.Namespace) -> dict:
    """The writer rate (writes/s) whose measured dirty rate is within 10 % of ``target`` bytes/s."""
    rate = target / (PAGES_PER_WRITE_GUESS * src.page_size)
    steps = []
    for step in range(args.calibrate_steps):
        measured = measure_dirty_rate(src, rate, args, seed=1000 + step)
        steps.append((rate, measured))
        log(f"#   calibrate {target / MB:.3g} MB/s: {rate:.0f} writes/s -> {measured / MB:.3g} MB/s")
        if abs(measured - target) <= 0.1 * target or step == args.calibrate_steps - 1:
            break
        rate = rate * (target / measured if measured > 0 else 4.0)
    return {"writes_per_s": rate, "dirty_rate": measured, "steps": steps}


def migrate_once(src: GuestRAM, writes_per_s: float, limit: float, args: argparse.Namespace, seed: int) -> dict:
    """One live migration into a fresh region in a destination process, the writer running until pause."""
    cfg = config(args, limit)
    with GuestRAM.create({b.name: b.size for b in src.blocks}) as dst:
        try:
            with RemoteDestination(dst.name, cfg, start_method=args.start_method) as dest:
                try:
                    with running_writer(src, writes_per_s, seed, args) as writer, Source(src, cfg) as source:
                        waited: list[float] = []

                        def pause() -> None:
                            # writer.pause() returns once the writer stopped: up to one write group
                            # (16 writes, 16/rate seconds) of sleep, which the downtime includes
                            t0 = time.monotonic()
                            writer.pause()
                            waited.append(time.monotonic() - t0)

                        try:
                            res = source.migrate(
                                dest.address,
                                pause=pause,
                                throttle=writer.throttle if args.auto_converge else None,
                            )
                        except MigrationError as e:
                            # migrate() reports a Ctrl-C as a MigrationError caused by the KeyboardInterrupt
                            if isinstance(e.__cause__, KeyboardInterrupt):
                                raise KeyboardInterrupt from e
                            raise
                        dest.result()
                        writes = writer.writes
                except BaseException:
                    # a destination the source never reached waits for it; RemoteDestination.close() would
                    # give it 30 s before killing it
                    stop_helpers()
                    raise
        finally:
            dst.unlink()
    return {
        "downtime": res.downtime,
        "pause_wait": waited[0] if waited else 0.0,
        "expected_downtime": res.expected_downtime,
        "rounds": res.rounds,
        "converged": res.converged,
        "stall_reason": res.stall_reason,
        "total_time": res.total_time,
        "setup_time": res.setup_time,
        "dirty_sync_time": res.dirty_sync_time,
        "transferred": res.transferred,
        "throttle": res.throttle,
        "verified": res.verified,
        "writes": writes,
    }


def part1(args: argparse.Namespace) -> dict:
    rows = []
    with GuestRAM.create({"ram": args.size}) as src:
        try:
            fill(src, args.content, seed=7)
            cal = {}
            for f in args.fractions:
                cal[f] = calibrate(src, f * args.link, args)
            runs: dict[tuple[float, float], list[dict]] = {(f, lim): [] for f in args.fractions for lim in args.limits}
            n = 0
            for r in range(args.runs):
                for f in args.fractions:
                    for lim in args.limits:
                        n += 1
                        got = migrate_once(src, cal[f]["writes_per_s"], lim, args, seed=100 * r + n)
                        runs[(f, lim)].append(got)
                        log(f"#   run {r + 1}/{args.runs}: dirty {100 * f:g}% of link, limit {lim:g} s: "
                            f"downtime {1000 * got['downtime']:.1f} ms (pause() {1000 * got['pause_wait']:.1f} ms), "
                            f"{got['rounds']} rounds, "
                            f"converged {got['converged']}, total {got['total_time']:.2f} s")
            for f in args.fractions:
                for lim in args.limits:
                    rs = runs[(f, lim)]
                    down = statistics.median(x["downtime"] for x in rs)
                    net = statistics.median(x["downtime"] - x["pause_wait"] for x in rs)
                    rows.append({
                        "fraction": f,
                        "writes_per_s": cal[f]["writes_per_s"],
                        "dirty_rate": cal[f]["dirty_rate"],
                        "downtime_limit": lim,
                        "downtime_median": down,
                        "downtime_max": max(x["downtime"] for x in rs),
                        "ratio": down / lim,
                        "pause_wait_median": statistics.median(x["pause_wait"] for x in rs),
                        "downtime_less_pause_median": net,
                        "ratio_less_pause": net / lim,
                        "expected_downtime_median": statistics.median(x["expected_downtime"] for x in rs),
                        "rounds_median": statistics.median(x["rounds"] for x in rs),
                        "converged": sum(bool(x["converged"]) for x in rs),
                        "runs": len(rs),
                        "total_time_median": statistics.median(x["total_time"] for x in rs),
                        "all_runs": rs,
                    })
        finally:
            src.unlink()
    return {"calibration": {str(f): c for f, c in cal.items()}, "rows": rows}


def print_part1(res: dict, args: argparse.Namespace) -> None:
    print(f"## 1. Downtime against downtime_limit ({fmt_size(args.size)} {args.content}, {args.channels} channels, "
          f"link max_bandwidth {args.link / MB:g} MB/s, tracker map, verify {args.verify}, "
          f"auto-converge {'on' if args.auto_converge else 'off'}; medians of {args.runs} runs)")
    print()
    print("stall_downtime_limit = inf: a run that does not converge (a stall or max_rounds) still switches over,")
    print("so its downtime shows how far above the limit it lands; 'converged' counts the runs that met the limit")
    print("by the source's own forecast. Downtime is the library's: from the call of pause() to the destination's")
    print("commit (the final round is not paced). It includes pause() itself, which waits for the test writer to")
    print("leave its sleep between groups of 16 writes (up to 16/rate s: 160 ms at 100 writes/s), so the table")
    print("also shows that wait and the downtime without it. 'expected' is the source's forecast at switchover.")
    print()
    print("| dirty % of link | dirty MB/s (measured) | writes/s | downtime_limit s | downtime median ms | "
          "downtime / limit | pause() wait ms | downtime - pause ms | (downtime - pause) / limit | "
          "downtime max ms | expected ms | rounds | converged | total s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        print(f"| {100 * r['fraction']:g}% ({100 * r['dirty_rate'] / args.link:.1f}% measured) "
              f"| {r['dirty_rate'] / MB:.2f} | {r['writes_per_s']:.0f} | {r['downtime_limit']:g} "
              f"| {1000 * r['downtime_median']:.1f} | {r['ratio']:.2f} | {1000 * r['pause_wait_median']:.1f} "
              f"| {1000 * r['downtime_less_pause_median']:.1f} | {r['ratio_less_pause']:.2f} "
              f"| {1000 * r['downtime_max']:.1f} | {1000 * r['expected_downtime_median']:.1f} "
              f"| {r['rounds_median']:g} | {r['converged']}/{r['runs']} | {r['total_time_median']:.2f} |")
    print()


# --------------------------------------------------------------------------- part 2


def fill_content(ram: GuestRAM, content: str, seed: int) -> None:
    if content in CONTENTS:
        fill(ram, content, seed)
        return
    run = int(content.split(":", 1)[1]) if ":" in content else 1
    rng = np.random.default_rng(seed)
    for b in ram.blocks:
        grid = ram.pages(b.index)
        nruns = b.npages // run
        chosen = np.sort(rng.choice(nruns, size=max(1, int(nruns * 0.1)), replace=False))
        pages = (chosen[:, None] * run + np.arange(run)).ravel()
        for s in range(0, len(pages), 4096):
            part = pages[s : s + 4096]
            grid[part] = rng.integers(0, 256, size=(len(part), grid.shape[1]), dtype=np.uint8)


def time_tracker(kind: str, ram: GuestRAM, collects: int) -> dict:
    tracker = make_tracker(kind, ram)
    try:
        t0 = time.perf_counter()
        tracker.start()
        start = time.perf_counter() - t0
        times, found = [], 0
        for _ in range(collects):
            t0 = time.perf_counter()
            got = tracker.collect_all()
            times.append(time.perf_counter() - t0)
            found += sum(len(g) for g in got)
    finally:
        tracker.close()
    return {"start": start, "collect_median": statistics.median(times), "collects": times, "pages_reported": found}


def part2(args: argparse.Namespace, kernel_ok: bool) -> list[dict]:
    rows = []
    kinds = ["scan", "map"] + (["kernel"] if kernel_ok else [])
    for size in args.scan_sizes:
        for content in args.scan_contents:
            with GuestRAM.create({"ram": size}) as ram:
                try:
                    fill_content(ram, content, seed=11)
                    allocated = sum((e - s) * ram.page_size for b in ram.blocks for s, e in ram.data_extents(b.index))
                    extents = sum(len(ram.data_extents(b.index)) for b in ram.blocks)
                    row = {"size": size, "content": content, "allocated": allocated, "extents": extents}
                    for kind in kinds:
                        row[kind] = time_tracker(kind, ram, args.collects)
                    rows.append(row)
                    sc = row["scan"]
                    log(
                        f"#   {fmt_size(size)} {content}: scan start {sc['start']:.3f} s, "
                        f"collect {sc['collect_median']:.3f} s; "
                        f"map collect {1000 * row['map']['collect_median']:.2f} ms"
                        + (f"; kernel collect {1000 * row['kernel']['collect_median']:.2f} ms" if kernel_ok else "")
                    )
                finally:
                    ram.unlink()
    return rows


def print_part2(rows: list[dict], args: argparse.Namespace, kernel_ok: bool, kernel_why: str) -> None:
    print(f"## 2. Dirty tracker cost per round (idle region, one process; collect = median of {args.collects} "
          "collect() passes over every block)")
    print()
    print(f"kernel tracker: {'available' if kernel_ok else 'not available'}"
          + (f" ({kernel_why})" if kernel_why else ""))
    print()
    head = ("| size | content | allocated MiB | data extents | scan start s | scan collect s | "
            "scan s/GiB region | scan s/GiB allocated | map collect ms | map ms/GiB region |")
    rule = "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if kernel_ok:
        head += " kernel start ms | kernel collect ms | kernel ms/GiB region |"
        rule += "---:|---:|---:|"
    print(head)
    print(rule)
    for r in rows:
        gib = r["size"] / GIB
        agib = r["allocated"] / GIB
        sc, mp = r["scan"], r["map"]
        per_alloc = f"{sc['collect_median'] / agib:.3f}" if agib > 0 else "-"
        line = (f"| {fmt_size(r['size'])} | {r['content']} | {r['allocated'] / (1 << 20):.0f} | {r['extents']} "
                f"| {sc['start']:.3f} | {sc['collect_median']:.3f} | {sc['collect_median'] / gib:.3f} | {per_alloc} "
                f"| {1000 * mp['collect_median']:.3f} | {1000 * mp['collect_median'] / gib:.3f} |")
        if kernel_ok:
            k = r["kernel"]
            line += f" {1000 * k['start']:.2f} | {1000 * k['collect_median']:.3f} |"
            line += f" {1000 * k['collect_median'] / gib:.3f} |"
        print(line)
    print()


# --------------------------------------------------------------------------- main


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("part 1: downtime against downtime_limit")
    g.add_argument("--size", type=parse_size, default=parse_size("256M"), help="region size (default 256M)")
    g.add_argument("--content", default="random", choices=CONTENTS, help="region content (default random)")
    g.add_argument("--channels", type=int, default=2)
    g.add_argument("--link", type=float, default=100e6,
                   help="max_bandwidth in bytes/s: the link the fractions refer to (default 100e6 = 100 MB/s)")
    g.add_argument("--fractions", type=floats, default=floats("0.01,0.05,0.2"),
                   help="writer dirty rates as fractions of the link (default 0.01,0.05,0.2)")
    g.add_argument("--limits", type=floats, default=floats("0.05,0.1,0.3"),
                   help="downtime_limit values in seconds (default 0.05,0.1,0.3)")
    g.add_argument("--runs", type=int, default=3, help="migrations per fraction and limit (default 3)")
    g.add_argument("--calibrate-seconds", type=float, default=2.0, help="Source.estimate() duration per step")
    g.add_argument("--calibrate-steps", type=int, default=4, help="most calibration measurements per fraction")
    g.add_argument("--auto-converge", action="store_true", help="pass writer.throttle as migrate(throttle=...)")
    g.add_argument("--verify", action="store_true",
                   help="fingerprint comparison at switchover (off by default: it is part of the downtime)")
    g.add_argument("--start-method", default="forkserver")
    g.add_argument("--no-migrations", action="store_true", help="skip part 1")
    g2 = p.add_argument_group("part 2: dirty tracker cost")
    g2.add_argument("--scan-sizes", default="256M,1G", help="region sizes (default 256M,1G)")
    g2.add_argument("--scan-contents", default="random,half-zero,sparse",
                    help="random, half-zero, zero, mixed, sparse or sparse:N (default random,half-zero,sparse)")
    g2.add_argument("--collects", type=int, default=5, help="collect() passes timed per tracker (default 5)")
    g2.add_argument("--no-scan", action="store_true", help="skip part 2")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    args = p.parse_args()
    args.scan_sizes = [parse_size(s) for s in args.scan_sizes.split(",") if s]
    args.scan_contents = [c for c in args.scan_contents.split(",") if c]
    for c in args.scan_contents:
        base, _, n = c.partition(":")
        if not (c in CONTENTS or (base == "sparse" and (not n or n.isdigit() and int(n) > 0))):
            p.error(f"scan content {c!r}: not one of {', '.join(CONTENTS)}, sparse, sparse:N")
    if not args.fractions or any(not 0 < f for f in args.fractions):
        p.error("--fractions must be positive")
    if args.link < 4096:
        p.error("--link must be at least 4096 bytes/s")
    args.link = int(args.link)

    signal.signal(signal.SIGTERM, raise_interrupt)  # the finally blocks must run on SIGTERM as on Ctrl-C
    out = print if not args.json else log
    t_start = time.monotonic()
    kernel_ok, kernel_why = kernel_tracker_status()
    header = machine_header()
    affinity = header["nproc"]
    out(f"# command: {header['command']}")
    out(f"# machine: nproc {affinity}, Python {header['python']} ({sys.implementation.name}), "
        f"Linux {header['kernel']}, load average {header['load_average_at_start']:.2f} at start")
    out()
    doc: dict = {"header": header}
    try:
        warm_up(2 * max([args.size] + args.scan_sizes))
        if not args.no_migrations:
            log("# part 1: calibrating writers, then migrating")
            doc["part1"] = part1(args)
            if not args.json:
                print_part1(doc["part1"], args)
        if not args.no_scan:
            log("# part 2: dirty tracker cost")
            doc["part2"] = part2(args, kernel_ok)
            if not args.json:
                print_part2(doc["part2"], args, kernel_ok, kernel_why)
    except KeyboardInterrupt:
        stop_helpers()  # e.g. a destination started by a RemoteDestination() that was interrupted
        log("# interrupted: shared memory and child processes cleaned up")
        return 130
    doc["wall_time"] = time.monotonic() - t_start
    doc["kernel_tracker"] = {"available": kernel_ok, "why": kernel_why}
    print_end(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
