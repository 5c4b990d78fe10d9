"""The command line as an operator meets it: --keep, signals, units, errors, help."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mpmultifd import GuestRAM, MigrationConfig, Source
from mpmultifd.testing import fill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpmultifd", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def popen_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mpmultifd", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _shm_entries() -> set[str]:
    prefix = os.environ["MPMULTIFD_SHM_PREFIX"]
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


def _finish(*procs: subprocess.Popen | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
        if p is not None:
            p.communicate()


def _check_kept(region: str, expected: GuestRAM, before: set[str]) -> None:
    """Another process attaches to the kept region by name and finds the bytes; then the files go."""
    left = _shm_entries() - before
    try:
        assert left, "the kept region's segments are gone"
        attached = GuestRAM.attach(region)
        try:
            assert all(np.array_equal(expected.view(b.name), attached.view(b.name)) for b in expected.blocks)
        finally:
            attached.close()
    finally:
        for name in left:
            os.unlink(os.path.join("/dev/shm", name))


# ----------------------------------------------------------------------------- --keep


def test_recv_create_keep_leaves_the_region_for_another_process():
    with GuestRAM.create({"pc.ram": 4 << 20, "vga": 1 << 20}) as s:
        fill(s, "random", 11)
        before = _shm_entries()
        recv = popen_cli("recv", "--listen", "127.0.0.1:0", "--create", "pc.ram=4M,vga=1M", "--keep", "--json",
                         "--channels", "2")
        try:
            listening = json.loads(recv.stdout.readline())
            sent = run_cli("send", listening["address"], "--region", s.name, "--channels", "2", "--no-progress")
            assert sent.returncode == 0, sent.stderr
            out, err = recv.communicate(timeout=60)
            assert recv.returncode == 0, err
            assert "leaked" not in err
        finally:
            _finish(recv)
        _check_kept(listening["region"], s, before)


def test_restore_create_keep_leaves_the_region_for_another_process(tmp_path):
    path = str(tmp_path / "vm.mpsave")
    with GuestRAM.create({"pc.ram": 4 << 20}) as s:
        fill(s, "half-zero", 12)
        with Source(s, MigrationConfig(channels=2)) as src:
            src.save(path)
        before = _shm_entries()
        proc = run_cli("restore", path, "--create", "pc.ram=4M", "--keep", "--json", "--channels", "2")
        assert proc.returncode == 0, proc.stderr
        assert "leaked" not in proc.stderr
        restored = json.loads(proc.stdout.splitlines()[0])
        _check_kept(restored["region"], s, before)
