"""Moves: the host's real addresses or default routes changed.

``MoveDetector`` is the sans-I/O core: snapshots of the host's addresses and default routes
go in; a ``PathLost`` comes out as soon as an address or default route of the settled path
is gone, and a ``Move`` (old and new snapshot) when the host settled on a different path.
``MoveWatcher`` is the asyncio glue: a netlink socket subscribed to address, route and link
events wakes it (the host is read at once, a few milliseconds), and a periodic check
catches what netlink missed.

A move happens in steps (the old interface loses its address and goes down, the new one
comes up, the default route follows); a snapshot with no address or no default route is a
step in between, never a move's end, so the detector keeps its baseline across it. The
agent acts on ``PathLost`` at once (fresh connection IDs before any packet can leave by the
new path, so nothing on the wire links the two paths) and on ``Move`` fully.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from cyphonic.log import get_logger

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

POLL_S = 2.0
"""Check period where no netlink subscription could be made (polling is all there is)."""
POLL_NETLINK_S = 30.0
"""Fallback check period while netlink reports changes, for what it did not report. Slow
on purpose: a check reads the host with pyroute2 in a worker thread (~5 ms of CPU), and
while it runs that thread and the data path take turns at the GIL (hundreds of hand-overs,
the data path waiting up to the switch interval at each system call): every 2 s this cost
the agents' tunnel a 200-300 ms stall, a quarter to half of its throughput under load and
milliseconds of RTT (docs/performance.md "What limits now")."""

# rtnetlink multicast groups (linux/rtnetlink.h)
_RTMGRP_LINK = 0x1
_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV4_ROUTE = 0x40
_RTMGRP_IPV6_IFADDR = 0x100
_RTMGRP_IPV6_ROUTE = 0x400
_GROUPS = (
    _RTMGRP_LINK
    | _RTMGRP_IPV4_IFADDR
    | _RTMGRP_IPV4_ROUTE
    | _RTMGRP_IPV6_IFADDR
    | _RTMGRP_IPV6_ROUTE
)


@dataclass(frozen=True)
class HostPath:
    """The host's usable unicast addresses and its default routes (gateway or device)."""

    addresses: frozenset[IPAddress] = frozenset()
    default_routes: frozenset[str] = frozenset()
    """One text per default route: ``via <gateway>`` or ``dev <ifindex>``."""

    @property
    def usable(self) -> bool:
        """Whether this looks like a path the host could be settled on."""
        return bool(self.addresses) and bool(self.default_routes)

    def describe(self) -> dict[str, list[str]]:
        """The JSON/log form."""
        return {
            "addresses": sorted(str(a) for a in self.addresses),
            "default_routes": sorted(self.default_routes),
        }


@dataclass(frozen=True)
class Move:
    """The host settled on a different path."""

    old: HostPath
    new: HostPath


@dataclass(frozen=True)
class PathLost:
    """An address or default route of the settled path went away (a move may be starting)."""

    old: HostPath
    now: HostPath


@dataclass
class MoveDetector:
    """Compares snapshots with the last settled path; see the module docstring."""

    baseline: HostPath | None = None
    moves: int = 0
    lost: bool = False
    """A ``PathLost`` was reported since the baseline was set."""

    def observe(self, snapshot: HostPath) -> Move | PathLost | None:
        """Take a snapshot: a ``Move`` when it is usable and differs from the baseline, else
        a ``PathLost`` (once per baseline) when part of the baseline is gone."""
        if self.baseline is None:
            if snapshot.usable:
                self.baseline = snapshot
            return None
        if snapshot == self.baseline:
            self.lost = False  # it came back
            return None
        if snapshot.usable:
            move = Move(old=self.baseline, new=snapshot)
            self.baseline = snapshot
            self.lost = False
            self.moves += 1
            return move
        gone = (
            not self.baseline.addresses <= snapshot.addresses
            or not self.baseline.default_routes <= snapshot.default_routes
        )
        if gone and not self.lost:
            self.lost = True
            return PathLost(old=self.baseline, now=snapshot)
        return None


@dataclass(frozen=True)
class Handover:
    """A move as the agent handled it (what ``cyphonic-agent status`` shows)."""

    at: float
    """Wall-clock time of the move (seconds since the epoch)."""
    old: HostPath
    new: HostPath


