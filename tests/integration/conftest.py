"""Shared fixtures of the integration tests: the registry on real PostgreSQL and on SQLite.

- ``postgres_database`` (session): a database ``cyphonic_test_<random>`` created on the
  server at ``CYPHONIC_TEST_POSTGRES`` (default postgresql://postgres@127.0.0.1:5432/test),
  migrated once with ``alembic upgrade head``, dropped at the end of the run.
- ``registry_url`` (per test, parametrized ``sqlite`` / ``postgres``): an empty, migrated
  registry. Postgres: the session database with every table truncated before the test.
  SQLite: a fresh file in the test's temporary directory.

- ``pg_url`` (per test): the URL of a new, migrated, empty database of its own, dropped
  afterwards (tests that run service processes against it).
- ``redis_url`` (per test): a Redis database of this test run's own, empty at the start and
  flushed afterwards. The run claims a free database number once (``SET NX`` on a claim key
  in db 0, released at the end, expiring by itself if the run dies), so two runs at once
  (two engineers, CI) never flush each other's keys. ``CYPHONIC_TEST_REDIS`` names a database
  to use instead (no claim: the caller keeps it to itself).

Without a reachable server the Postgres and Redis cases are skipped with a message saying
so; set ``CYPHONIC_REQUIRE_SERVICES=1`` (CI) to make them fail instead.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
import redis.asyncio as redis_asyncio
from cyphonic.registry import create_engine, migrate, upgrade
from cyphonic.registry.models import Base
from sqlalchemy import text
from sqlalchemy.engine import make_url

POSTGRES_ADMIN_URL = os.environ.get(
    "CYPHONIC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
REQUIRE_SERVICES = os.environ.get("CYPHONIC_REQUIRE_SERVICES") == "1"
REDIS_SERVER_URL = os.environ.get("CYPHONIC_TEST_REDIS_SERVER", "redis://127.0.0.1:6379")
REDIS_CLAIM_KEY = "cyphonic-test:redis-db:{}"
"""In db 0: who holds database n (a run id); a run's databases are its own while it holds them."""
REDIS_CLAIM_TTL_S = 4 * 3600
"""A claim outlives any test run; a run killed without cleanup frees its database after this."""
REDIS_RESERVED_DBS = frozenset({0, 11, 13})
"""Never claimed: db 0 holds the claims (and prefixed TRS test keys); 11 and 13 were the
fixed test databases of older checkouts, which still flush them."""


def _missing(what: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} (CYPHONIC_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(what)


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(_asyncpg_dsn(POSTGRES_ADMIN_URL), timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """URL of a migrated PostgreSQL database of this test run (dropped afterwards)."""
    name = f"cyphonic_test_{secrets.token_hex(5)}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        _missing(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    url = (
        make_url(POSTGRES_ADMIN_URL)
        .set(drivername="postgresql+asyncpg", database=name)
        .render_as_string(hide_password=False)
    )
    try:
        migrate(url)
        yield url
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _truncate(url: str) -> None:
    engine = create_engine(url)
    try:
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        async with engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        await engine.dispose()


async def _sqlite(path: Path) -> str:
    url = f"sqlite+aiosqlite:///{path}"
    engine = create_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated registry database: SQLite file or (truncated) PostgreSQL."""
    if request.param == "sqlite":
        return asyncio.run(_sqlite(tmp_path / "registry.db"))
    url: str = request.getfixturevalue("postgres_database")
    asyncio.run(_truncate(url))
    return url


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """The URL of a new, migrated, empty registry database; dropped afterwards."""
    name = f"it_{secrets.token_hex(6)}"
    try:
        await _admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        _missing(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    url = (
        make_url(POSTGRES_ADMIN_URL)
        .set(drivername="postgresql+asyncpg", database=name)
        .render_as_string(hide_password=False)
    )
    engine = create_engine(url)
    try:
        await upgrade(engine)
        yield url
    finally:
        await engine.dispose()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_test_url() -> Iterator[str]:
    """The Redis database this run's ``redis_url`` empties: ``CYPHONIC_TEST_REDIS``, or one
    claimed for the run (see the module docstring) and released at its end."""
    explicit = os.environ.get("CYPHONIC_TEST_REDIS")
    if explicit:
        yield explicit
        return
    client = redis.Redis.from_url(f"{REDIS_SERVER_URL}/0", socket_connect_timeout=3)
    try:
        try:
            count = int(client.config_get("databases").get("databases", 16))
        except redis.ResponseError:  # CONFIG disabled: the default number
            count = 16
        except redis.RedisError as exc:
            _missing(f"Redis is not reachable at {REDIS_SERVER_URL}: {exc}")
        run_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        for db in range(count):
            key = REDIS_CLAIM_KEY.format(db)
            if db in REDIS_RESERVED_DBS:
                continue
            if client.set(key, run_id, nx=True, ex=REDIS_CLAIM_TTL_S):
                break
        else:
            pytest.fail(f"every Redis test database on {REDIS_SERVER_URL} is claimed by a run")
        try:
            yield f"{REDIS_SERVER_URL}/{db}"
        finally:
            # Release only our own claim (it may have expired and been taken meanwhile).
            if client.get(key) == run_id.encode():
                client.delete(key)
    finally:
        client.close()


@pytest.fixture
async def redis_url(redis_test_url: str) -> AsyncIterator[str]:
    """A Redis database of this run's own, empty at the start and flushed afterwards."""
    client = redis_asyncio.Redis.from_url(redis_test_url, socket_connect_timeout=3)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        _missing(f"Redis is not reachable at {redis_test_url}: {exc}")
    await client.flushdb()
    try:
        yield redis_test_url
    finally:
        await client.flushdb()
        await client.aclose()
