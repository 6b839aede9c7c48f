"""Both QUIC engines on one wire: mixed pairs, engine choice, the public accessors.

Every other test in this folder already runs once per engine (conftest); these check what
only a mix shows (aioquic and qh3 talking mutual TLS to each other), the per-connection
fallback to aioquic for relay-chosen connection IDs, and the Connection accessors the
tunnel and the relay read.
"""

from __future__ import annotations

import asyncio

import pytest
from cyphonic.config import ALPN_SIGNALLING, ALPN_TUNNEL
from cyphonic.errors import InvalidArgument, PermissionDenied, Unauthenticated
from cyphonic.quic import Acceptor, QuicEndpoint
from quic_harness import DOMAIN, NMS_NAME, EndpointMaker, Handlers, Pki, port_of, request

pytestmark = pytest.mark.timeout(60)


def _relay_cid(seq: int) -> bytes:
    return b"\xc1" + seq.to_bytes(7, "big")


PAIRS = [("aioquic", "qh3"), ("qh3", "aioquic"), ("qh3", "qh3")]


@pytest.mark.parametrize(("client_engine", "server_engine"), PAIRS)
async def test_mixed_engines_talk_mutual_tls(
    endpoints: EndpointMaker, ca: Pki, client_engine: str, server_engine: str
) -> None:
    handlers = Handlers()
    bob = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        engine=server_engine,
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
    )
    alice = await endpoints(identity=ca.node("alice"), trust=ca.trust, engine=client_engine)
    conn = await alice.connect(
        port_of(bob),
        alpn=ALPN_TUNNEL,
        expect="node",
        expected_name=f"bob.{DOMAIN}",
        handler_factory=Handlers().factory,
    )
    (bob_side,) = handlers.made
    assert conn.engine == client_engine
    assert bob_side.conn.engine == server_engine
    # Each side verified the other's certificate inside the handshake.
    assert conn.peer is not None and conn.peer.name == f"bob.{DOMAIN}"
    assert bob_side.conn.peer is not None and bob_side.conn.peer.name == f"alice.{DOMAIN}"
    assert await request(conn, b"hello") == b"echo:hello"
    assert conn.send_datagram(b"d" * conn.max_datagram_payload())
    conn.transmit()
    assert await asyncio.wait_for(bob_side.datagrams.get(), 5) == b"d" * conn.max_datagram_payload()


@pytest.mark.parametrize(("client_engine", "server_engine"), PAIRS)
async def test_mixed_engines_refuse_the_wrong_node(
    endpoints: EndpointMaker, ca: Pki, client_engine: str, server_engine: str
) -> None:
    """A qh3 side refuses as an aioquic side does, and the other engine reads it alike."""
    handlers = Handlers()
    mallory = await endpoints(
        identity=ca.node("mallory"),
        trust=ca.trust,
        engine=server_engine,
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
    )
    alice = await endpoints(identity=ca.node("alice"), trust=ca.trust, engine=client_engine)
    with pytest.raises(PermissionDenied, match="bob"):
        await alice.connect(
            port_of(mallory), alpn=ALPN_TUNNEL, expect="node", expected_name=f"bob.{DOMAIN}"
        )
    assert handlers.made == []  # the server's handler never ran either


async def test_qh3_server_refuses_service_client_for_node_alpn(
    ca: Pki, endpoints: EndpointMaker
) -> None:
    handlers = Handlers()
    bob = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        engine="qh3",
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
    )
    nms = await endpoints(identity=ca.service("nms"), trust=ca.trust, engine="aioquic")
    with pytest.raises(Unauthenticated):
        await nms.connect(
            port_of(bob), alpn=ALPN_TUNNEL, expect="node", expected_name=f"bob.{DOMAIN}", timeout=5
        )
    assert handlers.made == []
    assert bob.stats.connections_refused == 1


