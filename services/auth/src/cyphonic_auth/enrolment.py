"""The AS's rules, with no I/O: names, tokens, CSRs, login decisions, the CRL.

Enrolment flow (admin REST, see docs/enrolment.md):

    admin                         AS                               node (cyphonic-agent)
      | POST /v1/nodes {name}      |                                  |
      | POST .../enrolment-tokens  |--> token (shown once; only its SHA-256 is stored)
      |  ... token handed to the node out of band ...                 |
      |                            |<-- POST /v1/enrol/info {token}   | learns its FQDN
      |                            |<-- POST /v1/enrol {token, CSR}   | key made on the node
      |                            |--> chain, root CA, AS endpoints  |
      |                            |       (token now used)           |
    Then over QUIC (mutual TLS with that certificate): Login -> FQDN + NMS endpoints;
    Renew (new CSR, same name) before the certificate expires.

Every check here takes the current time as an argument; nothing reads a clock.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cyphonic.errors import (
    Expired,
    InvalidArgument,
    PermissionDenied,
    Revoked,
    TokenInvalid,
    Unauthenticated,
)
from cyphonic.pki import CertifiedKey, validate_dns_name
from cyphonic.registry.models import CertificateStatus, NodeState

TOKEN_PREFIX = "cye_"
TOKEN_BYTES = 32
MAX_TOKEN_LENGTH = 200
MAX_CSR_BYTES = 16 * 1024
# "svc.<domain>" holds the service names; the node CA may not sign under it.
RESERVED_NAMES = frozenset({"svc"})

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


# --------------------------------------------------------------------------- names


def validate_node_name(name: str) -> str:
    """``name`` lower-cased if it is one DNS label (a-z, 0-9, '-'), else ``InvalidArgument``."""
    candidate = name.strip().lower()
    if not _LABEL.match(candidate):
        raise InvalidArgument(
            f"node name {name!r} is not a DNS label (1-63 of a-z, 0-9, '-', not at the ends)"
        )
    if candidate in RESERVED_NAMES:
        raise InvalidArgument(f"node name {candidate!r} is reserved")
    return candidate


def node_fqdn(name: str, domain: str) -> str:
    """The FQDN of node ``name``: ``<name>.<domain>``."""
    return validate_dns_name(f"{validate_node_name(name)}.{domain}")


# --------------------------------------------------------------------------- tokens


def new_token() -> str:
    """A fresh enrolment token (256 random bits, URL-safe, with a recognisable prefix)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """What the registry stores of a token: its SHA-256, hex."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


TokenRefusal = Literal["unknown", "used", "expired", "node_revoked"]

_TOKEN_MESSAGES: dict[str, str] = {
    "unknown": "enrolment token is not known",
    "used": "enrolment token was already used",
    "expired": "enrolment token has expired",
    "node_revoked": "the node of this enrolment token is revoked",
}


class TokenRefused(TokenInvalid):
    """An enrolment token refused; ``reason`` says why (for metrics and the message)."""

    def __init__(self, reason: TokenRefusal) -> None:
        super().__init__(_TOKEN_MESSAGES[reason])
        self.reason: TokenRefusal = reason


def check_token(
    *,
    used_at: datetime | None,
    expires_at: datetime,
    node_state: str,
    now: datetime,
) -> None:
    """Raise ``TokenRefused`` unless a token with these properties may enrol at ``now``."""
    if used_at is not None:
        raise TokenRefused("used")
    if node_state == NodeState.REVOKED:
        raise TokenRefused("node_revoked")
    if now >= expires_at:
        raise TokenRefused("expired")


def token_expiry(*, now: datetime, ttl: timedelta) -> datetime:
    """When a token issued at ``now`` for ``ttl`` expires (ttl must be positive)."""
    if ttl <= timedelta(0):
        raise InvalidArgument("token lifetime must be positive")
    return now + ttl


# --------------------------------------------------------------------------- CSRs, certificates


def parse_csr(data: str | bytes) -> x509.CertificateSigningRequest:
    """A CSR from PEM text or DER bytes; ``InvalidArgument`` for anything else."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if not raw.strip():
        raise InvalidArgument("CSR is empty")
    if len(raw) > MAX_CSR_BYTES:
        raise InvalidArgument(f"CSR larger than {MAX_CSR_BYTES} bytes")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(raw.strip())
        return x509.load_der_x509_csr(raw)
    except ValueError as exc:
        raise InvalidArgument("not a PKCS#10 certificate signing request") from exc


def serial_hex(serial: int) -> str:
    """How the registry writes a certificate serial: lower-case hex, no leading zeros."""
    return format(serial, "x")


def certificate_pem(certs: Sequence[x509.Certificate]) -> str:
    """Concatenated PEM of ``certs`` (leaf first)."""
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def same_certificate(pem: str, cert: x509.Certificate) -> bool:
    """Whether ``pem`` (first certificate) is exactly ``cert``."""
    try:
        stored = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return False
    return stored.fingerprint(hashes.SHA256()) == cert.fingerprint(hashes.SHA256())


# --------------------------------------------------------------------------- login


def check_certificate(
    *,
    status: str,
    not_before: datetime,
    not_after: datetime,
    node_state: str,
    now: datetime,
) -> None:
    """Raise ``Revoked``/``Expired``/``Unauthenticated`` unless the certificate may log in.

    A superseded certificate (replaced by a renewal) stays usable until it expires, so that
    a node that lost its renewal answer is not locked out; revocation is what ends it early.
    """
    if status == CertificateStatus.REVOKED or node_state == NodeState.REVOKED:
        raise Revoked("certificate is revoked")
    if now >= not_after:
        raise Expired(f"certificate expired at {not_after.isoformat()}")
    if now < not_before:
        raise Unauthenticated(f"certificate is not valid before {not_before.isoformat()}")


def check_peer_kind(kind: str) -> None:
    """Only nodes log in to the AS."""
    if kind != "node":
        raise PermissionDenied(f"login is for nodes, not a {kind}")


def refusal_reason(error: BaseException) -> str:
    """A short, bounded label for a refusal (metrics)."""
    if isinstance(error, TokenRefused):
        return f"token_{error.reason}"
    code_name = getattr(error, "code_name", None)
    return str(code_name) if code_name else "internal"


# --------------------------------------------------------------------------- CRL


@dataclass(frozen=True)
class CrlEntry:
    """A revoked certificate as the CRL lists it."""

    serial: str
    revoked_at: datetime
    reason: str


def _crl_reason(reason: str) -> x509.ReasonFlags | None:
    wanted = reason.strip().lower().replace("-", "_").replace(" ", "_")
    for flag in x509.ReasonFlags:
        if flag.value.lower() == wanted.replace("_", "") or flag.name == wanted:
            return flag
    return None


def build_crl(
    *,
    ca: CertifiedKey,
    entries: Sequence[CrlEntry],
    number: int,
    now: datetime,
    valid_for: timedelta,
) -> bytes:
    """A DER CRL of ``entries``, signed by the node CA, valid from ``now`` for ``valid_for``."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + valid_for)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    except x509.ExtensionNotFound:
        pass
    for entry in entries:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry.serial, 16))
            .revocation_date(entry.revoked_at)
        )
        flag = _crl_reason(entry.reason)
        if flag is not None and flag not in (
            x509.ReasonFlags.unspecified,
            x509.ReasonFlags.remove_from_crl,
        ):
            revoked = revoked.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
