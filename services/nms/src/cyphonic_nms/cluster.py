"""State NMS replicas share: presence, the replica bus, active routes.

Each piece is a ``typing.Protocol`` with an in-process implementation (the embedded default,
one NMS) and a Redis one (several replicas). Redis layout (``<p>`` is the key prefix,
``CYPHONIC_REDIS_PREFIX``, ``cyphonic:`` by default)::

    <p>nms:presence:<fqdn>        STRING replica id holding the node's connection, TTL =
                                  offline timeout; refreshed (re-created if lost) while held
    <p>nms:replica:<replica id>   pub/sub channel: BusMessage JSON for that replica
    <p>nms:route:<route id>       STRING RouteRecord JSON, TTL = offline timeout; refreshed
                                  while both of its nodes are present
    <p>nms:route-index            ZSET route id -> expiry (Redis clock, ms): admin listing
    <p>nms:node-routes:<fqdn>     SET of route ids the node is on, TTL like its routes

A route request arriving at replica 2 for a node held by replica 1 is decided at replica 2,
which publishes the RouteDirection for that node on replica 1's channel; replica 1 pushes it
on the node's connection. A publish nobody receives (the holder died) is ``PeerOffline``.

The scripts touch keys they compute (route and presence keys): a single Redis (or a
replicated primary), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from cyphonic.errors import PeerOffline, Unavailable
from cyphonic.log import get_logger
from cyphonic.redis_client import redis_client as redis_client
from cyphonic.trs_directory import DEFAULT_PREFIX


@dataclass(frozen=True)
class NmsKeys:
    """Names of the NMS's Redis keys under one prefix (layout in the module docstring)."""

    prefix: str = DEFAULT_PREFIX

    def presence(self, fqdn: str) -> str:
        return f"{self.prefix}nms:presence:{fqdn}"

    def channel(self, replica_id: str) -> str:
        return f"{self.prefix}nms:replica:{replica_id}"

    def route(self, route_id: str) -> str:
        return f"{self.prefix}nms:route:{route_id}"

    @property
    def route_index(self) -> str:
        return f"{self.prefix}nms:route-index"

    def node_routes(self, fqdn: str) -> str:
        return f"{self.prefix}nms:node-routes:{fqdn}"


log = get_logger("nms.cluster")


