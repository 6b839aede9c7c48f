"""Just enough of the QUIC header to route a datagram by its Destination Connection ID.

Long header (RFC 9000 section 17.2; the version-independent part is RFC 8999)::

    +-+-+-+-+-+-+-+-+
    |1|X|T T|X X X X|   first octet: form 1, fixed bit, type (version-specific)
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                         Version (32)                          |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    | DCID Len (8)  |   Destination Connection ID (0..160) ...
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    | SCID Len (8)  |   Source Connection ID (0..160) ...   | payload ...

Short header (section 17.3) carries no length, so the relay uses its fixed ``CID_LEN``::

    +-+-+-+-+-+-+-+-+
    |0|1|S|R R|K|P P|   first octet: form 0, fixed bit, spin, reserved, key phase, PN len
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |      Destination Connection ID (CID_LEN octets) ...           |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  Packet Number (8..32) | Protected Payload ...                |

The relay is blind: it does not check the fixed bit (RFC 9287 lets peers grease it) or
anything protected; it only refuses what cannot be a QUIC packet carrying a DCID. All
coalesced packets of a datagram share one DCID (RFC 9000 section 12.2), so the first
header decides. Every failure is a ``HeaderError``; nothing else is ever raised for any
input bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from cyphonic_trs.cid import CID_LEN
from cyphonic_trs.errors import HeaderError

# Named offsets of the long header.
LONG_OFF_VERSION: Final = 1
LONG_OFF_DCID_LEN: Final = 5
LONG_OFF_DCID: Final = 6
# Named offset of the short header.
SHORT_OFF_DCID: Final = 1

FORM_BIT: Final = 0x80
MAX_CID_LEN_V1: Final = 20
"""Largest CID QUIC versions 1 and 2 allow; other versions may use up to 255 (RFC 8999)."""

# Header protection samples 16 octets starting 4 after the packet-number offset, so a
# protected short-header packet has at least 4 + 16 octets after its DCID.
SHORT_MIN_AFTER_DCID: Final = 20

VERSION_NEGOTIATION: Final = 0x00000000
VERSION_1: Final = 0x00000001
VERSION_2: Final = 0x6B3343CF


class PacketType(enum.Enum):
    """The packet types a long header can name in versions 1 and 2, and the short header."""

    INITIAL = "initial"
    ZERO_RTT = "0rtt"
    HANDSHAKE = "handshake"
    RETRY = "retry"
    VERSION_NEGOTIATION = "version_negotiation"
    ONE_RTT = "1rtt"
    UNKNOWN_VERSION = "unknown_version"


_V1_TYPES: Final = (
    PacketType.INITIAL,
    PacketType.ZERO_RTT,
    PacketType.HANDSHAKE,
    PacketType.RETRY,
)
_V2_TYPES: Final = (
    PacketType.RETRY,
    PacketType.INITIAL,
    PacketType.ZERO_RTT,
    PacketType.HANDSHAKE,
)


@dataclass(frozen=True, slots=True)
class QuicHeader:
    """The routing-relevant fields of a datagram's first QUIC header."""

    is_long: bool
    packet_type: PacketType
    version: int | None  # None for short headers
    dcid: bytes
    scid: bytes | None  # None for short headers


def dcid_of(data: bytes, cid_len: int = CID_LEN) -> bytes:
    """The Destination Connection ID of the datagram's first packet (the per-packet path).

    ``cid_len`` is the length of the DCID in short headers; long headers carry their own.
    """
    n = len(data)
    if n == 0:
        raise HeaderError("empty datagram")
    if not data[0] & FORM_BIT:
        if n < SHORT_OFF_DCID + cid_len + SHORT_MIN_AFTER_DCID:
            raise HeaderError("short-header packet too short")
        return data[SHORT_OFF_DCID : SHORT_OFF_DCID + cid_len]
    return _parse_long(data).dcid


def parse_header(data: bytes, cid_len: int = CID_LEN) -> QuicHeader:
    """The first header of a datagram, for tests, diagnostics and the control path."""
    if not data:
        raise HeaderError("empty datagram")
    if data[0] & FORM_BIT:
        return _parse_long(data)
    dcid = dcid_of(data, cid_len)
    return QuicHeader(
        is_long=False, packet_type=PacketType.ONE_RTT, version=None, dcid=dcid, scid=None
    )


def _parse_long(data: bytes) -> QuicHeader:
    n = len(data)
    if n < LONG_OFF_DCID + 1:  # up to DCID Len, plus at least the SCID Len octet
        raise HeaderError("long-header packet too short")
    version = int.from_bytes(data[LONG_OFF_VERSION:LONG_OFF_DCID_LEN], "big")
    dcil = data[LONG_OFF_DCID_LEN]
    known = version in (VERSION_1, VERSION_2)
    if known and dcil > MAX_CID_LEN_V1:
        raise HeaderError(f"DCID length {dcil} above {MAX_CID_LEN_V1}")
    off_scil = LONG_OFF_DCID + dcil
    if n < off_scil + 1:
        raise HeaderError("long header truncated in the DCID")
    scil = data[off_scil]
    if known and scil > MAX_CID_LEN_V1:
        raise HeaderError(f"SCID length {scil} above {MAX_CID_LEN_V1}")
    off_payload = off_scil + 1 + scil
    if n < off_payload:
        raise HeaderError("long header truncated in the SCID")
    if version == VERSION_NEGOTIATION:
        packet_type = PacketType.VERSION_NEGOTIATION
    elif version == VERSION_1:
        packet_type = _V1_TYPES[(data[0] >> 4) & 0x3]
    elif version == VERSION_2:
        packet_type = _V2_TYPES[(data[0] >> 4) & 0x3]
    else:
        packet_type = PacketType.UNKNOWN_VERSION
    return QuicHeader(
        is_long=True,
        packet_type=packet_type,
        version=version,
        dcid=data[LONG_OFF_DCID:off_scil],
        scid=data[off_scil + 1 : off_payload],
    )
