"""The NMS core against real Postgres and Redis: lease uniqueness under concurrency, lease
stability across a restart, cross-replica delivery through Redis pub/sub, TRS directory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_address

import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from cyphonic import relay_token
from cyphonic.errors import Exhausted, Revoked
from cyphonic.registry import create_engine, make_sessionmaker
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.cluster import RedisBus, RedisPresence, RedisRouteStore
from cyphonic_nms.leases import LeasePools
from cyphonic_nms.manager import NodeManager
from cyphonic_nms.routing import Endpoint
from cyphonic_nms.storage import SqlNodeStore
from cyphonic_nms.trs_directory import RedisTrsDirectory, TrsReplica
from cyphonic_testing.nms import RecordingLink, add_node, revoke_node

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(180)]

DOMAIN = "cyphonic.internal"
SECRET = b"integration-relay-secret-0123456789"
E = Endpoint.parse


@asynccontextmanager
async def replica(
    pg_url: str,
    name: str,
    *,
    redis_url: str | None = None,
    pool4: str = "100.64.0.0/16",
    pool_size: int = 10,
) -> AsyncIterator[NodeManager]:
    """One NMS replica with its own engine (and its own Redis client)."""
    engine = create_engine(pg_url, pool_size=pool_size)
    client = redis_asyncio.Redis.from_url(redis_url) if redis_url else None
    extra: dict[str, object] = {}
    if client is not None:
        extra = {
            "presence": RedisPresence(client),
            "bus": RedisBus(client),
            "routes": RedisRouteStore(client),
            "trs": RedisTrsDirectory(client),
        }
    manager = NodeManager(
        nodes=SqlNodeStore(make_sessionmaker(engine)),
        pools=LeasePools.from_settings(ipv4=pool4, ipv6=None, domain=DOMAIN),
        replica_id=name,
        relay_secret=SECRET,
        # Lease races, not admission control, are under test: admit every registration.
        max_pending_registrations=10_000,
        **extra,  # type: ignore[arg-type]
    )
    await manager.start()
    try:
        yield manager
    finally:
        await manager.stop()
        if client is not None:
            await client.aclose()
        await engine.dispose()


async def _enrol(pg_url: str, names: list[str]) -> None:
    engine = create_engine(pg_url)
    try:
        sessions = make_sessionmaker(engine)
        for name in names:
            await add_node(sessions, name)
    finally:
        await engine.dispose()


def _link(name: str, serial: str = "1") -> RecordingLink:
    return RecordingLink(fqdn=f"{name}.{DOMAIN}", serial_hex=serial)


async def _register(nms: NodeManager, link: RecordingLink, ip: str) -> None:
    await nms.register(link, local_addresses=[E(f"{ip}:443")], observed=E(f"{ip}:443"))


@pytest.mark.parametrize("pool4", ["100.64.0.0/16", "100.64.7.0/24"])
async def test_200_concurrent_registrations_never_collide(pg_url: str, pool4: str) -> None:
    names = [f"n{i:03d}" for i in range(200)]
    await _enrol(pg_url, names)
    # Two replicas with their own connection pools register 100 nodes each, all at once;
    # the /24 pool (254 addresses) makes the hashed proposals collide and retry.
    async with replica(pg_url, "r1", pool4=pool4) as r1, replica(pg_url, "r2", pool4=pool4) as r2:
        links = [_link(n) for n in names]
        results = await asyncio.gather(
            *(
                (r1 if i % 2 else r2).register(
                    link,
                    local_addresses=[E(f"198.51.100.{i % 250 + 1}:{1000 + i}")],
                    observed=E(f"198.51.100.{i % 250 + 1}:{1000 + i}"),
                )
                for i, link in enumerate(links)
            )
        )
    v4 = [r.lease.ipv4 for r in results]
    v6 = [r.lease.ipv6 for r in results]
    assert len(set(v4)) == 200 and len(set(v6)) == 200
    assert all(a in results[0].pools.ipv4 for a in v4)
    conn = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    try:
        rows = await conn.fetch("SELECT node_id, ipv4, ipv6 FROM address_leases")
    finally:
        await conn.close()
    assert len(rows) == 200
    assert {r["ipv4"] for r in rows} == {str(a) for a in v4}


async def test_same_node_registering_concurrently_gets_one_lease(pg_url: str) -> None:
    await _enrol(pg_url, ["twin"])
    async with replica(pg_url, "r1") as r1, replica(pg_url, "r2") as r2:
        results = await asyncio.gather(
            *(
                (r1 if i % 2 else r2).register(
                    _link("twin"), local_addresses=[], observed=E("198.51.100.1:443")
                )
                for i in range(20)
            )
        )
    assert len({(r.lease.ipv4, r.lease.ipv6) for r in results}) == 1


async def test_exhaustion_under_concurrency_is_exhausted(pg_url: str) -> None:
    names = [f"x{i}" for i in range(10)]
    await _enrol(pg_url, names)
    async with replica(pg_url, "r1", pool4="100.64.9.0/29") as nms:  # 6 addresses
        results = await asyncio.gather(
            *(
                nms.register(_link(n), local_addresses=[], observed=E("198.51.100.1:443"))
                for n in names
            ),
            return_exceptions=True,
        )
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(ok) == 6 and len({r.lease.ipv4 for r in ok}) == 6
    assert len(errors) == 4 and all(isinstance(e, Exhausted) for e in errors)
    assert "100.64.9.0/29" in str(errors[0])


async def test_lease_is_stable_across_restart_and_moves(pg_url: str) -> None:
    await _enrol(pg_url, ["mover"])
    async with replica(pg_url, "r1") as nms:
        first = await nms.register(
            _link("mover"), local_addresses=[E("10.0.0.2:443")], observed=E("203.0.113.2:40000")
        )
    async with replica(pg_url, "r1-restarted") as nms:
        second = await nms.register(
            _link("mover"), local_addresses=[E("198.51.100.9:443")], observed=E("198.51.100.9:443")
        )
        view = await nms.nodes.view(f"mover.{DOMAIN}")
    assert second.lease == first.lease
    assert first.network.behind_nat and not second.network.behind_nat
    assert view is not None and view.online and view.nms_replica == "r1-restarted"


async def test_cross_replica_route_through_redis(pg_url: str, redis_url: str) -> None:
    await _enrol(pg_url, ["a", "b"])
    async with (
        replica(pg_url, "r1", redis_url=redis_url) as r1,
        replica(pg_url, "r2", redis_url=redis_url) as r2,
    ):
        a, b = _link("a"), _link("b")
        await _register(r1, b, "198.51.100.2")
        await _register(r2, a, "198.51.100.1")
        response = await r2.route(a, pb.RouteRequest(fqdn=b.fqdn))
        db = (await b.wait_for("route_direction")).route_direction
        da = (await a.wait_for("route_direction")).route_direction
        assert db.route_id == da.route_id == response.route_id
        assert (da.role, db.role) == (pb.ROUTE_ROLE_CONNECT, pb.ROUTE_ROLE_ACCEPT)
        assert [(ip_address(c.ip), c.port) for c in da.peer_candidates] == [
            (ip_address("198.51.100.2"), 443)
        ]
        # Both replicas see the route (shared in Redis).
        assert [r.route_id for r in await r1.routes.all()] == [response.route_id]
        # b leaves replica 1: a (on replica 2) hears of it through Redis.
        await r1.disconnected(b)
        notice = (await a.wait_for("peer_offline")).peer_offline
        assert notice.route_id == response.route_id
        assert await r2.routes.all() == []


async def test_reconnect_to_other_replica_kicks_stale_connection(
    pg_url: str, redis_url: str
) -> None:
    await _enrol(pg_url, ["roamer", "peer"])
    async with (
        replica(pg_url, "r1", redis_url=redis_url) as r1,
        replica(pg_url, "r2", redis_url=redis_url) as r2,
    ):
        old = _link("roamer")
        await _register(r1, old, "198.51.100.5")
        new = _link("roamer")
        await _register(r2, new, "198.51.100.6")
        await old.wait_closed()
        assert "roamer.cyphonic.internal" not in r1.connected
        # Replica 1 dropping the stale connection must not mark the node offline.
        assert await r1.presence.holder(new.fqdn) == "r2"
        peer = _link("peer")
        await _register(r1, peer, "198.51.100.7")
        await r1.route(peer, pb.RouteRequest(fqdn=new.fqdn))
        assert (await new.wait_for("route_direction")).route_direction.peer_fqdn == peer.fqdn


async def test_relay_route_uses_trs_from_redis(pg_url: str, redis_url: str) -> None:
    await _enrol(pg_url, ["a", "b"])
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        directory = RedisTrsDirectory(client)
        await directory.register(
            TrsReplica(
                replica_id="trs-0",
                endpoints=(E("192.0.2.10:443"), E("[2001:db8::10]:443")),
                server_name=f"trs.svc.{DOMAIN}",
            )
        )
        await directory.register(
            TrsReplica(
                replica_id="trs-gone",
                endpoints=(E("192.0.2.11:443"),),
                server_name=f"trs.svc.{DOMAIN}",
            ),
            ttl_s=1,
        )
        await asyncio.sleep(1.2)
        assert [r.replica_id for r in await directory.live()] == ["trs-0"]
        async with replica(pg_url, "r1", redis_url=redis_url) as nms:
            a, b = _link("a"), _link("b")
            await nms.register(
                a, local_addresses=[E("10.0.0.1:443")], observed=E("203.0.113.1:1000")
            )
            await nms.register(
                b, local_addresses=[E("10.0.0.2:443")], observed=E("203.0.113.2:2000")
            )
            response = await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))
            assert response.pattern == pb.ROUTE_PATTERN_RELAY
            relay = (await b.wait_for("route_direction")).route_direction.relay
            assert [(ip_address(t.ip), t.port) for t in relay.trs] == [
                (ip_address("192.0.2.10"), 443),
                (ip_address("2001:db8::10"), 443),
            ]
            claims = relay_token.verify(relay.allocation_token, SECRET, now_ms=nms.wall_ms())
            assert claims.route_id == response.route_id and claims.involves(b.fqdn)
            assert (await nms.routes.all())[0].trs_replica == "trs-0"
    finally:
        await client.aclose()


async def test_revoked_node_is_cut_off_within_seconds(pg_url: str) -> None:
    await _enrol(pg_url, ["victim", "bystander"])
    async with replica(pg_url, "r1") as nms:
        victim, bystander = _link("victim", "v1"), _link("bystander", "b1")
        await _register(nms, victim, "198.51.100.1")
        await _register(nms, bystander, "198.51.100.2")
        view = await nms.nodes.view(victim.fqdn)
        assert view is not None
        engine = create_engine(pg_url)
        try:
            await revoke_node(
                make_sessionmaker(engine), view.node_id, serial="v1", reason="key_compromise"
            )
        finally:
            await engine.dispose()
        started = asyncio.get_running_loop().time()
        await victim.wait_closed(within_s=5)
        took = asyncio.get_running_loop().time() - started
        assert took < 3.0
        assert victim.of("revocation_notice")[0].revocation_notice.reason == "key_compromise"
        assert bystander.closed is None
        with pytest.raises(Revoked):
            await _register(nms, _link("victim", "v1"), "198.51.100.1")
