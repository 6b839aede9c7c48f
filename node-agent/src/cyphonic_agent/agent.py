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
    host moved ──> migrate client connections, re-register (control.on_move)

This module is the composition root and the glue between the parts; the policies are the
sans-I/O cores in ``control`` and ``routes``. Its edges (QUIC endpoint, TUN device, DNS
stub, netlink watcher, the host's address list) are ``AgentEdges``, so tests run the real
agent with fakes and without root. The packet path (TUN <-> DATAGRAM frames) is
``datapath.DataPath`` over ``tunnel.TunnelCore`` and never passes through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from cyphonic.config import ALPN_TUNNEL, DEFAULT_DOMAIN
from cyphonic.errors import CyphonicError, InvalidArgument, PermissionDenied, Unavailable
from cyphonic.hostport import format_host_port, parse_host_port
from cyphonic.log import get_logger
from cyphonic.pki import CertifiedKey, TrustStore, load_certificates, load_identity
from cyphonic.quic import Acceptor, QuicEndpoint
from cyphonic.v1 import signalling_pb2 as pb

from cyphonic_agent.access import AgentAccess
from cyphonic_agent.config import AgentSettings
from cyphonic_agent.control import OverlayPlan, on_move
from cyphonic_agent.datapath import DataPath
from cyphonic_agent.dns import DnsStub
from cyphonic_agent.enroll import AgentState, StatePaths, read_agent_state
from cyphonic_agent.mobility import (
    Handover,
    Move,
    MoveDetector,
    MoveWatcher,
    PathLost,
    host_addresses,
)
from cyphonic_agent.nms import AGENT_VERSION, AgentFailed, NmsClient, NmsLink
from cyphonic_agent.peers import Peers, routable
from cyphonic_agent.relay import RelayClient
from cyphonic_agent.routes import Candidate, RouteState, address_text
from cyphonic_agent.status import AgentStatus, PeerStatus, StatusServer
from cyphonic_agent.tun import TUN_DEVICE_PATH, TunConfig, TunDevice
from cyphonic_agent.tunnel import max_datagram_size_for

__all__ = ["AGENT_VERSION", "Agent", "AgentEdges", "AgentFailed", "run_agent"]

TICK_S = 0.5
"""Housekeeping period: pending-packet expiry, stuck routes, tunnel keepalives."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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


class Agent:
    """One running node agent. ``await Agent(settings).run(stop)`` until ``stop`` is set."""

    def __init__(self, settings: AgentSettings, *, edges: AgentEdges | None = None) -> None:
        self.settings = settings
        self.edges = edges or AgentEdges()
        paths = StatePaths(settings.state_dir)
        self.state: AgentState = read_agent_state(paths.directory)
        try:
            self.identity: CertifiedKey = load_identity(paths.cert, paths.key)
            root = load_certificates(paths.root_ca)[0]
        except (OSError, ValueError, IndexError) as exc:
            raise InvalidArgument(
                f"{paths.directory}: cannot load the node's key and "
                f"certificates ({exc}); enrol again"
            ) from exc
        node_ca = self.identity.chain[0] if self.identity.chain else None
        self.trust = TrustStore(root=root, node_ca=node_ca)
        self.fqdn = self.state.fqdn.lower()
        self.domain = self.state.domain or DEFAULT_DOMAIN
        self.log = get_logger("agent", fqdn=self.fqdn)
        self.endpoint: QuicEndpoint | None = None
        self.relay: RelayClient | None = None
        """Pattern 3: TRS allocations and the CID exchange, on the same endpoint."""
        self.tun: TunDevice | None = None
        self.datapath: DataPath | None = None
        self.access = AgentAccess()
        """The access-policy filter the NMS pushed (docs/policy.md)."""
        self.dns: DnsStub | None = None
        self.status_server: StatusServer | None = None
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
        self._ping_uid = 0
        self.handover: Handover | None = None
        """The last move of this host (see ``_moved``)."""
        self._handover_network: pb.NetworkInfo | None = None
        self._rotated = False
        """Client connections took fresh connection IDs when the path was lost."""
        self.mobility = self.edges.watch_moves(
            on_move=self._moved,
            on_lost=self._path_lost,
            exclude_ifindexes=lambda: [self.tun.index] if self.tun is not None else [],
        )

    def _endpoint(self) -> QuicEndpoint:
        assert self.endpoint is not None
        return self.endpoint

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; raises ``AgentFailed`` when it cannot go on."""
        loop = asyncio.get_running_loop()
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
                max_datagram_size=max_datagram_size_for(tun_mtu=self.settings.mtu),
            )
        except OSError as exc:
            where = format_host_port(self.settings.quic_host, self.settings.quic_port)
            raise AgentFailed(Unavailable(f"cannot bind UDP {where}: {exc.strerror}")) from exc
        self.log = self.log.bind(local=format_host_port(*self.endpoint.local_address))
        self.relay = RelayClient(
            endpoint=self.endpoint,
            nms=self.nms.session,
            connect_timeout_s=self.settings.connect_timeout_s,
            peer_cids_timeout_s=min(10.0, self.settings.route_setup_timeout_s),
        )
        self.peers.endpoint, self.peers.relay = self.endpoint, self.relay
        self.relay.start()
        self.log.info(
            "agent_starting", version=AGENT_VERSION, state_dir=str(self.settings.state_dir)
        )
        try:
            self.status_server = await StatusServer.start(
                path=self.settings.status_socket, snapshot=self.snapshot
            )
            control = self._spawn(self.nms.run())
            self._spawn(self._housekeeping())
            self._spawn(self.mobility.run())
            stopped: asyncio.Future[Any] = loop.create_task(stop.wait())
            waiting: set[asyncio.Future[Any]] = {stopped, control}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if control.done() and not control.cancelled():
                failure = control.exception()
                if failure is not None:
                    raise failure
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
        if self.dns is not None:
            await self.dns.close()
        if self.datapath is not None:
            self.datapath.stop()
        if self.relay is not None:
            await self.relay.close()
        if self.endpoint is not None:
            await self.endpoint.close("agent stopping")
            self.log.info("endpoint_stats", **vars(self.endpoint.stats))
        if self.status_server is not None:
            await self.status_server.close()
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
        if self.handover is not None and self._handover_network is None:
            self._handover_network = reg.network
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
            self.tun = self.edges.open_tun(
                TunConfig(
                    name=self.settings.tun_name,
                    mtu=self.settings.mtu,
                    ipv4=v4,
                    ipv6=v6,
                    offload=self.settings.tun_offload,
                )
            )
        except CyphonicError as exc:
            raise AgentFailed(exc) from exc
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
        self.registered.set()
        self.log.info(
            "overlay_up",
            tun=self.tun.name,
            mtu=self.settings.mtu,
            ipv4=str(v4) if v4 else None,
            ipv6=str(v6) if v6 else None,
            dns=format_host_port(*address) if address else "off",
        )

    # ------------------------------------------------------------------ mobility

    async def _moved(self, move: Move) -> None:
        """The host's real path changed: migrate, re-register, let the NMS re-direct.

        1. Client-role connections (NMS, TRS control, tunnels we opened) take a fresh
           connection ID and probe: the peer validates the new path and follows it.
        2. The relay keepalive goes out at once, so the TRS learns our new address through
           the (migrated) control connection.
        3. Re-registration at the NMS on the same connection: new local addresses, NAT
           status as the NMS sees the new path. The NMS re-directs our routes: a route
           whose pattern or connecting side changed, or where we accepted the tunnel, gets
           a new route id, and both nodes rebuild it; the others carry on migrated.
        """
        self.handover = Handover(at=time.time(), old=move.old, new=move.new)
        self._handover_network = None
        link = self.nms.link
        decision = on_move(
            rotated_on_loss=self._rotated,
            nms_open=link is not None and link.session.is_open,
            registered=self.nms.registration is not None,
            nms_routable=link is not None and routable(link.endpoint.host, link.endpoint.port),
        )
        old, new = move.old.describe(), move.new.describe()
        migrated = self._migrate_client_connections(rotate=decision.rotate)
        self._rotated = False
        if self.relay is not None:
            self.relay.nudge()
        self.log.info(
            "moved",
            old=old["addresses"],
            new=new["addresses"],
            old_routes=old["default_routes"],
            new_routes=new["default_routes"],
            migrated=migrated,
            moves=self.mobility.detector.moves,
        )
        if link is None:
            return  # the control loop registers with the new addresses when it connects
        if decision.reconnect:
            why = Unavailable("moved: the NMS endpoint is unreachable from here")
            self.nms.reconnect_now(link, why)
        elif decision.reregister:
            # In its own task: the watcher goes on watching (a second move while this
            # waits registers again).
            self._spawn(self.nms.reregister(link))

    def _path_lost(self, lost: PathLost) -> None:
        """Part of the path went away: fresh connection IDs now, so that the first packet
        that leaves by a new path already carries one (sent when the move settles)."""
        self.log.info(
            "path_lost", old=lost.old.describe()["addresses"], now=lost.now.describe()["addresses"]
        )
        self._migrate_client_connections(rotate=True, probe=False)
        self._rotated = True

    def _migrate_client_connections(self, *, rotate: bool = True, probe: bool = True) -> int:
        """A fresh connection ID (``rotate``) and a PING (``probe``) on every client-role
        connection; how many."""
        count = 0
        for conn in self._endpoint().connections:
            if not conn.is_client or conn.is_closed:
                continue
            count += 1
            if rotate:
                conn.quic.change_connection_id()
            if not probe:
                continue
            self._ping_uid += 1
            conn.quic.send_ping(self._ping_uid)
            conn.transmit()
        return count

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
            if now - self._last_ping >= self.settings.tunnel_keepalive_s:
                self._last_ping = now
                self.peers.ping_tunnels()

    # ------------------------------------------------------------------ status

    def snapshot(self) -> AgentStatus:
        """What ``cyphonic-agent status`` shows."""
        reg = self.nms.registration
        peers: list[PeerStatus] = []
        for route in sorted(self.peers.routes.routes(), key=lambda r: r.fqdn):
            live = route.tunnel
            if route.state is RouteState.UP and live is not None:
                row = live.tunnel.status()
                relayed = self.relay.path(route.route_id) if self.relay is not None else None
                if relayed is not None:
                    row.path = relayed.label  # "via <TRS address> (<TRS name>)"
                peers.append(row)
                continue
            v4, v6 = _first_of_each(route.addresses)
            peers.append(
                PeerStatus(
                    fqdn=route.fqdn,
                    state="establishing",
                    pattern=route.pattern_name,
                    virtual_ipv4=v4,
                    virtual_ipv6=v6,
                )
            )
        return AgentStatus(
            fqdn=self.fqdn,
            virtual_ipv4=address_text(reg.virtual_ipv4) if reg and reg.virtual_ipv4 else None,
            virtual_ipv6=address_text(reg.virtual_ipv6) if reg and reg.virtual_ipv6 else None,
            nms_state=self.nms.status,
            nms_detail=self.nms.detail,
            tun=self.tun.name if self.tun is not None else None,
            mtu=self.settings.mtu if self.tun is not None else None,
            uptime_s=round(time.monotonic() - self._started, 1),
            peers=peers,
            handovers=self.mobility.detector.moves,
            last_handover=self._handover_status(),
            policy=self.access.snapshot(),
        )

    def _handover_status(self) -> dict[str, Any] | None:
        handover = self.handover
        if handover is None:
            return None
        at = datetime.fromtimestamp(handover.at, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {
            "at": at,
            "old": handover.old.describe(),
            "new": handover.new.describe(),
        }
        net = self._handover_network
        if net is not None:
            out["nms_network"] = {
                "behind_nat": net.behind_nat,
                "has_ipv4": net.has_ipv4,
                "has_ipv6": net.has_ipv6,
                "observed": [
                    format_host_port(address_text(e.ip), e.port)
                    for e in (net.observed_ipv4, net.observed_ipv6)
                    if e.ip
                ],
            }
        return out


def _first_of_each(addresses: Iterable[bytes]) -> tuple[str | None, str | None]:
    v4 = [a for a in addresses if len(a) == 4]
    v6 = [a for a in addresses if len(a) == 16]
    return (address_text(v4[0]) if v4 else None, address_text(v6[0]) if v6 else None)


async def run_agent(settings: AgentSettings, *, edges: AgentEdges | None = None) -> None:
    """Run the agent until SIGTERM or SIGINT (then clean up and return)."""
    from cyphonic.service import stop_on_signals

    async with stop_on_signals() as stop:
        try:
            agent = Agent(settings, edges=edges)
        except CyphonicError as exc:
            raise AgentFailed(exc) from exc
        await agent.run(stop)
