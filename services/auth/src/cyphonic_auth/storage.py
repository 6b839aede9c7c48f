"""The AS's view of the node registry: a ``NodeRegistry`` protocol and its SQL implementation.

``SqlNodeRegistry`` runs on PostgreSQL and SQLite alike (same SQLAlchemy models). Each
method is one transaction; database failures come out as ``Unavailable`` (retry) and
uniqueness conflicts as ``AlreadyExists``. Results are plain frozen records, never ORM
objects, so callers cannot touch the database by accident.

Concurrency: a token is redeemed with ``SELECT ... FOR UPDATE`` on Postgres and inside a
``BEGIN IMMEDIATE`` transaction on SQLite, then marked used with a conditional UPDATE, so
two requests with one token cannot both succeed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509
from cyphonic.errors import AlreadyExists, NotFound, PermissionDenied, Unauthenticated
from cyphonic.registry import db
from cyphonic.registry.models import (
    AuditEvent,
    Certificate,
    CertificateStatus,
    EnrolmentToken,
    Node,
    NodeState,
    Revocation,
)
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from cyphonic_auth.enrolment import (
    TokenRefused,
    certificate_pem,
    check_certificate,
    check_token,
    same_certificate,
    serial_hex,
)


@dataclass(frozen=True)
class NodeRecord:
    """A node as the registry holds it."""

    id: int
    name: str
    fqdn: str
    tags: dict[str, Any]
    device_info: dict[str, Any]
    state: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class CertificateRecord:
    """A certificate the AS issued, with its node's name."""

    serial: str
    node_name: str
    fqdn: str
    not_before: datetime
    not_after: datetime
    status: str
    pem: str
    created_at: datetime


@dataclass(frozen=True)
class RevocationRecord:
    """A revocation; ``serial`` is None for a node revoked before it had a certificate."""

    id: int
    node_name: str
    fqdn: str
    serial: str | None
    reason: str
    revoked_at: datetime


@dataclass(frozen=True)
class AuditRecord:
    """One audit trail entry."""

    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class RevokedSerial:
    """A revoked, not yet expired certificate (what the CRL lists)."""

    serial: str
    revoked_at: datetime
    reason: str


# Signs a certificate for the node (called inside the transaction, after the checks).
Issuer = Callable[[NodeRecord], x509.Certificate]


class NodeRegistry(Protocol):
    """What the AS needs from the registry."""

    async def ping(self) -> None:
        """Raise ``Unavailable`` unless the database answers."""

    async def create_node(
        self,
        *,
        name: str,
        fqdn: str,
        tags: dict[str, Any],
        device_info: dict[str, Any],
        now: datetime,
        actor: str,
    ) -> NodeRecord:
        """Add a pending node; ``AlreadyExists`` if the name or FQDN is taken."""

    async def get_node(self, name: str) -> NodeRecord:
        """The node called ``name``; ``NotFound`` if none."""

    async def list_nodes(self, *, limit: int, offset: int) -> tuple[list[NodeRecord], int]:
        """A page of nodes by name, and the total count."""

    async def node_certificates(self, name: str) -> list[CertificateRecord]:
        """Every certificate of node ``name``, newest first; ``NotFound`` if no such node."""

    async def add_token(
        self,
        *,
        name: str,
        token_hash: str,
        expires_at: datetime,
        now: datetime,
        actor: str,
    ) -> NodeRecord:
        """Store a token's hash for node ``name``; ``PermissionDenied`` if it is revoked."""

    async def token_node(self, *, token_hash: str, now: datetime) -> NodeRecord:
        """The node a usable token belongs to (does not use it); ``TokenRefused`` if none."""

    async def enrol(
        self,
        *,
        token_hash: str,
        now: datetime,
        issue: Issuer,
    ) -> tuple[NodeRecord, CertificateRecord]:
        """Redeem a token: check it, ``issue`` the certificate, store it, mark the token used."""

    async def issue_certificate(
        self,
        *,
        name: str,
        now: datetime,
        actor: str,
        action: str,
        issue: Issuer,
        presented: x509.Certificate | None = None,
    ) -> CertificateRecord:
        """Issue a certificate for ``name``; with ``presented`` (renewal), it must still be good."""

    async def certificate(self, serial: str) -> CertificateRecord | None:
        """The certificate with this serial (hex), or None."""

    async def revoke_node(
        self,
        *,
        name: str,
        reason: str,
        now: datetime,
        actor: str,
    ) -> list[RevocationRecord]:
        """Revoke the node and every certificate it has; idempotent."""

    async def revoke_certificate(
        self,
        *,
        serial: str,
        reason: str,
        now: datetime,
        actor: str,
    ) -> RevocationRecord:
        """Revoke one certificate; idempotent; ``NotFound`` if unknown."""

    async def revocations(
        self,
        *,
        after_id: int,
        limit: int,
        offset: int,
    ) -> tuple[list[RevocationRecord], int]:
        """Revocations with id > ``after_id``, oldest first, and their total count."""

    async def revoked_serials(self, *, now: datetime) -> tuple[list[RevokedSerial], int]:
        """Revoked certificates not yet expired at ``now``, and the newest revocation id."""

    async def audit_events(self, *, limit: int, offset: int) -> tuple[list[AuditRecord], int]:
        """A page of the audit trail, newest first, and the total count."""


