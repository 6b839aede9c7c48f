"""qh3 (an aioquic fork with a native Rust packet core) behind the endpoint's engine interface.

Optional: installed with the shared library's ``qh3`` extra and chosen with
``CYPHONIC_QUIC_ENGINE=qh3`` (``QuicEndpoint.open(engine="qh3")``). Packet building,
parsing, loss recovery and congestion control run in native code, about ten times less
CPU per tunnel packet than aioquic's Python (docs/performance.md). TLS 1.3 stays in
Python (``qh3.tls.Context``), which is what lets the project keep its mutual TLS:

* qh3's server never requests a client certificate: it sends no CertificateRequest,
  accepts nothing but the client's Finished, and computes that Finished in advance.
  ``_VerifyingContext`` adds client authentication inside the handshake: while
  ``_server_handle_hello`` builds the server flight, a hook on the key schedule's
  transcript writes a CertificateRequest right after EncryptedExtensions (hashed in
  order) and leaves the anticipated client Finished out of the transcript. Two extra
  states then take the client's Certificate (an empty one is refused) and
  CertificateVerify (signature checked over the transcript, then the chain checked by
  ``cyphonic.pki.verify_peer``), and only then is the client's Finished expected. The
  client's 1-RTT key is installed by qh3 only after that Finished, so, as with aioquic,
  no application data of a refused client is ever decrypted.
* The client side verifies the server's chain the same way, after qh3 has checked the
  CertificateVerify signature (``verify_mode`` is CERT_NONE so qh3's own store is unused).
* A refusal raises a TLS alert, which qh3 turns into CONNECTION_CLOSE with
  CRYPTO_ERROR + alert and the reason phrase, exactly as aioquic does.
* Session resumption (``cyphonic.quic.tickets``, docs/scaling.md): a server with ticket
  keys issues its NewSessionTicket after the client's Finished (qh3 issues it in its first
  flight, before the client is authenticated, from a transcript our hook changes), sealing
  the verified peer into it. A resumed hello gets qh3's own flight (no CertificateRequest,
  RFC 8446 4.3.2) and the ticket's identity is re-checked by ``resume_verifier``; a client
  re-verifies the server chain it kept with the ticket. Tickets that cannot be opened mean
  a full handshake. No early data either way.

Relay-chosen connection IDs (the TRS): the first host CID and a client's first Destination
CID are set before the native core is made (``host_cid`` and the original destination CID,
which the wrapper hands to the core), so a relayed connection opens and runs on the TRS's
CIDs exactly as on aioquic. The core draws its spare CIDs (NEW_CONNECTION_ID) itself, at
random, and has no hook for that; a relayed connection therefore never switches CIDs on
either engine (``engine`` module docstring), and the peer's copies of those spares stay
unused. ``host_cids`` lists the first CID and the spares the core issued.

Two fixes to qh3's Python wrapper, both tested:

* First flight from an aioquic client: aioquic pads its client Initial by appending zero
  bytes after the packet (RFC 9000 section 14.1 allows it) rather than PADDING frames
  inside it. The wrapper hands the core each packet of a datagram separately, so the core
  counted 533 received bytes, not 1,452, and its anti-amplification budget (3x) was too
  small for the server's flight: the packet builder raised "capacity exhausted" and the
  handshake waited for the client's retransmission (about a second). Here a datagram's
  trailing bytes that are no packet go to the core with the packet before them, so the core
  counts the whole datagram; and a builder that runs out of budget before the handshake
  completes just stops for this pass (the next client datagram raises the budget).
* After the handshake, received datagrams go to the native core whole (short headers end
  at the end of the datagram; all keys are installed), and ``datagrams_to_send`` polls the
  core directly: the wrapper parses every received and sent packet's header for its qlog
  logger even when there is none (1-1.7 us a packet). Both are used only while no
  ``quic_logger`` is configured (the endpoint never configures one).

Two fixes to qh3's native core, from the wrapper (docs/pki-and-quic.md, "Returning
addresses"), both tested on real sockets:

* A peer address the core has seen before is never followed again (its path table keeps
  every address, and only a new one is probed): ``_ReturningAddresses`` hands the core such
  an address as a new one (an IPv6 flowinfo epoch) when the peer comes back to it, so the
  core validates it with PATH_CHALLENGE and then switches, as for any new address.
* On a path change to another IP the core takes the old path's packets out of its probe
  timeout, so stream data lost there waits for later acknowledgements that an idle
  connection never produces: a PING on the new path after each change provides one.

Events come out as aioquic's event classes, so handlers and the signalling layer do not
care which engine carries a connection. The code depends on qh3 internals (TLS state
names, ``_server_handle_hello``'s message order), hence the exact version pin.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aioquic.buffer import size_uint_var
from aioquic.quic import events as aq
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from qh3 import tls as qtls
from qh3._hazmat import Buffer as QBuffer
from qh3._hazmat import Certificate as QCertificate
from qh3._hazmat import SignatureError, pull_quic_header, verify_with_public_key
from qh3.quic import events as qe
from qh3.quic.configuration import QuicConfiguration as Qh3Configuration
from qh3.quic.connection import QuicConnection as Qh3Connection
from qh3.quic.connection import QuicConnectionError
from qh3.quic.connection import QuicConnectionState as Qh3State
from qh3.quic.packet import (
    QuicErrorCode,
    QuicPacketType,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)

from cyphonic.errors import CyphonicError, Expired, TokenInvalid, Unauthenticated
from cyphonic.pki import CertifiedKey, PeerIdentity
from cyphonic.quic import engine
from cyphonic.quic.tickets import MAX_LIFETIME, TicketKeys, TicketState

ENGINE_NAME = "qh3"

# qh3 warns on the "quic" logger about every close by the peer; our own logs say more.
logging.getLogger("quic").setLevel(max(logging.getLogger("quic").level, logging.ERROR))

# Private TLS states (qh3's own go up to 10).
_SERVER_EXPECT_CERTIFICATE = 0x100
_SERVER_EXPECT_CERTIFICATE_VERIFY = 0x101
_CUSTOM_STATES = (_SERVER_EXPECT_CERTIFICATE, _SERVER_EXPECT_CERTIFICATE_VERIFY)

# Signature schemes a TLS 1.3 client may use in CertificateVerify (no PKCS#1 v1.5, no SHA-1).
_CLIENT_SIGNATURE_ALGORITHMS = (
    qtls.SignatureAlgorithm.ECDSA_SECP256R1_SHA256,
    qtls.SignatureAlgorithm.ECDSA_SECP384R1_SHA384,
    qtls.SignatureAlgorithm.RSA_PSS_RSAE_SHA256,
    qtls.SignatureAlgorithm.RSA_PSS_RSAE_SHA384,
    qtls.SignatureAlgorithm.RSA_PSS_RSAE_SHA512,
)


def _certificate_request() -> bytes:
    """A TLS 1.3 CertificateRequest: empty context, signature_algorithms extension."""
    schemes = b"".join(int(a).to_bytes(2, "big") for a in _CLIENT_SIGNATURE_ALGORITHMS)
    extension = (
        int(qtls.ExtensionType.SIGNATURE_ALGORITHMS).to_bytes(2, "big")
        + (len(schemes) + 2).to_bytes(2, "big")
        + len(schemes).to_bytes(2, "big")
        + schemes
    )
    body = b"\x00" + len(extension).to_bytes(2, "big") + extension
    return bytes([qtls.HandshakeType.CERTIFICATE_REQUEST]) + len(body).to_bytes(3, "big") + body


_CERTIFICATE_REQUEST = _certificate_request()


class _AlertCertificateRevoked(qtls.Alert):
    description = qtls.AlertDescription.certificate_revoked


class _AlertAccessDenied(qtls.Alert):
    description = qtls.AlertDescription.access_denied


class _AlertCertificateRequired(qtls.Alert):
    description = qtls.AlertDescription.certificate_required


def _alert_for(exc: CyphonicError, *, missing: bool) -> qtls.Alert:
    # The same codes as engine._alert_for, as qh3's alert classes.
    alert = engine._alert_for(exc, missing=missing)
    classes: dict[int, type[qtls.Alert]] = {
        qtls.AlertDescription.certificate_expired: qtls.AlertCertificateExpired,
        qtls.AlertDescription.certificate_revoked: _AlertCertificateRevoked,
        qtls.AlertDescription.access_denied: _AlertAccessDenied,
        qtls.AlertDescription.certificate_required: _AlertCertificateRequired,
    }
    cls = classes.get(int(alert.description), qtls.AlertBadCertificate)
    return cls(exc.message)


def _utc(timestamp: float) -> datetime.datetime:
    # qh3 compares ticket times with naive UTC.
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).replace(tzinfo=None)


def _to_x509(cert: QCertificate) -> x509.Certificate:
    return x509.load_der_x509_certificate(cert.public_bytes())


class _VerifyingContext(qtls.Context):
    """qh3's TLS context plus client authentication (server) and chain checks (both)."""

    peer_verifier: engine.PeerVerifier
    peer_identity: PeerIdentity | None
    verification_error: CyphonicError | None
    client_server_name: str | None = None
    """Server side: the SNI of the client's hello (checked by the endpoint's verifier)."""
    verified_chain: list[x509.Certificate] | None = None
    """The peer's chain as verified (a client keeps it with its ticket)."""
    ticket_keys: TicketKeys | None = None
    """Server side: seal and open session tickets (None: no resumption)."""
    resume_verifier: engine.ResumeVerifier | None = None
    """Server side: the identity of a ticket, re-checked at resumption."""
    ticket_refused: CyphonicError | None = None
    """Server side: why an offered ticket was not used (a full handshake followed)."""
    resume_chain: list[x509.Certificate] | None = None
    """Client side: the server chain verified when the offered ticket was issued."""
    _cy_ticket_state: TicketState | None = None
    _cy_hello_buf: QBuffer | None

    # key_schedule is created inside _server_handle_hello; a property sees it being set
    # so the transcript hook can be attached before the first server message is hashed.
    @property
    def key_schedule(self) -> Any:
        return self.__dict__.get("_cy_key_schedule")

    @key_schedule.setter
    def key_schedule(self, value: Any) -> None:
        self.__dict__["_cy_key_schedule"] = value
        if value is not None and self.__dict__.get("_cy_hello_buf") is not None:
            value.update_hash = self._transcript_hook(value)

    def _transcript_hook(self, schedule: Any) -> Callable[[bytes], None]:
        original = schedule.update_hash
        hello_buf = self._cy_hello_buf
        injected = False

        def update_hash(data: bytes) -> None:
            nonlocal injected
            if self._session_resumed:
                # PSK: no client certificate (RFC 8446 4.3.2), qh3's own flight as it is.
                original(data)
                return
            kind = data[0] if data else -1
            if kind == qtls.HandshakeType.FINISHED and schedule.generation == 3:
                return  # qh3's anticipated client Finished: the client's flight comes first
            original(data)
            if kind == qtls.HandshakeType.ENCRYPTED_EXTENSIONS and not injected:
                injected = True
                assert hello_buf is not None
                hello_buf.push_bytes(_CERTIFICATE_REQUEST)
                original(_CERTIFICATE_REQUEST)

        return update_hash

    def _verify(self, chain: list[x509.Certificate], *, missing: bool) -> None:
        self._checked(lambda: self.peer_verifier(chain, self.alpn_negotiated), missing=missing)
        self.verified_chain = chain

    def _checked(self, check: Callable[[], PeerIdentity], *, missing: bool) -> None:
        try:
            self.peer_identity = check()
        except CyphonicError as exc:
            self.verification_error = exc
            raise _alert_for(exc, missing=missing) from exc
        except Exception as exc:  # a verifier bug must still refuse, never accept
            self.verification_error = Unauthenticated(f"certificate check failed: {exc!r}")
            raise qtls.AlertBadCertificate("certificate check failed") from exc

    def _peer_chain(self) -> list[x509.Certificate]:
        leaf = self._peer_certificate
        assert leaf is not None
        return [_to_x509(c) for c in [leaf, *self._peer_certificate_chain]]

    # -- server: request and check the client's certificate

    def _server_handle_hello(
        self,
        input_buf: QBuffer,
        initial_buf: QBuffer,
        handshake_buf: QBuffer,
        onertt_buf: QBuffer,
    ) -> None:
        self._cy_hello_buf = handshake_buf
        self.client_server_name = engine.peek_server_name(input_buf, qtls.pull_client_hello)
        try:
            super()._server_handle_hello(input_buf, initial_buf, handshake_buf, onertt_buf)
        finally:
            self._cy_hello_buf = None
            schedule = self.key_schedule
            if schedule is not None:
                schedule.__dict__.pop("update_hash", None)
        if self._alps_negotiated:
            # Never offered here; it would change the flight the hook relies on.
            raise qtls.AlertHandshakeFailure("ALPS is not supported")
        if self._session_resumed:
            # The identity the ticket binds, re-checked now (revocation, expiry, role,
            # SNI, the acceptor's authorisation); qh3 expects the client's Finished next.
            state = self._cy_ticket_state
            resume = self.resume_verifier
            assert state is not None and resume is not None
            self._checked(lambda: resume(state, self.alpn_negotiated), missing=False)
            return
        self.state = _SERVER_EXPECT_CERTIFICATE  # type: ignore[assignment]

    def _fetch_ticket(self, label: bytes) -> qtls.SessionTicket | None:
        # A ticket that cannot be used means a full handshake, never a refusal.
        keys = self.ticket_keys
        if keys is None or self.resume_verifier is None:
            return None
        now = time.time()
        try:
            state = keys.open(label, now=now)
        except (TokenInvalid, Expired) as exc:
            self.ticket_refused = exc
            return None
        self._cy_ticket_state = state
        return qtls.SessionTicket(
            age_add=0,
            cipher_suite=qtls.CipherSuite(state.cipher_suite),
            not_valid_after=_utc(state.expires_at),
            not_valid_before=_utc(min(state.issued_at, now)),
            resumption_secret=state.resumption_secret,
            server_name=state.server_name,
            ticket=label,
        )

    def _server_handle_finished(self, input_buf: QBuffer, output_buf: QBuffer) -> None:
        super()._server_handle_finished(input_buf, output_buf)
        keys = self.ticket_keys
        if keys is None or self.peer_identity is None:
            return
        if not self._session_resumed:
            # The hook left qh3's anticipated Finished out; the client's real one closes
            # the transcript the resumption secret is derived from.
            self.key_schedule.update_hash(input_buf.data)
        lifetime = int(MAX_LIFETIME)
        ticket = qtls.NewSessionTicket(
            ticket_lifetime=lifetime,
            ticket_age_add=int.from_bytes(os.urandom(4), "big"),
            ticket_nonce=b"",
            ticket=b"",
            max_early_data_size=None,  # no 0-RTT (tickets module docstring)
        )
        secret = self._build_session_ticket(ticket, []).resumption_secret
        identity = self.peer_identity
        now = time.time()
        ticket.ticket = keys.seal(
            TicketState(
                resumption_secret=secret,
                cipher_suite=int(self.key_schedule.cipher_suite),
                kind=identity.kind,
                certificate=identity.certificate.public_bytes(serialization.Encoding.DER),
                alpn=self.alpn_negotiated or "",
                server_name=self.client_server_name or "",
                issued_at=now,
                expires_at=min(
                    now + lifetime, identity.certificate.not_valid_after_utc.timestamp()
                ),
            )
        )
        qtls.push_new_session_ticket(output_buf, ticket)

    # -- client: a resumed server presents no certificate; re-check the one it had

    def _client_handle_finished(self, input_buf: QBuffer, output_buf: QBuffer) -> None:
        if self._session_resumed and self.peer_identity is None:
            self._verify(self.resume_chain or [], missing=True)
        super()._client_handle_finished(input_buf, output_buf)

    def handle_message(
        self, input_data: bytes, output_buf: dict[qtls.Epoch, QBuffer], epoch: int = -1
    ) -> None:
        if self.state not in _CUSTOM_STATES:
            super().handle_message(input_data, output_buf, epoch=epoch)
            return
        self._receive_buffer += input_data
        while self.state in _CUSTOM_STATES and len(self._receive_buffer) >= 4:
            length = 4 + int.from_bytes(self._receive_buffer[1:4], "big")
            if len(self._receive_buffer) < length:
                return
            message = self._receive_buffer[:length]
            self._receive_buffer = self._receive_buffer[length:]
            if epoch >= 0 and epoch != qtls.Epoch.HANDSHAKE:
                raise qtls.AlertUnexpectedMessage
            buf = QBuffer(data=message)
            kind = message[0]
            if self.state == _SERVER_EXPECT_CERTIFICATE and kind == qtls.HandshakeType.CERTIFICATE:
                self._server_handle_client_certificate(buf)
            elif (
                self.state == _SERVER_EXPECT_CERTIFICATE_VERIFY
                and kind == qtls.HandshakeType.CERTIFICATE_VERIFY
            ):
                self._server_handle_client_certificate_verify(buf)
            else:
                raise qtls.AlertUnexpectedMessage
            if not buf.eof():
                raise qtls.AlertDecodeError("extra bytes at the end of a handshake message")
        if self.state not in _CUSTOM_STATES and self._receive_buffer:
            super().handle_message(b"", output_buf, epoch=epoch)

    def _server_handle_client_certificate(self, input_buf: QBuffer) -> None:
        certificate = qtls.pull_certificate(input_buf)
        self.key_schedule.update_hash(input_buf.data)
        if certificate.request_context != b"":
            raise qtls.AlertIllegalParameter("unexpected certificate request context")
        if not certificate.certificates:
            # RFC 8446 lets a client answer with no certificate; here that is a refusal.
            self._verify([], missing=True)
        self._peer_certificate = QCertificate(certificate.certificates[0][0])
        self._peer_certificate_chain = [QCertificate(c[0]) for c in certificate.certificates[1:]]
        self.state = _SERVER_EXPECT_CERTIFICATE_VERIFY  # type: ignore[assignment]

    def _server_handle_client_certificate_verify(self, input_buf: QBuffer) -> None:
        verify = qtls.pull_certificate_verify(input_buf)
        if verify.algorithm not in _CLIENT_SIGNATURE_ALGORITHMS:
            raise qtls.AlertDecryptError("CertificateVerify with a scheme we did not offer")
        assert self._peer_certificate is not None
        try:  # proof that the client holds the certificate's key
            verify_with_public_key(
                self._peer_certificate.public_key(),
                verify.algorithm,
                self.key_schedule.certificate_verify_data(b"TLS 1.3, client CertificateVerify"),
                verify.signature,
            )
        except SignatureError as exc:
            raise qtls.AlertDecryptError(str(exc)) from exc
        self.key_schedule.update_hash(input_buf.data)
        self._verify(self._peer_chain(), missing=False)
        # The client's Finished covers its Certificate and CertificateVerify.
        self._expected_verify_data = self.key_schedule.finished_verify_data(self._dec_key)
        self.state = qtls.State.SERVER_EXPECT_FINISHED

    # -- client: check the server's chain

    def _client_handle_certificate_verify(self, input_buf: QBuffer) -> None:
        super()._client_handle_certificate_verify(input_buf)  # proof of key possession
        self._verify(self._peer_chain(), missing=False)


