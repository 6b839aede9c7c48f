"""Everything specific to aioquic 1.7.2 (the engine the project was specified with, selected
with ``CYPHONIC_QUIC_ENGINE=aioquic``) lives here, and the engine-neutral helpers both
engines share; qh3, the default engine, is in ``engine_qh3`` behind the same surface.

Two things aioquic does not do on its own, added without forking it:

* Mutual TLS. Its server requests no client certificate unless ``tls.Context``'s private
  ``_request_client_certificate`` is set, accepts an empty Certificate message, and checks
  no chain on either side once ``verify_mode`` is CERT_NONE (it still checks the
  CertificateVerify signature, i.e. that the peer holds the certificate's key). The TLS
  context of every connection is switched to ``_VerifyingContext``, which runs a verifier
  (``cyphonic.pki.verify_peer``) right after the peer's CertificateVerify, and refuses an
  empty client Certificate. A refusal raises a TLS alert inside the handshake, which aioquic
  turns into a transport CONNECTION_CLOSE with CRYPTO_ERROR + alert and the reason phrase.
  The server refuses before it has the client's 1-RTT key, so no stream data of a refused
  client is ever decrypted, let alone delivered.
* Connection IDs chosen by someone else (the TRS). ``QuicConnection`` draws host CIDs with
  ``os.urandom`` in ``__init__`` (the first) and ``_replenish_connection_ids`` (the rest);
  ``CyphonicQuicConnection`` takes a ``connection_id_factory`` used at both spots, and a
  client may also choose its first Destination CID (``initial_destination_cid``) so that a
  relay can route the very first Initial.

A connection made with relay CIDs (either argument) is *relayed*: it never switches to
another Destination CID on its own (``change_connection_id`` does nothing). The relay routes
only the CIDs it assigned, and a peer on qh3 issues its spare CIDs from its native core
(random, unknown to the relay), so the CID both sides opened with is the one that is
certain to be routed; the relay learns a moved node's address from its control connection,
not from the CID (docs/relay.md).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aioquic import tls
from aioquic._buffer import Buffer, BufferReadError
from aioquic.buffer import size_uint_var
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionId, QuicConnectionState
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicPacketType,
    encode_quic_retry,
    pull_quic_header,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from cryptography import x509

from cyphonic.errors import (
    CyphonicError,
    Expired,
    Overloaded,
    PermissionDenied,
    Revoked,
    Timeout,
    Unauthenticated,
    Unavailable,
)
from cyphonic.pki import CertifiedKey, PeerIdentity
from cyphonic.quic.refusal import parse_retry_after
from cyphonic.quic.tickets import TicketState

CID_LENGTH = 8
"""Length of every connection ID this endpoint issues (short headers do not carry it)."""

DEFAULT_MAX_DATAGRAM_SIZE = 1452
"""Largest UDP payload sent: a 1500-byte link minus IPv6 (40) and UDP (8) headers."""

MAX_DATAGRAM_FRAME_SIZE = 65536
CRYPTO_BAD_CERTIFICATE = QuicErrorCode.CRYPTO_ERROR + tls.AlertDescription.bad_certificate
_AEAD_TAG = 16
_SHORT_HEADER = 3  # first byte + 2-byte packet number (aioquic's PACKET_NUMBER_SEND_SIZE)

ConnectionIdFactory = Callable[[int], bytes]
"""Returns the host connection ID with the given sequence number (CID_LENGTH bytes)."""

PeerVerifier = Callable[[list[x509.Certificate], str | None], PeerIdentity]
"""Verifies the peer's chain (leaf first) given the negotiated ALPN; raises CyphonicError."""
ResumeVerifier = Callable[[TicketState, str | None], PeerIdentity]
"""Re-checks the identity a session ticket binds (revocation, expiry, role) given the
negotiated ALPN at resumption; raises CyphonicError."""
TicketHandler = Callable[[Any, list[x509.Certificate]], None]
"""Client side: takes each session ticket the server issues, with the server chain this
connection verified (offered again, with that chain, on a later connect)."""


# TLS alerts aioquic does not define, so each refusal carries its own code.
class _AlertCertificateRevoked(tls.Alert):
    description = tls.AlertDescription.certificate_revoked


class _AlertAccessDenied(tls.Alert):
    description = tls.AlertDescription.access_denied


class _AlertCertificateRequired(tls.Alert):
    description = tls.AlertDescription.certificate_required


def _alert_for(exc: CyphonicError, *, missing: bool) -> tls.Alert:
    message = exc.message
    if isinstance(exc, Expired):
        return tls.AlertCertificateExpired(message)
    if isinstance(exc, Revoked):
        return _AlertCertificateRevoked(message)
    if isinstance(exc, PermissionDenied):
        return _AlertAccessDenied(message)
    if missing:
        return _AlertCertificateRequired(message)
    return tls.AlertBadCertificate(message)


