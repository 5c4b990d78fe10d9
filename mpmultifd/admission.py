"""Bookkeeping of a destination's admission: handshakes in progress, their deadline, and a quiet log.

A destination runs each connection's handshake (greeting, hello, proof of the
key) in a short thread of its own. :class:`PendingHandshakes` bounds them:

- a **deadline for the whole handshake**, not for each ``recv``: a peer that
  trickles its hello a byte at a time is cut off when the deadline passes
  (:meth:`PendingHandshakes.expire`, called from the accept loop);
- a **limit per peer address and in total**: when either is reached, the
  oldest handshake still in progress (of that peer, else of anyone) is cut off
  to make room, instead of refusing the newcomer. Idle or trickling
  connections therefore cannot lock out a real source, whose handshake takes
  milliseconds; a source that is cut off anyway retries within its timeout.

Cutting off is ``shutdown(SHUT_RDWR)`` of the socket at the operating-system
level, under the same lock the handshake thread takes to leave the table, so a
socket is never shut down after its thread closed it; the thread then sees
end of file and drops the connection.

:class:`DropLog` turns a burst of dropped connections into one log line: the
first drop is logged at once, the rest are counted and summed up at most once
per interval.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from typing import Any

__all__ = ["PendingHandshakes", "DropLog", "peer_key"]


def peer_key(peer: Any) -> str:
    """The address a limit per peer counts by: the host of a TCP peer; every Unix socket peer is one."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "local"


def _cut(sock: socket.socket) -> None:
    try:
        # the plain socket's shutdown, also for a TLS socket mid-handshake (SSLSocket.shutdown
        # would drop its TLS object under the thread that is using it)
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


class PendingHandshakes:
    """Handshakes in progress, each with an absolute deadline; bounded per peer and in total."""

    def __init__(self, *, total: int, per_peer: int, timeout: float) -> None:
        self.total = total
        self.per_peer = per_peer
        self.timeout = timeout
        self._lock = threading.Lock()
        self._next = 0
        # token -> [socket, peer key, deadline, why it was cut (None while running)]
        self._table: dict[int, list[Any]] = {}
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        """Handshakes still running (one cut off but not yet left does not count)."""
        with self._lock:
            return sum(1 for e in self._table.values() if e[3] is None)

    def add(self, sock: socket.socket, peer: Any) -> tuple[int, float]:
        """Register a new handshake; cuts off the oldest to stay within the limits. Returns (token, deadline)."""
        key = peer_key(peer)
        deadline = time.monotonic() + self.timeout
        with self._lock:
            same = [t for t, e in self._table.items() if e[1] == key and e[3] is None]
            if len(same) >= self.per_peer:
                self._cut_locked(same[0], "evicted: too many handshakes from its address")
            else:
                running = [t for t, e in self._table.items() if e[3] is None]
                if len(running) >= self.total:
                    self._cut_locked(running[0], "evicted: too many handshakes in progress")
            token = self._next
            self._next += 1
            self._table[token] = [sock, key, deadline, None]
        return token, deadline

    def replace(self, token: int, sock: socket.socket) -> None:
        """The handshake now runs on ``sock`` (a TLS socket wrapping the accepted one)."""
        with self._lock:
            entry = self._table.get(token)
            if entry is not None:
                entry[0] = sock
                if entry[3] is not None:
                    _cut(sock)

    def leave(self, token: int) -> str | None:
        """The handshake ended (its thread closes or keeps the socket next); returns why it was cut, if it was."""
        with self._lock:
            entry = self._table.pop(token, None)
        return None if entry is None else entry[3]

    def expire(self, now: float | None = None) -> int:
        """Cut off every handshake past its deadline; returns how many."""
        now = time.monotonic() if now is None else now
        n = 0
        with self._lock:
            for token, entry in self._table.items():
                if entry[3] is None and now >= entry[2]:
                    self._cut_locked(token, f"its handshake did not finish within {self.timeout:g} s")
                    n += 1
        return n

    def cut_all(self, why: str) -> None:
        with self._lock:
            for token, entry in self._table.items():
                if entry[3] is None:
                    self._cut_locked(token, why)

    def _cut_locked(self, token: int, why: str) -> None:
        entry = self._table[token]
        entry[3] = why
        if why.startswith("evicted"):
            self.evicted += 1
        else:
            self.expired += 1
        _cut(entry[0])


class DropLog:
    """One warning per burst of dropped connections: the first at once, then a summary per ``interval``."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0, text_limit: int = 300) -> None:
        self.log = logger
        self.interval = interval
        self.text_limit = text_limit
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._last: str | None = None
        self._emitted_at = float("-inf")

    def drop(self, kind: str, peer: Any, detail: str) -> None:
        """Record a dropped connection: ``kind`` groups the summary, ``detail`` says why for this one."""
        where = "" if peer is None else f" from {peer_key(peer)}"
        text = f"dropping {kind} connection{where}: {detail}"
        if len(text) > self.text_limit:
            text = text[: self.text_limit] + "..."
        with self._lock:
            now = time.monotonic()
            if now - self._emitted_at >= self.interval and not self._counts:
                self._emitted_at = now
                self.log.warning("%s", text)
                return
            self._counts[kind] += 1
            self._last = text
        self.flush()

    def flush(self, *, force: bool = False) -> None:
        """Log the summary of the drops counted since the last line, if the interval passed (or ``force``)."""
        with self._lock:
            now = time.monotonic()
            if not self._counts or (not force and now - self._emitted_at < self.interval):
                return
            total = sum(self._counts.values())
            kinds = ", ".join(f"{n} {k}" for k, n in self._counts.most_common())
            last = self._last
            self._counts.clear()
            self._emitted_at = now
        self.log.warning("dropped %d more connections (%s); the last: %s", total, kinds, last)
