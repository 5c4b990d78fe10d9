"""Hardening against hostile local users and peers: safe save files, shared-memory ownership,
key files, bounded control frames and admission that a flood cannot starve."""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
import pytest

from mpmultifd import Destination, GuestRAM, MigrationConfig, MigrationError, Source, UntrustedSegmentError
from mpmultifd import ConfigError
from mpmultifd._shm import unique_name
from mpmultifd.auth import load_key
from mpmultifd.errors import KeyFileWarning
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


# ---------------------------------------------------------------------- shared memory and socket files

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@needs_root
def test_attach_refuses_a_segment_another_user_owns():
    with GuestRAM.create({"pc.ram": 4 * PS}) as ram:
        meta = os.path.join("/dev/shm", ram.name)
        os.chown(meta, NOBODY, -1)  # as if another user had planted it under that name
        with pytest.raises(UntrustedSegmentError) as e:
            GuestRAM.attach(ram.name)
        assert e.value.path == meta and e.value.owner == NOBODY and e.value.mode == 0o600
        assert ram.name in str(e.value) and str(NOBODY) in str(e.value)
        with GuestRAM.attach(ram.name, allow_foreign=True) as other:  # the opt-in
            other.write("pc.ram", 0, b"asked for")
        os.chown(meta, 0, -1)
        # a data segment planted by another user is refused too, naming the block
        data = os.path.join("/dev/shm", ram.block(0).segment)
        os.chown(data, NOBODY, -1)
        with pytest.raises(UntrustedSegmentError, match="pc.ram") as e:
            GuestRAM.attach(ram.name)
        assert e.value.path == data and e.value.owner == NOBODY
        os.chown(data, 0, -1)
        assert ram.view(0)[:9].tobytes() == b"asked for"


def test_attach_refuses_a_segment_open_to_others():
    with GuestRAM.create({"pc.ram": 4 * PS}) as ram:
        meta = os.path.join("/dev/shm", ram.name)
        for mode in (0o644, 0o660, 0o606):
            os.chmod(meta, mode)
            with pytest.raises(UntrustedSegmentError) as e:
                GuestRAM.attach(ram.name)
            assert e.value.mode == mode and f"{mode:04o}" in str(e.value)
        os.chmod(meta, 0o600)
        with GuestRAM.attach(ram.name) as other:
            assert other.blocks == ram.blocks


def test_attach_never_follows_a_symlink_in_dev_shm(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * PS)
    name = unique_name("link")
    os.symlink(target, os.path.join("/dev/shm", name))
    try:
        with pytest.raises(OSError):
            GuestRAM.attach(name)
    finally:
        os.unlink(os.path.join("/dev/shm", name))


@needs_root
def test_from_files_with_another_users_file_needs_the_opt_in(tmp_path):
    path = tmp_path / "qemu-ram"
    path.write_bytes(b"\0" * (4 * PS))
    os.chown(path, NOBODY, -1)
    with pytest.raises(UntrustedSegmentError) as e:
        GuestRAM.from_files({"pc.ram": str(path)})
    assert e.value.owner == NOBODY and "pc.ram" in str(e.value)
    with GuestRAM.from_files({"pc.ram": str(path)}, allow_foreign=True) as ram:
        # the accepted owner travels with the layout: a process attaching the region accepts it
        with GuestRAM.attach(ram.name) as other:
            other.write("pc.ram", PS, b"through the attachment")
        assert ram.view(0)[PS : PS + 22].tobytes() == b"through the attachment"
        os.chown(path, NOBODY + 1, -1)  # but not a file swapped for another owner's
        with pytest.raises(UntrustedSegmentError):
            GuestRAM.attach(ram.name)


def test_unix_socket_file_is_0600_whatever_the_umask(tmp_path):
    path = str(tmp_path / "dest.sock")
    old = os.umask(0)
    try:
        with GuestRAM.create({"pc.ram": 4 * PS}) as ram, Destination(ram, f"unix:{path}", _cfg()):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)


# ---------------------------------------------------------------------- key files


def test_load_key_reads_every_byte_and_refuses_short_keys(tmp_path):
    path = tmp_path / "key"
    key = b" \n\tkey bytes with whitespace at both ends \r\n"
    path.write_bytes(key)
    os.chmod(path, 0o600)
    assert load_key(path) == key  # nothing stripped: the API and the CLI use the same bytes
    path.write_bytes(b"x" * 16)
    assert load_key(str(path)) == b"x" * 16
    path.write_bytes(b"x" * 15)
    with pytest.raises(ConfigError, match="15 bytes is too short"):
        load_key(path)
    with pytest.raises(ConfigError, match="cannot open"):
        load_key(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_key(tmp_path)


def test_load_key_warns_about_a_file_others_can_read(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(os.urandom(32))
    os.chmod(path, 0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_key(path)  # no warning
    for mode in (0o640, 0o604):
        os.chmod(path, mode)
        with pytest.warns(KeyFileWarning, match=f"{mode:04o}"):
            load_key(path)


def test_cli_uses_the_key_bytes_exactly(tmp_path):
    from mpmultifd.cli import _config, build_parser

    key = b"\n" + os.urandom(30) + b" "
    path = tmp_path / "key"
    path.write_bytes(key)
    os.chmod(path, 0o600)
    a = build_parser().parse_args(["recv", "--listen", "127.0.0.1:0", "--auth-key-file", str(path)])
    assert _config(a).auth_key == key
