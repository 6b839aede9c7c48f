"""TunnelCore: two real aioquic connections joined in memory with an explicit clock."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import struct

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cyphonic.config import ALPN_TUNNEL
from cyphonic_agent.packet import PROTO_UDP, build_ipv4_header, build_ipv6_header, parse_header
from cyphonic_agent.tunnel import (
    TunnelCore,
    datagram_capacity,
    max_datagram_size_for,
    quic_overhead,
    tun_mtu_for,
)

CLIENT_ADDR = ("192.0.2.1", 4433)
SERVER_ADDR = ("192.0.2.2", 443)
A4 = ipaddress.IPv4Address("100.64.0.1").packed
B4 = ipaddress.IPv4Address("100.64.0.2").packed
A6 = ipaddress.IPv6Address("fd00:c1::1").packed
B6 = ipaddress.IPv6Address("fd00:c1::2").packed
MTU = 1420


def self_signed() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "b.cyphonic.internal")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert, key


CERT, KEY = self_signed()


class Pair:
    """A client and a server QuicConnection and a clock; ``pump`` moves datagrams both ways."""

    def __init__(
        self,
        *,
        max_datagram_size: int = max_datagram_size_for(tun_mtu=MTU),
        server_frame_limit: int | None = 65536,
    ) -> None:
        self.now = 1000.0
        client_cfg = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN_TUNNEL],
            max_datagram_frame_size=65536,
            max_datagram_size=max_datagram_size,
            verify_mode=ssl.CERT_NONE,
        )
        server_cfg = QuicConfiguration(
            is_client=False,
            alpn_protocols=[ALPN_TUNNEL],
            max_datagram_frame_size=server_frame_limit,
            max_datagram_size=max_datagram_size,
            certificate=CERT,
            private_key=KEY,
        )
        self.client = QuicConnection(configuration=client_cfg)
        self.client.connect(SERVER_ADDR, now=self.now)
        self.server = QuicConnection(
            configuration=server_cfg,
            original_destination_connection_id=self.client.original_destination_connection_id,
        )

    def pump(self, rounds: int = 20) -> int:
        """Exchange datagrams until quiet; return how many UDP datagrams moved."""
        moved = 0
        for _ in range(rounds):
            step = 0
            for src, dst, addr in (
                (self.client, self.server, CLIENT_ADDR),
                (self.server, self.client, SERVER_ADDR),
            ):
                for data, _ in src.datagrams_to_send(now=self.now):
                    dst.receive_datagram(data, addr, now=self.now)
                    step += 1
            moved += step
            self.now += 0.001
            for conn in (self.client, self.server):
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(now=self.now)
            if step == 0:
                break
        return moved


def cores(pair: Pair, **kwargs: object) -> tuple[TunnelCore, TunnelCore]:
    a = TunnelCore(
        pair.client,
        mtu=MTU,
        peer_addresses=frozenset({B4, B6}),
        local_addresses=frozenset({A4, A6}),
        **kwargs,
    )  # type: ignore[arg-type]
    b = TunnelCore(
        pair.server,
        mtu=MTU,
        peer_addresses=frozenset({A4, A6}),
        local_addresses=frozenset({B4, B6}),
        **kwargs,
    )  # type: ignore[arg-type]
    return a, b


def established(**kwargs: object) -> tuple[Pair, TunnelCore, TunnelCore]:
    pair = Pair()
    a, b = cores(pair, **kwargs)
    pair.pump()
    a.receive_events()
    b.receive_events()
    assert a.ready and b.ready
    return pair, a, b


def udp4(size: int, *, src: bytes = A4, dst: bytes = B4, df: bool = True, tag: int = 0) -> bytes:
    payload = struct.pack("!HHHHI", 1000, 2000, size - 20, 0, tag) + bytes(size - 32)
    return (
        build_ipv4_header(
            src=src,
            dst=dst,
            protocol=PROTO_UDP,
            payload_length=len(payload),
            flags_frag=0x4000 if df else 0,
            ident=tag & 0xFFFF,
        )
        + payload
    )


def udp6(size: int, *, src: bytes = A6, dst: bytes = B6, tag: int = 0) -> bytes:
    payload = struct.pack("!HHHHI", 1000, 2000, size - 40, 0, tag) + bytes(size - 52)
    return (
        build_ipv6_header(src=src, dst=dst, next_header=PROTO_UDP, payload_length=len(payload))
        + payload
    )


def test_sizes_match_the_design() -> None:
    assert quic_overhead() == 30
    assert max_datagram_size_for(tun_mtu=1420) == 1450
    assert tun_mtu_for(path_mtu=1500, ipv6=False) == 1442  # 1500 - 58
    assert tun_mtu_for(path_mtu=1500, ipv6=True) == 1422  # 1500 - 78
    assert tun_mtu_for(path_mtu=1280, ipv6=True) == 1202


def test_capacity_is_exactly_the_mtu() -> None:
    pair, a, _ = established()
    assert datagram_capacity(pair.client) == MTU
    assert datagram_capacity(pair.server) == MTU
    assert a.effective_mtu == MTU


def test_not_ready_before_handshake() -> None:
    pair = Pair()
    a, _ = cores(pair)
    assert not a.ready
    assert a.packets_from_tun([udp4(100)]) == []
    assert a.stats.dropped_not_ready == 1 and a.pending == 0


def test_packets_both_ways_v4_and_v6() -> None:
    pair, a, b = established()
    sent = [udp4(1420, tag=1), udp6(1420, tag=2), udp4(60, tag=3)]
    assert a.packets_from_tun(sent) == []
    pair.pump()
    got, others = b.receive_events()
    assert got == sent and others == []
    reply = [udp4(500, src=B4, dst=A4, tag=4), udp6(1280, src=B6, dst=A6, tag=5)]
    b.packets_from_tun(reply)
    pair.pump()
    assert a.receive_events()[0] == reply
    assert (a.stats.tx_packets, a.stats.rx_packets) == (3, 2)
    assert a.stats.tx_bytes == sum(map(len, sent)) and b.stats.rx_bytes == sum(map(len, sent))
    assert a.rtt is not None and a.rtt > 0


def test_oversized_gets_icmp_and_does_not_block_later_packets() -> None:
    pair, a, b = established()
    big = udp4(1421, tag=9)
    answers = a.packets_from_tun([big, udp4(1000, tag=10)])
    assert len(answers) == 1
    icmp = answers[0]
    h = parse_header(icmp)
    assert (h.src, h.dst, h.protocol) == (B4, A4, 1)
    assert struct.unpack_from("!BBHHH", icmp, 20)[0:2] == (3, 4)
    assert struct.unpack_from("!H", icmp, 26)[0] == MTU
    six = a.packets_from_tun([udp6(1500, tag=11)])
    assert len(six) == 1 and struct.unpack_from("!BBHI", six[0], 40)[3] == MTU
    pair.pump()
    got, _ = b.receive_events()
    assert [struct.unpack_from("!I", p, parse_header(p).header_length + 8)[0] for p in got] == [10]
    assert a.stats.too_big == 2


def test_raw_aioquic_oversized_datagram_blocks_the_rest() -> None:
    """Why the MTU check exists: aioquic itself never sends an oversized DATAGRAM and
    everything queued behind it waits forever."""
    pair, _, b = established()
    pair.client.send_datagram_frame(udp4(1421))  # bypass the core
    pair.client.send_datagram_frame(udp4(100))
    pair.pump()
    got, _ = b.receive_events()
    assert got == []
    assert len(pair.client._datagrams_pending) == 2


def test_ipv4_without_df_is_fragmented() -> None:
    pair, a, b = established()
    assert a.packets_from_tun([udp4(3000, df=False, tag=7)]) == []
    pair.pump()
    got, _ = b.receive_events()
    assert len(got) == 3 and all(len(p) <= MTU for p in got)
    assert b"".join(p[20:] for p in got) == udp4(3000, df=False, tag=7)[20:]
    assert a.stats.fragmented == 1


def test_pending_queue_is_bounded() -> None:
    pair, a, b = established(max_pending=50)
    batch = [udp4(1000, tag=i) for i in range(200)]
    a.packets_from_tun(batch)
    assert a.pending == 50
    assert a.stats.dropped_queue_full == 150 and a.stats.tx_packets == 50
    pair.pump(rounds=200)
    got, _ = b.receive_events()
    assert len(got) == 50  # the first 50, in order
    assert [struct.unpack_from("!I", p, 28)[0] for p in got] == list(range(50))


def test_spoofed_and_malformed_from_peer_dropped() -> None:
    pair, _, b = established()
    other = ipaddress.IPv4Address("100.64.0.99").packed
    pair.client.send_datagram_frame(udp4(100, src=other))  # A claims someone else's address
    pair.client.send_datagram_frame(udp4(100, dst=other))  # not for B
    pair.client.send_datagram_frame(b"\x00\x01junk")
    pair.client.send_datagram_frame(b"")
    pair.client.send_datagram_frame(udp4(100, tag=42))
    pair.pump()
    got, _ = b.receive_events()
    assert len(got) == 1 and struct.unpack_from("!I", got[0], 28)[0] == 42
    assert b.stats.dropped_spoofed == 2 and b.stats.dropped_malformed == 2


def test_other_events_are_passed_on_and_termination_noted() -> None:
    pair, _, b = established()
    stream = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(stream, b"tunnel request", end_stream=True)
    pair.pump()
    _, others = b.receive_events()
    assert any(isinstance(e, StreamDataReceived) and e.data == b"tunnel request" for e in others)
    pair.client.close(error_code=0, reason_phrase="bye")
    pair.pump()
    pair.now += 5.0  # past the draining period (3 PTO), when aioquic reports termination
    pair.server.handle_timer(now=pair.now)
    _, others = b.receive_events()
    assert any(isinstance(e, ConnectionTerminated) for e in others)
    assert not b.ready and b.terminated is not None
    assert b.packets_from_tun([udp4(100, src=B4, dst=A4)]) == []


def test_peer_without_datagram_support_is_never_ready() -> None:
    pair = Pair(server_frame_limit=None)
    # the server refuses DATAGRAM frames, so the client's core must not use them
    a = TunnelCore(pair.client, mtu=MTU)
    pair.pump()
    a.receive_events()
    assert a.handshake_complete and not a.ready
    with pytest.raises(ValueError):
        TunnelCore(pair.server, mtu=MTU)


def test_smaller_peer_limit_lowers_effective_mtu() -> None:
    pair = Pair(server_frame_limit=1203)  # the peer accepts frames of 1203 B: 1200 B payload
    a = TunnelCore(pair.client, mtu=MTU)
    pair.pump()
    a.receive_events()
    assert a.effective_mtu == 1200
    answers = a.packets_from_tun([udp4(1280)])
    assert len(answers) == 1 and struct.unpack_from("!H", answers[0], 26)[0] == 1200
    # IPv6 never hears of less than 1,280: the tunnel fragments such a packet itself.
    assert a.packets_from_tun([udp6(1280)]) == [] and a.stats.fragmented == 1


# --- capability datagrams (partial inner checksums) ----------------------------------------


def _caps_pair(a_partial: bool, b_partial: bool) -> tuple[Pair, TunnelCore, TunnelCore]:
    pair = Pair()
    a = TunnelCore(pair.client, mtu=MTU, partial_checksums=a_partial)
    b = TunnelCore(pair.server, mtu=MTU, partial_checksums=b_partial)
    pair.pump()
    a.receive_events()
    b.receive_events()
    assert a.ready and b.ready
    return pair, a, b


def _exchange(pair: Pair, a: TunnelCore, b: TunnelCore, batches: int = 3) -> list[bytes]:
    """``batches`` batches each way; the IP packets delivered (capability datagrams are not)."""
    delivered: list[bytes] = []
    for i in range(batches):
        a.packets_from_tun([udp4(100, tag=i)])
        b.packets_from_tun([udp4(100, src=B4, dst=A4, tag=i)])
        pair.pump()
        delivered += a.receive_events()[0] + b.receive_events()[0]
    return delivered


def test_capabilities_both_sides_take_partial_checksums() -> None:
    pair, a, b = _caps_pair(True, True)
    assert not a.peer_partial and not b.peer_partial  # nothing said yet: full checksums
    delivered = _exchange(pair, a, b)
    assert a.peer_partial and b.peer_partial
    assert len(delivered) == 6  # the capability datagrams never reach the TUN
    assert a.stats.dropped_malformed == b.stats.dropped_malformed == 0
    sent = a.stats.caps_sent + b.stats.caps_sent
    _exchange(pair, a, b, batches=20)
    # Once confirmed, repeated only every CAPS_EVERY batches.
    assert a.stats.caps_sent + b.stats.caps_sent <= sent + 2


def test_capabilities_a_plain_peer_gets_complete_checksums() -> None:
    pair, a, b = _caps_pair(True, False)
    _exchange(pair, a, b, batches=20)
    assert not a.peer_partial  # b never said it takes them
    assert b.peer_partial  # b knows a would (harmless: b's plain TUN never leaves them)
    assert b.stats.caps_sent == 0


def test_capabilities_recovered_after_a_lost_datagram() -> None:
    pair, a, b = _caps_pair(True, True)
    a.packets_from_tun([udp4(100)])  # carries a's capabilities...
    pair.client.datagrams_to_send(now=pair.now)  # ...which the network loses
    _exchange(pair, a, b, batches=3)
    # b's datagram said it lacked a's, so a's next batch carried them again.
    assert b.peer_partial and a.peer_partial


def test_capabilities_a_changed_mind_is_announced() -> None:
    pair, a, b = _caps_pair(True, True)
    _exchange(pair, a, b)
    assert a.peer_partial
    b.set_partial_checksums(False)  # e.g. its TUN device was reopened plain
    _exchange(pair, a, b, batches=1)
    assert not a.peer_partial


def test_malformed_capability_datagram_is_counted() -> None:
    _pair, a, _b = _caps_pair(True, True)
    assert a.accept(b"\x00XYZ\x01\x01") is None
    assert a.accept(b"\x00CY") is None
    assert a.stats.dropped_malformed == 2 and not a.peer_partial
