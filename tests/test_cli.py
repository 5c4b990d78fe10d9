"""The command line, run as a user would: a separate process, output parsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mpmultifd.cli import parse_size


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "mpmultifd", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_demo_json_reports_a_verified_identical_migration():
    proc = run_cli("demo", "--size", "16M", "--channels", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "completed"
    assert report["byte-identical"] is True
    assert report["verified"] is True and report["destination-verified"] is True
    assert report["destination-valid"] is True
    assert report["rounds"] >= 2
    assert report["writer-writes"] > 0
    assert report["total"] == 16 << 20


def test_demo_text_output():
    proc = run_cli("demo", "--size", "8M", "--channels", "1", "--start-method", "spawn")
    assert proc.returncode == 0, proc.stderr
    assert "byte-identical: True" in proc.stdout
    assert "status:        completed" in proc.stdout


def test_demo_rejects_bad_configuration():
    proc = run_cli("demo", "--size", "8M", "--channels", "0")
    assert proc.returncode != 0
    assert "channels" in proc.stderr


@pytest.mark.parametrize("text, value", [("512", 512), ("4K", 4096), ("256M", 256 << 20), ("1G", 1 << 30), ("1.5GiB", 3 << 29)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")
