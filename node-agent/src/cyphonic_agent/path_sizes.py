"""How large the agent's QUIC datagrams and its TUN packets may be, from the host's links.

Part of the agent's path MTU handling (``pmtu`` has the whole story): ``plan_sizes`` fits
the QUIC ``max_datagram_size`` to the links that carry the host's default routes
(``link_mtus``, via netlink) and the TUN MTU to that datagram.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from cyphonic_agent.packet import IPV6_MIN_MTU
from cyphonic_agent.tunnel import (
    QUIC_MIN_DATAGRAM,
    UDP_IPV4_OVERHEAD,
    UDP_IPV6_OVERHEAD,
    inner_mtu_for,
    max_datagram_size_for,
)


@dataclass(frozen=True, slots=True)
class LinkMtu:
    """One link the host's traffic leaves by: its name, MTU and address family (4 or 6)."""

    interface: str
    mtu: int
    family: int


@dataclass(frozen=True, slots=True)
class PathSizes:
    """What the agent uses: QUIC ``max_datagram_size`` and the TUN MTU."""

    datagram: int
    tun_mtu: int
    limited_by: LinkMtu | None = None
    """The link that made them smaller than configured (None: the configuration)."""
    receive: int | None = None
    """The largest UDP payload the host's links receive unfragmented, sent to peers as
    ``max_udp_payload_size`` (None: no link known, nothing sent)."""


def datagram_room(link: LinkMtu) -> int:
    """The largest UDP payload one unfragmented datagram carries over ``link``."""
    return link.mtu - (UDP_IPV6_OVERHEAD if link.family == 6 else UDP_IPV4_OVERHEAD)


def plan_sizes(*, tun_mtu: int, links: list[LinkMtu]) -> PathSizes:
    """Fit the datagram and TUN sizes to the smallest of ``links`` (never below QUIC's 1200).

    No links known (no default route yet, netlink unreadable): the configured TUN MTU and
    the datagram it needs, as before.
    """
    datagram = max_datagram_size_for(tun_mtu=tun_mtu)
    limited_by: LinkMtu | None = None
    receive: int | None = None
    for link in links:
        room = max(datagram_room(link), QUIC_MIN_DATAGRAM)
        receive = room if receive is None else min(receive, room)
        if room < datagram:
            datagram, limited_by = room, link
    # Never below IPv6's 1,280 (the TUN carries IPv6 too): what the datagram cannot carry
    # the tunnel answers with ICMP too big (IPv4) or fragments itself (IPv6, RFC 8200 5).
    inner = max(inner_mtu_for(datagram), IPV6_MIN_MTU)
    return PathSizes(
        datagram=datagram, tun_mtu=min(tun_mtu, inner), limited_by=limited_by, receive=receive
    )


# ---------------------------------------------------------------------- the host's links


def link_mtus() -> list[LinkMtu]:
    """The MTUs of the links carrying this host's default routes, via netlink (pyroute2).

    A route's own ``mtu`` metric counts where it is smaller than its device's. Empty where
    there is no default route or netlink cannot be read.
    """
    from pyroute2 import IPRoute

    found: list[LinkMtu] = []
    try:
        with IPRoute() as ipr:
            names: dict[int, tuple[str, int]] = {}
            for link in ipr.get_links():
                names[link["index"]] = (
                    str(link.get_attr("IFLA_IFNAME")),
                    int(link.get_attr("IFLA_MTU") or 0),
                )
            for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
                for msg in ipr.get_routes(family=family, table=254):
                    if msg["dst_len"] != 0 or msg["type"] != 1:  # unicast default routes
                        continue
                    name, mtu = names.get(msg.get_attr("RTA_OIF"), ("", 0))
                    metrics = msg.get_attr("RTA_METRICS")
                    route_mtu = metrics.get_attr("RTAX_MTU") if metrics is not None else None
                    if route_mtu:
                        mtu = min(mtu, int(route_mtu)) if mtu else int(route_mtu)
                    if mtu:
                        found.append(LinkMtu(interface=name, mtu=mtu, family=version))
    except OSError:
        return []
    return found
