"""The access policy in the NMS: admin REST, route decisions, filter pushes and withdrawals,
on a real SQLite registry (the Postgres run is in tests/integration/nms)."""

from __future__ import annotations

import time

import httpx
import pytest
from cyphonic.admin import create_admin_app
from cyphonic.errors import PolicyDenied
from cyphonic.policy import filter_from_pb
from cyphonic.registry import ping
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.api import router
from cyphonic_testing.nms import InProcessCluster, RecordingLink

TOKEN = "admin-token-for-tests-0123456789"
D = "cyphonic.internal"

POLICY = {
    "rules": [
        {"from": ["group:eng"], "to": ["group:servers"], "proto": "tcp", "ports": ["22"]},
    ]
}


def _client(cluster: InProcessCluster, manager: object) -> httpx.AsyncClient:
    app = create_admin_app(
        service="nms",
        title="NMS",
        admin_token=TOKEN,
        ready_checks=[lambda: ping(cluster.engine)],
        routers=[router],
    )
    app.state.manager = manager
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://nms",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


def _filters(link: RecordingLink) -> list[pb.PolicyFilter]:
    return [e.policy_filter for e in link.of("policy_filter")]


async def test_default_allows_all_and_pushes_an_open_filter(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a")
    b = await cluster.node(nms, "b")
    await a.wait_for("policy_filter")
    await nms.sync_policy()
    assert filter_from_pb(_filters(a)[-1]).allow_all
    response = await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))
    assert response.peer_fqdn == b.fqdn


