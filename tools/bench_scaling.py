#!/usr/bin/env python3
"""How migration time scales with region size and dirty rate, and what finding dirty pages costs per round.

(a) **Size.** For every ``--sizes`` (default 256M,512M,1G,2G,4G) a region filled
with ``--content`` (default half-zero) is migrated ``--runs`` times with
``--channels`` (default 2) into a fresh region in a destination process
(``RemoteDestination``, as ``tools/bench.py`` does), the guest paused (nothing
writes the region, one pass over RAM). Medians of the wall time around
``Source.migrate``, the throughput, the setup time (connections and worker
processes on both ends, before the first page) and the throughput without it.

(b) **Dirty rate.** A ``--rate-size`` (default 1G) region is migrated while a
``DirtyingWriter`` process writes it at each ``--rates`` (writes per second,
each of 1 byte to 3 pages at a random offset, marking the dirty map; default
0,2000,8000,20000; ``0`` means no writer at all, ``max`` a writer as fast as it
can go), with ``downtime_limit`` 0.3 s and ``stall_downtime_limit=math.inf``
(a migration that does not converge still switches over) and
``pause=writer.pause``. Runs are interleaved rate by rate, and the region is
restored to its filled bytes before each (a writer turns zero pages into
data, which would make later runs move more bytes). Medians of rounds,
total time, downtime (pause .. destination committed), the writer's achieved
rate and the coordinator's dirty sync per round.

(c) **Coordinator per-round cost.** For every size of (a): the median
``dirty-sync-time`` per round from its ``MIGRATION_PASS`` events (what the
coordinator spent taking the dirty map), and ``GuestRAM.snapshot_dirty`` timed
directly on that region's dirty map with 0 % and with 1 % of the pages marked
(median of ``--scan-repeats``; marking is not timed), each divided by the
median round time of (a) at that size: the bitmap scan as a fraction of a
round.

Each size needs room for the source and the destination region in
``/dev/shm`` (2 x size, a 4 GiB run 8 GiB) and as much available memory (tmpfs
pages are RAM); sizes that do not fit are skipped, and the tool says so.
Every segment it creates carries a prefix of its own
(``MPMULTIFD_SHM_PREFIX``); regions are removed and child processes stopped
on Ctrl-C and SIGTERM too, and the tool checks at the end that nothing of
its own is left in ``/dev/shm``. A 64 MiB migration first starts this
process's forkserver, so the first measured run does not pay for it.

Example::

    python tools/bench_scaling.py --sizes 256M,1G --runs 1 --rates 0,8000
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd import GuestRAM, MigrationConfig, Source  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.testing import CONTENTS, DirtyingWriter, RemoteDestination, fill  # noqa: E402

from toolkit import (  # noqa: E402
    caused_by_interrupt,
    fmt_size,
    log,
    machine_header,
    print_end,
    raise_interrupt,
    report_leftovers,
)

GIB = 1 << 30
MIB = 1 << 20
# rings, the destination's received map and statistics, a little slack
SHM_SLACK = 64 * MIB


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------- room


def shm_free() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def room_for(size: int, page_size: int = 4096, extra_memory: int = 0) -> str | None:
    """None if a source and a destination region of ``size`` (and ``extra_memory`` bytes) fit now, else why not."""
    need = 2 * (size + size // page_size) + SHM_SLACK  # two regions with their dirty maps
    free, avail = shm_free(), mem_available()
    if free < need:
        return f"needs {need / GIB:.1f} GiB of /dev/shm (source + destination), {free / GIB:.1f} GiB free"
    if avail < need + extra_memory:
        return (f"needs {(need + extra_memory) / GIB:.1f} GiB of memory (/dev/shm pages"
                f"{' and a copy of the region' if extra_memory else ''}), {avail / GIB:.1f} GiB available")
    return None


# --------------------------------------------------------------------------- one migration


def config(args: argparse.Namespace, **kw) -> MigrationConfig:
    return MigrationConfig(channels=args.channels, start_method=args.start_method, verify=args.verify, **kw)


def migrate_once(src: GuestRAM, cfg: MigrationConfig, args: argparse.Namespace, rate: float | None = None,
                 seed: int = 1) -> dict:
    """One migration into a fresh region in a destination process; with ``rate``, a writer runs until pause."""
    events: list[dict] = []
    t_pause = None
    with GuestRAM.create({b.name: b.size for b in src.blocks}) as dst:
        try:
            with contextlib.ExitStack() as stack:
                dest = stack.enter_context(RemoteDestination(dst.name, cfg, start_method=args.start_method))
                writer = None
                if rate is not None:
                    writer = stack.enter_context(
                        DirtyingWriter(src.name, seed=seed, rate=rate, start_method=args.start_method)
                    )
                    t_writer = time.monotonic()

                def pause_writer() -> None:
                    nonlocal t_pause
                    t_pause = time.monotonic()
                    writer.pause()

                pause = pause_writer if writer is not None else None

                source = stack.enter_context(Source(src, cfg, on_event=events.append))
                t0 = time.perf_counter()
                res = source.migrate(dest.address, pause=pause)
                elapsed = time.perf_counter() - t0
                query = source.query()
                dest.result()
                writes = writer.writes if writer is not None else 0
        finally:
            dst.unlink()
    passes = [e for e in events if e["event"] == "MIGRATION_PASS"]
    out = {
        "time": elapsed,
        "total_time": res.total_time,
        "setup": res.setup_time,
        "downtime": res.downtime,
        "expected_downtime": res.expected_downtime,
        "rounds": res.rounds,
        "converged": res.converged,
        "stall_reason": res.stall_reason,
        "transferred": res.transferred,
        "dirty_sync_total": query["dirty-sync-time"],
        "passes": [
            {
                k: e[k]
                for k in ("round", "round-bytes", "round-time", "dirty-pages", "dirty-pages-rate", "dirty-sync-time")
            }
            for e in passes
        ],
    }
    if rate is not None:
        wrote_for = (t_pause if t_pause is not None else time.monotonic()) - t_writer
        out["writes"] = writes
        out["writer_seconds"] = wrote_for
        out["writes_per_s"] = writes / wrote_for if wrote_for > 0 else 0.0
    return out


def time_snapshots(ram: GuestRAM, fraction: float, repeats: int, rng: np.random.Generator) -> list[float]:
    """Seconds per ``snapshot_dirty`` of every block with ``fraction`` of its pages marked (marking not timed)."""
    times = []
    for b in ram.blocks:
        ram.snapshot_dirty(b.index)  # start from a clean map
    for _ in range(repeats):
        for b in ram.blocks:
            n = int(b.npages * fraction)
            if n:
                ram.dirty_map(b.index)[rng.choice(b.npages, n, replace=False)] = 1
        t0 = time.perf_counter()
        got = sum(len(ram.snapshot_dirty(b.index)) for b in ram.blocks)
        times.append(time.perf_counter() - t0)
        expect = sum(int(b.npages * fraction) for b in ram.blocks)
        if got != expect:
            raise RuntimeError(f"snapshot_dirty found {got} pages, {expect} were marked")
    return times


# --------------------------------------------------------------------------- parts


def part_sizes(args: argparse.Namespace) -> dict:
    rows, skipped = [], []
    rng = np.random.default_rng(3)
    for size in args.sizes:
        why = room_for(size)
        if why is not None:
            log(f"# (a) skipping {fmt_size(size)}: {why}")
            skipped.append({"size": size, "why": why})
            continue
        with GuestRAM.create({"ram": size}) as src:
            try:
                t0 = time.perf_counter()
                fill(src, args.content, seed=7)
                log(f"# (a) {fmt_size(size)}: filled ({args.content}) in {time.perf_counter() - t0:.1f} s")
                runs = []
                for r in range(args.runs):
                    got = migrate_once(src, config(args), args)
                    runs.append(got)
                    log(
                        f"#   run {r + 1}/{args.runs} {fmt_size(size)}: {got['time']:.2f} s, "
                        f"setup {got['setup']:.3f} s, "
                        f"downtime {1000 * got['downtime']:.1f} ms, {got['rounds']} round(s), "
                        f"sync {1000 * got['dirty_sync_total']:.2f} ms in all"
                    )
                snap0 = time_snapshots(src, 0.0, args.scan_repeats, rng)
                snap1 = time_snapshots(src, 0.01, args.scan_repeats, rng)
            finally:
                src.unlink()
        t = median(x["time"] for x in runs)
        setup = median(x["setup"] for x in runs)
        passes = [p for x in runs for p in x["passes"]]
        rows.append({
            "size": size,
            "runs": runs,
            "time": t,
            "setup": setup,
            "GB/s": size / 1e9 / t,
            "GB/s_after_setup": size / 1e9 / max(t - setup, 1e-9),
            "downtime": median(x["downtime"] for x in runs),
            "rounds": median(x["rounds"] for x in runs),
            "round_time": median(p["round-time"] for p in passes),
            "sync_per_round": median(p["dirty-sync-time"] for p in passes),
            "sync_total": median(x["dirty_sync_total"] for x in runs),
            "sync_rounds_measured": len(passes),
            "snapshot_0": median(snap0),
            "snapshot_1": median(snap1),
            "snapshot_0_all": snap0,
            "snapshot_1_all": snap1,
        })
    return {"rows": rows, "skipped": skipped}


def part_rates(args: argparse.Namespace) -> dict:
    size = args.rate_size
    why = room_for(size, extra_memory=size)
    if why is not None:
        log(f"# (b) skipping: {why}")
        return {"rows": [], "skipped": why}
    cfg = config(args, downtime_limit=args.downtime_limit, stall_downtime_limit=math.inf)
    runs: dict[str, list[dict]] = {label: [] for label, _ in args.rates}
    with GuestRAM.create({"ram": size}) as src:
        try:
            fill(src, args.content, seed=7)
            # the writers overwrite the region (zero pages get random bytes): every run starts from these bytes
            pristine = [src.view(b.index).copy() for b in src.blocks]
            n = 0
            for r in range(args.runs):
                for label, rate in args.rates:
                    n += 1
                    for b, saved in zip(src.blocks, pristine):
                        np.copyto(src.view(b.index), saved)
                    got = migrate_once(src, cfg, args, rate=rate, seed=100 + n)
                    runs[label].append(got)
                    achieved = f", writer {got['writes_per_s']:.0f} writes/s" if rate is not None else ""
                    log(f"#   run {r + 1}/{args.runs} rate {label}: {got['time']:.2f} s, {got['rounds']} rounds, "
                        f"downtime {1000 * got['downtime']:.1f} ms, converged {got['converged']}{achieved}")
        finally:
            src.unlink()
    rows = []
    for label, rate in args.rates:
        rs = runs[label]
        later = [p for x in rs for p in x["passes"] if p["round"] > 0]
        allp = [p for x in rs for p in x["passes"]]
        rows.append({
            "rate": label,
            "writer": rate is not None,
            "writes_per_s": median(x["writes_per_s"] for x in rs) if rate is not None else 0.0,
            "rounds": median(x["rounds"] for x in rs),
            "time": median(x["time"] for x in rs),
            "setup": median(x["setup"] for x in rs),
            "downtime": median(x["downtime"] for x in rs),
            "downtime_max": max(x["downtime"] for x in rs),
            "converged": sum(bool(x["converged"]) for x in rs),
            "n": len(rs),
            "transferred": median(x["transferred"] for x in rs),
            "dirty_after_round0": median(x["passes"][0]["dirty-pages"] for x in rs if x["passes"]),
            "sync_per_round": median(p["dirty-sync-time"] for p in allp),
            "later_round_time": median(p["round-time"] for p in later) if later else None,
            "later_sync": median(p["dirty-sync-time"] for p in later) if later else None,
            "runs": rs,
        })
    return {"rows": rows, "skipped": None}


# --------------------------------------------------------------------------- printing


def print_sizes(res: dict, args: argparse.Namespace) -> None:
    print(f"## (a) Migration time vs region size ({args.content}, {args.channels} channels, guest paused, "
          f"verify {args.verify}; medians of {args.runs} run(s))")
    print()
    print("| size | time s | GB/s | setup s | GB/s after setup | downtime ms | wire MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        wire = median(x["transferred"] for x in r["runs"]) / MIB
        print(f"| {fmt_size(r['size'])} | {r['time']:.2f} | {r['GB/s']:.2f} | {r['setup']:.3f} "
              f"| {r['GB/s_after_setup']:.2f} | {1000 * r['downtime']:.1f} | {wire:.0f} |")
    for s in res["skipped"]:
        print(f"| {fmt_size(s['size'])} | skipped: {s['why']} | | | | | |")
    print()


def print_rates(res: dict, args: argparse.Namespace) -> None:
    print(f"## (b) Migration time vs dirty rate ({fmt_size(args.rate_size)} {args.content}, {args.channels} channels, "
          f"downtime_limit {args.downtime_limit:g} s, stall_downtime_limit inf, tracker map, verify {args.verify}; "
          f"medians of {args.runs} run(s))")
    print()
    if res["skipped"]:
        print(f"skipped: {res['skipped']}")
        print()
        return
    print("Rate 0: no writer. Downtime: pause() .. destination committed. Sync: the coordinator's dirty-sync-time "
          "per round (all rounds); later rounds: rounds after the first full pass.")
    print()
    print(
        "| writes/s asked | writes/s achieved | rounds | total s | setup s | downtime ms | downtime max ms "
        "| converged | dirty pages after round 0 | wire MiB | sync ms/round | later round s | later sync % of round |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        achieved = f"{r['writes_per_s']:.0f}" if r["writer"] else "-"
        later = f"{r['later_round_time']:.3f}" if r["later_round_time"] is not None else "-"
        share = (f"{100 * r['later_sync'] / r['later_round_time']:.2f}"
                 if r["later_round_time"] else "-")
        print(f"| {r['rate']} | {achieved} | {r['rounds']:g} | {r['time']:.2f} | {r['setup']:.3f} "
              f"| {1000 * r['downtime']:.1f} | {1000 * r['downtime_max']:.1f} | {r['converged']}/{r['n']} "
              f"| {r['dirty_after_round0']:.0f} | {r['transferred'] / MIB:.0f} | {1000 * r['sync_per_round']:.3f} "
              f"| {later} | {share} |")
    print()


def print_scan(res: dict, args: argparse.Namespace) -> None:
    print(f"## (c) Coordinator per-round cost vs region size (from the runs of (a); snapshot_dirty: median of "
          f"{args.scan_repeats} calls in this process)")
    print()
    print("Round = median MIGRATION_PASS round-time at that size (the full pass of a paused guest). "
          "Sync = MIGRATION_PASS dirty-sync-time (the coordinator's collect of the dirty map after the round).")
    print()
    print("| size | pages | round s | sync ms/round | sync % of round | snapshot 0% ms | snapshot 1% ms "
          "| 0% % of round | 1% % of round | 1% ms per GiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        rt = r["round_time"]
        print(f"| {fmt_size(r['size'])} | {r['size'] // 4096} | {rt:.3f} | {1000 * r['sync_per_round']:.3f} "
              f"| {100 * r['sync_per_round'] / rt:.3f} | {1000 * r['snapshot_0']:.3f} | {1000 * r['snapshot_1']:.3f} "
              f"| {100 * r['snapshot_0'] / rt:.3f} | {100 * r['snapshot_1'] / rt:.3f} "
              f"| {1000 * r['snapshot_1'] / (r['size'] / GIB):.3f} |")
    for s in res["skipped"]:
        print(f"| {fmt_size(s['size'])} | skipped | | | | | | | | |")
    print()


# --------------------------------------------------------------------------- main


def parse_rates(text: str) -> list[tuple[str, float | None]]:
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok == "max":
            out.append(("max", 0.0))  # DirtyingWriter: 0 = as fast as it can
        else:
            v = float(tok)
            if v < 0:
                raise argparse.ArgumentTypeError(f"rate {tok!r} is negative")
            out.append((f"{v:g}", None if v == 0 else v))
    return list(dict.fromkeys(out))  # each rate once


def warm_up_migration(args: argparse.Namespace) -> None:
    """A small migration, so this process's forkserver is running before anything is timed."""
    with GuestRAM.create({"ram": 64 * MIB}) as src:
        try:
            fill(src, "half-zero", seed=1)
            migrate_once(src, config(args), args)
        finally:
            src.unlink()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", default="256M,512M,1G,2G,4G", help="region sizes for (a) and (c) (default 256M,512M,1G,2G,4G)"
    )
    p.add_argument(
        "--rates",
        default="0,2000,8000,20000",
        help="writer rates in writes/s for (b); 0 = no writer, max = as fast as it can (default 0,2000,8000,20000)",
    )
    p.add_argument("--rate-size", type=parse_size, default=parse_size("1G"), help="region size for (b) (default 1G)")
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--content", default="half-zero", choices=CONTENTS)
    p.add_argument("--runs", type=int, default=3, help="migrations per size and per rate (default 3)")
    p.add_argument("--downtime-limit", type=float, default=0.3, help="(b) downtime_limit in seconds (default 0.3)")
    p.add_argument("--scan-repeats", type=int, default=20, help="(c) snapshot_dirty calls timed per case (default 20)")
    p.add_argument("--start-method", default="forkserver")
    p.add_argument("--verify", action="store_true", help="fingerprint comparison at switchover (off by default)")
    p.add_argument("--no-sizes", action="store_true", help="skip (a) and (c)")
    p.add_argument("--no-rates", action="store_true", help="skip (b)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    args = p.parse_args()
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",") if s]
        args.rates = parse_rates(args.rates)
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    if args.runs < 1 or args.scan_repeats < 1:
        p.error("--runs and --scan-repeats must be at least 1")

    prefix = f"mpmscale{os.getpid()}_"
    os.environ["MPMULTIFD_SHM_PREFIX"] = prefix  # inherited by every process started from here
    signal.signal(signal.SIGTERM, raise_interrupt)  # the finally blocks must run on SIGTERM as on Ctrl-C
    out = print if not args.json else log
    header = {
        **machine_header(),
        "shm_free": shm_free(),
        "mem_available": mem_available(),
    }
    out(f"# command: {header['command']}")
    out(f"# machine: nproc {header['nproc']}, Python {header['python']}, Linux {header['kernel']}, "
        f"load average {header['load_average_at_start']:.2f} at start; /dev/shm {header['shm_free'] / GIB:.1f} GiB "
        f"free, {header['mem_available'] / GIB:.1f} GiB memory available; start method {args.start_method}")
    out()
    from bench import warm_up  # here, not at the top: forkserver workers re-import this script

    doc: dict = {"header": header}
    t_start = time.monotonic()
    try:
        fitting = [s for s in args.sizes + ([args.rate_size] if not args.no_rates else []) if room_for(s) is None]
        if fitting:
            warm_up(2 * max(fitting))
        warm_up_migration(args)
        if not args.no_sizes:
            log("# (a) size and (c) per-round cost")
            doc["sizes"] = part_sizes(args)
            if not args.json:
                print_sizes(doc["sizes"], args)
        if not args.no_rates:
            log("# (b) dirty rate")
            doc["rates"] = part_rates(args)
            if not args.json:
                print_rates(doc["rates"], args)
        if not args.no_sizes and not args.json:
            print_scan(doc["sizes"], args)
    except BaseException as e:
        if not caused_by_interrupt(e):
            raise
        log(f"# interrupted ({e}): shared memory and child processes cleaned up")
        return 130
    finally:
        report_leftovers(prefix)
    doc["wall_time"] = time.monotonic() - t_start
    print_end(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
