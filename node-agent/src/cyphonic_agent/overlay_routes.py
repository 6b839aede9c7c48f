"""Which overlay prefixes go into the TUN, sans-I/O: never the host's own networks or gateways.

The overlay pool (100.64.0.0/16 by default) lies in the shared address space of
carrier-grade NAT (100.64.0.0/10, RFC 6598), which mobile and CGNAT networks also hand to
their customers. A host whose LAN is 100.64.0.0/10 with its gateway at 100.64.0.1 would lose
that gateway if the whole pool were routed into the TUN (a /16 beats the LAN's /10). So::

    into the TUN = pool - (every prefix the host already routes elsewhere: its addresses'
                           networks and its non-default routes, gateways included)
                 + one /32 (/128) per peer whose virtual address lies in what was cut out

In the usual case nothing overlaps and the TUN gets the whole pool, as before (a packet to
an unknown peer address still reaches the agent and asks for a route). Where the host's
network covers part or all of the pool, that part stays the host's, and each peer the
agent learns of (by DNS lookup or route direction) gets its own host route, more specific
than the LAN's prefix; the host's gateway, its own addresses and the rest of its LAN keep
their routes. docs/agent.md "Choosing the pool" argues the choice.

A true clash cannot be routed around and is refused with both prefixes named: at ``up``,
the node's own virtual address being an address this host holds on another interface or
the gateway of one of its routes (``plan_routes`` raises ``RouteClash``); later, a peer
whose virtual address is one of those (``OverlayRoutes.peer_route`` raises; that peer
alone is unreachable). ``plan_routes`` runs again whenever the host's addresses change.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cyphonic.errors import InvalidArgument

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RouteClash(InvalidArgument):
    """An overlay address is one the host's own network uses: it cannot be routed."""


@dataclass(frozen=True, slots=True)
class HostRoute:
    """A prefix the host routes elsewhere than the TUN (an address's network or a route)."""

    prefix: Network
    interface: str
    gateway: IPAddress | None = None
    """Where the route leads (None: on link)."""

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway is not None else ""
        return f"{self.prefix}{via} on {self.interface}"


@dataclass(frozen=True, slots=True)
class HostNetworks:
    """The host's own side: its addresses (with their interfaces) and its routes."""

    addresses: tuple[tuple[Interface, str], ...] = ()
    """Each address the host holds outside the TUN, with its prefix and interface."""
    routes: tuple[HostRoute, ...] = ()
    """Its non-default unicast routes outside the TUN, and every gateway (default routes
    included, as a route to the gateway's own network)."""

    def prefixes(self) -> list[HostRoute]:
        """Every prefix the host routes elsewhere: address networks first, then routes."""
        found = [HostRoute(prefix=a.network, interface=name) for a, name in self.addresses]
        return found + list(self.routes)

    def taken(self, address: IPAddress) -> str | None:
        """Why ``address`` belongs to the host (its own address, a gateway), or None."""
        for iface, name in self.addresses:
            if iface.ip == address:
                return f"this host's address on {name} ({iface.network})"
        for route in self.routes:
            if route.gateway == address:
                on_link = [i.network for i, _ in self.addresses if address in i.network]
                where = on_link[0] if on_link else route.prefix
                return f"the gateway {address} of {where} on {route.interface}"
        return None


@dataclass(frozen=True, slots=True)
class OverlayRoutes:
    """The plan: prefixes into the TUN, and what was left to the host."""

    pools: tuple[Network, ...]
    prefixes: tuple[Network, ...]
    """Routed into the TUN (the pools minus the host's prefixes)."""
    host: HostNetworks
    shadowed: tuple[HostRoute, ...] = ()
    """Host prefixes that overlap a pool (left to the host; their peers get host routes)."""

    def peer_route(self, address: IPAddress) -> Network | None:
        """The host route a peer at virtual ``address`` needs (None: the prefixes carry it).

        Raises ``RouteClash`` for an address the host itself uses (its own, a gateway).
        """
        if not any(address in pool for pool in self.pools):
            return None  # not ours to route
        if any(address in prefix for prefix in self.prefixes):
            return None
        why = self.host.taken(address)
        if why is not None:
            pool = next(p for p in self.pools if address in p)
            raise RouteClash(
                f"peer virtual address {address} (overlay pool {pool}) is {why}: "
                "that peer is unreachable; move the NMS pool (--ipv4-pool) off this network"
            )
        return ipaddress.ip_network(address)


