"""Path MTU: how large the agent's QUIC datagrams and its TUN packets may be, sans-I/O.

Nothing the agent sends relies on outer fragmentation (many firewalls drop fragments):

1. Its UDP socket sets DF (``cyphonic.quic.endpoint.set_dont_fragment``), so nothing larger
   than a link carries leaves the host; such a send fails (EMSGSIZE) like a lost packet.
2. ``plan_sizes`` fits the QUIC ``max_datagram_size`` to the host's own links (those that
   carry its default routes, ``link_mtus``) and the TUN MTU to that datagram, so a
   full-size inner packet fits one DATAGRAM frame on the local link (the TUN never goes
   below IPv6's 1,280: the tunnel fragments IPv6 packets of up to 1,280 bytes itself).
3. Every connection sends ``max_udp_payload_size`` = that datagram size (RFC 9000 18.2)
   and honours the peer's: a peer behind a 1,280-byte access link is never sent more
   than its link carries, by nodes and services alike (``cyphonic.quic.engine*``).
4. The tunnel learns the rest from the path itself (``PathMtuSearch``, RFC 8899
   DPLPMTUD): probes of growing size confirm what the path carries end to end (a
   bottleneck between the two access links), and repeated loss of a confirmation at the
   current size (a black hole, e.g. after a move) drops the tunnel to the base size and
   searches again. An inner packet above what the tunnel carries gets ICMP "fragmentation
   needed" / ICMPv6 "packet too big" back (``tunnel.TunnelCore``), which the inner
   sender's kernel honours per destination.

docs/agent.md "Path MTU" tells the story with the figures.
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field

from cyphonic_agent.packet import IPV6_MIN_MTU
from cyphonic_agent.tunnel import (
    UDP_IPV4_OVERHEAD,
    UDP_IPV6_OVERHEAD,
    max_datagram_size_for,
    quic_overhead,
)

QUIC_MIN_DATAGRAM = 1200
"""The smallest UDP payload every QUIC path must carry (RFC 9000 14): the search's base."""


@dataclass(frozen=True, slots=True)
class LinkMtu:
    """One link the host's traffic leaves by: its name, MTU and address family (4 or 6)."""

    interface: str
    mtu: int
    family: int


@dataclass(frozen=True, slots=True)
class PathSizes:
    """What the agent uses: QUIC ``max_datagram_size`` and the TUN MTU."""

    datagram: int
    tun_mtu: int
    limited_by: LinkMtu | None = None
    """The link that made them smaller than configured (None: the configuration)."""


def datagram_room(link: LinkMtu) -> int:
    """The largest UDP payload one unfragmented datagram carries over ``link``."""
    return link.mtu - (UDP_IPV6_OVERHEAD if link.family == 6 else UDP_IPV4_OVERHEAD)


def inner_mtu_for(datagram: int) -> int:
    """The largest inner packet that fits one DATAGRAM frame in ``datagram`` bytes."""
    mtu = datagram - quic_overhead(mtu=datagram)
    while mtu + quic_overhead(mtu=mtu) > datagram:
        mtu -= 1
    return mtu


def plan_sizes(*, tun_mtu: int, links: list[LinkMtu]) -> PathSizes:
    """Fit the datagram and TUN sizes to the smallest of ``links`` (never below QUIC's 1200).

    No links known (no default route yet, netlink unreadable): the configured TUN MTU and
    the datagram it needs, as before.
    """
    datagram = max_datagram_size_for(tun_mtu=tun_mtu)
    limited_by: LinkMtu | None = None
    for link in links:
        room = max(datagram_room(link), QUIC_MIN_DATAGRAM)
        if room < datagram:
            datagram, limited_by = room, link
    # Never below IPv6's 1,280 (the TUN carries IPv6 too): what the datagram cannot carry
    # the tunnel answers with ICMP too big (IPv4) or fragments itself (IPv6, RFC 8200 5).
    inner = max(inner_mtu_for(datagram), IPV6_MIN_MTU)
    return PathSizes(datagram=datagram, tun_mtu=min(tun_mtu, inner), limited_by=limited_by)


# ---------------------------------------------------------------------- DPLPMTUD


class SearchState(enum.Enum):
    """RFC 8899 5.2 states, as this search uses them."""

    SEARCHING = "searching"
    """Probing sizes between the confirmed size and the upper bound."""
    COMPLETE = "complete"
    """The largest size is known; confirmed again every ``confirm_s``."""
    ERROR = "error"
    """Not even the base size got through: the tunnel stays at the base."""


@dataclass(frozen=True, slots=True)
class Probe:
    """Action: send a probe padded to ``size`` bytes of inner payload, named ``probe_id``."""

    probe_id: int
    size: int


