"""Kernel dirty tracking: userfaultfd asynchronous write-protection plus ``PAGEMAP_SCAN``.

:class:`KernelTracker` (``dirty_tracker="kernel"``) lets the kernel record which
pages were written, with no cooperation from the writers and no read of the
region per round:

- ``UFFDIO_API`` with ``UFFD_FEATURE_WP_ASYNC`` (plus ``WP_UNPOPULATED`` and
  ``WP_HUGETLBFS_SHMEM``, because the region is shmem from ``/dev/shm``): a write
  to a write-protected page is resolved by the kernel itself, which only clears
  the page's protection bit. Nothing waits on the userfaultfd, no message is
  queued, the writer pays one minor fault per page per round;
- ``UFFDIO_REGISTER`` (mode WP) and ``UFFDIO_WRITEPROTECT`` over each block's
  mapping when tracking starts, so every page begins protected;
- ``ioctl(PAGEMAP_SCAN)`` on ``/proc/self/pagemap`` (Linux 6.7+) with
  ``PM_SCAN_WP_MATCHING``: returns the ranges whose protection was cleared
  (``PAGE_IS_WRITTEN``) and protects them again under the page-table lock, with
  the TLB flushed before the ioctl returns. A write racing with a collect
  either lands before that flush (and is read by whoever reads the page after
  ``collect`` returns) or faults on the fresh protection and is reported by the
  next collect: never lost.

Limitations
-----------
userfaultfd belongs to one address space. The kernel records writes made
through *this process's* mappings of the blocks (any thread, and kernel copies
into them such as ``read(2)`` or ``recv`` into a view), and nothing else:

- writes by other processes that map the same ``/dev/shm`` file (a forked or
  spawned child, a QEMU guest) are not seen. Use this tracker only when every
  writer is a thread of the process that runs the Source; use ``"scan"``
  otherwise;
- writes to the file itself (``write(2)``, ``pwrite``, ``fallocate`` hole
  punching, truncation) bypass the page tables and are not seen;
- a second mapping of the same file in this process (another
  ``GuestRAM.attach``) is not registered, so writes through it are not seen;
- one userfaultfd owns a mapping at a time: a second KernelTracker on the same
  region in the same process is refused until the first is closed.

Granularity is the OS page (4 KiB on x86-64): a block page larger than that is
dirty when any of its OS pages was written; block pages smaller than an OS page
are reported together with every block page sharing the written OS page. Where
the kernel maps a huge page (hugetlbfs, shmem THP) it may report the whole huge
page. All of these only ever add pages, never drop one.

The structure layouts and constants below are those of the kernel UAPI headers
``include/uapi/linux/userfaultfd.h`` and ``include/uapi/linux/fs.h``; the
syscall and ioctls are reached through ctypes (libc ``syscall`` and ``ioctl``),
which releases the GIL, so writer threads run while a collect walks the pages.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys
import threading

import numpy as np

from .errors import TrackingUnavailable
from .ram import GuestRAM
from .tracker_base import DirtyTracker

__all__ = ["KernelTracker", "kernel_tracking_available"]

# userfaultfd(2) per architecture (arch/x86/entry/syscalls/syscall_64.tbl); other
# architectures are refused rather than guessed
_SYS_USERFAULTFD = {"x86_64": 323}

# ioctl request encoding of asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64)]


class _PmScanArg(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


# struct page_region {__u64 start, end, categories}: read as rows of a (n, 3) uint64 array
_PAGE_REGION_WORDS = 3

# include/uapi/linux/userfaultfd.h
_UFFD_API = 0xAA
_UFFDIO = 0xAA
_UFFDIO_REGISTER_NR = 0x00
_UFFDIO_UNREGISTER_NR = 0x01
_UFFDIO_WRITEPROTECT_NR = 0x06
_UFFDIO_API_NR = 0x3F
UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, _UFFDIO, _UFFDIO_API_NR, ctypes.sizeof(_UffdioApi))  # 0xC018AA3F
UFFDIO_REGISTER = _ioc(
    _IOC_READ | _IOC_WRITE, _UFFDIO, _UFFDIO_REGISTER_NR, ctypes.sizeof(_UffdioRegister)
)  # 0xC020AA00
UFFDIO_UNREGISTER = _ioc(_IOC_READ, _UFFDIO, _UFFDIO_UNREGISTER_NR, ctypes.sizeof(_UffdioRange))  # 0x8010AA01
UFFDIO_WRITEPROTECT = _ioc(
    _IOC_READ | _IOC_WRITE, _UFFDIO, _UFFDIO_WRITEPROTECT_NR, ctypes.sizeof(_UffdioWriteprotect)
)  # 0xC018AA06
# /dev/userfaultfd (Linux 6.1+): USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00)
_DEV_USERFAULTFD = "/dev/userfaultfd"
USERFAULTFD_IOC_NEW = _ioc(0, 0xAA, 0x00, 0)

UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0

_FEATURES = {
    "UFFD_FEATURE_WP_ASYNC": UFFD_FEATURE_WP_ASYNC,
    "UFFD_FEATURE_WP_UNPOPULATED": UFFD_FEATURE_WP_UNPOPULATED,
    "UFFD_FEATURE_WP_HUGETLBFS_SHMEM": UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
}
_WANTED_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM

# include/uapi/linux/fs.h
PAGEMAP_SCAN = _ioc(_IOC_READ | _IOC_WRITE, ord("f"), 16, ctypes.sizeof(_PmScanArg))  # 0xC0606610
PAGE_IS_WRITTEN = 1 << 1
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

# page_region entries per PAGEMAP_SCAN call. The kernel stages output in a
# bounce buffer of 512 entries and, when it refills that buffer more than once
# in one call, can leave walk_end at an earlier stop; with at most 512 entries
# one call is one pass and walk_end is exact.
_VEC_LEN = 512

_OS_PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


def _errno_text(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def _kernel() -> str:
    return f"Linux {platform.release()}"


def _ioctl_or_errno(fd: int, request: int, arg: ctypes.Structure) -> int:
    """``ioctl(fd, request, &arg)``: its result, or ``-errno``; retried on EINTR."""
    while True:
        ret = _ioctl(fd, request, ctypes.byref(arg))
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return -err


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _ranges_to_pages(starts: np.ndarray, ends: np.ndarray, page_size: int, npages: int) -> np.ndarray:
    """The block pages (ascending, unique int64) that byte ranges ``[starts[i], ends[i])`` touch.

    Offsets are relative to the block. Ranges may overlap and come in any
    order; a page is touched when any byte of it is. Pages at or past
    ``npages`` (the OS-page tail of a block whose size is not a multiple of
    the OS page) are dropped. Vectorized: cost grows with the number of
    ranges plus the number of pages returned, not with the block size.
    """
    s = np.asarray(starts, dtype=np.int64)
    e = np.asarray(ends, dtype=np.int64)
    if s.size == 0:
        return np.empty(0, dtype=np.int64)
    if s.size > 1 and bool(np.any(s[1:] < s[:-1])):
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
    first = s // page_size
    last = np.minimum(-(-e // page_size), npages)  # exclusive, rounded up
    # Sorted by first, everything an earlier range emitted lies below the
    # running maximum of its ends, and every page in [first[i], that maximum)
    # was emitted already: start each range past it, so no page repeats.
    covered = np.maximum.accumulate(last)
    first[1:] = np.maximum(first[1:], covered[:-1])
    lengths = np.maximum(last - first, 0)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    # expand [first, first + length) ranges: position k of range i maps to first[i] + (k - offset[i])
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(first - offsets, lengths)


def _check_platform() -> int:
    """The userfaultfd syscall number here, or TrackingUnavailable."""
    if not sys.platform.startswith("linux"):
        raise TrackingUnavailable(f"needs Linux (userfaultfd and PAGEMAP_SCAN), this is {sys.platform}")
    machine = platform.machine()
    nr = _SYS_USERFAULTFD.get(machine)
    if nr is None:
        raise TrackingUnavailable(
            f"no userfaultfd syscall number known for {machine!r} (supported: {', '.join(_SYS_USERFAULTFD)})"
        )
    return nr


def _new_userfaultfd(nr: int) -> int:
    """A fresh userfaultfd (close-on-exec, non-blocking), or TrackingUnavailable naming the errno."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY
    fd = int(_syscall(ctypes.c_long(nr), ctypes.c_long(flags)))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    # Container runtimes often block the syscall with seccomp; /dev/userfaultfd
    # (Linux 6.1+) is governed by file permissions instead.
    try:
        dev = os.open(_DEV_USERFAULTFD, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        dev_text = f"{_DEV_USERFAULTFD}: {exc.strerror}"
    else:
        try:
            fd = _ioctl(dev, USERFAULTFD_IOC_NEW, flags)
            if fd >= 0:
                return fd
            dev_text = f"{_DEV_USERFAULTFD} USERFAULTFD_IOC_NEW: {_errno_text(ctypes.get_errno())}"
        finally:
            os.close(dev)
    if err == errno.ENOSYS:
        why = "the kernel is built without CONFIG_USERFAULTFD"
    elif err == errno.EPERM:
        # with UFFD_USER_MODE_ONLY the kernel skips its sysctl/capability check
        why = (
            "denied by a seccomp filter or LSM (Docker's default profile allows userfaultfd only with "
            "CAP_SYS_PTRACE); vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE refuses only "
            "userfaultfds that handle kernel faults, which this one does not ask for"
        )
    elif err == errno.EINVAL:
        why = f"{_kernel()} predates UFFD_USER_MODE_ONLY (Linux 5.11); kernel tracking needs Linux 6.7+"
    else:
        why = "unexpected error"
    raise TrackingUnavailable(f"userfaultfd(2) failed with {_errno_text(err)}: {why}; {dev_text}")


def _available_features(nr: int) -> int:
    """Every userfaultfd feature the kernel offers (UFFDIO_API with none requested, on a throwaway fd)."""
    fd = _new_userfaultfd(nr)
    try:
        api = _UffdioApi(api=_UFFD_API, features=0, ioctls=0)
        if _ioctl_or_errno(fd, UFFDIO_API, api) < 0:
            return 0
        return int(api.features)
    finally:
        os.close(fd)


class _Session:
    """One userfaultfd in WP_ASYNC mode plus this process's pagemap: register, protect, scan.

    Acts on the address space of the process that opened it. A forked child
    inherits the descriptors, but the userfaultfd still names the parent's
    address space, so in a child :meth:`close` only closes them.
    """

    def __init__(self) -> None:
        nr = _check_platform()
        self.pid = os.getpid()
        self.uffd = _new_userfaultfd(nr)
        self.pagemap = -1
        self.spans: list[tuple[int, int]] = []
        try:
            api = _UffdioApi(api=_UFFD_API, features=_WANTED_FEATURES, ioctls=0)
            ret = _ioctl_or_errno(self.uffd, UFFDIO_API, api)
            if ret < 0 or int(api.features) & _WANTED_FEATURES != _WANTED_FEATURES:
                have = _available_features(nr) if ret < 0 else int(api.features)
                missing = [name for name, bit in _FEATURES.items() if not have & bit]
                detail = f" ({_errno_text(-ret)})" if ret < 0 else ""
                raise TrackingUnavailable(
                    f"UFFDIO_API refused{detail}: {_kernel()} lacks {', '.join(missing) or 'the requested features'} "
                    f"(asynchronous write-protection needs Linux 6.7+ with uffd-wp PTE markers)"
                )
            try:
                self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise TrackingUnavailable(
                    f"cannot open /proc/self/pagemap: {exc.strerror} (kernel without CONFIG_PROC_PAGE_MONITOR?)"
                ) from exc
            # an empty range walks nothing: 0 where PAGEMAP_SCAN exists, ENOTTY before Linux 6.7
            arg = _PmScanArg(size=ctypes.sizeof(_PmScanArg))
            ret = _ioctl_or_errno(self.pagemap, PAGEMAP_SCAN, arg)
            if ret < 0:
                hint = " (needs Linux 6.7+)" if -ret in (errno.ENOTTY, errno.EINVAL) else ""
                raise TrackingUnavailable(
                    f"the PAGEMAP_SCAN ioctl on /proc/self/pagemap failed with {_errno_text(-ret)}: "
                    f"{_kernel()} does not support it{hint}"
                )
            self.vec = np.zeros((_VEC_LEN, _PAGE_REGION_WORDS), dtype=np.uint64)
            self.arg = _PmScanArg(
                size=ctypes.sizeof(_PmScanArg),
                flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                vec=self.vec.ctypes.data,
                category_mask=PAGE_IS_WRITTEN,
                return_mask=PAGE_IS_WRITTEN,
            )
        except BaseException:
            self.close()
            raise

    def register(self, addr: int, length: int, what: str) -> None:
        """Register ``[addr, addr + length)`` for asynchronous write-protection (protects nothing yet)."""
        reg = _UffdioRegister(range=_UffdioRange(addr, length), mode=UFFDIO_REGISTER_MODE_WP, ioctls=0)
        ret = _ioctl_or_errno(self.uffd, UFFDIO_REGISTER, reg)
        if ret < 0:
            err = -ret
            if err == errno.EBUSY:
                why = "another userfaultfd already owns this mapping (a second KernelTracker on it in this process?)"
            elif err == errno.EPERM:
                why = "the mapping is not writable (no VM_MAYWRITE)"
            elif err == errno.EINVAL:
                why = "the mapping cannot be write-protected by userfaultfd (unaligned, or a kind the kernel refuses)"
            else:
                why = "unexpected error"
            raise TrackingUnavailable(f"UFFDIO_REGISTER of {what} failed with {_errno_text(err)}: {why}")
        self.spans.append((addr, length))
        if not int(reg.ioctls) & (1 << _UFFDIO_WRITEPROTECT_NR):
            raise TrackingUnavailable(f"UFFDIO_REGISTER of {what}: the kernel offers no UFFDIO_WRITEPROTECT for it")

    def protect(self, addr: int, length: int, what: str) -> None:
        """Write-protect the whole range: every later write through this process's mapping is recorded."""
        wp = _UffdioWriteprotect(range=_UffdioRange(addr, length), mode=UFFDIO_WRITEPROTECT_MODE_WP)
        while True:
            ret = _ioctl_or_errno(self.uffd, UFFDIO_WRITEPROTECT, wp)
            if ret != -errno.EAGAIN:  # EAGAIN: the address space is changing (fork, remap); retry
                break
        if ret < 0:
            raise TrackingUnavailable(f"UFFDIO_WRITEPROTECT of {what} failed with {_errno_text(-ret)}")

    def take_written(self, addr: int, length: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Byte ranges of ``[addr, addr + length)`` written since last protected, protected again.

        Returns ``(starts, ends)`` as int64 offsets from ``addr``. One
        PAGEMAP_SCAN per ``_VEC_LEN`` ranges, each resuming at ``walk_end``.
        """
        arg, vec = self.arg, self.vec
        start, end = addr, addr + length
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        while start < end:
            arg.start, arg.end, arg.walk_end, arg.vec_len = start, end, 0, _VEC_LEN
            n = _ioctl_or_errno(self.pagemap, PAGEMAP_SCAN, arg)
            if n < 0:
                if -n == errno.EPERM:
                    raise TrackingUnavailable(
                        f"PAGEMAP_SCAN of {what}: part of the range is not registered for asynchronous "
                        f"write-protection any more (unmapped or remapped?)"
                    )
                raise TrackingUnavailable(f"PAGEMAP_SCAN of {what} failed with {_errno_text(-n)}")
            if n:
                starts.append(vec[:n, 0].astype(np.int64) - addr)
                ends.append(vec[:n, 1].astype(np.int64) - addr)
            walk_end = int(arg.walk_end)
            if walk_end <= start and not n:
                # only a huge page the walk cannot protect in part stops without output
                raise TrackingUnavailable(f"PAGEMAP_SCAN of {what} made no progress at {walk_end:#x}")
            start = walk_end
        if not starts:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty
        return np.concatenate(starts), np.concatenate(ends)

    def close(self) -> None:
        """Unregister (in the opening process only) and close both descriptors; idempotent."""
        uffd, self.uffd = self.uffd, -1
        pagemap, self.pagemap = self.pagemap, -1
        spans, self.spans = self.spans, []
        if uffd >= 0:
            if os.getpid() == self.pid:
                # Closing the last reference would unregister too, but a forked
                # child may hold a copy of the descriptor for its whole life.
                for addr, length in spans:
                    # fails harmlessly if the mapping is gone already
                    _ioctl_or_errno(uffd, UFFDIO_UNREGISTER, _UffdioRange(addr, length))
            os.close(uffd)
        if pagemap >= 0:
            os.close(pagemap)


_PROBE: tuple[bool, str] | None = None
_PROBE_LOCK = threading.Lock()


def _probe() -> tuple[bool, str]:
    npages = 4
    mm = mmap.mmap(-1, npages * _OS_PAGE, flags=mmap.MAP_SHARED)  # anonymous shared: shmem, like /dev/shm
    try:
        view = np.frombuffer(mm, dtype=np.uint8)
        try:
            session = _Session()
            try:
                addr, length, what = view.ctypes.data, view.size, "a probe shmem mapping"
                session.register(addr, length, what)
                session.protect(addr, length, what)
                view[1 * _OS_PAGE] = 1  # first byte of page 1
                view[4 * _OS_PAGE - 1] = 1  # last byte of page 3
                first = _ranges_to_pages(*session.take_written(addr, length, what), _OS_PAGE, npages).tolist()
                second = _ranges_to_pages(*session.take_written(addr, length, what), _OS_PAGE, npages).tolist()
            finally:
                session.close()
        finally:
            del view  # the mapping cannot close while a view exports it
    finally:
        mm.close()
    if first != [1, 3] or second:
        return False, (
            f"{_kernel()} mis-reports written pages on shmem: wrote pages [1, 3], "
            f"PAGEMAP_SCAN reported {first}, then {second} (expected [])"
        )
    return True, f"userfaultfd WP_ASYNC and PAGEMAP_SCAN work on shmem ({_kernel()}, {platform.machine()})"


def kernel_tracking_available() -> tuple[bool, str]:
    """Whether :class:`KernelTracker` works here, and why (or why not).

    Probes once per process, then answers from a cache: on a private 4-page
    shmem mapping, a write to the first byte of page 1 and the last byte of
    page 3 must be reported as exactly those pages, then nothing more.
    """
    global _PROBE
    with _PROBE_LOCK:
        if _PROBE is None:
            try:
                _PROBE = _probe()
            except TrackingUnavailable as exc:
                _PROBE = (False, str(exc))
            except OSError as exc:  # e.g. no room for the probe mapping
                _PROBE = (False, f"probe failed: {exc}")
        return _PROBE


class KernelTracker(DirtyTracker):
    """The kernel records writes (userfaultfd WP_ASYNC); ``collect`` takes them with PAGEMAP_SCAN.

    Costs per round one page-table walk of the block and one minor fault per
    page written for the first time since the previous collect; at start, page
    tables for the whole region (about 0.2% of its size).

    Only writes through this process's mappings of the region are recorded
    (any thread, including kernel copies such as ``read(2)`` into a view):
    writes by other processes mapping the same ``/dev/shm`` file, and writes to
    the file with ``write(2)``/``pwrite``, are not. Use this tracker only when
    every writer is a thread of the process that runs the Source, ``"scan"``
    otherwise. See the module documentation for the other limits.

    Raises :class:`~mpmultifd.errors.TrackingUnavailable`, with the reason,
    when it cannot work here. A forked child inherits the object but may not
    start or collect with it (its userfaultfd names the parent's address
    space); ``close()`` there only closes the descriptors.
    """

    name = "kernel"

    def __init__(self, ram: GuestRAM) -> None:
        super().__init__(ram)
        self._lock = threading.Lock()
        self._session: _Session | None = None
        ok, why = kernel_tracking_available()
        if not ok:
            raise TrackingUnavailable(f"dirty_tracker 'kernel' cannot run here: {why}")
        session = _Session()
        try:
            # holding the views keeps each mapping at its address while we track it
            self._views = [ram.view(b.index) for b in ram.blocks]
            self._spans: list[tuple[int, int, str]] = []
            for b, view in zip(ram.blocks, self._views):
                # the kernel maps whole OS pages; a block smaller than one still owns a page
                addr, length = view.ctypes.data, _round_up(b.size, _OS_PAGE)
                what = f"block {b.name!r} of guest RAM {ram.name!r} ({b.path})"
                session.register(addr, length, what)
                self._spans.append((addr, length, what))
        except BaseException:
            session.close()
            raise
        self._session = session

    def _live(self) -> _Session:
        session = self._session
        if session is None:
            raise RuntimeError("KernelTracker is closed")
        if os.getpid() != session.pid:
            raise RuntimeError(
                "KernelTracker used in a forked child: its userfaultfd tracks the parent's address space"
            )
        return session

    def _start(self) -> None:
        with self._lock:
            session = self._live()
            for addr, length, what in self._spans:
                session.protect(addr, length, what)

    def _collect(self, block: int) -> np.ndarray:
        b = self.ram.blocks[block]
        with self._lock:
            session = self._live()
            addr, length, what = self._spans[block]
            starts, ends = session.take_written(addr, length, what)
        return _ranges_to_pages(starts, ends, self.ram.page_size, b.npages)

    def close(self) -> None:
        """Unregister the mappings and close the userfaultfd; idempotent, fine before ``start()``."""
        with self._lock:
            session, self._session = self._session, None
            if session is not None:
                session.close()
            self._views = []
        super().close()
