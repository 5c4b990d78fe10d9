"""Statistics: the final result record and ``query()`` snapshots in QEMU's words."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["MigrationResult", "STATUSES", "TERMINAL_STATUSES"]

# QEMU's MigrationStatus words, in the order a migration passes through them
STATUSES = ("none", "setup", "active", "device", "completed", "failed", "cancelling", "cancelled")
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class MigrationResult:
    """What a finished migration did; returned by ``Source.migrate`` and ``Destination.wait``.

    Times are seconds. ``transferred`` counts bytes on the data channels
    (headers included); ``normal`` and ``duplicate`` count pages sent with
    data and as zero pages. ``verified`` is ``True`` when the per-page
    fingerprints of every block matched at switchover, ``None`` when
    verification was off. ``converged`` is ``False`` when ``max_rounds`` forced
    the switchover while the expected downtime was still above the limit.
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
        return json.dumps(self.to_dict(), **kwargs)
