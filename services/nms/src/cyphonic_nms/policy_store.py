"""Where the access policy lives: the document in force, its history, and node tags.

``PolicyStore`` is the interface; ``SqlPolicyStore`` implements it on the registry tables
``access_policy`` (one row), ``access_policy_history`` and ``nodes.tags``, the same code on
Postgres and SQLite. A change of the document or of a node's tags bumps
``access_policy.revision`` in the same transaction, which is how every NMS replica learns
that filters must be recompiled (``cyphonic_nms.access``). Tag changes are also written to
``audit_events`` (who, when, old and new tags).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Protocol

from cyphonic.errors import AlreadyExists, NotFound
from cyphonic.registry import (
    AccessPolicy,
    AccessPolicyChange,
    AddressLease,
    AuditEvent,
    Node,
    NodeState,
)
from cyphonic.registry.db import map_db_errors, serialized
from sqlalchemy import exc, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

MAX_HISTORY_PAGE = 200


@dataclass(frozen=True)
class StoredPolicy:
    """The policy row: ``document`` None means "no policy set" (the default applies)."""

    revision: int
    document: dict[str, Any] | None
    updated_at: datetime | None
    updated_by: str | None


@dataclass(frozen=True)
class PolicyChange:
    """One history entry."""

    change_id: int
    revision: int
    at: datetime
    actor: str
    old_document: dict[str, Any] | None
    new_document: dict[str, Any] | None


@dataclass(frozen=True)
class PolicyNode:
    """A node as the policy sees it: name, tags and (once leased) virtual addresses."""

    fqdn: str
    tags: dict[str, str]
    ipv4: IPv4Address | None
    ipv6: IPv6Address | None


class PolicyStore(Protocol):
    async def current(self) -> StoredPolicy: ...

    async def revision(self) -> int: ...

    async def replace(
        self,
        document: dict[str, Any] | None,
        *,
        actor: str,
        now: datetime,
        expected_revision: int | None = None,
    ) -> StoredPolicy: ...

    async def history(self, *, limit: int, before: int | None = None) -> list[PolicyChange]: ...

    async def tags(self, fqdn: str) -> dict[str, str]: ...

    async def set_tags(
        self, fqdn: str, tags: dict[str, str], *, actor: str, now: datetime
    ) -> dict[str, str]: ...

    async def nodes(self) -> list[PolicyNode]: ...


_NO_POLICY = StoredPolicy(revision=0, document=None, updated_at=None, updated_by=None)


def _tags(raw: object) -> dict[str, str]:
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


class SqlPolicyStore:
    """``PolicyStore`` on the registry (Postgres or SQLite)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._engine: AsyncEngine | None = sessions.kw.get("bind")

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        if self._engine is None:
            async with self._sessions() as session:
                yield session
            return
        async with serialized(self._engine), self._sessions() as session:
            yield session

    async def current(self) -> StoredPolicy:
        async with self._session() as s, map_db_errors():
            row = await s.get(AccessPolicy, 1)
        if row is None:
            return _NO_POLICY
        return StoredPolicy(row.revision, row.document, row.updated_at, row.updated_by)

    async def revision(self) -> int:
        async with self._session() as s, map_db_errors():
            value = await s.scalar(select(AccessPolicy.revision).where(AccessPolicy.id == 1))
        return int(value or 0)

    async def _bump(
        self,
        s: AsyncSession,
        *,
        now: datetime,
        actor: str,
        document: dict[str, Any] | None,
        keep_document: bool = False,
        expected_revision: int | None = None,
    ) -> tuple[int, dict[str, Any] | None]:
        """Raise the revision (and set the document unless ``keep_document``) in ``s``,
        optimistically: a concurrent change makes this fail with ``AlreadyExists``."""
        row = await s.get(AccessPolicy, 1)
        old_rev = row.revision if row is not None else 0
        old_doc = row.document if row is not None else None
        if expected_revision is not None and expected_revision != old_rev:
            raise AlreadyExists(
                f"the policy changed meanwhile (revision {old_rev}, expected {expected_revision})"
            )
        new_doc = old_doc if keep_document else document
        values = {
            "revision": old_rev + 1,
            "document": new_doc,
            "updated_at": now,
            "updated_by": actor,
        }
        if row is None:
            s.add(AccessPolicy(id=1, **values))
        else:
            result = await s.execute(
                update(AccessPolicy)
                .where(AccessPolicy.id == 1, AccessPolicy.revision == old_rev)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise AlreadyExists("the policy changed meanwhile; try again")
        return old_rev + 1, old_doc

    async def replace(
        self,
        document: dict[str, Any] | None,
        *,
        actor: str,
        now: datetime,
        expected_revision: int | None = None,
    ) -> StoredPolicy:
        for attempt in range(3):
            try:
                async with self._session() as s, map_db_errors(), s.begin():
                    revision, old = await self._bump(
                        s,
                        now=now,
                        actor=actor,
                        document=document,
                        expected_revision=expected_revision,
                    )
                    s.add(
                        AccessPolicyChange(
                            revision=revision,
                            at=now,
                            actor=actor,
                            old_document=old,
                            new_document=document,
                        )
                    )
                return StoredPolicy(revision, document, now, actor)
            except exc.IntegrityError as error:  # two first writers raced for row 1
                if attempt == 2:
                    raise AlreadyExists("the policy changed meanwhile; try again") from error
        raise AssertionError("unreachable")

    async def history(self, *, limit: int, before: int | None = None) -> list[PolicyChange]:
        limit = max(1, min(limit, MAX_HISTORY_PAGE))
        query = select(AccessPolicyChange).order_by(AccessPolicyChange.id.desc()).limit(limit)
        if before is not None:
            query = query.where(AccessPolicyChange.id < before)
        async with self._session() as s, map_db_errors():
            rows = (await s.scalars(query)).all()
        return [
            PolicyChange(r.id, r.revision, r.at, r.actor, r.old_document, r.new_document)
            for r in rows
        ]

    async def tags(self, fqdn: str) -> dict[str, str]:
        async with self._session() as s, map_db_errors():
            row = (await s.execute(select(Node.tags).where(Node.fqdn == fqdn.lower()))).first()
        if row is None:
            raise NotFound(f"no node {fqdn}")
        return _tags(row[0])

    async def set_tags(
        self, fqdn: str, tags: dict[str, str], *, actor: str, now: datetime
    ) -> dict[str, str]:
        async with self._session() as s, map_db_errors(), s.begin():
            node = (await s.scalars(select(Node).where(Node.fqdn == fqdn.lower()))).one_or_none()
            if node is None:
                raise NotFound(f"no node {fqdn}")
            old = _tags(node.tags)
            node.tags = dict(tags)
            node.updated_at = now
            await self._bump(s, now=now, actor=actor, document=None, keep_document=True)
            s.add(
                AuditEvent(
                    at=now,
                    actor=actor,
                    action="node_tags",
                    subject=node.fqdn,
                    detail={"old": old, "new": dict(tags)},
                )
            )
        return dict(tags)

    async def nodes(self) -> list[PolicyNode]:
        query = (
            select(Node.fqdn, Node.tags, AddressLease.ipv4, AddressLease.ipv6)
            .outerjoin(AddressLease, AddressLease.node_id == Node.id)
            .where(Node.state != NodeState.REVOKED.value)
        )
        async with self._session() as s, map_db_errors():
            rows = (await s.execute(query)).all()
        out = []
        for fqdn, tags, v4, v6 in rows:
            a4 = ip_address(v4) if v4 else None
            a6 = ip_address(v6) if v6 else None
            out.append(
                PolicyNode(
                    fqdn,
                    _tags(tags),
                    a4 if isinstance(a4, IPv4Address) else None,
                    a6 if isinstance(a6, IPv6Address) else None,
                )
            )
        return out
