"""The agent's routes to peers, asyncio glue: route requests to the NMS, RouteDirections,
and the tunnel connections they lead to (connect, accept, relayed through a TRS).

Every decision is made by the sans-I/O cores: ``routes.RouteTable`` (route states) and
``control`` (request de-duplication with a failure hold, connect retries, reversal); this
module sends, connects, sleeps and logs. The packet path (TUN <-> DATAGRAM frames) is
``datapath.DataPath`` and never passes through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from cyphonic.config import ALPN_TUNNEL
from cyphonic.errors import CyphonicError, NotFound, PermissionDenied, Unavailable
from cyphonic.hostport import format_host_port
from cyphonic.log import get_logger
from cyphonic.pki import PeerIdentity
from cyphonic.quic import Connection, QuicEndpoint
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import expect, wrap

from cyphonic_agent.config import AgentSettings
from cyphonic_agent.control import (
    Ask,
    Attempt,
    ConnectPlan,
    Exhausted,
    Join,
    Known,
    NoSuchPeer,
    OverlayPlan,
    Refused,
    Reversals,
    RouteKey,
    RouteRequests,
    on_miss,
)
from cyphonic_agent.datapath import DataPath, Tunnel
from cyphonic_agent.dns import PeerAddresses
from cyphonic_agent.punch import (
    HolePunchPlan,
    ProbePeer,
    ProbeRelay,
    PunchState,
    Reconnect,
    Stop,
    Wait,
)
from cyphonic_agent.relay import RelayClient, RelayedPath
from cyphonic_agent.routes import (
    Accept,
    Candidate,
    Connect,
    Keep,
    PeerRoute,
    RouteState,
    RouteTable,
    address_text,
    pattern_name,
)
from cyphonic_agent.status import PathFacts
from cyphonic_agent.tunnel import TunnelCore

REQUEST_TIMEOUT_S = 5.0
"""Longest wait for an answer from the AS, the NMS or a peer."""


def routable(host: str, port: int) -> bool:
    """Whether this host has a route to ``host`` (a UDP connect sends nothing)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True  # a name: let the connection attempt say
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port or 443))
        except OSError:
            return False
    return True


@dataclass(eq=False)
class LiveTunnel:
    """What a route holds while UP: the data path's tunnel and its QUIC connection."""

    tunnel: Tunnel
    conn: Connection
    relay_address: tuple[str, int] | None = None
    """The TRS's address, for a relayed tunnel (where its packets went when it came up)."""
    punch: HolePunchPlan | None = None

    def direct_now(self) -> bool:
        """Whether a relayed tunnel's connection now goes straight to the peer."""
        if self.relay_address is None:
            return False
        return not _same_address(self.conn.peer_address, self.relay_address)


def path_facts(live: LiveTunnel, carrier: Callable[[Any], str] | None = None) -> PathFacts | None:
    """The status's view of a relayed tunnel's path (None for a direct route); ``carrier``
    names what carries packets to an address (``StreamPaths.carrier_of``)."""
    if live.relay_address is None:
        return None
    plan = live.punch
    after = None
    if plan is not None and plan.direct_at is not None:
        after = round((plan.direct_at - plan.started) * 1000, 1)
    return PathFacts(
        direct_now=live.direct_now(),
        punch=plan.state.value if plan is not None else None,
        direct_after_ms=after,
        transport=carrier(live.conn.peer_address) if carrier is not None else "udp",
    )


