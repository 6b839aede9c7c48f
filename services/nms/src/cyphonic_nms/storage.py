"""NMS repositories over the node registry (SQLAlchemy 2 async; Postgres or SQLite).

``NodeStore`` is the interface the NMS core uses; ``SqlNodeStore`` implements it on the
registry tables (``nodes``, ``certificates``, ``revocations``, ``address_leases``,
``node_network``), the same code on Postgres (asyncpg) and on SQLite (aiosqlite).

The hot path (a registration's two statements, keepalive batches, going offline, a remote
peer's view) runs each statement on its own in autocommit on Postgres, through a pool without
pre-ping: one round trip per statement instead of four (pre-ping, BEGIN, the statement,
COMMIT/ROLLBACK). Every such statement is atomic by itself; a connection the server dropped
(a restart) invalidates the pool and the statement is tried once more on a fresh connection.

Lease uniqueness is the database's job: ``address_leases.ipv4`` and ``.ipv6`` are unique, and
``allocate`` inserts proposals (from ``cyphonic_nms.leases``) inside a savepoint until one is
accepted. A conflict on ``node_id`` means another registration of the same node won the race:
its lease is read back, so a node never holds two leases.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Protocol

from cyphonic.errors import AlreadyExists, CyphonicError
from cyphonic.registry import (
    AddressLease,
    Certificate,
    CertificateStatus,
    Node,
    NodeNetwork,
    NodeState,
    Revocation,
)
from cyphonic.registry.db import map_db_error, map_db_errors, normalize_url, serialized
from sqlalchemy import bindparam, exc, exists, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from cyphonic_nms.leases import LeasePools, exhausted
from cyphonic_nms.routing import Endpoint, Inbound, NatMapping, NetworkInfo


@dataclass(frozen=True)
class NodeRecord:
    """A registry node as the NMS needs it."""

    node_id: int
    fqdn: str
    state: str


@dataclass(frozen=True)
class Lease:
    """A node's virtual addresses."""

    node_id: int
    ipv4: IPv4Address
    ipv6: IPv6Address


@dataclass(frozen=True)
class RegistrationFacts:
    """What a registration needs to know first, read in one query."""

    node_id: int
    state: str
    revoked: bool  # the presented certificate's serial is revoked
    lease: Lease | None


@dataclass(frozen=True)
class NodeView:
    """Everything the NMS knows about one node (admin REST, route decisions)."""

    node_id: int
    fqdn: str
    state: str
    lease: Lease | None
    network: NetworkInfo | None
    online: bool
    last_seen: datetime | None
    nms_replica: str | None


@dataclass(frozen=True)
class RevocationEvent:
    """A revocation recorded in the registry; ``cursor`` is its id."""

    cursor: int
    fqdn: str
    serial: str | None
    reason: str


class NodeStore(Protocol):
    """What the NMS reads and writes in the node registry."""

    async def node_by_fqdn(self, fqdn: str) -> NodeRecord | None: ...

    async def is_revoked(self, fqdn: str, serial_hex: str) -> bool: ...

    async def registration_facts(self, fqdn: str, serial_hex: str) -> RegistrationFacts | None: ...

    async def lease_for(
        self, node_id: int, pools: LeasePools, *, known_missing: bool = False
    ) -> Lease: ...

    async def save_network(
        self, node_id: int, info: NetworkInfo, *, replica: str, now: datetime
    ) -> None: ...

    async def touch(self, node_ids: Sequence[int], *, replica: str, now: datetime) -> None: ...

    async def set_offline(self, node_id: int, *, replica: str | None, now: datetime) -> bool: ...

    async def release_replica(self, replica: str, *, now: datetime) -> int: ...

    async def view(self, fqdn: str) -> NodeView | None: ...

    async def view_by_virtual(self, address: IPv4Address | IPv6Address) -> NodeView | None: ...

    async def list_views(
        self, *, online_only: bool = False, limit: int | None = None, offset: int = 0
    ) -> tuple[list[NodeView], int]: ...

    async def last_revocation_id(self) -> int: ...

    async def revocations_after(self, cursor: int, *, limit: int) -> list[RevocationEvent]: ...

    async def revocations_by_ids(self, ids: Sequence[int]) -> list[RevocationEvent]: ...


