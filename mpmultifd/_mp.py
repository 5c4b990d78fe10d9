"""Multiprocessing contexts for mpmultifd's own worker processes.

Under spawn and forkserver, the standard library prepares every child by
running the parent's ``__main__`` again (as ``__mp_main__``), so that
functions defined there can be unpickled. For an agent that embeds
mpmultifd this re-runs its unguarded top-level code in every channel worker:
a listening socket is bound twice, a print appears N times, a connection to
its own service is opened again. Our workers run only mpmultifd's code, so
they never need the caller's main module.

The contexts here start processes exactly like the standard ones, except that

* the preparation data sent to a spawn or forkserver child leaves out the
  main module (``init_main_from_path`` / ``init_main_from_name``), and
* forkserver children come from a forkserver of our own, preloaded with
  numpy and the worker modules (never ``__main__``), so the agent's own
  forkserver (its preload list, its process) is not touched.

Nothing global is changed: the agent's ``multiprocessing`` calls behave as
before. A consequence for plugins: anything a worker unpickles (a compression
method, say) must live in an importable module, not in the agent's script.
"""

from __future__ import annotations

import io
import os
import threading
from multiprocessing import context as _context
from multiprocessing import forkserver as _forkserver
from multiprocessing import popen_forkserver, popen_spawn_posix, spawn, util
from multiprocessing.context import reduction, set_spawning_popen
from typing import Any

__all__ = ["context", "forkserver_pid", "start_forkserver"]

PRELOAD = ["numpy", "mpmultifd.worker", "mpmultifd.file_worker"]
_MAIN_KEYS = ("init_main_from_path", "init_main_from_name")


def _preparation_data(name: str) -> dict[str, Any]:
    data = spawn.get_preparation_data(name)
    for key in _MAIN_KEYS:
        data.pop(key, None)
    return data


class _Server:
    """Our forkserver: created on first use, forgotten in a forked child (it is the parent's)."""

    _lock = threading.Lock()
    _server: Any = None

    @classmethod
    def get(cls) -> Any:
        with cls._lock:
            if cls._server is None:
                fs = _forkserver.ForkServer()
                fs.set_forkserver_preload(list(PRELOAD))
                cls._server = fs
            return cls._server

    @classmethod
    def forget(cls) -> None:
        # after a fork: the server (its pid, its lock's state) belongs to the parent
        cls._lock = threading.Lock()
        cls._server = None


os.register_at_fork(after_in_child=_Server.forget)


def forkserver_pid() -> int | None:
    """The pid of the forkserver this process started for mpmultifd's workers, if any."""
    fs = _Server._server
    return getattr(fs, "_forkserver_pid", None) if fs is not None else None


def start_forkserver() -> None:
    """Start our forkserver now if it is not running. It returns once the server process
    is launched; the server imports numpy and the worker modules in its own process
    meanwhile, so the first worker started later does not wait for that."""
    _Server.get().ensure_running()


class _SpawnPopen(popen_spawn_posix.Popen):
    def _launch(self, process_obj: Any) -> None:  # popen_spawn_posix.Popen._launch without __main__
        from multiprocessing import resource_tracker

        tracker_fd = resource_tracker.getfd()
        self._fds.append(tracker_fd)
        prep_data = _preparation_data(process_obj._name)
        fp = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, fp)
            reduction.dump(process_obj, fp)
        finally:
            set_spawning_popen(None)

        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
            self._fds.extend([child_r, child_w])
            self.pid = util.spawnv_passfds(spawn.get_executable(), cmd, self._fds)
            self.sentinel = parent_r
            with open(parent_w, "wb", closefd=False) as f:
                f.write(fp.getbuffer())
        finally:
            self.finalizer = util.Finalize(self, util.close_fds, [fd for fd in (parent_r, parent_w) if fd is not None])
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)


class _ForkServerPopen(popen_forkserver.Popen):
    def _launch(self, process_obj: Any) -> None:  # popen_forkserver.Popen._launch, our server, no __main__
        prep_data = _preparation_data(process_obj._name)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)

        self.sentinel, w = _Server.get().connect_to_new_process(self._fds)
        _parent_w = os.dup(w)  # the child's sentinel of this parent
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = _forkserver.read_signed(self.sentinel)


class SpawnProcess(_context.SpawnProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _SpawnPopen(process_obj)


class ForkServerProcess(_context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _ForkServerPopen(process_obj)


class _SpawnContext(_context.SpawnContext):
    Process = SpawnProcess


class _ForkServerContext(_context.ForkServerContext):
    Process = ForkServerProcess

    def set_forkserver_preload(self, module_names: list[str]) -> None:  # ours, not the agent's
        _Server.get().set_forkserver_preload(module_names)


_CONTEXTS: dict[str, Any] = {"spawn": _SpawnContext(), "forkserver": _ForkServerContext()}


def context(method: str) -> Any:
    """A multiprocessing context for ``method`` whose processes never import the caller's ``__main__``.

    ``fork`` copies the parent and runs nothing again; it is the standard context.
    """
    ctx = _CONTEXTS.get(method)
    if ctx is None:
        import multiprocessing

        return multiprocessing.get_context(method)
    return ctx

