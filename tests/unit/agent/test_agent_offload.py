"""TUN offloads (cyphonic_agent.offload): split and coalesce, checked independently.

Checksums are verified here with a plain word-by-word RFC 1071 loop, not with the module's
own arithmetic; super-segments are built the way the kernel hands them over (IP total length
of the whole, TCP checksum field holding the pseudo-header seed, NEEDS_CSUM).
"""

from __future__ import annotations

import random
import struct

import pytest
from cyphonic.errors import MalformedMessage
from cyphonic_agent import offload
from cyphonic_agent.offload import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    PLAIN_HEADER,
    TCP_ACK,
    TCP_CWR,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    Coalescer,
    VnetHeader,
    segments_of_write,
    split_frame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SRC4, DST4 = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
SRC6 = bytes.fromhex("fd00000000000000000000000000000a")
DST6 = bytes.fromhex("fd00000000000000000000000000000b")


# --- independent reference arithmetic ----------------------------------------------------


def rfc1071(data: bytes) -> int:
    """One's complement of the one's complement sum, word by word (the RFC's own loop)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo(packet: bytes, l4_len: int, proto: int) -> bytes:
    if packet[0] >> 4 == 4:
        return packet[12:20] + struct.pack("!BBH", 0, proto, l4_len)
    return packet[8:40] + struct.pack("!IxxxB", l4_len, proto)


def l4_start(packet: bytes) -> int:
    return (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40


def l4_checksum_valid(packet: bytes) -> bool:
    off = l4_start(packet)
    proto = packet[9] if packet[0] >> 4 == 4 else packet[6]
    return rfc1071(pseudo(packet, len(packet) - off, proto) + packet[off:]) == 0


def ip_ok(packet: bytes) -> bool:
    if packet[0] >> 4 == 6:
        return struct.unpack_from("!H", packet, 4)[0] == len(packet) - 40
    ihl = (packet[0] & 0x0F) * 4
    return rfc1071(packet[:ihl]) == 0 and struct.unpack_from("!H", packet, 2)[0] == len(packet)


def fold_ref(value: int) -> int:
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    return value


def seed_of(packet: bytes, l4_len: int, proto: int) -> int:
    """The folded (not complemented) pseudo-header sum, as the kernel stores it."""
    data = pseudo(packet, l4_len, proto)
    return fold_ref(sum(struct.unpack(f"!{len(data) // 2}H", data)))


# --- packet builders -----------------------------------------------------------------------


def ip_header(v6: bool, proto: int, l4_len: int, *, ident: int = 7, tos: int = 0) -> bytes:
    if v6:
        return struct.pack("!IHBB16s16s", 6 << 28, l4_len, proto, 64, SRC6, DST6)
    head = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, tos, 20 + l4_len, ident, 0x4000, 64, proto, 0, SRC4, DST4
        )
    )
    head[10:12] = struct.pack("!H", rfc1071(bytes(head)))
    return bytes(head)


def tcp_packet(
    v6: bool,
    seq: int,
    payload: bytes,
    *,
    flags: int = TCP_ACK,
    options: bytes = b"",
    sport: int = 40000,
    dport: int = 5201,
    ack: int = 1000,
    window: int = 512,
    ident: int = 7,
    checksum: bool = True,
) -> bytes:
    doff = (20 + len(options)) // 4
    tcp = bytearray(
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0, 0) + options
    )
    l4_len = len(tcp) + len(payload)
    head = ip_header(v6, 6, l4_len, ident=ident)
    packet = head + bytes(tcp) + payload
    if checksum:
        csum = rfc1071(pseudo(packet, l4_len, 6) + packet[len(head) :])
    else:
        csum = seed_of(packet, l4_len, 6)
    off = len(head) + 16
    return packet[:off] + struct.pack("!H", csum) + packet[off + 2 :]


def udp_packet(
    v6: bool, payload: bytes, *, sport: int = 5000, dport: int = 6000, ident: int = 7
) -> bytes:
    l4_len = 8 + len(payload)
    head = ip_header(v6, 17, l4_len, ident=ident)
    packet = head + struct.pack("!HHHH", sport, dport, l4_len, 0) + payload
    csum = rfc1071(pseudo(packet, l4_len, 17) + packet[len(head) :]) or 0xFFFF
    off = len(head) + 6
    return packet[:off] + struct.pack("!H", csum) + packet[off + 2 :]


def super_segment(v6: bool, seq: int, payload: bytes, mss: int, **kw: object) -> bytes:
    """A TSO frame as the kernel's TUN read returns it."""
    packet = tcp_packet(v6, seq, payload, checksum=False, **kw)  # type: ignore[arg-type]
    l4 = 40 if v6 else 20
    hdr_len = l4 + (packet[l4 + 12] >> 4) * 4
    hdr = VnetHeader(
        flags=F_NEEDS_CSUM,
        gso_type=GSO_TCPV6 if v6 else GSO_TCPV4,
        hdr_len=hdr_len,
        gso_size=mss,
        csum_start=l4,
        csum_offset=16,
    )
    return hdr.pack() + packet


