"""Where the TRS replicas are: the NMS reads it to hand pattern-3 routes a relay.

Redis layout (written by each TRS replica, read by the NMS); ``<id>`` is the TRS replica id::

    cyphonic:trs:replicas          SET of replica ids
    cyphonic:trs:replica:<id>      STRING, JSON, with a TTL (EX 30 s, refreshed every 10 s):
        {"replica_id": "trs-0",
         "endpoints": ["192.0.2.10:443", "[2001:db8::10]:443"],   # UDP, what nodes dial
         "server_name": "trs.svc.cyphonic.internal",              # name in its certificate
         "load": 12,                                              # optional: active relays
         "updated_ms": 1700000000000}

A replica whose key has expired is dead: readers skip it and drop its id from the set. Which
replica a route gets is decided by rendezvous hashing of the route id over the live replicas
(``pick``), so every NMS replica picks the same TRS for the same route without talking.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cyphonic.errors import InvalidArgument, Unavailable

from cyphonic_nms.routing import Endpoint

REPLICAS_KEY = "cyphonic:trs:replicas"
REPLICA_KEY = "cyphonic:trs:replica:{replica_id}"
DEFAULT_TTL_S = 30


@dataclass(frozen=True)
class TrsReplica:
    """One TRS replica as registered."""

    replica_id: str
    endpoints: tuple[Endpoint, ...]
    server_name: str
    load: int = 0
    updated_ms: int = 0

    def to_json(self) -> str:
        return json.dumps({
            "replica_id": self.replica_id,
            "endpoints": [str(ep) for ep in self.endpoints],
            "server_name": self.server_name,
            "load": self.load,
            "updated_ms": self.updated_ms,
        })

    @classmethod
    def from_json(cls, text: str | bytes) -> TrsReplica:
        """Parse a registration; ``InvalidArgument`` if it is not one."""
        try:
            data: dict[str, Any] = json.loads(text)
            return cls(
                replica_id=str(data["replica_id"]),
                endpoints=tuple(Endpoint.parse(str(e)) for e in data["endpoints"]),
                server_name=str(data["server_name"]),
                load=int(data.get("load", 0)),
                updated_ms=int(data.get("updated_ms", 0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"bad TRS replica registration: {exc}") from exc


def pick(replicas: Sequence[TrsReplica], route_id: str) -> TrsReplica | None:
    """The replica for ``route_id`` by rendezvous hashing; None when there is none."""
    best: tuple[bytes, TrsReplica] | None = None
    for replica in replicas:
        if not replica.endpoints:
            continue
        score = hashlib.sha256(f"{replica.replica_id}\x00{route_id}".encode()).digest()
        if best is None or score > best[0]:
            best = (score, replica)
    return best[1] if best else None


class TrsDirectory(Protocol):
    """The live TRS replicas."""

    async def live(self) -> list[TrsReplica]: ...


@dataclass
class InProcessTrsDirectory:
    """The embedded default and tests: replicas registered in this process."""

    replicas: dict[str, TrsReplica] = field(default_factory=dict)

    async def register(self, replica: TrsReplica) -> None:
        self.replicas[replica.replica_id] = replica

    async def unregister(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)

    async def live(self) -> list[TrsReplica]:
        return list(self.replicas.values())


class RedisTrsDirectory:
    """The TRS replicas registered in Redis (layout in the module docstring)."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis

    async def register(self, replica: TrsReplica, *, ttl_s: int = DEFAULT_TTL_S) -> None:
        """Register or refresh ``replica`` (what a TRS replica does every ttl/3 seconds)."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(REPLICA_KEY.format(replica_id=replica.replica_id), replica.to_json(),
                         ex=ttl_s)
                pipe.sadd(REPLICAS_KEY, replica.replica_id)
                await pipe.execute()
        except Exception as exc:  # redis.exceptions.* and OSError
            raise Unavailable("Redis unavailable (TRS directory)") from exc

    async def unregister(self, replica_id: str) -> None:
        try:
            await self._redis.delete(REPLICA_KEY.format(replica_id=replica_id))
            await self._redis.srem(REPLICAS_KEY, replica_id)
        except Exception as exc:
            raise Unavailable("Redis unavailable (TRS directory)") from exc

    async def live(self) -> list[TrsReplica]:
        try:
            ids = sorted(
                i.decode() if isinstance(i, bytes) else str(i)
                for i in await self._redis.smembers(REPLICAS_KEY)
            )
            if not ids:
                return []
            values = await self._redis.mget([REPLICA_KEY.format(replica_id=i) for i in ids])
            dead = [i for i, v in zip(ids, values, strict=True) if v is None]
            if dead:
                await self._redis.srem(REPLICAS_KEY, *dead)
        except Exception as exc:
            raise Unavailable("Redis unavailable (TRS directory)") from exc
        out: list[TrsReplica] = []
        for value in values:
            if value is None:
                continue
            try:
                out.append(TrsReplica.from_json(value))
            except InvalidArgument:
                continue  # a malformed registration is skipped, not fatal
        return out
