"""``cyphonic-agent up``: the node agent ties the AS, the NMS, the TUN device, the DNS stub and
the tunnels together, all on ONE UDP socket (one ``QuicEndpoint``).

    start ──> QUIC endpoint (UDP 443) + status API
          ──> Login at the AS (agent.json's endpoints)     -> NMS endpoints, NMS name
          ──> Register at the NMS (the socket's addresses)  -> virtual IPv4/IPv6, keepalive
          ──> TUN device (virtual addresses, overlay prefixes), packet pump, DNS stub
          ──> Keepalive at the NMS's interval; connection lost -> back off, reconnect,
              register again (tunnels carry on meanwhile)

    DNS  bob.<domain>  ──> RouteRequest{fqdn} ─┐  the NMS pushes RouteDirection to both
    TUN  packet, no tunnel ─> RouteRequest{vip} ┘  nodes, then answers the request
    RouteDirection CONNECT ──> connect to the peer's candidates (ALPN cyphonic-tun/1, the
                               peer's certificate must name its FQDN), TunnelRequest
                               ──> TunnelResponse ──> tunnel up, waiting packets flow
    RouteDirection ACCEPT  ──> accept that peer's connection (only a directed peer)
    tunnel idle-timeout / PeerOffline ──> route torn down; the next packet rebuilds it

``RouteTable`` (routes.py) holds the decisions; this module is the asyncio glue. The packet
path itself (TUN <-> DATAGRAM frames) is ``datapath.DataPath`` over ``tunnel.TunnelCore``
and never passes through this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cyphonic.config import ALPN_SIGNALLING, ALPN_TUNNEL, DEFAULT_DOMAIN
from cyphonic.errors import (
    AuthError,
    CyphonicError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Timeout,
    Unavailable,
    UnexpectedMessage,
)
from cyphonic.log import get_logger
from cyphonic.pki import CertifiedKey, PeerIdentity, TrustStore, load_certificates, load_identity
from cyphonic.quic import Acceptor, Connection, QuicEndpoint
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import wrap

from cyphonic_agent.config import AgentSettings, format_hostport, parse_hostport
from cyphonic_agent.datapath import DataPath, Tunnel
from cyphonic_agent.dns import DnsStub, PeerAddresses
from cyphonic_agent.enroll import AgentState, StatePaths, read_agent_state
from cyphonic_agent.mobility import Handover, Move, MoveWatcher, PathLost, host_addresses
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
from cyphonic_agent.status import AgentStatus, PeerStatus, StatusServer
from cyphonic_agent.tun import TUN_DEVICE_PATH, TunConfig, TunDevice
from cyphonic_agent.tunnel import TunnelCore, max_datagram_size_for

AGENT_VERSION = "0.1.0"
TICK_S = 0.5
"""Housekeeping period: pending-packet expiry, stuck routes, tunnel keepalives."""
REQUEST_TIMEOUT_S = 5.0
"""Longest wait for an answer from the AS, the NMS or a peer."""
ACCEPT_RETRY_S = (0.05, 0.1, 0.2, 0.4, 0.8)
"""Pauses before trying a peer again that refused us as not (yet) directed to it: the NMS
pushes to both sides at once, so our connection may overtake the peer's direction."""
NMS_FAILURES_BEFORE_LOGIN = 2
"""Failed reconnections to the known NMS endpoints before asking the AS again."""
REVERSE_AFTER_S = 2.0
"""A direct route we accept whose peer has not connected by then is asked for from this
side, so that we connect out (an inbound-blocking firewall in front of us)."""
REVERSE_QUIET_S = 30.0
"""At most one reversal per peer in this long, and none for a peer we asked for ourselves
in this long: two nodes behind such firewalls must not swap roles forever."""


class AgentFailed(Exception):
    """The agent cannot go on (bad state directory, refused by the AS, gave up)."""

    def __init__(self, error: CyphonicError) -> None:
        super().__init__(f"{error.code_name}: {error.message}")
        self.error = error


def _body(answer: pb.Envelope, expected: str) -> Any:
    which = answer.WhichOneof("body")
    if which != expected:
        raise UnexpectedMessage(f"expected {expected}, got {which or 'an empty envelope'}")
    return getattr(answer, expected)


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
class _TunnelLink:
    """One tunnel connection and what it serves."""

    route: PeerRoute
    conn: Connection
    session: SignallingSession
    tunnel: Tunnel | None = None


@dataclass
class _NmsLink:
    session: SignallingSession
    endpoint: Candidate
    keepalive_s: float
    sequence: int = 0


