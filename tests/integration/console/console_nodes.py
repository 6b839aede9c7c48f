"""Registered nodes for the console test, without root: the one place that brings them up.

Each node is enrolled at the real AS over REST exactly as ``cyphonic-agent enroll`` does
(``cyphonic_agent.enroll.enroll``: its key never leaves it), then runs what the agent runs
minus the TUN: one QUIC endpoint (mutual TLS) holding its NMS signalling connection, a
keepalive, the agent's ``RelayClient`` for pattern 3 and a tunnel acceptor. What it reports
to the NMS decides how the NMS classifies it (a private address it does not use: behind NAT).

The agent is being split into a sans-I/O core (issue 13); when that lands, ``ConsoleNode``
should become that core with fake edges, and nothing else in the console test changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from ipaddress import ip_address
from pathlib import Path

import httpx
from aioquic.quic.events import QuicEvent
from console_services import DOMAIN, Services
from cyphonic.config import ALPN_SIGNALLING, ALPN_TUNNEL
from cyphonic.errors import CyphonicError, PermissionDenied
from cyphonic.pki import PeerIdentity
from cyphonic.quic import Acceptor, Connection, QuicEndpoint
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import wrap
from cyphonic_agent.enroll import enroll, load_node_identity, load_node_trust
from cyphonic_agent.relay import RelayClient, RelayedPath

KEEPALIVE_S = 2.0


class Tunnel:
    """A node-to-node tunnel connection: counts the DATAGRAMs it gets."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        conn.datagram_handler = self.received.put_nowait

    def quic_event_received(self, event: QuicEvent) -> None:
        return None

    def connection_lost(self, error: CyphonicError | None) -> None:
        return None


class ConsoleNode:
    """One enrolled node connected to the NMS (see the module docstring)."""

    def __init__(self, name: str, state_dir: Path, *, bind: str, report: str | None) -> None:
        self.name = name
        self.fqdn = f"{name}.{DOMAIN}"
        self.state_dir = state_dir
        self.bind = bind
        self.report = report  # an address to report instead of the socket's: "behind NAT"
        self.endpoint: QuicEndpoint | None = None
        self.nms: SignallingSession | None = None
        self.relay: RelayClient | None = None
        self.directions: asyncio.Queue[pb.RouteDirection] = asyncio.Queue()
        self.accepted: asyncio.Queue[Connection] = asyncio.Queue()
        self.may_accept: set[str] = set()
        self._keepalive: asyncio.Task[None] | None = None

    async def start(self, services: Services) -> None:
        assert services.nms is not None
        self.endpoint = await QuicEndpoint.open(
            host=self.bind,
            port=0,
            identity=load_node_identity(self.state_dir),
            trust=load_node_trust(self.state_dir),
            accept={
                ALPN_TUNNEL: Acceptor(
                    handler_factory=self._accepted, expect="node", authorize=self._authorize
                )
            },
        )
        nms_host = "::1" if ":" in self.bind else "127.0.0.1"
        conn = await self.endpoint.connect(
            (nms_host, services.nms.quic_port),
            alpn=ALPN_SIGNALLING,
            expect="service",
            expected_name=f"nms.svc.{DOMAIN}",
            handler_factory=SignallingSession.factory(self._on_nms),
        )
        assert isinstance(conn.handler, SignallingSession)
        self.nms = conn.handler
        self.relay = RelayClient(endpoint=self.endpoint, nms=lambda: self.nms, keepalive_s=1.0)
        self.relay.start()
        await self.register()
        self._keepalive = asyncio.ensure_future(self._keep_alive())

    async def register(self, report: str | None = None) -> pb.RegisterResponse:
        """(Re-)register; a new ``report`` is what an agent says after moving to another
        network (the NMS records the handover and re-decides the node's routes)."""
        assert self.endpoint is not None and self.nms is not None
        self.report = report or self.report
        host, port = self.endpoint.local_address[:2]
        reported = ip_address(self.report or host)
        answer = await self.nms.request(
            wrap(pb.RegisterRequest(local_addresses=[pb.Endpoint(ip=reported.packed, port=port)]))
        )
        return answer.register_response

    async def _keep_alive(self) -> None:
        sequence = 0
        while self.nms is not None and self.nms.is_open:
            await asyncio.sleep(KEEPALIVE_S)
            sequence += 1
            with contextlib.suppress(CyphonicError):
                await self.nms.request(wrap(pb.Keepalive(sequence=sequence)), timeout=5)

    async def _on_nms(self, message: pb.Envelope, _session: SignallingSession) -> None:
        body = message.WhichOneof("body")
        if body == "route_direction":
            self.directions.put_nowait(message.route_direction)
        elif body == "relay_cids" and self.relay is not None:
            self.relay.peer_cids_received(message.relay_cids)

    def _authorize(self, peer: PeerIdentity) -> None:
        if peer.name not in self.may_accept:
            raise PermissionDenied(f"no route to {peer.name}")

    def _accepted(self, conn: Connection) -> Tunnel:
        self.accepted.put_nowait(conn)
        return Tunnel(conn)

    async def route_to(self, peer: ConsoleNode) -> pb.RouteResponse:
        """Ask the NMS for a route to ``peer`` (as a DNS lookup of its name would)."""
        assert self.nms is not None
        answer = await self.nms.request(wrap(pb.RouteRequest(fqdn=peer.fqdn)))
        peer.may_accept.add(self.fqdn)
        return answer.route_response

    async def open_relayed(self, path: RelayedPath) -> Connection:
        """The end-to-end tunnel through the TRS, as the connecting side opens it."""
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

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        if self.relay is not None:
            await self.relay.close()
        if self.endpoint is not None:
            await self.endpoint.close()


