"""The agent's control policy, sans-I/O: when to log in, how long to back off, whether to ask
the NMS for a route, when to try a peer again, when to reverse a route, what a move means.

Like ``routes.RouteTable`` (which it drives) and aioquic's ``QuicConnection``: the current
time and every outcome are passed in, decisions come out as values; the asyncio glue in
``agent.py`` performs them (dial, send, sleep, open the TUN). Nothing here imports asyncio.

    NMS link      Reconnect: login first or dial the NMS; after a loss, back off
                  0.5 s * 2**n (capped, jitter 0.8-1.2), or at once after a move; the
                  first pause after losing a registered connection is spread over
                  0..RECONNECT_SPREAD_S (a dead replica's nodes do not all come back in
                  the same half second); an NMS's retry-after (Overloaded) is the pause;
                  give up only before the first registration
    route asks    RouteRequests: one RouteRequest per target at a time (Join the one in
                  flight), none while a route exists (Known) or the target is held down
                  after a failure (Refused / NoSuchPeer)
    connecting    ConnectPlan: candidates in order; a peer that refused us as not (yet)
                  directed is tried again after ACCEPT_RETRY_S pauses
    reversal      Reversals: a direct route we accept whose peer stays silent is asked for
                  from this side (at most once per REVERSE_QUIET_S per peer)
    mobility      on_move(): rotate connection IDs, probe, re-register or reconnect
    bring-up      OverlayPlan.from_registration(): TUN addresses, the node's own overlay
                  networks, which TUN misses are worth a RouteRequest
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic

from cyphonic.errors import (
    CyphonicError,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    Unavailable,
)
from cyphonic.v1 import signalling_pb2 as pb

from cyphonic_agent.routes import Candidate, PeerRoute, RouteState, RouteTable, T, address_text

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
BACKOFF_BASE_S = 0.5
BACKOFF_JITTER = (0.8, 1.2)
RECONNECT_SPREAD_S = 5.0
"""The first pause after losing a registered NMS connection is uniform in [0, this): when an
NMS replica dies or drains, its nodes reconnect spread out (full jitter), not in a herd."""
RETRY_AFTER_JITTER = (1.0, 1.5)
"""An Overloaded refusal's retry-after is stretched by this factor, so that the nodes an NMS
turned away together do not return together."""

Jitter = Callable[[float, float], float]
"""``random.uniform``-shaped: a factor in ``[low, high]`` (tests pass a fixed one)."""

RouteKey = str | bytes
"""A route request's target: a peer FQDN, or a raw 4/16-byte virtual address."""


