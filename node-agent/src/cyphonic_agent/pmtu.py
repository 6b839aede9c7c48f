"""Path MTU: how large the agent's QUIC datagrams and its TUN packets may be, sans-I/O.

Nothing the agent sends relies on outer fragmentation (many firewalls drop fragments):

1. Its UDP socket sets DF (``cyphonic.quic.endpoint.set_dont_fragment``), so nothing larger
   than a link carries leaves the host; such a send fails (EMSGSIZE) like a lost packet.
2. ``path_sizes.plan_sizes`` fits the QUIC ``max_datagram_size`` to the host's own links (those that
   carry its default routes, ``path_sizes.link_mtus``) and the TUN MTU to that datagram, so a
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
from dataclasses import dataclass, field


class SearchState(enum.Enum):
    """Where the search stands (RFC 8899 5.2, as used here)."""

    SEARCHING = "searching"
    """Confirming the start size, or probing between the confirmed size and the bound."""
    COMPLETE = "complete"
    """The largest size is known; confirmed again every ``confirm_s``."""
    ERROR = "error"
    """Not even the base size gets through now: the tunnel stays at the base, retrying."""
    DISABLED = "disabled"
    """The peer never answered a probe (an older agent): no search, the size stays."""


@dataclass(frozen=True, slots=True)
class Probe:
    """Action: send a probe padded to ``size`` bytes (an inner packet's size), named
    ``probe_id``; the peer answers with the id."""

    probe_id: int
    size: int


@dataclass
class PathMtuSearch:
    """DPLPMTUD (RFC 8899) over one tunnel, sans-I/O. Sizes are inner packet sizes.

    Feed it the clock (``poll``, which returns the probe to send) and the peer's answers
    (``acked``); ``mtu`` is what the tunnel may carry now. It starts at ``upper``, the size
    both access links allow (known up front from the links and ``max_udp_payload_size``),
    and confirms it at once. Where a confirmation is lost ``max_probes`` times in a row the
    path has a narrower hop (a black hole, or a move onto a smaller link): ``mtu`` drops to
    ``base`` and a binary search climbs back (to within ``granularity`` bytes). Before the peer
    has answered any probe, a lost confirmation is first checked with a probe of ``base``
    size: no answer to that either means the peer does not speak probes (``DISABLED``,
    nothing changes). Once complete the size is confirmed every ``confirm_s`` seconds, and
    the search climbs again every ``raise_s`` seconds if below ``upper``.
    """

    base: int
    upper: int
    now: float
    probe_timeout_s: float = 1.0
    """Seconds before an unanswered probe counts as lost."""
    max_probes: int = 3
    """Probes of one size lost in a row before that size is taken as too big."""
    confirm_s: float = 15.0
    raise_s: float = 600.0
    granularity: int = 16
    state: SearchState = SearchState.SEARCHING
    mtu: int = 0
    """What the tunnel carries now."""
    history: list[tuple[float, int, str]] = field(default_factory=list)
    """(time, mtu, why) for each change of ``mtu``."""
    probes_sent: int = 0
    _low: int = 0
    """Largest size confirmed."""
    _high: int = 0
    """Smallest size known too big, or ``upper + 1``."""
    _probe: Probe | None = None
    _probe_kind: str = "confirm"
    """What the probe under way checks: ``confirm`` (mtu), ``base`` or ``search``."""
    _sent_at: float = 0.0
    _lost: int = 0
    _next_id: int = 1
    _next_at: float = 0.0
    _raise_at: float = 0.0
    _answered: bool = False
    """The peer has answered a probe: it speaks them, a lost one means the path."""

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.upper:
            raise ValueError(f"base {self.base} and upper {self.upper} out of order")
        self.mtu = self.upper
        self._low = self.base
        self._high = self.upper + 1
        self._next_at = self.now
        self._raise_at = self.now + self.raise_s

    def poll(self, now: float) -> Probe | None:
        """The probe to send now, if any (declares the one under way lost when overdue)."""
        self.now = now
        if self._probe is not None:
            if now - self._sent_at < self.probe_timeout_s:
                return None
            self._probe_lost()
        if self.state is SearchState.COMPLETE and now >= self._raise_at:
            self._raise_at = now + self.raise_s
            if self.mtu < self.upper:
                self._high = self.upper + 1
                self.state = SearchState.SEARCHING
                self._probe_kind = "search"
        if self.state is SearchState.DISABLED or now < self._next_at:
            return None
        size = self._next_size()
        if size is None:
            self._complete()
            return None
        self._probe = Probe(probe_id=self._next_id, size=size)
        self._next_id += 1
        self._sent_at = now
        self.probes_sent += 1
        return self._probe

    def acked(self, probe_id: int, *, now: float) -> None:
        """The peer answered probe ``probe_id`` (late or unknown ids are ignored)."""
        probe = self._probe
        if probe is None or probe.probe_id != probe_id:
            return
        self.now = now
        self._probe = None
        self._lost = 0
        self._answered = True
        self._next_at = now
        kind = self._probe_kind
        if kind == "base":
            # The peer answers, so the lost confirmation was the path: drop and search.
            self._drop_to_base("black hole")
            return
        self._low = max(self._low, probe.size)
        if kind == "confirm":
            if self.state is SearchState.ERROR:  # the path is back: search it afresh
                self.state = SearchState.SEARCHING
                self._high = self.upper + 1
            if self.state is SearchState.COMPLETE:
                self._next_at = now + self.confirm_s
                return
            self._probe_kind = "search"
        elif probe.size > self.mtu:
            self._set(probe.size, "probe answered")
        if self._next_size() is None:
            self._complete()

    def next_deadline(self) -> float:
        """When ``poll`` next has something to do."""
        if self._probe is not None:
            return self._sent_at + self.probe_timeout_s
        return self._next_at

    # -- internals

    def _next_size(self) -> int | None:
        if self._probe_kind == "base":
            return self.base
        if self._probe_kind == "confirm":
            return self.mtu
        if self._high - self._low <= self.granularity:
            return None  # close enough: within ``granularity`` bytes of the largest
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
        kind = self._probe_kind
        if kind == "base":
            if self._answered:
                self.state = SearchState.ERROR  # even the base is lost now: keep trying
                self._set(self.base, "base lost")
                self._probe_kind = "confirm"
                self._next_at = self.now + self.confirm_s
            else:
                self.state = SearchState.DISABLED
            return
        self._high = min(self._high, probe.size)
        if kind == "confirm":
            if probe.size <= self.base:
                self.state = SearchState.ERROR
                self._next_at = self.now + self.confirm_s
            elif self._answered:
                self._drop_to_base("black hole")
            else:
                self._probe_kind = "base"
            return
        if self._next_size() is None:
            self._complete()

    def _drop_to_base(self, why: str) -> None:
        self._low = self.base
        self._set(self.base, why)
        self.state = SearchState.SEARCHING
        self._probe_kind = "search"
        if self._next_size() is None:
            self._complete()

    def _complete(self) -> None:
        self.state = SearchState.COMPLETE
        self._probe_kind = "confirm"
        self._next_at = self.now + self.confirm_s

    def _set(self, mtu: int, why: str) -> None:
        if mtu != self.mtu:
            self.mtu = mtu
            self.history.append((self.now, mtu, why))
