"""The TRS's one UDP glue on loopback sockets: the QUIC endpoint with the relay filter.

Dual-stack addresses (IPv4 node to IPv6 node), batched drain, and datagrams the relay does
not take left to the endpoint's own routing (its control connections).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cyphonic import pki
from cyphonic.hostport import plain_address
from cyphonic.quic import QuicEndpoint, bind_udp
from cyphonic.quic.endpoint import SOCKET_BUFFER
from cyphonic_testing.trs import random_cid, short_packet
from cyphonic_trs.cid import issue_cid
from cyphonic_trs.control import (
    RelayFilter,
    native_addr_for,
    open_relaying_endpoint,
)
from cyphonic_trs.relay import RelayCore
from cyphonic_trs.session import RelaySession, RelaySide

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
    assert plain_address(to_v6(("192.0.2.1", 443))) == ("192.0.2.1", 443)


def test_relay_socket_buffers_follow_the_setting() -> None:
    sock = bind_udp("127.0.0.1", 0, buffer_bytes=262144)
    try:
        assert not sock.getblocking()
        # Linux doubles the value it stores; without privileges it caps it at rmem_max.
        assert 0 < sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 2 * 262144
    finally:
        sock.close()
    assert SOCKET_BUFFER > 262144


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiMaterial:
    return pki.init_pki(
        Path(tmp_path_factory.mktemp("pki")), now=datetime.datetime.now(datetime.UTC)
    )


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


@pytest.fixture
async def relaying(
    material: pki.PkiMaterial,
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[QuicEndpoint, RelayFilter, RelayCore]]:
    host = getattr(request, "param", "127.0.0.1")
    sock = bind_udp(host, 0, buffer_bytes=SOCKET_BUFFER)
    core = RelayCore(replica_id=1, native_addr=native_addr_for(sock.family))
    endpoint, relay = open_relaying_endpoint(
        sock=sock, core=core, identity=material.services["trs"], trust=material.trust, accept={}
    )
    try:
        yield endpoint, relay, core
    finally:
        await endpoint.close()


def _install(
    core: RelayCore,
    a: socket.socket,
    b: socket.socket,
) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    cids_a = tuple(issue_cid(1, os.urandom) for _ in range(2))
    cids_b = tuple(issue_cid(1, os.urandom) for _ in range(2))
    core.install(
        RelaySession(
            route_id="r",
            replica_id=1,
            pair=("a.x", "b.x"),
            created_ms=0,
            version=2,
            sides=(
                RelaySide(
                    fqdn="a.x", addr=plain_address(a.getsockname()), cids=cids_a, allocated_ms=0
                ),
                RelaySide(
                    fqdn="b.x", addr=plain_address(b.getsockname()), cids=cids_b, allocated_ms=0
                ),
            ),
        ),
        now=0.0,
    )
    return cids_a, cids_b


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this host")
@pytest.mark.parametrize("relaying", ["::"], indirect=True)
async def test_ipv4_only_node_reaches_ipv6_only_node_through_a_dual_stack_relay(
    relaying: tuple[QuicEndpoint, RelayFilter, RelayCore],
) -> None:
    endpoint, _relay, core = relaying
    v4, v6 = _peer(socket.AF_INET, "127.0.0.1"), _peer(socket.AF_INET6, "::1")
    cids_4, cids_6 = _install(core, v4, v6)
    port = endpoint.local_address[1]
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
        v4.close()
        v6.close()


async def test_batched_drain_and_the_endpoint_share_one_socket(
    relaying: tuple[QuicEndpoint, RelayFilter, RelayCore],
) -> None:
    endpoint, relay, core = relaying
    a, b = _peer(socket.AF_INET, "127.0.0.1"), _peer(socket.AF_INET, "127.0.0.1")
    _cids_a, cids_b = _install(core, a, b)
    dest = endpoint.local_address
    try:
        packets = [
            short_packet(cids_b[0], i.to_bytes(4, "big") + os.urandom(36)) for i in range(300)
        ]
        for p in packets:
            a.sendto(p, dest)
        received = []
        while len(received) < 300:
            got = await _recv(b)
            assert got is not None, f"only {len(received)} of 300 arrived"
            received.append(got[0])
        assert sorted(received) == sorted(packets)
        assert endpoint.stats.wakeups < 300  # drained in batches, not one callback each
        assert endpoint.stats.filtered == 300 and relay.send_dropped == 0
        # What the relay does not take goes on to the endpoint's routing (no connection
        # has this CID, so it is unroutable there) and is never forwarded.
        a.sendto(short_packet(random_cid()), dest)
        for _ in range(50):
            if endpoint.stats.unroutable:
                break
            await asyncio.sleep(0.02)
        assert endpoint.stats.unroutable == 1 and endpoint.stats.filtered == 300
        assert await _recv(b, within=0.3) is None
    finally:
        a.close()
        b.close()