# --------------------------------------------------------------------------- NMS link


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Decision: stop the agent (never registered within ``give_up_after_s``)."""

    error: CyphonicError


@dataclass
class Reconnect:
    """The control loop's policy: login or dial, and the pause after a loss."""

    max_delay_s: float
    give_up_after_s: float = 0.0
    """Before the first registration only; 0 = never."""
    jitter: Jitter = random.uniform
    failures_before_login: int = NMS_FAILURES_BEFORE_LOGIN
    nms_endpoints: list[Candidate] = field(default_factory=list)
    """Where the NMS is, as the last login said."""
    nms_failures: int = 0
    """Dials to the known NMS endpoints that failed since the last success."""
    attempt: int = 0
    """Losses since the last successful registration."""
    registered_once: bool = False
    reconnect_now: bool = False
    """We closed the NMS connection ourselves after a move: no pause."""
    _first_attempt: float | None = None

    def needs_login(self) -> bool:
        """Whether to ask the AS (again) before dialling the NMS."""
        return not self.nms_endpoints or self.nms_failures >= self.failures_before_login

    def logged_in(self, endpoints: Iterable[Candidate]) -> None:
        self.nms_endpoints = list(endpoints)
        self.nms_failures = 0
        if not self.nms_endpoints:
            raise Unavailable("the AS named no NMS endpoint (set NMS_ENDPOINTS at the AS)")

    def dial_failed(self) -> None:
        self.nms_failures += 1

    def dialled(self) -> None:
        self.nms_failures = 0

    def registered(self) -> None:
        self.attempt = 0
        self.registered_once = True

    def started(self, *, now: float) -> None:
        """The control loop begins (the give-up clock starts)."""
        if self._first_attempt is None:
            self._first_attempt = now

    def lost(self, error: CyphonicError, *, now: float) -> float | GiveUp:
        """The attempt or the connection failed with ``error``: seconds to pause, or GiveUp."""
        self.started(now=now)
        assert self._first_attempt is not None
        if (
            not self.registered_once
            and self.give_up_after_s
            and now - self._first_attempt >= self.give_up_after_s
        ):
            return GiveUp(error)
        if isinstance(error, Overloaded):
            # The NMS answered and named when to come back: that is the pause, however
            # often it refused (it paces a storm by its own backlog); doubling on top put
            # the last nodes of a 5,000-node storm 16-30 s away from a free replica.
            self.reconnect_now = False
            return min(self.max_delay_s, error.retry_after_s * self.jitter(*RETRY_AFTER_JITTER))
        delay: float
        if self.registered_once and self.attempt == 0:
            delay = min(self.max_delay_s, RECONNECT_SPREAD_S) * float(self.jitter(0.0, 1.0))
        else:
            delay = min(self.max_delay_s, BACKOFF_BASE_S * 2.0 ** min(self.attempt, 10))
            delay *= float(self.jitter(*BACKOFF_JITTER))
        if self.reconnect_now:
            delay = 0.0
        self.reconnect_now = False
        self.attempt += 1
        return delay


# --------------------------------------------------------------------------- route requests


@dataclass(frozen=True, slots=True)
class Ask:
    """Decision: send a RouteRequest for ``key`` (then ``answered`` or ``failed``)."""

    key: RouteKey


@dataclass(frozen=True, slots=True)
class Join:
    """Decision: a request for ``key`` is in flight; wait for its outcome."""

    key: RouteKey


@dataclass(frozen=True, slots=True)
class Known(Generic[T]):
    """Decision: a route exists already."""

    route: PeerRoute[T]


@dataclass(frozen=True, slots=True)
class NoSuchPeer:
    """Decision: the NMS said moments ago that there is no such node."""


@dataclass(frozen=True, slots=True)
class Refused:
    """Decision: held down after a failure; raise ``error``."""

    error: CyphonicError


RequestDecision = Ask | Join | Known[T] | NoSuchPeer | Refused


@dataclass
class RouteRequests(Generic[T]):
    """One RouteRequest per target at a time, none for a target held down after a failure."""

    routes: RouteTable[T]
    in_flight: set[RouteKey] = field(default_factory=set)
    failures: dict[RouteKey, CyphonicError] = field(default_factory=dict)
    """Why each held-down key failed (kept only while it is held)."""
    asked: dict[str, float] = field(default_factory=dict)
    """When this node last had an answer to its own request for each peer."""

    def begin(self, key: RouteKey, *, now: float, force: bool = False) -> RequestDecision[T]:
        """What to do about a wish for a route to ``key``; ``force``: ask even though a
        route exists (the NMS will replace it)."""
        if key in self.in_flight:
            return Join(key)
        if not force and not self.routes.should_request(key, now=now):
            route = self.routes.get(key) if isinstance(key, str) else self.routes.for_address(key)
            if route is not None:
                return Known(route)
            failure = self.failures.get(key)
            if isinstance(failure, NotFound):
                return NoSuchPeer()
            return Refused(failure or Unavailable("route held down after a failure"))
        self.in_flight.add(key)
        return Ask(key)

    def answered(self, key: RouteKey, response: pb.RouteResponse, *, now: float) -> PeerRoute[T]:
        """The NMS answered the request for ``key``."""
        self.in_flight.discard(key)
        route = self.routes.requested(
            response.peer_fqdn.lower(),
            [a for a in (response.peer_virtual_ipv4, response.peer_virtual_ipv6) if a],
            now=now,
        )
        self.failures.pop(key, None)
        self.asked[route.fqdn] = now
        return route

    def failed(self, key: RouteKey, error: CyphonicError, *, now: float) -> None:
        """The request for ``key`` failed (NotFound included): hold it down."""
        self.in_flight.discard(key)
        self.routes.request_failed(key, now=now)
        self.failures[key] = error

    def route_failed(self, route: PeerRoute[T], why: str, *, now: float) -> bool:
        """Setting up ``route`` failed: remove and hold it down; False if already gone."""
        if not self.routes.fail(route, now=now):
            return False
        self.failures[route.fqdn] = Unavailable(f"route to {route.fqdn} failed: {why}")
        return True

    def expire(self, *, now: float) -> None:
        """Forget failures no longer held (a scan of the pool must not grow the map)."""
        for key in [k for k in self.failures if not self.routes.is_held(k, now=now)]:
            del self.failures[key]


