"""Estimate how fast a region's pages are dirtied, without migrating (QEMU's ``calc-dirty-rate``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from .config import MigrationConfig
from .errors import ConfigError, MigrationError
from .pacing import rounds_to_converge
from .ram import GuestRAM
from .stats import DirtyRateEstimate
from .tracking import make_tracker

__all__ = ["check_estimate_arguments", "estimate_dirty_rate"]


def check_estimate_arguments(duration: float, interval: float) -> None:
    """ConfigError naming ``duration`` or ``interval`` when either is not a usable number of seconds."""
    if not (isinstance(duration, (int, float)) and 0 < duration < 3600):
        raise ConfigError(f"duration: {duration!r} is not a number of seconds in (0, 3600)")
    if not (isinstance(interval, (int, float)) and 0 < interval <= duration):
        raise ConfigError(f"interval: {interval!r} is not a number of seconds in (0, duration]")


def estimate_dirty_rate(
    ram: GuestRAM,
    config: MigrationConfig,
    *,
    tracker_in_use: bool,
    check_cancel: Callable[[], None],
    downtime_limit: float,
    duration: float = 2.0,
    interval: float = 0.5,
    bandwidth: float | None = None,
    downtime_limit_override: float | None = None,
) -> DirtyRateEstimate:
    """Sample ``config.dirty_tracker`` on ``ram`` every ``interval`` seconds for ``duration`` seconds.

    With the ``map`` tracker the marks taken are put back afterwards, so a
    later migration (or a top-up after a save) still sees them.
    ``tracker_in_use``: a tracker of this region is running already (a kernel
    tracker then cannot be had a second time). ``check_cancel()`` is called
    while waiting between samples and raises to stop. With ``bandwidth``
    (bytes per second), the result also forecasts whether a migration would
    converge within ``downtime_limit_override`` (default: ``downtime_limit``).
    """
    check_estimate_arguments(duration, interval)
    if config.dirty_tracker == "kernel" and tracker_in_use:
        raise MigrationError(
            "estimate(): the kernel tracker of this region is busy tracking the changes since the last "
            "save (for a top-up); a region takes one kernel tracker at a time"
        )
    tracker = make_tracker(config.dirty_tracker, ram)
    taken: list[list[np.ndarray]] = []
    samples: list[float] = []
    try:
        if tracker.name == "map":
            # marks made before the estimate (since a save, say) are given back afterwards too
            taken.append([ram.snapshot_dirty(b.index) for b in ram.blocks])
        tracker.start()
        t_prev = t0 = time.monotonic()
        while True:
            wake = min(t_prev + interval, t0 + duration)
            while (left := wake - time.monotonic()) > 0:
                time.sleep(min(left, 0.05))
                check_cancel()
            got = tracker.collect_all()
            now = time.monotonic()
            taken.append(got)
            samples.append(sum(len(g) for g in got) * ram.page_size / (now - t_prev))
            t_prev = now
            if now >= t0 + duration - 1e-3:
                break
        scan = tracker.seconds
    finally:
        tracker.close()
        if tracker.name == "map":  # give the marks back
            for i, dm in enumerate(ram.dirty_map(b.index) for b in ram.blocks):
                for got in taken:
                    dm[got[i]] = 1
    rate = float(np.median(samples))
    limit = downtime_limit if downtime_limit_override is None else downtime_limit_override
    forecast = (
        rounds_to_converge(ram.total_size, rate, bandwidth, limit, config.max_rounds) if bandwidth else None
    )
    return DirtyRateEstimate(
        dirty_rate=rate,
        samples=tuple(samples),
        interval=interval,
        duration=duration,
        tracker=tracker.name,
        tracker_seconds=scan,
        total=ram.total_size,
        page_size=ram.page_size,
        bandwidth=bandwidth,
        downtime_limit=limit,
        converges=None if forecast is None else forecast.converges,
        rounds=None if forecast is None else forecast.rounds,
        expected_downtime=None if forecast is None else forecast.expected_downtime,
    )
