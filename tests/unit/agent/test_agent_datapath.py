"""The packet pump: routing by destination, misses, pending release, delivery to the TUN.

The TUN is a pipe here (the pump only reads, writes and selects on a descriptor); the
tunnels are real TunnelCores over aioquic connections joined in memory.
"""

from __future__ import annotations

import asyncio
import gc
import os
import struct
import sys
from collections.abc import Iterator

import pytest
from cyphonic.policy import CompiledFilter, DropReason, PacketFilter
from cyphonic_agent.datapath import (
    SCHED_SLICE_S,
    SWITCH_INTERVAL_S,
    DataPath,
    Tunnel,
    request_time_slice,
)
from cyphonic_agent.offload import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    PLAIN_HEADER,
    VNET_HDR_LEN,
    VnetHeader,
    complete_checksum,
    fold,
    pseudo_sum,
    segments_of_write,
    verify_l4_checksum,
)
from cyphonic_agent.packet import internet_checksum
from cyphonic_agent.pending import PendingPackets
from cyphonic_agent.tun import TunStats
from cyphonic_agent.tunnel import TunnelCore
from test_agent_offload import DST4 as O_DST
from test_agent_offload import SRC4 as O_SRC
from test_agent_offload import super_segment, tcp_packet
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
        self.datagrams_done = None
        self.transmits = 0
        self.now = False

    def transmit(self, *, now: bool = False) -> None:
        self.transmits += 1
        self.now = now


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


