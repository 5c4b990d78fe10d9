"""The ``mpmultifd`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import signal
import sys
from typing import Any, Iterator, Sequence

import numpy as np

from .config import START_METHODS, MigrationConfig
from .errors import MigrationCancelled, MigrationError
from .ram import GuestRAM
from .source import Source
from .testing import CONTENTS, DirtyingWriter, RemoteDestination, fill

__all__ = ["main", "parse_size"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"256M"`` → 268435456; accepts K, M, G, T (powers of 1024) with an optional ``iB``/``B``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 512M or 1G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channels", type=int, default=4, help="data channels (default 4)")
    p.add_argument("--compression", default="none", help="payload method (default none)")
    p.add_argument("--compression-level", type=int, default=None)
    p.add_argument("--zero-page", choices=("multifd", "none"), default="multifd")
    p.add_argument("--downtime-limit", type=float, default=0.3, help="seconds (default 0.3)")
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the fingerprint comparison")
    p.add_argument("--start-method", choices=START_METHODS, default="forkserver")


def _config(a: argparse.Namespace) -> MigrationConfig:
    return MigrationConfig(
        channels=a.channels,
        compression=a.compression,
        compression_level=a.compression_level,
        zero_page=a.zero_page,
        downtime_limit=a.downtime_limit,
        max_rounds=a.max_rounds,
        verify=a.verify,
        start_method=a.start_method,
    )


def cmd_demo(a: argparse.Namespace) -> int:
    """Migrate a synthetic two-block guest, dirtied by a writer process, to a destination process."""
    cfg = _config(a)
    main_size = max(a.size * 3 // 4 // 4096 * 4096, 4096)
    vram_size = max((a.size - main_size) // 4096 * 4096, 4096)
    blocks = {"pc.ram": main_size, "vga.vram": vram_size}
    out = print if not a.json else (lambda *x, **k: None)
    with GuestRAM.create(blocks) as src_ram, GuestRAM.create(blocks) as dst_ram:
        out(f"guest: {_fmt_bytes(src_ram.total_size)} in blocks {', '.join(f'{k}={_fmt_bytes(v)}' for k, v in blocks.items())}")
        fill(src_ram, a.content, seed=1)
        with RemoteDestination(dst_ram.name, cfg, start_method=cfg.start_method) as dest:
            out(f"destination listening on {dest.address[0]}:{dest.address[1]} (pid of its own)")
            with DirtyingWriter(src_ram.name, rate=a.writer_rate, start_method=cfg.start_method) as writer:
                out(f"writer dirtying pages at about {a.writer_rate:g} writes/s; migrating over {cfg.channels} channels")
                with Source(src_ram, cfg) as src, _cancel_on_sigint(src):
                    try:
                        result = src.migrate(dest.address, pause=writer.pause)
                    except MigrationCancelled:
                        print("migration cancelled", file=sys.stderr)
                        return 130
                    except MigrationError as e:
                        print(f"migration failed: {e}", file=sys.stderr)
                        return 1
                writes = writer.writes
            dest_result = dest.result()
        identical = all(np.array_equal(src_ram.view(b.name), dst_ram.view(b.name)) for b in src_ram.blocks)
    report = result.to_dict()
    report["writer-writes"] = writes
    report["byte-identical"] = identical
    report["destination-valid"] = dest.valid
    report["destination-verified"] = dest_result.verified
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"status:        {result.status}")
        print(f"rounds:        {result.rounds} (converged: {result.converged})")
        print(f"total time:    {result.total_time:.3f} s (setup {result.setup_time * 1000:.1f} ms)")
        print(f"downtime:      {result.downtime * 1000:.1f} ms (limit {cfg.downtime_limit * 1000:.0f} ms)")
        print(f"throughput:    {result.throughput / 1e9:.2f} GB/s of guest RAM")
        print(f"pages:         {result.normal} sent with data, {result.duplicate} zero pages")
        print(f"on the wire:   {_fmt_bytes(result.transferred)}")
        print(f"writer:        {writes} writes during the migration")
        print(f"verified:      {result.verified} (fingerprints of every page compared by the destination)")
        print(f"byte-identical: {identical} (whole region compared after the migration)")
    return 0 if identical and result.status == "completed" else 1


@contextlib.contextmanager
def _cancel_on_sigint(job: Any) -> Iterator[None]:
    """Ctrl-C cancels the migration cleanly instead of tearing the process down mid-flight."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: job.cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpmultifd", description="Live-migrate shared-memory regions over parallel channels.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log at INFO (-v) or DEBUG (-vv)")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="migrate a synthetic guest with a live writer on this machine")
    d.add_argument("--size", type=parse_size, default=parse_size("256M"), help="guest size (default 256M)")
    d.add_argument("--content", choices=CONTENTS, default="mixed", help="initial guest content (default mixed)")
    d.add_argument("--writer-rate", type=float, default=5000.0, help="writes per second (default 5000)")
    d.add_argument("--json", action="store_true", help="print the result as JSON")
    _config_args(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return int(args.func(args))
    except MigrationError as e:
        print(f"mpmultifd: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
