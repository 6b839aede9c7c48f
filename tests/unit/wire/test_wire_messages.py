"""cyphonic.wire.messages: wrap/unwrap and the address checks protobuf cannot express."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from cyphonic.errors import InvalidArgument, UnknownMessage
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import (
    BODY_FIELDS,
    body_name,
    body_name_of,
    endpoint_from_pb,
    endpoint_to_pb,
    ip_from_pb,
    unwrap,
    wrap,
)


def test_wrap_sets_version_and_body() -> None:
    envelope = wrap(pb.RouteRequest(fqdn="b.cyphonic.internal"))
    assert envelope.version == pb.PROTOCOL_VERSION_1
    assert envelope.WhichOneof("body") == "route_request"
    assert envelope.route_request.fqdn == "b.cyphonic.internal"


def test_wrap_unwrap_every_body() -> None:
    oneof = pb.Envelope.DESCRIPTOR.oneofs_by_name["body"]
    assert len(BODY_FIELDS) == len(oneof.fields)
    for field in oneof.fields:
        assert field.message_type is not None
        body = getattr(pb, field.message_type.name)()
        envelope = wrap(body)
        assert body_name(envelope) == field.name == body_name_of(type(body))
        assert unwrap(envelope) == body


def test_wrap_copies() -> None:
    body = pb.Keepalive(sequence=1)
    envelope = wrap(body)
    body.sequence = 2
    assert envelope.keepalive.sequence == 1


def test_non_body_message_is_refused() -> None:
    with pytest.raises(UnknownMessage):
        wrap(pb.Endpoint())
    with pytest.raises(UnknownMessage):
        body_name_of(pb.Envelope)


def test_unwrap_without_body() -> None:
    with pytest.raises(UnknownMessage):
        unwrap(pb.Envelope(version=pb.PROTOCOL_VERSION_1))


@pytest.mark.parametrize("ip", ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1"])
def test_endpoint_round_trip(ip: str) -> None:
    msg = endpoint_to_pb(ip, 443)
    assert len(msg.ip) == (4 if "." in ip and ":" not in ip else 16)
    assert endpoint_from_pb(msg) == (ip_address(ip), 443)
    assert endpoint_from_pb(endpoint_to_pb(ip_address(ip), 65535))[1] == 65535


@pytest.mark.parametrize("length", [0, 3, 5, 15, 17])
def test_endpoint_ip_length_checked(length: int) -> None:
    with pytest.raises(InvalidArgument, match="4 or 16 bytes"):
        endpoint_from_pb(pb.Endpoint(ip=b"\1" * length, port=1))


@pytest.mark.parametrize("port", [0, 65536, 2**32 - 1])
def test_endpoint_port_checked(port: int) -> None:
    with pytest.raises(InvalidArgument, match="port"):
        endpoint_from_pb(pb.Endpoint(ip=b"\1\2\3\4", port=port))
    if port < 2**32:
        with pytest.raises(InvalidArgument, match="port"):
            endpoint_to_pb("192.0.2.1", port)


def test_endpoint_to_pb_refuses_non_address() -> None:
    with pytest.raises(InvalidArgument):
        endpoint_to_pb("nms.svc.cyphonic.internal", 443)


def test_ip_from_pb_families() -> None:
    assert ip_from_pb(b"\x64\x40\0\1", version=4) == IPv4Address("100.64.0.1")
    assert isinstance(ip_from_pb(b"\xfd" + b"\0" * 15, version=6), IPv6Address)
    with pytest.raises(InvalidArgument, match="virtual_ipv4 must be 4 bytes"):
        ip_from_pb(b"\0" * 16, version=4, what="virtual_ipv4")
    with pytest.raises(InvalidArgument, match="16 bytes"):
        ip_from_pb(b"\0" * 4, version=6)
