"""Relay allocation tokens: the NMS signs, the TRS verifies without asking the NMS.

A pattern-3 RouteDirection carries a token that binds a relay allocation to one route and its
two nodes. Each node hands it to the TRS (``RelayAllocationRequest``) over its own
mutual-TLS control connection; the TRS checks the tag, the expiry and that the node's
certificate FQDN is one of the two named. Sans-I/O: bytes and an explicit clock in, claims out.

Token layout (big-endian), version 1::

     0       1               9                       25
    +-------+---------------+-----------------------+
    | ver=1 | expires_ms u64| nonce (16 bytes)      |
    +-------+---------------+-----------------------+
    | len u8 | route_id (UTF-8)                     |
    | len u8 | initiator FQDN (UTF-8)               |
    | len u8 | responder FQDN (UTF-8)               |
    +----------------------------------------------+
    | tag: HMAC-SHA256(secret, all bytes above) 32  |
    +----------------------------------------------+

The secret is shared by the NMS and TRS replicas (``CYPHONIC_RELAY_TOKEN_SECRET``, at least
16 bytes). ``verify`` accepts a list of secrets so the secret can be rotated: sign with the new
one, verify with new and old until old tokens have expired. Replay within the lifetime is
harmless by design: the allocation a token buys is bound to the route and the two nodes, so a
second use can only come from one of those nodes, over its own authenticated connection.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from cyphonic.errors import InvalidArgument, TokenInvalid

VERSION = 1
ENV_SECRET = "CYPHONIC_RELAY_TOKEN_SECRET"
MIN_SECRET_BYTES = 16
DEFAULT_LIFETIME_MS = 120_000
MAX_TOKEN_BYTES = 1 + 8 + 16 + 3 * (1 + 255) + 32
# Used only when no secret is configured and the environment is ``local`` (one host, tests):
# production settings refuse to start without a real secret.
LOCAL_SECRET = b"cyphonic-local-relay-token-secret-not-for-production"

_HEAD = struct.Struct("!BQ16s")
_TAG_LEN = 32


@dataclass(frozen=True)
class RelayTokenClaims:
    """What a token says: which route, which two nodes, until when."""

    route_id: str
    initiator_fqdn: str
    responder_fqdn: str
    expires_ms: int
    nonce: bytes = field(default_factory=lambda: os.urandom(16))

    def involves(self, fqdn: str) -> bool:
        """Whether ``fqdn`` is one of the two nodes of the route."""
        return fqdn.lower() in (self.initiator_fqdn.lower(), self.responder_fqdn.lower())

    def peer_of(self, fqdn: str) -> str:
        """The other node of the route; ``TokenInvalid`` if ``fqdn`` is not on it."""
        if fqdn.lower() == self.initiator_fqdn.lower():
            return self.responder_fqdn
        if fqdn.lower() == self.responder_fqdn.lower():
            return self.initiator_fqdn
        raise TokenInvalid("relay token is for another pair of nodes")


def _field(value: str, name: str) -> bytes:
    raw = value.encode()
    if not raw or len(raw) > 255:
        raise InvalidArgument(f"relay token {name} must be 1..255 bytes")
    return bytes([len(raw)]) + raw


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise InvalidArgument(f"relay token secret must be at least {MIN_SECRET_BYTES} bytes")


def encode(claims: RelayTokenClaims, secret: bytes) -> bytes:
    """The signed token for ``claims``."""
    _check_secret(secret)
    if len(claims.nonce) != 16:
        raise InvalidArgument("relay token nonce must be 16 bytes")
    body = (
        _HEAD.pack(VERSION, claims.expires_ms, claims.nonce)
        + _field(claims.route_id, "route_id")
        + _field(claims.initiator_fqdn, "initiator FQDN")
        + _field(claims.responder_fqdn, "responder FQDN")
    )
    return body + hmac.new(secret, body, hashlib.sha256).digest()


def issue(
    *,
    route_id: str,
    initiator_fqdn: str,
    responder_fqdn: str,
    secret: bytes,
    now_ms: int,
    lifetime_ms: int = DEFAULT_LIFETIME_MS,
) -> bytes:
    """A fresh token (random nonce) valid for ``lifetime_ms`` from ``now_ms``."""
    return encode(
        RelayTokenClaims(
            route_id=route_id,
            initiator_fqdn=initiator_fqdn,
            responder_fqdn=responder_fqdn,
            expires_ms=now_ms + lifetime_ms,
        ),
        secret,
    )


def verify(token: bytes, secrets: bytes | Sequence[bytes], *, now_ms: int) -> RelayTokenClaims:
    """The claims of a genuine, unexpired token; ``TokenInvalid`` otherwise.

    The tag is checked (in constant time) before anything else is parsed.
    """
    keys = [secrets] if isinstance(secrets, bytes) else list(secrets)
    if not keys:
        raise InvalidArgument("no relay token secret configured")
    if len(token) < _HEAD.size + 3 + _TAG_LEN or len(token) > MAX_TOKEN_BYTES:
        raise TokenInvalid("relay token has a wrong length")
    body, tag = token[:-_TAG_LEN], token[-_TAG_LEN:]
    if not any(
        hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), tag) for key in keys
    ):
        raise TokenInvalid("relay token signature does not verify")
    version, expires_ms, nonce = _HEAD.unpack_from(body, 0)
    if version != VERSION:
        raise TokenInvalid(f"relay token version {version} is not supported")
    offset = _HEAD.size
    texts: list[str] = []
    for _ in range(3):
        if offset >= len(body):
            raise TokenInvalid("relay token is truncated")
        length = body[offset]
        end = offset + 1 + length
        if length == 0 or end > len(body):
            raise TokenInvalid("relay token is truncated")
        try:
            texts.append(body[offset + 1 : end].decode())
        except UnicodeDecodeError as exc:
            raise TokenInvalid("relay token text is not UTF-8") from exc
        offset = end
    if offset != len(body):
        raise TokenInvalid("relay token has trailing bytes")
    if now_ms >= expires_ms:
        raise TokenInvalid("relay token has expired")
    return RelayTokenClaims(
        route_id=texts[0],
        initiator_fqdn=texts[1],
        responder_fqdn=texts[2],
        expires_ms=int(expires_ms),
        nonce=bytes(nonce),
    )


def secret_from_env(environment: str, value: str | None = None) -> bytes:
    """The relay token secret from ``value`` or ``CYPHONIC_RELAY_TOKEN_SECRET``.

    Outside the ``local`` environment a missing or short secret is refused; locally a
    well-known development secret stands in so one-host setups work without configuration.
    """
    raw = value if value is not None else os.environ.get(ENV_SECRET)
    if not raw:
        if environment == "local":
            return LOCAL_SECRET
        raise InvalidArgument(f"{ENV_SECRET} must be set outside the local environment")
    secret = raw.encode()
    _check_secret(secret)
    return secret
