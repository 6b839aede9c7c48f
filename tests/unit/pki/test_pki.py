"""cyphonic.pki: chains, each refusal of verify_peer, CSR checks, key and certificate files."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from cyphonic import pki
from cyphonic.errors import Expired, InvalidArgument, PermissionDenied, Revoked, Unauthenticated

NOW = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)
DOMAIN = "cyphonic.internal"


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiMaterial:
    return pki.init_pki(tmp_path_factory.mktemp("pki"), domain=DOMAIN, now=NOW)


def _node(material: pki.PkiMaterial, name: str = "alice", **kw: object) -> pki.CertifiedKey:
    key = pki.generate_key()
    fqdn = f"{name}.{DOMAIN}"
    cert = pki.sign_node_csr(material.node_ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=NOW, **kw)  # type: ignore[arg-type]
    return pki.CertifiedKey(key=key, cert=cert, chain=[material.node_ca.cert])


# ------------------------------------------------------------------ chains that verify


def test_service_chain_verifies_with_expected_name(material: pki.PkiMaterial) -> None:
    nms = material.services["nms"]
    peer = pki.verify_peer(
        nms.full_chain,
        trust=material.trust,
        expect="service",
        expected_name=f"nms.svc.{DOMAIN}",
        now=NOW,
    )
    assert peer.name == f"nms.svc.{DOMAIN}"
    assert peer.kind == "service"
    assert peer.certificate == nms.cert


def test_node_chain_verifies_and_any_reports_kind(material: pki.PkiMaterial) -> None:
    node = _node(material)
    peer = pki.verify_peer(
        node.full_chain,
        trust=material.trust,
        expect="node",
        expected_name=f"ALICE.{DOMAIN}.",
        now=NOW,
    )
    assert (peer.name, peer.kind) == (f"alice.{DOMAIN}", "node")
    assert (
        pki.verify_peer(
            [node.cert], trust=material.trust, expect="any", expected_name=None, now=NOW
        ).kind
        == "node"
    )
    assert (
        pki.verify_peer(
            material.services["as"].full_chain,
            trust=material.trust,
            expect="any",
            expected_name=None,
            now=NOW,
        ).kind
        == "service"
    )


def test_node_cert_properties(material: pki.PkiMaterial) -> None:
    node = _node(material)
    assert pki.certificate_dns_names(node.cert) == [f"alice.{DOMAIN}"]
    eku = node.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert x509.ExtendedKeyUsageOID.SERVER_AUTH in eku
    lifetime = node.cert.not_valid_after_utc - NOW
    assert lifetime == pki.NODE_CERT_VALIDITY
    assert node.cert.serial_number > 0
    assert node.cert.serial_number.bit_length() <= 128
    assert _node(material).cert.serial_number != node.cert.serial_number


def test_node_without_service_ca_file_still_verifies_services(
    material: pki.PkiMaterial,
) -> None:
    # An agent holds root + node CA (from node.crt); the service CA comes from the peer.
    trust = pki.TrustStore(root=material.root_cert, node_ca=material.node_ca.cert)
    peer = pki.verify_peer(
        material.services["as"].full_chain,
        trust=trust,
        expect="service",
        expected_name=f"as.svc.{DOMAIN}",
        now=NOW,
    )
    assert peer.kind == "service"
    node = _node(material)
    with pytest.raises(Unauthenticated):
        pki.verify_peer(node.full_chain, trust=trust, expect="service", expected_name=None, now=NOW)


# ------------------------------------------------------------------ refusals


def test_empty_chain_refused(material: pki.PkiMaterial) -> None:
    with pytest.raises(Unauthenticated, match="no certificate"):
        pki.verify_peer([], trust=material.trust, expect="node", expected_name=None, now=NOW)


def test_self_signed_refused(material: pki.PkiMaterial) -> None:
    own = pki.create_root_ca(f"alice.{DOMAIN}", now=NOW)
    with pytest.raises(Unauthenticated, match="self-signed"):
        pki.verify_peer(
            [own.cert], trust=material.trust, expect="node", expected_name=None, now=NOW
        )


def test_foreign_root_refused_even_with_same_names(
    material: pki.PkiMaterial, tmp_path: Path
) -> None:
    # A second PKI with identical CA names: the issuer matches, the signature does not.
    foreign = pki.init_pki(tmp_path, domain=DOMAIN, now=NOW)
    assert foreign.node_ca.cert.subject == material.node_ca.cert.subject
    key = pki.generate_key()
    fqdn = f"mallory.{DOMAIN}"
    cert = pki.sign_node_csr(foreign.node_ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=NOW)
    with pytest.raises(Unauthenticated):
        pki.verify_peer(
            [cert, foreign.node_ca.cert],
            trust=material.trust,
            expect="node",
            expected_name=None,
            now=NOW,
        )
    with pytest.raises(Unauthenticated):
        pki.verify_peer(
            foreign.services["nms"].full_chain,
            trust=material.trust,
            expect="service",
            expected_name=None,
            now=NOW,
        )


def test_leaf_signed_by_root_directly_refused(tmp_path: Path) -> None:
    own = pki.init_pki(tmp_path, domain=DOMAIN, now=NOW)
    root_ck = pki.load_identity(tmp_path / "root-ca.crt", tmp_path / "root-ca.key")
    leaf = pki.issue_service_certificate(root_ck, f"nms.svc.{DOMAIN}", now=NOW)
    assert leaf.chain == []
    with pytest.raises(Unauthenticated):
        pki.verify_peer(
            leaf.full_chain, trust=own.trust, expect="service", expected_name=None, now=NOW
        )


def test_wrong_role_refused_both_ways(material: pki.PkiMaterial) -> None:
    node = _node(material)
    with pytest.raises(Unauthenticated, match="node certificate where a service"):
        pki.verify_peer(
            node.full_chain, trust=material.trust, expect="service", expected_name=None, now=NOW
        )
    with pytest.raises(Unauthenticated, match="service certificate where a node"):
        pki.verify_peer(
            material.services["nms"].full_chain,
            trust=material.trust,
            expect="node",
            expected_name=None,
            now=NOW,
        )


def test_node_ca_cannot_issue_service_names(material: pki.PkiMaterial) -> None:
    # The AS must refuse such names anyway; the name constraint is the second wall.
    key = pki.generate_key()
    fqdn = f"nms.svc.{DOMAIN}"
    cert = pki.sign_node_csr(material.node_ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=NOW)
    with pytest.raises(Unauthenticated, match="name constraint"):
        pki.verify_peer([cert], trust=material.trust, expect="node", expected_name=None, now=NOW)


def test_expired_and_not_yet_valid(material: pki.PkiMaterial) -> None:
    node = _node(material)
    later = NOW + pki.NODE_CERT_VALIDITY + datetime.timedelta(seconds=1)
    with pytest.raises(Expired):
        pki.verify_peer(
            node.full_chain, trust=material.trust, expect="node", expected_name=None, now=later
        )
    with pytest.raises(Unauthenticated, match="not valid before"):
        pki.verify_peer(
            node.full_chain,
            trust=material.trust,
            expect="node",
            expected_name=None,
            now=NOW - datetime.timedelta(hours=1),
        )


def test_revoked_leaf_and_revoked_intermediate(material: pki.PkiMaterial) -> None:
    node = _node(material)
    other = _node(material, "bob")
    revoked_serials = {node.cert.serial_number}
    trust = pki.TrustStore(
        root=material.root_cert,
        node_ca=material.node_ca.cert,
        service_ca=material.service_ca.cert,
        is_revoked=lambda c: c.serial_number in revoked_serials,
    )
    with pytest.raises(Revoked):
        pki.verify_peer(node.full_chain, trust=trust, expect="node", expected_name=None, now=NOW)
    assert (
        pki.verify_peer(
            other.full_chain, trust=trust, expect="node", expected_name=None, now=NOW
        ).name
        == f"bob.{DOMAIN}"
    )
    revoked_serials.add(material.node_ca.cert.serial_number)
    with pytest.raises(Revoked, match="issuing node CA"):
        pki.verify_peer(other.full_chain, trust=trust, expect="node", expected_name=None, now=NOW)


def test_wrong_name_is_permission_denied(material: pki.PkiMaterial) -> None:
    with pytest.raises(PermissionDenied, match="expected"):
        pki.verify_peer(
            material.services["as"].full_chain,
            trust=material.trust,
            expect="service",
            expected_name=f"nms.svc.{DOMAIN}",
            now=NOW,
        )


def test_leaf_without_server_auth_refused(material: pki.PkiMaterial) -> None:
    key = pki.generate_key()
    ca = material.node_ca
    fqdn = f"carol.{DOMAIN}"
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqdn)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(fqdn)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    with pytest.raises(Unauthenticated, match="serverAuth"):
        pki.verify_peer([cert], trust=material.trust, expect="node", expected_name=None, now=NOW)


# ------------------------------------------------------------------ CSR checks


def _csr(key: object, *, cn: str | None, sans: list[str] | None) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    )
    if sans is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cn", "sans", "message"),
    [
        ("bob.cyphonic.internal", None, "common name"),
        (None, ["alice.cyphonic.internal", "bob.cyphonic.internal"], "exactly"),
        (None, ["bob.cyphonic.internal"], "exactly"),
        ("alice.cyphonic.internal", ["alice.cyphonic.internal", "x.cyphonic.internal"], "exactly"),
        (None, None, "names nothing"),
    ],
)
def test_csr_must_name_exactly_the_fqdn(
    material: pki.PkiMaterial, cn: str | None, sans: list[str] | None, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        pki.sign_node_csr(
            material.node_ca,
            _csr(pki.generate_key(), cn=cn, sans=sans),
            fqdn=f"alice.{DOMAIN}",
            now=NOW,
        )


@pytest.mark.parametrize(
    ("cn", "sans"), [("alice.cyphonic.internal", None), (None, ["alice.cyphonic.internal"])]
)
def test_csr_with_cn_or_san_only_is_accepted(
    material: pki.PkiMaterial, cn: str | None, sans: list[str] | None
) -> None:
    cert = pki.sign_node_csr(
        material.node_ca,
        _csr(pki.generate_key(), cn=cn, sans=sans),
        fqdn=f"alice.{DOMAIN}",
        now=NOW,
    )
    assert pki.certificate_dns_names(cert) == [f"alice.{DOMAIN}"]


def test_csr_key_types(material: pki.PkiMaterial) -> None:
    fqdn = f"alice.{DOMAIN}"
    for bad in (
        ec.generate_private_key(ec.SECP256K1()),
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(public_exponent=65537, key_size=1024),
    ):
        with pytest.raises(InvalidArgument, match="CSR key"):
            pki.sign_node_csr(material.node_ca, pki.make_csr(bad, fqdn), fqdn=fqdn, now=NOW)
    good = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = pki.sign_node_csr(material.node_ca, pki.make_csr(good, fqdn), fqdn=fqdn, now=NOW)
    assert (
        pki.verify_peer(
            [cert], trust=material.trust, expect="node", expected_name=fqdn, now=NOW
        ).name
        == fqdn
    )


def test_csr_with_bad_signature_refused(material: pki.PkiMaterial) -> None:
    fqdn = f"alice.{DOMAIN}"
    der = bytearray(pki.make_csr(pki.generate_key(), fqdn).public_bytes(Encoding.DER))
    der[-3] ^= 0x01  # inside the ECDSA signature
    csr = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(InvalidArgument, match="signature"):
        pki.sign_node_csr(material.node_ca, csr, fqdn=fqdn, now=NOW)


def test_bad_fqdn_refused(material: pki.PkiMaterial) -> None:
    for bad in ("", "-a.example", "a..b", "under_score.example", "x" * 64 + ".example"):
        with pytest.raises(InvalidArgument):
            pki.validate_dns_name(bad)


def test_explicit_serial_and_validity(material: pki.PkiMaterial) -> None:
    fqdn = f"alice.{DOMAIN}"
    cert = pki.sign_node_csr(
        material.node_ca,
        pki.make_csr(pki.generate_key(), fqdn),
        fqdn=fqdn,
        now=NOW,
        serial=12345,
        valid_for=datetime.timedelta(days=2),
    )
    assert cert.serial_number == 12345
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=2)


# ------------------------------------------------------------------ files


def test_private_key_file_is_0600_and_round_trips(tmp_path: Path) -> None:
    key = pki.generate_key()
    path = tmp_path / "sub" / "node.key"
    pki.write_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = pki.load_private_key(path)
    assert loaded.public_key() == key.public_key()
    # Overwriting keeps 0600 and leaves no temporary files behind.
    pki.write_private_key(path, pki.generate_key())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["node.key"]


def test_load_private_key_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    path.write_text("not a key")
    with pytest.raises(InvalidArgument):
        pki.load_private_key(path)


def test_certificates_round_trip_and_identity_mismatch(
    material: pki.PkiMaterial, tmp_path: Path
) -> None:
    node = _node(material)
    pki.write_certificates(tmp_path / "node.crt", node.full_chain)
    assert pki.load_certificates(tmp_path / "node.crt") == node.full_chain
    pki.write_private_key(tmp_path / "node.key", node.key)
    ident = pki.load_identity(tmp_path / "node.crt", tmp_path / "node.key")
    assert ident.cert == node.cert and ident.chain == [material.node_ca.cert]
    pki.write_private_key(tmp_path / "other.key", pki.generate_key())
    with pytest.raises(InvalidArgument, match="not the key"):
        pki.load_identity(tmp_path / "node.crt", tmp_path / "other.key")
    (tmp_path / "empty.crt").write_text("")
    with pytest.raises(InvalidArgument):
        pki.load_certificates(tmp_path / "empty.crt")


def test_init_pki_layout_modes_and_idempotence(tmp_path: Path) -> None:
    first = pki.init_pki(tmp_path, domain="example.net", now=NOW)
    expected = {
        "root-ca.crt",
        "root-ca.key",
        "node-ca.crt",
        "node-ca.key",
        "service-ca.crt",
        "service-ca.key",
        "as.crt",
        "as.key",
        "nms.crt",
        "nms.key",
        "trs.crt",
        "trs.key",
    }
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert set(first.created) == expected
    for name in expected:
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), name
    nms_chain = pki.load_certificates(tmp_path / "nms.crt")
    assert len(nms_chain) == 2
    assert pki.certificate_dns_names(nms_chain[0]) == ["nms.svc.example.net"]
    trust = pki.load_trust_store(tmp_path)
    assert (
        pki.verify_peer(
            nms_chain, trust=trust, expect="service", expected_name="nms.svc.example.net", now=NOW
        ).kind
        == "service"
    )
    again = pki.init_pki(tmp_path, domain="example.net", now=NOW)
    assert again.created == []
    assert again.services["nms"].cert == first.services["nms"].cert


def test_init_pki_with_operator_intermediates_only(tmp_path: Path) -> None:
    # An operator keeps the root key offline: only root cert and intermediates are given.
    src = pki.init_pki(tmp_path / "src", now=NOW)
    dst = tmp_path / "dst"
    dst.mkdir()
    for name in ("root-ca.crt", "node-ca.crt", "node-ca.key", "service-ca.crt", "service-ca.key"):
        (dst / name).write_bytes((tmp_path / "src" / name).read_bytes())
    made = pki.init_pki(dst, now=NOW)
    assert set(made.created) == {"as.crt", "as.key", "nms.crt", "nms.key", "trs.crt", "trs.key"}
    assert not (dst / "root-ca.key").exists()
    assert (
        pki.verify_peer(
            made.services["trs"].full_chain,
            trust=src.trust,
            expect="service",
            expected_name=f"trs.svc.{DOMAIN}",
            now=NOW,
        ).kind
        == "service"
    )
    (dst / "node-ca.key").unlink()
    with pytest.raises(InvalidArgument, match=r"root-ca\.key"):
        pki.init_pki(dst, now=NOW)
