"""Restarts of Redis (with and without its data) and of Postgres lose nothing.

Two ``cyphonic-nms serve`` replicas and a ``cyphonic-trs serve`` on a *private* Postgres
cluster and a *private* redis-server of this test (``cyphonic_testing.private_servers``: the
machine's shared servers are never restarted). Four nodes (``NmsProtocolClient``, keepalives
every half second), two on each replica, two of them behind NAT so that a route between them
is relayed. After each restart the test waits until every node's presence, every route and
the TRS directory are back in Redis, then checks that leases did not change and that
registrations and route decisions (direct and relayed) work. The bound is the issue's 10 s
per restart; the benchmark (bench/control_plane.py) prints the exact figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from cyphonic.pki import PkiMaterial, init_pki
from cyphonic.registry import create_engine, make_sessionmaker, migrate
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.routing import Endpoint
from cyphonic_testing.nms import NmsProcess, add_node
from cyphonic_testing.nms_client import NmsProtocolClient, issue_node_identity
from cyphonic_testing.private_servers import PrivatePostgres, PrivateRedis, available
from cyphonic_testing.processes import ADMIN_TOKEN, RELAY_SECRET, ServiceProcess, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(420)]

DOMAIN = "cyphonic.internal"
BACK_WITHIN_S = 10.0
"""The issue's bound: presence, routes and the TRS directory back after a restart."""


@dataclass
class Bed:
    tmp: Path
    pki: PkiMaterial
    pg: PrivatePostgres
    redis: PrivateRedis
    url: str
    replicas: list[NmsProcess] = field(default_factory=list)
    trs: ServiceProcess | None = None
    nodes: dict[str, NmsProtocolClient] = field(default_factory=dict)
    talkers: list[asyncio.Task[None]] = field(default_factory=list)

    async def node(self, name: str, replica: NmsProcess, *, nat: bool) -> NmsProtocolClient:
        engine = create_engine(self.url)
        try:
            await add_node(make_sessionmaker(engine), name)
        finally:
            await engine.dispose()
        node = NmsProtocolClient(
            identity=issue_node_identity(self.pki.node_ca, f"{name}.{DOMAIN}"),
            trust=self.pki.trust,
            nms=("127.0.0.1", replica.quic_port),
            server_name=f"nms.svc.{DOMAIN}",
        )
        await node.connect()
        report = [Endpoint.parse(f"192.168.7.{len(self.nodes) + 2}:4433")] if nat else None
        await node.register(report)
        self.nodes[name] = node
        self.talkers.append(asyncio.create_task(self._talk(node)))
        return node

    @staticmethod
    async def _talk(node: NmsProtocolClient) -> None:
        # The test replicas' offline timeout is 4 s: keep the node present, through
        # restarts too (a failed keepalive is tried again).
        sequence = 0
        while True:
            sequence += 1
            with contextlib.suppress(Exception):
                await node.keepalive(sequence)
            await asyncio.sleep(0.5)

    async def redis_client(self) -> redis_asyncio.Redis:
        return redis_asyncio.Redis.from_url(self.redis.url)


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    why = available()
    if why:
        pytest.skip(f"private Redis/Postgres cannot run here: {why}")
    pg = PrivatePostgres(tmp_path / "pg")
    rds = PrivateRedis(tmp_path / "redis")
    b: Bed | None = None
    try:
        await asyncio.to_thread(pg.start)
        await asyncio.to_thread(rds.start)
        url = await pg.create_database("registry")
        await asyncio.to_thread(migrate, url)
        pki = init_pki(tmp_path / "pki", domain=DOMAIN, now=datetime.datetime.now(datetime.UTC))
        b = Bed(tmp=tmp_path, pki=pki, pg=pg, redis=rds, url=url)
        for replica_id in ("nms-1", "nms-2"):
            b.replicas.append(
                NmsProcess(
                    pki_dir=tmp_path / "pki",
                    database_url=url,
                    redis_url=rds.url,
                    replica_id=replica_id,
                    log_path=tmp_path / f"{replica_id}.log",
                    admin_token=ADMIN_TOKEN,
                    relay_secret=RELAY_SECRET,
                )
            )
        b.trs = ServiceProcess(
            "cyphonic_trs.cli",
            log_path=tmp_path / "trs.log",
            ready_marker=b"trs_serving",
            env={
                "CYPHONIC_PKI_DIR": str(tmp_path / "pki"),
                "CYPHONIC_DOMAIN": DOMAIN,
                "CYPHONIC_REDIS_URL": rds.url,
                "CYPHONIC_QUIC_HOST": "127.0.0.1",
                "CYPHONIC_QUIC_PORT": str(free_port(socket.SOCK_DGRAM, host="127.0.0.1")),
                "CYPHONIC_REPLICA_ID": "1",
                # Its heartbeat (the directory entry) every 3 s rather than 10 s: back in the
                # directory within the bound after Redis lost it (the NMS covers the gap
                # with the entries it read last, see trs_directory.RedisTrsDirectory).
                "CYPHONIC_SYNC_INTERVAL_S": "3",
            },
        )
        await asyncio.gather(*(p.start(within_s=180) for p in [*b.replicas, b.trs]))
        yield b
    finally:
        if b is not None:
            for task in b.talkers:
                task.cancel()
            for node in b.nodes.values():
                await node.close()
            for proc in [*b.replicas, *([b.trs] if b.trs else [])]:
                proc.stop()
        rds.stop(keep_data=False)
        pg.destroy()


