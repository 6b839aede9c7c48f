"""Both QUIC engines on one wire: mixed pairs, engine choice, the public accessors.

Every other test in this folder already runs once per engine (conftest); these check what
only a mix shows (aioquic and qh3 talking mutual TLS to each other, first flights both
ways), relay-chosen connection IDs on every pairing, and the Connection accessors the
tunnel and the relay read.
"""

from __future__ import annotations

import asyncio

import pytest
from cyphonic.config import ALPN_TUNNEL
from cyphonic.errors import InvalidArgument, PermissionDenied, Unauthenticated
from cyphonic.quic import Acceptor, QuicEndpoint
from quic_harness import (
    DOMAIN,
    EndpointMaker,
    Handlers,
    Pki,
    dial_node,
    port_of,
    request,
    tunnel_pair,
)

pytestmark = pytest.mark.timeout(60)


def _relay_cid(seq: int) -> bytes:
    return b"\xc1" + seq.to_bytes(7, "big")


PAIRS = [("aioquic", "qh3"), ("qh3", "aioquic"), ("qh3", "qh3")]
ALL_PAIRS = [*PAIRS, ("aioquic", "aioquic")]


@pytest.mark.parametrize(("client_engine", "server_engine"), PAIRS)
async def test_mixed_engines_talk_mutual_tls(
    endpoints: EndpointMaker, ca: Pki, client_engine: str, server_engine: str
) -> None:
    alice, bob, conn, bob_side = await tunnel_pair(
        endpoints, ca, client_engine=client_engine, server_engine=server_engine
    )
    assert conn.engine == client_engine
    assert bob_side.conn.engine == server_engine
    # Each side verified the other's certificate inside the handshake.
    assert conn.peer is not None and conn.peer.name == f"bob.{DOMAIN}"
    assert bob_side.conn.peer is not None and bob_side.conn.peer.name == f"alice.{DOMAIN}"
    assert await request(conn, b"hello") == b"echo:hello"
    assert conn.send_datagram(b"d" * conn.max_datagram_payload())
    conn.transmit()
    assert await asyncio.wait_for(bob_side.datagrams.get(), 5) == b"d" * conn.max_datagram_payload()
    # Each first flight was answered at once: no engine error on either side (a qh3 server
    # used to fail on an aioquic client's padded first Initial until it retransmitted).
    assert alice.stats.internal_errors == 0 and bob.stats.internal_errors == 0


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


@pytest.mark.parametrize(("client_engine", "server_engine"), ALL_PAIRS)
async def test_relayed_connections_run_on_every_pairing(
    endpoints: EndpointMaker, ca: Pki, client_engine: str, server_engine: str
) -> None:
    """Relay-chosen CIDs on both engines, both roles, over real sockets: the first DCID and
    both sides' first CIDs are the relay's, and only those are ever on the wire (stream
    and DATAGRAM traffic both ways, after a CID change was asked for)."""
    handlers = Handlers()
    server = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        engine=server_engine,
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
    )
    first_dcid = b"\x5e" + bytes(7)
    server.server_connection_id_factory = (  # type: ignore[assignment]
        lambda addr, dcid: (
            (lambda seq: b"\x5e" + (seq + 1).to_bytes(7, "big")) if dcid == first_dcid else None
        )
    )
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    server.datagram_filter = lambda data, addr: to_server.append(data) or False  # type: ignore[func-returns-value]
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust, engine=client_engine)
    client_handlers = Handlers()
    client.datagram_filter = lambda data, addr: to_client.append(data) or False  # type: ignore[func-returns-value]
    conn = await client.connect(
        port_of(server),
        alpn=ALPN_TUNNEL,
        expect="node",
        expected_name=f"bob.{DOMAIN}",
        handler_factory=client_handlers.factory,
        connection_id_factory=_relay_cid,
        initial_destination_cid=first_dcid,
    )
    (bob_side,) = handlers.made
    (alice_side,) = client_handlers.made
    assert (conn.engine, bob_side.conn.engine) == (client_engine, server_engine)
    assert conn.quic.host_cid == _relay_cid(0)
    assert bob_side.conn.quic.host_cid == b"\x5e" + (1).to_bytes(7, "big")
    conn.quic.change_connection_id()  # what a move asks for: a relayed path keeps its CID
    assert await request(conn, b"via relay ids") == b"echo:via relay ids"
    for _ in range(20):
        assert conn.send_datagram(b"up")
        assert bob_side.conn.send_datagram(b"down")
    conn.transmit()
    bob_side.conn.transmit()
    assert [await asyncio.wait_for(bob_side.datagrams.get(), 5) for _ in range(20)] == [b"up"] * 20
    assert [await asyncio.wait_for(alice_side.datagrams.get(), 5) for _ in range(20)] == [
        b"down"
    ] * 20
    assert client.stats.internal_errors == 0 and server.stats.internal_errors == 0
    short = {d[1:9] for d in to_server if not d[0] & 0x80}
    assert short == {bob_side.conn.quic.host_cid}
    long_dcids = {d[6 : 6 + d[5]] for d in to_server if d[0] & 0x80}
    assert long_dcids <= {first_dcid, bob_side.conn.quic.host_cid}
    assert {d[1:9] for d in to_client if not d[0] & 0x80} == {_relay_cid(0)}


async def test_connection_accessors(endpoints: EndpointMaker, ca: Pki, engine: str) -> None:
    _alice, bob, conn, bob_side = await tunnel_pair(endpoints, ca)
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
    conn = await dial_node(alice, port_of(bob))
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
        # A GSO train crosses loopback whole and is read in one call (UDP GRO).
        assert bob.gro and bob.stats.gro_batches >= 1
    else:
        assert alice.stats.gso_sends == 0
