"""Declarative topology description and the pure planner that turns it into a build plan.

A topology is three lists::

    Topology(
        networks=[Network("cloud", ipv4="192.0.2.0/24", ipv6="2001:db8:100::/64"), ...],
        hosts=[Host("alice", networks=["lana"]), ...],
        routers=[Router("gwa", networks=["wana", "lana"], uplink="wana",
                        nat=NatMapping.ENDPOINT_INDEPENDENT,
                        firewall=FirewallPolicy.ENTERPRISE), ...],
    )

- A ``Network`` is one L2 segment (a bridge in a namespace of its own) carrying an IPv4
  subnet, an IPv6 subnet or both.
- A ``Host`` is a namespace with one interface per network it is on; its default route (per
  address family) goes to a router on one of its networks.
- A ``Router`` is a namespace that forwards between its networks. Its ``uplink`` (towards the
  internet) carries its default route, and optionally NAT (IPv4) and a firewall.

Addresses are allocated unless given: routers take offsets 1, 2, ... in list order and hosts
10, 11, ... (the IPv6 offset is written with the same digits, so ``.10`` goes with ``::10``).
Routes between routers are computed (shortest path, per family) towards every network that is
globally routable in that family; private IPv4 ranges (RFC 1918, RFC 6598) and IPv6 ULAs are
reachable only from their own routers, which is what keeps a NAT'd network unreachable from
outside.

Nothing here runs a command: ``plan(topology)`` returns plain data (interfaces, addresses,
routes, nftables rulesets) that ``cyphonic_testbed.bed`` executes.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Literal

from cyphonic_testbed.errors import TopologyError

Family = Literal[4, 6]
FAMILIES: tuple[Family, ...] = (4, 6)

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Node and network names: they become interface names (<= 15 bytes) inside namespaces.
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,14}$")
#: Interface names that already exist in the namespaces the bed makes.
RESERVED_NAMES = frozenset({"lo", "br0"})

ROUTER_FIRST_OFFSET = 1
HOST_FIRST_OFFSET = 10

#: Ranges that are never routed beyond the routers attached to them.
PRIVATE_RANGES: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("10.0.0.0/8"),
    ipaddress.IPv4Network("172.16.0.0/12"),
    ipaddress.IPv4Network("192.168.0.0/16"),
    ipaddress.IPv4Network("100.64.0.0/10"),
    ipaddress.IPv6Network("fc00::/7"),
)

NAT_TABLE = "cytb_nat"
FIREWALL_TABLE = "cytb_fw"


class NatMapping(enum.Enum):
    """How a NAT maps an inside (address, port) to an outside one."""

    #: Same outside port whatever the destination (nftables ``masquerade persistent``).
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    #: A new random outside port for each destination (``masquerade fully-random``).
    SYMMETRIC = "symmetric"


class FirewallPolicy(enum.Enum):
    """A stateful firewall between a router's inside networks and its uplink."""

    #: Out: TCP 80/443 and UDP 443 only. In: replies only (ct established,related).
    ENTERPRISE = "enterprise"
    #: As ENTERPRISE, but UDP 443 is dropped too (only TCP 80/443 gets out).
    ENTERPRISE_NO_UDP = "enterprise-no-udp"


@dataclass(frozen=True)
class Network:
    """One L2 segment with an IPv4 subnet, an IPv6 subnet, or both."""

    name: str
    _: KW_ONLY
    ipv4: str | None = None
    ipv6: str | None = None

    def subnet(self, family: Family) -> IPNetwork | None:
        """The subnet of ``family`` (4 or 6), or None when the network does not carry it."""
        text = self.ipv4 if family == 4 else self.ipv6
        if text is None:
            return None
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise TopologyError(f"network {self.name}: bad subnet {text!r}: {exc}") from exc
        if net.version != family:
            raise TopologyError(f"network {self.name}: {text} is not an IPv{family} subnet")
        return net

    @property
    def families(self) -> tuple[Family, ...]:
        """The address families this network carries."""
        return tuple(f for f in FAMILIES if (self.ipv4 if f == 4 else self.ipv6) is not None)

    def is_global(self, family: Family) -> bool:
        """True when the subnet of ``family`` is routed beyond its own routers."""
        net = self.subnet(family)
        if net is None:
            return False
        return not any(
            net.version == p.version and net.subnet_of(p)  # type: ignore[arg-type]
            for p in PRIVATE_RANGES
        )


