"""The QUIC endpoint over real UDP sockets on loopback: streams, pushes, both roles on one
socket, DATAGRAM frames, relay-chosen connection IDs, closes and timeouts."""

from __future__ import annotations

import asyncio
import itertools
import socket
from typing import Any

import pytest
from cyphonic.config import ALPN_SIGNALLING, ALPN_TUNNEL
from cyphonic.errors import InvalidArgument, Timeout, Unavailable
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
    tunnel_pair,
)

pytestmark = pytest.mark.timeout(60)


async def test_request_response_and_push(endpoints: EndpointMaker, ca: Pki) -> None:
    server_handlers = Handlers()
    server = await endpoints(
        identity=ca.service("nms"),
        trust=ca.trust,
        accept={ALPN_SIGNALLING: Acceptor(server_handlers.factory, expect="node")},
    )
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    client_handlers = Handlers()
    conn = await client.connect(
        port_of(server),
        alpn=ALPN_SIGNALLING,
        expected_name=NMS_NAME,
        handler_factory=client_handlers.factory,
    )
    assert conn.peer is not None
    assert (conn.peer.name, conn.peer.kind) == (NMS_NAME, "service")
    assert conn.is_ready and conn.alpn == ALPN_SIGNALLING

    assert await request(conn, b"hello") == b"echo:hello"
    # Several requests in flight at once, each on its own stream.
    answers = await asyncio.gather(*(request(conn, f"r{i}".encode()) for i in range(20)))
    assert answers == [f"echo:r{i}".encode() for i in range(20)]

    # The server pushes on a stream it opens; the client's handler gets it.
    (server_side,) = server_handlers.made
    assert server_side.conn.peer is not None
    assert server_side.conn.peer.name == f"alice.{DOMAIN}"
    push_stream = server_side.conn.quic.get_next_available_stream_id()
    assert push_stream % 2 == 1  # server-initiated
    server_side.conn.quic.send_stream_data(push_stream, b"route-direction", end_stream=True)
    server_side.conn.transmit()
    (client_side,) = client_handlers.made
    async with asyncio.timeout(5):
        while True:
            sid, data = await client_side.finished.get()
            if sid == push_stream:
                break
    assert data == b"route-direction"
    # Pushed data is answered by the client's echo on the same stream.
    async with asyncio.timeout(5):
        while True:
            sid, data = await server_side.finished.get()
            if sid == push_stream:
                break
    assert data == b"echo:route-direction"


async def test_one_socket_serves_and_connects(endpoints: EndpointMaker, ca: Pki) -> None:
    """Bob's endpoint is a client of the NMS and the tunnel server of Alice at once."""
    nms = await endpoints(
        identity=ca.service("nms"), trust=ca.trust, accept={ALPN_SIGNALLING: Handlers().factory}
    )
    bob_tunnels = Handlers()
    bob = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        accept={ALPN_TUNNEL: Acceptor(bob_tunnels.factory, expect="node")},
    )
    alice = await endpoints(identity=ca.node("alice"), trust=ca.trust)

    to_nms = await dial_nms(bob, port_of(nms))
    from_alice = await dial_node(alice, port_of(bob))
    roles = sorted(c.is_client for c in bob.connections)
    assert roles == [False, True]
    # The NMS sees Bob at the very port Alice reached Bob on: one socket.
    (nms_side,) = [c for c in nms.connections]
    assert nms_side.peer_address[1] == bob.local_address[1]
    assert from_alice.peer_address == port_of(bob)

    results = await asyncio.gather(request(to_nms, b"register"), request(from_alice, b"ping"))
    assert results == [b"echo:register", b"echo:ping"]
    assert bob_tunnels.made[0].conn.peer is not None
    assert bob_tunnels.made[0].conn.peer.name == f"alice.{DOMAIN}"


