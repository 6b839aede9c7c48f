"""The registry itself: migrations match the models, SQLite tuning, error mapping, outages."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from as_harness import ADMIN_TOKEN, Clock, csr_pem
from cyphonic.errors import AlreadyExists, Unavailable
from cyphonic.pki import PkiMaterial, generate_key
from cyphonic.registry import create_engine, map_db_errors, ping, upgrade
from cyphonic.registry.db import alembic_config, normalize_url
from cyphonic.registry.models import Base, Node
from cyphonic_auth.api import create_app
from cyphonic_auth.config import AuthSettings
from cyphonic_auth.service import AuthMetrics, AuthService, NodeCa
from cyphonic_auth.storage import SqlNodeRegistry
from prometheus_client import CollectorRegistry
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncSession


async def test_migrated_schema_matches_the_models(registry_url: str) -> None:
    engine = create_engine(registry_url)
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                )
            )
            version = await conn.execute(text("SELECT version_num FROM alembic_version"))
            assert version.scalar_one() == "0004"  # the newest migration
    finally:
        await engine.dispose()
    assert diff == []


async def test_downgrade_to_base_and_up_again(registry_url: str) -> None:
    await asyncio.to_thread(command.downgrade, alembic_config(registry_url), "base")
    engine = create_engine(registry_url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: sync.dialect.get_table_names(sync))
        assert "nodes" not in tables
        await upgrade(engine)
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: sync.dialect.get_table_names(sync))
        assert {
            "nodes",
            "certificates",
            "enrolment_tokens",
            "revocations",
            "audit_events",
            "address_leases",
            "node_network",
            "access_policy",
            "access_policy_history",
        } <= set(tables)
    finally:
        await engine.dispose()


async def test_timestamps_come_back_aware_in_utc(registry_url: str) -> None:
    engine = create_engine(registry_url)
    tokyo = timezone(timedelta(hours=9))
    at = datetime(2030, 1, 2, 12, 0, 0, tzinfo=tokyo)
    try:
        async with AsyncSession(engine) as session, session.begin():
            session.add(
                Node(
                    name="tz",
                    fqdn="tz.x",
                    tags={"k": "v"},
                    device_info={},
                    state="pending",
                    created_at=at,
                    updated_at=at,
                )
            )
        async with AsyncSession(engine) as session:
            node = (await session.execute(select(Node))).scalar_one()
        assert node.created_at == at
        assert node.created_at.tzinfo is not None
        assert node.created_at.utcoffset() == timedelta(0)
        assert node.tags == {"k": "v"}
        async with AsyncSession(engine) as session:
            with pytest.raises(StatementError, match="naive"):
                session.add(
                    Node(
                        name="naive",
                        fqdn="naive.x",
                        tags={},
                        device_info={},
                        state="pending",
                        created_at=datetime(2030, 1, 1),
                        updated_at=datetime(2030, 1, 1),
                    )
                )
                await session.flush()
    finally:
        await engine.dispose()


async def test_constraints_are_enforced(registry_url: str) -> None:
    engine = create_engine(registry_url)
    now = datetime.now(UTC)
    try:
        async with AsyncSession(engine) as session, session.begin():
            session.add(
                Node(
                    name="a",
                    fqdn="a.x",
                    tags={},
                    device_info={},
                    state="pending",
                    created_at=now,
                    updated_at=now,
                )
            )
        with pytest.raises(AlreadyExists):
            async with map_db_errors(), AsyncSession(engine) as session, session.begin():
                session.add(
                    Node(
                        name="a",
                        fqdn="b.x",
                        tags={},
                        device_info={},
                        state="pending",
                        created_at=now,
                        updated_at=now,
                    )
                )
        with pytest.raises(AlreadyExists):  # the state CHECK constraint
            async with map_db_errors(), AsyncSession(engine) as session, session.begin():
                session.add(
                    Node(
                        name="c",
                        fqdn="c.x",
                        tags={},
                        device_info={},
                        state="bogus",
                        created_at=now,
                        updated_at=now,
                    )
                )
        with pytest.raises(AlreadyExists):  # foreign keys are on (SQLite too)
            async with map_db_errors(), AsyncSession(engine) as session, session.begin():
                await session.execute(
                    text(
                        "INSERT INTO enrolment_tokens (node_id, token_hash, expires_at, created_at)"
                        " VALUES (9999, 'h', :t, :t)"
                    ),
                    {"t": now},
                )
    finally:
        await engine.dispose()


async def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar_one() == "wal"
            assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one() >= 5000
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one() == 1
    finally:
        await engine.dispose()


def test_database_urls_are_normalised_to_async_drivers() -> None:
    assert make_url(normalize_url("postgresql://u:p@h/db")).drivername == "postgresql+asyncpg"
    assert make_url(normalize_url("sqlite:///x.db")).drivername == "sqlite+aiosqlite"
    assert normalize_url("postgresql+asyncpg://u:p%40x@h/db") == "postgresql+asyncpg://u:p%40x@h/db"


async def test_unreachable_sqlite_database_is_unavailable(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    try:
        with pytest.raises(Unavailable):
            await ping(engine)
    finally:
        await engine.dispose()
        # aiosqlite's worker thread of the failed connection finishes on its own; let it
        # report back before this test's event loop closes.
        await asyncio.sleep(0.2)


class TcpProxy:
    """A loopback TCP proxy to a server that the test can cut and restore."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            self._writers.clear()
            await self._server.wait_closed()
            self._server = None


