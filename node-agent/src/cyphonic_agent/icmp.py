"""ICMP "too big" answers the tunnel writes back into the TUN for packets above its MTU.

The kernel learns the path MTU from them (per destination), so TCP shrinks its segments and
the application never sees a black hole. Layouts::

    ICMPv4 destination unreachable, code 4 "fragmentation needed" (RFC 792, RFC 1191)
    +--------+--------+-----------------+
    | type 3 | code 4 |    checksum     |  0
    +--------+--------+-----------------+
    |     unused      |  next-hop MTU   |  4
    +-----------------+-----------------+
    | original IP header + as much payload as fits in 576 bytes (RFC 1812 4.3.2.3)

    ICMPv6 packet too big (RFC 4443 3.2); checksum covers the pseudo-header
    +--------+--------+-----------------+
    | type 2 | code 0 |    checksum     |  0
    +--------+--------+-----------------+
    |               MTU                 |  4
    +-----------------------------------+
    | as much of the invoking packet as fits in 1280 bytes (RFC 4443 2.4 c)

No answer is made where the RFCs forbid one (an ICMP error about an ICMP error, a non-first
IPv4 fragment, a broadcast, multicast or unspecified source, an IPv4 multicast destination),
so a storm cannot feed itself.
"""

from __future__ import annotations

import struct

from cyphonic.errors import MalformedMessage

from cyphonic_agent.packet import (
    IPV4_FRAG_OFFSET_MASK,
    IPV4_OFF_FLAGS_FRAG,
    IPV6_HEADER_LEN,
    PROTO_ICMP,
    PROTO_ICMPV6,
    build_ipv4_header,
    build_ipv6_header,
    internet_checksum,
    parse_header,
)

ICMPV4_DEST_UNREACHABLE = 3
ICMPV4_CODE_FRAG_NEEDED = 4
ICMPV6_PACKET_TOO_BIG = 2
ICMP_HEADER_LEN = 8
ICMPV4_MAX_ERROR_LEN = 576
"""Largest ICMPv4 error datagram (RFC 1812 4.3.2.3)."""
ICMPV6_MAX_ERROR_LEN = 1280
"""Largest ICMPv6 error packet: the IPv6 minimum MTU (RFC 4443 2.4 c)."""
ICMP_TOS_INTERNETWORK_CONTROL = 0xC0

# ICMPv4 types that are errors (never answered with another error, RFC 1122 3.2.2).
_ICMPV4_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})


def too_big(packet: bytes, *, mtu: int, src: bytes | None = None) -> bytes | None:
    """The ICMP/ICMPv6 "too big" packet answering ``packet``, or None if none may be sent.

    ``mtu`` is the largest packet the tunnel carries; ``src`` the address the answer comes
    from (default: the original destination, which is where the overlay says it stopped).
    Malformed packets get no answer.
    """
    try:
        header = parse_header(packet)
    except MalformedMessage:
        return None
    if src is None:
        src = header.dst
    if header.version == 4:
        return _frag_needed_v4(packet, header_len=header.header_length, mtu=mtu, src=src)
    return _packet_too_big_v6(packet, mtu=mtu, src=src)


def _frag_needed_v4(packet: bytes, *, header_len: int, mtu: int, src: bytes) -> bytes | None:
    orig_src = packet[12:16]
    orig_dst = packet[16:20]
    if not _ipv4_may_answer(orig_src) or orig_dst[0] >= 224:
        return None
    (flags_frag,) = struct.unpack_from("!H", packet, IPV4_OFF_FLAGS_FRAG)
    if flags_frag & IPV4_FRAG_OFFSET_MASK:
        return None  # only the first fragment is answered
    if packet[9] == PROTO_ICMP and (
        len(packet) <= header_len or packet[header_len] in _ICMPV4_ERROR_TYPES
    ):
        return None
    quote_len = ICMPV4_MAX_ERROR_LEN - 20 - ICMP_HEADER_LEN
    quote = packet[:quote_len]
    body = bytearray(
        struct.pack("!BBHHH", ICMPV4_DEST_UNREACHABLE, ICMPV4_CODE_FRAG_NEEDED, 0, 0, mtu & 0xFFFF)
    )
    body += quote
    struct.pack_into("!H", body, 2, internet_checksum(bytes(body)))
    return build_ipv4_header(
        src=src,
        dst=orig_src,
        protocol=PROTO_ICMP,
        payload_length=len(body),
        tos=ICMP_TOS_INTERNETWORK_CONTROL,
    ) + bytes(body)


def _packet_too_big_v6(packet: bytes, *, mtu: int, src: bytes) -> bytes | None:
    orig_src = packet[8:24]
    if orig_src == bytes(16) or orig_src[0] == 0xFF:
        return None
    if packet[6] == PROTO_ICMPV6 and (
        len(packet) <= IPV6_HEADER_LEN or packet[IPV6_HEADER_LEN] < 128
    ):
        return None  # an ICMPv6 error (types 0-127) is never answered
    quote = packet[: ICMPV6_MAX_ERROR_LEN - IPV6_HEADER_LEN - ICMP_HEADER_LEN]
    body = bytearray(struct.pack("!BBHI", ICMPV6_PACKET_TOO_BIG, 0, 0, mtu))
    body += quote
    struct.pack_into("!H", body, 2, icmpv6_checksum(src=src, dst=orig_src, body=bytes(body)))
    return build_ipv6_header(
        src=src, dst=orig_src, next_header=PROTO_ICMPV6, payload_length=len(body)
    ) + bytes(body)


def icmpv6_checksum(*, src: bytes, dst: bytes, body: bytes) -> int:
    """ICMPv6 checksum of ``body`` (checksum field zero) over the RFC 8200 8.1 pseudo-header."""
    pseudo = src + dst + struct.pack("!I3xB", len(body), PROTO_ICMPV6)
    return internet_checksum(pseudo + body)


def _ipv4_may_answer(addr: bytes) -> bool:
    # Not 0.0.0.0/8, not multicast/reserved (224/3), not limited broadcast, not loopback.
    return addr[0] not in (0, 127) and addr[0] < 224
