"""Pattern 3 end to end on loopback: real ``cyphonic-as``, ``cyphonic-nms`` and ``cyphonic-trs``
processes (Postgres, Redis), real agents with fake edges (no TUN, no root) whose
``cyphonic_agent.relay.RelayClient`` the test drives step by step: allocation at the TRS,
the CID exchange through the NMS, and the node-to-node tunnel (ALPN cyphonic-tun/1, mutual
TLS) through the relay.

Both agents report a private address other than the one the NMS sees, so the NMS takes
them for nodes behind NAT and directs pattern 3.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from aioquic.quic.events import QuicEvent
from cyphonic.config import ALPN_TUNNEL
from cyphonic.errors import (
    CyphonicError,
    PermissionDenied,
    Timeout,
    TokenInvalid,
    Unavailable,
)
from cyphonic.pki import PeerIdentity, init_pki
from cyphonic.quic import Connection, QuicEndpoint
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import wrap
from cyphonic_agent.relay import RelayClient, RelayedPath
from cyphonic_testing.agent import RunningAgent, agent_settings, as_process, enrol, fake_edges
from cyphonic_testing.processes import ServiceProcess, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(300)]

DOMAIN = "cyphonic.internal"
ALICE, BOB = f"alice.{DOMAIN}", f"bob.{DOMAIN}"
MARKER = b"CYPHONIC-RELAY-CLIENT-MARKER"


class Tunnel:
    """The handler of a node-to-node tunnel connection: collects DATAGRAMs."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.datagrams: asyncio.Queue[bytes] = asyncio.Queue()
        conn.datagram_handler = self.datagrams.put_nowait

    def quic_event_received(self, event: QuicEvent) -> None:
        return None

    def connection_lost(self, error: CyphonicError | None) -> None:
        return None


class SimAgent:
    """The real agent (``cyphonic_agent.agent.Agent``: one endpoint for the AS, the NMS, the
    TRS and tunnels; login, registration and keepalive; its ``RelayClient``) with fake edges
    (no TUN, no root), whose route handling the test takes over so that it can drive the
    relay client step by step: directions are queued instead of acted on, and tunnel
    connections are accepted into a ``Tunnel`` that collects DATAGRAMs.
    """

    def __init__(self, name: str, world: World) -> None:
        self.fqdn = f"{name}.{DOMAIN}"
        self.name = name
        self.world = world
        self.running: RunningAgent | None = None
        self.directions: asyncio.Queue[pb.RouteDirection] = asyncio.Queue()
        self.accepted: asyncio.Queue[Connection] = asyncio.Queue()
        self.may_accept: set[str] = set()

    async def start(
        self,
        engine: str | None = None,
        *,
        keepalive_s: float | None = None,
        peer_cids_timeout_s: float = 10.0,
    ) -> None:
        state = await enrol(
            self.world.auth,
            name=self.name,
            pki_dir=self.world.tmp / "pki",
            state_dir=self.world.tmp / self.name,
        )
        # Bound to the wildcard and reporting a private address the NMS will not see: the
        # NMS takes this node for one behind NAT (and directs pattern 3).
        settings = agent_settings(
            state, quic_host="0.0.0.0", route_setup_timeout_s=peer_cids_timeout_s
        )
        edges = fake_edges(addresses=["192.168.77.10"], engine=engine)
        self.running = RunningAgent(settings, edges=edges)
        agent = self.running.agent
        agent.nms.on_push = self._on_nms
        agent.peers.authorize = self._authorize  # type: ignore[method-assign]
        agent.peers.accepted = self._accepted  # type: ignore[method-assign]
        await self.running.start()
        if keepalive_s is not None:
            assert agent.relay is not None
            agent.relay.keepalive_s = keepalive_s
        assert agent.nms.registration is not None
        assert agent.nms.registration.network.behind_nat

    @property
    def endpoint(self) -> QuicEndpoint | None:
        return self.running.agent.endpoint if self.running else None

    @property
    def relay(self) -> RelayClient | None:
        return self.running.agent.relay if self.running else None

    @property
    def nms(self) -> SignallingSession | None:
        return self.running.agent.nms.session() if self.running else None

    def _on_nms(self, message: pb.Envelope) -> None:
        body = message.WhichOneof("body")
        if body == "route_direction":
            self.directions.put_nowait(message.route_direction)
        elif body == "relay_cids":
            assert self.relay is not None
            self.relay.peer_cids_received(message.relay_cids)

    def _authorize(self, peer: PeerIdentity) -> None:
        if peer.name not in self.may_accept:
            raise PermissionDenied(f"no route to {peer.name}")

    def _accepted(self, conn: Connection) -> Tunnel:
        self.accepted.put_nowait(conn)
        return Tunnel(conn)

    async def connect(self, path: RelayedPath) -> Connection:
        """Open the tunnel through the TRS as the connecting side does."""
        assert self.endpoint is not None
        return await self.endpoint.connect(
            path.trs,
            alpn=ALPN_TUNNEL,
            expect="node",
            expected_name=path.peer_fqdn,
            handler_factory=Tunnel,
            connection_id_factory=path.connection_id_factory(),
            initial_destination_cid=path.initial_destination_cid,
            timeout=10,
        )

    def socket_address(self) -> str:
        """host:port the TRS sees this agent at (loopback; the socket is bound to 0.0.0.0)."""
        assert self.endpoint is not None
        return f"127.0.0.1:{self.endpoint.local_address[1]}"

    async def close(self) -> None:
        if self.running is not None:
            await self.running.stop()


