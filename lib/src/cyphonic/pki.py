"""CYPHONIC PKI: the CA hierarchy, node certificate signing and peer verification.

    root CA (operator)
    +-- node-ca      the AS signs node certificates with it (SAN = <name>.<domain>)
    +-- service-ca   signs as.svc.<domain>, nms.svc.<domain>, trs.svc.<domain>

Every key is ECDSA P-256. Leaf certificates carry serverAuth and clientAuth, because every
QUIC connection is mutual TLS and a node is client to one peer and server to the next.
The intermediates carry name constraints (node-ca: the domain minus ``svc.<domain>``;
service-ca: ``svc.<domain>`` only), so the X.509 verifier itself keeps the roles apart.

``verify_peer`` is the one function that decides whether a TLS peer is who it claims to be;
the QUIC endpoint calls it on both sides of every handshake. Chain building and checking
is done by ``cryptography.x509.verification``; this module adds only what that cannot know:
which intermediate a role must chain through, revocation, and the expected name.

Private keys are written 0600, atomically, and never logged.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from cyphonic.config import DEFAULT_DOMAIN
from cyphonic.errors import Expired, InvalidArgument, PermissionDenied, Revoked, Unauthenticated

__all__ = [
    "CERT_BACKDATE",
    "NODE_CERT_VALIDITY",
    "CertifiedKey",
    "PeerIdentity",
    "PeerKind",
    "PkiMaterial",
    "TrustStore",
    "atomic_write",
    "certificate_dns_names",
    "create_intermediate_ca",
    "create_root_ca",
    "fingerprint",
    "generate_key",
    "init_pki",
    "issue_service_certificate",
    "load_certificates",
    "load_identity",
    "load_private_key",
    "load_trust_store",
    "make_csr",
    "recover_identity",
    "service_name",
    "sign_node_csr",
    "validate_dns_name",
    "verify_peer",
    "write_certificates",
    "write_identity",
    "write_private_key",
]

PeerKind = Literal["node", "service"]

NODE_CERT_VALIDITY = datetime.timedelta(days=30)
ROOT_CA_VALIDITY = datetime.timedelta(days=3650)
INTERMEDIATE_CA_VALIDITY = datetime.timedelta(days=1825)
SERVICE_CERT_VALIDITY = datetime.timedelta(days=365)
# Tolerate this much clock skew between the signer and a freshly enrolled node.
_BACKDATE = datetime.timedelta(minutes=5)
CERT_BACKDATE = _BACKDATE
"""Certificates made here start this long before they were issued (clock skew)."""
_MIN_RSA_BITS = 2048
SERVICES = ("as", "nms", "trs")

# File names inside a PKI directory (shared contract with the AS, NMS, TRS and the agent).
ROOT_CA_CERT = "root-ca.crt"
ROOT_CA_KEY = "root-ca.key"
NODE_CA_CERT = "node-ca.crt"
NODE_CA_KEY = "node-ca.key"
SERVICE_CA_CERT = "service-ca.crt"
SERVICE_CA_KEY = "service-ca.key"

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


# --------------------------------------------------------------------------- keys, names


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def validate_dns_name(name: str) -> str:
    """``name`` lower-cased if it is a valid DNS name, else ``InvalidArgument``."""
    candidate = name.strip().lower().rstrip(".")
    if not candidate or len(candidate) > 253:
        raise InvalidArgument(f"invalid DNS name {name!r}: empty or longer than 253 characters")
    for label in candidate.split("."):
        if not _LABEL.match(label):
            raise InvalidArgument(f"invalid DNS name {name!r}: bad label {label!r}")
    return candidate


def service_name(service: str, domain: str = DEFAULT_DOMAIN) -> str:
    """The certificate name of a service, e.g. ``nms.svc.cyphonic.internal``."""
    return validate_dns_name(f"{service}.svc.{domain}")


def fingerprint(cert: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of the certificate's DER encoding."""
    return cert.fingerprint(hashes.SHA256()).hex()