@dataclass
class PathMtuSearch:
    """DPLPMTUD (RFC 8899) over one tunnel, sans-I/O; sizes are inner packet sizes.

    Feed it the clock (``poll``) and the acknowledgements of its probes (``acked``);
    ``mtu`` is what the tunnel may carry now. It starts at ``upper`` (the sizes both
    access links allow, known up front) and confirms it at once; where that is lost
    ``max_probes`` times, the path has a narrower hop in between: it falls back to
    ``base`` and searches upwards (binary search to ``granularity`` bytes). Once complete
    it confirms the size every ``confirm_s`` (black-hole detection) and searches up
    again every ``raise_s`` (the path may have grown).
    """

    base: int
    upper: int
    now: float
    probe_timeout_s: float = 1.0
    """Seconds before an unacknowledged probe counts as lost (the caller may pass
    ``max(3 * srtt, floor)`` through ``set_timeout``)."""
    max_probes: int = 3
    """Probes of one size lost in a row before that size is taken as too big (RFC 8899
    MAX_PROBES)."""
    confirm_s: float = 15.0
    raise_s: float = 600.0
    """Seconds between searches above a complete size (RFC 8899 PMTU_RAISE_TIMER)."""
    granularity: int = 16
    state: SearchState = SearchState.SEARCHING
    mtu: int = 0
    """What the tunnel carries now (set to ``upper`` at start)."""
    _low: int = 0
    """Largest size confirmed."""
    _high: int = 0
    """Smallest size known too big, or ``upper + 1``."""
    _probe: Probe | None = None
    _sent_at: float = 0.0
    _lost: int = 0
    _next_id: int = 1
    _next_at: float = 0.0
    _confirming: bool = True
    """The probe under way confirms ``mtu`` (not a search step above it)."""
    history: list[tuple[float, int, str]] = field(default_factory=list)
    """(time, mtu, why) for each change of ``mtu``."""

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.upper:
            raise ValueError(f"base {self.base} and upper {self.upper} out of order")
        self.mtu = self.upper
        self._low = self.base
        self._high = self.upper + 1
        self._next_at = self.now

    def set_timeout(self, seconds: float) -> None:
        """Change the probe timeout (e.g. from the connection's RTT)."""
        self.probe_timeout_s = seconds

    def poll(self, now: float) -> Probe | None:
        """The probe to send now, if any (also declares the one under way lost)."""
        self.now = now
        if self._probe is not None:
            if now - self._sent_at < self.probe_timeout_s:
                return None
            self._probe_lost()
        if now < self._next_at:
            return None
        size = self._next_size()
        if size is None:
            return None
        self._probe = Probe(probe_id=self._next_id, size=size)
        self._next_id += 1
        self._sent_at = now
        return self._probe

    def next_deadline(self) -> float:
        """When ``poll`` next has something to do."""
        if self._probe is not None:
            return self._sent_at + self.probe_timeout_s
        return self._next_at

    def acked(self, probe_id: int, *, now: float) -> None:
        """The peer acknowledged probe ``probe_id`` (any other id is ignored)."""
        probe = self._probe
        if probe is None or probe.probe_id != probe_id:
            return
        self.now = now
        self._probe = None
        self._lost = 0
        self._low = max(self._low, probe.size)
        if self._confirming:
            self._confirming = False
            if self.state is SearchState.ERROR:
                self._set(probe.size, "base confirmed again")
                self.state = SearchState.SEARCHING
            if self.state is SearchState.COMPLETE:
                self._next_at = now + self.confirm_s
                return
        elif probe.size > self.mtu:
            self._set(probe.size, "probe acknowledged")
        self._next_at = now
        if self._next_size() is None:
            self._complete(now)

    # -- internals

    def _next_size(self) -> int | None:
        if self._confirming:
            return self.mtu
        if self.state is SearchState.COMPLETE:
            return None
        if self._high - self._low <= self.granularity:
            return self._high - 1 if self._high - 1 > self._low else None
        return (self._low + self._high) // 2

    def _probe_lost(self) -> None:
        probe = self._probe
        assert probe is not None
        self._probe = None
        self._lost += 1
        self._next_at = self.now
        if self._lost < self.max_probes:
            return
        self._lost = 0
        if self._confirming:
            if probe.size <= self.base:
                self.state = SearchState.ERROR
                self._next_at = self.now + self.confirm_s
                return
            # Black hole (or a narrower hop than both links said): back to the base, search.
            self._high = min(self._high, probe.size)
            self._low = self.base
            self._set(self.base, "black hole")
            self._confirming = True
            self.state = SearchState.SEARCHING
            return
        self._high = min(self._high, probe.size)
        if self._next_size() is None:
            self._complete(self.now)

    def _complete(self, now: float) -> None:
        self.state = SearchState.COMPLETE
        self._confirming = True
        self._next_at = now + self.confirm_s
        self._raise_at = now + self.raise_s

    def _set(self, mtu: int, why: str) -> None:
        if mtu != self.mtu:
            self.mtu = mtu
            self.history.append((self.now, mtu, why))


# ---------------------------------------------------------------------- the host's links


def link_mtus() -> list[LinkMtu]:
    """The MTUs of the links carrying this host's default routes, via netlink (pyroute2).

    A route's own ``mtu`` metric counts where it is smaller than its device's. Empty where
    there is no default route or netlink cannot be read.
    """
    from pyroute2 import IPRoute

    found: list[LinkMtu] = []
    try:
        with IPRoute() as ipr:
            names: dict[int, tuple[str, int]] = {}
            for link in ipr.get_links():
                names[link["index"]] = (
                    str(link.get_attr("IFLA_IFNAME")),
                    int(link.get_attr("IFLA_MTU") or 0),
                )
            for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
                for msg in ipr.get_routes(family=family, table=254):
                    if msg["dst_len"] != 0 or msg["type"] != 1:  # unicast default routes
                        continue
                    name, mtu = names.get(msg.get_attr("RTA_OIF"), ("", 0))
                    metrics = msg.get_attr("RTA_METRICS")
                    route_mtu = metrics.get_attr("RTAX_MTU") if metrics is not None else None
                    if route_mtu:
                        mtu = min(mtu, int(route_mtu)) if mtu else int(route_mtu)
                    if mtu:
                        found.append(LinkMtu(interface=name, mtu=mtu, family=version))
    except OSError:
        return []
    return found
