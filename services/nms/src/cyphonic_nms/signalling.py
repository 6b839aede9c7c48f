"""QUIC signalling of the NMS: Register, Keepalive, RouteRequest and RelayCids from nodes.

A node is present while its connection is: the agent keeps it alive with QUIC PINGs
(``ping_interval_ms`` in the RegisterResponse; older agents send Keepalive requests, still
answered), and the endpoint's idle timeout (``offline_timeout_s``) closes a silent one, which
marks the node offline. No per-keepalive work happens above QUIC.

``handle_request`` answers one request envelope from a node's verified connection; it knows
nothing of streams or sockets. ``start_signalling`` puts it behind the QUIC endpoint, one
``NodeLink`` per connection (pushes on server-opened streams, close with an error).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

from cyphonic.errors import (
    CyphonicError,
    InternalError,
    InvalidArgument,
    PermissionDenied,
    Timeout,
    UnexpectedMessage,
)
from cyphonic.log import get_logger
from cyphonic.revocation import RegistryRevocations, RevocationCache, RevocationWatch
from cyphonic.signalling_server import SignallingServer
from cyphonic.v1 import signalling_pb2 as pb

from cyphonic_nms.config import NmsSettings
from cyphonic_nms.manager import NodeLink, NodeManager, Registration, network_pb
from cyphonic_nms.routing import Endpoint

if TYPE_CHECKING:
    from cyphonic.session import SignallingSession

log = get_logger("nms.signalling")

MAX_LOCAL_ADDRESSES = 32


def _envelope(**body: object) -> pb.Envelope:
    return pb.Envelope(version=pb.PROTOCOL_VERSION_1, **body)  # type: ignore[arg-type]


def endpoint_from_pb(msg: pb.Endpoint) -> Endpoint:
    """An ``Endpoint`` from its wire form; ``InvalidArgument`` when it is not one."""
    if len(msg.ip) not in (4, 16):
        raise InvalidArgument("an endpoint ip must be 4 or 16 bytes")
    if not 0 < msg.port < 65536:
        raise InvalidArgument("an endpoint port must be 1..65535")
    return Endpoint(ip_address(msg.ip), msg.port)


def register_response(reg: Registration) -> pb.RegisterResponse:
    """The wire answer to a registration."""
    return pb.RegisterResponse(
        fqdn=reg.fqdn,
        virtual_ipv4=reg.lease.ipv4.packed,
        virtual_ipv4_prefix_len=reg.pools.ipv4.prefix_len,
        virtual_ipv6=reg.lease.ipv6.packed,
        virtual_ipv6_prefix_len=reg.pools.ipv6.prefix_len,
        network=network_pb(reg.network),
        keepalive_interval_ms=int(reg.keepalive_interval_s * 1000),
        ping_interval_ms=int(reg.ping_interval_s * 1000),
        reach_probe=(
            pb.ReachProbe(target=pb.Endpoint(port=reg.reach_port), nonce=reg.reach_nonce)
            if reg.reach_nonce is not None
            else None
        ),
    )


async def answer(
    manager: NodeManager,
    link: NodeLink,
    request: pb.Envelope,
    *,
    observed: Endpoint | None,
    peer_is_node: bool = True,
) -> pb.Envelope | None:
    """The answer to one request from the node behind ``link``; raises a ``CyphonicError``.

    ``observed`` is the source address:port of the connection as the NMS sees it now.
    Notices a node pushes (none are defined towards the NMS) are refused.
    """
    body = request.WhichOneof("body")
    if not peer_is_node:
        raise PermissionDenied("only nodes talk to the NMS signalling endpoint")
    if body == "register_request":
        addresses = request.register_request.local_addresses
        if len(addresses) > MAX_LOCAL_ADDRESSES:
            raise InvalidArgument(f"at most {MAX_LOCAL_ADDRESSES} local addresses")
        reg = await manager.register(
            link,
            local_addresses=[endpoint_from_pb(a) for a in addresses],
            observed=observed,
            reach_probes=request.register_request.reach_probes,
        )
        return _envelope(register_response=register_response(reg))
    if body == "keepalive":
        # An agent that does not PING (older); its presence is the connection, as for all.
        manager.require_registered(link)
        return _envelope(keepalive_ack=pb.KeepaliveAck(sequence=request.keepalive.sequence))
    if body == "route_request":
        return _envelope(route_response=await manager.route(link, request.route_request))
    if body == "relay_cids":
        return _envelope(relay_cids=await manager.relay_cids(link, request.relay_cids))
    raise UnexpectedMessage(f"the NMS does not answer {body or 'an empty envelope'}")


async def handle_request(
    manager: NodeManager,
    link: NodeLink,
    request: pb.Envelope,
    *,
    observed: Endpoint | None,
    peer_is_node: bool = True,
) -> pb.Envelope:
    """Like ``answer`` but never raises: errors become an ``Error`` envelope."""
    try:
        result = await answer(manager, link, request, observed=observed, peer_is_node=peer_is_node)
    except CyphonicError as exc:
        return _envelope(error=exc.to_wire())
    except Exception:
        log.exception("request_failed", fqdn=link.fqdn, body=request.WhichOneof("body"))
        return _envelope(error=InternalError("internal error").to_wire())
    return result if result is not None else _envelope()


class SessionLink:
    """``NodeLink`` over a verified ``SignallingSession``."""

    def __init__(self, session: SignallingSession) -> None:
        self.session = session
        self.fqdn = session.peer.name.lower()
        self.serial_hex = format(session.peer.certificate.serial_number, "x")

    async def push(self, envelope: pb.Envelope) -> None:
        await self.session.push(envelope)

    def close(self, error: CyphonicError) -> None:
        self.session.close(error)

    @property
    def observed(self) -> Endpoint:
        """The connection's current source address:port (follows QUIC migration)."""
        host, port = self.session.connection.peer_address
        return Endpoint(ip_address(host), int(port))


