"""The NMS core: registration, presence, route establishment, revocation, across replicas.

Thin asyncio glue around the sans-I/O parts (``routing``, ``leases``) and the
stores (``storage.NodeStore``; ``cluster`` presence, bus and routes; ``trs_directory``). It
knows nothing about QUIC: a connected node is a ``NodeLink`` the signalling layer hands in,
which can take a pushed Envelope and be closed with an error.

Flow of a route request (replica R2 gets it from node A for node B held by R1)::

    A --RouteRequest--> R2: decide pattern_for(A, B); store the route
    R2 --RouteDirection(role)--> A              (local push)
    R2 --bus "push" on R1's channel--> R1 --RouteDirection(role)--> B
    R2 --RouteResponse--> A

Pattern 3 adds the proposal's CID_A / CID_B exchange: each node allocates its side at the TRS,
then sends ``RelayCids{route_id, its TRS-assigned CIDs}``; the NMS checks that the sender is a
node of that relayed route and pushes the same ``RelayCids`` to the other node (through the
bus when another replica holds it), then echoes the message as the answer::

    B --RelayCids(route, CID_B...)--> R1 --RelayCids push (local or via the bus)--> A
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Protocol

from cyphonic import relay_token
from cyphonic.errors import (
    CyphonicError,
    InvalidArgument,
    NotFound,
    Overloaded,
    PeerOffline,
    PermissionDenied,
    PolicyDenied,
    Revoked,
    Unavailable,
)
from cyphonic.log import get_logger
from cyphonic.policy import CompiledFilter, filter_to_pb
from cyphonic.registry import NodeState
from cyphonic.v1 import signalling_pb2 as pb
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cyphonic_nms.access import AccessControl
from cyphonic_nms.cluster import (
    BusMessage,
    InProcessBus,
    InProcessPresence,
    InProcessRouteStore,
    PresenceStore,
    ReplicaBus,
    RouteRecord,
    RouteStore,
    cancel_requested,
)
from cyphonic_nms.leases import LeasePools
from cyphonic_nms.policy_store import PolicyStore, SqlPolicyStore
from cyphonic_nms.reach import ReachProber, ReachVerdict
from cyphonic_nms.registry_events import RegistryEvents
from cyphonic_nms.revocations import REVOCATION_PAGE, RevocationCursor
from cyphonic_nms.route_reason import explain
from cyphonic_nms.routing import (
    Endpoint,
    Inbound,
    NatMapping,
    NetworkInfo,
    Pattern,
    RouteDecision,
    Side,
    classify,
)
from cyphonic_nms.routing import pattern_for as decide
from cyphonic_nms.storage import Lease, NodeStore, RevocationEvent, SqlNodeStore
from cyphonic_nms.trs_directory import InProcessTrsDirectory, TrsDirectory, pick

log = get_logger("nms")

STOP_GRACE_S = 5.0
"""How long ``stop`` waits for its periodic tasks to end."""
REVOCATION_START_BACKLOG = 1000
"""Revocation ids below the newest at start-up that the first poll reads again."""
MAX_RELAY_CIDS = 32
"""Most CIDs one RelayCids may carry (a TRS assigns 16 per side by default)."""
MIN_CID_LEN, MAX_CID_LEN = 8, 20
"""A relay CID opens the connection as the first Initial's DCID: 8..20 bytes (RFC 9000 7.2)."""
MAX_ROUTE_ID_LEN = 64
MIN_ADMITTED = 4
"""Registrations always admitted at once, however slow the replica is right now."""
FAILED_JOB_RETRY_S = 1.0
"""A periodic job that failed (a restarting dependency) runs again after this long."""
MIN_WAKE_GAP_S = 0.5
"""A job woken by an event (``_every``) runs at most this often."""


class NodeLink(Protocol):
    """A node's open signalling connection, as the manager sees it."""

    fqdn: str
    serial_hex: str

    async def push(self, envelope: pb.Envelope) -> None:
        """Send a notice on a new server-opened stream."""
        ...

    def close(self, error: CyphonicError) -> None:
        """Close the connection with ``error`` (sent to the node where possible)."""
        ...


class _DecidedRoutes:
    """Routes this replica decided, by id and by pair of nodes (one active route a pair):
    what a route decision replaces is found without a walk over every route."""

    def __init__(self) -> None:
        self.by_id: dict[str, RouteRecord] = {}
        self._by_pair: dict[frozenset[str], str] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, route: RouteRecord) -> None:
        """``route``, replacing the pair's route decided before."""
        self.forget_pair(route.initiator, route.responder)
        self.by_id[route.route_id] = route
        self._by_pair[frozenset((route.initiator, route.responder))] = route.route_id

    def pop(self, route_id: str) -> None:
        route = self.by_id.pop(route_id, None)
        if route is not None:
            pair = frozenset((route.initiator, route.responder))
            if self._by_pair.get(pair) == route_id:
                del self._by_pair[pair]

    def forget_pair(self, a: str, b: str, *, keep: str | None = None) -> None:
        """Drop the route between ``a`` and ``b`` unless it is ``keep``."""
        route_id = self._by_pair.get(frozenset((a, b)))
        if route_id is not None and route_id != keep:
            self.pop(route_id)


@dataclass
class _NodeLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass
class LocalNode:
    """A node connected to this replica."""

    link: NodeLink
    node_id: int
    lease: Lease
    network: NetworkInfo


@dataclass(frozen=True)
class Registration:
    """What a node learns when it registers."""

    fqdn: str
    lease: Lease
    network: NetworkInfo
    pools: LeasePools
    keepalive_interval_s: float
    ping_interval_s: float = 0.0
    """Non-zero: the node keeps its connection alive with QUIC PINGs at this interval."""
    reach_nonce: bytes | None = None
    """The nonce of this registration's reachability probe (``reach.py``), if probed."""
    reach_port: int = 0


