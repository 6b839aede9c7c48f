"""The UDP glue on loopback sockets: dual-stack addresses, IPv4 to IPv6, batched drain."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest
from cyphonic.hostport import plain_address
from cyphonic_trs.cid import issue_cid
from cyphonic_trs.relay import RelayCore
from cyphonic_trs.server import (
    RelayServer,
    native_addr_for,
    open_udp_socket,
)
from cyphonic_trs.session import RelaySession, RelaySide
from cyphonic_trs.testing import random_cid, short_packet

pytestmark = pytest.mark.timeout(30)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_addresses_round_trip_through_the_stored_form() -> None:
    to_v6 = native_addr_for(socket.AF_INET6)
    to_v4 = native_addr_for(socket.AF_INET)
    assert to_v6(("192.0.2.1", 443)) == ("::ffff:192.0.2.1", 443, 0, 0)
    assert to_v6(("::ffff:192.0.2.1", 443)) == ("::ffff:192.0.2.1", 443, 0, 0)
    assert to_v6(("2001:DB8:0:0::1", 443)) == ("2001:db8::1", 443, 0, 0)
    assert to_v4(("192.0.2.1", 443)) == ("192.0.2.1", 443)


async def _recv(sock: socket.socket, within: float = 2.0) -> tuple[bytes, Any] | None:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recvfrom(sock, 65535), within)
    except TimeoutError:
        return None


def _peer(family: int, host: str) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    # Room for a burst: the test reads only after the relay forwarded it.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    s.bind((host, 0))
    s.setblocking(False)
    return s


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this host")
async def test_ipv4_only_node_reaches_ipv6_only_node_through_a_dual_stack_relay() -> None:
    relay_sock = open_udp_socket("::", 0)
    v4, v6 = _peer(socket.AF_INET, "127.0.0.1"), _peer(socket.AF_INET6, "::1")
    cids_4 = tuple(issue_cid(1, os.urandom) for _ in range(2))
    cids_6 = tuple(issue_cid(1, os.urandom) for _ in range(2))
    core = RelayCore(replica_id=1, native_addr=native_addr_for(relay_sock.family))
    core.install(RelaySession(
        route_id="r", replica_id=1, pair=("a.x", "b.x"), created_ms=0, version=2,
        sides=(RelaySide(fqdn="a.x", addr=plain_address(v4.getsockname()), cids=cids_4,
                         allocated_ms=0),
               RelaySide(fqdn="b.x", addr=plain_address(v6.getsockname()), cids=cids_6,
                         allocated_ms=0))), now=0.0)
    server = RelayServer(core=core, sock=relay_sock)
    server.start()
    port = relay_sock.getsockname()[1]
    try:
        to_b = short_packet(cids_6[0])
        v4.sendto(to_b, ("127.0.0.1", port))
        got = await _recv(v6)
        assert got is not None and got[0] == to_b and got[1][0] == "::1"
        to_a = short_packet(cids_4[1])
        v6.sendto(to_a, ("::1", port))
        got = await _recv(v4)
        assert got is not None and got[0] == to_a and got[1] == ("127.0.0.1", port)
        stats = core.session("r", 1.0)
        assert stats.sides[0].addr == ("127.0.0.1", v4.getsockname()[1])
        assert stats.packets == 2
    finally:
        server.stop()
        for s in (relay_sock, v4, v6):
            s.close()


class Recorder:
    def __init__(self) -> None:
        self.transport: Any = None
        self.got: list[tuple[bytes, Any]] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append((data, addr))
        self.transport.sendto(b"answer:" + data[:4], addr)  # answers leave from the relay port


async def test_batched_drain_and_the_local_server_share_one_socket() -> None:
    relay_sock = open_udp_socket("127.0.0.1", 0)
    a, b = _peer(socket.AF_INET, "127.0.0.1"), _peer(socket.AF_INET, "127.0.0.1")
    cids_a, cids_b = (issue_cid(2, os.urandom),), (issue_cid(2, os.urandom),)
    core = RelayCore(replica_id=2)
    core.install(RelaySession(
        route_id="r", replica_id=2, pair=("a.x", "b.x"), created_ms=0, version=2,
        sides=(RelaySide(fqdn="a.x", addr=a.getsockname(), cids=cids_a, allocated_ms=0),
               RelaySide(fqdn="b.x", addr=b.getsockname(), cids=cids_b, allocated_ms=0))),
        now=0.0)
    local = Recorder()
    server = RelayServer(core=core, sock=relay_sock, local=local, max_batch=64)
    server.start()
    dest = relay_sock.getsockname()
    try:
        packets = [short_packet(cids_b[0], i.to_bytes(4, "big") + os.urandom(36))
                   for i in range(300)]
        for p in packets:
            a.sendto(p, dest)
        received = []
        while len(received) < 300:
            got = await _recv(b)
            assert got is not None, f"only {len(received)} of 300 arrived"
            received.append(got[0])
        assert sorted(received) == sorted(packets)
        assert server.wakeups < 300  # drained in batches, not one callback per packet
        a.sendto(short_packet(random_cid()), dest)
        got = await _recv(a)
        assert got is not None and got[0].startswith(b"answer:") and got[1] == dest
        assert len(local.got) == 1 and local.got[0][1] == a.getsockname()
    finally:
        server.stop()
        for s in (relay_sock, a, b):
            s.close()
