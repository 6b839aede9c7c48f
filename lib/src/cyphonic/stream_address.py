"""Stream addresses: how a service names a node whose QUIC packets come over TCP 443.

A service's QUIC endpoint keys connections by peer address. A node carried over a TLS
stream (docs/tcp-transport.md) has no UDP address, so each stream gets one from a range no
real peer uses: ``100::<serial>`` (RFC 6666's discard-only prefix) on a dual-stack
endpoint, ``240.<serial>`` (reserved, RFC 1112) on an IPv4-only one; the port is the
stream's TCP source port. Pure: the NMS's route decisions import it (such a node is
reachable only through the relay).
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["is_stream_host", "stream_address"]

_STREAM_NET_V6 = ipaddress.IPv6Network("100::/64")
_STREAM_NET_V4 = ipaddress.IPv4Network("240.0.0.0/8")


def is_stream_host(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is a stream address (a node on TCP 443, not a real host)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped in _STREAM_NET_V4
        return ip in _STREAM_NET_V6
    return ip in _STREAM_NET_V4


def stream_address(serial: int, port: int, *, ipv6: bool) -> tuple[Any, ...]:
    """The socket-address form of stream ``serial`` on an endpoint of that family."""
    if ipv6:
        host = str(_STREAM_NET_V6[serial % _STREAM_NET_V6.num_addresses])
        return (host, port, 0, 0)
    return (str(_STREAM_NET_V4[serial % (1 << 24)]), port)
