"""The cloud on loopback for tests of real agents without root: a fresh PKI, one
``cyphonic-as`` and one ``cyphonic-nms`` process (and a ``cyphonic-trs`` when asked) sharing
an embedded SQLite registry, and agents enrolled over the AS's REST API running over fake
edges (``fake_edges``: a TUN over a socket pair, a silent netlink watcher).

    cloud = LoopbackCloud(tmp_path, nms_env={"CYPHONIC_REVOCATION_POLL_S": "30"})
    await cloud.start()
    alice = await cloud.agent("alice")
    ...
    await cloud.close()   # agents first; a stopped (SIGSTOP) service is continued, then ended

``loopback_cloud`` is the same as an async context manager, for fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import signal
import socket
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from cyphonic.pki import init_pki

from cyphonic_testing.agent import RunningAgent, agent_settings, as_process, enrol, fake_edges
from cyphonic_testing.nms import NmsProcess
from cyphonic_testing.processes import ADMIN_TOKEN, RELAY_SECRET, ServiceProcess, free_port

DOMAIN = "cyphonic.internal"


class LoopbackCloud:
    """PKI, AS, NMS (and optionally TRS) processes on 127.0.0.1; agents over fake edges.

    ``nms_env``, ``as_env`` and ``trs_env`` add to each service's environment;
    ``agent_defaults`` are settings every agent gets (``agent()`` may add more)."""

    def __init__(
        self,
        tmp: Path,
        *,
        nms_env: Mapping[str, str] | None = None,
        as_env: Mapping[str, str] | None = None,
        trs_env: Mapping[str, str] | None = None,
        agent_defaults: Mapping[str, object] | None = None,
    ) -> None:
        self.tmp = tmp
        self.pki = tmp / "pki"
        init_pki(self.pki, domain=DOMAIN, now=datetime.datetime.now(datetime.UTC))
        database = f"sqlite+aiosqlite:///{tmp / 'registry.db'}"
        self.nms = NmsProcess(
            pki_dir=self.pki,
            database_url=database,
            redis_url=None,
            replica_id="nms-1",
            log_path=tmp / "nms.log",
            admin_token=ADMIN_TOKEN,
            relay_secret=RELAY_SECRET,
            extra_env={"CYPHONIC_QUIC_HOST": "127.0.0.1", **(nms_env or {})},
        )
        self.auth = as_process(
            tmp=tmp,
            pki_dir=self.pki,
            database_url=database,
            domain=DOMAIN,
            nms_endpoints=[f"127.0.0.1:{self.nms.quic_port}"],
        )
        self.auth.env.update(as_env or {})
        self.trs: ServiceProcess | None = None
        self.trs_port = 0
        if trs_env is not None:
            self.nms.env["CYPHONIC_AS_URL"] = self.auth.rest
            self.trs_port = free_port(socket.SOCK_DGRAM, host="127.0.0.1")
            self.trs = ServiceProcess(
                "cyphonic_trs.cli",
                log_path=tmp / "trs.log",
                ready_marker=b"trs_serving",
                env={
                    "CYPHONIC_PKI_DIR": str(self.pki),
                    "CYPHONIC_DOMAIN": DOMAIN,
                    "CYPHONIC_QUIC_HOST": "127.0.0.1",
                    "CYPHONIC_QUIC_PORT": str(self.trs_port),
                    "CYPHONIC_REPLICA_ID": "1",
                    "CYPHONIC_AS_URL": self.auth.rest,
                    **trs_env,
                },
            )
        self.agent_defaults = dict(agent_defaults or {})
        self.agents: list[RunningAgent] = []

    @property
    def services(self) -> list[ServiceProcess]:
        return [s for s in (self.trs, self.nms, self.auth) if s is not None]

    async def start(self) -> None:
        await self.auth.start()  # it migrates the registry the NMS then uses
        await asyncio.gather(*(s.start() for s in (self.nms, self.trs) if s is not None))

    async def enrol(self, name: str, *, state_dir: Path | None = None) -> Path:
        """Create and enrol node ``name``; its state directory."""
        return await enrol(
            self.auth, name=name, pki_dir=self.pki, state_dir=state_dir or self.tmp / name
        )

    async def agent(self, name: str, **settings_extra: object) -> RunningAgent:
        """Enrol ``name`` and start its agent (settings: the defaults, then ``settings_extra``)."""
        state = await self.enrol(name)
        chosen: dict[str, Any] = {**self.agent_defaults, **settings_extra}
        settings = agent_settings(state, **chosen)
        running = RunningAgent(settings, edges=fake_edges())
        self.agents.append(running)
        await running.start()
        return running

    async def revoke(self, name: str, reason: str = "keyCompromise") -> float:
        """Revoke ``name`` at the AS; the monotonic time the call was made."""
        async with self.auth.admin() as admin:
            at = time.monotonic()
            answer = await admin.post(f"/v1/nodes/{name}/revoke", json={"reason": reason})
            answer.raise_for_status()
        return at

    async def close(self) -> None:
        for running in self.agents:
            await running.stop()
        for service in self.services:
            if service.proc is not None and service.proc.poll() is None:
                service.proc.send_signal(signal.SIGCONT)  # a test may have frozen it
            service.stop()


@contextlib.asynccontextmanager
async def loopback_cloud(tmp: Path, **options: object) -> AsyncIterator[LoopbackCloud]:
    """A started ``LoopbackCloud``, closed on the way out even when the test fails."""
    cloud = LoopbackCloud(tmp, **options)  # type: ignore[arg-type]
    try:
        await cloud.start()
        yield cloud
    finally:
        await cloud.close()
