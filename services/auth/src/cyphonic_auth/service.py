"""The AS's operations, shared by the admin REST API, the QUIC handlers and the CLI.

``AuthService`` ties the registry (``NodeRegistry``), the node CA, the settings and the
metrics together; ``login`` is the QUIC Login decision as a plain function.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cyphonic.config import QUIC_PORT
from cyphonic.errors import CyphonicError, InvalidArgument, NotFound, Unauthenticated
from cyphonic.hostport import parse_host_port
from cyphonic.log import get_logger
from cyphonic.pki import (
    SERVICE_CA_CERT,
    CertifiedKey,
    PeerIdentity,
    fingerprint,
    load_certificates,
    load_identity,
    sign_node_csr,
)
from cyphonic.revocation import RevocationCache
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import endpoint_to_pb
from prometheus_client import CollectorRegistry, Counter

from cyphonic_auth.config import AuthSettings
from cyphonic_auth.enrolment import (
    CrlEntry,
    build_crl,
    certificate_pem,
    check_certificate,
    check_peer_kind,
    hash_token,
    new_token,
    node_fqdn,
    parse_csr,
    refusal_reason,
    same_certificate,
    serial_hex,
    token_expiry,
    validate_node_name,
)
from cyphonic_auth.storage import (
    AuditRecord,
    CertificateRecord,
    NodeRecord,
    NodeRegistry,
    RevocationRecord,
)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class NodeCa:
    """The node CA the AS signs with, the root it chains to, and the service CA that nodes
    pin (None when the PKI directory has no ``service-ca.crt``)."""

    ca: CertifiedKey
    root: x509.Certificate
    service_ca: x509.Certificate | None = None

    @classmethod
    def load(cls, settings: AuthSettings) -> NodeCa:
        """Load the node CA key and certificate, the root and the service CA from files."""
        cert_path, key_path = settings.node_ca_paths
        identity = load_identity(cert_path, key_path)
        root = load_certificates(settings.root_ca_path)[0]
        service_path = settings.pki_dir / SERVICE_CA_CERT
        service_ca = load_certificates(service_path)[0] if service_path.exists() else None
        return cls(
            ca=CertifiedKey(key=identity.key, cert=identity.cert, chain=[]),
            root=root,
            service_ca=service_ca,
        )

    @property
    def chain(self) -> list[x509.Certificate]:
        """What follows a node certificate in its chain: the node CA."""
        return [self.ca.cert, *self.ca.chain]


class AuthMetrics:
    """Prometheus counters of the AS."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.logins = Counter("cyphonic_as_logins", "Successful QUIC logins", registry=registry)
        self.enrolments = Counter(
            "cyphonic_as_enrolments", "Nodes enrolled with a token", registry=registry
        )
        self.certificates = Counter(
            "cyphonic_as_certificates_issued",
            "Node certificates issued, by how",
            ["how"],
            registry=registry,
        )
        self.revocations = Counter(
            "cyphonic_as_revocations", "Certificates or nodes revoked", registry=registry
        )
        self.refusals = Counter(
            "cyphonic_as_refusals",
            "Refused enrolments, logins and renewals, by reason",
            ["operation", "reason"],
            registry=registry,
        )

    def refused(self, operation: str, error: BaseException) -> None:
        """Count a refusal of ``operation``."""
        self.refusals.labels(operation, refusal_reason(error)).inc()


@dataclass(frozen=True)
class IssuedToken:
    """A new enrolment token: shown once, only its hash is stored."""

    token: str
    node: NodeRecord
    expires_at: datetime


@dataclass(frozen=True)
class IssuedCertificate:
    """A signed node certificate with everything the node needs to use it."""

    node: NodeRecord
    certificate: CertificateRecord
    chain_pem: str
    root_pem: str
    service_ca_pem: str | None


@dataclass(frozen=True)
class NodeDetails:
    """A node and its certificates."""

    node: NodeRecord
    certificates: list[CertificateRecord]


