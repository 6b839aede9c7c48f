"""Fixtures of the TRS integration tests: the real Redis, under a key prefix of their own.

Each test gets a ``RedisCidTable`` whose keys all start with ``cyphonic-test:<random>:``;
every key under that prefix is deleted afterwards, pass or fail. Without a reachable Redis
the tests are skipped with a message saying so (``CYPHONIC_REQUIRE_SERVICES=1`` makes that
a failure).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis_asyncio
from cyphonic_trs.storage import RedisCidTable

REDIS_URL = os.environ.get("CYPHONIC_TEST_REDIS", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("CYPHONIC_REQUIRE_SERVICES") == "1"


def _missing(what: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} (CYPHONIC_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(what)


async def _delete_prefix(client: redis_asyncio.Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def redis_client() -> AsyncIterator[redis_asyncio.Redis]:
    """A client of the test Redis; skips (or fails) when it is not reachable."""
    client = redis_asyncio.Redis.from_url(REDIS_URL, socket_connect_timeout=3, socket_timeout=5)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        _missing(f"Redis is not reachable at {REDIS_URL}: {exc}")
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def redis_url(redis_client: redis_asyncio.Redis) -> str:
    """The URL of the test Redis, once it answered."""
    return REDIS_URL


@pytest.fixture
def key_prefix() -> str:
    """A key prefix no other test run uses."""
    return f"cyphonic-test:{secrets.token_hex(6)}:"


@pytest.fixture
async def redis_table(
    redis_client: redis_asyncio.Redis, key_prefix: str
) -> AsyncIterator[RedisCidTable]:
    """A CID table on the real Redis under ``key_prefix``; its keys are deleted afterwards."""
    table = RedisCidTable.from_url(REDIS_URL, prefix=key_prefix)
    try:
        yield table
    finally:
        await table.close()
        await _delete_prefix(redis_client, key_prefix)
