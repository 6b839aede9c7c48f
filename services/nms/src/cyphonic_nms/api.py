"""NMS admin REST: nodes (presence, real and virtual addresses, NAT) and active routes.

Mounted on ``cyphonic.admin.create_admin_app`` (bearer token, JSON errors, /healthz,
/readyz, /metrics). Every route here needs the admin token.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from cyphonic.admin import AdminAuth, Page, PageQuery
from cyphonic.errors import NotFound
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from cyphonic_nms.cluster import RouteRecord
from cyphonic_nms.manager import Handover, NodeManager
from cyphonic_nms.route_reason import explain, transport
from cyphonic_nms.routing import NetworkInfo, Pattern
from cyphonic_nms.storage import NodeView


def get_manager(request: Request) -> NodeManager:
    """The replica's ``NodeManager`` (set on ``app.state.manager`` by the server)."""
    manager: NodeManager = request.app.state.manager
    return manager


ManagerDep = Annotated[NodeManager, Depends(get_manager)]


class NetworkPublic(BaseModel):
    """How the node reaches the Internet, as the NMS decided at its last registration."""

    kind: str = Field(description="ipv6, global_ipv4, nat_ipv4, dual_stack, dual_stack_nat")
    has_ipv4: bool
    has_ipv6: bool
    behind_nat: bool
    observed_ipv4: str | None = Field(description="source address:port the NMS saw")
    observed_ipv6: str | None
    local_addresses: list[str] = Field(description="addresses the node reported")


class HandoverPublic(BaseModel):
    """The node's last move, as the NMS replica holding it saw it (a registration that
    brought a different network)."""

    at: datetime
    old: NetworkPublic
    new: NetworkPublic


class NodePublic(BaseModel):
    """A node as the NMS sees it."""

    fqdn: str
    state: str = Field(description="registry state: pending, active or revoked")
    online: bool
    last_seen: datetime | None
    nms_replica: str | None = Field(description="NMS replica holding its connection")
    virtual_ipv4: str | None
    virtual_ipv6: str | None
    network: NetworkPublic | None
    last_handover: HandoverPublic | None = Field(
        default=None, description="the last move while connected to this replica"
    )


class RoutePublic(BaseModel):
    """An active route between two nodes."""

    route_id: str
    initiator: str
    responder: str
    pattern: int = Field(description="1 direct, 2 NAT side connects, 3 relay")
    pattern_name: str
    family: int | None = Field(description="4 or 6 for a direct path; null for a relay")
    connector: str = Field(description="which side opens the QUIC connection")
    trs_replica: str | None
    decided_by: str
    created_at: datetime
    transport: str = Field(description="QUIC/UDP over IPv4, over IPv6, or via TRS")
    reason_code: str = Field(
        description="why this pattern (cyphonic_nms.route_reason): both_ipv6, "
        "both_global_ipv4, one_side_nat, both_behind_nat, no_common_family, "
        "no_dialable_address, outdated, unknown"
    )
    reason: str = Field(description="the same in words, from both nodes' networks now")


class ReplicaPublic(BaseModel):
    """This NMS replica."""

    replica_id: str
    connected_nodes: int
    keepalive_interval_s: float
    offline_timeout_s: float
    ipv4_pool: str
    ipv6_pool: str


# Routes listing: up to this many nodes are read one by one, more in one list query.
_POINT_QUERIES = 20

# Grace on top of the offline timeout: last_seen is refreshed in batches every few seconds.
_LAST_SEEN_GRACE = timedelta(seconds=10)


def network_public(net: NetworkInfo) -> NetworkPublic:
    """The REST form of a node's network information."""
    return NetworkPublic(
        kind=net.kind,
        has_ipv4=net.has_ipv4,
        has_ipv6=net.has_ipv6,
        behind_nat=net.behind_nat,
        observed_ipv4=str(net.observed_ipv4) if net.observed_ipv4 else None,
        observed_ipv6=str(net.observed_ipv6) if net.observed_ipv6 else None,
        local_addresses=[str(ep) for ep in net.local_addresses],
    )


def node_public(
    view: NodeView, *, offline_timeout_s: float | None = None, handover: Handover | None = None
) -> NodePublic:
    """The REST form of a node view.

    With ``offline_timeout_s``, a node whose last_seen is older than that is shown offline
    even if its row says online (its replica died without marking it).
    """
    net = view.network
    online = view.online
    if online and offline_timeout_s is not None:
        limit = timedelta(seconds=offline_timeout_s) + _LAST_SEEN_GRACE
        online = view.last_seen is not None and datetime.now(UTC) - view.last_seen <= limit
    return NodePublic(
        fqdn=view.fqdn,
        state=view.state,
        online=online,
        last_seen=view.last_seen,
        nms_replica=view.nms_replica,
        virtual_ipv4=str(view.lease.ipv4) if view.lease else None,
        virtual_ipv6=str(view.lease.ipv6) if view.lease else None,
        network=network_public(net) if net is not None else None,
        last_handover=HandoverPublic(
            at=handover.at, old=network_public(handover.old), new=network_public(handover.new)
        )
        if handover is not None
        else None,
    )


