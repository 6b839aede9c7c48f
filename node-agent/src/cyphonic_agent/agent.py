"""``cyphonic-agent up``: the node agent ties the AS, the NMS, the TUN device, the DNS stub and
the tunnels together, all on ONE UDP socket (one ``QuicEndpoint``).

    start ──> QUIC endpoint (UDP 443) + status API
          ──> Login at the AS, Register at the NMS, keepalive      (nms.NmsClient)
          ──> first registration: TUN device (virtual addresses, overlay prefixes),
              packet pump, DNS stub                                  (bring-up, here)
          ──> connection lost: back off, reconnect, register again  (control.Reconnect)

    DNS  bob.<domain>  ──> RouteRequest{fqdn} ─┐  the NMS pushes RouteDirection to both
    TUN  packet, no tunnel ─> RouteRequest{vip} ┘  nodes, then answers the request
    RouteDirection CONNECT / ACCEPT ──> tunnels (peers.Peers over routes.RouteTable)
    host moved ──> migrate client connections, re-register (roaming.Roaming)

This module is the composition root and the glue between the parts; the policies are the
sans-I/O cores in ``control`` and ``routes``. Its edges (QUIC endpoint, TUN device, DNS
stub, netlink watcher, the host's address list) are ``AgentEdges``, so tests run the real
agent with fakes and without root. The packet path (TUN <-> DATAGRAM frames) is
``datapath.DataPath`` over ``tunnel.TunnelCore`` and never passes through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cyphonic.config import ALPN_TUNNEL, DEFAULT_DOMAIN
from cyphonic.errors import CyphonicError, InvalidArgument, PermissionDenied, Unavailable
from cyphonic.hostport import format_host_port, parse_host_port
from cyphonic.log import get_logger
from cyphonic.pki import CertifiedKey, TrustStore, load_certificates
from cyphonic.quic import Acceptor, QuicEndpoint
from cyphonic.quic.tcp_transport import StreamPaths
from cyphonic.revocation import RevocationCache, close_revoked_on
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb
from pyroute2.netlink.exceptions import NetlinkError

from cyphonic_agent.access import AgentAccess
from cyphonic_agent.config import AgentSettings
from cyphonic_agent.control import OverlayPlan
from cyphonic_agent.crl import AsCrlSource
from cyphonic_agent.datapath import DataPath
from cyphonic_agent.dns import DnsStub
from cyphonic_agent.enroll import AgentState, StatePaths, load_node_identity, read_agent_state
from cyphonic_agent.metrics import AgentFacts, MetricsServer, agent_registry
from cyphonic_agent.mobility import Move, MoveDetector, MoveWatcher, host_addresses
from cyphonic_agent.nms import AGENT_VERSION, AgentFailed, NmsClient, NmsLink
from cyphonic_agent.overlay_routes import (
    HostNetworks,
    OverlayRoutes,
    RouteClash,
    host_networks,
    plan_routes,
)
from cyphonic_agent.path_sizes import LinkMtu, PathSizes, link_mtus, plan_sizes
from cyphonic_agent.peers import LiveTunnel, Peers, path_facts
from cyphonic_agent.ping import Pinger
from cyphonic_agent.reach import answer_probes
from cyphonic_agent.relay import RelayClient
from cyphonic_agent.renewal import CertificateRenewal, expired_error
from cyphonic_agent.roaming import Roaming
from cyphonic_agent.routes import Candidate
from cyphonic_agent.splitdns import SplitDns
from cyphonic_agent.status import (
    AgentStatus,
    PathFacts,
    StatusServer,
    handover_status,
    network_status,
    peer_rows,
    registered_addresses,
)
from cyphonic_agent.transport import start_stream_paths
from cyphonic_agent.tun import TUN_DEVICE_PATH, TunConfig, TunDevice, run_netlink

__all__ = ["AGENT_VERSION", "Agent", "AgentEdges", "AgentFailed", "run_agent"]

TICK_S = 0.5
"""Housekeeping period: pending-packet expiry, stuck routes, tunnel keepalives."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_tun_access() -> None:
    """Fail early (before logging in anywhere) when the TUN device cannot be made."""
    try:
        fd = os.open(TUN_DEVICE_PATH, os.O_RDWR)
    except FileNotFoundError as exc:
        raise AgentFailed(Unavailable(f"{TUN_DEVICE_PATH} missing: no TUN support")) from exc
    except PermissionError as exc:
        raise AgentFailed(
            PermissionDenied(f"cannot open {TUN_DEVICE_PATH}: run as root or with CAP_NET_ADMIN")
        ) from exc
    os.close(fd)


