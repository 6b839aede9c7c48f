"""Admin REST API of the TRS: relayed sessions, per-replica load, metrics.

    GET    /v1/sessions              relayed sessions of this replica (pair, bytes, packets, age)
    GET    /v1/sessions/{route_id}   one session
    DELETE /v1/sessions/{route_id}   tear a session down (its nodes re-allocate through the NMS)
    GET    /v1/replica               this replica: counters, drops by reason, rates
    GET    /v1/replicas              every live replica sharing the CID table, with its load
    /healthz /readyz /metrics        from ``cyphonic.admin``

Counters are read from the forwarding core when asked (scrape time), so the per-packet
path never touches a Prometheus object.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated

from cyphonic.admin import AdminAuth, Page, PageQuery, create_admin_app
from cyphonic.errors import NotFound, Unavailable
from cyphonic.hostport import format_host_port
from fastapi import APIRouter, FastAPI, Path, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel

from cyphonic_trs.relay import RelayCore, SessionStats
from cyphonic_trs.service import TrsService


class SidePublic(BaseModel):
    """One node of a relayed session and what it sent through the relay."""

    fqdn: str
    address: str
    connection_ids: int
    packets: int
    bytes: int


class SessionPublic(BaseModel):
    """A relayed session (one route) on this replica."""

    route_id: str
    pair: tuple[str, str]
    sides: list[SidePublic | None]
    complete: bool
    packets: int
    bytes: int
    age_s: float
    idle_s: float
    spoofed_drops: int


class ReplicaStatus(BaseModel):
    """This replica's forwarding counters."""

    replica: int
    sessions: int
    restored_at_start: int
    forwarded_packets: int
    forwarded_bytes: int
    packets_per_s: float
    bits_per_s: float
    to_local_server: int
    drops: dict[str, int]
    send_dropped: int
    send_errors: int
    allocations: dict[str, int]
    last_sync_error: str | None


class ReplicaPublic(BaseModel):
    """A live replica as registered in the shared table."""

    replica: int
    replica_id: str
    endpoints: list[str]
    server_name: str
    sessions: int
    forwarded_packets: int
    forwarded_bytes: int
    updated_ms: int
    started_ms: int


RouteId = Annotated[str, Path(min_length=1, max_length=255, description="NMS route ID")]


def _public(stats: SessionStats) -> SessionPublic:
    return SessionPublic(
        route_id=stats.route_id,
        pair=stats.pair,
        sides=[
            None
            if s is None
            else SidePublic(
                fqdn=s.fqdn,
                address=format_host_port(*s.addr),
                connection_ids=s.cids,
                packets=s.packets,
                bytes=s.bytes,
            )
            for s in stats.sides
        ],
        complete=stats.complete,
        packets=stats.packets,
        bytes=stats.bytes,
        age_s=round(stats.age_s, 3),
        idle_s=round(stats.idle_s, 3),
        spoofed_drops=stats.spoofed_drops,
    )


def _core(service: TrsService) -> RelayCore:
    if service.core is None:
        raise Unavailable("the relay is not running")
    return service.core