def certificate_dns_names(cert: x509.Certificate) -> list[str]:
    """The DNS names in the certificate's subjectAltName (lower-cased), possibly empty."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [n.lower() for n in san.get_values_for_type(x509.DNSName)]


def _utc(now: datetime.datetime) -> datetime.datetime:
    if now.tzinfo is None:
        return now.replace(tzinfo=datetime.UTC)
    return now.astimezone(datetime.UTC)


def _serial() -> int:
    # 128 random bits; never zero (serials must be positive).
    return secrets.randbits(128) or 1


def _same_cert(a: x509.Certificate, b: x509.Certificate) -> bool:
    # Certificates compare by their DER encoding: no hashing (six per verify_peer).
    return a == b


def _is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


# --------------------------------------------------------------------------- issuing


@dataclass(frozen=True)
class CertifiedKey:
    """A private key, its certificate and the intermediates up to (not including) the root."""

    key: CertificateIssuerPrivateKeyTypes
    cert: x509.Certificate
    chain: list[x509.Certificate] = field(default_factory=list)

    @property
    def full_chain(self) -> list[x509.Certificate]:
        """Leaf followed by intermediates: what a TLS peer presents."""
        return [self.cert, *self.chain]


def _issuer_chain(ca: CertifiedKey) -> list[x509.Certificate]:
    # The intermediates a certificate issued by ``ca`` presents; the root is never sent.
    if _is_self_signed(ca.cert):
        return []
    return [ca.cert, *ca.chain]


def _builder(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
    valid_for: datetime.timedelta,
    now: datetime.datetime,
    serial: int | None = None,
) -> x509.CertificateBuilder:
    start = _utc(now) - _BACKDATE
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial if serial is not None else _serial())
        .not_valid_before(start)
        .not_valid_after(_utc(now) + valid_for)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _aki(ca: CertifiedKey) -> x509.AuthorityKeyIdentifier:
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_root_ca(
    common_name: str,
    *,
    valid_for: datetime.timedelta = ROOT_CA_VALIDITY,
    now: datetime.datetime,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> CertifiedKey:
    """A self-signed root CA (the operator's)."""
    key = key or generate_key()
    name = _name(common_name)
    cert = (
        _builder(
            subject=name, issuer=name, public_key=key.public_key(), valid_for=valid_for, now=now
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(key=key, cert=cert, chain=[])


def create_intermediate_ca(
    parent: CertifiedKey,
    common_name: str,
    *,
    valid_for: datetime.timedelta = INTERMEDIATE_CA_VALIDITY,
    now: datetime.datetime,
    name_constraints: x509.NameConstraints | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> CertifiedKey:
    """An intermediate CA signed by ``parent`` (no further CAs below it)."""
    key = key or generate_key()
    builder = (
        _builder(
            subject=_name(common_name),
            issuer=parent.cert.subject,
            public_key=key.public_key(),
            valid_for=valid_for,
            now=now,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_aki(parent), critical=False)
    )
    if name_constraints is not None:
        builder = builder.add_extension(name_constraints, critical=True)
    cert = builder.sign(parent.key, hashes.SHA256())
    return CertifiedKey(key=key, cert=cert, chain=_issuer_chain(parent))


def _sign_leaf(
    ca: CertifiedKey,
    *,
    dns_name: str,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
    valid_for: datetime.timedelta,
    now: datetime.datetime,
    serial: int | None,
) -> x509.Certificate:
    return (
        _builder(
            subject=_name(dns_name),
            issuer=ca.cert.subject,
            public_key=public_key,
            valid_for=valid_for,
            now=now,
            serial=serial,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(_aki(ca), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def issue_service_certificate(
    ca: CertifiedKey,
    dns_name: str,
    *,
    valid_for: datetime.timedelta = SERVICE_CERT_VALIDITY,
    now: datetime.datetime,
) -> CertifiedKey:
    """A fresh key and a serverAuth+clientAuth certificate for ``dns_name``, signed by ``ca``."""
    name = validate_dns_name(dns_name)
    key = generate_key()
    cert = _sign_leaf(
        ca, dns_name=name, public_key=key.public_key(), valid_for=valid_for, now=now, serial=None
    )
    return CertifiedKey(key=key, cert=cert, chain=_issuer_chain(ca))


def make_csr(key: CertificateIssuerPrivateKeyTypes, fqdn: str) -> x509.CertificateSigningRequest:
    """A CSR naming ``fqdn`` in both CN and SAN, signed with ``key`` (which never leaves)."""
    name = validate_dns_name(fqdn)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(name))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, algorithm)
    )


def _check_csr_key(
    csr: x509.CertificateSigningRequest,
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    try:
        public_key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise InvalidArgument(f"CSR public key is unusable: {exc}") from exc
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise InvalidArgument(f"CSR key is EC {public_key.curve.name}; use P-256 (secp256r1)")
        return public_key
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < _MIN_RSA_BITS:
            raise InvalidArgument(
                f"CSR key is RSA-{public_key.key_size}; at least {_MIN_RSA_BITS} bits needed"
            )
        return public_key
    # Ed25519 and the rest are refused: the X.509 verifier's web PKI profile rejects them.
    raise InvalidArgument(f"CSR key type {type(public_key).__name__} is not accepted; use P-256")


def sign_node_csr(
    ca: CertifiedKey,
    csr: x509.CertificateSigningRequest,
    *,
    fqdn: str,
    valid_for: datetime.timedelta = NODE_CERT_VALIDITY,
    now: datetime.datetime,
    serial: int | None = None,
) -> x509.Certificate:
    """Sign a node's CSR with the node CA after checking it names exactly ``fqdn``.

    Refuses (``InvalidArgument``) a CSR whose signature does not verify, whose key is not
    EC P-256/P-384 or RSA >= 2048, or whose CN or SAN names anything other than ``fqdn``.
    The certificate gets SAN = ``fqdn``, serverAuth+clientAuth and a random 128-bit serial;
    nothing else from the CSR is copied.
    """
    name = validate_dns_name(fqdn)
    public_key = _check_csr_key(csr)
    if not csr.is_signature_valid:
        raise InvalidArgument("CSR signature does not verify (proof of possession failed)")
    cns = [str(a.value).lower() for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(cns) > 1 or (cns and cns[0] != name):
        raise InvalidArgument(f"CSR common name {cns} does not match {name!r}")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    except ValueError as exc:
        raise InvalidArgument(f"CSR extensions are malformed: {exc}") from exc
    if san is not None:
        dns = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
        if len(san) != 1 or dns != [name]:
            raise InvalidArgument(f"CSR subjectAltName must be exactly DNS:{name}")
    if not cns and san is None:
        raise InvalidArgument(f"CSR names nothing; it must name {name!r}")
    if valid_for <= datetime.timedelta(0):
        raise InvalidArgument("validity must be positive")
    return _sign_leaf(
        ca, dns_name=name, public_key=public_key, valid_for=valid_for, now=now, serial=serial
    )


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class PeerIdentity:
    """Who a verified TLS peer is."""

    name: str
    kind: PeerKind
    certificate: x509.Certificate


@dataclass(frozen=True)
class TrustStore:
    """The root and the two intermediates a verifier trusts, plus a revocation check.

    An intermediate given as ``None`` is taken from the peer's presented chain and only has
    to chain to the root and not be the other role's intermediate, which must then be known
    (a node holding root + node CA can still verify services); the name constraints of
    ``init_pki`` intermediates still apply. Holding both is stronger.
    ``is_revoked`` is called with the leaf and the intermediate of a verified chain.
    """

    root: x509.Certificate
    node_ca: x509.Certificate | None = None
    service_ca: x509.Certificate | None = None
    is_revoked: Callable[[x509.Certificate], bool] | None = None

    def intermediate(self, kind: PeerKind) -> x509.Certificate | None:
        """The trusted intermediate of ``kind``, if known."""
        return self.node_ca if kind == "node" else self.service_ca


def _other(kind: PeerKind) -> PeerKind:
    return "service" if kind == "node" else "node"


def _try_kind(
    leaf: x509.Certificate,
    presented: Sequence[x509.Certificate],
    *,
    trust: TrustStore,
    kind: PeerKind,
    now: datetime.datetime,
) -> list[x509.Certificate] | None:
    """The verified chain [leaf, intermediate, root] through ``kind``'s CA, or None."""
    known = trust.intermediate(kind)
    other = trust.intermediate(_other(kind))
    if known is not None:
        if leaf.issuer != known.subject:
            return None
        intermediates = [known]
    else:
        if other is None:
            # Knowing neither intermediate, the role of a presented one cannot be told.
            return None
        intermediates = [
            c
            for c in presented
            if c.subject == leaf.issuer and not (other is not None and _same_cert(c, other))
        ]
        if not intermediates:
            return None
    for ca in intermediates:
        if _utc(ca.not_valid_after_utc) < now:
            raise Expired(f"the {kind} CA certificate expired at {ca.not_valid_after_utc}")
    verifier = (
        PolicyBuilder()
        .store(Store([trust.root]))
        .time(now)
        .max_chain_depth(1)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise Unauthenticated(f"certificate chain does not verify: {exc}") from exc
    chain = list(verified.chain)
    # Leaf, intermediate, root: nothing issued by the root directly, nothing deeper.
    if len(chain) != 3 or not _same_cert(chain[2], trust.root):
        raise Unauthenticated(f"certificate does not chain through the {kind} CA")
    if other is not None and _same_cert(chain[1], other):
        raise Unauthenticated(
            f"certificate chains through the {_other(kind)} CA, not the {kind} CA"
        )
    if known is not None and not _same_cert(chain[1], known):
        raise Unauthenticated(f"certificate does not chain through the {kind} CA")
    return chain


def verify_peer(
    chain: Sequence[x509.Certificate],
    *,
    trust: TrustStore,
    expect: PeerKind | Literal["any"],
    expected_name: str | None,
    now: datetime.datetime,
) -> PeerIdentity:
    """Verify a TLS peer's chain (leaf first) and return who it is.

    ``expect`` is the role the peer must have: ``node`` (chains through the node CA),
    ``service`` (through the service CA) or ``any`` (either; the identity says which).
    Raises ``Unauthenticated`` (no, self-signed, foreign or malformed chain, wrong role),
    ``Expired``, ``Revoked`` or ``PermissionDenied`` (name is not ``expected_name``).
    """
    if not chain:
        raise Unauthenticated("peer presented no certificate")
    now = _utc(now)
    leaf, presented = chain[0], list(chain[1:])
    if _is_self_signed(leaf):
        raise Unauthenticated("peer presented a self-signed certificate")
    names, label = _check_validity(leaf, now)
    kinds: tuple[PeerKind, ...] = ("node", "service") if expect == "any" else (expect,)
    verified: list[x509.Certificate] | None = None
    kind: PeerKind = kinds[0]
    for kind in kinds:
        verified = _try_kind(leaf, presented, trust=trust, kind=kind, now=now)
        if verified is not None:
            break
    if verified is None:
        if expect != "any":
            other = trust.intermediate(_other(expect))
            if other is not None and leaf.issuer == other.subject:
                raise Unauthenticated(
                    f"{label} has a {_other(expect)} certificate where a {expect} is expected"
                )
        raise Unauthenticated(
            f"certificate of {label} is not issued by a trusted "
            f"{'CA' if expect == 'any' else expect + ' CA'}"
        )
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise Unauthenticated(f"certificate of {label} has no extended key usage") from exc
    if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise Unauthenticated(f"certificate of {label} lacks serverAuth")
    return _identity(verified[:2], names, trust=trust, kind=kind, expected_name=expected_name)


def verify_resumed(
    leaf: x509.Certificate,
    *,
    kind: PeerKind,
    trust: TrustStore,
    expect: PeerKind | Literal["any"],
    expected_name: str | None,
    now: datetime.datetime,
) -> PeerIdentity:
    """The identity of a resumed TLS session, re-checked: ``leaf`` and ``kind`` come from
    a session ticket sealed by a replica of this service after ``verify_peer`` accepted
    the chain, so the chain is not verified again; validity, role, revocation (of the leaf
    and of the trusted intermediate of ``kind``) and the name are, as ``verify_peer`` does.
    """
    names, label = _check_validity(leaf, _utc(now))
    if expect not in ("any", kind):
        raise Unauthenticated(f"{label} has a {kind} certificate where a {expect} is expected")
    ca = trust.intermediate(kind)
    return _identity(
        [leaf] if ca is None else [leaf, ca],
        names,
        trust=trust,
        kind=kind,
        expected_name=expected_name,
    )


def _check_validity(leaf: x509.Certificate, now: datetime.datetime) -> tuple[list[str], str]:
    """The leaf's DNS names and a label for messages; ``Expired`` or ``Unauthenticated``
    outside its validity."""
    names = certificate_dns_names(leaf)
    label = names[0] if names else leaf.subject.rfc4514_string()
    if _utc(leaf.not_valid_after_utc) < now:
        raise Expired(f"certificate of {label} expired at {leaf.not_valid_after_utc}")
    if _utc(leaf.not_valid_before_utc) > now:
        raise Unauthenticated(
            f"certificate of {label} is not valid before {leaf.not_valid_before_utc}"
        )
    return names, label


def _identity(
    checked: Sequence[x509.Certificate],
    names: list[str],
    *,
    trust: TrustStore,
    kind: PeerKind,
    expected_name: str | None,
) -> PeerIdentity:
    # Revocation of the leaf and its intermediate, then the name: shared by both checks.
    leaf = checked[0]
    label = names[0] if names else leaf.subject.rfc4514_string()
    if trust.is_revoked is not None:
        for cert in checked:
            if trust.is_revoked(cert):
                what = "certificate" if cert is leaf else f"issuing {kind} CA"
                raise Revoked(f"{what} of {label} is revoked (serial {cert.serial_number:x})")
    if not names:
        raise Unauthenticated(f"certificate of {label} names no DNS name")
    if expected_name is not None and expected_name.lower().rstrip(".") not in names:
        raise PermissionDenied(f"peer is {names[0]}, expected {expected_name}")
    return PeerIdentity(name=names[0], kind=kind, certificate=leaf)


# --------------------------------------------------------------------------- files


def atomic_write(path: Path | str, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``) so that a reader sees the old
    content or the new, never a partial file or a key with loose permissions."""
    # A temporary file in the same directory, created with the final mode, fsynced, renamed.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_private_key(path: Path | str, key: CertificateIssuerPrivateKeyTypes) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600, atomically."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(path, data, mode=0o600)


def load_private_key(path: Path | str) -> CertificateIssuerPrivateKeyTypes:
    """Load a PEM private key (EC, RSA or Ed25519); ``InvalidArgument`` if unusable."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # The message never contains key bytes; only the path.
        raise InvalidArgument(f"{path}: not a usable unencrypted PEM private key") from exc
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise InvalidArgument(f"{path}: unsupported private key type {type(key).__name__}")
    return key


def write_certificates(path: Path | str, certs: Sequence[x509.Certificate]) -> None:
    """Write ``certs`` as concatenated PEM (leaf first), mode 0644, atomically."""
    data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    atomic_write(path, data, mode=0o644)


def load_certificates(path: Path | str) -> list[x509.Certificate]:
    """Load every PEM certificate in ``path`` (leaf first); ``InvalidArgument`` if none."""
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError as exc:
        raise InvalidArgument(f"{path}: not a PEM certificate file: {exc}") from exc
    if not certs:
        raise InvalidArgument(f"{path}: no certificate")
    return certs


def load_identity(cert_path: Path | str, key_path: Path | str) -> CertifiedKey:
    """Load a certificate chain file and its key; ``InvalidArgument`` if they do not match."""
    certs = load_certificates(cert_path)
    key = load_private_key(key_path)
    if certs[0].public_key() != key.public_key():
        raise InvalidArgument(f"{key_path} is not the key of {cert_path}")
    return CertifiedKey(key=key, cert=certs[0], chain=certs[1:])


NEW_SUFFIX = ".new"
PREV_SUFFIX = ".prev"


def _with_suffix(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _matching(cert_path: Path, key_path: Path) -> CertifiedKey | None:
    if not (cert_path.exists() and key_path.exists()):
        return None
    try:
        return load_identity(cert_path, key_path)
    except InvalidArgument:
        return None


def write_identity(
    cert_path: Path | str,
    key_path: Path | str,
    *,
    key: CertificateIssuerPrivateKeyTypes,
    certs: Sequence[x509.Certificate],
) -> None:
    """Replace a private key and its certificate chain as a pair (e.g. after a renewal).

    1. write ``<key>.new`` (0600) and ``<cert>.new``, each atomically and fsynced;
    2. keep the pair in place as ``<key>.prev`` and ``<cert>.prev``;
    3. rename the new key, then the new certificate, into place; fsync the directory;
    4. remove the ``.prev`` pair.

    A crash at any step leaves a matching pair that ``recover_identity`` completes or
    restores: the holder is never left with a key that does not fit its certificate.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    if not certs or certs[0].public_key() != key.public_key():
        raise InvalidArgument(f"the certificate for {cert_path} is not for the key given")
    write_private_key(_with_suffix(key_path, NEW_SUFFIX), key)
    write_certificates(_with_suffix(cert_path, NEW_SUFFIX), certs)
    if _matching(cert_path, key_path) is not None:
        atomic_write(_with_suffix(key_path, PREV_SUFFIX), key_path.read_bytes(), mode=0o600)
        atomic_write(_with_suffix(cert_path, PREV_SUFFIX), cert_path.read_bytes(), mode=0o644)
    os.replace(_with_suffix(key_path, NEW_SUFFIX), key_path)
    os.replace(_with_suffix(cert_path, NEW_SUFFIX), cert_path)
    _fsync_dir(key_path.parent)
    if cert_path.parent != key_path.parent:
        _fsync_dir(cert_path.parent)
    for leftover in (_with_suffix(key_path, PREV_SUFFIX), _with_suffix(cert_path, PREV_SUFFIX)):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def recover_identity(cert_path: Path | str, key_path: Path | str) -> CertifiedKey:
    """Load a key and its certificate chain, first finishing or undoing a ``write_identity``
    that was interrupted; ``InvalidArgument`` when no matching pair is left.

    Preference: a complete staged new pair (the renewal finishes), the pair in place,
    the previous pair (the renewal is undone). Leftover staged files are removed.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    new_cert, new_key = _with_suffix(cert_path, NEW_SUFFIX), _with_suffix(key_path, NEW_SUFFIX)
    prev_cert = _with_suffix(cert_path, PREV_SUFFIX)
    prev_key = _with_suffix(key_path, PREV_SUFFIX)
    if _matching(new_cert, new_key) is not None:
        os.replace(new_key, key_path)
        os.replace(new_cert, cert_path)
    elif _matching(new_cert, key_path) is not None:
        # Interrupted between the two renames: the key in place is already the new one.
        os.replace(new_cert, cert_path)
    identity = _matching(cert_path, key_path)
    if identity is None and _matching(prev_cert, prev_key) is not None:
        os.replace(prev_key, key_path)
        os.replace(prev_cert, cert_path)
        identity = _matching(cert_path, key_path)
    if identity is None:
        raise InvalidArgument(
            f"{key_path} and {cert_path} are not a matching key and "
            "certificate, and no earlier pair is left"
        )
    for leftover in (new_cert, new_key, prev_cert, prev_key):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    return identity


def load_trust_store(
    directory: Path | str,
    *,
    is_revoked: Callable[[x509.Certificate], bool] | None = None,
) -> TrustStore:
    """A TrustStore from ``root-ca.crt`` and, where present, ``node-ca.crt``/``service-ca.crt``."""
    directory = Path(directory)
    root = load_certificates(directory / ROOT_CA_CERT)[0]

    def optional(name: str) -> x509.Certificate | None:
        path = directory / name
        return load_certificates(path)[0] if path.exists() else None

    return TrustStore(
        root=root,
        node_ca=optional(NODE_CA_CERT),
        service_ca=optional(SERVICE_CA_CERT),
        is_revoked=is_revoked,
    )


@dataclass(frozen=True)
class PkiMaterial:
    """What ``init_pki`` produced or found; ``root.key`` is None if only the cert was there."""

    root_cert: x509.Certificate
    node_ca: CertifiedKey
    service_ca: CertifiedKey
    services: dict[str, CertifiedKey]
    created: list[str]

    @property
    def trust(self) -> TrustStore:
        """A TrustStore holding the root and both intermediates."""
        return TrustStore(
            root=self.root_cert, node_ca=self.node_ca.cert, service_ca=self.service_ca.cert
        )


def _node_ca_constraints(domain: str) -> x509.NameConstraints:
    return x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(domain)],
        excluded_subtrees=[x509.DNSName(f"svc.{domain}")],
    )


def _service_ca_constraints(domain: str) -> x509.NameConstraints:
    return x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(f"svc.{domain}")], excluded_subtrees=None
    )


def init_pki(
    directory: Path | str,
    *,
    domain: str = DEFAULT_DOMAIN,
    now: datetime.datetime,
    services: Sequence[str] = SERVICES,
) -> PkiMaterial:
    """Create (or complete) a PKI directory: root, node CA, service CA, service certificates.

    Files already present are kept and used: an operator may bring their own root (cert and
    key) or their own intermediates (cert and key each; the root key is then not needed).
    Only missing files are created. Returns the material and the names of created files.
    """
    directory = Path(directory)
    domain = validate_dns_name(domain)
    directory.mkdir(parents=True, exist_ok=True)
    created: list[str] = []

    def have(*names: str) -> bool:
        return all((directory / n).exists() for n in names)

    root: CertifiedKey | None = None
    if have(ROOT_CA_CERT, ROOT_CA_KEY):
        root = load_identity(directory / ROOT_CA_CERT, directory / ROOT_CA_KEY)
        root_cert = root.cert
    elif have(ROOT_CA_CERT):
        root_cert = load_certificates(directory / ROOT_CA_CERT)[0]
    else:
        root = create_root_ca(f"CYPHONIC root CA ({domain})", now=now)
        write_private_key(directory / ROOT_CA_KEY, root.key)
        write_certificates(directory / ROOT_CA_CERT, [root.cert])
        created += [ROOT_CA_CERT, ROOT_CA_KEY]
        root_cert = root.cert

    def intermediate(
        cert_name: str, key_name: str, common_name: str, constraints: x509.NameConstraints
    ) -> CertifiedKey:
        nonlocal created
        if have(cert_name, key_name):
            loaded = load_identity(directory / cert_name, directory / key_name)
            return CertifiedKey(key=loaded.key, cert=loaded.cert, chain=[])
        if root is None:
            raise InvalidArgument(
                f"{cert_name} is missing and {ROOT_CA_KEY} is not available to create it"
            )
        ca = create_intermediate_ca(root, common_name, now=now, name_constraints=constraints)
        write_private_key(directory / key_name, ca.key)
        write_certificates(directory / cert_name, [ca.cert])
        created += [cert_name, key_name]
        return ca

    node_ca = intermediate(
        NODE_CA_CERT, NODE_CA_KEY, f"CYPHONIC node CA ({domain})", _node_ca_constraints(domain)
    )
    service_ca = intermediate(
        SERVICE_CA_CERT,
        SERVICE_CA_KEY,
        f"CYPHONIC service CA ({domain})",
        _service_ca_constraints(domain),
    )
    issued: dict[str, CertifiedKey] = {}
    for svc in services:
        crt, key = directory / f"{svc}.crt", directory / f"{svc}.key"
        if crt.exists() and key.exists():
            issued[svc] = load_identity(crt, key)
            continue
        identity = issue_service_certificate(service_ca, service_name(svc, domain), now=now)
        write_private_key(key, identity.key)
        write_certificates(crt, identity.full_chain)
        created += [crt.name, key.name]
        issued[svc] = identity
    return PkiMaterial(
        root_cert=root_cert,
        node_ca=node_ca,
        service_ca=service_ca,
        services=issued,
        created=created,
    )
