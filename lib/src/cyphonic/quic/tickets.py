"""TLS 1.3 session tickets that any replica of a service can open (sans-I/O).

A ticket is the resumable session itself, sealed (AES-256-GCM) under a key that every
replica of the service is given (``TicketKeys``; a file or environment variable, a
Kubernetes Secret in the chart), so a node whose replica died resumes at another one
(RFC 8446 section 2.2, PSK with (EC)DHE: a fresh key exchange, no certificates, no
CertificateVerify). The state binds the peer that the full handshake verified: its role
and its leaf certificate (name, serial and expiry come from it), so the resuming side
recovers the same ``PeerIdentity`` and re-checks revocation and expiry before accepting.

    0        1                 9                       21
    +--------+-----------------+-----------------------+---------------------------+
    | ver=1  | key id (8)      | nonce (12)            | AES-GCM(state) + tag (16) |
    +--------+-----------------+-----------------------+---------------------------+
    header (ver + key id) is the associated data; key id = SHA-256(key)[:8].

    state: issued_ms u64 | expires_ms u64 | cipher_suite u16 | kind u8 (0 node, 1 service)
           | secret len u8 + bytes | alpn len u8 + bytes | server_name len u8 + bytes
           | certificate len u16 + DER

``expires_ms`` is the earlier of issue time + lifetime (``MAX_LIFETIME`` at most) and the
certificate's expiry. Opening refuses a malformed ticket, an unknown key id, a failed
tag (tampered, or another key with a colliding id) with ``TokenInvalid`` and an expired
one with ``Expired``; the TLS layer then falls back to a full handshake.

Replay: a ticket is bearer state only together with its resumption secret, which never
leaves the client and the sealed ticket, and every resumption runs a fresh (EC)DHE, so a
replayed ClientHello cannot complete. Tickets are not single-use (replicas share no ticket
store): a client may resume with the same ticket several times within its lifetime. No
0-RTT data is ever offered or accepted (``max_early_data_size`` is never sent), so
nothing a replayed flight carries is processed.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cyphonic.errors import Expired, InvalidArgument, TokenInvalid
from cyphonic.pki import PeerKind

VERSION = 1
KEY_SIZE = 32
"""Bytes of a ticket key (AES-256)."""
MAX_LIFETIME = 3600.0
"""Seconds a ticket is accepted after it was issued, at most."""
MAX_TICKET = 4096
"""Longest ticket accepted (a node certificate is well under 1 KB)."""
MIN_SECRET = 32
"""Shortest configured secret a ticket key is derived from."""

_HEADER = struct.Struct("!B8s")
_NONCE = 12
_TIMES = struct.Struct("!QQHB")
_KINDS: tuple[PeerKind, ...] = ("node", "service")


def _derive(secret: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=b"cyphonic session tickets"
    ).derive(secret)


def key_id(key: bytes) -> bytes:
    """The 8-byte identifier of ``key`` written in each ticket it seals."""
    return hashlib.sha256(b"cyphonic ticket key\x00" + key).digest()[:8]


@dataclass(frozen=True)
class TicketState:
    """What a ticket carries: the session to resume and who the peer proved to be."""

    resumption_secret: bytes
    cipher_suite: int
    kind: PeerKind
    certificate: bytes
    """The peer's leaf certificate (DER), verified in the full handshake."""
    alpn: str
    server_name: str
    issued_at: float
    """Unix seconds."""
    expires_at: float
    """Unix seconds: no resumption after this."""


