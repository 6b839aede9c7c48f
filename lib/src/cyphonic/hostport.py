"""Text and socket forms of a ``(host, port)`` endpoint, shared by every component.

    "192.0.2.1:443"   "[2001:db8::1]:443"   "as.example.org"   <->   ("192.0.2.1", 443), ...
    ("::ffff:192.0.2.1", 443, 0, 0)  (what a dual-stack socket reports)   ->  ("192.0.2.1", 443)

Settings, admin views and logs use the text form; the wire form (``pb.Endpoint``, raw
address bytes) is ``cyphonic.wire.messages``' job (``endpoint_to_pb``/``endpoint_from_pb``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from cyphonic.errors import InvalidArgument
from cyphonic.pki import validate_dns_name

__all__ = ["HostPort", "format_host_port", "parse_host_port", "plain_address"]

HostPort = tuple[str, int]
"""A text host (IP literal without brackets, or a DNS name) and a port."""


def parse_host_port(
    text: str,
    *,
    default_port: int | None = None,
    require_ip: bool = False,
    allow_port_zero: bool = False,
) -> HostPort:
    """``(host, port)`` from ``host:port``, ``[v6]:port``, or a bare host or IPv6 address.

    A bare host takes ``default_port`` (``InvalidArgument`` when there is none). An IP
    host comes back in its canonical text form; a name is checked and lower-cased, or
    refused when ``require_ip``. Ports are 1..65535 (0 too with ``allow_port_zero``, for
    binding). Raises ``InvalidArgument`` naming ``text`` for anything else.
    """
    value = text.strip()
    host, port_text = value, None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise InvalidArgument(f"endpoint {text!r}: missing ']'")
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise InvalidArgument(f"endpoint {text!r}: expected ':port' after ']'")
            port_text = rest[1:]
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    # else: a bare host name, IPv4 address or unbracketed IPv6 address
    if port_text is not None:
        try:
            port = int(port_text)
        except ValueError as exc:
            raise InvalidArgument(f"endpoint {text!r}: port is not a number") from exc
    elif default_port is not None:
        port = default_port
    else:
        raise InvalidArgument(f"endpoint {text!r} lacks a port")
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise InvalidArgument(f"endpoint {text!r}: port out of range")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError as exc:
        if require_ip:
            raise InvalidArgument(f"endpoint {text!r}: not an IP address") from exc
        try:
            host = validate_dns_name(host)
        except InvalidArgument as bad:
            raise InvalidArgument(f"endpoint {text!r}: {bad.message}") from exc
    return host, port


def format_host_port(host: str, port: int) -> str:
    """``192.0.2.1:443``, ``[2001:db8::1]:443`` or ``name:443`` (inverse of the parser)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def plain_address(addr: Sequence[Any]) -> HostPort:
    """``(host, port)`` of a socket address; an IPv4-mapped IPv6 host shown as IPv4."""
    host, port = str(addr[0]), int(addr[1])
    if host.startswith("::ffff:") and "." in host:
        host = host.removeprefix("::ffff:")
    return host, port
