"""The TRS directory in Redis: the one definition of its key names and JSON form.

Each TRS replica writes its entry; the NMS reads the entries to hand pattern-3 routes a relay.
Both import the names from here, so a change of layout or of the key prefix cannot make the
relays silently invisible to the NMS. ``<p>`` is the key prefix (``CYPHONIC_REDIS_PREFIX``,
``cyphonic:`` by default; both services read the same setting)::

    <p>trs:replicas          SET of replica ids ("trs-<n>")
    <p>trs:replica:<id>      STRING, the entry's JSON, EX 30 s, refreshed every 10 s:
        {"replica_id": "trs-0",
         "endpoints": ["192.0.2.10:443", "[2001:db8::10]:443"],   # UDP, what nodes dial
         "server_name": "trs.svc.cyphonic.internal",              # name in its certificate
         "load": 12,                                              # active relays
         "updated_ms": 1700000000000,
         ...}                                                     # more, for operators

A replica whose entry has expired is dead: readers skip it and may drop its id from the set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cyphonic.errors import InvalidArgument

DEFAULT_PREFIX = "cyphonic:"
REPLICA_TTL_S = 30
HEARTBEAT_INTERVAL_S = 10.0

_CORE_FIELDS = ("replica_id", "endpoints", "server_name", "load", "updated_ms")


def replicas_key(prefix: str = DEFAULT_PREFIX) -> str:
    """The SET of live replica ids."""
    return f"{prefix}trs:replicas"


def replica_key(replica_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The STRING holding one replica's entry."""
    return f"{prefix}trs:replica:{replica_id}"


@dataclass(frozen=True)
class DirectoryEntry:
    """One TRS replica as registered; ``extra`` holds fields for operators only."""

    replica_id: str
    endpoints: tuple[str, ...]  # "192.0.2.10:443", "[2001:db8::10]:443"
    server_name: str
    load: int = 0
    updated_ms: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The stored form (the core fields win over an ``extra`` of the same name)."""
        data: dict[str, Any] = dict(self.extra)
        data.update(
            {
                "replica_id": self.replica_id,
                "endpoints": list(self.endpoints),
                "server_name": self.server_name,
                "load": self.load,
                "updated_ms": self.updated_ms,
            }
        )
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str | bytes) -> DirectoryEntry:
        """Parse a stored entry; ``InvalidArgument`` if it is not one."""
        try:
            data: dict[str, Any] = json.loads(text)
            endpoints = data["endpoints"]
            if not isinstance(endpoints, list):
                raise TypeError("endpoints must be a list")
            return cls(
                replica_id=str(data["replica_id"]),
                endpoints=tuple(str(e) for e in endpoints),
                server_name=str(data["server_name"]),
                load=int(data.get("load", 0)),
                updated_ms=int(data.get("updated_ms", 0)),
                extra={k: v for k, v in data.items() if k not in _CORE_FIELDS},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidArgument(f"bad TRS replica registration: {exc}") from exc


__all__ = [
    "DEFAULT_PREFIX",
    "HEARTBEAT_INTERVAL_S",
    "REPLICA_TTL_S",
    "DirectoryEntry",
    "replica_key",
    "replicas_key",
]
