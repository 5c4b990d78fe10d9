"""Hardening against hostile local users and peers: safe save files, shared-memory ownership,
key files, bounded control frames and admission that a flood cannot starve."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from mpmultifd import Destination, GuestRAM, MigrationConfig, MigrationError, Source
from mpmultifd.savefile import read_layout
from mpmultifd.testing import fill, same_contents

PS = 4096
BLOCKS = {"pc.ram": 2 << 20, "vga": 256 << 10}


def _cfg(**kw) -> MigrationConfig:
    kw.setdefault("channels", 2)
    kw.setdefault("start_method", "forkserver")
    return MigrationConfig(**kw)


def _save(src: GuestRAM, path: str, **kw) -> None:
    with Source(src, _cfg()) as s:
        s.save(path, **kw)


def _restored_equal(src: GuestRAM, dst: GuestRAM, path: str) -> bool:
    dst.view("pc.ram")[:] = 0
    dst.view("vga")[:] = 0
    with Destination(dst, config=_cfg()) as d:
        d.restore(path)
    return same_contents(src, dst)


# ---------------------------------------------------------------------- save files


@pytest.mark.timeout(120)
def test_save_replaces_a_symlink_instead_of_writing_through_it(regions, tmp_path):
    src, dst = regions
    fill(src, "random", 3)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "state.mpsave"
    link.symlink_to(victim)
    _save(src, str(link))
    assert victim.read_bytes() == b"precious"
    st = os.lstat(link)
    assert stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode)
    assert _restored_equal(src, dst, str(link))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.mpsave", "victim"]  # no temporary left


@pytest.mark.timeout(120)
def test_save_over_a_world_readable_file_is_0600(regions, tmp_path):
    src, _ = regions
    fill(src, "random", 4)
    path = tmp_path / "state.mpsave"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    old_umask = os.umask(0)
    try:
        _save(src, str(path))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    read_layout(str(path))  # a complete save


@pytest.mark.timeout(120)
def test_a_failed_save_leaves_the_previous_one_intact(regions, tmp_path):
    src, dst = regions
    fill(src, "half-zero", 5)
    path = str(tmp_path / "good.mpsave")
    _save(src, path)
    with open(path, "rb") as f:
        before = f.read()
    fill(src, "random", 6)  # the guest moves on; the second save fails at its pause

    def boom() -> None:
        raise RuntimeError("the guest could not be paused")

    with pytest.raises(MigrationError):
        _save(src, path, pause=boom)
    with open(path, "rb") as f:
        assert f.read() == before
    assert os.listdir(tmp_path) == ["good.mpsave"]  # the failed save's file is gone
    fill(src, "half-zero", 5)
    assert _restored_equal(src, dst, path)
