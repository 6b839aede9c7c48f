"""The agent's routes to its peers, sans-I/O: what to ask the NMS, what to connect, whom to
accept, and when to give up. Time is passed in; the asyncio glue lives in ``agent.py``.

One ``PeerRoute`` per peer FQDN, through these states::

    (none) --lookup / TUN miss--> REQUESTED --RouteDirection CONNECT--> CONNECTING --+
                                      |                                              |
                                      +----RouteDirection ACCEPT--> AWAITING_PEER ---+--> UP
    UP --tunnel lost / PeerOffline--> (none): the next packet or lookup starts again
    REQUESTED / CONNECTING / AWAITING_PEER past ``setup_timeout`` --> (none), failed

A RouteDirection may also arrive unasked (the peer asked for the route); it creates the
route in CONNECTING or AWAITING_PEER. A direction with a new route id replaces the route
(the NMS keeps one route per pair, the newest); the same route id while the tunnel is up is
a re-direction after a move, which QUIC migration already covers.

Requests that failed (unknown name, peer offline, NMS unreachable) are held down for
``hold_down`` seconds, so a stream of packets to a dead address does not become a stream of
RouteRequests.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cyphonic.hostport import format_host_port
from cyphonic.v1 import signalling_pb2 as pb

T = TypeVar("T")
"""The glue's tunnel type: what a route holds while UP (opaque to this module)."""

PATTERN_NAMES: dict[int, str] = {
    pb.ROUTE_PATTERN_DIRECT: "direct",
    pb.ROUTE_PATTERN_NAT_CONNECTS: "nat_connects",
    pb.ROUTE_PATTERN_RELAY: "relay",
}


def pattern_name(pattern: int) -> str:
    """``direct``, ``nat_connects``, ``relay`` or ``-``, as ``cyphonic-agent status`` shows."""
    return PATTERN_NAMES.get(pattern, "-")


def address_text(raw: bytes) -> str:
    """A raw 4/16-byte address as text."""
    return str(ipaddress.ip_address(raw))


class RouteState(enum.Enum):
    """Where a route to one peer stands."""

    REQUESTED = "requested"
    """RouteRequest sent; no RouteDirection yet."""
    CONNECTING = "connecting"
    """Told to connect: trying the peer's candidates."""
    AWAITING_PEER = "awaiting_peer"
    """Told to accept: waiting for the peer's connection."""
    UP = "up"
    """The tunnel carries packets."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A real address of the peer to try, as the NMS gave it."""

    host: str
    port: int

    @classmethod
    def from_pb(cls, endpoint: pb.Endpoint) -> Candidate:
        """From the wire form (raw 4/16-byte address)."""
        return cls(address_text(endpoint.ip), int(endpoint.port))

    @property
    def family(self) -> int:
        """4 or 6."""
        return ipaddress.ip_address(self.host).version

    def __str__(self) -> str:
        return format_host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Relay:
    """Where a pattern-3 route is relayed (from the RouteDirection)."""

    trs: tuple[Candidate, ...]
    server_name: str
    token: bytes


@dataclass(frozen=True, slots=True)
class Punch:
    """Hole punching for a relayed route (from the RouteDirection): the peer's observed
    address and the schedule (``punch.HolePunchPlan``)."""

    peer: Candidate
    delay_s: float
    interval_s: float
    window_s: float

    @classmethod
    def from_pb(cls, msg: pb.HolePunch) -> Punch:
        return cls(
            peer=Candidate.from_pb(msg.peer),
            delay_s=min(msg.delay_ms, 10_000) / 1000,
            interval_s=max(min(msg.interval_ms, 5_000), 20) / 1000,
            window_s=min(msg.window_ms, 30_000) / 1000,
        )


@dataclass(slots=True)
class PeerRoute(Generic[T]):
    """The route to one peer."""

    fqdn: str
    state: RouteState
    since: float
    """When the route entered its current state."""
    addresses: frozenset[bytes] = frozenset()
    """The peer's virtual addresses (raw), once known."""
    route_id: str = ""
    pattern: int = pb.ROUTE_PATTERN_UNSPECIFIED
    role: int = pb.ROUTE_ROLE_UNSPECIFIED
    candidates: tuple[Candidate, ...] = ()
    relay: Relay | None = None
    tunnel: T | None = None
    """The glue's tunnel object while UP (opaque here)."""
    attempts: int = 0
    """Connection attempts made for this route id."""
    punch: Punch | None = None
    reason_code: str = ""
    reason: str = ""
    """Why the NMS chose this pattern, in words (``cyphonic_nms.route_reason``)."""

    @property
    def pattern_name(self) -> str:
        return pattern_name(self.pattern)


@dataclass(frozen=True, slots=True)
class Connect(Generic[T]):
    """Action: open the end-to-end connection to ``route``'s peer."""

    route: PeerRoute[T]