@dataclass
class AgentCounters:
    """What the agent did (logged at exit)."""

    logins: int = 0
    registrations: int = 0
    nms_losses: int = 0
    route_requests: int = 0
    tunnels_connected: int = 0
    tunnels_accepted: int = 0
    tunnels_refused: int = 0
    tunnels_lost: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Agent:
    """One running node agent. ``await Agent(settings).run(stop)`` until ``stop`` is set."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
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
        self.routes = RouteTable(setup_timeout=settings.route_setup_timeout_s)
        self.counters = AgentCounters()
        self.endpoint: QuicEndpoint | None = None
        self.relay: RelayClient | None = None
        """Pattern 3: TRS allocations and the CID exchange, on the same endpoint."""
        self.tun: TunDevice | None = None
        self.datapath: DataPath | None = None
        self.dns: DnsStub | None = None
        self.status_server: StatusServer | None = None
        self.nms_state = "connecting"
        self.nms_detail = ""
        self.registration: pb.RegisterResponse | None = None
        self.registered = asyncio.Event()
        """Set once the TUN device is up (first registration done)."""
        self._nms: _NmsLink | None = None
        self._nms_endpoints: list[Candidate] = []
        self._nms_server_name = f"nms.svc.{self.domain}"
        self._nms_failures = 0
        self._own_addresses: frozenset[bytes] = frozenset()
        self._own_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._inflight: dict[str | bytes, asyncio.Future[PeerRoute | None]] = {}
        self._asked: dict[str, float] = {}
        """When this node last asked the NMS for a route to each peer (loop time)."""
        self._reversed: dict[str, float] = {}
        self._failures: dict[str | bytes, CyphonicError] = {}
        self._links: dict[int, _TunnelLink] = {}
        self._connecting: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = time.monotonic()
        self._last_ping = 0.0
        self._ping_uid = 0
        self.handover: Handover | None = None
        """The last move of this host (see ``_moved``)."""
        self._handover_network: pb.NetworkInfo | None = None
        self._rotated = False
        """Client connections took fresh connection IDs when the path was lost."""
        self._reconnect_now = False
        """The NMS connection was closed because of a move: connect again without pause."""
        self.mobility = MoveWatcher(
            on_move=self._moved,
            on_lost=self._path_lost,
            exclude_ifindexes=lambda: [self.tun.index] if self.tun is not None else [],
        )

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; raises ``AgentFailed`` when it cannot go on."""
        loop = asyncio.get_running_loop()
        _check_tun_access()
        try:
            self.endpoint = await QuicEndpoint.open(
                host=self.settings.quic_host,
                port=self.settings.quic_port,
                identity=self.identity,
                trust=self.trust,
                accept={
                    ALPN_TUNNEL: Acceptor(
                        handler_factory=self._accepted, expect="node", authorize=self._authorize
                    )
                },
                idle_timeout=self.settings.peer_timeout_s,
                max_datagram_size=max_datagram_size_for(tun_mtu=self.settings.mtu),
            )
        except OSError as exc:
            where = format_hostport(self.settings.quic_host, self.settings.quic_port)
            raise AgentFailed(Unavailable(f"cannot bind UDP {where}: {exc.strerror}")) from exc
        self.log = self.log.bind(local=format_hostport(*self.endpoint.local_address))
        self.relay = RelayClient(
            endpoint=self.endpoint,
            nms=self._nms_session,
            connect_timeout_s=self.settings.connect_timeout_s,
            peer_cids_timeout_s=min(10.0, self.settings.route_setup_timeout_s),
        )
        self.relay.start()
        self.log.info(
            "agent_starting", version=AGENT_VERSION, state_dir=str(self.settings.state_dir)
        )
        try:
            self.status_server = await StatusServer.start(
                path=self.settings.status_socket, snapshot=self.snapshot
            )
            control = self._spawn(self._control_loop())
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
        for task in list(self._tasks) + list(self._connecting.values()):
            task.cancel()
        for task in list(self._tasks) + list(self._connecting.values()):
            with contextlib.suppress(BaseException):
                await task
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
        self.log.info(
            "agent_stopped", **{k: v for k, v in vars(self.counters).items() if k != "extra"}
        )

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

    # ------------------------------------------------------------------ AS and NMS

    async def _control_loop(self) -> None:
        """Login, register, keep alive; on loss back off and do it again, forever."""
        first_attempt = time.monotonic()
        attempt = 0
        while True:
            try:
                if not self._nms_endpoints or self._nms_failures >= NMS_FAILURES_BEFORE_LOGIN:
                    await self._login()
                link = await self._connect_nms()
                await self._register(link)
                attempt = 0
                await self._keep_alive(link)
            except AuthError as exc:
                # Refused by the AS or the NMS for who we are: retrying will not help.
                self.nms_state, self.nms_detail = "disconnected", exc.message
                raise AgentFailed(exc) from exc
            except CyphonicError as exc:
                self.nms_state, self.nms_detail = "disconnected", exc.message
                self.log.warning("nms_unreachable", error=exc.message)
                if (
                    self.registration is None
                    and self.settings.give_up_after_s
                    and time.monotonic() - first_attempt >= self.settings.give_up_after_s
                ):
                    raise AgentFailed(exc) from exc
            finally:
                self._nms = None
            delay = min(self.settings.reconnect_max_s, 0.5 * 2 ** min(attempt, 10))
            delay *= random.uniform(0.8, 1.2)
            if self._reconnect_now:
                # We closed it after a move: the NMS is fine, only our path changed.
                self._reconnect_now, delay = False, 0.0
            attempt += 1
            self.nms_state = "connecting"
            await asyncio.sleep(delay)

    async def _dial(
        self,
        endpoints: list[Candidate],
        *,
        server_name: str,
        what: str,
        handler: Callable[..., Awaitable[Any]] | None = None,
    ) -> tuple[SignallingSession, Candidate]:
        """A signalling session with the first of ``endpoints`` that answers."""
        assert self.endpoint is not None
        timeout = self.settings.connect_timeout_s
        tried: list[str] = []
        silent: list[str] = []
        for ep in endpoints:
            if not routable(ep.host, ep.port):
                tried.append(f"{ep}: no route")
                continue
            try:
                conn = await self.endpoint.connect(
                    (ep.host, ep.port),
                    alpn=ALPN_SIGNALLING,
                    expect="service",
                    expected_name=server_name,
                    timeout=timeout,
                    handler_factory=SignallingSession.factory(handler),
                )
            except Timeout:
                silent.append(str(ep))
                continue
            except AuthError:
                raise
            except CyphonicError as exc:
                tried.append(f"{ep}: {exc.message}")
                continue
            assert isinstance(conn.handler, SignallingSession)
            return conn.handler, ep
        if not endpoints:
            raise Unavailable(f"no {what} endpoint is known")
        reasons = list(tried)
        if silent:
            ports = sorted({parse_hostport(s)[1] for s in silent})
            port_text = "/".join(str(p) for p in ports)
            reasons.insert(
                0,
                f"cannot reach the {what} at {', '.join(silent)} over UDP: "
                f"no answer in {timeout:g} s; a firewall may be blocking "
                f"UDP {port_text}",
            )
        else:
            reasons.insert(0, f"cannot reach the {what}")
        raise Unavailable("; ".join(reasons))

    async def _login(self) -> None:
        """Log in at the AS: learn the NMS endpoints and name."""
        raw = self.settings.as_endpoints or self.state.as_endpoints
        endpoints = [Candidate(*parse_hostport(e, default_port=443)) for e in raw]
        self.nms_state, self.nms_detail = "connecting", "logging in at the AS"
        session, where = await self._dial(
            endpoints, server_name=self.state.as_server_name, what="AS"
        )
        try:
            answer = await session.request(
                wrap(pb.LoginRequest(agent_version=AGENT_VERSION)), timeout=REQUEST_TIMEOUT_S
            )
            login: pb.LoginResponse = _body(answer, "login_response")
        finally:
            session.close()
        if login.fqdn and login.fqdn.lower() != self.fqdn:
            raise PermissionDenied(
                f"the AS knows this certificate as {login.fqdn}, not {self.fqdn}"
            )
        self._nms_endpoints = [Candidate.from_pb(e) for e in login.nms]
        if login.nms_server_name:
            self._nms_server_name = login.nms_server_name
        self._nms_failures = 0
        self.counters.logins += 1
        self.log.info(
            "logged_in",
            as_endpoint=str(where),
            nms=[str(e) for e in self._nms_endpoints],
            certificate_not_after_ms=login.certificate_not_after_ms,
        )
        if not self._nms_endpoints:
            raise Unavailable("the AS named no NMS endpoint (set NMS_ENDPOINTS at the AS)")

    async def _connect_nms(self) -> _NmsLink:
        self.nms_state, self.nms_detail = "connecting", "connecting to the NMS"
        try:
            session, where = await self._dial(
                self._nms_endpoints,
                server_name=self._nms_server_name,
                what="NMS",
                handler=self._on_nms_message,
            )
        except CyphonicError:
            self._nms_failures += 1
            raise
        self._nms_failures = 0
        return _NmsLink(session=session, endpoint=where, keepalive_s=15.0)

    async def _register(self, link: _NmsLink) -> None:
        local = await self._local_endpoints(link.endpoint)
        request = pb.RegisterRequest(
            local_addresses=[pb.Endpoint(ip=ip.packed, port=port) for ip, port in local]
        )
        answer = await link.session.request(wrap(request), timeout=REQUEST_TIMEOUT_S)
        reg: pb.RegisterResponse = _body(answer, "register_response")
        self.counters.registrations += 1
        interval = (reg.keepalive_interval_ms or 15000) / 1000
        # Our idle timeout also bounds the NMS connection: stay well inside it.
        link.keepalive_s = max(0.5, min(interval, self.settings.peer_timeout_s / 3))
        if self.registration is None:
            await self._bring_up(reg)
        elif (reg.virtual_ipv4, reg.virtual_ipv6) != (
            self.registration.virtual_ipv4,
            self.registration.virtual_ipv6,
        ):
            # Leases never change; a different answer means a different deployment.
            raise AgentFailed(
                InvalidArgument(
                    f"the NMS now leases {address_text(reg.virtual_ipv4)} / "
                    f"{address_text(reg.virtual_ipv6)}, not the addresses in use; restart the agent"
                )
            )
        self.registration = reg
        self._nms = link
        if self.handover is not None and self._handover_network is None:
            self._handover_network = reg.network
        if self.relay is not None:
            self.relay.nudge()  # after a move the TRS must learn our new address at once
        self.nms_state = "connected"
        self.nms_detail = str(link.endpoint)
        net = reg.network
        self.log.info(
            "registered",
            nms=str(link.endpoint),
            virtual_ipv4=address_text(reg.virtual_ipv4),
            virtual_ipv6=address_text(reg.virtual_ipv6),
            behind_nat=net.behind_nat,
            has_ipv4=net.has_ipv4,
            has_ipv6=net.has_ipv6,
            reported=[format_hostport(str(ip), port) for ip, port in local],
            keepalive_s=link.keepalive_s,
        )

    async def _local_endpoints(
        self, nms: Candidate
    ) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
        """The addresses of our UDP socket, as peers could reach them."""
        assert self.endpoint is not None
        host, port = self.endpoint.local_address
        bound = ipaddress.ip_address(host)
        if not bound.is_unspecified:
            return [(bound, port)]
        exclude = [self.tun.index] if self.tun is not None else []
        # Loopback addresses only make sense to report when the NMS is on this host too.
        loopback = ipaddress.ip_address(nms.host).is_loopback
        addresses = await asyncio.to_thread(
            host_addresses, exclude_ifindexes=exclude, loopback=loopback
        )
        if ":" not in host:  # an IPv4-only socket
            addresses = [a for a in addresses if a.version == 4]
        return [(a, port) for a in addresses]

    async def _keep_alive(self, link: _NmsLink) -> None:
        """Keepalive at the NMS's interval until the connection is lost (raises why)."""
        lost = asyncio.ensure_future(link.session.wait_closed())
        try:
            while True:
                done, _ = await asyncio.wait({lost}, timeout=link.keepalive_s)
                if done:
                    self.counters.nms_losses += 1
                    error = lost.result()
                    raise error or Unavailable("the NMS connection closed")
                link.sequence += 1
                try:
                    answer = await link.session.request(
                        wrap(pb.Keepalive(sequence=link.sequence)),
                        timeout=min(REQUEST_TIMEOUT_S, link.keepalive_s * 2),
                    )
                    _body(answer, "keepalive_ack")
                except Timeout as exc:
                    self.counters.nms_losses += 1
                    link.session.close(exc)
                    raise Unavailable(f"the NMS at {link.endpoint} stopped answering") from exc
        finally:
            lost.cancel()

    async def _on_nms_message(
        self, message: pb.Envelope, _session: SignallingSession
    ) -> pb.Envelope | None:
        """Pushes from the NMS."""
        body = message.WhichOneof("body")
        if body == "route_direction":
            self._directed(message.route_direction)
        elif body == "peer_offline":
            self._peer_offline(message.peer_offline)
        elif body == "relay_cids":
            if self.relay is not None:
                self.relay.peer_cids_received(message.relay_cids)
        elif body == "revocation_notice":
            notice = message.revocation_notice
            self.log.error("revoked", serial=notice.serial_hex, reason=notice.reason)
        else:
            raise UnexpectedMessage(f"the agent does not take {body} from the NMS")
        return None

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
        old, new = move.old.describe(), move.new.describe()
        migrated = self._migrate_client_connections(rotate=not self._rotated)
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
        link = self._nms
        if link is None or not link.session.is_open or self.registration is None:
            return  # the control loop registers with the new addresses when it connects
        if not routable(link.endpoint.host, link.endpoint.port):
            # e.g. an IPv6 NMS endpoint after a move to IPv4 only: reconnect at once.
            self._reconnect_now = True
            link.session.close(Unavailable("moved: the NMS endpoint is unreachable from here"))
            return
        # In its own task: the watcher goes on watching (a second move while this waits
        # registers again).
        self._spawn(self._reregister(link))

    async def _reregister(self, link: _NmsLink) -> None:
        try:
            await self._register(link)
        except CyphonicError as exc:
            self.log.warning("reregister_failed", error=exc.message)
            self._reconnect_now = True
            link.session.close(exc)  # the control loop connects again
        except AgentFailed as exc:
            # Another deployment answered; the control loop meets it again and stops.
            self.log.error("reregister_refused", error=str(exc))
            link.session.close(exc.error)

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
        assert self.endpoint is not None
        count = 0
        for conn in self.endpoint.connections:
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

    # ------------------------------------------------------------------ bring-up

    async def _bring_up(self, reg: pb.RegisterResponse) -> None:
        """First registration: the TUN device, the packet pump and the DNS stub."""
        v4 = (
            ipaddress.IPv4Interface(
                (address_text(reg.virtual_ipv4), reg.virtual_ipv4_prefix_len or 32)
            )
            if reg.virtual_ipv4
            else None
        )
        v6 = (
            ipaddress.IPv6Interface(
                (address_text(reg.virtual_ipv6), reg.virtual_ipv6_prefix_len or 128)
            )
            if reg.virtual_ipv6
            else None
        )
        try:
            self.tun = TunDevice.open(
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
        self._own_addresses = frozenset(i.ip.packed for i in (v4, v6) if i is not None)
        self._own_networks = [i.network for i in (v4, v6) if i is not None]
        self.datapath = DataPath(tun=self.tun, on_miss=self._on_miss)
        self.datapath.start()
        address = self.settings.dns_address
        if address is not None:
            upstreams = (
                [parse_hostport(u, default_port=53) for u in self.settings.dns_upstreams]
                if self.settings.dns_upstreams is not None
                else None
            )
            try:
                self.dns = await DnsStub.start(
                    listen=address, domain=self.domain, lookup=self._lookup, upstreams=upstreams
                )
            except OSError as exc:
                raise AgentFailed(
                    Unavailable(
                        f"cannot listen for DNS on {format_hostport(*address)}: {exc.strerror} "
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
            dns=format_hostport(*address) if address else "off",
        )

    # ------------------------------------------------------------------ route requests

    async def _lookup(self, fqdn: str) -> PeerAddresses | None:
        """The DNS stub's hook: the peer's virtual addresses; starts the route at once."""
        fqdn = fqdn.lower().rstrip(".")
        if fqdn == self.fqdn and self.registration is not None:
            return _peer_addresses(self._own_addresses)
        route = self.routes.get(fqdn)
        if route is None or not route.addresses:
            route = await self._request_route(fqdn)
        if route is None:
            return None
        return _peer_addresses(route.addresses)

    def _on_miss(self, destination: bytes) -> None:
        """A TUN packet for a virtual address with no tunnel (it waits in PendingPackets)."""
        if self.routes.for_address(destination) is not None:
            return  # its route is being set up; the packet waits for it
        if not self._routable_overlay(destination) or self.routes.is_held(
            destination, now=asyncio.get_running_loop().time()
        ):
            # Held down after a failure: dropped quietly (the failure was logged once).
            assert self.datapath is not None
            self.datapath.pending.discard(destination)
            return
        self._spawn(self._route_for_packet(destination))

    def _routable_overlay(self, destination: bytes) -> bool:
        ip = ipaddress.ip_address(destination)
        if ip.is_multicast or destination in self._own_addresses:
            return False
        for net in self._own_networks:
            if ip in net:
                return not (net.version == 4 and ip in (net.network_address, net.broadcast_address))
        return False

    async def _route_for_packet(self, destination: bytes) -> None:
        try:
            route = await self._request_route(destination)
        except CyphonicError as exc:
            self.log.info(
                "route_request_failed", destination=address_text(destination), error=exc.message
            )
            route = None
        if route is None and self.datapath is not None:
            self.datapath.pending.discard(destination)

    async def _request_route(
        self,
        key: str | bytes,
        *,
        force: bool = False,
    ) -> PeerRoute | None:
        """Ask the NMS for a route to ``key`` (FQDN or raw virtual address), once at a time.

        None: no such node. Raises why the route cannot be had (offline, NMS unreachable).
        ``force``: ask even though a route exists (it will be replaced).
        """
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        loop = asyncio.get_running_loop()
        if not force and not self.routes.should_request(key, now=loop.time()):
            route = self.routes.get(key) if isinstance(key, str) else self.routes.for_address(key)
            if route is not None:
                return route
            failure = self._failures.get(key)
            if isinstance(failure, NotFound):
                return None
            raise failure or Unavailable("route held down after a failure")
        future: asyncio.Future[PeerRoute | None] = loop.create_future()
        self._inflight[key] = future
        label = key if isinstance(key, str) else address_text(key)
        try:
            link = self._nms
            if link is None or not link.session.is_open:
                raise Unavailable(f"not connected to the NMS ({self.nms_detail or 'connecting'})")
            request = (
                pb.RouteRequest(fqdn=key)
                if isinstance(key, str)
                else pb.RouteRequest(virtual_address=key)
            )
            self.counters.route_requests += 1
            started = loop.time()
            answer = await link.session.request(wrap(request), timeout=REQUEST_TIMEOUT_S)
            response: pb.RouteResponse = _body(answer, "route_response")
            route = self.routes.requested(
                response.peer_fqdn.lower(),
                [a for a in (response.peer_virtual_ipv4, response.peer_virtual_ipv6) if a],
                now=loop.time(),
            )
            self.log.info(
                "route_answered",
                peer=route.fqdn,
                route_id=response.route_id,
                pattern=pattern_name(response.pattern),
                ms=round((loop.time() - started) * 1000, 1),
            )
            self._failures.pop(key, None)
            self._asked[route.fqdn] = loop.time()
            future.set_result(route)
            return route
        except NotFound as exc:
            self.routes.request_failed(key, now=loop.time())
            self._failures[key] = exc
            self.log.info("no_such_peer", peer=label)
            future.set_result(None)
            return None
        except CyphonicError as exc:
            self.routes.request_failed(key, now=loop.time())
            self._failures[key] = exc
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it through their own await
            raise
        finally:
            del self._inflight[key]

    # ------------------------------------------------------------------ directions

    def _directed(self, direction: pb.RouteDirection) -> None:
        loop = asyncio.get_running_loop()
        action, replaced = self.routes.directed(direction, now=loop.time())
        route = action.route
        if replaced is not None:
            self._close_route(replaced, "replaced by a newer route")
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
            # The peer connects; _authorize lets it in. A direct route may need reversing.
            if route.pattern == pb.ROUTE_PATTERN_DIRECT:
                self._spawn(self._reverse_if_silent(route))
            return
        # CONNECT, or ACCEPT of a relayed route: allocate at the TRS and serve our CIDs first.
        work = (
            self._connect_route(route)
            if isinstance(action, Connect)
            else self._accept_relayed(route)
        )
        key = id(route)
        task = self._spawn(work)
        self._connecting[key] = task
        task.add_done_callback(lambda _t: self._connecting.pop(key, None))

    async def _reverse_if_silent(self, route: PeerRoute) -> None:
        """Pattern 1 with an inbound-blocking firewall in front of this node: the NMS (which
        sees no firewalls) told the peer to connect, and its packets never arrive. Ask for
        the route from this side: the NMS then makes this node the one that connects out."""
        await asyncio.sleep(REVERSE_AFTER_S)
        if not self.routes.is_current(route) or route.state is not RouteState.AWAITING_PEER:
            return
        now = asyncio.get_running_loop().time()
        for stamp in (self._asked.get(route.fqdn), self._reversed.get(route.fqdn)):
            if stamp is not None and now - stamp < REVERSE_QUIET_S:
                return
        self._reversed[route.fqdn] = now
        self.log.info(
            "route_reversed", peer=route.fqdn, route_id=route.route_id, waited_s=REVERSE_AFTER_S
        )
        try:
            await self._request_route(route.fqdn, force=True)
        except CyphonicError as exc:
            self.log.info("route_reverse_failed", peer=route.fqdn, error=exc.message)

    def _peer_offline(self, notice: pb.PeerOffline) -> None:
        route = self.routes.get(notice.fqdn.lower())
        if route is None or (notice.route_id and notice.route_id != route.route_id):
            return
        self.log.info("peer_offline", peer=route.fqdn, route_id=route.route_id)
        self._close_route(route, "peer offline")
        self.routes.tear_down(route)

    def _close_route(self, route: PeerRoute, reason: str) -> None:
        task = self._connecting.pop(id(route), None)
        if task is not None:
            task.cancel()
        self._release_relay(route)
        tunnel = route.tunnel
        if isinstance(tunnel, Tunnel):
            if self.datapath is not None:
                self.datapath.remove_tunnel(tunnel)
            conn = tunnel.conn
            if isinstance(conn, Connection):
                conn.close(reason)

    def _route_failed(self, route: PeerRoute, why: str) -> None:
        loop = asyncio.get_running_loop()
        self._release_relay(route)
        if self.routes.fail(route, now=loop.time()):
            dropped = 0
            if self.datapath is not None:
                dropped = sum(self.datapath.pending.discard(a) for a in route.addresses)
            self._failures[route.fqdn] = Unavailable(f"route to {route.fqdn} failed: {why}")
            self.log.warning(
                "route_failed",
                peer=route.fqdn,
                route_id=route.route_id,
                reason=why,
                dropped_packets=dropped,
            )

    # ------------------------------------------------------------------ tunnels: connect

    async def _connect_route(self, route: PeerRoute) -> None:
        """Connect to the peer (the first candidate that answers), then TunnelRequest."""
        assert self.endpoint is not None
        if route.pattern == pb.ROUTE_PATTERN_RELAY:
            await self._connect_relayed(route)
            return
        candidates = [c for c in route.candidates if routable(c.host, c.port)]
        if not candidates:
            self._route_failed(
                route,
                "no candidate address of the peer is routable from here "
                f"({', '.join(map(str, route.candidates)) or 'none'})",
            )
            return
        errors: list[str] = []
        for candidate in candidates:
            for pause in (*ACCEPT_RETRY_S, None):
                if not self.routes.is_current(route):
                    return
                route.attempts += 1
                try:
                    await self._open_tunnel(route, candidate)
                    return
                except PermissionDenied as exc:
                    # Refused as not directed: the peer may not have its direction yet.
                    if pause is None:
                        errors.append(f"{candidate}: {exc.message}")
                        break
                    await asyncio.sleep(pause)
                except CyphonicError as exc:
                    errors.append(f"{candidate}: {exc.message}")
                    break
        if self.routes.is_current(route):
            self._route_failed(route, "; ".join(errors))

    async def _open_tunnel(
        self, route: PeerRoute, candidate: Candidate, *, relayed: RelayedPath | None = None
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
        self._tunnel_ready(link, peer_mtu=0)
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
            response: pb.TunnelResponse = _body(answer, "tunnel_response")
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
            link.tunnel.core.mtu = min(self.settings.mtu, max(576, response.mtu))

    # ------------------------------------------------------------------ relayed (pattern 3)

    def _nms_session(self) -> SignallingSession | None:
        return self._nms.session if self._nms is not None else None

    def _release_relay(self, route: PeerRoute) -> None:
        if self.relay is not None and route.pattern == pb.ROUTE_PATTERN_RELAY:
            self.relay.release(route.route_id)

    async def _relay_prepare(self, route: PeerRoute) -> RelayedPath | None:
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

    async def _accept_relayed(self, route: PeerRoute) -> None:
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

    async def _connect_relayed(self, route: PeerRoute) -> None:
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

    def _authorize(self, peer: PeerIdentity) -> None:
        """Inside the handshake: only a node the NMS directed to us may open a tunnel."""
        if self.routes.may_accept(peer.name.lower()) is None:
            self.counters.tunnels_refused += 1
            self.log.info("tunnel_refused", peer=peer.name, reason="no route directed")
            raise PermissionDenied(f"{self.fqdn} has no route to {peer.name} from the NMS")

    def _accepted(self, conn: Connection) -> SignallingSession:
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
        self._tunnel_ready(link, peer_mtu=0)
        self.counters.tunnels_accepted += 1
        self.log.info(
            "tunnel_up",
            peer=route.fqdn,
            route_id=route.route_id,
            role="accept",
            pattern=route.pattern_name,
            path=format_hostport(*conn.peer_address),
        )
        return session

    async def _on_tunnel_request(
        self, message: pb.Envelope, session: SignallingSession
    ) -> pb.Envelope:
        request: pb.TunnelRequest = _body(message, "tunnel_request")
        link = self._links.get(id(session))
        if link is None or link.tunnel is None:
            raise PermissionDenied("no tunnel for this connection")
        if request.route_id != link.route.route_id:
            session.connection.close("stale route")
            raise PermissionDenied(
                f"route {request.route_id} is not the current route to {link.route.fqdn}"
            )
        if request.mtu:
            link.tunnel.core.mtu = min(self.settings.mtu, max(576, request.mtu))
        return wrap(pb.TunnelResponse(route_id=link.route.route_id, mtu=self.settings.mtu))

    # ------------------------------------------------------------------ tunnels: both sides

    def _tunnel_ready(self, link: _TunnelLink, *, peer_mtu: int) -> None:
        assert self.datapath is not None
        route = link.route
        mtu = self.settings.mtu if not peer_mtu else min(self.settings.mtu, max(576, peer_mtu))
        core = TunnelCore(
            link.conn.quic,
            mtu=mtu,
            peer_addresses=route.addresses or None,
            local_addresses=self._own_addresses or None,
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
        if self.routes.tunnel_up(route, tunnel, now=asyncio.get_running_loop().time()) is None:
            link.conn.close("route replaced")
            return
        if isinstance(previous, Tunnel) and previous is not tunnel:
            # The peer connected again (it lost the first connection): the new one wins.
            self.datapath.remove_tunnel(previous)
            if isinstance(previous.conn, Connection):
                previous.conn.close("superseded by a newer connection")
        self.datapath.add_tunnel(tunnel)

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
        if route.tunnel is tunnel and self.routes.tear_down(route):
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

    # ------------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_S)
            now = loop.time()
            if self.datapath is not None:
                self.datapath.pending.expire(now=now)
            for route in self.routes.expire(now=now):
                self._close_route(route, "route set-up timed out")
                if self.datapath is not None:
                    for address in route.addresses:
                        self.datapath.pending.discard(address)
                self.log.warning(
                    "route_setup_timeout",
                    peer=route.fqdn,
                    route_id=route.route_id,
                    state=route.state.value,
                )
            # A failure is remembered only while its key is held down (a scan of the
            # overlay pool must not grow this map without bound).
            for key in [k for k in self._failures if not self.routes.is_held(k, now=now)]:
                del self._failures[key]
            if now - self._last_ping >= self.settings.tunnel_keepalive_s:
                self._last_ping = now
                self._ping_tunnels()

    def _ping_tunnels(self) -> None:
        # A PING keeps an idle tunnel (and the NAT binding under it) alive; a peer that
        # vanished stops acknowledging, and QUIC's idle timeout then ends the connection.
        for route in self.routes.routes():
            tunnel = route.tunnel
            if route.state is RouteState.UP and isinstance(tunnel, Tunnel):
                conn = tunnel.conn
                if isinstance(conn, Connection) and not conn.is_closed:
                    self._ping_uid += 1
                    conn.quic.send_ping(self._ping_uid)
                    conn.transmit()

    # ------------------------------------------------------------------ status

    def snapshot(self) -> AgentStatus:
        """What ``cyphonic-agent status`` shows."""
        reg = self.registration
        peers: list[PeerStatus] = []
        for route in sorted(self.routes.routes(), key=lambda r: r.fqdn):
            tunnel = route.tunnel
            if route.state is RouteState.UP and isinstance(tunnel, Tunnel):
                row = tunnel.status()
                relayed = self.relay.path(route.route_id) if self.relay is not None else None
                if relayed is not None:
                    row.path = relayed.label  # "via <TRS address> (<TRS name>)"
                peers.append(row)
                continue
            v4 = [a for a in route.addresses if len(a) == 4]
            v6 = [a for a in route.addresses if len(a) == 16]
            peers.append(
                PeerStatus(
                    fqdn=route.fqdn,
                    state="establishing",
                    pattern=route.pattern_name,
                    virtual_ipv4=address_text(v4[0]) if v4 else None,
                    virtual_ipv6=address_text(v6[0]) if v6 else None,
                )
            )
        return AgentStatus(
            fqdn=self.fqdn,
            virtual_ipv4=address_text(reg.virtual_ipv4) if reg and reg.virtual_ipv4 else None,
            virtual_ipv6=address_text(reg.virtual_ipv6) if reg and reg.virtual_ipv6 else None,
            nms_state=self.nms_state,
            nms_detail=self.nms_detail,
            tun=self.tun.name if self.tun is not None else None,
            mtu=self.settings.mtu if self.tun is not None else None,
            uptime_s=round(time.monotonic() - self._started, 1),
            peers=peers,
            handovers=self.mobility.detector.moves,
            last_handover=self._handover_status(),
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
                    format_hostport(address_text(e.ip), e.port)
                    for e in (net.observed_ipv4, net.observed_ipv6)
                    if e.ip
                ],
            }
        return out


def _peer_addresses(addresses: Iterable[bytes]) -> PeerAddresses:
    v4 = next((ipaddress.IPv4Address(a) for a in addresses if len(a) == 4), None)
    v6 = next((ipaddress.IPv6Address(a) for a in addresses if len(a) == 16), None)
    return PeerAddresses(ipv4=v4, ipv6=v6)


def _check_tun_access() -> None:
    """Fail early (before logging in anywhere) when the TUN device cannot be made."""
    import os

    try:
        fd = os.open(TUN_DEVICE_PATH, os.O_RDWR)
    except FileNotFoundError as exc:
        raise AgentFailed(Unavailable(f"{TUN_DEVICE_PATH} missing: no TUN support")) from exc
    except PermissionError as exc:
        raise AgentFailed(
            PermissionDenied(f"cannot open {TUN_DEVICE_PATH}: run as root or with CAP_NET_ADMIN")
        ) from exc
    os.close(fd)


async def run_agent(settings: AgentSettings) -> None:
    """Run the agent until SIGTERM or SIGINT (then clean up and return)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        agent = Agent(settings)
    except CyphonicError as exc:
        raise AgentFailed(exc) from exc
    await agent.run(stop)
