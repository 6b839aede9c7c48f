"""A node that moves: its routes re-decided, kept or rebuilt, and the handover recorded."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.cluster import RouteRecord
from cyphonic_nms.manager import survives_move
from cyphonic_nms.routing import Family, Pattern, RouteDecision, Side
from cyphonic_testing.nms import E, InProcessCluster

pytestmark = pytest.mark.timeout(20)


def _record(*, pattern: int, family: int | None, connector: str) -> RouteRecord:
    return RouteRecord(
        route_id="r1",
        initiator="a",
        responder="b",
        pattern=pattern,
        family=family,
        connector=connector,
        trs_replica=None,
        created_ms=0,
        decided_by="nms-0",
    )


@pytest.mark.parametrize(
    ("moved", "decision", "kept"),
    [
        # the mover connects and nothing else changed: its connection migrates
        ("a", RouteDecision(Pattern.NAT_CONNECTS, Family.IPV4, Side.INITIATOR), True),
        # the mover accepted the tunnel: its peer must connect to the new address
        ("b", RouteDecision(Pattern.NAT_CONNECTS, Family.IPV4, Side.INITIATOR), False),
        # the pattern changed (direct -> relay)
        ("a", RouteDecision(Pattern.RELAY, None, Side.INITIATOR), False),
        # the connecting side changed
        ("a", RouteDecision(Pattern.NAT_CONNECTS, Family.IPV4, Side.RESPONDER), False),
        # the family changed
        ("a", RouteDecision(Pattern.NAT_CONNECTS, Family.IPV6, Side.INITIATOR), False),
    ],
)
def test_survives_move(moved: str, decision: RouteDecision, kept: bool) -> None:
    route = _record(pattern=2, family=4, connector="initiator")
    assert survives_move(route, decision, moved) is kept


def test_relayed_route_survives_either_side_moving() -> None:
    route = _record(pattern=3, family=None, connector="initiator")
    decision = RouteDecision(Pattern.RELAY, None, Side.INITIATOR)
    assert survives_move(route, decision, "a") and survives_move(route, decision, "b")


async def test_connector_moving_between_nats_keeps_its_route(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a", "nat_ipv4")
    b = await cluster.node(nms, "b", "global_ipv4")
    first = await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))
    assert first.pattern == pb.ROUTE_PATTERN_NAT_CONNECTS
    assert nms.last_handover(a.fqdn) is None
    # a re-registers on its migrated connection from behind another NAT
    await nms.register(a, local_addresses=[E("192.168.3.10:443")], observed=E("203.0.113.77:40000"))
    again_a = (await a.wait_for("route_direction", count=2)).route_direction
    again_b = (await b.wait_for("route_direction", count=2)).route_direction
    assert again_a.route_id == again_b.route_id == first.route_id
    assert again_a.role == pb.ROUTE_ROLE_CONNECT
    handover = nms.last_handover(a.fqdn)
    assert handover is not None
    assert str(handover.new.observed_ipv4) == "203.0.113.77:40000"
    assert handover.old.observed_ipv4 != handover.new.observed_ipv4
    assert [r.route_id for r in await cluster.routes.all()] == [first.route_id]


async def test_acceptor_moving_gets_a_new_route(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a", "nat_ipv4")
    b = await cluster.node(nms, "b", "global_ipv4")
    first = await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))
    await nms.register(
        b, local_addresses=[E("198.51.100.138:443")], observed=E("198.51.100.138:443")
    )
    again_a = (await a.wait_for("route_direction", count=2)).route_direction
    again_b = (await b.wait_for("route_direction", count=2)).route_direction
    assert again_a.route_id == again_b.route_id != first.route_id
    assert (again_a.role, again_b.role) == (pb.ROUTE_ROLE_CONNECT, pb.ROUTE_ROLE_ACCEPT)
    assert [(ip_address(c.ip), c.port) for c in again_a.peer_candidates] == [
        (ip_address("198.51.100.138"), 443)
    ]
    assert [r.route_id for r in await cluster.routes.all()] == [again_a.route_id]


async def test_same_network_again_is_no_move(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a", "global_ipv4")
    view = nms.connected[a.fqdn]
    await nms.register(
        a, local_addresses=list(view.network.local_addresses), observed=view.network.observed_ipv4
    )
    assert nms.last_handover(a.fqdn) is None


async def test_handover_forgotten_when_offline(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a", "global_ipv4")
    await nms.register(a, local_addresses=[E("198.51.100.99:443")], observed=None)
    assert nms.last_handover(a.fqdn) is not None
    await nms.disconnected(a)
    assert nms.last_handover(a.fqdn) is None
