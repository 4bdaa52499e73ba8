"""Who may migrate into this host: the authentication exchange that opens every control channel.

Before the destination reads a HELLO (and so before it builds a VM, allocates memory or starts a
thread for the migration), the source proves it holds the pre-shared key, and the destination
proves it holds it too:

    src -> dst  AUTH_INIT       mode, nonce_s
    dst -> src  AUTH_CHALLENGE  mode, nonce_d, HMAC(key, "vfmig dst" | nonce_s | nonce_d)
    src -> dst  AUTH_RESPONSE   HMAC(key, "vfmig src" | nonce_d | nonce_s)

Both nonces are fresh per connection, so neither proof can be replayed. Each page channel presents
its own token, derived from the key, both nonces and its index (and never sent before that
channel opens), so a page channel proves the key too, and seeing one channel's token does not
open another. Mode "open" (no key) runs the same exchange with empty proofs; a destination on a
non-loopback address refuses it unless the operator opted in. PSK authenticates the peers at the
start of each connection; it does not encrypt or sign the stream that follows
(docs/stream-format.md, section 1a).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import stat
import struct
from dataclasses import dataclass

from vfmig import _core
from vfmig.errors import ConfigError, MigrationError

NONCE_LEN = 32
MAC_LEN = 32
MIN_KEY_LEN = 16
MODE_OPEN = 0
MODE_PSK = 1
MODES = {MODE_OPEN: "open", MODE_PSK: "psk"}

_INIT = struct.Struct(f"<HH{NONCE_LEN}s")  # mode, reserved, nonce_s
_CHALLENGE = struct.Struct(f"<HH{NONCE_LEN}s{MAC_LEN}s")  # mode, reserved, nonce_d, proof_d
_RESPONSE = struct.Struct(f"<{MAC_LEN}s")


class AuthError(MigrationError):
    """The peer failed to authenticate, or asked for a mode this side does not accept."""


def read_key(path: str) -> bytes:
    """A pre-shared key from a file (like an ssh key: not readable by group or others)."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            key = f.read(4096).strip()
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e.strerror or e}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"key file {path} is accessible by group or others: chmod 600 {path}")
    if len(key) < MIN_KEY_LEN:
        raise ConfigError(f"key file {path} holds {len(key)} bytes; use at least {MIN_KEY_LEN} random bytes")
    return key


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, label + b"".join(parts), hashlib.sha256).digest()


@dataclass(frozen=True)
class Session:
    """What an authenticated control connection yields: the tokens its page channels present.
    Keyed: a per-session secret both sides derived (never sent), and HELLO's token field is zero.
    Open: one random token chosen by the source and carried in HELLO (no secret at all)."""

    mode: int
    secret: bytes | None
    hello_token: bytes  # open mode, destination side: empty until HELLO arrives

    @classmethod
    def derive(cls, key: bytes | None, nonce_s: bytes, nonce_d: bytes, source: bool) -> Session:
        if key is None:
            return cls(MODE_OPEN, None, os.urandom(_core.TOKEN_LEN) if source else b"")
        return cls(MODE_PSK, _mac(key, b"vfmig session", nonce_s, nonce_d), bytes(_core.TOKEN_LEN))

    def with_hello_token(self, token: bytes) -> Session:
        """The destination learns an open session's token from HELLO; a keyed HELLO carries zeros."""
        if self.secret is not None:
            if token != bytes(_core.TOKEN_LEN):
                raise AuthError("the stream header carries a session token, which a keyed session never sends")
            return self
        return Session(self.mode, None, token)

    def channel_token(self, index: int) -> bytes:
        if self.secret is None:
            return self.hello_token
        return _mac(self.secret, b"vfmig channel", index.to_bytes(2, "little"))[: _core.TOKEN_LEN]

    def channel_matches(self, index: int, token: bytes) -> bool:
        return hmac.compare_digest(self.channel_token(index), token)