async def test_start_bounds_the_gil_switch_interval(tun: PipeTun) -> None:
    """While the pump runs, another thread holding the GIL delays it at most ~0.5 ms, and
    the collector's full passes leave out what existed when it started."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # CPython's default
    try:
        datapath = DataPath(tun=tun)
        datapath.start()
        assert sys.getswitchinterval() <= SWITCH_INTERVAL_S
        assert gc.get_freeze_count() > 0  # long-lived objects out of full collections
        datapath.stop()
        sys.setswitchinterval(0.0001)
        datapath.start()  # a shorter one set elsewhere is kept
        assert sys.getswitchinterval() == pytest.approx(0.0001)
        datapath.stop()
    finally:
        sys.setswitchinterval(old)
        gc.unfreeze()


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


# --- a TUN with offloads ---------------------------------------------------------------------


class VnetTun(PipeTun):
    """A TUN with offloads: frames carry a virtio_net_hdr; writes are gather lists."""

    vnet = True
    offloads = 0x07

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[bytes] = []
        self.reads: list[tuple[int, int | None]] = []
        self.queued: list[bytes] = []

    def read(self, limit: int = 128, budget: int | None = None) -> list[bytes]:
        self.reads.append((limit, budget))
        out: list[bytes] = []
        while self.queued and len(out) < limit and (budget is None or budget > 0):
            out.append(self.queued.pop(0))
            if budget is not None:
                budget -= len(out[-1])
        return out

    def write_frames(self, writes: list[list[bytes | bytearray | memoryview]]) -> int:
        self.frames += [b"".join(bytes(x) for x in w) for w in writes]
        return len(writes)

    def write(self, packets: list[bytes]) -> int:
        self.icmp += packets
        return len(packets)


def _tcp_super_segment(count: int, mss: int = 1368) -> bytes:
    payload = bytes(range(256)) * (count * mss // 256 + 1)
    return super_segment(False, 1000, payload[: count * mss], mss)


async def test_offload_pump_splits_negotiates_and_coalesces() -> None:
    # The offload test's addresses are the tunnel's here: A sends, B receives.
    assert (O_SRC, O_DST) == (A4, B4)
    pair, a, b = tunnel_pair()
    tun_a, tun_b = VnetTun(), VnetTun()
    conn_a, conn_b = FakeConn(), FakeConn()
    dp_a, dp_b = DataPath(tun=tun_a), DataPath(tun=tun_b)
    dp_a.add_tunnel(Tunnel(core=a, conn=conn_a, addresses=frozenset({B4}), label="b"))
    dp_b.add_tunnel(Tunnel(core=b, conn=conn_b, addresses=frozenset({A4}), label="a"))
    dp_a.start()
    dp_b.start()

    async def deliver() -> None:
        """One endpoint wake-up: every datagram to the handlers, then the loop runs on."""
        pair.pump()
        for core, conn in ((a, conn_a), (b, conn_b)):
            while (event := core.quic.next_event()) is not None:
                data = getattr(event, "data", None)
                if data is not None and conn.datagram_handler is not None:
                    conn.datagram_handler(data)
            if conn.datagrams_done is not None:
                conn.datagrams_done()  # as the endpoint does before its transmit pass
        await asyncio.sleep(0)

    frame = _tcp_super_segment(10)
    # Nothing said yet: A completes every checksum, and says it takes partial ones.
    dp_a.route([frame])
    assert dp_a.stats.super_segments == 1 and dp_a.stats.segments_out == 10
    await deliver()  # B gathers the ten, then writes them at once, coalesced
    assert len(tun_b.frames) == 1
    hdr = VnetHeader.unpack(tun_b.frames[0])
    assert (hdr.flags, hdr.gso_type, hdr.gso_size, hdr.csum_start, hdr.csum_offset) == (
        F_NEEDS_CSUM,
        GSO_TCPV4,
        1368,
        20,
        16,
    )
    segments = segments_of_write([tun_b.frames[0]])
    assert len(segments) == 10 and all(verify_l4_checksum(s) for s in segments)
    # B answers (an ACK): its capabilities reach A, which then leaves checksums partial.
    ack = VnetHeader().pack() + _plain_ack()
    dp_b.route([ack])
    await deliver()
    assert a.peer_partial and b.peer_partial
    dp_a.route([_tcp_super_segment(5)])
    await deliver()
    assert len(tun_b.frames) == 2
    # What B's kernel makes of the second write is right all the same.
    assert all(verify_l4_checksum(s) for s in segments_of_write([tun_b.frames[1]]))
    dp_a.stop()
    dp_b.stop()


def _plain_ack() -> bytes:
    """A pure ACK from B to A (checksums complete)."""
    head = bytearray(tcp_packet(False, 1, b""))
    head[12:16], head[16:20] = B4, A4
    head[10:12] = b"\0\0"
    head[10:12] = struct.pack("!H", internet_checksum(bytes(head[:20])))
    head[36:38] = struct.pack("!H", fold(pseudo_sum(B4, A4, 6, len(head) - 20)))
    return complete_checksum(bytes(head), 20, 16)


def test_offload_reads_stop_at_the_tunnel_queue_room() -> None:
    _pair, a, _b = tunnel_pair()
    tun = VnetTun()
    dp = DataPath(tun=tun)
    dp.add_tunnel(Tunnel(core=a, conn=FakeConn(), addresses=frozenset({B4}), label="b"))
    tun.queued = [_tcp_super_segment(40)] * 3
    dp._on_tun_readable()  # no tunnel served yet: a full batch may be read
    assert tun.reads[-1] == (128, None)
    assert a.stats.dropped_queue_full == 0
    # The tunnel now holds 3 x 40 datagrams (nothing transmits them in this test): the next
    # read is limited so that a whole 64 KB read still fits the 256-datagram queue.
    tun.queued = [_tcp_super_segment(40)] * 10
    room = a.max_pending - a.pending - 1
    assert a.pending >= 120
    dp._on_tun_readable()
    limit, budget = tun.reads[-1]
    assert limit == min(128, room) and budget is not None and budget <= (room - 48) * MTU
    dp._on_tun_readable()
    dp._on_tun_readable()
    # Never more than the queue holds: nothing dropped, however much was offered.
    assert a.stats.dropped_queue_full == 0 and a.pending <= a.max_pending


def _reply(packet: bytes) -> bytes:
    """``packet`` (IPv4 UDP) with addresses and ports swapped: the answer to it."""
    return packet[:12] + packet[16:20] + packet[12:16] + packet[22:24] + packet[20:22] + packet[24:]


def test_access_policy_filter_on_both_directions(tun: PipeTun) -> None:
    """Packets from a tunnel pass the access-policy filter before the TUN write: one the
    policy does not allow is dropped (counted); the reply to a flow this node opened
    through the pump passes."""
    pf = PacketFilter(CompiledFilter(revision=1))  # nobody may start anything here
    dp = DataPath(tun=tun, packet_filter=pf)
    _, a, _ = tunnel_pair()
    conn = FakeConn()
    dp.add_tunnel(Tunnel(core=a, conn=conn, addresses=frozenset({B4}), label="b"))
    assert conn.datagram_handler is not None
    unsolicited = udp4(300, src=B4, dst=A4, tag=1)
    conn.datagram_handler(unsolicited)
    assert tun.delivered() == b"" and pf.dropped[DropReason.NOT_ALLOWED] == 1
    mine = udp4(300, src=A4, dst=B4, tag=2)
    dp.route([mine])  # this node opens the flow
    answer = _reply(mine)
    conn.datagram_handler(answer)
    assert tun.delivered() == answer and pf.passed == 1


class EchoTun(VnetTun):
    """A TUN whose kernel answers every packet written to it at once (an echo reply), as
    a real one does inside the write for ping or a TCP ACK."""

    def write_frames(self, writes: list[list[bytes | bytearray | memoryview]]) -> int:
        n = super().write_frames(writes)
        for frame in self.frames[-n:]:
            self.queued.append(PLAIN_HEADER + _reply(frame[VNET_HDR_LEN:]))
        return n


async def test_one_wake_up_per_hop() -> None:
    """A wake-up that brought datagrams writes them, reads what the kernel answered and
    queues it for the peer before the endpoint's transmit pass; a TUN read is sent at once
    (``transmit(now=True)``), not after another loop iteration."""
    tun = EchoTun()
    pair, a, b = tunnel_pair()
    conn = FakeConn()
    dp = DataPath(tun=tun)
    dp.add_tunnel(Tunnel(core=a, conn=conn, addresses=frozenset({B4}), label="b"))
    assert conn.datagram_handler is not None and conn.datagrams_done == dp.datagrams_done
    dp.start()
    try:
        request = udp4(300, src=B4, dst=A4, tag=7)
        conn.datagram_handler(request)
        assert tun.frames == []  # gathered until the endpoint has handed over its batch
        conn.datagrams_done()
        (written,) = (f[VNET_HDR_LEN:] for f in tun.frames)
        assert len(written) == len(request) and written[12:24] == request[12:24]
        assert tun.queued == []  # the answer was read in the same call ...
        assert a.stats.tx_packets == 1 and conn.transmits == 1 and conn.now  # ... and sent
        pair.pump()
        got = b.receive_events()[0]
        assert [g[12:24] for g in got] == [_reply(written)[12:24]]
        tun.queued.append(PLAIN_HEADER + udp4(200, src=A4, dst=B4))
        dp._on_tun_readable()
        assert a.stats.tx_packets == 2 and conn.transmits == 2 and conn.now
    finally:
        dp.stop()
        gc.unfreeze()


def test_time_slice_request_is_harmless_where_unsupported() -> None:
    """0 asks for nothing; elsewhere the answer says whether the kernel took it (Linux
    >= 6.12 on x86_64/aarch64), and never raises."""
    assert request_time_slice(0) is False
    assert isinstance(request_time_slice(SCHED_SLICE_S), bool)
