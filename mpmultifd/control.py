"""One end of a migration's control connection: its socket, frame decoder, MAC and session rules.

Both coordinators talk over it the same way: frames are read when the socket
is readable (:meth:`ControlConnection.read`, every decrypted byte under
TLS), and every decoded message is checked against the session's table
before anyone sees it (:meth:`ControlConnection.next_message`); every message
sent is noted by the session first (sending COMPLETE, REPAIR, RESULT or
COMMIT moves its phase).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from multiprocessing.connection import wait as mp_wait
from typing import Any, Protocol

from .errors import ChannelBroken
from .transport import read_available
from .wire import ControlDecoder, ControlMac, encode_control

__all__ = ["ControlConnection", "SessionRules"]


class SessionRules(Protocol):
    """What the connection needs of a session (:class:`~mpmultifd.session.SourceSession` or
    :class:`~mpmultifd.session.DestinationSession`)."""

    def receive(self, msg: Any) -> object: ...

    def sending(self, msg: Any) -> None: ...


class ControlConnection:
    """The control socket of one session end; ``peer`` names the other end in errors."""

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        session: SessionRules,
        *,
        decoder: ControlDecoder,
        mac: ControlMac | None = None,
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.session = session
        self.decoder = decoder
        self.mac = mac
        self.bytes_read = 0
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def pending(self) -> bool:
        """Decrypted bytes waiting inside the TLS object (the socket itself does not show them)."""
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0

    def read(self) -> None:
        """Feed the decoder whatever the socket has now."""
        data = read_available(self.sock, self.peer)
        self.bytes_read += len(data)
        self.decoder.feed(data)

    def next_message(self) -> Any | None:
        """The next whole message, checked against the session's rules; None until one is complete."""
        msg = self.decoder.next_message()
        if msg is not None:
            self.session.receive(msg)
        return msg

    def send(self, msg: Any, pump: Callable[[float], Any] | None = None, timeout: float = 60.0) -> None:
        """Send ``msg`` whole. With ``pump``, the socket stays non-blocking and ``pump(0)`` handles
        the coordinator's events while a big message (a VERIFY) fills the buffer; without, it
        blocks for at most ``timeout`` seconds."""
        self.session.sending(msg)
        frame = encode_control(msg, self.mac)
        if pump is None:
            self.sock.setblocking(True)
            self.sock.settimeout(timeout)
            try:
                self.sock.sendall(frame)
            except OSError as e:
                raise ChannelBroken(f"control connection failed: {e}") from e
            finally:
                self.sock.setblocking(False)
            return
        data = memoryview(frame)
        while data:
            try:
                n = self.sock.send(data)
                data = data[n:]
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                mp_wait([self.sock], 0.1)
                pump(0)
            except OSError as e:
                raise ChannelBroken(f"control connection failed: {e}") from e

    def last_word(self, msg: Any) -> None:
        """Send ``msg`` if it goes within half a second (an ERROR or CANCEL on the way out); never raises."""
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(0.5)
            self.sock.sendall(encode_control(msg, self.mac))
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
