"""A live progress display for the command line (the library itself stays UI-free).

On a terminal it draws a tqdm bar; otherwise it prints one plain line per
update. The figure shown is ``query()["progress"]``, which never runs
backwards even while the guest re-dirties pages.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["ProgressDisplay", "describe"]


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def describe(q: dict[str, Any]) -> str:
    """One line with the round, confirmed bytes, dirty backlog, rates, expected downtime and time left."""
    ram = q["ram"]
    line = (
        f"round {q['rounds']} | confirmed {_mib(q['confirmed-bytes'])} | sent {_mib(ram['transferred'])} | "
        f"backlog {_mib(ram['remaining'])} | {ram['mbps']:.0f} Mbit/s | "
        f"dirty {ram['dirty-pages-rate']} pages/s | expected downtime {q['expected-downtime']} ms"
    )
    if q.get("expected-remaining") is not None:
        line += f" | about {_seconds(q['expected-remaining'] / 1000)} left"
    return line


def _seconds(t: float) -> str:
    if t < 60:
        return f"{t:.1f} s"
    m, s = divmod(int(t), 60)
    return f"{m}:{s:02d} min" if m < 60 else f"{m // 60}:{m % 60:02d} h"


class ProgressDisplay:
    """Polls ``query`` every ``interval`` seconds in a thread and shows it on ``stream``."""

    def __init__(
        self,
        query: Callable[[], dict[str, Any]],
        stream: TextIO,
        *,
        interval: float = 0.25,
        tty: bool | None = None,
    ) -> None:
        self.query = query
        self.stream = stream
        self.interval = interval
        self.tty = stream.isatty() if tty is None else tty
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpmultifd-progress", daemon=True)
        self.shown: list[float] = []  # every progress value displayed, in order

    def __enter__(self) -> ProgressDisplay:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        bar = tqdm(total=100.0, file=self.stream, unit="%", bar_format="{l_bar}{bar}| {postfix}") if self.tty else None
        last_line = None
        try:
            while True:
                stopping = self._stop.wait(self.interval)
                q = self.query()
                pct = float(q["progress"])
                self.shown.append(pct)
                if bar is not None:
                    bar.n = pct
                    bar.set_description(q["status"])
                    bar.set_postfix_str(describe(q), refresh=False)
                    bar.refresh()
                else:
                    line = f"{q['status']:>10} {pct:5.1f}% {describe(q)}"
                    if line != last_line:
                        print(line, file=self.stream, flush=True)
                        last_line = line
                if stopping:
                    return
        finally:
            if bar is not None:
                bar.close()
