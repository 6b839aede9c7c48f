"""Ready-made topologies for the route patterns. Every one has the same cloud and core:

    cloud  192.0.2.0/24 + 2001:db8:100::/64   service hosts (as, nms, trs, ...), router "core"
    core   the "internet": routes between all global networks

and two end hosts, ``alice`` and ``bob``, each on a network ``lana`` / ``lanb``. Where a host
sits behind an edge router, that router is ``gwa`` / ``gwb`` and its uplink to the core is
``wana`` / ``wanb``. Addresses: routers .1 (::1) on each network, hosts from .10 (::10) on,
in list order (so in the cloud: as .10, nms .11, trs .12, ...).

    pattern1    alice 2001:db8:a::10 --- core --- gwb[firewall] --- bob 2001:db8:b::10
                (IPv6 only; bob's network is global, the firewall guards it)
    pattern2    alice 192.168.1.10 --- gwa[EIM NAT + firewall] --- core --- bob 203.0.113.10
    double_nat  alice 192.168.1.10 --- gwa[symmetric NAT + fw] --- core
                    --- gwb[symmetric NAT + fw] --- bob 192.168.2.10
    v4_v6       alice 203.0.113.10 (IPv4 only) --- core --- bob 2001:db8:b::10 (IPv6 only)

Moves (a host with a standby uplink, ``NetBed.move(host, to)`` switches it; the mover's
networks are behind the enterprise firewall where the pattern allows one):

    move_nat_nat    alice 192.168.1.10 behind gwa[NAT+fw]  ->  192.168.3.10 behind gwc[NAT+fw];
                    bob 203.0.113.10 global IPv4 (pattern 2 before and after)
    move_v6_nat     alice 2001:db8:a::10 behind gwa[fw]  ->  192.168.3.10 behind gwc[NAT+fw];
                    bob 2001:db8:b::10 global IPv6 (pattern 1, then 3 through the TRS)
    move_server     alice 192.168.1.10 behind gwa[NAT+fw] (connects);
                    bob 203.0.113.10  ->  203.0.113.138, both global IPv4 (bob accepted)

The NAT kind and firewall policy are parameters, so variants (no firewall, the firewall that
drops UDP 443 too, EIM NATs on both sides for hole punching) are one argument away.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cyphonic_testbed.topology import (
    FirewallPolicy,
    Host,
    Link,
    NatMapping,
    Network,
    Router,
    Topology,
)

#: Cloud service hosts created unless told otherwise.
DEFAULT_SERVICES: tuple[str, ...] = ("as", "nms", "trs")

CLOUD_IPV4 = "192.0.2.0/24"
CLOUD_IPV6 = "2001:db8:100::/64"
WANA_IPV4 = "198.51.100.0/26"
WANB_IPV4 = "198.51.100.64/26"
WANA_IPV6 = "2001:db8:ffa::/64"
WANB_IPV6 = "2001:db8:ffb::/64"
GLOBAL_IPV4 = "203.0.113.0/24"
LANA_IPV6 = "2001:db8:a::/64"
LANB_IPV6 = "2001:db8:b::/64"
PRIVATE_A = "192.168.1.0/24"
PRIVATE_B = "192.168.2.0/24"
PRIVATE_C = "192.168.3.0/24"
WANC_IPV4 = "198.51.100.128/26"
WANA6_IPV6 = "2001:db8:ffa::/64"
GLOBAL_IPV4_LOW = "203.0.113.0/25"
GLOBAL_IPV4_HIGH = "203.0.113.128/25"


def _cloud(services: Sequence[str]) -> tuple[Network, list[Host]]:
    cloud = Network("cloud", ipv4=CLOUD_IPV4, ipv6=CLOUD_IPV6)
    return cloud, [Host(name, networks=["cloud"]) for name in services]


def pattern1(
    *,
    firewall: FirewallPolicy | None = FirewallPolicy.ENTERPRISE,
    services: Sequence[str] = DEFAULT_SERVICES,
) -> Topology:
    """Two IPv6-only hosts on different global IPv6 networks; bob behind ``firewall``."""
    cloud, cloud_hosts = _cloud(services)
    return Topology(
        name="pattern1",
        networks=[
            cloud,
            Network("lana", ipv6=LANA_IPV6),
            Network("wanb", ipv6=WANB_IPV6),
            Network("lanb", ipv6=LANB_IPV6),
        ],
        routers=[
            Router("core", networks=["cloud", "lana", "wanb"]),
            Router("gwb", networks=["wanb", "lanb"], uplink="wanb", firewall=firewall),
        ],
        hosts=[Host("alice", networks=["lana"]), Host("bob", networks=["lanb"]), *cloud_hosts],
    )


def pattern2(
    *,
    nat: NatMapping = NatMapping.ENDPOINT_INDEPENDENT,
    firewall: FirewallPolicy | None = FirewallPolicy.ENTERPRISE,
    services: Sequence[str] = DEFAULT_SERVICES,
) -> Topology:
    """IPv4 only: alice behind a NAT (``nat``) and ``firewall``; bob with a global address."""
    cloud, cloud_hosts = _cloud(services)
    return Topology(
        name="pattern2",
        networks=[
            cloud,
            Network("lana", ipv4=PRIVATE_A),
            Network("wana", ipv4=WANA_IPV4),
            Network("lanb", ipv4=GLOBAL_IPV4),
        ],
        routers=[
            Router("core", networks=["cloud", "wana", "lanb"]),
            Router("gwa", networks=["wana", "lana"], uplink="wana", nat=nat, firewall=firewall),
        ],
        hosts=[Host("alice", networks=["lana"]), Host("bob", networks=["lanb"]), *cloud_hosts],
    )


def double_nat(
    *,
    nat: NatMapping = NatMapping.SYMMETRIC,
    firewall: FirewallPolicy | None = FirewallPolicy.ENTERPRISE,
    services: Sequence[str] = DEFAULT_SERVICES,
) -> Topology:
    """IPv4 only: alice and bob each behind their own NAT (``nat``) and ``firewall``."""
    cloud, cloud_hosts = _cloud(services)
    return Topology(
        name="double_nat",
        networks=[
            cloud,
            Network("lana", ipv4=PRIVATE_A),
            Network("wana", ipv4=WANA_IPV4),
            Network("lanb", ipv4=PRIVATE_B),
            Network("wanb", ipv4=WANB_IPV4),
        ],
        routers=[
            Router("core", networks=["cloud", "wana", "wanb"]),
            Router("gwa", networks=["wana", "lana"], uplink="wana", nat=nat, firewall=firewall),
            Router("gwb", networks=["wanb", "lanb"], uplink="wanb", nat=nat, firewall=firewall),
        ],
        hosts=[Host("alice", networks=["lana"]), Host("bob", networks=["lanb"]), *cloud_hosts],
    )


def v4_v6(*, services: Sequence[str] = DEFAULT_SERVICES) -> Topology:
    """alice IPv4-only, bob IPv6-only, both global; the cloud is dual-stack."""
    cloud, cloud_hosts = _cloud(services)
    return Topology(
        name="v4_v6",
        networks=[
            cloud,
            Network("lana", ipv4=GLOBAL_IPV4),
            Network("lanb", ipv6=LANB_IPV6),
        ],
        routers=[Router("core", networks=["cloud", "lana", "lanb"])],
        hosts=[Host("alice", networks=["lana"]), Host("bob", networks=["lanb"]), *cloud_hosts],
    )


def move_nat_nat(
    *,
    nat: NatMapping = NatMapping.ENDPOINT_INDEPENDENT,
    firewall: FirewallPolicy | None = FirewallPolicy.ENTERPRISE,
    services: Sequence[str] = DEFAULT_SERVICES,
) -> Topology:
    """IPv4 only: alice behind one NAT (``gwa``, network ``lana``) with a standby uplink on
    another (``gwc``, ``lanc``), each with ``firewall``; bob on a global IPv4 address."""
    cloud, cloud_hosts = _cloud(services)
    return Topology(
        name="movenat",
        networks=[
            cloud,
            Network("lana", ipv4=PRIVATE_A),
            Network("wana", ipv4=WANA_IPV4),
            Network("lanc", ipv4=PRIVATE_C),
            Network("wanc", ipv4=WANC_IPV4),
            Network("lanb", ipv4=GLOBAL_IPV4),
        ],
        routers=[
            Router("core", networks=["cloud", "wana", "wanc", "lanb"]),
            Router("gwa", networks=["wana", "lana"], uplink="wana", nat=nat, firewall=firewall),
            Router("gwc", networks=["wanc", "lanc"], uplink="wanc", nat=nat, firewall=firewall),
        ],
        hosts=[
            Host("alice", networks=["lana", Link("lanc", up=False)]),
            Host("bob", networks=["lanb"]),
            *cloud_hosts,
        ],
    )


def move_v6_nat(
    *,
    firewall: FirewallPolicy | None = FirewallPolicy.ENTERPRISE,
    services: Sequence[str] = DEFAULT_SERVICES,
) -> Topology:
    """alice on a global IPv6-only network (``lana`` behind ``gwa``: ``firewall``, no NAT)
    with a standby uplink on an IPv4-only NAT network (``lanc`` behind ``gwc``: NAT and
    ``firewall``); bob IPv6-only on a global network. The cloud (the TRS) is dual-stack."""
    cloud, cloud_hosts = _cloud(services)
    return Topology(
        name="movev6",
        networks=[
            cloud,
            Network("lana", ipv6=LANA_IPV6),
            Network("wana", ipv6=WANA6_IPV6),
            Network("lanc", ipv4=PRIVATE_C),
            Network("wanc", ipv4=WANC_IPV4),
            Network("lanb", ipv6=LANB_IPV6),
        ],
        routers=[
            Router("core", networks=["cloud", "wana", "wanc", "lanb"]),
            Router("gwa", networks=["wana", "lana"], uplink="wana", firewall=firewall),
            Router(
                "gwc",
                networks=["wanc", "lanc"],
                uplink="wanc",
                nat=NatMapping.ENDPOINT_INDEPENDENT,
                firewall=firewall,
            ),
        ],
        hosts=[
            Host("alice", networks=["lana", Link("lanc", up=False)]),
            Host("bob", networks=["lanb"]),
            *cloud_hosts,
        ],
    )


def move_server(
    *,
    nat: NatMapping = NatMapping.ENDPOINT_INDEPENDENT,
    firewall: FirewallPolicy | None = FirewallPolicy.ENTERPRISE,
    services: Sequence[str] = DEFAULT_SERVICES,
) -> Topology:
    """IPv4 only: alice behind a NAT and ``firewall`` (she connects, pattern 2); bob on a
    global network (``lanb``, 203.0.113.0/25) with a standby uplink on another global
    network (``lanc``, 203.0.113.128/25): the node that accepted the tunnel moves."""
    cloud, cloud_hosts = _cloud(services)
    return Topology(
        name="moveserver",
        networks=[
            cloud,
            Network("lana", ipv4=PRIVATE_A),
            Network("wana", ipv4=WANA_IPV4),
            Network("lanb", ipv4=GLOBAL_IPV4_LOW),
            Network("lanc", ipv4=GLOBAL_IPV4_HIGH),
        ],
        routers=[
            Router("core", networks=["cloud", "wana", "lanb", "lanc"]),
            Router("gwa", networks=["wana", "lana"], uplink="wana", nat=nat, firewall=firewall),
        ],
        hosts=[
            Host("alice", networks=["lana"]),
            Host("bob", networks=["lanb", Link("lanc", up=False)]),
            *cloud_hosts,
        ],
    )


def udp_blocked(
    *,
    services: Sequence[str] = DEFAULT_SERVICES,
    extra_lana: Sequence[str] = ("proxy",),
) -> Topology:
    """IPv4 only: alice behind a NAT whose firewall lets no UDP out (only TCP 80/443, the
    hotel or guest Wi-Fi), hosts ``extra_lana`` beside her (an HTTPS proxy); bob global.

        alice 192.168.1.10, proxy .11 --- gwa[EIM NAT + fw: no UDP] --- core --- bob 203.0.113.10
    """
    cloud, cloud_hosts = _cloud(services)
    return Topology(
        name="udpblock",
        networks=[
            cloud,
            Network("lana", ipv4=PRIVATE_A),
            Network("wana", ipv4=WANA_IPV4),
            Network("lanb", ipv4=GLOBAL_IPV4),
        ],
        routers=[
            Router("core", networks=["cloud", "wana", "lanb"]),
            Router(
                "gwa",
                networks=["wana", "lana"],
                uplink="wana",
                nat=NatMapping.ENDPOINT_INDEPENDENT,
                firewall=FirewallPolicy.ENTERPRISE_NO_UDP,
            ),
        ],
        hosts=[
            Host("alice", networks=["lana"]),
            *(Host(name, networks=["lana"]) for name in extra_lana),
            Host("bob", networks=["lanb"]),
            *cloud_hosts,
        ],
    )


#: Factories by name, e.g. for parametrised tests.
PATTERNS: dict[str, Callable[..., Topology]] = {
    "pattern1": pattern1,
    "pattern2": pattern2,
    "double_nat": double_nat,
    "v4_v6": v4_v6,
    "move_nat_nat": move_nat_nat,
    "move_v6_nat": move_v6_nat,
    "move_server": move_server,
    "udp_blocked": udp_blocked,
}