async def login(
    registry: NodeRegistry,
    peer: PeerIdentity,
    *,
    now: datetime,
    nms_endpoints: list[str],
    nms_server_name: str,
) -> pb.LoginResponse:
    """Decide a QUIC Login for a TLS-verified ``peer`` at ``now``.

    The certificate must be one the registry issued (same serial and bytes) to a node with
    the same FQDN, not revoked, not expired. Raises ``PermissionDenied`` (not a node),
    ``Unauthenticated`` (unknown certificate), ``Revoked`` or ``Expired``.
    """
    check_peer_kind(peer.kind)
    record = await registry.certificate(serial_hex(peer.certificate.serial_number))
    if record is None or not same_certificate(record.pem, peer.certificate):
        raise Unauthenticated("certificate is not known to the registry")
    if record.fqdn != peer.name:
        raise Unauthenticated("certificate name does not match the registry")
    node = await registry.get_node(record.node_name)
    check_certificate(
        status=record.status,
        not_before=record.not_before,
        not_after=record.not_after,
        node_state=node.state,
        now=now,
    )
    return pb.LoginResponse(
        fqdn=node.fqdn,
        nms=[
            endpoint_to_pb(*parse_host_port(e, default_port=QUIC_PORT, require_ip=True))
            for e in nms_endpoints
        ],
        nms_server_name=nms_server_name,
        certificate_not_after_ms=int(record.not_after.timestamp() * 1000),
    )


CRL_CACHE_S = 1.0
"""A built CRL is reused this long unless a revocation is known (nodes poll it)."""


