"""IP header parsing and IPv4 fragmentation."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from cyphonic.errors import MalformedMessage
from cyphonic_agent.packet import (
    PROTO_UDP,
    build_ipv4_header,
    build_ipv6_header,
    destination,
    fragment_ipv4,
    internet_checksum,
    parse_header,
)
from hypothesis import given
from hypothesis import strategies as st

V4_SRC = ipaddress.IPv4Address("100.64.0.1").packed
V4_DST = ipaddress.IPv4Address("100.64.0.2").packed
V6_SRC = ipaddress.IPv6Address("fd00:c1::1").packed
V6_DST = ipaddress.IPv6Address("fd00:c1::2").packed


def reference_checksum(data: bytes) -> int:
    """RFC 1071 written the slow, obvious way, byte by byte."""
    total = 0
    for i in range(0, len(data), 2):
        hi = data[i]
        lo = data[i + 1] if i + 1 < len(data) else 0
        total += (hi << 8) | lo
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return 0xFFFF - total


@given(st.binary(max_size=3000))
def test_checksum_matches_reference(data: bytes) -> None:
    assert internet_checksum(data) == reference_checksum(data)


def test_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3: the sum of these words is 0xddf2, so the checksum is 0x220d.
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_parse_ipv4() -> None:
    payload = b"x" * 30
    packet = (
        build_ipv4_header(
            src=V4_SRC, dst=V4_DST, protocol=PROTO_UDP, payload_length=30, flags_frag=0x4000
        )
        + payload
    )
    h = parse_header(packet)
    assert (h.version, h.src, h.dst, h.length, h.header_length) == (4, V4_SRC, V4_DST, 50, 20)
    assert h.protocol == PROTO_UDP
    assert h.dont_fragment and not h.is_fragment
    assert destination(packet) == V4_DST
    # The header checksum verifies: summing the header with its checksum gives zero.
    assert reference_checksum(packet[:20]) == 0


def test_parse_ipv6() -> None:
    packet = build_ipv6_header(src=V6_SRC, dst=V6_DST, next_header=PROTO_UDP, payload_length=8)
    packet += b"\x00" * 8
    h = parse_header(packet)
    assert (h.version, h.src, h.dst, h.length, h.header_length) == (6, V6_SRC, V6_DST, 48, 40)
    assert h.protocol == PROTO_UDP and h.dont_fragment
    assert destination(packet) == V6_DST


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x45" + b"\x00" * 10,  # shorter than an IPv4 header
        b"\x4f" + b"\x00" * 19,  # IHL 60 > packet
        b"\x44" + b"\x00" * 19,  # IHL 16 < 20
        b"\x45\x00\x00\x10" + b"\x00" * 16,  # total length below the header
        b"\x60" + b"\x00" * 20,  # shorter than an IPv6 header
        b"\x50" + b"\x00" * 40,  # version 5
    ],
)
def test_parse_rejects_malformed(packet: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_header(packet)
    short = len(packet) < (40 if packet[:1] == b"\x60" else 20)
    if short or packet[0] >> 4 not in (4, 6):
        assert destination(packet) is None


@given(st.binary(max_size=100))
def test_parse_never_crashes(data: bytes) -> None:
    try:
        h = parse_header(data)
    except MalformedMessage:
        return
    assert h.version in (4, 6)
    assert len(h.src) == len(h.dst) == (4 if h.version == 4 else 16)


def _v4_packet(payload_len: int, *, flags_frag: int = 0, ident: int = 0x1234) -> bytes:
    payload = bytes(i & 0xFF for i in range(payload_len))
    return (
        build_ipv4_header(
            src=V4_SRC,
            dst=V4_DST,
            protocol=PROTO_UDP,
            payload_length=payload_len,
            flags_frag=flags_frag,
            ident=ident,
        )
        + payload
    )


def test_fragment_ipv4_reassembles() -> None:
    packet = _v4_packet(3000)
    frags = fragment_ipv4(packet, mtu=1280)
    assert len(frags) == 3
    data = bytearray()
    for i, frag in enumerate(frags):
        assert len(frag) <= 1280
        assert reference_checksum(frag[:20]) == 0
        (total, ident, ff) = struct.unpack_from("!HHH", frag, 2)
        assert total == len(frag) and ident == 0x1234
        assert (ff & 0x1FFF) * 8 == len(data)
        assert bool(ff & 0x2000) == (i < len(frags) - 1)
        data += frag[20:]
    assert bytes(data) == packet[20:]


def test_fragment_refragment_keeps_more_fragments_flag() -> None:
    # A first fragment (MF set) split again: every piece keeps MF.
    packet = _v4_packet(2000, flags_frag=0x2000)
    frags = fragment_ipv4(packet, mtu=1000)
    assert all(struct.unpack_from("!H", f, 6)[0] & 0x2000 for f in frags)


def test_fragment_refuses_df_and_tiny_mtu() -> None:
    with pytest.raises(MalformedMessage):
        fragment_ipv4(_v4_packet(2000, flags_frag=0x4000), mtu=1280)
    with pytest.raises(MalformedMessage):
        fragment_ipv4(_v4_packet(2000), mtu=24)
    small = _v4_packet(100)
    assert fragment_ipv4(small, mtu=1280) == [small]