async def enrolled_node(
    services: Services, name: str, *, bind: str = "127.0.0.1", report: str | None = None
) -> ConsoleNode:
    """Create ``name`` at the AS, enrol it with a one-time token, connect and register."""
    assert services.auth is not None
    async with httpx.AsyncClient(
        base_url=services.auth.url, headers=services.admin, timeout=10
    ) as http:
        created = await http.post("/v1/nodes", json={"name": name})
        assert created.status_code == 201, created.text
        token = (await http.post(f"/v1/nodes/{name}/enrolment-tokens", json={})).json()["token"]
    state_dir = services.tmp / "nodes" / name
    await enroll(as_url=services.auth.url, token=token, state_dir=state_dir)
    node = ConsoleNode(name, state_dir, bind=bind, report=report)
    await node.start(services)
    return node


async def relayed_pair(a: ConsoleNode, b: ConsoleNode, *, datagrams: int = 50) -> str:
    """``a`` asks for ``b``; both allocate at the TRS, a opens the tunnel through it and
    they exchange ``datagrams`` each way. The route id."""
    answer = await a.route_to(b)
    assert answer.pattern == pb.ROUTE_PATTERN_RELAY, answer
    da = await asyncio.wait_for(a.directions.get(), 10)
    db = await asyncio.wait_for(b.directions.get(), 10)
    assert a.relay is not None and b.relay is not None
    path_a, _ = await asyncio.gather(a.relay.prepare_direction(da), b.relay.prepare_direction(db))
    tunnel = await a.open_relayed(path_a)
    served = await asyncio.wait_for(b.accepted.get(), 10)
    for sender, receiver in ((tunnel, served), (served, tunnel)):
        for i in range(datagrams):
            assert sender.send_datagram(b"console-test-" + i.to_bytes(2, "big") + bytes(200))
        handler = receiver.handler
        assert isinstance(handler, Tunnel)
        for _ in range(datagrams):
            await asyncio.wait_for(handler.received.get(), 10)
    return str(da.route_id)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False
