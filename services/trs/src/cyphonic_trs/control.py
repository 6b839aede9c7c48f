"""The TRS's UDP glue: its own QUIC server (nodes' control connections) on the relay socket.

The project's QUIC endpoint (``cyphonic.quic.QuicEndpoint``) drains its socket in batches
and routes each datagram by DCID. The relay rides in that same loop through the endpoint's
public ``datagram_filter`` hook: every datagram is first offered to ``RelayFilter``, which
forwards or drops relay traffic (one ``RelayCore`` decision, one ``sendto``) and leaves
everything else, unknown CIDs included, to the endpoint's own routing, i.e. to the TRS's
mutual-TLS control connections. So there is one socket, one reader and one drain loop for
both, and no other UDP glue.

Control connections (ALPN ``cyphonic-sig/1``, node certificates only) are answered by
``RelayAllocationService.handle``. The address handed to it is the connection's current
peer address only once QUIC has validated that path (RFC 9000 section 8.2): a packet
replayed from elsewhere can make QUIC probe a new path, but not move a relay side.
The trust store's ``is_revoked`` (``cyphonic.revocation``) refuses a revoked node
certificate inside the handshake.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import InvalidArgument, Unavailable
from cyphonic.log import get_logger
from cyphonic.pki import CertifiedKey, TrustStore, load_identity, load_trust_store
from cyphonic.quic import Acceptor, QuicEndpoint
from cyphonic.quic.engine import DEFAULT_MAX_DATAGRAM_SIZE
from cyphonic.quic.retry import DEFAULT_RETRY_THRESHOLD
from cyphonic.quic.tcp_transport import TcpListener, start_tcp_listener
from cyphonic.v1 import signalling_pb2 as pb

from cyphonic_trs.relay import TO_LOCAL_SERVER, Forward, RelayCore
from cyphonic_trs.session import HostPort
from cyphonic_trs.signalling import RelayAllocationService


class RelayingService(Protocol):
    """What the control plane needs of ``cyphonic_trs.service.TrsService`` (a Protocol,
    so that this module does not import the service that composes it)."""

    core: RelayCore | None
    allocation: RelayAllocationService | None


class RelayFilter:
    """Offered every datagram before the endpoint routes it; True = the relay took it."""

    def __init__(
        self, core: RelayCore, sock: socket.socket, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.core = core
        self.clock = clock
        self._sendto = sock.sendto
        self._sendmsg = sock.sendmsg
        self.streams: Mapping[Any, Any] = {}
        """Stream address -> outbox (``TcpListener.streams``): relay sides on TCP 443."""
        self.send_dropped = 0
        self.send_errors = 0
        self.trains_forwarded = 0
        """GRO trains forwarded whole, with one GSO send (see ``train``)."""

    def __call__(self, data: bytes, addr: Any) -> bool:
        action = self.core.datagram_received(data, addr, self.clock())
        if action is TO_LOCAL_SERVER:
            return False
        if action.__class__ is Forward:
            streams = self.streams
            if streams and (box := streams.get(action.to_addr)) is not None:
                box.send(data)  # the other side is on a TCP 443 stream
                return True
            try:
                self._sendto(data, action.to_addr)
            except BlockingIOError:
                self.send_dropped += 1
            except OSError:
                self.send_errors += 1
        return True

    def train(self, data: bytes, segment: int, addr: Any) -> bool:
        """A UDP GRO train whose datagrams all carry the first one's short-header DCID (the
        endpoint checked): one relay decision, forwarded unchanged with one GSO send (the
        kernel cuts it into the same datagrams again). True = the relay took it."""
        count = -(-len(data) // segment)
        action = self.core.train_received(data, count, addr, self.clock())
        if action is TO_LOCAL_SERVER:
            return False
        if action.__class__ is Forward:
            streams = self.streams
            if streams and (box := streams.get(action.to_addr)) is not None:
                for offset in range(0, len(data), segment):
                    box.send(data[offset : offset + segment])
                return True
            try:
                self._sendmsg(
                    [data], [(_SOL_UDP, _UDP_SEGMENT, _SEGMENT.pack(segment))], 0, action.to_addr
                )
                self.trains_forwarded += 1
            except BlockingIOError:
                self.send_dropped += count
            except OSError:
                # No GSO towards that side (e.g. its path MTU): datagram by datagram.
                for offset in range(0, len(data), segment):
                    try:
                        self._sendto(data[offset : offset + segment], action.to_addr)
                    except BlockingIOError:
                        self.send_dropped += 1
                    except OSError:
                        self.send_errors += 1
        return True


_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_SEGMENT = struct.Struct("=H")


def validated_peer_address(connection: Any) -> tuple[str, int] | None:
    """The connection's peer address if QUIC has validated its current path, else None."""
    address: tuple[str, int] | None = connection.validated_peer_address
    return address


def native_addr_for(family: int) -> Callable[[HostPort], Any]:
    """The converter from a stored ``(host, port)`` to what ``recvfrom`` reports on a socket
    of ``family`` (IPv4 hosts become IPv4-mapped on a dual-stack IPv6 socket)."""
    if family == socket.AF_INET:
        return lambda hp: (hp[0], hp[1])

    def to_v6(hp: HostPort) -> Any:
        ip = ipaddress.ip_address(hp[0])
        if ip.version == 4:
            return (f"::ffff:{ip}", hp[1], 0, 0)
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return (f"::ffff:{mapped}", hp[1], 0, 0)
        return (socket.inet_ntop(socket.AF_INET6, ip.packed), hp[1], 0, 0)

    return to_v6