def tcp_fields(packet: bytes) -> tuple[int, int, bytes]:
    off = l4_start(packet)
    seq = struct.unpack_from("!I", packet, off + 4)[0]
    doff = (packet[off + 12] >> 4) * 4
    return seq, packet[off + 13], packet[off + doff :]


OPTIONS = st.sampled_from(
    [
        b"",
        b"\x01\x01\x08\x0a\x00\x00\x10\x00\x00\x00\x20\x00",  # NOP NOP timestamps
        b"\x01\x01\x05\x0a" + bytes(8),  # NOP NOP SACK one block
        b"\x01\x01\x08\x0a\x00\x00\x10\x00\x00\x00\x20\x00\x01\x01\x05\x0a" + bytes(8),
    ]
)


# --- virtio_net_hdr ------------------------------------------------------------------------


def test_vnet_header_is_little_endian() -> None:
    hdr = VnetHeader(
        flags=1, gso_type=GSO_TCPV4, hdr_len=52, gso_size=1368, csum_start=20, csum_offset=16
    )
    assert hdr.pack() == bytes([1, 1, 52, 0, 0x58, 0x05, 20, 0, 16, 0])
    assert VnetHeader.unpack(hdr.pack()) == hdr
    with pytest.raises(MalformedMessage):
        VnetHeader.unpack(b"\x00" * 9)


