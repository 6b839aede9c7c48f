"""The sans-I/O forwarding core of the TRS: one datagram in, one decision out.

Protocol flow (the proposal's CID_A / CID_B exchange, pattern 3)::

    node B                      TRS                        NMS                  node A
      |-- control conn (mTLS) -->|                          |                      |
      |   RelayAllocationRequest(token, route) ------------>|                      |
      |<-- RelayAllocation(CID_B...)  side B = (B, addr_B)  |                      |
      |-- RelayCids(CID_B...) --------------------------------> (pushed to A) ---->|
      |                          |<------------ control conn, RelayAllocationRequest
      |                          |-- RelayAllocation(CID_A...) ------------------->|
      |                          |   side A = (A, addr_A); session complete        |
      |                          |<== Initial, DCID=CID_B, from addr_A ============|
      |<== forwarded unchanged ==|   (owner of CID_B is B: source must be addr_A)  |
      |== Handshake, DCID=CID_A =>|== forwarded to addr_A =========================>|

A datagram whose DCID is a CID of side X is *to* X, so it must come *from* the registered
address of X's peer, and it goes to X's registered address. Anything else with a known CID
is dropped: a valid CID from a third host is not enough to reach, or to redirect, a node.
Registered addresses change only through ``update_address``, which the glue calls from the
authenticated control connection. A datagram whose DCID is not in the table is not relay
traffic and belongs to the TRS's own QUIC server.

Nothing here does I/O or reads a clock: the caller passes ``now`` (monotonic seconds), once
per drained batch on the fast path.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cyphonic.errors import AlreadyExists, NotFound

from cyphonic_trs.cid import CID_LEN
from cyphonic_trs.errors import CidError, HeaderError
from cyphonic_trs.header import FORM_BIT, SHORT_MIN_AFTER_DCID, SHORT_OFF_DCID, dcid_of
from cyphonic_trs.session import HostPort, RelaySession


class DropReason(enum.Enum):
    """Why a datagram was not forwarded (also the label of the drop metric)."""

    MALFORMED = "malformed"  # not a QUIC header with a DCID
    SPOOFED_SOURCE = "spoofed_source"  # known CID, but not from the peer's registered address
    NO_PEER = "no_peer"  # the owner's peer has not allocated yet


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the datagram, unchanged, to ``to_addr`` (the socket's own address form)."""

    to_addr: Any


@dataclass(frozen=True, slots=True)
class ToLocalServer:
    """Not relay traffic: hand the datagram to the TRS's own QUIC server."""


@dataclass(frozen=True, slots=True)
class Drop:
    """Discard the datagram."""

    reason: DropReason


Action = Forward | ToLocalServer | Drop

TO_LOCAL_SERVER = ToLocalServer()
_DROPS = {reason: Drop(reason) for reason in DropReason}


@dataclass(frozen=True, slots=True)
class SideStats:
    """Counters of one side: what it sent that was forwarded to its peer."""

    fqdn: str
    addr: HostPort
    cids: int
    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class SessionStats:
    """A snapshot of one relayed session for the admin API and metrics."""

    route_id: str
    pair: tuple[str, str]
    sides: tuple[SideStats | None, SideStats | None]
    complete: bool
    age_s: float
    idle_s: float
    spoofed_drops: int

    @property
    def packets(self) -> int:
        """Packets forwarded in both directions."""
        return sum(side.packets for side in self.sides if side is not None)

    @property
    def bytes(self) -> int:
        """Bytes forwarded in both directions."""
        return sum(side.bytes for side in self.sides if side is not None)


@dataclass(frozen=True, slots=True)
class RelayTotals:
    """Counters over the life of the core (expired sessions included)."""

    sessions: int
    forwarded_packets: int
    forwarded_bytes: int
    to_local_server: int
    drops: dict[DropReason, int]


class _Side:
    __slots__ = ("addr", "bytes", "cids", "forward", "fqdn", "host_port", "packets")

    def __init__(self, *, fqdn: str, host_port: HostPort, native: Any, cids: tuple[bytes, ...]):
        self.fqdn = fqdn
        self.host_port = host_port
        self.addr = native
        self.forward = Forward(native)  # built once, returned for every packet to this side
        self.cids = cids
        self.packets = 0
        self.bytes = 0

    def move(self, host_port: HostPort, native: Any) -> None:
        self.host_port = host_port
        self.addr = native
        self.forward = Forward(native)


class _Session:
    __slots__ = ("created_at", "last_active", "pair", "route_id", "sides", "spoofed")

    def __init__(self, *, route_id: str, pair: tuple[str, str], now: float):
        self.route_id = route_id
        self.pair = pair
        self.sides: list[_Side | None] = [None, None]
        self.created_at = now
        self.last_active = now
        self.spoofed = 0


