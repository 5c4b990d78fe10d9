#!/usr/bin/env python3
"""Fuzz the destination with mutated replays of real migration streams.

For each method, one real migration is captured through a recording relay;
then every iteration applies one to ``--max-mutations`` random mutations to
the captured streams and replays them into a fresh destination (see
``fuzz/harness.py``). An input is a **finding** when the destination
hung, failed with an error that is not a deliberate typed one, lost a worker,
reported success with bytes that differ from the source's, wrote a page no
acceptable header named or memory outside its region, or (with ``--stall-every``)
waited on a silent peer past its timeout. Findings are saved under ``--out``
and can be replayed with ``--replay DIR``.

Examples::

    python tools/fuzz.py --iterations 300 --seed 1 --method zstd
    python tools/fuzz.py --iterations 200 --method all --stall-every 10
    python tools/fuzz.py --replay fuzz-findings/zstd-1-00042
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fuzz.harness import (  # noqa: E402
    METHODS,
    Capture,
    Outcome,
    apply_mutations,
    capture,
    load_case,
    random_mutations,
    replay,
    save_case,
    streams_of,
)


def fuzz_method(method: str, args: argparse.Namespace, seed: int) -> collections.Counter[str]:
    """Run ``args.iterations`` mutated replays for one method; returns verdict counts."""
    t0 = time.monotonic()
    cap: Capture = capture(method, size=args.size, seed=seed, packet_pages=args.packet_pages)
    npackets = sum(len(d) - 1 for d in cap.data)
    print(
        f"[{method}] captured {len(cap.control) - 1} control messages and {npackets} data packets "
        f"on {cap.channels} channels in {time.monotonic() - t0:.1f} s",
        flush=True,
    )
    rng = random.Random(seed)
    counts: collections.Counter[str] = collections.Counter()
    fields: collections.Counter[str] = collections.Counter()
    benign_kinds: collections.Counter[str] = collections.Counter()
    original = streams_of(cap)
    t_start = time.monotonic()
    for it in range(args.iterations):
        mutations = random_mutations(rng, args.max_mutations)
        prefill = rng.random() < 0.5
        stall = bool(args.stall_every) and it % args.stall_every == args.stall_every - 1
        streams = apply_mutations(cap, mutations, seed=rng.randrange(1 << 30))
        try:
            out = replay(cap, streams, settle=args.settle, dst_timeout=args.dst_timeout, prefill=prefill, stall=stall)
        except Exception as e:  # the harness itself broke: keep the input, it may still be interesting
            out = Outcome("harness-error", type(e).__name__, str(e), detail=traceback.format_exc())
        verdict = out.verdict
        if verdict == "benign":
            changed = streams != original
            verdict = "benign" if changed else "no-op"
            if changed:
                benign_kinds["+".join(m.kind for m in mutations)] += 1
        counts[verdict] += 1
        if out.verdict == "failed":
            fields[f"{out.error_type}:{out.field}"] += 1
        save = out.finding or (args.save_benign and verdict == "benign")
        if save:
            where = os.path.join(args.out, f"{method}-{seed}-{it:05d}")
            save_case(where, cap, streams, mutations, out, seed=seed, prefill=prefill)
            label = "FINDING" if out.finding else "benign"
            print(
                f"[{method}] {label} #{it}: {out.verdict} ({out.error_type}: {out.error}) {out.detail}\n"
                f"    mutations: {' '.join(m.describe() for m in mutations)} prefill={prefill} stall={stall}\n"
                f"    saved to {where}",
                flush=True,
            )
        if args.progress and (it + 1) % args.progress == 0:
            rate = (it + 1) / (time.monotonic() - t_start)
            print(f"[{method}] {it + 1}/{args.iterations} ({rate:.1f}/s) {dict(counts)}", flush=True)
    print(f"[{method}] error fields of clean failures: {dict(fields.most_common(12))}")
    if benign_kinds:
        print(f"[{method}] benign inputs that changed the bytes, by mutation kinds: {dict(benign_kinds)}")
    return counts


def replay_saved(directory: str, args: argparse.Namespace) -> int:
    cap, streams, meta = load_case(directory)
    print(f"replaying {directory}: {meta['mutations']}")
    out = replay(cap, streams, settle=args.settle, dst_timeout=args.dst_timeout, prefill=meta["prefill"])
    print(f"verdict {out.verdict} in {out.seconds:.1f} s: {out.error_type}: {out.error} {out.detail}")
    if out.traceback:
        print(out.traceback)
    return 1 if out.finding else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=100, help="mutated inputs per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", action="append", choices=(*METHODS, "all"), help="repeatable; default none")
    p.add_argument("--size", type=int, default=512 << 10, help="region bytes of the captured migration")
    p.add_argument("--packet-pages", type=int, default=8)
    p.add_argument("--max-mutations", type=int, default=3)
    p.add_argument("--dst-timeout", type=float, default=1.5, help="the destination's MigrationConfig.timeout")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait for each answer and for the end")
    p.add_argument("--stall-every", type=int, default=0, help="every K-th input plays a silent peer (0: never)")
    p.add_argument("--out", default="fuzz-findings", help="directory for findings")
    p.add_argument("--save-benign", action="store_true", help="also save inputs that changed bytes yet completed")
    p.add_argument("--progress", type=int, default=50, help="print counts every K inputs (0: never)")
    p.add_argument("--replay", metavar="DIR", help="replay one saved input and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="show the library's log")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL, format="%(name)s: %(message)s")
    if args.replay:
        return replay_saved(args.replay, args)
    if not args.method:
        methods = ["none"]
    else:
        methods = list(METHODS) if "all" in args.method else list(dict.fromkeys(args.method))
    t0 = time.monotonic()
    total: collections.Counter[str] = collections.Counter()
    for i, method in enumerate(methods):
        total += fuzz_method(method, args, args.seed + i)
    tried = sum(total.values())
    findings = {k: v for k, v in total.items() if k not in ("failed", "benign", "no-op", "refused")}
    print(
        f"\ntried {tried} inputs in {time.monotonic() - t0:.0f} s: "
        f"{total['failed']} failed cleanly, {total['benign']} benign (completed with the source's bytes), "
        f"{total['no-op']} left the bytes unchanged, {total['refused']} refused at admission, "
        f"{sum(findings.values())} findings {findings or ''}"
    )
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