@dataclass(frozen=True, slots=True)
class Accept(Generic[T]):
    """Action: accept the peer's connection for ``route`` (nothing to send)."""

    route: PeerRoute[T]


@dataclass(frozen=True, slots=True)
class Keep(Generic[T]):
    """Action: nothing changes (a re-direction of the route already up)."""

    route: PeerRoute[T]


Action = Connect[T] | Accept[T] | Keep[T]


@dataclass(slots=True)
class RouteStats:
    """Counters of the route table."""

    requested: int = 0
    directed: int = 0
    replaced: int = 0
    up: int = 0
    down: int = 0
    failed: int = 0
    held_down: int = 0
    """Route requests suppressed because the same target failed moments ago."""


@dataclass
class RouteTable(Generic[T]):
    """Routes to peers, by FQDN and by virtual address; ``T`` is the glue's tunnel type."""

    setup_timeout: float = 15.0
    hold_down: float = 2.0
    stats: RouteStats = field(default_factory=RouteStats)
    on_addresses: Callable[[str, frozenset[bytes], frozenset[bytes]], None] | None = None
    """Told (peer FQDN, virtual addresses added, removed) whenever the table learns or
    forgets a peer's addresses, before anyone is answered (the agent installs host routes
    for peers the TUN's prefixes do not carry, ``overlay_routes``)."""
    _by_fqdn: dict[str, PeerRoute[T]] = field(default_factory=dict)
    _by_address: dict[bytes, str] = field(default_factory=dict)
    _held: dict[str | bytes, float] = field(default_factory=dict)

    # -- lookups

    def get(self, fqdn: str) -> PeerRoute[T] | None:
        """The route to ``fqdn`` (lower case, no trailing dot), if any."""
        return self._by_fqdn.get(fqdn)

    def for_address(self, address: bytes) -> PeerRoute[T] | None:
        """The route whose peer holds virtual ``address``, if any."""
        fqdn = self._by_address.get(address)
        return self._by_fqdn.get(fqdn) if fqdn is not None else None

    def routes(self) -> list[PeerRoute[T]]:
        """Every route, in no particular order."""
        return list(self._by_fqdn.values())

    def may_accept(self, fqdn: str) -> PeerRoute[T] | None:
        """The route a connection from node ``fqdn`` would serve, or None (refuse it).

        Only a peer the NMS directed to this node, with this node accepting, may connect.
        """
        route = self._by_fqdn.get(fqdn)
        if route is None or route.role != pb.ROUTE_ROLE_ACCEPT:
            return None
        if route.state not in (RouteState.AWAITING_PEER, RouteState.UP):
            return None
        return route

    # -- requests

    def should_request(self, key: str | bytes, *, now: float) -> bool:
        """Whether to send a RouteRequest for ``key`` (an FQDN or a raw virtual address).

        False while a route to that peer exists or the key is held down after a failure.
        """
        route = self._by_fqdn.get(key) if isinstance(key, str) else self.for_address(key)
        if route is not None:
            return False
        until = self._held.get(key)
        if until is not None:
            if now < until:
                self.stats.held_down += 1
                return False
            del self._held[key]
        return True

    def requested(self, fqdn: str, addresses: Iterable[bytes], *, now: float) -> PeerRoute[T]:
        """The NMS answered a RouteRequest for ``fqdn``: note the peer and its addresses.

        The RouteDirection usually arrives before the answer; then this only fills in what
        the direction already said.
        """
        route = self._by_fqdn.get(fqdn)
        if route is None:
            route = PeerRoute(fqdn=fqdn, state=RouteState.REQUESTED, since=now)
            self._by_fqdn[fqdn] = route
            self.stats.requested += 1
        self._set_addresses(route, frozenset(addresses))
        return route

    def is_held(self, key: str | bytes, *, now: float) -> bool:
        """Whether ``key`` is held down after a failure (no side effects)."""
        until = self._held.get(key)
        return until is not None and now < until

    def request_failed(self, key: str | bytes, *, now: float) -> None:
        """A RouteRequest for ``key`` failed: hold the key down for a while."""
        self._held[key] = now + self.hold_down
        self.stats.failed += 1

    # -- directions

    def directed(
        self, direction: pb.RouteDirection, *, now: float
    ) -> tuple[Action[T], PeerRoute[T] | None]:
        """Apply a RouteDirection; returns the action and the route it replaced (to close)."""
        fqdn = direction.peer_fqdn.lower().rstrip(".")
        self.stats.directed += 1
        addresses = frozenset(
            a for a in (direction.peer_virtual_ipv4, direction.peer_virtual_ipv6) if a
        )
        current = self._by_fqdn.get(fqdn)
        if (
            current is not None
            and current.route_id == direction.route_id
            and (current.state is RouteState.UP or current.role == direction.role)
        ):
            # The same route again (a re-direction after a move): the connection under way
            # or up carries on; QUIC migration follows a moved client.
            if direction.peer_candidates:
                current.candidates = tuple(Candidate.from_pb(c) for c in direction.peer_candidates)
            _describe(current, direction)
            return Keep(current), None
        replaced: PeerRoute[T] | None = None
        if current is not None and current.route_id and current.route_id != direction.route_id:
            replaced = current
            self.stats.replaced += 1
            self._forget(current)
            current = None
        connect = direction.role == pb.ROUTE_ROLE_CONNECT
        route: PeerRoute[T] = current or PeerRoute(fqdn=fqdn, state=RouteState.REQUESTED, since=now)
        route.route_id = direction.route_id
        route.pattern = int(direction.pattern)
        route.role = int(direction.role)
        route.candidates = tuple(Candidate.from_pb(c) for c in direction.peer_candidates)
        route.relay = (
            Relay(
                trs=tuple(Candidate.from_pb(c) for c in direction.relay.trs),
                server_name=direction.relay.trs_server_name,
                token=bytes(direction.relay.allocation_token),
            )
            if direction.HasField("relay")
            else None
        )
        _describe(route, direction)
        route.state = RouteState.CONNECTING if connect else RouteState.AWAITING_PEER
        route.since = now
        route.attempts = 0
        route.tunnel = None
        self._by_fqdn[fqdn] = route
        self._set_addresses(route, addresses)
        return (Connect(route) if connect else Accept(route)), replaced

    # -- tunnels

    def tunnel_up(self, route: PeerRoute[T], tunnel: T, *, now: float) -> PeerRoute[T] | None:
        """The tunnel of ``route`` carries packets; returns the route it supersedes, if any."""
        if self._by_fqdn.get(route.fqdn) is not route:
            return None  # replaced meanwhile: the caller closes this tunnel
        route.state = RouteState.UP
        route.since = now
        route.tunnel = tunnel
        self.stats.up += 1
        return route

    def is_current(self, route: PeerRoute[T]) -> bool:
        """Whether ``route`` is still the route to its peer (not replaced or torn down)."""
        return self._by_fqdn.get(route.fqdn) is route

    def tear_down(self, route: PeerRoute[T]) -> bool:
        """Remove ``route`` (its tunnel was lost, its peer went offline); False if already gone.

        No hold-down: the next packet or lookup may ask for a new route at once.
        """
        if self._by_fqdn.get(route.fqdn) is not route:
            return False
        self._forget(route)
        self.stats.down += 1
        return True

    def fail(self, route: PeerRoute[T], *, now: float) -> bool:
        """Route set-up failed (no candidate answered...): remove it and hold its peer down."""
        if not self.tear_down(route):
            return False
        self._held[route.fqdn] = now + self.hold_down
        for address in route.addresses:
            self._held[address] = now + self.hold_down
        self.stats.failed += 1
        return True

    def expire(self, *, now: float) -> list[PeerRoute[T]]:
        """Routes stuck in set-up past ``setup_timeout``: removed, held down, returned."""
        stuck = [
            r
            for r in self._by_fqdn.values()
            if r.state is not RouteState.UP and now - r.since > self.setup_timeout
        ]
        for route in stuck:
            self.fail(route, now=now)
        for key in [k for k, until in self._held.items() if until <= now]:
            del self._held[key]
        return stuck

    # -- internals

    def _set_addresses(self, route: PeerRoute[T], addresses: frozenset[bytes]) -> None:
        if not addresses or addresses == route.addresses:
            return
        for old in route.addresses - addresses:
            if self._by_address.get(old) == route.fqdn:
                del self._by_address[old]
        if self.on_addresses is not None:
            self.on_addresses(route.fqdn, addresses - route.addresses, route.addresses - addresses)
        route.addresses = addresses
        for address in addresses:
            self._by_address[address] = route.fqdn
            self._held.pop(address, None)
        self._held.pop(route.fqdn, None)

    def _forget(self, route: PeerRoute[T]) -> None:
        self._by_fqdn.pop(route.fqdn, None)
        for address in route.addresses:
            if self._by_address.get(address) == route.fqdn:
                del self._by_address[address]
        if self.on_addresses is not None and route.addresses:
            self.on_addresses(route.fqdn, frozenset(), route.addresses)


def _describe(route: PeerRoute[T], direction: pb.RouteDirection) -> None:
    """The direction's reason and hole punching, on the route."""
    route.reason_code = direction.reason_code[:64]
    route.reason = direction.reason[:300]
    punch = direction.punch if direction.HasField("punch") else None
    ok = punch is not None and len(punch.peer.ip) in (4, 16) and 0 < punch.peer.port < 65536
    route.punch = Punch.from_pb(punch) if ok and punch is not None else None
