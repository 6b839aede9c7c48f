"""The AS's sans-I/O rules: names, tokens, CSR parsing, login checks, the CRL."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cyphonic.errors import Expired, InvalidArgument, PermissionDenied, Revoked, Unauthenticated
from cyphonic.pki import create_intermediate_ca, create_root_ca, generate_key, make_csr
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_auth.enrolment import (
    CrlEntry,
    TokenRefused,
    build_crl,
    check_certificate,
    check_peer_kind,
    check_token,
    hash_token,
    new_token,
    node_fqdn,
    parse_csr,
    refusal_reason,
    serial_hex,
    token_expiry,
    validate_node_name,
)
from hypothesis import given
from hypothesis import strategies as st

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("name", ["a", "laptop", "node-1", "x" * 63, "0", "a-b-c"])
def test_valid_node_names(name: str) -> None:
    assert validate_node_name(name) == name
    assert node_fqdn(name, "cyphonic.internal") == f"{name}.cyphonic.internal"


def test_names_are_lower_cased() -> None:
    assert validate_node_name(" Laptop ") == "laptop"


@pytest.mark.parametrize("name", ["", "-a", "a-", "a.b", "a_b", "x" * 64, "é", "a b", "svc"])
def test_invalid_node_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_node_name(name)


@given(st.text(max_size=80))
def test_any_accepted_name_is_a_dns_label(name: str) -> None:
    try:
        label = validate_node_name(name)
    except InvalidArgument:
        return
    assert 1 <= len(label) <= 63
    assert set(label) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert not label.startswith("-") and not label.endswith("-")


def test_tokens_are_random_and_only_hashes_are_kept() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    token = tokens.pop()
    assert token.startswith("cye_") and len(token) >= 40
    digest = hash_token(token)
    assert len(digest) == 64 and token not in digest
    assert hash_token(token + "\n") == digest  # pasted with a newline still matches
    assert hash_token(new_token()) != digest


def test_token_checks() -> None:
    expires = NOW + timedelta(hours=1)
    check_token(used_at=None, expires_at=expires, node_state="pending", now=NOW)
    check_token(used_at=None, expires_at=expires, node_state="active", now=NOW)
    cases = [
        ({"used_at": NOW}, "used"),
        ({"node_state": "revoked"}, "node_revoked"),
        ({"now": expires}, "expired"),
        ({"now": expires + timedelta(seconds=1)}, "expired"),
    ]
    for change, reason in cases:
        args = {
            "used_at": None,
            "expires_at": expires,
            "node_state": "pending",
            "now": NOW,
            **change,
        }
        with pytest.raises(TokenRefused) as info:
            check_token(**args)  # type: ignore[arg-type]
        assert info.value.reason == reason
        assert info.value.code == pb.ERROR_CODE_TOKEN_INVALID
        assert refusal_reason(info.value) == f"token_{reason}"


def test_token_expiry_needs_a_positive_lifetime() -> None:
    assert token_expiry(now=NOW, ttl=timedelta(minutes=5)) == NOW + timedelta(minutes=5)
    with pytest.raises(InvalidArgument):
        token_expiry(now=NOW, ttl=timedelta(0))


def test_parse_csr_accepts_pem_and_der_only() -> None:
    csr = make_csr(generate_key(), "a.cyphonic.internal")
    pem = csr.public_bytes(serialization.Encoding.PEM)
    der = csr.public_bytes(serialization.Encoding.DER)
    assert parse_csr(pem.decode()) == csr
    assert parse_csr(der) == csr
    for garbage in ("", "   ", "hello", b"\x30\x00", pem[:-40], "A" * 20_000):
        with pytest.raises(InvalidArgument):
            parse_csr(garbage)


@given(st.binary(max_size=512))
def test_parse_csr_never_raises_anything_but_invalid_argument(data: bytes) -> None:
    with contextlib.suppress(InvalidArgument):
        parse_csr(data)


def test_certificate_checks() -> None:
    ok = {
        "status": "active",
        "not_before": NOW - timedelta(days=1),
        "not_after": NOW + timedelta(days=1),
        "node_state": "active",
        "now": NOW,
    }
    check_certificate(**ok)  # type: ignore[arg-type]
    check_certificate(**{**ok, "status": "superseded"})  # type: ignore[arg-type]
    for change, error in (
        ({"status": "revoked"}, Revoked),
        ({"node_state": "revoked"}, Revoked),
        ({"now": NOW + timedelta(days=1)}, Expired),
        ({"now": NOW - timedelta(days=2)}, Unauthenticated),
    ):
        with pytest.raises(error):
            check_certificate(**{**ok, **change})  # type: ignore[arg-type]
    check_peer_kind("node")
    with pytest.raises(PermissionDenied):
        check_peer_kind("service")


def test_serials_are_lower_hex_without_padding() -> None:
    assert serial_hex(0x00AB) == "ab"
    assert serial_hex(2**127 + 5) == format(2**127 + 5, "x")


def test_crl_is_signed_and_lists_entries() -> None:
    root = create_root_ca("root", now=NOW - timedelta(days=1))
    ca = create_intermediate_ca(root, "node-ca", now=NOW - timedelta(days=1))
    entries = [
        CrlEntry(serial="abc", revoked_at=NOW - timedelta(hours=1), reason="key_compromise"),
        CrlEntry(serial="1f", revoked_at=NOW, reason="lost in a taxi"),
        CrlEntry(serial="2e", revoked_at=NOW, reason="superseded"),
    ]
    crl = x509.load_der_x509_crl(
        build_crl(ca=ca, entries=entries, number=7, now=NOW, valid_for=timedelta(hours=24))
    )
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc == NOW + timedelta(hours=24)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    first = crl.get_revoked_certificate_by_serial_number(0xABC)
    assert first is not None
    reason = first.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    free_text = crl.get_revoked_certificate_by_serial_number(0x1F)
    assert free_text is not None and len(free_text.extensions) == 0
    superseded = crl.get_revoked_certificate_by_serial_number(0x2E)
    assert superseded is not None
    assert superseded.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.superseded
    )
    assert crl.get_revoked_certificate_by_serial_number(0x99) is None
