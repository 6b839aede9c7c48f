"""UDP or TCP 443 for a node's QUIC packets: the decisions, sans-I/O (time passed in).

    connect to a service address
      UDP not known blocked:  send over UDP; no answer after ``race_delay_s``
                              -> open a TLS stream on TCP 443 as well and carry the
                                 connection's packets there (its first flight replayed);
                                 a UDP answer at any time before the handshake completes
                                 -> back to UDP, the stream closed
      UDP known blocked:      open the stream at once, nothing sent over UDP
    handshake completed with no UDP answer -> UDP blocked since now
    while blocked: every ``probe_interval_s`` a throwaway QUIC handshake over UDP;
      it completes -> UDP preferred again: every connection's packets go over UDP (the
                      server validates the new path, RFC 9000 section 9; no new handshake)

One ``PathChoice`` per agent: UDP 443 is blocked or not for the whole network the node
sits on, so one service's answer decides for all of them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Carrier", "PathChoice", "RaceStart"]


class Carrier(enum.Enum):
    """What carries a node's QUIC packets to a service (``status`` shows the value)."""

    UDP = "udp"
    TCP = "tcp"
    PROXY = "proxy"  # TCP 443 through an HTTPS proxy (CONNECT)


@dataclass(frozen=True)
class RaceStart:
    """How a new connection to a service address starts.

    ``stream_after``: seconds until the TCP stream is opened (0: at once), None: never
    (UDP only). ``udp``: whether its first flight goes out over UDP too.
    """

    stream_after: float | None
    udp: bool


class PathChoice:
    """The agent's single view of whether UDP 443 gets through (see the module docstring)."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        via_proxy: bool = False,
        race_delay_s: float = 0.5,
        probe_interval_s: float = 30.0,
    ) -> None:
        if race_delay_s < 0 or probe_interval_s <= 0:
            raise ValueError("race_delay_s must be >= 0 and probe_interval_s > 0")
        self.enabled = enabled
        """False: UDP only (``--no-tcp``)."""
        self.via_proxy = via_proxy
        """The stream goes through an HTTPS proxy (``HTTPS_PROXY``, ``--https-proxy``)."""
        self.race_delay_s = race_delay_s
        self.probe_interval_s = probe_interval_s
        self.udp_blocked_since: float | None = None
        """Monotonic time UDP was found blocked (None: UDP works or is untried)."""
        self.next_probe_at: float | None = None
        self.probes = 0
        self.switches_to_udp = 0

    @property
    def carrier(self) -> Carrier:
        """What carries new connections now."""
        if self.udp_blocked_since is None:
            return Carrier.UDP
        return Carrier.PROXY if self.via_proxy else Carrier.TCP

    @property
    def stream_carrier(self) -> Carrier:
        """TCP or PROXY: what a stream is."""
        return Carrier.PROXY if self.via_proxy else Carrier.TCP

    def connecting(self) -> RaceStart:
        """How to start a connection to a service address now."""
        if not self.enabled:
            return RaceStart(stream_after=None, udp=True)
        if self.udp_blocked_since is not None:
            return RaceStart(stream_after=0.0, udp=False)
        return RaceStart(stream_after=self.race_delay_s, udp=True)

    def carried_by_stream(self, now: float) -> bool:
        """A handshake completed over a stream with no UDP answer: UDP is blocked. True
        if this is news (the first connection to find it)."""
        if self.udp_blocked_since is not None:
            return False
        self.udp_blocked_since = now
        self.next_probe_at = now + self.probe_interval_s
        return True

    def probe_due(self, now: float) -> bool:
        """Whether a UDP probe should start now."""
        return self.next_probe_at is not None and now >= self.next_probe_at

    def probe_started(self, now: float) -> None:
        self.probes += 1
        self.next_probe_at = None  # one at a time; the outcome sets the next

    def probe_failed(self, now: float) -> None:
        """No UDP handshake: stay on streams, probe again later."""
        if self.udp_blocked_since is not None:
            self.next_probe_at = now + self.probe_interval_s

    def udp_answered(self) -> bool:
        """UDP works (a probe or a race got a UDP answer). True if that changes the
        carrier (every stream-carried connection should move to UDP)."""
        self.next_probe_at = None
        if self.udp_blocked_since is None:
            return False
        self.udp_blocked_since = None
        self.switches_to_udp += 1
        return True