class Watcher(Protocol):
    """The netlink watcher as the agent uses it (``mobility.MoveWatcher``)."""

    detector: MoveDetector

    async def run(self) -> None: ...


@dataclass(frozen=True)
class AgentEdges:
    """Where the agent meets the host. The defaults are the real ones; tests pass fakes."""

    open_endpoint: Callable[..., Awaitable[QuicEndpoint]] = QuicEndpoint.open
    check_tun: Callable[[], None] = check_tun_access
    open_tun: Callable[[TunConfig], TunDevice] = TunDevice.open
    start_dns: Callable[..., Awaitable[DnsStub]] = DnsStub.start
    watch_moves: Callable[..., Watcher] = MoveWatcher
    host_addresses: Callable[..., list[IPAddress]] = host_addresses
    link_mtus: Callable[[], list[LinkMtu]] = link_mtus
    host_networks: Callable[..., HostNetworks] = host_networks


class Agent:
    """One running node agent. ``await Agent(settings).run(stop)`` until ``stop`` is set."""

    def __init__(self, settings: AgentSettings, *, edges: AgentEdges | None = None) -> None:
        self.edges = edges or AgentEdges()
        paths = StatePaths(settings.state_dir)
        self.state: AgentState = read_agent_state(paths.directory)
        self.path_sizes: PathSizes = plan_sizes(
            tun_mtu=settings.mtu, links=run_netlink(self.edges.link_mtus)
        )
        """Datagram and TUN sizes fitted to the host's links (pmtu.py, docs/agent.md)."""
        if self.path_sizes.tun_mtu != settings.mtu:
            settings = settings.model_copy(update={"mtu": self.path_sizes.tun_mtu})
        self.settings = settings
        try:
            # A renewal a crash interrupted is completed or undone first.
            self.identity: CertifiedKey = load_node_identity(paths.directory)
            root = load_certificates(paths.root_ca)[0]
        except (OSError, ValueError, IndexError) as exc:
            raise InvalidArgument(
                f"{paths.directory}: cannot load the node's key and "
                f"certificates ({exc}); enrol again"
            ) from exc
        node_ca = self.identity.chain[0] if self.identity.chain else None
        if node_ca is None:
            raise InvalidArgument(f"{paths.cert} lacks the node CA; enrol again")
        self.revocations = RevocationCache(
            AsCrlSource(node_ca=node_ca, dial=self._dial_as),
            issuer=node_ca,
            interval=settings.crl_refresh_s,
        )
        """The AS's CRL (crl.py): refuses revoked peers in every tunnel handshake."""
        service_ca = (
            load_certificates(paths.service_ca)[0] if paths.service_ca.exists() else None
        )  # pinned at enrolment: only the project's services are taken as the AS/NMS/TRS
        self.trust = TrustStore(
            root=root,
            node_ca=node_ca,
            service_ca=service_ca,
            is_revoked=self.revocations.is_revoked,
        )
        self.fqdn = self.state.fqdn.lower()
        self.domain = self.state.domain or DEFAULT_DOMAIN
        self.log = get_logger("agent", fqdn=self.fqdn)
        self.renewal = CertificateRenewal(
            state_dir=paths.directory,
            identity=self.identity,
            dial=self._dial_as,
            installed=self._renewed,
            fraction=settings.renew_at,
            fqdn=self.fqdn,
        )
        """Renews the certificate (new key) at ``renew_at`` of its lifetime (renewal.py)."""
        self.endpoint: QuicEndpoint | None = None
        self.relay: RelayClient | None = None
        """Pattern 3: TRS allocations and the CID exchange, on the same endpoint."""
        self.transport: StreamPaths | None = None
        """QUIC over TLS on TCP 443 when UDP gets no answer (docs/tcp-transport.md)."""
        self.tun: TunDevice | None = None
        self.datapath: DataPath | None = None
        self.access = AgentAccess()
        """The access-policy filter the NMS pushed (docs/policy.md)."""
        self.dns: DnsStub | None = None
        self.split_dns = SplitDns(
            state_dir=settings.state_dir,
            domain=self.domain,
            mode=settings.dns_manager,
            resolv_conf=settings.resolv_conf,
            fqdn=self.fqdn,
        )
        """The overlay domain in the host's resolver (``accept_dns``)."""
        self.status_server: StatusServer | None = None
        self.metrics_server: MetricsServer | None = None
        """GET /metrics when ``metrics_listen`` is set (metrics.py)."""
        self.registered = asyncio.Event()
        """Set once the TUN device is up (first registration done)."""
        self.nms = NmsClient(
            settings=settings,
            state=self.state,
            fqdn=self.fqdn,
            domain=self.domain,
            endpoint=self._endpoint,
            on_push=self._on_push,
            on_registered=self._registered,
            local_endpoints=self._local_endpoints,
        )
        self.peers = Peers(settings=settings, fqdn=self.fqdn, nms=self.nms, spawn=self._spawn)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = time.monotonic()
        self._last_ping = 0.0
        self.roaming = Roaming(
            fqdn=self.fqdn,
            nms=self.nms,
            endpoint=self._endpoint,
            relay=lambda: self.relay,
            spawn=self._spawn,
            moves=lambda: self.mobility.detector.moves,
        )
        self.overlay_routes: OverlayRoutes | None = None
        """What the TUN routes (the pool minus the host's own networks, overlay_routes)."""
        self._peer_routes: dict[bytes, Network] = {}
        """Host routes into the TUN for peers the pool prefixes do not carry."""
        self.mobility = self.edges.watch_moves(
            on_move=self._moved,
            on_lost=self.roaming.path_lost,
            exclude_ifindexes=lambda: [self.tun.index] if self.tun is not None else [],
        )

    def _udp_back(self) -> None:
        """UDP 443 gets through again: once the NMS has validated the new path, register
        again so that it sees this node's real address (new routes may then be direct)."""

        async def later() -> None:
            await asyncio.sleep(2.0)
            link = self.nms.link
            if link is not None:
                await self.nms.reregister(link)

        self._spawn(later())

    def _endpoint(self) -> QuicEndpoint:
        assert self.endpoint is not None
        return self.endpoint

    async def _dial_as(self) -> SignallingSession:
        raw = self.settings.as_endpoints or self.state.as_endpoints
        endpoints = [Candidate(*parse_host_port(e, default_port=443)) for e in raw]
        session, _ = await self.nms.dial(
            endpoints, server_name=self.state.as_server_name, what="AS"
        )
        return session

    def _renewed(self, identity: CertifiedKey) -> None:
        """A renewed key and certificate: new handshakes present it, open ones go on."""
        self.identity = identity
        if self.endpoint is not None:
            self.endpoint.set_identity(identity)

    def _own_revocation(self, serials: frozenset[int]) -> None:
        if self.identity.cert.serial_number in serials:
            self.log.error(
                "own_certificate_revoked", serial=f"{self.identity.cert.serial_number:x}"
            )

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; raises ``AgentFailed`` when it cannot go on."""
        loop = asyncio.get_running_loop()
        if self.renewal.schedule.expired(datetime.datetime.now(datetime.UTC)):
            raise AgentFailed(expired_error(self.identity.cert, self.settings.state_dir))
        self.edges.check_tun()
        try:
            self.endpoint = await self.edges.open_endpoint(
                host=self.settings.quic_host,
                port=self.settings.quic_port,
                identity=self.identity,
                trust=self.trust,
                accept={
                    ALPN_TUNNEL: Acceptor(
                        handler_factory=self.peers.accepted,
                        expect="node",
                        authorize=self.peers.authorize,
                    )
                },
                idle_timeout=self.settings.peer_timeout_s,
                max_datagram_size=self.path_sizes.datagram,
                max_udp_payload_size=self.path_sizes.receive,
                dont_fragment=True,
            )
        except OSError as exc:
            where = format_host_port(self.settings.quic_host, self.settings.quic_port)
            raise AgentFailed(Unavailable(f"cannot bind UDP {where}: {exc.strerror}")) from exc
        self.log = self.log.bind(local=format_host_port(*self.endpoint.local_address))
        self.transport = start_stream_paths(self.settings, self.endpoint, self.trust)
        self.nms.transport = self.transport
        if self.transport is not None:
            self.transport.on_udp_back = self._udp_back
        self.roaming.log = self.log
        self.relay = RelayClient(
            endpoint=self.endpoint,
            nms=self.nms.session,
            connect_timeout_s=self.settings.connect_timeout_s,
            peer_cids_timeout_s=min(10.0, self.settings.route_setup_timeout_s),
        )
        self.peers.endpoint, self.peers.relay = self.endpoint, self.relay
        self.relay.start()
        limited = self.path_sizes.limited_by
        self.revocations.subscribe(close_revoked_on(self.endpoint, self.revocations))
        self.revocations.subscribe(self._own_revocation)
        self.log.info(
            "agent_starting",
            version=AGENT_VERSION,
            state_dir=str(self.settings.state_dir),
            max_datagram_size=self.path_sizes.datagram,
            tun_mtu=self.settings.mtu,
            mtu_limited_by=f"{limited.interface} mtu {limited.mtu}" if limited else None,
        )
        try:
            pinger = Pinger(
                peers=self.peers,
                domain=self.domain,
                snapshot=self.snapshot,
                fqdn_of=self._fqdn_of,
            )
            self.status_server = await StatusServer.start(
                path=self.settings.status_socket,
                snapshot=self.snapshot,
                handlers={"ping": pinger.handle, "netinfo": self._netinfo},
            )
            metrics = self.settings.metrics_address
            if metrics is not None:
                try:
                    self.metrics_server = await MetricsServer.start(
                        agent_registry(self.snapshot, self.metrics_facts), *metrics
                    )
                except CyphonicError as exc:
                    raise AgentFailed(exc) from exc
            try:
                # A resolv.conf edit left by an agent killed with -9: put the original back
                # before the DNS stub reads the file, and only now that the status socket
                # has shown no other agent runs (its edit is not ours to undo).
                self.split_dns.recover()
            except OSError as exc:
                self.log.warning("resolv_conf_recover_failed", error=str(exc))
            control = self._spawn(self.nms.run())
            self._spawn(self.revocations.start())  # the first fetch may wait for the AS
            renewal = self._spawn(self.renewal.run())
            self._spawn(self._housekeeping())
            self._spawn(self.mobility.run())
            stopped: asyncio.Future[Any] = loop.create_task(stop.wait())
            waiting: set[asyncio.Future[Any]] = {stopped, control, renewal}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if control.done() and not control.cancelled():
                failure = control.exception()
                if failure is not None:
                    raise failure
            if renewal.done() and not renewal.cancelled():
                expired = renewal.exception()
                if isinstance(expired, AgentFailed):
                    self.log.error("certificate_expired", error=expired.error.message)
                if expired is not None:
                    raise expired
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self.log.info("agent_stopping")
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self.peers.close()
        await self.split_dns.remove()
        await self.revocations.close()
        if self.dns is not None:
            await self.dns.close()
        if self.datapath is not None:
            self.datapath.stop()
        if self.relay is not None:
            await self.relay.close()
        if self.transport is not None:
            await self.transport.close()
        if self.endpoint is not None:
            await self.endpoint.close("agent stopping")
            self.log.info("endpoint_stats", **vars(self.endpoint.stats))
        if self.status_server is not None:
            await self.status_server.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.tun is not None:
            self.tun.close()
        self.log.info("agent_stopped", **self.counters())

    def counters(self) -> dict[str, int]:
        """What the agent did (logged at exit)."""
        return {**vars(self.nms.counters), **vars(self.peers.counters)}

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, AgentFailed):
                self.log.error("task_failed", error=repr(exc))

    # ------------------------------------------------------------------ NMS

    def _on_push(self, message: pb.Envelope) -> None:
        body = message.WhichOneof("body")
        if body == "route_direction":
            self.peers.directed(message.route_direction)
        elif body == "peer_offline":
            self.peers.peer_offline(message.peer_offline)
        elif body == "relay_cids":
            if self.relay is not None:
                self.relay.peer_cids_received(message.relay_cids)
        elif body == "policy_filter":
            self.access.apply(message.policy_filter)
        elif body == "revocation_notice":
            notice = message.revocation_notice
            self.log.error("revoked", serial=notice.serial_hex, reason=notice.reason)

    async def _registered(self, reg: pb.RegisterResponse, _link: NmsLink) -> None:
        plan = self.peers.overlay
        if plan is None:
            await self._bring_up(reg)
        else:
            try:
                # Leases never change; a different answer means a different deployment.
                plan.check_same_lease(reg)
            except CyphonicError as exc:
                raise AgentFailed(exc) from exc
        self.roaming.registered(reg)
        if reg.HasField("reach_probe") and self.endpoint is not None:
            # Whether inbound traffic gets in, and the NAT's mapping (docs/nms.md).
            self._spawn(
                answer_probes(self.endpoint, reg.reach_probe, _link.endpoint.host, log=self.log)
            )
        if self.relay is not None:
            self.relay.nudge()  # after a move the TRS must learn our new address at once

    async def _local_endpoints(self, nms: Candidate) -> list[tuple[IPAddress, int]]:
        """The addresses of our UDP socket, as peers could reach them."""
        host, port = self._endpoint().local_address
        bound = ipaddress.ip_address(host)
        if not bound.is_unspecified:
            return [(bound, port)]
        exclude = [self.tun.index] if self.tun is not None else []
        # Loopback addresses only make sense to report when the NMS is on this host too.
        loopback = ipaddress.ip_address(nms.host).is_loopback
        addresses = await asyncio.to_thread(
            self.edges.host_addresses, exclude_ifindexes=exclude, loopback=loopback
        )
        if ":" not in host:  # an IPv4-only socket
            addresses = [a for a in addresses if a.version == 4]
        return [(a, port) for a in addresses]

    # ------------------------------------------------------------------ bring-up

    async def _bring_up(self, reg: pb.RegisterResponse) -> None:
        """First registration: the TUN device, the packet pump and the DNS stub."""
        plan = OverlayPlan.from_registration(reg)
        v4, v6 = plan.ipv4, plan.ipv6
        try:
            try:
                host = await asyncio.to_thread(self.edges.host_networks, exclude_ifindexes=())
            except (OSError, NetlinkError) as exc:  # unreadable: the whole pool, as before
                self.log.warning("host_networks_unreadable", error=str(exc))
                host = HostNetworks()
            self.overlay_routes = routes = plan_routes(own=plan.interfaces, host=host)
            # The addresses alone (/32, /128): the pool's routes are ``routes.prefixes``,
            # which leave out whatever the host already routes elsewhere.
            self.tun = self.edges.open_tun(
                TunConfig(
                    name=self.settings.tun_name,
                    mtu=self.settings.mtu,
                    ipv4=ipaddress.IPv4Interface(v4.ip) if v4 is not None else None,
                    ipv6=ipaddress.IPv6Interface(v6.ip) if v6 is not None else None,
                    routes=routes.prefixes,
                    offload=self.settings.tun_offload,
                )
            )
        except CyphonicError as exc:
            raise AgentFailed(exc) from exc
        if routes.shadowed:
            self.log.warning(
                "overlay_pool_shadowed",
                host_prefixes=[str(r) for r in routes.shadowed],
                tun_prefixes=[str(p) for p in routes.prefixes],
                detail="the host routes part of the overlay pool itself; peers there get "
                "host routes (docs/agent.md 'Choosing the pool')",
            )
        self.peers.routes.on_addresses = self._peer_addresses
        self.peers.overlay = plan
        self.datapath = DataPath(
            tun=self.tun, on_miss=self.peers.on_miss, packet_filter=self.access.filter
        )
        self.peers.datapath = self.datapath
        self.datapath.start()
        address = self.settings.dns_address
        if address is not None:
            upstreams = (
                [parse_host_port(u, default_port=53) for u in self.settings.dns_upstreams]
                if self.settings.dns_upstreams is not None
                else None
            )
            try:
                self.dns = await self.edges.start_dns(
                    listen=address,
                    domain=self.domain,
                    lookup=self.peers.lookup,
                    upstreams=upstreams,
                )
            except OSError as exc:
                raise AgentFailed(
                    Unavailable(
                        f"cannot listen for DNS on {format_host_port(*address)}: {exc.strerror} "
                        f"(set dns_listen, or 'off')"
                    )
                ) from exc
            if self.settings.accept_dns:
                await self.split_dns.install(link=self.tun.name, stub=self.dns.address)
        self.registered.set()
        self.log.info(
            "overlay_up",
            tun=self.tun.name,
            mtu=self.settings.mtu,
            ipv4=str(v4) if v4 else None,
            ipv6=str(v6) if v6 else None,
            dns=format_host_port(*address) if address else "off",
        )

    # ------------------------------------------------------------------ kernel routes

    def _peer_addresses(
        self, fqdn: str, added: frozenset[bytes], removed: frozenset[bytes]
    ) -> None:
        """The route table learnt or forgot a peer's virtual addresses."""
        for raw in removed:
            self._peer_routes.pop(raw, None)
        for raw in added:
            self._peer_route(fqdn, raw)
        self._apply_routes()

    def _peer_route(self, fqdn: str, raw: bytes) -> None:
        if self.overlay_routes is None:
            return
        try:
            prefix = self.overlay_routes.peer_route(ipaddress.ip_address(raw))
        except RouteClash as exc:
            self.log.error("route_clash", peer=fqdn, error=str(exc))
            return
        if prefix is not None:
            self._peer_routes[raw] = prefix

    def _apply_routes(self) -> None:
        if self.tun is None or self.overlay_routes is None:
            return
        try:
            self.tun.set_routes([*self.overlay_routes.prefixes, *self._peer_routes.values()])
        except CyphonicError as exc:
            self.log.error("tun_routes_failed", error=str(exc))

    async def _moved(self, move: Move) -> None:
        """The host's addresses or routes changed: re-plan the TUN's routes, then roam."""
        plan = self.peers.overlay
        if plan is not None and self.tun is not None:
            try:
                host = await asyncio.to_thread(
                    self.edges.host_networks, exclude_ifindexes=[self.tun.index]
                )
                self.overlay_routes = plan_routes(own=plan.interfaces, host=host)
            except RouteClash as exc:
                self.log.error("route_clash", error=str(exc))
            except (OSError, NetlinkError) as exc:
                self.log.warning("host_networks_unreadable", error=str(exc))
            else:
                self._peer_routes.clear()
                for route in self.peers.routes.routes():
                    for raw in route.addresses:
                        self._peer_route(route.fqdn, raw)
                await asyncio.to_thread(self._apply_routes)
        await self.roaming.moved(move)

    # ------------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_S)
            now = loop.time()
            if self.datapath is not None:
                self.datapath.pending.expire(now=now)
            self.peers.expire(now=now)
            self.access.filter.expire(time.monotonic())  # the data path's clock
            self._probe_paths(now)
            if now - self._last_ping >= self.settings.tunnel_keepalive_s:
                self._last_ping = now
                self.peers.ping_tunnels()

    def _probe_paths(self, now: float) -> None:
        """Path MTU search on every tunnel that carries packets (tunnel.poll_pmtu)."""
        for route in self.peers.routes.routes():
            live = route.tunnel
            if live is None or live.conn.is_closed:
                continue
            search = live.tunnel.core.pmtu
            before = search.mtu if search is not None else None
            if live.tunnel.core.poll_pmtu(now):
                live.conn.transmit()
            search = live.tunnel.core.pmtu
            if search is not None and before is not None and search.mtu != before:
                self.log.info(
                    "path_mtu_changed",
                    peer=route.fqdn,
                    mtu=search.mtu,
                    why=search.history[-1][2] if search.history else None,
                )

    # ------------------------------------------------------------------ status

    async def _fqdn_of(self, address: IPAddress) -> str | None:
        """The peer holding virtual ``address`` (asks the NMS if no route has it)."""
        raw = address.packed
        for route in self.peers.routes.routes():
            if raw in route.addresses:
                return route.fqdn
        asked = await self.peers.request_route(raw)
        return asked.fqdn if asked is not None else None

    async def _netinfo(self, _request: dict[str, Any]) -> dict[str, Any]:
        """What ``cyphonic-agent netcheck`` asks a running agent: the services it knows and
        what the NMS saw of this node."""
        reg = self.nms.registration
        trs: dict[str, str] = {}
        if self.relay is not None:
            for control in self.relay.controls.values():
                trs[format_host_port(*control.address)] = control.name
            for path in self.relay.book.paths.values():
                trs[format_host_port(*path.trs)] = path.trs_name
        network = None
        if reg is not None and reg.HasField("network"):
            network = network_status(reg.network)
        return {
            "fqdn": self.fqdn,
            "local": format_host_port(*self.endpoint.local_address) if self.endpoint else None,
            "as": list(self.state.as_endpoints),
            "as_server_name": self.state.as_server_name,
            "nms": [str(c) for c in self.nms.policy.nms_endpoints],
            "nms_server_name": self.nms.server_name,
            "trs": [{"endpoint": ep, "name": name} for ep, name in sorted(trs.items())],
            "network": network,
        }

    def metrics_facts(self) -> AgentFacts:
        """What the metrics add to the snapshot: the certificate and the CRL cache."""
        cache = self.revocations
        return AgentFacts(
            version=AGENT_VERSION,
            certificate_not_after=self.identity.cert.not_valid_after_utc.timestamp(),
            certificate_renewals=self.renewal.renewals,
            crl_number=cache.revoked.cursor,
            crl_age_s=(
                round(time.monotonic() - cache.last_success, 3)
                if cache.last_success is not None
                else None
            ),
            crl_revoked=len(cache.revoked),
            crl_refresh_failures=cache.failures,
        )

    def snapshot(self) -> AgentStatus:
        """What ``cyphonic-agent status`` shows (built in ``status``)."""
        v4, v6 = registered_addresses(self.nms.registration)
        relay = self.relay

        def relayed_label(route_id: str) -> str | None:
            path = relay.path(route_id) if relay is not None else None
            return path.label if path is not None else None

        carrier = self.transport.carrier_of if self.transport is not None else None

        def facts(live: LiveTunnel) -> PathFacts | None:
            return path_facts(live, carrier)

        return AgentStatus(
            fqdn=self.fqdn,
            virtual_ipv4=v4,
            virtual_ipv6=v6,
            nms_state=self.nms.status,
            nms_detail=self.nms.detail,
            tun=self.tun.name if self.tun is not None else None,
            mtu=self.settings.mtu if self.tun is not None else None,
            uptime_s=round(time.monotonic() - self._started, 1),
            peers=peer_rows(
                self.peers.routes.routes(), relayed_label=relayed_label, path_facts=facts
            ),
            handovers=self.mobility.detector.moves,
            last_handover=handover_status(self.roaming.handover, self.roaming.handover_network),
            policy=self.access.snapshot(),
            split_dns=self.split_dns.describe(),
            transport=self.transport.snapshot() if self.transport is not None else None,
        )


async def run_agent(settings: AgentSettings, *, edges: AgentEdges | None = None) -> None:
    """Run the agent until SIGTERM or SIGINT (then clean up and return)."""
    from cyphonic.service import stop_on_signals

    async with stop_on_signals() as stop:
        try:
            agent = Agent(settings, edges=edges)
        except CyphonicError as exc:
            raise AgentFailed(exc) from exc
        await agent.run(stop)
