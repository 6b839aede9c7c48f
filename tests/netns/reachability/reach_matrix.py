"""The reachability matrix: one test bed holding every network situation, and the table of
pairs to try in it. To add a row: put its host (and routers/networks) in ``topology()``,
then one ``Row`` in ``ROWS`` saying what to expect.

    cloud 192.0.2.0/24 + 2001:db8:100::/64: as, nms, trs           all behind router "core"
    pub4   203.0.113.0/25      g1, g2        global IPv4
    pub6a  2001:db8:a::/64     v6a           global IPv6 only
    pub6b  2001:db8:b::/64     v6b           global IPv6 only
    lana   192.168.1.0/24      ea    behind gwa: endpoint-independent NAT (wana)
    lanb   192.168.2.0/24      eb    behind gwb: endpoint-independent NAT (wanb)
    lanc   192.168.3.0/24      sa    behind gwc: symmetric NAT (wanc)
    fwlan  203.0.113.128/26    fw    public IPv4 behind gwf: enterprise firewall, no NAT
    lanh   192.168.4.0/24      cg    behind gwh (home NAT, EIM) on cgn 100.127.0.0/24,
                                     itself behind gwcg (carrier-grade NAT, EIM) on wancg
    lanu   192.168.5.0/24      ub, px, proxy   behind gwu: EIM NAT + firewall letting only
                                     TCP 80/443 out, no UDP at all (wanu 198.18.0.0/26);
                                     px reaches nothing but tinyproxy on ``proxy`` (CONNECT
                                     to 443 only) and runs its agent with ``--https-proxy``

(The carrier network uses 100.127.0.0/24, outside the overlay's 100.64.0.0/16 pool: a clash
with the pool is the subject of another test.)
"""

from __future__ import annotations

from dataclasses import dataclass

from cyphonic_testbed import FirewallPolicy, Host, NatMapping, Network, Router, Topology

EIM = NatMapping.ENDPOINT_INDEPENDENT
SYM = NatMapping.SYMMETRIC


def topology() -> Topology:
    """Every situation of the matrix in one bed."""
    nets = [
        Network("cloud", ipv4="192.0.2.0/24", ipv6="2001:db8:100::/64"),
        Network("pub4", ipv4="203.0.113.0/25"),
        Network("pub6a", ipv6="2001:db8:a::/64"),
        Network("pub6b", ipv6="2001:db8:b::/64"),
        Network("wana", ipv4="198.51.100.0/26"),
        Network("lana", ipv4="192.168.1.0/24"),
        Network("wanb", ipv4="198.51.100.64/26"),
        Network("lanb", ipv4="192.168.2.0/24"),
        Network("wanc", ipv4="198.51.100.128/26"),
        Network("lanc", ipv4="192.168.3.0/24"),
        Network("wanf", ipv4="203.0.113.192/26"),
        Network("fwlan", ipv4="203.0.113.128/26"),
        Network("wancg", ipv4="198.51.100.192/26"),
        Network("cgn", ipv4="100.127.0.0/24"),
        Network("lanh", ipv4="192.168.4.0/24"),
        Network("wanu", ipv4="198.18.0.0/26"),
        Network("lanu", ipv4="192.168.5.0/24"),
    ]
    routers = [
        Router(
            "core",
            networks=[
                "cloud",
                "pub4",
                "pub6a",
                "pub6b",
                "wana",
                "wanb",
                "wanc",
                "wanf",
                "wancg",
                "wanu",
            ],
        ),
        Router("gwa", networks=["wana", "lana"], uplink="wana", nat=EIM),
        Router("gwb", networks=["wanb", "lanb"], uplink="wanb", nat=EIM),
        Router("gwc", networks=["wanc", "lanc"], uplink="wanc", nat=SYM),
        Router(
            "gwf", networks=["wanf", "fwlan"], uplink="wanf", firewall=FirewallPolicy.ENTERPRISE
        ),
        Router("gwcg", networks=["wancg", "cgn"], uplink="wancg", nat=EIM),
        Router("gwh", networks=["cgn", "lanh"], uplink="cgn", nat=EIM),
        Router(
            "gwu",
            networks=["wanu", "lanu"],
            uplink="wanu",
            nat=EIM,
            firewall=FirewallPolicy.ENTERPRISE_NO_UDP,
        ),
    ]
    hosts = [
        Host("g1", networks=["pub4"]),
        Host("g2", networks=["pub4"]),
        Host("v6a", networks=["pub6a"]),
        Host("v6b", networks=["pub6b"]),
        Host("ea", networks=["lana"]),
        Host("eb", networks=["lanb"]),
        Host("sa", networks=["lanc"]),
        Host("fw", networks=["fwlan"]),
        Host("cg", networks=["lanh"]),
        Host("ub", networks=["lanu"]),
        Host("px", networks=["lanu"]),
        Host("proxy", networks=["lanu"]),
        Host("as", networks=["cloud"]),
        Host("nms", networks=["cloud"]),
        Host("trs", networks=["cloud"]),
    ]
    return Topology(name="reach", networks=nets, routers=routers, hosts=hosts)