class World:
    """PKI, one AS, one NMS and one TRS process, agents."""

    def __init__(self, tmp: Path, pg_url: str, redis_url: str) -> None:
        self.tmp = tmp
        self.pg_url = pg_url
        self.redis_url = redis_url
        self.material = init_pki(
            tmp / "pki", domain=DOMAIN, now=datetime.datetime.now(datetime.UTC)
        )
        self.nms_port = free_port(socket.SOCK_DGRAM, host="127.0.0.1")
        self.trs_port = free_port(socket.SOCK_DGRAM, host="127.0.0.1")
        # Its own key prefix: other runs on the same Redis must not see (or remove) its
        # TRS replica.
        self.redis_prefix = f"relay-{secrets.token_hex(4)}:"
        common = {
            "CYPHONIC_REDIS_PREFIX": self.redis_prefix,
            "CYPHONIC_PKI_DIR": str(tmp / "pki"),
            "CYPHONIC_DOMAIN": DOMAIN,
            "CYPHONIC_REDIS_URL": redis_url,
            "CYPHONIC_QUIC_HOST": "127.0.0.1",
        }
        self.auth = as_process(
            tmp=tmp,
            pki_dir=tmp / "pki",
            database_url=pg_url,
            domain=DOMAIN,
            nms_endpoints=[f"127.0.0.1:{self.nms_port}"],
        )
        self.nms = ServiceProcess(
            "cyphonic_nms.cli",
            log_path=tmp / "nms.log",
            ready_marker=b"quic_listening",
            env={
                **common,
                "CYPHONIC_DATABASE_URL": pg_url,
                "CYPHONIC_QUIC_PORT": str(self.nms_port),
                "CYPHONIC_REPLICA_ID": "nms-1",
            },
        )
        self.trs = ServiceProcess(
            "cyphonic_trs.cli",
            log_path=tmp / "trs.log",
            ready_marker=b"trs_serving",
            env={**common, "CYPHONIC_QUIC_PORT": str(self.trs_port), "CYPHONIC_REPLICA_ID": "3"},
        )
        self.agents: list[SimAgent] = []

    async def start(self) -> None:
        await asyncio.gather(self.auth.start(), self.nms.start(), self.trs.start())

    async def agent(self, name: str, quic_engine: str | None = None, **options: Any) -> SimAgent:
        agent = SimAgent(name, self)
        self.agents.append(agent)
        await agent.start(quic_engine, **options)
        return agent

    async def close(self) -> None:
        for agent in self.agents:
            await agent.close()
        self.auth.stop()
        self.nms.stop()
        self.trs.stop()


