"""The ``mpmultifd`` command line.

Units: durations take ``us``, ``ms``, ``s``, ``m`` or ``h`` (``300ms``, ``0.3s``,
``5m``; a bare number is seconds), sizes ``K``, ``M``, ``G``, ``T`` (powers of
1024, ``1G``, ``512MiB``), rates a size per second (``100M/s``). Every time in
the JSON output is in seconds (float), and every key is kebab-case.

Exit codes: 0 done; 1 the migration, save or restore failed, or an error such
as a missing region, key or certificate; 2 a bad command line; 124 ``--max-time``
passed (the migration was cancelled cleanly); 128+N cancelled cleanly on signal
N (130 SIGINT, 129 SIGHUP, 143 SIGTERM; 130 also when the peer cancelled).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from . import __version__
from .cli_vm import add_vm_commands
from .config import DIRTY_TRACKERS, START_METHODS, MigrationConfig
from .destination import Destination
from .errors import ConfigError, MigrationCancelled, MigrationError
from .methods import available_methods, get_method
from .progress import ProgressDisplay
from .ram import GuestRAM
from .source import Source
from .testing import CONTENTS, DirtyingWriter, RemoteDestination, fill
from .transport import format_address, is_loopback
from .zerocopy import enable_zerocopy

__all__ = ["main", "parse_size", "parse_duration", "parse_rate", "EXIT_FAILED", "EXIT_USAGE", "EXIT_MAX_TIME"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_MAX_TIME = 124
EXIT_CANCELLED = 128 + signal.SIGINT

_DEFAULTS = MigrationConfig()
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_TIME_UNITS = {"": 1.0, "us": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """``"256M"`` → 268435456; accepts K, M, G, T (powers of 1024) with an optional ``iB``/``B``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4096, 512M or 1G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_rate(text: str) -> int:
    """``"100M/s"`` → 104857600 bytes per second; the ``/s`` is optional."""
    body = re.sub(r"\s*/\s*s(ec)?\s*$", "", text, flags=re.I)
    try:
        return parse_size(body)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate such as 100M/s or 1G/s") from None


def parse_duration(text: str) -> float:
    """``"300ms"`` → 0.3, ``"0.3s"`` → 0.3, ``"5m"`` → 300.0; a bare number is seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", text, re.I)
    if not m or m.group(2).lower() not in _TIME_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 300ms, 0.3s, 5m or 1h")
    return float(m.group(1)) * _TIME_UNITS[m.group(2).lower()]


def _downtime(text: str) -> float:
    """A downtime: with a unit, or a bare number of seconds below 10 (QEMU's downtime-limit is ms:
    ``--downtime-limit 300`` would otherwise silently mean five minutes)."""
    value = parse_duration(text)
    if re.fullmatch(r"\s*[\d.]+\s*", text) and value >= 10:
        raise argparse.ArgumentTypeError(
            f"{text!r} without a unit would be {value:g} seconds (QEMU's downtime-limit counts milliseconds): "
            f"write {text.strip()}ms, or {text.strip()}s if you mean seconds"
        )
    return value


# ----------------------------------------------------------------------------- flags


def _tuning_args(p: argparse.ArgumentParser, *, channels_help: str | None = None) -> None:
    """What the migration does (the source decides; spelled like QEMU's migrate-set-parameters)."""
    g = p.add_argument_group("migration parameters")
    g.add_argument("--channels", type=int, default=_DEFAULTS.channels,
                   help=channels_help or f"data channels (multifd-channels; default {_DEFAULTS.channels})")
    g.add_argument(
        "--compression", default="none", help="none, lz4, zstd, zlib, auto or a plugin (multifd-compression)"
    )
    g.add_argument("--compression-level", type=int, default=None, help="method-specific level (default: the method's)")
    g.add_argument("--zero-page", choices=("multifd", "none"), default="multifd",
                   help="zero-page-detection: send zero pages as flags only (multifd, default) or as data (none)")
    g.add_argument("--downtime-limit", type=_downtime, default=_DEFAULTS.downtime_limit, metavar="TIME",
                   help="longest pause of the guest at switchover, e.g. 300ms (default 300ms)")
    g.add_argument("--max-bandwidth", type=parse_rate, default=None, metavar="RATE",
                   help="cap over all channels, e.g. 100M/s (default: none)")
    g.add_argument("--max-rounds", type=int, default=_DEFAULTS.max_rounds,
                   help=f"give up converging after this many rounds (default {_DEFAULTS.max_rounds})")
    g.add_argument("--dirty-tracker", choices=DIRTY_TRACKERS, default=None,
                   help="map (writers mark), scan (fingerprint every page: for a region another program writes), "
                        "kernel (userfaultfd, writers in this process); default map, scan for --file")
    g.add_argument("--stall-rounds", type=int, default=_DEFAULTS.stall_rounds,
                   help=f"rounds without the dirty set shrinking that make a stall (default {_DEFAULTS.stall_rounds})")
    g.add_argument("--stall-downtime-limit", type=parse_duration, default=None, metavar="TIME",
                   help="longer downtime accepted when precopy does not converge, e.g. 2s; default: fail")
    g.add_argument("--zerocopy", choices=("auto", "on", "off"), default="auto",
                   help="zero-copy-send: auto (default) uses MSG_ZEROCOPY where it pays")
    g.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip comparing every page's fingerprint at switchover")
    g.add_argument("--channel-retries", type=int, default=0, help="broken channels that may be reconnected (default 0)")
    _start_method_arg(g)


def _start_method_arg(g: Any) -> None:
    g.add_argument("--start-method", choices=START_METHODS, default="forkserver",
                   help="how worker processes start (default forkserver)")


def _connection_args(p: argparse.ArgumentParser, *, server: bool, client: bool) -> None:
    """Handshake timeout, key and TLS: the flags of the side(s) that use them."""
    g = p.add_argument_group("connection and security")
    g.add_argument("--handshake-timeout", type=parse_duration, default=_DEFAULTS.timeout, metavar="TIME",
                   help=f"limit for connecting, each handshake and a silent peer (default {_DEFAULTS.timeout:g}s); "
                        "not a limit on the whole migration (see --max-time)")
    g.add_argument("--timeout", type=parse_duration, default=None, dest="old_timeout", help=argparse.SUPPRESS)
    g.add_argument("--auth-key-file", default=None, metavar="PATH",
                   help="file holding the key both ends share (at least 16 random bytes)")
    if server or client:
        g.add_argument("--allow-unauthenticated", action="store_true",
                       help="without --auth-key-file: "
                       + ("listen beyond loopback and admit other users' processes" if server else "")
                       + (" / " if server and client else "")
                       + ("send to another host or to another user's destination" if client else "")
                       + " (whoever reaches it can read or write the region)")
    if server:
        g.add_argument(
            "--tls-cert", default=None, metavar="PEM", help="this destination's certificate (with --tls-key)"
        )
        g.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's private key")
    if client:
        g.add_argument("--tls-ca", default=None, metavar="PEM", help="CA bundle to check the destination's certificate")
        g.add_argument("--tls", action="store_true", help="use TLS, checking the certificate against the system CAs")
        g.add_argument("--tls-hostname", default=None, help="name the destination's certificate must carry "
                                                             "(default: the host of the address)")


def _deadline_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-time", type=parse_duration, default=None, metavar="TIME",
                   help="cancel and fail (exit 124) if the migration has not finished after this long, "
                        "e.g. 10m (as virsh migrate --timeout)")


