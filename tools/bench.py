#!/usr/bin/env python3
"""Guest-RAM migration throughput, setup time and downtime, next to a plain single-socket copy.

Every configuration runs ``--runs`` times, interleaved with the baseline so
both see the same machine state; the table shows medians. The baseline sends
the whole region with one ``sendall`` over one loopback TCP socket into a
receiver process that ``recv_into``-s it straight into a fresh shared-memory
region: the simplest way to move the same bytes.

Example::

    python tools/bench.py --size 1G --channels 1,2,4 --content random,half-zero,zero
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpmultifd import GuestRAM, MigrationConfig, Source  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.testing import CONTENTS, RemoteDestination, fill  # noqa: E402


def _baseline_receiver(ram_name: str, port_conn, done_conn) -> None:
    ram = GuestRAM.attach(ram_name)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port_conn.send(lsock.getsockname()[1])
    sock, _ = lsock.accept()
    view = memoryview(ram.view(0)).cast("B")
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if n == 0:
            break
        got += n
    done_conn.send(got)
    del view
    sock.close()
    lsock.close()
    ram.close()


def baseline(src: GuestRAM, start_method: str) -> float:
    """Seconds to move the region over one socket with ``sendall`` into a fresh region."""
    ctx = multiprocessing.get_context(start_method)
    with GuestRAM.create({"a": src.total_size}) as dst:
        a, b = ctx.Pipe()
        c, d = ctx.Pipe()
        proc = ctx.Process(target=_baseline_receiver, args=(dst.name, b, d))
        proc.start()
        port = a.recv()
        sock = socket.create_connection(("127.0.0.1", port))
        t0 = time.perf_counter()
        for blk in src.blocks:
            sock.sendall(memoryview(src.view(blk.index)).cast("B"))
        got = c.recv()
        elapsed = time.perf_counter() - t0
        sock.close()
        proc.join()
        assert got == src.total_size
    return elapsed


def migrate_once(
    src: GuestRAM,
    channels: int,
    args: argparse.Namespace,
    compression: str | None = None,
    level: int | None = None,
) -> dict:
    """One migration of ``src`` into a fresh region in a destination process; times and bytes."""
    cfg = MigrationConfig(
        channels=channels,
        compression=compression or args.compression,
        compression_level=level,
        start_method=args.start_method,
        verify=args.verify,
    )
    with GuestRAM.create({"a": src.total_size}) as dst:
        with RemoteDestination(dst.name, cfg, start_method=args.start_method) as dest, Source(src, cfg) as source:
            t0 = time.perf_counter()
            res = source.migrate(dest.address)
            elapsed = time.perf_counter() - t0
            dest.result()
    comp = source.query()["compression"]
    return {
        "time": elapsed,
        "setup": res.setup_time,
        "downtime": res.downtime,
        "wire": res.transferred,
        "compressed": comp["compressed-packets"],
        "raw": comp["raw-packets"],
    }


def warm_up(size: int) -> None:
    """Touch and free memory once: on a fresh VM the first touch of guest memory costs several times more."""
    with GuestRAM.create({"w": size}) as w:
        w.view(0)[:: 4096] = 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("1G"))
    p.add_argument("--channels", default="1,2,4")
    p.add_argument("--content", default="random,half-zero,zero")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--compression", default="none")
    p.add_argument("--start-method", default="forkserver")
    p.add_argument("--verify", action="store_true", help="include the fingerprint comparison at switchover")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    channels = [int(c) for c in args.channels.split(",")]
    contents = args.content.split(",")
    for c in contents:
        if c not in CONTENTS:
            p.error(f"content {c!r} not in {CONTENTS}")
    warm_up(2 * args.size)
    rows = []
    for content in contents:
        with GuestRAM.create({"a": args.size}) as src:
            fill(src, content, seed=7)
            base, runs = [], {ch: [] for ch in channels}
            for _ in range(args.runs):
                base.append(baseline(src, args.start_method))
                for ch in channels:
                    runs[ch].append(migrate_once(src, ch, args))
            gbs = args.size / 1e9
            bt = statistics.median(base)
            rows.append({"content": content, "mode": "single socket sendall", "channels": 1, "GB/s": gbs / bt,
                         "setup_ms": None, "downtime_ms": None, "wire_bytes": args.size, "vs_baseline": 1.0})
            for ch in channels:
                t = statistics.median(r["time"] for r in runs[ch])
                rows.append({
                    "content": content,
                    "mode": f"mpmultifd {args.compression}",
                    "channels": ch,
                    "GB/s": gbs / t,
                    "setup_ms": 1000 * statistics.median(r["setup"] for r in runs[ch]),
                    "downtime_ms": 1000 * statistics.median(r["downtime"] for r in runs[ch]),
                    "wire_bytes": int(statistics.median(r["wire"] for r in runs[ch])),
                    "vs_baseline": bt / t,
                })
    if args.json:
        print(json.dumps({"size": args.size, "runs": args.runs, "rows": rows}, indent=2))
        return
    print(f"size {args.size / (1 << 30):.2f} GiB, {args.runs} runs each (medians), start method {args.start_method}, "
          f"verify {args.verify}, {os.cpu_count()} CPUs")
    print(
        f"{'content':<10} {'mode':<24} {'ch':>3} {'GB/s':>6} {'setup ms':>9} "
        f"{'downtime ms':>12} {'wire MiB':>9} {'x base':>7}"
    )
    for r in rows:
        setup = "" if r["setup_ms"] is None else f"{r['setup_ms']:.1f}"
        down = "" if r["downtime_ms"] is None else f"{r['downtime_ms']:.1f}"
        print(f"{r['content']:<10} {r['mode']:<24} {r['channels']:>3} {r['GB/s']:>6.2f} {setup:>9} {down:>12} "
              f"{r['wire_bytes'] / (1 << 20):>9.0f} {r['vs_baseline']:>7.2f}")


if __name__ == "__main__":
    main()