@dataclass(frozen=True)
class Link:
    """An attachment of a node to a network, optionally with fixed addresses.

    ``up=False`` (hosts only) makes a standby uplink: the interface exists with its planned
    addresses known, but it is down, carries no address and no route until the host moves
    onto that network (``NetBed.move``).
    """

    network: str
    _: KW_ONLY
    ipv4: str | None = None
    ipv6: str | None = None
    up: bool = True


def _links(items: Sequence[str | Link]) -> tuple[Link, ...]:
    return tuple(item if isinstance(item, Link) else Link(item) for item in items)


@dataclass(frozen=True)
class Host:
    """An end host: a namespace with an interface on each of its networks."""

    name: str
    _: KW_ONLY
    networks: Sequence[str | Link] = ()
    #: Router for the default routes; by default the first router on the host's networks.
    gateway: str | None = None

    @property
    def links(self) -> tuple[Link, ...]:
        return _links(self.networks)


@dataclass(frozen=True)
class Router:
    """A namespace forwarding between its networks, optionally with NAT and a firewall."""

    name: str
    _: KW_ONLY
    networks: Sequence[str | Link] = ()
    #: Network towards the internet: default route, NAT and firewall outside.
    uplink: str | None = None
    #: IPv4 NAT on the uplink (IPv6 is routed unchanged).
    nat: NatMapping | None = None
    firewall: FirewallPolicy | None = None
    #: Router on the uplink for the default route; by default the only other one there.
    gateway: str | None = None

    @property
    def links(self) -> tuple[Link, ...]:
        return _links(self.networks)


@dataclass(frozen=True)
class Topology:
    """A whole bed: networks, hosts and routers."""

    _: KW_ONLY
    networks: Sequence[Network] = ()
    hosts: Sequence[Host] = ()
    routers: Sequence[Router] = ()
    #: Short label used in namespace names (helps when reading ``ip netns list``).
    name: str = "bed"


# ---------------------------------------------------------------------------------------------
# The plan: plain data, executed by cyphonic_testbed.bed


@dataclass(frozen=True)
class InterfacePlan:
    """One interface of a node: named after its network."""

    network: str
    ifname: str
    ipv4: ipaddress.IPv4Interface | None
    ipv6: ipaddress.IPv6Interface | None
    #: False for a standby uplink: down, no address, no route, until the host moves there.
    up: bool = True

    def address(self, family: Family) -> IPInterface | None:
        return self.ipv4 if family == 4 else self.ipv6


@dataclass(frozen=True)
class RoutePlan:
    """A static route: ``destination`` is a CIDR (``0.0.0.0/0`` / ``::/0`` for default)."""

    family: Family
    destination: str
    via: str
    dev: str


@dataclass(frozen=True)
class NodePlan:
    """Everything needed to build one host or router namespace."""

    name: str
    kind: Literal["host", "router"]
    interfaces: tuple[InterfacePlan, ...]
    routes: tuple[RoutePlan, ...]
    #: nftables ruleset (``nft -f`` input), or None.
    ruleset: str | None = None

    def interface(self, network: str) -> InterfacePlan:
        for iface in self.interfaces:
            if iface.network == network:
                return iface
        raise KeyError(f"{self.name} is not on network {network}")

    @property
    def networks_up(self) -> tuple[str, ...]:
        """The networks this node is attached to when the bed is built (no standby link)."""
        return tuple(i.network for i in self.interfaces if i.up)


@dataclass(frozen=True)
class Plan:
    """The validated, fully addressed topology."""

    topology: Topology
    networks: dict[str, Network]
    nodes: dict[str, NodePlan] = field(default_factory=dict)

    def members(self, network: str) -> list[str]:
        """Names of the nodes attached to ``network`` (bridge port names), in order."""
        return [
            n.name for n in self.nodes.values() if any(i.network == network for i in n.interfaces)
        ]

    def host_routes(self, host: str, networks_up: Sequence[str]) -> tuple[RoutePlan, ...]:
        """The default routes of ``host`` while it is attached to ``networks_up`` only (what
        a move onto another network installs)."""
        (spec,) = [h for h in self.topology.hosts if h.name == host]
        addrs = _addresses_of(self)
        return tuple(_host_routes(spec, topology=self.topology, addrs=addrs, up=networks_up))


