"""The CID_A / CID_B exchange at the NMS: RelayCids forwarded to the other node of a relayed
route (locally and across replicas), and every refusal with its typed error."""

from __future__ import annotations

import os

import pytest
from cyphonic.errors import InvalidArgument, NotFound, PeerOffline, PermissionDenied
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.manager import NodeManager
from cyphonic_nms.routing import Endpoint
from cyphonic_nms.signalling import handle_request
from cyphonic_nms.trs_directory import TrsReplica
from cyphonic_testing.nms import InProcessCluster, RecordingLink

DOMAIN = "cyphonic.internal"


def cids(n: int = 16, size: int = 8) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


async def with_trs(cluster: InProcessCluster) -> None:
    await cluster.trs.register(
        TrsReplica(
            replica_id="trs-0",
            endpoints=(Endpoint.parse("192.0.2.9:443"),),
            server_name=f"trs.svc.{DOMAIN}",
        )
    )


async def relayed_pair(
    cluster: InProcessCluster, nms_a: NodeManager, nms_b: NodeManager
) -> tuple[RecordingLink, RecordingLink, str]:
    """Two NATed nodes (a at ``nms_a``, b at ``nms_b``) and their pattern-3 route."""
    a = await cluster.node(nms_a, "a", "nat_ipv4")
    b = await cluster.node(nms_b, "b", "nat_ipv4")
    response = await nms_a.route(a, pb.RouteRequest(fqdn=b.fqdn))
    assert response.pattern == pb.ROUTE_PATTERN_RELAY
    await b.wait_for("route_direction")
    return a, b, response.route_id


async def test_cids_are_pushed_to_the_other_node(cluster: InProcessCluster) -> None:
    await with_trs(cluster)
    nms = await cluster.replica("r1")
    a, b, route_id = await relayed_pair(cluster, nms, nms)
    cid_b = cids()
    echo = await nms.relay_cids(b, pb.RelayCids(route_id=route_id, connection_ids=cid_b))
    assert (echo.route_id, list(echo.connection_ids)) == (route_id, cid_b)
    pushed = (await a.wait_for("relay_cids")).relay_cids
    assert (pushed.route_id, list(pushed.connection_ids)) == (route_id, cid_b)
    assert b.of("relay_cids") == []  # nothing goes back to the sender
    # and the other way round (the connecting side's CIDs, CID_A)
    cid_a = cids()
    await nms.relay_cids(a, pb.RelayCids(route_id=route_id, connection_ids=cid_a))
    assert list((await b.wait_for("relay_cids")).relay_cids.connection_ids) == cid_a
    assert nms.metrics.pushes.labels(kind="relay_cids", via="local")._value.get() == 2


async def test_cids_cross_replicas_over_the_bus(cluster: InProcessCluster) -> None:
    await with_trs(cluster)
    r1 = await cluster.replica("r1")
    r2 = await cluster.replica("r2")
    a, b, route_id = await relayed_pair(cluster, r1, r2)
    cid_b = cids()
    await r2.relay_cids(b, pb.RelayCids(route_id=route_id, connection_ids=cid_b))
    assert list((await a.wait_for("relay_cids")).relay_cids.connection_ids) == cid_b
    assert r2.metrics.pushes.labels(kind="relay_cids", via="bus")._value.get() == 1


async def test_refusals(cluster: InProcessCluster) -> None:
    await with_trs(cluster)
    nms = await cluster.replica("r1")
    a, b, route_id = await relayed_pair(cluster, nms, nms)
    c = await cluster.node(nms, "c", "nat_ipv4")
    good = cids()
    with pytest.raises(NotFound, match="no active route"):
        await nms.relay_cids(b, pb.RelayCids(route_id="0123456789abcdef", connection_ids=good))
    with pytest.raises(PermissionDenied, match="not a node of route"):
        await nms.relay_cids(c, pb.RelayCids(route_id=route_id, connection_ids=good))
    with pytest.raises(PermissionDenied, match="register"):
        await nms.relay_cids(
            RecordingLink(fqdn=f"ghost.{DOMAIN}"),
            pb.RelayCids(route_id=route_id, connection_ids=good),
        )
    bad_bodies = [
        pb.RelayCids(route_id=route_id, connection_ids=[]),
        pb.RelayCids(route_id=route_id, connection_ids=cids(33)),
        pb.RelayCids(route_id=route_id, connection_ids=[*cids(3), os.urandom(7)]),
        pb.RelayCids(route_id=route_id, connection_ids=[os.urandom(21)]),
        pb.RelayCids(route_id=route_id, connection_ids=[good[0], good[0]]),
        pb.RelayCids(route_id="", connection_ids=good),
        pb.RelayCids(route_id="r" * 65, connection_ids=good),
    ]
    for body in bad_bodies:
        with pytest.raises(InvalidArgument):
            await nms.relay_cids(b, body)
    assert a.of("relay_cids") == [] and c.of("relay_cids") == []


async def test_not_relayed_route_and_offline_peer(cluster: InProcessCluster) -> None:
    await with_trs(cluster)
    nms = await cluster.replica("r1")
    g = await cluster.node(nms, "g", "global_ipv4")
    h = await cluster.node(nms, "h", "global_ipv4")
    direct = await nms.route(g, pb.RouteRequest(fqdn=h.fqdn))
    assert direct.pattern == pb.ROUTE_PATTERN_DIRECT
    with pytest.raises(InvalidArgument, match="not relayed"):
        await nms.relay_cids(g, pb.RelayCids(route_id=direct.route_id, connection_ids=cids()))
    a, b, route_id = await relayed_pair(cluster, nms, nms)
    # a's connection is gone but its route record lingers (another replica's view, say):
    nms._forget_local(a.fqdn)
    await cluster.presence.release(a.fqdn, "r1")
    with pytest.raises(PeerOffline):
        await nms.relay_cids(b, pb.RelayCids(route_id=route_id, connection_ids=cids()))


async def test_envelope_level_answers_and_typed_errors(cluster: InProcessCluster) -> None:
    await with_trs(cluster)
    nms = await cluster.replica("r1")
    a, b, route_id = await relayed_pair(cluster, nms, nms)
    request = pb.Envelope(
        version=pb.PROTOCOL_VERSION_1,
        relay_cids=pb.RelayCids(route_id=route_id, connection_ids=cids(4)),
    )
    answer = await handle_request(nms, b, request, observed=None)
    assert answer.WhichOneof("body") == "relay_cids"
    assert answer.relay_cids == request.relay_cids
    assert (await a.wait_for("relay_cids")).relay_cids == request.relay_cids
    unknown = pb.Envelope(
        version=pb.PROTOCOL_VERSION_1,
        relay_cids=pb.RelayCids(route_id="nope", connection_ids=cids(1)),
    )
    assert (await handle_request(nms, b, unknown, observed=None)).error.code == (
        pb.ERROR_CODE_NOT_FOUND
    )
    empty = pb.Envelope(version=pb.PROTOCOL_VERSION_1, relay_cids=pb.RelayCids(route_id=route_id))
    assert (await handle_request(nms, b, empty, observed=None)).error.code == (
        pb.ERROR_CODE_INVALID_ARGUMENT
    )
