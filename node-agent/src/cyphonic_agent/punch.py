"""Hole punching, sans-I/O: when to send the probes that take a relayed tunnel direct, when
to stop, and when to go back to the relay. Time is passed in; ``peers.py`` performs.

A relayed route between two nodes behind endpoint-independent NATs comes with a
``HolePunch`` (the other node's observed address). Once the tunnel is up through the TRS
(the first packet never waits for punching), both nodes send QUIC probes of that same
connection to the other's observed address, every ``interval`` for at most ``window``: a
PING-bearing packet sent there instead of to the TRS, which opens the sender's NAT towards
the peer and, once the peer's NAT is open too, reaches the peer from a new address. QUIC
then validates the path (PATH_CHALLENGE / PATH_RESPONSE, RFC 9000 section 9) and both sides
move to it (DIRECT). The glue then has the connecting side open a fresh connection straight
to the peer, which replaces the relayed one (docs/agent.md says why: qh3's core stalls a
client that followed its server to a new address). A symmetric NAT gets no ``HolePunch``.

While a connection is direct, a stalled path (the PINGs sent every ``check`` go
unacknowledged) sends the same kind of probe to the TRS: the peer's connection then
validates the relay path again and both move back. qh3's native core keeps at most four
paths per connection (never freed), so a connection changes path at most
``MAX_PATH_CHANGES`` times; a direct path that dies after that closes the connection (the
next packet builds a new one, relayed first).

    WAITING --delay--> PROBING --validated--> DIRECT --stalled--> FALLING_BACK --> RELAYED
                          |                     ^                                   (no more
                          +--window over--> GAVE_UP (relayed)                        punching)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

MAX_PATH_CHANGES = 3
"""Path changes one connection may make (qh3's core: four paths, the first included)."""


class PunchState(enum.Enum):
    WAITING = "waiting"
    PROBING = "probing"
    DIRECT = "direct"
    FALLING_BACK = "falling_back"
    RELAYED = "relayed"  # back on the relay after the direct path died
    GAVE_UP = "gave_up"  # the window passed with no direct path


@dataclass(frozen=True, slots=True)
class ProbePeer:
    """Send a probe of the connection to the peer's observed address now."""


@dataclass(frozen=True, slots=True)
class ProbeRelay:
    """Send a probe of the connection to the TRS now (the direct path stalled)."""


@dataclass(frozen=True, slots=True)
class Reconnect:
    """The direct path died and the connection has no path change left: close it."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to send; look again in ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Stop:
    """Punching is over for this connection (it stays where it is)."""


Step = ProbePeer | ProbeRelay | Reconnect | Wait | Stop


@dataclass
class HolePunchPlan:
    """The punching of one relayed connection (made when its tunnel is up, at ``started``)."""

    started: float
    delay: float = 0.0
    interval: float = 0.1
    window: float = 3.0
    check: float = 0.5
    """How often a direct path is looked at for a stall."""
    stall_after: float = 1.0
    """How long the peer must stay silent (on top of ``stalled``) before the direct path
    counts as dead: a lost PING or two is no dead path."""
    state: PunchState = PunchState.WAITING
    path_changes: int = 0
    probes_sent: int = 0
    direct_at: float | None = None
    """When the connection first went direct (for status and the test's figures)."""
    _next_probe: float = field(default=0.0)
    _fallback_until: float = field(default=0.0)
    _stalled_since: float | None = field(default=None)

    def __post_init__(self) -> None:
        self._next_probe = self.started + self.delay

    @property
    def deadline(self) -> float:
        return self.started + self.delay + self.window

    def tick(self, *, now: float, direct: bool, stalled: bool) -> Step:
        """The next step; ``direct``: the connection's active path is not the TRS;
        ``stalled``: the peer has not acknowledged the recent PINGs on it."""
        state = self.state
        if direct:
            if state is PunchState.FALLING_BACK:
                if now >= self._fallback_until:
                    return Reconnect()  # neither path answers: start afresh
                if now >= self._next_probe:
                    self._next_probe = now + self.interval
                    return ProbeRelay()
                return Wait(self._next_probe - now)
            if state is not PunchState.DIRECT:
                self.state = PunchState.DIRECT
                self.path_changes += 1
                if self.direct_at is None:
                    self.direct_at = now
            if not stalled:
                self._stalled_since = None
                return Wait(self.check)
            if self._stalled_since is None:
                self._stalled_since = now
            if now - self._stalled_since < self.stall_after:
                return Wait(self.check)
            self._stalled_since = None
            if self.path_changes >= MAX_PATH_CHANGES:
                return Reconnect()
            self.state = PunchState.FALLING_BACK
            self._fallback_until = now + self.window
            self._next_probe = now + self.interval
            return ProbeRelay()
        # On the relay.
        if state in (PunchState.DIRECT, PunchState.FALLING_BACK):
            # Back on the relay (our probes, or the peer's, made QUIC validate it again).
            self.path_changes += 1
            self.state = PunchState.RELAYED
            return Stop()
        if state in (PunchState.RELAYED, PunchState.GAVE_UP):
            return Stop()
        if now >= self.deadline:
            self.state = PunchState.GAVE_UP
            return Stop()
        if now < self._next_probe:
            return Wait(self._next_probe - now)
        self.state = PunchState.PROBING
        self.probes_sent += 1
        self._next_probe = now + self.interval
        return ProbePeer()
