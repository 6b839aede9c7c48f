"""The NMS admin REST over httpx's ASGI transport, on a real SQLite registry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from cyphonic.admin import create_admin_app
from cyphonic.registry import ping
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.api import node_public, router
from cyphonic_testing.nms import E, InProcessCluster

TOKEN = "admin-token-for-tests-0123456789"


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


async def test_nodes_and_routes(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a", "global_ipv4")
    b = await cluster.node(nms, "b", "nat_ipv4")
    await cluster.node(nms, "c", "ipv6")
    await nms.disconnected(nms.connected["c.cyphonic.internal"].link)
    response = await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))
    async with _client(cluster, nms) as client:
        nodes = (await client.get("/v1/nodes")).json()
        assert nodes["total"] == 3
        by_name = {n["fqdn"]: n for n in nodes["items"]}
        assert by_name[b.fqdn]["network"]["behind_nat"] is True
        assert by_name[b.fqdn]["network"]["kind"] == "nat_ipv4"
        assert by_name[a.fqdn]["network"]["behind_nat"] is False
        assert by_name[b.fqdn]["virtual_ipv4"].startswith("100.64.0.")
        assert by_name[b.fqdn]["online"] and not by_name["c.cyphonic.internal"]["online"]
        assert by_name[a.fqdn]["last_seen"] is not None
        online = (await client.get("/v1/nodes", params={"online": "true"})).json()
        assert online["total"] == 2 and len(online["items"]) == 2
        page = (await client.get("/v1/nodes", params={"limit": 1, "offset": 1})).json()
        assert [n["fqdn"] for n in page["items"]] == [b.fqdn]
        one = await client.get(f"/v1/nodes/{a.fqdn}")
        assert one.status_code == 200 and one.json()["nms_replica"] == "r1"
        routes = (await client.get("/v1/routes")).json()
        assert [(r["route_id"], r["pattern"], r["pattern_name"]) for r in routes["items"]] == [
            (response.route_id, 2, "nat_connects")
        ]
        assert (await client.get("/v1/routes", params={"node": "c.cyphonic.internal"})).json()[
            "total"
        ] == 0
        replica = (await client.get("/v1/replica")).json()
        assert replica["connected_nodes"] == 2 and replica["ipv4_pool"] == "100.64.0.0/24"
        assert (await client.get("/readyz")).status_code == 200


async def test_errors_and_auth(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    async with _client(cluster, nms) as client:
        missing = await client.get("/v1/nodes/nobody.cyphonic.internal")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        bad = await client.get("/v1/nodes", params={"limit": "lots"})
        assert bad.status_code == 422
        assert bad.json()["error"]["code"] == "invalid_argument"
        assert (await client.get("/v1/nodes/bad name!")).status_code == 422
        unauth = await client.get("/v1/nodes", headers={"Authorization": "Bearer wrong"})
        assert unauth.status_code == 401
        assert (await client.get("/healthz", headers={"Authorization": ""})).status_code == 200
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200


async def test_node_silent_past_the_timeout_is_shown_offline(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a")
    view = await cluster.store.view(a.fqdn)
    assert view is not None and view.online
    assert node_public(view, offline_timeout_s=45).online
    # The row says online but nothing refreshed it for longer than the timeout.
    await cluster.store.touch(
        [view.node_id], replica="r1", now=datetime.now(UTC) - timedelta(minutes=5)
    )
    stale = await cluster.store.view(a.fqdn)
    assert stale is not None and stale.online
    assert not node_public(stale, offline_timeout_s=45).online
    assert node_public(stale).online  # without a timeout the row is taken as it is


async def test_node_view_shows_the_last_handover(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a", "nat_ipv4")
    async with _client(cluster, nms) as client:
        before = (await client.get(f"/v1/nodes/{a.fqdn}")).json()
        assert before["last_handover"] is None
        await nms.register(
            a, local_addresses=[E("192.168.3.10:443")], observed=E("203.0.113.77:40000")
        )
        after = (await client.get(f"/v1/nodes/{a.fqdn}")).json()
        handover = after["last_handover"]
        assert handover["old"]["observed_ipv4"] == before["network"]["observed_ipv4"]
        assert handover["new"]["observed_ipv4"] == "203.0.113.77:40000"
        assert handover["new"]["local_addresses"] == ["192.168.3.10:443"]
        assert after["network"] == handover["new"]
        assert after["virtual_ipv4"] == before["virtual_ipv4"]
        at = datetime.fromisoformat(handover["at"])
        assert abs(datetime.now(UTC) - at) < timedelta(seconds=30)
        listed = (await client.get("/v1/nodes")).json()["items"]
        assert listed[0]["last_handover"] == handover
