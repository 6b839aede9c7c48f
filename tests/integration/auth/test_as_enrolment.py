"""Enrolment through the AS admin REST API on a real registry (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from as_harness import AsHarness, csr_pem
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cyphonic.errors import TokenInvalid
from cyphonic.pki import certificate_dns_names, generate_key, verify_peer
from cyphonic.registry.models import Certificate, EnrolmentToken, Node
from cyphonic_auth.enrolment import hash_token
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession


async def _count(env: AsHarness, query: object) -> int:
    engine = env.service.registry.engine  # type: ignore[attr-defined]
    async with AsyncSession(engine) as session:
        return int((await session.execute(query)).scalar_one())  # type: ignore[call-overload]


async def test_enrol_with_token_issues_a_verifiable_certificate(as_env: AsHarness) -> None:
    node = await as_env.create_node("laptop", tags={"owner": "alice"})
    assert node["fqdn"] == "laptop.cyphonic.internal"
    assert node["state"] == "pending"
    token = await as_env.token("laptop")

    info = await as_env.client.post("/v1/enrol/info", json={"token": token})
    assert info.status_code == 200
    assert info.json() == {"name": "laptop", "fqdn": "laptop.cyphonic.internal"}

    key = generate_key()
    response = await as_env.enrol(token, csr_pem(key, "laptop.cyphonic.internal"))
    assert response.status_code == 201, response.text
    body = response.json()
    chain = x509.load_pem_x509_certificates(body["certificate_chain_pem"].encode())
    root = x509.load_pem_x509_certificate(body["root_ca_pem"].encode())
    assert root == as_env.material.root_cert
    assert len(chain) == 2 and chain[1] == as_env.material.node_ca.cert
    assert chain[0].public_key() == key.public_key()
    assert certificate_dns_names(chain[0]) == ["laptop.cyphonic.internal"]
    assert body["serial"] == format(chain[0].serial_number, "x")
    assert body["as_endpoints"] == ["192.0.2.1:443"]
    assert body["as_server_name"] == "as.svc.cyphonic.internal"
    validity = chain[0].not_valid_after_utc - as_env.clock()
    assert timedelta(days=6) < validity <= timedelta(days=7)  # short-lived, renewed in place
    identity = verify_peer(
        chain,
        trust=as_env.material.trust,
        expect="node",
        expected_name="laptop.cyphonic.internal",
        now=as_env.clock(),
    )
    assert identity.kind == "node"

    shown = (await as_env.client.get("/v1/nodes/laptop", headers=as_env.admin)).json()
    assert shown["state"] == "active"
    assert [c["serial"] for c in shown["certificates"]] == [body["serial"]]
    assert shown["certificates"][0]["status"] == "active"
    assert await as_env.metric("cyphonic_as_enrolments_total") == 1
    # Only the hash of the token is stored, and it is now used.
    used = await _count(
        as_env,
        select(func.count())
        .select_from(EnrolmentToken)
        .where(EnrolmentToken.token_hash == hash_token(token), EnrolmentToken.used_at.is_not(None)),
    )
    assert used == 1
    stored = await _count(
        as_env,
        select(func.count()).select_from(EnrolmentToken).where(EnrolmentToken.token_hash == token),
    )
    assert stored == 0


async def test_token_reuse_is_refused(as_env: AsHarness) -> None:
    await as_env.create_node("phone")
    token = await as_env.token("phone")
    first = await as_env.enrol(token, csr_pem(generate_key(), "phone.cyphonic.internal"))
    assert first.status_code == 201
    again = await as_env.enrol(token, csr_pem(generate_key(), "phone.cyphonic.internal"))
    assert again.status_code == 403
    assert again.json()["error"]["code"] == "token_invalid"
    assert "already used" in again.json()["error"]["message"]
    info = await as_env.client.post("/v1/enrol/info", json={"token": token})
    assert info.status_code == 403
    assert (
        await as_env.metric("cyphonic_as_refusals_total", operation="enrol", reason="token_used")
        == 2
    )
    certs = await _count(as_env, select(func.count()).select_from(Certificate))
    assert certs == 1


async def test_unknown_token_is_refused(as_env: AsHarness) -> None:
    await as_env.create_node("ghost")
    response = await as_env.enrol(
        "cye_not-a-real-token", csr_pem(generate_key(), "ghost.cyphonic.internal")
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "token_invalid"
    assert (
        await as_env.metric("cyphonic_as_refusals_total", operation="enrol", reason="token_unknown")
        == 1
    )


async def test_expired_token_is_refused(as_env: AsHarness) -> None:
    await as_env.create_node("sensor")
    token = await as_env.token("sensor", ttl_seconds=600)
    as_env.clock.advance(timedelta(seconds=601))
    response = await as_env.enrol(token, csr_pem(generate_key(), "sensor.cyphonic.internal"))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "token_invalid"
    assert "expired" in response.json()["error"]["message"]
    shown = (await as_env.client.get("/v1/nodes/sensor", headers=as_env.admin)).json()
    assert shown["state"] == "pending" and shown["certificates"] == []


async def test_token_just_before_expiry_still_works(as_env: AsHarness) -> None:
    await as_env.create_node("edge")
    token = await as_env.token("edge", ttl_seconds=600)
    as_env.clock.advance(timedelta(seconds=599))
    response = await as_env.enrol(token, csr_pem(generate_key(), "edge.cyphonic.internal"))
    assert response.status_code == 201


async def test_csr_for_another_name_is_refused_and_the_token_survives(as_env: AsHarness) -> None:
    await as_env.create_node("alpha")
    await as_env.create_node("beta")
    token = await as_env.token("alpha")
    key = generate_key()
    wrong = await as_env.enrol(token, csr_pem(key, "beta.cyphonic.internal"))
    assert wrong.status_code == 422
    assert wrong.json()["error"]["code"] == "invalid_argument"
    assert "alpha.cyphonic.internal" in wrong.json()["error"]["message"]
    beta = (await as_env.client.get("/v1/nodes/beta", headers=as_env.admin)).json()
    assert beta["certificates"] == []
    # A refused CSR does not burn the token: the node can retry with a correct one.
    right = await as_env.enrol(token, csr_pem(key, "alpha.cyphonic.internal"))
    assert right.status_code == 201


async def test_weak_key_csr_is_refused(as_env: AsHarness) -> None:
    await as_env.create_node("weak")
    token = await as_env.token("weak")
    key = ec.generate_private_key(ec.SECP521R1())
    response = await as_env.enrol(token, csr_pem(key, "weak.cyphonic.internal"))
    assert response.status_code == 422
    assert "P-256" in response.json()["error"]["message"]


async def test_admin_routes_refuse_missing_or_wrong_token(as_env: AsHarness) -> None:
    await as_env.create_node("guarded")
    routes = [
        ("POST", "/v1/nodes", {"name": "intruder"}),
        ("GET", "/v1/nodes", None),
        ("GET", "/v1/nodes/guarded", None),
        ("POST", "/v1/nodes/guarded/enrolment-tokens", {}),
        ("POST", "/v1/nodes/guarded/certificates", {"csr_pem": "x"}),
        ("POST", "/v1/nodes/guarded/revoke", {}),
        ("POST", "/v1/certificates/abcd/revoke", {}),
        ("GET", "/v1/certificates/abcd", None),
        ("GET", "/v1/audit", None),
    ]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
        for method, path, body in routes:
            response = await as_env.client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"]["code"] == "unauthenticated"
            assert response.headers["www-authenticate"] == "Bearer"
    listed = (await as_env.client.get("/v1/nodes", headers=as_env.admin)).json()
    assert [n["name"] for n in listed["items"]] == ["guarded"]
    shown = (await as_env.client.get("/v1/nodes/guarded", headers=as_env.admin)).json()
    assert shown["state"] == "pending"


async def test_admin_signs_a_csr_directly(as_env: AsHarness) -> None:
    await as_env.create_node("server")
    key = generate_key()
    response = await as_env.client.post(
        "/v1/nodes/server/certificates",
        json={"csr_pem": csr_pem(key, "server.cyphonic.internal"), "valid_days": 7},
        headers=as_env.admin,
    )
    assert response.status_code == 201, response.text
    chain = x509.load_pem_x509_certificates(response.json()["certificate_chain_pem"].encode())
    assert chain[0].public_key() == key.public_key()
    assert chain[0].not_valid_after_utc - as_env.clock() <= timedelta(days=7)
    wrong = await as_env.client.post(
        "/v1/nodes/server/certificates",
        json={"csr_pem": csr_pem(key, "client.cyphonic.internal")},
        headers=as_env.admin,
    )
    assert wrong.status_code == 422


async def test_duplicate_and_invalid_node_names(as_env: AsHarness) -> None:
    await as_env.create_node("dup")
    again = await as_env.client.post("/v1/nodes", json={"name": "dup"}, headers=as_env.admin)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "already_exists"
    upper = await as_env.client.post("/v1/nodes", json={"name": "DUP"}, headers=as_env.admin)
    assert upper.status_code == 409  # names are case-insensitive DNS labels
    for bad in ("-lead", "trail-", "has.dot", "under_score", "", "x" * 64, "svc", "sp ace"):
        response = await as_env.client.post("/v1/nodes", json={"name": bad}, headers=as_env.admin)
        assert response.status_code == 422, bad
        assert response.json()["error"]["code"] == "invalid_argument"
    missing = await as_env.client.get("/v1/nodes/nobody", headers=as_env.admin)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    bad_path = await as_env.client.get("/v1/nodes/Bad_Name", headers=as_env.admin)
    assert bad_path.status_code == 422


async def test_pagination_of_nodes(as_env: AsHarness) -> None:
    for i in range(7):
        await as_env.create_node(f"n{i}")
    first = (await as_env.client.get("/v1/nodes?limit=3", headers=as_env.admin)).json()
    assert first["total"] == 7 and first["limit"] == 3 and first["offset"] == 0
    assert [n["name"] for n in first["items"]] == ["n0", "n1", "n2"]
    last = (await as_env.client.get("/v1/nodes?limit=3&offset=6", headers=as_env.admin)).json()
    assert [n["name"] for n in last["items"]] == ["n6"]
    for query in ("limit=0", "limit=501", "offset=-1", "limit=abc"):
        response = await as_env.client.get(f"/v1/nodes?{query}", headers=as_env.admin)
        assert response.status_code == 422, query


async def test_fifty_concurrent_enrolments_are_distinct_and_consistent(
    as_env: AsHarness,
) -> None:
    names = [f"fleet-{i:02d}" for i in range(50)]
    for name in names:
        await as_env.create_node(name)
    tokens = [await as_env.token(name) for name in names]
    keys = [generate_key() for _ in names]

    responses = await asyncio.gather(
        *(
            as_env.enrol(token, csr_pem(key, f"{name}.cyphonic.internal"))
            for name, token, key in zip(names, tokens, keys, strict=True)
        )
    )
    assert [r.status_code for r in responses] == [201] * 50, [
        r.text for r in responses if r.status_code != 201
    ][:3]
    bodies = [r.json() for r in responses]
    assert sorted(b["fqdn"] for b in bodies) == sorted(f"{n}.cyphonic.internal" for n in names)
    assert len({b["serial"] for b in bodies}) == 50
    for body, key, name in zip(bodies, keys, names, strict=True):
        leaf = x509.load_pem_x509_certificate(body["certificate_chain_pem"].encode())
        assert leaf.public_key() == key.public_key()
        assert certificate_dns_names(leaf) == [f"{name}.cyphonic.internal"]

    assert await _count(as_env, select(func.count()).select_from(Certificate)) == 50
    assert await _count(as_env, select(func.count(func.distinct(Certificate.node_id)))) == 50
    assert (
        await _count(as_env, select(func.count()).select_from(Node).where(Node.state == "active"))
        == 50
    )
    assert (
        await _count(
            as_env,
            select(func.count())
            .select_from(EnrolmentToken)
            .where(EnrolmentToken.used_at.is_not(None)),
        )
        == 50
    )
    assert await as_env.metric("cyphonic_as_enrolments_total") == 50


async def test_one_token_raced_fifty_times_enrols_once(as_env: AsHarness) -> None:
    await as_env.create_node("racer")
    token = await as_env.token("racer")
    responses = await asyncio.gather(
        *(
            as_env.enrol(token, csr_pem(generate_key(), "racer.cyphonic.internal"))
            for _ in range(20)
        )
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] + [403] * 19
    assert await _count(as_env, select(func.count()).select_from(Certificate)) == 1


async def test_token_for_a_revoked_node_is_refused(as_env: AsHarness) -> None:
    await as_env.create_node("gone")
    token = await as_env.token("gone")
    revoked = await as_env.client.post(
        "/v1/nodes/gone/revoke", json={"reason": "lost"}, headers=as_env.admin
    )
    assert revoked.status_code == 200
    assert revoked.json()["state"] == "revoked"
    response = await as_env.enrol(token, csr_pem(generate_key(), "gone.cyphonic.internal"))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "token_invalid"
    new_token = await as_env.client.post(
        "/v1/nodes/gone/enrolment-tokens", json={}, headers=as_env.admin
    )
    assert new_token.status_code == 403
    assert new_token.json()["error"]["code"] == "permission_denied"


async def test_service_level_token_refusal_is_typed(as_env: AsHarness) -> None:
    await as_env.create_node("typed")
    issued = await as_env.service.issue_token("typed", ttl=None, actor="test")
    await as_env.service.enrol(issued.token, csr_pem(generate_key(), "typed.cyphonic.internal"))
    try:
        await as_env.service.enrol(issued.token, csr_pem(generate_key(), "typed.cyphonic.internal"))
    except TokenInvalid as exc:
        assert exc.code_name == "token_invalid"
    else:
        raise AssertionError("second enrolment with one token was accepted")


async def test_as_endpoints_default_to_the_host_the_node_used(as_env: AsHarness) -> None:
    as_env.service.settings.as_endpoints = []
    as_env.service.settings.quic_port = 8443
    await as_env.create_node("finder")
    response = await as_env.enrol(
        await as_env.token("finder"), csr_pem(generate_key(), "finder.cyphonic.internal")
    )
    assert response.status_code == 201
    assert response.json()["as_endpoints"] == ["as.test:8443"]