# --- split ---------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    v6=st.booleans(),
    size=st.integers(1, 12000),
    mss=st.integers(1, 1440),
    seq=st.integers(0, 2**32 - 1),
    options=OPTIONS,
    flags=st.sampled_from(
        [TCP_ACK, TCP_ACK | TCP_PSH, TCP_ACK | TCP_FIN | TCP_PSH, TCP_ACK | TCP_CWR]
    ),
    partial=st.booleans(),
    data=st.data(),
)
def test_split_tcp_super_segment(
    v6: bool,
    size: int,
    mss: int,
    seq: int,
    options: bytes,
    flags: int,
    partial: bool,
    data: st.DataObject,
) -> None:
    payload = data.draw(st.binary(min_size=size, max_size=size))
    frame = super_segment(v6, seq, payload, mss, options=options, flags=flags, ident=65534)
    packets = split_frame(frame, partial=partial)
    assert len(packets) == -(-size // mss)
    joined = b""
    for i, p in enumerate(packets):
        last = i == len(packets) - 1
        assert ip_ok(p)
        s, f, body = tcp_fields(p)
        assert s == (seq + i * mss) % 2**32
        assert len(body) == (mss if not last else size - i * mss)
        expect = flags
        if not last:
            expect &= ~(TCP_FIN | TCP_PSH)
        if i:
            expect &= ~TCP_CWR
        assert f == expect
        l4 = l4_start(p)
        assert p[l4 + 20 : l4 + 20 + len(options)] == options
        if not v6:
            assert struct.unpack_from("!H", p, 4)[0] == (65534 + i) % 65536
        if partial:
            field = struct.unpack_from("!H", p, l4 + 16)[0]
            assert fold_ref(field) == fold_ref(seed_of(p, len(p) - l4, 6)) or (
                field == 0xFFFF and seed_of(p, len(p) - l4, 6) in (0, 0xFFFF)
            )
        else:
            assert l4_checksum_valid(p)
        joined += body
    assert joined == payload


@settings(max_examples=60, deadline=None)
@given(
    v6=st.booleans(), size=st.integers(0, 5000), each=st.integers(1, 1400), partial=st.booleans()
)
def test_split_udp_super_segment(v6: bool, size: int, each: int, partial: bool) -> None:
    payload = random.Random(size).randbytes(size)
    packet = udp_packet(v6, payload)
    hdr = VnetHeader(
        flags=F_NEEDS_CSUM,
        gso_type=GSO_UDP_L4,
        gso_size=each,
        csum_start=l4_start(packet),
        csum_offset=6,
    )
    out = split_frame(hdr.pack() + packet, partial=partial)
    assert len(out) == max(1, -(-size // each))
    joined = b""
    for p in out:
        assert ip_ok(p)
        off = l4_start(p)
        assert struct.unpack_from("!H", p, off + 4)[0] == len(p) - off
        if not partial:
            assert l4_checksum_valid(p)
        joined += p[off + 8 :]
    assert joined == payload


@pytest.mark.parametrize("v6", [False, True])
def test_needs_csum_single_completed_or_left_partial(v6: bool) -> None:
    packet = tcp_packet(v6, 5, b"hello world!", checksum=False)
    l4 = l4_start(packet)
    frame = VnetHeader(flags=F_NEEDS_CSUM, csum_start=l4, csum_offset=16).pack() + packet
    (done,) = split_frame(frame, partial=False)
    assert l4_checksum_valid(done)
    assert done[: l4 + 16] == packet[: l4 + 16] and done[l4 + 18 :] == packet[l4 + 18 :]
    (left,) = split_frame(frame, partial=True)
    assert left == packet  # the seed travels; the peer's kernel completes it
    plain = PLAIN_HEADER + b"\x45anything"
    assert split_frame(plain, partial=False) == [b"\x45anything"]


def test_split_refuses_malformed_frames() -> None:
    good = super_segment(False, 1, b"x" * 3000, 1000)
    for bad in (
        good[:8],
        good[:10] + b"\x60" + good[11:],  # TCPV4 announced, IPv6 inside
        VnetHeader(gso_type=GSO_TCPV4, gso_size=0).pack() + good[10:],
        VnetHeader(gso_type=GSO_TCPV4, gso_size=100).pack() + good[10:30],
        VnetHeader(gso_type=9, gso_size=100).pack() + good[10:],
        VnetHeader(flags=F_NEEDS_CSUM, csum_start=5000, csum_offset=16).pack() + good[10:],
    ):
        with pytest.raises(MalformedMessage):
            split_frame(bad, partial=False)


# --- coalesce ------------------------------------------------------------------------------


def check_write(write: list[bytes | memoryview]) -> list[bytes]:
    """Independent checks of one TUN write; returns the segments the kernel would make."""
    frame = b"".join(bytes(x) for x in write)
    hdr = VnetHeader.unpack(frame)
    packet = frame[10:]
    assert ip_ok(packet)
    if hdr.gso_type in (GSO_TCPV4, GSO_TCPV6):
        l4 = l4_start(packet)
        assert hdr.flags == F_NEEDS_CSUM
        assert hdr.gso_type == (GSO_TCPV6 if packet[0] >> 4 == 6 else GSO_TCPV4)
        assert hdr.csum_start == l4 and hdr.csum_offset == 16
        assert hdr.hdr_len == l4 + (packet[l4 + 12] >> 4) * 4
        assert len(packet) - hdr.hdr_len > hdr.gso_size > 0
        field = struct.unpack_from("!H", packet, l4 + 16)[0]
        assert fold_ref(field) == seed_of(packet, len(packet) - l4, 6) or field == 0xFFFF
    segments = segments_of_write(write)
    for s in segments:
        assert ip_ok(s)
        if s[0] >> 4 in (4, 6) and (s[9] if s[0] >> 4 == 4 else s[6]) in (6, 17):
            assert l4_checksum_valid(s)
    return segments


def flow_segments(
    v6: bool,
    sport: int,
    seq: int,
    sizes: list[int],
    options: bytes = b"",
    last_flags: int = TCP_ACK,
) -> list[bytes]:
    out = []
    for i, n in enumerate(sizes):
        flags = last_flags if i == len(sizes) - 1 else TCP_ACK
        out.append(
            tcp_packet(
                v6,
                seq,
                bytes([i % 256]) * n,
                flags=flags,
                options=options,
                sport=sport,
                ident=(sport + i) % 65536,  # a sender's IPv4 identification counts up
            )
        )
        seq = (seq + n) % 2**32
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    v6=st.booleans(),
    mss=st.integers(1, 1400),
    count=st.integers(1, 60),
    tail=st.integers(0, 1400),
    seq=st.integers(0, 2**32 - 1),
    options=OPTIONS,
    last_flags=st.sampled_from([TCP_ACK, TCP_ACK | TCP_PSH, TCP_ACK | TCP_FIN]),
)
def test_coalesce_in_order_flow_round_trips(
    v6: bool, mss: int, count: int, tail: int, seq: int, options: bytes, last_flags: int
) -> None:
    sizes = [mss] * count + ([min(tail, mss)] if tail else [])
    packets = flow_segments(v6, 40000, seq, sizes, options, last_flags)
    writes = Coalescer().coalesce(packets)
    out = [s for w in writes for s in check_write(w)]
    assert out == packets  # what the kernel makes of the writes is exactly what was sent
    mergeable = len(packets) - (1 if last_flags & TCP_FIN else 0)
    if mergeable > 1:
        # All but a FIN (never merged) fit in as few 64 KB writes as possible.
        per_write = 65535 - (40 if v6 else 20) - 20 - len(options)
        assert len(writes) <= -(-sum(sizes) // per_write) + (mergeable > 64) + 2


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    v6=st.booleans(),
    flows=st.integers(1, 4),
    per_flow=st.integers(1, 12),
    mss=st.integers(1, 1400),
    swaps=st.integers(0, 5),
    seed=st.integers(0, 2**32),
)
def test_coalesce_mixed_and_out_of_order_flows(
    v6: bool, flows: int, per_flow: int, mss: int, swaps: int, seed: int
) -> None:
    rng = random.Random(seed)
    streams = [
        flow_segments(v6, 40000 + f, rng.randrange(2**32), [mss] * per_flow) for f in range(flows)
    ]
    # Interleave the flows at random, keeping each flow's order...
    order = [f for f in range(flows) for _ in range(per_flow)]
    rng.shuffle(order)
    cursors = [0] * flows
    packets = []
    for f in order:
        packets.append(streams[f][cursors[f]])
        cursors[f] += 1
    # ...then swap a few neighbours (reordering on the way).
    for _ in range(swaps):
        i = rng.randrange(len(packets))
        j = min(i + 1, len(packets) - 1)
        packets[i], packets[j] = packets[j], packets[i]
    writes = Coalescer().coalesce(packets)
    seen: dict[bytes, list[bytes]] = {}
    for w in writes:
        segs = check_write(w)
        ports = {s[l4_start(s) : l4_start(s) + 4] for s in segs}
        assert len(ports) == 1  # one flow per write
        seqs = [tcp_fields(s)[0] for s in segs]
        for a, s_next, body in zip(seqs, seqs[1:], segs, strict=False):
            assert s_next == (a + len(tcp_fields(body)[2])) % 2**32  # in order within a write
        seen.setdefault(ports.pop(), []).extend(segs)
    # Nothing lost, nothing added, and each flow's packets in the order they came.
    for stream in streams:
        key = stream[0][l4_start(stream[0]) : l4_start(stream[0]) + 4]
        assert seen[key] == [p for p in packets if p[l4_start(p) : l4_start(p) + 4] == key]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("flag", [TCP_SYN, TCP_RST, TCP_FIN, TCP_CWR, TCP_SYN | TCP_ACK])
def test_control_segments_are_never_merged(v6: bool, flag: int) -> None:
    a, b, c = flow_segments(v6, 1, 100, [500, 500, 500])
    s, _, body = tcp_fields(b)
    odd = tcp_packet(v6, s, body, flags=flag, sport=1)
    writes = Coalescer().coalesce([a, odd, c])
    assert len(writes) == 3
    assert [s for w in writes for s in check_write(w)] == [a, odd, c]


@pytest.mark.parametrize("v6", [False, True])
def test_psh_ends_a_write_and_differing_headers_split(v6: bool) -> None:
    a, b, c, d = flow_segments(v6, 1, 100, [700] * 4)
    b = tcp_packet(v6, tcp_fields(b)[0], tcp_fields(b)[2], flags=TCP_ACK | TCP_PSH, sport=1)
    writes = Coalescer().coalesce([a, b, c, d])
    assert len(writes) == 2  # a+b (PSH ends it), c+d
    assert writes[0][1][(40 if v6 else 20) + 13] & TCP_PSH
    # Another ACK number or window: not merged.
    e = tcp_packet(v6, 800, b"z" * 700, ack=2000, sport=1)
    f = tcp_packet(v6, 800, b"z" * 700, window=9, sport=1)
    assert len(Coalescer().coalesce([a, tcp_packet(v6, 800, b"z" * 700, sport=1)])) == 1
    assert len(Coalescer().coalesce([a, e])) == 2
    assert len(Coalescer().coalesce([a, f])) == 2
    # A shorter segment may end a write, a longer one after it starts a new one.
    short = tcp_packet(v6, 800, b"s" * 300, sport=1)
    longer = tcp_packet(v6, 1100, b"l" * 700, sport=1)
    assert len(Coalescer().coalesce([a, short, longer])) == 2


def test_non_tcp_packets_pass_through_in_place() -> None:
    icmp = ip_header(False, 1, 8) + b"\x08\x00\xf7\xff\x00\x00\x00\x00"
    frag = bytearray(tcp_packet(False, 1, b"q" * 100))
    frag[6] |= 0x20  # MF: a fragment is never touched
    frag[10:12] = b"\0\0"
    frag[10:12] = struct.pack("!H", rfc1071(bytes(frag[:20])))
    udp = udp_packet(True, b"u" * 99)
    garbage = b"\x00\x01\x02"
    a, b = flow_segments(False, 1, 100, [600, 600])
    writes = Coalescer().coalesce([a, icmp, bytes(frag), udp, garbage, b])
    frames = [b"".join(bytes(x) for x in w) for w in writes]
    assert frames[1] == PLAIN_HEADER + icmp
    assert frames[2] == PLAIN_HEADER + bytes(frag)
    assert frames[4] == PLAIN_HEADER + garbage
    # UDP (no USO): written alone, its checksum left for the kernel (NEEDS_CSUM at 6).
    hdr = VnetHeader.unpack(frames[3])
    assert (hdr.flags, hdr.gso_type, hdr.csum_start, hdr.csum_offset) == (1, GSO_NONE, 40, 6)
    assert check_write(writes[3]) == [udp]
    assert check_write(writes[0]) == [a, b]


@pytest.mark.parametrize("v6", [False, True])
def test_udp_coalescing_where_uso_is_on(v6: bool) -> None:
    same = [udp_packet(v6, bytes([i]) * 1000, ident=i) for i in range(5)]
    short = udp_packet(v6, b"t" * 10, ident=5)
    other = udp_packet(v6, b"o" * 1000, dport=7000)
    packets = [*same, short, other, same[0]]
    off = Coalescer(udp=False).coalesce(packets)
    assert len(off) == len(packets)
    coalescer = Coalescer(udp=True)
    on = coalescer.coalesce(packets)
    assert (coalescer.udp_super_packets, coalescer.tcp_super_packets) == (1, 0)
    assert [VnetHeader.unpack(bytes(w[0])).gso_type for w in on] == [GSO_UDP_L4, GSO_NONE, GSO_NONE]
    assert [s for w in on for s in check_write(w)] == packets


def test_partial_checksum_helpers_agree_with_reference() -> None:
    for v6 in (False, True):
        p = tcp_packet(v6, 9, b"abc")
        assert offload.verify_l4_checksum(p)
        left = offload.with_partial_checksum(p)
        assert left is not None
        seeded, off = left
        assert struct.unpack_from("!H", seeded, off + 16)[0] == seed_of(p, len(p) - off, 6)
        assert l4_checksum_valid(offload.complete_checksum(seeded, off, 16))