_ERROR_FOR_ALERT: dict[int, type[CyphonicError]] = {
    tls.AlertDescription.certificate_expired: Expired,
    tls.AlertDescription.certificate_revoked: Revoked,
    tls.AlertDescription.access_denied: PermissionDenied,
    tls.AlertDescription.bad_certificate: Unauthenticated,
    tls.AlertDescription.certificate_required: Unauthenticated,
    tls.AlertDescription.unknown_ca: Unauthenticated,
    tls.AlertDescription.unsupported_certificate: Unauthenticated,
    tls.AlertDescription.certificate_unknown: Unauthenticated,
    tls.AlertDescription.decrypt_error: Unauthenticated,
    tls.AlertDescription.handshake_failure: Unauthenticated,
}


def peek_server_name(input_buf: Any, pull_client_hello: Callable[[Any], Any]) -> str | None:
    """The SNI of the ClientHello at ``input_buf``'s position, which is left unchanged
    (None: no SNI, or not a ClientHello the TLS stack will accept anyway).

    Read by ``client_hello_server_name`` (a walk to one extension: the TLS stack parses
    the hello again right after, and a full parse here cost 7% of a server handshake);
    ``pull_client_hello`` only if that walk finds the hello malformed."""
    start = input_buf.tell()
    try:
        return client_hello_server_name(input_buf.data_slice(start, input_buf.capacity))
    except ValueError:
        pass
    try:
        name = pull_client_hello(input_buf).server_name
    except Exception:
        name = None
    finally:
        input_buf.seek(start)
    return name.lower() if isinstance(name, str) else None


_SNI_EXTENSION = 0
_SNI_HOST_NAME = 0


def client_hello_server_name(message: bytes) -> str | None:
    """The host name of a TLS ClientHello message's server_name extension (RFC 6066 3)
    or None if it has none; ``ValueError`` if the message is not a well-formed hello.

        type=1 | length (3) | version (2) | random (32) | session id (1+n)
        | cipher suites (2+n) | compression methods (1+n) | extensions (2+n):
          type (2) | length (2) | data;  server_name data: list length (2)
          | name type (1) = 0 | name length (2) | name
    """
    view = memoryview(message)

    def u(offset: int, size: int) -> int:
        if offset + size > len(view):
            raise ValueError("truncated ClientHello")
        return int.from_bytes(view[offset : offset + size], "big")

    if u(0, 1) != 1:
        raise ValueError("not a ClientHello")
    end = 4 + u(1, 3)
    if end > len(view):
        raise ValueError("truncated ClientHello")
    offset = 4 + 2 + 32
    offset += 1 + u(offset, 1)
    offset += 2 + u(offset, 2)
    offset += 1 + u(offset, 1)
    extensions_end = offset + 2 + u(offset, 2)
    offset += 2
    if extensions_end != end:
        raise ValueError("ClientHello extensions do not end with the message")
    while offset < extensions_end:
        kind, size = u(offset, 2), u(offset + 2, 2)
        offset += 4
        if offset + size > extensions_end:
            raise ValueError("truncated ClientHello extension")
        if kind == _SNI_EXTENSION:
            if u(offset + 2, 1) != _SNI_HOST_NAME:
                return None
            length = u(offset + 3, 2)
            if 5 + length > size:
                raise ValueError("truncated server_name")
            name = bytes(view[offset + 5 : offset + 5 + length])
            try:
                return name.decode("ascii").lower()
            except UnicodeDecodeError as exc:
                raise ValueError("server_name is not ASCII") from exc
        offset += size
    return None