class NmsSignallingServer(SignallingServer):
    """The NMS QUIC endpoint: node connections become ``SessionLink``s of the manager."""

    service_name = "nms"

    def __init__(self, manager: NodeManager) -> None:
        super().__init__()
        self.manager = manager
        self._links: dict[int, SessionLink] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, settings: NmsSettings) -> None:
        """Load the NMS certificate and trust store and bind the UDP socket."""
        await self.open(
            pki_dir=settings.pki_dir,
            host=settings.quic_host,
            port=settings.quic_port,
            revocation_source=RegistryRevocations.from_url(settings.database_url),
            revocation_interval=settings.revocation_poll_s,
            # Presence is the connection: the agents' QUIC PINGs (or older agents'
            # Keepalives) keep it open; one silent this long is closed, the node offline.
            idle_timeout=settings.offline_timeout_s,
            retry_threshold=settings.quic_retry_threshold,
            max_handshakes=settings.quic_max_handshakes,
            ticket_keys=settings.ticket_keys(),
        )
        cache = self.revocations
        if cache is None:
            return
        if settings.as_url:
            # Pushed: the AS answers this long-poll the moment it revokes (docs/enrolment.md).
            cache.follow(RevocationWatch(settings.as_url))
        # Either way of hearing of a revocation first tells the other: the cache refreshes
        # when the registry notifies one (Postgres), the manager polls when the cache (the
        # AS's watch) found one.
        cache.subscribe(lambda _serials: self.manager.revocations_changed())
        self.manager.revocation_hooks.append(lambda: self._spawn(_refresh(cache)))

    def backlog(self) -> int:
        # A storm's handshakes outran the registrations behind them (each waiting on the
        # registry): 128 in progress, the rest refused after their handshake.
        return self.manager.registration_backlog()

    def opened(self, session: SignallingSession) -> None:
        self._links[id(session)] = SessionLink(session)

    def lost(self, session: SignallingSession, error: CyphonicError | None) -> None:
        link = self._links.pop(id(session), None)
        if link is None or self.manager.draining:
            # Draining: this replica is shutting down and closed the connection itself. The
            # node re-registers at another replica; its routes and peers are left alone.
            return
        cause = "timeout" if isinstance(error, Timeout) else "disconnect"
        self._spawn(self._departed(link, cause))

    async def _departed(self, link: SessionLink, cause: str) -> None:
        try:
            await self.manager.disconnected(link, cause=cause)
        except CyphonicError as exc:
            # Redis or Postgres out of reach: the node is forgotten here; its presence and
            # routes lapse by their TTL (``offline_timeout_s``).
            log.warning("departure_failed", fqdn=link.fqdn, cause=cause, error=exc.message)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def handle(self, message: pb.Envelope, session: SignallingSession) -> pb.Envelope | None:
        link = self._links.get(id(session))
        if link is None:  # cannot happen: on_open runs before any event is delivered
            raise UnexpectedMessage("connection not set up")
        return await answer(
            self.manager,
            link,
            message,
            observed=link.observed,
            peer_is_node=session.peer.kind == "node",
        )

    async def close(self) -> None:
        """Close every connection and the socket."""
        await super().close()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task


async def _refresh(cache: RevocationCache) -> None:
    try:
        await cache.refresh()
    except CyphonicError as exc:  # the timer tries again; the set in force stays
        log.warning("revocation_refresh_failed", code=exc.code_name, reason=exc.message)


async def start_signalling(manager: NodeManager, settings: NmsSettings) -> NmsSignallingServer:
    """Start the NMS QUIC endpoint on ``settings.quic_host``:``quic_port``."""
    server = NmsSignallingServer(manager)
    await server.start(settings)
    log.info("quic_listening", address=server.address)
    return server
