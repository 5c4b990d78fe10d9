"""The command line, run as a user would: a separate process, output parsed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mpmultifd import GuestRAM
from mpmultifd.cli import parse_size
from mpmultifd.testing import fill


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


@pytest.mark.parametrize(
    "text, value", [("512", 512), ("4K", 4096), ("256M", 256 << 20), ("1G", 1 << 30), ("1.5GiB", 3 << 29)]
)
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


# ----------------------------------------------------------------------------- send / recv / check


def popen_cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-m", "mpmultifd", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_send_and_recv_between_two_processes_json():
    with (
        GuestRAM.create({"pc.ram": 8 << 20, "vga": 1 << 20}) as s,
        GuestRAM.create({"pc.ram": 8 << 20, "vga": 1 << 20}) as d,
    ):
        fill(s, "mixed", 4)
        recv = popen_cli("recv", "--listen", "127.0.0.1:0", "--region", d.name, "--json", "--channels", "2")
        try:
            listening = json.loads(recv.stdout.readline())
            assert listening["event"] == "listening" and listening["region"] == d.name
            sent = run_cli(
                "send", listening["address"], "--region", s.name, "--json", "--channels", "2", "--compression", "lz4"
            )
            assert sent.returncode == 0, sent.stderr
            lines = [json.loads(x) for x in sent.stdout.strip().splitlines()]
            assert [e["status"] for e in lines if e["event"] == "MIGRATION"] == [
                "setup",
                "active",
                "device",
                "completed",
            ]
            result = lines[-1]
            assert result["event"] == "result" and result["status"] == "completed" and result["verified"] is True
            assert result["query"]["ram"]["total"] == 9 << 20
            assert result["query"]["config"]["compression"] == "lz4"
            received = json.loads(recv.stdout.readline())
            assert received["status"] == "completed" and received["verified"] is True
            assert recv.wait(30) == 0
        finally:
            if recv.poll() is None:
                recv.kill()
            recv.communicate()
        assert all(np.array_equal(s.view(b.name), d.view(b.name)) for b in s.blocks)


def test_send_into_a_dev_shm_file_region(tmp_path):
    prefix = os.environ["MPMULTIFD_SHM_PREFIX"]
    path = f"/dev/shm/{prefix}file_{os.getpid()}"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    try:
        with GuestRAM.create({"ram": 4 << 20}) as s:
            fill(s, "random", 5)
            recv = popen_cli("recv", "--listen", "127.0.0.1:0", "--file", f"ram={path}", "--json", "--channels", "1")
            try:
                addr = json.loads(recv.stdout.readline())["address"]
                sent = run_cli("send", addr, "--region", s.name, "--channels", "1")
                assert sent.returncode == 0, sent.stderr
                assert "verified: True" in sent.stdout
                assert recv.wait(30) == 0
            finally:
                if recv.poll() is None:
                    recv.kill()
                recv.communicate()
            with open(path, "rb") as f:
                assert f.read() == s.view(0).tobytes()
    finally:
        os.unlink(path)


def test_check_explains_a_conflicting_configuration():
    proc = run_cli("check", "--zerocopy", "on", "--compression", "zstd", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    errors = [f for f in report["findings"] if f["status"] == "error"]
    assert any("compression" in f["detail"] for f in errors)
    assert any(f["item"] == "zerocopy" and f["fallback"] == "plain sends" for f in report["findings"])


def test_check_accepts_a_sound_configuration_and_names_fallbacks():
    proc = run_cli("check", "--address", "127.0.0.1:4444", "--json")
    assert proc.returncode == 0, proc.stdout
    report = json.loads(proc.stdout)
    zc = next(f for f in report["findings"] if f["item"] == "zerocopy")
    assert zc["status"] == "warn" and "copies" in zc["detail"]


def test_sigint_during_send_ends_cancelled():
    size = 768 << 20
    with GuestRAM.create({"a": size}) as s, GuestRAM.create({"a": size}) as d:
        fill(s, "random", 6)
        recv = popen_cli("recv", "--listen", "127.0.0.1:0", "--region", d.name, "--json", "--channels", "2")
        send = None
        try:
            addr = json.loads(recv.stdout.readline())["address"]
            send = popen_cli("send", addr, "--region", s.name, "--json", "--channels", "2", "--no-progress")
            while True:  # wait until the migration runs: a signal during start-up is not a cancel
                event = json.loads(send.stdout.readline())
                if event.get("status") == "active":
                    break
            send.send_signal(signal.SIGINT)
            out, err = send.communicate(timeout=30)
            assert send.returncode == 130, (out, err)
            assert json.loads(out.strip().splitlines()[-1])["status"] == "cancelled"
            assert "Traceback" not in err
            received = json.loads(recv.stdout.readline())
            assert received["status"] == "cancelled"
            assert recv.wait(30) == 130
        finally:
            for p in (recv, send):
                if p is not None and p.poll() is None:
                    p.kill()
                if p is not None:
                    p.communicate()


@pytest.mark.timeout(120)
def test_cli_save_with_top_up_to_a_restored_destination(tmp_path):
    """Two processes: `save --top-up-to` saves, then sends the changes to `restore --top-up` once it listens."""
    with GuestRAM.create({"pc.ram": 8 << 20}) as s, GuestRAM.create({"pc.ram": 8 << 20}) as d:
        fill(s, "half-zero", 9)
        path = str(tmp_path / "vm.mpsave")
        sock = f"unix:{tmp_path}/topup.sock"
        save = popen_cli("save", path, "--region", s.name, "--channels", "2", "--json", "--no-progress",
                         "--top-up-to", sock, "--top-up-wait", "60")
        restore = None
        try:
            while True:  # the save is complete once its result is out
                event = json.loads(save.stdout.readline())
                if event.get("event") == "result":
                    break
            assert event["present-pages"] > 0
            for i in range(12):  # the guest runs on after the save
                s.write("pc.ram", i * 5 * 4096, b"new since the save")
            restore = popen_cli("restore", path, "--region", d.name, "--channels", "2", "--json",
                                "--top-up", "--listen", sock)
            out, err = restore.communicate(timeout=60)
            assert restore.returncode == 0, err
            events = [json.loads(x) for x in out.splitlines()]
            assert [e["event"] for e in events] == ["restored", "listening", "result"]
            assert events[-1]["verified"] is True and events[-1]["normal"] == 12
            sout, serr = save.communicate(timeout=60)
            assert save.returncode == 0, serr
            assert json.loads(sout.splitlines()[-1])["normal"] == 12
            assert np.array_equal(s.view(0), d.view(0))
        finally:
            for p in (save, restore):
                if p is not None and p.poll() is None:
                    p.kill()
                if p is not None:
                    p.communicate()
