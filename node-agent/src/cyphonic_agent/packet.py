"""Pure IPv4/IPv6 header parsing for the data path (no I/O, no ``ipaddress`` on the hot path).

IPv4 header (RFC 791), offsets in bytes::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-------+-------+---------------+-------------------------------+
    |Version|  IHL  |      TOS      |         Total Length          |  0
    +-------+-------+---------------+-----+-------------------------+
    |        Identification         |Flags|     Fragment Offset     |  4
    +---------------+---------------+-----+-------------------------+
    |      TTL      |   Protocol    |        Header Checksum        |  8
    +---------------+---------------+-------------------------------+
    |                        Source Address                         | 12
    +---------------------------------------------------------------+
    |                      Destination Address                      | 16
    +---------------------------------------------------------------+

IPv6 header (RFC 8200)::

    +-------+---------------+---------------------------------------+
    |Version| Traffic Class |              Flow Label               |  0
    +-------+---------------+---------------+-----------------------+
    |        Payload Length         |  Next Header  |   Hop Limit   |  4
    +-------------------------------+---------------+---------------+
    |                  Source Address (16 bytes)                    |  8
    +---------------------------------------------------------------+
    |               Destination Address (16 bytes)                  | 24
    +---------------------------------------------------------------+

Addresses stay raw ``bytes`` (4 or 16) so they can key dictionaries cheaply; convert with
``ipaddress.ip_address(raw)`` only where people read them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cyphonic.errors import MalformedMessage

IPV4_HEADER_MIN = 20
IPV4_OFF_VERSION_IHL = 0
IPV4_OFF_TOS = 1
IPV4_OFF_TOTAL_LENGTH = 2
IPV4_OFF_IDENT = 4
IPV4_OFF_FLAGS_FRAG = 6
IPV4_OFF_TTL = 8
IPV4_OFF_PROTOCOL = 9
IPV4_OFF_CHECKSUM = 10
IPV4_OFF_SRC = 12
IPV4_OFF_DST = 16
IPV4_FLAG_DF = 0x4000
IPV4_FLAG_MF = 0x2000
IPV4_FRAG_OFFSET_MASK = 0x1FFF

IPV6_HEADER_LEN = 40
IPV6_OFF_PAYLOAD_LENGTH = 4
IPV6_OFF_NEXT_HEADER = 6
IPV6_OFF_HOP_LIMIT = 7
IPV6_OFF_SRC = 8
IPV6_OFF_DST = 24

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58


@dataclass(frozen=True, slots=True)
class IpHeader:
    """The fields of an IP header the agent acts on."""

    version: int
    """4 or 6."""
    src: bytes
    """Source address, 4 or 16 bytes."""
    dst: bytes
    """Destination address, 4 or 16 bytes."""
    length: int
    """Total packet length the header announces (IPv6: 40 + payload length)."""
    header_length: int
    """Bytes of the fixed header (IPv4: IHL * 4; IPv6: 40, extension headers not counted)."""
    protocol: int
    """IPv4 protocol or IPv6 next header."""
    dont_fragment: bool
    """IPv4 DF flag; always True for IPv6 (routers never fragment it)."""
    is_fragment: bool
    """IPv4: MF set or a non-zero fragment offset (IPv6 fragments are not detected)."""


def parse_header(packet: bytes) -> IpHeader:
    """Parse the IP header of ``packet``; raise ``MalformedMessage`` if it cannot be one."""
    if not packet:
        raise MalformedMessage("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < IPV4_HEADER_MIN:
            raise MalformedMessage("IPv4 packet shorter than its header")
        ihl = (packet[0] & 0x0F) * 4
        if ihl < IPV4_HEADER_MIN or ihl > len(packet):
            raise MalformedMessage(f"IPv4 header length {ihl} invalid")
        (total,) = struct.unpack_from("!H", packet, IPV4_OFF_TOTAL_LENGTH)
        if total < ihl:
            raise MalformedMessage(f"IPv4 total length {total} below header length")
        (flags_frag,) = struct.unpack_from("!H", packet, IPV4_OFF_FLAGS_FRAG)
        return IpHeader(
            version=4,
            src=packet[IPV4_OFF_SRC : IPV4_OFF_SRC + 4],
            dst=packet[IPV4_OFF_DST : IPV4_OFF_DST + 4],
            length=total,
            header_length=ihl,
            protocol=packet[IPV4_OFF_PROTOCOL],
            dont_fragment=bool(flags_frag & IPV4_FLAG_DF),
            is_fragment=bool(flags_frag & (IPV4_FLAG_MF | IPV4_FRAG_OFFSET_MASK)),
        )
    if version == 6:
        if len(packet) < IPV6_HEADER_LEN:
            raise MalformedMessage("IPv6 packet shorter than its header")
        (payload,) = struct.unpack_from("!H", packet, IPV6_OFF_PAYLOAD_LENGTH)
        return IpHeader(
            version=6,
            src=packet[IPV6_OFF_SRC : IPV6_OFF_SRC + 16],
            dst=packet[IPV6_OFF_DST : IPV6_OFF_DST + 16],
            length=IPV6_HEADER_LEN + payload,
            header_length=IPV6_HEADER_LEN,
            protocol=packet[IPV6_OFF_NEXT_HEADER],
            dont_fragment=True,
            is_fragment=False,
        )
    raise MalformedMessage(f"IP version {version} unknown")


def destination(packet: bytes, offset: int = 0) -> bytes | None:
    """The raw destination address of the IP packet at ``offset`` in ``packet`` (a TUN frame
    with offloads starts with a 10-byte virtio_net_hdr), or None if it is not IPv4/IPv6.

    The per-packet fast path: no header object, no checks beyond what indexing needs.
    """
    n = len(packet) - offset
    if n >= IPV4_HEADER_MIN and packet[offset] >> 4 == 4:
        at = offset + IPV4_OFF_DST
        return packet[at : at + 4]
    if n >= IPV6_HEADER_LEN and packet[offset] >> 4 == 6:
        at = offset + IPV6_OFF_DST
        return packet[at : at + 16]
    return None


def internet_checksum(data: bytes) -> int:
    """The 16-bit one's complement checksum of RFC 1071 over ``data``."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_ipv4_header(
    *,
    src: bytes,
    dst: bytes,
    protocol: int,
    payload_length: int,
    ttl: int = 64,
    tos: int = 0,
    ident: int = 0,
    flags_frag: int = 0,
) -> bytes:
    """A 20-byte IPv4 header with a correct header checksum."""
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            tos,
            IPV4_HEADER_MIN + payload_length,
            ident,
            flags_frag,
            ttl,
            protocol,
            0,
            src,
            dst,
        )
    )
    struct.pack_into("!H", header, IPV4_OFF_CHECKSUM, internet_checksum(bytes(header)))
    return bytes(header)