def cancel_requested() -> bool:
    """Whether the running task was asked to stop.

    Python 3.11's ``asyncio.wait_for``, which redis-py wraps around socket writes, loses a
    cancellation that arrives as the write completes: the Redis call returns normally and the
    task runs on. Loops check this after their work so that they still end when cancelled.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


# --------------------------------------------------------------------------- bus messages


@dataclass(frozen=True)
class BusMessage:
    """Work for the replica holding ``fqdn``: push an envelope to it, or disconnect it."""

    op: str  # "push" or "kick"
    fqdn: str
    payload: bytes = b""  # serialized Envelope, for "push"
    reason: str = ""  # for "kick"
    code: int = 0  # ErrorCode, for "kick"

    def to_json(self) -> str:
        return json.dumps(
            {
                "op": self.op,
                "fqdn": self.fqdn,
                "reason": self.reason,
                "code": self.code,
                "payload": base64.b64encode(self.payload).decode(),
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> BusMessage:
        data = json.loads(text)
        return cls(
            op=str(data["op"]),
            fqdn=str(data["fqdn"]),
            payload=base64.b64decode(data.get("payload", "")),
            reason=str(data.get("reason", "")),
            code=int(data.get("code", 0)),
        )


BusHandler = Callable[[BusMessage], Awaitable[None]]


class ReplicaBus(Protocol):
    """Deliver messages to the replica that holds a node."""

    async def publish(self, replica_id: str, message: BusMessage) -> None: ...

    async def subscribe(self, replica_id: str, handler: BusHandler) -> None: ...

    async def close(self) -> None: ...


@dataclass
class InProcessBus:
    """A bus between replicas living in one process (the embedded default, tests)."""

    handlers: dict[str, BusHandler] = field(default_factory=dict)

    async def publish(self, replica_id: str, message: BusMessage) -> None:
        handler = self.handlers.get(replica_id)
        if handler is None:
            raise PeerOffline(f"{message.fqdn} is offline (NMS replica {replica_id} is gone)")
        await handler(message)

    async def subscribe(self, replica_id: str, handler: BusHandler) -> None:
        self.handlers[replica_id] = handler

    async def close(self) -> None:
        self.handlers.clear()


class RedisBus:
    """Redis pub/sub, one channel per replica."""

    def __init__(self, redis: Any, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._redis = redis
        self._keys = NmsKeys(prefix)
        self._task: asyncio.Task[None] | None = None
        self._pubsub: Any = None

    async def publish(self, replica_id: str, message: BusMessage) -> None:
        """Publish to ``replica_id``; ``PeerOffline`` when no replica listens there (the
        holder died and its presence has not expired yet): the message would vanish."""
        try:
            receivers = await self._redis.publish(self._keys.channel(replica_id), message.to_json())
        except Exception as exc:
            raise Unavailable("Redis unavailable (replica bus)") from exc
        if not receivers:
            log.warning("bus_no_replica", replica=replica_id, fqdn=message.fqdn, op=message.op)
            raise PeerOffline(f"{message.fqdn} is offline (NMS replica {replica_id} is gone)")

    async def subscribe(self, replica_id: str, handler: BusHandler) -> None:
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._pubsub.subscribe(self._keys.channel(replica_id))
        except Exception as exc:
            raise Unavailable("Redis unavailable (replica bus)") from exc
        self._task = asyncio.create_task(self._run(handler), name="nms-bus")

    async def _run(self, handler: BusHandler) -> None:
        while True:
            try:
                # A bounded wait rather than listen(): each turn runs the client's health
                # check, so a silently dead connection is noticed and re-established.
                raw = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis went away; redis-py reconnects and resubscribes on the next read.
                log.warning("bus_listen_failed", error=str(exc))
                await asyncio.sleep(1)
                continue
            if cancel_requested():
                raise asyncio.CancelledError
            if raw is None or raw.get("type") != "message":
                continue
            try:
                message = BusMessage.from_json(raw["data"])
            except (ValueError, KeyError, TypeError):
                log.warning("bus_bad_message")
                continue
            try:
                await handler(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("bus_handler_failed", fqdn=message.fqdn)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()


# --------------------------------------------------------------------------- presence


class PresenceStore(Protocol):
    """Which replica holds each online node's connection."""

    async def claim(self, fqdn: str, replica_id: str, ttl_s: float) -> str | None:
        """Record ``replica_id`` as the holder; returns the previous holder, if any."""
        ...

    async def refresh(self, fqdns: Iterable[str], replica_id: str, ttl_s: float) -> int:
        """Extend the TTL of nodes ``replica_id`` holds; re-create entries that were lost
        (a Redis restart) unless another replica holds the node now; how many it re-created."""
        ...

    async def holder(self, fqdn: str) -> str | None: ...

    async def release(self, fqdn: str, replica_id: str) -> bool:
        """Forget the node if ``replica_id`` still holds it; whether it did."""
        ...


@dataclass
class InProcessPresence:
    """Presence for one process; TTLs are not needed (the process is the only replica)."""

    holders: dict[str, str] = field(default_factory=dict)

    async def claim(self, fqdn: str, replica_id: str, ttl_s: float) -> str | None:
        previous = self.holders.get(fqdn)
        self.holders[fqdn] = replica_id
        return previous

    async def refresh(self, fqdns: Iterable[str], replica_id: str, ttl_s: float) -> int:
        return 0

    async def holder(self, fqdn: str) -> str | None:
        return self.holders.get(fqdn)

    async def release(self, fqdn: str, replica_id: str) -> bool:
        if self.holders.get(fqdn) == replica_id:
            del self.holders[fqdn]
            return True
        return False


