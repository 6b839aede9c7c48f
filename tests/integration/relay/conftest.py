"""Real Postgres (a fresh database per test) and Redis (a database of its own, flushed) for
the relay tests."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from cyphonic.registry import create_engine, upgrade

PG_ADMIN_URL = os.environ.get("CYPHONIC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
# The NMS reads the TRS directory under the default key prefix, so these tests take a Redis
# database of their own rather than a key prefix.
REDIS_URL = os.environ.get("CYPHONIC_TEST_RELAY_REDIS", "redis://127.0.0.1:6379/13")
REQUIRE_SERVICES = os.environ.get("CYPHONIC_REQUIRE_SERVICES") == "1"


def _missing(what: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} (CYPHONIC_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(what)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """The URL of a new, migrated, empty registry database; dropped afterwards."""
    name = f"relay_{secrets.token_hex(6)}"
    try:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        _missing(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = create_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    try:
        yield url
    finally:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A Redis database for the relay tests, empty at the start and flushed afterwards."""
    client = redis_asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        _missing(f"Redis is not reachable at {REDIS_URL}: {exc}")
    await client.flushdb()
    try:
        yield REDIS_URL
    finally:
        await client.flushdb()
        await client.aclose()
