"""The one place that makes registry engines and sessions, maps database errors, migrates.

    engine = create_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    async with sessions() as session, session.begin(), map_db_errors():
        ...

``migrate(url)`` runs ``alembic upgrade head`` (the migrations live in this package), for
``cyphonic-as migrate``, ``serve --migrate`` and a Kubernetes Job; ``upgrade(engine)`` is the
same from inside a running event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, exc, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool

from cyphonic.errors import AlreadyExists, CyphonicError, Unavailable

if TYPE_CHECKING:
    from alembic.config import Config

SQLITE_BUSY_TIMEOUT_MS = 10_000


def normalize_url(url: str) -> str:
    """The async-driver form of a database URL (``postgresql://`` -> ``postgresql+asyncpg://``)."""
    parsed = make_url(url)
    driver = {
        "postgresql": "postgresql+asyncpg",
        "postgres": "postgresql+asyncpg",
        "sqlite": "sqlite+aiosqlite",
    }.get(parsed.drivername)
    if driver is not None:
        parsed = parsed.set(drivername=driver)
    return parsed.render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    """Whether ``url`` names a SQLite database."""
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, *, echo: bool = False, pool_size: int = 10) -> AsyncEngine:
    """An async engine for the registry at ``url`` (Postgres via asyncpg, or SQLite).

    SQLite gets WAL, a busy timeout, foreign keys, and ``BEGIN IMMEDIATE`` transactions so
    that concurrent writers queue on the busy timeout instead of failing on a lock upgrade.
    Postgres connections are pinged before use so that the pool recovers after an outage.
    """
    url = normalize_url(url)
    if is_sqlite(url):
        database = make_url(url).database
        in_memory = not database or database == ":memory:"
        kwargs: dict[str, Any] = {"poolclass": StaticPool} if in_memory else {}
        engine = create_async_engine(url, echo=echo, **kwargs)
        _tune_sqlite(engine, wal=not in_memory)
        return engine
    return create_async_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=10,
        # asyncpg connect timeout; a dead server must not hang requests.
        connect_args={"timeout": 5},
    )


def _tune_sqlite(engine: AsyncEngine, *, wal: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 driver; the "begin" hook below emits it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if wal:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


_SQLITE_LOCKS: weakref.WeakKeyDictionary[Engine, asyncio.Lock] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def serialized(engine: AsyncEngine) -> AsyncIterator[None]:
    """Queue this process's transactions on a SQLite engine (no-op on other databases).

    SQLite has one writer at a time and its busy handler is not fair: under load a waiting
    transaction can starve past the busy timeout. An asyncio lock per engine queues the
    transactions of this process in order; the busy timeout still covers other processes.
    Do not nest: a transaction inside another on the same engine would wait for itself.
    """
    if engine.dialect.name != "sqlite":
        yield
        return
    lock = _SQLITE_LOCKS.get(engine.sync_engine)
    if lock is None:
        lock = _SQLITE_LOCKS[engine.sync_engine] = asyncio.Lock()
    async with lock:
        yield


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """The session factory for ``engine`` (objects stay usable after commit)."""
    return async_sessionmaker(engine, expire_on_commit=False)


# Connection-level failures: the database is down, unreachable or refusing connections.
_UNAVAILABLE = (
    exc.OperationalError,
    exc.InterfaceError,
    exc.TimeoutError,
    OSError,
    ConnectionError,
    asyncio.TimeoutError,
)


def _is_unavailable(error: BaseException) -> bool:
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, _UNAVAILABLE):
        return True
    # asyncpg raises its own connection errors, sometimes unwrapped.
    module = type(error).__module__
    name = type(error).__name__
    return module.startswith("asyncpg") and (
        "Connection" in name or name in {"CannotConnectNowError", "TooManyConnectionsError"}
    )


def map_db_error(error: BaseException) -> CyphonicError | None:
    """The CYPHONIC error for a database exception, or None when it is not a known kind."""
    if isinstance(error, CyphonicError):
        return error
    if isinstance(error, exc.IntegrityError):
        return AlreadyExists("conflicts with an existing record")
    if _is_unavailable(error):
        return Unavailable("node registry database unavailable")
    return None


@contextlib.asynccontextmanager
async def map_db_errors() -> AsyncIterator[None]:
    """Map database exceptions raised inside to ``Unavailable`` / ``AlreadyExists``."""
    try:
        yield
    except Exception as error:
        mapped = map_db_error(error)
        if mapped is None or mapped is error:
            raise
        raise mapped from error


async def ping(engine: AsyncEngine) -> None:
    """Raise ``Unavailable`` unless the database answers ``SELECT 1``."""
    async with map_db_errors(), engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


def alembic_config(url: str | None = None) -> Config:
    """An Alembic configuration pointing at the migrations inside this package."""
    # Alembic is imported only when migrating: it costs seconds of start-up otherwise.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "cyphonic.registry:migrations")
    if url is not None:
        # Alembic's ini interpolation treats % specially.
        config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


MIGRATION_LOCK_ID = 0x6379_7068_6F6E_6963 & 0x7FFF_FFFF_FFFF_FFFF
"""PostgreSQL advisory lock key held while migrating ("cyphonic" in ASCII, as a bigint)."""


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Run ``alembic upgrade <revision>`` on ``engine`` from inside a running event loop.

    On PostgreSQL the migration holds a transaction-scoped advisory lock, so that several
    migrators started together (one init container per replica) run one after the other:
    the first creates the schema, the others find it at ``head`` and do nothing.
    """

    from alembic import command

    def _run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with map_db_errors(), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_ID}
            )
        await conn.run_sync(_run)


def migrate(url: str, revision: str = "head", *, wait_s: float = 0.0) -> None:
    """Run ``alembic upgrade <revision>`` on the database at ``url`` (no event loop running).

    ``wait_s``: keep trying this long while the database is unreachable (a database started
    together with the services, as the chart's in-cluster PostgreSQL is); any other error,
    a refused password for one, fails at once.
    """

    async def _main() -> None:
        engine = create_engine(url)
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    await upgrade(engine, revision)
                    return
                except Unavailable:
                    if time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(1.0)
        finally:
            await engine.dispose()

    asyncio.run(_main())