def _same_address(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return _plain(a) == _plain(b)


def _plain(addr: tuple[Any, ...]) -> tuple[str, int]:
    ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (str(ip), int(addr[1]))


AgentRoute = PeerRoute[LiveTunnel]


@dataclass(eq=False)
class _TunnelLink:
    """One tunnel connection and the route it serves."""

    route: AgentRoute
    conn: Connection
    session: SignallingSession
    tunnel: Tunnel | None = None


class NmsView(Protocol):
    """What route requests need of the NMS connection (``nms.NmsClient``)."""

    @property
    def detail(self) -> str: ...

    def session(self) -> SignallingSession | None: ...


@dataclass
class PeerCounters:
    route_requests: int = 0
    tunnels_connected: int = 0
    tunnels_accepted: int = 0
    tunnels_refused: int = 0
    tunnels_lost: int = 0


class Peers:
    """Routes and tunnels to other nodes. The agent sets ``endpoint``, ``relay``,
    ``datapath`` and ``overlay`` as they come up."""

    def __init__(
        self,
        *,
        settings: AgentSettings,
        fqdn: str,
        nms: NmsView,
        spawn: Callable[[Awaitable[Any]], asyncio.Task[Any]],
    ) -> None:
        self.settings = settings
        self.fqdn = fqdn
        self.nms = nms
        self.spawn = spawn
        self.log = get_logger("agent", fqdn=fqdn)
        self.routes: RouteTable[LiveTunnel] = RouteTable(
            setup_timeout=settings.route_setup_timeout_s
        )
        self.requests = RouteRequests(self.routes)
        self.reversals = Reversals()
        self.counters = PeerCounters()
        self.endpoint: QuicEndpoint | None = None
        self.relay: RelayClient | None = None
        self.datapath: DataPath | None = None
        self.overlay: OverlayPlan | None = None
        self._inflight: dict[RouteKey, asyncio.Future[AgentRoute | None]] = {}
        self._links: dict[int, _TunnelLink] = {}
        self._connecting: dict[int, asyncio.Task[None]] = {}
        self._ping_uid = 0

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def close(self) -> None:
        for task in list(self._connecting.values()):
            task.cancel()
        for task in list(self._connecting.values()):
            with contextlib.suppress(BaseException):
                await task

    # ------------------------------------------------------------------ route requests

    async def lookup(self, fqdn: str) -> PeerAddresses | None:
        """The DNS stub's hook: the peer's virtual addresses; starts the route at once."""
        fqdn = fqdn.lower().rstrip(".")
        if fqdn == self.fqdn and self.overlay is not None:
            return peer_addresses(self.overlay.own_addresses)
        route = self.routes.get(fqdn)
        if route is None or not route.addresses:
            route = await self.request_route(fqdn)
        if route is None:
            return None
        return peer_addresses(route.addresses)

    def on_miss(self, destination: bytes) -> None:
        """A TUN packet for a virtual address with no tunnel (it waits in PendingPackets)."""
        decision = on_miss(destination, plan=self.overlay, routes=self.routes, now=self._now())
        if decision.drop and self.datapath is not None:
            self.datapath.pending.discard(destination)
        if decision.ask:
            self.spawn(self._route_for_packet(destination))

    async def _route_for_packet(self, destination: bytes) -> None:
        try:
            route = await self.request_route(destination)
        except CyphonicError as exc:
            self.log.info(
                "route_request_failed", destination=address_text(destination), error=exc.message
            )
            route = None
        if route is None and self.datapath is not None:
            self.datapath.pending.discard(destination)

    async def request_route(self, key: RouteKey, *, force: bool = False) -> AgentRoute | None:
        """Ask the NMS for a route to ``key`` (FQDN or raw virtual address), once at a time.

        None: no such node. Raises why the route cannot be had (offline, NMS unreachable).
        ``force``: ask even though a route exists (it will be replaced).
        """
        decision = self.requests.begin(key, now=self._now(), force=force)
        if isinstance(decision, Join):
            return await asyncio.shield(self._inflight[key])
        if isinstance(decision, Known):
            return decision.route
        if isinstance(decision, NoSuchPeer):
            return None
        if isinstance(decision, Refused):
            raise decision.error
        assert isinstance(decision, Ask)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AgentRoute | None] = loop.create_future()
        self._inflight[key] = future
        label = key if isinstance(key, str) else address_text(key)
        try:
            session = self.nms.session()
            if session is None or not session.is_open:
                raise Unavailable(f"not connected to the NMS ({self.nms.detail or 'connecting'})")
            request = (
                pb.RouteRequest(fqdn=key)
                if isinstance(key, str)
                else pb.RouteRequest(virtual_address=key)
            )
            self.counters.route_requests += 1
            started = loop.time()
            answer = await session.request(wrap(request), timeout=REQUEST_TIMEOUT_S)
            response = expect(answer, pb.RouteResponse)
            route = self.requests.answered(key, response, now=loop.time())
            self.log.info(
                "route_answered",
                peer=route.fqdn,
                route_id=response.route_id,
                pattern=pattern_name(response.pattern),
                ms=round((loop.time() - started) * 1000, 1),
            )
            future.set_result(route)
            return route
        except NotFound as exc:
            self.requests.failed(key, exc, now=loop.time())
            self.log.info("no_such_peer", peer=label)
            future.set_result(None)
            return None
        except CyphonicError as exc:
            self.requests.failed(key, exc, now=loop.time())
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it through their own await
            raise
        finally:
            self.requests.in_flight.discard(key)
            del self._inflight[key]

    # ------------------------------------------------------------------ directions

    def directed(self, direction: pb.RouteDirection) -> None:
        """A RouteDirection pushed by the NMS."""
        action, replaced = self.routes.directed(direction, now=self._now())
        route = action.route
        if replaced is not None:
            self.close_route(replaced, "replaced by a newer route")
        self.log.info(
            "route_direction",
            peer=route.fqdn,
            route_id=route.route_id,
            pattern=route.pattern_name,
            role=pb.RouteRole.Name(route.role),  # type: ignore[arg-type]
            candidates=[str(c) for c in route.candidates],
            action=type(action).__name__.lower(),
        )
        if isinstance(action, Keep):
            return
        if isinstance(action, Accept) and route.pattern != pb.ROUTE_PATTERN_RELAY:
            # The peer connects; authorize() lets it in. A direct route may need reversing.
            if self.reversals.watches(route):
                self.spawn(self._reverse_if_silent(route))
            return
        # CONNECT, or ACCEPT of a relayed route: allocate at the TRS and serve our CIDs first.
        work = (
            self._connect_route(route)
            if isinstance(action, Connect)
            else self._accept_relayed(route)
        )
        key = id(route)
        task = self.spawn(work)
        self._connecting[key] = task
        task.add_done_callback(lambda _t: self._connecting.pop(key, None))

    async def _reverse_if_silent(self, route: AgentRoute) -> None:
        await asyncio.sleep(self.reversals.after_s)
        if not self.reversals.due(route, self.routes, self.requests.asked, now=self._now()):
            return
        self.log.info(
            "route_reversed",
            peer=route.fqdn,
            route_id=route.route_id,
            waited_s=self.reversals.after_s,
        )
        try:
            await self.request_route(route.fqdn, force=True)
        except CyphonicError as exc:
            self.log.info("route_reverse_failed", peer=route.fqdn, error=exc.message)

    def peer_offline(self, notice: pb.PeerOffline) -> None:
        route = self.routes.get(notice.fqdn.lower())
        if route is None or (notice.route_id and notice.route_id != route.route_id):
            return
        self.log.info("peer_offline", peer=route.fqdn, route_id=route.route_id)
        self.close_route(route, "peer offline")
        self.routes.tear_down(route)

    def close_route(self, route: AgentRoute, reason: str) -> None:
        task = self._connecting.pop(id(route), None)
        if task is not None:
            task.cancel()
        self._release_relay(route)
        live = route.tunnel
        if live is not None:
            if self.datapath is not None:
                self.datapath.remove_tunnel(live.tunnel)
            live.conn.close(reason)

    def _route_failed(self, route: AgentRoute, why: str) -> None:
        self._release_relay(route)
        if self.requests.route_failed(route, why, now=self._now()):
            dropped = 0
            if self.datapath is not None:
                dropped = sum(self.datapath.pending.discard(a) for a in route.addresses)
            self.log.warning(
                "route_failed",
                peer=route.fqdn,
                route_id=route.route_id,
                reason=why,
                dropped_packets=dropped,
            )

    # ------------------------------------------------------------------ tunnels: connect

    async def _connect_route(self, route: AgentRoute) -> None:
        """Connect to the peer (the first candidate that answers), then TunnelRequest."""
        if route.pattern == pb.ROUTE_PATTERN_RELAY:
            await self._connect_relayed(route)
            return
        plan = ConnectPlan.for_route(route, lambda c: routable(c.host, c.port))
        if isinstance(plan, Exhausted):
            self._route_failed(route, plan.reason)
            return
        step: Attempt | Exhausted = plan.first()
        while isinstance(step, Attempt):
            if step.pause:
                await asyncio.sleep(step.pause)
            if not self.routes.is_current(route):
                return
            route.attempts += 1
            try:
                await self._open_tunnel(route, step.candidate)
                return
            except CyphonicError as exc:
                step = plan.failed(exc)
        if self.routes.is_current(route):
            self._route_failed(route, step.reason)

    async def _open_tunnel(
        self, route: AgentRoute, candidate: Candidate, *, relayed: RelayedPath | None = None
    ) -> None:
        assert self.endpoint is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        holder: list[_TunnelLink] = []

        def make(conn: Connection) -> SignallingSession:
            session = SignallingSession(conn, on_lost=self._tunnel_lost)
            link = _TunnelLink(route=route, conn=conn, session=session)
            self._links[id(session)] = link
            holder.append(link)
            return session

        conn = await self.endpoint.connect(
            (candidate.host, candidate.port),
            alpn=ALPN_TUNNEL,
            expect="node",
            expected_name=route.fqdn,
            handler_factory=make,
            timeout=self.settings.connect_timeout_s,
            # Relayed: our TRS CIDs as ours, the peer's first as the Initial's DCID.
            connection_id_factory=relayed.connection_id_factory() if relayed else None,
            initial_destination_cid=relayed.initial_destination_cid if relayed else None,
        )
        link = holder[0]
        if not self.routes.is_current(route) or conn.is_closed:
            conn.close("route replaced")
            return
        # The peer made its side of the tunnel when it accepted us (before it confirmed the
        # handshake), so packets may flow now, in parallel with the TunnelRequest: waiting
        # for the answer would cost a round trip on every fresh route.
        self._tunnel_ready(link)
        self.counters.tunnels_connected += 1
        self.log.info(
            "tunnel_up",
            peer=route.fqdn,
            route_id=route.route_id,
            role="connect",
            pattern=route.pattern_name,
            path=relayed.label if relayed else str(candidate),
            setup_ms=round((loop.time() - started) * 1000, 1),
        )
        try:
            answer = await link.session.request(
                wrap(pb.TunnelRequest(route_id=route.route_id, mtu=self.settings.mtu)),
                timeout=REQUEST_TIMEOUT_S,
            )
            response = expect(answer, pb.TunnelResponse)
        except CyphonicError as exc:
            # Refused (a route the peer no longer has) or no answer: this tunnel is not one
            # the peer stands behind. Closing it tears the route down; the next packet or
            # lookup asks the NMS again.
            self.log.warning("tunnel_request_failed", peer=route.fqdn, error=exc.message)
            conn.close(f"{exc.code_name}: {exc.message}")
            return
        if response.route_id != route.route_id:
            conn.close("tunnel response for another route")
            return
        if response.mtu and link.tunnel is not None:
            link.tunnel.core.mtu = self._mtu_with(response.mtu)

    def _mtu_with(self, peer_mtu: int) -> int:
        return min(self.settings.mtu, max(576, peer_mtu))

    # ------------------------------------------------------------------ relayed (pattern 3)

    def _release_relay(self, route: AgentRoute) -> None:
        if self.relay is not None and route.pattern == pb.ROUTE_PATTERN_RELAY:
            self.relay.release(route.route_id)

    async def _relay_prepare(self, route: AgentRoute) -> RelayedPath | None:
        """Allocate at the TRS and exchange CIDs through the NMS; None if the route failed."""
        assert self.relay is not None
        if route.relay is None:
            self._route_failed(route, "a relayed route without a TRS in its direction")
            return None
        try:
            path = await self.relay.prepare(
                route_id=route.route_id,
                role=route.role,
                peer_fqdn=route.fqdn,
                trs=[(c.host, c.port) for c in route.relay.trs],
                server_name=route.relay.server_name,
                token=route.relay.token,
            )
        except CyphonicError as exc:
            if self.routes.is_current(route):
                self._route_failed(route, f"relay: {exc.message}")
            return None
        if not self.routes.is_current(route):
            self.relay.release(route.route_id)
            return None
        return path

    async def _accept_relayed(self, route: AgentRoute) -> None:
        """ACCEPT of a relayed route: our CIDs are served; the peer connects through the TRS."""
        path = await self._relay_prepare(route)
        if path is not None:
            self.log.info(
                "relay_ready",
                peer=route.fqdn,
                route_id=route.route_id,
                role="accept",
                path=path.label,
            )

    async def _connect_relayed(self, route: AgentRoute) -> None:
        """CONNECT of a relayed route: allocate, get the peer's CIDs, connect via the TRS."""
        path = await self._relay_prepare(route)
        if path is None:
            return
        route.attempts += 1
        try:
            await self._open_tunnel(route, Candidate(*path.trs), relayed=path)
        except CyphonicError as exc:
            if self.routes.is_current(route):
                self._route_failed(route, f"{path.label}: {exc.message}")

    # ------------------------------------------------------------------ tunnels: accept

    def authorize(self, peer: PeerIdentity) -> None:
        """Inside the handshake: only a node the NMS directed to us may open a tunnel."""
        if self.routes.may_accept(peer.name.lower()) is None:
            self.counters.tunnels_refused += 1
            self.log.info("tunnel_refused", peer=peer.name, reason="no route directed")
            raise PermissionDenied(f"{self.fqdn} has no route to {peer.name} from the NMS")

    def accepted(self, conn: Connection) -> SignallingSession:
        """A directed peer connected: the tunnel is usable at once (its first datagrams may
        arrive with its TunnelRequest)."""
        session = SignallingSession(
            conn, handler=self._on_tunnel_request, on_lost=self._tunnel_lost
        )
        assert conn.peer is not None
        route = self.routes.may_accept(conn.peer.name.lower())
        assert route is not None, "authorized in the same loop iteration"
        link = _TunnelLink(route=route, conn=conn, session=session)
        self._links[id(session)] = link
        self._tunnel_ready(link)
        self.counters.tunnels_accepted += 1
        self.log.info(
            "tunnel_up",
            peer=route.fqdn,
            route_id=route.route_id,
            role="accept",
            pattern=route.pattern_name,
            path=format_host_port(*conn.peer_address),
        )
        return session

    async def _on_tunnel_request(
        self, message: pb.Envelope, session: SignallingSession
    ) -> pb.Envelope:
        request = expect(message, pb.TunnelRequest)
        link = self._links.get(id(session))
        if link is None or link.tunnel is None:
            raise PermissionDenied("no tunnel for this connection")
        if request.route_id != link.route.route_id:
            session.connection.close("stale route")
            raise PermissionDenied(
                f"route {request.route_id} is not the current route to {link.route.fqdn}"
            )
        if request.mtu:
            link.tunnel.core.mtu = self._mtu_with(request.mtu)
        return wrap(pb.TunnelResponse(route_id=link.route.route_id, mtu=self.settings.mtu))

    # ------------------------------------------------------------------ tunnels: both sides

    def _tunnel_ready(self, link: _TunnelLink) -> None:
        assert self.datapath is not None
        route = link.route
        own = self.overlay.own_addresses if self.overlay is not None else frozenset()
        core = TunnelCore(
            link.conn.quic,
            mtu=self.settings.mtu,
            peer_addresses=route.addresses or None,
            local_addresses=own or None,
        )
        tunnel = Tunnel(
            core=core,
            conn=link.conn,
            addresses=route.addresses,
            label=route.fqdn,
            pattern=route.pattern_name,
        )
        previous = route.tunnel
        link.tunnel = tunnel
        live = LiveTunnel(tunnel=tunnel, conn=link.conn)
        punched = False
        if route.pattern == pb.ROUTE_PATTERN_RELAY:
            here = _plain(link.conn.peer_address)
            if previous is not None and previous.relay_address not in (None, here):
                # A direct connection replacing the relayed one (hole punching).
                live.relay_address, live.punch, punched = (
                    previous.relay_address,
                    previous.punch,
                    True,
                )
            else:
                live.relay_address = here
        if self.routes.tunnel_up(route, live, now=self._now()) is None:
            link.conn.close("route replaced")
            return
        if previous is not None and previous.tunnel is not tunnel:
            # The peer connected again (it lost the first connection): the new one wins.
            self.datapath.remove_tunnel(previous.tunnel)
            if not (punched and route.role == pb.ROUTE_ROLE_ACCEPT):
                # (After hole punching the connecting side closes the relayed connection
                # once its direct one is up: closed here first, it would end its route.)
                previous.conn.close("superseded by a newer connection")
        self.datapath.add_tunnel(tunnel)
        if live.relay_address is not None and route.punch is not None and not punched:
            self.spawn(self._punch(route, live))
        if punched:
            self.log.info(
                "punch_connected",
                peer=route.fqdn,
                route_id=route.route_id,
                path=format_host_port(*_plain(link.conn.peer_address)),
            )

    def _tunnel_lost(self, session: SignallingSession, error: CyphonicError | None) -> None:
        link = self._links.pop(id(session), None)
        if link is None:
            return
        tunnel = link.tunnel
        if tunnel is None:
            return  # never came up: the connecting task reports it
        if self.datapath is not None:
            self.datapath.remove_tunnel(tunnel)
        route = link.route
        live = route.tunnel
        if live is not None and live.tunnel is tunnel and self.routes.tear_down(route):
            self._release_relay(route)
            self.counters.tunnels_lost += 1
            self.log.info(
                "tunnel_down",
                peer=route.fqdn,
                route_id=route.route_id,
                reason=error.message if error else "closed here",
                tx_packets=tunnel.core.stats.tx_packets,
                rx_packets=tunnel.core.stats.rx_packets,
            )

    # ------------------------------------------------------------------ hole punching

    async def _punch(self, route: AgentRoute, live: LiveTunnel) -> None:
        """Take a relayed tunnel direct (``punch.HolePunchPlan`` decides; this performs)."""
        punch = route.punch
        assert punch is not None and live.relay_address is not None
        now = self._now()
        plan = live.punch = HolePunchPlan(
            started=now,
            delay=punch.delay_s,
            interval=punch.interval_s,
            window=punch.window_s,
        )
        peer = (punch.peer.host, punch.peer.port)
        conn = live.conn
        log = self.log.bind(peer=route.fqdn, route_id=route.route_id)
        log.info("punch_start", to=str(punch.peer), relay=format_host_port(*live.relay_address))
        while route.tunnel is live and not conn.is_closed and self.routes.is_current(route):
            before = plan.state
            now = self._now()
            direct = live.direct_now()
            # Liveness of the direct path: the PING of each look is acknowledged.
            heard = max(conn.ping_acked_at or 0.0, plan.direct_at or now)
            step = plan.tick(now=now, direct=direct, stalled=now - heard > 2 * plan.check)
            if direct and isinstance(step, Wait):
                self._ping(conn)
            if (
                plan.state is PunchState.DIRECT
                and before is not PunchState.DIRECT
                and route.role == pb.ROUTE_ROLE_CONNECT
            ):
                # The NATs are open both ways: a fresh connection straight to the peer
                # replaces the relayed one (module ``punch``: qh3's core stalls a client
                # that followed its server to a new address).
                self.spawn(self._dial_direct(route, punch.peer, log))
            if plan.state is not before and plan.state is not PunchState.PROBING:
                log.info(
                    "punch_" + plan.state.value,
                    path=format_host_port(*_plain(conn.peer_address)),
                    probes=plan.probes_sent,
                    ms=round((self._now() - plan.started) * 1000, 1),
                    path_changes=plan.path_changes,
                )
            if isinstance(step, Wait):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, ProbePeer):
                self._probe_path(conn, peer)
                await asyncio.sleep(0)
            elif isinstance(step, ProbeRelay):
                self._probe_path(conn, live.relay_address)
                await asyncio.sleep(0)
            elif isinstance(step, Reconnect):
                conn.close("direct path lost and no path change left")
                return
            else:
                assert isinstance(step, Stop)
                return

    async def _dial_direct(self, route: AgentRoute, peer: Candidate, log: Any) -> None:
        try:
            await self._open_tunnel(route, peer)
        except CyphonicError as exc:
            log.info("punch_dial_failed", to=str(peer), error=exc.message)

    def _ping(self, conn: Connection) -> None:
        self._ping_uid += 1
        with contextlib.suppress(Exception):  # closing: the loop ends on its own
            conn.quic.send_ping(self._ping_uid)
            conn.transmit()

    def _probe_path(self, conn: Connection, to: tuple[str, int]) -> None:
        """A PING-bearing packet of ``conn`` sent to ``to`` as well as its usual path: it
        opens our NAT towards ``to`` and, arriving from a new address, makes the peer's QUIC
        validate the path and move to it (module ``punch``)."""
        assert self.endpoint is not None
        self._ping_uid += 1
        try:
            conn.quic.send_ping(self._ping_uid)
            datagrams = conn.quic.datagrams_to_send(now=self._now())
        except Exception as exc:  # a closing connection: nothing to probe with
            self.log.debug("punch_probe_failed", error=repr(exc))
            return
        for data, _addr in datagrams:
            # Only there: a copy on the usual path as well would reach the peer twice, and
            # qh3's core takes the later copy's path for a path to probe (it then leaves
            # the new one). What is lost here, QUIC's loss recovery sends again.
            self.endpoint.send_raw(data, to)
        conn.transmit()  # timers re-armed by the endpoint's own pass

    # ------------------------------------------------------------------ housekeeping

    def expire(self, *, now: float) -> None:
        """Routes stuck in set-up are failed; failures no longer held are forgotten."""
        for route in self.routes.expire(now=now):
            self.close_route(route, "route set-up timed out")
            if self.datapath is not None:
                for address in route.addresses:
                    self.datapath.pending.discard(address)
            self.log.warning(
                "route_setup_timeout",
                peer=route.fqdn,
                route_id=route.route_id,
                state=route.state.value,
            )
        self.requests.expire(now=now)

    def ping_tunnels(self) -> None:
        """A PING keeps an idle tunnel (and the NAT binding under it) alive; a peer that
        vanished stops acknowledging, and QUIC's idle timeout then ends the connection."""
        for route in self.routes.routes():
            live = route.tunnel
            if route.state is RouteState.UP and live is not None and not live.conn.is_closed:
                self._ping_uid += 1
                live.conn.quic.send_ping(self._ping_uid)
                live.conn.transmit()


def peer_addresses(addresses: Iterable[bytes]) -> PeerAddresses:
    """The DNS answer for a peer with these raw virtual addresses."""
    v4 = next((ipaddress.IPv4Address(a) for a in addresses if len(a) == 4), None)
    v6 = next((ipaddress.IPv6Address(a) for a in addresses if len(a) == 16), None)
    return PeerAddresses(ipv4=v4, ipv6=v6)