class AuthService:
    """Every AS operation, with metrics, logs and one clock."""

    def __init__(
        self,
        *,
        registry: NodeRegistry,
        node_ca: NodeCa,
        settings: AuthSettings,
        metrics: AuthMetrics,
        clock: Clock = utc_now,
    ) -> None:
        self.registry = registry
        self.node_ca = node_ca
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.revocations: RevocationCache | None = None
        """The QUIC endpoint's revocation cache (set by the signalling server); told at once
        of what this process revokes, so that the next handshake already refuses it."""
        # Made here, not at import, so that it follows the process's log configuration.
        self._log = get_logger("as")
        self._crl: tuple[bytes, int, float] | None = None  # DER, number, built (monotonic)
        self._revoked_event = asyncio.Event()
        """Set (and replaced) whenever a revocation becomes known here: ends long-polls."""
        self._closing = False

    # ---------------------------------------------------------------- nodes

    async def create_node(
        self,
        name: str,
        *,
        tags: dict[str, Any],
        device_info: dict[str, Any],
        actor: str,
    ) -> NodeRecord:
        """Register a node; its FQDN is ``<name>.<domain>``."""
        name = validate_node_name(name)
        node = await self.registry.create_node(
            name=name,
            fqdn=node_fqdn(name, self.settings.domain),
            tags=tags,
            device_info=device_info,
            now=self.clock(),
            actor=actor,
        )
        self._log.info("node_created", fqdn=node.fqdn, actor=actor)
        return node

    async def node_details(self, name: str) -> NodeDetails:
        """A node and its certificates."""
        name = validate_node_name(name)
        node = await self.registry.get_node(name)
        return NodeDetails(node=node, certificates=await self.registry.node_certificates(name))

    async def issue_token(self, name: str, *, ttl: timedelta | None, actor: str) -> IssuedToken:
        """A one-time enrolment token for node ``name``."""
        name = validate_node_name(name)
        now = self.clock()
        expires_at = token_expiry(
            now=now, ttl=ttl or timedelta(seconds=self.settings.token_ttl_seconds)
        )
        token = new_token()
        node = await self.registry.add_token(
            name=name, token_hash=hash_token(token), expires_at=expires_at, now=now, actor=actor
        )
        self._log.info(
            "token_issued", fqdn=node.fqdn, expires_at=expires_at.isoformat(), actor=actor
        )
        return IssuedToken(token=token, node=node, expires_at=expires_at)

    async def token_node(self, token: str) -> NodeRecord:
        """The node a usable token would enrol (the token stays unused)."""
        try:
            return await self.registry.token_node(token_hash=hash_token(token), now=self.clock())
        except CyphonicError as exc:
            self.metrics.refused("enrol", exc)
            raise

    # ---------------------------------------------------------------- certificates

    def _issuer(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        valid_for: timedelta,
    ) -> Callable[[NodeRecord], x509.Certificate]:
        def issue(node: NodeRecord) -> x509.Certificate:
            return sign_node_csr(
                self.node_ca.ca, csr, fqdn=node.fqdn, valid_for=valid_for, now=self.clock()
            )

        return issue

    def _issued(self, node: NodeRecord, record: CertificateRecord) -> IssuedCertificate:
        return IssuedCertificate(
            node=node,
            certificate=record,
            chain_pem=record.pem + certificate_pem(self.node_ca.chain),
            root_pem=certificate_pem([self.node_ca.root]),
            service_ca_pem=(
                certificate_pem([self.node_ca.service_ca])
                if self.node_ca.service_ca is not None
                else None
            ),
        )

    async def enrol(self, token: str, csr_data: str | bytes) -> IssuedCertificate:
        """Redeem ``token`` with a CSR made on the node; the token cannot be used again."""
        try:
            csr = parse_csr(csr_data)
            node, record = await self.registry.enrol(
                token_hash=hash_token(token),
                now=self.clock(),
                issue=self._issuer(csr, valid_for=self.settings.node_cert_validity),
            )
        except CyphonicError as exc:
            self.metrics.refused("enrol", exc)
            self._log.info("enrol_refused", reason=refusal_reason(exc))
            raise
        self.metrics.enrolments.inc()
        self.metrics.certificates.labels("enrol").inc()
        self._log.info("node_enrolled", fqdn=node.fqdn, serial=record.serial)
        return self._issued(node, record)

    async def sign_csr(
        self,
        name: str,
        csr_data: str | bytes,
        *,
        valid_for: timedelta | None,
        actor: str,
    ) -> IssuedCertificate:
        """An admin signs a CSR for node ``name`` directly (no token)."""
        name = validate_node_name(name)
        validity = valid_for or self.settings.node_cert_validity
        if validity > timedelta(days=397):
            raise InvalidArgument("certificate validity above 397 days")
        csr = parse_csr(csr_data)
        record = await self.registry.issue_certificate(
            name=name,
            now=self.clock(),
            actor=actor,
            action="certificate.sign",
            issue=self._issuer(csr, valid_for=validity),
        )
        self.metrics.certificates.labels("admin").inc()
        self._log.info("certificate_signed", fqdn=record.fqdn, serial=record.serial, actor=actor)
        return self._issued(await self.registry.get_node(name), record)

    async def certificate(self, serial: str) -> CertificateRecord:
        """The certificate with this serial; ``NotFound`` if none."""
        record = await self.registry.certificate(_normal_serial(serial))
        if record is None:
            raise NotFound(f"no certificate with serial {serial}")
        return record

    # ---------------------------------------------------------------- revocation

    async def revoke_node(self, name: str, *, reason: str, actor: str) -> list[RevocationRecord]:
        """Revoke a node and all its certificates (for good)."""
        name = validate_node_name(name)
        added = await self.registry.revoke_node(
            name=name, reason=reason, now=self.clock(), actor=actor
        )
        self.metrics.revocations.inc(len(added))
        self._log.info("node_revoked", node=name, serials=[r.serial for r in added], actor=actor)
        self._revoked_here([r.serial for r in added])
        return added

    async def revoke_certificate(self, serial: str, *, reason: str, actor: str) -> RevocationRecord:
        """Revoke one certificate."""
        record = await self.registry.revoke_certificate(
            serial=_normal_serial(serial), reason=reason, now=self.clock(), actor=actor
        )
        self.metrics.revocations.inc()
        self._log.info("certificate_revoked", fqdn=record.fqdn, serial=record.serial, actor=actor)
        self._revoked_here([record.serial])
        return record

    def _revoked_here(self, serials: list[str | None]) -> None:
        if self.revocations is not None:
            self.revocations.add(int(s, 16) for s in serials if s)
        self.revocations_changed()

    def revocations_changed(self, _serials: object = None) -> None:
        """A revocation became known (made here, or seen in the registry): the cached CRL
        is stale and long-polls of ``watch_revocations`` answer now."""
        self._crl = None
        event, self._revoked_event = self._revoked_event, asyncio.Event()
        event.set()

    def close_watches(self) -> None:
        """End every long-poll now (shutting down)."""
        self._closing = True
        self._revoked_event.set()

    async def crl(self) -> bytes:
        """The current DER CRL of the node CA."""
        return (await self.current_crl())[0]

    async def current_crl(self) -> tuple[bytes, int]:
        """The current DER CRL and its number (the newest revocation id), rebuilt at most
        once per ``CRL_CACHE_S`` unless a revocation is known to have happened."""
        cached = self._crl
        if cached is not None and time.monotonic() - cached[2] < CRL_CACHE_S:
            return cached[0], cached[1]
        now = self.clock()
        entries, newest = await self.registry.revoked_serials(now=now)
        der = build_crl(
            ca=self.node_ca.ca,
            entries=[
                CrlEntry(serial=e.serial, revoked_at=e.revoked_at, reason=e.reason) for e in entries
            ],
            number=newest,
            now=now,
            valid_for=timedelta(hours=self.settings.crl_hours),
        )
        self._crl = (der, newest, time.monotonic())
        return der, newest

    async def crl_response(self, have_number: int) -> pb.CrlResponse:
        """QUIC CrlRequest: the CRL, or only its number when the node holds that one."""
        der, number = await self.current_crl()
        if have_number and have_number == number:
            return pb.CrlResponse(number=number)
        return pb.CrlResponse(number=number, crl_der=der)

    async def watch_revocations(self, *, after_id: int, wait_s: float) -> int:
        """The newest revocation id, as soon as it is above ``after_id`` or after
        ``wait_s`` seconds (the long-poll the NMS and the TRS follow)."""
        deadline = time.monotonic() + wait_s
        while True:
            event = self._revoked_event
            newest = (await self.current_crl())[1]
            remaining = deadline - time.monotonic()
            if newest > after_id or remaining <= 0 or self._closing:
                return newest
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    async def audit(self, *, limit: int, offset: int) -> tuple[list[AuditRecord], int]:
        """A page of the audit trail, newest first."""
        return await self.registry.audit_events(limit=limit, offset=offset)

    # ---------------------------------------------------------------- QUIC

    async def login(self, peer: PeerIdentity) -> pb.LoginResponse:
        """QUIC Login of a TLS-verified node."""
        try:
            answer = await login(
                self.registry,
                peer,
                now=self.clock(),
                nms_endpoints=self.settings.nms_endpoints,
                nms_server_name=self.settings.nms_name,
            )
        except CyphonicError as exc:
            self.metrics.refused("login", exc)
            self._log.info("login_refused", fqdn=peer.name, reason=refusal_reason(exc))
            raise
        self.metrics.logins.inc()
        self._log.info("login", fqdn=peer.name, serial=serial_hex(peer.certificate.serial_number))
        return answer

    async def renew(self, peer: PeerIdentity, csr_der: bytes) -> pb.RenewResponse:
        """A node renews its certificate over QUIC with a new key's CSR (same name)."""
        try:
            check_peer_kind(peer.kind)
            csr = parse_csr(csr_der)
            record = await self.registry.certificate(serial_hex(peer.certificate.serial_number))
            if record is None or record.fqdn != peer.name:
                raise Unauthenticated("certificate is not known to the registry")
            issued = await self.registry.issue_certificate(
                name=record.node_name,
                now=self.clock(),
                actor=peer.name,
                action="certificate.renew",
                issue=self._issuer(csr, valid_for=self.settings.node_cert_validity),
                presented=peer.certificate,
            )
        except CyphonicError as exc:
            self.metrics.refused("renew", exc)
            self._log.info("renew_refused", fqdn=peer.name, reason=refusal_reason(exc))
            raise
        self.metrics.certificates.labels("renew").inc()
        self._log.info(
            "certificate_renewed", fqdn=issued.fqdn, serial=issued.serial, previous=record.serial
        )
        return pb.RenewResponse(
            certificate_chain_pem=(issued.pem + certificate_pem(self.node_ca.chain)).encode()
        )

    def describe_ca(self) -> dict[str, str | None]:
        """PEM of the root, node CA and service CA, and the root's SHA-256 fingerprint."""
        service_ca = self.node_ca.service_ca
        return {
            "root_ca_pem": certificate_pem([self.node_ca.root]),
            "root_ca_sha256": fingerprint(self.node_ca.root),
            "node_ca_pem": certificate_pem(self.node_ca.chain),
            "service_ca_pem": certificate_pem([service_ca]) if service_ca is not None else None,
        }


def _normal_serial(serial: str) -> str:
    text = serial.strip().lower().removeprefix("0x").replace(":", "")
    if not 0 < len(text) <= 40:
        raise InvalidArgument("a serial is 1 to 40 hexadecimal digits")
    try:
        return serial_hex(int(text, 16))
    except ValueError as exc:
        raise InvalidArgument(f"serial {serial!r} is not hexadecimal") from exc
