"""The NMS's shared state on real Redis (and Postgres): TRS directory prefix, presence after
a Redis restart, pushes to a dead replica, route expiry, revocations by id cursor."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as redis_asyncio
from cyphonic.errors import PeerOffline, Revoked
from cyphonic.registry import Revocation, create_engine, make_sessionmaker
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.cluster import RedisBus, RedisPresence, RedisRouteStore, redis_client
from cyphonic_nms.config import NmsSettings
from cyphonic_nms.leases import LeasePools
from cyphonic_nms.manager import NodeManager
from cyphonic_nms.routing import Endpoint
from cyphonic_nms.server import NmsServer
from cyphonic_nms.storage import SqlNodeStore
from cyphonic_testing.nms import DOMAIN, RecordingLink, add_node
from cyphonic_trs.storage import RedisCidTable, ReplicaInfo
from sqlalchemy import insert

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(120)]

SECRET = "integration-relay-secret-0123456789"
# Pub/sub channels are global to a Redis server: a prefix of this run's own keeps parallel
# test runs (other checkouts) from talking to these replicas.
PREFIX = f"t{secrets.token_hex(4)}:"
E = Endpoint.parse


@asynccontextmanager
async def nms_server(pg_url: str, redis_url: str, **settings: object) -> AsyncIterator[NmsServer]:
    """An in-process NMS replica (admin REST on an ephemeral port, no QUIC)."""
    server = NmsServer(
        NmsSettings(
            environment="test",
            database_url=pg_url,
            redis_url=redis_url,
            http_port=0,
            relay_token_secret=SECRET,
            replica_id="nms-x",
            **settings,  # type: ignore[arg-type]
        ),
        quic=False,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def replica(
    pg_url: str,
    redis_url: str,
    name: str,
    *,
    start: bool = True,
    offline_timeout_s: float = 45.0,
    keepalive_interval_s: float = 15.0,
    revocation_poll_s: float = 1.0,
) -> AsyncIterator[NodeManager]:
    """One NMS replica on Redis with its own engine and client. ``start=False`` leaves its
    periodic jobs off (a replica that crashed after the nodes registered) but subscribes
    it to its bus channel."""
    engine = create_engine(pg_url)
    client = redis_client(redis_url)
    manager = NodeManager(
        nodes=SqlNodeStore(make_sessionmaker(engine)),
        pools=LeasePools.from_settings(ipv4="100.64.0.0/16", ipv6=None, domain=DOMAIN),
        replica_id=name,
        relay_secret=SECRET.encode(),
        presence=RedisPresence(client, prefix=PREFIX),
        bus=RedisBus(client, prefix=PREFIX),
        routes=RedisRouteStore(client, prefix=PREFIX, ttl_s=offline_timeout_s),
        offline_timeout_s=offline_timeout_s,
        keepalive_interval_s=keepalive_interval_s,
        revocation_poll_s=revocation_poll_s,
    )
    if start:
        await manager.start()
    else:
        await manager.bus.subscribe(name, manager._on_bus)
    try:
        yield manager
    finally:
        if start:
            await manager.stop()
        else:
            await manager.bus.close()
        await client.aclose()
        await engine.dispose()


async def _enrol(pg_url: str, *names: str) -> None:
    engine = create_engine(pg_url)
    try:
        for name in names:
            await add_node(make_sessionmaker(engine), name)
    finally:
        await engine.dispose()


async def _register(nms: NodeManager, name: str, ip: str, serial: str = "1") -> RecordingLink:
    link = RecordingLink(fqdn=f"{name}.{DOMAIN}", serial_hex=serial)
    await nms.register(link, local_addresses=[E(f"{ip}:443")], observed=E(f"{ip}:443"))
    return link


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[redis_asyncio.Redis]:
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- presence


async def test_presence_lost_in_redis_comes_back_with_the_next_refresh(
    pg_url: str, redis_url: str, raw_redis: redis_asyncio.Redis
) -> None:
    await _enrol(pg_url, "a", "b")
    async with replica(pg_url, redis_url, "r1") as r1, replica(pg_url, redis_url, "r2") as r2:
        a = await _register(r1, "a", "198.51.100.1")
        key = f"{PREFIX}nms:presence:{a.fqdn}"
        assert await raw_redis.get(key) == b"r1"
        await raw_redis.delete(key)  # what a Redis restart without persistence does
        b = await _register(r2, "b", "198.51.100.2")
        with pytest.raises(PeerOffline):
            await r2.route(b, pb.RouteRequest(fqdn=a.fqdn))
        await r1.refresh_presence()
        assert await raw_redis.get(key) == b"r1"
        assert 0 < await raw_redis.pttl(key) <= 45_000
        response = await r2.route(b, pb.RouteRequest(fqdn=a.fqdn))
        pushed = (await a.wait_for("route_direction")).route_direction
        assert pushed.route_id == response.route_id
        # A node another replica holds now is not taken back by a refresh.
        await raw_redis.set(key, "r9")
        await r1.refresh_presence()
        assert await raw_redis.get(key) == b"r9"


# --------------------------------------------------------------------------- bus


async def test_push_to_a_dead_replica_is_peer_offline_not_ok(pg_url: str, redis_url: str) -> None:
    await _enrol(pg_url, "a", "b")
    async with replica(pg_url, redis_url, "r1") as r1, replica(pg_url, redis_url, "r2") as r2:
        a = await _register(r1, "a", "198.51.100.1")
        b = await _register(r2, "b", "198.51.100.2")
        await r2.bus.close()  # r2 dies: nobody listens on its channel, b's presence remains
        assert await r1.presence.holder(b.fqdn) == "r2"
        with pytest.raises(PeerOffline, match="r2"):
            await r1.route(a, pb.RouteRequest(fqdn=b.fqdn))
        assert await r1.routes.all() == []  # no half-made route left behind
        assert a.of("route_direction") == []


# --------------------------------------------------------------------------- routes


async def test_routes_of_a_crashed_replica_expire_live_ones_stay(
    pg_url: str, redis_url: str, raw_redis: redis_asyncio.Redis
) -> None:
    await _enrol(pg_url, "a", "b", "c")
    timing = {"offline_timeout_s": 2.0, "keepalive_interval_s": 0.5}
    async with (
        replica(pg_url, redis_url, "r1", **timing) as r1,
        replica(pg_url, redis_url, "r2", start=False, **timing) as r2,
    ):
        a = await _register(r1, "a", "198.51.100.1")
        c = await _register(r1, "c", "198.51.100.3")
        b = await _register(r2, "b", "198.51.100.2")  # r2 never refreshes: it "crashed"
        to_b = await r1.route(a, pb.RouteRequest(fqdn=b.fqdn))
        to_c = await r1.route(a, pb.RouteRequest(fqdn=c.fqdn))
        assert {r.route_id for r in await r1.routes.all()} == {to_b.route_id, to_c.route_id}

        # a and c stay connected at r1 (presence is the connection: nothing to send).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        started = loop.time()
        while loop.time() < deadline:
            if [r.route_id for r in await r1.routes.all()] == [to_c.route_id]:
                break
            await asyncio.sleep(0.25)
        took = loop.time() - started
        assert [r.route_id for r in await r1.routes.all()] == [to_c.route_id]
        # b's presence lapses after 2 s, its route at most one TTL (2 s) later.
        assert took < 6, f"the dead route stayed {took:.1f} s"
        # The live route outlives several TTLs; the dead one is gone everywhere.
        await asyncio.sleep(3 * timing["offline_timeout_s"])
        assert [r.route_id for r in await r1.routes.for_node(a.fqdn)] == [to_c.route_id]
        assert await r1.routes.get(to_b.route_id) is None
        assert await r1.routes.for_node(b.fqdn) == []
        assert await raw_redis.zscore(f"{PREFIX}nms:route-index", to_b.route_id) is None
        assert 0 < await raw_redis.pttl(f"{PREFIX}nms:route:{to_c.route_id}") <= 2000


# --------------------------------------------------------------------------- TRS directory


async def test_nms_finds_trs_replicas_under_the_shared_prefix(pg_url: str, redis_url: str) -> None:
    table = RedisCidTable.from_url(redis_url, prefix="site-b:")
    try:
        await table.register_replica(
            ReplicaInfo(replica=4, endpoints=("192.0.2.40:443",), server_name=f"trs.svc.{DOMAIN}")
        )
        async with nms_server(pg_url, redis_url, redis_prefix="site-b:") as nms:
            assert nms.manager is not None
            live = await nms.manager.trs.live()
            assert [(r.replica_id, [str(e) for e in r.endpoints]) for r in live] == [
                ("trs-4", ["192.0.2.40:443"])
            ]
        # Another prefix is another deployment: its relays are not this NMS's.
        async with nms_server(pg_url, redis_url) as nms:
            assert nms.manager is not None
            assert await nms.manager.trs.live() == []
    finally:
        await table.close()


# --------------------------------------------------------------------------- revocations


async def test_bulk_and_clock_skewed_revocations_all_cut_off(pg_url: str, redis_url: str) -> None:
    await _enrol(pg_url, "victim", "bystander", "fleet")
    async with replica(pg_url, redis_url, "r1", revocation_poll_s=0.2) as nms:
        victim = await _register(nms, "victim", "198.51.100.1", serial="7a")
        bystander = await _register(nms, "bystander", "198.51.100.2", serial="7b")
        engine = create_engine(pg_url)
        try:
            sessions = make_sessionmaker(engine)
            fleet = await nms.nodes.view(f"fleet.{DOMAIN}")
            target = await nms.nodes.view(victim.fqdn)
            assert fleet is not None and target is not None
            # The AS's clock is an hour behind and it revokes 1500 certificates at once;
            # the victim's comes last.
            skewed = datetime.now(UTC) - timedelta(hours=1)
            rows = [
                {
                    "node_id": fleet.node_id,
                    "serial": f"f{i:04x}",
                    "reason": "fleet recall",
                    "revoked_at": skewed,
                }
                for i in range(1500)
            ]
            rows.append(
                {
                    "node_id": target.node_id,
                    "serial": "7a",
                    "reason": "key_compromise",
                    "revoked_at": skewed,
                }
            )
            async with sessions() as s, s.begin():
                await s.execute(insert(Revocation), rows)
        finally:
            await engine.dispose()
        error = await victim.wait_closed(within_s=10)
        assert isinstance(error, Revoked)
        assert victim.of("revocation_notice")[0].revocation_notice.reason == "key_compromise"
        assert bystander.closed is None


async def test_revocation_committed_out_of_id_order_is_not_missed(
    pg_url: str, redis_url: str
) -> None:
    await _enrol(pg_url, "early", "late")
    async with replica(pg_url, redis_url, "r1", revocation_poll_s=0.2) as nms:
        early = await _register(nms, "early", "198.51.100.1", serial="e1")
        late = await _register(nms, "late", "198.51.100.2", serial="l1")
        ids = {}
        for name in ("early", "late"):
            view = await nms.nodes.view(f"{name}.{DOMAIN}")
            assert view is not None
            ids[name] = view.node_id
        engine = create_engine(pg_url)
        try:
            sessions = make_sessionmaker(engine)
            now = datetime.now(UTC)
            async with sessions() as slow:
                # The slow transaction takes the lower id but commits second.
                await slow.begin()
                await slow.execute(
                    insert(Revocation),
                    [
                        {
                            "node_id": ids["early"],
                            "serial": "e1",
                            "reason": "slow",
                            "revoked_at": now,
                        }
                    ],
                )
                async with sessions() as fast, fast.begin():
                    await fast.execute(
                        insert(Revocation),
                        [
                            {
                                "node_id": ids["late"],
                                "serial": "l1",
                                "reason": "fast",
                                "revoked_at": now,
                            }
                        ],
                    )
                await late.wait_closed(within_s=5)  # the poll moved past the slow one's id
                await asyncio.sleep(0.5)
                assert early.closed is None
                await slow.commit()
            assert isinstance(await early.wait_closed(within_s=5), Revoked)
        finally:
            await engine.dispose()


async def test_presence_of_1000_nodes_is_two_redis_round_trips_per_refresh(
    redis_url: str, raw_redis: redis_asyncio.Redis
) -> None:
    """A replica's refresh keeps every node it holds present (and their routes alive) with one
    script call each, however many nodes: no per-node, per-keepalive Redis traffic."""
    client = redis_client(redis_url)
    presence = RedisPresence(client, prefix=PREFIX)
    routes = RedisRouteStore(client, prefix=PREFIX, ttl_s=3.0)
    fqdns = [f"n{i:04d}.{DOMAIN}" for i in range(1000)]
    calls: list[str] = []
    execute = client.execute_command

    async def counting(*args: object, **kwargs: object) -> object:
        calls.append(str(args[0]))
        return await execute(*args, **kwargs)

    client.execute_command = counting
    try:
        for f in fqdns[:10]:
            await presence.claim(f, "r1", 3.0)
        calls.clear()
        # The other 990 were never claimed (or Redis lost them): the refresh puts them back.
        assert await presence.refresh(fqdns, "r1", 3.0) == 990
        await routes.refresh(fqdns)
        assert len(calls) == 2, calls
        for _ in range(3):  # past the TTL: refreshes alone keep all of them present
            await asyncio.sleep(1.2)
            calls.clear()
            assert await presence.refresh(fqdns, "r1", 3.0) == 0
            await routes.refresh(fqdns)
            assert len(calls) == 2, calls
        holders = await raw_redis.mget([f"{PREFIX}nms:presence:{f}" for f in fqdns])
        assert holders == [b"r1"] * 1000
    finally:
        await raw_redis.delete(*[f"{PREFIX}nms:presence:{f}" for f in fqdns])
        await client.aclose()


async def test_a_storm_of_presence_claims_waits_for_redis_connections(redis_url: str) -> None:
    """More claims at once than the client's connections (a reconnect storm's
    registrations and departures): they wait their turn, none fails; redis-py's default
    pool refused the surplus at once with ``Too many connections``."""
    from cyphonic.redis_client import MAX_CONNECTIONS

    client = redis_client(redis_url)
    presence = RedisPresence(client, prefix=PREFIX)
    count = 5 * MAX_CONNECTIONS
    try:
        previous = await asyncio.gather(
            *(presence.claim(f"n{i}.{DOMAIN}", "nms-1", 30.0) for i in range(count))
        )
        assert previous == [None] * count
        pool = client.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= MAX_CONNECTIONS
        assert await presence.holder(f"n{count - 1}.{DOMAIN}") == "nms-1"
    finally:
        await client.aclose()
