"""QUIC signalling of the AS: Login and Renew on mutual-TLS connections from nodes.

    node                                   AS (ALPN cyphonic-sig/1, UDP 443)
      | QUIC handshake, client cert = node cert; the endpoint verifies it (node CA, expiry)
      | LoginRequest        ------------->  registry: known serial, same bytes, not revoked,
      |                     <-------------  LoginResponse {fqdn, NMS endpoints, not_after}
      |                                     or Error {UNAUTHENTICATED|REVOKED|EXPIRED|...}
      | RenewRequest {CSR}  ------------->  same checks, CSR names the same FQDN
      |                     <-------------  RenewResponse {new chain}

``answer`` decides one request for a TLS-verified peer; it knows nothing of streams or
sockets. ``start_signalling`` puts it behind the QUIC endpoint, in a ``SignallingSession``
per connection (which maps refusals to typed ``Error`` answers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import UnexpectedMessage
from cyphonic.hostport import format_host_port
from cyphonic.log import get_logger
from cyphonic.pki import PeerIdentity, load_identity, load_trust_store
from cyphonic.revocation import RegistryRevocations, RevocationCache
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import wrap

from cyphonic_auth.config import AuthSettings
from cyphonic_auth.service import AuthService
from cyphonic_auth.storage import SqlNodeRegistry

if TYPE_CHECKING:
    from cyphonic.quic import QuicEndpoint
    from cyphonic.session import SignallingSession

# Nodes log in, maybe renew, then leave; an idle connection is not kept long.
IDLE_TIMEOUT_S = 60.0


async def answer(service: AuthService, peer: PeerIdentity, request: pb.Envelope) -> pb.Envelope:
    """The answer to one request from ``peer``; raises a ``CyphonicError`` to refuse.

    The signalling session turns a raised error into the typed ``Error`` answer (and any
    other exception into INTERNAL), as for every service.
    """
    body = request.WhichOneof("body")
    if body == "login_request":
        return wrap(await service.login(peer))
    if body == "renew_request":
        return wrap(await service.renew(peer, request.renew_request.csr_der))
    raise UnexpectedMessage(f"the AS does not answer {body or 'an empty envelope'}")


class SignallingServer(Protocol):
    """A running QUIC signalling endpoint."""

    @property
    def address(self) -> str:
        """Where it listens, host:port."""
        ...

    async def close(self) -> None:
        """Stop accepting and close every connection."""
        ...


class AsSignallingServer:
    """The AS QUIC endpoint: only nodes (node CA chains) are accepted."""

    def __init__(self, service: AuthService) -> None:
        self.service = service
        self.endpoint: QuicEndpoint | None = None
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

    async def open(self, settings: AuthSettings) -> None:
        """Load the AS certificate and the trust store (revoked node certificates refused in
        the handshake), bind the UDP socket."""
        # Imported here so that request handling stays usable without the QUIC stack.
        from cyphonic.quic import Acceptor, QuicEndpoint
        from cyphonic.session import SignallingSession

        identity = load_identity(settings.pki_dir / "as.crt", settings.pki_dir / "as.key")
        node_ca = load_trust_store(settings.pki_dir).node_ca
        registry = self.service.registry
        source = (
            RegistryRevocations(registry.engine)
            if isinstance(registry, SqlNodeRegistry)
            else RegistryRevocations.from_url(settings.database_url)
        )
        self.revocations = RevocationCache(
            source, issuer=node_ca, interval=settings.revocation_refresh_s
        )
        await self.revocations.start()
        self.service.revocations = self.revocations
        trust = load_trust_store(settings.pki_dir, is_revoked=self.revocations.is_revoked)
        factory = SignallingSession.factory(self._handle)
        self.endpoint = await QuicEndpoint.open(
            host=settings.quic_host,
            port=settings.quic_port,
            identity=identity,
            trust=trust,
            accept={ALPN_SIGNALLING: Acceptor(handler_factory=factory, expect="node")},
            idle_timeout=IDLE_TIMEOUT_S,
        )

    async def _handle(self, message: pb.Envelope, session: SignallingSession) -> pb.Envelope | None:
        # Errors raised here become typed Error answers in the session.
        return await answer(self.service, session.peer, message)

    async def close(self) -> None:
        """Close every connection and the socket."""
        if self.endpoint is not None:
            await self.endpoint.close("AS shutting down")
            self.endpoint = None
        if self.revocations is not None:
            if self.service.revocations is self.revocations:
                self.service.revocations = None
            await self.revocations.close()
            self.revocations = None


async def start_signalling(service: AuthService, settings: AuthSettings) -> AsSignallingServer:
    """Start the AS QUIC endpoint on ``settings.quic_host``:``quic_port``."""
    server = AsSignallingServer(service)
    await server.open(settings)
    get_logger("as.signalling").info("quic_listening", address=server.address)
    return server
