"""Route decisions: how a node reaches the Internet, and how two nodes reach each other.

Sans-I/O: no asyncio, no database, no Redis. Two pure functions carry the logic:

* ``classify(local_addresses, observed_source)`` turns what a node reports (the addresses of
  its one UDP socket) and the source address the NMS saw into a ``NetworkInfo``.
* ``pattern_for(a, b)`` picks the route pattern for initiator ``a`` and responder ``b``:

    initiator \\ responder | IPv6      | global IPv4         | private IPv4 (NAT)
    ----------------------+-----------+---------------------+--------------------
    IPv6                  | 1 direct  | 3 relay             | 3 relay
    global IPv4           | 3 relay   | 1 direct            | 2 NAT side connects
    private IPv4 (NAT)    | 3 relay   | 2 NAT side connects | 3 relay

  A dual-stack node sits in the row/column of each family it has; the decision uses a family
  both nodes share and takes the best pattern, preferring IPv6 when both families allow a
  direct path. Nodes that share no family are relayed.

"Global IPv4" means reachable as reported, i.e. not behind NAT: a node on a private LAN
address that the NMS sees unchanged (same LAN, test bed) counts as global.

Reachability probes (``reach.py``) refine a registration: a node whose observed address takes
no datagram from an address it never sent to (``Inbound.BLOCKED``: a stateful firewall) sits
in that family's NAT row (it must connect out, from the first packet), and the NAT's mapping
behaviour decides whether a relayed pair behind two NATs may try a simultaneous open
(``RouteDecision.punch``): only when both map endpoint-independently.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from cyphonic.errors import InvalidArgument
from cyphonic.hostport import format_host_port, parse_host_port
from cyphonic.stream_address import is_stream_host

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True)
class Endpoint:
    """An IP address and UDP port."""

    ip: IPAddress
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``1.2.3.4:443`` or ``[2001:db8::1]:443``."""
        try:
            host, port = parse_host_port(text, require_ip=True)
        except InvalidArgument as exc:  # a ValueError, as argparse's ``type=`` expects
            raise ValueError(exc.message) from exc
        return cls(ip_address(host), port)

    @property
    def family(self) -> int:
        """4 or 6."""
        return self.ip.version

    def __str__(self) -> str:
        return format_host_port(str(self.ip), self.port)


class Family(enum.IntEnum):
    IPV4 = 4
    IPV6 = 6


class Pattern(enum.IntEnum):
    """Values equal the wire ``RoutePattern``."""

    DIRECT = 1
    NAT_CONNECTS = 2
    RELAY = 3


class Side(enum.Enum):
    """Which node of a route: the initiator (asked for the route) or the responder."""

    INITIATOR = "initiator"
    RESPONDER = "responder"

    @property
    def other(self) -> Side:
        return Side.RESPONDER if self is Side.INITIATOR else Side.INITIATOR


class Reach(enum.Enum):
    """One node's standing in one family, i.e. its row/column of the table."""

    NONE = "none"
    IPV6 = "ipv6"
    GLOBAL_IPV4 = "global_ipv4"
    NAT_IPV4 = "nat_ipv4"
    IPV6_NO_INBOUND = "ipv6_no_inbound"  # global IPv6 behind a firewall that lets nothing in


class NatMapping(enum.Enum):
    """How the node's NAT maps its UDP socket (values equal the wire names' tails)."""

    UNKNOWN = "unknown"
    NONE = "none"
    ENDPOINT_INDEPENDENT = "endpoint_independent"
    DEPENDENT = "dependent"  # "symmetric": another public port for another destination


class Inbound(enum.Enum):
    """Whether a datagram from an address the node never sent to reaches it."""

    UNKNOWN = "unknown"
    OPEN = "open"
    BLOCKED = "blocked"


