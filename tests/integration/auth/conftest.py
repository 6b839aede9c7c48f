"""The AS wired to a real registry (``registry_url``: SQLite and PostgreSQL), called in-process.

``as_env`` gives an ``AsHarness`` (see as_harness.py): the AuthService with a settable clock,
its FastAPI app behind an httpx client, a PKI, and helpers to create nodes, issue tokens and
enrol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from as_harness import ADMIN_TOKEN, AsHarness, Clock
from cyphonic.pki import PkiMaterial, init_pki
from cyphonic.registry import create_engine
from cyphonic_auth.api import create_app
from cyphonic_auth.config import AuthSettings
from cyphonic_auth.service import AuthMetrics, AuthService, NodeCa
from cyphonic_auth.storage import SqlNodeRegistry
from prometheus_client import CollectorRegistry


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PkiMaterial]:
    """One PKI directory for the session (root, node CA, service CA, service certs)."""
    directory = tmp_path_factory.mktemp("pki")
    return directory, init_pki(directory, now=datetime.now(UTC) - timedelta(days=1))


@pytest.fixture
async def as_env(registry_url: str, pki: tuple[Path, PkiMaterial]) -> AsyncIterator[AsHarness]:
    """The AS on ``registry_url`` (SQLite or PostgreSQL) with an httpx client on its app."""
    directory, material = pki
    settings = AuthSettings(
        _env_file=None,
        database_url=registry_url,
        pki_dir=directory,
        admin_token=ADMIN_TOKEN,
        nms_endpoints=["192.0.2.10:443", "[2001:db8::10]:443"],
        as_endpoints=["192.0.2.1:443"],
    )
    engine = create_engine(registry_url)
    clock = Clock()
    service = AuthService(
        registry=SqlNodeRegistry(engine),
        node_ca=NodeCa.load(settings),
        settings=settings,
        metrics=AuthMetrics(CollectorRegistry()),
        clock=clock,
    )
    app = create_app(service)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://as.test") as client:
        yield AsHarness(
            service=service,
            client=client,
            clock=clock,
            material=material,
            admin={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
    await engine.dispose()