async def test_datagrams_both_ways(endpoints: EndpointMaker, ca: Pki) -> None:
    _alice, bob, conn, bob_side = await tunnel_pair(endpoints, ca)

    # Alice's side uses the fast path, Bob's goes through the handler.
    got: asyncio.Queue[bytes] = asyncio.Queue()
    conn.datagram_handler = got.put_nowait
    limit = conn.max_datagram_payload()
    assert limit == 1452 - 30  # 1-byte flags, 8-byte CID, 2-byte PN, 16-byte tag, 3-byte frame
    assert bob_side.conn.max_datagram_payload() == limit

    # On a quiet connection, queueing alone is enough: the endpoint's next pass sends it.
    await asyncio.sleep(0.2)
    assert conn.send_datagram(b"quiet")
    assert await asyncio.wait_for(bob_side.datagrams.get(), 5) == b"quiet"

    packets = [bytes([i]) * (50 + i * 13) for i in range(100)] + [b"\xab" * limit]
    for p in packets:
        assert conn.send_datagram(p)
    conn.transmit()
    received = [await asyncio.wait_for(bob_side.datagrams.get(), 5) for _ in packets]
    assert sorted(received) == sorted(packets)  # loopback: nothing lost

    # Too large is refused up front (aioquic would silently block the queue with it) ...
    assert not conn.send_datagram(b"x" * (limit + 1))
    # ... and later datagrams still flow.
    assert conn.send_datagram(b"after")
    conn.transmit()
    assert await asyncio.wait_for(bob_side.datagrams.get(), 5) == b"after"

    for i in range(50):
        assert bob_side.conn.send_datagram(i.to_bytes(2, "big") * 100)
    bob.flush()
    back = [await asyncio.wait_for(got.get(), 5) for _ in range(50)]
    assert sorted(back) == sorted(i.to_bytes(2, "big") * 100 for i in range(50))


async def test_datagrams_done_answers_in_the_receive_pass(
    endpoints: EndpointMaker, ca: Pki
) -> None:
    """The tunnel's hooks: ``datagrams_done`` runs once per wake-up, after the wake-up's
    datagrams went to ``datagram_handler``; what it queues goes out in that wake-up's
    transmit pass. ``transmit(now=True)`` outside a pass sends before it returns, and
    leaves no flush scheduled behind."""
    alice, _bob, conn, bob_side = await tunnel_pair(endpoints, ca)
    replies: asyncio.Queue[bytes] = asyncio.Queue()
    conn.datagram_handler = replies.put_nowait
    gathered: list[bytes] = []
    batches: list[list[bytes]] = []
    bob_conn = bob_side.conn
    bob_conn.datagram_handler = gathered.append

    def done() -> None:
        batches.append(list(gathered))
        assert bob_conn.send_datagram(b"answer to %d" % len(gathered))
        bob_conn.transmit(now=True)  # inside the pass: at its end
        gathered.clear()

    bob_conn.datagrams_done = done
    await asyncio.sleep(0.1)
    sent = alice.stats.datagrams_sent
    for i in range(5):  # queued on the engine directly, as the tunnel does
        conn.quic.send_datagram_frame(b"request %d" % i)
    loop = asyncio.get_running_loop()
    scheduled: list[object] = []
    call_soon = loop.call_soon

    def recording_call_soon(callback: Any, *args: Any, **kwargs: Any) -> asyncio.Handle:
        scheduled.append(callback)
        return call_soon(callback, *args, **kwargs)

    loop.call_soon = recording_call_soon  # type: ignore[method-assign]
    try:
        conn.transmit(now=True)
    finally:
        del loop.call_soon  # the class's own again
    assert alice.stats.datagrams_sent > sent  # sent before transmit returned
    assert alice.flush not in scheduled  # and no loop iteration left to run for it
    answers = []
    while sum(len(b) for b in batches) < 5:
        answers.append(await asyncio.wait_for(replies.get(), 5))
    while len(answers) < len(batches):
        answers.append(await asyncio.wait_for(replies.get(), 5))
    assert [d for b in batches for d in b] == [b"request %d" % i for i in range(5)]
    assert all(batches)  # never called for a wake-up without datagrams
    assert sorted(answers) == sorted(b"answer to %d" % len(b) for b in batches)
    bob_conn.datagrams_done = None
    assert conn.send_datagram(b"no hook")
    conn.transmit()
    await asyncio.sleep(0.2)
    assert gathered == [b"no hook"] and len(batches) == len(answers)


