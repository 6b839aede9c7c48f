"""The TRS's shared state behind ``CidTable``: in-process (one host, tests) or Redis.

Redis is consulted when a side allocates, when a replica starts (to reload its sessions),
and by a periodic sync (TTL refresh, heartbeat); never per packet: the forwarding path reads
the in-memory ``RelayCore``.

Redis key layout (``<p>`` is the key prefix, ``cyphonic:`` unless configured; ``<rid>`` a
route ID; ``<cid>`` a CID in lower-case hex; ``<n>`` a replica number)::

    <p>trs:cid:<cid>          HASH route_id, fqdn, replica     TTL = session TTL
                              one per issued CID; HSETNX on route_id reserves it
    <p>trs:session:<rid>      HASH record (JSON, below), version, replica,
                              packets, bytes (as of the last sync)   TTL = session TTL
    <p>trs:sessions:<n>       SET of route IDs relayed by replica n (reloaded at restart)
    <p>trs:token:<nonce>:<fqdn>  STRING "1", EX until the token expires: the token's use
                              by that node (SET NX; a second use is a replay;
                              deleted again when that allocation fails)
    <p>trs:replicas           SET of replica ids ("trs-<n>")          } the NMS's TRS
    <p>trs:replica:trs-<n>    STRING JSON, EX 30 s, refreshed 10 s    } directory reads these
                              (names and JSON: ``cyphonic.trs_directory``, shared with the NMS)

The session record JSON::

    {"route_id": "...", "replica": 0, "pair": ["a.cyphonic.internal", "b.cyphonic.internal"],
     "created_ms": 1700000000000, "version": 2,
     "sides": [{"fqdn": "a...", "host": "192.0.2.1", "port": 40000,
                "cids": ["0700..", ...], "allocated_ms": 1700000000000}, null]}

The replica registration JSON (the NMS reads ``replica_id``, ``endpoints``, ``server_name``,
``load``, ``updated_ms``; the rest is for operators)::

    {"replica_id": "trs-0", "endpoints": ["192.0.2.10:443", "[2001:db8::10]:443"],
     "server_name": "trs.svc.cyphonic.internal", "load": 12, "updated_ms": 1700000000000,
     "replica": 0, "started_ms": ..., "forwarded_packets": ..., "forwarded_bytes": ...}

Session TTL = the idle timeout plus two sync intervals: a session that carries packets is
refreshed at every sync, an idle one lapses in memory first and is deleted here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cyphonic import trs_directory as directory
from cyphonic.errors import CyphonicError, InvalidArgument, Unavailable

# Re-exported: the TRS's modules take the directory's constants from here.
from cyphonic.redis_client import redis_client
from cyphonic.trs_directory import DEFAULT_PREFIX as DEFAULT_PREFIX
from cyphonic.trs_directory import HEARTBEAT_INTERVAL_S as HEARTBEAT_INTERVAL_S
from cyphonic.trs_directory import REPLICA_TTL_S as REPLICA_TTL_S

from cyphonic_trs.errors import ConcurrentUpdate
from cyphonic_trs.session import RelaySession, RelaySide


def replica_name(replica_id: int) -> str:
    """The id a replica registers under in the directory: ``trs-<n>``."""
    return f"trs-{replica_id}"


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """A TRS replica as registered for the NMS's directory."""

    replica: int
    endpoints: tuple[str, ...]  # "192.0.2.10:443", "[2001:db8::10]:443"
    server_name: str
    load: int = 0
    updated_ms: int = 0
    started_ms: int = 0
    forwarded_packets: int = 0
    forwarded_bytes: int = 0

    def to_json(self) -> str:
        """The registration as stored (``cyphonic.trs_directory.DirectoryEntry``)."""
        return directory.DirectoryEntry(
            replica_id=replica_name(self.replica),
            endpoints=self.endpoints,
            server_name=self.server_name,
            load=self.load,
            updated_ms=self.updated_ms,
            extra={
                "replica": self.replica,
                "started_ms": self.started_ms,
                "forwarded_packets": self.forwarded_packets,
                "forwarded_bytes": self.forwarded_bytes,
            },
        ).to_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> ReplicaInfo:
        """Parse a registration; ``InvalidArgument`` if it is not one."""
        entry = directory.DirectoryEntry.from_json(text)
        try:
            replica = entry.extra.get("replica")
            if replica is None:
                replica = int(entry.replica_id.removeprefix("trs-"))
            return cls(
                replica=int(replica),
                endpoints=entry.endpoints,
                server_name=entry.server_name,
                load=entry.load,
                updated_ms=entry.updated_ms,
                started_ms=int(entry.extra.get("started_ms", 0)),
                forwarded_packets=int(entry.extra.get("forwarded_packets", 0)),
                forwarded_bytes=int(entry.extra.get("forwarded_bytes", 0)),
            )
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"bad TRS replica registration: {exc}") from exc