# Compare-and-act scripts: a replica must not refresh or drop a node another replica took.
# A missing key is set again: after a Redis restart (or a lost key) presence comes back with
# the next refresh instead of the node looking offline until it reconnects.
_REFRESH = """
local restored = 0
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  elseif not holder then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    restored = restored + 1
  end
end
return restored
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisPresence:
    """Presence keys in Redis with a TTL; see the module docstring."""

    def __init__(self, redis: Any, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._redis = redis
        self._keys = NmsKeys(prefix)
        self._refresh = redis.register_script(_REFRESH)
        self._release = redis.register_script(_RELEASE)

    async def claim(self, fqdn: str, replica_id: str, ttl_s: float) -> str | None:
        try:
            previous = await self._redis.set(
                self._keys.presence(fqdn), replica_id, px=int(ttl_s * 1000), get=True
            )
        except Exception as exc:
            raise Unavailable("Redis unavailable (presence)") from exc
        return _text(previous)

    async def refresh(self, fqdns: Iterable[str], replica_id: str, ttl_s: float) -> int:
        keys = [self._keys.presence(f) for f in fqdns]
        if not keys:
            return 0
        try:
            restored = await self._refresh(keys=keys, args=[replica_id, int(ttl_s * 1000)])
        except Exception as exc:
            raise Unavailable("Redis unavailable (presence)") from exc
        if restored:
            log.warning("presence_restored", replica=replica_id, count=int(restored))
        return int(restored or 0)

    async def holder(self, fqdn: str) -> str | None:
        try:
            return _text(await self._redis.get(self._keys.presence(fqdn)))
        except Exception as exc:
            raise Unavailable("Redis unavailable (presence)") from exc

    async def release(self, fqdn: str, replica_id: str) -> bool:
        try:
            return bool(await self._release(keys=[self._keys.presence(fqdn)], args=[replica_id]))
        except Exception as exc:
            raise Unavailable("Redis unavailable (presence)") from exc


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class RouteRecord:
    """An active route between two nodes."""

    route_id: str
    initiator: str
    responder: str
    pattern: int
    family: int | None
    connector: str  # "initiator" or "responder"
    trs_replica: str | None
    created_ms: int
    decided_by: str  # NMS replica id

    def involves(self, fqdn: str) -> bool:
        return fqdn in (self.initiator, self.responder)

    def peer_of(self, fqdn: str) -> str:
        return self.responder if fqdn == self.initiator else self.initiator

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> RouteRecord:
        return cls(**json.loads(text))


class RouteStore(Protocol):
    """Active routes, visible to every replica."""

    async def put(self, route: RouteRecord) -> None: ...

    async def replace(self, route: RouteRecord) -> None:
        """Put ``route`` and remove every other route between the same two nodes."""
        ...

    async def get(self, route_id: str) -> RouteRecord | None:
        """The route with this id, if it is active."""
        ...

    async def for_node(self, fqdn: str) -> list[RouteRecord]: ...

    async def remove(self, route: RouteRecord) -> None: ...

    async def all(self) -> list[RouteRecord]: ...

    async def restore(self, routes: Iterable[RouteRecord]) -> int:
        """Put back routes the store lost (a restart without its data); routes it still has
        are left alone. How many were put back."""
        ...

    async def refresh(self, fqdns: Iterable[str]) -> None:
        """Keep alive the routes of these (locally held) nodes whose other node is present
        too; a route nobody refreshes expires (a replica crashed with both nodes, or one)."""
        ...


@dataclass
class InProcessRouteStore:
    """Routes in a dict, indexed per node (the embedded default)."""

    routes: dict[str, RouteRecord] = field(default_factory=dict)
    by_node: dict[str, set[str]] = field(default_factory=dict)

    async def put(self, route: RouteRecord) -> None:
        self.routes[route.route_id] = route
        for fqdn in (route.initiator, route.responder):
            self.by_node.setdefault(fqdn, set()).add(route.route_id)

    async def replace(self, route: RouteRecord) -> None:
        for old in await self.for_node(route.initiator):
            if old.involves(route.responder) and old.route_id != route.route_id:
                await self.remove(old)
        await self.put(route)

    async def get(self, route_id: str) -> RouteRecord | None:
        return self.routes.get(route_id)

    async def for_node(self, fqdn: str) -> list[RouteRecord]:
        return [self.routes[r] for r in self.by_node.get(fqdn, ()) if r in self.routes]

    async def remove(self, route: RouteRecord) -> None:
        self.routes.pop(route.route_id, None)
        for fqdn in (route.initiator, route.responder):
            ids = self.by_node.get(fqdn)
            if ids is not None:
                ids.discard(route.route_id)
                if not ids:
                    del self.by_node[fqdn]

    async def all(self) -> list[RouteRecord]:
        return sorted(self.routes.values(), key=lambda r: r.created_ms)

    async def restore(self, routes: Iterable[RouteRecord]) -> int:
        return 0  # lives and dies with the process: nothing is ever lost on its own

    async def refresh(self, fqdns: Iterable[str]) -> None:
        return None  # lives and dies with the process, like the nodes' connections


# Store a route: its key with a TTL, the index (scored by expiry on the Redis clock) and the
# two nodes' sets. KEYS: route, index, set a, set b; ARGV: route id, JSON, TTL ms.
_ROUTE_PUT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
for i = 3, 4 do
  redis.call('SADD', KEYS[i], ARGV[1])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 0
"""

