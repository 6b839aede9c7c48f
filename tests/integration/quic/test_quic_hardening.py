"""The endpoint under faults and floods, over real UDP sockets on loopback: an engine that
raises on one datagram or timer, and Initial floods against the handshake cap (refused
with a retry-after, ``cyphonic.quic.refusal``)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cyphonic.config import ALPN_TUNNEL
from cyphonic.errors import Overloaded, Timeout, Unavailable
from cyphonic.quic import Acceptor, Connection, QuicEndpoint
from cyphonic.quic.refusal import RETRY_AFTER_S
from quic_harness import DOMAIN, EndpointMaker, Handlers, Pki, port_of, request

pytestmark = pytest.mark.timeout(60)


class EngineFault(Exception):
    """What the patched engine raises."""


def fail_once(method: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    """``method`` raising EngineFault on its first call, then itself; and the call count."""
    calls = [0]

    def patched(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise EngineFault("injected")
        return method(*args, **kwargs)

    return patched, calls


async def tunnel_server(
    endpoints: EndpointMaker, ca: Pki, **kwargs: Any
) -> tuple[QuicEndpoint, Handlers]:
    handlers = Handlers()
    server = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
        **kwargs,
    )
    return server, handlers


async def connect(
    endpoints: EndpointMaker, ca: Pki, server: QuicEndpoint, name: str, *, within: float = 10.0
) -> Connection:
    client = await endpoints(identity=ca.node(name), trust=ca.trust)
    return await client.connect(
        port_of(server),
        alpn=ALPN_TUNNEL,
        expect="node",
        expected_name=f"bob.{DOMAIN}",
        handler_factory=Handlers().factory,
        timeout=within,
    )


async def wait_for(predicate: Callable[[], bool], *, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - endpoint state, no event to wait on
            await asyncio.sleep(0.01)


async def test_a_datagram_the_engine_fails_on_is_dropped_alone(
    endpoints: EndpointMaker, ca: Pki
) -> None:
    server, handlers = await tunnel_server(endpoints, ca)
    first = await connect(endpoints, ca, server, "alice")
    second = await connect(endpoints, ca, server, "carol")
    victim = handlers.made[0].conn
    victim.quic.receive_datagram, calls = fail_once(victim.quic.receive_datagram)  # type: ignore[method-assign]
    # A GRO train (the client's sends are GSO) goes to the engine's batch entry point: it
    # fails alike, on the same counter.
    original_train = victim.quic.receive_gro

    def failing_train(*args: Any) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise EngineFault("injected")
        original_train(*args)

    victim.quic.receive_gro = failing_train  # type: ignore[method-assign]

    # The failed datagram is lost, QUIC sends its data again: the request still completes,
    # on the same connection, and the other connection never noticed.
    assert await request(first, b"after-fault", within=10) == b"echo:after-fault"
    assert calls[0] >= 2
    assert server.stats.internal_errors == 1
    assert victim.is_ready and victim in server.connections
    assert await request(second, b"other") == b"echo:other"


async def test_a_failed_transmit_pass_is_recovered_by_quic(
    endpoints: EndpointMaker, ca: Pki
) -> None:
    server, handlers = await tunnel_server(endpoints, ca)
    client = await connect(endpoints, ca, server, "alice")
    victim = handlers.made[0].conn
    victim.quic.datagrams_to_send, calls = fail_once(victim.quic.datagrams_to_send)  # type: ignore[method-assign]
    # The echo's first transmit pass raises: its packets are lost and sent again.
    assert await request(client, b"again", within=10) == b"echo:again"
    assert calls[0] >= 2
    assert server.stats.internal_errors == 1
    assert victim.is_ready and victim in server.connections


async def test_a_failing_initial_leaves_nothing_behind(
    endpoints: EndpointMaker, ca: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = await tunnel_server(endpoints, ca)
    accept = server._accept

    def accept_broken(dcid: bytes, addr: Any) -> Connection | None:
        conn = accept(dcid, addr)
        assert conn is not None
        conn.quic.receive_datagram, _ = fail_once(conn.quic.receive_datagram)  # type: ignore[method-assign]
        return conn

    monkeypatch.setattr(server, "_accept", accept_broken)
    with pytest.raises(Timeout):
        await connect(endpoints, ca, server, "alice", within=1.0)
    assert server.stats.internal_errors >= 1
    assert server.connections == []
    assert server._by_cid == {} and not server._handshaking

    monkeypatch.undo()  # the engine works again: so does the endpoint
    conn = await connect(endpoints, ca, server, "alice")
    assert await request(conn, b"hello") == b"echo:hello"


async def test_a_timer_the_engine_fails_on_ends_that_connection_only(
    endpoints: EndpointMaker, ca: Pki
) -> None:
    server, handlers = await tunnel_server(endpoints, ca)
    await connect(endpoints, ca, server, "alice")
    second = await connect(endpoints, ca, server, "carol")
    victim = handlers.made[0]
    quic = victim.conn.quic
    quic.handle_timer, _ = fail_once(quic.handle_timer)  # type: ignore[method-assign]
    # A deadline 10 ms ahead (the engines' own ones may be a minute away on a quiet
    # connection); the next transmit pass arms the endpoint's timer with it.
    due = asyncio.get_running_loop().time() + 0.01
    quic.get_timer = lambda: due  # type: ignore[method-assign]
    victim.conn.transmit()
    error = await asyncio.wait_for(victim.lost, 10)
    assert isinstance(error, Unavailable)
    assert victim.conn.is_closed and victim.conn not in server.connections
    assert server.stats.internal_errors == 1
    # The endpoint's single timer and the other connection carry on.
    assert await request(second, b"still-here") == b"echo:still-here"
    assert handlers.made[1].conn.is_ready


@pytest.fixture
def raw_udp() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def initial(alpn: str, address: tuple[str, int]) -> bytes:
    """A client's first Initial (a fresh connection ID each call), as a flood sends it."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[alpn]))
    quic.connect(address, now=time.monotonic())
    datagram, _ = quic.datagrams_to_send(now=time.monotonic())[0]
    return datagram


