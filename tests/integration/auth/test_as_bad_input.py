"""Bad input to the AS admin REST API is answered 4xx with a JSON error, never 500."""

from __future__ import annotations

import base64

import pytest
from as_harness import AsHarness, csr_pem
from cyphonic.pki import generate_key

GARBAGE_CSRS = [
    "",
    "not a csr",
    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    "-----BEGIN CERTIFICATE REQUEST-----\n"
    + base64.b64encode(b"\x30\x82\x01\x00" + b"\0" * 40).decode()
    + "\n-----END CERTIFICATE REQUEST-----\n",
    "\u0000\u0001\u0002",
    "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
    "-----END PRIVATE KEY-----\n",
]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"token": "abc", "csr_pem": ',
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3",
    ],
)
async def test_malformed_json_is_400(as_env: AsHarness, body: bytes) -> None:
    for path, headers in (("/v1/enrol", {}), ("/v1/nodes", as_env.admin), ("/v1/enrol/info", {})):
        response = await as_env.client.post(
            path, content=body, headers={**headers, "content-type": "application/json"}
        )
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["code"] == "malformed"


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2, 3],
        "a string",
        {"token": 5, "csr_pem": "x"},
        {"token": "t"},
        {"csr_pem": "x"},
        {"token": "t", "csr_pem": "x", "extra": True},
        {"token": "t" * 201, "csr_pem": "x"},
        {"token": "t", "csr_pem": "x" * 20_000},
        None,
    ],
)
async def test_wrongly_shaped_enrol_bodies_are_422(as_env: AsHarness, payload: object) -> None:
    response = await as_env.client.post("/v1/enrol", json=payload)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_argument"
    assert error["details"]
    # The answer never echoes the submitted values back.
    assert "t" * 201 not in response.text


async def test_garbage_csr_bodies_are_422_and_keep_the_token(as_env: AsHarness) -> None:
    await as_env.create_node("victim")
    token = await as_env.token("victim")
    for garbage in GARBAGE_CSRS:
        response = await as_env.enrol(token, garbage)
        assert response.status_code == 422, (garbage, response.text)
        assert response.json()["error"]["code"] == "invalid_argument"
    admin = await as_env.client.post(
        "/v1/nodes/victim/certificates", json={"csr_pem": "junk"}, headers=as_env.admin
    )
    assert admin.status_code == 422
    good = await as_env.enrol(token, csr_pem(generate_key(), "victim.cyphonic.internal"))
    assert good.status_code == 201


async def test_oversized_body_is_413(as_env: AsHarness) -> None:
    response = await as_env.client.post(
        "/v1/enrol",
        content=b"{" + b" " * 300_000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "oversized"


async def test_bad_node_create_bodies_are_422(as_env: AsHarness) -> None:
    for payload in (
        {"name": 7},
        {"name": "ok", "tags": ["a"]},
        {"name": "ok", "tags": {"a": 1}},
        {"name": "ok", "device_info": {"nested": {"x": 1}}},
        {"name": "ok", "tags": {f"k{i}": "v" for i in range(40)}},
        {},
    ):
        response = await as_env.client.post("/v1/nodes", json=payload, headers=as_env.admin)
        assert response.status_code == 422, (payload, response.text)
    listed = (await as_env.client.get("/v1/nodes", headers=as_env.admin)).json()
    assert listed["total"] == 0


async def test_token_ttl_out_of_range_is_422(as_env: AsHarness) -> None:
    await as_env.create_node("ttl")
    for ttl in (0, 59, 31 * 86_400, "soon"):
        response = await as_env.client.post(
            "/v1/nodes/ttl/enrolment-tokens", json={"ttl_seconds": ttl}, headers=as_env.admin
        )
        assert response.status_code == 422, ttl


async def test_unknown_routes_and_methods_are_json(as_env: AsHarness) -> None:
    missing = await as_env.client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong_method = await as_env.client.delete("/v1/enrol")
    assert wrong_method.status_code == 405
    assert "error" in wrong_method.json()