# Replace: remove the other routes between the same two nodes, then put as _ROUTE_PUT.
# KEYS: route, index, set a, set b; ARGV: route id, JSON, TTL ms, route key prefix,
# node a, node b.
_ROUTE_REPLACE = (
    """
local a, b = ARGV[5], ARGV[6]
for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if id ~= ARGV[1] then
    local raw = redis.call('GET', ARGV[4] .. id)
    if not raw then
      redis.call('SREM', KEYS[3], id)
    else
      local ok, route = pcall(cjson.decode, raw)
      if ok and type(route) == 'table' and ((route['initiator'] == a and route['responder'] == b)
          or (route['initiator'] == b and route['responder'] == a)) then
        redis.call('DEL', ARGV[4] .. id)
        redis.call('ZREM', KEYS[2], id)
        redis.call('SREM', KEYS[3], id)
        redis.call('SREM', KEYS[4], id)
      end
    end
  end
end
"""
    + _ROUTE_PUT
)

# Restore routes a restarted Redis lost. ARGV: TTL ms, route key prefix, presence key
# prefix, index key, node-routes key prefix, then (route id, JSON, initiator, responder) per
# route. A route is put back only if its key is missing; one whose other node does not come
# back lapses after its TTL like any route (the refresh extends only routes of two present
# nodes).
_ROUTE_RESTORE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
local back = 0
for i = 6, #ARGV, 4 do
  local id, raw, a, b = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('EXISTS', ARGV[2] .. id) == 0 then
    redis.call('SET', ARGV[2] .. id, raw, 'PX', ttl)
    redis.call('ZADD', ARGV[4], now + ttl, id)
    for _, node in ipairs({a, b}) do
      redis.call('SADD', ARGV[5] .. node, id)
      if redis.call('PTTL', ARGV[5] .. node) < ttl then
        redis.call('PEXPIRE', ARGV[5] .. node, ttl)
      end
    end
    back = back + 1
  end
end
return back
"""

# Refresh the routes of locally held nodes. KEYS: the nodes' route sets; ARGV: TTL ms, route
# key prefix, presence key prefix, index key. A route is extended only while both of its
# nodes are present; ids of expired routes leave the sets, expired entries the index.
_ROUTE_REFRESH = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
local kept = 0
for _, set in ipairs(KEYS) do
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    local key = ARGV[2] .. id
    local raw = redis.call('GET', key)
    if not raw then
      redis.call('SREM', set, id)
    else
      local ok, route = pcall(cjson.decode, raw)
      if ok and type(route) == 'table' and type(route['initiator']) == 'string'
          and type(route['responder']) == 'string'
          and redis.call('EXISTS', ARGV[3] .. route['initiator'],
                         ARGV[3] .. route['responder']) == 2 then
        redis.call('PEXPIRE', key, ttl)
        redis.call('ZADD', ARGV[4], now + ttl, id)
        kept = kept + 1
      end
    end
  end
  redis.call('PEXPIRE', set, ttl)
end
redis.call('ZREMRANGEBYSCORE', ARGV[4], '-inf', now)
return kept
"""


