"""The pure planner: validation, address allocation, routes and nftables rulesets."""

from __future__ import annotations

import ipaddress

import pytest
from cyphonic_testbed import (
    PATTERNS,
    FirewallPolicy,
    Host,
    Link,
    NatMapping,
    Network,
    Router,
    Topology,
    TopologyError,
    plan,
)
from cyphonic_testbed.patterns import double_nat, pattern1, pattern2, v4_v6


def _routes(bed_plan, node):  # type: ignore[no-untyped-def]
    return {(r.destination, r.via, r.dev) for r in bed_plan.nodes[node].routes}


def test_addresses_routers_low_hosts_from_ten_same_digits_in_v6() -> None:
    topo = Topology(
        networks=[Network("lan", ipv4="10.1.0.0/24", ipv6="2001:db8:5::/64")],
        routers=[Router("r", networks=["lan"])],
        hosts=[Host("a", networks=["lan"]), Host("b", networks=["lan"])],
    )
    p = plan(topo)
    assert str(p.nodes["r"].interfaces[0].ipv4) == "10.1.0.1/24"
    assert str(p.nodes["r"].interfaces[0].ipv6) == "2001:db8:5::1/64"
    assert str(p.nodes["a"].interfaces[0].ipv4) == "10.1.0.10/24"
    assert str(p.nodes["a"].interfaces[0].ipv6) == "2001:db8:5::10/64"
    assert str(p.nodes["b"].interfaces[0].ipv6) == "2001:db8:5::11/64"
    # Each host's default route per family goes to the router.
    assert _routes(p, "a") == {
        ("0.0.0.0/0", "10.1.0.1", "lan"),
        ("::/0", "2001:db8:5::1", "lan"),
    }


def test_explicit_addresses_are_kept_and_skipped_by_allocation() -> None:
    topo = Topology(
        networks=[Network("lan", ipv4="10.1.0.0/24")],
        hosts=[
            Host("a", networks=["lan"]),
            Host("b", networks=[Link("lan", ipv4="10.1.0.10")]),
        ],
    )
    p = plan(topo)
    assert str(p.nodes["b"].interfaces[0].ipv4.ip) == "10.1.0.10"  # type: ignore[union-attr]
    assert str(p.nodes["a"].interfaces[0].ipv4.ip) == "10.1.0.11"  # type: ignore[union-attr]
    assert p.nodes["a"].routes == ()  # no router on the network: on-link only


@pytest.mark.parametrize(
    ("topology", "fragment"),
    [
        (Topology(networks=[Network("Bad", ipv4="10.0.0.0/24")]), "network name"),
        (Topology(networks=[Network("lo", ipv4="10.0.0.0/24")]), "network name"),
        (Topology(networks=[Network("a" * 16, ipv4="10.0.0.0/24")]), "network name"),
        (Topology(networks=[Network("n")]), "neither"),
        (Topology(networks=[Network("n", ipv4="10.0.0.1/24")]), "bad subnet"),
        (Topology(networks=[Network("n", ipv4="2001:db8::/64")]), "not an IPv4"),
        (Topology(networks=[Network("n", ipv4="10.0.0.0/31")]), "too small"),
        (Topology(hosts=[Host("h", networks=["nope"])]), "unknown network"),
        (Topology(networks=[Network("n", ipv4="10.0.0.0/24")], hosts=[Host("h")]), "no network"),
        (
            Topology(
                networks=[Network("n", ipv4="10.0.0.0/24")],
                hosts=[Host("h", networks=["n"]), Host("h", networks=["n"])],
            ),
            "twice",
        ),
        (
            Topology(
                networks=[Network("n", ipv4="10.0.0.0/24")],
                hosts=[Host("h", networks=[Link("n", ipv4="10.0.1.5")])],
            ),
            "not a host address",
        ),
        (
            Topology(
                networks=[Network("n", ipv4="10.0.0.0/24")],
                hosts=[
                    Host("h", networks=[Link("n", ipv4="10.0.0.5")]),
                    Host("g", networks=[Link("n", ipv4="10.0.0.5")]),
                ],
            ),
            "used twice",
        ),
        (
            Topology(
                networks=[Network("n", ipv6="2001:db8::/64")],
                routers=[Router("r", networks=["n"], uplink="n", nat=NatMapping.SYMMETRIC)],
            ),
            "NAT needs IPv4",
        ),
        (
            Topology(
                networks=[Network("n", ipv4="10.0.0.0/24")],
                routers=[Router("r", networks=["n"], firewall=FirewallPolicy.ENTERPRISE)],
            ),
            "need an uplink",
        ),
        (
            Topology(
                networks=[Network("n", ipv4="10.0.0.0/24"), Network("m", ipv4="10.0.1.0/24")],
                routers=[Router("r", networks=["n"], uplink="m")],
            ),
            "is not its network",
        ),
        (
            Topology(
                networks=[Network("n", ipv4="10.0.0.0/24")],
                hosts=[Host("h", networks=["n"], gateway="x")],
            ),
            "not a router",
        ),
    ],
)
def test_inconsistent_descriptions_are_refused(topology: Topology, fragment: str) -> None:
    with pytest.raises(TopologyError, match=fragment):
        plan(topology)