def _guest_cmd_args(p: argparse.ArgumentParser, *, pause_help: str, resume_help: str) -> None:
    g = p.add_argument_group("the guest")
    g.add_argument("--pause-cmd", default=None, metavar="CMD", help=pause_help)
    g.add_argument("--pause-cmd-timeout", type=parse_duration, default=60.0, metavar="TIME",
                   help="a --pause-cmd still running after this long is killed; the migration fails and "
                        "--resume-cmd runs (default 60s)")
    g.add_argument("--resume-cmd", default=None, metavar="CMD", help=resume_help)


def _metrics_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metrics (pip install 'mpmultifd[prometheus]')")
    g.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics at http://ADDRESS:PORT/metrics while running (0: any free port)")
    g.add_argument("--metrics-address", default="127.0.0.1", metavar="ADDRESS",
                   help="address for --metrics-port (default 127.0.0.1)")


@contextlib.contextmanager
def _metrics(a: argparse.Namespace, job: Any) -> Iterator[None]:
    """With --metrics-port, ``job``'s query() as Prometheus metrics while the block runs."""
    if getattr(a, "metrics_port", None) is None:
        yield
        return
    try:
        from .metrics import MigrationCollector, serve_metrics
    except ImportError:
        raise ConfigError("--metrics-port: needs prometheus_client (pip install 'mpmultifd[prometheus]')") from None
    collector = MigrationCollector()
    collector.add(job)
    try:
        server = serve_metrics((a.metrics_address, a.metrics_port), collector)
    except OSError as e:
        raise ConfigError(f"--metrics-port {a.metrics_port}: {e.strerror or e}") from None
    host, port = server.address
    _emit(a, {"event": "metrics", "address": f"{host}:{port}"})
    if not a.json:
        print(f"metrics at http://{host}:{port}/metrics", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        server.close()


def _progress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show progress (default: when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="do not show progress")


def _region_args(p: argparse.ArgumentParser, *, create: bool) -> None:
    g = p.add_argument_group("region (exactly one)")
    g.add_argument("--region", default=None, metavar="NAME", help="name of a GuestRAM region (GuestRAM.name)")
    g.add_argument("--file", default=None, metavar="NAME=PATH,..",
                   help="existing files as blocks, e.g. pc.ram=/dev/shm/guest (never removed)")
    if create:
        g.add_argument(
            "--create", default=None, metavar="NAME=SIZE,..", help="a new region, e.g. pc.ram=1G,vga.vram=16M"
        )
    g.add_argument("--page-size", type=parse_size, default=4096, help="page size of --file or --create (default 4096)")


# ----------------------------------------------------------------------------- configuration


_FIELD_FLAGS = {
    "channels": "--channels",
    "compression": "--compression",
    "compression_level": "--compression-level",
    "zero_page": "--zero-page",
    "zerocopy": "--zerocopy",
    "downtime_limit": "--downtime-limit",
    "max_bandwidth": "--max-bandwidth",
    "max_rounds": "--max-rounds",
    "dirty_tracker": "--dirty-tracker",
    "stall_rounds": "--stall-rounds",
    "stall_downtime_limit": "--stall-downtime-limit",
    "channel_retries": "--channel-retries",
    "start_method": "--start-method",
    "timeout": "--handshake-timeout",
    "auth_key": "--auth-key-file",
    "allow_unauthenticated": "--allow-unauthenticated",
    "tls_hostname": "--tls-hostname",
    "tls": "--tls-cert/--tls-ca",
}


def _flag_words(message: str) -> str:
    """A library message in the command line's words: ``downtime_limit: ...`` → ``--downtime-limit: ...``."""
    def sub(m: re.Match[str]) -> str:
        return _FIELD_FLAGS[m.group(1)]

    names = "|".join(sorted(_FIELD_FLAGS, key=len, reverse=True))
    message = re.sub(r"(?<![\w-])verify=False\b", "--no-verify", message)
    message = re.sub(rf"(?<![\w-])({names})=True\b", sub, message)
    snake = "|".join(n for n in _FIELD_FLAGS if "_" in n)
    message = re.sub(rf"(?<![\w-])({snake})\b", sub, message)
    return re.sub(rf"(?<![\w-])({names})(?=[:=])", sub, message)


def _read_key(path: str) -> bytes:
    from . import auth

    load = getattr(auth, "load_key", None)
    try:
        if load is not None:
            return load(path)
        with open(path, "rb") as f:
            return f.read().strip()
    except OSError as e:
        raise ConfigError(f"--auth-key-file: cannot read {path}: {e.strerror or e}") from None
    except ConfigError as e:
        raise ConfigError(f"--auth-key-file {path}: {e}") from None


def _tls_context(a: argparse.Namespace, *, server: bool) -> ssl.SSLContext | None:
    if server:
        cert, key = getattr(a, "tls_cert", None), getattr(a, "tls_key", None)
        if not (cert or key):
            return None
        if not (cert and key):
            raise ConfigError("--tls-cert and --tls-key: the destination needs both")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"--tls-cert {cert} / --tls-key {key}: cannot load: {getattr(e, 'strerror', None) or e}"
            ) from None
        return ctx
    ca = getattr(a, "tls_ca", None)
    if not (getattr(a, "tls", False) or ca):
        return None
    try:
        return ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--tls-ca {ca}: cannot load: {getattr(e, 'strerror', None) or e}") from None