@dataclass(frozen=True)
class NetworkInfo:
    """How a node reaches the Internet, as decided from its report and the observed source."""

    has_ipv4: bool
    has_ipv6: bool
    behind_nat: bool
    observed_ipv4: Endpoint | None = None
    observed_ipv6: Endpoint | None = None
    local_addresses: tuple[Endpoint, ...] = ()
    nat_mapping: NatMapping = NatMapping.UNKNOWN
    inbound: Inbound = Inbound.UNKNOWN
    """Of the observed address's family (the one the NMS probed)."""

    def blocked(self, family: int) -> bool:
        """Whether a probe showed that nothing gets in to this node's ``family`` address."""
        observed = self.observed_ipv4 if family == 4 else self.observed_ipv6
        return self.inbound is Inbound.BLOCKED and observed is not None

    @property
    def ipv4_reach(self) -> Reach:
        if not self.has_ipv4:
            return Reach.NONE
        return Reach.NAT_IPV4 if self.behind_nat or self.blocked(4) else Reach.GLOBAL_IPV4

    @property
    def ipv6_reach(self) -> Reach:
        if not self.has_ipv6:
            return Reach.NONE
        return Reach.IPV6_NO_INBOUND if self.blocked(6) else Reach.IPV6

    @property
    def punchable(self) -> bool:
        """Behind an IPv4 NAT whose mapping does not depend on the destination (a
        simultaneous open can connect it to a peer of the same kind)."""
        return (
            self.behind_nat
            and self.observed_ipv4 is not None
            and self.nat_mapping is NatMapping.ENDPOINT_INDEPENDENT
        )

    def probed(self, *, nat_mapping: NatMapping, inbound: Inbound) -> NetworkInfo:
        """This information with what the reachability probes found."""
        return replace(self, nat_mapping=nat_mapping, inbound=inbound)

    @property
    def kind(self) -> str:
        """For people: ``ipv6``, ``global_ipv4``, ``nat_ipv4``, ``dual_stack``... ``none``."""
        if self.has_ipv4 and self.has_ipv6:
            return "dual_stack_nat" if self.behind_nat else "dual_stack"
        if self.has_ipv6:
            return "ipv6"
        if self.has_ipv4:
            return self.ipv4_reach.value
        return "none"

    def candidates(self, family: int, *, loopback_ok: bool = False) -> tuple[Endpoint, ...]:
        """Real addresses of this node in ``family`` that a peer may try, best first.

        The observed mapping comes first: the NMS validated it (the handshake completed from
        there). Reported addresses follow only when a peer may be sent to them: never
        loopback, unspecified, multicast, link-local or reserved ones, which a node could
        otherwise use to aim its peers' QUIC Initials at any target. A loopback observed
        address is offered only to a peer that itself sits on loopback (``loopback_ok``:
        both nodes share the NMS's host, a single-host setup).
        """
        out: list[Endpoint] = []
        observed = self.observed_ipv4 if family == 4 else self.observed_ipv6
        if observed is not None and (
            dialable(observed.ip) or (loopback_ok and observed.ip.is_loopback)
        ):
            out.append(observed)
        for ep in self.local_addresses:
            if ep.family == family and dialable(ep.ip) and ep not in out:
                # A NATed node's private addresses are useless to a peer outside.
                if family == 4 and self.behind_nat:
                    continue
                out.append(ep)
        return tuple(out)

    @property
    def relay_only(self) -> bool:
        """The node's packets reach the NMS over TCP 443 (its observed source is a stream
        address, ``cyphonic.stream_address``): no UDP either way, so every route of it
        is relayed."""
        return any(
            ep is not None and is_stream_host(ep.ip)
            for ep in (self.observed_ipv4, self.observed_ipv6)
        )

    def on_loopback(self, family: int) -> bool:
        """Whether the NMS saw this node's ``family`` connection come from loopback."""
        observed = self.observed_ipv4 if family == 4 else self.observed_ipv6
        return observed is not None and observed.ip.is_loopback


