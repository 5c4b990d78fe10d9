"""Helpers the benchmark tools share: progress on stderr, Ctrl-C/SIGTERM handling, leftover checks."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time

__all__ = [
    "log",
    "raise_interrupt",
    "caused_by_interrupt",
    "report_leftovers",
    "fmt_size",
    "machine_header",
    "wall_time_line",
    "print_end",
]


def log(*a: object) -> None:
    """Progress goes to stderr, so stdout holds only the results (or the JSON document)."""
    print(*a, file=sys.stderr, flush=True)


def raise_interrupt(signum, frame) -> None:
    """A signal handler that turns SIGTERM into the KeyboardInterrupt every tool already cleans up after."""
    raise KeyboardInterrupt(f"signal {signum}")


def caused_by_interrupt(exc: BaseException | None) -> bool:
    """True for a KeyboardInterrupt, or an error raised from one: ``Source.migrate``
    turns a Ctrl-C into ``MigrationError("KeyboardInterrupt: ...")``."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def report_leftovers(prefix: str, wait: float = 2.0) -> None:
    """Warn about segments of this run still in /dev/shm (after waiting ``wait`` s for exiting children)."""
    deadline = time.monotonic() + wait
    while True:
        left = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if left:
        log(f"# WARNING: still in /dev/shm: {left}. A child killed by a signal (SIGTERM to the whole process "
            f"group) leaves its segments to this process's resource tracker, which removes them once this process "
            f"has exited: check with ls /dev/shm | grep {prefix}")


def fmt_size(n: int) -> str:
    return f"{n >> 30}G" if n % (1 << 30) == 0 else f"{n >> 20}M"


def wall_time_line(seconds: float) -> str:
    return f"# wall time {seconds:.0f} s, load average {os.getloadavg()[0]:.2f} at the end"


def machine_header() -> dict:
    """How the tool was run and on what: the first lines of every report, and its JSON header."""
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    return {
        "command": shlex.join(["python"] + sys.argv),
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg()[0],
    }


def print_end(doc: dict, as_json: bool) -> None:
    """The whole JSON document, or the closing wall-time line of a text report."""
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(wall_time_line(doc["wall_time"]))
