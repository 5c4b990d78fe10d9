"""Convergence arithmetic: the bandwidth cap, the bandwidth estimate, auto-converge and the stall detector.

Pure bookkeeping, no I/O and no clocks of its own: the coordinator passes the
time and the byte counts in, so every rule here is tested with made-up numbers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["TokenBucket", "BandwidthWindow", "AutoConverge", "StallDetector", "rounds_to_converge"]

# QEMU accounts bandwidth over windows of at least this long (BUFFER_DELAY)
ACCOUNTING_WINDOW = 0.1


class TokenBucket:
    """A byte budget that refills at ``rate`` bytes per second, shared by every channel.

    The coordinator charges a batch before handing it to a worker and waits
    ``delay()`` seconds when the budget is spent. ``used`` is the caller's
    running count of bytes spent (bytes on the wire plus batches queued but not
    yet sent, at their full size), so when a queued batch turns out smaller on
    the wire (zero pages, compression) the difference flows back into the
    budget. The budget never holds more than ``burst`` bytes: time spent idle
    between rounds does not turn into a burst later. ``rate=None`` means no cap;
    a new rate takes effect at the next call.
    """

    def __init__(self, rate: int | None, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last_t: float | None = None
        self._last_used = 0

    def set_rate(self, rate: int | None) -> None:
        self.rate = rate

    def delay(self, used: int, now: float) -> float:
        """Seconds to wait before ``used`` bytes fit the budget (0 when they do)."""
        if self._last_t is None:
            self._last_t = now  # the first batch is charged too: used counts from 0
        spent = used - self._last_used
        self._last_used = used
        refill = 0.0 if self.rate is None else self.rate * max(now - self._last_t, 0.0)
        self._last_t = now
        self._tokens = min(float(self.burst), self._tokens + refill - spent)
        if self.rate is None or self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate


class BandwidthWindow:
    """Bytes per second over the most recent rounds adding up to at least 100 ms.

    A single short round near the end of precopy (a few pages) says little
    about the link; QEMU measures over 100 ms windows for the same reason.
    """

    def __init__(self, window: float = ACCOUNTING_WINDOW, keep: int = 64) -> None:
        self.window = window
        self._rounds: deque[tuple[int, float]] = deque(maxlen=keep)

    def add(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self._rounds.append((nbytes, seconds))

    @property
    def rate(self) -> float:
        total_b, total_t = 0, 0.0
        for b, t in reversed(self._rounds):
            total_b += b
            total_t += t
            if total_t >= self.window:
                break
        return total_b / total_t if total_t > 0 else 0.0


class AutoConverge:
    """QEMU's auto-converge: throttle harder when a round dirties more than it sends.

    After each round, ``update(dirtied, sent)`` returns the new throttle
    percentage when it should change, else None. A round is "high" when its
    dirtied bytes exceed ``trigger`` percent of the bytes it sent; two high
    rounds in a row raise the throttle to ``initial``, then by ``increment``
    each time, up to ``maximum``.
    """

    def __init__(self, initial: int, increment: int, maximum: int, trigger: int) -> None:
        self.initial, self.increment, self.maximum, self.trigger = initial, increment, maximum, trigger
        self.percent = 0
        self._high = 0

    @property
    def exhausted(self) -> bool:
        return self.percent >= self.maximum

    def update(self, dirtied: int, sent: int) -> int | None:
        if dirtied * 100 <= sent * self.trigger:
            self._high = 0
            return None
        self._high += 1
        if self._high < 2 or self.exhausted:
            return None
        self._high = 0
        self.percent = self.initial if self.percent == 0 else min(self.percent + self.increment, self.maximum)
        return self.percent


class StallDetector:
    """Counts rounds in a row whose dirty set did not shrink to 90% of the best seen before.

    A steady writer leaves a dirty set that wobbles around one size; a new
    minimum by a hair should not count as progress, hence the 10% margin.
    """

    SHRINK = 0.9

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.best = math.inf
        self.flat = 0

    def update(self, dirty_bytes: int) -> bool:
        """Record a round's dirty bytes; True when ``rounds`` rounds in a row made no progress."""
        if dirty_bytes <= self.best * self.SHRINK:
            self.flat = 0
        else:
            self.flat += 1
        self.best = min(self.best, dirty_bytes)
        return self.flat >= self.rounds


@dataclass(frozen=True)
class ConvergenceForecast:
    converges: bool
    rounds: int
    expected_downtime: float
    total_time: float


def rounds_to_converge(
    total_bytes: int, dirty_rate: float, bandwidth: float, downtime_limit: float, max_rounds: int = 1000
) -> ConvergenceForecast:
    """Forecast precopy for a writer that dirties ``dirty_rate`` bytes/s over a link of ``bandwidth`` bytes/s.

    Round 0 sends everything; every later round sends what the writer dirtied
    while the previous round was on the wire (never more than the region). The
    migration converges at the first round whose dirty bytes fit in
    ``downtime_limit`` at ``bandwidth``.
    """
    if bandwidth <= 0:
        return ConvergenceForecast(False, 0, math.inf, math.inf)
    to_send = float(total_bytes)
    elapsed = 0.0
    for rnd in range(1, max_rounds + 1):
        t = to_send / bandwidth
        elapsed += t
        to_send = min(dirty_rate * t, float(total_bytes))
        downtime = to_send / bandwidth
        if downtime <= downtime_limit:
            return ConvergenceForecast(True, rnd, downtime, elapsed + downtime)
    return ConvergenceForecast(False, max_rounds, to_send / bandwidth, math.inf)