@dataclass(frozen=True)
class RouteDecision:
    """The outcome of ``pattern_for``: pattern, family, who connects, what to try."""

    pattern: Pattern
    family: Family | None  # None for a relay: each side reaches the TRS by its own family
    connector: Side
    # Real addresses of the accepting side that the connecting side should try (direct
    # patterns only; empty for a relay).
    candidates: tuple[Endpoint, ...] = field(default=())
    # Relayed pair behind two endpoint-independent NATs: each side's observed IPv4
    # address, for a simultaneous open (initiator's, responder's).
    punch: tuple[Endpoint, Endpoint] | None = None

    def role_of(self, side: Side) -> str:
        """``connect`` or ``accept``."""
        return "connect" if side is self.connector else "accept"


def _usable(ip: IPAddress) -> bool:
    """An address worth recording from a node's report (loopback kept for single-host NAT
    detection; it is never handed to a peer, see ``dialable``)."""
    return not (ip.is_link_local or ip.is_multicast or ip.is_unspecified)


_THIS_NETWORK = ip_network("0.0.0.0/8")


def dialable(ip: IPAddress) -> bool:
    """Whether a peer may be told to send QUIC packets to ``ip`` on a node's word.

    Refused: loopback, unspecified, multicast, link-local and reserved addresses (IPv4
    0.0.0.0/8 and 240.0.0.0/4 with the broadcast address; IPv6 outside global unicast, ULA,
    link-local and multicast, which includes ::1 and IPv4-mapped forms), deprecated IPv6
    site-local, and 6to4/Teredo addresses wrapping such an IPv4 address. Private (RFC 1918,
    ULA) and shared (100.64.0.0/10) addresses stay: two nodes on one LAN use them.
    """
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            return dialable(ip.ipv4_mapped)
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not dialable(embedded):
            return False
        if ip.is_site_local:
            return False
    elif ip in _THIS_NETWORK:
        return False
    return not (
        ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved
    )


def _same(a: Endpoint, b: Endpoint) -> bool:
    # An IPv4-mapped IPv6 source (dual-stack socket) is the IPv4 address it maps.
    return _unmap(a) == _unmap(b)


def _unmap(ep: Endpoint) -> Endpoint:
    if isinstance(ep.ip, IPv6Address) and ep.ip.ipv4_mapped is not None:
        return Endpoint(ep.ip.ipv4_mapped, ep.port)
    return ep


def classify(local_addresses: Iterable[Endpoint], observed_source: Endpoint | None) -> NetworkInfo:
    """Decide a node's ``NetworkInfo`` from its reported addresses and the observed source.

    * IPv4 is available when the node connected over IPv4 or reported a dialable IPv4 address.
      It is behind NAT when the observed IPv4 source address:port is not among the reported
      ones; when the node connected over IPv6 (nothing observed in IPv4), a node whose reported IPv4
      addresses are all non-global (RFC 1918, CGNAT...) is assumed to sit behind NAT.
    * IPv6 is available when the node connected over IPv6 or reported a dialable IPv6 address.
      IPv6 is taken as end-to-end (no NAT66).
    """
    # Keep the node's order (its preference), minus duplicates and unusable addresses.
    reported = tuple(dict.fromkeys(_unmap(ep) for ep in local_addresses if _usable(_unmap(ep).ip)))
    observed = _unmap(observed_source) if observed_source is not None else None
    observed_v4 = observed if observed is not None and observed.family == 4 else None
    observed_v6 = observed if observed is not None and observed.family == 6 else None
    reported_v4 = [ep for ep in reported if ep.family == 4]
    reported_v6 = [ep for ep in reported if ep.family == 6]

    # A family the node merely claims counts only with an address a peer could dial.
    dialable_v4 = [ep for ep in reported_v4 if dialable(ep.ip)]
    has_ipv4 = observed_v4 is not None or bool(dialable_v4)
    has_ipv6 = observed_v6 is not None or any(dialable(ep.ip) for ep in reported_v6)
    if observed_v4 is not None:
        behind_nat = not any(_same(observed_v4, ep) for ep in reported_v4)
    else:
        behind_nat = bool(dialable_v4) and not any(ep.ip.is_global for ep in dialable_v4)
    return NetworkInfo(
        has_ipv4=has_ipv4,
        has_ipv6=has_ipv6,
        behind_nat=behind_nat,
        observed_ipv4=observed_v4,
        observed_ipv6=observed_v6,
        local_addresses=reported,
    )


