"""Test helpers shipped with the NMS: a recording ``NodeLink`` and registry seeding."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cyphonic.errors import CyphonicError
from cyphonic.registry import Node, NodeState, Revocation
from cyphonic.v1 import signalling_pb2 as pb
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


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


async def add_node(
    sessions: async_sessionmaker[AsyncSession], name: str, *, domain: str = "cyphonic.internal",
    state: NodeState = NodeState.ACTIVE,
) -> int:
    """Insert an enrolled node into the registry (what the AS does); its id."""
    now = datetime.now(UTC)
    async with sessions() as s, s.begin():
        node = Node(name=name, fqdn=f"{name}.{domain}", state=state.value, tags={},
                    device_info={}, created_at=now, updated_at=now)
        s.add(node)
        await s.flush()
        return node.id


async def revoke_node(
    sessions: async_sessionmaker[AsyncSession], node_id: int, *, serial: str | None,
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
