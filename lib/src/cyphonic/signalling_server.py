"""The QUIC signalling endpoint every service runs (the AS and the NMS; the TRS serves its
control connections on its relaying socket, see ``cyphonic_trs.control``).

    node ──QUIC, ALPN cyphonic-sig/1, mutual TLS──> SignallingServer
      the handshake refuses certificates outside the node CA, expired or revoked ones
      (a ``RevocationCache`` the server keeps fresh); each verified connection gets a
      ``cyphonic.session.SignallingSession`` whose requests go to ``handle``

A service subclasses it, names its certificate and implements ``handle`` (and, if it
tracks connections, ``opened``/``lost``); ``handle`` raises a ``CyphonicError`` to refuse,
which the session turns into the typed ``Error`` answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from cyphonic.config import ALPN_SIGNALLING, QUIC_MAX_HANDSHAKES, QUIC_RETRY_THRESHOLD
from cyphonic.errors import CyphonicError
from cyphonic.hostport import format_host_port
from cyphonic.log import get_logger
from cyphonic.pki import load_identity, load_trust_store
from cyphonic.revocation import RevocationCache, RevocationSource
from cyphonic.v1 import signalling_pb2 as pb

if TYPE_CHECKING:
    from cyphonic.quic import QuicEndpoint
    from cyphonic.quic.tcp_transport import TcpListener
    from cyphonic.quic.tickets import TicketKeys
    from cyphonic.session import SignallingSession


class SignallingServer:
    """A service's QUIC signalling endpoint (see the module docstring)."""

    service_name: ClassVar[str] = "service"
    """``as``, ``nms``: names the certificate (``<name>.crt``) and the close reason."""

    def __init__(self) -> None:
        self.endpoint: QuicEndpoint | None = None
        self.tcp: TcpListener | None = None
        """TLS on TCP at the UDP port's number (docs/tcp-transport.md), if it could bind."""
        self.revocations: RevocationCache | None = None

    @property
    def address(self) -> str:
        """host:port of the UDP socket."""
        assert self.endpoint is not None
        return format_host_port(*self.endpoint.local_address)

    @property
    def port(self) -> int:
        """The UDP port bound."""
        assert self.endpoint is not None
        return int(self.endpoint.local_address[1])

    async def open(
        self,
        *,
        pki_dir: Path,
        host: str,
        port: int,
        revocation_source: RevocationSource,
        revocation_interval: float,
        idle_timeout: float,
        retry_threshold: int | None = QUIC_RETRY_THRESHOLD,
        max_handshakes: int = QUIC_MAX_HANDSHAKES,
        ticket_keys: TicketKeys | None = None,
    ) -> None:
        """Load ``<service_name>.crt`` and the trust store (revoked node certificates refused
        in the handshake), bind the UDP socket, accept nodes. From ``retry_threshold``
        handshakes under way, new clients must prove their address with a QUIC Retry; beyond
        ``max_handshakes`` with the ``backlog`` they are refused with a retry-after; only
        clients that ask for this service's name (SNI) are served. ``ticket_keys``: TLS
        session tickets shared by the replicas (reconnecting nodes resume)."""
        # Imported here so that request handling stays usable without the QUIC stack.
        from cyphonic.quic import Acceptor, QuicEndpoint
        from cyphonic.quic.tcp_transport import start_tcp_listener
        from cyphonic.session import SignallingSession

        name = self.service_name
        identity = load_identity(pki_dir / f"{name}.crt", pki_dir / f"{name}.key")
        self.revocations = RevocationCache(
            revocation_source,
            issuer=load_trust_store(pki_dir).node_ca,
            interval=revocation_interval,
        )
        await self.revocations.start()
        trust = load_trust_store(pki_dir, is_revoked=self.revocations.is_revoked)
        factory = SignallingSession.factory(self.handle, on_open=self.opened, on_lost=self.lost)
        self.endpoint = await QuicEndpoint.open(
            host=host,
            port=port,
            identity=identity,
            trust=trust,
            accept={ALPN_SIGNALLING: Acceptor(handler_factory=factory, expect="node")},
            idle_timeout=idle_timeout,
            retry_threshold=retry_threshold,
            max_handshakes=max_handshakes,
            ticket_keys=ticket_keys,
            ack_at_once=True,  # an idle node's PING: one wake-up here, not two
        )
        self.endpoint.backlog = self.backlog
        self.tcp = await start_tcp_listener(self.endpoint, identity, host=host)

    async def handle(self, message: pb.Envelope, session: SignallingSession) -> pb.Envelope | None:
        """The answer to one request of a verified node connection."""
        raise NotImplementedError

    def backlog(self) -> int:
        """Requests of verified connections still in progress that bound new handshakes
        with the ones under way (``QuicEndpoint.backlog``); none by default."""
        return 0

    def opened(self, session: SignallingSession) -> None:
        """A node connection was verified (before any of its requests is handled)."""

    def lost(self, session: SignallingSession, error: CyphonicError | None) -> None:
        """A node connection closed."""

    async def close(self) -> None:
        """Close every connection and the socket, stop refreshing revocations."""
        if self.tcp is not None:
            await self.tcp.close()
            self.tcp = None
        if self.endpoint is not None:
            await self.endpoint.close(f"{self.service_name.upper()} shutting down")
            get_logger(self.service_name).info("endpoint_stats", **vars(self.endpoint.stats))
            self.endpoint = None
        if self.revocations is not None:
            await self.revocations.close()
            self.revocations = None