def build_ipv6_header(
    *, src: bytes, dst: bytes, next_header: int, payload_length: int, hop_limit: int = 64
) -> bytes:
    """A 40-byte IPv6 header (traffic class and flow label zero)."""
    return struct.pack("!IHBB16s16s", 6 << 28, payload_length, next_header, hop_limit, src, dst)


def fragment_ipv4(packet: bytes, *, mtu: int) -> list[bytes]:
    """Split an IPv4 packet whose DF flag is clear into fragments of at most ``mtu`` bytes.

    Routers do this for IPv4 without DF (RFC 791); the tunnel acts as one. Options are
    copied into every fragment (simpler than filtering by the copy flag; rare in practice).
    Raise ``MalformedMessage`` for DF packets or an MTU too small for one 8-byte block.
    """
    header = parse_header(packet)
    if header.version != 4 or header.dont_fragment:
        raise MalformedMessage("only IPv4 packets without DF may be fragmented")
    if header.length <= mtu:
        return [packet]
    ihl = header.header_length
    block = (mtu - ihl) // 8 * 8
    if block < 8:
        raise MalformedMessage(f"MTU {mtu} too small to fragment")
    (flags_frag,) = struct.unpack_from("!H", packet, IPV4_OFF_FLAGS_FRAG)
    base_offset = flags_frag & IPV4_FRAG_OFFSET_MASK  # in 8-byte units
    last_has_mf = bool(flags_frag & IPV4_FLAG_MF)
    options = packet[IPV4_HEADER_MIN:ihl]
    payload = packet[ihl : header.length]
    fragments: list[bytes] = []
    for start in range(0, len(payload), block):
        chunk = payload[start : start + block]
        more = start + block < len(payload) or last_has_mf
        ff = (base_offset + start // 8) | (IPV4_FLAG_MF if more else 0)
        head = bytearray(packet[:ihl])
        struct.pack_into("!H", head, IPV4_OFF_TOTAL_LENGTH, ihl + len(chunk))
        struct.pack_into("!H", head, IPV4_OFF_FLAGS_FRAG, ff)
        struct.pack_into("!H", head, IPV4_OFF_CHECKSUM, 0)
        head[IPV4_HEADER_MIN:ihl] = options
        struct.pack_into("!H", head, IPV4_OFF_CHECKSUM, internet_checksum(bytes(head)))
        fragments.append(bytes(head) + chunk)
    return fragments


IPV6_MIN_MTU = 1280
"""Every IPv6 link carries this much (RFC 8200 5); a tunnel that carries less fragments."""
PROTO_IPV6_FRAGMENT = 44
IPV6_FRAGMENT_HEADER_LEN = 8
_IPV6_PER_FRAGMENT = frozenset({0, 43, 60})
"""Hop-by-hop, routing, destination options: may belong to the unfragmentable part."""


def fragment_ipv6(packet: bytes, *, mtu: int, identification: int) -> list[bytes]:
    """Split an IPv6 packet of at most 1,280 bytes into fragments of at most ``mtu`` bytes.

    IPv6 routers never fragment and senders go no lower than 1,280 bytes, so a link that
    carries less must fragment itself (RFC 8200 5); the tunnel does it with a Fragment
    header, which only the receiving node (over the tunnel) ever sees. Packets whose first
    extension header is hop-by-hop, routing or destination options are refused
    (``MalformedMessage``): the unfragmentable part is not worked out here.
    """
    if len(packet) < IPV6_HEADER_LEN or packet[0] >> 4 != 6:
        raise MalformedMessage("not an IPv6 packet")
    next_header = packet[IPV6_OFF_NEXT_HEADER]
    if next_header in _IPV6_PER_FRAGMENT or next_header == PROTO_IPV6_FRAGMENT:
        raise MalformedMessage("IPv6 packet with extension headers: not fragmented here")
    if len(packet) <= mtu:
        return [packet]
    block = (mtu - IPV6_HEADER_LEN - IPV6_FRAGMENT_HEADER_LEN) // 8 * 8
    if block < 8:
        raise MalformedMessage(f"MTU {mtu} too small to fragment")
    payload = packet[IPV6_HEADER_LEN:]
    fragments: list[bytes] = []
    for start in range(0, len(payload), block):
        chunk = payload[start : start + block]
        more = start + block < len(payload)
        head = bytearray(packet[:IPV6_HEADER_LEN])
        struct.pack_into("!H", head, IPV6_OFF_PAYLOAD_LENGTH, IPV6_FRAGMENT_HEADER_LEN + len(chunk))
        head[IPV6_OFF_NEXT_HEADER] = PROTO_IPV6_FRAGMENT
        frag = struct.pack("!BBHI", next_header, 0, start | int(more), identification & 0xFFFFFFFF)
        fragments.append(bytes(head) + frag + chunk)
    return fragments