class TicketKeys:
    """The keys of one service: the first seals, every one opens (rotation: prepend the
    new key on every replica, drop the old one an hour later)."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise InvalidArgument("no ticket key")
        for key in keys:
            if len(key) != KEY_SIZE:
                raise InvalidArgument(f"a ticket key is {KEY_SIZE} bytes, not {len(key)}")
        self._sealing = (key_id(keys[0]), AESGCM(keys[0]))
        self._by_id = {key_id(k): AESGCM(k) for k in reversed(keys)}

    @classmethod
    def from_secrets(cls, text: str) -> TicketKeys:
        """Keys derived (HKDF-SHA256) from configured secrets, comma- or whitespace-
        separated, newest first; each at least ``MIN_SECRET`` characters (the chart
        generates 48 random alphanumerics once and keeps them in a Secret)."""
        parts = text.replace(",", " ").split()
        if any(len(p) < MIN_SECRET for p in parts):
            raise InvalidArgument(f"a session ticket secret has at least {MIN_SECRET} characters")
        return cls([_derive(p.encode()) for p in parts])

    def seal(self, state: TicketState) -> bytes:
        """The ticket for ``state`` under the newest key."""
        kid, aead = self._sealing
        header = _HEADER.pack(VERSION, kid)
        nonce = os.urandom(_NONCE)
        return header + nonce + aead.encrypt(nonce, _encode(state), header)

    def open(self, ticket: bytes, *, now: float, max_age: float = MAX_LIFETIME) -> TicketState:
        """The state sealed in ``ticket``; ``TokenInvalid`` or ``Expired`` if unusable."""
        if len(ticket) > MAX_TICKET or len(ticket) < _HEADER.size + _NONCE + 16:
            raise TokenInvalid("malformed session ticket")
        version, kid = _HEADER.unpack_from(ticket)
        if version != VERSION:
            raise TokenInvalid(f"session ticket version {version}")
        aead = self._by_id.get(kid)
        if aead is None:
            raise TokenInvalid("session ticket under an unknown key")
        nonce = ticket[_HEADER.size : _HEADER.size + _NONCE]
        try:
            plain = aead.decrypt(nonce, ticket[_HEADER.size + _NONCE :], ticket[: _HEADER.size])
        except InvalidTag as exc:
            raise TokenInvalid("session ticket fails authentication") from exc
        state = _decode(plain)
        if now > state.expires_at or now > state.issued_at + max_age:
            raise Expired("session ticket expired")
        if now < state.issued_at - 60:
            raise TokenInvalid("session ticket issued in the future")
        return state


def _encode(state: TicketState) -> bytes:
    fields = [
        _TIMES.pack(
            int(state.issued_at * 1000),
            int(state.expires_at * 1000),
            state.cipher_suite,
            _KINDS.index(state.kind),
        ),
        _short(state.resumption_secret),
        _short(state.alpn.encode()),
        _short(state.server_name.encode()),
        struct.pack("!H", len(state.certificate)),
        state.certificate,
    ]
    return b"".join(fields)


def _short(value: bytes) -> bytes:
    if len(value) > 255:
        raise InvalidArgument("ticket field longer than 255 bytes")
    return bytes([len(value)]) + value


def _decode(plain: bytes) -> TicketState:
    # Authenticated, so only our own encoder made it; a mismatch is still refused.
    try:
        issued, expires, suite, kind = _TIMES.unpack_from(plain)
        offset = _TIMES.size
        values: list[bytes] = []
        for _ in range(3):
            n = plain[offset]
            values.append(plain[offset + 1 : offset + 1 + n])
            offset += 1 + n
        (n,) = struct.unpack_from("!H", plain, offset)
        certificate = plain[offset + 2 : offset + 2 + n]
        if offset + 2 + n != len(plain) or len(certificate) != n or kind >= len(_KINDS):
            raise ValueError("length mismatch")
        return TicketState(
            resumption_secret=values[0],
            cipher_suite=suite,
            kind=_KINDS[kind],
            certificate=certificate,
            alpn=values[1].decode(),
            server_name=values[2].decode(),
            issued_at=issued / 1000,
            expires_at=expires / 1000,
        )
    except (IndexError, ValueError, struct.error) as exc:
        raise TokenInvalid("malformed session ticket state") from exc
