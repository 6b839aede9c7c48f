"""The mutual-TLS QUIC endpoint: one UDP socket, many connections, both roles.

``QuicEndpoint`` (endpoint.py) is the asyncio glue; ``engine_qh3`` (the default engine) and
``engine`` (aioquic) hold everything engine-specific. See endpoint.py for the data-path loop
and the engine modules for how mutual TLS and relay-chosen connection IDs are added.
"""

from cyphonic.quic.endpoint import (
    Acceptor,
    Address,
    Connection,
    ConnectionHandler,
    EndpointStats,
    HandlerFactory,
    QuicEndpoint,
    bind_udp,
)
from cyphonic.quic.engine import ConnectionIdFactory

__all__ = [
    "Acceptor",
    "Address",
    "Connection",
    "ConnectionHandler",
    "ConnectionIdFactory",
    "EndpointStats",
    "HandlerFactory",
    "QuicEndpoint",
    "bind_udp",
]
