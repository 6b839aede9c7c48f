"""QUIC signalling of the NMS: Register, Keepalive and RouteRequest from nodes.

``handle_request`` answers one request envelope from a node's verified connection; it knows
nothing of streams or sockets. ``start_signalling`` puts it behind the QUIC endpoint, one
``NodeLink`` per connection (pushes on server-opened streams, close with an error).
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Protocol

from cyphonic.errors import (
    CyphonicError,
    InternalError,
    InvalidArgument,
    PermissionDenied,
    UnexpectedMessage,
)
from cyphonic.log import get_logger
from cyphonic.v1 import signalling_pb2 as pb

from cyphonic_nms.config import NmsSettings
from cyphonic_nms.manager import NodeLink, NodeManager, Registration, network_pb
from cyphonic_nms.routing import Endpoint

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
    )


async def handle_request(
    manager: NodeManager,
    link: NodeLink,
    request: pb.Envelope,
    *,
    observed: Endpoint | None,
    peer_is_node: bool = True,
) -> pb.Envelope:
    """The answer to one request from the node behind ``link``: a response or a typed Error.

    ``observed`` is the source address:port of the connection as the NMS sees it now.
    """
    body = request.WhichOneof("body")
    try:
        if not peer_is_node:
            raise PermissionDenied("only nodes talk to the NMS signalling endpoint")
        if body == "register_request":
            addresses = request.register_request.local_addresses
            if len(addresses) > MAX_LOCAL_ADDRESSES:
                raise InvalidArgument(f"at most {MAX_LOCAL_ADDRESSES} local addresses")
            reg = await manager.register(
                link, local_addresses=[endpoint_from_pb(a) for a in addresses],
                observed=observed,
            )
            return _envelope(register_response=register_response(reg))
        if body == "keepalive":
            manager.require_registered(link)
            manager.keepalive(link)
            return _envelope(keepalive_ack=pb.KeepaliveAck(sequence=request.keepalive.sequence))
        if body == "route_request":
            manager.keepalive(link)
            return _envelope(route_response=await manager.route(link, request.route_request))
        raise UnexpectedMessage(f"the NMS does not answer {body or 'an empty envelope'}")
    except CyphonicError as exc:
        return _envelope(error=exc.to_wire())
    except Exception:
        log.exception("request_failed", fqdn=link.fqdn, body=body)
        return _envelope(error=InternalError("internal error").to_wire())


class SignallingServer(Protocol):
    """A running QUIC signalling endpoint."""

    @property
    def address(self) -> str:
        """Where it listens, host:port."""
        ...

    async def close(self) -> None:
        """Stop accepting and close every connection."""
        ...


async def start_signalling(manager: NodeManager, settings: NmsSettings) -> SignallingServer | None:
    """Start the NMS QUIC endpoint (None until the QUIC endpoint is part of this build)."""
    log.warning("quic_unavailable", reason="QUIC endpoint not wired yet")
    return None
