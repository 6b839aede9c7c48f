"""Over ``max_handshakes`` a server refuses further clients statelessly before the TLS
handshake (``cyphonic.quic.refusal``), over real UDP sockets on loopback, for each engine
as client and as server: the client's connect raises ``Overloaded`` with the retry-after at
once (not at its connect timeout), the server keeps no state for it, and the client gets in
once the handshake that held the slot is gone."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cyphonic.config import ALPN_TUNNEL
from cyphonic.errors import Overloaded
from cyphonic.quic import Acceptor
from cyphonic.quic.refusal import RETRY_AFTER_S
from quic_harness import DOMAIN, EndpointMaker, Handlers, Pki, port_of, request

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def raw_udp() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    try:
        yield sock
    finally:
        sock.close()


def half_open(sock: socket.socket, server: tuple[str, int]) -> int:
    """Send one client Initial that is never followed up (holds a handshake slot)."""
    quic = QuicConnection(
        configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN_TUNNEL])
    )
    quic.connect(server, now=time.monotonic())
    datagram, _ = quic.datagrams_to_send(now=time.monotonic())[0]
    sock.sendto(datagram, server)
    return len(datagram)


async def test_a_client_over_the_cap_is_refused_at_once_then_gets_in(
    endpoints: EndpointMaker, ca: Pki, raw_udp: socket.socket
) -> None:
    handlers = Handlers()
    server = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
        max_handshakes=1,
        idle_timeout=1.5,
    )
    half_open(raw_udp, port_of(server))
    async with asyncio.timeout(5):
        while len(server.connections) != 1:  # noqa: ASYNC110 - endpoint state
            await asyncio.sleep(0.01)
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)

    async def dial() -> object:
        return await client.connect(
            port_of(server),
            alpn=ALPN_TUNNEL,
            expect="node",
            expected_name=f"bob.{DOMAIN}",
            handler_factory=Handlers().factory,
            timeout=5.0,
        )

    started = time.monotonic()
    with pytest.raises(Overloaded) as refused:
        await dial()
    assert time.monotonic() - started < 1.0  # the close, not the 5 s connect timeout
    low, high = RETRY_AFTER_S
    assert low <= refused.value.retry_after_s <= high
    assert "retry-after-ms=" in refused.value.message
    # One refusal per Initial datagram (qh3's hello may take two).
    refused_count = server.stats.refusals_sent
    assert 1 <= refused_count == server.stats.handshakes_refused <= 2
    assert len(server.connections) == 1 and not handlers.made  # no state for the refused
    assert all(c.is_closed for c in client.connections)  # draining at most

    # The half-open handshake reaches the server's idle timeout: the slot is free.
    async with asyncio.timeout(10):
        while server.connections:  # noqa: ASYNC110 - endpoint state
            await asyncio.sleep(0.05)
    conn = await dial()
    assert await request(conn, b"hello") == b"echo:hello"
    assert server.stats.refusals_sent == refused_count


async def test_the_refusal_is_no_larger_than_the_initial(
    endpoints: EndpointMaker, ca: Pki, raw_udp: socket.socket
) -> None:
    """The raw Initials beyond the cap are answered, each with a smaller datagram."""
    server = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        accept={ALPN_TUNNEL: Acceptor(Handlers().factory, expect="node")},
        max_handshakes=1,
    )
    sizes = [half_open(raw_udp, port_of(server)) for _ in range(3)]
    answers = []
    for _ in range(2):  # the first Initial is served (the server's flight), two refused
        data, _ = await asyncio.to_thread(raw_udp.recvfrom, 2048)
        answers.append(data)
    async with asyncio.timeout(5):
        while server.stats.refusals_sent < 2:  # noqa: ASYNC110 - endpoint state
            await asyncio.sleep(0.01)
    assert server.stats.refusals_sent == 2
    refusals = [a for a in answers if len(a) < 200]
    assert refusals and all(len(a) <= min(sizes) for a in refusals)
