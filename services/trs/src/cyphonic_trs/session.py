"""Relay session records: what the TRS stores about a relayed route (pure data).

A session is one NMS route relayed by one TRS replica. It has two sides, one per node of
the pair the allocation token names. Each side owns the CIDs the TRS issued to it: the node
uses them as its own (source) CIDs on the relayed end-to-end connection, so packets its peer
sends carry them as Destination CID, and the TRS forwards those packets to the side's
registered address. That address is the source address of the node's authenticated
control connection to the TRS, which shares the node's one UDP socket and therefore its NAT
mapping towards the TRS.

Records are immutable; ``version`` grows by one on each stored change so that storage can
refuse a write based on a stale read (compare-and-set).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cyphonic.hostport import HostPort

__all__ = ["HostPort", "RelaySession", "RelaySide"]


@dataclass(frozen=True, slots=True)
class RelaySide:
    """One node of a relayed route, as allocated."""

    fqdn: str
    addr: HostPort
    cids: tuple[bytes, ...]
    allocated_ms: int


@dataclass(frozen=True, slots=True)
class RelaySession:
    """A relayed route on one replica; ``sides`` are indexed like ``pair``."""

    route_id: str
    replica_id: int
    pair: tuple[str, str]  # the two FQDNs the token binds, sorted
    sides: tuple[RelaySide | None, RelaySide | None]
    created_ms: int
    version: int = 0

    def side_index(self, fqdn: str) -> int:
        """0 or 1: where ``fqdn`` sits in ``pair``; ``ValueError`` if it is not in it."""
        return self.pair.index(fqdn)

    def side_of(self, fqdn: str) -> RelaySide | None:
        """The side ``fqdn`` allocated, if any."""
        return self.sides[self.side_index(fqdn)]

    def peer_of(self, fqdn: str) -> RelaySide | None:
        """The other side of ``fqdn``, if it allocated."""
        return self.sides[1 - self.side_index(fqdn)]

    @property
    def complete(self) -> bool:
        """Whether both sides allocated, so packets can flow."""
        return self.sides[0] is not None and self.sides[1] is not None

    def all_cids(self) -> tuple[bytes, ...]:
        """Every CID of both sides."""
        return tuple(cid for side in self.sides if side is not None for cid in side.cids)

    def with_side(self, side: RelaySide) -> RelaySession:
        """A copy with ``side`` set (or replaced) and the version bumped."""
        sides = list(self.sides)
        sides[self.side_index(side.fqdn)] = side
        return replace(self, sides=(sides[0], sides[1]), version=self.version + 1)

    def with_address(self, fqdn: str, addr: HostPort) -> RelaySession:
        """A copy with the address of ``fqdn``'s side changed and the version bumped."""
        side = self.side_of(fqdn)
        if side is None:
            raise ValueError(f"{fqdn} has not allocated on route {self.route_id}")
        return self.with_side(replace(side, addr=addr))