def _check_name(kind: str, name: str) -> None:
    if not NAME_RE.match(name) or name in RESERVED_NAMES:
        raise TopologyError(
            f"{kind} name {name!r}: use 1-15 lower-case letters/digits starting with a letter "
            f"(not {', '.join(sorted(RESERVED_NAMES))})"
        )


def _validate(topology: Topology) -> dict[str, Network]:
    networks: dict[str, Network] = {}
    for net in topology.networks:
        _check_name("network", net.name)
        if net.name in networks:
            raise TopologyError(f"network {net.name} defined twice")
        if not net.families:
            raise TopologyError(f"network {net.name} has neither an IPv4 nor an IPv6 subnet")
        for family in net.families:
            sub = net.subnet(family)
            assert sub is not None
            if sub.num_addresses < 4:
                raise TopologyError(f"network {net.name}: {sub} is too small")
        networks[net.name] = net

    names: set[str] = set()
    nodes: list[Host | Router] = [*topology.routers, *topology.hosts]
    for node in nodes:
        _check_name("node", node.name)
        if node.name in names:
            raise TopologyError(f"node {node.name} defined twice")
        names.add(node.name)
        seen: set[str] = set()
        if not node.links:
            raise TopologyError(f"node {node.name} is on no network")
        if isinstance(node, Router) and not all(link.up for link in node.links):
            raise TopologyError(f"router {node.name}: only hosts have standby links (up=False)")
        for link in node.links:
            if link.network not in networks:
                raise TopologyError(f"node {node.name}: unknown network {link.network}")
            if link.network in seen:
                raise TopologyError(f"node {node.name} is on network {link.network} twice")
            seen.add(link.network)
        if isinstance(node, Router):
            if node.uplink is not None and node.uplink not in seen:
                raise TopologyError(f"router {node.name}: uplink {node.uplink} is not its network")
            if (node.nat or node.firewall) and node.uplink is None:
                raise TopologyError(f"router {node.name}: NAT and firewall need an uplink")
            if node.nat and networks[node.uplink or ""].subnet(4) is None:
                raise TopologyError(f"router {node.name}: NAT needs IPv4 on uplink {node.uplink}")
            if node.firewall is not None and len(node.links) < 2:
                raise TopologyError(f"router {node.name}: a firewall needs an inside network")
    router_names = {r.name for r in topology.routers}
    for node in nodes:
        gateway = node.gateway
        if gateway is not None and gateway not in router_names:
            raise TopologyError(f"{node.name}: gateway {gateway} is not a router")
    return networks


def _v6_offset(offset: int) -> int:
    # Same digits in both families: host .10 gets ::10 (0x10).
    return int(str(offset), 16)


