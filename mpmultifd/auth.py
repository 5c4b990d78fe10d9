"""Connection admission: the greeting, the proof of the shared key, and the welcome (pure codec).

Every connection, control and data, opens the same way::

    destination → source   GREETING  magic "MPMG", version, flags (bit 0: a key is required), 32-byte nonce
    source → destination   HELLO     (wire.Hello, 32 bytes; flag bit 0 set when a proof follows)
                           [client nonce (32) + proof (32)]   only with a key
    destination → source   WELCOME   magic "MPMW" + the destination's proof (32 bytes, zeros without a key)
                        or REFUSED   magic "MPMR" + reason code (u32) + 28 zero bytes, then the connection closes

The client proof is HMAC-SHA256 over the destination's fresh nonce, the
client's nonce and the 32 hello bytes, which carry the session id, the
connection kind, the channel index and the channel count: a proof is bound to
one session and one channel, and a replayed hello fails because the
destination's nonce is new on every connection. The destination's proof (with
the nonces swapped and a different label) lets the source check it is talking
to a holder of the key too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
import warnings
from dataclasses import dataclass

from .errors import AuthenticationError, ConfigError, KeyFileWarning, RemoteProtocolError

__all__ = [
    "load_key",
    "MIN_KEY_SIZE",
    "GREETING_SIZE",
    "WELCOME_SIZE",
    "NONCE_SIZE",
    "PROOF_SIZE",
    "FLAG_AUTH",
    "Greeting",
    "encode_greeting",
    "decode_greeting",
    "new_nonce",
    "client_proof",
    "server_proof",
    "check_client_proof",
    "encode_welcome",
    "encode_refused",
    "decode_welcome",
    "REFUSE_BAD_PROOF",
    "REFUSE_HELLO",
    "REFUSE_KEY_REQUIRED",
    "REFUSE_NO_KEY_HERE",
    "REFUSE_PEER_USER",
]

GREETING_MAGIC = 0x4D504D47  # "MPMG"
WELCOME_MAGIC = 0x4D504D57  # "MPMW"
REFUSED_MAGIC = 0x4D504D52  # "MPMR"
VERSION = 1
NONCE_SIZE = 32
PROOF_SIZE = 32
FLAG_AUTH = 0x0001

_GREETING = struct.Struct(">IHH32s")
GREETING_SIZE = _GREETING.size  # 40
_WELCOME = struct.Struct(">I32s")
WELCOME_SIZE = _WELCOME.size  # 36

REFUSE_BAD_PROOF = 1
REFUSE_HELLO = 2
REFUSE_KEY_REQUIRED = 3
REFUSE_NO_KEY_HERE = 4
REFUSE_PEER_USER = 5
_REASONS = {
    REFUSE_BAD_PROOF: "the proof of the key is wrong (the two ends have different keys)",
    REFUSE_HELLO: "the hello was not accepted (wrong session, channel, or a channel already connected)",
    REFUSE_KEY_REQUIRED: "the destination requires an auth key and none was presented",
    REFUSE_NO_KEY_HERE: "a proof was presented but the destination has no key",
    REFUSE_PEER_USER: (
        "without a key, this destination admits only local processes of its own user "
        "(set an auth_key on both ends)"
    ),
}

MIN_KEY_SIZE = 16
MAX_KEY_FILE = 1 << 16

_CLIENT_LABEL = b"mpmultifd/1 client proof"
_SERVER_LABEL = b"mpmultifd/1 server proof"


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read a shared key file for ``MigrationConfig(auth_key=...)``: every byte exactly as stored.

    Nothing is stripped (a random key may begin or end with whitespace bytes,
    and both ends must use the same bytes), so write the file without a
    trailing newline: ``head -c 32 /dev/urandom > key``. A key shorter than
    16 bytes, an empty or oversized file, or a path that is not a regular file
    is :class:`ConfigError`. A file that group or others can read gives a
    :class:`KeyFileWarning` (``chmod 600`` it): whoever reads the key can
    join or impersonate either end.
    """
    where = os.fspath(path)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"auth key file {where!r}: cannot open it: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"auth key file {where!r}: not a regular file")
        if st.st_size > MAX_KEY_FILE:
            raise ConfigError(f"auth key file {where!r}: {st.st_size} bytes is not a key (at most {MAX_KEY_FILE})")
        chunks = []
        while True:
            chunk = os.read(fd, MAX_KEY_FILE + 1)
            if not chunk:
                break
            chunks.append(chunk)
            if sum(map(len, chunks)) > MAX_KEY_FILE:
                raise ConfigError(f"auth key file {where!r}: more than {MAX_KEY_FILE} bytes is not a key")
        key = b"".join(chunks)
    finally:
        os.close(fd)
    if len(key) < MIN_KEY_SIZE:
        raise ConfigError(
            f"auth key file {where!r}: {len(key)} bytes is too short; use at least {MIN_KEY_SIZE} random bytes "
            "(every byte of the file is the key, a newline included)"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        warnings.warn(
            KeyFileWarning(
                f"auth key file {where!r} has mode {mode:04o}: users other than its owner can read the key "
                "and join or impersonate a migration; chmod 600 it"
            ),
            stacklevel=2,
        )
    return key


@dataclass(frozen=True)
class Greeting:
    auth_required: bool
    nonce: bytes


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def encode_greeting(g: Greeting) -> bytes:
    return _GREETING.pack(GREETING_MAGIC, VERSION, FLAG_AUTH if g.auth_required else 0, g.nonce)


def decode_greeting(data: bytes | bytearray | memoryview) -> Greeting:
    if len(data) != GREETING_SIZE:
        raise RemoteProtocolError(f"greeting: expected {GREETING_SIZE} bytes, got {len(data)}", field="greeting")
    magic, version, flags, nonce = _GREETING.unpack(data)
    if magic != GREETING_MAGIC:
        raise RemoteProtocolError(
            f"magic: 0x{magic:08x} is not an mpmultifd destination's greeting", field="magic"
        )
    if version != VERSION:
        raise RemoteProtocolError(f"version: greeting version {version} is not supported", field="version")
    if flags & ~FLAG_AUTH:
        raise RemoteProtocolError(f"flags: unknown greeting flags 0x{flags:04x}", field="flags")
    return Greeting(bool(flags & FLAG_AUTH), bytes(nonce))


def _mac(key: bytes, label: bytes, first: bytes, second: bytes, hello: bytes) -> bytes:
    return hmac.new(key, label + first + second + bytes(hello), hashlib.sha256).digest()


def client_proof(key: bytes, server_nonce: bytes, client_nonce: bytes, hello: bytes) -> bytes:
    """What the source sends after its hello to prove it holds ``key``."""
    return _mac(key, _CLIENT_LABEL, server_nonce, client_nonce, hello)


def server_proof(key: bytes, server_nonce: bytes, client_nonce: bytes, hello: bytes) -> bytes:
    """What the destination answers to prove it holds ``key`` too."""
    return _mac(key, _SERVER_LABEL, client_nonce, server_nonce, hello)


def check_client_proof(key: bytes, server_nonce: bytes, client_nonce: bytes, hello: bytes, proof: bytes) -> bool:
    """Constant-time comparison of a presented proof with the expected one."""
    return hmac.compare_digest(client_proof(key, server_nonce, client_nonce, hello), bytes(proof))


def encode_welcome(proof: bytes = bytes(PROOF_SIZE)) -> bytes:
    return _WELCOME.pack(WELCOME_MAGIC, proof)


def encode_refused(reason: int) -> bytes:
    return _WELCOME.pack(REFUSED_MAGIC, struct.pack(">I", reason) + bytes(PROOF_SIZE - 4))


def decode_welcome(data: bytes | bytearray | memoryview) -> bytes:
    """The destination's proof from a WELCOME; a REFUSED becomes :class:`AuthenticationError`."""
    if len(data) != WELCOME_SIZE:
        raise RemoteProtocolError(f"welcome: expected {WELCOME_SIZE} bytes, got {len(data)}", field="welcome")
    magic, body = _WELCOME.unpack(data)
    if magic == REFUSED_MAGIC:
        reason = struct.unpack(">I", body[:4])[0]
        raise AuthenticationError(f"destination refused the connection: {_REASONS.get(reason, f'reason {reason}')}")
    if magic != WELCOME_MAGIC:
        raise RemoteProtocolError(f"magic: 0x{magic:08x} is not a welcome", field="magic")
    return bytes(body)
