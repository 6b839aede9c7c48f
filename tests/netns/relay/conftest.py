"""The ``relay_overlay`` fixture: a test bed with AS, NMS and TRS processes (registry on the
host's Postgres, a private Redis in the cloud) and both nodes enrolled."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cyphonic_testbed import NetBed, Topology
from cyphonic_testbed.overlay import AgentProcess, OverlayServices, start_services
from cyphonic_testbed.services import postgres_url
from relay_bed import TrsProcess, start_trs

PG_ADMIN_URL = os.environ.get("CYPHONIC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
SERVICES = ("as", "nms", "trs", "redis")


@dataclass
class RelayOverlay:
    """A bed with AS, NMS and TRS serving and alice and bob enrolled (agents not started)."""

    bed: NetBed
    services: OverlayServices
    trs: TrsProcess
    states: dict[str, Path]
    redis_url: str
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> AgentProcess:
        """``cyphonic-agent up`` in host ``name`` (not waited for)."""
        agent = self.services.start_agent(self.bed.host(name), self.states[name], *args)
        self.agents[name] = agent
        return agent


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def relay_overlay(netbed: Any, tmp_path: Path) -> Iterator[Any]:
    """``relay_overlay(topology)``; the topology must have the ``SERVICES`` cloud hosts.
    Logs are printed at the end; the bed and the database are always removed."""
    made: list[RelayOverlay] = []
    databases: list[str] = []

    def make(topology: Topology) -> RelayOverlay:
        bed = netbed(topology)
        os.chmod(tmp_path, 0o755)
        name = f"relay_e2e_{secrets.token_hex(5)}"
        try:
            asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}", pytrace=False)
        databases.append(name)
        redis = bed.start_redis("redis")
        services = start_services(
            bed,
            workdir=tmp_path / "overlay",
            database_url=postgres_url(name),
            nms_args=["--redis-url", redis.url],
        )
        trs = start_trs(services, redis_url=redis.url)
        states = services.enrol_all([bed.host("alice"), bed.host("bob")])
        made.append(
            RelayOverlay(bed=bed, services=services, trs=trs, states=states, redis_url=redis.url)
        )
        return made[-1]

    try:
        yield make
    finally:
        for o in made:
            for agent in o.services.agents:
                sys.stderr.write(
                    f"\n--- agent {agent.name} log (tail) ---\n{agent.log_text()[-5000:]}\n"
                )
            for label, log in (("nms", o.services.log("nms")), ("trs", o.trs.log)):
                text = log.read_text(errors="replace") if log.exists() else ""
                sys.stderr.write(f"\n--- {label} log (tail) ---\n{text[-3000:]}\n")
            o.services.stop()
            o.trs.stop()
        for name in databases:
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