def _handshake_timeout(a: argparse.Namespace) -> float:
    old = getattr(a, "old_timeout", None)
    if old is not None:
        print("mpmultifd: --timeout is deprecated: it is the handshake timeout, now --handshake-timeout "
              "(for a limit on the whole migration use --max-time)", file=sys.stderr)
        return old
    return getattr(a, "handshake_timeout", _DEFAULTS.timeout)


def config_from_args(a: argparse.Namespace, *, server: bool = False) -> MigrationConfig:
    """The MigrationConfig a subcommand's parsed flags describe (``server``: the listening side's TLS flags).

    Raises ConfigError in the command line's words (``--downtime-limit: ...``).
    """
    # a region mapped from files is usually written by another program, which marks nothing
    default_tracker = "scan" if getattr(a, "file", None) else "map"
    key = _read_key(a.auth_key_file) if getattr(a, "auth_key_file", None) else None
    get = lambda name: getattr(a, name, getattr(_DEFAULTS, name))  # noqa: E731 - flags a subcommand lacks
    try:
        return MigrationConfig(
            channels=get("channels"),
            compression=get("compression"),
            compression_level=get("compression_level"),
            zero_page=get("zero_page"),
            downtime_limit=get("downtime_limit"),
            max_bandwidth=get("max_bandwidth"),
            max_rounds=get("max_rounds"),
            dirty_tracker=getattr(a, "dirty_tracker", None) or default_tracker,
            stall_rounds=get("stall_rounds"),
            stall_downtime_limit=get("stall_downtime_limit"),
            zerocopy=get("zerocopy"),
            verify=get("verify"),
            channel_retries=get("channel_retries"),
            start_method=get("start_method"),
            timeout=_handshake_timeout(a),
            auth_key=key,
            tls=_tls_context(a, server=server),
            tls_hostname=getattr(a, "tls_hostname", None),
            allow_unauthenticated=getattr(a, "allow_unauthenticated", False),
        )
    except ConfigError as e:
        raise ConfigError(_flag_words(str(e))) from None


_config = config_from_args  # the name it had


def parse_address(text: str) -> Any:
    """``HOST:PORT``, ``[v6]:PORT``, ``unix:/path`` or a path."""
    if text.startswith("unix:") or text.startswith("/"):
        return text
    m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT or unix:/path")
    return (m.group(1), int(m.group(2)))


def _parse_blocks(flag: str, text: str, value: Callable[[str], Any]) -> dict[str, Any]:
    out = {}
    for part in text.split(","):
        name, sep, v = part.partition("=")
        if not sep or not name:
            raise ConfigError(f"{flag}: {part!r} is not NAME=VALUE")
        try:
            out[name] = value(v)
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"{flag}: block {name!r}: {e}") from None
    return out


def _open_region(a: argparse.Namespace) -> GuestRAM:
    """The region named by --region, --file or --create."""
    chosen = [x for x in (a.region, a.file, getattr(a, "create", None)) if x]
    if len(chosen) != 1:
        raise ConfigError("region: give exactly one of --region NAME, --file NAME=PATH[,...]" +
                          (", --create NAME=SIZE[,...]" if hasattr(a, "create") else ""))
    if a.region:
        try:
            return GuestRAM.attach(a.region)
        except FileNotFoundError:
            raise ConfigError(f"--region: no region named {a.region!r} (nothing at /dev/shm/{a.region})") from None
    if a.file:
        blocks = _parse_blocks("--file", a.file, str)
        for name, path in blocks.items():
            if not os.path.exists(path):
                raise ConfigError(f"--file: block {name!r}: no such file {path}")
        return GuestRAM.from_files(blocks, page_size=a.page_size)
    return GuestRAM.create(_parse_blocks("--create", a.create, parse_size), page_size=a.page_size)


def _release_region(ram: GuestRAM) -> None:
    """Close a region opened by --region or --file; a --file layout's meta segment is ours to remove
    (the files themselves are never removed)."""
    ram.close()
    if ram.owner:
        ram.unlink()


# ----------------------------------------------------------------------------- output


_MS_FIELDS = ("total-time", "setup-time", "expected-downtime", "downtime", "expected-remaining")


def seconds_query(q: dict[str, Any]) -> dict[str, Any]:
    """``query()`` for the JSON output: QEMU's millisecond fields in seconds, the config kebab-case."""
    out = dict(q)
    for k in _MS_FIELDS:
        if isinstance(out.get(k), (int, float)) and not isinstance(out.get(k), bool):
            out[k] = out[k] / 1000
    if isinstance(out.get("parameters"), dict):
        params = dict(out["parameters"])
        if isinstance(params.get("downtime-limit"), (int, float)):
            params["downtime-limit"] = params["downtime-limit"] / 1000
        out["parameters"] = params
    if isinstance(out.get("config"), dict):
        out["config"] = {k.replace("_", "-"): v for k, v in out["config"].items()}
    return out


def _emit(a: argparse.Namespace, obj: dict[str, Any]) -> None:
    if a.json:
        print(json.dumps(obj), flush=True)


# ----------------------------------------------------------------------------- signals and deadlines