async def _within(
    what: str,
    check: Callable[[], Awaitable[bool]],
    bound_s: float,
    state: Callable[[], Awaitable[object]] | None = None,
) -> float:
    started = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if await check():
                return time.monotonic() - started
        if time.monotonic() - started > bound_s:
            seen = await state() if state is not None else ""
            pytest.fail(f"{what} not back within {bound_s} s: {seen}")
        await asyncio.sleep(0.1)


async def _shared_state(bed: Bed) -> tuple[set[str], set[str], int]:
    client = await bed.redis_client()
    try:
        presence = {
            k.decode().rsplit(":", 1)[1] async for k in client.scan_iter("cyphonic:nms:presence:*")
        }
        routes = {m.decode() for m in await client.zrange("cyphonic:nms:route-index", 0, -1)}
        trs = int(await client.scard("cyphonic:trs:replicas"))
    finally:
        await client.aclose()
    return presence, routes, trs


async def _buses_listening(bed: Bed) -> bool:
    """Every replica is subscribed to its bus channel again (redis-py resubscribes on its
    next read after a restart): until then a decision that crosses replicas cannot reach
    the holder and is refused as ``PeerOffline``."""
    client = await bed.redis_client()
    try:
        counts = await client.pubsub_numsub(
            *(f"cyphonic:nms:replica:{r}" for r in ("nms-1", "nms-2"))
        )
    finally:
        await client.aclose()
    return all(int(n) >= 1 for _, n in counts)


async def _leases(bed: Bed) -> dict[int, tuple[str, str]]:
    conn = await asyncpg.connect(
        host="127.0.0.1", port=bed.pg.port, user="postgres", database="registry"
    )
    try:
        rows = await conn.fetch("SELECT node_id, ipv4, ipv6 FROM address_leases")
    finally:
        await conn.close()
    return {r["node_id"]: (r["ipv4"], r["ipv6"]) for r in rows}


async def test_redis_and_postgres_restarts_lose_nothing(bed: Bed) -> None:
    r1, r2 = bed.replicas
    a = await bed.node("alpha", r1, nat=True)
    b = await bed.node("bravo", r1, nat=False)
    c = await bed.node("charlie", r2, nat=True)
    d = await bed.node("delta", r2, nat=False)
    fqdns = {n.fqdn for n in (a, b, c, d)}

    async def trs_listed() -> bool:
        return (await _shared_state(bed))[2] >= 1

    await _within("the TRS in the directory", trs_listed, 60)
    relayed = await a.route(fqdn=c.fqdn)  # both behind NAT: relayed, across replicas
    assert relayed.pattern == pb.ROUTE_PATTERN_RELAY
    routes = {relayed.route_id, (await b.route(fqdn=d.fqdn)).route_id}
    presence, stored, _ = await _shared_state(bed)
    assert presence >= fqdns and stored >= routes
    leases = await _leases(bed)
    assert len(leases) == 4

    for keep_data in (False, True):
        await asyncio.to_thread(bed.redis.restart, keep_data=keep_data)

        async def all_back(expected: set[str] = routes) -> bool:
            presence, stored, trs = await _shared_state(bed)
            back = presence >= fqdns and stored >= expected and trs >= 1
            return back and await _buses_listening(bed)

        took = await _within(
            f"Redis state after a restart {'with' if keep_data else 'without'} its data",
            all_back,
            BACK_WITHIN_S,
            lambda: _shared_state(bed),
        )
        print(f"redis restart keep_data={keep_data}: state and buses back in {took:.1f} s")
        # Decisions work again, across replicas and relayed (the TRS directory).
        again = await c.route(fqdn=a.fqdn)
        assert again.pattern == pb.ROUTE_PATTERN_RELAY
        routes = {again.route_id, (await d.route(fqdn=b.fqdn)).route_id}

    await asyncio.to_thread(bed.pg.restart)

    async def registers() -> bool:
        await b.register()  # the registry's hot path, on a connection the restart cut
        return True

    took = await _within("registration after a Postgres restart", registers, BACK_WITHIN_S)
    print(f"postgres restart: registrations succeed again after {took:.1f} s")
    assert await _leases(bed) == leases  # every lease kept
    response = await d.route(fqdn=a.fqdn)
    assert response.peer_fqdn == a.fqdn
    presence, stored, _ = await _shared_state(bed)
    assert presence >= fqdns
