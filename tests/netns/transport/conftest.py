"""The ``transport_overlay`` fixture: the bed of ``transport_bed`` with AS, NMS and TRS
serving (registry in SQLite, CID table and TRS directory in a private Redis), alice and bob
enrolled, and tinyproxy ready in ``proxy``; everything stopped after the test."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cyphonic_testbed import NetBed
from cyphonic_testbed.overlay import (
    AgentProcess,
    OverlayServices,
    TrsProcess,
    start_services,
    start_trs,
)
from transport_bed import SERVICES, Tinyproxy, udp_blocked


@dataclass
class TransportOverlay:
    bed: NetBed
    services: OverlayServices
    trs: TrsProcess
    proxy: Tinyproxy
    states: dict[str, Path]
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> AgentProcess:
        """``cyphonic-agent up`` in host ``name`` (not waited for)."""
        agent = self.services.start_agent(self.bed.host(name), self.states[name], *args, env=env)
        self.agents[name] = agent
        return agent


@pytest.fixture
def transport_overlay(netbed: Any, tmp_path: Path) -> Iterator[TransportOverlay]:
    os.chmod(tmp_path, 0o755)
    bed = netbed(udp_blocked(services=SERVICES))
    redis = bed.start_redis("redis")
    services = start_services(
        bed, workdir=tmp_path / "overlay", nms_args=["--redis-url", redis.url]
    )
    trs: TrsProcess | None = None
    proxy: Tinyproxy | None = None
    try:
        trs = start_trs(services, redis_url=redis.url)
        states = services.enrol_all([bed.host("alice"), bed.host("bob")])
        proxy = Tinyproxy(bed.host("proxy"), tmp_path / "proxy", allow="192.168.1.0/24")
        yield TransportOverlay(bed=bed, services=services, trs=trs, proxy=proxy, states=states)
    finally:
        for agent in services.agents:
            sys.stderr.write(
                f"\n--- agent {agent.name} log (tail) ---\n{agent.log_text()[-4000:]}\n"
            )
        for label, log in (("nms", services.log("nms")), ("trs", trs.log if trs else None)):
            text = log.read_text(errors="replace") if log is not None and log.exists() else ""
            sys.stderr.write(f"\n--- {label} log (tail) ---\n{text[-2500:]}\n")
        if proxy is not None:
            sys.stderr.write(f"\n--- tinyproxy log ---\n{proxy.log.read_text()[-1500:]}\n")
            proxy.stop()
        services.stop()
        if trs is not None:
            trs.stop()