class NmsMetrics:
    """The NMS's Prometheus metrics, in their own registry (one per manager)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.registrations = Counter(
            "cyphonic_nms_registrations",
            "Node registrations by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.routes = Counter(
            "cyphonic_nms_route_decisions",
            "Route decisions by pattern",
            ["pattern"],
            registry=self.registry,
        )
        self.route_errors = Counter(
            "cyphonic_nms_route_errors",
            "Refused route requests by error",
            ["code"],
            registry=self.registry,
        )
        self.pushes = Counter(
            "cyphonic_nms_pushes",
            "Notices pushed to nodes, locally or via another replica",
            ["kind", "via"],
            registry=self.registry,
        )
        self.connected = Gauge(
            "cyphonic_nms_connected_nodes",
            "Nodes connected to this replica",
            registry=self.registry,
        )
        self.offline = Counter(
            "cyphonic_nms_offline",
            "Nodes marked offline by cause",
            ["cause"],
            registry=self.registry,
        )
        self.route_seconds = Histogram(
            "cyphonic_nms_route_decision_seconds",
            "Time to decide and push a route",
            registry=self.registry,
        )


def _endpoint_pb(ep: Endpoint) -> pb.Endpoint:
    return pb.Endpoint(ip=ep.ip.packed, port=ep.port)


_MAPPING_PB = {
    NatMapping.UNKNOWN: pb.NAT_MAPPING_UNKNOWN,
    NatMapping.NONE: pb.NAT_MAPPING_NONE,
    NatMapping.ENDPOINT_INDEPENDENT: pb.NAT_MAPPING_ENDPOINT_INDEPENDENT,
    NatMapping.DEPENDENT: pb.NAT_MAPPING_DEPENDENT,
}
_INBOUND_PB = {
    Inbound.UNKNOWN: pb.INBOUND_UNKNOWN,
    Inbound.OPEN: pb.INBOUND_OPEN,
    Inbound.BLOCKED: pb.INBOUND_BLOCKED,
}


def network_pb(info: NetworkInfo) -> pb.NetworkInfo:
    """The wire form of a node's network information."""
    msg = pb.NetworkInfo(
        has_ipv4=info.has_ipv4,
        has_ipv6=info.has_ipv6,
        behind_nat=info.behind_nat,
        nat_mapping=_MAPPING_PB[info.nat_mapping],
        inbound=_INBOUND_PB[info.inbound],
    )
    if info.observed_ipv4 is not None:
        msg.observed_ipv4.CopyFrom(_endpoint_pb(info.observed_ipv4))
    if info.observed_ipv6 is not None:
        msg.observed_ipv6.CopyFrom(_endpoint_pb(info.observed_ipv6))
    return msg


@dataclass(frozen=True)
class Handover:
    """A registered node came back with a different network (it moved)."""

    at: datetime
    old: NetworkInfo
    new: NetworkInfo


PUNCH_DELAY_MS = 0
"""After its relayed tunnel is up, a node waits this long before its first punch probe."""
PUNCH_INTERVAL_MS = 100
PUNCH_WINDOW_MS = 3000
"""Probes stop after this long: a pair that did not go direct stays relayed."""


def _same_place(old: NetworkInfo, new: NetworkInfo) -> bool:
    return (old.observed_ipv4, old.observed_ipv6, old.local_addresses) == (
        new.observed_ipv4,
        new.observed_ipv6,
        new.local_addresses,
    )


def survives_move(route: RouteRecord, decision: RouteDecision, moved: str) -> bool:
    """Whether a route of ``moved`` (a node whose network changed) carries on under the same
    route id, its QUIC connection migrating, or must be rebuilt under a new one.

    It carries on when the pattern, family and connecting side stay and the moved node is
    the one that connects (a client follows its own move) or the route is relayed (both
    nodes are clients of the TRS, whose control connection moves the side). A node that
    accepted the tunnel cannot migrate it: its peer must connect to the new address.
    """
    family = int(decision.family) if decision.family is not None else None
    if (int(decision.pattern), family, decision.connector.value) != (
        route.pattern,
        route.family,
        route.connector,
    ):
        return False
    if decision.pattern is Pattern.RELAY:
        return True
    mover = Side.INITIATOR if moved == route.initiator else Side.RESPONDER
    return decision.connector is mover


def _envelope(**body: object) -> pb.Envelope:
    return pb.Envelope(version=pb.PROTOCOL_VERSION_1, **body)  # type: ignore[arg-type]


