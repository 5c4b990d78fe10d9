"""A lock-free single-producer single-consumer ring of page batches in shared memory.

One producer process (the coordinator) hands batches of page indices to one
consumer process (a channel worker). The ring lives in a ``/dev/shm`` segment;
two eventfds let an end that found the ring empty (consumer) or full
(producer) sleep instead of spinning.

Segment layout, in uint64 words (every control word on its own 64-byte line
so the two ends never write the same cache line)::

    word  0  head      producer only: number of slots ever published
    word  8  tail      consumer only: number of slots ever consumed
    word 16  c_wake    consumer's event index: "wake me when head reaches X" (0 = awake)
    word 24  p_wake    producer's event index: "wake me when tail reaches Y" (0 = awake)
    word 32  p_closed  producer said "no more"
    word 40  c_closed  consumer said "gone"
    word 48  config    magic, layout version, nslots, capacity, mode, slot stride (read-only)
    word 64  counters  32 words of consumer statistics
    word 96  slots     nslots x stride words, each [seq, kind, block, round, packet_num,
                       count, 0, 0] + capacity page words, padded to whole cache lines

Two notification modes, chosen at creation and stored in the header so both
ends agree:

``eventidx`` (x86 only)
    Plain loads and stores on the shared words, made safe by x86's total store
    order, plus the virtio-style event-index handshake: an end about to sleep
    publishes the index it waits for, issues a full fence, re-checks, and only
    then blocks; the other end writes the eventfd only when it reaches exactly
    that index. Idle ends cost no syscalls at all.

``credit`` (any CPU)
    Every publish writes 1 to the data eventfd and every consume writes 1 to
    the space eventfd (which starts at ``nslots``). The kernel's eventfd lock
    orders the slot contents with the counts, so no user-space barrier is
    needed. One syscall per batch per side.
"""

from __future__ import annotations

import os
import platform
import select
import threading
import time
import weakref
from multiprocessing import context, reduction
from typing import Any, NamedTuple

import numpy as np

from mpmultifd._shm import Segment, unique_name
from mpmultifd.errors import ConfigError, RingClosed, RingError, RingTimeout

__all__ = [
    "KIND_DATA",
    "KIND_SYNC",
    "KIND_EOS",
    "KIND_STOP",
    "KIND_SCAN",
    "KIND_ZERO",
    "MODES",
    "Batch",
    "Ring",
]

KIND_DATA = 0  # a batch of page indices to send
KIND_SYNC = 1  # end of a round: send a SYNC packet
KIND_EOS = 2  # end of stream: send the final SYNC+EOS packet and exit
KIND_STOP = 3  # stop now without sending anything (cancel)
KIND_SCAN = 4  # fingerprint page ranges (pairs first, end in the page words) into shared memory
KIND_ZERO = 5  # pages known to be zero (holes of the source's file): sent as zero pages without reading them
_LAST_KIND = KIND_ZERO

MODES = ("auto", "eventidx", "credit")

# header words
_HEAD = 0
_TAIL = 8
_C_WAKE = 16
_P_WAKE = 24
_P_CLOSED = 32
_C_CLOSED = 40
_CFG = 48  # magic, version, nslots, capacity, mode, stride
_COUNTERS = 64
_NCOUNTERS = 32
_SLOTS = 96

# slot words
_S_SEQ = 0
_S_KIND = 1
_S_BLOCK = 2
_S_ROUND = 3
_S_PACKET = 4
_S_COUNT = 5
_S_HDR = 8

_MAGIC = 0x474E495246444D4D  # "MMDFRING", little-endian
_VERSION = 1
_MODE_EVENTIDX = 1
_MODE_CREDIT = 2
_MODE_NAMES = {_MODE_EVENTIDX: "eventidx", _MODE_CREDIT: "credit"}

_MAX_NSLOTS = 1 << 16
_MAX_CAPACITY = 1 << 16
# Added to an eventfd in credit mode to say "the writer closed its end": it can
# never be reached by slot credits (at most nslots), and arrives after them.
_CLOSE_BIT = 1 << 32
# Blocking waits wake up this often even without a notification, so a lost
# wake-up (a bug) or a dead peer can never hang an end for ever.
_SAFETY_WAIT = 0.05
# After a safety timeout that finds work, how long to give an in-flight
# notification (peer preempted between publishing and notifying) before
# calling the wake-up lost.
_GRACE_WAIT = 0.25
_DEFAULT_SPIN = 100
_X86 = ("x86_64", "AMD64", "i686")
_U64 = np.dtype(np.uint64)