class _VerifyingContext(tls.Context):
    """aioquic's TLS context plus a peer verifier run inside the handshake."""

    peer_verifier: PeerVerifier
    peer_identity: PeerIdentity | None
    verification_error: CyphonicError | None
    client_server_name: str | None = None
    """Server side: the SNI of the client's hello (checked by the endpoint's verifier)."""

    def _verify(self, chain: list[x509.Certificate], *, missing: bool) -> None:
        try:
            self.peer_identity = self.peer_verifier(chain, self.alpn_negotiated)
        except CyphonicError as exc:
            self.verification_error = exc
            raise _alert_for(exc, missing=missing) from exc
        except Exception as exc:  # a verifier bug must still refuse, never accept
            self.verification_error = Unauthenticated(f"certificate check failed: {exc!r}")
            raise tls.AlertBadCertificate("certificate check failed") from exc

    def _peer_chain(self) -> list[x509.Certificate]:
        assert self._peer_certificate is not None
        return [self._peer_certificate, *self._peer_certificate_chain]

    def _server_handle_hello(
        self, input_buf: Buffer, initial_buf: Buffer, handshake_buf: Buffer
    ) -> None:
        self.client_server_name = peek_server_name(input_buf, tls.pull_client_hello)
        super()._server_handle_hello(input_buf, initial_buf, handshake_buf)

    def _server_handle_certificate(self, input_buf: Buffer) -> None:
        super()._server_handle_certificate(input_buf)
        if self._peer_certificate is None:
            # aioquic would go on without client authentication (RFC 8446 allows it).
            self._verify([], missing=True)

    def _server_handle_certificate_verify(self, input_buf: Buffer) -> None:
        super()._server_handle_certificate_verify(input_buf)  # proof of key possession
        self._verify(self._peer_chain(), missing=False)

    def _client_handle_certificate_verify(self, input_buf: Buffer) -> None:
        super()._client_handle_certificate_verify(input_buf)  # proof of key possession
        self._verify(self._peer_chain(), missing=False)


