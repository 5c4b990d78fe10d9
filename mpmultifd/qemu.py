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
    map every shared backend file -> Source.migrate(dirty_tracker="scan", verify=True)
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
import stat as _stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import MigrationError

__all__ = [
    "QMP",
    "log_tail",
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


def log_tail(path: str | None, n: int = 20) -> str:
    """The last ``n`` lines of the log file at ``path`` ('' without one, or if it cannot be read)."""
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
                raise QMPError(f"QEMU exited with {proc.returncode} before its QMP socket opened:\n{log_tail(log)}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                s.close()
                # a QEMU we started may not have opened its socket yet; anyone else's should have
                if proc is None:
                    raise QMPError(f"cannot connect to the QMP socket {path}: {exc.strerror}") from None
                if time.monotonic() > deadline:
                    raise QMPError(
                        f"QMP socket {path} did not open in {timeout:g} s ({exc}):\n{log_tail(log)}"
                    ) from None
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
            f":\n{log_tail(self.log)}" if self.log else ""
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

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- errors and records


class VMHandoverError(MigrationError):
    """A VM handover failed; the message says what, and what each side's VM does now.

    ``source_running`` is ``True`` when the source VM was resumed (or never
    stopped), ``False`` when it stays stopped, ``None`` when unknown (this
    side is the destination). ``destination_started`` is always ``False``:
    the destination VM is never started by a failed handover.
    """

    def __init__(self, message: str, *, source_running: bool | None = None) -> None:
        super().__init__(message)
        self.source_running = source_running
        self.destination_started = False


@dataclass(frozen=True)
class MemoryBackend:
    """One shared, file-backed QEMU memory backend: its QOM id, file, size in bytes."""

    id: str
    path: str
    size: int


@dataclass(frozen=True)
class VMHandoverResult:
    """What a handover did, on one side (``role`` ``"source"`` or ``"destination"``).

    ``ram`` is mpmultifd's :class:`~mpmultifd.MigrationResult` for the shared
    RAM. ``device_state_bytes`` is QEMU's own stream (device state and the
    small private RAM blocks) carried over the stream connection;
    ``device_time`` the seconds from asking QEMU for it until the destination
    QEMU had loaded it. On the source, ``downtime`` is what a VM manager sees:
    from QMP ``stop`` on the source until the destination said its VM runs
    (QMP ``cont`` returned there), ``None`` if that answer was lost after
    COMMIT; ``total_time`` from the call until then. On the destination,
    ``downtime`` is from COMMIT's arrival to ``cont`` returning, and
    ``total_time`` from the call until ``cont``. ``phases`` splits the
    source's downtime into its steps, in order (seconds): mpmultifd's
    (``pause-call`` = QMP ``stop``, ``dirty-sync``, ``final-round``,
    ``verify-prints``, ``destination-check`` = the destination's comparison
    and any repair), then the device state (``device-send``: the source QEMU's
    stream relayed to the destination; ``device-load``: until the destination
    QEMU had loaded it), ``commit`` and ``cont`` (the destination's ``cont``
    and its word back). ``repaired_pages`` / ``repair_passes``: pages that
    differed between the hosts once the guest was paused and were resent
    (``MigrationResult`` of the RAM).
    """

    role: str
    ram: Any
    backends: tuple[MemoryBackend, ...]
    device_state_bytes: int
    device_time: float
    downtime: float | None
    total_time: float
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def repaired_pages(self) -> int:
        return int(getattr(self.ram, "repaired_pages", 0) or 0)

    @property
    def repair_passes(self) -> int:
        return int(getattr(self.ram, "repair_passes", 0) or 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (kebab-case names, as ``MigrationResult.to_dict``)."""
        return {
            "role": self.role,
            "ram": self.ram.to_dict() if self.ram is not None else None,
            "backends": [asdict(b) for b in self.backends],
            "device-state-bytes": self.device_state_bytes,
            "device-time": self.device_time,
            "downtime": self.downtime,
            "total-time": self.total_time,
            "phases": dict(self.phases),
            "repair-passes": self.repair_passes,
            "repaired-pages": self.repaired_pages,
        }


# --------------------------------------------------------------------------- discovery


def shared_backends(qmp: QMP) -> list[MemoryBackend]:
    """Every shared memory backend of the QEMU behind ``qmp``, with the file that holds it.

    With ``x-ignore-shared`` QEMU's own stream leaves out every shared RAM
    block, so every one must be mappable here: a shared backend without a
    regular file (``memory-backend-memfd``, a ``mem-path`` directory) raises
    :class:`~mpmultifd.errors.ConfigError`, as does a QEMU with no shared backend.
    """
    from .errors import ConfigError

    out: list[MemoryBackend] = []
    memdevs = qmp.cmd("query-memdev") or []
    for i, dev in enumerate(memdevs):
        if not dev.get("share"):
            continue
        bid = dev.get("id")
        if not bid:
            raise ConfigError(f"memory backend #{i} is shared but has no id; give every backend an id")
        qom = f"/objects/{bid}"
        try:
            path = qmp.cmd("qom-get", {"path": qom, "property": "mem-path"})
        except QMPError as exc:
            raise ConfigError(
                f"memory backend {bid!r} is shared but not file-backed ({exc}); only memory-backend-file "
                "backends can be handed over (use memory-backend-file,mem-path=/dev/shm/NAME,share=on)"
            ) from exc
        size = int(dev.get("size", 0))
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"memory backend {bid!r}: cannot use its file {path!r}: {exc.strerror}") from exc
        if not _stat.S_ISREG(st.st_mode):
            raise ConfigError(
                f"memory backend {bid!r}: mem-path {path!r} is not a regular file (a directory makes QEMU use an "
                "unlinked file nobody else can map); give mem-path a file name"
            )
        if st.st_size != size:
            raise ConfigError(f"memory backend {bid!r}: file {path!r} holds {st.st_size} bytes, QEMU says {size}")
        out.append(MemoryBackend(bid, path, size))
    if not out:
        raise ConfigError(
            "QEMU has no shared memory backend: start it with -object memory-backend-file,id=ram0,size=...,"
            "mem-path=/dev/shm/NAME,share=on and -machine memory-backend=ram0"
        )
    return out


def _set_capabilities(qmp: QMP, *, source: bool) -> None:
    caps = [{"capability": "x-ignore-shared", "state": True}, {"capability": "multifd", "state": False}]
    qmp.cmd("migrate-set-capabilities", {"capabilities": caps})
    if source:
        # QEMU 7.2 caps its own stream at 128 MiB/s by default: the device state is on the downtime's path
        qmp.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 40})


# --------------------------------------------------------------------------- the stream

# The stream connection carries, source to destination, QEMU's migration stream
# in frames (4-byte big-endian length, then that many bytes; length 0 ends it),
# and, destination to source, JSON messages in the same frames:
# {"status": "loaded", ...} or {"status": "failed", "error": ...}, then
# {"status": "running", ...} once the destination VM runs.

_FRAME = struct.Struct(">I")
_MAX_FRAME = 1 << 20
_CHUNK = 256 << 10


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            from .errors import ChannelClosed

            raise ChannelClosed(f"{what}: the peer closed the stream connection")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket, what: str) -> bytes:
    (n,) = _FRAME.unpack(_recv_exact(sock, 4, what))
    if n > _MAX_FRAME:
        from .errors import RemoteProtocolError

        raise RemoteProtocolError(f"{what}: a stream frame of {n} bytes (at most {_MAX_FRAME})", field="length")
    return _recv_exact(sock, n, what) if n else b""


def _send_json(sock: socket.socket, msg: dict[str, Any]) -> None:
    data = json.dumps(msg).encode()
    sock.sendall(_FRAME.pack(len(data)) + data)


def _recv_json(sock: socket.socket, what: str) -> dict[str, Any]:
    data = _recv_frame(sock, what)
    try:
        msg = json.loads(data)
    except ValueError:
        msg = None
    if not isinstance(msg, dict) or "status" not in msg:
        from .errors import RemoteProtocolError

        raise RemoteProtocolError(f"{what}: not a handover message: {data[:200]!r}", field="status")
    return msg


def _migration_status(qmp: QMP) -> dict[str, Any]:
    return qmp.cmd("query-migrate") or {}


def _wait_migration(qmp: QMP, deadline: float, who: str) -> dict[str, Any]:
    """Poll ``query-migrate`` until QEMU's migration completed; QMPError when it failed or took too long."""
    while True:
        info = _migration_status(qmp)
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise QMPError(f"{who} QEMU's migration {status}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise QMPError(f"{who} QEMU's migration still {status!r} at the deadline")
        time.sleep(0.002)


def _private_socket_path() -> tuple[str, str]:
    d = tempfile.mkdtemp(prefix="mpmvm-")  # mode 0700: only this user reaches the socket
    return d, os.path.join(d, "migration.sock")


# --------------------------------------------------------------------------- source


def migrate_vm(
    qmp: str | QMP,
    address: Any,
    config: Any = None,
    *,
    device_timeout: float = 60.0,
    on_event: Callable[[dict[str, Any]], Any] | None = None,
    pool: Any = None,
) -> VMHandoverResult:
    """Hand the VM of the QEMU at ``qmp`` (a QMP socket path, or a connected :class:`QMP`) to ``address``.

    ``address`` is where :func:`receive_vm` listens on the other host.
    ``config`` is a :class:`~mpmultifd.MigrationConfig` (its ``dirty_tracker``
    is set to ``"scan"``: the guest writes its RAM behind our back). The VM
    is stopped (QMP ``stop``) when mpmultifd's precopy converges; if it was
    paused before, it stays paused and is not resumed on failure.

    Returns a :class:`VMHandoverResult` once the destination VM runs; the
    source QEMU is then in ``postmigrate`` state and the caller may quit it.
    Raises :class:`VMHandoverError` (or another MigrationError) when the
    handover failed before COMMIT: the source VM is running again (if it
    was running). Raises :class:`~mpmultifd.errors.CommitUnknown` when the
    connection broke between COMMIT and its acknowledgement: the source VM
    stays stopped; ask the destination host whether its VM runs.
    """
    from .config import MigrationConfig
    from .ram import GuestRAM
    from .source import Source

    t0 = time.monotonic()
    own_qmp = isinstance(qmp, str)
    q = QMP(qmp) if isinstance(qmp, str) else qmp
    ram = None
    stream_box: dict[str, Any] = {}
    times: dict[str, float] = {}
    try:
        state = q.cmd("query-status")["status"]
        if state not in ("running", "paused"):
            from .errors import ConfigError

            raise ConfigError(f"the source VM is {state!r}: only a running or paused VM can be handed over")
        was_running = state == "running"
        info = _migration_status(q)
        if info.get("status") in ("setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug"):
            from .errors import ConfigError

            raise ConfigError(f"the source QEMU is already migrating ({info.get('status')})")
        backends = shared_backends(q)
        _set_capabilities(q, source=True)
        # QEMU writes the guest's RAM behind our back: the scanning tracker finds its writes, and the
        # paused RAM is always verified (and pages that differ repaired) before the device state moves
        cfg = (config if config is not None else MigrationConfig()).replace(dirty_tracker="scan", verify=True)
        ram = GuestRAM.from_files({b.id: b.path for b in backends})

        def pause() -> None:
            times["stop"] = time.monotonic()
            if was_running:
                q.cmd("stop")
            times["stopped"] = time.monotonic()

        def resume() -> None:
            if was_running:
                q.cmd("cont")
                log.info("handover failed: the source VM runs again")

        def before_commit(open_stream: Callable[[], socket.socket]) -> None:
            times["ram_done"] = time.monotonic()
            stream = open_stream()
            stream_box["sock"] = stream
            stream.settimeout(max(1.0, device_timeout))
            stream_box["bytes"] = _send_device_state(q, stream, time.monotonic() + device_timeout)
            times["device_sent"] = time.monotonic()
            stream.settimeout(max(1.0, device_timeout))
            answer = _recv_json(stream, "waiting for the destination to load the device state")
            if answer.get("status") != "loaded":
                raise VMHandoverError(
                    f"the destination QEMU did not load the device state: {answer.get('error', answer)}"
                )
            times["device_loaded"] = time.monotonic()

        with Source(ram, cfg, on_event=on_event, pool=pool) as src:
            try:
                res = src.migrate(address, pause=pause, resume=resume, before_commit=before_commit)
            except MigrationError as exc:
                from .errors import CommitUnknown

                if isinstance(exc, CommitUnknown):
                    raise
                running = was_running and _status_or_none(q) == "running"
                raise VMHandoverError(
                    f"VM handover failed: {exc}; the source VM " + (
                        "runs again" if running else ("stays paused (it was paused)" if not was_running
                                                      else "could not be resumed: check it")
                    ) + "; the destination VM was not started",
                    source_running=running,
                ) from exc
        times["committed"] = time.monotonic()
        downtime: float | None = None
        sock = stream_box["sock"]  # before_commit opened it, or the migration had failed
        try:
            sock.settimeout(max(1.0, device_timeout))
            msg = _recv_json(sock, "waiting for the destination VM to run")
            if msg.get("status") == "running":
                times["running"] = time.monotonic()
                downtime = times["running"] - times["stop"]
            else:
                raise VMHandoverError(
                    "the RAM and the device state were committed, but the destination could not start its VM: "
                    f"{msg.get('error', msg)}; the source VM stays stopped (the destination owns the VM now)",
                    source_running=False,
                )
        except (OSError, MigrationError) as exc:
            if isinstance(exc, VMHandoverError):
                raise
            log.warning("committed, but the destination's word that its VM runs was lost: %s", exc)
        end = times.get("running", times["committed"])
        return VMHandoverResult(
            role="source",
            ram=res,
            backends=tuple(backends),
            device_state_bytes=int(stream_box.get("bytes", 0)),
            device_time=times.get("device_loaded", end) - times["ram_done"],
            downtime=downtime,
            total_time=end - t0,
            phases=_phases(res, times),
        )
    finally:
        sock = stream_box.get("sock")
        if sock is not None:
            sock.close()
        if ram is not None:
            ram.close()
            if ram.owner:
                ram.unlink()
        if own_qmp:
            q.close()


def _phases(res: Any, times: dict[str, float]) -> dict[str, float]:
    """The source's downtime in steps, in order: mpmultifd's pause phases with ``before-commit``
    split into the device state's ``device-send`` and ``device-load``, then ``cont`` (the
    destination's ``cont`` and its word back, if it came)."""
    out: dict[str, float] = {}
    for name, secs in (res.downtime_phases or {}).items():
        if name == "before-commit" and "device_loaded" in times:
            out["device-send"] = times["device_sent"] - times["ram_done"]
            out["device-load"] = times["device_loaded"] - times["device_sent"]
        else:
            out[name] = secs
    if "running" in times and res.downtime is not None:
        out["cont"] = max(0.0, times["running"] - (times["stop"] + res.downtime))
    return out


def _status_or_none(q: QMP) -> str | None:
    try:
        return q.cmd("query-status", timeout=5.0)["status"]
    except MigrationError:
        return None


def _send_device_state(q: QMP, stream: socket.socket, deadline: float) -> int:
    """Make the source QEMU migrate into a private Unix socket and relay that into ``stream``; bytes sent.

    Returns once QEMU's stream ended and QEMU says its migration completed.
    On failure a running QEMU migration is cancelled.
    """
    tmpdir, path = _private_socket_path()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn: socket.socket | None = None
    started = False
    total = 0
    try:
        lsock.bind(path)
        lsock.listen(1)
        q.cmd("migrate", {"uri": f"unix:{path}"})
        started = True
        lsock.settimeout(0.05)
        while conn is None:
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                status = _migration_status(q).get("status")
                if status in ("failed", "cancelled"):
                    raise QMPError(f"the source QEMU's migration {status} before connecting") from None
                if time.monotonic() > deadline:
                    raise QMPError("the source QEMU did not connect its migration stream in time") from None
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            n = conn.recv_into(view)
            if n == 0:
                break
            stream.sendall(_FRAME.pack(n) + view[:n])
            total += n
        stream.sendall(_FRAME.pack(0))
        _wait_migration(q, deadline, "the source")
        return total
    except BaseException:
        if started:
            try:
                if _migration_status(q).get("status") not in ("completed", "failed", "cancelled"):
                    q.cmd("migrate_cancel")
            except MigrationError:
                pass
        raise
    finally:
        if conn is not None:
            conn.close()
        lsock.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


# --------------------------------------------------------------------------- destination


class _Incoming:
    """The destination's stream handler: relays one device-state stream into the local QEMU.

    The Destination closes a stream once its handler returns, so after
    answering "loaded" the handler keeps the stream (blocks) until
    :meth:`release`: :func:`receive_vm` still has to tell the source that the
    VM runs (or the source closes it first).
    """

    def __init__(self, q: QMP, timeout: float, hold: float = 0.0) -> None:
        self.q = q
        self.timeout = timeout
        self.hold = hold
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.loaded = threading.Event()
        self.finished = threading.Event()
        self.released = threading.Event()
        self.error: str | None = None
        self.bytes = 0
        self.load_time = 0.0

    def __call__(self, sock: socket.socket) -> None:
        with self.lock:
            if self.sock is not None or self.finished.is_set():
                log.warning("a second device-state stream was refused")
                sock.close()
                return
            self.sock = sock
        t0 = time.monotonic()
        try:
            sock.settimeout(self.timeout)
            # the RAM is complete and verified (the source opens the stream only then)
            self.bytes = self._relay(sock, time.monotonic() + self.timeout)
            self.load_time = time.monotonic() - t0
            self.loaded.set()
            _send_json(sock, {"status": "loaded", "bytes": self.bytes, "load-time": self.load_time})
            # keep the stream for receive_vm's last word ("running"), until COMMIT and cont or a failure
            self._hold(sock)
        except BaseException as exc:  # noqa: BLE001 - reported to the source and to receive_vm
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("the device state was not loaded: %s", self.error)
            try:
                _send_json(sock, {"status": "failed", "error": self.error})
            except OSError:
                pass
        finally:
            self.finished.set()

    def _relay(self, sock: socket.socket, deadline: float) -> int:
        tmpdir, path = _private_socket_path()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        total = 0
        try:
            self.q.cmd("migrate-incoming", {"uri": f"unix:{path}"})
            while True:
                try:
                    conn.connect(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise QMPError("the destination QEMU did not open its incoming socket in time") from None
                    time.sleep(0.005)
            while True:
                data = _recv_frame(sock, "receiving the device state")
                if not data:
                    break
                conn.sendall(data)
                total += len(data)
            conn.shutdown(socket.SHUT_WR)
            _wait_migration(self.q, deadline, "the destination")
            state = self.q.cmd("query-status")["status"]
            if state == "running":
                # never before COMMIT: stop it again, and say so
                self.q.cmd("stop")
                raise VMHandoverError(
                    "the destination QEMU started the VM by itself after loading the device state "
                    "(start it with -S); it was stopped again"
                )
            return total
        finally:
            conn.close()
            shutil.rmtree(tmpdir, ignore_errors=True)

    def _hold(self, sock: socket.socket) -> None:
        """Block until :meth:`release`, the source closing the stream, or ``hold`` seconds."""
        deadline = time.monotonic() + self.hold
        while not self.released.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("nobody released the device-state stream in %.0f s", self.hold)
                return
            try:
                r, _, _ = select.select([sock], [], [], min(0.1, left))
            except (OSError, ValueError):
                return
            if r:
                # the source sends nothing after the device state: this is its close (or a broken peer)
                return

    def release(self) -> None:
        """Let the handler return (the Destination then closes the stream)."""
        self.released.set()

    def close(self) -> None:
        self.release()
        with self.lock:
            self.finished.set()


def _wait_commit(dst: Any, timeout: float | None) -> Any:
    """Wait until COMMIT arrived (``dst.valid``: the region is ours) or the migration ended.

    Returns the result if the migration already ended, else ``None``: the
    Destination tears its receivers down after COMMIT before ``wait()``
    returns, and the VM should not wait for that.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while not dst.valid:
        try:
            return dst.wait(0.002)
        except TimeoutError:
            if deadline is not None and time.monotonic() > deadline:
                raise
    return None


def receive_vm(
    qmp: str | QMP,
    listen: Any,
    config: Any = None,
    *,
    device_timeout: float = 60.0,
    on_listening: Callable[[Any], Any] | None = None,
    timeout: float | None = None,
    pool: Any = None,
) -> VMHandoverResult:
    """Receive a VM handed over by :func:`migrate_vm` into the QEMU at ``qmp``, then start it.

    That QEMU must have been started with ``-incoming defer`` (and ideally
    ``-S``) and the same shared memory backends (ids and sizes) as the
    source's, each a file of its own. ``on_listening(address)`` is called once
    the listener is up. The destination VM is started (QMP ``cont``) only
    after mpmultifd's COMMIT arrived *and* QEMU loaded the device state.
    Raises :class:`VMHandoverError` on any failure: the destination VM was not
    started (its QEMU stays stopped or has exited, as QEMU does after a failed
    incoming migration); the source resumes its own VM.
    """
    from .config import MigrationConfig
    from .destination import Destination
    from .errors import ConfigError
    from .ram import GuestRAM

    t0 = time.monotonic()
    own_qmp = isinstance(qmp, str)
    q = QMP(qmp) if isinstance(qmp, str) else qmp
    ram = None
    incoming: _Incoming | None = None
    try:
        state = q.cmd("query-status")["status"]
        if state != "inmigrate":
            raise ConfigError(
                f"the destination QEMU is {state!r}: start it with -incoming defer (and -S) to receive a VM"
            )
        backends = shared_backends(q)
        _set_capabilities(q, source=False)
        cfg = config if config is not None else MigrationConfig()
        ram = GuestRAM.from_files({b.id: b.path for b in backends})
        # the handler holds the stream after "loaded" until COMMIT (at most the commit wait) and cont
        incoming = _Incoming(q, device_timeout, hold=device_timeout + cfg.timeout + 30.0)
        with Destination(ram, listen, cfg, on_stream=incoming, pool=pool) as dst:
            try:
                if on_listening is not None:
                    on_listening(dst.address)
                try:
                    res = _wait_commit(dst, timeout)
                except MigrationError as exc:
                    raise VMHandoverError(
                        f"VM handover failed: {exc}; the destination VM was not started"
                        + (f" (device state: {incoming.error})" if incoming.error else "")
                    ) from exc
                except TimeoutError as exc:
                    dst.cancel()
                    raise VMHandoverError(
                        f"no handover within {timeout} s; the destination VM was not started"
                    ) from exc
                t_commit = time.monotonic()
                if not incoming.loaded.is_set():
                    raise VMHandoverError(
                        "the RAM was committed but QEMU had not loaded the device state "
                        f"({incoming.error or 'no device-state stream'}); the destination VM was not started"
                    )
                try:
                    q.cmd("cont")
                except QMPError as exc:
                    if incoming.sock is not None:
                        try:
                            _send_json(incoming.sock, {"status": "failed", "error": f"QMP cont: {exc}"})
                        except OSError:
                            pass
                    raise VMHandoverError(
                        f"the VM was committed here but QMP cont failed ({exc}); it is not running, and the "
                        "source VM stays stopped: check this QEMU"
                    ) from exc
                t_cont = time.monotonic()
                sock = incoming.sock
                if sock is not None:
                    try:
                        _send_json(sock, {"status": "running"})
                    except OSError as exc:
                        log.warning("the VM runs here, but the source was not told: %s", exc)
                if res is None:
                    res = dst.wait()  # the receivers' teardown, after the VM runs
            finally:
                incoming.release()  # before the Destination closes: it joins the handler
        return VMHandoverResult(
            role="destination",
            ram=res,
            backends=tuple(backends),
            device_state_bytes=incoming.bytes,
            device_time=incoming.load_time,
            downtime=t_cont - t_commit,
            total_time=t_cont - t0,
            phases={"commit->running": t_cont - t_commit},
        )
    finally:
        if incoming is not None:
            incoming.close()
        if ram is not None:
            ram.close()
            if ram.owner:
                ram.unlink()
        if own_qmp:
            q.close()
