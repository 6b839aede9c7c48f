"""One TRS replica put together: CID table, forwarding core, UDP glue, sync loop.

TrsService.start()
  1. open the CID table (Redis when ``redis_url`` is set, else in-process)
  2. reload this replica's sessions from it (a restart loses nothing stored)
  3. start the revocation cache (the AS's CRL, when ``as_url`` is set), bind UDP (443)
     and open the control plane on it: the QUIC endpoint whose drain loop relays first
     and serves nodes' control connections (``cyphonic_trs.control``); a node whose
     certificate is revoked is refused in the handshake and its open connection closed
  4. register the replica for the NMS's TRS directory, start the sync loop
every ``sync_interval_s``: expire idle sessions (and delete them from the table),
  refresh the TTLs and counters of active ones, heartbeat the registration
TrsService.stop(): unregister, stop reading, close the socket and the table
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any

from cyphonic import relay_token
from cyphonic.errors import CyphonicError
from cyphonic.hostport import format_host_port, plain_address
from cyphonic.log import get_logger
from cyphonic.pki import NODE_CA_CERT, load_certificates
from cyphonic.quic import bind_udp
from cyphonic.revocation import (
    CrlRevocations,
    RevocationCache,
    RevocationWatch,
    close_revoked_on,
    crl_url,
)

from cyphonic_trs.allocation import RelayAllocator
from cyphonic_trs.config import TrsSettings
from cyphonic_trs.control import (
    RelayFilter,
    TrsControlPlane,
    native_addr_for,
    signalling_control_plane,
)
from cyphonic_trs.relay import RelayCore, RelayTotals
from cyphonic_trs.signalling import RelayAllocationService, wall_ms
from cyphonic_trs.storage import (
    HEARTBEAT_INTERVAL_S,
    REPLICA_TTL_S,
    CidTable,
    InMemoryCidTable,
    RedisCidTable,
    ReplicaInfo,
)


def _log() -> Any:
    # Looked up at call time: a logger bound at import would miss ``log.configure``.
    return get_logger("trs")


ControlPlaneFactory = Callable[[socket.socket, "TrsService"], TrsControlPlane]
"""Makes the control plane of a starting service on its bound UDP socket."""


def make_table(settings: TrsSettings) -> CidTable:
    """The CID table the settings ask for."""
    if settings.redis_url:
        return RedisCidTable.from_url(settings.redis_url, prefix=settings.redis_prefix)
    return InMemoryCidTable()


class TrsService:
    """A TRS replica; ``start`` and ``stop`` inside a running event loop."""

    def __init__(
        self,
        settings: TrsSettings,
        *,
        table: CidTable | None = None,
        control: ControlPlaneFactory | None = None,
    ) -> None:
        """``control`` makes the control plane on the bound socket (the project's QUIC
        endpoint relaying in its own drain loop); default: the production one, with
        ``trs.crt``/``trs.key`` and the CA certificates from ``settings.pki_dir``."""
        self.settings = settings
        self.table = table if table is not None else make_table(settings)
        self._control_factory = control
        self.control: TrsControlPlane | None = None
        self.core: RelayCore | None = None
        self.forwarder: RelayFilter | None = None
        """Sends relayed datagrams (send counters; None when stopped)."""
        self.revocations: RevocationCache | None = None
        """Revoked node certificates (from the AS's CRL), checked in every handshake."""
        self.allocation: RelayAllocationService | None = None
        self.restored = 0
        self.started_ms = 0
        self.last_sync_error: str | None = None
        self._sock: socket.socket | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._last_sync = 0.0
        self._last_totals: tuple[float, int, int] | None = None
        self.rate_pps = 0.0
        self.rate_bps = 0.0

    @property
    def replica_id(self) -> int:
        """This replica's number (in every CID it issues)."""
        return self.settings.replica_id

    @property
    def address(self) -> Any:
        """The bound UDP address."""
        if self._sock is None:
            raise RuntimeError("TrsService not started")
        return self._sock.getsockname()

    async def start(self) -> None:
        """Open everything and start relaying (see the module docstring)."""
        s = self.settings
        self.started_ms = wall_ms()
        secrets = s.relay_secrets()
        allocator = RelayAllocator(
            replica_id=s.replica_id,
            verify_token=lambda token, now_ms: relay_token.verify(token, secrets, now_ms=now_ms),
            cids_per_side=s.cids_per_side,
            idle_timeout_s=s.idle_timeout_s,
        )
        await self._start_revocations()
        is_revoked = self.revocations.is_revoked if self.revocations is not None else None
        try:
            factory = self._control_factory or signalling_control_plane(
                s.pki_dir, is_revoked=is_revoked
            )
            sock = bind_udp(s.quic_host, s.quic_port, buffer_bytes=s.socket_buffer_bytes)
        except BaseException:
            await self._stop_revocations()
            raise
        try:
            self.core = RelayCore(
                replica_id=s.replica_id,
                idle_timeout=s.idle_timeout_s,
                native_addr=native_addr_for(sock.family),
            )
            self.allocation = RelayAllocationService(
                allocator=allocator,
                core=self.core,
                table=self.table,
                session_ttl_s=s.session_ttl_s,
            )
            self.restored = await self.allocation.restore()
            self.control = factory(sock, self)
            self.forwarder = self.control.relay
            start_tcp = getattr(self.control, "start_tcp", None)
            if start_tcp is not None:
                await start_tcp(s.quic_host)
        except BaseException:
            sock.close()
            await self._stop_revocations()
            raise
        if self.revocations is not None:
            self.revocations.subscribe(close_revoked_on(self.control.endpoint, self.revocations))
        self._sock = sock
        self._last_sync = time.monotonic()
        with contextlib.suppress(CyphonicError):
            await self._heartbeat()
        self._sync_task = asyncio.create_task(self._sync_loop(), name="trs-sync")
        _log().info(
            "trs_started",
            replica=s.replica_id,
            udp=format_host_port(*plain_address(self.address)),
            restored=self.restored,
            endpoints=self.public_endpoints(),
            redis=bool(s.redis_url),
        )

    async def stop(self) -> None:
        """Stop relaying and release everything (idempotent)."""
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        self.forwarder = None
        if self.control is not None:
            await self.control.close()  # closes the socket too
            self.control = None
        if self._sock is not None:
            with contextlib.suppress(CyphonicError):
                await self.table.unregister_replica(self.replica_id)
            self._sock.close()
            self._sock = None
        await self._stop_revocations()
        await self.table.close()
        _log().info("trs_stopped", replica=self.replica_id)

    async def _start_revocations(self) -> None:
        s = self.settings
        if not s.as_url:
            _log().warning(
                "revocation_not_checked",
                reason="no as_url: revoked node certificates are accepted until "
                "they expire; set CYPHONIC_AS_URL",
            )
            return
        node_ca = load_certificates(s.pki_dir / NODE_CA_CERT)[0]
        self.revocations = RevocationCache(
            CrlRevocations(crl_url(s.as_url), node_ca=node_ca),
            issuer=node_ca,
            interval=s.revocation_refresh_s,
        )
        await self.revocations.start()
        # Pushed: the AS answers this long-poll the moment it revokes; the CRL follows.
        self.revocations.follow(RevocationWatch(s.as_url))

    async def _stop_revocations(self) -> None:
        if self.revocations is not None:
            await self.revocations.close()
            self.revocations = None

    def public_endpoints(self) -> list[str]:
        """What nodes dial: the configured endpoints, else the bound address when it is
        a specific one (a wildcard bind registers none, and the NMS will not pick it)."""
        if self.settings.public_endpoints:
            return list(self.settings.public_endpoints)
        host, port = str(self.address[0]), int(self.address[1])
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return []
        if ip.is_unspecified:
            return []
        return [format_host_port(*plain_address((host, port)))]

    def totals(self) -> RelayTotals:
        """The forwarding counters of this replica."""
        assert self.core is not None
        return self.core.totals()

    async def sync_once(self) -> None:
        """Expire idle sessions, refresh active ones in the table, heartbeat."""
        assert self.core is not None
        if self.control is not None and self.allocation is not None:
            for fqdn, address in self.control.observe_addresses():
                await self.allocation.observe_control_address(fqdn, address)
        now = time.monotonic()
        for route_id in self.core.expire(now):
            await self.table.delete_session(route_id)
            _log().info("relay_expired", route_id=route_id)
        active = self.core.active_since(self._last_sync)
        counters = {}
        for route_id in active:
            stats = self.core.session(route_id, now)
            counters[route_id] = (stats.packets, stats.bytes)
        await self.table.refresh(active, ttl_s=self.settings.session_ttl_s, counters=counters)
        self._last_sync = now
        await self._heartbeat()

    async def _heartbeat(self) -> None:
        totals = self.totals()
        now = time.monotonic()
        if self._last_totals is not None:
            then, packets, octets = self._last_totals
            if now > then:
                self.rate_pps = (totals.forwarded_packets - packets) / (now - then)
                self.rate_bps = 8 * (totals.forwarded_bytes - octets) / (now - then)
        self._last_totals = (now, totals.forwarded_packets, totals.forwarded_bytes)
        await self.table.register_replica(
            ReplicaInfo(
                replica=self.replica_id,
                endpoints=tuple(self.public_endpoints()),
                server_name=self.settings.certificate_name,
                load=totals.sessions,
                updated_ms=wall_ms(),
                started_ms=self.started_ms,
                forwarded_packets=totals.forwarded_packets,
                forwarded_bytes=totals.forwarded_bytes,
            ),
            ttl_s=REPLICA_TTL_S,
        )

    async def _sync_loop(self) -> None:
        interval = min(self.settings.sync_interval_s, HEARTBEAT_INTERVAL_S)
        pause = interval
        while True:
            await asyncio.sleep(pause)
            pause = interval
            try:
                await self.sync_once()
                self.last_sync_error = None
            except CyphonicError as exc:
                # Redis restarting: try again within a second, so that this replica is back
                # in the directory (and its sessions' TTLs refreshed) soon after Redis is.
                pause = min(interval, 1.0)
                # Relaying goes on from memory; the table catches up at the next sync.
                self.last_sync_error = exc.message
                _log().warning("trs_sync_failed", code=exc.code_name, reason=exc.message)
