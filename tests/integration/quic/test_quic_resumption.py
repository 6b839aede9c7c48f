"""TLS session resumption across replicas over real UDP sockets on 127.0.0.1.

Two server endpoints (replicas of one service) share a ticket key: a node that made a
full handshake with the first resumes at the second, with the same verified identity on
both sides. A revoked node cannot resume; a replica with another key, or none, or the
aioquic engine, falls back to a full handshake that still works.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from cyphonic import pki
from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import Overloaded, Revoked, TokenInvalid
from cyphonic.quic import Acceptor, QuicEndpoint
from cyphonic.quic.tickets import TicketKeys
from quic_harness import NMS_NAME, EndpointMaker, Handlers, Pki, port_of, request

pytestmark = pytest.mark.timeout(60)


async def _replica(
    endpoints: EndpointMaker,
    ca: Pki,
    handlers: Handlers,
    *,
    keys: TicketKeys | None,
    revoked: set[int] | None = None,
    engine: str = "qh3",
) -> QuicEndpoint:
    gone = revoked if revoked is not None else set()
    trust = pki.TrustStore(
        root=ca.material.root_cert,
        node_ca=ca.material.node_ca.cert,
        service_ca=ca.material.service_ca.cert,
        is_revoked=lambda cert: cert.serial_number in gone,
    )
    return await endpoints(
        identity=ca.service("nms"),
        trust=trust,
        accept={ALPN_SIGNALLING: Acceptor(handlers.factory, expect="node")},
        ticket_keys=keys,
        engine=engine,
    )


async def _connect(node: QuicEndpoint, server: QuicEndpoint) -> bool:
    conn = await node.connect(
        port_of(server),
        alpn=ALPN_SIGNALLING,
        expected_name=NMS_NAME,
        handler_factory=Handlers().factory,
    )
    assert conn.peer is not None and conn.peer.name == NMS_NAME
    assert await request(conn, b"hi") == b"echo:hi"
    conn.close()
    return conn.resumed


@pytest.mark.parametrize("engine", ["qh3"])
async def test_a_node_resumes_at_another_replica(endpoints: EndpointMaker, ca: Pki) -> None:
    keys = bytes(os.urandom(32))
    first, second = Handlers(), Handlers()
    a = await _replica(endpoints, ca, first, keys=TicketKeys([keys]))
    b = await _replica(endpoints, ca, second, keys=TicketKeys([keys]))
    node = await endpoints(identity=ca.node("n1"), trust=ca.trust)

    assert not await _connect(node, a)  # full handshake, ticket issued
    assert await _connect(node, b)  # resumed at the other replica
    assert await _connect(node, a)  # and again with the ticket b issued
    full, resumed = first.made[0].conn, second.made[0].conn
    assert not full.resumed and resumed.resumed
    assert resumed.peer == full.peer  # name, role and the very certificate
    assert resumed.peer is not None and resumed.peer.name == f"n1.{ca_domain(ca)}"


def ca_domain(ca: Pki) -> str:
    return ca.service("nms").cert.subject.rfc4514_string().split("nms.svc.", 1)[1]


@pytest.mark.parametrize("engine", ["qh3"])
async def test_a_revoked_node_cannot_resume(endpoints: EndpointMaker, ca: Pki) -> None:
    keys = TicketKeys([os.urandom(32)])
    revoked: set[int] = set()
    handlers = Handlers()
    server = await _replica(endpoints, ca, handlers, keys=keys, revoked=revoked)
    identity = ca.node("n2")
    node = await endpoints(identity=identity, trust=ca.trust)
    assert not await _connect(node, server)
    assert node._client_tickets  # it holds a ticket it will offer
    revoked.add(identity.cert.serial_number)
    with pytest.raises(Revoked):
        await _connect(node, server)
    assert len(handlers.made) == 1  # the refused connection never reached a handler


@pytest.mark.parametrize("engine", ["qh3"])
async def test_without_the_shared_key_a_full_handshake_follows(
    endpoints: EndpointMaker, ca: Pki
) -> None:
    handlers = Handlers()
    a = await _replica(endpoints, ca, handlers, keys=TicketKeys([os.urandom(32)]))
    other_key = await _replica(endpoints, ca, handlers, keys=TicketKeys([os.urandom(32)]))
    no_key = await _replica(endpoints, ca, handlers, keys=None)
    aioquic = await _replica(endpoints, ca, handlers, keys=None, engine="aioquic")
    node = await endpoints(identity=ca.node("n3"), trust=ca.trust)
    for server in (other_key, no_key, aioquic):
        assert not await _connect(node, a)
        assert not await _connect(node, server)  # offered, not accepted: full handshake
    assert all(
        h.conn.peer is not None and h.conn.peer.name.startswith("n3.") for h in handlers.made
    )


async def _after_one_full_handshake(
    endpoints: EndpointMaker, ca: Pki, handlers: Handlers, name: str
) -> tuple[QuicEndpoint, QuicEndpoint]:
    # A qh3 server with ticket keys, and a node (on the test's engine) that connected once.
    server = await _replica(endpoints, ca, handlers, keys=TicketKeys([os.urandom(32)]))
    node = await endpoints(identity=ca.node(name), trust=ca.trust)
    assert not await _connect(node, server)
    return server, node


@pytest.mark.parametrize("engine", ["aioquic"])
async def test_an_aioquic_node_makes_full_handshakes(endpoints: EndpointMaker, ca: Pki) -> None:
    handlers = Handlers()
    server, node = await _after_one_full_handshake(endpoints, ca, handlers, "n4")
    assert not await _connect(node, server)
    assert len(handlers.made) == 2


@pytest.mark.parametrize("engine", ["qh3"])
async def test_a_tampered_ticket_means_a_full_handshake(endpoints: EndpointMaker, ca: Pki) -> None:
    handlers = Handlers()
    server, node = await _after_one_full_handshake(endpoints, ca, handlers, "n5")
    ((slot, (ticket, chain)),) = node._client_tickets.items()
    flipped = ticket.ticket[:-1] + bytes([ticket.ticket[-1] ^ 1])
    node._client_tickets[slot] = (dataclasses.replace(ticket, ticket=flipped), chain)
    assert not await _connect(node, server)  # refused quietly, full handshake, still works
    refused = handlers.made[1].conn.quic.tls
    assert isinstance(refused.ticket_refused, TokenInvalid)
    assert await _connect(node, server)  # and the ticket issued then is good


@pytest.mark.parametrize("engine", ["qh3"])
async def test_a_refused_node_keeps_its_ticket(endpoints: EndpointMaker, ca: Pki) -> None:
    """A replica that refuses before the handshake (``quic.refusal``) never read the ticket
    offered: the node offers it again and resumes."""
    keys = TicketKeys([bytes(os.urandom(32))])
    a = await _replica(endpoints, ca, Handlers(), keys=keys)
    b = await _replica(endpoints, ca, Handlers(), keys=keys)
    node = await endpoints(identity=ca.node("n1"), trust=ca.trust)
    assert not await _connect(node, a)  # full handshake, ticket issued
    b.max_handshakes = 0  # busy: every client refused
    with pytest.raises(Overloaded):
        await _connect(node, b)
    b.max_handshakes = 8
    assert await _connect(node, b)