# The table, one family at a time: (initiator reach, responder reach) -> (pattern, connector).
# Pairs not listed (different families, or NAT to NAT) are relayed.
_TABLE: dict[tuple[Reach, Reach], tuple[Pattern, Side]] = {
    (Reach.IPV6, Reach.IPV6): (Pattern.DIRECT, Side.INITIATOR),
    (Reach.GLOBAL_IPV4, Reach.GLOBAL_IPV4): (Pattern.DIRECT, Side.INITIATOR),
    (Reach.GLOBAL_IPV4, Reach.NAT_IPV4): (Pattern.NAT_CONNECTS, Side.RESPONDER),
    (Reach.NAT_IPV4, Reach.GLOBAL_IPV4): (Pattern.NAT_CONNECTS, Side.INITIATOR),
    # A firewalled IPv6 node connects out, as a NATed IPv4 one does.
    (Reach.IPV6, Reach.IPV6_NO_INBOUND): (Pattern.NAT_CONNECTS, Side.RESPONDER),
    (Reach.IPV6_NO_INBOUND, Reach.IPV6): (Pattern.NAT_CONNECTS, Side.INITIATOR),
}


def cell(initiator: Reach, responder: Reach) -> tuple[Pattern, Side]:
    """One cell of the table: the pattern and the side that opens the QUIC connection."""
    return _TABLE.get((initiator, responder), (Pattern.RELAY, Side.INITIATOR))


def pattern_for(a: NetworkInfo, b: NetworkInfo) -> RouteDecision:
    """The route from initiator ``a`` to responder ``b`` (DESIGN.md's table, dual-stack aware)."""
    options: list[tuple[Pattern, int, Family, Side, tuple[Endpoint, ...]]] = []
    if a.relay_only or b.relay_only:
        return RouteDecision(pattern=Pattern.RELAY, family=None, connector=Side.INITIATOR)
    for family, reach_a, reach_b in (
        (Family.IPV6, a.ipv6_reach, b.ipv6_reach),
        (Family.IPV4, a.ipv4_reach, b.ipv4_reach),
    ):
        if reach_a is Reach.NONE or reach_b is Reach.NONE:
            continue
        pattern, connector = cell(reach_a, reach_b)
        if pattern is Pattern.RELAY:
            continue
        acceptor, connecting = (b, a) if connector is Side.INITIATOR else (a, b)
        candidates = acceptor.candidates(
            int(family), loopback_ok=connecting.on_loopback(int(family))
        )
        if candidates:  # a direct path needs an address the connecting side may dial
            # Lower pattern first; on a tie IPv6 (listed first, rank 0) wins.
            options.append((pattern, len(options), family, connector, candidates))
    if not options:
        punch = None
        if a.punchable and b.punchable:
            assert a.observed_ipv4 is not None and b.observed_ipv4 is not None
            if dialable(a.observed_ipv4.ip) and dialable(b.observed_ipv4.ip):
                punch = (a.observed_ipv4, b.observed_ipv4)
        return RouteDecision(
            pattern=Pattern.RELAY, family=None, connector=Side.INITIATOR, punch=punch
        )
    pattern, _, family, connector, candidates = min(options)
    return RouteDecision(pattern=pattern, family=family, connector=connector, candidates=candidates)


def endpoints_from(pairs: Sequence[tuple[str, int]]) -> tuple[Endpoint, ...]:
    """Endpoints from ``(ip text, port)`` pairs (the storage form)."""
    return tuple(Endpoint(ip_address(ip), int(port)) for ip, port in pairs)
