"""The node registry: SQLAlchemy 2 async models shared by the AS and the NMS.

``cyphonic.registry.models`` holds the tables, ``cyphonic.registry.db`` the engine, the
session factory, database error mapping and ``migrate()`` (Alembic, migrations inside this
package). The same models run on PostgreSQL (asyncpg) and SQLite (aiosqlite, the embedded
default); ``CYPHONIC_DATABASE_URL`` selects.
"""

from cyphonic.registry.db import (
    create_engine,
    make_sessionmaker,
    map_db_errors,
    migrate,
    normalize_url,
    ping,
    serialized,
    upgrade,
)
from cyphonic.registry.models import (
    AccessPolicy,
    AccessPolicyChange,
    AddressLease,
    AuditEvent,
    Base,
    Certificate,
    CertificateStatus,
    EnrolmentToken,
    Node,
    NodeNetwork,
    NodeState,
    Revocation,
)

__all__ = [
    "AccessPolicy",
    "AccessPolicyChange",
    "AddressLease",
    "AuditEvent",
    "Base",
    "Certificate",
    "CertificateStatus",
    "EnrolmentToken",
    "Node",
    "NodeNetwork",
    "NodeState",
    "Revocation",
    "create_engine",
    "make_sessionmaker",
    "map_db_errors",
    "migrate",
    "normalize_url",
    "ping",
    "serialized",
    "upgrade",
]