async def test_initial_flood_is_capped(
    endpoints: EndpointMaker, ca: Pki, raw_udp: socket.socket
) -> None:
    server, _ = await tunnel_server(endpoints, ca, max_handshakes=2, idle_timeout=2.0)
    for _ in range(5):  # five half-open handshakes from one address, never completed
        raw_udp.sendto(initial(ALPN_TUNNEL, port_of(server)), port_of(server))
    await wait_for(lambda: server.stats.handshakes_refused == 3)
    assert len(server.connections) == 2 and server.stats.connections_accepted == 0
    # A genuine peer is refused too while the cap is taken (told to come back later) ...
    with pytest.raises(Overloaded):
        await connect(endpoints, ca, server, "alice", within=5.0)
    assert server.stats.handshakes_refused > 3
    # ... until the half-open ones reach their idle timeout: no state kept for them, and
    # room for the peer again.
    await wait_for(lambda: not server.connections)
    conn = await connect(endpoints, ca, server, "alice")
    assert await request(conn, b"hello") == b"echo:hello"


async def test_completed_handshakes_do_not_count_against_the_cap(
    endpoints: EndpointMaker, ca: Pki
) -> None:
    server, handlers = await tunnel_server(endpoints, ca, max_handshakes=1)
    conns = [await connect(endpoints, ca, server, name) for name in ("alice", "carol", "dave")]
    assert len(handlers.made) == 3
    assert server.stats.handshakes_refused == 0
    for i, conn in enumerate(conns):
        assert await request(conn, f"r{i}".encode()) == f"echo:r{i}".encode()


async def test_clients_beyond_the_cap_wait_their_turn(endpoints: EndpointMaker, ca: Pki) -> None:
    """A storm larger than ``max_handshakes``: the clients beyond the cap are refused with a
    retry-after, come back after it and are served in turn; every one connects."""
    server, handlers = await tunnel_server(endpoints, ca, max_handshakes=3)
    names = [f"n{i}" for i in range(9)]

    async def patiently(name: str) -> Connection:
        while True:
            try:
                return await connect(endpoints, ca, server, name, within=30.0)
            except Overloaded as exc:
                await asyncio.sleep(exc.retry_after_s)

    conns = await asyncio.gather(*(patiently(name) for name in names))
    assert server.stats.refusals_sent > 0  # some had to wait
    assert len(handlers.made) == len(names)
    for i, conn in enumerate(conns):
        assert await request(conn, f"r{i}".encode()) == f"echo:r{i}".encode()


async def test_a_client_over_the_cap_is_refused_at_once_then_gets_in(
    endpoints: EndpointMaker, ca: Pki, raw_udp: socket.socket
) -> None:
    """Over ``max_handshakes`` a client is refused before the handshake (``quic.refusal``):
    its connect raises ``Overloaded`` with the retry-after at once, not at its connect
    timeout; the server keeps no state for it; it gets in once the slot is free."""
    server, handlers = await tunnel_server(endpoints, ca, max_handshakes=1, idle_timeout=1.5)
    raw_udp.sendto(initial(ALPN_TUNNEL, port_of(server)), port_of(server))  # holds the slot
    await wait_for(lambda: len(server.connections) == 1)
    started = time.monotonic()
    with pytest.raises(Overloaded) as refused:
        await connect(endpoints, ca, server, "alice", within=5.0)
    assert time.monotonic() - started < 1.0
    low, high = RETRY_AFTER_S
    assert low <= refused.value.retry_after_s <= high
    assert "retry-after-ms=" in refused.value.message
    # One refusal per Initial datagram (qh3's hello may take two); nothing kept for them.
    count = server.stats.refusals_sent
    assert 1 <= count == server.stats.handshakes_refused <= 2
    assert len(server.connections) == 1 and not handlers.made

    await wait_for(lambda: not server.connections)  # the half-open one timed out
    conn = await connect(endpoints, ca, server, "alice")
    assert await request(conn, b"hello") == b"echo:hello"
    assert server.stats.refusals_sent == count


