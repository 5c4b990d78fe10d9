"""The source side of admission: connect to a destination and pass its handshake.

A :class:`Connector` opens control, data and stream connections: it dials,
wraps TLS, reads the greeting, sends the hello (with a proof of the key when
there is one), checks the welcome, and, without a key, makes sure pages go
only to a local destination of this user. A destination that drops a
connection before welcoming it (it cuts off the oldest handshakes when
flooded) is tried again until the configured ``timeout`` runs out.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from . import auth
from .config import MigrationConfig
from .errors import (
    AuthenticationError,
    ChannelBroken,
    ChannelClosed,
    MigrationCancelled,
    MigrationError,
)
from .peers import untrusted_peer
from .transport import Address, format_address, is_loopback, parse_address, recv_exact
from .wire import HELLO_FLAG_AUTH, KIND_CONTROL, KIND_STREAM, Hello, encode_hello
from .wire import KIND_DATA as HELLO_DATA

__all__ = [
    "KEYLESS_HINT",
    "Connector",
    "Dial",
    "host_of",
    "keyless_address_check",
    "keyless_peer_check",
    "tls_verifies",
]

log = logging.getLogger("mpmultifd.source")

#: connects to an address within a timeout; the socket comes back in blocking mode
Dial = Callable[[Address, float], socket.socket]

KEYLESS_HINT = (
    "set MigrationConfig(auth_key=...) on both ends, use TLS that checks the destination's certificate, "
    "or opt out with allow_unauthenticated=True"
)


def host_of(address: Any) -> str | None:
    """The host of a TCP address (for TLS's server name), None for a Unix socket."""
    return address[0] if isinstance(address, tuple) else None


def tls_verifies(ctx: Any) -> bool:
    """A TLS context that checks the destination's certificate authenticates it without a key."""
    return ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED


def keyless_address_check(address: Address, what: str) -> None:
    """Without a key, pages go only to this host: a literal non-loopback IP is refused before connecting."""
    family, addr = parse_address(address)
    if family == socket.AF_UNIX or is_loopback(address):
        return
    try:
        ipaddress.ip_address(addr[0].split("%", 1)[0])
    except ValueError:
        return  # a host name: the address it resolves to is checked once connected
    raise AuthenticationError(
        f"{what}: refusing to send pages without a key to {format_address(address)}, a destination that "
        f"cannot be authenticated; {KEYLESS_HINT}"
    )


def keyless_peer_check(sock: socket.socket, address: Address, what: str) -> None:
    """Without a key, the destination must be on this host (loopback or a Unix socket) and run as our user."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = sock.getpeername()[0]
        ip: Any = ipaddress.ip_address(host.split("%", 1)[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if not ip.is_loopback:
            raise AuthenticationError(
                f"{what}: refusing to send pages without a key to {format_address(address)} ({host}), "
                f"a destination that cannot be authenticated; {KEYLESS_HINT}"
            )
    stranger = untrusted_peer(sock)
    if stranger is not None:
        raise AuthenticationError(
            f"{what}: the destination at {format_address(address)} is not run by this user "
            f"(uid {os.geteuid()}): {stranger}; without a key, pages go only to a local destination of "
            f"the same user; {KEYLESS_HINT}"
        )


class _AdmissionDropped(Exception):
    """The destination closed a connection before welcoming it: worth another try (``error`` if not)."""

    def __init__(self, error: MigrationError) -> None:
        super().__init__(str(error))
        self.error = error


class Connector:
    """Opens admitted connections to a destination for one :class:`~mpmultifd.Source`.

    ``config`` is the configuration, or a function returning the current one
    (read at every connection). ``dial(address, timeout)`` makes the raw
    connection (:func:`mpmultifd.transport.connect`). ``check_cancel()``
    raises :class:`MigrationCancelled` once a cancel was asked for; it is
    called between the steps of a handshake and between retries.
    """

    def __init__(
        self,
        config: MigrationConfig | Callable[[], MigrationConfig],
        dial: Dial,
        check_cancel: Callable[[], None],
    ) -> None:
        self._config = config
        self._dial = dial
        self._check_cancel = check_cancel
        self._opening: socket.socket | None = None  # a connection in its handshake

    @property
    def config(self) -> MigrationConfig:
        c = self._config
        return c if isinstance(c, MigrationConfig) else c()

    def abort(self) -> None:
        """Wake a handshake blocked in ``recv`` (from any thread); the open then ends with the cancel."""
        opening = self._opening
        if opening is not None:
            try:
                opening.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def open(self, address: Address, hello: Hello) -> socket.socket:
        """Connect and pass admission; a destination that drops the connection before its welcome
        (it cuts off the oldest handshakes when flooded) is tried again until ``timeout`` runs out."""
        deadline = time.monotonic() + self.config.timeout
        delay = 0.02
        while True:
            try:
                return self.open_once(address, hello)
            except _AdmissionDropped as e:
                if time.monotonic() + delay >= deadline:
                    raise e.error from e.error.__cause__
                log.info("%s; trying again", e.error)
                time.sleep(delay)
                self._check_cancel()
                delay = min(2 * delay, 0.5)

    def open_once(self, address: Address, hello: Hello) -> socket.socket:
        """Connect and pass admission once: greeting, hello (with a proof of the key), welcome.

        Raises the private ``_AdmissionDropped`` when the destination dropped
        the connection before its welcome (:meth:`open` tries again then).
        """
        cfg = self.config
        key = cfg.auth_key
        what = {KIND_CONTROL: "control connection", KIND_STREAM: "stream connection"}.get(
            hello.kind, f"data channel {hello.channel}"
        )
        vouch = key is None and not cfg.allow_unauthenticated and not tls_verifies(cfg.tls)
        if vouch:
            keyless_address_check(address, what)  # before connecting: a remote address is refused outright
        sock = self._dial(address, cfg.timeout)
        self._opening = sock
        try:
            self._check_cancel()
            sock.settimeout(cfg.timeout)
            if cfg.tls is not None:
                sock = cfg.tls.wrap_socket(sock, server_hostname=cfg.tls_hostname or host_of(address))
            try:
                greeting = auth.decode_greeting(recv_exact(sock, auth.GREETING_SIZE))
            except ChannelClosed:
                raise _AdmissionDropped(
                    ChannelClosed(f"{what}: the destination closed the connection before greeting")
                ) from None
            if vouch:
                keyless_peer_check(sock, address, what)  # nothing but the connection itself sent yet
            if greeting.auth_required and key is None:
                raise AuthenticationError(
                    f"{what}: the destination requires an auth key; set MigrationConfig(auth_key=...)"
                )
            if key is not None and not greeting.auth_required:
                raise AuthenticationError(
                    f"{what}: the destination does not authenticate connections; refusing to send pages "
                    "to a peer that cannot prove it holds the key"
                )
            if key is None:
                hello_bytes = encode_hello(hello)
                sock.sendall(hello_bytes)
            else:
                hello_bytes = encode_hello(replace(hello, flags=HELLO_FLAG_AUTH))
                nonce = auth.new_nonce()
                sock.sendall(hello_bytes + nonce + auth.client_proof(key, greeting.nonce, nonce, hello_bytes))
            try:
                proof = auth.decode_welcome(recv_exact(sock, auth.WELCOME_SIZE))
            except ChannelClosed:
                raise _AdmissionDropped(
                    ChannelClosed(f"{what}: the destination closed the connection after our hello")
                ) from None
            if key is not None and not hmac.compare_digest(
                proof, auth.server_proof(key, greeting.nonce, nonce, hello_bytes)
            ):
                raise AuthenticationError(f"{what}: the destination failed to prove it holds the key")
            sock.settimeout(None)
            self._check_cancel()
            return sock
        except AuthenticationError as e:
            sock.close()
            if e.channel is None and hello.kind == HELLO_DATA:
                e.channel = hello.channel
            raise
        except _AdmissionDropped:
            sock.close()
            self._check_cancel()
            raise
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError) as e:
            # the destination dropped us during admission (a flood made it cut off the oldest attempts)
            sock.close()
            self._check_cancel()
            err = ChannelBroken(f"{what}: the destination dropped the connection during admission: {e}")
            err.__cause__ = e
            raise _AdmissionDropped(err) from e
        except ssl.SSLError as e:
            sock.close()
            raise AuthenticationError(f"{what}: TLS handshake failed: {e}") from e
        except OSError as e:
            sock.close()
            self._check_cancel()
            raise ChannelBroken(f"{what}: {e}") from e
        except BaseException as e:
            sock.close()
            if not isinstance(e, MigrationCancelled):
                self._check_cancel()  # a cancel that broke the handshake wins over what it broke
            raise
        finally:
            self._opening = None