def test_ambiguous_uplink_gateway_must_be_named() -> None:
    nets = [Network("wan", ipv4="198.51.100.0/24"), Network("lan", ipv4="10.0.0.0/24")]
    routers = [
        Router("c1", networks=["wan"]),
        Router("c2", networks=["wan"]),
        Router("edge", networks=["wan", "lan"], uplink="wan"),
    ]
    with pytest.raises(TopologyError, match="gateway="):
        plan(Topology(networks=nets, routers=routers))
    routers[2] = Router("edge", networks=["wan", "lan"], uplink="wan", gateway="c2")
    p = plan(Topology(networks=nets, routers=routers))
    assert ("0.0.0.0/0", "198.51.100.2", "wan") in _routes(p, "edge")


def test_core_routes_to_global_networks_behind_edges_but_never_to_private_ones() -> None:
    p2 = plan(pattern2())
    core = _routes(p2, "core")
    assert not any(dest.startswith("192.168.") for dest, _, _ in core)  # NAT'd LAN: no route
    p1 = plan(pattern1())
    # bob's global IPv6 network sits behind gwb: the core routes it via gwb's uplink address.
    gwb_wan = str(p1.nodes["gwb"].interface("wanb").ipv6.ip)  # type: ignore[union-attr]
    assert ("2001:db8:b::/64", gwb_wan, "wanb") in _routes(p1, "core")
    # The edge needs no explicit routes: its default route via the core covers them.
    assert _routes(p1, "gwb") == {("::/0", "2001:db8:ffb::1", "wanb")}


def test_routes_follow_shortest_path_over_several_routers() -> None:
    topo = Topology(
        networks=[
            Network("n1", ipv4="192.0.2.0/26"),
            Network("n2", ipv4="192.0.2.64/26"),
            Network("n3", ipv4="192.0.2.128/26"),
        ],
        routers=[
            Router("ra", networks=["n1", "n2"]),
            Router("rb", networks=["n2", "n3"]),
        ],
        hosts=[Host("h", networks=["n3"])],
    )
    p = plan(topo)
    rb_n2 = str(p.nodes["rb"].interface("n2").ipv4.ip)  # type: ignore[union-attr]
    ra_n2 = str(p.nodes["ra"].interface("n2").ipv4.ip)  # type: ignore[union-attr]
    assert _routes(p, "ra") == {("192.0.2.128/26", rb_n2, "n2")}
    assert _routes(p, "rb") == {("192.0.2.0/26", ra_n2, "n2")}


def test_rulesets_express_nat_kind_and_firewall_policy() -> None:
    eim = plan(pattern2(nat=NatMapping.ENDPOINT_INDEPENDENT)).nodes["gwa"].ruleset or ""
    sym = plan(double_nat(nat=NatMapping.SYMMETRIC)).nodes["gwa"].ruleset or ""
    assert 'oifname "wana" masquerade persistent' in eim
    assert 'oifname "wana" masquerade fully-random' in sym
    # As home routers: unsolicited UDP to the NAT itself is dropped (hole punching).
    assert 'iifname "wana" meta l4proto udp ct state new drop' in eim
    assert "udp dport 443 accept" in eim
    assert "ct state established,related accept" in eim
    assert "policy drop" in eim
    no_udp = plan(pattern1(firewall=FirewallPolicy.ENTERPRISE_NO_UDP)).nodes["gwb"].ruleset or ""
    assert "udp dport" not in no_udp and "tcp dport { 80, 443 } accept" in no_udp
    assert "masquerade" not in no_udp  # IPv6 network: routed, not translated
    assert plan(pattern1(firewall=None)).nodes["gwb"].ruleset is None


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_ready_made_topologies_plan_with_documentation_and_private_prefixes(name: str) -> None:
    p = plan(PATTERNS[name]())
    allowed = [
        ipaddress.ip_network(n)
        for n in (
            "198.51.100.0/24",
            "203.0.113.0/24",
            "192.0.2.0/24",
            "2001:db8::/32",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
        )
    ]
    for node in p.nodes.values():
        for iface in node.interfaces:
            assert len(iface.ifname) <= 15
            for addr in (iface.ipv4, iface.ipv6):
                if addr is not None:
                    assert any(
                        addr.version == a.version and addr.network.subnet_of(a)  # type: ignore[arg-type]
                        for a in allowed
                    ), addr
    assert {"alice", "bob", "as", "nms", "trs", "core"} <= set(p.nodes)
    cloud = p.networks["cloud"]
    assert cloud.families == (4, 6)


def test_v4_v6_hosts_are_single_stack_and_services_are_extendable() -> None:
    p = plan(v4_v6(services=("as", "nms", "trs", "trs2", "redis")))
    alice, bob = p.nodes["alice"], p.nodes["bob"]
    assert all(i.ipv6 is None and i.ipv4 is not None for i in alice.interfaces)
    assert all(i.ipv4 is None and i.ipv6 is not None for i in bob.interfaces)
    assert str(p.nodes["redis"].interface("cloud").ipv4.ip) == "192.0.2.14"  # type: ignore[union-attr]
