"""The pcap reader on hand-built frames (real tcpdump files are read in tests/netns/testbed)."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest
from cyphonic_testbed import TestbedError, read_pcap
from cyphonic_testbed.capture import parse_packet


def _ipv4(proto: int, body: bytes, src: str = "192.0.2.1", dst: str = "198.51.100.7") -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(body),
        1,
        0,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + body


def _ipv6(nxt: int, body: bytes, src: str = "2001:db8::1", dst: str = "2001:db8::2") -> bytes:
    return (
        struct.pack("!IHBB", 0x60000000, len(body), nxt, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + body
    )


def _udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _tcp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x18, 1000, 0, 0) + payload


def _ether(ethertype: int, packet: bytes, vlan: bool = False) -> bytes:
    head = b"\x02" * 6 + b"\x04" * 6
    if vlan:
        head += struct.pack("!HH", 0x8100, 7)
    return head + struct.pack("!H", ethertype) + packet


def _pcap(linktype: int, frames: list[bytes], *, big: bool = False, nano: bool = False) -> bytes:
    e = ">" if big else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(e + "IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)
    for i, frame in enumerate(frames):
        out += struct.pack(e + "IIII", 100 + i, 500, len(frame), len(frame)) + frame
    return out


def test_ethernet_ipv4_udp_and_vlan_ipv6_tcp(tmp_path: Path) -> None:
    frames = [
        _ether(0x0800, _ipv4(17, _udp(40000, 443, b"hello quic"))),
        _ether(0x86DD, _ipv6(6, _tcp(5555, 80, b"GET /")), vlan=True),
        _ether(0x0806, b"\x00" * 28),  # ARP: kept, not IP
    ]
    path = tmp_path / "a.pcap"
    path.write_bytes(_pcap(1, frames))
    pkts = read_pcap(path)
    assert [p.protocol for p in pkts] == ["udp", "tcp", "other"]
    udp, tcp, arp = pkts
    assert (udp.family, udp.src, udp.dst, udp.sport, udp.dport) == (
        4,
        "192.0.2.1",
        "198.51.100.7",
        40000,
        443,
    )
    assert udp.payload == b"hello quic"
    assert (tcp.family, tcp.src, tcp.sport, tcp.dport, tcp.payload) == (
        6,
        "2001:db8::1",
        5555,
        80,
        b"GET /",
    )
    assert arp.family == 0 and arp.payload == b""
    assert udp.time == pytest.approx(100.0005)


def test_ipv6_extension_headers_and_fragments() -> None:
    hop_by_hop = bytes([17, 0]) + b"\x00" * 6  # next header UDP, 8 bytes long
    pkt = parse_packet(101, _ipv6(0, hop_by_hop + _udp(1, 2, b"x")))
    assert (pkt.protocol, pkt.sport, pkt.dport, pkt.payload) == ("udp", 1, 2, b"x")
    later_fragment = bytes([17, 0]) + struct.pack("!H", 185 << 3) + b"\x00" * 4
    frag = parse_packet(101, _ipv6(44, later_fragment + b"tail bytes"))
    assert frag.protocol == "fragment" and frag.sport is None and frag.payload == b"tail bytes"


def test_cooked_captures_big_endian_nanoseconds_and_truncated_tail(tmp_path: Path) -> None:
    sll2 = struct.pack("!HHIHBB8s", 0x0800, 0, 3, 1, 0, 6, b"\x00" * 8)
    sll = struct.pack("!HHH8sH", 0, 1, 6, b"\x00" * 8, 0x86DD)
    icmp = _ipv4(1, b"\x08\x00\x00\x00\x00\x01\x00\x01ping")
    data = _pcap(276, [sll2 + icmp], big=True, nano=True)
    path = tmp_path / "b.pcap"
    path.write_bytes(data + b"\x00\x00\x00")  # a record header cut short: ignored
    (pkt,) = read_pcap(path)
    assert pkt.protocol == "icmp" and pkt.payload.endswith(b"ping")
    assert pkt.time == pytest.approx(100.0000005)
    v1 = tmp_path / "c.pcap"
    v1.write_bytes(_pcap(113, [sll + _ipv6(58, b"\x80\x00\x00\x00")]))
    assert read_pcap(v1)[0].protocol == "icmpv6"


def test_not_a_pcap_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "x.pcapng"
    path.write_bytes(b"\x0a\x0d\x0d\x0a" + b"\x00" * 40)
    with pytest.raises(TestbedError, match="not a pcap"):
        read_pcap(path)
