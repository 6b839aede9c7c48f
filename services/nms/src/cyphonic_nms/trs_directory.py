"""Where the TRS replicas are: the NMS reads it to hand pattern-3 routes a relay.

The Redis layout and the JSON of an entry are defined once, in ``cyphonic.trs_directory``
(the TRS writes with it, the NMS reads with it), under the shared key prefix
``CYPHONIC_REDIS_PREFIX``. A replica whose entry has expired is dead: readers skip it and
drop its id from the set. Which replica a route gets is decided by rendezvous hashing of the
route id over the live replicas (``pick``), so every NMS replica picks the same TRS for the
same route without talking.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cyphonic import trs_directory as directory
from cyphonic.errors import InvalidArgument, Unavailable
from cyphonic.trs_directory import DEFAULT_PREFIX, REPLICA_TTL_S

from cyphonic_nms.routing import Endpoint

DEFAULT_TTL_S = REPLICA_TTL_S


@dataclass(frozen=True)
class TrsReplica:
    """One TRS replica as registered."""

    replica_id: str
    endpoints: tuple[Endpoint, ...]
    server_name: str
    load: int = 0
    updated_ms: int = 0

    def entry(self) -> directory.DirectoryEntry:
        """The shared directory form."""
        return directory.DirectoryEntry(
            replica_id=self.replica_id,
            endpoints=tuple(str(ep) for ep in self.endpoints),
            server_name=self.server_name,
            load=self.load,
            updated_ms=self.updated_ms,
        )

    def to_json(self) -> str:
        return self.entry().to_json()

    @classmethod
    def from_entry(cls, entry: directory.DirectoryEntry) -> TrsReplica:
        """From the shared form; ``InvalidArgument`` if an endpoint is not ``host:port``."""
        try:
            endpoints = tuple(Endpoint.parse(e) for e in entry.endpoints)
        except ValueError as exc:
            raise InvalidArgument(f"bad TRS replica registration: {exc}") from exc
        return cls(
            replica_id=entry.replica_id,
            endpoints=endpoints,
            server_name=entry.server_name,
            load=entry.load,
            updated_ms=entry.updated_ms,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> TrsReplica:
        """Parse a registration; ``InvalidArgument`` if it is not one."""
        return cls.from_entry(directory.DirectoryEntry.from_json(text))


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
    """The TRS replicas registered in Redis (layout: ``cyphonic.trs_directory``).

    ``live`` reads Redis at most once per ``cache_s`` (every relayed route decision asks), and
    while Redis answers nothing (it restarted without its data, and the TRS replicas have not
    registered again yet) or fails, it answers the last list it read for up to ``DEFAULT_TTL_S``,
    as long as those entries would have lived in Redis anyway.
    """

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        cache_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self.prefix = prefix
        self.cache_s = cache_s
        self._monotonic = monotonic
        self._last: tuple[float, list[TrsReplica]] | None = None

    @property
    def replicas_key(self) -> str:
        """The key this directory reads (for logs: a prefix mismatch shows here)."""
        return directory.replicas_key(self.prefix)

    async def register(self, replica: TrsReplica, *, ttl_s: int = DEFAULT_TTL_S) -> None:
        """Register or refresh ``replica`` (what a TRS replica does every ttl/3 seconds)."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(
                    directory.replica_key(replica.replica_id, self.prefix),
                    replica.to_json(),
                    ex=ttl_s,
                )
                pipe.sadd(self.replicas_key, replica.replica_id)
                await pipe.execute()
        except Exception as exc:  # redis.exceptions.* and OSError
            raise Unavailable("Redis unavailable (TRS directory)") from exc

    async def unregister(self, replica_id: str) -> None:
        try:
            await self._redis.delete(directory.replica_key(replica_id, self.prefix))
            await self._redis.srem(self.replicas_key, replica_id)
        except Exception as exc:
            raise Unavailable("Redis unavailable (TRS directory)") from exc

    async def live(self) -> list[TrsReplica]:
        now = self._monotonic()
        if self._last is not None and now - self._last[0] < self.cache_s:
            return list(self._last[1])
        try:
            found = await self._read()
        except Unavailable:
            if self._last is None:
                raise
            found = []
        if found:
            self._last = (now, found)
            return list(found)
        if self._last is None:
            return []
        # Redis lost the directory (the replicas re-register within seconds): the entries
        # last read, each only while its registration would have lived in Redis anyway.
        wall_ms = time.time() * 1000
        return [r for r in self._last[1] if r.updated_ms + DEFAULT_TTL_S * 1000 > wall_ms]

    async def _read(self) -> list[TrsReplica]:
        try:
            ids = sorted(
                i.decode() if isinstance(i, bytes) else str(i)
                for i in await self._redis.smembers(self.replicas_key)
            )
            if not ids:
                return []
            values = await self._redis.mget([directory.replica_key(i, self.prefix) for i in ids])
            dead = [i for i, v in zip(ids, values, strict=True) if v is None]
            if dead:
                await self._redis.srem(self.replicas_key, *dead)
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
