"""Fixtures of the QUIC endpoint tests: one PKI per module and loopback endpoints.

Every endpoint binds an ephemeral port on 127.0.0.1 (or ``::``) and is closed by the
fixture that opened it, also when the test fails. Every test that opens endpoints runs
once per QUIC engine (aioquic and qh3), so the refusal matrix holds for both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from cyphonic import pki
from cyphonic.quic import QuicEndpoint
from cyphonic.quic.endpoint import ENGINES
from quic_harness import DOMAIN, EndpointMaker, Pki, utcnow


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(pki.init_pki(tmp_path_factory.mktemp("pki"), domain=DOMAIN, now=utcnow()))


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second PKI with the same names as ``ca``: trusted by nobody here."""
    return Pki(pki.init_pki(tmp_path_factory.mktemp("foreign"), domain=DOMAIN, now=utcnow()))


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The QUIC engine the test's endpoints run."""
    return str(request.param)


@pytest.fixture
async def endpoints(engine: str) -> AsyncIterator[EndpointMaker]:
    """Open endpoints on loopback (on ``engine`` unless told); all closed after the test."""
    opened: list[QuicEndpoint] = []

    async def make(**kwargs: Any) -> QuicEndpoint:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        kwargs.setdefault("engine", engine)
        endpoint = await QuicEndpoint.open(**kwargs)
        opened.append(endpoint)
        return endpoint

    try:
        yield make
    finally:
        for endpoint in opened:
            await endpoint.close()
