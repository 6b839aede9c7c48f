"""The console's pages and admin routes over httpx's ASGI transport (SQLite registry); the
AS and TRS admin APIs they call are answered by an httpx MockTransport that records what
the NMS sent. The browser test with real processes is tests/integration/console."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest
from cyphonic.admin import create_admin_app
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.api import router
from cyphonic_nms.config import NmsSettings
from cyphonic_nms.console import ASSETS, make_router, node_name
from cyphonic_nms.manager import NodeManager
from cyphonic_nms.route_reason import explain, transport
from cyphonic_nms.routing import Endpoint, NetworkInfo, classify, pattern_for
from cyphonic_nms.trs_directory import TrsReplica
from cyphonic_testing.nms import KIND, E, InProcessCluster

TOKEN = "admin-token-for-console-tests-0123456789"
AS_TOKEN = "as-admin-token-for-console-tests-012345"
Handler = Callable[[httpx.Request], httpx.Response]


def _settings(**extra: object) -> NmsSettings:
    return NmsSettings(environment="test", admin_token=TOKEN, **extra)  # type: ignore[arg-type]


def _client(
    manager: NodeManager, settings: NmsSettings, upstream: Handler | None = None
) -> httpx.AsyncClient:
    transport = httpx.MockTransport(upstream) if upstream else None
    app = create_admin_app(
        service="nms",
        title="NMS",
        admin_token=TOKEN,
        routers=[router, make_router(settings, transport=transport)],
    )
    app.state.manager = manager
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://nms",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


async def test_pages_are_public_strict_and_only_the_shipped_files(
    cluster: InProcessCluster,
) -> None:
    nms = await cluster.replica("r1")
    async with _client(nms, _settings()) as client:
        index = await client.get("/console/", headers={"Authorization": ""})
        assert index.status_code == 200
        assert index.headers["content-type"].startswith("text/html")
        assert 'id="login-form"' in index.text and "console.js" in index.text
        csp = index.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert index.headers["x-content-type-options"] == "nosniff"
        for name, media in ASSETS.items():
            got = await client.get(f"/console/{name}", headers={"Authorization": ""})
            assert got.status_code == 200 and got.headers["content-type"] == media
            assert len(got.content) > 200
        for bad in ("nope.js", "..%2Fapi.py", "%2e%2e%2fconsole.py", "web"):
            assert (await client.get(f"/console/{bad}")).status_code == 404
        assert (await client.get("/console/../api.py")).status_code == 404
        root = await client.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "console/"
        assert str(root.next_request.url if root.next_request else "") == "http://nms/console/"
        bare = await client.get("/console", follow_redirects=True, headers={"Authorization": ""})
        assert bare.status_code == 200 and str(bare.url) == "http://nms/console/"
        schema = (await client.get("/openapi.json")).json()
        assert {"/v1/console", "/v1/trs", "/v1/nodes/{fqdn}/revoke"} <= set(schema["paths"])


async def test_console_info_needs_the_token(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    settings = _settings(as_url="http://as.test:8081", trs_admin_urls=["http://trs-0:8083"])
    async with _client(nms, settings) as client:
        wrong = await client.get("/v1/console", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthenticated"
        assert (await client.get("/v1/console", headers={"Authorization": ""})).status_code == 401
        info = (await client.get("/v1/console")).json()
    assert info == {
        "replica_id": "r1",
        "domain": "cyphonic.internal",
        "revoke_available": True,
        "trs_admin_apis": 1,
        "policy_available": False,
    }


async def test_routes_say_why_and_how(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    await cluster.trs.register(
        TrsReplica(replica_id="7", endpoints=(Endpoint.parse("192.0.2.9:443"),), server_name="t")
    )
    a = await cluster.node(nms, "a", "global_ipv4")
    b = await cluster.node(nms, "b", "nat_ipv4")
    c = await cluster.node(nms, "c", "nat_ipv4")
    d = await cluster.node(nms, "d", "ipv6")
    e = await cluster.node(nms, "e", "ipv6")
    await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))
    await nms.route(b, pb.RouteRequest(fqdn=c.fqdn))
    await nms.route(d, pb.RouteRequest(fqdn=e.fqdn))
    await nms.route(d, pb.RouteRequest(fqdn=a.fqdn))
    async with _client(nms, _settings()) as client:
        items = (await client.get("/v1/routes")).json()["items"]
    got = {
        (r["initiator"][0], r["responder"][0]): (r["pattern"], r["transport"], r["reason_code"])
        for r in items
    }
    assert got == {
        ("a", "b"): (2, "QUIC/UDP over IPv4", "one_side_nat"),
        ("b", "c"): (3, "QUIC/UDP via TRS", "both_behind_nat"),
        ("d", "e"): (1, "QUIC/UDP over IPv6", "both_ipv6"),
        ("d", "a"): (3, "QUIC/UDP via TRS", "no_common_family"),
    }
    reasons = {(r["initiator"][0], r["responder"][0]): r["reason"] for r in items}
    assert reasons[("a", "b")].startswith("b is behind IPv4 NAT, a has a reachable IPv4")
    assert "d has only IPv6, a has only IPv4" in reasons[("d", "a")]
    assert {r["trs_replica"] for r in items if r["pattern"] == 3} == {"7"}


async def test_revoke_is_forwarded_to_the_as_with_the_as_token(
    cluster: InProcessCluster,
) -> None:
    nms = await cluster.replica("r1")
    sent: list[httpx.Request] = []

    def as_api(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path == "/v1/nodes/ghost/revoke":
            return httpx.Response(
                404, json={"error": {"code": "not_found", "message": "no node ghost"}}
            )
        return httpx.Response(
            200,
            json={
                "name": "alice",
                "fqdn": "alice.cyphonic.internal",
                "state": "revoked",
                "certificates": [{"status": "revoked"}, {"status": "superseded"}],
                "tags": {},
            },
        )

    settings = _settings(as_url="http://as.test:8081/", as_admin_token=AS_TOKEN)
    async with _client(nms, settings, as_api) as client:
        done = await client.post(
            "/v1/nodes/Alice.cyphonic.internal/revoke", json={"reason": "lost laptop"}
        )
        assert done.status_code == 200, done.text
        assert done.json() == {
            "fqdn": "alice.cyphonic.internal",
            "state": "revoked",
            "revoked_certificates": 1,
        }
        missing = await client.post("/v1/nodes/ghost.cyphonic.internal/revoke")
        assert missing.status_code == 404 and missing.json()["error"]["message"] == "no node ghost"
        foreign = await client.post("/v1/nodes/alice.example.com/revoke")
        assert foreign.status_code == 422
        unauth = await client.post(
            "/v1/nodes/alice.cyphonic.internal/revoke", headers={"Authorization": "Bearer no"}
        )
        assert unauth.status_code == 401
        extra = await client.post("/v1/nodes/alice.cyphonic.internal/revoke", json={"x": 1})
        assert extra.status_code == 422
    assert [str(r.url) for r in sent] == [
        "http://as.test:8081/v1/nodes/alice/revoke",
        "http://as.test:8081/v1/nodes/ghost/revoke",
    ]
    assert sent[0].headers["authorization"] == f"Bearer {AS_TOKEN}"
    assert json.loads(sent[0].content) == {"reason": "lost laptop"}


@pytest.mark.parametrize(
    ("answer", "status", "says"),
    [
        (httpx.Response(401, json={"error": {"code": "unauthenticated"}}), 503, "refused"),
        (httpx.Response(500, text="boom"), 503, "HTTP 500"),
        (httpx.Response(200, text="not json"), 503, "no JSON"),
        (httpx.Response(200, json={"unexpected": True}), 503, "unexpected form"),
    ],
)
async def test_revoke_maps_as_failures(
    cluster: InProcessCluster, answer: httpx.Response, status: int, says: str
) -> None:
    # The AS refusing the NMS's own token is a 503, not a 401 the console would read as
    # "your token is wrong".
    nms = await cluster.replica("r1")
    settings = _settings(as_url="http://as.test:8081")
    async with _client(nms, settings, lambda _r: answer) as client:
        got = await client.post("/v1/nodes/alice.cyphonic.internal/revoke")
    assert got.status_code == status and says in got.json()["error"]["message"]


async def test_revoke_without_an_as_or_with_the_as_down(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    async with _client(nms, _settings()) as client:
        got = await client.post("/v1/nodes/alice.cyphonic.internal/revoke")
        assert got.status_code == 503 and "CYPHONIC_AS_URL" in got.json()["error"]["message"]

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with _client(nms, _settings(as_url="http://:secret@as.test:1"), down) as client:
        got = await client.post("/v1/nodes/alice.cyphonic.internal/revoke")
    message = got.json()["error"]["message"]
    assert got.status_code == 503 and "unreachable" in message and "secret" not in message


async def test_trs_overview_joins_directory_and_admin_apis(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    await cluster.trs.register(
        TrsReplica(
            replica_id="trs-3",
            endpoints=(Endpoint.parse("192.0.2.9:443"),),
            server_name="trs.svc.cyphonic.internal",
            load=1,
            updated_ms=1,
        )
    )
    seen_tokens: set[str] = set()

    def trs_api(request: httpx.Request) -> httpx.Response:
        seen_tokens.add(request.headers["authorization"])
        if request.url.host == "trs-down":
            raise httpx.ConnectTimeout("slow", request=request)
        replica = 3 if request.url.host == "trs-3" else 4
        if request.url.path == "/v1/replica":
            return httpx.Response(
                200,
                json={
                    "replica": replica,
                    "sessions": 1,
                    "forwarded_packets": 10,
                    "forwarded_bytes": 1200,
                    "packets_per_s": 2.0,
                    "bits_per_s": 960.0,
                    "drops": {"unknown_cid": 1},
                    "last_sync_error": None,
                    "extra": "ignored",
                },
            )
        assert request.url.params["limit"] == "500"
        side = {"fqdn": "a.cyphonic.internal", "address": "127.0.0.1:5", "packets": 5, "bytes": 9}
        items = [
            {
                "route_id": f"r-{replica}",
                "pair": ["a.cyphonic.internal", "b.cyphonic.internal"],
                "sides": [side, None],
                "complete": False,
                "packets": 5,
                "bytes": 9,
                "age_s": 1.5,
                "idle_s": 0.5,
                "spoofed_drops": 0,
            }
        ]
        return httpx.Response(200, json={"items": items, "total": 1, "limit": 500, "offset": 0})

    settings = _settings(
        trs_admin_urls=["http://trs-3:8083", "http://trs-4:8083", "http://trs-down:8083"]
    )
    async with _client(nms, settings, trs_api) as client:
        overview = (await client.get("/v1/trs")).json()
    assert seen_tokens == {f"Bearer {TOKEN}"}  # the NMS's own token by default
    replicas = {r["replica_id"]: r for r in overview["replicas"]}
    assert (
        replicas["trs-3"]["in_directory"] and replicas["trs-3"]["admin_url"] == "http://trs-3:8083"
    )
    assert replicas["trs-3"]["endpoints"] == ["192.0.2.9:443"]
    assert replicas["trs-3"]["counters"]["drops"] == {"unknown_cid": 1}
    assert not replicas["trs-4"]["in_directory"]
    assert replicas["trs-4"]["counters"]["bits_per_s"] == 960
    assert [(s["replica_id"], s["route_id"]) for s in overview["sessions"]] == [
        ("trs-3", "r-3"),
        ("trs-4", "r-4"),
    ]
    assert overview["sessions"][0]["sides"][1] is None
    assert overview["problems"] == [
        {
            "source": "http://trs-down:8083",
            "message": "the TRS admin API at http://trs-down:8083 is unreachable (ConnectTimeout)",
        }
    ]


def test_node_name_of_an_fqdn() -> None:
    assert node_name("Alice.Cyphonic.Internal.", "cyphonic.internal") == "alice"
    for bad in (
        "alice.other.internal",
        "cyphonic.internal",
        ".cyphonic.internal",
        "a.b.cyphonic.internal",
    ):
        with pytest.raises(Exception, match="not a node"):
            node_name(bad, "cyphonic.internal")


def _net(kind: str, shift: int) -> NetworkInfo:
    """A node of ``kind`` as InProcessCluster registers one (addresses shifted per node)."""
    reported, observed = KIND[kind]
    reported = [Endpoint(ep.ip + shift, ep.port) for ep in reported]
    seen = Endpoint(observed.ip + shift, observed.port) if observed else reported[0]
    return classify(reported, seen)


@pytest.mark.parametrize(
    ("a", "b", "code"),
    [
        ("ipv6", "ipv6", "both_ipv6"),
        ("global_ipv4", "global_ipv4", "both_global_ipv4"),
        ("nat_ipv4", "global_ipv4", "one_side_nat"),
        ("global_ipv4", "nat_ipv4", "one_side_nat"),
        ("nat_ipv4", "nat_ipv4", "both_behind_nat"),
        ("ipv6", "nat_ipv4", "no_common_family"),
    ],
)
def test_each_reason_matches_the_decision(a: str, b: str, code: str) -> None:
    net_a, net_b = _net(a, 1), _net(b, 2)
    decision = pattern_for(net_a, net_b)
    reason = explain(
        pattern=decision.pattern,
        family=decision.family,
        initiator="a.cyphonic.internal",
        responder="b.cyphonic.internal",
        initiator_net=net_a,
        responder_net=net_b,
    )
    assert reason.code == code and reason.text
    if code == "one_side_nat":
        nat = "a" if a == "nat_ipv4" else "b"
        assert reason.text.startswith(f"{nat} is behind IPv4 NAT")


def test_reason_when_no_address_may_be_dialled_or_a_node_is_gone() -> None:
    # Both "global" on loopback, seen from elsewhere than loopback: a direct cell, no
    # candidate a peer may dial, so the NMS relays.
    loop = NetworkInfo(
        has_ipv4=True, has_ipv6=False, behind_nat=False, local_addresses=(E("127.0.0.1:1"),)
    )
    decision = pattern_for(loop, loop)
    assert decision.pattern == 3
    reason = explain(
        pattern=3,
        family=None,
        initiator="a.x",
        responder="b.x",
        initiator_net=loop,
        responder_net=loop,
    )
    assert reason.code == "no_dialable_address"
    gone = explain(
        pattern=3,
        family=None,
        initiator="a.x",
        responder="b.x",
        initiator_net=loop,
        responder_net=None,
    )
    assert gone.code == "unknown" and "b" in gone.text
    assert transport(1, 6) == "QUIC/UDP over IPv6" and transport(3, None) == "QUIC/UDP via TRS"


async def test_trs_admin_urls_from_a_template_follow_the_directory(
    cluster: InProcessCluster,
) -> None:
    nms = await cluster.replica("r1")
    now_ms = int(time.time() * 1000)
    for n, updated_ms in ((5, now_ms), (6, now_ms - 60_000)):
        await cluster.trs.register(
            TrsReplica(
                replica_id=f"trs-{n}",
                endpoints=(Endpoint.parse(f"192.0.2.{n}:443"),),
                server_name="trs.svc.cyphonic.internal",
                updated_ms=updated_ms,
            )
        )
    asked: list[str] = []

    def trs_api(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.url.host} {request.url.path}")
        n = int(request.url.host.rsplit("-", 1)[1])
        if request.url.path == "/v1/replica":
            return httpx.Response(
                200,
                json={
                    "replica": n,
                    "forwarded_packets": 0,
                    "forwarded_bytes": 0,
                    "packets_per_s": 0,
                    "bits_per_s": 0,
                    "drops": {},
                },
            )
        return httpx.Response(200, json={"items": []})

    settings = _settings(trs_admin_url_template="http://pod-{replica}:8083")
    async with _client(nms, settings, trs_api) as client:
        assert (await client.get("/v1/console")).json()["trs_admin_apis"] == 1
        overview = (await client.get("/v1/trs")).json()
    assert sorted(asked) == [
        "pod-5 /v1/replica",
        "pod-5 /v1/sessions",
        "pod-6 /v1/replica",
        "pod-6 /v1/sessions",
    ]
    replicas = {r["replica_id"]: r for r in overview["replicas"]}
    assert set(replicas) == {"trs-5", "trs-6"} and overview["problems"] == []
    assert replicas["trs-5"]["admin_url"] == "http://pod-5:8083"
    assert not replicas["trs-5"]["stale"] and replicas["trs-6"]["stale"]


@pytest.mark.parametrize("template", ["http://trs:8083", "http://trs-{replica}-{x}:8083"])
def test_a_trs_url_template_needs_replica_and_nothing_else(template: str) -> None:
    with pytest.raises(ValueError, match="replica"):
        _settings(trs_admin_url_template=template)


async def test_reasons_for_many_routes_read_the_nodes_in_one_list(
    cluster: InProcessCluster,
) -> None:
    nms = await cluster.replica("r1")
    links = [await cluster.node(nms, f"n{i:02d}", "global_ipv4") for i in range(24)]
    for a, b in zip(links[::2], links[1::2], strict=True):
        await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))
    async with _client(nms, _settings()) as client:
        items = (await client.get("/v1/routes")).json()["items"]
        few = (await client.get("/v1/routes", params={"limit": 2})).json()["items"]
    assert len(items) == 12
    assert {r["reason_code"] for r in items} == {"both_global_ipv4"}
    assert {r["reason_code"] for r in few} == {"both_global_ipv4"}


def test_a_route_the_networks_no_longer_give_is_outdated() -> None:
    nat, public = _net("nat_ipv4", 1), _net("global_ipv4", 2)
    assert pattern_for(nat, public).pattern == 2
    reason = explain(
        pattern=3,
        family=None,
        initiator="a.x",
        responder="b.x",
        initiator_net=nat,
        responder_net=public,
    )
    assert reason.code == "outdated"