def seen_on_old_path(handover: Handover, observed: Iterable[IPAddress]) -> bool:
    """Whether the NMS, answering a registration sent after ``handover``, saw this host at an
    address only the old path had (``observed``: the addresses it saw, from the
    RegisterResponse). The registration went out on the migrated connection before the NMS
    had validated the new path (qh3 makes a new peer address the connection's own only once
    PATH_CHALLENGE is answered), so the NMS judged the new network by the old address: a
    global node taken for one behind NAT, its reachability probe sent to the old address.
    A NAT's public address is never one of this host's, so a NATed path never matches."""
    stale = handover.old.addresses - handover.new.addresses
    return any(_unmapped(ip) in stale for ip in observed)


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def host_addresses(
    *,
    exclude_ifindexes: Iterable[int] = (),
    loopback: bool = False,
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """This host's unicast addresses (no link-local; loopback only if asked), via netlink."""
    from pyroute2 import IPRoute

    excluded = set(exclude_ifindexes)
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            if msg["index"] in excluded:
                continue
            text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not text:
                continue
            ip = ipaddress.ip_address(text)
            if ip.is_link_local or ip.is_multicast or ip.is_unspecified:
                continue
            if ip.is_loopback and not loopback:
                continue
            if ip not in found:
                found.append(ip)
    return found


def host_path(*, exclude_ifindexes: Iterable[int] = ()) -> HostPath:
    """This host's path now, via netlink (no loopback, link-local or multicast addresses)."""
    from pyroute2 import IPRoute

    excluded = set(exclude_ifindexes)
    defaults: set[str] = set()
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_routes(family=family, table=254):
                if msg["dst_len"] != 0 or msg["type"] != 1:  # unicast default routes only
                    continue
                oif = msg.get_attr("RTA_OIF")
                if oif in excluded:
                    continue
                gateway = msg.get_attr("RTA_GATEWAY")
                defaults.add(f"via {gateway}" if gateway else f"dev {oif}")
    addresses = host_addresses(exclude_ifindexes=excluded)
    return HostPath(addresses=frozenset(addresses), default_routes=frozenset(defaults))


@dataclass(eq=False)
class MoveWatcher:
    """Netlink events plus a periodic check feed a ``MoveDetector``; ``on_move`` is awaited
    for each move (one at a time)."""

    on_move: Callable[[Move], Awaitable[None]]
    on_lost: Callable[[PathLost], None] = field(default=lambda _lost: None)
    exclude_ifindexes: Callable[[], Iterable[int]] = field(default=lambda: ())
    poll_s: float | None = None
    """Check period; None: ``POLL_NETLINK_S`` with a netlink subscription, else ``POLL_S``."""
    snapshot: Callable[..., HostPath] = host_path
    detector: MoveDetector = field(default_factory=MoveDetector)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _sock: socket.socket | None = None

    async def run(self) -> None:
        """Watch until cancelled."""
        log = get_logger("agent.mobility")
        loop = asyncio.get_running_loop()
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            self._sock.bind((0, _GROUPS))
            self._sock.setblocking(False)
            loop.add_reader(self._sock.fileno(), self._readable)
        except OSError as exc:
            log.warning("netlink_unavailable", error=str(exc), poll_s=self.poll_s or POLL_S)
            self._close_sock(loop)
        period = self.period()
        try:
            await self._check()
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=period)
                # Events arriving while the host is read are taken in by that reading.
                self._wake.clear()
                await self._check()
        finally:
            self._close_sock(loop)

    def period(self) -> float:
        """Seconds between fallback checks (with or without a netlink subscription)."""
        if self.poll_s is not None:
            return self.poll_s
        return POLL_NETLINK_S if self._sock is not None else POLL_S

    async def _check(self) -> None:
        snap = await asyncio.to_thread(
            self.snapshot, exclude_ifindexes=list(self.exclude_ifindexes())
        )
        event = self.detector.observe(snap)
        try:
            if isinstance(event, PathLost):
                self.on_lost(event)
            elif event is not None:
                await self.on_move(event)
        except Exception as exc:
            # A hook's failure costs that one handover at most: a dead watcher would miss
            # every later move (the agent then learns it only when its NMS keepalive fails).
            get_logger("agent.mobility").error(
                "move_handling_failed", step=type(event).__name__, error=repr(exc)
            )

    def _readable(self) -> None:
        assert self._sock is not None
        with contextlib.suppress(OSError):
            while self._sock.recv(65536):  # the content does not matter: look at the host
                pass
        self._wake.set()

    def _close_sock(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sock is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
