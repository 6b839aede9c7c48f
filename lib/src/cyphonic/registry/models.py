"""Tables of the node registry (SQLAlchemy 2 declarative, typed).

Portable on purpose: plain strings with CHECK constraints instead of native enums, ``JSON``
instead of ``JSONB``, and timestamps that always come back timezone-aware in UTC (SQLite
keeps no zone). Changing a table means a new Alembic revision in ``migrations/versions``.

    nodes 1--* certificates        serial (hex) is the primary key
    nodes 1--* enrolment_tokens    only the SHA-256 of a token is stored
    nodes 1--* revocations         serial is null for a node revoked without certificates
    nodes 1--1 address_leases      (NMS) virtual IPv4 and IPv6
    nodes 1--1 node_network        (NMS) real addresses, NAT, presence
    audit_events                   who did what to which subject
    access_policy                  (NMS) the access policy in force: one row, or none
    access_policy_history          (NMS) every change of it: who, when, old and new document
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names so that migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# An auto-incrementing 64-bit key on Postgres; SQLite only auto-increments INTEGER.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored with its zone where the database can, always read back in UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the registry; pass an aware UTC time")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class NodeState(enum.StrEnum):
    """Life cycle of a node: created, holding a certificate, or revoked for good."""

    PENDING = "pending"
    ACTIVE = "active"
    REVOKED = "revoked"


class CertificateStatus(enum.StrEnum):
    """A certificate is active, replaced by a renewal (still valid until expiry), or revoked."""

    ACTIVE = "active"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"


def _in(values: type[enum.StrEnum]) -> str:
    return ", ".join(f"'{v.value}'" for v in values)


class Base(DeclarativeBase):
    """Declarative base of every registry table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: JSON()}


class Node(Base):
    """An enrolled or enrolling device; its FQDN is ``<name>.<domain>``."""

    __tablename__ = "nodes"
    __table_args__ = (CheckConstraint(f"state IN ({_in(NodeState)})", name="state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    fqdn: Mapped[str] = mapped_column(String(253), unique=True)
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    device_info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default=NodeState.PENDING.value)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    certificates: Mapped[list[Certificate]] = relationship(
        back_populates="node", cascade="all, delete-orphan", passive_deletes=True
    )


class Certificate(Base):
    """A node certificate the AS issued; ``serial`` is lower-case hex without leading zeros."""

    __tablename__ = "certificates"
    __table_args__ = (
        CheckConstraint(f"status IN ({_in(CertificateStatus)})", name="status"),
        Index("ix_certificates_node_id", "node_id"),
    )

    serial: Mapped[str] = mapped_column(String(40), primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    not_before: Mapped[datetime]
    not_after: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16), default=CertificateStatus.ACTIVE.value)
    pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]

    node: Mapped[Node] = relationship(back_populates="certificates")


class EnrolmentToken(Base):
    """A one-time enrolment token; only its SHA-256 (hex) is kept."""

    __tablename__ = "enrolment_tokens"
    __table_args__ = (Index("ix_enrolment_tokens_node_id", "node_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class Revocation(Base):
    """One revoked certificate (or a node revoked before it had any: ``serial`` null)."""

    __tablename__ = "revocations"
    __table_args__ = (
        Index("ix_revocations_node_id", "node_id"),
        Index("ix_revocations_revoked_at", "revoked_at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    serial: Mapped[str | None] = mapped_column(String(40), unique=True)
    reason: Mapped[str] = mapped_column(String(200))
    revoked_at: Mapped[datetime]


class AuditEvent(Base):
    """Who (``actor``) did what (``action``) to which ``subject``; never holds secrets."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(253))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(253))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AddressLease(Base):
    """(NMS) The node's virtual addresses, in text form (``10.77.0.5``, ``fd00::5``)."""

    __tablename__ = "address_leases"

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    ipv4: Mapped[str] = mapped_column(String(15), unique=True)
    ipv6: Mapped[str] = mapped_column(String(39), unique=True)
    leased_at: Mapped[datetime]


class NodeNetwork(Base):
    """(NMS) How the node reaches the Internet, as last registered, and whether it is online.

    ``observed_ipv4``/``observed_ipv6`` are the source ``address:port`` the NMS saw;
    ``nms_replica`` names the NMS replica holding the node's connection.
    """

    __tablename__ = "node_network"

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    local_addresses: Mapped[list[Any]] = mapped_column(JSON, default=list)
    observed_ipv4: Mapped[str | None] = mapped_column(String(64))
    observed_ipv6: Mapped[str | None] = mapped_column(String(64))
    has_ipv4: Mapped[bool] = mapped_column(Boolean, default=False)
    has_ipv6: Mapped[bool] = mapped_column(Boolean, default=False)
    behind_nat: Mapped[bool] = mapped_column(Boolean, default=False)
    # What the reachability probes found (cyphonic_nms.routing.NatMapping / Inbound
    # values); null: not probed.
    nat_mapping: Mapped[str | None] = mapped_column(String(32))
    inbound: Mapped[str | None] = mapped_column(String(16))
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[datetime | None]
    nms_replica: Mapped[str | None] = mapped_column(String(253))
    updated_at: Mapped[datetime]


class AccessPolicy(Base):
    """(NMS) The access policy in force (docs/policy.md): at most one row, ``id`` 1.

    ``document`` is null when the operator removed the policy (the NMS default applies).
    ``revision`` grows with every change of the document or of a node's tags, so that every
    NMS replica sees that the compiled filters must be recomputed.
    """

    __tablename__ = "access_policy"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    revision: Mapped[int] = mapped_column(BigInteger)
    document: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    updated_at: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(String(253))


class AccessPolicyChange(Base):
    """(NMS) One change of the access policy document: who, when, old and new (null: none)."""

    __tablename__ = "access_policy_history"
    __table_args__ = (Index("ix_access_policy_history_at", "at"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    revision: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(253))
    old_document: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    new_document: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
