"""Statistics: the final result record and ``query()`` snapshots in QEMU's words."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "MigrationResult",
    "SaveResult",
    "RestoreResult",
    "DirtyRateEstimate",
    "EventHub",
    "STATUSES",
    "TERMINAL_STATUSES",
]

log = logging.getLogger(__name__)

# QEMU's MigrationStatus words, in the order a migration passes through them
STATUSES = ("none", "setup", "active", "device", "completed", "failed", "cancelling", "cancelled", "commit-unknown")
# "commit-unknown" (not QEMU's): COMMIT went out and its acknowledgement never came back
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "commit-unknown"})


@dataclass(frozen=True)
class MigrationResult:
    """What a finished migration did; returned by ``Source.migrate`` and ``Destination.wait``.

    Times are seconds. ``transferred`` counts bytes on the data channels
    (headers included); ``normal`` and ``duplicate`` count pages sent with
    data and as zero pages. ``verified`` is ``True`` when the per-page
    fingerprints of every block matched at switchover, ``None`` when
    verification was off. ``converged`` is ``False`` when precopy gave up
    (``max_rounds`` or a stall, named by ``stall_reason``) and the switchover
    took a longer downtime than the limit, as ``stall_downtime_limit`` allowed.
    ``throttle`` is the highest throttle percentage applied, ``dirty_tracker``
    the tracker used, ``dirty_sync_time`` the seconds spent finding dirty pages.
    ``repaired_pages`` counts pages that differed at switchover and were sent
    again (in ``repair_passes`` passes) before the region verified;
    ``downtime_phases`` splits the source's downtime into its phases (seconds).
    """

    status: str
    total_time: float
    setup_time: float
    downtime: float
    rounds: int
    total: int
    transferred: int
    normal: int
    duplicate: int
    verified: bool | None
    converged: bool = True
    expected_downtime: float = 0.0
    channels: int = 0
    method: str = "none"
    per_channel: tuple[dict[str, int], ...] = field(default_factory=tuple)
    stall_reason: str | None = None
    throttle: int = 0
    dirty_tracker: str = "map"
    dirty_sync_time: float = 0.0
    repaired_pages: int = 0
    repair_passes: int = 0
    downtime_phases: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Bytes of guest RAM per second of total time (all rounds, zero pages included)."""
        return self.total / self.total_time if self.total_time > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict with QEMU-style kebab-case names."""
        d = asdict(self)
        out = {k.replace("_", "-"): v for k, v in d.items()}
        out["per-channel"] = [dict(c) for c in self.per_channel]
        out["throughput"] = self.throughput
        return out

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as JSON; keyword arguments go to ``json.dumps``."""
        return json.dumps(self.to_dict(), **kwargs)


class _FileResult:
    """Throughput and a kebab-case dict for the results of saves and restores."""

    total: int
    total_time: float

    @property
    def throughput(self) -> float:
        """Bytes of guest RAM per second of total time."""
        return self.total / self.total_time if self.total_time > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict with kebab-case names."""
        out = {k.replace("_", "-"): v for k, v in asdict(self).items()}  # type: ignore[call-overload]
        out["throughput"] = self.throughput
        return out


@dataclass(frozen=True)
class SaveResult(_FileResult):
    """What ``Source.save`` wrote: a complete save file at ``path``.

    ``present_pages`` pages hold data in the file, the other pages of
    ``total`` bytes are holes; ``written`` counts page bytes written over all
    rounds (pages rewritten in later rounds count again); ``allocated`` is
    the disk space the file takes. ``downtime`` runs from ``pause()`` to
    ``resume()``: the final round and the guest's fingerprints (the file's
    tables and fsync come after, with the guest running again).
    """

    path: str
    save_id: str
    total_time: float
    setup_time: float
    downtime: float
    rounds: int
    total: int
    written: int
    present_pages: int
    zero_pages: int
    file_size: int
    allocated: int
    converged: bool
    channels: int
    direct: bool
    stall_reason: str | None = None
    throttle: int = 0
    dirty_tracker: str = "map"



@dataclass(frozen=True)
class RestoreResult(_FileResult):
    """What ``Destination.restore`` (or ``mpmultifd.checkpoint.restore``) read back.

    ``verified`` is True when every restored page matched the digest the save
    recorded; ``zeroed_pages`` are pages of the region that held stale data and
    were cleared because the file has none for them.
    """

    path: str
    save_id: str
    total_time: float
    total: int
    read: int
    present_pages: int
    zeroed_pages: int
    verified: bool
    channels: int
    direct: bool



@dataclass(frozen=True)
class DirtyRateEstimate:
    """What ``Source.estimate()`` measured: how fast the guest dirties pages, and what that means.

    ``dirty_rate`` is the median over the samples, in bytes per second of
    distinct pages dirtied per ``interval``; ``samples`` are the individual
    rates. With a ``bandwidth`` (bytes per second), ``converges``, ``rounds``
    and ``expected_downtime`` forecast precopy at that bandwidth against
    ``downtime_limit``: each round sends what the previous one let the guest
    dirty, so it converges when the dirty rate stays well below the bandwidth.
    ``tracker_seconds`` is the time the tracker itself took.
    """

    dirty_rate: float
    samples: tuple[float, ...]
    interval: float
    duration: float
    tracker: str
    tracker_seconds: float
    total: int
    page_size: int
    bandwidth: float | None = None
    downtime_limit: float | None = None
    converges: bool | None = None
    rounds: int | None = None
    expected_downtime: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict with kebab-case names."""
        return {k.replace("_", "-"): (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


class EventHub:
    """Delivers events to a callback and to any number of iterators.

    An event is a dict with ``event`` (``"MIGRATION"`` or ``"MIGRATION_PASS"``,
    QEMU's names), ``timestamp`` (wall clock) and event-specific fields. A
    callback that raises is logged and otherwise ignored: it must not break
    the migration.
    """

    def __init__(self, callback: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self._callback = callback
        self._lock = threading.Lock()
        self._queues: list[queue.Queue[dict[str, Any]]] = []

    def emit(self, event: str, **data: Any) -> None:
        ev = {"event": event, "timestamp": time.time(), **data}
        if self._callback is not None:
            try:
                self._callback(ev)
            except Exception:
                log.exception("event callback failed on %s", event)
        with self._lock:
            for q in self._queues:
                q.put(ev)

    def subscribe(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._queues.append(q)

        def gen() -> Iterator[dict[str, Any]]:
            try:
                while True:
                    try:
                        ev = q.get(timeout=timeout)
                    except queue.Empty:
                        return
                    yield ev
                    if ev["event"] == "MIGRATION" and ev.get("status") in TERMINAL_STATUSES:
                        return
            finally:
                with self._lock:
                    self._queues.remove(q)

        return gen()