def _node(row: Node) -> NodeRecord:
    return NodeRecord(
        id=row.id,
        name=row.name,
        fqdn=row.fqdn,
        tags=dict(row.tags or {}),
        device_info=dict(row.device_info or {}),
        state=row.state,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _certificate(row: Certificate, node: Node) -> CertificateRecord:
    return CertificateRecord(
        serial=row.serial,
        node_name=node.name,
        fqdn=node.fqdn,
        not_before=row.not_before,
        not_after=row.not_after,
        status=row.status,
        pem=row.pem,
        created_at=row.created_at,
    )


def _revocation(row: Revocation, node: Node) -> RevocationRecord:
    return RevocationRecord(
        id=row.id,
        node_name=node.name,
        fqdn=node.fqdn,
        serial=row.serial,
        reason=row.reason,
        revoked_at=row.revoked_at,
    )


class SqlNodeRegistry:
    """``NodeRegistry`` on SQLAlchemy (PostgreSQL via asyncpg, or SQLite via aiosqlite)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions: async_sessionmaker[AsyncSession] = db.make_sessionmaker(engine)

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncSession]:
        async with (
            db.map_db_errors(),
            db.serialized(self.engine),
            self._sessions() as session,
            session.begin(),
        ):
            yield session

    async def ping(self) -> None:
        await db.ping(self.engine)

    @staticmethod
    def _audit(
        session: AsyncSession,
        *,
        at: datetime,
        actor: str,
        action: str,
        subject: str,
        **detail: Any,
    ) -> None:
        session.add(AuditEvent(at=at, actor=actor, action=action, subject=subject, detail=detail))

    @staticmethod
    async def _node_by_name(session: AsyncSession, name: str, *, lock: bool = False) -> Node:
        query = select(Node).where(Node.name == name)
        if lock:
            query = query.with_for_update()
        node = (await session.execute(query)).scalar_one_or_none()
        if node is None:
            raise NotFound(f"no node named {name!r}")
        return node

    async def create_node(
        self,
        *,
        name: str,
        fqdn: str,
        tags: dict[str, Any],
        device_info: dict[str, Any],
        now: datetime,
        actor: str,
    ) -> NodeRecord:
        try:
            async with self._tx() as session:
                node = Node(
                    name=name,
                    fqdn=fqdn,
                    tags=tags,
                    device_info=device_info,
                    state=NodeState.PENDING.value,
                    created_at=now,
                    updated_at=now,
                )
                session.add(node)
                await session.flush()
                self._audit(session, at=now, actor=actor, action="node.create", subject=fqdn)
                return _node(node)
        except AlreadyExists as exc:
            raise AlreadyExists(f"a node named {name!r} already exists") from exc

    async def get_node(self, name: str) -> NodeRecord:
        async with self._tx() as session:
            return _node(await self._node_by_name(session, name))

    async def list_nodes(self, *, limit: int, offset: int) -> tuple[list[NodeRecord], int]:
        async with self._tx() as session:
            total = (await session.execute(select(func.count()).select_from(Node))).scalar_one()
            rows = (
                await session.execute(select(Node).order_by(Node.name).limit(limit).offset(offset))
            ).scalars()
            return [_node(r) for r in rows], int(total)

    async def node_certificates(self, name: str) -> list[CertificateRecord]:
        async with self._tx() as session:
            node = await self._node_by_name(session, name)
            rows = (
                await session.execute(
                    select(Certificate)
                    .where(Certificate.node_id == node.id)
                    .order_by(Certificate.created_at.desc(), Certificate.serial)
                )
            ).scalars()
            return [_certificate(r, node) for r in rows]

    async def add_token(
        self,
        *,
        name: str,
        token_hash: str,
        expires_at: datetime,
        now: datetime,
        actor: str,
    ) -> NodeRecord:
        async with self._tx() as session:
            node = await self._node_by_name(session, name)
            if node.state == NodeState.REVOKED:
                raise PermissionDenied(f"node {name!r} is revoked; create a new node")
            session.add(
                EnrolmentToken(
                    node_id=node.id, token_hash=token_hash, expires_at=expires_at, created_at=now
                )
            )
            self._audit(
                session,
                at=now,
                actor=actor,
                action="token.issue",
                subject=node.fqdn,
                expires_at=expires_at.isoformat(),
            )
            return _node(node)

    async def token_node(self, *, token_hash: str, now: datetime) -> NodeRecord:
        async with self._tx() as session:
            found = (
                await session.execute(
                    select(EnrolmentToken, Node)
                    .join(Node, Node.id == EnrolmentToken.node_id)
                    .where(EnrolmentToken.token_hash == token_hash)
                )
            ).one_or_none()
            if found is None:
                raise TokenRefused("unknown")
            token, node = found
            check_token(
                used_at=token.used_at, expires_at=token.expires_at, node_state=node.state, now=now
            )
            return _node(node)

    async def _store_certificate(
        self,
        session: AsyncSession,
        node: Node,
        cert: x509.Certificate,
        *,
        now: datetime,
    ) -> Certificate:
        # The node holds one current certificate; the ones before it stay valid until they
        # expire (superseded), unless revoked. A pending node never had one.
        if node.state != NodeState.PENDING:
            await session.execute(
                update(Certificate)
                .where(
                    Certificate.node_id == node.id,
                    Certificate.status == CertificateStatus.ACTIVE.value,
                )
                .values(status=CertificateStatus.SUPERSEDED.value)
            )
        row = Certificate(
            serial=serial_hex(cert.serial_number),
            node_id=node.id,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            status=CertificateStatus.ACTIVE.value,
            pem=certificate_pem([cert]),
            created_at=now,
        )
        session.add(row)
        node.state = NodeState.ACTIVE.value
        node.updated_at = now
        return row

    async def enrol(
        self,
        *,
        token_hash: str,
        now: datetime,
        issue: Issuer,
    ) -> tuple[NodeRecord, CertificateRecord]:
        async with self._tx() as session:
            found = (
                await session.execute(
                    select(EnrolmentToken, Node)
                    .join(Node, Node.id == EnrolmentToken.node_id)
                    .where(EnrolmentToken.token_hash == token_hash)
                    .with_for_update()
                )
            ).one_or_none()
            if found is None:
                raise TokenRefused("unknown")
            token, node = found
            check_token(
                used_at=token.used_at, expires_at=token.expires_at, node_state=node.state, now=now
            )
            cert = issue(_node(node))
            used = await session.execute(
                update(EnrolmentToken)
                .where(EnrolmentToken.id == token.id, EnrolmentToken.used_at.is_(None))
                .values(used_at=now)
            )
            if used.rowcount != 1:  # type: ignore[attr-defined]
                raise TokenRefused("used")
            row = await self._store_certificate(session, node, cert, now=now)
            self._audit(
                session,
                at=now,
                actor=node.fqdn,
                action="node.enrol",
                subject=node.fqdn,
                serial=row.serial,
            )
            return _node(node), _certificate(row, node)

    async def issue_certificate(
        self,
        *,
        name: str,
        now: datetime,
        actor: str,
        action: str,
        issue: Issuer,
        presented: x509.Certificate | None = None,
    ) -> CertificateRecord:
        async with self._tx() as session:
            node = await self._node_by_name(session, name, lock=True)
            if node.state == NodeState.REVOKED:
                raise PermissionDenied(f"node {name!r} is revoked")
            if presented is not None:
                current = await session.get(Certificate, serial_hex(presented.serial_number))
                if (
                    current is None
                    or current.node_id != node.id
                    or not same_certificate(current.pem, presented)
                ):
                    raise Unauthenticated("certificate is not known to the registry")
                check_certificate(
                    status=current.status,
                    not_before=current.not_before,
                    not_after=current.not_after,
                    node_state=node.state,
                    now=now,
                )
            cert = issue(_node(node))
            row = await self._store_certificate(session, node, cert, now=now)
            self._audit(
                session, at=now, actor=actor, action=action, subject=node.fqdn, serial=row.serial
            )
            return _certificate(row, node)

    async def certificate(self, serial: str) -> CertificateRecord | None:
        async with self._tx() as session:
            found = (
                await session.execute(
                    select(Certificate, Node)
                    .join(Node, Node.id == Certificate.node_id)
                    .where(Certificate.serial == serial)
                )
            ).one_or_none()
            if found is None:
                return None
            row, node = found
            return _certificate(row, node)

    async def revoke_node(
        self,
        *,
        name: str,
        reason: str,
        now: datetime,
        actor: str,
    ) -> list[RevocationRecord]:
        async with self._tx() as session:
            node = await self._node_by_name(session, name, lock=True)
            certs = (
                (
                    await session.execute(
                        select(Certificate).where(
                            Certificate.node_id == node.id,
                            Certificate.status != CertificateStatus.REVOKED.value,
                        )
                    )
                )
                .scalars()
                .all()
            )
            added: list[Revocation] = []
            for cert in certs:
                cert.status = CertificateStatus.REVOKED.value
                added.append(
                    Revocation(node_id=node.id, serial=cert.serial, reason=reason, revoked_at=now)
                )
            if node.state != NodeState.REVOKED and not added:
                added.append(
                    Revocation(node_id=node.id, serial=None, reason=reason, revoked_at=now)
                )
            if node.state != NodeState.REVOKED or added:
                self._audit(
                    session,
                    at=now,
                    actor=actor,
                    action="node.revoke",
                    subject=node.fqdn,
                    reason=reason,
                    serials=[r.serial for r in added if r.serial],
                )
            node.state = NodeState.REVOKED.value
            node.updated_at = now
            session.add_all(added)
            await session.flush()
            return [_revocation(r, node) for r in added]

    async def revoke_certificate(
        self,
        *,
        serial: str,
        reason: str,
        now: datetime,
        actor: str,
    ) -> RevocationRecord:
        async with self._tx() as session:
            found = (
                await session.execute(
                    select(Certificate, Node)
                    .join(Node, Node.id == Certificate.node_id)
                    .where(Certificate.serial == serial)
                    .with_for_update()
                )
            ).one_or_none()
            if found is None:
                raise NotFound(f"no certificate with serial {serial}")
            cert, node = found
            if cert.status == CertificateStatus.REVOKED:
                existing = (
                    await session.execute(select(Revocation).where(Revocation.serial == serial))
                ).scalar_one()
                return _revocation(existing, node)
            cert.status = CertificateStatus.REVOKED.value
            revocation = Revocation(node_id=node.id, serial=serial, reason=reason, revoked_at=now)
            session.add(revocation)
            self._audit(
                session,
                at=now,
                actor=actor,
                action="certificate.revoke",
                subject=node.fqdn,
                serial=serial,
                reason=reason,
            )
            await session.flush()
            return _revocation(revocation, node)

    async def revocations(
        self,
        *,
        after_id: int,
        limit: int,
        offset: int,
    ) -> tuple[list[RevocationRecord], int]:
        async with self._tx() as session:
            where = Revocation.id > after_id
            total = (
                await session.execute(select(func.count()).select_from(Revocation).where(where))
            ).scalar_one()
            rows = await session.execute(
                select(Revocation, Node)
                .join(Node, Node.id == Revocation.node_id)
                .where(where)
                .order_by(Revocation.id)
                .limit(limit)
                .offset(offset)
            )
            return [_revocation(r, n) for r, n in rows], int(total)

    async def revoked_serials(self, *, now: datetime) -> tuple[list[RevokedSerial], int]:
        async with self._tx() as session:
            rows = await session.execute(
                select(Revocation.serial, Revocation.revoked_at, Revocation.reason)
                .join(Certificate, Certificate.serial == Revocation.serial)
                .where(Certificate.not_after > now)
                .order_by(Revocation.id)
            )
            entries = [
                RevokedSerial(serial=s, revoked_at=at, reason=reason)
                for s, at, reason in rows
                if s is not None
            ]
            newest = (await session.execute(select(func.max(Revocation.id)))).scalar_one()
            return entries, int(newest or 0)

    async def audit_events(self, *, limit: int, offset: int) -> tuple[list[AuditRecord], int]:
        async with self._tx() as session:
            total = (
                await session.execute(select(func.count()).select_from(AuditEvent))
            ).scalar_one()
            rows = (
                await session.execute(
                    select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
                )
            ).scalars()
            return [
                AuditRecord(
                    id=r.id,
                    at=r.at,
                    actor=r.actor,
                    action=r.action,
                    subject=r.subject,
                    detail=dict(r.detail or {}),
                )
                for r in rows
            ], int(total)


def as_node_registry(registry: SqlNodeRegistry) -> NodeRegistry:
    """Type-check that the SQL registry satisfies the protocol."""
    return registry


__all__: Sequence[str] = [
    "AuditRecord",
    "CertificateRecord",
    "Issuer",
    "NodeRecord",
    "NodeRegistry",
    "RevocationRecord",
    "RevokedSerial",
    "SqlNodeRegistry",
]
