"""A client that moves away and back, over real sockets, on both engines.

The client reaches the server through a two-armed UDP forwarder (a stand-in for the
node's uplinks): its outside sockets sit on two loopback addresses and only the current
one carries traffic, the other drops what it gets (the node left that network). Each move
switches arms; the connection must follow every time, also back to an address it used
before (qh3's core ignores such an address on its own: docs/pki-and-quic.md, "Returning
addresses").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cyphonic.config import ALPN_TUNNEL
from quic_harness import EndpointMaker, Handlers, Pki, dial_node, port_of, request

pytestmark = pytest.mark.timeout(90)

ARMS = ("127.0.0.2", "127.0.0.3")


class _Arm(asyncio.DatagramProtocol):
    def __init__(self, uplinks: _Uplinks, index: int) -> None:
        self.uplinks = uplinks
        self.index = index
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        u = self.uplinks
        if self.index == u.current and u.client is not None:
            u.inside.sendto(data, u.client)  # from the server, back to the client
        else:
            u.dropped += 1


class _Inside(asyncio.DatagramProtocol):
    def __init__(self, uplinks: _Uplinks) -> None:
        self.uplinks = uplinks

    def datagram_received(self, data: bytes, addr: Any) -> None:
        u = self.uplinks
        u.client = addr
        u.arms[u.current].transport.sendto(data, u.server)


class _Uplinks:
    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: Any = None
        self.current = 0
        self.dropped = 0
        self.inside: Any = None
        self.arms: list[_Arm] = []

    def outside(self) -> tuple[str, int]:
        return tuple(self.arms[self.current].transport.get_extra_info("sockname")[:2])  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def _uplinks(server: tuple[str, int]) -> AsyncIterator[_Uplinks]:
    loop = asyncio.get_running_loop()
    u = _Uplinks(server)
    transports = []
    try:
        for index, host in enumerate(ARMS):
            arm = _Arm(u, index)
            transport, _ = await loop.create_datagram_endpoint(
                lambda arm=arm: arm, local_addr=(host, 0)
            )
            transports.append(transport)
            u.arms.append(arm)
        inside, _ = await loop.create_datagram_endpoint(
            lambda: _Inside(u), local_addr=("127.0.0.1", 0)
        )
        transports.append(inside)
        u.inside = inside
        yield u
    finally:
        for transport in transports:
            transport.close()


async def test_the_connection_follows_a_client_that_moves_away_and_back(
    endpoints: EndpointMaker, ca: Pki
) -> None:
    handlers = Handlers()
    bob = await endpoints(
        identity=ca.node("bob"), trust=ca.trust, accept={ALPN_TUNNEL: handlers.factory}
    )
    alice = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    async with _uplinks(port_of(bob)) as uplinks:
        inside = uplinks.inside.get_extra_info("sockname")[:2]
        conn = await dial_node(alice, inside)
        assert await request(conn, b"before") == b"echo:before"
        (bob_side,) = [h.conn for h in handlers.made]
        assert bob_side.peer_address == uplinks.outside()
        # away, back to the first address, away again (qh3's core holds 4 paths in all)
        for move, arm in enumerate((1, 0, 1), start=1):
            uplinks.current = arm
            payload = f"move {move}".encode()
            assert await request(conn, payload, within=15.0) == b"echo:" + payload, move
            assert bob_side.peer_address == uplinks.outside(), move
            # aioquic sends on a path while it validates it; qh3 only after
            for _ in range(200):  # 10 s at most
                if bob_side.validated_peer_address == uplinks.outside():
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"move {move}: the new path was never validated")
            assert not conn.is_closed and not bob_side.is_closed
        assert len(handlers.made) == 1  # the one connection throughout