def _translate(event: qe.QuicEvent) -> aq.QuicEvent | None:
    """The aioquic event equal to a qh3 one (handlers only know aioquic's classes)."""
    cls = type(event)
    if cls is qe.DatagramFrameReceived:
        return aq.DatagramFrameReceived(data=event.data)  # type: ignore[attr-defined]
    if cls is qe.StreamDataReceived:
        e = cast(qe.StreamDataReceived, event)
        return aq.StreamDataReceived(data=e.data, end_stream=e.end_stream, stream_id=e.stream_id)
    if cls is qe.ConnectionIdIssued:
        return aq.ConnectionIdIssued(connection_id=event.connection_id)  # type: ignore[attr-defined]
    if cls is qe.ConnectionIdRetired:
        return aq.ConnectionIdRetired(connection_id=event.connection_id)  # type: ignore[attr-defined]
    if cls is qe.HandshakeCompleted:
        h = cast(qe.HandshakeCompleted, event)
        return aq.HandshakeCompleted(
            alpn_protocol=h.alpn_protocol,
            early_data_accepted=h.early_data_accepted,
            session_resumed=h.session_resumed,
        )
    if cls is qe.ConnectionTerminated:
        return _terminated(cast(qe.ConnectionTerminated, event))
    if cls is qe.StreamReset:
        r = cast(qe.StreamReset, event)
        return aq.StreamReset(error_code=r.error_code, stream_id=r.stream_id)
    if cls is qe.StopSendingReceived:
        s = cast(qe.StopSendingReceived, event)
        return aq.StopSendingReceived(error_code=s.error_code, stream_id=s.stream_id)
    if cls is qe.PingAcknowledged:
        return aq.PingAcknowledged(uid=event.uid)  # type: ignore[attr-defined]
    if cls is qe.ProtocolNegotiated:
        return aq.ProtocolNegotiated(alpn_protocol=event.alpn_protocol)  # type: ignore[attr-defined]
    return None