class CyphonicQuicConnection(QuicConnection):
    """A ``QuicConnection`` with mutual TLS verification and pluggable connection IDs.

    Its public read-only views (``handshake_complete``, ``close_event``, ``smoothed_rtt``,
    ``remote_max_datagram_frame_size``, ``peer_address_validated``, ``datagrams_pending``,
    ``max_datagram_payload``, ``push_datagram``) are the engine surface the endpoint, the
    tunnel and the relay use; ``engine_qh3.Qh3QuicConnection`` offers the same.
    """

    engine_name = "aioquic"

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        peer_verifier: PeerVerifier,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
        connection_id_factory: ConnectionIdFactory | None = None,
        initial_destination_cid: bytes | None = None,
    ) -> None:
        self._peer_verifier = peer_verifier
        self._cid_factory = connection_id_factory
        self.relayed = connection_id_factory is not None or initial_destination_cid is not None
        """Made with relay-chosen CIDs: keeps its Destination CID (module docstring)."""
        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
        )
        if configuration.is_client:
            # The server's link is unknown until its transport parameters arrive: the first
            # flight is QUIC's minimum (aioquic would pad it to max_datagram_size, which a
            # small link on the server's side, with DF set, never lets through).
            self._max_datagram_size = min(self._max_datagram_size, _MIN_DATAGRAM)
        if connection_id_factory is not None:
            first = self._host_cids[0]
            first.cid = self._new_cid(0)
            self.host_cid = first.cid
            self._local_initial_source_connection_id = first.cid
        if initial_destination_cid is not None:
            check_initial_destination_cid(
                initial_destination_cid, is_client=configuration.is_client
            )
            # aioquic itself gives the first peer CID no sequence number.
            self._peer_cid = QuicConnectionId(
                cid=initial_destination_cid,
                sequence_number=None,  # type: ignore[arg-type]
            )
            self._original_destination_connection_id = initial_destination_cid

    def _new_cid(self, sequence_number: int) -> bytes:
        if self._cid_factory is None:
            return os.urandom(self._configuration.connection_id_length)
        return factory_cid(
            self._cid_factory, sequence_number, self._configuration.connection_id_length
        )

    def change_connection_id(self) -> None:
        """Switch to the peer's next CID, except on a relayed connection (module docstring)."""
        if not self.relayed:
            super().change_connection_id()

    def receive_gro(self, buffer: bytes, segment_size: int, addr: Any, now: float) -> None:
        """A UDP GRO train (``segment_size``-byte datagrams, the last may be shorter), one
        datagram at a time: aioquic has no batch entry point."""
        for offset in range(0, len(buffer), segment_size):
            self.receive_datagram(buffer[offset : offset + segment_size], addr, now)

    def _replenish_connection_ids(self) -> None:
        # Same as aioquic's, with the CID drawn from the factory.
        while len(self._host_cids) < min(8, self._remote_active_connection_id_limit):
            self._host_cids.append(
                QuicConnectionId(
                    cid=self._new_cid(self._host_cid_seq),
                    sequence_number=self._host_cid_seq,
                    stateless_reset_token=os.urandom(16),
                )
            )
            self._host_cid_seq += 1

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        context = cast(Any, self.tls)
        context.__class__ = _VerifyingContext
        context.peer_verifier = self._peer_verifier
        context.peer_identity = None
        context.verification_error = None
        if not self._is_client:
            context._request_client_certificate = True

    # -- path MTU: max_udp_payload_size sent (if configured) and honoured (docs/agent.md)

    def _serialize_transport_parameters(self) -> bytes:
        data = super()._serialize_transport_parameters()
        limit = getattr(self._configuration, "max_udp_payload_size", None)
        if limit is None:
            return data
        params = pull_quic_transport_parameters(Buffer(data=data))
        params.max_udp_payload_size = limit
        buf = Buffer(capacity=3 * self._max_datagram_size)
        push_quic_transport_parameters(buf, params)
        return bytes(buf.data)

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        # aioquic checks the value (>= 1200) but never sends less; a peer on a small link
        # asks for it, and with DF on nothing larger would arrive.
        limit = pull_quic_transport_parameters(Buffer(data=data)).max_udp_payload_size
        size = self._configuration.max_datagram_size
        self._max_datagram_size = min(size, limit) if limit is not None else size

    # -- read-only views the endpoint needs, kept here so the endpoint stays engine-neutral

    @property
    def peer_identity(self) -> PeerIdentity | None:
        """The verified peer, once its CertificateVerify has been checked."""
        context = getattr(self, "tls", None)
        return cast(PeerIdentity | None, getattr(context, "peer_identity", None))

    @property
    def verification_error(self) -> CyphonicError | None:
        """Why this side refused the peer's certificate, if it did."""
        context = getattr(self, "tls", None)
        return cast(CyphonicError | None, getattr(context, "verification_error", None))

    @property
    def client_server_name(self) -> str | None:
        """Server side: the name the client asked for (TLS SNI), lower-cased, or None."""
        context = getattr(self, "tls", None)
        return cast(str | None, getattr(context, "client_server_name", None))

    @property
    def handshake_complete(self) -> bool:
        """True once this side's TLS handshake has completed."""
        return bool(self._handshake_complete)

    @property
    def smoothed_rtt(self) -> float | None:
        """Smoothed RTT in seconds, None before the first sample."""
        loss = self._loss
        return float(loss._rtt_smoothed) if loss._rtt_initialized else None

    @property
    def remote_max_datagram_frame_size(self) -> int | None:
        """The peer's max_datagram_frame_size transport parameter (None: not known/none)."""
        return self._remote_max_datagram_frame_size

    @property
    def peer_address_validated(self) -> bool:
        """Whether QUIC has validated the current peer path (RFC 9000 section 8)."""
        paths = self._network_paths
        return bool(paths) and bool(paths[0].is_validated)

    @property
    def push_datagram(self) -> Callable[[bytes], None]:
        """Queue one DATAGRAM payload with no checks (the tunnel checks size and bound).

        The cheapest way in per packet: the bound ``append`` of aioquic's own queue.
        """
        return self._datagrams_pending.append

    @property
    def handshake_confirmed(self) -> bool:
        """True once the peer has accepted this side too (client: HANDSHAKE_DONE seen)."""
        return bool(self._handshake_confirmed)

    @property
    def close_event(self) -> ConnectionTerminated | None:
        """The close that is under way or done (local or remote), if any."""
        return self._close_event

    @property
    def is_terminated(self) -> bool:
        """True once the closing or draining period is over."""
        return bool(self._state == QuicConnectionState.TERMINATED)

    @property
    def host_cids(self) -> list[bytes]:
        """Every connection ID this side currently accepts packets on."""
        return [c.cid for c in self._host_cids]

    def datagrams_pending(self) -> int:
        """DATAGRAM frames queued and not yet packed into packets."""
        return len(self._datagrams_pending)

    def max_datagram_payload(self) -> int:
        """Largest DATAGRAM payload that fits one packet to this peer (0 if none allowed).

        aioquic never sends a larger one and it then blocks every later datagram, so the
        tunnel enforces this before queueing.
        """
        remote = self._remote_max_datagram_frame_size
        if remote is None and self._handshake_complete:
            return 0
        room = self._max_datagram_size - _SHORT_HEADER - len(self._peer_cid.cid) - _AEAD_TAG
        payload = room - 1 - size_uint_var(room)
        if remote is not None:
            payload = min(payload, remote - 1 - size_uint_var(remote))
        return max(payload, 0)


_MIN_DATAGRAM = 1200
"""The smallest UDP payload every QUIC path carries (RFC 9000 14)."""


def factory_cid(factory: ConnectionIdFactory, sequence_number: int, length: int) -> bytes:
    """The factory's CID with ``sequence_number``; ValueError if it has the wrong length."""
    cid = factory(sequence_number)
    if len(cid) != length:
        raise ValueError(f"connection_id_factory returned {len(cid)} bytes, need {length}")
    return cid


