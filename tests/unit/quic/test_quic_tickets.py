"""Session tickets (``cyphonic.quic.tickets``) and the identity check at resumption
(``cyphonic.pki.verify_resumed``), in memory with an explicit clock."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cyphonic import pki
from cyphonic.errors import Expired, InvalidArgument, Revoked, TokenInvalid, Unauthenticated
from cyphonic.quic.tickets import MAX_LIFETIME, MAX_TICKET, TicketKeys, TicketState

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
T0 = 1_800_000_000.0


def _state(**changes: object) -> TicketState:
    state = TicketState(
        resumption_secret=b"s" * 32,
        cipher_suite=0x1301,
        kind="node",
        certificate=b"\x30\x82" + b"c" * 500,
        alpn="cyphonic-nms",
        server_name="nms.svc.cyphonic.internal",
        issued_at=T0,
        expires_at=T0 + MAX_LIFETIME,
    )
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def test_round_trip() -> None:
    keys = TicketKeys([KEY_A])
    state = _state()
    assert keys.open(keys.seal(state), now=T0 + 1) == state


def test_another_replica_with_the_same_key_opens_it() -> None:
    ticket = TicketKeys([KEY_A]).seal(_state())
    assert TicketKeys([KEY_A]).open(ticket, now=T0).alpn == "cyphonic-nms"


def test_each_seal_is_different() -> None:
    keys = TicketKeys([KEY_A])
    first, second = keys.seal(_state()), keys.seal(_state())
    assert first != second  # a fresh nonce each time
    assert keys.open(first, now=T0) == keys.open(second, now=T0)


@pytest.mark.parametrize("position", [0, 1, 5, 9, 15, 25, 100, -1])
def test_any_changed_byte_is_refused(position: int) -> None:
    keys = TicketKeys([KEY_A])
    ticket = bytearray(keys.seal(_state()))
    ticket[position] ^= 0x01
    with pytest.raises(TokenInvalid):
        keys.open(bytes(ticket), now=T0)


def test_a_ticket_under_another_key_is_refused() -> None:
    ticket = TicketKeys([KEY_B]).seal(_state())
    with pytest.raises(TokenInvalid, match="unknown key"):
        TicketKeys([KEY_A]).open(ticket, now=T0)


def test_a_forged_key_id_fails_authentication() -> None:
    # Key B's ticket relabelled with key A's id: the tag does not verify under A.
    a, b = TicketKeys([KEY_A]), TicketKeys([KEY_B])
    ticket = b.seal(_state())
    relabelled = a.seal(_state())[:9] + ticket[9:]
    with pytest.raises(TokenInvalid, match="authentication"):
        a.open(relabelled, now=T0)


def test_rotation_old_key_still_opens_new_key_seals() -> None:
    old = TicketKeys([KEY_A]).seal(_state())
    rotated = TicketKeys([KEY_B, KEY_A])
    assert rotated.open(old, now=T0).kind == "node"
    with pytest.raises(TokenInvalid):
        TicketKeys([KEY_A]).open(rotated.seal(_state()), now=T0)


def test_expired_at_the_ticket_expiry() -> None:
    keys = TicketKeys([KEY_A])
    ticket = keys.seal(_state(expires_at=T0 + 60))  # e.g. the certificate's expiry
    assert keys.open(ticket, now=T0 + 60).issued_at == T0
    with pytest.raises(Expired):
        keys.open(ticket, now=T0 + 60.001)


def test_too_old_even_if_the_state_says_later() -> None:
    keys = TicketKeys([KEY_A])
    ticket = keys.seal(_state(expires_at=T0 + 10 * MAX_LIFETIME))
    with pytest.raises(Expired):
        keys.open(ticket, now=T0 + MAX_LIFETIME + 1)
    with pytest.raises(Expired):
        keys.open(ticket, now=T0 + 11, max_age=10)


def test_issued_in_the_future_is_refused() -> None:
    keys = TicketKeys([KEY_A])
    with pytest.raises(TokenInvalid, match="future"):
        keys.open(keys.seal(_state()), now=T0 - 3600)


@pytest.mark.parametrize(
    "ticket",
    [b"", b"\x01", b"\x01" + bytes(36), b"\x02" + bytes(100), bytes(MAX_TICKET + 1)],
)
def test_malformed_tickets_are_refused(ticket: bytes) -> None:
    with pytest.raises(TokenInvalid):
        TicketKeys([KEY_A]).open(ticket, now=T0)


def test_keys_are_checked() -> None:
    with pytest.raises(InvalidArgument):
        TicketKeys([])
    with pytest.raises(InvalidArgument):
        TicketKeys([b"short"])
    with pytest.raises(InvalidArgument):
        TicketKeys.from_secrets("too short")


def test_keys_from_configured_secrets() -> None:
    old, new = "a" * 48, "b" * 48
    sealed = TicketKeys.from_secrets(old).seal(_state())
    # Every replica given the same secrets derives the same keys; rotation: new first.
    assert TicketKeys.from_secrets(f"{new}, {old}").open(sealed, now=T0).kind == "node"
    with pytest.raises(TokenInvalid):
        TicketKeys.from_secrets(new).open(sealed, now=T0)


def test_oversized_fields_are_refused_when_sealing() -> None:
    with pytest.raises(InvalidArgument):
        TicketKeys([KEY_A]).seal(_state(alpn="x" * 256))


# -- the identity a ticket binds, re-checked at resumption


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiMaterial:
    now = datetime.datetime.fromtimestamp(T0, datetime.UTC)
    return pki.init_pki(Path(tmp_path_factory.mktemp("pki")), domain="cyphonic.internal", now=now)


def _node(material: pki.PkiMaterial, *, valid_for: datetime.timedelta) -> pki.CertifiedKey:
    key = pki.generate_key()
    fqdn = "n1.cyphonic.internal"
    now = datetime.datetime.fromtimestamp(T0, datetime.UTC)
    cert = pki.sign_node_csr(
        material.node_ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=now, valid_for=valid_for
    )
    return pki.CertifiedKey(key=key, cert=cert, chain=[material.node_ca.cert])


def _at(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(T0 + seconds, datetime.UTC)


def test_resumed_identity_equals_the_verified_one(material: pki.PkiMaterial) -> None:
    node = _node(material, valid_for=datetime.timedelta(days=1))
    full = pki.verify_peer(
        [node.cert, *node.chain],
        trust=material.trust,
        expect="node",
        expected_name=None,
        now=_at(1),
    )
    der = node.cert.public_bytes(serialization.Encoding.DER)
    keys = TicketKeys([KEY_A])
    state = keys.open(keys.seal(_state(certificate=der, kind=full.kind)), now=T0 + 2)
    leaf = x509.load_der_x509_certificate(state.certificate)
    resumed = pki.verify_resumed(
        leaf, kind=state.kind, trust=material.trust, expect="node", expected_name=None, now=_at(2)
    )
    assert resumed == full


def test_a_revoked_identity_cannot_resume(material: pki.PkiMaterial) -> None:
    node = _node(material, valid_for=datetime.timedelta(days=1))
    serial = node.cert.serial_number
    trust = dataclasses.replace(material.trust, is_revoked=lambda c: c.serial_number == serial)
    with pytest.raises(Revoked):
        pki.verify_resumed(
            node.cert, kind="node", trust=trust, expect="node", expected_name=None, now=_at(1)
        )


def test_a_revoked_node_ca_refuses_its_nodes_resumption(material: pki.PkiMaterial) -> None:
    node = _node(material, valid_for=datetime.timedelta(days=1))
    ca_serial = material.node_ca.cert.serial_number
    trust = dataclasses.replace(material.trust, is_revoked=lambda c: c.serial_number == ca_serial)
    with pytest.raises(Revoked, match="CA"):
        pki.verify_resumed(
            node.cert, kind="node", trust=trust, expect="node", expected_name=None, now=_at(1)
        )


@pytest.mark.parametrize(
    ("valid_for", "expect", "at", "error"),
    [
        (datetime.timedelta(hours=1), "node", 7200, Expired),  # the certificate expired
        (datetime.timedelta(days=1), "service", 1, Unauthenticated),  # a node is no service
    ],
)
def test_resumption_refused(
    material: pki.PkiMaterial,
    valid_for: datetime.timedelta,
    expect: pki.PeerKind,
    at: float,
    error: type[Exception],
) -> None:
    node = _node(material, valid_for=valid_for)
    with pytest.raises(error):
        pki.verify_resumed(
            node.cert,
            kind="node",
            trust=material.trust,
            expect=expect,
            expected_name=None,
            now=_at(at),
        )
