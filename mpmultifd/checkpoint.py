"""Restore a region from a save file with parallel channel workers.

The file format is ``savefile``; the saving side is ``Source.save``. A restore
checks everything it can before it writes a byte into the region: the header
and its checksum, the complete mark, the layout against the region, every
bitmap and digest table. Then the workers read each run of present pages with
one ``os.preadv`` straight into the shared RAM, and every restored page is
checked against the digest the save recorded, so a file whose page data was
damaged after it was written is refused, naming the block and pages.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from .channels import Batch, Channel, ChannelGroup
from .config import MigrationConfig
from .digest import fingerprint_some
from .errors import ConfigError, MigrationError, SaveFileError, WorkerDied
from .file_worker import file_spec, loader_main, open_file
from .methods import page_runs
from .processes import mp_context
from .ram import GuestRAM
from .ring import KIND_DATA, KIND_EOS, Ring
from .savefile import SaveLayout, read_layout, unpack_bitmap, unpack_digests
from .stats import RestoreResult

__all__ = ["restore", "read_save_tables"]

log = logging.getLogger("mpmultifd.checkpoint")

_MAX_MISMATCHES = 32


def _pread_exact(fd: int, size: int, offset: int, field: str, path: str) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise SaveFileError(f"{field}: the file ends inside it (truncated)", field=field, path=path)
    return data


def read_save_tables(
    fd: int, layout: SaveLayout, path: str
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every block's present-page map (bool) and page digests (uint64), validated."""
    present, digests = [], []
    for i, b in enumerate(layout.blocks):
        bits = _pread_exact(fd, b.bitmap_size, b.bitmap_offset, f"block[{i}].bitmap", path)
        present.append(unpack_bitmap(bits, b.npages, field=f"block[{i}].bitmap"))
        raw = _pread_exact(fd, b.digest_size, b.digest_offset, f"block[{i}].digest", path)
        digests.append(unpack_digests(raw, b.npages))
    return present, digests