# --------------------------------------------------------------------------- connecting


@dataclass(frozen=True, slots=True)
class Attempt:
    """Decision: connect to ``candidate`` (after pausing ``pause`` seconds)."""

    candidate: Candidate
    pause: float = 0.0


@dataclass(frozen=True, slots=True)
class Exhausted:
    """Decision: every candidate failed; the route failed for ``reason``."""

    reason: str


@dataclass
class ConnectPlan:
    """The order and pace of connection attempts for a route we connect."""

    candidates: Sequence[Candidate]
    pauses: Sequence[float] = ACCEPT_RETRY_S
    errors: list[str] = field(default_factory=list)
    _index: int = 0
    _retries: int = 0

    @classmethod
    def for_route(
        cls, route: PeerRoute[T], routable: Callable[[Candidate], bool]
    ) -> ConnectPlan | Exhausted:
        """A plan over the peer's candidates this host has a route to."""
        usable = [c for c in route.candidates if routable(c)]
        if not usable:
            return Exhausted(
                "no candidate address of the peer is routable from here "
                f"({', '.join(map(str, route.candidates)) or 'none'})"
            )
        return cls(usable)

    def first(self) -> Attempt:
        return Attempt(self.candidates[0])

    def failed(self, error: CyphonicError) -> Attempt | Exhausted:
        """The current attempt failed with ``error``: what next."""
        candidate = self.candidates[self._index]
        if isinstance(error, PermissionDenied) and self._retries < len(self.pauses):
            # Refused as not directed: the peer may not have its direction yet.
            pause = self.pauses[self._retries]
            self._retries += 1
            return Attempt(candidate, pause)
        self.errors.append(f"{candidate}: {error.message}")
        self._index += 1
        self._retries = 0
        if self._index >= len(self.candidates):
            return Exhausted("; ".join(self.errors))
        return Attempt(self.candidates[self._index])


# --------------------------------------------------------------------------- reversal


@dataclass
class Reversals:
    """Pattern 1 with an inbound-blocking firewall in front of this node: the NMS (which sees
    no firewalls) told the peer to connect and its packets never arrive. After
    ``after_s`` the route is asked for from this side, so that this node connects out."""

    after_s: float = REVERSE_AFTER_S
    quiet_s: float = REVERSE_QUIET_S
    reversed_at: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def watches(route: PeerRoute[T]) -> bool:
        """Whether an accepted ``route`` is one to check again after ``after_s``."""
        return route.role == pb.ROUTE_ROLE_ACCEPT and route.pattern == pb.ROUTE_PATTERN_DIRECT

    def due(
        self, route: PeerRoute[T], routes: RouteTable[T], asked: dict[str, float], *, now: float
    ) -> bool:
        """Called ``after_s`` after accepting ``route``: whether to reverse it now (noted)."""
        if not routes.is_current(route) or route.state is not RouteState.AWAITING_PEER:
            return False
        for stamp in (asked.get(route.fqdn), self.reversed_at.get(route.fqdn)):
            if stamp is not None and now - stamp < self.quiet_s:
                return False
        self.reversed_at[route.fqdn] = now
        return True