NODES = ("g1", "g2", "v6a", "v6b", "ea", "eb", "sa", "fw", "cg", "ub", "px")
"""The hosts that run an agent."""

PROXY_HOST, PROXY_NET, PROXY_ALLOW = "proxy", "lanu", "192.168.5.0/24"
"""Where tinyproxy runs, and whom it serves."""

PROXY_ONLY = ("px",)
"""Nodes whose only way out is the proxy (started with ``--https-proxy``)."""


@dataclass(frozen=True)
class Row:
    """One pair: ``src`` resolves ``dst``'s name and pings it; what must be seen."""

    situation: str
    src: str
    dst: str
    pattern: str
    """``direct``, ``nat_connects`` or ``relay`` (the NMS's decision)."""
    direct: bool
    """Where the tunnel must end up: straight to the peer, or through the TRS."""
    reason_code: str
    """The NMS's reason for the pattern (``cyphonic_nms.route_reason``)."""
    transport: str = "udp"
    """What carries the source's packets (``udp``; ``tcp`` or ``proxy``: QUIC over TLS on
    TCP 443, docs/tcp-transport.md)."""
    family: int = 4
    """Overlay address family pinged (a v6-only pair still has overlay IPv4)."""
    first_reply_s: float = 5.0
    """Generous bound on DNS answer -> first echo reply (the figure is printed)."""
    direct_within_s: float | None = None
    """For a pair that starts relayed and goes direct: bound on the time to get there."""
    no_reversal: bool = False
    """The first packet must not wait for a route reversal (inbound blocked known)."""


ROWS: tuple[Row, ...] = (
    Row("global IPv4", "g1", "g2", "direct", True, "both_global_ipv4"),
    Row("IPv6 only", "v6a", "v6b", "direct", True, "both_ipv6"),
    Row(
        "EIM NAT both sides",
        "ea",
        "eb",
        "relay",
        True,
        "hole_punching",
        direct_within_s=10.0,
    ),
    Row("EIM NAT to symmetric NAT", "ea", "sa", "relay", False, "both_behind_nat"),
    Row(
        "firewalled public node",
        "g2",
        "fw",
        "nat_connects",
        True,
        "inbound_blocked",
        no_reversal=True,
    ),
    Row("CGNAT + home NAT", "cg", "g1", "nat_connects", True, "one_side_nat"),
    Row("IPv4-only to IPv6-only", "g1", "v6b", "relay", False, "no_common_family"),
    Row("UDP fully blocked", "ub", "g1", "relay", False, "udp_blocked", transport="tcp"),
    Row("HTTPS proxy only", "px", "g1", "relay", False, "udp_blocked", transport="proxy"),
)
