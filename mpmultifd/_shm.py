"""Low-level POSIX shared-memory segments without the resource tracker's traps.

``multiprocessing.shared_memory`` registers every segment it opens with the
process's resource tracker, which on Python 3.10-3.12 unlinks a segment that an
*attaching* process merely opened, at that process's exit. mpmultifd therefore
maps ``/dev/shm/<name>`` itself:

- a segment we create is registered with the resource tracker exactly once, by
  its creator, so that a crashed owner still gets it cleaned up; it is
  unregistered when the owner unlinks it;
- a segment we attach to is never registered, so no process but its owner can
  unlink it, and no tracker warns about it.
"""

from __future__ import annotations

import mmap
import os
import secrets
import stat
from collections.abc import Collection
from multiprocessing import resource_tracker

from .errors import UntrustedSegmentError

SHM_DIR = "/dev/shm"

__all__ = ["SHM_DIR", "unique_name", "Segment", "check_owner"]


def unique_name(kind: str) -> str:
    """A fresh segment name: ``<prefix><kind>_<random hex>``.

    The prefix comes from ``MPMULTIFD_SHM_PREFIX`` (default ``mpm_``) so test
    runs and deployments can tell their segments apart.
    """
    prefix = os.environ.get("MPMULTIFD_SHM_PREFIX", "mpm_")
    return f"{prefix}{kind}_{secrets.token_hex(6)}"


def check_owner(path: str, st: os.stat_result, *, private: bool, owners: Collection[int] = ()) -> None:
    """Refuse a file another user owns (unless in ``owners``) or, when ``private``, one open to group/others."""
    uid = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != uid and st.st_uid not in owners:
        raise UntrustedSegmentError(
            f"{path!r} belongs to uid {st.st_uid} (mode {mode:04o}), not to this process's uid {uid}: another "
            "user may have planted it; pass allow_foreign=True if that owner is trusted",
            path=path,
            owner=st.st_uid,
            mode=mode,
        )
    if private and mode & 0o077:
        raise UntrustedSegmentError(
            f"{path!r} (owner uid {st.st_uid}) has mode {mode:04o}: group or others can read or change it "
            "(mpmultifd makes its segments 0600); pass allow_foreign=True if that is intended",
            path=path,
            owner=st.st_uid,
            mode=mode,
        )


def _check_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or len(name.encode()) > 255:
        raise ValueError(f"invalid shared-memory name {name!r}: must be a non-empty file name without '/'")
    return name


class Segment:
    """One mapped shared-memory file.

    ``owned`` segments were created here and are unlinked by :meth:`unlink`;
    others are never unlinked by this process.
    """

    __slots__ = ("name", "path", "size", "owned", "_tracked", "_mmap")

    def __init__(self, name: str, path: str, size: int, owned: bool, tracked: bool, mm: mmap.mmap) -> None:
        self.name = name
        self.path = path
        self.size = size
        self.owned = owned
        self._tracked = tracked
        self._mmap: mmap.mmap | None = mm

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        """Create a new zero-filled segment; fails if the name exists."""
        _check_name(name)
        if size <= 0:
            raise ValueError(f"segment size must be positive, got {size}")
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        # the tracker unlinks "/name" through shm_unlink if this process dies first
        resource_tracker.register("/" + name, "shared_memory")
        return cls(name, path, size, True, True, mm)

    @classmethod
    def attach(
        cls,
        name_or_path: str,
        *,
        writable: bool = True,
        allow_foreign: bool = False,
        owners: Collection[int] = (),
    ) -> Segment:
        """Map an existing segment (a ``/dev/shm`` name or any file path) without tracking it.

        Unless ``allow_foreign``, the file must belong to this process's
        effective uid (or one of ``owners``); a ``/dev/shm`` name must also
        not be accessible to group or others, and is never reached through a
        symlink. Anything else is :class:`UntrustedSegmentError`: another
        user could have planted it, or can read or change it.
        """
        if os.sep in name_or_path:
            path = name_or_path
            name = os.path.basename(path)
            private = False
            flags = 0
        else:
            name = _check_name(name_or_path)
            path = os.path.join(SHM_DIR, name)
            private = True
            flags = os.O_NOFOLLOW
        flags |= (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            if not allow_foreign:
                check_owner(path, st, private=private, owners=owners)
            size = st.st_size
            if size <= 0:
                raise ValueError(f"shared-memory file {path!r} is empty")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        return cls(name, path, size, False, False, mm)

    @property
    def buf(self) -> mmap.mmap:
        if self._mmap is None:
            raise ValueError(f"segment {self.name!r} is closed")
        return self._mmap

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> None:
        """Unmap, unless views still use the mapping: then leave it to the garbage collector.

        A numpy array over the mapping keeps it alive; unmapping under it would
        turn the next access into a crash, so we only drop our reference.
        """
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass

    def unlink(self) -> None:
        """Remove the name (owner only); mappings stay valid until closed."""
        if not self.owned:
            raise PermissionError(f"segment {self.name!r} is attached, not owned: only its creator unlinks it")
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self._tracked:
            self._tracked = False
            resource_tracker.unregister("/" + self.name, "shared_memory")

    def keep(self) -> None:
        """Let the segment outlive this process: the resource tracker forgets it and this
        process no longer owns it (someone else removes the file later)."""
        if self._tracked:
            self._tracked = False
            resource_tracker.unregister("/" + self.name, "shared_memory")
        self.owned = False

    def __repr__(self) -> str:
        state = "closed" if self._mmap is None else "open"
        return f"<Segment {self.name!r} size={self.size} owned={self.owned} {state}>"
