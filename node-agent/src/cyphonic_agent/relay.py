"""Pattern 3 on the agent: allocate at the TRS, exchange CIDs through the NMS, and hand the
tunnel what it needs to run its end-to-end QUIC connection through the relay.

Protocol flow (docs/trs.md "Protocol flow"; B accepts, A connects)::

    NMS --RouteDirection(pattern 3, relay{trs, name, token})--> A and B
    B == control connection (ALPN cyphonic-sig/1, from B's ONE socket) ==> TRS
    B --RelayAllocationRequest(token, route)--> TRS --RelayAllocation(CID_B...)--> B
    B: serve CID_B (endpoint.server_connection_id_factory), then
    B --RelayCids(route, CID_B)--> NMS --push--> A
    A == control connection ==> TRS; A allocates (CID_A); A --RelayCids(CID_A)--> NMS --> B
    A: waits for CID_B, then connects to the TRS address of its control connection with
       SCID = CID_A[0] (later CIDs from CID_A) and first DCID = CID_B[0]
    TRS forwards by DCID; B's server connection issues CID_B[1..] only.

The tunnel goes to the same TRS address, from the same socket, as the control connection:
behind a symmetric NAT only that keeps one mapping, the one the TRS saw on the
authenticated control connection. The control connection stays open and sends a
``Keepalive`` every ``keepalive_s``: the TRS re-reads the side's address on each request, so a
node that moved (``nudge()`` at once) is followed, and the NAT mapping stays fresh.

``RelayBook`` is the sans-I/O part (paths, the CID index the server hook reads, pushes
that arrive before their route, with an explicit clock); ``RelayClient`` is the asyncio glue
over the agent's ``QuicEndpoint`` and its NMS session.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import (
    CyphonicError,
    InvalidArgument,
    Timeout,
    Unavailable,
)
from cyphonic.hostport import format_host_port
from cyphonic.log import get_logger
from cyphonic.quic import Connection, QuicEndpoint
from cyphonic.quic.engine import CID_LENGTH
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import expect, wrap

__all__ = [
    "CidPool",
    "RelayBook",
    "RelayClient",
    "RelayedPath",
]

KEEPALIVE_S = 5.0
"""Keepalive period on TRS control connections: well inside NAT UDP timeouts, and it bounds
how long a NAT rebinding (a new outside port the node cannot see) stalls a relayed tunnel."""
REQUEST_TIMEOUT_S = 5.0
PEER_CIDS_TIMEOUT_S = 10.0
"""How long the connecting side waits for the peer's CIDs from the NMS."""
EARLY_TTL_S = 30.0
"""How long a RelayCids push for a route not (yet) prepared here is kept."""
MAX_EARLY = 64
MAX_PEER_CIDS = 32
LINGER_S = 30.0
"""An unused TRS control connection is closed after this long (a new route may reuse it)."""

TrsAddress = tuple[str, int]


class CidPool:
    """A ``connection_id_factory``: hands out the TRS-assigned CIDs by sequence number.

    ``offset`` skips CIDs already used otherwise (a server's first TRS CID is the client's
    Initial DCID, so its own CIDs start at the second). When the pool is spent (the peer
    retired more than it held) a random CID is returned, counted in ``overflow``: the relay
    cannot route it, so the peer would only lose a path it should not have switched to,
    instead of the whole connection failing inside the engine.
    """

    def __init__(self, cids: Iterable[bytes], *, offset: int = 0) -> None:
        self.cids = tuple(cids)
        self.offset = offset
        self.overflow = 0

    def __call__(self, sequence_number: int) -> bytes:
        index = self.offset + sequence_number
        if index < len(self.cids):
            return self.cids[index]
        self.overflow += 1
        return os.urandom(CID_LENGTH)


