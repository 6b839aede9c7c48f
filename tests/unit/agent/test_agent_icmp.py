"""ICMP "fragmentation needed" and ICMPv6 "packet too big" answers.

Checksums are verified twice: by a byte-by-byte RFC 1071 sum written here, and by tcpdump
reading the packets from a pcap file (an implementation that owes nothing to ours).
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cyphonic_agent.icmp import ICMPV4_MAX_ERROR_LEN, ICMPV6_MAX_ERROR_LEN, too_big
from cyphonic_agent.packet import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    build_ipv4_header,
    build_ipv6_header,
    parse_header,
)
from hypothesis import given
from hypothesis import strategies as st

V4_SENDER = ipaddress.IPv4Address("100.64.0.1").packed
V4_PEER = ipaddress.IPv4Address("100.64.0.2").packed
V6_SENDER = ipaddress.IPv6Address("fd00:c1::1").packed
V6_PEER = ipaddress.IPv6Address("fd00:c1::2").packed


def ones_complement_sum(data: bytes) -> int:
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | (data[i + 1] if i + 1 < len(data) else 0)
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def v4_packet(
    size: int,
    *,
    protocol: int = PROTO_TCP,
    flags_frag: int = 0x4000,
    src: bytes = V4_SENDER,
    dst: bytes = V4_PEER,
    first: bytes = b"",
) -> bytes:
    payload = first + bytes((i * 7) & 0xFF for i in range(size - 20 - len(first)))
    return (
        build_ipv4_header(
            src=src, dst=dst, protocol=protocol, payload_length=len(payload), flags_frag=flags_frag
        )
        + payload
    )


def v6_packet(
    size: int,
    *,
    next_header: int = PROTO_TCP,
    src: bytes = V6_SENDER,
    dst: bytes = V6_PEER,
    first: bytes = b"",
) -> bytes:
    payload = first + bytes((i * 7) & 0xFF for i in range(size - 40 - len(first)))
    return (
        build_ipv6_header(src=src, dst=dst, next_header=next_header, payload_length=len(payload))
        + payload
    )


def test_ipv4_frag_needed() -> None:
    original = v4_packet(1500)
    answer = too_big(original, mtu=1420)
    assert answer is not None
    h = parse_header(answer)
    assert h.version == 4 and h.protocol == PROTO_ICMP
    assert h.src == V4_PEER and h.dst == V4_SENDER
    assert h.length == len(answer) == ICMPV4_MAX_ERROR_LEN
    assert ones_complement_sum(answer[:20]) == 0xFFFF  # header checksum
    icmp = answer[20:]
    icmp_type, code, _, unused, mtu = struct.unpack_from("!BBHHH", icmp)
    assert (icmp_type, code, unused, mtu) == (3, 4, 0, 1420)
    assert ones_complement_sum(icmp) == 0xFFFF  # ICMP checksum
    assert icmp[8:] == original[: len(icmp) - 8]  # quotes the original from its start


def test_ipv4_small_original_quoted_whole() -> None:
    original = v4_packet(100)
    answer = too_big(original, mtu=68)
    assert answer is not None and answer[28:] == original
    assert ones_complement_sum(answer[20:]) == 0xFFFF


def test_ipv6_packet_too_big() -> None:
    original = v6_packet(1500)
    answer = too_big(original, mtu=1400)
    assert answer is not None
    h = parse_header(answer)
    assert h.version == 6 and h.protocol == PROTO_ICMPV6
    assert h.src == V6_PEER and h.dst == V6_SENDER
    assert len(answer) == h.length == ICMPV6_MAX_ERROR_LEN
    body = answer[40:]
    icmp_type, code, _, mtu = struct.unpack_from("!BBHI", body)
    assert (icmp_type, code, mtu) == (2, 0, 1400)
    pseudo = V6_PEER + V6_SENDER + struct.pack("!I3xB", len(body), PROTO_ICMPV6)
    assert ones_complement_sum(pseudo + body) == 0xFFFF
    assert body[8:] == original[: len(body) - 8]


def test_source_override() -> None:
    gateway = ipaddress.IPv6Address("fd00:c1::fffe").packed
    answer = too_big(v6_packet(1400), mtu=1300, src=gateway)
    assert answer is not None and parse_header(answer).src == gateway
    body = answer[40:]
    pseudo = gateway + V6_SENDER + struct.pack("!I3xB", len(body), PROTO_ICMPV6)
    assert ones_complement_sum(pseudo + body) == 0xFFFF


@pytest.mark.parametrize(
    "packet",
    [
        v4_packet(1500, protocol=PROTO_ICMP, first=b"\x03\x04"),  # ICMP error
        v4_packet(1500, protocol=PROTO_ICMP, first=b"\x0b\x00"),  # time exceeded
        v4_packet(1500, flags_frag=0x4000 | 10),  # non-first fragment
        v4_packet(1500, src=bytes(4)),  # unspecified source
        v4_packet(1500, src=b"\xff\xff\xff\xff"),  # broadcast source
        v4_packet(1500, dst=b"\xe0\x00\x00\x01"),  # multicast destination
        v6_packet(1500, next_header=PROTO_ICMPV6, first=b"\x02\x00"),  # ICMPv6 error
        v6_packet(1500, src=bytes(16)),
        v6_packet(1500, src=ipaddress.IPv6Address("ff02::1").packed),
        b"\x45\x00",  # malformed
        b"",
    ],
)
def test_no_answer_where_forbidden(packet: bytes) -> None:
    assert too_big(packet, mtu=1280) is None


def test_icmp_echo_is_answered() -> None:
    # Echo requests are queries, not errors: a too-big ping gets its answer (ping -M do).
    assert too_big(v4_packet(1500, protocol=PROTO_ICMP, first=b"\x08\x00"), mtu=1400)
    assert too_big(v6_packet(1500, next_header=PROTO_ICMPV6, first=b"\x80\x00"), mtu=1400)


@given(st.binary(max_size=2000), st.integers(min_value=68, max_value=65535))
def test_never_crashes(data: bytes, mtu: int) -> None:
    answer = too_big(data, mtu=mtu)
    if answer is not None:
        assert parse_header(answer).length == len(answer)


def test_tcpdump_agrees_on_checksums(tmp_path: Path) -> None:
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        pytest.skip("tcpdump not installed: cannot cross-check checksums")
    packets = [
        too_big(v4_packet(1500), mtu=1420),
        too_big(v4_packet(333, protocol=PROTO_UDP), mtu=300),
        too_big(v6_packet(1500), mtu=1400),
        too_big(v6_packet(777, next_header=PROTO_UDP), mtu=1280),
    ]
    pcap = tmp_path / "too-big.pcap"
    # pcap global header, LINKTYPE_RAW (101): each record is a bare IP packet.
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)
    for p in packets:
        assert p is not None
        data += struct.pack("<IIII", 0, 0, len(p), len(p)) + p
    pcap.write_bytes(data)
    out = subprocess.run(
        [tcpdump, "-nn", "-vv", "-r", str(pcap)], capture_output=True, text=True, timeout=20
    ).stdout
    assert out.count("need to frag (mtu 1420)") == 1, out
    assert out.count("need to frag (mtu 300)") == 1, out
    assert out.count("packet too big, mtu 1400") == 1, out
    assert out.count("packet too big, mtu 1280") == 1, out
    # tcpdump flags a bad ICMPv4 checksum with "wrong icmp cksum", a bad IPv4 header checksum
    # with "bad cksum" on the packet's first line (the quoted inner packets are truncated, so
    # their own transport checksums are expected to look bad).
    assert "wrong icmp cksum" not in out, out
    first_lines = [line for line in out.splitlines() if line.startswith("00:00:00")]
    assert len(first_lines) == 4 and not any("bad cksum" in line for line in first_lines), out
    assert out.count("icmp6 sum ok") == 2, out