async def test_datagrams_done_for_datagrams_from_a_stream(
    endpoints: EndpointMaker, ca: Pki
) -> None:
    """Datagrams handed in by ``receive_datagrams`` (a TCP 443 stream) reach
    ``datagrams_done`` as socket ones do: the agent's data path writes to its TUN there."""
    alice, bob, conn, bob_side = await tunnel_pair(endpoints, ca)
    bob_conn = bob_side.conn
    gathered: list[bytes] = []
    batches: list[list[bytes]] = []
    bob_conn.datagram_handler = gathered.append
    bob_conn.datagrams_done = lambda: batches.append(list(gathered))
    await asyncio.sleep(0.1)
    captured: list[bytes] = []

    def divert(_conn: Any, datagrams: list[tuple[bytes, Any]]) -> list[tuple[bytes, Any]]:
        captured.extend(data for data, _addr in datagrams)
        return []

    alice.send_hook = divert
    assert conn.send_datagram(b"over a stream")
    conn.transmit(now=True)
    alice.send_hook = None
    assert captured
    bob.receive_datagrams(captured, bob_conn.peer_address)
    assert batches == [[b"over a stream"]]
    bob_conn.datagrams_done = None


async def test_pending_datagram_queue_is_bounded(endpoints: EndpointMaker, ca: Pki) -> None:
    bob = await endpoints(
        identity=ca.node("bob"), trust=ca.trust, accept={ALPN_TUNNEL: Handlers().factory}
    )
    alice = await endpoints(identity=ca.node("alice"), trust=ca.trust, max_pending_datagrams=8)
    conn = await alice.connect(
        port_of(bob), alpn=ALPN_TUNNEL, expect="node", expected_name=f"bob.{DOMAIN}"
    )
    accepted = [conn.send_datagram(b"d" * 100) for _ in range(20)]
    assert accepted == [True] * 8 + [False] * 12


async def test_relay_chosen_connection_ids(endpoints: EndpointMaker, ca: Pki, engine: str) -> None:
    """The seam the TRS uses: CIDs from a factory, the first DCID chosen by the client."""
    issued: list[int] = []

    def client_cids(seq: int) -> bytes:
        issued.append(seq)
        return b"\xc1" + seq.to_bytes(7, "big")

    server_seq = itertools.count()
    seen: list[tuple[tuple[str, int], bytes]] = []

    def server_factory(addr: tuple[object, ...], dcid: bytes) -> object:
        seen.append(((str(addr[0]), int(addr[1])), dcid))  # type: ignore[call-overload]
        return lambda seq: b"\x5e" + next(server_seq).to_bytes(7, "big")

    handlers = Handlers()
    server = await endpoints(
        identity=ca.service("nms"), trust=ca.trust, accept={ALPN_SIGNALLING: handlers.factory}
    )
    server.server_connection_id_factory = server_factory  # type: ignore[assignment]
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    first_dcid = b"\x77" * 8
    conn = await dial_nms(
        client,
        port_of(server),
        connection_id_factory=client_cids,
        initial_destination_cid=first_dcid,
    )
    assert await request(conn, b"over relay ids") == b"echo:over relay ids"
    assert conn.engine == engine
    assert conn.quic.host_cid == b"\xc1" + bytes(7)
    assert seen and seen[0][1] == first_dcid
    (server_side,) = handlers.made
    assert server_side.conn.quic.original_destination_connection_id == first_dcid
    assert server_side.conn.quic.host_cid[:1] == b"\x5e"
    if engine == "aioquic":
        # aioquic draws its spare CIDs from the factory too (qh3's core draws its own).
        assert issued[:2] == [0, 1]
        assert all(c[:1] == b"\xc1" for c in conn.quic.host_cids)
        assert all(c[:1] == b"\x5e" for c in server_side.conn.quic.host_cids)