@dataclass
class NodeManager:
    """One NMS replica's view of the overlay; see the module docstring."""

    nodes: NodeStore
    pools: LeasePools
    replica_id: str
    relay_secret: bytes
    presence: PresenceStore = field(default_factory=InProcessPresence)
    bus: ReplicaBus = field(default_factory=InProcessBus)
    routes: RouteStore = field(default_factory=InProcessRouteStore)
    trs: TrsDirectory = field(default_factory=InProcessTrsDirectory)
    keepalive_interval_s: float = 15.0
    """The Keepalive interval told to agents that do not PING (older ones)."""
    ping_interval_s: float = 25.0
    """The QUIC PING interval told to agents (0: ask for Keepalive requests instead)."""
    offline_timeout_s: float = 45.0
    """A node is offline once its connection is gone: closed, or silent this long (the QUIC
    idle timeout the signalling endpoint sets); presence and routes in Redis outlive the last
    refresh by this long."""
    presence_refresh_s: float = 5.0
    """Presence and route TTLs of the nodes held here are refreshed this often (batched)."""
    last_seen_interval_s: float = 60.0
    """``last_seen`` in the registry is written this often for the nodes held here."""
    max_pending_registrations: int = 128
    """Admission control: registrations in progress at once; more are refused ``Overloaded``."""
    admission_max_wait_s: float = 2.5
    """Admission control: while an admitted registration has been in progress this long (the
    replica is falling behind), new ones are refused too (at least a few are always let in)."""
    overload_retry_after_s: float = 2.0
    """The retry-after of a refused registration, scaled up by how far over the limit."""
    revocation_poll_s: float = 15.0
    """Safety poll of the revocations: they are applied when the registry notifies a change
    (Postgres) or the AS's watch reports one (``revocations_changed``)."""
    relay_token_lifetime_s: float = 120.0
    policy_store: PolicyStore | None = None
    """Where the access policy lives; by default the registry behind ``nodes``."""
    policy_default_deny: bool = False
    """Without a policy document: allow all (False) or deny all (True)."""
    policy_poll_s: float = 15.0
    """Safety poll of the policy revision: changes are applied when the registry notifies one
    (Postgres, ``registry_events``) or they are made through this replica's admin API."""
    metrics: NmsMetrics = field(default_factory=NmsMetrics)
    reach: ReachProber | None = None
    """Reachability probes (``reach.py``); set by the server, None: nodes stay unprobed."""
    monotonic: Callable[[], float] = time.monotonic
    wall_ms: Callable[[], int] = field(default=lambda: time.time_ns() // 1_000_000)

    def __post_init__(self) -> None:
        self._local: dict[str, LocalNode] = {}
        self._by_vip: dict[IPv4Address | IPv6Address, str] = {}
        self._touched_at: float | None = None  # monotonic time of the last ``touch``
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._revocations = RevocationCursor()
        self._node_locks: dict[str, _NodeLock] = {}
        self._handovers: dict[str, Handover] = {}
        self.draining = False
        if self.policy_store is None and isinstance(self.nodes, SqlNodeStore):
            self.policy_store = SqlPolicyStore(self.nodes.sessions)
        self.access: AccessControl | None = (
            AccessControl(self.policy_store, default_deny=self.policy_default_deny)
            if self.policy_store is not None
            else None
        )
        self._pushed_filters: dict[str, CompiledFilter] = {}
        self._registering: dict[int, float] = {}  # id -> monotonic start, in progress
        self._registration_ids = 0
        # Routes this replica decided (their initiator is held here): put back into the
        # route store after it lost them (a Redis restart without its data).
        self._decided = _DecidedRoutes()
        self._policy_lock = asyncio.Lock()
        self._filters_due: set[str] = set()  # local nodes whose filter is not pushed yet
        self._policy_wake = asyncio.Event()
        self._revocation_wake = asyncio.Event()
        self.revocation_hooks: list[Callable[[], None]] = []
        """Called when the registry notifies a revocation (the QUIC endpoint's cache)."""
        engine = (
            self.nodes.sessions.kw.get("bind") if isinstance(self.nodes, SqlNodeStore) else None
        )
        self._events = RegistryEvents.for_engine(
            engine,
            {"access_policy": self._policy_wake.set, "revocations": self._registry_revoked},
        )

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Subscribe to this replica's bus channel and start the periodic loops."""
        # Revocations made before now are enforced at registration; a short backlog is read
        # again on the first poll in case a transaction still in flight took an id below.
        self._revocations.start_at(await self.nodes.last_revocation_id() - REVOCATION_START_BACKLOG)
        stale = await self.nodes.release_replica(self.replica_id, now=datetime.now(UTC))
        if stale:
            log.info("stale_nodes_offline", replica=self.replica_id, count=stale)
        await self.bus.subscribe(self.replica_id, self._on_bus)
        if self.access is not None:
            await self.access.refresh(force=True)
        if self._events is not None:
            self._events.start()
        self._tasks = [
            asyncio.create_task(
                # Several refreshes per TTL, so that one missed does not lapse presence.
                self._every(
                    min(self.presence_refresh_s, self.offline_timeout_s / 3),
                    self.refresh_presence,
                ),
                name="nms-presence",
            ),
            asyncio.create_task(
                self._every(
                    self.revocation_poll_s, self.poll_revocations, wake=self._revocation_wake
                ),
                name="nms-revocation",
            ),
            asyncio.create_task(
                self._every(self.policy_poll_s, self.sync_policy, wake=self._policy_wake),
                name="nms-policy",
            ),
        ]

    def drain(self) -> None:
        """Enter the shutdown state, before the signalling endpoint closes its connections.

        A replica going away (rolling restart, scale-in) is not its nodes going offline:
        closed connections no longer count as disconnects, the sweep stops, and ``stop``
        releases the nodes without removing their routes or telling their peers; the nodes
        re-register at another replica and their tunnels carry on.
        """
        if not self.draining:
            self.draining = True
            log.info("draining", replica=self.replica_id, nodes=len(self._local))

    async def stop(self) -> None:
        """Stop the loops, release local nodes (presence, ``online``) and close their
        connections; their routes stay (see ``drain``)."""
        self.drain()
        tasks = [*self._tasks, *self._background]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            if pending:  # never hang a shutdown on a task that ignores cancellation
                log.warning("tasks_did_not_stop", tasks=sorted(t.get_name() for t in pending))
        self._tasks = []
        if self._events is not None:
            await self._events.close()
        for fqdn, local in list(self._local.items()):
            local.link.close(Unavailable("NMS replica shutting down"))
            with contextlib.suppress(CyphonicError):
                await self._went_offline(fqdn, local, cause="shutdown", keep_routes=True)
        await self.bus.close()

    async def _every(
        self, period_s: float, job: Callable[[], object], *, wake: asyncio.Event | None = None
    ) -> None:
        """Run ``job`` every ``period_s``, and soon after ``wake`` is set (at most every
        ``MIN_WAKE_GAP_S``)."""
        pause = period_s
        while True:
            if wake is None:
                await asyncio.sleep(pause)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), pause)
                wake.clear()
            pause = period_s
            try:
                result = job()
                if asyncio.iscoroutine(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis or Postgres restarting: try again soon, so that what was lost
                # (presence, routes) is back within seconds of the server.
                pause = min(period_s, FAILED_JOB_RETRY_S)
                log.warning(
                    "periodic_job_failed", job=getattr(job, "__name__", "?"), error=str(exc)
                )
            if cancel_requested():  # a Redis call may have swallowed the cancellation
                raise asyncio.CancelledError
            if wake is not None:
                await asyncio.sleep(MIN_WAKE_GAP_S)
                pause = max(0.0, pause - MIN_WAKE_GAP_S)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @contextlib.asynccontextmanager
    async def _node_lock(self, fqdn: str) -> AsyncIterator[None]:
        """Serialise what changes one node's state here (registration, going offline): each
        awaits the registry and Redis, and an interleaving could release the presence a
        newer registration had just claimed."""
        entry = self._node_locks.get(fqdn)
        if entry is None:
            entry = self._node_locks[fqdn] = _NodeLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._node_locks[fqdn]

    # ------------------------------------------------------------------ queries

    @property
    def connected(self) -> dict[str, LocalNode]:
        """Nodes connected to this replica, by FQDN."""
        return dict(self._local)

    # ------------------------------------------------------------------ registration

    async def register(
        self,
        link: NodeLink,
        *,
        local_addresses: list[Endpoint],
        observed: Endpoint | None,
        reach_probes: bool = False,
    ) -> Registration:
        """Register the node behind ``link`` (its certificate FQDN) and lease its addresses.

        ``reach_probes``: the node answers reachability probes; it is probed (``reach.py``)
        and its NetworkInfo completed with the verdict a moment later.

        Admission control: with ``max_pending_registrations`` in progress, the node is
        refused ``Overloaded`` (it comes back after the retry-after, with jitter) rather than
        queued: a reconnect storm waits at the nodes, and registrations that are admitted
        finish within the nodes' request timeout instead of all timing out together.
        """
        fqdn = link.fqdn.lower()
        now = self.monotonic()
        pending = len(self._registering)
        if pending >= self.max_pending_registrations or self._behind(now):
            self.metrics.registrations.labels(outcome="overloaded").inc()
            raise Overloaded(
                f"NMS replica {self.replica_id} is busy: {pending} registrations in progress",
                retry_after_s=self.overload_retry_after_s,
            )
        self._registration_ids += 1
        ticket = self._registration_ids
        self._registering[ticket] = now
        try:
            async with self._node_lock(fqdn):
                reg = await self._register(
                    link, fqdn, local_addresses=local_addresses, observed=observed
                )
        finally:
            del self._registering[ticket]
        if reach_probes and self.reach is not None and observed is not None:
            nonce = self.reach.begin(fqdn, observed=observed, behind_nat=reg.network.behind_nat)
            if nonce is not None:
                reg = replace(reg, reach_nonce=nonce, reach_port=self.reach.port)
        return reg

    def _behind(self, now: float) -> bool:
        """An admitted registration has waited ``admission_max_wait_s``: falling behind."""
        return (
            len(self._registering) >= MIN_ADMITTED
            and now - next(iter(self._registering.values())) >= self.admission_max_wait_s
        )

    def registration_backlog(self) -> int:
        """The registrations in progress, for the QUIC endpoint's bound on new handshakes
        (``QuicEndpoint.backlog``). While this replica is behind, ``max_pending_registrations``
        more (what a new client would wait behind): past the endpoint's bound when that is
        not above ``max_pending_registrations`` (the defaults), so new clients are refused
        before their handshake rather than after it by ``register``, with a retry-after of
        that backlog at the recent rate (not the longest one: a storm's clients were told
        10 s and came back 10-15 s later, storm 91 s from 77 s)."""
        pending = len(self._registering)
        if self._behind(self.monotonic()):
            return pending + self.max_pending_registrations
        return pending

    def reach_verdict(self, verdict: ReachVerdict) -> None:
        """The reachability probe of a node is decided: kept with its network."""
        local = self._local.get(verdict.fqdn)
        if local is None:
            return
        local.network = local.network.probed(
            nat_mapping=verdict.nat_mapping, inbound=verdict.inbound
        )
        log.info(
            "reach_probed",
            fqdn=verdict.fqdn,
            nat_mapping=verdict.nat_mapping.value,
            inbound=verdict.inbound.value,
        )
        self._spawn(self._save_probed(local))

    async def _save_probed(self, local: LocalNode) -> None:
        with contextlib.suppress(CyphonicError):
            await self.nodes.save_network(
                local.node_id, local.network, replica=self.replica_id, now=datetime.now(UTC)
            )

    async def _register(
        self,
        link: NodeLink,
        fqdn: str,
        *,
        local_addresses: list[Endpoint],
        observed: Endpoint | None,
    ) -> Registration:
        try:
            facts = await self.nodes.registration_facts(fqdn, link.serial_hex)
            if facts is None:
                raise PermissionDenied(f"{fqdn} is not enrolled with this deployment")
            if facts.state == NodeState.REVOKED.value or facts.revoked:
                raise Revoked(f"{fqdn} is revoked")
            info = classify(local_addresses, observed)
            before = self._local.get(fqdn)
            if before is not None and _same_place(before.network, info):
                # Same addresses as seen before: what the probes found still holds.
                info = info.probed(
                    nat_mapping=before.network.nat_mapping, inbound=before.network.inbound
                )
            lease = facts.lease or await self.nodes.lease_for(
                facts.node_id, self.pools, known_missing=True
            )
            await self.nodes.save_network(
                facts.node_id, info, replica=self.replica_id, now=datetime.now(UTC)
            )
            previous = await self.presence.claim(fqdn, self.replica_id, self.offline_timeout_s)
        except CyphonicError as exc:
            self.metrics.registrations.labels(outcome=exc.code_name).inc()
            raise
        if previous is not None and previous != self.replica_id:
            # The node came back through another replica; drop its stale connection there.
            with contextlib.suppress(CyphonicError):
                await self.bus.publish(
                    previous,
                    BusMessage(
                        op="kick",
                        fqdn=fqdn,
                        reason="registered at another NMS replica",
                        code=pb.ERROR_CODE_UNAVAILABLE,
                    ),
                )
        old = self._local.get(fqdn)
        moved = old is not None and old.network != info
        if old is not None and moved:
            self._handovers[fqdn] = Handover(at=datetime.now(UTC), old=old.network, new=info)
            log.info(
                "node_moved",
                fqdn=fqdn,
                old_kind=old.network.kind,
                new_kind=info.kind,
                old_observed=str(old.network.observed_ipv4 or old.network.observed_ipv6),
                new_observed=str(info.observed_ipv4 or info.observed_ipv6),
            )
        if old is not None and old.link is not link:
            old.link.close(Unavailable("superseded by a newer connection"))
        self._local[fqdn] = LocalNode(link=link, node_id=facts.node_id, lease=lease, network=info)
        self._by_vip[lease.ipv4] = self._by_vip[lease.ipv6] = fqdn
        self.metrics.connected.set(len(self._local))
        self.metrics.registrations.labels(outcome="ok").inc()
        log.info(
            "registered",
            fqdn=fqdn,
            kind=info.kind,
            behind_nat=info.behind_nat,
            vip4=str(lease.ipv4),
            vip6=str(lease.ipv6),
            observed=str(observed),
        )
        if moved or (previous is not None and previous != self.replica_id):
            # A node that moved, here or from another replica, gets its routes re-directed.
            self._spawn(self._redirect_routes(fqdn, moved=moved))
        if self.access is not None:
            # Its filter now; the peers' filters (which may name its addresses) on the next
            # policy sync.
            self.access.nodes_changed()
            self._pushed_filters.pop(fqdn, None)
            self._filters_due.add(fqdn)
            if not self.access.policy.allow_all:
                self.policy_changed()  # the peers' filters may name its addresses
            self._spawn(self._push_filter(fqdn))
        return Registration(
            fqdn=fqdn,
            lease=lease,
            network=info,
            pools=self.pools,
            keepalive_interval_s=self.keepalive_interval_s,
            # Room for a lost PING's retransmission inside the idle timeout.
            ping_interval_s=min(self.ping_interval_s, self.offline_timeout_s * 0.6),
        )

    def last_handover(self, fqdn: str) -> Handover | None:
        """The last move of ``fqdn`` seen by this replica while the node was connected."""
        return self._handovers.get(fqdn.lower())

    def require_registered(self, link: NodeLink) -> LocalNode:
        """The node's local state; ``UnexpectedMessage``-like refusal if it did not register."""
        local = self._local.get(link.fqdn.lower())
        if local is None or local.link is not link:
            raise PermissionDenied("register before asking for routes")
        return local

    async def disconnected(self, link: NodeLink, *, cause: str = "disconnect") -> None:
        """The node's connection closed (``cause`` "timeout": it went silent)."""
        fqdn = link.fqdn.lower()
        if self.draining:
            return  # this replica closed it on its way out; see ``drain``
        # Checked under the lock: a registration of this very link may still be under way
        # (it must not be left registered), or a newer one (which must not be undone).
        async with self._node_lock(fqdn):
            local = self._local.get(fqdn)
            if local is None or local.link is not link:
                return  # an older, superseded connection
            await self._offline_locked(fqdn, local, cause=cause)

    def _forget_local(self, fqdn: str) -> None:
        local = self._local.pop(fqdn, None)
        self._handovers.pop(fqdn, None)
        if local is not None:
            self._by_vip.pop(local.lease.ipv4, None)
            self._by_vip.pop(local.lease.ipv6, None)
        self.metrics.connected.set(len(self._local))

    async def _went_offline(
        self, fqdn: str, local: LocalNode, *, cause: str, keep_routes: bool = False
    ) -> None:
        async with self._node_lock(fqdn):
            if self._local.get(fqdn) is not local:
                return  # gone already, or registered again meanwhile
            await self._offline_locked(fqdn, local, cause=cause, keep_routes=keep_routes)

    async def _offline_locked(
        self, fqdn: str, local: LocalNode, *, cause: str, keep_routes: bool = False
    ) -> None:
        """Forget the node here; if this replica still held it, mark it offline and (unless
        ``keep_routes``: this replica is shutting down) end its routes, telling the peers."""
        self._forget_local(fqdn)
        if not await self.presence.release(fqdn, self.replica_id):
            return  # another replica holds the node now: it is not offline
        await self.nodes.set_offline(local.node_id, replica=self.replica_id, now=datetime.now(UTC))
        self.metrics.offline.labels(cause=cause).inc()
        log.info("offline", fqdn=fqdn, cause=cause)
        if keep_routes:
            return  # they lapse by TTL unless the node comes back (route store refresh)
        for route in await self.routes.for_node(fqdn):
            await self._remove_route(route)
            peer = route.peer_of(fqdn)
            notice = _envelope(peer_offline=pb.PeerOffline(fqdn=fqdn, route_id=route.route_id))
            with contextlib.suppress(CyphonicError):
                await self.deliver(peer, notice, kind="peer_offline")

    # ------------------------------------------------------------------ periodic jobs

    async def refresh_presence(self) -> None:
        """Refresh presence and route TTLs of local nodes, and now and then their last-seen
        times: one Redis script each for presence and routes, one registry statement, for all
        the nodes held here (a node's own keepalives write nothing)."""
        if not self._local:
            return
        fqdns = list(self._local)
        restored = await self.presence.refresh(fqdns, self.replica_id, self.offline_timeout_s)
        for route_id, route in list(self._decided.by_id.items()):
            if route.initiator not in self._local:
                self._decided.pop(route_id)  # gone from here; its new replica decides anew
        if restored and self._decided:
            # Presence had to be re-created: the shared state was lost (a Redis restart).
            # Put back the routes decided here whose two nodes are present again.
            back = await self.routes.restore(list(self._decided.by_id.values()))
            log.warning("routes_restored", replica=self.replica_id, count=back)
        # After presence: a route is kept alive only while both of its nodes are present.
        await self.routes.refresh(fqdns)
        now = self.monotonic()
        if self._touched_at is not None and now - self._touched_at < self.last_seen_interval_s:
            return
        self._touched_at = now
        await self.nodes.touch(
            [n.node_id for n in self._local.values()],
            replica=self.replica_id,
            now=datetime.now(UTC),
        )

    def revocations_changed(self) -> None:
        """A revocation may be in the registry (the AS's watch said so): poll it now."""
        self._revocation_wake.set()

    def policy_changed(self) -> None:
        """The policy or the node list may have changed: sync it now (``MIN_WAKE_GAP_S``)."""
        self._policy_wake.set()

    def _registry_revoked(self) -> None:
        self._revocation_wake.set()
        for hook in self.revocation_hooks:
            try:
                hook()
            except Exception as exc:
                log.warning("revocation_hook_failed", error=repr(exc))

    async def poll_revocations(self) -> None:
        """Disconnect local nodes whose certificate (or node) was revoked.

        Reads the registry by id cursor, page after page, plus ids it passed that may have
        committed late (``cyphonic_nms.revocations``): no revocation is missed however many
        arrive at once and whatever the AS's clock says.
        """
        now = self.monotonic()
        gaps = self._revocations.pending_gaps(now)
        if gaps:
            late = await self.nodes.revocations_by_ids(gaps)
            self._revocations.filled(e.cursor for e in late)
            await self._apply_revocations(late)
        while True:
            page = await self.nodes.revocations_after(
                self._revocations.cursor, limit=REVOCATION_PAGE
            )
            self._revocations.advance([e.cursor for e in page], now)
            await self._apply_revocations(page)
            if len(page) < REVOCATION_PAGE:
                return

    async def _apply_revocations(self, events: list[RevocationEvent]) -> None:
        for event in events:
            local = self._local.get(event.fqdn)
            if local is None:
                continue
            if not await self.nodes.is_revoked(event.fqdn, local.link.serial_hex):
                continue  # an old certificate of the node, not the one it uses
            await self.revoke_local(event.fqdn, reason=event.reason, serial=event.serial)

    async def revoke_local(self, fqdn: str, *, reason: str, serial: str | None) -> None:
        """Tell a local node it is revoked, then cut it off."""
        local = self._local.get(fqdn)
        if local is None:
            return
        notice = _envelope(
            revocation_notice=pb.RevocationNotice(
                fqdn=fqdn, serial_hex=serial or local.link.serial_hex, reason=reason
            )
        )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(local.link.push(notice), 1.0)
        local.link.close(Revoked(f"{fqdn} was revoked: {reason}"))
        log.warning("revoked_node_disconnected", fqdn=fqdn, reason=reason)
        await self._went_offline(fqdn, local, cause="revoked")

    # ------------------------------------------------------------------ delivery

    async def deliver(self, fqdn: str, envelope: pb.Envelope, *, kind: str) -> None:
        """Push ``envelope`` to ``fqdn`` wherever it is connected; ``PeerOffline`` if nowhere."""
        local = self._local.get(fqdn)
        if local is not None:
            await local.link.push(envelope)
            self.metrics.pushes.labels(kind=kind, via="local").inc()
            return
        holder = await self.presence.holder(fqdn)
        if holder is None or holder == self.replica_id:
            raise PeerOffline(f"{fqdn} is offline")
        await self.bus.publish(
            holder, BusMessage(op="push", fqdn=fqdn, payload=envelope.SerializeToString())
        )
        self.metrics.pushes.labels(kind=kind, via="bus").inc()

    async def _remove_route(self, route: RouteRecord) -> None:
        await self.routes.remove(route)
        self._decided.pop(route.route_id)

    def _observed_push(self, fqdn: str, envelope: pb.Envelope) -> None:
        """Keep ``_decided`` in step with routes ended or replaced by another replica."""
        body = envelope.WhichOneof("body")
        if body == "peer_offline":
            self._decided.pop(envelope.peer_offline.route_id)
        elif body == "route_direction":
            direction = envelope.route_direction
            self._decided.forget_pair(fqdn, direction.peer_fqdn, keep=direction.route_id)

    async def _on_bus(self, message: BusMessage) -> None:
        local = self._local.get(message.fqdn)
        if local is None:
            log.info("bus_node_not_here", fqdn=message.fqdn, op=message.op)
            return
        if message.op == "push":
            envelope = pb.Envelope()
            envelope.ParseFromString(message.payload)
            self._observed_push(message.fqdn, envelope)
            await local.link.push(envelope)
        elif message.op == "kick":
            local.link.close(Unavailable(message.reason or "disconnected by another replica"))
            self._forget_local(message.fqdn)

    # ------------------------------------------------------------------ routes

    async def _peer(self, request: pb.RouteRequest) -> tuple[str, Lease, NetworkInfo]:
        """The requested peer's FQDN, lease and network; local nodes need no database."""
        which = request.WhichOneof("peer")
        if which == "fqdn":
            fqdn = request.fqdn.lower().rstrip(".")
            local = self._local.get(fqdn)
            if local is not None:
                return fqdn, local.lease, local.network
            view = await self.nodes.view(fqdn)
            label = request.fqdn
        elif which == "virtual_address":
            try:
                address = ip_address(request.virtual_address)
            except ValueError as exc:
                raise InvalidArgument("virtual_address must be 4 or 16 bytes") from exc
            local_fqdn = self._by_vip.get(address)
            local = self._local.get(local_fqdn) if local_fqdn else None
            if local is not None and local_fqdn is not None:
                return local_fqdn, local.lease, local.network
            view = await self.nodes.view_by_virtual(address)
            label = str(address)
        else:
            raise InvalidArgument("RouteRequest names no peer")
        if view is None or view.state == NodeState.REVOKED.value:
            raise NotFound(f"no node {label}")
        # Held by another replica (or by none: offline).
        holder = await self.presence.holder(view.fqdn)
        if holder is None or holder == self.replica_id or not view.online:
            raise PeerOffline(f"{view.fqdn} is offline")
        if view.network is None or view.lease is None:
            raise PeerOffline(f"{view.fqdn} has not registered")
        return view.fqdn, view.lease, view.network

    async def route(self, link: NodeLink, request: pb.RouteRequest) -> pb.RouteResponse:
        """Decide the route from ``link``'s node to the requested peer and push it to both."""
        started = time.perf_counter()
        try:
            response = await self._route(link, request)
        except CyphonicError as exc:
            self.metrics.route_errors.labels(code=exc.code_name).inc()
            raise
        self.metrics.route_seconds.observe(time.perf_counter() - started)
        return response

    async def _route(self, link: NodeLink, request: pb.RouteRequest) -> pb.RouteResponse:
        me = self.require_registered(link)
        fqdn = link.fqdn.lower()
        peer_fqdn, peer_lease, peer_network = await self._peer(request)
        if peer_fqdn == fqdn:
            raise InvalidArgument("a node cannot route to itself")
        await self._check_policy(fqdn, peer_fqdn, by_name=request.WhichOneof("peer") == "fqdn")
        decision = decide(me.network, peer_network)
        route = await self._establish(
            initiator=fqdn,
            initiator_lease=me.lease,
            responder=peer_fqdn,
            responder_lease=peer_lease,
            decision=decision,
            networks=(me.network, peer_network),
        )
        self.metrics.routes.labels(pattern=str(int(decision.pattern))).inc()
        return pb.RouteResponse(
            route_id=route.route_id,
            pattern=int(decision.pattern),  # type: ignore[arg-type]
            peer_fqdn=peer_fqdn,
            peer_virtual_ipv4=peer_lease.ipv4.packed,
            peer_virtual_ipv6=peer_lease.ipv6.packed,
        )

    async def _check_policy(self, fqdn: str, peer: str, *, by_name: bool) -> None:
        """``PolicyDenied`` unless the policy allows a route from ``fqdn`` to ``peer``.

        A name lookup (``by_name``) needs a rule letting ``fqdn`` start traffic to ``peer``:
        the node asked for the peer's address to talk to it. A packet to the peer's virtual
        address (say, a reply after the tunnel idled out) needs traffic allowed either way.
        """
        if self.access is None or self.access.policy.allow_all:
            return
        if not (self.access.knows(fqdn) and self.access.knows(peer)):
            await self.access.refresh()  # a node enrolled since the last load: its tags
        allowed = (
            self.access.reachable(fqdn, peer) if by_name else self.access.route_allowed(fqdn, peer)
        )
        if not allowed:
            raise PolicyDenied(f"the access policy allows no traffic from {fqdn} to {peer}")

    # ------------------------------------------------------------------ access policy

    async def sync_policy(self, *, force: bool = False) -> None:
        """Bring the policy up to date; push changed filters to local nodes and withdraw the
        routes of local nodes that the policy no longer allows (both nodes are told)."""
        if self.access is None:
            return
        async with self._policy_lock:
            changed = await self.access.refresh(force=force)
            # Unchanged rules and nodes: only nodes whose filter never got through (not a
            # walk over every node held).
            due = self._local if changed or force else self._filters_due
            todo = [(fqdn, local) for fqdn in list(due) if (local := self._local.get(fqdn))]
            self._filters_due.intersection_update(self._local)
            for fqdn, local in todo:
                if self._local.get(fqdn) is local:
                    await self._push_compiled(fqdn, local)
            if changed:
                await self._withdraw_forbidden_routes()

    async def _push_filter(self, fqdn: str) -> None:
        """Push a node that just registered its filter from what is loaded now (the peers'
        filters, which may name its new addresses, follow on the next ``sync_policy``)."""
        assert self.access is not None
        async with self._policy_lock:
            if self.access.revision == 0 and self.access.stored is None:
                await self.access.refresh()
            local = self._local.get(fqdn)
            if local is not None:
                await self._push_compiled(fqdn, local)

    async def _push_compiled(self, fqdn: str, local: LocalNode) -> None:
        """Push ``fqdn``'s filter unless it already has this one; a failure leaves it due."""
        assert self.access is not None
        compiled = self.access.compile_for(fqdn)
        if self._pushed_filters.get(fqdn) == compiled:
            self._filters_due.discard(fqdn)
            return
        try:
            await local.link.push(_envelope(policy_filter=filter_to_pb(compiled)))
        except Exception as exc:
            log.info("policy_push_failed", fqdn=fqdn, error=str(exc))
            self._filters_due.add(fqdn)
            return
        self._pushed_filters[fqdn] = compiled
        self._filters_due.discard(fqdn)
        self.metrics.pushes.labels(kind="policy_filter", via="local").inc()

    async def _withdraw_forbidden_routes(self) -> None:
        assert self.access is not None
        for fqdn in list(self._local):
            for route in await self.routes.for_node(fqdn):
                if self.access.route_allowed(route.initiator, route.responder):
                    continue
                await self._remove_route(route)
                log.info(
                    "route_withdrawn_by_policy",
                    route_id=route.route_id,
                    initiator=route.initiator,
                    responder=route.responder,
                )
                for side in (route.initiator, route.responder):
                    notice = pb.PeerOffline(
                        fqdn=route.peer_of(side), route_id=route.route_id, reason="policy"
                    )
                    with contextlib.suppress(CyphonicError):
                        await self.deliver(side, _envelope(peer_offline=notice), kind="withdraw")

    async def _establish(
        self,
        *,
        initiator: str,
        initiator_lease: Lease,
        responder: str,
        responder_lease: Lease,
        decision: RouteDecision,
        route_id: str | None = None,
        networks: tuple[NetworkInfo, NetworkInfo] | None = None,
    ) -> RouteRecord:
        route_id = route_id or secrets.token_hex(8)
        reason = (
            explain(
                pattern=int(decision.pattern),
                family=int(decision.family) if decision.family is not None else None,
                initiator=initiator,
                responder=responder,
                initiator_net=networks[0],
                responder_net=networks[1],
            )
            if networks is not None
            else None
        )
        relay: pb.RelayDirection | None = None
        trs_replica: str | None = None
        if decision.pattern is Pattern.RELAY:
            trs = pick(await self.trs.live(), route_id)
            if trs is None:
                raise Unavailable("no TRS replica is registered; relayed routes are impossible")
            trs_replica = trs.replica_id
            token = relay_token.issue(
                route_id=route_id,
                initiator_fqdn=initiator,
                responder_fqdn=responder,
                secret=self.relay_secret,
                now_ms=self.wall_ms(),
                lifetime_ms=int(self.relay_token_lifetime_s * 1000),
            )
            relay = pb.RelayDirection(
                trs=[_endpoint_pb(ep) for ep in trs.endpoints],
                trs_server_name=trs.server_name,
                allocation_token=token,
            )
        record = RouteRecord(
            route_id=route_id,
            initiator=initiator,
            responder=responder,
            pattern=int(decision.pattern),
            family=int(decision.family) if decision.family is not None else None,
            connector=decision.connector.value,
            trs_replica=trs_replica,
            created_ms=self.wall_ms(),
            decided_by=self.replica_id,
        )
        # One active route per pair: the new one replaces the old (one Redis round trip).
        await self.routes.replace(record)
        self._decided.add(record)
        for side, fqdn, peer_fqdn, peer_lease in (
            (Side.RESPONDER, responder, initiator, initiator_lease),
            (Side.INITIATOR, initiator, responder, responder_lease),
        ):
            direction = pb.RouteDirection(
                route_id=route_id,
                pattern=int(decision.pattern),  # type: ignore[arg-type]
                role=(
                    pb.ROUTE_ROLE_CONNECT if decision.connector is side else pb.ROUTE_ROLE_ACCEPT
                ),
                peer_fqdn=peer_fqdn,
                peer_virtual_ipv4=peer_lease.ipv4.packed,
                peer_virtual_ipv6=peer_lease.ipv6.packed,
            )
            if decision.connector is side:
                direction.peer_candidates.extend(_endpoint_pb(ep) for ep in decision.candidates)
            if relay is not None:
                direction.relay.CopyFrom(relay)
            if decision.punch is not None:
                peer_seen = decision.punch[1] if side is Side.INITIATOR else decision.punch[0]
                direction.punch.CopyFrom(
                    pb.HolePunch(
                        peer=_endpoint_pb(peer_seen),
                        delay_ms=PUNCH_DELAY_MS,
                        interval_ms=PUNCH_INTERVAL_MS,
                        window_ms=PUNCH_WINDOW_MS,
                    )
                )
            if reason is not None:
                direction.reason_code = reason.code
                direction.reason = reason.text
            try:
                await self.deliver(
                    fqdn, _envelope(route_direction=direction), kind="route_direction"
                )
            except PeerOffline:
                await self._remove_route(record)
                raise
        log.info(
            "route",
            route_id=route_id,
            initiator=initiator,
            responder=responder,
            pattern=int(decision.pattern),
            connector=decision.connector.value,
        )
        return record

    async def relay_cids(self, link: NodeLink, message: pb.RelayCids) -> pb.RelayCids:
        """Forward a node's TRS-assigned CIDs to the other node of the relayed route.

        Refused: a node that did not register (``PermissionDenied``), bad sizes
        (``InvalidArgument``), an unknown route (``NotFound``), a route the sender is not on
        (``PermissionDenied``) or that is not relayed (``InvalidArgument``); a peer that is
        not connected anywhere is ``PeerOffline``. The answer echoes what was forwarded.
        """
        self.require_registered(link)
        fqdn = link.fqdn.lower()
        route_id = message.route_id
        if not route_id or len(route_id) > MAX_ROUTE_ID_LEN:
            raise InvalidArgument(f"route_id must have 1..{MAX_ROUTE_ID_LEN} characters")
        cids = list(message.connection_ids)
        if not 0 < len(cids) <= MAX_RELAY_CIDS:
            raise InvalidArgument(f"RelayCids must carry 1..{MAX_RELAY_CIDS} connection IDs")
        if any(not MIN_CID_LEN <= len(c) <= MAX_CID_LEN for c in cids):
            raise InvalidArgument(f"a relay connection ID has {MIN_CID_LEN}..{MAX_CID_LEN} bytes")
        if len(set(cids)) != len(cids):
            raise InvalidArgument("RelayCids repeats a connection ID")
        route = await self.routes.get(route_id)
        if route is None:
            raise NotFound(f"no active route {route_id}")
        if not route.involves(fqdn):
            raise PermissionDenied(f"{fqdn} is not a node of route {route_id}")
        if route.pattern != int(Pattern.RELAY):
            raise InvalidArgument(f"route {route_id} is not relayed (pattern {route.pattern})")
        peer = route.peer_of(fqdn)
        forwarded = pb.RelayCids(route_id=route_id, connection_ids=cids)
        await self.deliver(peer, _envelope(relay_cids=forwarded), kind="relay_cids")
        log.info("relay_cids_forwarded", route_id=route_id, sender=fqdn, peer=peer, cids=len(cids))
        return forwarded

    async def _redirect_routes(self, fqdn: str, *, moved: bool = True) -> None:
        """Re-decide the routes of a node whose network changed and push them to both nodes:
        under the same route id where the connection can migrate (``survives_move``), else
        under a new id, which makes both nodes drop the old tunnel and build the new one."""
        try:
            for route in await self.routes.for_node(fqdn):
                a = await self._network_of(route.initiator)
                b = await self._network_of(route.responder)
                la = await self._lease_of(route.initiator)
                lb = await self._lease_of(route.responder)
                if a is None or b is None or la is None or lb is None:
                    continue
                decision = decide(a, b)
                keep = not moved or survives_move(route, decision, fqdn)
                record = await self._establish(
                    initiator=route.initiator,
                    initiator_lease=la,
                    responder=route.responder,
                    responder_lease=lb,
                    decision=decision,
                    route_id=route.route_id if keep else None,
                    networks=(a, b),
                )
                log.info(
                    "route_redirected",
                    fqdn=fqdn,
                    old_route_id=route.route_id,
                    route_id=record.route_id,
                    old_pattern=route.pattern,
                    pattern=record.pattern,
                    rebuilt=not keep,
                )
        except CyphonicError as exc:
            log.info("redirect_failed", fqdn=fqdn, error=exc.message)

    async def _network_of(self, fqdn: str) -> NetworkInfo | None:
        local = self._local.get(fqdn)
        if local is not None:
            return local.network
        view = await self.nodes.view(fqdn)
        return view.network if view is not None else None

    async def _lease_of(self, fqdn: str) -> Lease | None:
        local = self._local.get(fqdn)
        if local is not None:
            return local.lease
        view = await self.nodes.view(fqdn)
        return view.lease if view is not None else None


def parse_virtual(text: str) -> IPv4Address | IPv6Address:
    """A virtual address from text; ``InvalidArgument`` if it is not one."""
    try:
        return ip_address(text)
    except ValueError as exc:
        raise InvalidArgument(f"not an IP address: {text!r}") from exc