# --- session records as JSON ---------------------------------------------------------


def session_to_json(session: RelaySession) -> str:
    """The stored form of a session record."""

    def side(s: RelaySide | None) -> dict[str, Any] | None:
        if s is None:
            return None
        return {
            "fqdn": s.fqdn,
            "host": s.addr[0],
            "port": s.addr[1],
            "cids": [c.hex() for c in s.cids],
            "allocated_ms": s.allocated_ms,
        }

    return json.dumps(
        {
            "route_id": session.route_id,
            "replica": session.replica_id,
            "pair": list(session.pair),
            "created_ms": session.created_ms,
            "version": session.version,
            "sides": [side(s) for s in session.sides],
        }
    )


def session_from_json(text: str | bytes) -> RelaySession:
    """Parse a stored session record; ``InvalidArgument`` if it is not one."""
    try:
        data: dict[str, Any] = json.loads(text)

        def side(d: dict[str, Any] | None) -> RelaySide | None:
            if d is None:
                return None
            return RelaySide(
                fqdn=str(d["fqdn"]),
                addr=(str(d["host"]), int(d["port"])),
                cids=tuple(bytes.fromhex(c) for c in d["cids"]),
                allocated_ms=int(d["allocated_ms"]),
            )

        pair = data["pair"]
        sides = data["sides"]
        if len(pair) != 2 or len(sides) != 2:
            raise ValueError("a session has exactly two sides")
        return RelaySession(
            route_id=str(data["route_id"]),
            replica_id=int(data["replica"]),
            pair=(str(pair[0]), str(pair[1])),
            sides=(side(sides[0]), side(sides[1])),
            created_ms=int(data["created_ms"]),
            version=int(data["version"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"bad relay session record: {exc}") from exc


# --- the interface -------------------------------------------------------------------


class CidTable(Protocol):
    """Shared CID table, sessions, token claims and replica registry of the TRS."""

    async def ping(self) -> None:
        """Raise ``Unavailable`` when the store cannot be reached."""

    async def claim_token(self, key: str, *, expires_ms: int, now_ms: int) -> bool:
        """Record one use of a token (``AllocationGrant.replay_key``); False if already used."""

    async def release_token(self, key: str) -> None:
        """Forget a claim (the allocation it was for failed, so the token is still unused)."""

    async def reserve_cids(
        self, cids: Sequence[bytes], *, route_id: str, fqdn: str, replica_id: int, ttl_s: float
    ) -> list[bytes]:
        """Reserve ``cids`` for ``route_id``; returns those already taken by another route."""

    async def release_cids(self, cids: Iterable[bytes]) -> None:
        """Forget CIDs (a replaced side's, or a failed allocation's)."""

    async def load_session(self, route_id: str) -> RelaySession | None:
        """The stored session of ``route_id``, if any."""

    async def save_session(
        self, session: RelaySession, *, expected_version: int | None, ttl_s: float
    ) -> None:
        """Store ``session`` if the stored version is still ``expected_version`` (None: absent);
        ``ConcurrentUpdate`` otherwise."""

    async def delete_session(self, route_id: str) -> None:
        """Delete a session, its CIDs and its replica-set membership (idempotent)."""

    async def sessions_of_replica(self, replica_id: int) -> list[RelaySession]:
        """Every live session relayed by ``replica_id`` (what a restarting replica reloads)."""

    async def refresh(
        self,
        route_ids: Sequence[str],
        *,
        ttl_s: float,
        counters: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        """Extend the TTL of sessions (and their CIDs) that carried traffic; store counters
        ``route_id -> (packets, bytes)`` for other replicas' admin views."""

    async def register_replica(self, info: ReplicaInfo, *, ttl_s: float = REPLICA_TTL_S) -> None:
        """Register or refresh a replica in the directory."""

    async def unregister_replica(self, replica_id: int) -> None:
        """Remove a replica from the directory (clean shutdown)."""

    async def replicas(self) -> list[ReplicaInfo]:
        """The live replicas."""

    async def close(self) -> None:
        """Release connections."""


# --- in-process ----------------------------------------------------------------------


@dataclass
class _Expiring:
    value: Any
    expires_at: float


@dataclass
class InMemoryCidTable:
    """The embedded default and unit tests: the same semantics, in this process only."""

    clock: Callable[[], float] = time.monotonic
    _cids: dict[bytes, _Expiring] = field(default_factory=dict)
    _sessions: dict[str, _Expiring] = field(default_factory=dict)
    _tokens: dict[str, int] = field(default_factory=dict)
    _replicas: dict[int, _Expiring] = field(default_factory=dict)
    _counters: dict[str, tuple[int, int]] = field(default_factory=dict)

    def _live(self, store: dict[Any, _Expiring], key: Any) -> Any:
        item = store.get(key)
        if item is None:
            return None
        if item.expires_at <= self.clock():
            del store[key]
            return None
        return item.value

    async def ping(self) -> None:
        return None

    async def claim_token(self, key: str, *, expires_ms: int, now_ms: int) -> bool:
        for old in [k for k, exp in self._tokens.items() if exp <= now_ms]:
            del self._tokens[old]
        if key in self._tokens:
            return False
        self._tokens[key] = expires_ms
        return True

    async def release_token(self, key: str) -> None:
        self._tokens.pop(key, None)

    async def reserve_cids(
        self, cids: Sequence[bytes], *, route_id: str, fqdn: str, replica_id: int, ttl_s: float
    ) -> list[bytes]:
        taken = []
        expires = self.clock() + ttl_s
        for cid in cids:
            owner = self._live(self._cids, cid)
            if owner is not None and owner[0] != route_id:
                taken.append(cid)
                continue
            self._cids[cid] = _Expiring((route_id, fqdn, replica_id), expires)
        return taken

    async def release_cids(self, cids: Iterable[bytes]) -> None:
        for cid in cids:
            self._cids.pop(cid, None)

    async def load_session(self, route_id: str) -> RelaySession | None:
        session: RelaySession | None = self._live(self._sessions, route_id)
        return session

    async def save_session(
        self, session: RelaySession, *, expected_version: int | None, ttl_s: float
    ) -> None:
        # No await between the check and the write: atomic within the event loop.
        current: RelaySession | None = self._live(self._sessions, session.route_id)
        stored = None if current is None else current.version
        if stored != expected_version:
            raise ConcurrentUpdate(f"route {session.route_id} changed meanwhile")
        self._sessions[session.route_id] = _Expiring(session, self.clock() + ttl_s)

    async def delete_session(self, route_id: str) -> None:
        item = self._sessions.pop(route_id, None)
        self._counters.pop(route_id, None)
        if item is not None:
            await self.release_cids(item.value.all_cids())

    async def sessions_of_replica(self, replica_id: int) -> list[RelaySession]:
        out = []
        for route_id in list(self._sessions):
            session = self._live(self._sessions, route_id)
            if session is not None and session.replica_id == replica_id:
                out.append(session)
        return out

    async def refresh(
        self,
        route_ids: Sequence[str],
        *,
        ttl_s: float,
        counters: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        expires = self.clock() + ttl_s
        for route_id in route_ids:
            session = self._live(self._sessions, route_id)
            if session is None:
                continue
            self._sessions[route_id].expires_at = expires
            for cid in session.all_cids():
                if cid in self._cids:
                    self._cids[cid].expires_at = expires
        self._counters.update(counters or {})

    async def register_replica(self, info: ReplicaInfo, *, ttl_s: float = REPLICA_TTL_S) -> None:
        self._replicas[info.replica] = _Expiring(info, self.clock() + ttl_s)

    async def unregister_replica(self, replica_id: int) -> None:
        self._replicas.pop(replica_id, None)

    async def replicas(self) -> list[ReplicaInfo]:
        out = [self._live(self._replicas, r) for r in sorted(self._replicas)]
        return [r for r in out if r is not None]

    async def close(self) -> None:
        return None

    def cid_owner(self, cid: bytes) -> tuple[str, str, int] | None:
        """``(route_id, fqdn, replica)`` of a reserved CID (for tests and diagnostics)."""
        owner: tuple[str, str, int] | None = self._live(self._cids, cid)
        return owner


# --- Redis ---------------------------------------------------------------------------


# Atomic per-CID reservation: a CID already held by another route is reported (by its
# 1-based index) and left alone; the others are (re)written with a fresh TTL.
_RESERVE_CIDS = """
local taken = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('HGET', key, 'route_id')
  if owner and owner ~= ARGV[1] then
    table.insert(taken, i)
  else
    redis.call('HSET', key, 'route_id', ARGV[1], 'fqdn', ARGV[2], 'replica', ARGV[3])
    redis.call('PEXPIRE', key, ARGV[4])
  end
end
return taken
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisCidTable:
    """``CidTable`` on Redis (layout in the module docstring); ``redis`` is a
    ``redis.asyncio.Redis``. Every Redis or socket failure becomes ``Unavailable``."""

    def __init__(self, redis: Any, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._redis = redis
        self.prefix = prefix
        # The sessions this replica stored or reloaded, as stored: ``refresh`` writes back
        # one whose record Redis lost (a restart without its data) while it still relays.
        self._saved: dict[str, RelaySession] = {}

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX) -> RedisCidTable:
        """A table on the Redis at ``url`` (``redis://host:port/db``), through the shared
        client factory (bounded commands, keepalive, health checks)."""
        return cls(redis_client(url), prefix=prefix)

    # key names
    def cid_key(self, cid: bytes) -> str:
        return f"{self.prefix}trs:cid:{cid.hex()}"

    def session_key(self, route_id: str) -> str:
        return f"{self.prefix}trs:session:{route_id}"

    def replica_sessions_key(self, replica_id: int) -> str:
        return f"{self.prefix}trs:sessions:{replica_id}"

    def token_key(self, key: str) -> str:
        return f"{self.prefix}trs:token:{key}"

    @property
    def replicas_key(self) -> str:
        return directory.replicas_key(self.prefix)

    def replica_key(self, replica_id: int) -> str:
        return directory.replica_key(replica_name(replica_id), self.prefix)

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except CyphonicError:
            raise
        except Exception as exc:  # redis.exceptions.*, OSError, TimeoutError
            if type(exc).__name__ == "WatchError":
                raise ConcurrentUpdate(f"{what}: changed meanwhile") from exc
            raise Unavailable(f"Redis unavailable ({what})") from exc

    async def ping(self) -> None:
        await self._call("ping", self._redis.ping())

    async def claim_token(self, key: str, *, expires_ms: int, now_ms: int) -> bool:
        ttl_ms = max(1, expires_ms - now_ms)
        done = await self._call(
            "claim token", self._redis.set(self.token_key(key), b"1", nx=True, px=ttl_ms)
        )
        return bool(done)

    async def release_token(self, key: str) -> None:
        await self._call("release token", self._redis.delete(self.token_key(key)))

    async def reserve_cids(
        self, cids: Sequence[bytes], *, route_id: str, fqdn: str, replica_id: int, ttl_s: float
    ) -> list[bytes]:
        if not cids:
            return []
        keys = [self.cid_key(c) for c in cids]
        taken = await self._call(
            "reserve CIDs",
            self._redis.eval(
                _RESERVE_CIDS, len(keys), *keys, route_id, fqdn, replica_id, int(ttl_s * 1000)
            ),
        )
        return [cids[int(i) - 1] for i in taken]

    async def release_cids(self, cids: Iterable[bytes]) -> None:
        keys = [self.cid_key(c) for c in cids]
        if keys:
            await self._call("release CIDs", self._redis.delete(*keys))

    async def load_session(self, route_id: str) -> RelaySession | None:
        raw = await self._call(
            "load session", self._redis.hget(self.session_key(route_id), "record")
        )
        return None if raw is None else session_from_json(raw)

    async def save_session(
        self, session: RelaySession, *, expected_version: int | None, ttl_s: float
    ) -> None:
        key = self.session_key(session.route_id)

        async def run() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                stored = await pipe.hget(key, "version")
                stored_version = None if stored is None else int(stored)
                if stored_version != expected_version:
                    await pipe.unwatch()
                    raise ConcurrentUpdate(f"route {session.route_id} changed meanwhile")
                pipe.multi()
                pipe.hset(
                    key,
                    mapping={
                        "record": session_to_json(session),
                        "version": session.version,
                        "replica": session.replica_id,
                    },
                )
                pipe.pexpire(key, int(ttl_s * 1000))
                pipe.sadd(self.replica_sessions_key(session.replica_id), session.route_id)
                for cid in session.all_cids():
                    pipe.pexpire(self.cid_key(cid), int(ttl_s * 1000))
                await pipe.execute()

        await self._call("save session", run())
        self._saved[session.route_id] = session

    async def delete_session(self, route_id: str) -> None:
        self._saved.pop(route_id, None)
        session = await self.load_session(route_id)
        if session is None:
            return

        async def run() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.session_key(route_id))
                pipe.srem(self.replica_sessions_key(session.replica_id), route_id)
                for cid in session.all_cids():
                    pipe.delete(self.cid_key(cid))
                await pipe.execute()

        await self._call("delete session", run())

    async def sessions_of_replica(self, replica_id: int) -> list[RelaySession]:
        set_key = self.replica_sessions_key(replica_id)
        route_ids = sorted(
            _text(r) for r in await self._call("list sessions", self._redis.smembers(set_key))
        )
        if not route_ids:
            return []
        keys = [self.session_key(r) for r in route_ids]

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hget(key, "record")
                result: list[Any] = await pipe.execute()
                return result

        raws = await self._call("load sessions", run())
        out, gone = [], []
        for route_id, raw in zip(route_ids, raws, strict=True):
            if raw is None:
                gone.append(route_id)  # lapsed; its CIDs lapsed with it
                continue
            session = session_from_json(raw)
            if session.replica_id == replica_id:
                out.append(session)
                self._saved[route_id] = session
            else:
                gone.append(route_id)
        if gone:
            await self._call("prune sessions", self._redis.srem(set_key, *gone))
        return out

    async def refresh(
        self,
        route_ids: Sequence[str],
        *,
        ttl_s: float,
        counters: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        if not route_ids:
            return
        ttl_ms = int(ttl_s * 1000)

        async def run() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for route_id in route_ids:
                    pipe.hget(self.session_key(route_id), "record")
                raws = await pipe.execute()
            counts = counters or {}
            async with self._redis.pipeline(transaction=False) as pipe:
                for route_id, raw in zip(route_ids, raws, strict=True):
                    if raw is None:
                        saved = self._saved.get(route_id)
                        if saved is not None:  # still relayed here: Redis lost it
                            self._write_back(pipe, saved, ttl_ms)
                        continue  # otherwise lapsed or deleted: not resurrected
                    key = self.session_key(route_id)
                    if route_id in counts:
                        packets, octets = counts[route_id]
                        pipe.hset(key, mapping={"packets": packets, "bytes": octets})
                    pipe.pexpire(key, ttl_ms)
                    for cid in session_from_json(raw).all_cids():
                        pipe.pexpire(self.cid_key(cid), ttl_ms)
                await pipe.execute()

        await self._call("refresh sessions", run())

    def _write_back(self, pipe: Any, session: RelaySession, ttl_ms: int) -> None:
        """Queue the writes that put ``session`` back as ``save_session`` and
        ``reserve_cids`` left it: record, replica set and the CIDs' owners."""
        key = self.session_key(session.route_id)
        pipe.hset(
            key,
            mapping={
                "record": session_to_json(session),
                "version": session.version,
                "replica": session.replica_id,
            },
        )
        pipe.pexpire(key, ttl_ms)
        pipe.sadd(self.replica_sessions_key(session.replica_id), session.route_id)
        for side in session.sides:
            if side is None:
                continue
            for cid in side.cids:
                owner = {"route_id": session.route_id, "fqdn": side.fqdn}
                pipe.hset(self.cid_key(cid), mapping={**owner, "replica": session.replica_id})
                pipe.pexpire(self.cid_key(cid), ttl_ms)

    async def register_replica(self, info: ReplicaInfo, *, ttl_s: float = REPLICA_TTL_S) -> None:
        async def run() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self.replica_key(info.replica), info.to_json(), px=int(ttl_s * 1000))
                pipe.sadd(self.replicas_key, replica_name(info.replica))
                await pipe.execute()

        await self._call("register replica", run())

    async def unregister_replica(self, replica_id: int) -> None:
        async def run() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.replica_key(replica_id))
                pipe.srem(self.replicas_key, replica_name(replica_id))
                await pipe.execute()

        await self._call("unregister replica", run())

    async def replicas(self) -> list[ReplicaInfo]:
        names = sorted(
            _text(n)
            for n in await self._call("list replicas", self._redis.smembers(self.replicas_key))
        )
        if not names:
            return []
        keys = [directory.replica_key(n, self.prefix) for n in names]
        values = await self._call("read replicas", self._redis.mget(keys))
        out = []
        for value in values:
            if value is None:
                continue  # expired: a dead replica (the NMS prunes the set)
            try:
                out.append(ReplicaInfo.from_json(value))
            except InvalidArgument:
                continue
        return sorted(out, key=lambda r: r.replica)

    async def close(self) -> None:
        await self._call("close", self._redis.aclose())
