"""The access policy across real ``cyphonic-nms serve`` processes (two replicas on Postgres and
Redis), nodes as real QUIC clients: a policy set through one replica's admin REST reaches the
nodes of both replicas within 1 s as ``PolicyFilter`` pushes, routes it no longer allows are
withdrawn at both ends, and a forbidden route request gets ``POLICY_DENIED`` on the wire."""

from __future__ import annotations

import asyncio
import time

import pytest
from cyphonic.errors import PolicyDenied
from cyphonic.policy import filter_from_pb
from cyphonic_testing.nms_client import NmsProtocolClient
from test_nms_processes import World, pki_material, world  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(240)]

D = "cyphonic.internal"


async def _filters_after(node: NmsProtocolClient, count: int, within_s: float) -> float:
    """Seconds until ``node`` holds ``count`` policy_filter pushes."""
    start = time.perf_counter()
    await node.wait_for("policy_filter", count=count, within_s=within_s)
    return time.perf_counter() - start


async def test_policy_reaches_nodes_of_every_replica_within_a_second(world: World) -> None:  # noqa: F811
    r1 = await world.nms("nms-1")
    r2 = await world.nms("nms-2")
    a = await world.node("a", r1)
    b = await world.node("b", r2)
    c = await world.node("c", r2)
    for n in (a, b, c):
        await n.register()
    for n in (a, b, c):
        first = await n.wait_for("policy_filter", within_s=5)
        assert filter_from_pb(first.policy_filter).allow_all  # no policy: the default allows
    # a route a<->c, allowed for now
    await a.route(fqdn=c.fqdn)
    await c.wait_for("route_direction")
    async with r1.admin() as admin:
        for name, group in (("a", "eng"), ("b", "servers")):
            r = await admin.put(f"/v1/nodes/{name}.{D}/tags", json={"tags": {"group": group}})
            assert r.status_code == 200, r.text
        counts = {n.fqdn: len(n.of("policy_filter")) for n in (a, b, c)}
        policy = {
            "rules": [
                {"from": ["group:eng"], "to": ["group:servers"], "proto": "tcp", "ports": [22]}
            ]
        }
        sent = time.perf_counter()
        r = await admin.put("/v1/policy", json=policy)
        assert r.status_code == 200, r.text
        revision = r.json()["revision"]
    # every node's filter at this revision within 1 s, whichever replica holds it
    async with asyncio.timeout(1.0):
        while True:
            latest = {n.fqdn: n.of("policy_filter")[-1].policy_filter for n in (a, b, c)}
            if all(f.revision >= revision for f in latest.values()):
                break
            await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - sent
    assert elapsed < 1.0
    assert all(len(n.of("policy_filter")) > counts[n.fqdn] for n in (a, b, c))
    fb = filter_from_pb(latest[b.fqdn])
    assert len(fb.entries) == 1 and fb.entries[0].sources == {
        a.registration.virtual_ipv4,  # type: ignore[union-attr]
        a.registration.virtual_ipv6,  # type: ignore[union-attr]
    }
    assert filter_from_pb(latest[c.fqdn]).entries == ()
    # the route a<->c was withdrawn at both ends
    for node, peer in ((a, c), (c, a)):
        notice = (await node.wait_for("peer_offline", within_s=1.0)).peer_offline
        assert (notice.fqdn, notice.reason) == (peer.fqdn, "policy")
    # forbidden: a typed error on the wire; allowed: a route
    with pytest.raises(PolicyDenied):
        await c.route(fqdn=b.fqdn)
    with pytest.raises(PolicyDenied):
        await b.route(fqdn=a.fqdn)
    response = await a.route(fqdn=b.fqdn)
    assert response.peer_fqdn == b.fqdn
    # b may still answer a packet to a's address (replies after the tunnel idled out)
    await b.route(virtual_address=a.registration.virtual_ipv4)  # type: ignore[union-attr]
