#!/usr/bin/env python3
"""Fast in-process, coverage-guided fuzzing of every parser of peer or file bytes.

Feeds mutated inputs straight to the decoders (admission, data headers, the
control decoder, each method's receiver with decompression, the save-file
header), in this process, and prints per target how many inputs it tried, the
coverage (line edges in mpmultifd's own code) and the corpus reached, and every
**escape**: an exception that is not a typed ``MigrationError``, a write
outside the region, or an input that hung. See ``fuzz/fast.py``.
Exit status 1 when anything escaped. ``tools/fuzz.py`` is the slow, faithful
end-to-end counterpart (a real destination per input).

Examples::

    python tools/fuzz_fast.py --seconds 60
    python tools/fuzz_fast.py --seconds 20 --target control --target recv-zstd --seed 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fuzz import fast as fastfuzz  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    names = [t.name for t in fastfuzz.targets()]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="total run time, split evenly between targets")
    p.add_argument("--target", action="append", choices=names, help="repeatable; default every target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace-every", type=int, default=64, help="trace coverage for one input in K")
    p.add_argument("--hang-seconds", type=float, default=5.0, help="an input running longer is a hang")
    p.add_argument("--out", default=None, help="directory to write escaping inputs to")
    args = p.parse_args(argv)

    print(
        f"{'target':<14} {'inputs':>10} {'per s':>8} {'traced':>7} {'typed err':>10} {'edges':>6} {'corpus':>6} escapes"
    )

    def report(st: fastfuzz.TargetStats) -> None:
        print(
            f"{st.name:<14} {st.inputs:>10,} {st.inputs / max(st.seconds, 1e-9):>8,.0f} {st.traced:>7,} "
            f"{st.typed_errors:>10,} {st.edges:>6} {st.corpus:>6} {len(st.escapes)}",
            flush=True,
        )
        for e in st.escapes[:5]:
            print(f"    ESCAPE {e.kind}: {e.detail}  input {e.data[:48].hex()}{'...' if len(e.data) > 48 else ''}")

    t0 = time.monotonic()
    stats = fastfuzz.run(
        args.seconds, names=args.target, seed=args.seed, trace_every=args.trace_every,
        hang_seconds=args.hang_seconds, report=report,
    )
    inputs = sum(s.inputs for s in stats)
    escapes = [e for s in stats for e in s.escapes]
    if args.out and escapes:
        os.makedirs(args.out, exist_ok=True)
        for i, e in enumerate(escapes):
            if e.data:
                with open(os.path.join(args.out, f"{e.target}-{i:04d}.bin"), "wb") as f:
                    f.write(e.data)
    wall = time.monotonic() - t0
    print(f"total: {inputs:,} inputs in {wall:.1f} s ({inputs / wall:,.0f}/s), {len(escapes)} escapes")
    return 1 if escapes else 0


if __name__ == "__main__":
    sys.exit(main())
