"""Relay connection IDs in the style of QUIC-LB (draft-ietf-quic-load-balancers).

Every CID the TRS hands out has the same length, ``CID_LEN`` = 8 octets, so that the
forwarding path can cut the Destination Connection ID out of a short-header packet, which
does not carry its length. The layout is the draft's unencrypted ("plaintext") mode:

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    | CR  | LEN - 1 |     Replica ID (16 bits)      | Nonce (40) ...
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                          ... Nonce            |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

- CR (config rotation, 3 bits): which CID format issued the CID, so the format can change
  (say, a longer replica ID) while CIDs of the old one are still in use. ``7`` is the
  draft's "unroutable" codepoint and is never issued.
- LEN - 1 (5 bits): the draft's length self-description, here always ``CID_LEN - 1``.
- Replica ID (2 octets, big-endian): the TRS replica that issued the CID and holds its
  entry, so a replica (or a QUIC-LB-aware load balancer) knows where a CID belongs without
  asking Redis.
- Nonce (5 octets): random; the issuer checks it is unused before handing it out.

Why plaintext and not the draft's encrypted modes: encryption hides the server ID from
on-path observers so that CIDs of one connection cannot be linked by it. Here every relayed
packet goes to the same TRS address anyway, so the replica ID reveals nothing an observer
does not already see; the 40-bit nonce is what makes a CID unguessable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cyphonic_trs.errors import CidError

CID_LEN: Final = 8
"""Length in octets of every relay CID (QUIC allows up to 20; short headers need a fixed one)."""

REPLICA_ID_LEN: Final = 2
NONCE_LEN: Final = CID_LEN - 1 - REPLICA_ID_LEN
MAX_REPLICA_ID: Final = (1 << (8 * REPLICA_ID_LEN)) - 1

CONFIG_ID: Final = 0
"""Config rotation codepoint of the format above, the only one this version issues."""
KNOWN_CONFIGS: Final = frozenset({CONFIG_ID})
UNROUTABLE_CONFIG: Final = 0b111

# Named offsets into the CID.
_OFF_FIRST: Final = 0
_OFF_REPLICA: Final = 1
_OFF_NONCE: Final = _OFF_REPLICA + REPLICA_ID_LEN

_LEN_BITS: Final = CID_LEN - 1  # the 5-bit length self-description

Rng = Callable[[int], bytes]
"""Source of random octets, e.g. ``os.urandom`` or ``random.Random(seed).randbytes``."""


@dataclass(frozen=True, slots=True)
class CidFields:
    """The decoded parts of a relay CID."""

    config_id: int
    replica_id: int
    nonce: bytes


def issue_cid(replica_id: int, rng: Rng, *, config_id: int = CONFIG_ID) -> bytes:
    """A fresh relay CID owned by ``replica_id``; uniqueness is checked by the caller."""
    if not 0 <= replica_id <= MAX_REPLICA_ID:
        raise CidError(f"replica id {replica_id} outside 0..{MAX_REPLICA_ID}")
    if config_id not in KNOWN_CONFIGS:
        raise CidError(f"config rotation {config_id} is not issued by this version")
    nonce = rng(NONCE_LEN)
    if len(nonce) != NONCE_LEN:
        raise CidError("random source returned the wrong number of octets")
    first = (config_id << 5) | _LEN_BITS
    return bytes((first,)) + replica_id.to_bytes(REPLICA_ID_LEN, "big") + nonce


def parse_cid(cid: bytes) -> CidFields:
    """Decode a relay CID; ``CidError`` if it is not one of this format."""
    if len(cid) != CID_LEN:
        raise CidError(f"relay CIDs are {CID_LEN} octets, got {len(cid)}")
    first = cid[_OFF_FIRST]
    config_id = first >> 5
    if config_id == UNROUTABLE_CONFIG:
        raise CidError("unroutable config rotation codepoint")
    if config_id not in KNOWN_CONFIGS:
        raise CidError(f"unknown config rotation {config_id}")
    if first & 0x1F != _LEN_BITS:
        raise CidError("length self-description does not match the CID length")
    return CidFields(
        config_id=config_id,
        replica_id=int.from_bytes(cid[_OFF_REPLICA:_OFF_NONCE], "big"),
        nonce=bytes(cid[_OFF_NONCE:]),
    )


def replica_of(cid: bytes) -> int:
    """The replica that issued ``cid``; ``CidError`` if it is not a relay CID."""
    return parse_cid(cid).replica_id


def is_relay_cid(cid: bytes) -> bool:
    """Whether ``cid`` has this relay's format (it may still be unknown to the table)."""
    try:
        parse_cid(cid)
    except CidError:
        return False
    return True
