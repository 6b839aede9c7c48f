"""State NMS replicas share: presence, the replica bus, active routes.

Each piece is a ``typing.Protocol`` with an in-process implementation (the embedded default,
one NMS) and a Redis one (several replicas). Redis layout::

    cyphonic:nms:presence:<fqdn>        STRING replica id holding the node's connection, TTL
                                        = offline timeout, refreshed by keepalives
    cyphonic:nms:replica:<replica id>   pub/sub channel: BusMessage JSON for that replica
    cyphonic:nms:routes                 HASH route id -> RouteRecord JSON
    cyphonic:nms:node-routes:<fqdn>     SET of route ids the node is on

A route request arriving at replica 2 for a node held by replica 1 is decided at replica 2,
which publishes the RouteDirection for that node on replica 1's channel; replica 1 pushes it
on the node's connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from cyphonic.errors import Unavailable
from cyphonic.log import get_logger

PRESENCE_KEY = "cyphonic:nms:presence:{fqdn}"
REPLICA_CHANNEL = "cyphonic:nms:replica:{replica_id}"
ROUTES_KEY = "cyphonic:nms:routes"
NODE_ROUTES_KEY = "cyphonic:nms:node-routes:{fqdn}"

log = get_logger("nms.cluster")

REDIS_TIMEOUT_S = 5.0  # as the TRS: a Redis that stops answering must not hang the NMS
REDIS_HEALTH_CHECK_S = 15.0


def redis_client(url: str, *, timeout_s: float = REDIS_TIMEOUT_S) -> Any:
    """A ``redis.asyncio.Redis`` for the NMS: every command and connect bounded by
    ``timeout_s``, TCP keepalive on, idle connections checked (PING) before reuse."""
    import redis.asyncio as redis_asyncio

    return redis_asyncio.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        socket_keepalive=True, health_check_interval=REDIS_HEALTH_CHECK_S,
    )


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
        return json.dumps({
            "op": self.op, "fqdn": self.fqdn, "reason": self.reason, "code": self.code,
            "payload": base64.b64encode(self.payload).decode(),
        })

    @classmethod
    def from_json(cls, text: str | bytes) -> BusMessage:
        data = json.loads(text)
        return cls(op=str(data["op"]), fqdn=str(data["fqdn"]),
                   payload=base64.b64decode(data.get("payload", "")),
                   reason=str(data.get("reason", "")), code=int(data.get("code", 0)))


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
            log.warning("bus_no_replica", replica=replica_id, fqdn=message.fqdn)
            return
        await handler(message)

    async def subscribe(self, replica_id: str, handler: BusHandler) -> None:
        self.handlers[replica_id] = handler

    async def close(self) -> None:
        self.handlers.clear()


class RedisBus:
    """Redis pub/sub, one channel per replica."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._task: asyncio.Task[None] | None = None
        self._pubsub: Any = None

    async def publish(self, replica_id: str, message: BusMessage) -> None:
        try:
            await self._redis.publish(
                REPLICA_CHANNEL.format(replica_id=replica_id), message.to_json()
            )
        except Exception as exc:
            raise Unavailable("Redis unavailable (replica bus)") from exc

    async def subscribe(self, replica_id: str, handler: BusHandler) -> None:
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._pubsub.subscribe(REPLICA_CHANNEL.format(replica_id=replica_id))
        except Exception as exc:
            raise Unavailable("Redis unavailable (replica bus)") from exc
        self._task = asyncio.create_task(self._run(handler), name="nms-bus")

    async def _run(self, handler: BusHandler) -> None:
        while True:
            try:
                # A bounded wait rather than listen(): each turn runs the client's health
                # check, so a silently dead connection is noticed and re-established.
                raw = await self._pubsub.get_message(ignore_subscribe_messages=True,
                                                     timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis went away; redis-py reconnects and resubscribes on the next read.
                log.warning("bus_listen_failed", error=str(exc))
                await asyncio.sleep(1)
                continue
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

    async def refresh(self, fqdns: Iterable[str], replica_id: str, ttl_s: float) -> None: ...

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

    async def refresh(self, fqdns: Iterable[str], replica_id: str, ttl_s: float) -> None:
        return None

    async def holder(self, fqdn: str) -> str | None:
        return self.holders.get(fqdn)

    async def release(self, fqdn: str, replica_id: str) -> bool:
        if self.holders.get(fqdn) == replica_id:
            del self.holders[fqdn]
            return True
        return False


# Compare-and-act scripts: a replica must not refresh or drop a node another replica took.
_REFRESH = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]) end
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisPresence:
    """Presence keys in Redis with a TTL; see the module docstring."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._refresh = redis.register_script(_REFRESH)
        self._release = redis.register_script(_RELEASE)

    async def claim(self, fqdn: str, replica_id: str, ttl_s: float) -> str | None:
        try:
            previous = await self._redis.set(
                PRESENCE_KEY.format(fqdn=fqdn), replica_id, px=int(ttl_s * 1000), get=True
            )
        except Exception as exc:
            raise Unavailable("Redis unavailable (presence)") from exc
        return _text(previous)

    async def refresh(self, fqdns: Iterable[str], replica_id: str, ttl_s: float) -> None:
        keys = [PRESENCE_KEY.format(fqdn=f) for f in fqdns]
        if not keys:
            return
        try:
            await self._refresh(keys=keys, args=[replica_id, int(ttl_s * 1000)])
        except Exception as exc:
            raise Unavailable("Redis unavailable (presence)") from exc

    async def holder(self, fqdn: str) -> str | None:
        try:
            return _text(await self._redis.get(PRESENCE_KEY.format(fqdn=fqdn)))
        except Exception as exc:
            raise Unavailable("Redis unavailable (presence)") from exc

    async def release(self, fqdn: str, replica_id: str) -> bool:
        try:
            return bool(await self._release(keys=[PRESENCE_KEY.format(fqdn=fqdn)],
                                            args=[replica_id]))
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

    async def get(self, route_id: str) -> RouteRecord | None:
        """The route with this id, if it is active."""
        ...

    async def for_node(self, fqdn: str) -> list[RouteRecord]: ...

    async def remove(self, route: RouteRecord) -> None: ...

    async def all(self) -> list[RouteRecord]: ...


@dataclass
class InProcessRouteStore:
    """Routes in a dict, indexed per node (the embedded default)."""

    routes: dict[str, RouteRecord] = field(default_factory=dict)
    by_node: dict[str, set[str]] = field(default_factory=dict)

    async def put(self, route: RouteRecord) -> None:
        self.routes[route.route_id] = route
        for fqdn in (route.initiator, route.responder):
            self.by_node.setdefault(fqdn, set()).add(route.route_id)

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


class RedisRouteStore:
    """Routes in a Redis hash, indexed per node."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis

    async def put(self, route: RouteRecord) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(ROUTES_KEY, route.route_id, route.to_json())
                pipe.sadd(NODE_ROUTES_KEY.format(fqdn=route.initiator), route.route_id)
                pipe.sadd(NODE_ROUTES_KEY.format(fqdn=route.responder), route.route_id)
                await pipe.execute()
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc

    async def get(self, route_id: str) -> RouteRecord | None:
        try:
            value = await self._redis.hget(ROUTES_KEY, route_id)
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc
        return RouteRecord.from_json(value) if value is not None else None

    async def for_node(self, fqdn: str) -> list[RouteRecord]:
        try:
            ids = [_text(i) for i in await self._redis.smembers(NODE_ROUTES_KEY.format(fqdn=fqdn))]
            if not ids:
                return []
            values = await self._redis.hmget(ROUTES_KEY, ids)
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc
        return [RouteRecord.from_json(v) for v in values if v is not None]

    async def remove(self, route: RouteRecord) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(ROUTES_KEY, route.route_id)
                pipe.srem(NODE_ROUTES_KEY.format(fqdn=route.initiator), route.route_id)
                pipe.srem(NODE_ROUTES_KEY.format(fqdn=route.responder), route.route_id)
                await pipe.execute()
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc

    async def all(self) -> list[RouteRecord]:
        try:
            values = await self._redis.hvals(ROUTES_KEY)
        except Exception as exc:
            raise Unavailable("Redis unavailable (routes)") from exc
        return sorted((RouteRecord.from_json(v) for v in values), key=lambda r: r.created_ms)