@pytest.mark.postgres
async def test_database_outage_answers_503_and_loses_nothing(
    postgres_database: str,
    pki: tuple[Path, PkiMaterial],
) -> None:
    url = make_url(postgres_database)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = AuthSettings(
        _env_file=None, database_url=proxied, pki_dir=pki[0], admin_token=ADMIN_TOKEN
    )
    engine = create_engine(proxied)
    service = AuthService(
        registry=SqlNodeRegistry(engine),
        node_ca=NodeCa.load(settings),
        settings=settings,
        metrics=AuthMetrics(CollectorRegistry()),
        clock=Clock(),
    )
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    transport = httpx.ASGITransport(app=create_app(service), raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://as.test") as client:
            assert (
                await client.post("/v1/nodes", json={"name": "before"}, headers=admin)
            ).status_code == 201
            token = (
                await client.post("/v1/nodes/before/enrolment-tokens", json={}, headers=admin)
            ).json()["token"]
            pending = (
                await client.post("/v1/nodes/before/enrolment-tokens", json={}, headers=admin)
            ).json()["token"]
            enrolled = await client.post(
                "/v1/enrol",
                json={
                    "token": token,
                    "csr_pem": csr_pem(generate_key(), "before.cyphonic.internal"),
                },
            )
            assert enrolled.status_code == 201
            assert (await client.get("/readyz")).status_code == 200

            await proxy.stop()
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["error"]["code"] == "unavailable"
            for method, path, body, headers in (
                ("POST", "/v1/nodes", {"name": "during"}, admin),
                ("GET", "/v1/nodes/before", None, admin),
                (
                    "POST",
                    "/v1/enrol",
                    {
                        "token": pending,
                        "csr_pem": csr_pem(generate_key(), "before.cyphonic.internal"),
                    },
                    {},
                ),
                ("GET", "/v1/crl", None, {}),
            ):
                response = await client.request(method, path, json=body, headers=headers)
                assert response.status_code == 503, (path, response.text)
                assert response.json()["error"]["code"] == "unavailable"
            assert (await client.get("/healthz")).status_code == 200

            await proxy.start()
            assert (await client.get("/readyz")).status_code == 200
            shown = (await client.get("/v1/nodes/before", headers=admin)).json()
            assert shown["state"] == "active"
            assert [c["serial"] for c in shown["certificates"]] == [enrolled.json()["serial"]]
            assert (await client.get("/v1/nodes/during", headers=admin)).status_code == 404
            # The token refused during the outage was not used up.
            again = await client.post(
                "/v1/enrol",
                json={
                    "token": pending,
                    "csr_pem": csr_pem(generate_key(), "before.cyphonic.internal"),
                },
            )
            assert again.status_code == 201
    finally:
        await engine.dispose()
        await proxy.stop()
