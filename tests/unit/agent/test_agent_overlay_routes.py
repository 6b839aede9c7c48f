"""overlay_routes, sans-I/O: what goes into the TUN when the host's own networks overlap the
overlay pool, which peers need host routes, and the clashes refused with both prefixes."""

from __future__ import annotations

import ipaddress

import pytest
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_agent.overlay_routes import (
    HostNetworks,
    HostRoute,
    RouteClash,
    plan_routes,
    subtract,
)
from cyphonic_agent.routes import RouteTable

net = ipaddress.ip_network
ip = ipaddress.ip_address
iface = ipaddress.ip_interface

OWN = [iface("100.64.7.9/16"), iface("fd00:1:2::9/48")]
POOLS = (net("100.64.0.0/16"), net("fd00:1:2::/48"))


def lan(prefix: str, address: str, gateway: str | None = None) -> HostNetworks:
    """A host on one LAN ``eth0`` holding ``address`` in ``prefix``, default via ``gateway``."""
    routes = ()
    if gateway is not None:
        routes = (HostRoute(prefix=net(f"{gateway}/32"), interface="eth0", gateway=ip(gateway)),)
    return HostNetworks(
        addresses=((iface(f"{address}/{net(prefix).prefixlen}"), "eth0"),), routes=routes
    )


def test_nothing_overlaps_the_whole_pool_goes_into_the_tun() -> None:
    plan = plan_routes(own=OWN, host=lan("192.168.1.0/24", "192.168.1.10", "192.168.1.1"))
    assert plan.prefixes == POOLS and plan.shadowed == ()
    assert plan.peer_route(ip("100.64.3.3")) is None  # the pool prefix carries it
    assert plan.peer_route(ip("192.168.1.77")) is None  # not an overlay address at all


def test_a_cgnat_lan_wider_than_the_pool_keeps_it_and_peers_get_host_routes() -> None:
    host = lan("100.64.0.0/10", "100.64.0.10", "100.64.0.1")
    plan = plan_routes(own=OWN, host=host)
    assert plan.prefixes == (POOLS[1],)  # IPv6 untouched, IPv4 pool entirely the LAN's
    assert [str(r) for r in plan.shadowed] == [
        "100.64.0.0/10 on eth0",
        "100.64.0.1/32 via 100.64.0.1 on eth0",  # the default route's gateway
    ]
    assert plan.peer_route(ip("100.64.3.3")) == net("100.64.3.3/32")
    assert plan.peer_route(ip("fd00:1:2::5")) is None


def test_a_lan_inside_the_pool_is_cut_out_of_it() -> None:
    plan = plan_routes(own=OWN, host=lan("100.64.128.0/17", "100.64.128.1"))
    assert plan.prefixes == (net("100.64.0.0/17"), POOLS[1])
    assert plan.peer_route(ip("100.64.200.1")) == net("100.64.200.1/32")
    assert plan.peer_route(ip("100.64.1.1")) is None


def test_a_gateway_inside_the_pool_is_never_routed_into_the_tun() -> None:
    # The LAN itself does not overlap, but a route leads via an address inside the pool.
    host = HostNetworks(
        addresses=((iface("10.1.0.5/24"), "eth0"),),
        routes=(HostRoute(prefix=net("10.9.0.0/16"), interface="eth1", gateway=ip("100.64.9.1")),),
    )
    plan = plan_routes(own=OWN, host=host)
    v4 = [p for p in plan.prefixes if p.version == 4]
    assert all(ip("100.64.9.1") not in p for p in v4)
    assert sum(p.num_addresses for p in v4) == 65536 - 1
    with pytest.raises(RouteClash, match=r"100\.64\.9\.1.*the gateway 100\.64\.9\.1"):
        plan.peer_route(ip("100.64.9.1"))


def test_own_address_held_by_the_host_is_a_clash_naming_both_prefixes() -> None:
    host = HostNetworks(addresses=((iface("100.64.7.9/10"), "eth0"),))
    with pytest.raises(RouteClash) as err:
        plan_routes(own=OWN, host=host)
    text = str(err.value)
    assert "100.64.7.9 (overlay pool 100.64.0.0/16)" in text and "(100.64.0.0/10)" in text
    assert "eth0" in text and "--ipv4-pool" in text


def test_own_address_as_the_gateway_is_a_clash() -> None:
    host = lan("100.64.0.0/10", "100.64.0.10", "100.64.7.9")
    with pytest.raises(RouteClash, match=r"gateway 100\.64\.7\.9 of 100\.64\.0\.0/10 on eth0"):
        plan_routes(own=OWN, host=host)


def test_a_peer_on_the_hosts_own_address_is_refused_alone() -> None:
    plan = plan_routes(own=OWN, host=lan("100.64.0.0/10", "100.64.0.10", "100.64.0.1"))
    with pytest.raises(RouteClash, match=r"100\.64\.0\.1 .*overlay pool 100\.64\.0\.0/16"):
        plan.peer_route(ip("100.64.0.1"))
    with pytest.raises(RouteClash, match=r"this host's address on eth0"):
        plan.peer_route(ip("100.64.0.10"))


def test_subtract() -> None:
    assert subtract([net("10.0.0.0/8")], net("10.0.0.0/8")) == []
    assert subtract([net("10.0.0.0/8")], net("0.0.0.0/0")) == []
    assert subtract([net("10.0.0.0/24")], net("10.0.0.0/25")) == [net("10.0.0.128/25")]
    assert subtract([net("10.0.0.0/24")], net("fd00::/8")) == [net("10.0.0.0/24")]
    assert subtract([net("10.0.0.0/24")], net("11.0.0.0/24")) == [net("10.0.0.0/24")]


def test_route_table_reports_addresses_learnt_and_forgotten() -> None:
    seen: list[tuple[str, frozenset[bytes], frozenset[bytes]]] = []
    table: RouteTable[object] = RouteTable(on_addresses=lambda *args: seen.append(args))
    a4, a6 = ip("100.64.3.3").packed, ip("fd00:1:2::3").packed
    route = table.requested("bob.x", [a4, a6], now=0.0)
    assert seen == [("bob.x", frozenset({a4, a6}), frozenset())]
    table.requested("bob.x", [a4, a6], now=0.1)  # the same again: nothing new
    assert len(seen) == 1
    direction = pb.RouteDirection(
        route_id="r2", peer_fqdn="bob.x", role=pb.ROUTE_ROLE_ACCEPT, peer_virtual_ipv4=a4
    )
    table.directed(direction, now=0.2)
    assert seen[-1] == ("bob.x", frozenset(), frozenset({a6}))
    table.tear_down(table.get("bob.x") or route)
    assert seen[-1] == ("bob.x", frozenset(), frozenset({a4}))
