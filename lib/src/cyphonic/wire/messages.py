"""Envelope wrapping and the field checks protobuf cannot express.

``wrap``/``unwrap`` move between a body message (``pb.LoginRequest``, ...) and the
``pb.Envelope`` that carries it; ``endpoint_*`` and ``ip_from_pb`` check addresses, which
the wire carries as raw bytes (4 for IPv4, 16 for IPv6). Field checks raise
``InvalidArgument``: the envelope was well formed, a value in it is not acceptable.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final, TypeVar

from google.protobuf.message import Message

from cyphonic.errors import InvalidArgument, UnexpectedMessage, UnknownMessage
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.framing import PROTOCOL_VERSION

__all__ = [
    "BODY_FIELDS",
    "IPAddress",
    "body_name",
    "body_name_of",
    "endpoint_from_pb",
    "endpoint_to_pb",
    "expect",
    "ip_from_pb",
    "unwrap",
    "wrap",
]

IPAddress = IPv4Address | IPv6Address
M = TypeVar("M", bound=Message)

BODY_FIELDS: Final[dict[str, str]] = {
    # full protobuf name of a body message -> its field name in Envelope's ``body`` oneof
    field.message_type.full_name: field.name
    for field in pb.Envelope.DESCRIPTOR.oneofs_by_name["body"].fields
    if field.message_type is not None
}


def body_name_of(body: Message | type[Message]) -> str:
    """The envelope field that carries this kind of body, e.g. ``"login_request"``.

    Raises ``UnknownMessage`` for a message that is no envelope body.
    """
    descriptor = body.DESCRIPTOR
    full_name = descriptor.full_name if descriptor is not None else repr(body)
    try:
        return BODY_FIELDS[full_name]
    except KeyError:
        raise UnknownMessage(f"{full_name} is not an envelope body") from None


def wrap(body: Message) -> pb.Envelope:
    """An envelope of the current protocol version carrying ``body`` (copied)."""
    envelope = pb.Envelope(version=PROTOCOL_VERSION)
    getattr(envelope, body_name_of(body)).CopyFrom(body)
    return envelope


def body_name(envelope: pb.Envelope) -> str:
    """Name of the envelope's body field; ``UnknownMessage`` when none is set."""
    name = envelope.WhichOneof("body")
    if name is None:
        raise UnknownMessage("envelope without a body")
    return name


def unwrap(envelope: pb.Envelope) -> Message:
    """The body message of ``envelope``; ``UnknownMessage`` when none is set."""
    body: Message = getattr(envelope, body_name(envelope))
    return body


def expect(envelope: pb.Envelope, kind: type[M]) -> M:
    """The body of an answer that must be a ``kind`` (``expect(answer, pb.RouteResponse)``).

    Raises ``UnexpectedMessage`` naming what came instead (an error answer never gets here:
    the session raises it as its ``CyphonicError``).
    """
    wanted = body_name_of(kind)
    which = envelope.WhichOneof("body")
    if which != wanted:
        raise UnexpectedMessage(f"expected {wanted}, got {which or 'an empty envelope'}")
    body: M = getattr(envelope, wanted)
    return body


def ip_from_pb(data: bytes, *, version: int | None = None, what: str = "address") -> IPAddress:
    """An IP address from its wire form (4 or 16 bytes); ``version`` (4 or 6) narrows it.

    Raises ``InvalidArgument`` naming ``what`` when the length does not fit.
    """
    allowed = {4: (4,), 6: (16,), None: (4, 16)}[version]
    if len(data) not in allowed:
        sizes = " or ".join(str(n) for n in allowed)
        raise InvalidArgument(f"{what} must be {sizes} bytes, not {len(data)}")
    return ip_address(bytes(data))


def endpoint_to_pb(ip: IPAddress | str, port: int) -> pb.Endpoint:
    """The wire form of ``ip``:``port``; ``InvalidArgument`` for a bad address or port."""
    try:
        address = ip_address(ip)
    except ValueError as exc:
        raise InvalidArgument(f"not an IP address: {ip!r}") from exc
    if not 0 < port < 65536:
        raise InvalidArgument(f"port must be 1..65535, not {port}")
    return pb.Endpoint(ip=address.packed, port=port)


def endpoint_from_pb(endpoint: pb.Endpoint) -> tuple[IPAddress, int]:
    """``(ip, port)`` from the wire form; ``InvalidArgument`` when it is not an endpoint.

    An IPv4-mapped IPv6 address stays an ``IPv6Address``: the sender chose the family.
    """
    address = ip_from_pb(endpoint.ip, what="endpoint ip")
    if not 0 < endpoint.port < 65536:
        raise InvalidArgument(f"endpoint port must be 1..65535, not {endpoint.port}")
    return address, endpoint.port
