"""NMS request handling at the envelope level (no sockets): answers and typed errors."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address
from types import SimpleNamespace

import pytest
from cyphonic.errors import Unavailable
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.routing import Endpoint
from cyphonic_nms.signalling import NmsSignallingServer, handle_request
from cyphonic_testing.nms import InProcessCluster, RecordingLink, add_node


def _env(**body: object) -> pb.Envelope:
    return pb.Envelope(version=pb.PROTOCOL_VERSION_1, **body)  # type: ignore[arg-type]


def _register(*addresses: tuple[str, int]) -> pb.Envelope:
    return _env(
        register_request=pb.RegisterRequest(
            local_addresses=[
                pb.Endpoint(ip=ip_address(ip).packed, port=port) for ip, port in addresses
            ]
        )
    )


async def test_register_keepalive_route(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    for name in ("a", "b"):
        await add_node(cluster.sessions, name)
    a = RecordingLink(fqdn="a.cyphonic.internal")
    b = RecordingLink(fqdn="b.cyphonic.internal")
    answer = await handle_request(
        nms, a, _register(("10.0.0.2", 4433)), observed=Endpoint.parse("203.0.113.7:61000")
    )
    reg = answer.register_response
    assert answer.WhichOneof("body") == "register_response"
    assert reg.fqdn == "a.cyphonic.internal"
    assert IPv4Address(reg.virtual_ipv4) in cluster.pools.ipv4.network
    assert reg.virtual_ipv4_prefix_len == 24 and reg.virtual_ipv6_prefix_len == 48
    assert reg.network.behind_nat and reg.network.has_ipv4 and not reg.network.has_ipv6
    assert reg.network.observed_ipv4.ip == ip_address("203.0.113.7").packed
    assert reg.network.observed_ipv4.port == 61000
    assert reg.keepalive_interval_ms == 15000
    ack = await handle_request(nms, a, _env(keepalive=pb.Keepalive(sequence=7)), observed=None)
    assert ack.keepalive_ack.sequence == 7
    await handle_request(
        nms, b, _register(("198.51.100.3", 443)), observed=Endpoint.parse("198.51.100.3:443")
    )
    routed = await handle_request(
        nms, a, _env(route_request=pb.RouteRequest(fqdn="b.cyphonic.internal")), observed=None
    )
    assert routed.route_response.pattern == pb.ROUTE_PATTERN_NAT_CONNECTS
    assert b.of("route_direction")[0].route_direction.role == pb.ROUTE_ROLE_ACCEPT


async def test_typed_errors(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    await add_node(cluster.sessions, "a")
    a = RecordingLink(fqdn="a.cyphonic.internal")
    before = await handle_request(nms, a, _env(keepalive=pb.Keepalive()), observed=None)
    assert before.error.code == pb.ERROR_CODE_PERMISSION_DENIED
    bad = _env(
        register_request=pb.RegisterRequest(local_addresses=[pb.Endpoint(ip=b"123", port=1)])
    )
    assert (await handle_request(nms, a, bad, observed=None)).error.code == (
        pb.ERROR_CODE_INVALID_ARGUMENT
    )
    zero_port = _register(("10.0.0.1", 0))
    assert (await handle_request(nms, a, zero_port, observed=None)).error.code == (
        pb.ERROR_CODE_INVALID_ARGUMENT
    )
    too_many = _register(*[("10.0.0.1", p) for p in range(1, 40)])
    assert (await handle_request(nms, a, too_many, observed=None)).error.code == (
        pb.ERROR_CODE_INVALID_ARGUMENT
    )
    login = _env(login_request=pb.LoginRequest())
    assert (await handle_request(nms, a, login, observed=None)).error.code == (
        pb.ERROR_CODE_UNEXPECTED_MESSAGE
    )
    assert (await handle_request(nms, a, _env(), observed=None)).error.code == (
        pb.ERROR_CODE_UNEXPECTED_MESSAGE
    )
    service = await handle_request(nms, a, _register(), observed=None, peer_is_node=False)
    assert service.error.code == pb.ERROR_CODE_PERMISSION_DENIED
    ghost = RecordingLink(fqdn="ghost.cyphonic.internal")
    refused = await handle_request(nms, ghost, _register(), observed=None)
    assert refused.error.code == pb.ERROR_CODE_PERMISSION_DENIED
    assert "not enrolled" in refused.error.message


async def test_a_departure_redis_cannot_record_is_logged_and_the_node_forgotten(
    cluster: InProcessCluster,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A reconnect storm once exhausted the Redis connections: each departure's task died
    with an unread exception. It is a warning now, and the node is forgotten here (its
    presence lapses by its TTL)."""
    nms = await cluster.replica("r1")
    await add_node(cluster.sessions, "a")
    a = RecordingLink(fqdn="a.cyphonic.internal")
    await handle_request(nms, a, _register(("10.0.0.2", 4433)), observed=None)

    async def unreachable(*_args: object) -> bool:
        raise Unavailable("Redis unavailable (presence)")

    monkeypatch.setattr(nms.presence, "release", unreachable)
    server = SimpleNamespace(manager=nms)
    await NmsSignallingServer._departed(server, a, "timeout")  # type: ignore[arg-type]
    assert "departure_failed" in capsys.readouterr().out
    assert "a.cyphonic.internal" not in nms.connected