class _Interrupted(BaseException):
    """A signal arrived while nothing was running that could be cancelled."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Control:
    """SIGINT, SIGTERM and SIGHUP cancel what runs (the migration ends cleanly and --resume-cmd
    runs if the guest was paused); --max-time does the same on a timer."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.max_time_hit = False
        self._jobs: list[Any] = []
        self._previous: dict[int, Any] = {}
        self._lock = threading.Lock()

    def install(self) -> None:
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._on_signal)
        except ValueError:  # not the main thread: leave signals to whoever runs us
            self.uninstall()

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        if not self._jobs:
            raise _Interrupted(signum)
        for job in list(self._jobs):
            job.cancel()

    def _on_deadline(self) -> None:
        with self._lock:
            self.max_time_hit = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()

    @contextlib.contextmanager
    def cancels(self, job: Any, max_time: float | None = None) -> Iterator[None]:
        """Signals (and --max-time) cancel ``job`` while the block runs."""
        self._jobs.append(job)
        timer = None
        if max_time is not None:
            timer = threading.Timer(max_time, self._on_deadline)
            timer.daemon = True
            timer.start()
        try:
            if self.signum is not None:
                job.cancel()  # a signal arrived just before
            yield
        finally:
            if timer is not None:
                timer.cancel()
            self._jobs.remove(job)


_control = _Control()


