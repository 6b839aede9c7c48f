"""The NMS core on a real SQLite registry, two replicas joined by the in-process bus."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from cyphonic import relay_token
from cyphonic.errors import (
    Exhausted,
    InvalidArgument,
    NotFound,
    PeerOffline,
    PermissionDenied,
    Revoked,
    Unavailable,
)
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.leases import LeasePools
from cyphonic_nms.routing import Endpoint
from cyphonic_nms.trs_directory import TrsReplica
from cyphonic_testing.nms import InProcessCluster, RecordingLink, add_node, revoke_node

E = Endpoint.parse
DOMAIN = "cyphonic.internal"


async def test_register_leases_addresses_and_classifies(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    await add_node(cluster.sessions, "a")
    link = RecordingLink(fqdn=f"a.{DOMAIN}")
    reg = await nms.register(
        link, local_addresses=[E("192.168.0.2:443")], observed=E("203.0.113.1:5000")
    )
    assert reg.network.behind_nat and reg.network.kind == "nat_ipv4"
    assert reg.lease.ipv4 in cluster.pools.ipv4 and reg.lease.ipv6 in cluster.pools.ipv6
    again = await nms.register(
        RecordingLink(fqdn=f"a.{DOMAIN}"),
        local_addresses=[E("198.51.100.1:443")],
        observed=E("198.51.100.1:443"),
    )
    assert again.lease == reg.lease  # stable across re-registration and a move
    assert not again.network.behind_nat
    assert link.closed is not None  # the older connection was superseded
    view = await cluster.store.view(f"a.{DOMAIN}")
    assert view is not None and view.online and view.nms_replica == "r1"
    assert view.network is not None and view.network.observed_ipv4 == E("198.51.100.1:443")


async def test_unknown_and_revoked_nodes_are_refused(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    with pytest.raises(PermissionDenied):
        await nms.register(
            RecordingLink(fqdn=f"ghost.{DOMAIN}"), local_addresses=[], observed=E("198.51.100.1:1")
        )
    node_id = await add_node(cluster.sessions, "bad")
    await revoke_node(cluster.sessions, node_id, serial="abc")
    with pytest.raises(Revoked):
        await nms.register(
            RecordingLink(fqdn=f"bad.{DOMAIN}", serial_hex="abc"),
            local_addresses=[],
            observed=E("198.51.100.1:1"),
        )


async def test_route_direct_pushes_both_sides(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a", "global_ipv4")
    b = await cluster.node(nms, "b", "nat_ipv4")
    response = await nms.route(a, pb.RouteRequest(fqdn=f"b.{DOMAIN}"))
    assert response.pattern == pb.ROUTE_PATTERN_NAT_CONNECTS
    da = (await a.wait_for("route_direction")).route_direction
    db = (await b.wait_for("route_direction")).route_direction
    assert da.route_id == db.route_id == response.route_id
    # Pattern 2: the NATed responder connects, to the global initiator's address.
    assert (da.role, db.role) == (pb.ROUTE_ROLE_ACCEPT, pb.ROUTE_ROLE_CONNECT)
    assert [Endpoint(ip_address(c.ip), c.port) for c in db.peer_candidates] == [
        nms.connected[a.fqdn].network.observed_ipv4
    ]
    assert da.peer_fqdn == b.fqdn and db.peer_fqdn == a.fqdn
    b_lease = nms.connected[b.fqdn].lease
    assert response.peer_virtual_ipv4 == b_lease.ipv4.packed
    assert da.peer_virtual_ipv6 == b_lease.ipv6.packed
    routes = await cluster.routes.all()
    assert [(r.initiator, r.responder, r.pattern) for r in routes] == [(a.fqdn, b.fqdn, 2)]


async def test_route_by_virtual_address(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a", "ipv6")
    b = await cluster.node(nms, "b", "ipv6")
    vip = nms.connected[b.fqdn].lease.ipv4
    response = await nms.route(a, pb.RouteRequest(virtual_address=vip.packed))
    assert response.peer_fqdn == b.fqdn and response.pattern == pb.ROUTE_PATTERN_DIRECT
    direction = (await a.wait_for("route_direction")).route_direction
    assert direction.role == pb.ROUTE_ROLE_CONNECT and direction.peer_candidates


@pytest.mark.parametrize(
    ("ka", "kb", "pattern"),
    [
        ("ipv6", "ipv6", 1),
        ("ipv6", "global_ipv4", 3),
        ("ipv6", "nat_ipv4", 3),
        ("global_ipv4", "ipv6", 3),
        ("global_ipv4", "global_ipv4", 1),
        ("global_ipv4", "nat_ipv4", 2),
        ("nat_ipv4", "ipv6", 3),
        ("nat_ipv4", "global_ipv4", 2),
        ("nat_ipv4", "nat_ipv4", 3),
    ],
)
async def test_route_pattern_per_cell(
    cluster: InProcessCluster, ka: str, kb: str, pattern: int
) -> None:
    await cluster.trs.register(
        TrsReplica(
            replica_id="trs-0", endpoints=(E("192.0.2.9:443"),), server_name=f"trs.svc.{DOMAIN}"
        )
    )
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a", ka)
    b = await cluster.node(nms, "b", kb)
    response = await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))
    assert response.pattern == pattern
    da = (await a.wait_for("route_direction")).route_direction
    db = (await b.wait_for("route_direction")).route_direction
    assert {da.role, db.role} == {pb.ROUTE_ROLE_CONNECT, pb.ROUTE_ROLE_ACCEPT}
    if pattern == 3:
        assert da.relay.trs_server_name == f"trs.svc.{DOMAIN}"
        assert da.relay.allocation_token == db.relay.allocation_token
        claims = relay_token.verify(da.relay.allocation_token, cluster.secret, now_ms=nms.wall_ms())
        assert claims.route_id == response.route_id
        assert claims.involves(a.fqdn) and claims.involves(b.fqdn)
    else:
        assert not da.HasField("relay")


async def test_relay_without_trs_is_unavailable(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a", "nat_ipv4")
    b = await cluster.node(nms, "b", "nat_ipv4")
    with pytest.raises(Unavailable, match="TRS"):
        await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))


async def test_unknown_offline_and_self_are_refused(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a")
    await add_node(cluster.sessions, "sleeper")
    with pytest.raises(NotFound):
        await nms.route(a, pb.RouteRequest(fqdn=f"nobody.{DOMAIN}"))
    with pytest.raises(NotFound):
        await nms.route(a, pb.RouteRequest(virtual_address=ip_address("100.64.9.9").packed))
    with pytest.raises(PeerOffline):
        await nms.route(a, pb.RouteRequest(fqdn=f"sleeper.{DOMAIN}"))
    with pytest.raises(InvalidArgument):
        await nms.route(a, pb.RouteRequest(fqdn=a.fqdn))
    with pytest.raises(InvalidArgument):
        await nms.route(a, pb.RouteRequest())
    with pytest.raises(PermissionDenied):
        await nms.route(RecordingLink(fqdn=f"sleeper.{DOMAIN}"), pb.RouteRequest(fqdn=a.fqdn))


async def test_cross_replica_push(cluster: InProcessCluster) -> None:
    r1 = await cluster.replica("r1")
    r2 = await cluster.replica("r2")
    b = await cluster.node(r1, "b", "global_ipv4")
    a = await cluster.node(r2, "a", "global_ipv4")
    response = await r2.route(a, pb.RouteRequest(fqdn=b.fqdn))
    direction = (await b.wait_for("route_direction")).route_direction
    assert direction.route_id == response.route_id and direction.role == pb.ROUTE_ROLE_ACCEPT
    assert r2.metrics.pushes.labels(kind="route_direction", via="bus")._value.get() == 1


async def test_disconnect_tells_peers_and_marks_offline(cluster: InProcessCluster) -> None:
    r1 = await cluster.replica("r1")
    r2 = await cluster.replica("r2")
    a = await cluster.node(r1, "a")
    b = await cluster.node(r2, "b")
    response = await r1.route(a, pb.RouteRequest(fqdn=b.fqdn))
    await r2.disconnected(b)
    notice = (await a.wait_for("peer_offline")).peer_offline
    assert (notice.fqdn, notice.route_id) == (b.fqdn, response.route_id)
    assert await cluster.routes.all() == []
    view = await cluster.store.view(b.fqdn)
    assert view is not None and not view.online
    with pytest.raises(PeerOffline):
        await r1.route(a, pb.RouteRequest(fqdn=b.fqdn))


async def test_idle_timeout_marks_offline(cluster: InProcessCluster) -> None:
    """Presence is the connection: its idle timeout ends it like a close, cause "timeout"."""
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a")
    b = await cluster.node(nms, "b")
    await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))
    cluster.clock.now += 3600  # silence alone (no keepalives) changes nothing
    await nms.refresh_presence()
    assert set(nms.connected) == {a.fqdn, b.fqdn}
    await nms.disconnected(b, cause="timeout")
    assert (await a.wait_for("peer_offline")).peer_offline.fqdn == b.fqdn
    assert set(nms.connected) == {a.fqdn}
    assert nms.metrics.offline.labels(cause="timeout")._value.get() == 1


async def test_revocation_poll_disconnects(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a", serial="a1")
    b = await cluster.node(nms, "b", serial="b1")
    view = await cluster.store.view(b.fqdn)
    assert view is not None
    await revoke_node(cluster.sessions, view.node_id, serial="b1", reason="stolen laptop")
    await nms.poll_revocations()
    assert isinstance(b.closed, Revoked)
    assert b.of("revocation_notice")[0].revocation_notice.reason == "stolen laptop"
    assert a.closed is None and set(nms.connected) == {a.fqdn}


async def test_pool_exhaustion_is_a_clear_error(cluster: InProcessCluster) -> None:
    cluster.pools = LeasePools.from_settings(ipv4="100.64.0.0/29", ipv6=None, domain=DOMAIN)
    nms = await cluster.replica("r1")
    leased = set()
    for i in range(6):
        link = await cluster.node(nms, f"n{i}")
        leased.add(nms.connected[link.fqdn].lease.ipv4)
    assert len(leased) == 6
    with pytest.raises(Exhausted, match=r"100\.64\.0\.0/29"):
        await cluster.node(nms, "n6")


async def test_moved_node_gets_its_routes_redirected(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    a = await cluster.node(nms, "a", "global_ipv4")
    b = await cluster.node(nms, "b", "nat_ipv4")
    first = await nms.route(a, pb.RouteRequest(fqdn=b.fqdn))
    assert first.pattern == pb.ROUTE_PATTERN_NAT_CONNECTS
    # b moves to a network where it has a global address: same route, now direct.
    moved = RecordingLink(fqdn=b.fqdn)
    reg = await nms.register(
        moved, local_addresses=[E("198.51.100.200:443")], observed=E("198.51.100.200:443")
    )
    assert not reg.network.behind_nat
    again_a = (await a.wait_for("route_direction", count=2)).route_direction
    again_b = (await moved.wait_for("route_direction")).route_direction
    # The pattern changed (and b accepted the tunnel): a new route id, the old one ends.
    assert again_a.route_id == again_b.route_id != first.route_id
    assert again_a.pattern == again_b.pattern == pb.ROUTE_PATTERN_DIRECT
    assert again_a.role == pb.ROUTE_ROLE_CONNECT
    assert [Endpoint(ip_address(c.ip), c.port) for c in again_a.peer_candidates] == [
        E("198.51.100.200:443")
    ]
    assert [r.pattern for r in await cluster.routes.all()] == [1]


async def test_restarted_replica_marks_its_stale_nodes_offline(cluster: InProcessCluster) -> None:
    crashed = await cluster.replica("r1")
    a = await cluster.node(crashed, "a")
    view = await cluster.store.view(a.fqdn)
    assert view is not None and view.online
    restarted = await cluster.replica("r1")  # same replica id, nothing connected yet
    await restarted.start()
    try:
        view = await cluster.store.view(a.fqdn)
        assert view is not None and not view.online
    finally:
        await restarted.stop()


async def test_admission_control_refuses_politely_beyond_the_pending_limit(
    cluster: InProcessCluster,
) -> None:
    """Registrations past ``max_pending_registrations`` are refused ``Overloaded`` with a
    retry-after, leave nothing behind, and the node gets in once the crowd has passed."""
    import asyncio

    from cyphonic.errors import Overloaded

    nms = await cluster.replica("r1")
    nms.max_pending_registrations = 2
    nms.overload_retry_after_s = 3.0
    for name in ("a", "b", "c"):
        await add_node(cluster.sessions, name)
    gate = asyncio.Event()
    facts = cluster.store.registration_facts

    async def slow_facts(fqdn: str, serial_hex: str):  # type: ignore[no-untyped-def]
        await gate.wait()
        return await facts(fqdn, serial_hex)

    cluster.store.registration_facts = slow_facts  # type: ignore[method-assign]
    links = {n: RecordingLink(fqdn=f"{n}.{DOMAIN}") for n in ("a", "b", "c")}
    admitted = [
        asyncio.ensure_future(
            nms.register(links[n], local_addresses=[E("198.51.100.9:443")], observed=None)
        )
        for n in ("a", "b")
    ]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as refused:
        await nms.register(links["c"], local_addresses=[E("198.51.100.9:443")], observed=None)
    assert refused.value.retry_after_s == pytest.approx(3.0)
    assert refused.value.to_wire().retry_after_ms == 3000
    assert f"c.{DOMAIN}" not in nms.connected  # nothing left behind
    gate.set()
    await asyncio.gather(*admitted)
    reg = await nms.register(links["c"], local_addresses=[E("198.51.100.9:443")], observed=None)
    assert reg.fqdn == f"c.{DOMAIN}" and len(nms.connected) == 3


async def test_admission_control_refuses_while_admitted_registrations_are_late(
    cluster: InProcessCluster,
) -> None:
    """Under the count limit, a replica that has fallen behind (an admitted registration in
    progress for ``admission_max_wait_s``) refuses new ones: those it admitted must finish
    inside the nodes' request timeout rather than all time out together."""
    import asyncio

    from cyphonic.errors import Overloaded
    from cyphonic_nms.manager import MIN_ADMITTED

    nms = await cluster.replica("r1")
    assert nms.max_pending_registrations > MIN_ADMITTED + 1
    names = [f"s{i}" for i in range(MIN_ADMITTED + 2)]
    for name in names:
        await add_node(cluster.sessions, name)
    gate = asyncio.Event()
    facts = cluster.store.registration_facts

    async def slow_facts(fqdn: str, serial_hex: str):  # type: ignore[no-untyped-def]
        await gate.wait()
        return await facts(fqdn, serial_hex)

    cluster.store.registration_facts = slow_facts  # type: ignore[method-assign]

    def register(name: str):  # type: ignore[no-untyped-def]
        link = RecordingLink(fqdn=f"{name}.{DOMAIN}")
        return nms.register(link, local_addresses=[E("198.51.100.9:443")], observed=None)

    admitted = [asyncio.ensure_future(register(n)) for n in names[:MIN_ADMITTED]]
    await asyncio.sleep(0)
    # The QUIC endpoint counts them with its handshakes under way (QuicEndpoint.backlog).
    assert nms.registration_backlog() == MIN_ADMITTED
    cluster.clock.now += nms.admission_max_wait_s / 2
    late = asyncio.ensure_future(register(names[MIN_ADMITTED]))  # not behind yet: admitted
    await asyncio.sleep(0)
    cluster.clock.now += nms.admission_max_wait_s / 2
    with pytest.raises(Overloaded):
        await register(names[-1])  # the oldest has waited admission_max_wait_s
    # Behind: past the handshake bound (refused before the handshake, not after it), by
    # as much as a client would wait behind (its retry-after), not by "forever".
    assert nms.registration_backlog() == MIN_ADMITTED + 1 + nms.max_pending_registrations
    gate.set()
    await asyncio.gather(*admitted, late)
    assert nms.registration_backlog() == 0
    assert (await register(names[-1])).fqdn == f"{names[-1]}.{DOMAIN}"