def _terminated(event: qe.ConnectionTerminated) -> aq.ConnectionTerminated:
    return aq.ConnectionTerminated(
        error_code=event.error_code, frame_type=event.frame_type, reason_phrase=event.reason_phrase
    )


class Qh3QuicConnection(Qh3Connection):
    """A qh3 connection with mutual TLS and the read-only views the endpoint uses.

    Same surface as ``engine.CyphonicQuicConnection`` (events are aioquic's classes).
    """

    engine_name = ENGINE_NAME

    def __init__(
        self,
        *,
        configuration: Qh3Configuration,
        peer_verifier: engine.PeerVerifier,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
        connection_id_factory: engine.ConnectionIdFactory | None = None,
        initial_destination_cid: bytes | None = None,
        ticket_keys: TicketKeys | None = None,
        resume_verifier: engine.ResumeVerifier | None = None,
        ticket_handler: engine.TicketHandler | None = None,
        resume_chain: list[x509.Certificate] | None = None,
        ack_at_once: bool = False,
    ) -> None:
        """Server: ``ticket_keys`` and ``resume_verifier`` issue and accept session tickets.
        Client: ``ticket_handler`` takes the tickets the server issues; the configuration's
        ``session_ticket`` is offered, ``resume_chain`` the server chain verified with it.
        ``ack_at_once``: acknowledge in the pass that received (see ``datagrams_to_send``)."""
        self._peer_verifier = peer_verifier
        self._ack_at_once = ack_at_once
        self._ticket_keys = ticket_keys
        self._resume_verifier = resume_verifier
        self._resume_chain = resume_chain
        self._datagrams_queued = 0
        self._paths = _ReturningAddresses(None)
        self._terminated_event: aq.ConnectionTerminated | None = None
        self._path_size: int | None = None
        """The core's datagram limit once the handshake is done (reading it costs ~4 us);
        forgotten when the path changes."""
        handler: Callable[[qtls.SessionTicket], None] | None = None
        if ticket_handler is not None:

            def handler(ticket: qtls.SessionTicket) -> None:
                chain = getattr(self.tls, "verified_chain", None) or self._resume_chain
                if chain:
                    ticket_handler(ticket, chain)

        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
            session_ticket_handler=handler,
        )
        self.relayed = connection_id_factory is not None or initial_destination_cid is not None
        """Made with relay-chosen CIDs: keeps its Destination CID (module docstring)."""
        if connection_id_factory is not None:
            # Read by the wrapper when it makes the core (connect / first Initial).
            self.host_cid = engine.factory_cid(
                connection_id_factory, 0, configuration.connection_id_length
            )
        if initial_destination_cid is not None:
            engine.check_initial_destination_cid(
                initial_destination_cid, is_client=configuration.is_client
            )
            self._original_destination_connection_id = initial_destination_cid
        self._host_cids = [self.host_cid]

    def _create_core(self, remote_addr: Any, initial_dcid: bytes, now: float) -> None:
        super()._create_core(remote_addr, initial_dcid, now)
        self._paths = _ReturningAddresses(remote_addr)  # a new core knows one path

    def _create_tls(self, remote_source_cid: bytes | None) -> Any:
        bridge = super()._create_tls(remote_source_cid)
        context = cast(Any, bridge.tls)
        context.__class__ = _VerifyingContext
        # key_schedule is a property of the subclass from now on.
        context.__dict__["_cy_key_schedule"] = context.__dict__.pop("key_schedule", None)
        context._cy_hello_buf = None
        context.peer_verifier = self._peer_verifier
        context.peer_identity = None
        context.verification_error = None
        context.resume_chain = self._resume_chain
        if self._configuration.is_client and self._configuration.session_ticket is not None:
            # A ticket (a node certificate inside) and the ML-KEM share together overflow
            # qh3's 2 KB hello buffer. The resumed keys mix the PSK, itself from a hybrid
            # post-quantum exchange, with a fresh X25519 exchange (docs/scaling.md).
            context._supported_groups = [
                g for g in context._supported_groups if g != qtls.Group.X25519ML768
            ]
        if self._ticket_keys is not None and self._resume_verifier is not None:
            context.ticket_keys = self._ticket_keys
            context.resume_verifier = self._resume_verifier
            context.get_session_ticket_cb = context._fetch_ticket
        limit = getattr(self._configuration, "max_udp_payload_size", None)
        if limit is not None:
            _advertise_max_udp_payload(bridge, limit)
        return bridge

    def next_event(self) -> Any:
        events: Any = self._events  # qh3's events, and aioquic DATAGRAM events (below)
        while events:
            event = events.popleft()
            if type(event) is aq.DatagramFrameReceived:  # made so by _drain_core
                return event
            translated = _translate(event)
            if translated is not None:
                kind = type(translated)
                if kind is aq.ConnectionIdIssued:
                    self._host_cids.append(translated.connection_id)  # type: ignore[attr-defined]
                elif kind is aq.ConnectionIdRetired:
                    cid = translated.connection_id  # type: ignore[attr-defined]
                    if cid in self._host_cids:
                        self._host_cids.remove(cid)
                return translated
        return None

    def _drain_core(self) -> None:
        """The wrapper's event drain, with DATAGRAM frames (the tunnel's packets) taken
        straight to aioquic's event class; every other native event goes through the
        wrapper's own handling, one at a time, in order."""
        core = self._core
        if core is None:
            return
        append = cast(Any, self._events).append
        datagram = aq.DatagramFrameReceived
        next_native = core.next_event
        while (native := next_native()) is not None:
            kind = native[0]
            if kind == "datagram":
                append(datagram(data=native[1]))
                continue
            if kind == "peer_migration":
                self._paths.probing_started()
                self._path_size = None
            elif kind == "path_validated":
                self._path_size = None
                if self._paths.active_changed(core.active_path[2]):
                    # Packets sent on the old path are out of qh3's PTO (module
                    # docstring): one ack-eliciting packet on the new path lets loss
                    # detection find them once the peer acknowledges it.
                    with contextlib.suppress(RuntimeError):  # closing: nothing to resend
                        core.send_ping(_PATH_CHANGE_PING)
            elif kind == "ping_acknowledged" and native[1] == _PATH_CHANGE_PING:
                continue
            self._core = cast(Any, _OneEvent(core, native))
            try:
                super()._drain_core()
            finally:
                if self._core is not None and type(self._core) is _OneEvent:
                    self._core = core

    def change_connection_id(self) -> None:
        """Switch to the peer's next CID, except on a relayed connection (module docstring)."""
        if not self.relayed:
            super().change_connection_id()

    # -- receive: whole datagrams to the core after the handshake; padded Initials counted

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        core = self._core
        if core is not None:
            addr = self._paths.core_address(addr, now, core.smoothed_rtt)
        if core is not None and self._handshake_complete and self._quic_logger is None:
            try:
                core.receive_datagram(data, addr, now, len(data))
            except RuntimeError as exc:  # as the wrapper's _call_core maps it
                raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
            self._drain_core()
            return
        ends = _packet_ends(data, self._configuration.connection_id_length)
        if ends is None or self._is_client:
            # Every byte is in a packet (or it is not QUIC): the wrapper counts it right.
            # A client has no anti-amplification budget to get wrong.
            super().receive_datagram(data, addr, now)
            return
        self._receive_padded(data, addr, now, ends)

    def _receive_padded(self, data: bytes, addr: Any, now: float, ends: list[int]) -> None:
        """The wrapper's server receive, with trailing padding counted (module docstring)."""
        cid_length = self._configuration.connection_id_length
        if self._core is None:
            if len(data) < 1200:
                return
            header = pull_quic_header(data, 0, cid_length)
            if header[1] != int(QuicPacketType.INITIAL):
                return
            if header[0] not in self._configuration.supported_versions:
                return
            self._remote_addr = addr
            self._version = header[0]
            self._create_core(addr, header[3], now)
            self._create_tls(remote_source_cid=None)
        core = self._require_core()
        start = 0
        for end in ends:
            packet = data[start:end]
            report = self._call_core(core.receive_datagram, packet, addr, now, len(data))
            if report[2]:
                self._learn_remote_source_cid(packet)
            self._drain_core()
            start = end

    def receive_many(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        """Datagrams from one address, in order, fed to the core in one call."""
        core = self._core
        if core is not None and self._handshake_complete and self._quic_logger is None:
            addr = self._paths.core_address(addr, now, core.smoothed_rtt)
            self._call_core(core.receive_many_datagrams, datagrams, addr, now)
            self._drain_core()
            return
        for data in datagrams:
            self.receive_datagram(data, addr, now)

    def receive_gro(self, buffer: bytes, segment_size: int, addr: Any, now: float) -> None:
        """A UDP GRO buffer (``segment_size``-byte datagrams, the last may be shorter)."""
        core = self._core
        if core is not None and self._handshake_complete and self._quic_logger is None:
            addr = self._paths.core_address(addr, now, core.smoothed_rtt)
            self._call_core(core.receive_gro_buffer, buffer, segment_size, addr, now)
            self._drain_core()
            return
        for offset in range(0, len(buffer), segment_size):
            self.receive_datagram(buffer[offset : offset + segment_size], addr, now)

    # -- send: the core polled directly (no header parsing for a logger that is not there)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        core = self._core
        if core is None:
            return []
        if self._quic_logger is not None:
            out = super().datagrams_to_send(now)
        else:
            # A signalling service acknowledges in the pass that received: an idle node's
            # PING then costs one wake-up, not two (the receive, then the ACK timer 1 ms on).
            if (self._datagrams_queued or self._ack_at_once) and self._handshake_complete:
                self._ack_now()
            out = []
            poll = core.poll_transmit
            try:
                while (transmit := poll(now)) is not None:
                    out.append((transmit[0], transmit[1]))
            except RuntimeError as exc:
                if (
                    not self._is_client
                    and not self._handshake_complete
                    and str(exc) == _BUILDER_CAPACITY
                ):
                    # The server flight ran into the anti-amplification budget (the core
                    # raises rather than waits): what fits went out, the rest follows the
                    # client's next datagram.
                    pass
                else:
                    raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        to_real = self._paths.to_real
        if to_real:  # a path of a returning address: the socket gets the real address
            out = [(data, to_real.get(addr, addr)) for data, addr in out]
        if core.bytes_in_flight + self._configuration.max_datagram_size <= core.congestion_window:
            self._datagrams_queued = 0  # not congestion-limited: the core sent them all
        else:
            self._datagrams_queued = max(0, self._datagrams_queued - len(out))
        return out

    def _ack_now(self) -> None:
        """Make a pending acknowledgement due now, so it rides on the DATAGRAM about to be
        sent: the core puts an ACK into a packet only once its 1 ms delay has run out, so
        an echo's reply (sent 0.1-0.2 ms after the request) went without it and an
        ACK-only datagram followed 1 ms later, a timer wake-up on this side and a receive
        wake-up on the peer's for every exchange. Only when the ACK deadline is the
        earliest timer (nothing else is due before it, so firing the timers at that
        deadline fires only the ACK's), as the wrapper's ``handle_timer`` does it."""
        core = self._require_core()
        timer = core.get_timer()
        if timer is not None and timer[0] == _ACK_TIMER:
            self._call_core(core.handle_timer, timer[1])
            self._drain_core()

    def send_datagram_frame(self, data: bytes) -> None:
        core = self._core
        if core is None:
            super().send_datagram_frame(data)  # raises as the wrapper does
        else:
            try:  # the wrapper's three Python calls per packet, folded
                core.send_datagram(data)
            except RuntimeError as exc:
                raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        self._datagrams_queued += 1

    def get_peer_address(self) -> Any:
        """The current peer address (aioquic's name for it)."""
        if self._core is not None:
            # active_path: (id, local address, remote address, ...)
            return self._paths.real_address(self._core.active_path[2])
        return self._remote_addr

    # -- the read-only views of engine.CyphonicQuicConnection

    @property
    def peer_identity(self) -> PeerIdentity | None:
        """The verified peer, once its CertificateVerify has been checked."""
        return cast(PeerIdentity | None, getattr(self.tls, "peer_identity", None))

    @property
    def verification_error(self) -> CyphonicError | None:
        """Why this side refused the peer's certificate, if it did."""
        return cast(CyphonicError | None, getattr(self.tls, "verification_error", None))

    @property
    def client_server_name(self) -> str | None:
        """Server side: the name the client asked for (TLS SNI), lower-cased, or None."""
        return cast(str | None, getattr(self.tls, "client_server_name", None))

    @property
    def handshake_complete(self) -> bool:
        """True once this side's TLS handshake has completed."""
        return bool(self._handshake_complete)

    @property
    def handshake_confirmed(self) -> bool:
        """True once the peer has accepted this side too (client: HANDSHAKE_DONE seen)."""
        return bool(self._handshake_confirmed)

    @property
    def close_event(self) -> aq.ConnectionTerminated | None:
        """The close that is under way or done (local or remote), if any."""
        event = self._close_event
        if event is None:
            return None
        cached = self._terminated_event
        if (
            cached is None
            or cached.error_code != event.error_code
            or (cached.reason_phrase != event.reason_phrase)
        ):
            cached = self._terminated_event = _terminated(event)
        return cached

    @property
    def is_terminated(self) -> bool:
        """True once the closing or draining period is over."""
        return bool(self._state == Qh3State.TERMINATED)

    @property
    def host_cids(self) -> list[bytes]:
        """Every connection ID this side currently accepts packets on."""
        return list(self._host_cids)

    @property
    def smoothed_rtt(self) -> float | None:
        """Smoothed RTT in seconds, None before the first sample."""
        return None if self._core is None else self._core.smoothed_rtt

    @property
    def remote_max_datagram_frame_size(self) -> int | None:
        """The peer's max_datagram_frame_size transport parameter (None: not known/none)."""
        return self._remote_max_datagram_frame_size

    @property
    def peer_address_validated(self) -> bool:
        """Whether QUIC has validated the current peer path (RFC 9000 section 8).

        qh3's core (2.1.0) makes a path active only once it is validated (its ``activate``
        refuses an unvalidated one; a new peer address is probed with PATH_CHALLENGE while
        the old path stays active), and the handshake validates the first path. So the
        active path is the validated one as soon as the handshake is complete.
        """
        return bool(self._handshake_complete) and self._core is not None

    @property
    def push_datagram(self) -> Callable[[bytes], None]:
        """Queue one DATAGRAM payload with no checks (the tunnel checks size and bound)."""
        return self.send_datagram_frame

    def datagrams_pending(self) -> int:
        """DATAGRAM frames queued and not yet sent (an estimate: the core keeps no count)."""
        return self._datagrams_queued

    def max_datagram_payload(self) -> int:
        """Largest DATAGRAM payload that fits one packet to this peer (0 if none allowed).

        qh3 fails every later transmit after a datagram that does not fit, so the
        endpoint and the tunnel enforce this before queueing.
        """
        remote = self._remote_max_datagram_frame_size
        if remote is None and self._handshake_complete:
            return 0
        # The core's path limit: our max_datagram_size or less where the peer's
        # max_udp_payload_size asks for less (a small access link on its side).
        size = self._path_size
        if size is None:
            core = self._core
            size = (
                core.active_path[5] if core is not None else self._configuration.max_datagram_size
            )
            if self._handshake_complete:
                self._path_size = size
        room = size - engine._SHORT_HEADER - engine.CID_LENGTH - engine._AEAD_TAG
        payload = room - 1 - size_uint_var(room)
        if remote is not None:
            payload = min(payload, remote - 1 - size_uint_var(remote))
        return max(payload, 0)


_BUILDER_CAPACITY = "packet builder capacity exhausted"
_ACK_TIMER = "ack_application"
"""The core's name for the 1-RTT acknowledgement deadline (``get_timer``)."""


def _advertise_max_udp_payload(bridge: Any, size: int) -> None:
    """Send ``max_udp_payload_size`` = ``size`` (RFC 9000 18.2) instead of qh3's fixed 1472
    (client) or nothing (server), so a peer never sends us more than our own link carries
    (the agent sets it from its link; docs/agent.md "Path MTU"). qh3 2.1.0 fails to make a
    new path (migration) on a connection whose peer asked for less than its own
    ``max_datagram_size`` ("path allocation failed"), so only a link-limited side sends it."""
    serialize = bridge.serialize_transport_parameters

    def serialized() -> bytes:
        params = pull_quic_transport_parameters(QBuffer(data=serialize()))
        params.max_udp_payload_size = size
        buf = QBuffer(capacity=16384)
        push_quic_transport_parameters(buf, params)
        return bytes(buf.data)

    bridge.serialize_transport_parameters = serialized
    bridge.tls.handshake_extensions = [(qtls.ExtensionType.QUIC_TRANSPORT_PARAMETERS, serialized())]


_PATH_CHANGE_PING = 0x4359_5048_5041_5448
"""The uid of the PING sent when the active path changes (its acknowledgement is not an
event of the connection)."""

# Returning addresses (module docstring): flowinfo values of the core-side forms. Received
# flowinfo is at most 28 bits (IPV6_FLOWINFO_MASK), so these never equal a real address.
_EPOCH_BASE = 0x8000_0000
_MAX_EPOCHS = 64
"""New core-side forms per connection; the core's own limit (4 paths, never freed) is
reached long before, so this only bounds the two maps."""
_REPROBE_AFTER = 0.3
"""Seconds (at least; ``_REPROBE_RTTS`` smoothed RTTs on a slow path) a probed path may
stay unvalidated before a datagram from its address is presented as a new path again.
qh3 sends one PATH_CHALLENGE per path and never retries it, so a lost challenge or answer
leaves the address unreachable until then. Hole punching depends on it: when the first
packet a node gets from its peer's NAT is the peer's probe (its own first probe died at
the peer's NAT), the first challenge exchange on the new path is not always answered
(seen in about 2 runs of 5 of the reachability matrix; the peer's reply lacked the
9-byte PATH_RESPONSE), and with 3 s here the 3 s punching window always ran out first.
Each retry costs one of the core's four paths, hence the RTT bound."""
_REPROBE_RTTS = 3.0


def _epoch_form(addr: Any, epoch: int) -> Any:
    """``addr`` as a distinct IPv6 socket address (flowinfo = the epoch), for the core only."""
    flowinfo = _EPOCH_BASE + epoch
    if len(addr) == 2:  # an AF_INET socket's (host, port): as IPv4-mapped IPv6
        host = str(addr[0])
        return (host if ":" in host else f"::ffff:{host}", int(addr[1]), flowinfo, 0)
    return (addr[0], int(addr[1]), flowinfo, int(addr[3]))


class _ReturningAddresses:
    """Which form of each peer address qh3's core sees (sans-I/O, no core calls).

    qh3 2.1.0's core keys its paths by address and keeps every path it has seen: a
    datagram from an address it knows is taken on that path with no PATH_CHALLENGE and
    the active path stays where it was, so a peer that moves away and comes back (or whose
    probe got lost) is never followed again. Here the address a datagram came from is
    handed to the core in a new form (an IPv6 flowinfo epoch) when the core would ignore
    it: its form was the active path and is no more ("stale"), or the core probed it more
    than ``_REPROBE_AFTER`` seconds ago without an answer. The core then treats it as any
    new address: it probes it with PATH_CHALLENGE and sends there only once the peer
    answered from it (RFC 9000 section 9). The form changes only on such a datagram and
    only once per stale form, whatever the datagram holds: a copy that fails decryption
    or is a duplicate leaves the core unchanged. Datagrams out, and the peer address
    reported, map back to the real address.
    """

    __slots__ = ("_active", "_epoch", "_feeding", "_probing", "_stale", "_to_core", "to_real")

    def __init__(self, first: Any) -> None:
        self._active = first
        """The core form of the active path's peer address."""
        self._to_core: dict[Any, Any] = {}
        """Real address -> its current core form (only where they differ)."""
        self.to_real: dict[Any, Any] = {}
        """Core form -> real address (only where they differ)."""
        self._stale: set[Any] = set()
        self._probing: dict[Any, float] = {}
        self._feeding: tuple[Any, float] | None = None
        self._epoch = 0

    def core_address(self, addr: Any, now: float, rtt: float | None = None) -> Any:
        """The form of ``addr`` to hand the core with a datagram received now (``rtt``: the
        connection's smoothed RTT, if known)."""
        form = self._to_core.get(addr, addr)
        if form != self._active and self._epoch < _MAX_EPOCHS:
            started = self._probing.get(form)
            wait = max(_REPROBE_AFTER, _REPROBE_RTTS * (rtt or 0.0))
            if form in self._stale or (started is not None and now - started > wait):
                self._stale.discard(form)
                self._probing.pop(form, None)
                self._epoch += 1
                form = _epoch_form(addr, self._epoch)
                self._to_core[addr] = form
                self.to_real[form] = addr
        self._feeding = (form, now)
        return form

    def probing_started(self) -> None:
        """The core began probing the address of the datagram it was just given."""
        if self._feeding is not None:
            form, now = self._feeding
            self._probing[form] = now

    def active_changed(self, active: Any) -> bool:
        """A path was validated; ``active`` is the core's active peer address now. True
        if the active path changed."""
        self._probing.pop(active, None)
        if active == self._active:
            return False
        if self._active is not None:
            self._stale.add(self._active)
        self._active = active
        return True

    def real_address(self, form: Any) -> Any:
        return self.to_real.get(form, form)


class _OneEvent:
    """The native core as seen by the wrapper's ``_drain_core`` for one event: that event,
    then none (so control comes back); everything else is the core's."""

    __slots__ = ("_core", "_event")

    def __init__(self, core: Any, event: tuple[Any, ...]) -> None:
        self._core = core
        self._event: tuple[Any, ...] | None = event

    def next_event(self) -> tuple[Any, ...] | None:
        event, self._event = self._event, None
        return event

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


def _packet_ends(data: bytes, cid_length: int) -> list[int] | None:
    """End offsets of the packets in a datagram, the last one stretched over trailing bytes
    that are no packet (padding); None when there are none (or the first is no packet)."""
    ends: list[int] = []
    offset, size = 0, len(data)
    while offset < size:
        try:
            end = pull_quic_header(data, offset, cid_length)[9]
        except ValueError:
            if not ends:
                return None
            ends[-1] = size
            return ends
        if end <= offset:
            return None
        ends.append(end)
        offset = end
    return None


@dataclass
class CyphonicQh3Configuration(Qh3Configuration):
    """qh3's configuration and what it lacks."""

    max_udp_payload_size: int | None = None
    """Sent as the transport parameter (RFC 9000 18.2); None: qh3's own choice."""


def make_configuration(
    *,
    is_client: bool,
    identity: CertifiedKey,
    alpn_protocols: list[str],
    idle_timeout: float,
    max_datagram_size: int = engine.DEFAULT_MAX_DATAGRAM_SIZE,
    server_name: str | None = None,
    max_udp_payload_size: int | None = None,
    session_ticket: qtls.SessionTicket | None = None,
) -> Qh3Configuration:
    """A qh3 configuration for one role: DATAGRAM on, our certificate, no built-in checks;
    a client offers ``session_ticket`` (resumption)."""
    config = CyphonicQh3Configuration(
        session_ticket=session_ticket,
        max_udp_payload_size=max_udp_payload_size,
        is_client=is_client,
        alpn_protocols=alpn_protocols,
        idle_timeout=idle_timeout,
        max_datagram_frame_size=engine.MAX_DATAGRAM_FRAME_SIZE,
        max_datagram_size=max_datagram_size,
        # The TUN MTU is chosen from max_datagram_size; probing past it would let the
        # core build packets the path (or the tunnel's MTU arithmetic) does not expect.
        probe_datagram_size=False,
        connection_id_length=engine.CID_LENGTH,
        server_name=server_name,
        verify_mode=ssl.CERT_NONE,  # chains are checked by _VerifyingContext
    )
    config.load_cert_chain(_pem_chain(identity), _pem_key(identity))
    return config


_PEM_CACHE: dict[int, tuple[CertifiedKey, bytes, bytes]] = {}


def _pem(identity: CertifiedKey) -> tuple[bytes, bytes]:
    cached = _PEM_CACHE.get(id(identity))
    if cached is None or cached[0] is not identity:
        certs = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in [identity.cert, *identity.chain]
        )
        key = identity.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cached = _PEM_CACHE[id(identity)] = (identity, certs, key)
    return cached[1], cached[2]


def _pem_chain(identity: CertifiedKey) -> bytes:
    return _pem(identity)[0]


def _pem_key(identity: CertifiedKey) -> bytes:
    return _pem(identity)[1]