def make_router(service: TrsService) -> APIRouter:
    """The TRS routes, bound to a running (or starting) ``service``."""
    router = APIRouter(prefix="/v1", tags=["relay"])

    @router.get(
        "/sessions", response_model=Page[SessionPublic], summary="Relayed sessions of this replica"
    )
    async def list_sessions(_actor: AdminAuth, page: PageQuery) -> Page[SessionPublic]:
        items = sorted(_core(service).sessions(time.monotonic()), key=lambda s: s.route_id)
        chosen = items[page.offset : page.offset + page.limit]
        return Page[SessionPublic](
            items=[_public(s) for s in chosen],
            total=len(items),
            limit=page.limit,
            offset=page.offset,
        )

    @router.get(
        "/sessions/{route_id}",
        response_model=SessionPublic,
        summary="One relayed session",
        responses={404: {"description": "not here"}},
    )
    async def get_session(_actor: AdminAuth, route_id: RouteId) -> SessionPublic:
        return _public(_core(service).session(route_id, time.monotonic()))

    @router.delete(
        "/sessions/{route_id}",
        status_code=204,
        response_class=Response,
        summary="Tear a relayed session down",
    )
    async def delete_session(_actor: AdminAuth, route_id: RouteId) -> Response:
        if service.allocation is None:
            raise NotFound(f"no relayed route {route_id}")
        await service.allocation.release(route_id)
        return Response(status_code=204)

    @router.get("/replica", response_model=ReplicaStatus, summary="This replica's counters")
    async def replica(_actor: AdminAuth) -> ReplicaStatus:
        totals = _core(service).totals()
        relay = service.forwarder
        return ReplicaStatus(
            replica=service.replica_id,
            sessions=totals.sessions,
            restored_at_start=service.restored,
            forwarded_packets=totals.forwarded_packets,
            forwarded_bytes=totals.forwarded_bytes,
            packets_per_s=round(service.rate_pps, 1),
            bits_per_s=round(service.rate_bps, 1),
            to_local_server=totals.to_local_server,
            drops={reason.value: n for reason, n in totals.drops.items()},
            send_dropped=relay.send_dropped if relay else 0,
            send_errors=relay.send_errors if relay else 0,
            allocations=dict(service.allocation.allocations) if service.allocation else {},
            last_sync_error=service.last_sync_error,
        )

    @router.get(
        "/replicas",
        response_model=list[ReplicaPublic],
        summary="Live replicas sharing the CID table, with their load",
    )
    async def replicas(_actor: AdminAuth) -> list[ReplicaPublic]:
        return [
            ReplicaPublic(
                replica=r.replica,
                replica_id=f"trs-{r.replica}",
                endpoints=list(r.endpoints),
                server_name=r.server_name,
                sessions=r.load,
                forwarded_packets=r.forwarded_packets,
                forwarded_bytes=r.forwarded_bytes,
                updated_ms=r.updated_ms,
                started_ms=r.started_ms,
            )
            for r in await service.table.replicas()
        ]

    return router


class TrsCollector(Collector):
    """Prometheus metrics read from the service at scrape time."""

    def __init__(self, service: TrsService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        if service.core is None:
            return
        totals = service.core.totals()
        sessions = GaugeMetricFamily("cyphonic_trs_sessions", "Relayed sessions on this replica")
        sessions.add_metric([], totals.sessions)
        yield sessions
        packets = CounterMetricFamily(
            "cyphonic_trs_forwarded_packets", "Datagrams forwarded unchanged"
        )
        packets.add_metric([], totals.forwarded_packets)
        yield packets
        octets = CounterMetricFamily("cyphonic_trs_forwarded_bytes", "UDP payload bytes forwarded")
        octets.add_metric([], totals.forwarded_bytes)
        yield octets
        drops = CounterMetricFamily(
            "cyphonic_trs_dropped_packets", "Datagrams not forwarded, by reason", labels=["reason"]
        )
        for reason, n in totals.drops.items():
            drops.add_metric([reason.value], n)
        relay = service.forwarder
        if relay is not None:
            drops.add_metric(["send_buffer_full"], relay.send_dropped)
            drops.add_metric(["send_error"], relay.send_errors)
        yield drops
        local = CounterMetricFamily(
            "cyphonic_trs_to_local_server", "Datagrams handed to the TRS's own QUIC server"
        )
        local.add_metric([], totals.to_local_server)
        yield local
        allocations = CounterMetricFamily(
            "cyphonic_trs_allocations", "Relay allocation requests by result", labels=["result"]
        )
        if service.allocation is not None:
            for result, n in sorted(service.allocation.allocations.items()):
                allocations.add_metric([result], n)
        yield allocations


def create_app(service: TrsService) -> FastAPI:
    """The TRS admin app: routes above plus health, readiness (CID table reachable, relay
    running) and metrics."""
    registry = CollectorRegistry()
    registry.register(TrsCollector(service))

    async def relay_running() -> None:
        if service.forwarder is None:
            raise Unavailable("the relay is not running")

    return create_admin_app(
        service="trs",
        title="CYPHONIC TRS",
        admin_token=service.settings.admin_token,
        ready_checks=[service.table.ping, relay_running],
        routers=[make_router(service)],
        metrics_registry=registry,
        description="Tunnel Relay Service: blind relay of QUIC packets by connection ID.",
    )