def _check_reserved(reserved: int, what: str) -> None:
    if reserved:
        raise AuthError(f"{what} has a reserved field set")


def encode_init(mode: int, nonce_s: bytes) -> bytes:
    return _INIT.pack(mode, 0, nonce_s)


def decode_init(raw: bytes) -> tuple[int, bytes]:
    if len(raw) != _INIT.size:
        raise AuthError("AUTH_INIT has a bad length")
    mode, reserved, nonce_s = _INIT.unpack(raw)
    _check_reserved(reserved, "AUTH_INIT")
    if mode not in MODES:
        raise AuthError(f"unknown authentication mode {mode}")
    return mode, nonce_s


class Authenticator:
    """One side's authentication policy: the key it holds (None: open) and, for a destination,
    whether an unauthenticated source is accepted."""

    def __init__(self, key: bytes | None = None, allow_open: bool = True) -> None:
        self.key = key
        self.allow_open = allow_open

    @property
    def mode(self) -> int:
        return MODE_PSK if self.key is not None else MODE_OPEN

    # source --------------------------------------------------------------------------------
    def client_init(self) -> tuple[bytes, bytes]:
        """The AUTH_INIT payload and the nonce it carries."""
        nonce_s = os.urandom(NONCE_LEN)
        return encode_init(self.mode, nonce_s), nonce_s

    def client_finish(self, challenge: bytes, nonce_s: bytes) -> tuple[bytes, Session]:
        """Check the destination's proof; return the AUTH_RESPONSE payload and the session."""
        if len(challenge) != _CHALLENGE.size:
            raise AuthError("AUTH_CHALLENGE has a bad length")
        mode, reserved, nonce_d, proof_d = _CHALLENGE.unpack(challenge)
        _check_reserved(reserved, "AUTH_CHALLENGE")
        if self.key is None:
            if mode != MODE_OPEN:
                raise AuthError("the destination requires a pre-shared key (--psk-file)")
            return bytes(MAC_LEN), Session.derive(None, nonce_s, nonce_d, source=True)
        if mode != MODE_PSK:
            raise AuthError("the destination does not authenticate itself; refusing to send the VM to it")
        if not hmac.compare_digest(proof_d, _mac(self.key, b"vfmig dst", nonce_s, nonce_d)):
            raise AuthError("the destination failed to prove it holds the pre-shared key")
        return _mac(self.key, b"vfmig src", nonce_d, nonce_s), Session.derive(self.key, nonce_s, nonce_d, source=True)

    # destination ---------------------------------------------------------------------------
    def server_challenge(self, init: bytes) -> tuple[bytes, bytes, bytes]:
        """Answer an AUTH_INIT: the AUTH_CHALLENGE payload, nonce_s and nonce_d."""
        mode, nonce_s = decode_init(init)
        if self.key is not None and mode != MODE_PSK:
            raise AuthError("this destination requires a pre-shared key; the source offered none")
        if self.key is None and not self.allow_open:
            raise AuthError("this destination accepts no unauthenticated migrations")
        nonce_d = os.urandom(NONCE_LEN)
        proof = _mac(self.key, b"vfmig dst", nonce_s, nonce_d) if self.key is not None else bytes(MAC_LEN)
        return _CHALLENGE.pack(self.mode, 0, nonce_d, proof), nonce_s, nonce_d

    def server_verify(self, response: bytes, nonce_s: bytes, nonce_d: bytes) -> Session:
        if len(response) != _RESPONSE.size:
            raise AuthError("AUTH_RESPONSE has a bad length")
        if self.key is not None:
            (proof,) = _RESPONSE.unpack(response)
            if not hmac.compare_digest(proof, _mac(self.key, b"vfmig src", nonce_d, nonce_s)):
                raise AuthError("the source failed to prove it holds the pre-shared key")
        return Session.derive(self.key, nonce_s, nonce_d, source=False)