@pytest.fixture
async def world(pg_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path, pg_url, redis_url)
    try:
        await w.start()
        yield w
    finally:
        await w.close()


async def eventually(check: Callable[[], bool], *, within_s: float = 5.0) -> None:
    """Wait until ``check()`` holds (TimeoutError after ``within_s``)."""
    async with asyncio.timeout(within_s):
        while True:
            if check():
                return
            await asyncio.sleep(0.05)


async def directed(a: SimAgent, b: SimAgent) -> tuple[pb.RouteDirection, pb.RouteDirection]:
    """A asks the NMS for B; both directions (pattern 3)."""
    assert a.nms is not None
    answer = await a.nms.request(wrap(pb.RouteRequest(fqdn=b.fqdn)))
    assert answer.route_response.pattern == pb.ROUTE_PATTERN_RELAY
    da = await asyncio.wait_for(a.directions.get(), 5)
    db = await asyncio.wait_for(b.directions.get(), 5)
    assert (da.role, db.role) == (pb.ROUTE_ROLE_CONNECT, pb.ROUTE_ROLE_ACCEPT)
    b.may_accept.add(a.fqdn)
    return da, db


@pytest.mark.parametrize(
    ("alice_engine", "bob_engine"), [(None, None), ("aioquic", "qh3"), ("qh3", "aioquic")]
)
async def test_relayed_tunnel_through_real_nms_and_trs(
    world: World, alice_engine: str | None, bob_engine: str | None
) -> None:
    """Pattern 3 through the real NMS and TRS processes: on the default engine (qh3), and
    with each engine on either side of the relayed tunnel (alice connects, bob accepts)."""
    alice = await world.agent("alice", alice_engine, keepalive_s=0.5)
    bob = await world.agent("bob", bob_engine, keepalive_s=0.5)
    assert alice.relay is not None and bob.relay is not None
    da, db = await directed(alice, bob)
    trs_address = ("127.0.0.1", world.trs_port)
    assert [(socket.inet_ntoa(e.ip), e.port) for e in da.relay.trs] == [trs_address]

    # Both sides at once, as the agents would: A waits for B's CIDs through the NMS.
    path_a, path_b = await asyncio.gather(
        alice.relay.prepare_direction(da), bob.relay.prepare_direction(db)
    )
    assert path_a.connects and not path_b.connects
    assert path_a.trs == path_b.trs == trs_address
    assert path_a.peer_cids == path_b.own_cids  # CID_B reached A through the NMS
    assert len(path_a.own_cids) == len(path_b.own_cids) == 16
    assert not set(path_a.own_cids) & set(path_b.own_cids)
    assert path_a.label == f"via 127.0.0.1:{world.trs_port} (trs.svc.{DOMAIN})"
    # CID_A went to B as well (the symmetric half of the exchange).
    await eventually(lambda: bool(bob.relay.book.paths[db.route_id].peer_cids))
    assert bob.relay.book.paths[db.route_id].peer_cids == path_a.own_cids

    tunnel = await alice.connect(path_a)
    assert tunnel.peer is not None and tunnel.peer.name == BOB
    served = await asyncio.wait_for(bob.accepted.get(), 5)
    assert (tunnel.engine, served.engine) == (alice_engine or "qh3", bob_engine or "qh3")
    assert served.peer is not None and served.peer.name == ALICE
    assert bob.relay.path_of_connection(served) == bob.relay.path(db.route_id)
    assert alice.relay.path_of_connection(tunnel) is not None
    # Each side opens on its TRS-assigned CIDs; B's first is A's Initial DCID. (aioquic
    # issues its spares from the TRS's too; qh3's core draws them, and a relayed connection
    # never switches to them: docs/relay.md.)
    assert tunnel.quic.host_cid == path_a.own_cids[0]
    assert served.quic.host_cid == path_b.own_cids[1]
    assert tunnel.quic.relayed and served.quic.relayed
    if tunnel.engine == "aioquic":
        assert set(tunnel.quic.host_cids) <= set(path_a.own_cids)
    if served.engine == "aioquic":
        assert set(served.quic.host_cids) <= set(path_b.own_cids[1:])
    assert tunnel.peer_address == trs_address and served.peer_address == trs_address

    for sender, receiver, text in ((tunnel, served, b"a2b"), (served, tunnel, b"b2a")):
        for i in range(20):
            assert sender.send_datagram(MARKER + text + bytes([i]))
        handler = receiver.handler
        assert isinstance(handler, Tunnel)
        got = {await asyncio.wait_for(handler.datagrams.get(), 5) for _ in range(20)}
        assert got == {MARKER + text + bytes([i]) for i in range(20)}

    # The TRS's session table shows the pair, each side at its agent's socket address.
    async with world.trs.admin() as admin:
        sessions = (await admin.get("/v1/sessions")).json()["items"]
    assert [s["route_id"] for s in sessions] == [da.route_id]
    session = sessions[0]
    assert set(session["pair"]) == {ALICE, BOB} and session["complete"]
    assert session["packets"] > 0 and session["bytes"] > 40 * len(MARKER)
    sides = {s["fqdn"]: s for s in session["sides"]}
    for agent in (alice, bob):
        assert sides[agent.fqdn]["address"] == agent.socket_address()
        assert sides[agent.fqdn]["bytes"] > 20 * len(MARKER)  # what it sent via the TRS
    # and the Redis CID table owns each agent's CIDs under its name.
    client = redis_asyncio.Redis.from_url(world.redis_url)
    try:
        for path, owner in ((path_a, ALICE), (path_b, BOB)):
            for cid in path.own_cids:
                entry = await client.hgetall(f"{world.redis_prefix}trs:cid:{cid.hex()}")
                assert entry[b"fqdn"].decode() == owner
                assert entry[b"route_id"].decode() == da.route_id
    finally:
        await client.aclose()

    # Keepalives run on both control connections (the TRS re-reads the sides' addresses).
    control = alice.relay.controls[trs_address]
    before = control.sequence
    alice.relay.nudge()
    await eventually(lambda: control.sequence >= before + 2)
    assert control.session.is_open
    # Released routes give up their CIDs here (a replaced route's Initial is not served).
    bob.relay.release(db.route_id)
    assert bob.relay.book.server_pool(path_b.own_cids[0]) is None