async def test_bad_cid_factory_is_refused(endpoints: EndpointMaker, ca: Pki) -> None:
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    with pytest.raises(ValueError, match="connection_id_factory"):
        await client.connect(
            ("127.0.0.1", 9),
            alpn=ALPN_SIGNALLING,
            expected_name=NMS_NAME,
            connection_id_factory=lambda seq: b"short",
        )


async def test_close_reaches_peer_handler(endpoints: EndpointMaker, ca: Pki) -> None:
    handlers = Handlers()
    server = await endpoints(
        identity=ca.service("nms"), trust=ca.trust, accept={ALPN_SIGNALLING: handlers.factory}
    )
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    client_handlers = Handlers()
    conn = await client.connect(
        port_of(server),
        alpn=ALPN_SIGNALLING,
        expected_name=NMS_NAME,
        handler_factory=client_handlers.factory,
    )
    assert await request(conn, b"x") == b"echo:x"
    conn.close("node shutting down")
    await asyncio.wait_for(conn.wait_closed(), 5)
    assert conn.is_closed and conn.error is None
    assert await asyncio.wait_for(client_handlers.made[0].lost, 5) is None
    error = await asyncio.wait_for(handlers.made[0].lost, 5)
    assert isinstance(error, Unavailable)
    assert "node shutting down" in str(error)
    assert not conn.send_datagram(b"late")


async def test_idle_timeout_ends_connection(endpoints: EndpointMaker, ca: Pki) -> None:
    handlers = Handlers()
    server = await endpoints(
        identity=ca.service("nms"),
        trust=ca.trust,
        idle_timeout=0.6,
        accept={ALPN_SIGNALLING: handlers.factory},
    )
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust, idle_timeout=0.6)
    conn = await dial_nms(client, port_of(server))
    await asyncio.wait_for(conn.wait_closed(), 10)
    assert isinstance(conn.error, Timeout)
    server_error = await asyncio.wait_for(handlers.made[0].lost, 10)
    assert isinstance(server_error, Timeout)
    # Both tables are emptied once the closing period is over.
    async with asyncio.timeout(10):
        while client.connections or server.connections:  # noqa: ASYNC110 - endpoint state
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("engine", ["qh3"])  # ack_at_once: qh3's (aioquic ACKs on a timer)
async def test_pings_do_not_rearm_a_far_deadline_and_idle_timeout_still_fires(
    endpoints: EndpointMaker, ca: Pki
) -> None:
    # A signalling service's earliest deadline is the idle timeout of the node that PINGed
    # longest ago: far off, and moved later by every PING. The timer is left armed (it
    # fires early, once) instead of re-armed per PING; the timeout itself stays on time.
    handlers = Handlers()
    server = await endpoints(
        identity=ca.service("nms"),
        trust=ca.trust,
        idle_timeout=3.0,
        ack_at_once=True,  # as signalling services open it
        accept={ALPN_SIGNALLING: handlers.factory},
    )
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust, idle_timeout=3.0)
    conn = await dial_nms(client, port_of(server))
    await asyncio.sleep(0.3)  # the handshake's last acknowledgements
    arms: list[float | None] = []
    arm = server._timer.arm

    def counting(when: float | None) -> None:
        arms.append(when)
        arm(when)

    server._timer.arm = counting  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    for uid in range(20):
        conn.quic.send_ping(uid)
        conn.transmit()
        await asyncio.sleep(0.05)
    assert conn.ping_acked_at is not None and conn.ping_acked_at > loop.time() - 0.2
    assert len(arms) <= 2, arms  # 20 PINGs answered; the far deadline was not re-armed each
    last_activity = loop.time()
    server_error = await asyncio.wait_for(handlers.made[0].lost, 10)
    assert isinstance(server_error, Timeout)
    # Idle timeout 3 s (qh3 and aioquic may take up to 3 PTOs more): on time, not late.
    assert 2.5 < loop.time() - last_activity < 4.5


