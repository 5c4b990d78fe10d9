"""The base of every dirty tracker (:mod:`mpmultifd.tracking`, :mod:`mpmultifd.uffd`).

Its own module so that the kernel tracker can subclass it and
:mod:`mpmultifd.tracking` can import the kernel tracker, without a cycle.
"""

from __future__ import annotations

import abc
import time
from typing import ClassVar

import numpy as np

from .ram import GuestRAM

__all__ = ["DirtyTracker"]


class DirtyTracker(abc.ABC):
    """Reports the pages written since it last reported; one per region and Source.

    ``start()`` begins tracking: every write from then on is reported by a later
    ``collect``. ``collect(block)`` returns the pages of ``block`` (an index)
    written since the previous ``collect`` of that block, or since ``start()``.
    ``seconds`` is the time spent in ``start`` and ``collect`` so far.
    """

    name: ClassVar[str]

    def __init__(self, ram: GuestRAM) -> None:
        self.ram = ram
        self.seconds = 0.0
        self.started = False

    def start(self) -> None:
        t0 = time.perf_counter()
        self._start()
        self.started = True
        self.seconds += time.perf_counter() - t0

    def collect(self, block: int) -> np.ndarray:
        if not self.started:
            raise RuntimeError(f"{type(self).__name__}.collect() before start()")
        t0 = time.perf_counter()
        pages = self._collect(block)
        self.seconds += time.perf_counter() - t0
        return pages

    def collect_all(self) -> list[np.ndarray]:
        """``collect`` of every block, in block order."""
        return [self.collect(b.index) for b in self.ram.blocks]

    def close(self) -> None:
        """Stop tracking and release what the tracker holds; idempotent."""
        self.started = False

    @abc.abstractmethod
    def _start(self) -> None: ...

    @abc.abstractmethod
    def _collect(self, block: int) -> np.ndarray: ...