async def test_relayed_connections_fall_back_to_aioquic(endpoints: EndpointMaker, ca: Pki) -> None:
    """qh3's core draws its own CIDs, so a connection with relay-chosen CIDs uses aioquic."""
    handlers = Handlers()
    server = await endpoints(
        identity=ca.service("nms"),
        trust=ca.trust,
        engine="qh3",
        accept={ALPN_SIGNALLING: handlers.factory},
    )
    server.server_connection_id_factory = (  # type: ignore[assignment]
        lambda addr, dcid: lambda seq: b"\x5e" + seq.to_bytes(7, "big")
    )
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust, engine="qh3")
    plain = await client.connect(
        port_of(server),
        alpn=ALPN_SIGNALLING,
        expected_name=NMS_NAME,
        handler_factory=Handlers().factory,
    )
    relayed = await client.connect(
        port_of(server),
        alpn=ALPN_SIGNALLING,
        expected_name=NMS_NAME,
        handler_factory=Handlers().factory,
        connection_id_factory=_relay_cid,
    )
    assert plain.engine == "qh3"
    assert relayed.engine == "aioquic"
    assert all(c[:1] == b"\xc1" for c in relayed.quic.host_cids)
    assert sorted(h.conn.engine for h in handlers.made) == ["aioquic", "aioquic"]
    assert await request(relayed, b"via relay ids") == b"echo:via relay ids"


async def test_connection_accessors(endpoints: EndpointMaker, ca: Pki, engine: str) -> None:
    handlers = Handlers()
    bob = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
    )
    alice = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    conn = await alice.connect(
        port_of(bob),
        alpn=ALPN_TUNNEL,
        expect="node",
        expected_name=f"bob.{DOMAIN}",
        handler_factory=Handlers().factory,
    )
    (bob_side,) = handlers.made
    assert await request(conn, b"rtt sample") == b"echo:rtt sample"
    for side in (conn, bob_side.conn):
        assert side.engine == engine
        assert side.handshake_complete
        assert side.close_event is None
        assert side.peer_max_datagram_frame_size == 65536
        assert side.validated_peer_address == side.peer_address
        rtt = side.smoothed_rtt
        assert rtt is not None and 0 < rtt < 1.0
    assert conn.validated_peer_address == ("127.0.0.1", bob.local_address[1])
    conn.close("done")
    assert conn.close_event is not None and conn.close_event.reason_phrase == "done"
    await asyncio.wait_for(bob_side.conn.wait_closed(), 5)
    assert bob_side.conn.close_event is not None


async def test_unknown_engine_is_refused(ca: Pki) -> None:
    with pytest.raises(InvalidArgument, match="unknown QUIC engine"):
        await QuicEndpoint.open(
            host="127.0.0.1", identity=ca.node("alice"), trust=ca.trust, engine="quiche"
        )


async def test_engine_from_environment(ca: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CYPHONIC_QUIC_ENGINE", "qh3")
    endpoint = await QuicEndpoint.open(host="127.0.0.1", identity=ca.node("alice"), trust=ca.trust)
    try:
        assert endpoint.engine == "qh3"
    finally:
        await endpoint.close()


@pytest.mark.parametrize("gso", [True, False])
async def test_full_size_bursts_arrive_whole(endpoints: EndpointMaker, ca: Pki, gso: bool) -> None:
    """A burst of full-size datagrams leaves in UDP GSO sends (when on) and arrives intact."""
    handlers = Handlers()
    bob = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
    )
    alice = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    alice.gso = gso
    conn = await alice.connect(
        port_of(bob),
        alpn=ALPN_TUNNEL,
        expect="node",
        expected_name=f"bob.{DOMAIN}",
        handler_factory=Handlers().factory,
    )
    (bob_side,) = handlers.made
    size = conn.max_datagram_payload()
    packets = [i.to_bytes(2, "big") * (size // 2) for i in range(60)]
    sent_before = alice.stats.datagrams_sent
    for p in packets:
        assert conn.send_datagram(p)
    alice.flush()
    received = [await asyncio.wait_for(bob_side.datagrams.get(), 5) for _ in packets]
    assert sorted(received) == sorted(packets)
    assert alice.stats.datagrams_sent - sent_before >= len(packets)
    if gso:
        assert alice.stats.gso_sends >= 1 and alice.gso
    else:
        assert alice.stats.gso_sends == 0