@dataclass(frozen=True)
class RelayedPath:
    """What a pattern-3 tunnel needs, for one route, on this node."""

    route_id: str
    role: int
    """``pb.ROUTE_ROLE_CONNECT`` or ``pb.ROUTE_ROLE_ACCEPT``."""
    peer_fqdn: str
    trs: TrsAddress
    """The TRS address of this node's control connection: the tunnel goes there too."""
    trs_name: str
    own_cids: tuple[bytes, ...]
    """CIDs the TRS assigned to this node (its connection issues only these)."""
    peer_cids: tuple[bytes, ...] = ()
    """The peer's TRS CIDs (the connecting side opens with the first as DCID)."""
    expires_ms: int = 0

    @property
    def connects(self) -> bool:
        """Whether this node opens the end-to-end connection."""
        return self.role == pb.ROUTE_ROLE_CONNECT

    @property
    def initial_destination_cid(self) -> bytes:
        """DCID of the first Initial (connecting side): one of the peer's TRS CIDs."""
        if not self.peer_cids:
            raise InvalidArgument(f"route {self.route_id}: the peer's relay CIDs are unknown")
        return self.peer_cids[0]

    def connection_id_factory(self) -> CidPool:
        """The factory for this node's connection on this route (client or server role)."""
        return CidPool(self.own_cids, offset=0 if self.connects else 1)

    @property
    def label(self) -> str:
        """``via <trs address> (<trs name>)``, as ``cyphonic-agent status`` shows it."""
        return f"via {format_host_port(*self.trs)} ({self.trs_name})"


def check_cids(cids: Iterable[bytes], *, what: str) -> tuple[bytes, ...]:
    """Relay CIDs as received: 1..MAX_PEER_CIDS of CID_LENGTH bytes, else InvalidArgument."""
    out = tuple(bytes(c) for c in cids)
    if not 0 < len(out) <= MAX_PEER_CIDS:
        raise InvalidArgument(f"{what}: expected 1..{MAX_PEER_CIDS} connection IDs, got {len(out)}")
    if any(len(c) != CID_LENGTH for c in out):
        raise InvalidArgument(f"{what}: relay connection IDs have {CID_LENGTH} bytes")
    return out


@dataclass
class RelayBook:
    """Relayed paths of this node, sans-I/O (time passed in).

    Routes are added when their allocation is done. The server hook looks incoming Initials
    up by DCID (``server_pool``). RelayCids pushes for a route not added yet are kept for
    ``early_ttl_s`` (bounded): the peer may allocate before this node saw its direction.
    """

    early_ttl_s: float = EARLY_TTL_S
    max_early: int = MAX_EARLY
    paths: dict[str, RelayedPath] = field(default_factory=dict)
    _by_cid: dict[bytes, str] = field(default_factory=dict)
    _early: dict[str, tuple[tuple[bytes, ...], float]] = field(default_factory=dict)

    def add(self, path: RelayedPath, *, now: float) -> RelayedPath:
        """Record ``path`` (replacing one of the same route); peer CIDs that came early
        are filled in. Returns the path as recorded."""
        self.remove(path.route_id)
        early = self._early.pop(path.route_id, None)
        if early is not None and not path.peer_cids and now - early[1] <= self.early_ttl_s:
            path = replace(path, peer_cids=early[0])
        self.paths[path.route_id] = path
        for cid in path.own_cids:
            self._by_cid[cid] = path.route_id
        return path

    def remove(self, route_id: str) -> RelayedPath | None:
        """Forget a route (released, replaced or failed)."""
        path = self.paths.pop(route_id, None)
        if path is not None:
            for cid in path.own_cids:
                if self._by_cid.get(cid) == route_id:
                    del self._by_cid[cid]
        return path

    def peer_cids(
        self, route_id: str, cids: tuple[bytes, ...], *, now: float
    ) -> RelayedPath | None:
        """The peer's CIDs arrived; the updated path, or None when the route is not here
        yet (then they are kept, oldest dropped beyond ``max_early``)."""
        path = self.paths.get(route_id)
        if path is not None:
            path = replace(path, peer_cids=cids)
            self.paths[route_id] = path
            return path
        self.expire(now=now)
        self._early[route_id] = (cids, now)
        while len(self._early) > self.max_early:
            del self._early[next(iter(self._early))]
        return None

    def server_pool(self, first_dcid: bytes) -> CidPool | None:
        """The CID factory of an incoming connection whose first DCID is one of ours."""
        route_id = self._by_cid.get(first_dcid)
        if route_id is None:
            return None
        path = self.paths[route_id]
        if path.connects:
            return None  # our CIDs as a client: nobody should open a connection to them
        return path.connection_id_factory()

    def route_of_cid(self, cid: bytes) -> RelayedPath | None:
        """The path one of whose own CIDs is ``cid``."""
        route_id = self._by_cid.get(cid)
        return self.paths.get(route_id) if route_id is not None else None

    def uses(self, trs: TrsAddress) -> bool:
        """Whether a route still relays through ``trs``."""
        return any(p.trs == trs for p in self.paths.values())

    def expire(self, *, now: float) -> None:
        """Drop early pushes older than ``early_ttl_s``."""
        for route_id in [r for r, (_, at) in self._early.items() if now - at > self.early_ttl_s]:
            del self._early[route_id]