async def test_connect_timeout_when_nobody_answers(endpoints: EndpointMaker, ca: Pki) -> None:
    # A bound UDP socket that never answers.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
        with pytest.raises(Timeout, match="no QUIC handshake"):
            await client.connect(
                silent.getsockname(), alpn=ALPN_SIGNALLING, expected_name=NMS_NAME, timeout=0.5
            )
        assert all(c.is_closed for c in client.connections)
    finally:
        silent.close()


async def test_dual_stack_endpoint_reaches_ipv4_and_ipv6(endpoints: EndpointMaker, ca: Pki) -> None:
    if not socket.has_ipv6:
        pytest.skip("this kernel has no IPv6: the dual-stack case cannot be run")
    server = await endpoints(
        host="::",
        identity=ca.service("nms"),
        trust=ca.trust,
        accept={ALPN_SIGNALLING: Handlers().factory},
    )
    port = server.local_address[1]
    v4 = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    conn4 = await dial_nms(v4, ("127.0.0.1", port))
    assert await request(conn4, b"4") == b"echo:4"
    v6 = await endpoints(host="::1", identity=ca.node("bob"), trust=ca.trust)
    conn6 = await dial_nms(v6, ("::1", port))
    assert await request(conn6, b"6") == b"echo:6"
    addresses = sorted(c.peer_address[0] for c in server.connections)
    assert addresses == ["127.0.0.1", "::1"]


async def test_bind_needs_an_ip_literal(ca: Pki) -> None:
    with pytest.raises(InvalidArgument):
        await QuicEndpoint.open(
            host="localhost", port=0, identity=ca.service("nms"), trust=ca.trust
        )


async def test_endpoint_close_tells_peers(endpoints: EndpointMaker, ca: Pki) -> None:
    handlers = Handlers()
    server = await endpoints(
        identity=ca.service("nms"), trust=ca.trust, accept={ALPN_SIGNALLING: handlers.factory}
    )
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    conn = await dial_nms(client, port_of(server))
    await server.close()
    await asyncio.wait_for(conn.wait_closed(), 5)
    assert isinstance(conn.error, Unavailable)
    assert "endpoint closing" in str(conn.error)
    with pytest.raises(Unavailable):
        await server.connect(port_of(client), alpn=ALPN_SIGNALLING, expected_name=None)


async def test_datagram_filter_sees_traffic_first(endpoints: EndpointMaker, ca: Pki) -> None:
    handlers = Handlers()
    server = await endpoints(
        identity=ca.service("nms"), trust=ca.trust, accept={ALPN_SIGNALLING: handlers.factory}
    )
    offered: list[int] = []
    swallow = False

    def relay(data: bytes, addr: tuple[object, ...]) -> bool:
        offered.append(len(data))
        return swallow

    server.datagram_filter = relay
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    conn = await dial_nms(client, port_of(server))
    assert await request(conn, b"through") == b"echo:through"
    assert len(offered) == server.stats.datagrams_received
    swallow = True
    with pytest.raises(Timeout):
        await client.connect(
            port_of(server), alpn=ALPN_SIGNALLING, expected_name=NMS_NAME, timeout=0.5
        )
    assert server.stats.filtered > 0
    assert len(handlers.made) == 1


async def test_ping_acknowledgement_is_recorded(endpoints: EndpointMaker, ca: Pki) -> None:
    """A PING's acknowledgement sets ``ping_acked_at``: the hole-punching glue reads the
    liveness of a direct path from it."""
    server_handlers = Handlers()
    bob = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        accept={ALPN_TUNNEL: Acceptor(server_handlers.factory, expect="node")},
    )
    alice = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    conn = await dial_node(alice, port_of(bob))
    await asyncio.sleep(0.1)
    before = conn.ping_acked_at
    conn.quic.send_ping(7)
    conn.transmit()
    for _ in range(50):
        await asyncio.sleep(0.02)
        if conn.ping_acked_at != before:
            break
    assert conn.ping_acked_at is not None and conn.ping_acked_at != before