def _identity(addr: HostPort) -> Any:
    return addr


class RelayCore:
    """In-memory CID table and the forwarding decision; see the module docstring."""

    def __init__(
        self,
        *,
        replica_id: int,
        idle_timeout: float = 300.0,
        cid_len: int = CID_LEN,
        native_addr: Callable[[HostPort], Any] = _identity,
    ) -> None:
        """``native_addr`` turns a stored ``(host, port)`` into the form the socket reports
        (for a dual-stack IPv6 socket, a 4-tuple with the IPv4-mapped host), so that the
        per-packet source check is a plain equality."""
        self.replica_id = replica_id
        self.idle_timeout = idle_timeout
        self.cid_len = cid_len
        self._short_end = SHORT_OFF_DCID + cid_len
        self._short_min = self._short_end + SHORT_MIN_AFTER_DCID
        self._native = native_addr
        self._table: dict[bytes, tuple[_Session, int]] = {}
        self._sessions: dict[str, _Session] = {}
        self._routes_by_fqdn: dict[str, set[str]] = {}  # control-path index
        self._retired_packets = 0
        self._retired_bytes = 0
        self._to_local = 0
        self._drops = dict.fromkeys(DropReason, 0)

    # --- the per-packet path ---------------------------------------------------------

    def train_received(self, data: bytes, count: int, addr: Any, now: float) -> Action:
        """Decide for a UDP GRO train of ``count`` short-header datagrams from ``addr`` that
        all carry the Destination CID of the first (the caller checked): one decision,
        counted as ``count`` packets of ``len(data)`` bytes in all."""
        action = self.datagram_received(data, addr, now)  # all the train's bytes counted
        if count > 1 and action.__class__ is Forward:
            session, owner = self._table[data[SHORT_OFF_DCID : self._short_end]]
            sender = session.sides[1 - owner]
            assert sender is not None  # a Forward needs one
            sender.packets += count - 1  # the first was counted
        return action

    def datagram_received(self, data: bytes, addr: Any, now: float) -> Action:
        """Decide what to do with one datagram received from ``addr`` at ``now``."""
        if len(data) >= self._short_min and not data[0] & FORM_BIT:
            dcid = data[SHORT_OFF_DCID : self._short_end]  # 1-RTT, the common case, inlined
        else:
            try:
                dcid = dcid_of(data, self.cid_len)
            except HeaderError:
                self._drops[DropReason.MALFORMED] += 1
                return _DROPS[DropReason.MALFORMED]
        entry = self._table.get(dcid)
        if entry is None:
            self._to_local += 1
            return TO_LOCAL_SERVER
        session, owner = entry
        sides = session.sides
        sender = sides[1 - owner]
        if sender is None:
            self._drops[DropReason.NO_PEER] += 1
            return _DROPS[DropReason.NO_PEER]
        if addr != sender.addr:
            session.spoofed += 1
            self._drops[DropReason.SPOOFED_SOURCE] += 1
            return _DROPS[DropReason.SPOOFED_SOURCE]
        sender.packets += 1
        sender.bytes += len(data)
        session.last_active = now
        return sides[owner].forward  # type: ignore[union-attr]  # owner of a CID is set

    # --- control: from allocation, the control connection and storage ---------------

    def install(self, record: RelaySession, now: float) -> None:
        """Add a session or bring it up to date with ``record`` (counters are kept).

        ``AlreadyExists`` if one of its CIDs belongs to another route; nothing changes then.
        """
        for cid in record.all_cids():
            if len(cid) != self.cid_len:
                raise CidError(f"CID of {len(cid)} octets in route {record.route_id}")
            entry = self._table.get(cid)
            if entry is not None and entry[0].route_id != record.route_id:
                raise AlreadyExists(f"CID already relayed for route {entry[0].route_id}")
        session = self._sessions.get(record.route_id)
        if session is not None and session.pair != record.pair:
            raise AlreadyExists(f"route {record.route_id} is relayed for another pair")
        if session is None:
            session = _Session(route_id=record.route_id, pair=record.pair, now=now)
            self._sessions[record.route_id] = session
        for index, side in enumerate(record.sides):
            current = session.sides[index]
            if side is None:
                if current is not None:
                    self._forget_cids(current.cids)
                    session.sides[index] = None
                continue
            if current is None or current.fqdn != side.fqdn:
                if current is not None:
                    self._forget_cids(current.cids)
                current = _Side(
                    fqdn=side.fqdn,
                    host_port=side.addr,
                    native=self._native(side.addr),
                    cids=side.cids,
                )
                session.sides[index] = current
            else:
                if current.host_port != side.addr:
                    current.move(side.addr, self._native(side.addr))
                stale = set(current.cids) - set(side.cids)
                self._forget_cids(stale)
                current.cids = side.cids
            for cid in side.cids:
                self._table[cid] = (session, index)
        self._index(session)
        session.last_active = max(session.last_active, now)

    def remove(self, route_id: str) -> None:
        """Forget a session and its CIDs; ``NotFound`` if it is not here."""
        session = self._sessions.pop(route_id, None)
        if session is None:
            raise NotFound(f"no relayed route {route_id}")
        self._retire(session)

    def update_address(self, fqdn: str, addr: HostPort) -> list[str]:
        """Move every side ``fqdn`` owns to ``addr``; the routes changed.

        Only the authenticated control connection of ``fqdn`` may cause this call.
        """
        native = self._native(addr)
        changed = []
        for route_id in sorted(self._routes_by_fqdn.get(fqdn, ())):
            session = self._sessions[route_id]
            for side in session.sides:
                if side is not None and side.fqdn == fqdn and side.host_port != addr:
                    side.move(addr, native)
                    changed.append(session.route_id)
        return changed

    def expire(self, now: float) -> list[str]:
        """Remove sessions idle for ``idle_timeout``; the route IDs removed."""
        deadline = now - self.idle_timeout
        gone = [rid for rid, s in self._sessions.items() if s.last_active <= deadline]
        for route_id in gone:
            self._retire(self._sessions.pop(route_id))
        return gone

    # --- inspection -----------------------------------------------------------------

    def __contains__(self, route_id: object) -> bool:
        return route_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def owner_of(self, cid: bytes) -> tuple[str, str] | None:
        """``(route_id, fqdn)`` of the side owning ``cid``, if the table has it."""
        entry = self._table.get(cid)
        if entry is None:
            return None
        side = entry[0].sides[entry[1]]
        return (entry[0].route_id, side.fqdn if side is not None else "")

    def active_since(self, since: float) -> list[str]:
        """Routes that carried a packet (or changed) after ``since``: their TTLs need refreshing."""
        return [rid for rid, s in self._sessions.items() if s.last_active > since]

    def sessions(self, now: float) -> list[SessionStats]:
        """A snapshot of every session."""
        return [self._stats(s, now) for s in self._sessions.values()]

    def session(self, route_id: str, now: float) -> SessionStats:
        """A snapshot of one session; ``NotFound`` if it is not here."""
        session = self._sessions.get(route_id)
        if session is None:
            raise NotFound(f"no relayed route {route_id}")
        return self._stats(session, now)

    def routes_of(self, fqdn: str) -> list[str]:
        """Routes where ``fqdn`` has allocated."""
        return sorted(self._routes_by_fqdn.get(fqdn, ()))

    def totals(self) -> RelayTotals:
        """Counters since the core was made."""
        packets, octets = self._retired_packets, self._retired_bytes
        for session in self._sessions.values():
            for side in session.sides:
                if side is not None:
                    packets += side.packets
                    octets += side.bytes
        return RelayTotals(
            sessions=len(self._sessions),
            forwarded_packets=packets,
            forwarded_bytes=octets,
            to_local_server=self._to_local,
            drops=dict(self._drops),
        )

    # --- internals ------------------------------------------------------------------

    def _forget_cids(self, cids: Iterable[bytes]) -> None:
        for cid in cids:
            self._table.pop(cid, None)

    def _retire(self, session: _Session) -> None:
        for side in session.sides:
            if side is not None:
                self._forget_cids(side.cids)
                self._retired_packets += side.packets
                self._retired_bytes += side.bytes
        self._unindex(session)

    def _index(self, session: _Session) -> None:
        self._unindex(session)
        for side in session.sides:
            if side is not None:
                self._routes_by_fqdn.setdefault(side.fqdn, set()).add(session.route_id)

    def _unindex(self, session: _Session) -> None:
        for fqdn in session.pair:  # sides only ever belong to the pair's nodes
            routes = self._routes_by_fqdn.get(fqdn)
            if routes is not None:
                routes.discard(session.route_id)
                if not routes:
                    del self._routes_by_fqdn[fqdn]

    @staticmethod
    def _stats(session: _Session, now: float) -> SessionStats:
        def side_stats(side: _Side | None) -> SideStats | None:
            if side is None:
                return None
            return SideStats(
                fqdn=side.fqdn,
                addr=side.host_port,
                cids=len(side.cids),
                packets=side.packets,
                bytes=side.bytes,
            )

        return SessionStats(
            route_id=session.route_id,
            pair=session.pair,
            sides=(side_stats(session.sides[0]), side_stats(session.sides[1])),
            complete=session.sides[0] is not None and session.sides[1] is not None,
            age_s=now - session.created_at,
            idle_s=now - session.last_active,
            spoofed_drops=session.spoofed,
        )