# The hot path's statements, built once with bound parameters: building a statement and its
# cache key each time cost more CPU than running it (0.56 -> 0.20 ms a registration_facts,
# 0.80 -> 0.36 ms a save_network, NMS process, Postgres on loopback).
_FACTS = (
    select(
        Node.id,
        Node.state,
        AddressLease.ipv4,
        AddressLease.ipv6,
        or_(
            exists().where(Revocation.serial == bindparam("serial")),
            exists().where(
                Certificate.serial == bindparam("serial"),
                Certificate.status == CertificateStatus.REVOKED.value,
            ),
        ),
    )
    .outerjoin(AddressLease, AddressLease.node_id == Node.id)
    .where(Node.fqdn == bindparam("fqdn"))
)
_NETWORK_COLUMNS = (
    "local_addresses",
    "observed_ipv4",
    "observed_ipv6",
    "has_ipv4",
    "has_ipv6",
    "behind_nat",
    "nat_mapping",
    "inbound",
    "online",
    "last_seen",
    "nms_replica",
    "updated_at",
)


def _save_network_stmt(dialect_insert: Any) -> Any:
    """One upsert (INSERT ... ON CONFLICT DO UPDATE, Postgres and SQLite alike)."""
    stmt = dialect_insert(NodeNetwork).values(
        {c: bindparam(c) for c in ("node_id", *_NETWORK_COLUMNS)}
    )
    return stmt.on_conflict_do_update(
        index_elements=[NodeNetwork.node_id], set_={c: stmt.excluded[c] for c in _NETWORK_COLUMNS}
    )


_SAVE_NETWORK = {
    "sqlite": _save_network_stmt(sqlite_insert),
    "postgresql": _save_network_stmt(pg_insert),
}


_VIEW_COLUMNS = (
    Node.id,
    Node.fqdn,
    Node.state,
    AddressLease.node_id,
    AddressLease.ipv4,
    AddressLease.ipv6,
    NodeNetwork.node_id,
    NodeNetwork.has_ipv4,
    NodeNetwork.has_ipv6,
    NodeNetwork.behind_nat,
    NodeNetwork.observed_ipv4,
    NodeNetwork.observed_ipv6,
    NodeNetwork.local_addresses,
    NodeNetwork.online,
    NodeNetwork.last_seen,
    NodeNetwork.nms_replica,
    NodeNetwork.nat_mapping,
    NodeNetwork.inbound,
)

# One node's view by FQDN or virtual address (route decisions), built once as ``_FACTS``.
_ONE_VIEW = {
    key: select(*_VIEW_COLUMNS)
    .outerjoin(AddressLease, AddressLease.node_id == Node.id)
    .outerjoin(NodeNetwork, NodeNetwork.node_id == Node.id)
    .where(column == bindparam("key"))
    for key, column in (
        ("fqdn", Node.fqdn),
        ("ipv4", AddressLease.ipv4),
        ("ipv6", AddressLease.ipv6),
    )
}


def _ep_text(ep: Endpoint | None) -> str | None:
    return str(ep) if ep is not None else None


def _network_from_row(row: NodeNetwork) -> NetworkInfo:
    return NetworkInfo(
        has_ipv4=row.has_ipv4,
        has_ipv6=row.has_ipv6,
        behind_nat=row.behind_nat,
        observed_ipv4=Endpoint.parse(row.observed_ipv4) if row.observed_ipv4 else None,
        observed_ipv6=Endpoint.parse(row.observed_ipv6) if row.observed_ipv6 else None,
        local_addresses=tuple(Endpoint.parse(str(t)) for t in row.local_addresses or ()),
        nat_mapping=NatMapping(row.nat_mapping or NatMapping.UNKNOWN.value),
        inbound=Inbound(row.inbound or Inbound.UNKNOWN.value),
    )


def _lease_from_row(row: AddressLease) -> Lease:
    v4, v6 = ip_address(row.ipv4), ip_address(row.ipv6)
    assert isinstance(v4, IPv4Address) and isinstance(v6, IPv6Address)
    return Lease(node_id=row.node_id, ipv4=v4, ipv6=v6)


def _now() -> datetime:
    return datetime.now(UTC)


