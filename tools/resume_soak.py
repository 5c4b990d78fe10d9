#!/usr/bin/env python3
"""Migrations through a relay that resets random data connections at random points, many times.

Each run migrates a region (random content, a writer thread marking pages)
over ``--channels`` channels with ``channel_retries`` on both ends, through a
loopback relay (:class:`mpmultifd.testing.ResetRelay`) that resets one or two
data connections: at a random byte count (mid-packet), at the next idle gap
after a random byte count (a channel parked at a round's barrier), after
swallowing everything from a random byte count on, or a few bytes into the
final round (armed from the ``pause`` callback). A run
survives when the migration completes verified and the destination's region
is byte-identical to the paused source; the only acceptable failure is a spent
retry budget, with the guest resumed and the destination invalid::

    python tools/resume_soak.py --runs 30 --size 32M --seed 1
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from mpmultifd import Destination, GuestRAM, MigrationConfig, MigrationError, Source  # noqa: E402
from mpmultifd.cli import parse_size  # noqa: E402
from mpmultifd.testing import ResetRelay, WriterThread, fill  # noqa: E402

MODES = ("now", "idle", "drop")


def plan(rng: random.Random, size: int) -> tuple[list[tuple[int, str]], tuple[int, str] | None]:
    """Reset points during precopy, and maybe one armed at the pause (the final round)."""
    points = []
    for _ in range(rng.choice((1, 1, 2))):
        points.append((rng.randrange(1, int(size * 0.8)), rng.choice(MODES)))
    final = (rng.randrange(1, 256 << 10), rng.choice(MODES)) if rng.random() < 0.3 else None
    if final is not None and rng.random() < 0.5:
        points = points[:1]
    return points, final


def one_run(i: int, rng: random.Random, a: argparse.Namespace) -> dict:
    points, final = plan(rng, a.size)
    method = rng.choice(a.start_methods.split(","))
    bw = rng.choice((None, 200 << 20))

    def cfg() -> MigrationConfig:
        return MigrationConfig(
            channels=a.channels, channel_retries=a.retries, timeout=a.timeout, max_bandwidth=bw,
            start_method=method, downtime_limit=0.1, stall_downtime_limit=2.0,
        )

    out = {"paused": False, "run": i, "points": points, "final": final, "method": method, "bw": bw}
    resumed = []
    with GuestRAM.create({"pc.ram": a.size}) as s, GuestRAM.create({"pc.ram": a.size}) as d:
        fill(s, "random", rng.randrange(1 << 30))
        writer = WriterThread(s, "pc.ram", seed=rng.randrange(1 << 30))
        with Destination(d, config=cfg()) as dst, ResetRelay(dst.address, points) as relay:

            def pause() -> None:
                out["paused"] = True
                writer.pause()
                if final is not None:
                    relay.points.append(final)

            t0 = time.monotonic()
            try:
                with writer, Source(s, cfg()) as src:
                    res = src.migrate(relay.address, pause=pause, resume=lambda: resumed.append(1))
                    q = src.query()
                out["source"] = "completed" if res.verified else "unverified"
                out["reconnected"] = q["reconnected-channels"]
            except MigrationError as e:
                out["source"] = f"{type(e).__name__}: {e}"
            out["seconds"] = time.monotonic() - t0
            try:
                r = dst.wait(a.timeout + 5)
                out["destination"] = "completed" if r.verified else "unverified"
            except MigrationError as e:
                out["destination"] = f"{type(e).__name__}: {e}"
            out["valid"] = dst.valid
            out["resets"] = list(relay.resets)
        out["identical"] = bool(np.array_equal(s.view("pc.ram"), d.view("pc.ram")))
        out["resumed"] = bool(resumed)
    ok = out["source"] == "completed" and out["destination"] == "completed" and out["identical"] and out["valid"]
    clean_fail = (
        out["source"] != "completed" and "retry budget" in out["source"] and out["resumed"] == out["paused"]
        and not out["valid"]
    )
    out["verdict"] = "survived" if ok else ("budget-spent" if clean_fail else "BAD")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--size", type=parse_size, default=parse_size("32M"))
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--start-methods", default="fork,spawn,forkserver")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--only", type=int, default=None, help="run only this run number (reproduces it)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true", help="library log at INFO on stderr")
    a = p.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    print(f"# {' '.join(sys.argv)}  (seed {seed})")
    if a.debug:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f %(processName)s %(message)s")
    verdicts: collections.Counter = collections.Counter()
    why: collections.Counter = collections.Counter()
    resets_survived = resets_total = reconnections = 0
    t0 = time.monotonic()
    for i in range(a.runs) if a.only is None else [a.only]:
        r = one_run(i, random.Random(seed * 1_000_003 + i), a)  # each run reproducible on its own
        verdicts[r["verdict"]] += 1
        n = len(r["resets"])
        resets_total += n
        if r["verdict"] == "survived":
            resets_survived += n
            reconnections += r.get("reconnected", 0)
        else:
            why[f"{r['verdict']}: {r['source'][:120]}"] += 1
        if a.verbose or r["verdict"] == "BAD":
            print(
                f"run {i}: {r['verdict']} resets={r['resets']} plan={r['points']} final={r['final']} "
                f"{r['method']} bw={r['bw']} src={r['source'][:200]!r} dst={r['destination'][:200]!r} "
                f"identical={r['identical']} valid={r['valid']} {r['seconds']:.1f}s",
                flush=True,
            )
    print(f"runs: {a.runs if a.only is None else 1} in {time.monotonic() - t0:.0f} s")
    print(f"resets done by the relay: {resets_total}")
    print(f"resets survived byte-identical (verified): {resets_survived} "
          f"({reconnections} channel reconnections; a reset after a channel's last byte arrived needs none)")
    print(f"migrations survived: {verdicts['survived']}  failed (retry budget spent, clean): "
          f"{verdicts['budget-spent']}  failed otherwise: {verdicts['BAD']}")
    for w, n in why.most_common():
        print(f"  {n} x {w}")
    return 0 if verdicts["BAD"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