async def test_policy_via_rest_drives_routes_filters_and_withdrawals(
    cluster: InProcessCluster,
) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a")  # eng
    b = await cluster.node(nms, "b")  # servers
    c = await cluster.node(nms, "c")  # nothing
    await nms.route(a, pb.RouteRequest(fqdn=c.fqdn))  # allowed while no policy is set
    async with _client(cluster, nms) as client:
        # tags make groups
        r = await client.put(f"/v1/nodes/a.{D}/tags", json={"tags": {"group": "eng"}})
        assert r.status_code == 200, r.text
        assert (
            await client.put(f"/v1/nodes/b.{D}/tags", json={"tags": {"group": "servers"}})
        ).status_code == 200
        assert (await client.get(f"/v1/nodes/b.{D}/tags")).json()["tags"] == {"group": "servers"}
        assert (await client.put("/v1/nodes/ghost.x/tags", json={"tags": {}})).status_code == 404
        bad_tag = await client.put(f"/v1/nodes/a.{D}/tags", json={"tags": {"bad key": "x"}})
        assert bad_tag.status_code == 422
        # a bad document: 422, every problem located, nothing stored
        bad = await client.put(
            "/v1/policy",
            json={"rules": [{"from": ["grp:x"], "to": ["*"], "proto": "tcp", "ports": ["0"]}]},
        )
        assert bad.status_code == 422
        where = [d["where"] for d in bad.json()["error"]["details"]]
        assert where == ["rules[0].from[0]", "rules[0].ports[0]"]
        assert (await client.put("/v1/policy", content=b"{nope")).status_code == 400
        assert (await client.get("/v1/policy")).json()["in_force"] == "default-allow"
        # the real one
        started = time.perf_counter()
        ok = await client.put("/v1/policy", json=POLICY)
        applied_s = time.perf_counter() - started
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["in_force"] == "document" and body["document"] == POLICY
        assert body["updated_by"] == "admin"
        stale = await client.put("/v1/policy", json=POLICY, params={"expected_revision": 1})
        assert stale.status_code == 409
        # the route a<->c is no longer allowed: both sides were told before the answer came
        for link, peer in ((a, c), (c, a)):
            notice = (await link.wait_for("peer_offline", within_s=1.0)).peer_offline
            assert notice.fqdn == peer.fqdn and notice.reason == "policy"
        assert applied_s < 1.0
        # b's filter lets a in on tcp/22; a's and c's filters let nobody start anything
        fb = filter_from_pb(_filters(b)[-1])
        assert not fb.allow_all and len(fb.entries) == 1
        lease_a = nms.connected[a.fqdn].lease
        assert fb.entries[0].sources == {lease_a.ipv4.packed, lease_a.ipv6.packed}
        assert [(r.first, r.last) for r in fb.entries[0].ports] == [(22, 22)]
        assert filter_from_pb(_filters(a)[-1]).entries == ()
        assert filter_from_pb(_filters(c)[-1]).entries == ()
        # dry run
        check = (
            await client.get(
                "/v1/policy/check", params={"from": a.fqdn, "to": b.fqdn, "traffic": "tcp/22"}
            )
        ).json()
        assert check["allowed"] and check["rule"] == 0 and check["route_allowed"]
        check = (
            await client.get(
                "/v1/policy/check", params={"from": a.fqdn, "to": b.fqdn, "traffic": "udp/22"}
            )
        ).json()
        assert not check["allowed"] and check["route_allowed"]
        reverse = await client.get("/v1/policy/check", params={"from": b.fqdn, "to": a.fqdn})
        assert not reverse.json()["allowed"] and reverse.json()["route_allowed"]
        assert (
            await client.get(
                "/v1/policy/check", params={"from": a.fqdn, "to": b.fqdn, "traffic": "tcp/x"}
            )
        ).status_code == 422
        assert (
            await client.get("/v1/policy/check", params={"from": "ghost.x", "to": b.fqdn})
        ).status_code == 404
        # history: who, when, old and new; tags do not make history entries
        history = (await client.get("/v1/policy/history")).json()
        assert [(h["old_document"], h["new_document"]) for h in history] == [(None, POLICY)]
        # routes follow the rules
        await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))
        with pytest.raises(PolicyDenied):
            await nms.route(c, pb.RouteRequest(fqdn=b.fqdn))
        with pytest.raises(PolicyDenied):
            await nms.route(b, pb.RouteRequest(fqdn=a.fqdn))  # b may not start traffic to a
        # ...but a packet of b to a's address (a reply after the tunnel idled out) may
        await nms.route(b, pb.RouteRequest(virtual_address=lease_a.ipv4.packed))
        # back to the default
        gone = await client.delete("/v1/policy")
        assert gone.json()["in_force"] == "default-allow"
        assert filter_from_pb(_filters(c)[-1]).allow_all
        history = (await client.get("/v1/policy/history")).json()
        assert [h["new_document"] for h in history] == [None, POLICY]
        # unauthenticated
        assert (
            await client.get("/v1/policy", headers={"Authorization": "Bearer x"})
        ).status_code == 401


async def test_deny_by_default(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    assert nms.access is not None
    nms.access.default_deny = True
    a = await cluster.node(nms, "a")
    b = await cluster.node(nms, "b")
    await nms.sync_policy(force=True)
    assert filter_from_pb(_filters(a)[-1]).entries == ()
    assert not filter_from_pb(_filters(a)[-1]).allow_all
    with pytest.raises(PolicyDenied) as info:
        await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))
    assert info.value.to_wire().code == pb.ERROR_CODE_POLICY_DENIED


async def test_a_change_made_at_another_replica_arrives_by_polling(
    cluster: InProcessCluster,
) -> None:
    r1 = await cluster.replica("r1")
    r2 = await cluster.replica("r2")
    a = await cluster.node(r1, "a")
    await cluster.node(r2, "b")
    async with _client(cluster, r2) as client:
        assert (await client.put("/v1/policy", json={"rules": []})).status_code == 200
    before = len(_filters(a))
    await r1.sync_policy()  # what r1's poll loop does every policy_poll_s
    assert len(_filters(a)) == before + 1
    assert filter_from_pb(_filters(a)[-1]).entries == ()
    assert filter_from_pb(_filters(a)[-1]).revision == 1
