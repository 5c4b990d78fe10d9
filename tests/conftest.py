"""Shared fixtures: every test must leave no /dev/shm entry and no child process behind.

Each xdist worker gets its own shared-memory name prefix (through the
``MPMULTIFD_SHM_PREFIX`` environment variable, which child processes inherit),
so a test only ever sees the segments its own worker made.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("expensive", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

START_METHODS = ("fork", "spawn", "forkserver")


@pytest.fixture
def regions(request):
    """A source and a destination region shaped like the test module's ``BLOCKS``, removed afterwards."""
    from mpmultifd import GuestRAM

    blocks = request.module.BLOCKS
    with GuestRAM.create(blocks) as src, GuestRAM.create(blocks) as dst:
        try:
            yield src, dst
        finally:
            src.unlink()
            dst.unlink()


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ["MPMULTIFD_SHM_PREFIX"] = f"mpmt{os.getpid()}{worker}_"


def _own_segments() -> set[str]:
    prefix = os.environ["MPMULTIFD_SHM_PREFIX"]
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


def _helper_pids() -> set[int]:
    """Long-lived multiprocessing helpers that are not a test's children."""
    pids: set[int] = set()
    try:
        from multiprocessing import forkserver, resource_tracker

        fs_pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        rt_pid = getattr(resource_tracker._resource_tracker, "_pid", None)
        pids.update(p for p in (fs_pid, rt_pid) if p)
    except Exception:  # pragma: no cover - private attributes moved
        pass
    from mpmultifd import _mp

    ours = _mp.forkserver_pid()  # the forkserver mpmultifd's workers come from
    if ours:
        pids.add(ours)
    return pids


def _child_pids() -> set[int]:
    me = os.getpid()
    kids: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may contain spaces; fields resume after the last ')'
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[1]) == me and fields[0] != b"Z":
            kids.add(int(entry))
    return kids - _helper_pids()


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves a shared-memory segment or a child process behind."""
    before_shm = _own_segments()
    before_kids = _child_pids()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        multiprocessing.active_children()  # reap finished children
        leaked_shm = _own_segments() - before_shm
        leaked_kids = _child_pids() - before_kids
        if not (leaked_shm or leaked_kids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for name in leaked_shm:  # clean up so one leak does not fail every later test
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass
    assert not leaked_shm, f"test leaked shared-memory segments: {sorted(leaked_shm)}"
    assert not leaked_kids, f"test leaked child processes: {sorted(leaked_kids)}"


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    return request.param
