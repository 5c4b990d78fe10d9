"""Handing a running QEMU VM from one QEMU process to another, RAM through mpmultifd.

QEMU keeps the guest's RAM in shared memory backends
(``-object memory-backend-file,...,share=on``); with the ``x-ignore-shared``
migration capability QEMU's own migration stream skips those RAM blocks and
carries only the device state (and small private blocks such as ROMs).
mpmultifd moves the shared RAM, live, over its parallel channels; QEMU moves
the rest; the destination VM starts only when both arrived and were verified.

The two hosts need one port between them: QEMU's device-state stream is
carried over an mpmultifd *stream* connection (same key proof and TLS as the
data channels), relayed on each host into a private Unix socket of the local
QEMU.

Source host (:func:`migrate_vm`)::

    QMP x-ignore-shared on, multifd off
    map every shared backend file -> Source.migrate(dirty_tracker="scan")
        pause  = QMP stop        (the downtime starts)
        before_commit(open_stream):   RAM is complete and verified, VM stopped
            QMP migrate unix:<private>  -> relay -> stream
            wait: source QEMU "completed", destination "loaded"
        COMMIT -> COMMIT_ACK
        resume = QMP cont        (only if anything failed before COMMIT)
    wait for the destination's "running" (the downtime ends)

Destination host (:func:`receive_vm`), QEMU started with ``-incoming defer``::

    QMP x-ignore-shared on
    map every shared backend file -> Destination(on_stream=...)
        stream: QMP migrate-incoming unix:<private>, relay stream -> QEMU,
                wait for QEMU's incoming migration "completed", answer "loaded"
    dst.wait() completed AND device state loaded -> QMP cont, answer "running"

The VMs never both run: the destination VM is started only after COMMIT, and
the source is resumed only when the migration failed before COMMIT. When the
connection breaks between COMMIT and its acknowledgement the source cannot
know which side owns the VM: it raises ``CommitUnknown`` and leaves its VM
stopped, for the VM manager to decide.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .errors import MigrationError

__all__ = [
    "QMP",
    "QMPError",
    "VMHandoverError",
    "MemoryBackend",
    "VMHandoverResult",
    "shared_backends",
    "migrate_vm",
    "receive_vm",
]

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())


# --------------------------------------------------------------------------- QMP


class QMPError(MigrationError, RuntimeError):
    """QEMU could not be reached over QMP, closed it, or refused a command (QEMU's ``desc`` is quoted)."""


def _log_tail(path: str | None, n: int = 20) -> str:
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


class QMP:
    """A small blocking QMP client over a Unix socket.

    ``path`` is QEMU's ``-qmp unix:PATH,server=on,wait=off`` socket. When the
    caller started QEMU itself it may pass ``proc`` (a ``Popen``, so a QEMU
    that exits is noticed at once) and ``log`` (QEMU's output file, quoted in
    errors). ``cmd()`` runs one command; events that arrive meanwhile are kept
    in ``events`` as ``(time.monotonic(), event)``. A QMP socket serves one
    client at a time: give QEMU a second ``-qmp`` for mpmultifd when the VM
    manager keeps its own connection open.
    """

    def __init__(
        self,
        path: str,
        proc: subprocess.Popen | None = None,
        log: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.path, self.proc, self.log = path, proc, log
        self.buf = b""
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.sock: socket.socket | None = None
        deadline = time.monotonic() + timeout
        while True:
            if proc is not None and proc.poll() is not None:
                raise QMPError(f"QEMU exited with {proc.returncode} before its QMP socket opened:\n{_log_tail(log)}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                s.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"QMP socket {path} did not open in {timeout:g} s ({exc}):\n{_log_tail(log)}") from None
                time.sleep(0.01)
            except OSError as exc:
                s.close()
                raise QMPError(f"cannot connect to the QMP socket {path}: {exc}") from exc
        self.sock = s
        try:
            greeting = self.read(max(0.0, deadline - time.monotonic()))
            if "QMP" not in greeting:
                raise QMPError(f"{path}: unexpected QMP greeting {greeting}")
            self.version = greeting["QMP"]["version"]
            self.cmd("qmp_capabilities", timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        if self.sock is None:
            raise QMPError("the QMP connection is closed")
        return self.sock.fileno()

    def buffered(self) -> bool:
        """A whole message is already read and waiting (``select`` on the socket would miss it)."""
        return b"\n" in self.buf

    def _closed_message(self) -> str:
        code = self.proc.poll() if self.proc is not None else None
        return f"QEMU closed its QMP socket {self.path}" + (f" (exit {code})" if code is not None else "") + (
            f":\n{_log_tail(self.log)}" if self.log else ""
        )

    def read(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next JSON message, a reply or an event."""
        if self.sock is None:
            raise QMPError("the QMP connection is closed")
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError(f"no answer on {self.path} in {timeout:g} s")
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                try:
                    data = self.sock.recv(65536)
                except OSError as exc:
                    raise QMPError(f"{self._closed_message()} ({exc})") from exc
                if not data:
                    raise QMPError(self._closed_message())
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise QMPError(f"{self.path}: not a QMP message: {line[:200]!r}") from exc
        if not isinstance(msg, dict):
            raise QMPError(f"{self.path}: not a QMP message: {line[:200]!r}")
        return msg

    def cmd(self, name: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        """Run one command; its ``return`` value, or :class:`QMPError` with QEMU's ``desc``."""
        if self.sock is None:
            raise QMPError("the QMP connection is closed")
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise QMPError(f"{self._closed_message()} ({exc})") from exc
        deadline = time.monotonic() + timeout
        while True:
            reply = self.read(max(0.0, deadline - time.monotonic()))
            if "event" in reply:
                self.events.append((time.monotonic(), reply))
                continue
            if "error" in reply:
                err = reply["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise QMPError(f"QMP {name} {json.dumps(args or {})}: {desc}")
            return reply.get("return")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "QMP":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