def _not_completed(a: argparse.Namespace, exc: MigrationError, query: dict[str, Any]) -> int:
    """Report a migration that ended without completing, once; the exit code."""
    q = seconds_query(query)
    if isinstance(exc, MigrationCancelled) and _control.max_time_hit:
        why = f"not finished within --max-time {a.max_time:g}s: cancelled"
        _emit(a, {"event": "result", "status": "failed", "error": why, "query": q})
        print(f"migration failed: {why}", file=sys.stderr)
        return EXIT_MAX_TIME
    if isinstance(exc, MigrationCancelled):
        _emit(a, {"event": "result", "status": "cancelled", "query": q})
        if _control.signum is not None:
            print(f"migration cancelled ({signal.Signals(_control.signum).name})", file=sys.stderr)
            return 128 + _control.signum
        print(f"migration cancelled: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    message = _flag_words(str(exc))
    _emit(a, {"event": "result", "status": "failed", "error": message, "query": q})
    print(f"migration failed: {message}", file=sys.stderr)
    return EXIT_FAILED


def _guest_cmd(cmd: str | None, flag: str, timeout: float | None = None) -> Callable[[], None] | None:
    """A --pause-cmd / --resume-cmd as a callback: a failure or an overrun is a MigrationError naming the flag."""
    if not cmd:
        return None

    def run() -> None:
        # a session of its own: a terminal's Ctrl-C reaches us, and we decide; an overrun kills the whole group
        proc = subprocess.Popen(cmd, shell=True, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise MigrationError(f"{flag} {cmd!r} still running after {timeout:g}s: killed") from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if rc != 0:
            err = MigrationError(f"{flag} {cmd!r} exited with status {rc}")
            if flag == "--resume-cmd":
                print(f"mpmultifd: {err}", file=sys.stderr)  # the library only logs a failed resume()
            raise err

    return run


def _pause(a: argparse.Namespace) -> Callable[[], None] | None:
    return _guest_cmd(a.pause_cmd, "--pause-cmd", a.pause_cmd_timeout)


def _resume(a: argparse.Namespace) -> Callable[[], None] | None:
    return _guest_cmd(a.resume_cmd, "--resume-cmd")


# ----------------------------------------------------------------------------- subcommands


def cmd_recv(a: argparse.Namespace) -> int:
    """Listen and receive one migration into a region."""
    cfg = config_from_args(a, server=True)
    _check_listen(a, cfg)
    with _receiving_region(a) as ram, _destination(ram, a.listen, cfg) as dst, _metrics(a, dst):
        return _await_migration(a, dst, ram, f"receiving into region {ram.name}")


def _check_listen(a: argparse.Namespace, cfg: MigrationConfig) -> None:
    if cfg.auth_key is None and not cfg.allow_unauthenticated and not is_loopback(a.listen):
        raise ConfigError(
            f"--listen {format_address(a.listen)}: refusing to listen beyond loopback without --auth-key-file "
            "(anyone who can reach it could write into the region); give --auth-key-file, listen on 127.0.0.1 "
            "or unix:/path, or pass --allow-unauthenticated"
        )


def _destination(ram: GuestRAM, listen: Any, cfg: MigrationConfig) -> Destination:
    try:
        return Destination(ram, listen, cfg)
    except OSError as e:
        raise ConfigError(f"--listen {format_address(listen)}: {e.strerror or e}") from None


@contextlib.contextmanager
def _receiving_region(a: argparse.Namespace) -> Iterator[GuestRAM]:
    """The region to receive into; closed at the end, and removed unless --keep (or not ours)."""
    ram = _open_region(a)
    try:
        yield ram
    finally:
        ram.close()
        if ram.owner:
            if a.keep:
                ram.keep()  # outlives this process: the resource tracker must not remove it at exit
            else:
                ram.unlink()


def _await_migration(a: argparse.Namespace, dst: Destination, ram: GuestRAM, doing: str) -> int:
    """Say where the destination listens, wait for the migration, report it; the exit code."""
    address = format_address(dst.address)
    # cancellable before anyone is told where to send: a signal right after "listening" cancels
    with _control.cancels(dst, getattr(a, "max_time", None)):
        _emit(a, {"event": "listening", "address": address, "region": ram.name})
        if not a.json:
            print(f"listening on {address}; {doing}", flush=True)
        try:
            res = dst.wait()
        except MigrationError as e:
            return _not_completed(a, e, dst.query())
    _emit(a, {"event": "result", **res.to_dict(), "region": ram.name})
    if not a.json:
        print(f"received region {ram.name} ({_fmt_bytes(res.total)}, {_fmt_bytes(res.transferred)} on the wire) "
              f"in {res.total_time:.3f} s, verified: {res.verified}")
    return 0


def cmd_send(a: argparse.Namespace) -> int:
    """Migrate a named region or /dev/shm file to a listening destination."""
    with _cli_source(a) as src:
        try:
            res = _with_progress(a, src, lambda: src.migrate(a.address, pause=_pause(a), resume=_resume(a)))
        except MigrationError as e:
            return _not_completed(a, e, src.query())
        _emit(a, {"event": "result", **res.to_dict(), "query": seconds_query(src.query())})
        if not a.json:
            print(
                f"migrated {_fmt_bytes(res.total)} in {res.total_time:.3f} s over {res.rounds} rounds, "
                f"downtime {res.downtime * 1000:.1f} ms, verified: {res.verified}"
            )
        return 0


@contextlib.contextmanager
def _cli_source(a: argparse.Namespace) -> Iterator[Source]:
    """A Source over the region --region/--file names; --json prints its events; signals and --max-time cancel."""
    cfg = config_from_args(a)
    ram = _open_region(a)
    # with --json, every status change and round is a line of its own as it happens
    on_event = (lambda ev: print(json.dumps(ev), flush=True)) if a.json else None
    try:
        with Source(ram, cfg, on_event=on_event) as src, _control.cancels(src, getattr(a, "max_time", None)), \
                _metrics(a, src):
            yield src
    finally:
        _release_region(ram)


def _with_progress(a: argparse.Namespace, src: Source, run: Callable[[], Any]) -> Any:
    """``run()`` under the progress display (--progress, or by default when stderr is a terminal)."""
    show = a.progress if a.progress is not None else sys.stderr.isatty()
    with ProgressDisplay(src.query, sys.stderr) if show else contextlib.nullcontext():
        return run()


def cmd_save(a: argparse.Namespace) -> int:
    """Save a region (live) to a file; the file is marked complete only once it is whole and synced."""
    with _cli_source(a) as src:
        try:
            res = _with_progress(a, src, lambda: src.save(a.path, pause=_pause(a), resume=_resume(a), direct=a.direct))
        except MigrationError as e:
            return _not_completed(a, e, src.query())
        _emit(a, {"event": "result", **res.to_dict()})
        if not a.json:
            print(
                f"saved {_fmt_bytes(res.total)} to {res.path} in {res.total_time:.3f} s over {res.rounds} rounds "
                f"({res.present_pages} pages with data, {_fmt_bytes(res.allocated)} on disk), "
                f"downtime {res.downtime * 1000:.1f} ms, save id {res.save_id}",
                flush=True,
            )
        if a.top_up_to is None:
            return 0
        # the guest runs on; once a destination restored from the file listens, send what changed since
        if not a.json:
            print(f"waiting up to {a.top_up_wait:g} s for {format_address(a.top_up_to)} to listen for the top-up",
                  flush=True)
        deadline = time.monotonic() + a.top_up_wait
        while True:
            try:
                mig = src.migrate(a.top_up_to, pause=_pause(a), resume=_resume(a), top_up=True)
                break
            except MigrationError as e:
                # nobody listens there yet: refused, or no Unix socket file so far
                refused = isinstance(e.__cause__, (ConnectionRefusedError, FileNotFoundError))
                if not refused or time.monotonic() > deadline:
                    return _not_completed(a, e, src.query())
                time.sleep(0.2)
        _emit(a, {"event": "result", **mig.to_dict()})
        if not a.json:
            print(f"topped up: {_fmt_bytes(mig.transferred)} sent in {mig.total_time:.3f} s, verified: {mig.verified}")
        return 0


def cmd_restore(a: argparse.Namespace) -> int:
    """Restore a region from a save file; with --top-up, then receive the changes since the save."""
    if not os.path.exists(a.path):
        raise ConfigError(f"restore: no such save file {a.path}")
    cfg = config_from_args(a, server=True)
    if a.top_up:
        _check_listen(a, cfg)
    with _receiving_region(a) as ram, _destination(ram, a.listen, cfg) as dst:
        res = dst.restore(a.path, verify=a.verify, direct=a.direct)
        _emit(a, {"event": "restored", **res.to_dict(), "region": ram.name})
        if not a.json:
            print(
                f"restored {_fmt_bytes(res.total)} from {res.path} in {res.total_time:.3f} s "
                f"({res.present_pages} pages with data), verified: {res.verified}; region {ram.name}",
                flush=True,
            )
        if not a.top_up:
            return 0
        return _await_migration(a, dst, ram, f"waiting for a top-up of save {res.save_id}")


def cmd_check(a: argparse.Namespace) -> int:
    """Validate a configuration against this kernel and its limits; explain conflicts and fallbacks."""
    findings = check_configuration(a)
    errors = [f for f in findings if f["status"] == "error"]
    if a.json:
        print(json.dumps({"ok": not errors, "findings": findings}, indent=2))
    else:
        for f in findings:
            line = f"[{f['status']:>5}] {f['item']}: {f['detail']}"
            if f.get("fallback"):
                line += f" -> {f['fallback']}"
            print(line)
        print("configuration OK" if not errors else f"{len(errors)} conflict(s)")
    return 1 if errors else 0


def check_configuration(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Findings (item, status ok|warn|error, detail, fallback) for the parameters in ``a``."""
    out: list[dict[str, Any]] = []

    def add(item: str, status: str, detail: str, fallback: str | None = None) -> None:
        out.append({"item": item, "status": status, "detail": detail, "fallback": fallback})

    try:
        config_from_args(a, server=bool(a.tls_cert or a.tls_key))
        add("configuration", "ok", "every parameter is valid and the combination is allowed")
    except (ConfigError, OSError, ssl.SSLError) as e:
        add("configuration", "error", str(e))
    try:
        get_method(a.compression)(a.compression_level, {})
        add("compression", "ok", f"method {a.compression!r} available here; methods: {', '.join(available_methods())}")
    except ConfigError as e:
        add("compression", "error", str(e))
    ncpu = os.cpu_count() or 1
    if a.channels * 2 > ncpu * 2:
        add("channels", "warn", f"{a.channels} channels on {ncpu} CPUs: each channel is a worker process per side",
            f"expect little gain beyond {ncpu} channels on this machine")
    else:
        add("channels", "ok", f"{a.channels} channels on {ncpu} CPUs")
    # zero-copy: kernel support, limits, and what auto would do
    reason = None
    probe = socket.socket()
    try:
        reason = enable_zerocopy(probe)
    finally:
        probe.close()
    optmem = _read_int("/proc/sys/net/core/optmem_max")
    memlock = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    if a.zerocopy == "off":
        add("zerocopy", "ok", "off: plain sends")
    elif reason:
        status = "error" if a.zerocopy == "on" else "warn"
        add("zerocopy", status, f"MSG_ZEROCOPY unavailable: {reason}", "plain sends")
    else:
        detail = f"SO_ZEROCOPY supported; net.core.optmem_max={optmem}, RLIMIT_MEMLOCK={memlock}"
        if a.compression != "none" or a.tls or a.tls_ca:
            add(
                "zerocopy",
                "error" if a.zerocopy == "on" else "warn",
                detail + "; compression or TLS builds private buffers",
                "plain sends",
            )
        elif a.address is not None and is_loopback(a.address):
            add("zerocopy", "warn", detail + "; the destination is local: the kernel copies every zero-copy send",
                "auto sends plain" if a.zerocopy == "auto" else "zero-copy on, at a cost")
        else:
            fb = "ENOBUFS is handled by draining completions and retrying"
            if optmem is not None and optmem < 65536:
                fb = f"optmem_max {optmem} is small: expect many ENOBUFS retries"
            add("zerocopy", "ok", detail, fb)
    if a.auth_key_file is None and a.address is not None and not is_loopback(a.address):
        add("authentication", "warn", "no --auth-key-file for a non-loopback address",
            "a destination refuses to listen there without a key unless --allow-unauthenticated")
    # shared memory room
    st = os.statvfs("/dev/shm")
    add("/dev/shm", "ok", f"{_fmt_bytes(st.f_bavail * st.f_frsize)} free for regions")
    add("IOV_MAX", "ok", f"1024: one header plus up to 1023 page IOVs per packet; packets carry "
        f"{MigrationConfig().packet_pages} pages by default")
    return out


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def cmd_estimate(a: argparse.Namespace) -> int:
    """Measure a region's dirty rate and forecast whether a migration would converge."""
    cfg = config_from_args(a)
    ram = _open_region(a)
    try:
        with Source(ram, cfg) as src, _control.cancels(src):
            est = src.estimate(a.duration, interval=a.interval, bandwidth=a.bandwidth)
    finally:
        _release_region(ram)
    if a.json:
        print(json.dumps(est.to_dict()))
        return 0
    print(_describe_estimate(est))
    return 0


def _describe_estimate(est: Any) -> str:
    lines = [
        f"dirty rate: {_fmt_bytes(int(est.dirty_rate))}/s of {_fmt_bytes(est.total)} "
        f"(median of {len(est.samples)} samples of {est.interval:g} s, {est.tracker} tracker, "
        f"{est.tracker_seconds:.3f} s spent tracking)"
    ]
    if est.bandwidth:
        verdict = (
            f"converges in {est.rounds} rounds, expected downtime {est.expected_downtime * 1000:.0f} ms"
            if est.converges
            else f"does NOT converge within {est.downtime_limit * 1000:.0f} ms of downtime "
            f"(expected {est.expected_downtime * 1000:.0f} ms after {est.rounds} rounds)"
        )
        lines.append(f"at {_fmt_bytes(int(est.bandwidth))}/s: {verdict}")
    return "\n".join(lines)


def cmd_bench(a: argparse.Namespace) -> int:
    """Measure this machine and recommend channels, method and zero-copy for a region."""
    report = machine_benchmark(a.size, channels=[int(c) for c in a.channels_list.split(",")],
                               content=a.content, start_method=a.start_method)
    if a.json and not (a.region or a.file):
        print(json.dumps(report, indent=2))
    elif not a.json:
        print(f"zero-page detection: {report['zero-detect-GBps']:.1f} GB/s per worker")
        for name, r in report["compressors"].items():
            print(f"{name:>7}: {r['MBps']:.0f} MB/s, ratio {r['ratio']:.2f}")
        for ch, r in report["migrations"].items():
            print(f"{ch} channel(s): {r['GBps']:.2f} GB/s of guest RAM")
        rec = report["recommendation"]
        print(f"recommendation: --channels {rec['channels']} --compression {rec['compression']} "
              f"--zerocopy {rec['zerocopy']}  ({rec['why']})")
    if a.region or a.file:
        # the guest's dirty rate against the best rate measured above
        link = max(r["GBps"] for r in report["migrations"].values()) * 1e9
        cfg = MigrationConfig(dirty_tracker=a.dirty_tracker or ("scan" if a.file else "map"))
        ram = _open_region(a)
        try:
            with Source(ram, cfg) as src:
                est = src.estimate(a.duration, interval=a.interval, bandwidth=link)
        finally:
            _release_region(ram)
        report["dirty-rate"] = est.to_dict()
        if a.json:
            print(json.dumps(report, indent=2))
        else:
            print(_describe_estimate(est))
    return 0


def machine_benchmark(size: int, *, channels: list[int], content: str, start_method: str) -> dict[str, Any]:
    """Zero-page scan speed, compressor speed and ratio, and loopback migrations with each channel count."""
    import time

    import lz4.block
    import zstandard

    from .zeropage import nonzero_pages

    report: dict[str, Any] = {"size": size, "content": content}
    with GuestRAM.create({"a": size}) as src:
        fill(src, content, seed=5)
        words = src.pages(0).view(np.uint64)
        t0 = time.perf_counter()
        for first in range(0, len(words), 128):
            nonzero_pages(words, np.arange(first, min(first + 128, len(words))))
        report["zero-detect-GBps"] = size / (time.perf_counter() - t0) / 1e9
        sample = src.view(0)[: min(size, 32 << 20)].data.cast("B")
        comps: dict[str, Any] = {}
        for name, fn in (
            ("lz4", lambda b: lz4.block.compress(b, store_size=False)),
            ("zstd-1", zstandard.ZstdCompressor(level=1).compress),
        ):
            fn(sample[: 1 << 19])
            t0 = time.perf_counter()
            out = sum(len(fn(sample[i : i + (1 << 19)])) for i in range(0, len(sample), 1 << 19))
            dt = time.perf_counter() - t0
            comps[name] = {"MBps": len(sample) / dt / 1e6, "ratio": len(sample) / max(out, 1)}
        report["compressors"] = comps
        migs = {}
        for ch in channels:
            cfg = MigrationConfig(channels=ch, start_method=start_method, verify=False)
            with GuestRAM.create({"a": size}) as dst:
                with RemoteDestination(dst.name, cfg, start_method=start_method) as dest, Source(src, cfg) as s:
                    t0 = time.perf_counter()
                    s.migrate(dest.address)
                    dt = time.perf_counter() - t0
                    dest.result()
            migs[str(ch)] = {"GBps": size / dt / 1e9, "seconds": dt}
        report["migrations"] = migs
    best = max(migs, key=lambda k: migs[k]["GBps"])
    link = migs[best]["GBps"] * 1e9
    lz = comps["lz4"]
    pays = lz["MBps"] * 1e6 > link / max(1 - 1 / lz["ratio"], 1e-3)
    report["recommendation"] = {
        "channels": int(best),
        "compression": "lz4" if pays else "none",
        "zerocopy": "auto",
        "why": (
            f"{best} channel(s) moved the most here; lz4 at {lz['MBps']:.0f} MB/s with ratio {lz['ratio']:.2f} "
            + ("beats" if pays else "does not beat")
            + f" sending raw at {link / 1e9:.2f} GB/s; zero-copy only pays on a real NIC (auto decides)"
        ),
    }
    return report


def cmd_demo(a: argparse.Namespace) -> int:
    """Migrate a synthetic two-block guest, dirtied by a writer process, to a destination process."""
    cfg = config_from_args(a)
    main_size = max(a.size * 3 // 4 // 4096 * 4096, 4096)
    vram_size = max((a.size - main_size) // 4096 * 4096, 4096)
    blocks = {"pc.ram": main_size, "vga.vram": vram_size}
    out = print if not a.json else (lambda *x, **k: None)
    with GuestRAM.create(blocks) as src_ram, GuestRAM.create(blocks) as dst_ram:
        sizes = ", ".join(f"{k}={_fmt_bytes(v)}" for k, v in blocks.items())
        out(f"guest: {_fmt_bytes(src_ram.total_size)} in blocks {sizes}")
        fill(src_ram, a.content, seed=1)
        with RemoteDestination(dst_ram.name, cfg, start_method=cfg.start_method) as dest:
            out(f"destination listening on {dest.address[0]}:{dest.address[1]}, in a process of its own")
            with DirtyingWriter(src_ram.name, rate=a.writer_rate, start_method=cfg.start_method) as writer:
                out(
                    f"writer dirtying pages at about {a.writer_rate:g} writes/s; migrating over {cfg.channels} channels"
                )
                with Source(src_ram, cfg) as src, _control.cancels(src, a.max_time):
                    try:
                        result = src.migrate(dest.address, pause=writer.pause)
                    except MigrationError as e:
                        a.json = False  # the report below is the JSON; a failure is one line on stderr
                        return _not_completed(a, e, src.query())
                writes = writer.writes
            dest_result = dest.result()
        identical = all(np.array_equal(src_ram.view(b.name), dst_ram.view(b.name)) for b in src_ram.blocks)
    report = result.to_dict()
    report["writer-writes"] = writes
    report["byte-identical"] = identical
    report["destination-valid"] = dest.valid
    report["destination-verified"] = dest_result.verified
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"status:        {result.status}")
        print(f"rounds:        {result.rounds} (converged: {result.converged})")
        print(f"total time:    {result.total_time:.3f} s (setup {result.setup_time * 1000:.1f} ms)")
        print(f"downtime:      {result.downtime * 1000:.1f} ms (limit {cfg.downtime_limit * 1000:.0f} ms)")
        print(f"throughput:    {result.throughput / 1e9:.2f} GB/s of guest RAM")
        print(f"pages:         {result.normal} sent with data, {result.duplicate} zero pages")
        print(f"on the wire:   {_fmt_bytes(result.transferred)}")
        print(f"writer:        {writes} writes during the migration")
        print(f"verified:      {result.verified} (fingerprints of every page compared by the destination)")
        print(f"byte-identical: {identical} (whole region compared after the migration)")
    return 0 if identical and result.status == "completed" else 1


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_EPILOG = (
    "Durations: 300ms, 0.3s, 5m, 1h (a bare number is seconds). Sizes: 4096, 512M, 1G (powers of 1024). "
    "Rates: 100M/s. JSON output: times in seconds, kebab-case keys. Exit codes: 0 done, 1 failed, "
    "2 bad command line, 124 --max-time passed, 128+N cancelled by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP)."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpmultifd", description="Live-migrate shared-memory regions over parallel channels.", epilog=_EPILOG
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log at INFO (-v) or DEBUG (-vv) to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description or help, epilog=_EPILOG)

    d = command("demo", "migrate a synthetic guest with a live writer on this machine")
    d.add_argument("--size", type=parse_size, default=parse_size("256M"), help="guest size (default 256M)")
    d.add_argument("--content", choices=CONTENTS, default="mixed", help="initial guest content (default mixed)")
    d.add_argument("--writer-rate", type=float, default=5000.0, help="writes per second (default 5000)")
    d.add_argument("--json", action="store_true", help="print the result as JSON")
    _deadline_arg(d)
    _tuning_args(d)
    d.set_defaults(func=cmd_demo)

    r = command("recv", "listen and receive one migration into a region")
    r.add_argument("--listen", type=parse_address, default=("127.0.0.1", 4444),
                   help="HOST:PORT or unix:/path (default 127.0.0.1:4444)")
    _region_args(r, create=True)
    r.add_argument("--keep", action="store_true", help="leave the region in /dev/shm after exit (for --create)")
    r.add_argument("--json", action="store_true", help="one JSON object per line: listening, then the result")
    _deadline_arg(r)
    _metrics_args(r)
    g = r.add_argument_group("receiving")
    g.add_argument("--channels", type=int, default=_DEFAULTS.channels,
                   help="worker processes to expect (the source's --channels decides; default "
                        f"{_DEFAULTS.channels})")
    _start_method_arg(g)
    _connection_args(r, server=True, client=False)
    r.set_defaults(func=cmd_recv)

    s = command("send", "migrate a named region or /dev/shm file to HOST:PORT")
    s.add_argument("address", type=parse_address, help="HOST:PORT or unix:/path of a listening destination")
    _region_args(s, create=False)
    _guest_cmd_args(s, pause_help="shell command that stops the guest at switchover",
                    resume_help="shell command that restarts it if the migration fails or is cancelled after the pause")
    _progress_args(s)
    s.add_argument("--json", action="store_true", help="one JSON line per event, then the result with the final query")
    _deadline_arg(s)
    _metrics_args(s)
    _tuning_args(s)
    _connection_args(s, server=False, client=True)
    s.set_defaults(func=cmd_send)

    sv = command("save", "save a named region or /dev/shm file to a file, live")
    sv.add_argument("path", help="the save file to write (replaced if it exists)")
    _region_args(sv, create=False)
    _guest_cmd_args(sv, pause_help="shell command that stops the guest for the final round",
                    resume_help="shell command that restarts it once the file holds the paused state, or on failure")
    sv.add_argument("--direct", action="store_true", help="write with O_DIRECT (not on tmpfs)")
    sv.add_argument("--top-up-to", type=parse_address, default=None, metavar="ADDRESS",
                    help="after saving, migrate the changes since the save to a destination restored from the file "
                         "(mpmultifd restore FILE --top-up --listen ADDRESS)")
    sv.add_argument("--top-up-wait", type=parse_duration, default=300.0, metavar="TIME",
                    help="how long to wait for that destination to listen (default 300s)")
    _progress_args(sv)
    sv.add_argument("--json", action="store_true", help="print events and the result as JSON lines")
    _deadline_arg(sv)
    _metrics_args(sv)
    _tuning_args(sv)
    _connection_args(sv, server=False, client=True)
    sv.set_defaults(func=cmd_save)

    rs = command("restore", "restore a region from a save file (then optionally receive a top-up)")
    rs.add_argument("path", help="a complete save file")
    _region_args(rs, create=True)
    rs.add_argument("--top-up", action="store_true",
                    help="after restoring, listen and receive the changes since the save "
                         "(from the source's save --top-up-to ADDRESS)")
    rs.add_argument("--listen", type=parse_address, default=("127.0.0.1", 0),
                    help="HOST:PORT or unix:/path for --top-up (default 127.0.0.1, any free port)")
    rs.add_argument("--direct", action="store_true", help="read with O_DIRECT")
    rs.add_argument("--no-verify-pages", dest="verify", action="store_false",
                    help="skip checking every page against the save's digests")
    rs.add_argument("--keep", action="store_true", help="leave the region in /dev/shm after exit (for --create)")
    rs.add_argument("--json", action="store_true", help="one JSON object per line")
    _deadline_arg(rs)
    g = rs.add_argument_group("restoring")
    g.add_argument("--channels", type=int, default=_DEFAULTS.channels,
                   help=f"reader worker processes (default {_DEFAULTS.channels})")
    _start_method_arg(g)
    _connection_args(rs, server=True, client=False)
    rs.set_defaults(func=cmd_restore)

    c = command("check", "validate a configuration against this kernel and its limits")
    c.add_argument("--address", type=parse_address, default=None, help="where the migration would go")
    c.add_argument("--json", action="store_true", help="print the findings as JSON")
    _tuning_args(c)
    _connection_args(c, server=True, client=True)
    c.set_defaults(func=cmd_check)

    b = command("bench", "measure this machine and recommend channels, method and zero-copy")
    b.add_argument("--size", type=parse_size, default=parse_size("256M"), help="region size to migrate (default 256M)")
    b.add_argument("--content", choices=CONTENTS, default="mixed", help="region content (default mixed)")
    b.add_argument("--channels-list", default="1,2,4", help="channel counts to try (default 1,2,4)")
    _start_method_arg(b)
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    g = b.add_argument_group("a guest's dirty rate (optional): forecast convergence at the measured bandwidth")
    g.add_argument("--region", default=None, metavar="NAME", help="name of a GuestRAM region")
    g.add_argument("--file", default=None, metavar="NAME=PATH,..", help="existing files, e.g. a QEMU guest's RAM file")
    g.add_argument("--page-size", type=parse_size, default=4096, help="page size of --file (default 4096)")
    g.add_argument("--dirty-tracker", choices=DIRTY_TRACKERS, default=None, help="default map, scan for --file")
    g.add_argument("--duration", type=parse_duration, default=2.0, metavar="TIME", help="time to sample (default 2s)")
    g.add_argument(
        "--interval", type=parse_duration, default=0.5, metavar="TIME", help="time per sample (default 0.5s)"
    )
    b.set_defaults(func=cmd_bench)

    e = command("estimate", "measure a region's dirty rate and forecast convergence")
    _region_args(e, create=False)
    e.add_argument("--duration", type=parse_duration, default=2.0, metavar="TIME", help="time to sample (default 2s)")
    e.add_argument(
        "--interval", type=parse_duration, default=0.5, metavar="TIME", help="time per sample (default 0.5s)"
    )
    e.add_argument("--bandwidth", type=parse_rate, default=None, metavar="RATE",
                   help="rate to forecast against, e.g. 1G/s (default: no forecast)")
    e.add_argument("--json", action="store_true", help="print the estimate as JSON")
    g = e.add_argument_group("forecast")
    g.add_argument("--dirty-tracker", choices=DIRTY_TRACKERS, default=None, help="default map, scan for --file")
    g.add_argument("--downtime-limit", type=_downtime, default=_DEFAULTS.downtime_limit, metavar="TIME",
                   help="the downtime the forecast aims at (default 300ms)")
    g.add_argument("--max-rounds", type=int, default=_DEFAULTS.max_rounds,
                   help=f"rounds the forecast allows (default {_DEFAULTS.max_rounds})")
    e.set_defaults(func=cmd_estimate)

    # vm-send / vm-recv: a QEMU VM handover
    def vm_args(p: argparse.ArgumentParser) -> None:
        _tuning_args(p)
        _connection_args(p, server=True, client=True)

    add_vm_commands(sub, vm_args, parse_address, config_from_args)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose > 1 else logging.INFO, format="%(asctime)s %(name)s %(message)s"
        )
    global _control
    _control = _Control()
    _control.install()
    try:
        return int(args.func(args))
    except _Interrupted as e:
        print(f"mpmultifd: interrupted ({signal.Signals(e.signum).name})", file=sys.stderr)
        return 128 + e.signum
    except MigrationError as e:
        print(f"mpmultifd: {_flag_words(str(e))}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"mpmultifd: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        _control.uninstall()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
