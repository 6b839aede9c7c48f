"""``RegistryRevocations`` on the real registry (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from cyphonic.errors import Unavailable
from cyphonic.registry import Certificate, Node, Revocation, create_engine, make_sessionmaker
from cyphonic.revocation import LOOKBACK_IDS, RegistryRevocations, RevocationCache
from sqlalchemy.ext.asyncio import AsyncEngine

NOW = datetime.now(UTC).replace(microsecond=0)


async def _node(engine: AsyncEngine, name: str) -> int:
    async with make_sessionmaker(engine)() as session, session.begin():
        node = Node(
            name=name,
            fqdn=f"{name}.cyphonic.internal",
            tags={},
            device_info={},
            state="active",
            created_at=NOW,
            updated_at=NOW,
        )
        session.add(node)
        await session.flush()
        return node.id


async def _certificate(
    engine: AsyncEngine, node_id: int, serial: int, *, expires: datetime
) -> None:
    async with make_sessionmaker(engine)() as session, session.begin():
        session.add(
            Certificate(
                serial=format(serial, "x"),
                node_id=node_id,
                not_before=NOW - timedelta(days=1),
                not_after=expires,
                status="active",
                pem="-",
                created_at=NOW,
            )
        )


async def _revoke(
    engine: AsyncEngine, node_id: int, serial: int | None, *, row_id: int | None = None
) -> None:
    async with make_sessionmaker(engine)() as session, session.begin():
        row = Revocation(
            node_id=node_id,
            serial=None if serial is None else format(serial, "x"),
            reason="key_compromise",
            revoked_at=NOW,
        )
        if row_id is not None:
            row.id = row_id
        session.add(row)


async def test_cursor_full_reload_and_late_commits(registry_url: str) -> None:
    engine = create_engine(registry_url)
    try:
        node = await _node(engine, "a")
        live, expired, later = 0xA1, 0xA2, 0xA3
        await _certificate(engine, node, live, expires=NOW + timedelta(days=30))
        await _certificate(engine, node, expired, expires=NOW - timedelta(hours=1))
        await _certificate(engine, node, later, expires=NOW + timedelta(days=30))
        await _revoke(engine, node, live, row_id=10)
        await _revoke(engine, node, expired, row_id=11)
        await _revoke(engine, node, None, row_id=12)  # a node revoked before any certificate
        cache = RevocationCache(RegistryRevocations(engine), full_interval=3600)
        # Complete: revoked and unexpired only; the cursor is the newest id.
        assert await cache.refresh() == {live}
        assert cache.revoked.cursor == 12
        # A transaction that took id 9 but committed after the cursor moved past it.
        await _revoke(engine, node, later, row_id=9)
        assert await cache.refresh() == {later}
        assert cache.revoked.cursor == 12 and later in cache.revoked
        # Far behind the cursor is beyond the look-back; the periodic full reload finds it.
        await _revoke(engine, node, None, row_id=12 + LOOKBACK_IDS + 5)
        assert await cache.refresh() == frozenset()
        assert cache.revoked.cursor == 12 + LOOKBACK_IDS + 5
        await _certificate(engine, node, 0xA4, expires=NOW + timedelta(days=30))
        await _revoke(engine, node, 0xA4, row_id=1)
        assert await cache.refresh() == frozenset()
        assert await cache.refresh(full=True) == {0xA4}
    finally:
        await engine.dispose()


async def test_owned_engine_and_an_unreachable_database() -> None:
    source = RegistryRevocations.from_url(
        "postgresql+asyncpg://nobody@127.0.0.1:1/none?command_timeout=2"
    )
    try:
        with pytest.raises(Unavailable):
            await source.fetch(cursor=None)
    finally:
        await source.close()


async def test_own_engine_reads_while_a_writer_holds_the_sqlite_lock(tmp_path: object) -> None:
    from pathlib import Path

    from cyphonic.registry import upgrade
    from sqlalchemy import text

    url = f"sqlite+aiosqlite:///{Path(str(tmp_path)) / 'registry.db'}"
    engine = create_engine(url)
    source = RegistryRevocations.from_url(url)
    try:
        await upgrade(engine)
        node = await _node(engine, "w")
        await _certificate(engine, node, 0xB1, expires=NOW + timedelta(days=1))
        await _revoke(engine, node, 0xB1)
        async with engine.begin() as writer:  # BEGIN IMMEDIATE: the write lock is held
            await writer.execute(text("UPDATE nodes SET state = 'revoked'"))
            started = time.monotonic()
            update = await source.fetch(cursor=None)  # would wait 10 s behind the lock
            waited = time.monotonic() - started
        assert update.serials == {0xB1} and update.complete
        assert waited < 5.0
    finally:
        await source.close()
        await engine.dispose()