def check_initial_destination_cid(cid: bytes, *, is_client: bool) -> None:
    """ValueError unless a client chooses a first Destination CID of 8 to 20 bytes."""
    if not is_client:
        raise ValueError("only a client chooses its initial destination CID")
    if not 8 <= len(cid) <= 20:
        raise ValueError("an initial destination CID has 8 to 20 bytes")


@dataclass
class CyphonicConfiguration(QuicConfiguration):
    """aioquic's configuration and what it lacks."""

    max_udp_payload_size: int | None = None
    """Sent as the transport parameter (RFC 9000 18.2): the largest UDP payload this side's
    link receives; None: not sent (no limit)."""


def make_configuration(
    *,
    is_client: bool,
    identity: CertifiedKey,
    alpn_protocols: list[str],
    idle_timeout: float,
    max_datagram_size: int = DEFAULT_MAX_DATAGRAM_SIZE,
    server_name: str | None = None,
    congestion_control: str = "reno",
    max_udp_payload_size: int | None = None,
) -> QuicConfiguration:
    """A QuicConfiguration for one role: DATAGRAM on, our certificate, no built-in checks."""
    return CyphonicConfiguration(
        max_udp_payload_size=max_udp_payload_size,
        is_client=is_client,
        alpn_protocols=alpn_protocols,
        certificate=identity.cert,
        certificate_chain=list(identity.chain),
        private_key=identity.key,
        idle_timeout=idle_timeout,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
        max_datagram_size=max_datagram_size,
        connection_id_length=CID_LENGTH,
        server_name=server_name,
        # Chains are checked by _VerifyingContext with cyphonic.pki instead.
        verify_mode=ssl.CERT_NONE,
        congestion_control_algorithm=congestion_control,
    )


@dataclass(frozen=True, slots=True)
class DatagramHeader:
    """What the endpoint needs from a received datagram's first packet header."""

    destination_cid: bytes
    is_initial: bool
    version: int | None
    source_cid: bytes = b""
    token: bytes = b""
    """An Initial's address validation token (our Retry's, echoed)."""


def parse_datagram_header(data: bytes) -> DatagramHeader | None:
    """Destination CID of the first packet, or None if it is not QUIC."""
    if not data:
        return None
    if not data[0] & 0x80:
        # Short header: the fast path for data packets, CID length is ours.
        if len(data) < 1 + CID_LENGTH:
            return None
        return DatagramHeader(data[1 : 1 + CID_LENGTH], False, None)
    try:
        header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
    except (ValueError, BufferReadError):
        return None
    return DatagramHeader(
        header.destination_cid,
        header.packet_type == QuicPacketType.INITIAL,
        header.version,
        header.source_cid,
        header.token,
    )


def encode_retry(*, version: int, scid: bytes, dcid: bytes, odcid: bytes, token: bytes) -> bytes:
    """A Retry packet (RFC 9000 17.2.5) from ``scid`` to the client's source CID ``dcid``,
    with the integrity tag over its first Initial's DCID ``odcid`` (wire format, both
    engines' clients take it)."""
    return encode_quic_retry(
        version=version,
        source_cid=scid,
        destination_cid=dcid,
        original_destination_cid=odcid,
        retry_token=token,
    )


def supported_versions() -> list[int]:
    """QUIC versions the engine speaks."""
    return list(QuicConfiguration().supported_versions)


def error_from_close(
    event: ConnectionTerminated, *, local_error: CyphonicError | None, peer_label: str
) -> CyphonicError:
    """The CyphonicError that best describes why a connection ended."""
    if local_error is not None:
        return local_error
    code, reason = event.error_code, event.reason_phrase
    if QuicErrorCode.CRYPTO_ERROR <= code <= QuicErrorCode.CRYPTO_ERROR + 0xFF:
        alert = code - QuicErrorCode.CRYPTO_ERROR
        cls = _ERROR_FOR_ALERT.get(alert, Unauthenticated)
        return cls(f"{peer_label}: TLS handshake refused ({_alert_name(alert)}): {reason}")
    if reason == "Idle timeout":
        return Timeout(f"{peer_label}: idle timeout")
    retry_after = parse_retry_after(code, reason)
    if retry_after is not None:
        return Overloaded(f"{peer_label}: refused, {reason}", retry_after_s=retry_after)
    if code == QuicErrorCode.NO_ERROR and event.frame_type is None:
        return Unavailable(f"{peer_label}: connection closed by peer ({reason or 'no reason'})")
    return Unavailable(f"{peer_label}: connection closed (code 0x{code:x}, {reason or '-'})")


def _alert_name(alert: int) -> str:
    try:
        return tls.AlertDescription(alert).name
    except ValueError:
        return f"alert {alert}"