def _allocate(
    topology: Topology, networks: dict[str, Network]
) -> dict[tuple[str, str], dict[Family, IPInterface]]:
    """Addresses per (node, network) and family: explicit ones first, then by offset."""
    result: dict[tuple[str, str], dict[Family, IPInterface]] = {}
    used: dict[tuple[str, Family], set[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
    nodes: list[Host | Router] = [*topology.routers, *topology.hosts]

    for node in nodes:
        for link in node.links:
            net = networks[link.network]
            slot = result.setdefault((node.name, link.network), {})
            for family in FAMILIES:
                text = link.ipv4 if family == 4 else link.ipv6
                if text is None:
                    continue
                sub = net.subnet(family)
                if sub is None:
                    raise TopologyError(f"{node.name}: network {net.name} has no IPv{family}")
                try:
                    addr = ipaddress.ip_address(text)
                except ValueError as exc:
                    raise TopologyError(f"{node.name}: bad address {text!r}") from exc
                if (
                    addr not in sub
                    or addr == sub.network_address
                    or (family == 4 and addr == sub.broadcast_address)
                ):
                    raise TopologyError(f"{node.name}: {addr} is not a host address of {sub}")
                taken = used.setdefault((net.name, family), set())
                if addr in taken:
                    raise TopologyError(f"{node.name}: {addr} is used twice on {net.name}")
                taken.add(addr)
                slot[family] = ipaddress.ip_interface(f"{addr}/{sub.prefixlen}")

    next_offset: dict[tuple[str, Family, str], int] = {}
    for node in nodes:
        kind = "router" if isinstance(node, Router) else "host"
        first = ROUTER_FIRST_OFFSET if kind == "router" else HOST_FIRST_OFFSET
        for link in node.links:
            net = networks[link.network]
            slot = result[(node.name, link.network)]
            for family in net.families:
                if family in slot:
                    continue
                sub = net.subnet(family)
                assert sub is not None
                taken = used.setdefault((net.name, family), set())
                offset = next_offset.get((net.name, family, kind), first)
                while True:
                    raw = offset if family == 4 else _v6_offset(offset)
                    if raw >= sub.num_addresses - 1:
                        raise TopologyError(f"network {net.name}: no room left in {sub}")
                    addr = sub[raw]
                    offset += 1
                    if addr not in taken:
                        break
                next_offset[(net.name, family, kind)] = offset
                taken.add(addr)
                slot[family] = ipaddress.ip_interface(f"{addr}/{sub.prefixlen}")
    return result


def _router_routes(
    router: Router,
    *,
    topology: Topology,
    networks: dict[str, Network],
    addrs: dict[tuple[str, str], dict[Family, IPInterface]],
) -> list[RoutePlan]:
    routes: list[RoutePlan] = []
    routers = {r.name: r for r in topology.routers}
    for family in FAMILIES:
        default_via: str | None = None
        if router.uplink is not None and family in networks[router.uplink].families:
            candidates = [
                r.name
                for r in topology.routers
                if r.name != router.name
                and family in addrs.get((r.name, router.uplink), {})
                and (router.gateway is None or r.name == router.gateway)
            ]
            if router.gateway is not None and not candidates:
                raise TopologyError(
                    f"router {router.name}: gateway {router.gateway} has no IPv{family} "
                    f"address on {router.uplink}"
                )
            if len(candidates) > 1:
                raise TopologyError(
                    f"router {router.name}: several routers on uplink {router.uplink}; "
                    "say which with gateway="
                )
            if candidates:
                default_via = str(addrs[(candidates[0], router.uplink)][family].ip)
                routes.append(
                    RoutePlan(
                        family=family,
                        destination="0.0.0.0/0" if family == 4 else "::/0",
                        via=default_via,
                        dev=router.uplink,
                    )
                )

        # Breadth-first over routers sharing a network of this family: first hop per network.
        attached = {link.network for link in router.links}
        first_hop: dict[str, tuple[str, str]] = {}  # router -> (via address, dev)
        queue: deque[str] = deque([router.name])
        visited = {router.name}
        while queue:
            current = queue.popleft()
            for link in routers[current].links:
                if family not in addrs[(current, link.network)]:
                    continue
                for other in topology.routers:
                    if other.name in visited or family not in addrs.get(
                        (other.name, link.network), {}
                    ):
                        continue
                    visited.add(other.name)
                    if current == router.name:
                        hop = str(addrs[(other.name, link.network)][family].ip)
                        first_hop[other.name] = (hop, link.network)
                    else:
                        first_hop[other.name] = first_hop[current]
                    queue.append(other.name)
        routed: set[str] = set()
        for other in topology.routers:  # list order keeps the output stable
            if other.name not in first_hop:
                continue
            via, dev = first_hop[other.name]
            for link in other.links:
                net = networks[link.network]
                if link.network in attached or link.network in routed:
                    continue
                if not net.is_global(family) or via == default_via:
                    continue
                sub = net.subnet(family)
                routed.add(link.network)
                routes.append(RoutePlan(family=family, destination=str(sub), via=via, dev=dev))
    return routes


def _addresses_of(result: Plan) -> dict[tuple[str, str], dict[Family, IPInterface]]:
    """The planned addresses per (node, network) and family, read back from a plan."""
    addrs: dict[tuple[str, str], dict[Family, IPInterface]] = {}
    for node in result.nodes.values():
        for iface in node.interfaces:
            slot = addrs.setdefault((node.name, iface.network), {})
            for family in FAMILIES:
                addr = iface.address(family)
                if addr is not None:
                    slot[family] = addr
    return addrs


def _host_routes(
    host: Host,
    *,
    topology: Topology,
    addrs: dict[tuple[str, str], dict[Family, IPInterface]],
    up: Sequence[str] | None = None,
) -> list[RoutePlan]:
    """Default routes of ``host`` over its links that are up (``up``: these networks)."""
    links = [link for link in host.links if (link.up if up is None else link.network in up)]
    routes: list[RoutePlan] = []
    for family in FAMILIES:
        chosen: tuple[str, str] | None = None
        for link in links:
            if family not in addrs[(host.name, link.network)]:
                continue
            for router in topology.routers:
                if host.gateway is not None and router.name != host.gateway:
                    continue
                addr = addrs.get((router.name, link.network), {}).get(family)
                if addr is not None:
                    chosen = (str(addr.ip), link.network)
                    break
            if chosen:
                break
        if chosen is None:
            continue
        routes.append(
            RoutePlan(
                family=family,
                destination="0.0.0.0/0" if family == 4 else "::/0",
                via=chosen[0],
                dev=chosen[1],
            )
        )
    return routes


def render_ruleset(router: Router) -> str | None:
    """The nftables ruleset for ``router``'s NAT and firewall, or None when it has neither."""
    if router.nat is None and router.firewall is None:
        return None
    up = router.uplink
    parts: list[str] = []
    if router.nat is not None:
        flag = "persistent" if router.nat is NatMapping.ENDPOINT_INDEPENDENT else "fully-random"
        parts.append(
            f"table ip {NAT_TABLE} {{\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "{up}" masquerade {flag}\n'
            "  }\n"
            # As a home router: unsolicited UDP to the router itself is dropped before
            # conntrack confirms it. Delivered (answered with port unreachable), it would
            # leave an entry that makes the NAT give a node's next outgoing flow to that
            # peer another port: a peer's early hole-punching probe would spoil the punch.
            "  chain input {\n"
            "    type filter hook input priority filter; policy accept;\n"
            f'    iifname "{up}" meta l4proto udp ct state new drop\n'
            "  }\n"
            "}\n"
        )
    if router.firewall is not None:
        out = f'iifname != "{up}" oifname "{up}"'
        rules = [
            "ct state established,related accept",
            "ct state invalid drop",
            f'iifname != "{up}" oifname != "{up}" accept',
            f"{out} tcp dport {{ 80, 443 }} accept",
        ]
        if router.firewall is FirewallPolicy.ENTERPRISE:
            rules.append(f"{out} udp dport 443 accept")
        rules.append("counter drop")
        body = "".join(f"    {rule}\n" for rule in rules)
        parts.append(
            f"table inet {FIREWALL_TABLE} {{\n"
            "  chain forward {\n"
            "    type filter hook forward priority filter; policy drop;\n"
            f"{body}"
            "  }\n"
            "}\n"
        )
    return "".join(parts)


def plan(topology: Topology) -> Plan:
    """Validate ``topology`` and compute every address, route and ruleset."""
    networks = _validate(topology)
    addrs = _allocate(topology, networks)
    result = Plan(topology=topology, networks=networks)

    def interfaces(node: Host | Router) -> tuple[InterfacePlan, ...]:
        out = []
        for link in node.links:
            slot = addrs[(node.name, link.network)]
            v4, v6 = slot.get(4), slot.get(6)
            assert v4 is None or isinstance(v4, ipaddress.IPv4Interface)
            assert v6 is None or isinstance(v6, ipaddress.IPv6Interface)
            out.append(
                InterfacePlan(
                    network=link.network, ifname=link.network, ipv4=v4, ipv6=v6, up=link.up
                )
            )
        return tuple(out)

    for router in topology.routers:
        result.nodes[router.name] = NodePlan(
            name=router.name,
            kind="router",
            interfaces=interfaces(router),
            routes=tuple(_router_routes(router, topology=topology, networks=networks, addrs=addrs)),
            ruleset=render_ruleset(router),
        )
    for host in topology.hosts:
        result.nodes[host.name] = NodePlan(
            name=host.name,
            kind="host",
            interfaces=interfaces(host),
            routes=tuple(_host_routes(host, topology=topology, addrs=addrs)),
        )
    return result