def restore(
    path: str | os.PathLike[str],
    ram: GuestRAM,
    config: MigrationConfig | None = None,
    *,
    verify: bool = True,
    direct: bool = False,
    pool: Any = None,
) -> tuple[RestoreResult, bytes]:
    """Fill ``ram`` from the save file at ``path``; returns the result and the save id.

    ``config`` supplies ``channels``, ``packet_pages``, ``ring_slots``,
    ``start_method`` and ``timeout``; ``pool``, a ``WorkerPool``, lends the
    workers. Raises :class:`SaveFileError` naming the
    field for an incomplete, truncated, corrupted or mismatched file, before
    anything is written when the header, tables or layout are wrong. A
    page-data mismatch is found after the pages were read: the region then
    holds a damaged copy and must not be used.
    """
    cfg = config if config is not None else MigrationConfig()
    path = os.fspath(path)
    t0 = time.monotonic()
    layout, state = read_layout(path)
    layout.check_matches([(b.name, b.size) for b in ram.blocks], ram.page_size, path=path)
    if direct and ram.page_size < 4096:
        raise ConfigError(f"direct: O_DIRECT needs pages of at least 4096 bytes, not {ram.page_size}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        present, digests = read_save_tables(fd, layout, path)
    finally:
        os.close(fd)
    counted = sum(int(np.count_nonzero(p)) for p in present)
    if counted != state.present_pages:
        raise SaveFileError(
            f"state: the complete mark counts {state.present_pages} pages with data, the bitmaps {counted}",
            field="state",
            path=path,
        )
    for i, (p, d) in enumerate(zip(present, digests)):
        if np.any(d[~p]):
            raise SaveFileError(
                f"block[{i}].digest: pages without data in the file have non-zero digests",
                field=f"block[{i}].digest",
                path=path,
            )
    # pages the file has no data for must read as zeros; fresh memory already does
    zeroed = 0
    for b, p in zip(ram.blocks, present):
        view = ram.pages(b.index)
        for first, end in ram.data_extents(b.index):
            stale = np.flatnonzero(~p[first:end]) + first
            starts, lengths = page_runs(stale)
            for s, n in zip(starts, lengths):
                if view[s : s + n].any():
                    view[s : s + n] = 0
                    zeroed += n
    nread = _load(path, layout, ram, present, cfg, direct, pool)
    verified = False
    if verify:
        mismatches: dict[str, list[int]] = {}
        for b, p, d in zip(ram.blocks, present, digests):
            have = fingerprint_some(ram.pages(b.index), np.flatnonzero(p))
            bad = np.flatnonzero(have != d)
            if len(bad):
                mismatches[b.name] = bad[:_MAX_MISMATCHES].tolist()
        if mismatches:
            name, pages = next(iter(mismatches.items()))
            i = [b.name for b in ram.blocks].index(name)
            raise SaveFileError(
                f"block[{i}].data: page data does not match the digests the save recorded "
                f"(block {name!r}, pages {pages}{'...' if len(pages) == _MAX_MISMATCHES else ''}): "
                "the file is corrupted",
                field=f"block[{i}].data",
                path=path,
            )
        verified = True
    result = RestoreResult(
        path=path,
        save_id=layout.save_id.hex(),
        total_time=time.monotonic() - t0,
        total=ram.total_size,
        read=nread,
        present_pages=counted,
        zeroed_pages=zeroed,
        verified=verified,
        channels=cfg.channels,
        direct=direct,
    )
    log.info("restored %s: %d pages with data in %.3f s", path, counted, result.total_time)
    return result, layout.save_id


def _load(
    path: str,
    layout: SaveLayout,
    ram: GuestRAM,
    present: list[np.ndarray],
    cfg: MigrationConfig,
    direct: bool,
    pool: Any,
) -> int:
    """Read every present page into ``ram`` with ``cfg.channels`` workers; returns the bytes read."""
    if direct:
        os.close(open_file(path, os.O_RDONLY, direct=True))  # says why here, not from a worker
    ctx = mp_context(cfg.start_method)
    group = ChannelGroup("restore worker")
    error: BaseException | None = None
    data_offsets = tuple(b.data_offset for b in layout.blocks)
    try:
        for i in range(cfg.channels):
            spec = file_spec(ram, data_offsets, path, i, packet_pages=cfg.packet_pages, direct=direct)
            ring = Ring.create(nslots=cfg.ring_slots, capacity=cfg.packet_pages)
            group.start(i, ctx, loader_main, (spec, ram, ring), f"mpmultifd-restore-{i}", pool, ring=ring)
        group.wait_ready(time.monotonic() + cfg.timeout, group.pump, "restore workers")
        num = 0
        for block, p in enumerate(present):
            pages = np.flatnonzero(p).astype(np.int64)
            for start in range(0, len(pages), cfg.packet_pages):
                ch = min(group, key=lambda c: c.queued())
                _push(group, ch, (KIND_DATA, block, 0, num, pages[start : start + cfg.packet_pages]), cfg.timeout)
                num += 1
        for ch in group:
            _push(group, ch, (KIND_EOS, 0, 0, num, None), cfg.timeout)
            num += 1
        last, moved = -1, time.monotonic()
        while not all(ch.done for ch in group):
            group.pump(0.25)
            now_bytes = group.wire_bytes()
            if now_bytes != last:
                last, moved = now_bytes, time.monotonic()
            elif time.monotonic() - moved > cfg.timeout:
                raise MigrationError(
                    f"restore made no progress for {cfg.timeout:g} s: the file's disk stopped answering"
                )
        return group.wire_bytes()
    except BaseException as exc:
        error = exc
        raise
    finally:
        group.shutdown()
        if error is not None:
            log.warning("restore of %s failed: %s", path, error)


def _push(group: ChannelGroup, ch: Channel, batch: Batch, timeout: float) -> None:
    """Hand a batch to a loader; one that takes nothing for ``timeout`` seconds has a stuck disk."""
    deadline = time.monotonic() + timeout

    def pump(wait: float) -> None:
        group.pump(wait)  # a full ring: is a worker failing?
        if time.monotonic() > deadline:
            raise WorkerDied(f"restore worker {ch.index} took no batch for {timeout:g} s", channel=ch.index)

    group.push(ch, batch, pump)
