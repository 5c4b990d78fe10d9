"""The destination's accepting side: the listening socket, admission handshakes, admitted connections.

A :class:`Listener` binds the address a :class:`~mpmultifd.Destination`
listens on, accepts connections in one thread and admits each in a thread of
its own (TLS, greeting, hello, proof of the key, welcome). Admitted
connections wait in :attr:`Listener.incoming` as ``("hello", sock, hello)``
until the destination claims them. A connection that fails admission is
logged (rate-limited) and dropped without touching the session.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait as mp_wait
from typing import Any

from . import auth
from .admission import DropLog, PendingHandshakes
from .config import MigrationConfig
from .errors import AuthenticationError, ChannelBroken, ConfigError, MigrationError
from .peers import untrusted_peer
from .transport import Address, format_address, is_loopback, recv_exact, tune_accepted
from .transport import listen as tcp_listen
from .wire import HELLO_FLAG_AUTH, HELLO_SIZE, Hello, decode_hello

__all__ = ["MAX_PENDING_HANDSHAKES", "MAX_PENDING_PER_PEER", "Incoming", "Listener"]

log = logging.getLogger("mpmultifd.destination")

MAX_PENDING_HANDSHAKES = 64
MAX_PENDING_PER_PEER = 16

#: an admitted connection: ("hello", the socket, its hello)
Incoming = tuple[str, socket.socket, Hello]


class Listener:
    """Listens at ``listen`` and admits connections under ``config``; ``wake()`` is called after each admission.

    Without an auth key (and without ``allow_unauthenticated``) only a
    loopback address or a Unix socket may be listened on (ConfigError
    otherwise, before anything is bound). :meth:`start` runs the accept
    thread; :meth:`stop` stops accepting (it also closes connections admitted
    but never claimed); :meth:`close` also removes a Unix socket's path and
    waits for the accept thread.
    """

    def __init__(self, listen: Address, config: MigrationConfig, wake: Callable[[], None]) -> None:
        self.config = config
        self._wake = wake
        key_ok = config.auth_key is not None or config.allow_unauthenticated
        if not key_ok and not is_loopback(listen):
            raise ConfigError(
                f"listen: refusing to listen on {format_address(listen)} without an auth_key: anyone who can "
                "reach it could write into this region. Set MigrationConfig(auth_key=...), listen on a "
                "loopback address or a Unix socket, or opt out with allow_unauthenticated=True"
            )
        self._lsock = tcp_listen(listen)
        self.address: Any
        if self._lsock.family == socket.AF_UNIX:
            self.unix_path: str | None = self._lsock.getsockname()
            self.address = f"unix:{self.unix_path}"
        else:
            self.unix_path = None
            self.address = self._lsock.getsockname()[:2]
        self.incoming: queue.Queue[Incoming] = queue.Queue()
        # handshakes in progress: one deadline for each whole handshake, and limits per peer address
        # and in total that cut off the oldest attempt instead of refusing a newcomer
        total = max(MAX_PENDING_HANDSHAKES, 2 * config.channels + 8)
        self.pending = PendingHandshakes(
            total=total,
            per_peer=min(total, max(MAX_PENDING_PER_PEER, 2 * config.channels)),
            timeout=config.timeout,
        )
        self.drops = DropLog(log)
        self.rejected = 0  # connections that failed admission
        self.auth_failures = 0  # of those, how many for want of the key (or of the right user)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="mpmultifd-accept", daemon=True)

    def start(self) -> None:
        """Start accepting connections."""
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        """Stop accepting: close the listening socket (waking the accept loop at once) and drop what is unclaimed."""
        self._stopped.set()
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop now, not at its next poll
        except OSError:
            pass
        try:
            self._lsock.close()
        except OSError:
            pass
        self.drop_unclaimed()

    def close(self, timeout: float = 2.0) -> None:
        """Stop, remove a Unix socket's path, and wait up to ``timeout`` seconds for the accept thread."""
        self.stop()
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
        if self._thread.ident is not None:
            self._thread.join(timeout)
        self.drop_unclaimed()

    def drop_unclaimed(self) -> None:
        """Close connections admitted but never claimed by a session (it ended, or never began)."""
        while True:
            try:
                _, sock, hello = self.incoming.get_nowait()
            except queue.Empty:
                return
            log.info("closing a connection admitted after the migration ended (channel %d)", hello.channel)
            sock.close()

    # ------------------------------------------------------------------ the threads

    def _accept_loop(self) -> None:
        lsock = self._lsock
        try:
            while not self._stopped.is_set():
                self.pending.expire()  # whole-handshake deadlines
                self.drops.flush()
                try:
                    ready = mp_wait([lsock], 0.2)
                except (OSError, ValueError):
                    return
                if not ready or self._stopped.is_set():
                    continue
                try:
                    sock, peer = lsock.accept()
                except OSError:
                    if self._stopped.is_set():
                        return
                    continue
                token, deadline = self.pending.add(sock, peer)  # may cut off the oldest attempt
                threading.Thread(target=self._handshake, args=(sock, peer, token, deadline), daemon=True).start()
        finally:
            self.pending.cut_all("the migration ended")
            self.drops.flush(force=True)

    def _handshake(self, sock: socket.socket, peer: Any, token: int = -1, deadline: float = float("inf")) -> None:
        """Admit a connection: greeting, hello, proof of the key, welcome.

        A connection that fails is logged and dropped without touching the
        session: a stray or hostile peer cannot disturb a running migration.
        The whole handshake must end by ``deadline`` (the accept loop cuts it
        off then, whatever a trickling peer does).
        """
        key = self.config.auth_key

        def left() -> float:
            t = deadline - time.monotonic()
            if t <= 0:
                raise ChannelBroken(f"its handshake did not finish within {self.config.timeout:g} s")
            return min(t, self.config.timeout)

        try:
            tune_accepted(sock)
            stranger = self._stranger(sock) if key is None else None
            sock.settimeout(left())
            if self.config.tls is not None:
                tls = self.config.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                sock = tls
                self.pending.replace(token, sock)
                tls.do_handshake()
            nonce = auth.new_nonce()
            sock.sendall(auth.encode_greeting(auth.Greeting(key is not None, nonce)))
            sock.settimeout(left())
            hello_bytes = bytes(recv_exact(sock, HELLO_SIZE))
            hello = decode_hello(hello_bytes)
            if hello.flags & HELLO_FLAG_AUTH:
                rest = recv_exact(sock, auth.NONCE_SIZE + auth.PROOF_SIZE)
                client_nonce, proof = bytes(rest[: auth.NONCE_SIZE]), bytes(rest[auth.NONCE_SIZE :])
                if key is None:
                    self._refuse(sock, auth.REFUSE_NO_KEY_HERE)
                    raise AuthenticationError("a proof of a key was presented, but this destination has no key")
                if not auth.check_client_proof(key, nonce, client_nonce, hello_bytes, proof):
                    self._refuse(sock, auth.REFUSE_BAD_PROOF)
                    raise AuthenticationError("wrong proof of the key")
                welcome = auth.encode_welcome(auth.server_proof(key, nonce, client_nonce, hello_bytes))
            else:
                if key is not None:
                    self._refuse(sock, auth.REFUSE_KEY_REQUIRED)
                    raise AuthenticationError("no proof of the key was presented")
                if stranger is not None:
                    self._refuse(sock, auth.REFUSE_PEER_USER)
                    raise AuthenticationError(f"a keyless local peer not of this user: {stranger}")
                welcome = auth.encode_welcome()
            cut = self.pending.leave(token)  # admitted: no longer counted, never cut off from now on
            if cut is not None:
                raise ChannelBroken(cut)
            sock.settimeout(self.config.timeout)
            sock.sendall(welcome)
            sock.settimeout(None)
            self.incoming.put(("hello", sock, hello))
            if self._stopped.is_set():
                self.drop_unclaimed()  # admitted after the session ended: nobody will claim it
                return
            self._wake()
        except (MigrationError, OSError, ValueError) as e:
            cut = self.pending.leave(token)
            if cut is not None:
                kind, detail = ("evicted" if cut.startswith("evicted") else "slow"), cut
            else:
                kind = "unauthenticated" if isinstance(e, AuthenticationError) else "invalid"
                detail = str(e)
            self.drops.drop(kind, peer, detail)
            self.rejected += 1
            if isinstance(e, AuthenticationError):
                self.auth_failures += 1
            sock.close()
        finally:
            self.pending.leave(token)

    def _stranger(self, sock: socket.socket) -> str | None:
        """Without a key, a local peer of another user is not trusted: ``SO_PEERCRED`` on a Unix
        socket, the kernel's socket table on TCP loopback. Returns who it is (or why that is
        unknown, which is refused too), or None for a peer of our own uid (or with
        ``allow_unauthenticated``)."""
        if self.config.allow_unauthenticated:
            return None
        return untrusted_peer(sock)

    @staticmethod
    def _refuse(sock: socket.socket, reason: int) -> None:
        try:
            sock.sendall(auth.encode_refused(reason))
        except OSError:
            pass
