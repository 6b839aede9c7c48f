"""Stateless QUIC Retry (RFC 9000 section 8.1.2): address validation under load, sans-I/O.

    Initial, unknown CID ──> RetryGate.on_initial(addr, dcid, token, handshaking, now)
        no token, handshakes under way < threshold  -> Admit(odcid=dcid)
        no token, handshakes under way >= threshold -> SendRetry(new scid, token)
        token valid for this address and DCID       -> Admit(odcid from the token,
                                                             retry_scid=dcid)
        token forged, expired, for another address  -> Drop(reason)

A spoofed source never receives the Retry, so it can never present a token: under a flood
of Initials from spoofed addresses the server keeps no state for them, while a genuine
client pays one round trip and is admitted whatever the load. The token is

    0        1                      9        10           10+n
    +--------+----------------------+--------+------------+---------------+
    | ver=1  | issued (ms, u64 BE)  | n      | original   | HMAC-SHA256   |
    |        |                      |        | DCID (n)   | first 16 B    |
    +--------+----------------------+--------+------------+---------------+

and the MAC covers the header, the original DCID, the Retry's source CID (the DCID the
client must use next) and the client's address (IP + port), keyed with a secret of the
endpoint (random per process unless given, e.g. shared by replicas behind one address).
Nothing is decrypted or stored: validating is one HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cyphonic.config import QUIC_RETRY_THRESHOLD
from cyphonic.errors import Expired, Unauthenticated

__all__ = [
    "DEFAULT_RETRY_THRESHOLD",
    "DEFAULT_TOKEN_LIFETIME_S",
    "Admit",
    "Drop",
    "RetryGate",
    "RetryTokens",
    "SendRetry",
]

TOKEN_VERSION = 1
DEFAULT_TOKEN_LIFETIME_S = 10.0
"""A Retry token is good this long (a client answers a Retry within one round trip)."""
DEFAULT_RETRY_THRESHOLD = QUIC_RETRY_THRESHOLD
"""Handshakes under way from which services answer token-less Initials with a Retry."""
MAX_CLOCK_SKEW_S = 1.0
_HEADER = struct.Struct("!BQB")
_MAC_LENGTH = 16
MAX_CID_LENGTH = 20
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def _address_bytes(addr: tuple[Any, ...]) -> bytes:
    """The client address as the MAC binds it: IP (IPv4-mapped made plain) and port."""
    host = str(addr[0]).split("%", 1)[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    try:
        packed = socket.inet_pton(socket.AF_INET if "." in host else socket.AF_INET6, host)
    except OSError:
        packed = ipaddress.ip_address(host).packed
    if len(packed) == 16 and packed[:12] == _MAPPED_PREFIX:  # mapped, written in hex
        packed = packed[12:]
    return packed + struct.pack("!H", int(addr[1]))


class RetryTokens:
    """Issue and check address-bound Retry tokens (time passed in, seconds)."""

    def __init__(self, *, key: bytes | None = None, lifetime: float = DEFAULT_TOKEN_LIFETIME_S):
        if key is not None and len(key) < 16:
            raise ValueError("a Retry token key needs at least 16 bytes")
        self._key = key if key is not None else os.urandom(32)
        self.lifetime = lifetime

    def _mac(self, head: bytes, odcid: bytes, retry_scid: bytes, addr: tuple[Any, ...]) -> bytes:
        message = head + odcid + bytes([len(retry_scid)]) + retry_scid + _address_bytes(addr)
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_LENGTH]

    def issue(self, *, addr: tuple[Any, ...], odcid: bytes, retry_scid: bytes, now: float) -> bytes:
        """A token for the client at ``addr`` whose first Initial had DCID ``odcid``; it
        must come back in an Initial sent to ``retry_scid``."""
        if len(odcid) > MAX_CID_LENGTH:
            raise ValueError("connection ID longer than 20 bytes")
        head = _HEADER.pack(TOKEN_VERSION, int(now * 1000), len(odcid)) + odcid
        return head + self._mac(head, odcid, retry_scid, addr)

    def validate(self, token: bytes, *, addr: tuple[Any, ...], dcid: bytes, now: float) -> bytes:
        """The original DCID the token carries; ``Unauthenticated`` for a token that is not
        ours, malformed, or for another address or DCID, ``Expired`` for a stale one."""
        if len(token) < _HEADER.size + _MAC_LENGTH:
            raise Unauthenticated("Retry token too short")
        version, issued_ms, n = _HEADER.unpack_from(token)
        end = _HEADER.size + n
        if version != TOKEN_VERSION or n > MAX_CID_LENGTH or len(token) != end + _MAC_LENGTH:
            raise Unauthenticated("not a Retry token of this endpoint")
        odcid = token[_HEADER.size : end]
        if not hmac.compare_digest(token[end:], self._mac(token[:end], odcid, dcid, addr)):
            raise Unauthenticated("Retry token does not match this address and connection ID")
        age = now - issued_ms / 1000
        if age > self.lifetime or age < -MAX_CLOCK_SKEW_S:
            raise Expired(f"Retry token {age:.1f} s old (good for {self.lifetime:g} s)")
        return odcid


@dataclass(frozen=True)
class Admit:
    """Make a server connection: ``odcid`` is the client's first DCID; ``retry_scid`` the
    source CID of our Retry when the client came back with a token (else None)."""

    odcid: bytes
    retry_scid: bytes | None = None


@dataclass(frozen=True)
class SendRetry:
    """Answer with a Retry packet from ``scid`` carrying ``token``; keep nothing."""

    scid: bytes
    token: bytes


@dataclass(frozen=True)
class Drop:
    """Drop the Initial, keep nothing (``reason`` for counters and debug logs)."""

    reason: str


InitialDecision = Admit | SendRetry | Drop


class RetryGate:
    """When to ask for address validation, and what a token proves.

    ``threshold``: handshakes under way from which a token-less Initial gets a Retry (0:
    always). Below it Initials are admitted at once (no extra round trip in normal times).
    """

    def __init__(
        self,
        *,
        threshold: int = DEFAULT_RETRY_THRESHOLD,
        tokens: RetryTokens | None = None,
        cid_length: int = 8,
        new_cid: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.threshold = threshold
        self.tokens = tokens or RetryTokens()
        self.cid_length = cid_length
        self._new_cid = new_cid

    def on_initial(
        self,
        *,
        addr: tuple[Any, ...],
        dcid: bytes,
        token: bytes,
        handshaking: int,
        now: float,
    ) -> InitialDecision:
        """What to do with an Initial for no known connection."""
        if token:
            try:
                odcid = self.tokens.validate(token, addr=addr, dcid=dcid, now=now)
            except (Unauthenticated, Expired) as exc:
                # A forgery, a replay from elsewhere, or too late: the client would refuse
                # a connection without our Retry's CID anyway (no NEW_TOKEN is ever sent).
                return Drop(exc.message)
            return Admit(odcid=odcid, retry_scid=dcid)
        if handshaking < self.threshold:
            return Admit(odcid=dcid)
        scid = self._new_cid(self.cid_length)
        return SendRetry(
            scid=scid, token=self.tokens.issue(addr=addr, odcid=dcid, retry_scid=scid, now=now)
        )
