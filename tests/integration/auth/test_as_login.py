"""Login, renewal and revocation decisions of the AS on a real registry (SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
import ipaddress
from datetime import timedelta

import pytest
from as_harness import AsHarness, csr_pem
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cyphonic.errors import (
    Expired,
    InvalidArgument,
    PermissionDenied,
    Revoked,
    Unauthenticated,
    UnexpectedMessage,
)
from cyphonic.pki import (
    PeerIdentity,
    generate_key,
    issue_service_certificate,
    make_csr,
    sign_node_csr,
)
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_auth.signalling import answer


def _der_csr(key: object, fqdn: str) -> bytes:
    return make_csr(key, fqdn).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


async def test_login_answers_fqdn_and_nms_endpoints(as_env: AsHarness) -> None:
    _key, chain = await as_env.enrolled("desk")
    answer = await as_env.service.login(as_env.peer(chain))
    assert answer.fqdn == "desk.cyphonic.internal"
    assert [(ipaddress.ip_address(e.ip), e.port) for e in answer.nms] == [
        (ipaddress.ip_address("192.0.2.10"), 443),
        (ipaddress.ip_address("2001:db8::10"), 443),
    ]
    assert answer.nms_server_name == "nms.svc.cyphonic.internal"
    assert answer.certificate_not_after_ms == int(chain[0].not_valid_after_utc.timestamp()) * 1000
    assert await as_env.metric("cyphonic_as_logins_total") == 1


async def test_revoke_node_then_login_refused(as_env: AsHarness) -> None:
    _key, chain = await as_env.enrolled("stolen")
    await as_env.service.login(as_env.peer(chain))
    response = await as_env.client.post(
        "/v1/nodes/stolen/revoke", json={"reason": "key_compromise"}, headers=as_env.admin
    )
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "revoked"
    assert [c["status"] for c in body["certificates"]] == ["revoked"]
    with pytest.raises(Revoked):
        await as_env.service.login(as_env.peer(chain))
    assert (
        await as_env.metric("cyphonic_as_refusals_total", operation="login", reason="revoked") == 1
    )
    # The signalling handler raises the same typed error (the session puts it on the wire:
    # test_as_quic.py).
    with pytest.raises(Revoked):
        await answer(
            as_env.service,
            as_env.peer(chain),
            pb.Envelope(version=pb.PROTOCOL_VERSION_1, login_request=pb.LoginRequest()),
        )
    # Revoking again changes nothing and is not an error.
    again = await as_env.client.post("/v1/nodes/stolen/revoke", json={}, headers=as_env.admin)
    assert again.status_code == 200
    listed = (await as_env.client.get("/v1/revocations")).json()
    assert listed["total"] == 1
    assert listed["items"][0]["serial"] == format(chain[0].serial_number, "x")
    assert listed["items"][0]["reason"] == "key_compromise"


async def test_revoke_single_certificate_then_login_refused(as_env: AsHarness) -> None:
    _key, chain = await as_env.enrolled("tablet")
    serial = format(chain[0].serial_number, "x")
    response = await as_env.client.post(
        f"/v1/certificates/{serial}/revoke", json={"reason": "superseded"}, headers=as_env.admin
    )
    assert response.status_code == 200, response.text
    assert response.json()["serial"] == serial
    with pytest.raises(Revoked):
        await as_env.service.login(as_env.peer(chain))
    # The node itself is not revoked: a new token enrols it again.
    key = generate_key()
    enrolled = await as_env.enrol(
        await as_env.token("tablet"), csr_pem(key, "tablet.cyphonic.internal")
    )
    assert enrolled.status_code == 201
    fresh = x509.load_pem_x509_certificates(enrolled.json()["certificate_chain_pem"].encode())
    assert (await as_env.service.login(as_env.peer(fresh))).fqdn == "tablet.cyphonic.internal"
    upper = await as_env.client.post(
        f"/v1/certificates/{serial.upper()}/revoke", json={}, headers=as_env.admin
    )
    assert upper.status_code == 200 and upper.json()["id"] == response.json()["id"]
    unknown = await as_env.client.post(
        "/v1/certificates/abc123/revoke", json={}, headers=as_env.admin
    )
    assert unknown.status_code == 404
    not_hex = await as_env.client.post("/v1/certificates/xyz/revoke", json={}, headers=as_env.admin)
    assert not_hex.status_code == 422


async def test_crl_lists_revoked_serials_signed_by_the_node_ca(as_env: AsHarness) -> None:
    _k1, revoked_chain = await as_env.enrolled("one")
    _k2, kept_chain = await as_env.enrolled("two")
    await as_env.client.post(
        "/v1/nodes/one/revoke", json={"reason": "key_compromise"}, headers=as_env.admin
    )
    response = await as_env.client.get("/v1/crl")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(response.content)
    assert crl.is_signature_valid(as_env.material.node_ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.issuer == as_env.material.node_ca.cert.subject
    entry = crl.get_revoked_certificate_by_serial_number(revoked_chain[0].serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(kept_chain[0].serial_number) is None
    assert crl.next_update_utc is not None and crl.last_update_utc < crl.next_update_utc
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number >= 1


async def test_unknown_certificate_login_refused(as_env: AsHarness) -> None:
    # Signed by the real node CA but never recorded in the registry (e.g. a restored backup).
    await as_env.create_node("phantom")
    key = generate_key()
    cert = sign_node_csr(
        as_env.material.node_ca,
        make_csr(key, "phantom.cyphonic.internal"),
        fqdn="phantom.cyphonic.internal",
        now=as_env.clock(),
    )
    peer = as_env.peer([cert, as_env.material.node_ca.cert])
    with pytest.raises(Unauthenticated):
        await as_env.service.login(peer)
    assert (
        await as_env.metric(
            "cyphonic_as_refusals_total", operation="login", reason="unauthenticated"
        )
        == 1
    )


async def test_expired_certificate_login_refused(as_env: AsHarness) -> None:
    _key, chain = await as_env.enrolled("old")
    peer = as_env.peer(chain)
    as_env.clock.advance(timedelta(days=8))
    with pytest.raises(Expired):
        await as_env.service.login(peer)


async def test_service_certificate_cannot_log_in(as_env: AsHarness) -> None:
    nms = issue_service_certificate(
        as_env.material.service_ca, "nms.svc.cyphonic.internal", now=as_env.clock()
    )
    peer = PeerIdentity(name="nms.svc.cyphonic.internal", kind="service", certificate=nms.cert)
    with pytest.raises(PermissionDenied):
        await as_env.service.login(peer)


async def test_renewal_issues_a_new_certificate_for_a_new_key(as_env: AsHarness) -> None:
    _key, chain = await as_env.enrolled("roamer")
    peer = as_env.peer(chain)
    as_env.clock.advance(timedelta(days=5))  # past two thirds of 7 days
    new_key = generate_key()
    request = pb.Envelope(
        version=pb.PROTOCOL_VERSION_1,
        renew_request=pb.RenewRequest(csr_der=_der_csr(new_key, "roamer.cyphonic.internal")),
    )
    answered = await answer(as_env.service, peer, request)
    assert answered.WhichOneof("body") == "renew_response", answered
    renewed = x509.load_pem_x509_certificates(answered.renew_response.certificate_chain_pem)
    assert renewed[0].public_key() == new_key.public_key()
    assert renewed[0].serial_number != chain[0].serial_number
    assert renewed[1] == as_env.material.node_ca.cert
    assert renewed[0].not_valid_after_utc > chain[0].not_valid_after_utc
    assert (await as_env.service.login(as_env.peer(renewed))).fqdn == "roamer.cyphonic.internal"
    shown = (await as_env.client.get("/v1/nodes/roamer", headers=as_env.admin)).json()
    statuses = {c["serial"]: c["status"] for c in shown["certificates"]}
    assert statuses == {
        format(renewed[0].serial_number, "x"): "active",
        format(chain[0].serial_number, "x"): "superseded",
    }
    # The superseded certificate still works until it expires (a lost answer is survivable).
    assert (await as_env.service.login(peer)).fqdn == "roamer.cyphonic.internal"
    assert await as_env.metric("cyphonic_as_certificates_issued_total", how="renew") == 1


async def test_renewal_for_another_name_or_after_revocation_refused(as_env: AsHarness) -> None:
    _key, chain = await as_env.enrolled("mover")
    await as_env.create_node("other")
    peer = as_env.peer(chain)
    with pytest.raises(InvalidArgument):
        await answer(
            as_env.service,
            peer,
            pb.Envelope(
                version=pb.PROTOCOL_VERSION_1,
                renew_request=pb.RenewRequest(
                    csr_der=_der_csr(generate_key(), "other.cyphonic.internal")
                ),
            ),
        )
    with pytest.raises(InvalidArgument):
        await answer(
            as_env.service,
            peer,
            pb.Envelope(
                version=pb.PROTOCOL_VERSION_1,
                renew_request=pb.RenewRequest(csr_der=b"\x30\x03junk"),
            ),
        )
    await as_env.client.post("/v1/nodes/mover/revoke", json={}, headers=as_env.admin)
    with pytest.raises((Revoked, PermissionDenied)):
        await answer(
            as_env.service,
            peer,
            pb.Envelope(
                version=pb.PROTOCOL_VERSION_1,
                renew_request=pb.RenewRequest(
                    csr_der=_der_csr(generate_key(), "mover.cyphonic.internal")
                ),
            ),
        )
    shown = (await as_env.client.get("/v1/nodes/mover", headers=as_env.admin)).json()
    assert len(shown["certificates"]) == 1


async def test_signalling_refuses_messages_the_as_does_not_answer(as_env: AsHarness) -> None:
    _key, chain = await as_env.enrolled("chatty")
    with pytest.raises(UnexpectedMessage):
        await answer(
            as_env.service,
            as_env.peer(chain),
            pb.Envelope(version=pb.PROTOCOL_VERSION_1, keepalive=pb.Keepalive(sequence=1)),
        )
    with pytest.raises(UnexpectedMessage):
        await answer(as_env.service, as_env.peer(chain), pb.Envelope())


async def test_audit_trail_records_who_did_what(as_env: AsHarness) -> None:
    _key, chain = await as_env.enrolled("audited")
    await as_env.client.post(
        "/v1/nodes/audited/revoke", json={"reason": "retired"}, headers=as_env.admin
    )
    page = (await as_env.client.get("/v1/audit?limit=10", headers=as_env.admin)).json()
    actions = [(e["actor"], e["action"]) for e in page["items"]]
    assert actions == [
        ("admin", "node.revoke"),
        ("audited.cyphonic.internal", "node.enrol"),
        ("admin", "token.issue"),
        ("admin", "node.create"),
    ]
    assert page["items"][0]["detail"]["serials"] == [format(chain[0].serial_number, "x")]
    fingerprint = chain[0].fingerprint(hashes.SHA256()).hex()
    assert fingerprint not in str(page)  # the trail names serials, it holds no key material


async def test_crl_request_answers_the_crl_then_only_news(as_env: AsHarness) -> None:
    _key, chain = await as_env.enrolled("lister")
    await as_env.enrolled("victim")
    peer = as_env.peer(chain)

    def ask(have: int) -> pb.Envelope:
        return pb.Envelope(
            version=pb.PROTOCOL_VERSION_1, crl_request=pb.CrlRequest(have_number=have)
        )

    first = (await answer(as_env.service, peer, ask(0))).crl_response
    crl = x509.load_der_x509_crl(first.crl_der)
    assert crl.is_signature_valid(as_env.material.node_ca.cert.public_key())  # type: ignore[arg-type]
    assert len(crl) == 0
    revoked = await as_env.client.post(
        "/v1/nodes/victim/revoke", json={"reason": "key_compromise"}, headers=as_env.admin
    )
    assert revoked.status_code == 200
    second = (await answer(as_env.service, peer, ask(first.number))).crl_response
    assert second.number > first.number and len(x509.load_der_x509_crl(second.crl_der)) == 1
    same = (await answer(as_env.service, peer, ask(second.number))).crl_response
    assert same.number == second.number and same.crl_der == b""


async def test_revocation_watch_answers_when_a_revocation_happens(as_env: AsHarness) -> None:
    await as_env.enrolled("watched")
    now = await as_env.client.get("/v1/revocations/watch", params={"wait_s": 0})
    newest = now.json()["newest_id"]
    waiting = asyncio.ensure_future(
        as_env.client.get("/v1/revocations/watch", params={"after_id": newest, "wait_s": 30})
    )
    await asyncio.sleep(0.3)
    assert not waiting.done()  # held open: nothing newer yet
    revoked = await as_env.client.post(
        "/v1/nodes/watched/revoke", json={"reason": "key_compromise"}, headers=as_env.admin
    )
    assert revoked.status_code == 200
    answered = await asyncio.wait_for(waiting, 5)
    assert answered.json()["newest_id"] > newest
    bad = await as_env.client.get("/v1/revocations/watch", params={"wait_s": 600})
    assert bad.status_code == 422
