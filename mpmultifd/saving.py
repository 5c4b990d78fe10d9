"""Helpers of a save to a file (``Source.save``): the temporary file, durability, digests, verification."""

from __future__ import annotations

import mmap
import os
import secrets

import numpy as np

from .digest import fingerprint_pages, fingerprint_some
from .errors import ConfigError, VerificationError
from .ram import GuestRAM
from .savefile import SaveLayout

__all__ = ["block_fingerprints", "fsync_dir", "save_temp", "verify_save"]


def block_fingerprints(ram: GuestRAM, block: int) -> np.ndarray:
    """Fingerprints of every page of a block, reading only pages with data (a hole's is 0, a zero page's)."""
    pages = ram.pages(block)
    out = np.zeros(len(pages), dtype=np.uint64)
    for first, end in ram.data_extents(block):
        out[first:end] = fingerprint_pages(pages[first:end])
    return out


def save_temp(path: str) -> tuple[int, str]:
    """A new file for a save beside ``path``: created exclusively (never through a symlink), mode 0600.

    The save is written there and renamed over ``path`` only once complete and
    synced, so a failed save never touches a previous one, and a symlink at
    ``path`` is replaced rather than written through.
    """
    where = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    if not base:
        raise ConfigError(f"path: {path!r} names a directory, not a save file")
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(16):
        tmp = os.path.join(where, f".{base[:200]}.{secrets.token_hex(6)}.part")
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, 0o600)  # whatever the umask left, guest bytes are for the owner only
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return fd, tmp
    raise FileExistsError(f"cannot create a fresh temporary file beside {path!r}")


def fsync_dir(path: str) -> None:
    """Make a new file's directory entry durable too."""
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def verify_save(
    ram: GuestRAM,
    fd: int,
    layout: SaveLayout,
    maps: list[np.ndarray],
    prints: list[np.ndarray],
    dirty_tracker: str,
) -> None:
    """Check the file's pages against the paused guest's fingerprints before marking it complete.

    ``maps``: per block, which pages the file holds (nonzero); ``prints``: per
    block, the paused guest's fingerprints. Raises :class:`VerificationError`
    naming up to 32 differing pages per block; ``dirty_tracker`` is named in
    its message.
    """
    ps = ram.page_size
    bad: dict[str, list[int]] = {}
    for b, entry, mine, fp in zip(ram.blocks, layout.blocks, maps, prints):
        untracked = np.flatnonzero((mine == 0) & (fp != 0))  # data the file never got
        mm = mmap.mmap(fd, entry.npages * ps, mmap.MAP_SHARED, mmap.PROT_READ, offset=entry.data_offset)
        try:
            file_pages = np.frombuffer(mm, dtype=np.uint8).reshape(entry.npages, ps)
            have = fingerprint_some(file_pages, np.flatnonzero(mine))
            wrong = np.flatnonzero((mine != 0) & (have != fp))
            del file_pages
        finally:
            mm.close()
        pages = np.union1d(untracked, wrong)
        if len(pages):
            bad[b.name] = pages[:32].tolist()
    if bad:
        raise VerificationError(
            "the save file differs from the paused guest in "
            + ", ".join(f"block {k!r} pages {v}" for k, v in bad.items())
            + f": pages changed without the {dirty_tracker!r} tracker seeing them "
            "(a writer that does not mark its pages needs dirty_tracker='scan')",
            mismatches=bad,
        )