def open_relaying_endpoint(
    *,
    sock: socket.socket,
    core: RelayCore,
    identity: CertifiedKey,
    trust: TrustStore,
    accept: Mapping[str, Any],
    idle_timeout: float = 60.0,
) -> tuple[QuicEndpoint, RelayFilter]:
    """A ``QuicEndpoint`` on ``sock`` whose drain loop relays first; (endpoint, filter).

    Call inside the running loop; ``endpoint.close()`` closes ``sock``.
    """
    relay = RelayFilter(core, sock)
    endpoint = QuicEndpoint(
        sock=sock,
        identity=identity,
        trust=trust,
        accept=accept,
        idle_timeout=idle_timeout,
        max_datagram_size=DEFAULT_MAX_DATAGRAM_SIZE,
        max_pending_datagrams=1024,
        congestion_control="reno",
        retry_threshold=DEFAULT_RETRY_THRESHOLD,  # relayed Initials are the filter's first
    )
    endpoint.datagram_filter = relay
    return endpoint, relay


HandlerFactory = Callable[[Any], Any]
"""Makes the ``ConnectionHandler`` of each verified control connection."""


class TrsControlPlane:
    """The relaying endpoint of a ``TrsService``: control connections plus relay filter."""

    def __init__(
        self, endpoint: QuicEndpoint, relay: RelayFilter, identity: CertifiedKey | None = None
    ) -> None:
        self.endpoint = endpoint
        self.relay = relay
        self.identity = identity
        self.tcp: TcpListener | None = None
        """TLS on TCP at the UDP port's number (docs/tcp-transport.md), if it could bind."""

    async def start_tcp(self, host: str) -> None:
        """Serve TCP 443 streams into the same endpoint; relay sides may be on them."""
        if self.identity is None:
            return
        self.tcp = await start_tcp_listener(self.endpoint, self.identity, host=host)
        if self.tcp is not None:
            self.relay.streams = self.tcp.streams

    @classmethod
    def open(
        cls,
        *,
        sock: socket.socket,
        service: RelayingService,
        identity: CertifiedKey,
        trust: TrustStore,
        handler_factory: HandlerFactory,
        idle_timeout: float = 60.0,
    ) -> TrsControlPlane:
        """Serve ``ALPN_SIGNALLING`` for nodes on ``sock``, relaying first."""
        assert service.core is not None
        endpoint, relay = open_relaying_endpoint(
            sock=sock,
            core=service.core,
            identity=identity,
            trust=trust,
            accept={ALPN_SIGNALLING: Acceptor(handler_factory=handler_factory, expect="node")},
            idle_timeout=idle_timeout,
        )
        return cls(endpoint, relay, identity)

    def observe_addresses(self) -> list[tuple[str, tuple[str, int]]]:
        """``(fqdn, validated address)`` of every ready node control connection (the sync
        loop feeds them to ``observe_control_address``, so a migrated connection moves its
        relay sides within one sync even if the node sends nothing)."""
        out = []
        for conn in self.endpoint.connections:
            peer = conn.peer
            address = validated_peer_address(conn)
            if conn.is_ready and peer is not None and peer.kind == "node" and address:
                out.append((peer.name, address))
        return out

    async def close(self) -> None:
        """Close every control connection, the TCP listener and the socket."""
        if self.tcp is not None:
            await self.tcp.close()
            self.tcp = None
        await self.endpoint.close("TRS shutting down")


async def answer_request(
    service: RelayingService, message: pb.Envelope, *, connection: Any
) -> pb.Envelope:
    """Answer one request of a verified control connection (framing-independent)."""
    if service.allocation is None:
        raise Unavailable("the relay is not running")
    peer = connection.peer
    if peer is None:  # the endpoint never delivers before verification
        raise Unavailable("peer not verified")
    return await service.allocation.handle(
        message,
        fqdn=peer.name,
        is_node=peer.kind == "node",
        addr=validated_peer_address(connection),
    )


def signalling_control_plane(
    pki_dir: Path,
    *,
    is_revoked: Callable[[x509.Certificate], bool] | None = None,
) -> Callable[[socket.socket, RelayingService], TrsControlPlane]:
    """The production control plane: ``trs.crt``/``trs.key`` from ``pki_dir``, and a
    ``cyphonic.session.SignallingSession`` per node connection. ``is_revoked`` (a
    ``RevocationCache.is_revoked``) refuses revoked node certificates in the handshake."""
    if not (pki_dir / "trs.crt").exists():
        raise InvalidArgument(
            f"{pki_dir / 'trs.crt'} is missing: the TRS serves nodes' control "
            "connections with it ('cyphonic-as init-pki' makes it)"
        )
    identity = load_identity(pki_dir / "trs.crt", pki_dir / "trs.key")
    trust = load_trust_store(pki_dir, is_revoked=is_revoked)

    def make(sock: socket.socket, service: RelayingService) -> TrsControlPlane:
        from cyphonic.session import SignallingSession

        async def handle(message: pb.Envelope, session: Any) -> pb.Envelope | None:
            # A raised CyphonicError becomes the typed Error answer in the session.
            return await answer_request(service, message, connection=session.connection)

        return TrsControlPlane.open(
            sock=sock,
            service=service,
            identity=identity,
            trust=trust,
            handler_factory=SignallingSession.factory(handle),
        )

    get_logger("trs.control").debug("control_plane_configured", pki_dir=str(pki_dir))
    return make
