"""The NMS's shared state on real Redis (and Postgres): TRS directory prefix, presence after
a Redis restart, pushes to a dead replica, route expiry, revocations by id cursor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from cyphonic_nms.config import NmsSettings
from cyphonic_nms.routing import Endpoint
from cyphonic_nms.server import NmsServer
from cyphonic_nms.testing import DOMAIN
from cyphonic_trs.storage import RedisCidTable, ReplicaInfo

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(120)]

SECRET = "integration-relay-secret-0123456789"
E = Endpoint.parse


@asynccontextmanager
async def nms_server(pg_url: str, redis_url: str, **settings: object) -> AsyncIterator[NmsServer]:
    """An in-process NMS replica (admin REST on an ephemeral port, no QUIC)."""
    server = NmsServer(NmsSettings(
        environment="test", database_url=pg_url, redis_url=redis_url, http_port=0,
        relay_token_secret=SECRET, replica_id="nms-x", **settings,  # type: ignore[arg-type]
    ), quic=False)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# --------------------------------------------------------------------------- TRS directory


async def test_nms_finds_trs_replicas_under_the_shared_prefix(
    pg_url: str, redis_url: str
) -> None:
    table = RedisCidTable.from_url(redis_url, prefix="site-b:")
    try:
        await table.register_replica(ReplicaInfo(
            replica=4, endpoints=("192.0.2.40:443",), server_name=f"trs.svc.{DOMAIN}"))
        async with nms_server(pg_url, redis_url, redis_prefix="site-b:") as nms:
            assert nms.manager is not None
            live = await nms.manager.trs.live()
            assert [(r.replica_id, [str(e) for e in r.endpoints]) for r in live] == [
                ("trs-4", ["192.0.2.40:443"])]
        # Another prefix is another deployment: its relays are not this NMS's.
        async with nms_server(pg_url, redis_url) as nms:
            assert nms.manager is not None
            assert await nms.manager.trs.live() == []
    finally:
        await table.close()