@dataclass(eq=False)
class _Control:
    """One control connection to a TRS."""

    address: TrsAddress
    name: str
    session: SignallingSession
    idle_since: float | None = None
    sequence: int = 0


def routable(host: str, port: int) -> bool:
    """Whether this host has a route to ``host`` (a UDP connect sends nothing)."""
    ip = ipaddress.ip_address(host)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
        except OSError:
            return False
    return True


class RelayClient:
    """Relay allocations and the CID exchange for one agent endpoint (module docstring).

    ``nms`` returns the agent's current NMS session (None while it is reconnecting); the
    agent hands every ``RelayCids`` push from the NMS to ``peer_cids_received``.
    """

    def __init__(
        self,
        *,
        endpoint: QuicEndpoint,
        nms: Callable[[], SignallingSession | None],
        keepalive_s: float = KEEPALIVE_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        connect_timeout_s: float = 5.0,
        peer_cids_timeout_s: float = PEER_CIDS_TIMEOUT_S,
        linger_s: float = LINGER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.nms = nms
        self.keepalive_s = keepalive_s
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.peer_cids_timeout_s = peer_cids_timeout_s
        self.linger_s = linger_s
        self.clock = clock
        self.book = RelayBook()
        self.controls: dict[TrsAddress, _Control] = {}
        self._dialing: dict[TrsAddress, asyncio.Future[_Control]] = {}
        self._waiters: dict[str, asyncio.Future[RelayedPath]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.log = get_logger("agent.relay")

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Serve relayed CIDs on the endpoint and start the keepalive loop."""
        self.endpoint.server_connection_id_factory = self._server_cids
        if self._task is None:
            self._task = asyncio.ensure_future(self._keepalive_loop())

    async def close(self) -> None:
        """Stop the loop and close every TRS control connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(Unavailable("relay client closed"))
                waiter.exception()
        for control in list(self.controls.values()):
            control.session.close()
        self.controls.clear()

    # ------------------------------------------------------------------ the exchange

    async def prepare_direction(self, direction: pb.RouteDirection) -> RelayedPath:
        """``prepare`` for a pattern-3 RouteDirection as the NMS pushed it."""
        if direction.pattern != pb.ROUTE_PATTERN_RELAY or not direction.HasField("relay"):
            raise InvalidArgument(f"route {direction.route_id} is not relayed")
        relay = direction.relay
        return await self.prepare(
            route_id=direction.route_id,
            role=int(direction.role),
            peer_fqdn=direction.peer_fqdn,
            trs=[(str(ipaddress.ip_address(ep.ip)), int(ep.port)) for ep in relay.trs],
            server_name=relay.trs_server_name,
            token=bytes(relay.allocation_token),
        )

    async def prepare(
        self,
        *,
        route_id: str,
        role: int,
        peer_fqdn: str,
        trs: Sequence[TrsAddress],
        server_name: str,
        token: bytes,
    ) -> RelayedPath:
        """Allocate this node's side of a pattern-3 route and exchange CIDs (see above).

        ``trs``: the TRS endpoints of the direction (the first reachable one is used, or
        the one this node already has a control connection to). CONNECT: returns once the
        peer's CIDs are known (``initial_destination_cid``). ACCEPT: returns once this node
        serves its CIDs and the NMS took them. Raises the TRS's or the NMS's typed error,
        ``Timeout`` when the peer's CIDs do not come in ``peer_cids_timeout_s``.
        """
        connects = role == pb.ROUTE_ROLE_CONNECT
        peer_fqdn = peer_fqdn.lower().rstrip(".")
        log = self.log.bind(
            route_id=route_id, peer=peer_fqdn, role="connect" if connects else "accept"
        )
        started = self.clock()
        added = False
        waiter: asyncio.Future[RelayedPath] | None = None
        if connects:
            waiter = asyncio.get_running_loop().create_future()
            old = self._waiters.pop(route_id, None)
            if old is not None and not old.done():
                old.set_exception(Unavailable(f"route {route_id} is being prepared again"))
            self._waiters[route_id] = waiter
        try:
            control = await self._control_for(list(trs), server_name)
            answer = await control.session.request(
                wrap(pb.RelayAllocationRequest(allocation_token=token, route_id=route_id)),
                timeout=self.request_timeout_s,
            )
            allocation = expect(answer, pb.RelayAllocation)
            own = check_cids(allocation.connection_ids, what="RelayAllocation")
            control.idle_since = None
            path = self.book.add(
                RelayedPath(
                    route_id=route_id,
                    role=role,
                    peer_fqdn=peer_fqdn,
                    trs=control.address,
                    trs_name=control.name,
                    own_cids=own,
                    expires_ms=int(allocation.expires_ms),
                ),
                now=self.clock(),
            )
            added = True
            log.info("relay_allocated", trs=format_host_port(*control.address), cids=len(own))
            # Our CIDs are served (ACCEPT) before the peer can learn them from the NMS.
            await self._send_cids(route_id, own)
            if waiter is not None and not path.peer_cids:
                try:
                    async with asyncio.timeout(self.peer_cids_timeout_s):
                        path = await waiter
                except TimeoutError as exc:
                    raise Timeout(
                        f"route {route_id}: no relay CIDs from "
                        f"{peer_fqdn} within "
                        f"{self.peer_cids_timeout_s:g} s"
                    ) from exc
            log.info(
                "relay_ready",
                trs=format_host_port(*control.address),
                ms=round((self.clock() - started) * 1000, 1),
            )
            return path
        except BaseException:
            if added:  # a refused attempt leaves an earlier allocation of the route alone
                self.book.remove(route_id)
            raise
        finally:
            if waiter is not None and self._waiters.get(route_id) is waiter:
                del self._waiters[route_id]

    def peer_cids_received(self, message: pb.RelayCids) -> None:
        """A ``RelayCids`` push from the NMS (the peer's TRS CIDs); InvalidArgument if bad."""
        cids = check_cids(message.connection_ids, what="RelayCids")
        path = self.book.peer_cids(message.route_id, cids, now=self.clock())
        self.log.info(
            "relay_peer_cids", route_id=message.route_id, cids=len(cids), known=path is not None
        )
        waiter = self._waiters.get(message.route_id)
        if path is not None and waiter is not None and not waiter.done():
            waiter.set_result(path)

    def release(self, route_id: str) -> None:
        """The route is gone here (replaced, torn down): forget its CIDs."""
        path = self.book.remove(route_id)
        waiter = self._waiters.pop(route_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(Unavailable(f"route {route_id} was released"))
        if path is not None:
            control = self.controls.get(path.trs)
            if control is not None and not self.book.uses(path.trs):
                control.idle_since = self.clock()

    def nudge(self) -> None:
        """Send keepalives now (after a move: the TRS re-reads each side's address)."""
        self._wake.set()

    # ------------------------------------------------------------------ lookups

    def path(self, route_id: str) -> RelayedPath | None:
        """The relayed path of a route, if it is relayed here."""
        return self.book.paths.get(route_id)

    def path_of_connection(self, conn: Connection) -> RelayedPath | None:
        """The relayed path a tunnel connection runs on (by one of its own CIDs), if any."""
        for cid in conn.quic.host_cids:
            path = self.book.route_of_cid(cid)
            if path is not None:
                return path
        return None

    # ------------------------------------------------------------------ internals

    def _server_cids(self, _addr: Any, first_dcid: bytes) -> CidPool | None:
        return self.book.server_pool(first_dcid)

    async def _send_cids(self, route_id: str, cids: tuple[bytes, ...]) -> None:
        session = self.nms()
        if session is None or not session.is_open:
            raise Unavailable("not connected to the NMS: cannot send relay CIDs")
        answer = await session.request(
            wrap(pb.RelayCids(route_id=route_id, connection_ids=cids)),
            timeout=self.request_timeout_s,
        )
        expect(answer, pb.RelayCids)

    async def _control_for(self, candidates: list[TrsAddress], name: str) -> _Control:
        """An open control connection to one of the TRS endpoints (reused)."""
        if not candidates:
            raise InvalidArgument("the relay direction names no TRS endpoint")
        for address in candidates:
            control = self.controls.get(address)
            if control is not None and control.session.is_open:
                return control
        errors: list[str] = []
        for address in candidates:
            if not self._reachable(address):
                errors.append(f"{format_host_port(*address)}: no route")
                continue
            try:
                return await self._dial(address, name)
            except (Timeout, Unavailable) as exc:
                errors.append(f"{format_host_port(*address)}: {exc.message}")
        raise Unavailable("cannot reach the TRS: " + "; ".join(errors))

    def _reachable(self, address: TrsAddress) -> bool:
        # An IPv4 socket cannot reach an IPv6 TRS endpoint (and the reverse needs a
        # dual-stack socket, which the endpoint makes when bound to ::).
        bound = ipaddress.ip_address(self.endpoint.local_address[0])
        ip = ipaddress.ip_address(address[0])
        if bound.version == 4 and ip.version == 6:
            return False
        if bound.version == 6 and ip.version == 4 and not bound.is_unspecified:
            return False
        return routable(*address)

    async def _dial(self, address: TrsAddress, name: str) -> _Control:
        running = self._dialing.get(address)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[_Control] = asyncio.get_running_loop().create_future()
        self._dialing[address] = future
        try:
            conn = await self.endpoint.connect(
                address,
                alpn=ALPN_SIGNALLING,
                expect="service",
                expected_name=name,
                handler_factory=SignallingSession.factory(),
                timeout=self.connect_timeout_s,
            )
            assert isinstance(conn.handler, SignallingSession)
            control = _Control(address=address, name=name, session=conn.handler)
            self.controls[address] = control
            self.log.info("trs_connected", trs=format_host_port(*address), name=name)
            future.set_result(control)
            return control
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            del self._dialing[address]

    async def _keepalive_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.keepalive_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._keepalive_once()
            except Exception as exc:  # never let one bad round stop the keepalives
                self.log.exception("trs_keepalive_round_failed", error=repr(exc))

    async def _keepalive_once(self) -> None:
        """One keepalive on every TRS control connection in use; reconnect a lost one."""
        now = self.clock()
        self.book.expire(now=now)
        for address, control in list(self.controls.items()):
            in_use = self.book.uses(address)
            if not in_use:
                if control.idle_since is None:
                    control.idle_since = now
                if now - control.idle_since >= self.linger_s:
                    control.session.close()
                    del self.controls[address]
                    self.log.info("trs_closed", trs=format_host_port(*address), reason="unused")
                continue
            if not control.session.is_open:
                # The TRS restarted or the path broke; the relayed tunnel may still work
                # (the session lives in Redis), but the side's address must stay current.
                del self.controls[address]
                try:
                    control = await self._dial(address, control.name)
                except CyphonicError as exc:
                    self.log.warning(
                        "trs_reconnect_failed", trs=format_host_port(*address), error=exc.message
                    )
                    continue
            control.sequence += 1
            try:
                await control.session.request(
                    wrap(pb.Keepalive(sequence=control.sequence)), timeout=self.request_timeout_s
                )
            except CyphonicError as exc:
                self.log.warning(
                    "trs_keepalive_failed", trs=format_host_port(*address), error=exc.message
                )