def route_public(
    route: RouteRecord,
    *,
    initiator_net: NetworkInfo | None = None,
    responder_net: NetworkInfo | None = None,
) -> RoutePublic:
    """The REST form of a route; its reason is read from the two nodes' networks."""
    reason = explain(
        pattern=route.pattern,
        family=route.family,
        initiator=route.initiator,
        responder=route.responder,
        initiator_net=initiator_net,
        responder_net=responder_net,
    )
    return RoutePublic(
        route_id=route.route_id,
        initiator=route.initiator,
        responder=route.responder,
        pattern=route.pattern,
        pattern_name=Pattern(route.pattern).name.lower(),
        family=route.family,
        connector=route.connector,
        trs_replica=route.trs_replica,
        decided_by=route.decided_by,
        created_at=datetime.fromtimestamp(route.created_ms / 1000, UTC),
        transport=transport(route.pattern, route.family),
        reason_code=reason.code,
        reason=reason.text,
    )


router = APIRouter(prefix="/v1", tags=["nms"])


@router.get("/nodes", response_model=Page[NodePublic], summary="Nodes and their presence")
async def list_nodes(
    _actor: AdminAuth,
    manager: ManagerDep,
    page: PageQuery,
    online: Annotated[bool, Query(description="only nodes online now")] = False,
) -> Page[NodePublic]:
    views, total = await manager.nodes.list_views(
        online_only=online, limit=page.limit, offset=page.offset
    )
    items = [
        node_public(
            v, offline_timeout_s=manager.offline_timeout_s, handover=manager.last_handover(v.fqdn)
        )
        for v in views
    ]
    return Page[NodePublic](items=items, total=total, limit=page.limit, offset=page.offset)


@router.get(
    "/nodes/{fqdn}",
    response_model=NodePublic,
    summary="One node",
    responses={404: {"description": "no such node"}},
)
async def get_node(
    _actor: AdminAuth,
    manager: ManagerDep,
    fqdn: Annotated[str, Path(max_length=253, pattern=r"^[A-Za-z0-9.-]+$")],
) -> NodePublic:
    view = await manager.nodes.view(fqdn.lower().rstrip("."))
    if view is None:
        raise NotFound(f"no node {fqdn}")
    return node_public(
        view, offline_timeout_s=manager.offline_timeout_s, handover=manager.last_handover(view.fqdn)
    )


@router.get("/routes", response_model=Page[RoutePublic], summary="Active routes")
async def list_routes(
    _actor: AdminAuth,
    manager: ManagerDep,
    page: PageQuery,
    node: Annotated[str | None, Query(max_length=253, description="only this node's")] = None,
) -> Page[RoutePublic]:
    routes = await (manager.routes.for_node(node.lower()) if node else manager.routes.all())
    chosen = routes[page.offset : page.offset + page.limit]
    # Both nodes' networks, for the reason: a query per node for a few, one list for many.
    wanted = {f for r in chosen for f in (r.initiator, r.responder)}
    networks: dict[str, NetworkInfo | None] = dict.fromkeys(wanted)
    if len(wanted) > _POINT_QUERIES:
        views, _ = await manager.nodes.list_views()
        networks.update((v.fqdn, v.network) for v in views if v.fqdn in wanted)
    else:
        for fqdn in wanted:
            view = await manager.nodes.view(fqdn)
            networks[fqdn] = view.network if view is not None else None
    items = [
        route_public(r, initiator_net=networks[r.initiator], responder_net=networks[r.responder])
        for r in chosen
    ]
    return Page[RoutePublic](items=items, total=len(routes), limit=page.limit, offset=page.offset)


@router.get("/replica", response_model=ReplicaPublic, summary="This NMS replica")
async def get_replica(_actor: AdminAuth, manager: ManagerDep) -> ReplicaPublic:
    return ReplicaPublic(
        replica_id=manager.replica_id,
        connected_nodes=len(manager.connected),
        keepalive_interval_s=manager.keepalive_interval_s,
        offline_timeout_s=manager.offline_timeout_s,
        ipv4_pool=str(manager.pools.ipv4.network),
        ipv6_pool=str(manager.pools.ipv6.network),
    )


# The access policy's routes (docs/policy.md) live in their own module, under /v1 too.
from cyphonic_nms.policy_api import policy_router  # noqa: E402

router.include_router(policy_router)
