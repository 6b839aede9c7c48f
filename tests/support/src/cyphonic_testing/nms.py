"""NMS test helpers: a recording ``NodeLink``, registry seeding, replicas in one process
(``InProcessCluster``) and ``cyphonic-nms serve`` as a child process (``NmsProcess``)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cyphonic.errors import CyphonicError
from cyphonic.registry import Node, NodeState, Revocation, create_engine, make_sessionmaker
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.cluster import InProcessBus, InProcessPresence, InProcessRouteStore
from cyphonic_nms.leases import LeasePools
from cyphonic_nms.manager import NodeManager
from cyphonic_nms.routing import Endpoint
from cyphonic_nms.storage import SqlNodeStore
from cyphonic_nms.trs_directory import InProcessTrsDirectory
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cyphonic_testing.processes import ServiceProcess, free_port

__all__ = [
    "DOMAIN",
    "Clock",
    "InProcessCluster",
    "NmsProcess",
    "RecordingLink",
    "add_node",
    "free_port",
    "revoke_node",
]


@dataclass
class RecordingLink:
    """A ``NodeLink`` that keeps what was pushed and whether it was closed."""

    fqdn: str
    serial_hex: str = "1"
    pushed: list[pb.Envelope] = field(default_factory=list)
    closed: CyphonicError | None = None
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    async def push(self, envelope: pb.Envelope) -> None:
        self.pushed.append(envelope)
        self._event.set()

    def close(self, error: CyphonicError) -> None:
        self.closed = error
        self._event.set()

    def of(self, body: str) -> list[pb.Envelope]:
        """Pushed envelopes whose body is ``body`` (e.g. ``route_direction``)."""
        return [e for e in self.pushed if e.WhichOneof("body") == body]

    async def wait_for(self, body: str, *, count: int = 1, within_s: float = 5.0) -> pb.Envelope:
        """Wait until ``count`` envelopes of ``body`` arrived; the last one."""
        async with asyncio.timeout(within_s):
            while len(self.of(body)) < count:
                self._event.clear()
                await self._event.wait()
        return self.of(body)[count - 1]

    async def wait_closed(self, *, within_s: float = 5.0) -> CyphonicError:
        """Wait until the link is closed; the error it was closed with."""
        async with asyncio.timeout(within_s):
            while self.closed is None:
                self._event.clear()
                await self._event.wait()
        return self.closed


async def add_node(
    sessions: async_sessionmaker[AsyncSession],
    name: str,
    *,
    domain: str = "cyphonic.internal",
    state: NodeState = NodeState.ACTIVE,
) -> int:
    """Insert an enrolled node into the registry (what the AS does); its id."""
    now = datetime.now(UTC)
    async with sessions() as s, s.begin():
        node = Node(
            name=name,
            fqdn=f"{name}.{domain}",
            state=state.value,
            tags={},
            device_info={},
            created_at=now,
            updated_at=now,
        )
        s.add(node)
        await s.flush()
        return node.id


async def revoke_node(
    sessions: async_sessionmaker[AsyncSession],
    node_id: int,
    *,
    serial: str | None,
    reason: str = "test",
) -> None:
    """Record a revocation the way the AS does (node state and a revocations row)."""
    now = datetime.now(UTC)
    async with sessions() as s, s.begin():
        node = await s.get(Node, node_id)
        assert node is not None
        node.state = NodeState.REVOKED.value
        node.updated_at = now
        s.add(Revocation(node_id=node_id, serial=serial, reason=reason, revoked_at=now))


E = Endpoint.parse
SECRET = b"t" * 32
DOMAIN = "cyphonic.internal"

# (reported, observed) per kind of node
KIND = {
    "ipv6": ([E("[2001:db8::1]:443")], None),
    "global_ipv4": ([E("198.51.100.1:443")], None),
    "nat_ipv4": ([E("192.168.0.2:443")], E("203.0.113.1:50000")),
}


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class InProcessCluster:
    """NMS replicas in one process over one registry, joined by in-process stores."""

    secret = SECRET

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine(database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.store = SqlNodeStore(self.sessions)
        self.bus = InProcessBus()
        self.presence = InProcessPresence()
        self.routes = InProcessRouteStore()
        self.trs = InProcessTrsDirectory()
        self.clock = Clock()
        self.pools = LeasePools.from_settings(ipv4="100.64.0.0/24", ipv6=None, domain=DOMAIN)
        self.replicas: list[NodeManager] = []

    async def replica(self, name: str) -> NodeManager:
        """A replica subscribed to the bus; its periodic jobs are driven by the caller."""
        manager = NodeManager(
            nodes=self.store,
            pools=self.pools,
            replica_id=name,
            relay_secret=SECRET,
            presence=self.presence,
            bus=self.bus,
            routes=self.routes,
            trs=self.trs,
            keepalive_interval_s=15,
            offline_timeout_s=45,
            monotonic=self.clock,
        )
        await self.bus.subscribe(name, manager._on_bus)  # loops are driven by hand here
        self.replicas.append(manager)
        return manager

    async def node(
        self, manager: NodeManager, name: str, kind: str = "global_ipv4", serial: str = "1"
    ) -> RecordingLink:
        """Enrol ``name`` and register it as a node of ``kind`` at ``manager``."""
        await add_node(self.sessions, name)
        link = RecordingLink(fqdn=f"{name}.{DOMAIN}", serial_hex=serial)
        reported, observed = KIND[kind]
        # Distinct addresses per node: shift the last octet/hextet by the name's hash.
        shift = sum(name.encode()) % 200 + 1
        reported = [Endpoint(ep.ip + shift, ep.port) for ep in reported]
        observed = observed or reported[0]
        await manager.register(link, local_addresses=reported, observed=observed)
        return link


class NmsProcess(ServiceProcess):
    """One ``cyphonic-nms serve`` child process on loopback ports, logging JSON to a file."""

    def __init__(
        self,
        *,
        pki_dir: Path,
        database_url: str,
        redis_url: str | None,
        replica_id: str,
        log_path: Path,
        admin_token: str,
        relay_secret: str,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.quic_port = free_port(socket.SOCK_DGRAM)
        self.replica_id = replica_id
        env = {
            "CYPHONIC_DATABASE_URL": database_url,
            "CYPHONIC_PKI_DIR": str(pki_dir),
            "CYPHONIC_DOMAIN": DOMAIN,
            "CYPHONIC_QUIC_HOST": "::",
            "CYPHONIC_QUIC_PORT": str(self.quic_port),
            "CYPHONIC_REPLICA_ID": replica_id,
            "CYPHONIC_RELAY_TOKEN_SECRET": relay_secret,
            "CYPHONIC_KEEPALIVE_INTERVAL_S": "1",
            "CYPHONIC_OFFLINE_TIMEOUT_S": "4",
            **(extra_env or {}),
        }
        if redis_url:
            env["CYPHONIC_REDIS_URL"] = redis_url
        super().__init__(
            "cyphonic_nms.cli",
            env=env,
            log_path=log_path,
            ready_marker=b"quic_listening",
            admin_token=admin_token,
        )