_LIVE_RINGS: "weakref.WeakSet[Ring]" = weakref.WeakSet()


def _reinit_after_fork() -> None:
    # A fence lock that another thread held at fork time stays held in the
    # child for ever; give every ring fresh ones.
    for ring in list(_LIVE_RINGS):
        ring._p_lock = threading.Lock()
        ring._c_lock = threading.Lock()


os.register_at_fork(after_in_child=_reinit_after_fork)


def _try_read(fd: int) -> int:
    """Drain an eventfd without blocking; 0 if it was empty."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _resolve_mode(mode: str) -> int:
    if mode not in MODES:
        raise ConfigError(f"ring mode must be one of {MODES}, got {mode!r}")
    x86 = platform.machine() in _X86
    if mode == "auto":
        return _MODE_EVENTIDX if x86 else _MODE_CREDIT
    if mode == "eventidx" and not x86:
        raise ConfigError(
            f"ring mode 'eventidx' relies on x86 store ordering; this machine is {platform.machine()!r}: use 'credit'"
        )
    return _MODE_EVENTIDX if mode == "eventidx" else _MODE_CREDIT


class Batch(NamedTuple):
    """One popped ring slot. ``pages`` is a private uint64 copy of ``count`` page indices."""

    kind: int
    block: int
    round: int
    packet_num: int
    pages: np.ndarray


_new_batch = tuple.__new__  # skips NamedTuple's Python-level __new__ on the hot path


class Ring:
    """A single-producer single-consumer ring of :class:`Batch` es in shared memory.

    Create it with :meth:`create` in one process and pass the object as a
    ``multiprocessing.Process`` argument (fork, spawn or forkserver) to the
    other. Exactly one process calls :meth:`push` / :meth:`try_push` /
    :meth:`close_producer`, exactly one calls :meth:`pop` /
    :meth:`close_consumer`; it may be the same process (e.g. two threads, or a
    test). :attr:`stats` are counted per process, by this object.

    Attributes:
        name: the shared-memory segment name.
        nslots: number of slots (a power of two).
        capacity: maximum pages per batch.
        mode: ``"eventidx"`` or ``"credit"``, as stored in the segment.
        spin: polls of the shared index before an end goes to sleep on its
            eventfd (per process; 0 = sleep at once).
    """

    name: str
    nslots: int
    capacity: int
    mode: str
    spin: int

    def __init__(self, seg: Segment, data_efd: int, space_efd: int, *, creator: bool) -> None:
        # use create(); this is also the rebuild path of a child process
        self._closed = True  # until fully built: __del__ must not close fds the caller still owns
        self._seg = seg
        self._creator_pid = os.getpid() if creator else -1
        self._data_efd = data_efd
        self._space_efd = space_efd
        mm = seg.buf
        self._raw = memoryview(mm)
        c = self._raw.cast("Q")
        self._ctl = c
        if c[_CFG] != _MAGIC or c[_CFG + 1] != _VERSION:
            c.release()
            self._raw.release()
            raise RingError(f"segment {seg.name!r} is not an mpmultifd ring (bad magic or layout version)")
        self.name = seg.name
        self.nslots = nslots = c[_CFG + 2]
        self.capacity = capacity = c[_CFG + 3]
        mode = c[_CFG + 4]
        stride = c[_CFG + 5]
        self.mode = _MODE_NAMES[mode]
        self._credit = mode == _MODE_CREDIT
        self._mask = nslots - 1
        self._stride = stride
        words = np.frombuffer(mm, dtype=np.uint64)
        self._counters: np.ndarray | None = words[_COUNTERS : _COUNTERS + _NCOUNTERS]
        slots = words[_SLOTS : _SLOTS + nslots * stride].reshape(nslots, stride)
        self._payload = slots[:, _S_HDR : _S_HDR + capacity]
        del words, slots
        self.spin = _DEFAULT_SPIN
        # separate fence locks per end, so a producer thread and a consumer
        # thread sharing this object never contend
        self._p_lock = threading.Lock()
        self._c_lock = threading.Lock()
        self._data_poll: select.poll | None = None
        self._space_poll: select.poll | None = None
        # credit mode: slots this end may still use before reading its eventfd
        self._p_credits = 0
        self._c_credits = 0
        self._p_peer_closed = False
        self._c_peer_closed = False
        self._consumer_sleeps = 0
        self._producer_sleeps = 0
        self._data_notes = 0
        self._space_notes = 0
        self._timeouts_with_work = 0
        self._closed = False
        _LIVE_RINGS.add(self)

    # ------------------------------------------------------------ creation

    @classmethod
    def create(cls, nslots: int = 64, capacity: int = 128, *, mode: str = "auto") -> "Ring":
        """Create a ring of ``nslots`` slots (a power of two, 2..65536) of up to ``capacity`` pages (1..65536).

        ``mode`` is ``"eventidx"`` (x86 only), ``"credit"``, or ``"auto"``
        (eventidx on x86, credit elsewhere). The calling process owns the
        segment and is the only one that may :meth:`unlink` it.
        """
        if isinstance(nslots, bool) or not isinstance(nslots, int) or not 2 <= nslots <= _MAX_NSLOTS or nslots & (nslots - 1):
            raise ConfigError(f"nslots must be a power of two in 2..{_MAX_NSLOTS}, got {nslots!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= _MAX_CAPACITY:
            raise ConfigError(f"capacity must be an integer in 1..{_MAX_CAPACITY}, got {capacity!r}")
        mode_id = _resolve_mode(mode)
        stride = -(-(_S_HDR + capacity) // 8) * 8  # whole cache lines per slot
        size = (_SLOTS + nslots * stride) * 8
        seg = Segment.create(unique_name("ring"), size)
        fds: list[int] = []
        try:
            flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
            fds.append(os.eventfd(0, flags))
            fds.append(os.eventfd(nslots if mode_id == _MODE_CREDIT else 0, flags))
            c = memoryview(seg.buf).cast("Q")
            c[_CFG + 1] = _VERSION
            c[_CFG + 2] = nslots
            c[_CFG + 3] = capacity
            c[_CFG + 4] = mode_id
            c[_CFG + 5] = stride
            c[_CFG] = _MAGIC
            c.release()
            return cls(seg, fds[0], fds[1], creator=True)
        except BaseException:
            for fd in fds:
                os.close(fd)
            seg.close()
            seg.unlink()
            raise

    def __reduce__(self) -> tuple[Any, ...]:
        # The eventfds can only travel with a process being started: DupFd then
        # hands them to spawn's pass_fds or to the forkserver. Anywhere else
        # DupFd would start a resource_sharer thread; refuse instead.
        if context.get_spawning_popen() is None:
            raise TypeError(
                "a Ring can only be pickled as an argument of a multiprocessing.Process being started; "
                "create the ring before the process and pass it in Process(args=...)"
            )
        if self._closed:
            raise RingError(f"ring {self.name!r} is closed")
        return (
            rebuild_ring,
            (self.name, reduction.DupFd(self._data_efd), reduction.DupFd(self._space_efd), self.spin),
        )

    # ------------------------------------------------------------ producer

    def _check_batch(self, kind: int, pages: Any) -> tuple[np.ndarray | None, int]:
        # the full argument checks, off the hot path
        if isinstance(kind, bool) or not isinstance(kind, (int, np.integer)) or not 0 <= kind <= _LAST_KIND:
            raise ConfigError(f"unknown batch kind {kind!r}")
        if pages is None:
            return None, 0
        if not isinstance(pages, np.ndarray):
            pages = np.asarray(pages)
        if pages.dtype is not _U64:
            k = pages.dtype.kind
            if k == "i":
                if pages.size and pages.min() < 0:
                    raise ConfigError("page indices must not be negative")
            elif k != "u":
                raise ConfigError(f"pages must be an integer array, got dtype {pages.dtype}")
        if pages.ndim != 1:
            raise ConfigError(f"pages must be one-dimensional, got shape {pages.shape}")
        n = len(pages)
        if n > self.capacity:
            raise ConfigError(f"batch of {n} pages exceeds the ring capacity of {self.capacity}")
        return pages, n

    def _publish(self, head: int, kind: int, block: int, round: int, packet_num: int, pages: np.ndarray | None, n: int) -> None:
        # write slot `head` and publish it (producer)
        c = self._ctl
        idx = head & self._mask
        base = _SLOTS + idx * self._stride
        try:
            c[base + _S_KIND] = kind
            c[base + _S_BLOCK] = block
            c[base + _S_ROUND] = round
            c[base + _S_PACKET] = packet_num
        except (ValueError, TypeError, OverflowError) as exc:
            raise ConfigError(f"batch fields must be integers in 0..2**64-1: {exc}") from None
        c[base + _S_COUNT] = n
        if n:
            self._payload[idx, :n] = pages
        seq = head + 1
        # x86 keeps stores in program order: the slot is complete before seq,
        # and seq before head
        c[base + _S_SEQ] = seq
        c[_HEAD] = seq
        if self._credit:
            self._p_credits -= 1  # only now: a rejected batch must not cost a slot
            os.eventfd_write(self._data_efd, 1)
            self._data_notes += 1
        else:
            # Full fence (StoreLoad), P3 of the handshake: either the
            # consumer's re-check sees the new head, or we see its c_wake.
            # Lock acquire+release is a locked instruction, a full barrier on
            # x86-64. Weakly ordered CPUs would need more (a real dmb/sync, and
            # ordering for the plain slot stores too), so they use credit mode.
            lk = self._p_lock
            lk.acquire()
            lk.release()
            if c[_C_WAKE] == seq:
                os.eventfd_write(self._data_efd, 1)
                self._data_notes += 1

    def push(
        self,
        kind: int,
        block: int,
        round: int,
        packet_num: int,
        pages: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> None:
        """Copy a batch into the next slot and publish it (producer).

        ``pages`` is any one-dimensional integer array of at most ``capacity``
        non-negative page indices (``None`` = no pages). If the ring is full,
        spin briefly, then sleep until the consumer frees a slot.
        ``timeout=None`` waits for ever; otherwise :class:`RingTimeout` after
        ``timeout`` seconds. :class:`RingClosed` if either end closed the ring.
        """
        # fast path for the common case; anything else goes through the full checks
        if (
            pages.__class__ is np.ndarray
            and pages.dtype is _U64
            and pages.ndim == 1
            and kind.__class__ is int
            and 0 <= kind <= _LAST_KIND
        ):
            n = len(pages)
            if n > self.capacity:
                raise ConfigError(f"batch of {n} pages exceeds the ring capacity of {self.capacity}")
        else:
            pages, n = self._check_batch(kind, pages)
        c = self._ctl
        if c[_C_CLOSED] or c[_P_CLOSED]:
            raise self._closed_error_producer()
        head = c[_HEAD]
        if self._credit:
            if not self._p_credits and not self._p_wait_credit(timeout):
                raise RingTimeout(f"ring {self.name!r} still full after {timeout} s")
        elif head - c[_TAIL] >= self.nslots and not self._p_wait_eventidx(head, timeout):
            raise RingTimeout(f"ring {self.name!r} still full after {timeout} s")
        self._publish(head, kind, block, round, packet_num, pages, n)

    def try_push(self, kind: int, block: int, round: int, packet_num: int, pages: np.ndarray | None = None) -> bool:
        """Publish a batch if a slot is free right now; ``False`` if the ring is full.

        After ``False``, :meth:`wait_space_fd` becomes readable once a slot
        has been freed.
        """
        pages, n = self._check_batch(kind, pages)
        c = self._ctl
        if c[_C_CLOSED] or c[_P_CLOSED]:
            raise self._closed_error_producer()
        head = c[_HEAD]
        if self._credit:
            if not self._p_credits and not self._p_take_credit():
                return False
        elif head - c[_TAIL] >= self.nslots:
            # arm p_wake so wait_space_fd() fires when the slot frees; the
            # re-check after the fence closes the race with the consumer
            c[_P_WAKE] = head - self.nslots + 1
            lk = self._p_lock
            lk.acquire()
            lk.release()
            if head - c[_TAIL] >= self.nslots:
                return False
            c[_P_WAKE] = 0
            _try_read(self._space_efd)
        self._publish(head, kind, block, round, packet_num, pages, n)
        return True

    def _closed_error_producer(self) -> RingClosed:
        if self._ctl[_C_CLOSED]:
            return RingClosed(f"ring {self.name!r}: the consumer closed it")
        return RingClosed(f"ring {self.name!r}: the producer already closed it")

    def _p_take_credit(self) -> bool:
        # credit mode: collect slots the consumer returned, without blocking
        k = _try_read(self._space_efd)
        if k >= _CLOSE_BIT:
            self._p_peer_closed = True
            k %= _CLOSE_BIT
        self._p_credits += k
        if self._p_peer_closed:
            raise RingClosed(f"ring {self.name!r}: the consumer closed it")
        return self._p_credits > 0

    def _p_wait_credit(self, timeout: float | None) -> bool:
        if self._p_take_credit():
            return True
        if timeout is not None and timeout <= 0:
            return False
        c = self._ctl
        head = c[_HEAD]
        nslots = self.nslots
        for _ in range(self.spin):
            # tail is only a hint here; the eventfd read is what orders memory
            if (head - c[_TAIL] < nslots or c[_C_CLOSED]) and self._p_take_credit():
                return True
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = self._space_poll or self._make_poll("_space_poll", self._space_efd)
        while True:
            wait = _SAFETY_WAIT
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return False
            self._producer_sleeps += 1
            poll.poll(wait * 1000.0)
            if self._p_take_credit():
                return True

    def _p_wait_eventidx(self, head: int, timeout: float | None) -> bool:
        c = self._ctl
        limit = head - self.nslots  # full while tail <= limit
        if timeout is not None and timeout <= 0:
            return c[_TAIL] > limit
        for _ in range(self.spin):
            if c[_TAIL] > limit:
                return True
            if c[_C_CLOSED]:
                raise self._closed_error_producer()
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = self._space_poll or self._make_poll("_space_poll", self._space_efd)
        lk = self._p_lock
        efd = self._space_efd
        want = limit + 1
        while True:
            # arm, fence, re-check: the order that makes a lost wake-up impossible
            c[_P_WAKE] = want
            lk.acquire()
            lk.release()
            if c[_TAIL] > limit:
                c[_P_WAKE] = 0
                return True
            if c[_C_CLOSED]:
                c[_P_WAKE] = 0
                raise self._closed_error_producer()
            wait = _SAFETY_WAIT
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    c[_P_WAKE] = 0
                    return False
            self._producer_sleeps += 1
            ready = poll.poll(wait * 1000.0)
            if not ready and c[_TAIL] > limit and not poll.poll(_GRACE_WAIT * 1000.0):
                self._timeouts_with_work += 1
            c[_P_WAKE] = 0
            _try_read(efd)
            if c[_TAIL] > limit:
                return True

    def close_producer(self) -> None:
        """Say "no more batches"; the consumer's :meth:`pop` raises :class:`RingClosed` once it has drained the ring."""
        c = self._ctl
        if c[_P_CLOSED]:
            return
        c[_P_CLOSED] = 1
        if self._credit:
            # after every data credit, so the consumer sees them all first
            os.eventfd_write(self._data_efd, _CLOSE_BIT)
        else:
            os.eventfd_write(self._data_efd, 1)

    # ------------------------------------------------------------ consumer

    def pop(self, timeout: float | None = None) -> Batch | None:
        """Take the next batch (consumer).

        If the ring is empty, spin briefly, then sleep until the producer
        publishes. Returns ``None`` after ``timeout`` seconds with nothing to
        read (``0`` = do not wait, ``None`` = wait for ever), so a caller can
        check on its producer. Raises :class:`RingClosed` once the producer
        closed the ring and every published batch was consumed.
        """
        c = self._ctl
        tail = c[_TAIL]
        if self._credit:
            if not self._c_credits and not self._c_wait_credit(tail, timeout):
                return None
            self._c_credits -= 1
        elif c[_HEAD] == tail and not self._c_wait_eventidx(tail, timeout):
            return None
        idx = tail & self._mask
        base = _SLOTS + idx * self._stride
        seq = c[base + _S_SEQ]
        if seq != tail + 1:
            raise RingError(f"ring {self.name!r}: slot {idx} holds publish #{seq}, expected #{tail + 1} (corrupted ring)")
        n = c[base + _S_COUNT]
        batch = _new_batch(
            Batch,
            (c[base + _S_KIND], c[base + _S_BLOCK], c[base + _S_ROUND], c[base + _S_PACKET], self._payload[idx, :n].copy()),
        )
        tail += 1
        c[_TAIL] = tail
        if self._credit:
            os.eventfd_write(self._space_efd, 1)
            self._space_notes += 1
        else:
            # full fence, mirror of push(): either the producer's re-check
            # sees the new tail, or we see its p_wake
            lk = self._c_lock
            lk.acquire()
            lk.release()
            if c[_P_WAKE] == tail:
                os.eventfd_write(self._space_efd, 1)
                self._space_notes += 1
        return batch

    def _c_take_credit(self) -> bool:
        k = _try_read(self._data_efd)
        if k >= _CLOSE_BIT:
            self._c_peer_closed = True
            k %= _CLOSE_BIT
        self._c_credits += k
        if self._c_credits:
            return True
        if self._c_peer_closed:
            raise RingClosed(f"ring {self.name!r}: the producer closed it and every batch was consumed")
        return False

    def _c_wait_credit(self, tail: int, timeout: float | None) -> bool:
        if self._c_take_credit():
            return True
        if timeout is not None and timeout <= 0:
            return False
        c = self._ctl
        for _ in range(self.spin):
            # head is only a hint here; the eventfd read is what orders memory
            if (c[_HEAD] != tail or c[_P_CLOSED]) and self._c_take_credit():
                return True
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = self._data_poll or self._make_poll("_data_poll", self._data_efd)
        while True:
            wait = _SAFETY_WAIT
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return False
            self._consumer_sleeps += 1
            poll.poll(wait * 1000.0)
            if self._c_take_credit():
                return True

    def _c_wait_eventidx(self, tail: int, timeout: float | None) -> bool:
        c = self._ctl
        if timeout is not None and timeout <= 0:
            # a non-blocking poll does not arm c_wake: that would only earn a
            # stale notification
            if c[_HEAD] != tail:
                return True
            if c[_P_CLOSED] and c[_HEAD] == tail:
                raise RingClosed(f"ring {self.name!r}: the producer closed it and every batch was consumed")
            return c[_HEAD] != tail
        for _ in range(self.spin):
            if c[_HEAD] != tail:
                return True
            if c[_P_CLOSED]:
                break
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = self._data_poll or self._make_poll("_data_poll", self._data_efd)
        lk = self._c_lock
        efd = self._data_efd
        want = tail + 1
        while True:
            # arm, full fence, re-check: the order that makes a lost wake-up impossible
            c[_C_WAKE] = want
            lk.acquire()
            lk.release()
            if c[_HEAD] != tail:
                c[_C_WAKE] = 0
                return True
            if c[_P_CLOSED]:
                c[_C_WAKE] = 0
                # head was stored before p_closed, and x86 keeps loads in order
                if c[_HEAD] != tail:
                    return True
                raise RingClosed(f"ring {self.name!r}: the producer closed it and every batch was consumed")
            wait = _SAFETY_WAIT
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    c[_C_WAKE] = 0
                    return False
            self._consumer_sleeps += 1
            ready = poll.poll(wait * 1000.0)
            # data but no notification: give a notification still in flight
            # (c_wake stays armed) a grace period before calling it lost
            if not ready and c[_HEAD] != tail and not poll.poll(_GRACE_WAIT * 1000.0):
                self._timeouts_with_work += 1
            c[_C_WAKE] = 0
            _try_read(efd)
            if c[_HEAD] != tail:
                return True

    def close_consumer(self) -> None:
        """Say "consumer gone": a sleeping or later :meth:`push` raises :class:`RingClosed`."""
        c = self._ctl
        if c[_C_CLOSED]:
            return
        c[_C_CLOSED] = 1
        if self._credit:
            os.eventfd_write(self._space_efd, _CLOSE_BIT)
        else:
            os.eventfd_write(self._space_efd, 1)

    # ------------------------------------------------------------ common

    def _make_poll(self, attr: str, fd: int) -> select.poll:
        # poll, not select: eventfd numbers may exceed FD_SETSIZE in a busy process
        p = select.poll()
        p.register(fd, select.POLLIN)
        setattr(self, attr, p)
        return p

    def __len__(self) -> int:
        """Batches published but not yet consumed."""
        c = self._ctl
        tail = c[_TAIL]
        return c[_HEAD] - tail

    def free_slots(self) -> int:
        """Slots the producer could fill right now."""
        return self.nslots - len(self)

    def wait_space_fd(self) -> int:
        """An fd that becomes readable when a slot frees up after :meth:`try_push` returned ``False``."""
        return self._space_efd

    @property
    def counters(self) -> np.ndarray:
        """32 uint64 words in the segment for the consumer's own statistics (bytes sent, packets, ...).

        Any process may read them; only the consumer writes them. ValueError
        once this object is closed.
        """
        c = self._counters
        if c is None:
            raise ValueError(f"ring {self.name!r} is closed")
        return c

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` released this object's mapping."""
        return self._closed

    @property
    def producer_closed(self) -> bool:
        """Whether the producer called :meth:`close_producer`."""
        return bool(self._ctl[_P_CLOSED])

    @property
    def consumer_closed(self) -> bool:
        """Whether the consumer called :meth:`close_consumer`."""
        return bool(self._ctl[_C_CLOSED])

    @property
    def stats(self) -> dict[str, int]:
        """Wake-up statistics of this object (this process's end).

        ``consumer_sleeps`` / ``producer_sleeps``: blocking waits on an
        eventfd; ``notifications``: eventfd writes that woke the other end
        (``data_notifications`` + ``space_notifications``, close signals not
        counted); ``timeouts_with_work``: safety timeouts that found the ring
        ready with no notification, i.e. lost wake-ups; it must stay 0.
        """
        return {
            "consumer_sleeps": self._consumer_sleeps,
            "producer_sleeps": self._producer_sleeps,
            "notifications": self._data_notes + self._space_notes,
            "data_notifications": self._data_notes,
            "space_notifications": self._space_notes,
            "timeouts_with_work": self._timeouts_with_work,
        }

    def close(self) -> None:
        """Release this process's mapping and eventfd copies; idempotent.

        Does not tell the other end anything: use :meth:`close_producer` or
        :meth:`close_consumer` for that.
        """
        if self._closed:
            return
        self._closed = True
        _LIVE_RINGS.discard(self)
        # drop every view first so the mmap can really be unmapped; later use
        # of the released memoryview raises ValueError instead of crashing
        self._payload = None  # type: ignore[assignment]
        self._counters = None
        self._ctl.release()
        self._raw.release()
        self._seg.close()
        self._data_poll = self._space_poll = None
        for fd in (self._data_efd, self._space_efd):
            try:
                os.close(fd)
            except OSError:
                pass

    def unlink(self) -> None:
        """Remove the segment's name (creator process only, else :class:`PermissionError`)."""
        if self._creator_pid != os.getpid():
            raise PermissionError(f"ring {self.name!r}: only the process that created it may unlink it")
        self._seg.unlink()

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._creator_pid == os.getpid():
            self._seg.unlink()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        if self._closed:
            return f"<Ring {self.name!r} closed>"
        return f"<Ring {self.name!r} mode={self.mode} nslots={self.nslots} capacity={self.capacity} len={len(self)}>"


def rebuild_ring(name: str, data_fd: Any, space_fd: Any, spin: int) -> Ring:
    """Unpickle a :class:`Ring` in a child process: attach by name, adopt the passed eventfds."""
    data_efd = data_fd.detach()
    space_efd = space_fd.detach()
    try:
        seg = Segment.attach(name)
    except BaseException:
        os.close(data_efd)
        os.close(space_efd)
        raise
    try:
        ring = Ring(seg, data_efd, space_efd, creator=False)
    except BaseException:
        seg.close()
        os.close(data_efd)
        os.close(space_efd)
        raise
    ring.spin = spin
    return ring