class RedisRouteStore:
    """Routes in Redis with a TTL, indexed per node (layout in the module docstring).

    ``ttl_s`` is how long a route outlives the last refresh; the manager refreshes the routes
    of its nodes with presence, so a route whose replica(s) died lapses within about one
    offline timeout after the dead node's presence did.
    """

    def __init__(self, redis: Any, *, prefix: str = DEFAULT_PREFIX, ttl_s: float = 45.0) -> None:
        self._redis = redis
        self._keys = NmsKeys(prefix)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._put = redis.register_script(_ROUTE_PUT)
        self._replace = redis.register_script(_ROUTE_REPLACE)
        self._restore = redis.register_script(_ROUTE_RESTORE)
        self._refresh = redis.register_script(_ROUTE_REFRESH)

    async def put(self, route: RouteRecord) -> None:
        k = self._keys
        try:
            await self._put(
                keys=[
                    k.route(route.route_id),
                    k.route_index,
                    k.node_routes(route.initiator),
                    k.node_routes(route.responder),
                ],
                args=[route.route_id, route.to_json(), self.ttl_ms],
            )
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc

    async def replace(self, route: RouteRecord) -> None:
        k = self._keys
        try:
            await self._replace(
                keys=[
                    k.route(route.route_id),
                    k.route_index,
                    k.node_routes(route.initiator),
                    k.node_routes(route.responder),
                ],
                args=[
                    route.route_id,
                    route.to_json(),
                    self.ttl_ms,
                    k.route(""),
                    route.initiator,
                    route.responder,
                ],
            )
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc

    async def get(self, route_id: str) -> RouteRecord | None:
        try:
            value = await self._redis.get(self._keys.route(route_id))
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc
        return RouteRecord.from_json(value) if value is not None else None

    async def for_node(self, fqdn: str) -> list[RouteRecord]:
        node_key = self._keys.node_routes(fqdn)
        try:
            ids = sorted(_text(i) or "" for i in await self._redis.smembers(node_key))
            if not ids:
                return []
            values = await self._redis.mget([self._keys.route(i) for i in ids])
            gone = [i for i, v in zip(ids, values, strict=True) if v is None]
            if gone:
                await self._redis.srem(node_key, *gone)  # expired: forget the ids
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc
        return [RouteRecord.from_json(v) for v in values if v is not None]

    async def remove(self, route: RouteRecord) -> None:
        k = self._keys
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(k.route(route.route_id))
                pipe.zrem(k.route_index, route.route_id)
                pipe.srem(k.node_routes(route.initiator), route.route_id)
                pipe.srem(k.node_routes(route.responder), route.route_id)
                await pipe.execute()
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc

    async def all(self) -> list[RouteRecord]:
        k = self._keys
        try:
            ids = [_text(i) or "" for i in await self._redis.zrange(k.route_index, 0, -1)]
            if not ids:
                return []
            values = await self._redis.mget([k.route(i) for i in ids])
            gone = [i for i, v in zip(ids, values, strict=True) if v is None]
            if gone:
                await self._redis.zrem(k.route_index, *gone)
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc
        return sorted(
            (RouteRecord.from_json(v) for v in values if v is not None), key=lambda r: r.created_ms
        )

    async def restore(self, routes: Iterable[RouteRecord]) -> int:
        k = self._keys
        args: list[object] = [self.ttl_ms, k.route(""), k.presence(""), k.route_index]
        args.append(k.node_routes(""))
        for r in routes:
            args += [r.route_id, r.to_json(), r.initiator, r.responder]
        if len(args) == 5:
            return 0
        try:
            return int(await self._restore(keys=[], args=args))
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc

    async def refresh(self, fqdns: Iterable[str]) -> None:
        k = self._keys
        keys = [k.node_routes(f) for f in fqdns]
        if not keys:
            return
        try:
            await self._refresh(
                keys=keys, args=[self.ttl_ms, k.route(""), k.presence(""), k.route_index]
            )
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc
