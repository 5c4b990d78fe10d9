"""Keyed per-page fingerprints: the scanning tracker's and the switchover verification's.

A page is read as 32-bit words ``x[i]`` and fingerprinted as
``F = sum(K[i] * x[i]) mod 2**64`` with ``K`` a vector of odd 64-bit keys.

- A change confined to one aligned 32-bit word always changes ``F``:
  ``K[i] * d`` is never 0 mod ``2**64`` for odd ``K[i]`` and ``0 < |d| < 2**32``.
- Any other fixed change is missed for at most one residue of one key modulo
  ``2**(64 - t)``, where ``t <= 31`` is the lowest set bit of that word's
  difference: with ``K`` secret and random, the miss probability is at most
  ``2**-(63 - t) <= 2**-32``, and ``2**-63`` for the usual change.

Reading 32-bit rather than 64-bit words is what bounds ``t``: with 64-bit words
a change that only flips the sign bits of two doubles would be missed every
time. An all-zero page (or a hole) fingerprints as 0.

The key comes from a 32-byte seed through SHAKE-256, so both ends of a session
derive the same key from a secret they share (:func:`session_seed`) without it
ever crossing the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import numpy as np

__all__ = [
    "key_from_seed",
    "random_key",
    "session_seed",
    "fingerprint_rows",
    "fingerprint_extents",
    "split_ranges",
    "ROWS_PER_CALL",
]

# pages fingerprinted per numpy call: the uint64 temporary (8 KiB per 4 KiB page) stays in the cache
ROWS_PER_CALL = 256
_SEED_LABEL = b"mpmultifd page fingerprints v1\0"


def key_from_seed(seed: bytes, page_size: int) -> np.ndarray:
    """The odd 64-bit key vector (``page_size // 4`` words) that ``seed`` stands for."""
    words = page_size // 4
    raw = hashlib.shake_256(_SEED_LABEL + seed).digest(8 * words)
    key = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
    key |= np.uint64(1)
    key.setflags(write=False)
    return key


def random_key(page_size: int) -> np.ndarray:
    """A key nobody else knows (the scanning tracker's when no session shares one)."""
    return key_from_seed(os.urandom(32), page_size)


def session_seed(auth_key: bytes | None, session_id: bytes, attempt: int) -> bytes:
    """The seed both ends of a session derive for verification pass ``attempt``.

    With an auth key it is a secret of the two ends (an HMAC under the key), so
    a relay that sees every byte cannot predict the fingerprints; without one
    it is public, and verification then guards against bugs, not attackers.
    Each repair pass gets a fresh seed, so what one pass's VERIFY reveals about
    its key is no use against the next.
    """
    msg = b"verify\0" + session_id + attempt.to_bytes(4, "big")
    return hmac.new(auth_key or b"", msg, hashlib.sha256).digest()


def fingerprint_rows(
    rows: np.ndarray,
    key: np.ndarray,
    out: np.ndarray,
    *,
    chunk: int = ROWS_PER_CALL,
    nonzero: np.ndarray | None = None,
) -> None:
    """Fingerprint every row of the 2-D uint8 array ``rows`` (whole pages) into ``out`` (uint64).

    A zero page fingerprints as 0 without the multiplications: every page is
    probed at its first and last word (a page of data almost always shows it
    there), and only the pages that pass the probe are read in full to tell
    whether they are zero. A chunk of data pages costs the probe on top of
    the fingerprint; a chunk of zero pages costs one read instead of the
    fingerprint's widening and products (about a third of it). Chunks where
    fewer than a third of the pages pass the probe are fingerprinted whole.

    With ``nonzero`` (a bool array as long as ``rows``), it is filled with
    which pages hold a non-zero byte, exactly as :func:`mpmultifd.zeropage.nonzero_pages`
    would say, from the same pass while the chunk is in the cache: a caller
    that needs both reads a zero page once instead of twice. (A fingerprint of
    0 does not prove a page zero.)
    """
    n = rows.shape[0]
    if n == 0:
        return
    words = rows.view(np.uint32)
    wide = rows.view(np.uint64) if rows.shape[1] % 8 == 0 else None
    tmp = np.empty((min(chunk, n), words.shape[1]), dtype=np.uint64)
    part = None
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        m = e - s
        if wide is None:
            _products_summed(words[s:e], key, tmp[:m], out[s:e])
            if nonzero is not None:
                nonzero[s:e] = np.bitwise_or.reduce(words[s:e], axis=1) != 0
            continue
        w = wide[s:e]
        candidates = np.flatnonzero((w[:, 0] | w[:, -1]) == 0)
        if len(candidates) * _ZERO_CHECK_DIV < m:
            # mostly data: finding the few zero pages would cost more than fingerprinting them
            _products_summed(words[s:e], key, tmp[:m], out[s:e])
            if nonzero is not None:
                nz = nonzero[s:e]
                nz[:] = True
                if len(candidates):
                    nz[candidates] = np.bitwise_or.reduce(w[candidates], axis=1) != 0
            continue
        # as zeropage.nonzero_pages: an OR over the words, in place unless gathering the candidates is cheaper
        if 5 * len(candidates) >= 3 * m:
            nzc = np.bitwise_or.reduce(w, axis=1) != 0
        else:
            nzc = np.ones(m, dtype=bool)
            nzc[candidates] = np.bitwise_or.reduce(w[candidates], axis=1) != 0
        if nonzero is not None:
            nonzero[s:e] = nzc
        o = out[s:e]
        idx = np.flatnonzero(nzc)
        k = len(idx)
        if k == m:
            _products_summed(words[s:e], key, tmp[:m], o)
            continue
        o[:] = 0  # a zero page fingerprints as 0
        if k:
            if part is None:
                part = np.empty(min(chunk, n), dtype=np.uint64)
            _products_summed(words[s:e][idx], key, tmp[:k], part[:k])
            o[idx] = part[:k]


def _products_summed(words: np.ndarray, key: np.ndarray, tmp: np.ndarray, out: np.ndarray) -> None:
    """``out[r] = sum(key[i] * words[r, i]) mod 2**64`` for 32-bit ``words``, through the uint64 ``tmp``.

    One multiply that widens as it goes, then a row sum (both wrap mod 2**64 as
    intended): about 7% less CPU than widening first and then a matmul.
    """
    np.multiply(words, key, out=tmp)
    np.add.reduce(tmp, axis=1, out=out)


def fingerprint_extents(
    pages: np.ndarray, extents: list[tuple[int, int]] | np.ndarray, key: np.ndarray, out: np.ndarray
) -> int:
    """Fingerprint the page ranges ``[first, end)`` of the 2-D page array ``pages`` into ``out[first:end]``.

    Returns the number of pages read. Pages outside the ranges are not touched
    (neither read nor written in ``out``). Short ranges (a fragmented file's
    scattered pages) are gathered by index, so their number costs no Python
    loop per range.
    """
    ext = np.asarray(extents, dtype=np.int64).reshape(-1, 2)
    if len(ext) == 0:
        return 0
    lengths = ext[:, 1] - ext[:, 0]
    long_runs = lengths >= _LONG_RUN
    for first, end in ext[long_runs].tolist():
        fingerprint_rows(pages[first:end], key, out[first:end])
    short = ext[~long_runs]
    if len(short):
        n = lengths[~long_runs]
        # every page of the short ranges, in order, without a loop per range
        idx = np.repeat(short[:, 0] - np.concatenate(([0], np.cumsum(n)[:-1])), n) + np.arange(int(n.sum()))
        tmp = np.empty(min(ROWS_PER_CALL, len(idx)), dtype=np.uint64)
        for s in range(0, len(idx), ROWS_PER_CALL):
            sel = idx[s : s + ROWS_PER_CALL]
            t = tmp[: len(sel)]
            fingerprint_rows(pages[sel], key, t)
            out[sel] = t
    return int(lengths.sum())


# ranges at least this long are read in place; shorter ones are gathered by index
_LONG_RUN = 32

# a chunk is checked for zero pages only when at least 1/_ZERO_CHECK_DIV of its pages pass the probe
_ZERO_CHECK_DIV = 3


def split_ranges(ranges: list[tuple[int, int]], nparts: int) -> list[list[tuple[int, int]]]:
    """Cut page ranges ``[first, end)`` into at most ``nparts`` lists holding about as many pages each
    (how a scan of a region is shared between workers or threads)."""
    total = sum(e - f for f, e in ranges)
    if total == 0 or nparts <= 0:
        return []
    per = -(-total // nparts)
    parts: list[list[tuple[int, int]]] = [[]]
    room = per
    for f, e in ranges:
        while f < e:
            if room == 0:
                parts.append([])
                room = per
            take = min(e - f, room)
            parts[-1].append((f, f + take))
            f += take
            room -= take
    return parts
