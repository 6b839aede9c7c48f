"""Assembly of one NMS replica: registry, shared state, manager, admin REST, QUIC endpoint."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from cyphonic.admin import AdminServer, create_admin_app
from cyphonic.config import hide_password
from cyphonic.errors import Unavailable
from cyphonic.log import get_logger
from cyphonic.registry import create_engine, make_sessionmaker, ping, upgrade
from cyphonic.signalling_server import SignallingServer

from cyphonic_nms.api import router
from cyphonic_nms.cluster import (
    InProcessBus,
    InProcessPresence,
    InProcessRouteStore,
    RedisBus,
    RedisPresence,
    RedisRouteStore,
    redis_client,
)
from cyphonic_nms.config import NmsSettings
from cyphonic_nms.console import make_router as console_router
from cyphonic_nms.leases import LeasePools
from cyphonic_nms.manager import NmsMetrics, NodeManager
from cyphonic_nms.reach import ReachProber
from cyphonic_nms.routing import Endpoint
from cyphonic_nms.signalling import start_signalling
from cyphonic_nms.storage import SqlNodeStore, autocommit_engine
from cyphonic_nms.trs_directory import InProcessTrsDirectory, RedisTrsDirectory, TrsReplica

log = get_logger("nms")


@dataclass
class NmsServer:
    """A running NMS replica (``start``/``stop``); ``quic`` False serves admin REST only."""

    settings: NmsSettings
    quic: bool = True
    manager: NodeManager | None = None
    admin: AdminServer | None = None
    signalling: SignallingServer | None = None
    _engine: Any = None
    _redis: Any = None
    _closers: list[Any] = field(default_factory=list)

    async def start(self) -> None:
        """Connect to the registry (and Redis), start the manager, REST and QUIC."""
        s = self.settings
        self._engine = create_engine(s.database_url)
        if s.migrate:
            await upgrade(self._engine)
        await ping(self._engine)
        store = SqlNodeStore(
            make_sessionmaker(self._engine), autocommit=autocommit_engine(s.database_url)
        )
        self._closers.append(store.close)
        if s.redis_url:
            self._redis = redis_client(s.redis_url, timeout_s=s.redis_timeout_s)
            try:
                await self._redis.ping()
            except Exception as exc:
                raise Unavailable(f"Redis at {hide_password(s.redis_url)} is unreachable") from exc
            presence: Any = RedisPresence(self._redis, prefix=s.redis_prefix)
            bus: Any = RedisBus(self._redis, prefix=s.redis_prefix)
            routes: Any = RedisRouteStore(
                self._redis, prefix=s.redis_prefix, ttl_s=s.offline_timeout_s
            )
            trs: Any = RedisTrsDirectory(self._redis, prefix=s.redis_prefix)
        else:
            presence, bus = InProcessPresence(), InProcessBus()
            routes, trs = InProcessRouteStore(), InProcessTrsDirectory()
        if s.trs_endpoints:
            # A fixed TRS (one host, or a TRS behind one load-balanced name).
            trs = InProcessTrsDirectory()
            await trs.register(
                TrsReplica(
                    replica_id="static",
                    endpoints=tuple(Endpoint.parse(e) for e in s.trs_endpoints),
                    server_name=s.trs_server_name or f"trs.svc.{s.domain}",
                )
            )
        self.manager = NodeManager(
            nodes=store,
            pools=LeasePools.from_settings(ipv4=s.ipv4_pool, ipv6=s.ipv6_pool, domain=s.domain),
            replica_id=s.replica_id,
            relay_secret=s.relay_secret(),
            presence=presence,
            bus=bus,
            routes=routes,
            trs=trs,
            keepalive_interval_s=s.keepalive_interval_s,
            ping_interval_s=s.ping_interval_s,
            presence_refresh_s=s.presence_refresh_s,
            last_seen_interval_s=s.last_seen_interval_s,
            max_pending_registrations=s.max_pending_registrations,
            admission_max_wait_s=s.admission_max_wait_s,
            overload_retry_after_s=s.overload_retry_after_s,
            offline_timeout_s=s.offline_timeout_s,
            revocation_poll_s=s.revocation_poll_s,
            relay_token_lifetime_s=s.relay_token_lifetime_s,
            policy_default_deny=s.policy_default == "deny",
            policy_poll_s=s.policy_poll_s,
            metrics=NmsMetrics(),
        )
        await self.manager.start()
        if isinstance(trs, RedisTrsDirectory):
            await self._report_trs(trs)
        checks = [lambda: ping(self._engine)]
        if self._redis is not None:
            checks.append(self._ping_redis)
        app = create_admin_app(
            service="nms",
            title="CYPHONIC NMS",
            admin_token=s.admin_token,
            ready_checks=checks,
            routers=[router, console_router(s)],
            metrics_registry=self.manager.metrics.registry,
            description="Node Management Service: nodes, virtual addresses, routes.",
        )
        app.state.manager = self.manager
        self.admin = AdminServer(app, host=s.http_host, port=s.http_port, log_level=s.log_level)
        await self.admin.start()
        if self.quic:
            if s.reach_probe_port >= 0:
                manager = self.manager
                prober = ReachProber(
                    host=s.quic_host,
                    port=s.reach_probe_port,
                    on_verdict=manager.reach_verdict,
                    timeout_s=s.reach_probe_timeout_s,
                )
                await prober.start()
                manager.reach = prober
            self.signalling = await start_signalling(self.manager, s)
        log.info(
            "nms_started",
            replica=s.replica_id,
            http_port=self.admin.port,
            quic=self.signalling.address if self.signalling else None,
            redis=bool(self._redis),
            pool4=str(self.manager.pools.ipv4.network),
            pool6=str(self.manager.pools.ipv6.network),
        )

    @staticmethod
    async def _report_trs(trs: RedisTrsDirectory) -> None:
        # Say where TRS replicas are looked for: a prefix that differs from the TRS's
        # (CYPHONIC_REDIS_PREFIX) shows here instead of as silently missing relays.
        try:
            live = await trs.live()
        except Unavailable:
            return
        if live:
            log.info("trs_directory", key=trs.replicas_key, replicas=[r.replica_id for r in live])
        else:
            log.warning(
                "trs_directory_empty",
                key=trs.replicas_key,
                hint="no TRS replica registered under this key; relayed routes "
                "will fail until one is (check CYPHONIC_REDIS_PREFIX)",
            )

    async def _ping_redis(self) -> None:
        try:
            await self._redis.ping()
        except Exception as exc:
            raise Unavailable("Redis unreachable") from exc

    async def stop(self) -> None:
        """Drain (see ``NodeManager.drain``), stop QUIC, release local nodes, stop REST,
        close connections. Routes and peers are left alone: the nodes move to another
        replica."""
        if self.manager is not None:
            # Before the endpoint closes: its closed connections are not nodes going offline.
            self.manager.drain()
        if self.signalling is not None:
            with contextlib.suppress(Exception):
                await self.signalling.close()
        if self.manager is not None:
            if self.manager.reach is not None:
                await self.manager.reach.stop()
            with contextlib.suppress(Exception):
                await self.manager.stop()
        if self.admin is not None:
            await self.admin.stop()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
        for close in self._closers:
            with contextlib.suppress(Exception):
                await close()
        if self._engine is not None:
            await self._engine.dispose()
        log.info("nms_stopped", replica=self.settings.replica_id)