def subtract(networks: Iterable[Network], cut: Network) -> list[Network]:
    """``networks`` minus ``cut``, as the fewest prefixes (same family only)."""
    out: list[Network] = []
    for net in networks:
        if net.version != cut.version or not net.overlaps(cut):
            out.append(net)
        elif net.subnet_of(cut):  # type: ignore[arg-type]
            continue
        else:
            out.extend(net.address_exclude(cut))  # type: ignore[arg-type]
    return sorted(out, key=lambda n: (n.version, n.network_address, n.prefixlen))


def plan_routes(*, own: Sequence[Interface], host: HostNetworks) -> OverlayRoutes:
    """Plan the TUN's routes for the node's virtual addresses ``own`` (address/pool prefix).

    Raises ``RouteClash`` when an own virtual address is an address the host holds on
    another interface or a gateway of its routes; the message names both prefixes.
    """
    pools = tuple(iface.network for iface in own)
    for iface in own:
        why = host.taken(iface.ip)
        if why is not None:
            raise RouteClash(
                f"this node's virtual address {iface.ip} (overlay pool {iface.network}) is "
                f"{why}; the overlay cannot use it. Move the NMS pool (--ipv4-pool / "
                "--ipv6-pool) off this network, or this host off the pool"
            )
    prefixes: list[Network] = list(pools)
    shadowed: list[HostRoute] = []
    for route in host.prefixes():
        if any(route.prefix.version == p.version and route.prefix.overlaps(p) for p in pools):
            shadowed.append(route)
            prefixes = subtract(prefixes, route.prefix)
        if route.gateway is not None and any(route.gateway in p for p in pools):
            prefixes = subtract(prefixes, ipaddress.ip_network(route.gateway))
    return OverlayRoutes(pools=pools, prefixes=tuple(prefixes), host=host, shadowed=tuple(shadowed))


# ---------------------------------------------------------------------- reading the host


def host_networks(*, exclude_ifindexes: Iterable[int] = ()) -> HostNetworks:
    """This host's addresses and routes outside ``exclude_ifindexes`` (the TUN), via
    netlink (pyroute2); loopback and link-local addresses are left out."""
    from pyroute2 import IPRoute

    excluded = set(exclude_ifindexes)
    addresses: list[tuple[Interface, str]] = []
    routes: list[HostRoute] = []
    with IPRoute() as ipr:
        names = {link["index"]: str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        for msg in ipr.get_addr():
            if msg["index"] in excluded:
                continue
            text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not text:
                continue
            iface = ipaddress.ip_interface(f"{text}/{msg['prefixlen']}")
            if iface.ip.is_loopback or iface.ip.is_link_local or iface.ip.is_multicast:
                continue
            addresses.append((iface, names.get(msg["index"], "?")))
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_routes(family=family, table=254):
                if msg["type"] != 1:  # unicast only
                    continue
                oif = msg.get_attr("RTA_OIF")
                if oif in excluded:
                    continue
                name = names.get(oif, "?")
                gateway_text = msg.get_attr("RTA_GATEWAY")
                gateway = ipaddress.ip_address(gateway_text) if gateway_text else None
                dst = msg.get_attr("RTA_DST")
                if msg["dst_len"] == 0:
                    if gateway is not None and not gateway.is_link_local:
                        # The default route's gateway: its own address must stay reachable.
                        routes.append(
                            HostRoute(
                                prefix=ipaddress.ip_network(gateway),
                                interface=name,
                                gateway=gateway,
                            )
                        )
                    continue
                if dst is None:
                    continue
                prefix = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
                if prefix.is_link_local or prefix.is_multicast:
                    continue
                routes.append(HostRoute(prefix=prefix, interface=name, gateway=gateway))
    return HostNetworks(addresses=tuple(addresses), routes=tuple(routes))
