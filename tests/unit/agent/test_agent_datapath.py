"""The packet pump: routing by destination, misses, pending release, delivery to the TUN.

The TUN is a pipe here (the pump only reads, writes and selects on a descriptor); the
tunnels are real TunnelCores over aioquic connections joined in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from cyphonic_agent.datapath import DataPath, Tunnel
from cyphonic_agent.pending import PendingPackets
from cyphonic_agent.tun import TunStats
from cyphonic_agent.tunnel import TunnelCore
from test_agent_tunnel import A4, A6, B4, B6, MTU, Pair, udp4, udp6

C4 = bytes([100, 64, 0, 3])


class PipeTun:
    """Stands in for TunDevice: ``written`` is what the pump delivered to applications."""

    def __init__(self) -> None:
        self.read_fd, self.fd = os.pipe()  # the pump writes delivered packets to ``fd``
        os.set_blocking(self.read_fd, False)
        self.name = "pipe0"
        self.stats = TunStats()
        self.icmp: list[bytes] = []

    def read(self, limit: int = 128) -> list[bytes]:
        return []

    def write(self, packets: list[bytes]) -> int:
        self.icmp += packets
        return len(packets)

    def delivered(self) -> bytes:
        try:
            return os.read(self.read_fd, 1 << 20)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.fd)


class FakeConn:
    def __init__(self) -> None:
        self.datagram_handler = None
        self.transmits = 0

    def transmit(self) -> None:
        self.transmits += 1


@pytest.fixture
def tun() -> Iterator[PipeTun]:
    t = PipeTun()
    yield t
    t.close()


def tunnel_pair() -> tuple[Pair, TunnelCore, TunnelCore]:
    pair = Pair()
    a = TunnelCore(
        pair.client,
        mtu=MTU,
        peer_addresses=frozenset({B4, B6}),
        local_addresses=frozenset({A4, A6}),
    )
    b = TunnelCore(
        pair.server,
        mtu=MTU,
        peer_addresses=frozenset({A4, A6}),
        local_addresses=frozenset({B4, B6}),
    )
    pair.pump()
    assert a.ready and b.ready
    return pair, a, b


def test_miss_queues_and_reports_once_then_tunnel_releases(tun: PipeTun) -> None:
    misses: list[bytes] = []
    clock = [0.0]
    dp = DataPath(
        tun=tun,
        pending=PendingPackets(max_packets=8),
        on_miss=misses.append,
        clock=lambda: clock[0],
    )
    dp.route([udp4(100, tag=1), udp4(100, tag=2), udp6(100, tag=3), b"\x00junk"])
    assert misses == [B4, B6]  # once per destination, not per packet
    assert dp.stats.no_route == 3 and dp.stats.not_ip == 1
    pair, a, b = tunnel_pair()
    conn = FakeConn()
    dp.add_tunnel(Tunnel(core=a, conn=conn, addresses=frozenset({B4, B6}), label="b"))
    assert conn.transmits == 1 and a.stats.tx_packets == 3  # the waiting packets left
    assert not dp.pending.is_waiting(B4)
    pair.pump()
    got, _ = b.receive_events()
    assert got == [udp4(100, tag=1), udp4(100, tag=2), udp6(100, tag=3)]


def test_batch_goes_to_each_tunnel_with_one_transmit(tun: PipeTun) -> None:
    dp = DataPath(tun=tun)
    _, a, _ = tunnel_pair()
    _, c, _ = tunnel_pair()
    ca, cc = FakeConn(), FakeConn()
    dp.add_tunnel(Tunnel(core=a, conn=ca, addresses=frozenset({B4}), label="b"))
    dp.add_tunnel(Tunnel(core=c, conn=cc, addresses=frozenset({C4}), label="c"))
    batch = [udp4(200, tag=i) for i in range(10)]
    batch += [udp4(200, dst=C4, tag=i) for i in range(5)] + [udp4(200, tag=99)]
    dp.route(batch)
    assert (a.stats.tx_packets, c.stats.tx_packets) == (11, 5)
    assert (ca.transmits, cc.transmits) == (1, 1)
    assert len(dp.tunnels()) == 2


def test_oversized_answered_into_the_tun(tun: PipeTun) -> None:
    dp = DataPath(tun=tun)
    _, a, _ = tunnel_pair()
    dp.add_tunnel(Tunnel(core=a, conn=FakeConn(), addresses=frozenset({B4}), label="b"))
    dp.route([udp4(MTU + 1)])
    assert len(tun.icmp) == 1 and tun.icmp[0][20] == 3  # ICMP destination unreachable


def test_delivery_from_peer_and_removal(tun: PipeTun) -> None:
    dp = DataPath(tun=tun)
    _, a, _ = tunnel_pair()
    conn = FakeConn()
    tunnel = Tunnel(core=a, conn=conn, addresses=frozenset({B4}), label="b")
    dp.add_tunnel(tunnel)
    assert conn.datagram_handler is not None
    good = udp4(300, src=B4, dst=A4, tag=5)
    conn.datagram_handler(good)
    conn.datagram_handler(udp4(300, src=C4, dst=A4))  # spoofed: not written
    assert tun.delivered() == good
    assert tun.stats.tx_packets == 1 and a.stats.dropped_spoofed == 1
    dp.remove_tunnel(tunnel)
    assert conn.datagram_handler is None and dp.tunnels() == []
    misses: list[bytes] = []
    dp.on_miss = misses.append
    dp.route([udp4(100)])
    assert misses == [B4]


def test_tunnel_status_row(tun: PipeTun) -> None:
    pair, a, _ = tunnel_pair()
    conn = FakeConn()
    conn.peer_address = ("2001:db8::7", 443)  # type: ignore[attr-defined]
    tunnel = Tunnel(core=a, conn=conn, addresses=frozenset({B4, B6}), label="b.x", pattern="direct")
    DataPath(tun=tun).add_tunnel(tunnel)
    a.packets_from_tun([udp4(1000), udp6(500)])
    pair.pump()
    row = tunnel.status()
    assert (row.fqdn, row.state, row.pattern) == ("b.x", "up", "direct")
    assert (row.virtual_ipv4, row.virtual_ipv6) == ("100.64.0.2", "fd00:c1::2")
    assert row.path == "[2001:db8::7]:443" and row.mtu == MTU
    assert (row.tx_packets, row.tx_bytes) == (2, 1500)
    assert row.rtt_ms is not None and row.rtt_ms > 0
    pair.client.close()
    assert tunnel.status().state == "down"
