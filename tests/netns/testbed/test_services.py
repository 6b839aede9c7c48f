"""Services for namespaces: a private Redis in a cloud host, Postgres over its unix socket."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
from cyphonic_testbed import postgres_url, v4_v6
from cyphonic_testbed.services import POSTGRES_SOCKET_DIR

pytestmark = pytest.mark.timeout(60)


def test_private_redis_in_a_cloud_host_is_reachable_and_stopped_at_teardown(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(v4_v6(services=("as", "nms", "trs", "redis")))
    redis = bed.start_redis("redis")
    assert redis.url == f"redis://{bed.host('redis').address(family=4)}:6379/0"
    nms = bed.host("nms")
    cli = ["redis-cli", "-h", redis.address, "-p", "6379"]
    assert nms.run([*cli, "SET", "cid:1", "trs"], check=True).stdout.strip() == "OK"
    assert nms.run([*cli, "GET", "cid:1"], check=True).stdout.strip() == "trs"
    # Also over IPv6, and through the python client the services use.
    v6 = bed.host("redis").address(family=6)
    assert nms.run(["redis-cli", "-h", v6, "ping"], check=True).stdout.strip() == "PONG"
    script = textwrap.dedent(
        f"""
        import redis
        print(redis.Redis.from_url({redis.url!r}).get("cid:1").decode())
        """
    )
    assert nms.run([sys.executable, "-c", script], check=True).stdout.strip() == "trs"
    # Persistence off: nothing written.
    assert nms.run([*cli, "CONFIG", "GET", "save"], check=True).stdout.split()[1:] == []
    pid = redis.process.pid
    bed.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.postgres
def test_postgres_is_reachable_from_a_namespace_through_its_socket(netbed) -> None:  # type: ignore[no-untyped-def]
    if not os.path.exists(os.path.join(POSTGRES_SOCKET_DIR, ".s.PGSQL.5432")):
        pytest.fail(f"PostgreSQL is not running: no socket in {POSTGRES_SOCKET_DIR}")
    bed = netbed(v4_v6())
    as_ = bed.host("as")
    # Loopback of the host is out of reach from inside ...
    probe = "import socket; socket.create_connection(('127.0.0.1', 5432), timeout=1)"
    assert as_.run([sys.executable, "-c", probe]).returncode != 0
    # ... the unix socket is not.
    script = textwrap.dedent(
        f"""
        import asyncio
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        async def main():
            engine = create_async_engine({postgres_url()!r})
            async with engine.connect() as conn:
                print((await conn.execute(text("select 40 + 2"))).scalar_one())
            await engine.dispose()

        asyncio.run(main())
        """
    )
    assert as_.run([sys.executable, "-c", script], check=True, timeout=30).stdout.strip() == "42"