def autocommit_engine(url: str, *, pool_size: int = 10) -> AsyncEngine | None:
    """The hot path's engine for ``url`` (see the module docstring); None for SQLite, whose
    statements go through the serialised sessions instead."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return None
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=10,
        isolation_level="AUTOCOMMIT",
        connect_args={"timeout": 5},
    )


class SqlNodeStore:
    """``NodeStore`` on the registry tables; every public method is one short transaction
    (on the hot path, one autocommitted statement: see the module docstring)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        autocommit: AsyncEngine | None = None,
    ) -> None:
        self._sessions = sessions
        self._engine: AsyncEngine | None = sessions.kw.get("bind")
        self._dialect = self._engine.dialect.name if self._engine is not None else "postgresql"
        self._autocommit = autocommit

    async def close(self) -> None:
        """Close the hot path's pool (the sessions' engine belongs to the caller)."""
        if self._autocommit is not None:
            await self._autocommit.dispose()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection]:
        if self._autocommit is not None:
            async with self._autocommit.connect() as conn:
                yield conn
            return
        assert self._engine is not None
        async with serialized(self._engine), self._engine.begin() as conn:
            yield conn

    async def _execute(self, stmt: Any, params: dict[str, Any] | None = None) -> Any:
        """Run one statement (autocommitted on Postgres): its rows, or its row count for a
        statement that returns none. Retried once on a connection the server dropped."""
        for attempt in (0, 1):
            try:
                async with self._connection() as conn:
                    result = await conn.execute(stmt, params)
                    return result.all() if result.returns_rows else result.rowcount
            except exc.DBAPIError as error:
                if attempt == 0 and error.connection_invalidated:
                    continue  # the pool was invalidated: a fresh connection this time
                mapped = map_db_error(error)
                if mapped is None:
                    raise
                raise mapped from error
        raise AssertionError("unreachable")

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """The session factory (other stores on the same registry share it)."""
        return self._sessions

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        # On SQLite, this process's transactions queue fairly instead of racing the busy
        # handler; elsewhere this is just a session.
        if self._engine is None:
            async with self._sessions() as session:
                yield session
            return
        async with serialized(self._engine), self._sessions() as session:
            yield session

    async def node_by_fqdn(self, fqdn: str) -> NodeRecord | None:
        async with self._session() as s, map_db_errors():
            row = (
                await s.execute(
                    select(Node.id, Node.fqdn, Node.state).where(Node.fqdn == fqdn.lower())
                )
            ).first()
        return NodeRecord(node_id=row[0], fqdn=row[1], state=row[2]) if row else None

    async def is_revoked(self, fqdn: str, serial_hex: str) -> bool:
        """Whether the node is revoked, or this certificate serial is."""
        serial_hex = serial_hex.lower().lstrip("0") or "0"
        async with self._session() as s, map_db_errors():
            state = await s.scalar(select(Node.state).where(Node.fqdn == fqdn.lower()))
            if state == NodeState.REVOKED.value:
                return True
            cert_status = await s.scalar(
                select(Certificate.status).where(Certificate.serial == serial_hex)
            )
            if cert_status == CertificateStatus.REVOKED.value:
                return True
            revoked = await s.scalar(
                select(func.count()).select_from(Revocation).where(Revocation.serial == serial_hex)
            )
            return bool(revoked)

    async def registration_facts(self, fqdn: str, serial_hex: str) -> RegistrationFacts | None:
        """Node id, state, certificate revocation and lease in one round trip."""
        serial_hex = serial_hex.lower().lstrip("0") or "0"
        rows = await self._execute(_FACTS, {"serial": serial_hex, "fqdn": fqdn.lower()})
        row = rows[0] if rows else None
        if row is None:
            return None
        lease = None
        if row[2] is not None:
            v4, v6 = ip_address(row[2]), ip_address(row[3])
            assert isinstance(v4, IPv4Address) and isinstance(v6, IPv6Address)
            lease = Lease(node_id=row[0], ipv4=v4, ipv6=v6)
        return RegistrationFacts(node_id=row[0], state=row[1], revoked=bool(row[4]), lease=lease)

    async def lease_for(
        self, node_id: int, pools: LeasePools, *, known_missing: bool = False
    ) -> Lease:
        """The node's lease, allocating one if it has none (see the module docstring).

        ``known_missing`` skips the first read when the caller just saw there is none.
        """
        if not known_missing:
            existing = await self._lease(node_id)
            if existing is not None:
                return existing
        for v4, v6 in pools.proposals(str(node_id)):
            lease = await self._try_insert(node_id, v4, v6)
            if lease is not None:
                return lease
        # The hashed proposals collided: scan the free IPv4 addresses (crowded pool).
        while True:
            used4 = await self._used(AddressLease.ipv4, pools.ipv4.network)
            candidate = next(iter(pools.ipv4.free(used4, start_key=str(node_id))), None)
            if candidate is None:
                raise exhausted(pools.ipv4)
            for attempt in range(64):
                scan_v6 = pools.ipv6.hashed(f"{node_id}/scan", attempt)
                lease = await self._try_insert(node_id, candidate, scan_v6)  # type: ignore[arg-type]
                if lease is not None:
                    return lease
                if await self._taken(AddressLease.ipv4, str(candidate)):
                    break  # lost this address to another node; rescan
            else:
                raise exhausted(pools.ipv6)

    async def _lease(self, node_id: int) -> Lease | None:
        async with self._session() as s, map_db_errors():
            row = await s.get(AddressLease, node_id)
        return _lease_from_row(row) if row is not None else None

    async def _taken(self, column: Any, value: str) -> bool:
        async with self._session() as s, map_db_errors():
            return bool(await s.scalar(select(func.count()).where(column == value)))

    async def _used(self, column: Any, network: Any) -> list[IPv4Address | IPv6Address]:
        async with self._session() as s, map_db_errors():
            values = (await s.scalars(select(column))).all()
        out: list[IPv4Address | IPv6Address] = []
        for text in values:
            address = ip_address(text)
            if address in network:
                out.append(address)
        return out

    async def _try_insert(self, node_id: int, ipv4: IPv4Address, ipv6: IPv6Address) -> Lease | None:
        """Insert a lease; None when an address is taken; the winner's lease on a node race."""
        try:
            await self._execute(
                insert(AddressLease).values(
                    node_id=node_id, ipv4=str(ipv4), ipv6=str(ipv6), leased_at=_now()
                )
            )
        except (exc.IntegrityError, AlreadyExists):
            existing = await self._lease(node_id)
            return existing  # None: an address was taken by another node, try the next
        except Exception as error:
            mapped = map_db_error(error)
            if isinstance(mapped, CyphonicError) and mapped is not error:
                raise mapped from error
            raise
        return Lease(node_id=node_id, ipv4=ipv4, ipv6=ipv6)

    async def save_network(
        self, node_id: int, info: NetworkInfo, *, replica: str, now: datetime
    ) -> None:
        """Store the node's network information and mark it online at ``replica``."""
        values: dict[str, Any] = {
            "node_id": node_id,
            "local_addresses": [str(ep) for ep in info.local_addresses],
            "observed_ipv4": _ep_text(info.observed_ipv4),
            "observed_ipv6": _ep_text(info.observed_ipv6),
            "has_ipv4": info.has_ipv4,
            "has_ipv6": info.has_ipv6,
            "behind_nat": info.behind_nat,
            "nat_mapping": info.nat_mapping.value,
            "inbound": info.inbound.value,
            "online": True,
            "last_seen": now,
            "nms_replica": replica,
            "updated_at": now,
        }
        await self._execute(_SAVE_NETWORK[self._dialect], values)

    async def touch(self, node_ids: Sequence[int], *, replica: str, now: datetime) -> None:
        """Refresh ``last_seen`` of nodes connected to ``replica`` (batched keepalives)."""
        if not node_ids:
            return
        await self._execute(
            update(NodeNetwork)
            .where(NodeNetwork.node_id.in_(list(node_ids)))
            .where(NodeNetwork.nms_replica == replica)
            .values(last_seen=now, online=True)
        )

    async def set_offline(self, node_id: int, *, replica: str | None, now: datetime) -> bool:
        """Mark the node offline, only if ``replica`` (when given) still holds it."""
        stmt = update(NodeNetwork).where(NodeNetwork.node_id == node_id)
        if replica is not None:
            stmt = stmt.where(NodeNetwork.nms_replica == replica)
        return bool(await self._execute(stmt.values(online=False, updated_at=now)))

    async def release_replica(self, replica: str, *, now: datetime) -> int:
        """Mark offline every node still recorded at ``replica`` (left by a crash)."""
        async with self._session() as s, s.begin(), map_db_errors():
            result = await s.execute(
                update(NodeNetwork)
                .where(NodeNetwork.nms_replica == replica, NodeNetwork.online.is_(True))
                .values(online=False, updated_at=now)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def _view_query(self) -> Any:
        return (
            select(Node, AddressLease, NodeNetwork)
            .outerjoin(AddressLease, AddressLease.node_id == Node.id)
            .outerjoin(NodeNetwork, NodeNetwork.node_id == Node.id)
        )

    @staticmethod
    def _to_view(node: Node, lease: AddressLease | None, net: NodeNetwork | None) -> NodeView:
        return NodeView(
            node_id=node.id,
            fqdn=node.fqdn,
            state=node.state,
            lease=_lease_from_row(lease) if lease is not None else None,
            network=_network_from_row(net) if net is not None else None,
            online=bool(net.online) if net is not None else False,
            last_seen=net.last_seen if net is not None else None,
            nms_replica=net.nms_replica if net is not None else None,
        )

    async def _views(self, stmt: Any) -> list[NodeView]:
        async with self._session() as s, map_db_errors():
            rows: Iterable[Any] = (await s.execute(stmt)).all()
            return [self._to_view(n, lease, net) for n, lease, net in rows]

    async def _one_view(self, by: str, key: str) -> NodeView | None:
        """One node's view in one autocommitted statement (route decisions, hot path)."""
        rows = await self._execute(_ONE_VIEW[by], {"key": key})
        if not rows:
            return None
        row = rows[0]
        nid, fqdn, state, lease_id, v4, v6, net_id = row[:7]
        online, last_seen, replica = row.online, row.last_seen, row.nms_replica
        lease = None
        if lease_id is not None:
            a4, a6 = ip_address(v4), ip_address(v6)
            assert isinstance(a4, IPv4Address) and isinstance(a6, IPv6Address)
            lease = Lease(node_id=lease_id, ipv4=a4, ipv6=a6)
        # The network columns carry NodeNetwork's names: the row reads like one.
        network = _network_from_row(row) if net_id is not None else None
        return NodeView(
            node_id=nid,
            fqdn=fqdn,
            state=state,
            lease=lease,
            network=network,
            online=bool(online) if net_id is not None else False,
            last_seen=last_seen if net_id is not None else None,
            nms_replica=replica if net_id is not None else None,
        )

    async def view(self, fqdn: str) -> NodeView | None:
        return await self._one_view("fqdn", fqdn.lower())

    async def view_by_virtual(self, address: IPv4Address | IPv6Address) -> NodeView | None:
        return await self._one_view("ipv4" if address.version == 4 else "ipv6", str(address))

    async def list_views(
        self, *, online_only: bool = False, limit: int | None = None, offset: int = 0
    ) -> tuple[list[NodeView], int]:
        """A page of nodes ordered by FQDN, and how many there are in all."""
        stmt = self._view_query().order_by(Node.fqdn)
        count = select(func.count()).select_from(Node)
        if online_only:
            stmt = stmt.where(NodeNetwork.online.is_(True))
            count = count.join(NodeNetwork, NodeNetwork.node_id == Node.id).where(
                NodeNetwork.online.is_(True)
            )
        if limit is not None:
            stmt = stmt.limit(limit)
        stmt = stmt.offset(offset)
        async with self._session() as s, map_db_errors():
            total = int(await s.scalar(count) or 0)
        return await self._views(stmt), total

    def _revocation_query(self) -> Any:
        return (
            select(Revocation.id, Node.fqdn, Revocation.serial, Revocation.reason)
            .join(Node, Node.id == Revocation.node_id)
            .order_by(Revocation.id)
        )

    async def _revocation_events(self, stmt: Any) -> list[RevocationEvent]:
        async with self._session() as s, map_db_errors():
            rows = (await s.execute(stmt)).all()
        return [RevocationEvent(cursor=r[0], fqdn=r[1], serial=r[2], reason=r[3]) for r in rows]

    async def last_revocation_id(self) -> int:
        """The highest revocation id recorded so far (0: none)."""
        async with self._session() as s, map_db_errors():
            return int(await s.scalar(select(func.max(Revocation.id))) or 0)

    async def revocations_after(self, cursor: int, *, limit: int) -> list[RevocationEvent]:
        """Up to ``limit`` revocations with an id above ``cursor``, oldest first, with the
        node's FQDN (the poll pages through them; see ``cyphonic_nms.revocations``)."""
        return await self._revocation_events(
            self._revocation_query().where(Revocation.id > cursor).limit(limit)
        )

    async def revocations_by_ids(self, ids: Sequence[int]) -> list[RevocationEvent]:
        """The revocations among ``ids`` that exist now (gaps that committed late)."""
        if not ids:
            return []
        return await self._revocation_events(
            self._revocation_query().where(Revocation.id.in_(list(ids)))
        )


__all__ = [
    "Lease",
    "NodeRecord",
    "NodeStore",
    "NodeView",
    "RegistrationFacts",
    "RevocationEvent",
    "SqlNodeStore",
]
