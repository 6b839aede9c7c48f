"""Server names (TLS SNI) and stateless Retry, over real UDP sockets on loopback.

Names: a node certificate is valid at every service, so each endpoint serves only clients
that ask for one of its own names: an independent aioquic client presenting a valid node
certificate with another service's SNI, or none, is refused in the handshake. Retry: from
a threshold of handshakes under way, Initials without a token get a Retry; a client that
receives at its address comes back and is admitted, a spoofed source never does.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable, Iterator

import pytest
from aioquic.asyncio.client import connect as aioquic_connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.tls import AlertDescription
from cyphonic import pki
from cyphonic.config import ALPN_SIGNALLING, ALPN_TUNNEL
from cyphonic.errors import PermissionDenied
from cyphonic.quic import Acceptor, QuicEndpoint
from quic_harness import (
    DOMAIN,
    NMS_NAME,
    EndpointMaker,
    Handlers,
    Pki,
    dial_nms,
    dial_node,
    port_of,
    request,
)

pytestmark = pytest.mark.timeout(60)

CRYPTO_ERROR = 0x100


async def wait_for(predicate: Callable[[], bool], *, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - endpoint state, no event to wait on
            await asyncio.sleep(0.01)


async def raw_client(
    server: QuicEndpoint, identity: pki.CertifiedKey, *, server_name: str | None, alpn: str
) -> int | None:
    """An independent aioquic client (no cyphonic code on its side): the close error code
    it ends with, or None when the server accepted it and answered a request."""
    config = QuicConfiguration(
        is_client=True, alpn_protocols=[alpn], verify_mode=ssl.CERT_NONE, server_name=server_name
    )
    config.certificate, config.certificate_chain = identity.cert, identity.chain
    config.private_key = identity.key
    host, port = port_of(server)
    async with aioquic_connect(host, port, configuration=config) as client:
        reader, writer = await client.create_stream()
        writer.write(b"hello")
        writer.write_eof()
        read = asyncio.ensure_future(reader.read())
        closed = asyncio.ensure_future(client.wait_closed())
        await asyncio.wait({read, closed}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if read.done() and not read.exception() and read.result() == b"echo:hello":
            closed.cancel()
            return None
        read.cancel()
        async with asyncio.timeout(10):
            await closed
        close = client._quic._close_event
        assert close is not None
        return int(close.error_code)


async def nms_server(endpoints: EndpointMaker, ca: Pki, handlers: Handlers) -> QuicEndpoint:
    return await endpoints(
        identity=ca.service("nms"),
        trust=ca.trust,
        accept={ALPN_SIGNALLING: Acceptor(handlers.factory, expect="node")},
    )


@pytest.mark.parametrize(
    "server_name",
    [f"as.svc.{DOMAIN}", f"trs.svc.{DOMAIN}", f"alice.{DOMAIN}", None],
    ids=["as_name", "trs_name", "node_name", "no_sni"],
)
async def test_a_service_refuses_a_valid_node_asking_for_another_name(
    endpoints: EndpointMaker, ca: Pki, server_name: str | None
) -> None:
    handlers = Handlers()
    server = await nms_server(endpoints, ca, handlers)
    code = await raw_client(server, ca.node("alice"), server_name=server_name, alpn=ALPN_SIGNALLING)
    assert code == CRYPTO_ERROR + AlertDescription.access_denied
    assert handlers.made == []
    assert server.stats.connections_accepted == 0


async def test_a_service_serves_its_own_name_in_any_case(endpoints: EndpointMaker, ca: Pki) -> None:
    handlers = Handlers()
    server = await nms_server(endpoints, ca, handlers)
    alice = ca.node("alice")
    assert (
        await raw_client(server, alice, server_name=NMS_NAME.upper(), alpn=ALPN_SIGNALLING) is None
    )
    assert len(handlers.made) == 1


async def test_node_to_node_checks_both_names(endpoints: EndpointMaker, ca: Pki) -> None:
    handlers = Handlers()
    bob = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
    )
    # Server side: a client asking bob's socket for carol is refused by bob.
    code = await raw_client(bob, ca.node("alice"), server_name=f"carol.{DOMAIN}", alpn=ALPN_TUNNEL)
    assert code == CRYPTO_ERROR + AlertDescription.access_denied
    # Client side: alice expecting carol refuses bob's certificate.
    alice = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    with pytest.raises(PermissionDenied):
        await alice.connect(
            port_of(bob), alpn=ALPN_TUNNEL, expect="node", expected_name=f"carol.{DOMAIN}"
        )
    assert handlers.made == []
    conn = await dial_node(alice, port_of(bob))
    assert await request(conn, b"hi") == b"echo:hi"


# ------------------------------------------------------------------------------ Retry


async def test_a_client_is_admitted_after_a_retry(endpoints: EndpointMaker, ca: Pki) -> None:
    handlers = Handlers()
    server = await endpoints(
        identity=ca.service("nms"),
        trust=ca.trust,
        accept={ALPN_SIGNALLING: Acceptor(handlers.factory, expect="node")},
        retry_threshold=0,  # validate every address
    )
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    conn = await dial_nms(client, port_of(server))
    assert await request(conn, b"hello") == b"echo:hello"
    retries = server.stats.retries_sent
    assert retries >= 1  # one per datagram of the first flight (qh3's may take two)
    # The independent client (aioquic's own Retry handling) too.
    assert (
        await raw_client(server, ca.node("carol"), server_name=NMS_NAME, alpn=ALPN_SIGNALLING)
        is None
    )
    assert server.stats.retries_sent > retries
    assert server.stats.retry_tokens_refused == 0


@pytest.fixture
def spoofers() -> Iterator[list[socket.socket]]:
    """UDP sockets on 40 loopback addresses: sources that never answer a Retry."""
    socks = []
    try:
        for i in range(40):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.0.{1 + i // 200}.{10 + i % 200}", 0))
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def first_initial(address: tuple[str, int]) -> tuple[QuicConnection, bytes]:
    quic = QuicConnection(
        configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN_TUNNEL])
    )
    quic.connect(address, now=time.monotonic())
    return quic, quic.datagrams_to_send(now=time.monotonic())[0][0]


async def test_an_initial_flood_from_many_sources_leaves_room_for_a_genuine_peer(
    endpoints: EndpointMaker, ca: Pki, spoofers: list[socket.socket]
) -> None:
    handlers = Handlers()
    server = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
        max_handshakes=8,
        retry_threshold=2,
        idle_timeout=30.0,  # half-open state would stay for the whole test
    )
    where = port_of(server)
    for _ in range(5):
        for sock in spoofers:
            sock.sendto(first_initial(where)[1], where)
    await wait_for(lambda: server.stats.retries_sent >= 190)
    # Two handshakes were admitted before the threshold; no other source got state.
    assert len(server.connections) <= 2
    assert server.stats.handshakes_refused == 0
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    conn = await dial_node(client, where, timeout=5)
    assert await request(conn, b"still here") == b"echo:still here"


async def test_a_retry_token_from_another_address_is_refused(
    endpoints: EndpointMaker, ca: Pki, spoofers: list[socket.socket]
) -> None:
    handlers = Handlers()
    server = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
        retry_threshold=0,
    )
    where = port_of(server)
    a, b = spoofers[0], spoofers[1]
    quic, datagram = first_initial(where)
    a.sendto(datagram, where)
    a.settimeout(5)
    retry, _ = await asyncio.to_thread(a.recvfrom, 2048)
    assert server.stats.retries_sent == 1 and not server.connections
    quic.receive_datagram(retry, where, now=time.monotonic())
    with_token = quic.datagrams_to_send(now=time.monotonic())[0][0]
    b.sendto(with_token, where)  # someone else replays the token
    await wait_for(lambda: server.stats.retry_tokens_refused == 1)
    assert not server.connections
    a.sendto(with_token, where)  # the address it was issued to
    await wait_for(lambda: len(server.connections) == 1)