# --------------------------------------------------------------------------- mobility


@dataclass(frozen=True, slots=True)
class MoveDecision:
    """What the glue does after the host's real path changed."""

    rotate: bool
    """Fresh connection IDs on client connections (not already taken when the path was lost)."""
    reregister: bool
    """Register again on the open NMS connection (new addresses, NAT status)."""
    reconnect: bool
    """Close the NMS connection and dial again without pause (its endpoint is unreachable)."""


def on_move(
    *, rotated_on_loss: bool, nms_open: bool, registered: bool, nms_routable: bool
) -> MoveDecision:
    """The handover decision. Client-role connections always probe the new path; the relay
    keepalive always goes out. Without an open, registered NMS connection the control loop
    registers with the new addresses when it connects."""
    rotate = not rotated_on_loss
    if not nms_open or not registered:
        return MoveDecision(rotate=rotate, reregister=False, reconnect=False)
    if not nms_routable:  # e.g. an IPv6 NMS endpoint after a move to IPv4 only
        return MoveDecision(rotate=rotate, reregister=False, reconnect=True)
    return MoveDecision(rotate=rotate, reregister=True, reconnect=False)


# --------------------------------------------------------------------------- bring-up

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class OverlayPlan:
    """The node's overlay side, from its first RegisterResponse."""

    ipv4: ipaddress.IPv4Interface | None
    ipv6: ipaddress.IPv6Interface | None

    @classmethod
    def from_registration(cls, reg: pb.RegisterResponse) -> OverlayPlan:
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
        return cls(ipv4=v4, ipv6=v6)

    @property
    def interfaces(self) -> list[Interface]:
        return [i for i in (self.ipv4, self.ipv6) if i is not None]

    @property
    def own_addresses(self) -> frozenset[bytes]:
        return frozenset(i.ip.packed for i in self.interfaces)

    @property
    def networks(self) -> list[Network]:
        return [i.network for i in self.interfaces]

    def routable(self, destination: bytes) -> bool:
        """Whether a TUN packet to ``destination`` may ask for a route: another node's
        address in our overlay prefixes (not ours, not multicast, not v4 net/broadcast)."""
        ip = ipaddress.ip_address(destination)
        if ip.is_multicast or destination in self.own_addresses:
            return False
        for net in self.networks:
            if ip in net:
                return not (net.version == 4 and ip in (net.network_address, net.broadcast_address))
        return False

    def check_same_lease(self, reg: pb.RegisterResponse) -> None:
        """A later registration must lease the same addresses (else another deployment)."""
        if OverlayPlan.from_registration(reg).own_addresses != self.own_addresses:
            raise InvalidArgument(
                f"the NMS now leases {address_text(reg.virtual_ipv4)} / "
                f"{address_text(reg.virtual_ipv6)}, not the addresses in use; restart the agent"
            )


@dataclass(frozen=True, slots=True)
class MissDecision:
    """What a TUN packet without a tunnel leads to."""

    ask: bool
    """Ask the NMS for a route (else: wait for the one being set up, or drop)."""
    drop: bool
    """Drop the waiting packets for that address (unroutable, or held down)."""


def on_miss(
    destination: bytes, *, plan: OverlayPlan | None, routes: RouteTable[T], now: float
) -> MissDecision:
    """A packet to ``destination`` found no tunnel (it waits in the pending queue)."""
    if routes.for_address(destination) is not None:
        return MissDecision(ask=False, drop=False)  # its route is being set up
    if plan is None or not plan.routable(destination) or routes.is_held(destination, now=now):
        # Held down after a failure: dropped quietly (the failure was logged once).
        return MissDecision(ask=False, drop=True)
    return MissDecision(ask=True, drop=False)
