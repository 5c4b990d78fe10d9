"""Per-page 64-bit fingerprints, computed with numpy in one pass.

A page's fingerprint is ``sum(word[i] * K[i]) mod 2**64`` over its 64-bit
words, with a fixed vector ``K`` of random odd constants. A change of a single
word ``w -> w'`` changes the sum by ``(w' - w) * K[i]``, which is never 0 mod
2**64 because ``K[i]`` is odd: single-word changes are always caught. For
changes spread over several words, the fingerprint collides only if the
weighted sum of the differences vanishes mod 2**64; for a fixed change and
random ``K`` that happens with probability at most ``2**-(64 - t)``, where
``2**t`` is the largest power of two dividing every difference (t = 0 for
almost all changes). It is not a cryptographic hash: it guards against bugs
and lost writes, not against an adversary who knows ``K``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fingerprint_pages", "fingerprint_some", "fingerprint_key"]

_KEYS: dict[int, np.ndarray] = {}


def fingerprint_key(page_size: int) -> np.ndarray:
    """The weight vector for pages of ``page_size`` bytes (the same on every host)."""
    key = _KEYS.get(page_size)
    if key is None:
        rng = np.random.Generator(np.random.PCG64(0x6D706D756C746966))
        key = rng.integers(0, 2**64, size=page_size // 8, dtype=np.uint64, endpoint=False) | np.uint64(1)
        key.setflags(write=False)
        _KEYS[page_size] = key
    return key


def fingerprint_pages(pages: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
    """Fingerprints of a 2-D ``(npages, page_size)`` uint8 array, as uint64.

    Works in chunks so that no temporary grows with the region.
    """
    if pages.ndim != 2 or pages.shape[1] % 8:
        raise ValueError("pages must be a 2-D array whose rows are a multiple of 8 bytes")
    n, page_size = pages.shape
    key = fingerprint_key(page_size)
    words = pages.view(np.uint64)
    out = np.empty(n, dtype=np.uint64)
    for start in range(0, n, chunk):
        np.matmul(words[start : start + chunk], key, out=out[start : start + chunk])
    return out


def fingerprint_some(pages: np.ndarray, which: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
    """Fingerprints of all rows of ``pages``, reading only the rows in ``which``.

    Rows not in ``which`` must be known to be zero (their fingerprint is 0).
    Used on a destination whose unwritten pages are file holes: reading a hole
    of shared memory would allocate it.
    """
    out = np.zeros(pages.shape[0], dtype=np.uint64)
    if len(which) * 2 > pages.shape[0]:
        return fingerprint_pages(pages, chunk=chunk)
    key = fingerprint_key(pages.shape[1])
    for start in range(0, len(which), chunk):
        sel = which[start : start + chunk]
        out[sel] = pages[sel].view(np.uint64) @ key
    return out