async def test_early_cids_replay_and_silent_peer(world: World) -> None:
    alice = await world.agent("alice", peer_cids_timeout_s=1.0)
    bob = await world.agent("bob")
    carol = await world.agent("carol", peer_cids_timeout_s=1.0)
    assert alice.relay is not None and bob.relay is not None and carol.relay is not None

    # B allocates and sends CID_B before A even looks at its direction: A keeps the push.
    da, db = await directed(alice, bob)
    path_b = await bob.relay.prepare_direction(db)
    await eventually(lambda: da.route_id in alice.relay.book._early)
    path_a = await alice.relay.prepare_direction(da)
    assert path_a.peer_cids == path_b.own_cids
    tunnel = await alice.connect(path_a)
    assert tunnel.peer is not None and tunnel.peer.name == BOB

    # The same direction again: the token was used by this node already.
    with pytest.raises(TokenInvalid, match="already used"):
        await bob.relay.prepare_direction(db)
    kept = bob.relay.path(db.route_id)  # the refused attempt did not undo the first one
    assert kept is not None and kept.own_cids == path_b.own_cids
    assert bob.relay.book.server_pool(path_b.own_cids[0]) is not None

    # A route released while its connecting side waits for the peer's CIDs.
    dc, _ = await directed(carol, alice)
    waiting = asyncio.ensure_future(carol.relay.prepare_direction(dc))
    await eventually(lambda: carol.relay.path(dc.route_id) is not None)  # allocated
    carol.relay.release(dc.route_id)
    with pytest.raises(Unavailable, match="released"):
        await waiting
    # A peer that never allocates: the connecting side gives up with Timeout.
    dc, _ = await directed(carol, alice)
    with pytest.raises(Timeout, match="no relay CIDs"):
        await carol.relay.prepare_direction(dc)
    assert carol.relay.path(dc.route_id) is None
