"""Small parts: TRS choice, wire forms of shared state, settings checks."""

from __future__ import annotations

import pytest
from cyphonic.errors import InvalidArgument
from cyphonic_nms.cluster import BusMessage, InProcessPresence, InProcessRouteStore, RouteRecord
from cyphonic_nms.config import NmsSettings
from cyphonic_nms.routing import Endpoint
from cyphonic_nms.trs_directory import TrsReplica, pick
from pydantic import ValidationError


def _trs(name: str) -> TrsReplica:
    return TrsReplica(
        replica_id=name,
        endpoints=(Endpoint.parse("192.0.2.1:443"),),
        server_name="trs.svc.cyphonic.internal",
    )


def test_pick_is_stable_and_spreads() -> None:
    replicas = [_trs(f"trs-{i}") for i in range(3)]
    chosen = [pick(replicas, f"route-{i}") for i in range(300)]
    assert chosen == [pick(list(reversed(replicas)), f"route-{i}") for i in range(300)]
    counts = {r.replica_id: sum(c is r for c in chosen) for r in replicas}
    assert all(60 <= n <= 140 for n in counts.values()), counts
    # Removing one replica moves only the routes it had.
    survivors = replicas[:2]
    for i, c in enumerate(chosen):
        if c is not None and c.replica_id != "trs-2":
            assert pick(survivors, f"route-{i}") is c
    assert pick([], "r") is None


def test_trs_registration_json() -> None:
    replica = TrsReplica(
        replica_id="trs-0",
        endpoints=(Endpoint.parse("192.0.2.10:443"), Endpoint.parse("[2001:db8::10]:443")),
        server_name="trs.svc.cyphonic.internal",
        load=3,
        updated_ms=5,
    )
    assert TrsReplica.from_json(replica.to_json()) == replica
    with pytest.raises(InvalidArgument):
        TrsReplica.from_json('{"replica_id": "x"}')
    # What the TRS writes has more fields; they are ignored.
    extra = (
        '{"replica_id": "trs-1", "endpoints": ["192.0.2.1:443"], "server_name": "t", '
        '"replica": 1, "forwarded_packets": 7}'
    )
    assert TrsReplica.from_json(extra).replica_id == "trs-1"


def test_bus_message_and_route_record_round_trip() -> None:
    message = BusMessage(op="push", fqdn="a.cyphonic.internal", payload=b"\x00\xffbytes")
    assert BusMessage.from_json(message.to_json()) == message
    route = RouteRecord(
        route_id="r",
        initiator="a",
        responder="b",
        pattern=3,
        family=None,
        connector="initiator",
        trs_replica="trs-0",
        created_ms=1,
        decided_by="nms-0",
    )
    assert RouteRecord.from_json(route.to_json()) == route
    assert route.peer_of("a") == "b" and route.involves("b") and not route.involves("c")


async def test_in_process_presence_and_routes() -> None:
    presence = InProcessPresence()
    assert await presence.claim("a", "r1", 45) is None
    assert await presence.claim("a", "r2", 45) == "r1"
    assert not await presence.release("a", "r1")  # r1 no longer holds it
    assert await presence.holder("a") == "r2"
    assert await presence.release("a", "r2") and await presence.holder("a") is None
    routes = InProcessRouteStore()
    r1 = RouteRecord(
        route_id="1",
        initiator="a",
        responder="b",
        pattern=1,
        family=4,
        connector="initiator",
        trs_replica=None,
        created_ms=1,
        decided_by="x",
    )
    r2 = RouteRecord(
        route_id="2",
        initiator="c",
        responder="a",
        pattern=2,
        family=4,
        connector="initiator",
        trs_replica=None,
        created_ms=2,
        decided_by="x",
    )
    await routes.put(r1)
    await routes.put(r2)
    assert {r.route_id for r in await routes.for_node("a")} == {"1", "2"}
    await routes.remove(r1)
    assert [r.route_id for r in await routes.for_node("a")] == ["2"]
    assert await routes.for_node("b") == []


def test_settings_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CYPHONIC_RELAY_TOKEN_SECRET", raising=False)
    with pytest.raises(ValidationError):
        NmsSettings(keepalive_interval_s=30, offline_timeout_s=20)
    local = NmsSettings()
    assert local.http_port == 8082 and local.keepalive_interval_s == 15
    assert local.relay_secret()  # local development default
    production = NmsSettings(
        environment="production", admin_token="x" * 30, database_url="postgresql://db/nms"
    )
    with pytest.raises(InvalidArgument):
        production.relay_secret()
    monkeypatch.setenv("CYPHONIC_IPV4_POOL", "100.65.0.0/20")
    monkeypatch.setenv("CYPHONIC_TRS_ENDPOINTS", '["192.0.2.12:443"]')
    from_env = NmsSettings()
    assert from_env.ipv4_pool == "100.65.0.0/20"
    assert from_env.trs_endpoints == ["192.0.2.12:443"]
