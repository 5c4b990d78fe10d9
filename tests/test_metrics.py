"""Prometheus metrics of running and finished migrations (skipped without prometheus_client)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from mpmultifd import Destination, GuestRAM, MigrationConfig, Source  # noqa: E402
from mpmultifd.metrics import MigrationCollector  # noqa: E402
from mpmultifd.testing import fill  # noqa: E402

BLOCKS = {"pc.ram": 4 << 20}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_finished_migration_is_exposed_with_operator_names(regions):
    src_ram, dst_ram = regions
    fill(src_ram, "half-zero", 31)
    collector = MigrationCollector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    cfg = MigrationConfig(channels=2)
    with Destination(dst_ram, config=cfg) as dst, Source(src_ram, cfg) as src:
        collector.add(src, name="vm-1")
        collector.add(dst, name="vm-1")
        src.migrate(dst.address)
        dst.wait(30)
        q, dq = src.query(), dst.query()
        samples = _samples(generate_latest(registry).decode())
    src_l = (("migration", "vm-1"), ("role", "source"))
    dst_l = (("migration", "vm-1"), ("role", "destination"))

    def get(name, labels, **extra):
        return samples[(name, tuple(sorted(dict(labels, **extra).items())))]

    assert get("mpmultifd_migration_status", src_l, status="completed") == 1
    assert get("mpmultifd_migration_status", src_l, status="active") == 0
    assert get("mpmultifd_migration_status", dst_l, status="completed") == 1
    assert get("mpmultifd_migration_transferred_bytes_total", src_l) == q["ram"]["transferred"]
    assert get("mpmultifd_migration_transferred_bytes_total", dst_l) == dq["ram"]["transferred"]
    assert get("mpmultifd_migration_zero_pages_total", src_l) == q["ram"]["duplicate"] > 0
    assert get("mpmultifd_migration_normal_pages_total", src_l) == q["ram"]["normal"] > 0
    assert get("mpmultifd_migration_rounds_total", src_l) == q["rounds"]
    assert get("mpmultifd_migration_data_total_bytes", src_l) == 4 << 20
    assert get("mpmultifd_migration_downtime_seconds", src_l) == pytest.approx(q["downtime"] / 1000)
    assert get("mpmultifd_migration_elapsed_seconds", src_l) == pytest.approx(q["total-time"] / 1000)
    assert get("mpmultifd_migration_progress_ratio", src_l) == 1.0


def test_finished_ones_beyond_keep_finished_are_dropped(regions):
    src_ram, dst_ram = regions
    collector = MigrationCollector(keep_finished=1)
    cfg = MigrationConfig(channels=1)
    sources = []
    with Destination(dst_ram, config=cfg) as dst, Source(src_ram, cfg) as src:
        src.migrate(dst.address)
        collector.add(src, name="first")
        sources.append(src)
    with GuestRAM.create(BLOCKS) as d2, Destination(d2, config=cfg) as dst2, Source(src_ram, cfg) as src2:
        src2.migrate(dst2.address)
        collector.add(src2, name="second")
        names = {s.labels["migration"] for fam in collector.collect() for s in fam.samples}
        d2.unlink()
    assert names == {"second"}


def test_cli_send_serves_metrics_while_migrating():
    size = 16 << 20
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with GuestRAM.create({"a": size}) as s, GuestRAM.create({"a": size}) as d:
        fill(s, "random", 32)
        recv = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mpmultifd",
                "recv",
                "--listen",
                "127.0.0.1:0",
                "--region",
                d.name,
                "--json",
                "--metrics-port",
                "0",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        send = None
        try:
            recv_metrics = json.loads(recv.stdout.readline())
            assert recv_metrics["event"] == "metrics"
            addr = json.loads(recv.stdout.readline())["address"]
            send = subprocess.Popen([sys.executable, "-m", "mpmultifd", "send", addr, "--region", s.name, "--json",
                                     "--no-progress", "--metrics-port", "0", "--max-bandwidth", "4M/s"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            first = json.loads(send.stdout.readline())
            assert first["event"] == "metrics"
            while True:  # scrape once the migration runs
                ev = json.loads(send.stdout.readline())
                if ev.get("status") == "active":
                    break
            with urllib.request.urlopen(f"http://{first['address']}/metrics", timeout=10) as r:
                text = r.read().decode()
            samples = _samples(text)
            active = [k for k, v in samples.items() if k[0] == "mpmultifd_migration_status" and v == 1]
            assert len(active) == 1 and ("status", "active") in active[0][1], active
            with urllib.request.urlopen(f"http://{recv_metrics['address']}/metrics", timeout=10) as r:
                assert "mpmultifd_migration_transferred_bytes_total" in r.read().decode()
            out, err = send.communicate(timeout=60)
            assert send.returncode == 0, err
            recv.communicate(timeout=30)
            assert recv.returncode == 0
        finally:
            for p in (recv, send):
                if p is not None and p.poll() is None:
                    p.kill()
                if p is not None:
                    p.communicate()
