"""Prometheus metrics for running and finished migrations (the optional ``prometheus`` extra).

A :class:`MigrationCollector` reads :meth:`Source.query` / :meth:`Destination.query`
of every migration added to it at scrape time (no thread, no bookkeeping while
migrating) and exposes it under names an operator of libvirt or KubeVirt
recognises::

    from prometheus_client import REGISTRY
    from mpmultifd.metrics import MigrationCollector

    collector = MigrationCollector()
    REGISTRY.register(collector)
    collector.add(src, name="vm-42")          # a Source or a Destination
    # ... or serve a registry of its own: serve_metrics(("0.0.0.0", 9464), collector)

Every series carries the labels ``migration`` (the name given, by default the
region's name) and ``role`` (``source`` or ``destination``). Times are seconds,
sizes bytes, ``progress`` a ratio. Finished migrations stay (their last
snapshot) until :meth:`~MigrationCollector.remove`, or until more than
``keep_finished`` finished ones pile up (the oldest go first).

``prometheus_client`` is imported when this module is; the rest of mpmultifd
never needs it (``pip install 'mpmultifd[prometheus]'``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector, CollectorRegistry

from .stats import STATUSES, TERMINAL_STATUSES

__all__ = ["MigrationCollector", "MetricsServer", "serve_metrics"]

_LABELS = ["migration", "role"]


class MigrationCollector(Collector):
    """Exposes the ``query()`` of the migrations added to it; thread-safe."""

    def __init__(self, *, keep_finished: int = 16) -> None:
        self.keep_finished = keep_finished
        self._lock = threading.Lock()
        self._jobs: list[tuple[Any, str, str]] = []

    def add(self, job: Any, name: str | None = None) -> None:
        """Watch a Source or a Destination (role taken from its type)."""
        from .destination import Destination

        role = "destination" if isinstance(job, Destination) else "source"
        label = name if name is not None else getattr(getattr(job, "ram", None), "name", "") or str(id(job))
        with self._lock:
            self._jobs = [j for j in self._jobs if j[0] is not job]
            self._jobs.append((job, label, role))
            finished = [j for j in self._jobs if _status(j[0]) in TERMINAL_STATUSES]
            for old in finished[: max(0, len(finished) - self.keep_finished)]:
                self._jobs.remove(old)

    def remove(self, job: Any) -> None:
        with self._lock:
            self._jobs = [j for j in self._jobs if j[0] is not job]

    def describe(self) -> list:
        return []  # collected at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        with self._lock:
            jobs = list(self._jobs)
        fams = _Families()
        for job, name, role in jobs:
            try:
                q = job.query()
            except Exception:  # a job torn down under us: skip it this scrape
                continue
            fams.add(q, [name, role])
        yield from fams.all()


def _status(job: Any) -> str:
    try:
        return str(job.status)
    except Exception:
        return "none"


class _Families:
    """The metric families of one scrape."""

    def __init__(self) -> None:
        def g(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"mpmultifd_migration_{name}", doc, labels=_LABELS + (extra or []))

        def c(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"mpmultifd_migration_{name}", doc, labels=_LABELS)

        self.status = g("status", "1 for the migration's current status (QEMU's words), 0 for the others", ["status"])
        self.transferred = c("transferred_bytes", "bytes sent or received on the data channels, headers included")
        self.processed = c("data_processed_bytes", "bytes of guest RAM handled: pages with data and zero pages")
        self.remaining = g("data_remaining_bytes", "bytes of dirty guest RAM still to send")
        self.total = g("data_total_bytes", "size of the region")
        self.normal = c("normal_pages", "pages sent with their data")
        self.zero = c("zero_pages", "pages sent as zero pages (QEMU's duplicate)")
        self.rounds = c("rounds", "precopy rounds (dirty-memory passes) so far")
        self.dirty_rate = g("dirty_memory_rate_bytes", "bytes of guest RAM dirtied per second, last measured")
        self.rate = g("transfer_rate_bytes", "bytes per second sent over all channels since setup")
        self.elapsed = g("elapsed_seconds", "time since the migration started")
        self.downtime = g("downtime_seconds", "time the guest was paused (once switched over)")
        self.expected_downtime = g("expected_downtime_seconds", "downtime expected if switching over now")
        self.expected_remaining = g("expected_remaining_seconds", "estimated time until the migration ends")
        self.progress = g("progress_ratio", "fraction done, 0 to 1, never decreasing")
        self.throttle = g("cpu_throttle_ratio", "how much the writer is slowed, 0 to 1 (auto-converge)")

    def add(self, q: dict[str, Any], labels: list[str]) -> None:
        ram = q.get("ram", {})
        status = q.get("status", "none")
        for s in STATUSES:
            self.status.add_metric(labels + [s], 1.0 if s == status else 0.0)
        self.transferred.add_metric(labels, ram.get("transferred", 0))
        ps = ram.get("page-size", 4096)
        normal, zero = ram.get("normal", 0), ram.get("duplicate", 0)
        self.processed.add_metric(labels, (normal + zero) * ps)
        self.normal.add_metric(labels, normal)
        self.zero.add_metric(labels, zero)
        self.total.add_metric(labels, ram.get("total", 0))
        rounds = q.get("rounds")
        if isinstance(rounds, int):
            self.rounds.add_metric(labels, rounds)
        if "remaining" in ram:
            self.remaining.add_metric(labels, ram["remaining"])
        if "dirty-pages-rate" in ram:
            self.dirty_rate.add_metric(labels, ram["dirty-pages-rate"] * ps)
        if "mbps" in ram:
            self.rate.add_metric(labels, ram["mbps"] * 1e6 / 8)
        # query() is QMP-shaped: its times are milliseconds
        for fam, key in (
            (self.elapsed, "total-time"),
            (self.downtime, "downtime"),
            (self.expected_downtime, "expected-downtime"),
            (self.expected_remaining, "expected-remaining"),
        ):
            if isinstance(q.get(key), (int, float)):
                fam.add_metric(labels, q[key] / 1000)
        if isinstance(q.get("progress"), (int, float)):
            self.progress.add_metric(labels, q["progress"] / 100)
        if isinstance(q.get("cpu-throttle-percentage"), (int, float)):
            self.throttle.add_metric(labels, q["cpu-throttle-percentage"] / 100)

    def all(self) -> list[Any]:
        return [f for f in vars(self).values() if f.samples]


class MetricsServer:
    """A small HTTP server answering Prometheus scrapes at any path, in a daemon thread."""

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry) -> None:
        self._httpd = ThreadingHTTPServer(address, MetricsHandler.factory(registry))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="mpmultifd-metrics", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve_metrics(address: tuple[str, int], collector: MigrationCollector) -> MetricsServer:
    """Serve ``collector`` (in a registry of its own) at ``http://HOST:PORT/metrics``; port 0 picks one."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return MetricsServer(address, registry)