async def test_a_refusal_is_smaller_than_the_initial(
    endpoints: EndpointMaker, ca: Pki, raw_udp: socket.socket
) -> None:
    """Never amplifies (RFC 9000 8): each Initial beyond the cap gets one small answer."""
    server, _ = await tunnel_server(endpoints, ca, max_handshakes=0)
    sizes = []
    for _ in range(3):
        datagram = initial(ALPN_TUNNEL, port_of(server))
        sizes.append(len(datagram))
        raw_udp.sendto(datagram, port_of(server))
    raw_udp.settimeout(2.0)
    answers = [(await asyncio.to_thread(raw_udp.recvfrom, 2048))[0] for _ in range(3)]
    assert server.stats.refusals_sent == 3 and not server.connections
    assert all(len(a) < 150 <= min(sizes) for a in answers)


async def test_a_stale_handshake_gives_its_slot_up(
    endpoints: EndpointMaker, ca: Pki, raw_udp: socket.socket
) -> None:
    """A half-open handshake older than ``handshake_timeout_s`` frees its slot for a new
    client (not only at the idle timeout, 60 s at the NMS)."""
    server, _ = await tunnel_server(endpoints, ca, max_handshakes=1, idle_timeout=30.0)
    server.handshake_timeout_s = 0.3
    raw_udp.sendto(initial(ALPN_TUNNEL, port_of(server)), port_of(server))
    await wait_for(lambda: len(server._handshaking) == 1)
    await asyncio.sleep(0.4)
    conn = await connect(endpoints, ca, server, "alice", within=5.0)
    assert await request(conn, b"hi") == b"echo:hi"
    assert server.stats.refusals_sent == 0


async def test_the_rest_of_a_refused_hello_is_refused_too(
    endpoints: EndpointMaker, ca: Pki, raw_udp: socket.socket
) -> None:
    """An Initial with a refused Destination CID is refused even once a slot is free: a
    connection from the second half of a hello would wait for the first forever."""
    server, _ = await tunnel_server(endpoints, ca, max_handshakes=0)
    datagram = initial(ALPN_TUNNEL, port_of(server))
    raw_udp.sendto(datagram, port_of(server))
    await wait_for(lambda: server.stats.refusals_sent == 1)
    server.max_handshakes = 8
    raw_udp.sendto(datagram, port_of(server))
    await wait_for(lambda: server.stats.refusals_sent == 2)
    assert not server.connections
    raw_udp.sendto(initial(ALPN_TUNNEL, port_of(server)), port_of(server))  # a new client
    await wait_for(lambda: len(server.connections) == 1)


async def test_a_storm_of_initials_waits_in_the_endpoint_not_before_open_connections(
    endpoints: EndpointMaker, ca: Pki, raw_udp: socket.socket
) -> None:
    # Each Initial starts a server handshake (a signature: about a millisecond). A burst of
    # them is read at once and started a pass's budget at a time, so the datagrams of open
    # connections behind them in the socket are answered first (they used to wait for the
    # whole burst, and drop with it when the receive buffer overflowed); Initials that
    # cannot start within their wait are refused with a retry-after, not left to the
    # clients' retransmissions. Every one is taken or refused.
    count = 600
    server, _ = await tunnel_server(endpoints, ca, max_handshakes=4096, idle_timeout=5.0)
    alice = await connect(endpoints, ca, server, "alice")
    burst = [initial(ALPN_TUNNEL, port_of(server)) for _ in range(count)]

    def dealt_with() -> int:
        return len(server.connections) - 1 + server.stats.initials_expired

    for datagram in burst:
        raw_udp.sendto(datagram, port_of(server))
    assert await request(alice, b"meanwhile") == b"echo:meanwhile"
    assert dealt_with() < count  # answered while the burst was still being taken
    await wait_for(lambda: dealt_with() == count)
    assert server.stats.passes_cut >= 1
    assert server.stats.initials_expired > 0  # 600 handshakes take longer than their wait
    assert server.stats.refusals_sent == server.stats.handshakes_refused
    assert server.stats.handshakes_refused == server.stats.initials_expired
    conn = await connect(endpoints, ca, server, "carol")
    assert await request(conn, b"hello") == b"echo:hello"


async def test_the_services_backlog_counts_against_the_handshake_bound(
    endpoints: EndpointMaker, ca: Pki
) -> None:
    """The NMS's registrations in progress count with its handshakes under way: while
    they fill the bound a new client is refused before its handshake (not after it, when
    its registration would be refused); once they drain it gets in."""
    server, _ = await tunnel_server(endpoints, ca, max_handshakes=4)
    in_progress = [4]
    server.backlog = lambda: in_progress[0]
    with pytest.raises(Overloaded):
        await connect(endpoints, ca, server, "alice", within=5.0)
    assert server.stats.refusals_sent >= 1 and not server.connections
    in_progress[0] = 3
    conn = await connect(endpoints, ca, server, "alice")
    assert await request(conn, b"hello") == b"echo:hello"
